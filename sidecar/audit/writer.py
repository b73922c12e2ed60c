"""The audit writer: records appended to size-rotated files off the hot path by one thread.

Role. `AuditWriter.write` only enqueues; the background thread does the I/O. It must not
block a Check on disk I/O and must not raise into a Check.

fsync policy (``fsync=``). The writer thread takes what is queued every ``linger`` seconds
under load (default 0.1 s; 0.02 s with ``"always"``) and hands it to the kernel with one
``write(2)``, so a crash of the process loses at most that backlog.
Power loss or a kernel crash may also lose what was not yet fsynced:
- ``"always"``: fsync after every batch the thread drains (group commit): at risk is only
  the backlog. Costs one fsync per batch on the writer thread, never on a Check.
- ``"interval"`` (default): fsync at most every ``fsync_interval`` seconds (1.0) when
  something was written; the thread wakes for it even when idle. At risk: one interval.
- ``"never"``: left to the kernel's writeback.
Rotation and new files fsync the old file and the directory (except with ``"never"``);
`flush` and `close` always fsync. A failed fsync counts as an error and makes the writer
unhealthy; the records since the last good fsync are reported in the next ``loss`` record
as ``unsynced``.

Failures (``on_failure=``). A record that cannot be written (disk full, permission, I/O
error) is counted in ``failed``; one that cannot be queued (queue full, writer closed) in
``dropped``. Neither is silent: the first error is logged with its cause, a summary (counts
and decision ids) at most once a second, and the chain itself gets a ``loss`` record as soon
as it is writable again. ``healthy`` is false from a write error until a later write
succeeds (the thread retries by itself every ``retry_interval`` seconds, so it recovers
without traffic). ``"fail-closed"`` (default): `must_deny` is true while unhealthy, while
the queue is full and after close: the caller must deny. ``"continue"``: `must_deny` is
always false; failures are only counted and reported. A partial write is cut back before
the next one, so a failure never leaves a torn line in the middle of a file.

Resuming and the torn last line. On start the writer continues an existing chain: it reads
the newest file's last complete record for ``seq`` and ``prev`` (run `verify` for the whole
chain). A last line without its newline is what a crash during ``write(2)`` leaves (or a
kernel crash's zero-filled tail). Decision: the writer truncates it and appends a chained
``recovered`` record that keeps the torn bytes' length, SHA-256 and text (up to 64 KiB), so
the evidence stays in the chain and `verify` reports the recovery as a note. It refuses
(:class:`~sidecar.errors.AuditResumeError`) when the last complete record is itself damaged
(not JSON, wrong hash, no header): that is not what a crash leaves. Until restarted, `verify`
reports a torn line as a problem (verifying a live trail can also catch the newest line
mid-write: verify again). A lock file (``.audit-<chain>.lock``, flock) stops two
processes from writing one chain.

Free-space reserve (``reserve_bytes``, default 8 MiB; 0: off). Records are written
asynchronously, so a call is allowed before its record is on disk; a disk that simply
fills would let the calls of one linger (up to 100 ms, issue 15: 10-16 calls) out with no
record before the first failed write. So the writer thread reads the filesystem's free
space (statvfs: about 0.5 µs) after every batch and every ``space_interval`` (0.5 s) when
idle, and fails closed (`must_deny`) while it is under the reserve, back to normal at 5/4
of it. Records are still written while under it: the calls allowed before `must_deny` saw
the low space, and the denies after, land in the reserve, not in a ``loss`` record. What
remains: space taken by something else faster than the reserve lasts (another process
filling the filesystem in one go; a reserve smaller than one linger's records), and the
usual crash window (the backlog not yet written, see the fsync policy).

The health board (``.audit-health``, one byte per writer, see `_Board`). Every writer of
the directory (a mandate's workers and its supervisor) sets its byte while it cannot write
or is under the reserve, and a fail-closed writer's `must_deny` reads every byte (about
0.05 µs, no system call): when one worker's writer fails, every worker denies from its
next Check, not after its own writer's next batch.

The argument key (``.audit-arguments.key``, `keyfile`). A decision whose profile records
argument hashes (`spec.audit`, the default) is hashed with the directory's key, which the
writer thread reads, or creates, when the first such record is made. If it cannot (a damaged
or unreadable file), it logs why, records argument types without hashes (``"key":
"unavailable"``) and tries again a minute later: no record is lost for it, and no unkeyed
hash is ever written.

The manifest (``audit-manifest.jsonl``). Before its first file, a writer appends its chain
id to the directory's manifest (hash-chained like a chain, from its own genesis; flock'd,
fsynced). `verify` checks the chains against it: a listed chain with no file left is
``missing_chain``, a chain not listed ``unlisted_chain``, chain files without a manifest
``missing_manifest``. Someone able to delete files can still delete everything (verify then
finds no trail: bad input), or rewrite the manifest without a chain (its hashes carry no
secret): anchor the manifest's head elsewhere as for the chains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
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
from typing import Any, Literal, NamedTuple

from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.files import _chain_files, _describe, _read
from sidecar.audit.keyfile import load_argument_key
from sidecar.audit.record import (
    _CHAIN_ID,
    _MANIFEST_GENESIS,
    FORMAT,
    MANIFEST,
    _is_int,
    chained_line,
    decision_line,
    file_name,
    genesis,
    record_hash,
)
from sidecar.core import Decision
from sidecar.core.timefmt import utc_millis
from sidecar.errors import AuditBusyError, AuditInputError, AuditResumeError, ConfigError

__all__ = ["DEFAULT_RESERVE_BYTES", "AuditStats", "AuditWriter", "FailureMode", "FsyncMode"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_QUEUE_MAX = 10_000
_TORN_TEXT_MAX = 64 * 1024
_LOSS_IDS_MAX = 100
_BATCH = 512
# The call bodies queued decisions may hold for their `arguments` (a reference each, read on
# the writer thread). Beyond this, a decision is queued without its body and its record says
# so (``"body": "withheld"``): a stalled disk must not make the queue hold 10,000 bodies of
# up to Envoy's with_request_body limit (64 KiB in envoy/sidecar.yaml).
_BODY_BYTES_MAX = 16 * 1024 * 1024
# A batch's decision records go out in one write(2) of at most about this many bytes.
_PENDING_MAX_BYTES = 256 * 1024
# Fail closed while the audit filesystem has less free space than this (see "Free-space
# reserve" in the module docstring); back to normal at 5/4 of it.
DEFAULT_RESERVE_BYTES = 8 * 1024 * 1024
_BOARD = ".audit-health"
_BOARD_SLOTS = 128
_FLOCK = struct.Struct("hhqqi4x")  # struct flock (Linux, 64-bit off_t)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", -1)  # -1: not Linux

FsyncMode = Literal["always", "interval", "never"]
FailureMode = Literal["fail-closed", "continue"]


# ---------------------------------------------------------------------------------------------
# The writer

# The writer's only file-writing calls, as module attributes so that tests can inject faults
# (ENOSPC, EIO, short writes) without touching the os module everyone shares.
_write_fd: Callable[[int, bytes | memoryview], int] = os.write
_fsync_fd: Callable[[int], None] = os.fsync


def _statvfs_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize  # what an unprivileged writer may still use


# Free bytes of the audit filesystem (a module attribute too: tests simulate a filling disk).
_free_bytes: Callable[[Path], int] = _statvfs_free


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
    """The directory's health board (``.audit-health``): one byte per writer, 1 while that
    writer cannot write (or is under the free-space reserve). Every fail-closed writer of the
    directory reads the whole board on each `must_deny` (one mmap read, no system call), so
    when one worker's writer fails, every worker of the mandate denies from its next Check
    instead of after its own writer's next batch.

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


