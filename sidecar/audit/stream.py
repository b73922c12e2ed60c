"""The audit stream's writer (`StreamWriter`): the hash-chained records as JSON lines on a
stream, the process's stdout, for the cluster's log pipeline (`kubectl logs`, the CRI log
files the kubelet keeps, fluent-bit, Loki ...), so that they outlive the pod.

Records. The records of `record` (header, decision, loss, recovered, and the supervisor's
events), chained the same way (``seq``, ``prev``, ``hash`` from the chain's genesis), one
canonical JSON object per line, each starting with the marker ``"@mandate":"audit"`` and
naming its ``chain`` (`record.stream_stamp`): a stream holds the chains of several writers
(a mandate's workers and its supervisor), and the log pipeline mixes in mandate's own log
lines (stderr) and its own framing. `logverify` picks the records out and verifies each
chain; a line is a record only if it *is* one, whole.

Chains and restarts. A stream cannot be read back, so a writer never continues a chain: each
start of a process begins a new chain (id ``<pod>-<writer>-<8 hex>``, `stream_chain_id`)
whose ``header`` record (seq 0, ``prev`` the genesis of the id, as every chain starts) names
the chain it follows in ``previous``: the last record (chain, seq, hash) the previous
process of the same writer (``w0``, ``w1``, ``supervisor``) wrote whole, which each writer
keeps in a head file (``audit-<name>-<writer>.head``, in the state directory or else the
run directory) after every write; null when there is none ("new chain": a new pod, or no
directory kept it). `logverify` checks the link (the previous chain must reach that record
in the log: a cut tail is named) and reports each start as a restart. A writer that stops
cleanly ends its chain with an ``end`` record. (A directory's writer, which can read its
files back, continues its chain instead: `writer`.)

One writer at a time. The processes of a mandate share the stream (the workers inherit the
supervisor's stdout). Each writes a batch's lines with one write(2) under an flock of
``.audit-<name>.lock`` in the run directory (``shared_directory``), so that lines never
interleave, even past PIPE_BUF. A writer killed mid-write leaves the stream mid-line; the
lock file says so (a byte set while a write is under way, with the writer's chain id), and
the next writer ends that line before its own and records a ``recovered`` record (the torn
line is then a note of `logverify`, not a problem). The processes also share a health board
there (`chainwriter`): when stdout fails for one worker, every worker denies at once.

Failures, as for a directory (`chainwriter`): a write error (EPIPE: nobody reads the pipe;
EBADF: stdout closed) makes the writer unhealthy and, fail-closed, every call is denied
until a write succeeds again; a write blocked longer than ``stall_after`` seconds (the pipe
is full: the log pipeline stopped reading) counts as failing too. The queue is bounded, and
only the writer thread ever waits for the stream: never a Check.

`claim_stdout` makes fd 1 the trail's alone in a process: Python's `sys.stdout` goes to
stderr, and no line mandate logs can be read as a record, whatever framing the reader takes
off (`guard_log_lines`).

Line length. A record line is kept under `record.STREAM_LINE_MAX` bytes (`fit_record`: the
longest members, which the agent controls, such as a path, are cut, and the record says
what they were in ``truncated``): containerd and Docker split a longer line into parts
(16 KiB), which the kubelet's `kubectl logs` glues to whatever line of stderr came between
them, and log pipelines drop or split long lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import re
import secrets
import select
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.audit.chainwriter import DEFAULT_QUEUE_MAX, ChainWriter, FailureMode, PartialWrite
from sidecar.audit.files import _describe
from sidecar.audit.logs import may_frame_a_record
from sidecar.audit.record import (
    _CHAIN_ID,
    FORMAT,
    STREAM_LINE_MAX,
    stream_stamp,
)
from sidecar.core.timefmt import utc_millis
from sidecar.errors import AuditInputError, ConfigError

__all__ = ["StreamWriter", "claim_stdout", "guard_log_lines", "stream_chain_id"]

log = logging.getLogger("sidecar.audit.writer")

_WRITER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_HEAD_SIZE = 512  # the head file: one JSON object, padded with spaces
_HASH = re.compile(r"^[0-9a-f]{64}$")
# The lock file: byte 0 is 1 while a writer is mid-write, byte 1 the length of its chain id,
# bytes 2-65 the id (who left a torn line, for the `recovered` record).
_LOCK_SIZE = 128
_POLL_MS = 1000

# The stream's only writing call, a module attribute so that tests can inject faults (a
# write that stops half-way) without touching the os module everyone shares.
_write_fd: Callable[[int, bytes | memoryview], int] = os.write


def stream_chain_id(pod: str, writer: str) -> str:
    """A new chain id for ``writer`` of ``pod`` (the host name if empty):
    ``<pod>-<writer>-<8 hex>``, the pod's name cut to fit the 64 characters of a chain id.
    New at each start: a stream's chain is never continued (module docstring)."""
    tail = f"-{writer}-{secrets.token_hex(4)}"
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", pod or socket.gethostname())[: 64 - len(tail)]
    if not base[:1].isalnum():
        base = "m" + base[: 63 - len(tail)]
    return base + tail


