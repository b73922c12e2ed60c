"""What every audit writer shares (`ChainWriter`): one hash chain, appended off the hot path
by one thread, whatever it is appended to.

A subclass is a sink: `writer.AuditWriter` appends to size-rotated files in a directory,
`stream.StreamWriter` to a stream (the process's stdout, for the cluster's log pipeline). It
opens its sink, writes whole lines, and says where to go back to when a write fails; the
rest is here:

Role. `write` and `write_decision` only enqueue (a bounded queue: ``queue_max``); the thread
chains what is queued (``seq``, ``prev``, ``hash``: `record`), making decision lines there
(`decision_line`), and hands a batch's lines to the sink at once. It must not block a Check
on I/O and must not raise into a Check.

Failures (``on_failure=``). A record that cannot be written (disk full, permission, I/O
error, a closed pipe) is counted in ``failed``; one that cannot be queued (queue full,
writer closed) in ``dropped``. Neither is silent: the first error is logged with its cause,
a summary (counts and decision ids) at most once a second, and the chain itself gets a
``loss`` record as soon as it is writable again. ``healthy`` is false from a write error
until a later write succeeds (the thread retries by itself every ``retry_interval`` seconds,
so it recovers without traffic). ``"fail-closed"`` (default): `must_deny` is true while
unhealthy (or while the sink says it is failing), while the queue is full and after close:
the caller must deny. ``"continue"``: `must_deny` is always false; failures are only counted
and reported. The records of a failed write go back into the queue's place: the chain state
returns to the last record the sink took whole, so the chain never has a hole where a write
failed (a sink that took part of a batch says how many lines: `PartialWrite`).

The health board (``.audit-health``, one byte per writer, see `_Board`). Every writer that
shares a sink (a mandate's workers and its supervisor: one audit directory, or one stdout)
sets its byte while it cannot write, and a fail-closed writer's `must_deny` reads every
byte (about 0.05 µs, no system call): when one worker's writer fails, every worker denies
from its next Check, not after its own writer's next batch.

The argument key (``.audit-arguments.key``, `keyfile`). A decision whose profile records
argument hashes (`spec.audit`, the default) is hashed with the key of ``key_directory``,
which the writer thread reads, or creates, when the first such record is made. If it cannot
(no directory, a damaged or unreadable file), it logs why, records argument types without
hashes (``"key": "unavailable"``) and tries again a minute later: no record is lost for it,
and no unkeyed hash is ever written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self

from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.files import _describe
from sidecar.audit.keyfile import load_argument_key
from sidecar.audit.record import (
    _CHAIN_ID,
    chained_line,
    decision_line,
    fit_record,
    genesis,
    record_from_decision,
)
from sidecar.core import Decision
from sidecar.core.timefmt import utc_millis
from sidecar.errors import AuditInputError, ConfigError

__all__ = ["DEFAULT_QUEUE_MAX", "AuditStats", "ChainWriter", "FailureMode", "PartialWrite"]

log = logging.getLogger("sidecar.audit.writer")

DEFAULT_QUEUE_MAX = 10_000
_LOSS_IDS_MAX = 100
_BATCH = 512
# The call bodies queued decisions may hold for their `arguments` (a reference each, read on
# the writer thread). Beyond this, a decision is queued without its body and its record says
# so (``"body": "withheld"``): a stalled sink must not make the queue hold 10,000 bodies of
# up to Envoy's with_request_body limit (64 KiB in envoy/sidecar.yaml).
_BODY_BYTES_MAX = 16 * 1024 * 1024
# A batch's decision records go out in one write of at most about this many bytes.
_PENDING_MAX_BYTES = 256 * 1024
_BOARD = ".audit-health"
_BOARD_SLOTS = 128
_FLOCK = struct.Struct("hhqqi4x")  # struct flock (Linux, 64-bit off_t)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", -1)  # -1: not Linux

FailureMode = Literal["fail-closed", "continue"]


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Counters for metrics. ``written``/``failed``/``dropped`` count records given to
    `write`; ``errors`` counts failed operations (write, fsync, open, rotate)."""

    written: int
    failed: int
    dropped: int
    backlog: int
    errors: int
    healthy: bool
    next_seq: int
    file_index: int
    low_space: bool = False


