"""Hot reload of the profile directory: build a whole new snapshot, then swap one reference.

A reader (a Check) takes `holder.current` once and uses that snapshot to the end, so no
Check ever sees a half-loaded state. A broken reload keeps the last good snapshot, logs
the problems with file/document/field, and is visible in `status()` (readiness) and the
`mandate_profiles_stale` metric. Changes are noticed through file events (watchfiles,
which sees a ConfigMap's `..data` symlink swap) and, as a fallback for filesystems without
events, by polling a cheap fingerprint of the directory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import watchfiles

from sidecar.core import Snapshot, fingerprint, load_profiles
from sidecar.errors import ProfileErrors
from sidecar.telemetry import metrics

__all__ = ["ReloadStatus", "SnapshotHolder"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReloadStatus:
    version: str
    agents: int
    loaded_at: float
    last_error: str | None
    last_error_at: float | None
    reloads: int
    failures: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.last_error is None,
            "version": self.version,
            "agents": self.agents,
            "loaded_at": self.loaded_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "reloads": self.reloads,
            "failures": self.failures,
        }


class SnapshotHolder:
    """Owns the current snapshot of one profile directory and keeps it fresh."""

    def __init__(
        self, directory: str | Path, on_install: Callable[[Snapshot], None] | None = None
    ) -> None:
        self.directory = Path(directory)
        # Told after each swap: the snapshot is enforced (`subscribe` adds more).
        self._on_install = [on_install] if on_install is not None else []
        self.current: Snapshot | None = None
        self._lock = threading.Lock()  # serialises reloads, never taken by readers
        self._fingerprint = ""
        self._loaded_at = 0.0
        self._error: str | None = None
        self._error_at: float | None = None
        self._reloads = 0
        self._failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self) -> Snapshot | None:
        return self.current

    def load_initial(self) -> Snapshot:
        """First load; raises ProfileErrors (the caller refuses to start)."""
        with self._lock:
            self._fingerprint = fingerprint(self.directory)
            snap = load_profiles(self.directory)
            self._install(snap)
            return snap

    def _install(self, snap: Snapshot) -> None:
        self.current = snap  # the one atomic swap
        self._loaded_at = time.time()
        self._error = None
        self._error_at = None
        metrics.observe_reload(True, len(snap.agents), snap.version)
        for listener in list(self._on_install):
            try:
                listener(snap)
            except Exception:  # reporting the version must never undo the reload
                log.exception("reporting the new profile version failed")

    def subscribe(self, on_install: Callable[[Snapshot], None]) -> None:
        """Call ``on_install(snapshot)`` after every later swap (one holder, several users:
        the supervisor and its in-process worker share one)."""
        self._on_install.append(on_install)

    def reload(self) -> bool:
        """Load the directory again; True if a new snapshot is now enforced."""
        with self._lock:
            self._fingerprint = fingerprint(self.directory)
            try:
                snap = load_profiles(self.directory)
            except ProfileErrors as exc:
                self._failures += 1
                self._error = str(exc)
                self._error_at = time.time()
                metrics.observe_reload(False)
                log.error(
                    "profile reload failed; still enforcing version %s:\n%s",
                    self.current.version if self.current else "-",
                    exc,
                )
                return False
            except Exception as exc:  # never let the watcher die
                self._failures += 1
                self._error = f"unexpected error: {exc!r}"
                self._error_at = time.time()
                metrics.observe_reload(False)
                log.exception("profile reload failed unexpectedly")
                return False
            if self.current is not None and snap.version == self.current.version:
                self._error, self._error_at = None, None
                metrics.PROFILES_STALE.set(0)
                return False
            self._reloads += 1
            self._install(snap)
            log.info("profiles reloaded: version %s, %d agents", snap.version, len(snap.agents))
            return True

    def status(self) -> ReloadStatus:
        snap = self.current
        return ReloadStatus(
            version=snap.version if snap else "",
            agents=len(snap.agents) if snap else 0,
            loaded_at=self._loaded_at,
            last_error=self._error,
            last_error_at=self._error_at,
            reloads=self._reloads,
            failures=self._failures,
        )

    def start(self, poll_seconds: float = 2.0) -> None:
        """Watch the directory in a daemon thread until `stop()`."""
        self._thread = threading.Thread(
            target=self._watch, args=(poll_seconds,), name="profile-watch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self, poll_seconds: float) -> None:
        while not self._stop.is_set():
            try:
                for changes in watchfiles.watch(
                    self.directory,
                    stop_event=self._stop,
                    debounce=200,
                    step=50,
                    rust_timeout=int(poll_seconds * 1000),
                    yield_on_timeout=True,
                    raise_interrupt=False,
                    ignore_permission_denied=True,
                    watch_filter=None,
                ):
                    if changes or fingerprint(self.directory) != self._fingerprint:
                        self.reload()
            except Exception:  # the directory vanished, inotify limits, ...: poll instead
                log.exception("watching %s failed; polling", self.directory)
                if self._stop.wait(poll_seconds):
                    return
                if fingerprint(self.directory) != self._fingerprint:
                    self.reload()