def _list_in_manifest(directory: Path, chain_id: str, now: float, sync: bool) -> bool:
    """Append ``chain_id`` to the directory's manifest unless it is listed already; True if
    it was appended. Under an flock (writers of one directory append concurrently); a torn
    last line (a crash mid-append) is cut first. OSError when it cannot be written."""
    path = directory / MANIFEST
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            os.ftruncate(fd, cut)
            data = data[:cut]
        lines = data.splitlines()
        seq, prev = 0, _MANIFEST_GENESIS
        for raw in lines:
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            if (
                isinstance(rec, dict)
                and rec.get("type") == "chain"
                and rec.get("chain") == chain_id
            ):
                return False
        if lines:
            try:
                last = json.loads(lines[-1])
                seq, prev = int(last["seq"]) + 1, str(last["hash"])
            except (ValueError, KeyError, TypeError):  # damaged: verify names it; go on
                seq, prev = len(lines), hashlib.sha256(lines[-1]).hexdigest()
        out = b""
        if not lines:
            head = {"type": "manifest", "format": FORMAT, "time": utc_millis(now)}
            line, prev = chained_line(head, seq=seq, prev=prev)
            out, seq = out + line, seq + 1
        entry = {"type": "chain", "chain": chain_id, "time": utc_millis(now)}
        out += chained_line(entry, seq=seq, prev=prev)[0]
        view = memoryview(out)
        try:
            while view:
                view = view[_write_fd(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, cut)
            raise
        if sync:  # once per chain: not subject to the records' fsync policy
            os.fsync(fd)
            if created:
                dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        return True
    finally:
        os.close(fd)


class AuditWriter:
    """Appends records to one hash chain in ``directory``; the I/O runs on a daemon thread.

    `write` never blocks on disk; `flush` and `close` wait at most their timeout. See the
    module docstring for the fsync policy, failure modes and resuming."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        chain_id: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: FsyncMode = "interval",
        fsync_interval: float = 1.0,
        on_failure: FailureMode = "fail-closed",
        queue_max: int = DEFAULT_QUEUE_MAX,
        retry_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        linger: float | None = None,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        space_interval: float = 0.5,
    ) -> None:
        if not _CHAIN_ID.match(chain_id):
            raise ConfigError(
                f"audit chain id {chain_id!r}: expected 1-64 of A-Z a-z 0-9 _ . - "
                "(starting with a letter or digit)"
            )
        if fsync not in ("always", "interval", "never"):
            raise ConfigError(f"audit fsync {fsync!r}: expected always, interval or never")
        if on_failure not in ("fail-closed", "continue"):
            raise ConfigError(f"audit on_failure {on_failure!r}: expected fail-closed or continue")
        if (
            max_bytes < 1024
            or queue_max < 1
            or fsync_interval <= 0
            or retry_interval <= 0
            or reserve_bytes < 0
            or space_interval <= 0
        ):
            raise ConfigError(
                "audit: max_bytes >= 1024, queue_max >= 1, fsync_interval > 0, "
                "retry_interval > 0, reserve_bytes >= 0 and space_interval > 0 are required"
            )
        self.directory = Path(directory)
        self.chain_id = chain_id
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        self._fail_closed = on_failure == "fail-closed"
        self._queue_max = queue_max
        self._retry_interval = retry_interval
        self._clock = clock
        # After a batch the thread waits this long for more records instead of waking once
        # per record: each wake-up takes the GIL from the Check threads, and a bigger batch
        # costs less per record. Measured with `bench/check_throughput.py --telemetry`
        # (gRPC, 1 worker, 2 CPUs), none vs 20 ms: 540 -> 459 µs of CPU per Check; with
        # `bench/telemetry_cost.py` (tracing + audit, 5 interleaved rounds, twice), 20 vs
        # 100 ms: +79 -> +49 and +47 -> +20 µs of CPU per Check over no telemetry. With
        # fsync "always" the shorter wait keeps what a crash can lose small. flush() and
        # close() cut the wait short.
        if linger is None:
            linger = 0.02 if fsync == "always" else 0.1
        self._linger = linger
        self._nudge = threading.Event()
        # Free-space reserve (module docstring): checked by the writer thread after every
        # batch and every `space_interval` when idle; `_low` is read by `must_deny`.
        self._reserve = reserve_bytes
        self._space_interval = space_interval
        self._next_space = 0.0
        self._low = False
        self._free: int | None = None
        self._listed = False  # this chain is in the directory's manifest
        # The directory's argument key (`keyfile`): read, or created, by the writer thread
        # when a record first hashes an argument; on failure retried every minute, and
        # meanwhile records keep argument types only (`arguments.recorded_arguments`).
        self._key: ArgumentKey | None = None
        self._key_retry = 0.0
        self._board: _Board | None = None
        self._board_map: mmap.mmap | None = None  # the board's bytes, for `must_deny`
        self._next_board = 0.0

        # Chain and file state: owned by the writer thread once it runs.
        self._index = 0
        self._seq = 0
        self._prev = genesis(chain_id)
        self._fd: int | None = None
        self._size = 0  # bytes of complete records in the current file
        self._dirty = False  # a partial write may follow `_size`: cut it before writing
        self._has_header = False
        self._footer_done = False
        self._file_records = 0  # records after the header in the current file
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self._next_retry = 0.0
        self._recovered: dict[str, Any] | None = None
        # Decision records chained but not yet written (see `_put`); the state before them.
        self._pending: list[Mapping[str, Any] | _DecisionItem] = []
        self._pending_lines: list[bytes] = []
        self._pending_base: tuple[int, int, str, int] = (0, 0, "", 0)

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

        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise AuditInputError(f"audit directory {self.directory}: {_describe(exc)}") from None
        self._lock_fd = self._lock()
        try:
            self._resume()
        except BaseException:
            self._release()
            raise
        self._open_board()
        self._check_space()
        try:  # open the file and write the header now, so `healthy` is true to fact at once
            self._prepare()
        except OSError as exc:
            self._error("opening the audit file", exc)
        self._publish()
        self._thread = threading.Thread(target=self._run, name=f"audit-{chain_id}", daemon=True)
        self._thread.start()

    # -- the caller's side (any thread) ------------------------------------------------------

    def write(self, record: Mapping[str, Any]) -> bool:
        """Queue one record (never blocks on disk). False if it was dropped (queue full or
        writer closed); the drop is counted, logged and later recorded in the chain."""
        return self._enqueue(record)

    def write_decision(self, decision: Decision, *, pod: str, namespace: str, now: float) -> bool:
        """`write(record_from_decision(...))`, with the line made on the writer thread
        (`decision_line`): the Check thread only queues the (immutable) Decision and its
        time. Made there in batches it costs the worker less than one at a time between
        Checks (bench/README.md, telemetry section). Same line and drop accounting as
        `write`."""
        return self._enqueue(_DecisionItem(decision, pod, namespace, now))

    def _enqueue(self, item: Mapping[str, Any] | _DecisionItem) -> bool:
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
        """True when the caller must deny (fail-closed only): the log is failing, its
        filesystem is under the free-space reserve, the queue is full, the writer is closed,
        or another writer of the same directory (another worker) is failing (the board)."""
        if not self._fail_closed:
            return False
        if not self._healthy or self._low or self._closed or self._q.qsize() >= self._queue_max:
            return True
        board = self._board_map
        return board is not None and board.find(b"\x01") >= 0

    def health(self) -> dict[str, Any]:
        """For readiness: ``state`` "ok" or "failing" (this writer or another writer of the
        directory cannot write, or the filesystem is under the reserve); ``denying``: calls
        are being denied for it (fail-closed). Reads free space now (one statvfs)."""
        try:
            free: int | None = _free_bytes(self.directory)
        except OSError:
            free = None
        board = self._board
        others = 0
        if board is not None:
            others = board.failing() - (board.map[board.slot] if board.slot >= 0 else 0)
        failing = self._failing() or others > 0
        return {
            "state": "failing" if failing else "ok",
            "denying": self.must_deny(),
            "on_failure": "fail-closed" if self._fail_closed else "continue",
            "writing": self._healthy,
            "low_space": self._low,
            "other_writers_failing": others,
            "free_bytes": free,
            "reserve_bytes": self._reserve,
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
            file_index=self._index,
            low_space=self._low,
        )

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued before this call is handled (written, or counted
        as failed) and fsynced. False on timeout or when closed."""
        item = _Flush()
        with self._put_lock:
            if self._closed:
                return False
            self._q.put(item)
        self._nudge.set()
        return item.done.wait(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Write what is queued, fsync and close. False if the thread did not finish."""
        with self._put_lock:
            if self._closed:
                return not self._thread.is_alive()
            self._closed = True
            self._q.put(_STOP)
        self._nudge.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer %s did not finish within %.1fs", self.chain_id, timeout)
            return False
        return True

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loss accounting ---------------------------------------------------------------------

    def _note_loss(
        self, record: Mapping[str, Any] | _DecisionItem, *, dropped: bool, error: str
    ) -> None:
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
        self._summarize(force=True)
        if self._fd is not None:
            if self._dirty:
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError as exc:
                    self._error("cutting a partial write", exc)
            try:
                os.close(self._fd)
            except OSError as exc:
                self._error("closing the audit file", exc)
            self._fd = None
        if self._board is not None:
            self._board.close()
        self._release()

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        if self._unsynced and self._fsync == "interval":
            deadlines.append(self._last_sync + self._fsync_interval - now)
        if not self._healthy or not self._loss.empty() or self._recovered is not None:
            deadlines.append(max(self._next_retry - now, 0.01))
        if self._loss.failed or self._loss.dropped:
            deadlines.append(1.0)  # the summary log
        if self._reserve:
            deadlines.append(self._next_space - now)  # free space, also when idle
        return max(0.0, min(deadlines)) if deadlines else None

    def _housekeeping(self, force: bool = False) -> None:
        """After a batch: write it, retry (write the loss record) when due, fsync per
        policy, log."""
        with contextlib.suppress(OSError):  # counted and reported; retried below when due
            self._write_pending()
        self._summarize()
        now = time.monotonic()
        pending = not self._loss.empty() or self._recovered is not None or self._fd is None
        if (pending or not self._healthy) and (force or self._healthy or now >= self._next_retry):
            try:
                self._prepare()
            except OSError as exc:
                self._error("retrying the audit log", exc)
        self._sync(force=force)
        self._check_space()
        if self._board is None and now >= self._next_board:
            self._open_board()
        elif self._board is not None and now >= self._next_board:
            self._next_board = now + self._space_interval
            self._board.sweep()
        self._publish()

    # -- free-space reserve and the health board (writer thread) -----------------------------

    def _failing(self) -> bool:
        return not self._healthy or self._low

    def _publish(self) -> None:
        if self._board is not None:
            self._board.set(self._failing())

    def _raise_flag(self) -> None:
        """Before this writer's own `must_deny` turns true: so that no other worker allows
        a call after one of this worker's Checks has denied it."""
        if self._board is not None:
            self._board.set(True)

    def _open_board(self) -> None:
        self._next_board = time.monotonic() + self._space_interval
        try:
            self._board = _Board(self.directory)
        except OSError as exc:
            log.warning(
                "audit chain %s: no health board (other workers will not see this writer "
                "fail at once): %s", self.chain_id, _describe(exc),
            )  # fmt: skip
            return
        self._board_map = self._board.map

    def _check_space(self) -> None:
        """Fail closed while the filesystem has less than the reserve free, before it is
        full: the calls allowed until `must_deny` sees it still have room for their records
        (so do the denies that follow). Back to normal at 5/4 of the reserve."""
        if not self._reserve:
            return
        self._next_space = time.monotonic() + self._space_interval
        try:
            free = _free_bytes(self.directory)
        except OSError as exc:
            log.debug("audit chain %s: statvfs failed: %s", self.chain_id, _describe(exc))
            return
        self._free = free
        if not self._low and free < self._reserve:
            self._raise_flag()
            self._low = True
            log.error(
                "audit chain %s: %d bytes free in %s, under the reserve of %d: failing closed "
                "(records are still written into the reserve) until %d are free",
                self.chain_id, free, self.directory, self._reserve,
                self._reserve + self._reserve // 4,
            )  # fmt: skip
        elif self._low and free >= self._reserve + self._reserve // 4:
            self._low = False
            log.warning(
                "audit chain %s: %d bytes free in %s again: no longer failing closed",
                self.chain_id, free, self.directory,
            )  # fmt: skip

    def _error(self, what: str, exc: BaseException) -> None:
        self._errors += 1
        self._next_retry = time.monotonic() + self._retry_interval
        if self._healthy:
            log.error("audit chain %s: %s failed: %s", self.chain_id, what, _describe(exc))
        else:
            log.debug("audit chain %s: %s failed: %s", self.chain_id, what, _describe(exc))
        self._raise_flag()
        self._healthy = False

    def _store_guarded(self, record: Mapping[str, Any] | _DecisionItem) -> None:
        size = _body_size(record)
        try:
            self._prepare()
            self._put(record, pending=True)
        except OSError as exc:
            self._failed += 1
            self._note_loss(record, dropped=False, error=_describe(exc))
            self._error("writing a record", exc)
        except Exception as exc:  # e.g. not JSON-serializable: a bug, not the disk
            self._failed += 1
            self._note_loss(record, dropped=False, error=_describe(exc))
            log.exception("audit record refused (%s): %r", _describe(exc), record)
        finally:
            if size:  # its line is made: the body is the trail's no longer
                with self._put_lock:
                    self._body_bytes -= size

    def _prepare(self) -> None:
        """Before any record: an open file with a header, then the pending `recovered` and
        `loss` records, so that the chain says what happened before it goes on. The chain
        is listed in the directory's manifest before its first file exists."""
        if not self._listed:
            _list_in_manifest(self.directory, self.chain_id, self._clock(), self._fsync != "never")
            self._listed = True
        self._ensure_file()
        if self._recovered is not None:
            self._put(self._recovered)
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

    def _put(self, record: Mapping[str, Any] | _DecisionItem, *, pending: bool = False) -> None:
        """Chain and append one record to the current file, rotating first if it is full.
        ``pending`` (decision records): only chained now and written with the others of the
        batch in one write(2) by `_write_pending` (its failure fails them all)."""
        line, digest = self._line(record)
        if self._file_records > 0 and self._size + len(line) > self._max_bytes:
            self._rotate()
            self._ensure_file()
            line, digest = self._line(record)
        if pending:
            if not self._pending:
                self._pending_base = (self._size, self._seq, self._prev, self._file_records)
            # Kept only to account for it if the batch's write fails: without the call's
            # body and arguments, which the line has taken what it needs of.
            self._pending.append(_light(record))
            self._pending_lines.append(line)
            self._size += len(line)
            self._seq += 1
            self._prev = digest
            self._file_records += 1
            if self._size - self._pending_base[0] >= _PENDING_MAX_BYTES:
                self._write_pending()
            return
        self._append(line, digest)
        self._file_records += 1

    def _write_pending(self) -> None:
        """Write the batch's chained decision records with one write(2). On an error they
        all count as failed (and go into the next ``loss`` record), and the chain state goes
        back to before them: the next record takes their place."""
        if not self._pending:
            return
        records, lines = self._pending, self._pending_lines
        self._pending, self._pending_lines = [], []
        size, seq, prev, file_records = self._pending_base
        fd = self._fd
        assert fd is not None
        try:
            self._write_all(fd, size, b"".join(lines))
        except OSError as exc:
            self._size, self._seq, self._prev, self._file_records = size, seq, prev, file_records
            error = _describe(exc)
            for record in records:
                self._failed += 1
                self._note_loss(record, dropped=False, error=error)
            self._error("writing a record", exc)
            raise
        self._written += len(records)
        self._unsynced += len(records)
        if not self._healthy:
            log.warning("audit chain %s: writing again (seq %d)", self.chain_id, self._seq - 1)
            self._healthy = True

    def _write_all(self, fd: int, size: int, data: bytes) -> None:
        """Cut a partial write left by a failure back to ``size`` (the complete records),
        then write ``data`` with one write(2), looping over short writes. On an error the
        file is marked to be cut back before the next write."""
        if self._dirty:
            os.ftruncate(fd, size)
            self._dirty = False
        view = memoryview(data)
        try:
            while view:
                n = _write_fd(fd, view)
                view = view[n:]
        except OSError:
            self._dirty = True
            raise

    def _line(self, record: Mapping[str, Any] | _DecisionItem) -> tuple[bytes, str]:
        if isinstance(record, _DecisionItem):
            d, pod, namespace, now = record
            args = d.arguments
            key = self._argument_key() if args and args.recording.mode == "hashes" else None
            return decision_line(
                d, pod=pod, namespace=namespace, now=now, seq=self._seq, prev=self._prev, key=key
            )
        return chained_line(record, seq=self._seq, prev=self._prev)

    def _argument_key(self) -> ArgumentKey | None:
        """The directory's argument key, loaded (or created) on first use. When it cannot
        be, the error is logged and the records keep argument types without hashes (never
        an unkeyed hash, never a lost record); tried again after a minute."""
        if self._key is None and time.monotonic() >= self._key_retry:
            try:
                self._key = load_argument_key(self.directory)
            except AuditInputError as exc:
                self._key_retry = time.monotonic() + 60.0
                log.error(
                    "audit chain %s: %s; recording argument types without hashes meanwhile",
                    self.chain_id, exc,
                )  # fmt: skip
        return self._key

    def _append(self, line: bytes, digest: str) -> None:
        """One write(2) (looping over short writes); state advances only on success. The
        batch's pending records go first, so the file keeps the chain's order."""
        self._write_pending()
        fd = self._fd
        assert fd is not None
        self._write_all(fd, self._size, line)
        self._size += len(line)
        self._seq += 1
        self._prev = digest
        self._unsynced += 1
        if not self._healthy:
            log.warning("audit chain %s: writing again (seq %d)", self.chain_id, self._seq - 1)
            self._healthy = True

    def _ensure_file(self) -> None:
        if self._fd is None:
            path = self.directory / file_name(self.chain_id, self._index)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(path, flags, 0o640)
            self._size = 0
            self._dirty = False
            self._has_header = False
            self._footer_done = False
            self._file_records = 0
            if self._fsync != "never":
                self._sync_dir()
        if not self._has_header:
            header = {
                "type": "header",
                "format": FORMAT,
                "chain": self.chain_id,
                "file_index": self._index,
                "time": utc_millis(self._clock()),
            }
            self._append(*self._line(header))
            self._has_header = True

    def _rotate(self) -> None:
        assert self._fd is not None
        if not self._footer_done:
            footer = {
                "type": "footer",
                "next_file_index": self._index + 1,
                "time": utc_millis(self._clock()),
            }
            self._append(*self._line(footer))
            self._footer_done = True
        if self._fsync != "never":
            _fsync_fd(self._fd)
        os.close(self._fd)
        self._fd = None
        self._unsynced = 0
        self._index += 1

    def _sync(self, force: bool) -> None:
        if self._fd is None or not self._unsynced:
            return
        if not force:
            if self._fsync == "never":
                return
            recent = time.monotonic() - self._last_sync < self._fsync_interval
            if self._fsync == "interval" and recent:
                return
        unsynced, self._unsynced = self._unsynced, 0
        self._last_sync = time.monotonic()
        try:
            _fsync_fd(self._fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped those pages: say so in the chain.
            with self._loss_lock:
                self._loss.unsynced += unsynced
                self._loss.error = _describe(exc)
            self._error("fsync", exc)

    def _sync_dir(self) -> None:
        try:
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _fsync_fd(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:  # the file itself is fine; count it, do not fail the record
            self._errors += 1
            log.warning("audit directory fsync failed: %s", _describe(exc))

    # -- start: lock and resume --------------------------------------------------------------

    def _lock(self) -> int:
        path = self.directory / f".audit-{self.chain_id}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditInputError(f"audit lock {path}: {_describe(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise AuditBusyError(
                f"audit chain {self.chain_id!r} in {self.directory} is in use by another writer"
            ) from None
        return fd

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = -1

    def _resume(self) -> None:
        files = _chain_files(self.directory).get(self.chain_id, [])
        if not files:
            return
        index, path = files[-1]
        data = _read(path)
        cut = data.rfind(b"\n") + 1
        torn = data[cut:]
        lines = data[:cut].splitlines()
        if lines:
            head = _resume_record(path, 1, lines[0])
            if head.get("type") != "header" or head.get("file_index") != index:
                raise AuditResumeError(f"{path}, line 1: not the header of file {index}")
            last = _resume_record(path, len(lines), lines[-1])
            self._seq, self._prev = last["seq"] + 1, last["hash"]
            self._index = index
            if torn:
                self._truncate(path, cut)
            if last.get("type") == "footer":
                self._index = index + 1
            else:
                self._open_existing(path, cut, len(lines) - 1)
        else:  # empty, or only a torn header: rewrite this file from its header on
            if index > 0:
                before = [p for i, p in files if i == index - 1]
                if not before:
                    raise AuditResumeError(
                        f"{path}: cannot resume, file {index - 1} of chain "
                        f"{self.chain_id!r} is missing"
                    )
                prior = _read(before[0])
                prior_lines = prior.splitlines()
                if not prior.endswith(b"\n") or not prior_lines:
                    raise AuditResumeError(f"{before[0]}: last line torn or file empty")
                last = _resume_record(before[0], len(prior_lines), prior_lines[-1])
                self._seq, self._prev = last["seq"] + 1, last["hash"]
            self._index = index
            self._truncate(path, 0)
            self._open_existing(path, 0, 0)
            self._has_header = False
        if torn:
            self._recovered = {
                "type": "recovered",
                "time": utc_millis(self._clock()),
                "file": path.name,
                "offset": cut,
                "torn_bytes": len(torn),
                "torn_sha256": hashlib.sha256(torn).hexdigest(),
                "torn_text": torn[:_TORN_TEXT_MAX].decode("utf-8", "replace"),
                "torn_text_truncated": len(torn) > _TORN_TEXT_MAX,
            }
            log.warning(
                "audit chain %s: cut a torn last line (%d bytes) from %s at offset %d; "
                "a 'recovered' record keeps it",
                self.chain_id, len(torn), path, cut,
            )  # fmt: skip

    def _truncate(self, path: Path, size: int) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise AuditResumeError(
                f"{path}: cannot cut the torn last line: {_describe(exc)}"
            ) from None

    def _open_existing(self, path: Path, size: int, records: int) -> None:
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise AuditResumeError(f"{path}: cannot open for appending: {_describe(exc)}") from None
        self._size = size
        self._has_header = True
        self._file_records = records


def _body_size(item: object) -> int:
    """The bytes of the call body a queued decision holds for its `arguments`."""
    if isinstance(item, _DecisionItem):
        args = item.decision.arguments
        if args is not None and args.body is not None:
            return len(args.body)
    return 0


def _light(item: Mapping[str, Any] | _DecisionItem) -> Mapping[str, Any] | _DecisionItem:
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


def _resume_record(path: Path, line: int, raw: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except ValueError:
        rec = None
    if (
        not isinstance(rec, dict)
        or not _is_int(rec.get("seq"))
        or not isinstance(rec.get("hash"), str)
        or record_hash(rec) != rec["hash"]
    ):
        raise AuditResumeError(
            f"{path}, line {line}: the record is damaged (not a torn line from a crash); "
            "refusing to continue this chain. Run `mandate audit verify`; move the files "
            "aside to start a new chain"
        )
    return rec
