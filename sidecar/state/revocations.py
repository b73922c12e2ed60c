"""The supervisor's revocation store: the single writer of the shared table.

Every source (the Kubernetes watcher, the admin API, behaviour analysis later) changes
revocations through this store. Each change publishes a whole new table generation to
shared memory (workers see it on their next Check) and persists the full set to a JSON
file on a volume (atomic rename, fsync), so a restart enforces what was in force before.
Listeners are told what was added and removed, after the write is visible to workers.
The generation, the durable write and its health are `publisher.GenerationPublisher`'s;
this module keeps the set and decides the order. No decision logic and no network I/O here.

When the file cannot be written (a read-only or full volume), enforcement never weakens:
- a new or changed revocation is in force in shared memory at once and stays so; the write
  failure is kept (`persistence()`) until a later write of the whole set succeeds;
- an operator's action (`durable=True`: the admin API) raises StateWriteError instead of
  reporting success. A revocation is then in force but not durable (the answer says so); a
  restore is not done at all — the file is written first and memory changed only after —
  so the agent stays revoked now and after a restart, never "allowed now, revoked again at
  the next restart" without anyone noticing;
- every other writer (the Kubernetes watcher, behaviour analysis, expiry) goes on: its
  source of truth is elsewhere, and the failure shows in readiness and the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sidecar.core.revocation import Revocation, RevocationTable
from sidecar.errors import StateWriteError
from sidecar.state.publisher import GenerationPublisher, PersistFailure
from sidecar.state.shm import SharedTable

__all__ = ["Change", "PersistFailure", "RevocationStore"]

log = logging.getLogger(__name__)
STATE_VERSION = 1

# (added, removed, generation, time the write became visible)
Change = tuple[list[Revocation], list[Revocation], int, float]
_UNREADABLE = "; fix or move it aside (revocations it holds would otherwise be forgotten)"


class RevocationStore:
    def __init__(
        self,
        table: SharedTable,
        state_file: Path | None,
        clock: Callable[[], float] = time.time,
        on_persist: Callable[[StateWriteError | None], None] = lambda _: None,
    ) -> None:
        """``on_persist``: told after every write of the state file, with None on success
        (metrics); called under the store's lock, so it must not call back into the store."""
        self._table = table
        self._clock = clock
        self._on_persist = on_persist
        self._published = GenerationPublisher(
            state_file,
            describe="revocations",
            version=STATE_VERSION,
            indent=1,
            clock=clock,
            on_persist=lambda failure: self._on_persist(failure),
            log=log,
        )
        self._entries: dict[str, Revocation] = {}
        self._complete = False
        self._refused = ""  # why the Kubernetes source was refused (401/403/no CRD), if it is
        self._lock = threading.RLock()
        self._listeners: list[Callable[[Change], None]] = []

    @property
    def generation(self) -> int:
        """The generation of the table last published."""
        return self._published.generation

    @property
    def visible_at(self) -> float:
        """When the last write became visible to workers."""
        return self._published.visible_at

    # -- reading --------------------------------------------------------------------------

    def entries(self, source: str | None = None) -> list[Revocation]:
        with self._lock:
            return sorted(
                (r for r in self._entries.values() if source is None or r.source == source),
                key=lambda r: r.key,
            )

    def table(self) -> RevocationTable:
        with self._lock:
            return RevocationTable.build(
                self.generation, self._entries.values(), self._complete, self._refused
            )

    @property
    def complete(self) -> bool:
        return self._complete and not self._refused

    @property
    def refused(self) -> str:
        """Why the revocations cannot be read (a configuration error), or ""."""
        return self._refused

    def subscribe(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    # -- persistence ----------------------------------------------------------------------

    def load_persisted(self) -> int:
        """Load the state file (if any) and publish it, still marked incomplete. A file that
        cannot be read is an error naming it: starting without it could forget revocations."""
        items = self._published.load(_parse, what="revocation state", hint=_UNREADABLE)
        with self._lock:
            if items is None:
                self._publish([], [])
                return 0
            self._entries = {r.key: r for r in items}
            self._publish(items, [])
        log.info("loaded %d persisted revocation(s) from %s", len(items), self._published.path)
        return len(items)

    def persistence(self) -> dict[str, Any]:
        """Readiness details: is what is in force also on disk? ``durable`` false names the
        file, the OS error and since when (cleared by the next write that succeeds)."""
        with self._lock:
            return self._published.health()

    def _save(self, entries: Iterable[Revocation]) -> StateWriteError | None:
        """Write ``entries`` (the whole set) to the state file; the failure, if any, is kept
        for readiness and returned (never raised: enforcement is the caller's business)."""
        return self._published.persist(lambda: _document(entries))

    def flush(self) -> StateWriteError | None:
        """After a failed write, try again (the supervisor calls this periodically): what
        has been in force only in memory becomes durable once the volume is writable."""
        with self._lock:
            return self._published.retry(lambda: _document(self._entries.values()))

    # -- writing --------------------------------------------------------------------------

    def _publish(
        self, added: list[Revocation], removed: list[Revocation], *, persist: bool = True
    ) -> StateWriteError | None:
        generation = self._published.publish(
            lambda: self._table.write(self._entries.values(), self._complete, self._refused)
        )
        # Enforcement is in shared memory already; a failed write is kept and reported (the
        # caller decides whether it is an error), never a reason to undo enforcement.
        failure = self._save(self._entries.values()) if persist else None
        change: Change = (added, removed, generation, self._published.visible_at)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("revocation listener failed")
        return failure

    def mark_complete(self, *, fallback: bool = False) -> None:
        """A full sync is done (a list succeeded): workers may allow calls, and a refusal
        is over. ``fallback``: not synced, but the API server has been unreachable past the
        initial-sync timeout, so the last known revocations are enforced; never while the
        source is refused (a refusal is a configuration error, not an outage)."""
        with self._lock:
            if fallback and self._refused:
                return
            changed = not self._complete or (bool(self._refused) and not fallback)
            self._complete = True
            if not fallback:
                self._refused = ""
            if changed:
                self._publish([], [])

    def refuse(self, why: str) -> None:
        """The revocations were refused (401/403, no AgentRevocation resource): every call
        is denied, saying ``why``, until a list succeeds (`mark_complete`). The entries in
        force stay (they are still enforced, and kept on disk)."""
        with self._lock:
            if self._refused == why and not self._complete:
                return
            self._refused, self._complete = why, False
            self._publish([], [], persist=False)

    @property
    def persistent(self) -> bool:
        """Whether there is a state file at all (a store without one forgets at restart)."""
        return self._published.persistent

    def upsert(self, rev: Revocation, *, durable: bool = False) -> bool:
        """Put ``rev`` in force (at once, in shared memory). ``durable``: an operator's
        action, which raises StateWriteError when the file cannot be written — ``rev`` is
        in force all the same (fail closed), but would not survive a restart."""
        with self._lock:
            old = self._entries.get(rev.key)
            if old == rev:
                # Nothing new, but an earlier write may have failed: the operator retrying
                # (e.g. after fixing the volume) must get "durable" only once it is.
                if durable and self._published.failing:
                    failure = self._save(self._entries.values())
                    if failure is not None:
                        raise failure
                return False
            self._entries[rev.key] = rev
            failure = self._publish([rev], [old] if old else [])
            if durable and failure is not None:
                raise failure
            return True

    def remove(self, key: str) -> Revocation | None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._publish([], [old])
            return old

    def remove_matching(
        self, predicate: Callable[[Revocation], bool], *, durable: bool = False
    ) -> list[Revocation]:
        """End the entries ``predicate`` selects. ``durable`` (an operator's restore): the
        file is written first and, if that fails, nothing changes and StateWriteError is
        raised: the agent stays revoked, in memory and on disk alike."""
        with self._lock:
            gone = [r for r in self._entries.values() if predicate(r)]
            if not gone:
                return gone
            written = False
            if durable and self._published.persistent:
                ending = {r.key for r in gone}
                failure = self._save(r for r in self._entries.values() if r.key not in ending)
                if failure is not None:
                    raise failure
                written = True
            for r in gone:
                del self._entries[r.key]
            self._publish([], gone, persist=not written)
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


def _document(entries: Iterable[Revocation]) -> dict[str, Any]:
    return {"revocations": [r.as_dict() for r in sorted(entries, key=lambda r: r.key)]}


def _parse(doc: Mapping[str, Any]) -> list[Revocation]:
    return [Revocation.from_dict(d) for d in doc["revocations"]]