class PartialWrite(OSError):
    """A sink's write failed after ``done`` whole lines of the batch had gone out (a stream
    cannot take back what it has written): those are written, the rest failed."""

    def __init__(self, done: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.done = done


@dataclass(slots=True)
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)


_STOP = object()


class _DecisionItem(NamedTuple):
    """A decision queued by `write_decision`, its record not built yet."""

    decision: Decision
    pod: str
    namespace: str
    now: float


_Item = Mapping[str, Any] | _DecisionItem


@dataclass(slots=True)
class _Loss:
    failed: int = 0
    dropped: int = 0
    unsynced: int = 0
    first: str | None = None
    last: str | None = None
    ids: list[str] = field(default_factory=list)
    ids_truncated: bool = False
    error: str | None = None

    def empty(self) -> bool:
        return not (self.failed or self.dropped or self.unsynced)

    def merge(self, other: _Loss) -> None:
        self.failed += other.failed
        self.dropped += other.dropped
        self.unsynced += other.unsynced
        self.first = min(filter(None, (self.first, other.first)), default=None)
        self.last = max(filter(None, (self.last, other.last)), default=None)
        room = _LOSS_IDS_MAX - len(self.ids)
        self.ids.extend(other.ids[:room])
        self.ids_truncated |= other.ids_truncated or len(other.ids) > room
        self.error = other.error or self.error


class _Board:
    """A sink's health board (``.audit-health`` in ``directory``): one byte per writer, 1
    while that writer cannot write (or, for a directory, is under the free-space reserve).
    Every fail-closed writer of the sink reads the whole board on each `must_deny` (one mmap
    read, no system call), so when one worker's writer fails, every worker of the mandate
    denies from its next Check instead of after its own writer's next batch.

    A writer owns its slot by an open-file-description lock on that byte (F_OFD_SETLK), so
    the slot frees itself when the writer's process dies; `sweep` clears the byte a dead
    writer left set. The file is written with real zero bytes at creation, so setting a
    flag later never needs free space."""

    def __init__(self, directory: Path) -> None:
        if _F_OFD_SETLK < 0:  # not Linux: no board (each writer fails closed on its own)
            raise OSError(errno.ENOTSUP, "no open-file-description locks on this system")
        fd = os.open(directory / _BOARD, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _BOARD_SLOTS:
                    os.pwrite(fd, bytes(_BOARD_SLOTS), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self.map = mmap.mmap(fd, _BOARD_SLOTS)
            self.slot = next((i for i in range(_BOARD_SLOTS) if _ofd_lock(fd, i)), -1)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        if self.slot >= 0:
            self.map[self.slot] = 0
        else:
            log.warning("audit health board %s: no free slot", directory / _BOARD)

    def set(self, failing: bool) -> None:
        if self.slot >= 0 and self.map[self.slot] != failing:
            self.map[self.slot] = int(failing)

    def failing(self) -> int:
        return self.map[:].count(1)

    def sweep(self) -> None:
        """Clear the flags of writers that are gone (their slot's lock is free)."""
        at = self.map.find(b"\x01")
        while at >= 0:
            if at != self.slot and _ofd_lock(self.fd, at):
                self.map[at] = 0
                _ofd_unlock(self.fd, at)
            at = self.map.find(b"\x01", at + 1)

    def close(self) -> None:
        self.set(False)
        os.close(self.fd)  # releases the slot; the map stays readable for racing Checks


def _ofd_lock(fd: int, at: int) -> bool:
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, at, 1, 0))
    except OSError:
        return False
    return True