class _StreamLock:
    """The lock the writers of one stream take around each write, and the mid-line byte
    (module docstring). Without a directory: this process's writers only."""

    def __init__(self, directory: Path | None, name: str) -> None:
        self.fd = -1
        self.map: mmap.mmap | bytearray = bytearray(_LOCK_SIZE)
        if directory is None:
            return
        path = directory / f".audit-{name}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditInputError(f"audit stream lock {path}: {_describe(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_size < _LOCK_SIZE:
                    os.pwrite(fd, bytes(_LOCK_SIZE), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            self.map = mmap.mmap(fd, _LOCK_SIZE)
        except OSError as exc:
            os.close(fd)
            raise AuditInputError(f"audit stream lock {path}: {_describe(exc)}") from None
        self.fd = fd

    def acquire(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def torn_by(self) -> str | None:
        """The chain id of the writer that left the stream mid-line, or None."""
        if not self.map[0]:
            return None
        n = min(self.map[1], 64)
        return bytes(self.map[2 : 2 + n]).decode("ascii", "replace")

    def mid_line(self, chain_id: str | None) -> None:
        """Say that ``chain_id``'s writer may leave the stream mid-line (None: it does not)."""
        if chain_id is None:
            self.map[0] = 0
            return
        raw = chain_id.encode("ascii", "replace")[:64]
        self.map[1] = len(raw)
        self.map[2 : 2 + len(raw)] = raw
        self.map[0] = 1

    def close(self) -> None:
        if self.fd >= 0:
            if isinstance(self.map, mmap.mmap):
                self.map.close()
            os.close(self.fd)
            self.fd = -1


class _Head:
    """The head file of one writer of a stream: the last record it wrote whole (chain,
    seq, hash), read by the next process of that writer to name it (module docstring)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd = -1
        self._failed = False

    def read(self) -> dict[str, Any] | None:
        """The previous process's last record, or None (no file, or not a head)."""
        if self.path is None:
            return None
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("audit head %s: %s; the new chain names no previous", self.path, exc)
            return None
        try:
            head = json.loads(text)
            chain, seq, digest = head["chain"], head["seq"], head["hash"]
        except (ValueError, KeyError, TypeError):
            head = chain = seq = digest = None
        if (
            not isinstance(chain, str)
            or not _CHAIN_ID.match(chain)
            or not isinstance(seq, int)
            or isinstance(seq, bool)
            or seq < 0
            or not isinstance(digest, str)
            or not _HASH.match(digest)
        ):
            log.warning(
                "audit head %s: not a chain head; the new chain names no previous", self.path
            )
            return None
        return {"chain": chain, "seq": seq, "hash": digest}

    def open(self) -> None:
        if self.path is None:
            return
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            log.warning(
                "audit head %s: %s; a restarted writer will not name this chain",
                self.path, _describe(exc),
            )  # fmt: skip

    def save(self, chain: str, seq: int, digest: str) -> None:
        """One pwrite of a fixed-size record (no fsync: the page cache outlives the process,
        and the pod's volume does not outlive its node)."""
        if self.fd < 0:
            return
        text = json.dumps({"chain": chain, "seq": seq, "hash": digest}).encode()
        try:
            os.pwrite(self.fd, text.ljust(_HEAD_SIZE - 1) + b"\n", 0)
        except OSError as exc:
            if not self._failed:
                log.warning("audit head %s: %s", self.path, _describe(exc))
            self._failed = True
        else:
            self._failed = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Unsent(Exception):
    def __init__(self, sent: int, cause: OSError) -> None:
        super().__init__(cause)
        self.sent, self.cause = sent, cause


class StreamWriter(ChainWriter):
    """Appends records to one hash chain on the stream ``fd`` (stdout by default), as
    ``writer`` (``w0``, ``supervisor``) of ``pod``; the I/O runs on a daemon thread. See the
    module docstring; `chainwriter` for the queue and the failure modes.

    ``shared_directory``: where the writers of the stream (the processes of one mandate)
    keep its lock and health board (the run directory; None: this process alone).
    ``head_directory``: where this writer keeps its head file for the next process (None:
    the next chain names no previous). ``key_directory``: the argument key's directory."""

    sink = "stdout"
    noun = "stream"
    line_max = STREAM_LINE_MAX

    def __init__(
        self,
        fd: int = 1,
        *,
        writer: str,
        pod: str = "",
        name: str = "stdout",
        chain_id: str | None = None,
        on_failure: FailureMode = "fail-closed",
        queue_max: int = DEFAULT_QUEUE_MAX,
        retry_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        linger: float = 0.1,
        shared_directory: Path | None = None,
        head_directory: Path | None = None,
        key_directory: Path | None = None,
        stall_after: float = 5.0,
    ) -> None:
        if not _WRITER.match(writer) or not _WRITER.match(name):
            raise ConfigError(
                f"audit stream writer {writer!r} / name {name!r}: expected 1-32 of "
                "A-Z a-z 0-9 _ . - (starting with a letter or digit)"
            )
        if stall_after <= 0:
            raise ConfigError("audit: stall_after > 0 is required")
        chain_id = chain_id or stream_chain_id(pod, writer)
        super().__init__(
            chain_id=chain_id, on_failure=on_failure, queue_max=queue_max,
            retry_interval=retry_interval, clock=clock, linger=linger,
            key_directory=key_directory, stamp=stream_stamp(chain_id),
        )  # fmt: skip
        self.sink = name
        self.fd = fd
        self.writer = writer
        self.pod = pod
        self._stall_after = stall_after
        self._blocked_since = 0.0  # time.monotonic() a write (or its lock) began to wait
        self._has_header = False
        head = None if head_directory is None else head_directory / f"audit-{name}-{writer}.head"
        self._head = _Head(head)
        self._previous = self._head.read()
        self._head.open()
        try:
            self._lock = _StreamLock(shared_directory, name)
        except BaseException:
            self._head.close()
            raise
        self._start(shared_directory)

    @property
    def previous(self) -> dict[str, Any] | None:
        """The chain (and its last record) this one follows, as its header names it."""
        return self._previous

    # -- the sink: a stream ------------------------------------------------------------------

    def _ready(self) -> bool:
        return self._has_header

    def _open_sink(self) -> None:
        if self._has_header:
            return
        header = {
            "type": "header",
            "format": FORMAT,
            "sink": self.sink,
            "writer": self.writer,
            "pod": self.pod or None,
            "pid": os.getpid(),
            "previous": self._previous,
            "time": utc_millis(self._clock()),
        }
        self._append(*self._line(header))
        self._has_header = True

    def _emit(self, lines: list[bytes], mark: tuple[int, ...]) -> None:
        """One write(2) of ``lines`` under the stream's lock; a line left torn by a writer
        that died mid-write is ended first (and a ``recovered`` record noted)."""
        data = b"".join(lines)
        lock = self._lock
        self._blocked_since = time.monotonic()
        try:
            lock.acquire()
            try:
                torn = lock.torn_by()
                lead = b"\n" if torn is not None else b""
                lock.mid_line(self.chain_id)
                try:
                    self._send(lead + data)
                except _Unsent as unsent:
                    out = unsent.sent - len(lead)  # bytes of ``data`` that went out
                    done, at = 0, 0
                    for line in lines:
                        if at + len(line) > out:
                            break
                        at, done = at + len(line), done + 1
                    if unsent.sent == 0:
                        lock.mid_line(torn)  # nothing went out: as it was
                    elif out >= 0 and at == out:
                        lock.mid_line(None)  # stopped at the end of a line
                    if torn is not None and unsent.sent > 0:
                        self._note_recovered(torn)
                    if done:
                        raise PartialWrite(done, unsent.cause) from None
                    raise unsent.cause from None
                lock.mid_line(None)
                if torn is not None:
                    self._note_recovered(torn)
            finally:
                lock.release()
        finally:
            self._blocked_since = 0.0

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(data):
                try:
                    sent += _write_fd(self.fd, view[sent:])
                except BlockingIOError:  # a non-blocking stdout: wait until it takes more
                    poller = select.poll()
                    poller.register(self.fd, select.POLLOUT)
                    poller.poll(_POLL_MS)
        except OSError as exc:
            raise _Unsent(sent, exc) from None

    def _note_recovered(self, torn_by: str) -> None:
        self._recovered = {
            "type": "recovered",
            "time": utc_millis(self._clock()),
            "torn_line": True,
            "torn_by": torn_by,
            "what": "a writer of this stream stopped mid-line; the line was ended here",
        }
        log.warning(
            "audit stream %s: %s stopped mid-line (killed while writing, or its write "
            "failed); ended its line",
            self.sink, torn_by,
        )  # fmt: skip

    def _wrote(self, records: int) -> None:
        self._head.save(self.chain_id, self._seq - 1, self._prev)

    def _sink_failing(self) -> bool:
        since = self._blocked_since
        return since > 0 and time.monotonic() - since > self._stall_after

    def _sink_health(self) -> dict[str, Any]:
        since = self._blocked_since
        blocked = round(time.monotonic() - since, 3) if since > 0 else 0.0
        return {"chain": self.chain_id, "stalled": self._sink_failing(), "blocked_seconds": blocked}

    def _close_sink(self) -> None:
        """The chain's ``end`` record (after a pending loss record), if it started."""
        if not self._has_header:
            return
        self._prepare()
        self._put({"type": "end", "time": utc_millis(self._clock())})

    def _finish_sink(self) -> None:
        self._lock.close()
        self._head.close()


# ---------------------------------------------------------------------------------------------
# stdout: the trail's alone


class _GuardedFormatter(logging.Formatter):
    """A handler's formatter whose text never has a line that a reader of merged, unframed
    output (`kubectl logs`: stdout and stderr) could take for a record or a part of one
    (`logs.may_frame_a_record`): every continuation line of a multi-line message (an
    agent's text with a newline, a traceback) is indented with a tab, which no framing or
    record starts with, and a first line that could be taken for one gets a space in front.
    (The reader takes a ``--prefix`` and a ``--timestamps`` framing off a line before it
    looks for the marker: a guard that only looked at the line's start would not do.)"""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        if text[:1] in _RISKY_START and may_frame_a_record(
            text[:_LOOK].encode("utf-8", "backslashreplace")
        ):
            text = " " + text
        return text


# What a line the reader treats specially can start with: a digit (a CRI line, a timestamp),
# "[" (a --prefix) or "{" (Docker's json-file, the marker). Enough of the line to tell.
_RISKY_START = frozenset("0123456789[{")
_LOOK = 512


def guard_log_lines(logger: logging.Logger | None = None) -> None:
    """Wrap the formatters of ``logger``'s handlers (the root logger's: where mandate's log
    lines go, stderr) in `_GuardedFormatter`. Idempotent."""
    for handler in (logger or logging.getLogger()).handlers:
        current = handler.formatter
        if not isinstance(current, _GuardedFormatter):
            handler.setFormatter(_GuardedFormatter(current or logging.Formatter()))


def claim_stdout() -> None:
    """Make fd 1 the audit stream's alone in this process: Python's `sys.stdout` writes to
    stderr from now on (a stray print would break a record's line), and no log line can
    start with the marker (`guard_log_lines`). Child processes still inherit fd 1 (a
    mandate's workers write their own chains there)."""
    if sys.stdout is not sys.stderr:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        sys.stdout = sys.stderr
    guard_log_lines()
