"""The supervisor's revocation store: the single writer of the shared table.

Every source (the Kubernetes watcher, the admin API, behaviour analysis later) changes
revocations through this store. Each change publishes a whole new table generation to
shared memory (workers see it on their next Check) and persists the full set to a JSON
file on a volume (atomic rename, fsync), so a restart enforces what was in force before.
Listeners are told what was added and removed, after the write is visible to workers.
No decision logic and no network I/O here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .core.revocation import Revocation, RevocationTable
from .errors import ConfigError
from .shm import SharedTable
from .statefile import write_json_durably

__all__ = ["Change", "RevocationStore"]

log = logging.getLogger(__name__)
STATE_VERSION = 1

# (added, removed, generation, time the write became visible)
Change = tuple[list[Revocation], list[Revocation], int, float]


class RevocationStore:
    def __init__(
        self,
        table: SharedTable,
        state_file: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._table = table
        self._state_file = state_file
        self._clock = clock
        self._entries: dict[str, Revocation] = {}
        self._complete = False
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Change], None]] = []
        self.generation = 0
        self.visible_at = 0.0  # when the last write became visible to workers

    # -- reading --------------------------------------------------------------------------

    def entries(self, source: str | None = None) -> list[Revocation]:
        with self._lock:
            return sorted(
                (r for r in self._entries.values() if source is None or r.source == source),
                key=lambda r: r.key,
            )

    def table(self) -> RevocationTable:
        with self._lock:
            return RevocationTable.build(self.generation, self._entries.values(), self._complete)

    @property
    def complete(self) -> bool:
        return self._complete

    def subscribe(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    # -- persistence ----------------------------------------------------------------------

    def load_persisted(self) -> int:
        """Load the state file (if any) and publish it, still marked incomplete. A file that
        cannot be read is an error naming it: starting without it could forget revocations."""
        path = self._state_file
        if path is None or not path.exists():
            self._publish([], [])
            return 0
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                raise ValueError(f"expected an object with version {STATE_VERSION}")
            items = [Revocation.from_dict(d) for d in doc["revocations"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"revocation state {path}: cannot be read ({exc}); fix or move it aside "
                "(revocations it holds would otherwise be forgotten)"
            ) from None
        with self._lock:
            self._entries = {r.key: r for r in items}
            self._publish(items, [])
        log.info("loaded %d persisted revocation(s) from %s", len(items), path)
        return len(items)

    def _persist(self) -> None:
        path = self._state_file
        if path is None:
            return
        doc = {"version": STATE_VERSION, "revocations": [r.as_dict() for r in self.entries()]}
        write_json_durably(path, doc, indent=1)

    # -- writing --------------------------------------------------------------------------

    def _publish(self, added: list[Revocation], removed: list[Revocation]) -> None:
        self.generation = self._table.write(self._entries.values(), self._complete)
        visible_at = self.visible_at = self._clock()
        try:
            self._persist()
        except OSError:
            # Enforcement is already in shared memory; losing persistence is reported loudly.
            log.exception("could not persist revocations to %s", self._state_file)
        change: Change = (added, removed, self.generation, visible_at)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("revocation listener failed")

    def mark_complete(self) -> None:
        """The first full sync is done: workers may start allowing calls."""
        with self._lock:
            if not self._complete:
                self._complete = True
                self._publish([], [])

    def upsert(self, rev: Revocation) -> bool:
        with self._lock:
            old = self._entries.get(rev.key)
            if old == rev:
                return False
            self._entries[rev.key] = rev
            self._publish([rev], [old] if old else [])
            return True

    def remove(self, key: str) -> Revocation | None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._publish([], [old])
            return old

    def remove_matching(self, predicate: Callable[[Revocation], bool]) -> list[Revocation]:
        with self._lock:
            gone = [r for r in self._entries.values() if predicate(r)]
            for r in gone:
                del self._entries[r.key]
            if gone:
                self._publish([], gone)
            return gone

    def replace_source(self, source: str, entries: Iterable[Revocation]) -> tuple[int, int]:
        """Make ``source``'s entries exactly ``entries`` (a relist); return (added, removed)."""
        with self._lock:
            new = {r.key: r for r in entries}
            if any(r.source != source for r in new.values()):
                raise ValueError(f"replace_source({source!r}) given another source's entry")
            old = {k: r for k, r in self._entries.items() if r.source == source}
            added = [r for k, r in new.items() if old.get(k) != r]
            # a modified entry is reported as its old version removed, as upsert does
            removed = [r for k, r in old.items() if new.get(k) != r]
            if not added and not removed:
                return 0, 0
            for r in removed:
                self._entries.pop(r.key, None)
            self._entries.update({r.key: r for r in added})
            self._publish(added, removed)
            return len(added), len(removed)

    def prune_expired(self, sources: tuple[str, ...] = ("admin", "behaviour")) -> int:
        """Drop expired entries that no other system will remove (Kubernetes objects stay
        until deleted; they are simply no longer in force)."""
        now = self._clock()
        return len(self.remove_matching(lambda r: r.source in sources and not r.active(now)))
