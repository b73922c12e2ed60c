"""Publish a generation, persist it: the one mechanism behind both single writers of a
shared table (the revocation store and the agent-state store).

A writer changes its in-memory state under its own lock and, with that lock still held:
- `publish(write)` hands a whole new table to its shared-memory segment (``write`` returns
  the generation the segment assigned) and records that generation and when it became
  visible to the workers;
- `persist(body)` writes the whole state to its JSON file, durably (`statefile`), as
  ``{"version": N, **body}``. A write that fails is reported, never pretended: it is
  returned (StateWriteError naming the file and the OS error), kept for `health()`
  (``durable`` false, since when, how many failures) and told to ``on_persist`` (metrics),
  until a later write succeeds. Whoever answers an operator raises it: success is reported
  only for what is durable;
- `retry(body)` tries again after a failure (at most every ``retry_every`` seconds);
- `load(parse)` reads the file at start-up; one that cannot be read is a ConfigError naming
  it (starting without it would forget what it holds).

Which of publish and persist comes first is the writer's rule, the same in both stores:
what takes rights away is published first (in force at once, even when the file cannot be
written; the failure is kept and retried, never a reason to undo it); what gives rights is
persisted (and audited) first and published only once that succeeded.

No lock here: the writer's lock serializes every call. No decision logic, no network I/O.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sidecar.errors import ConfigError, StateWriteError
from sidecar.state.statefile import os_error_text, write_json_durably
from sidecar.telemetry import metrics

__all__ = ["GenerationPublisher", "PersistFailure", "durability_metrics"]

log = logging.getLogger(__name__)
T = TypeVar("T")
Body = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class PersistFailure:
    """The state file has not been written since ``since``: what is in force in memory is
    not what a restart would load. ``failures`` counts the attempts that failed since."""

    file: str
    error: str
    since: float
    failures: int

    def as_error(self) -> StateWriteError:
        return StateWriteError(self.file, self.error)


def durability_metrics(label: str) -> Callable[[StateWriteError | None], None]:
    """An ``on_persist`` that keeps `mandate_state_durable{file=label}` and
    `mandate_state_write_failures{file=label}` (``label``: a fixed name, never a path)."""

    def told(failure: StateWriteError | None) -> None:
        metrics.STATE_DURABLE.labels(label).set(0 if failure else 1)
        if failure is not None:
            metrics.STATE_WRITE_FAILURES.labels(label).inc()

    return told


class GenerationPublisher:
    """The generation a writer last published, and the durability of its state file.

    ``path`` None: nothing is persisted (a store that forgets at restart; never durable).
    ``describe`` names the state in log lines ("revocations"); ``log`` is the writer's
    logger, so the lines say whose state it is."""

    def __init__(
        self,
        path: Path | None,
        *,
        describe: str,
        version: int = 1,
        indent: int | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        retry_every: float = 0.0,
        on_persist: Callable[[StateWriteError | None], None] = lambda _: None,
        log: logging.Logger = log,
    ) -> None:
        """``on_persist``: told after every write of the file, None on success (metrics);
        called under the writer's lock, so it must not call back into the writer."""
        self.path = path
        self.version = version
        self._describe = describe
        self._indent = indent
        self._clock = clock
        self._monotonic = monotonic
        self._retry_every = retry_every
        self._on_persist = on_persist
        self._log = log
        self._failure: PersistFailure | None = None
        self._retry_at = 0.0
        self.generation = 0
        self.visible_at = 0.0  # wall-clock time the last generation became visible

    # -- the shared table ------------------------------------------------------------------

    def publish(self, write: Callable[[], int]) -> int:
        """Publish a generation: ``write`` puts the whole table in shared memory and returns
        the generation it got. Return it (also kept in ``generation``)."""
        self.generation = write()
        self.visible_at = self._clock()
        return self.generation

    # -- the state file --------------------------------------------------------------------

    @property
    def persistent(self) -> bool:
        """Whether there is a state file at all."""
        return self.path is not None

    @property
    def failing(self) -> bool:
        """The last write failed: what is in force is not (all) on disk."""
        return self._failure is not None

    @property
    def durable(self) -> bool:
        return self.path is not None and self._failure is None

    def document(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The file's content for ``body``: the version first, then the body's fields."""
        return {"version": self.version, **body}

    def encoded_size(self, body: Mapping[str, Any]) -> int:
        """Characters the file would take with ``body`` (the writer's own bound)."""
        doc = self.document(body)
        if self._indent is None:
            return len(json.dumps(doc, separators=(",", ":")))
        return len(json.dumps(doc, indent=self._indent))

    def persist(self, body: Body) -> StateWriteError | None:
        """Write the whole state (``body()``, only called when there is a file) durably.
        Return the failure, if any (never raised: what it means is the writer's business);
        it is kept for `health()` until a later write succeeds."""
        path = self.path
        if path is None:
            return None
        try:
            write_json_durably(path, self.document(body()), indent=self._indent)
        except OSError as exc:
            err = StateWriteError(str(path), os_error_text(exc))
            self._failed(err)
            return err
        if self._failure is not None:
            self._log.warning("%s persisted to %s again: durable", self._describe, path)
            self._failure = None
        self._notify(None)
        return None

    def retry(self, body: Body) -> StateWriteError | None:
        """After a failed write, write again (no more often than every ``retry_every``
        seconds; a retry not yet due answers the kept failure). None once durable."""
        if self._failure is None:
            return None
        if self._monotonic() < self._retry_at:
            return self._failure.as_error()
        return self.persist(body)

    def _failed(self, err: StateWriteError) -> None:
        prev = self._failure
        self._failure = PersistFailure(
            err.file,
            err.os_error,
            since=self._clock() if prev is None else prev.since,
            failures=1 if prev is None else prev.failures + 1,
        )
        self._retry_at = self._monotonic() + self._retry_every
        # Once per outage (and when the reason changes): the failures that follow are
        # counted in health() and the metrics, and each caller that must be told is.
        if prev is None or prev.error != err.os_error:
            self._log.error(
                "could not persist %s (NOT durable: what is in force only in memory is lost "
                "at a restart): %s",
                self._describe,
                err,
            )
        self._notify(err)

    def _notify(self, err: StateWriteError | None) -> None:
        try:
            self._on_persist(err)
        except Exception:
            self._log.exception("persistence listener failed")

    def load(
        self, parse: Callable[[Mapping[str, Any]], T], *, what: str, hint: str = ""
    ) -> T | None:
        """The state saved by an earlier run, parsed (None: no file). A file that cannot be
        read, is not of this version or that ``parse`` refuses (KeyError, TypeError,
        ValueError) is a ConfigError naming it: ``{what} {path}: cannot be read (...){hint}``."""
        path = self.path
        if path is None or not path.exists():
            return None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("version") != self.version:
                raise ValueError(f"expected an object with version {self.version}")
            return parse(doc)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{what} {path}: cannot be read ({exc}){hint}") from None

    # -- readiness -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Readiness details: is what is in force also on disk? ``durable`` false names the
        file, the OS error, since when and how many writes failed (cleared by the next write
        that succeeds)."""
        f = self._failure
        if f is None:
            file = None if self.path is None else str(self.path)
            return {"durable": self.path is not None, "file": file, "error": None}
        return {
            "durable": False,
            "file": f.file,
            "error": f.error,
            "since": f.since,
            "failures": f.failures,
        }