def _ofd_unlock(fd: int, at: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, at, 1, 0))


class ChainWriter:
    """One hash chain appended by a daemon thread; the sink is the subclass's (see the
    module docstring). `write` never blocks on I/O; `flush` and `close` wait at most their
    timeout.

    A subclass sets up its sink in its ``__init__`` after this one's, then calls `_start`;
    it overrides `_open_sink` (before any record: the sink ready, its header written),
    `_emit` (write whole lines), `_mark`/`_rewind`/`_advance` (its position), and may
    override `_make_room`, `_wrote`, `_sink_housekeeping`, `_sink_deadline`, `_sink_failing`,
    `_sink_health`, `_close_sink` and `_finish_sink`."""

    sink = "sink"  # the name readiness gives it
    noun = "sink"  # ... and log lines ("opening the audit file")
    # The longest line the sink takes whole (without its newline; None: any): a longer
    # record is cut to fit (`record.fit_record`).
    line_max: int | None = None

    def __init__(
        self,
        *,
        chain_id: str,
        on_failure: FailureMode,
        queue_max: int,
        retry_interval: float,
        clock: Callable[[], float],
        linger: float,
        board_interval: float = 0.5,
        key_directory: Path | None = None,
        stamp: Mapping[str, Any] | None = None,
    ) -> None:
        if not _CHAIN_ID.match(chain_id):
            raise ConfigError(
                f"audit chain id {chain_id!r}: expected 1-64 of A-Z a-z 0-9 _ . - "
                "(starting with a letter or digit)"
            )
        if on_failure not in ("fail-closed", "continue"):
            raise ConfigError(f"audit on_failure {on_failure!r}: expected fail-closed or continue")
        if queue_max < 1 or retry_interval <= 0 or board_interval <= 0:
            raise ConfigError("audit: queue_max >= 1 and retry_interval > 0 are required")
        self.chain_id = chain_id
        self._fail_closed = on_failure == "fail-closed"
        self._queue_max = queue_max
        self._retry_interval = retry_interval
        self._clock = clock
        self._linger = linger
        self._nudge = threading.Event()
        # Members every record of the chain carries besides its own (a stream's marker and
        # chain id: `stream`); merged into each record before it is chained.
        self._stamp: dict[str, Any] = dict(stamp or {})
        # The argument key (module docstring): read, or created, by the writer thread when a
        # record first hashes an argument; on failure retried every minute, and meanwhile
        # records keep argument types only (`arguments.recorded_arguments`).
        self._key_directory = key_directory
        self._key: ArgumentKey | None = None
        self._key_retry = 0.0
        self._board: _Board | None = None
        self._board_map: mmap.mmap | None = None  # the board's bytes, for `must_deny`
        self._board_interval = board_interval
        self._board_dir: Path | None = None
        self._next_board = 0.0

        # Chain state: owned by the writer thread once it runs.
        self._seq = 0
        self._prev = genesis(chain_id)
        self._next_retry = 0.0
        self._recovered: dict[str, Any] | None = None
        # Records chained but not yet written (see `_put`); the state before them.
        self._pending: list[_Item] = []
        self._pending_lines: list[bytes] = []
        self._pending_digests: list[str] = []
        self._pending_bytes = 0
        self._pending_base: tuple[int, str, tuple[int, ...]] = (0, "", ())

        # Counters. Writer-thread counters are written by that thread only.
        self._written = 0
        self._failed = 0
        self._errors = 0
        self._dropped = 0
        self._healthy = True
        self._closed = False
        self._loss = _Loss()
        self._loss_logged = _Loss()
        self._last_summary = 0.0
        self._loss_lock = threading.Lock()
        self._put_lock = threading.Lock()
        self._body_bytes = 0  # bodies held by queued decisions (under _put_lock)
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _start(self, board_directory: Path | None) -> None:
        """Open the health board in ``board_directory`` (None: none), open the sink and
        write its header now, so that `healthy` is true to fact at once, and start the
        thread. Called by the subclass at the end of its ``__init__``."""
        if board_directory is not None:
            self._open_board(board_directory)
        self._sink_housekeeping(force=False)
        try:
            self._prepare()
        except OSError as exc:
            self._error(f"opening the audit {self.noun}", exc)
        self._publish()
        name = f"audit-{self.chain_id}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ------------------------------------------------------

    def write(self, record: Mapping[str, Any]) -> bool:
        """Queue one record (never blocks on I/O). False if it was dropped (queue full or
        writer closed); the drop is counted, logged and later recorded in the chain."""
        return self._enqueue(record)

    def write_decision(self, decision: Decision, *, pod: str, namespace: str, now: float) -> bool:
        """`write(record_from_decision(...))`, with the line made on the writer thread
        (`decision_line`): the Check thread only queues the (immutable) Decision and its
        time. Made there in batches it costs the worker less than one at a time between
        Checks (bench/README.md, telemetry section). Same line and drop accounting as
        `write`."""
        return self._enqueue(_DecisionItem(decision, pod, namespace, now))

    def _enqueue(self, item: _Item) -> bool:
        with self._put_lock:
            queued = self._q.qsize()
            if not self._closed and queued < self._queue_max:
                size = _body_size(item)
                if size and self._body_bytes + size > _BODY_BYTES_MAX:
                    assert isinstance(item, _DecisionItem)
                    item = _withhold(item)
                else:
                    self._body_bytes += size
                self._q.put(item)
                if queued + 1 == _BATCH:
                    self._nudge.set()  # a full batch is waiting: cut the linger short
                return True
            closed = self._closed
        self._note_loss(item, dropped=True, error="writer closed" if closed else "queue full")
        if closed:
            did: object = (
                item.decision.decision_id
                if isinstance(item, _DecisionItem)
                else item.get("decision_id")
            )
            log.error("audit record %s dropped: writer closed", did)
        return False

    @property
    def fail_closed(self) -> bool:
        """on_failure is fail-closed: a record that cannot be written must deny its call."""
        return self._fail_closed

    @property
    def healthy(self) -> bool:
        """False from a write error until a later write succeeds."""
        return self._healthy

    def must_deny(self) -> bool:
        """True when the caller must deny (fail-closed only): the sink is failing, the queue
        is full, the writer is closed, or another writer of the same sink (another worker)
        is failing (the board)."""
        if not self._fail_closed:
            return False
        if (
            not self._healthy
            or self._closed
            or self._sink_failing()
            or self._q.qsize() >= self._queue_max
        ):
            return True
        board = self._board_map
        return board is not None and board.find(b"\x01") >= 0

    def health(self) -> dict[str, Any]:
        """For readiness: ``state`` "ok" or "failing" (this writer or another writer of the
        sink cannot write); ``denying``: calls are being denied for it (fail-closed);
        ``sink``: "directory" or "stdout", and what the sink adds."""
        board = self._board
        others = 0
        if board is not None:
            others = board.failing() - (board.map[board.slot] if board.slot >= 0 else 0)
        failing = self._failing() or others > 0
        return {
            "state": "failing" if failing else "ok",
            "sink": self.sink,
            "denying": self.must_deny(),
            "on_failure": "fail-closed" if self._fail_closed else "continue",
            "writing": self._healthy,
            "other_writers_failing": others,
            **self._sink_health(),
            "backlog": self._q.qsize(),
            "failed": self._failed,
            "dropped": self._dropped,
        }

    def stats(self) -> AuditStats:
        return AuditStats(
            written=self._written,
            failed=self._failed,
            dropped=self._dropped,
            backlog=self._q.qsize(),
            errors=self._errors,
            healthy=self._healthy,
            next_seq=self._seq,
            file_index=0,
        )

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued before this call is handled (written, or counted
        as failed) and, for files, fsynced. False on timeout or when closed."""
        item = _Flush()
        with self._put_lock:
            if self._closed:
                return False
            self._q.put(item)
        self._nudge.set()
        return item.done.wait(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued, close the sink. False if the thread did not finish."""
        thread = self._thread
        assert thread is not None
        with self._put_lock:
            if self._closed:
                return not thread.is_alive()
            self._closed = True
            self._q.put(_STOP)
        self._nudge.set()
        thread.join(timeout)
        if thread.is_alive():
            log.error("audit writer %s did not finish within %.1fs", self.chain_id, timeout)
            return False
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loss accounting ---------------------------------------------------------------------

    def _note_loss(self, record: _Item, *, dropped: bool, error: str) -> None:
        if isinstance(record, _DecisionItem):
            record = {"decision_id": record.decision.decision_id, "time": utc_millis(record.now)}
        did = record.get("decision_id") if isinstance(record, Mapping) else None
        with self._loss_lock:
            loss = self._loss
            if dropped:
                self._dropped += 1
                loss.dropped += 1
            else:
                loss.failed += 1
            when = record.get("time") if isinstance(record, Mapping) else None
            when = when if isinstance(when, str) else utc_millis(self._clock())
            loss.first = loss.first or when
            loss.last = when
            if isinstance(did, str):
                if len(loss.ids) < _LOSS_IDS_MAX:
                    loss.ids.append(did)
                else:
                    loss.ids_truncated = True
            loss.error = error

    def _take_loss(self) -> _Loss:
        with self._loss_lock:
            taken, self._loss = self._loss, _Loss()
            return taken

    def _give_back_loss(self, taken: _Loss) -> None:
        with self._loss_lock:
            taken.merge(self._loss)
            self._loss = taken

    def _summarize(self, force: bool = False) -> None:
        """Log what was lost since the last summary, at most once a second."""
        now = time.monotonic()
        if not force and now - self._last_summary < 1.0:
            return
        with self._loss_lock:
            cur = _Loss()
            cur.merge(self._loss)
        seen = self._loss_logged
        if (cur.failed, cur.dropped, cur.unsynced) == (seen.failed, seen.dropped, seen.unsynced):
            return
        self._last_summary = now
        self._loss_logged = cur
        log.warning(
            "audit chain %s: %d record(s) failed, %d dropped, %d unsynced not yet recorded "
            "(last error: %s); decision ids: %s%s",
            self.chain_id, cur.failed, cur.dropped, cur.unsynced, cur.error,
            ", ".join(cur.ids[:20]), " ..." if len(cur.ids) > 20 or cur.ids_truncated else "",
        )  # fmt: skip

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                item: object | None = self._q.get(timeout=self._timeout())
            except queue.Empty:
                item = None
            handled = 0
            try:
                while item is not None:
                    if item is _STOP:
                        stop = True
                        break
                    if isinstance(item, _Flush):
                        self._housekeeping(force=True)
                        item.done.set()
                    else:
                        self._store_guarded(item)  # type: ignore[arg-type]
                    handled += 1
                    if handled >= _BATCH:
                        break
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        item = None
                self._housekeeping(force=stop)
                # Linger only after a batch that emptied the queue: after a full one more is
                # waiting, and waiting would cap the writer at _BATCH records per linger.
                if 0 < handled < _BATCH and not stop and self._linger > 0:
                    self._nudge.wait(self._linger)
                    self._nudge.clear()
            except Exception:  # the thread must outlive any bug: count it and go on
                self._errors += 1
                log.exception("audit writer %s: unexpected error", self.chain_id)
        self._finish()

    def _finish(self) -> None:
        with contextlib.suppress(OSError):  # counted and reported by _write_pending
            self._write_pending()
        try:
            self._close_sink()
        except OSError as exc:
            self._error(f"closing the audit {self.noun}", exc)
        except Exception:  # a bug: the sink is still finished below
            self._errors += 1
            log.exception("audit writer %s: unexpected error on close", self.chain_id)
        self._summarize(force=True)
        if self._board is not None:
            self._board.close()
        self._finish_sink()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        sink = self._sink_deadline()
        if sink is not None:
            deadlines.append(sink - now)
        if not self._healthy or not self._loss.empty() or self._recovered is not None:
            deadlines.append(max(self._next_retry - now, 0.01))
        if self._loss.failed or self._loss.dropped:
            deadlines.append(1.0)  # the summary log
        return max(0.0, min(deadlines)) if deadlines else None

    def _housekeeping(self, force: bool = False) -> None:
        """After a batch: write it, retry (write the loss record) when due, let the sink do
        its part (fsync, free space), log, sweep the board."""
        with contextlib.suppress(OSError):  # counted and reported; retried below when due
            self._write_pending()
        self._summarize()
        now = time.monotonic()
        pending = not self._loss.empty() or self._recovered is not None or not self._ready()
        if (pending or not self._healthy) and (force or self._healthy or now >= self._next_retry):
            try:
                self._prepare()
            except OSError as exc:
                self._error(f"retrying the audit {self.noun}", exc)
        self._sink_housekeeping(force=force)
        if self._board_dir is not None and now >= self._next_board:
            if self._board is None:
                self._open_board(self._board_dir)
            else:
                self._next_board = now + self._board_interval
                self._board.sweep()
        self._publish()

    # -- the health board (writer thread) ----------------------------------------------------

    def _failing(self) -> bool:
        return not self._healthy or self._sink_failing()

    def _publish(self) -> None:
        if self._board is not None:
            self._board.set(self._failing())

    def _raise_flag(self) -> None:
        """Before this writer's own `must_deny` turns true: so that no other worker allows
        a call after one of this worker's Checks has denied it."""
        if self._board is not None:
            self._board.set(True)

    def _open_board(self, directory: Path) -> None:
        self._board_dir = directory
        self._next_board = time.monotonic() + self._board_interval
        try:
            self._board = _Board(directory)
        except OSError as exc:
            log.warning(
                "audit chain %s: no health board (other workers will not see this writer "
                "fail at once): %s", self.chain_id, _describe(exc),
            )  # fmt: skip
            return
        self._board_map = self._board.map

    def _error(self, what: str, exc: BaseException) -> None:
        self._errors += 1
        self._next_retry = time.monotonic() + self._retry_interval
        if self._healthy:
            log.error("audit chain %s: %s failed: %s", self.chain_id, what, _describe(exc))
        else:
            log.debug("audit chain %s: %s failed: %s", self.chain_id, what, _describe(exc))
        self._raise_flag()
        self._healthy = False

    # -- chaining and writing (writer thread) ------------------------------------------------

    def _store_guarded(self, record: _Item) -> None:
        size = _body_size(record)
        try:
            self._prepare()
            self._put(record, pending=True)
        except OSError as exc:
            self._failed += 1
            self._note_loss(record, dropped=False, error=_describe(exc))
            self._error("writing a record", exc)
        except Exception as exc:  # e.g. not JSON-serializable: a bug, not the sink
            self._failed += 1
            self._note_loss(record, dropped=False, error=_describe(exc))
            log.exception("audit record refused (%s): %r", _describe(exc), record)
        finally:
            if size:  # its line is made: the body is the trail's no longer
                with self._put_lock:
                    self._body_bytes -= size

    def _prepare(self) -> None:
        """Before any record: the sink open (with its header), then the pending `recovered`
        and `loss` records, so that the chain says what happened before it goes on."""
        self._open_sink()
        recovered = self._recovered
        if recovered is not None:
            self._put(recovered)
            if self._recovered is recovered:  # (writing it may have noted another)
                self._recovered = None
        if not self._loss.empty():
            taken = self._take_loss()
            rec: dict[str, Any] = {
                "type": "loss",
                "time": utc_millis(self._clock()),
                "failed": taken.failed,
                "dropped": taken.dropped,
                "unsynced": taken.unsynced,
                "first": taken.first,
                "last": taken.last,
                "decision_ids": taken.ids,
                "decision_ids_truncated": taken.ids_truncated,
                "error": taken.error,
            }
            try:
                self._put(rec)
            except BaseException:
                self._give_back_loss(taken)
                raise
            log.warning(
                "audit chain %s writable again; loss recorded at seq %d: %d failed, "
                "%d dropped, %d unsynced",
                self.chain_id, self._seq - 1, taken.failed, taken.dropped, taken.unsynced,
            )  # fmt: skip
            self._loss_logged = _Loss()

    def _put(self, record: _Item, *, pending: bool = False) -> None:
        """Chain one record and append it, making room first if the sink wants (a full file
        rotates). ``pending`` (decision records): only chained now and written with the
        others of the batch at once by `_write_pending` (its failure fails them all)."""
        line, digest = self._line(record)
        if self._make_room(len(line)):
            line, digest = self._line(record)
        if pending:
            if not self._pending:
                self._pending_base = (self._seq, self._prev, self._mark())
            # Kept only to account for it if the batch's write fails: without the call's
            # body and arguments, which the line has taken what it needs of.
            self._pending.append(_light(record))
            self._pending_lines.append(line)
            self._pending_digests.append(digest)
            self._pending_bytes += len(line)
            self._seq += 1
            self._prev = digest
            self._advance(len(line), 1)
            if self._pending_bytes >= _PENDING_MAX_BYTES:
                self._write_pending()
            return
        self._append(line, digest)
        self._advance(0, 1)

    def _write_pending(self) -> None:
        """Write the batch's chained records at once. On an error the records the sink did
        not take whole count as failed (and go into the next ``loss`` record), and the chain
        state goes back to the last record it took: the next record takes their place."""
        if not self._pending:
            return
        records, lines, digests = self._pending, self._pending_lines, self._pending_digests
        self._pending, self._pending_lines, self._pending_digests = [], [], []
        self._pending_bytes = 0
        seq, prev, mark = self._pending_base
        try:
            self._emit(lines, mark)
        except OSError as exc:
            done = exc.done if isinstance(exc, PartialWrite) else 0
            self._seq, self._prev = seq + done, digests[done - 1] if done else prev
            self._rewind(mark, lines[:done])
            if done:
                self._written += done
                self._wrote(done)
            error = _describe(exc)
            for record in records[done:]:
                self._failed += 1
                self._note_loss(record, dropped=False, error=error)
            self._error("writing a record", exc)
            raise
        self._written += len(records)
        self._wrote(len(records))
        if not self._healthy:
            log.warning("audit chain %s: writing again (seq %d)", self.chain_id, self._seq - 1)
            self._healthy = True

    def _append(self, line: bytes, digest: str) -> None:
        """Write one record (state advances only on success). The batch's pending records
        go first, so the sink keeps the chain's order."""
        self._write_pending()
        self._emit([line], self._mark())
        self._advance(len(line), 0)
        self._seq += 1
        self._prev = digest
        self._wrote(1)
        if not self._healthy:
            log.warning("audit chain %s: writing again (seq %d)", self.chain_id, self._seq - 1)
            self._healthy = True

    def _line(self, record: _Item) -> tuple[bytes, str]:
        stamp = self._stamp
        if isinstance(record, _DecisionItem):
            d, pod, namespace, now = record
            args = d.arguments
            key = self._argument_key() if args and args.recording.mode == "hashes" else None
            line, digest = decision_line(
                d, pod=pod, namespace=namespace, now=now, seq=self._seq, prev=self._prev,
                key=key, chain=stamp.get("chain"),
            )  # fmt: skip
            if self.line_max is None or len(line) <= self.line_max + 1:
                return line, digest
            whole: Mapping[str, Any] = record_from_decision(
                d, pod=pod, namespace=namespace, now=now, key=key
            )
        else:
            whole = record
        whole = {**whole, **stamp} if stamp else whole
        line, digest = chained_line(whole, seq=self._seq, prev=self._prev)
        if self.line_max is None or len(line) <= self.line_max + 1:
            return line, digest
        return chained_line(fit_record(whole, self.line_max), seq=self._seq, prev=self._prev)

    def _argument_key(self) -> ArgumentKey | None:
        """The key of ``key_directory``, loaded (or created) on first use. When it cannot
        be, the error is logged and the records keep argument types without hashes (never
        an unkeyed hash, never a lost record); tried again after a minute."""
        if self._key is None and time.monotonic() >= self._key_retry:
            directory = self._key_directory
            try:
                if directory is None:
                    raise AuditInputError("no directory for the argument key")
                self._key = load_argument_key(directory)
            except AuditInputError as exc:
                self._key_retry = time.monotonic() + 60.0
                log.error(
                    "audit chain %s: %s; recording argument types without hashes meanwhile",
                    self.chain_id, exc,
                )  # fmt: skip
        return self._key

    # -- the sink (overridden) ---------------------------------------------------------------

    def _ready(self) -> bool:
        """The sink is open and has its header."""
        return True

    def _open_sink(self) -> None:
        """Before any record: the sink open, its header written. OSError when it cannot."""

    def _emit(self, lines: list[bytes], mark: tuple[int, ...]) -> None:
        """Write ``lines`` (whole, chained) at ``mark``, the position `_mark` gave before
        them; OSError (a `PartialWrite` for what went out whole) when it cannot."""
        raise NotImplementedError

    def _mark(self) -> tuple[int, ...]:
        """Where the sink stands (after the records it has taken or has pending)."""
        return ()

    def _rewind(self, mark: tuple[int, ...], done: list[bytes]) -> None:
        """A write at ``mark`` failed after ``done`` lines: stand after them."""

    def _advance(self, size: int, records: int) -> None:
        """``size`` bytes (and ``records`` records that are not headers) were added."""

    def _make_room(self, size: int) -> bool:
        """Before a line of ``size`` bytes: True if the sink changed (a new file), so that
        the line is made again at the new position."""
        return False

    def _wrote(self, records: int) -> None:
        """``records`` records were written."""

    def _sink_housekeeping(self, force: bool) -> None:
        """After a batch (and on start): fsync, free space..."""

    def _sink_deadline(self) -> float | None:
        """When (time.monotonic) the thread must wake for the sink even when idle."""
        return None

    def _sink_failing(self) -> bool:
        """The sink fails for a reason of its own (under the free-space reserve, stalled)."""
        return False

    def _sink_health(self) -> dict[str, Any]:
        return {}

    def _close_sink(self) -> None:
        """On close, after the last batch: what the sink writes last (OSError if it cannot)."""

    def _finish_sink(self) -> None:
        """On close: release the sink (descriptors, locks)."""


def _body_size(item: object) -> int:
    """The bytes of the call body a queued decision holds for its `arguments`."""
    if isinstance(item, _DecisionItem):
        args = item.decision.arguments
        if args is not None and args.body is not None:
            return len(args.body)
    return 0


def _light(item: _Item) -> _Item:
    """``item`` without the call material its line was made from (see `_put`)."""
    if isinstance(item, _DecisionItem) and item.decision.arguments is not None:
        return item._replace(decision=dataclasses.replace(item.decision, arguments=None))
    return item


def _withhold(item: _DecisionItem) -> _DecisionItem:
    """``item`` without the body its arguments would be read from (the record says so)."""
    args = item.decision.arguments
    assert args is not None
    kept = args._replace(body=None, mcp=None, withheld=True)
    return item._replace(decision=dataclasses.replace(item.decision, arguments=kept))
