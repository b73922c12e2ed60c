"""The audit trail: one hash-chained JSON-lines record per decision, and its verification.

Role. Turn a Decision into an audit record (who, what, why, when), append records to
size-rotated files off the hot path, and verify or query those files later. This module must
not decide anything, must not block a Check on disk I/O and must not raise into a Check:
`AuditWriter.write` only enqueues; the background thread does the I/O.

Pure part (top of the module, tested with plain data): canonical JSON, the chain math and
`record_from_decision`. I/O part: `AuditWriter`, `verify`, `query`.

Files. ``audit-<chain_id>-<index:06d>.jsonl`` in one directory; one chain per writer
(process), several chains per directory, each verified on its own. Every line is one record
in canonical JSON (keys sorted, compact separators, UTF-8, no ASCII escaping). Every record
carries ``seq`` (0, 1, 2, ... over the whole chain), ``prev`` (the ``hash`` of the record
before it; for the first record :func:`genesis` of the chain id) and ``hash`` (hex SHA-256 of
the canonical JSON of the record without ``hash``). A file starts with a chained ``header``
record (chain, file_index) and, when rotated, ends with a chained ``footer`` record that
announces the next file index, so the chain runs unbroken across files and a deleted tail
file is detected. Other record types: ``decision``; ``loss`` (written when the log becomes
writable again: how many records failed or were dropped, when, and their decision ids);
``recovered`` (see below).

What verification proves. Any edited, removed, inserted or reordered record, a torn line, a
deleted first, middle or announced tail file breaks the chain at a point `verify` names.
Someone able to rewrite the whole chain from the edit onwards can recompute every hash, and
cutting whole records off the very end of the newest file leaves a shorter valid chain: ship
the chain heads (``seq``/``hash``) elsewhere (logs, metrics) to anchor them.

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
import errno
import fcntl
import hashlib
import heapq
import json
import logging
import mmap
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from json.encoder import encode_basestring as _encode_str
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sidecar.core import Code, Decision
from sidecar.core.context import Grant
from sidecar.core.timefmt import utc_millis
from sidecar.errors import AuditBusyError, AuditInputError, AuditResumeError, ConfigError

__all__ = [
    "AuditStats",
    "AuditWriter",
    "ChainReport",
    "Problem",
    "VerifyResult",
    "canonical_json",
    "file_name",
    "genesis",
    "link",
    "query",
    "record_from_decision",
    "record_hash",
    "verify",
]

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_QUEUE_MAX = 10_000
_CHAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILE = re.compile(r"^audit-(?P<chain>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<index>\d{6,})\.jsonl$")
_TORN_TEXT_MAX = 64 * 1024
_LOSS_IDS_MAX = 100
_BATCH = 512
# A batch's decision records go out in one write(2) of at most about this many bytes.
_PENDING_MAX_BYTES = 256 * 1024
# Fail closed while the audit filesystem has less free space than this (see "Free-space
# reserve" in the module docstring); back to normal at 5/4 of it.
DEFAULT_RESERVE_BYTES = 8 * 1024 * 1024
MANIFEST = "audit-manifest.jsonl"
_MANIFEST_GENESIS = hashlib.sha256(b"mandate-audit-manifest").hexdigest()
_BOARD = ".audit-health"
_BOARD_SLOTS = 128
_FLOCK = struct.Struct("hhqqi4x")  # struct flock (Linux, 64-bit off_t)
_F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", -1)  # -1: not Linux

FsyncMode = Literal["always", "interval", "never"]
FailureMode = Literal["fail-closed", "continue"]

# ---------------------------------------------------------------------------------------------
# Pure: canonical JSON, chain math, records


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON value: keys sorted, compact, UTF-8, no ASCII escaping.
    NaN and infinities are refused (ValueError): they have no JSON form. A lone surrogate,
    which has no UTF-8 form, is written as its JSON escape (``\\udcff``), which reads back
    as the same string: no record is refused for a string an agent made up."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8", "backslashreplace")


def genesis(chain_id: str) -> str:
    """The ``prev`` of a chain's first record: derived from the chain id, so that the first
    file of one chain cannot pass for another's."""
    return hashlib.sha256(f"mandate-audit-genesis:{chain_id}".encode()).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the record's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def link(record: Mapping[str, Any], *, seq: int, prev: str) -> dict[str, Any]:
    """A new record: ``record`` with ``seq``, ``prev`` and its ``hash`` set."""
    out = {k: v for k, v in record.items() if k != "hash"}
    out["seq"] = seq
    out["prev"] = prev
    out["hash"] = record_hash(out)
    return out


_HASH_KEY = b'"hash":"'
_PLACEHOLDER = "0" * 64


def _json(value: Any) -> str:
    """One value as canonical JSON text: strings, None and ints inline, the rest by
    `canonical_json` (the same escaping: json's C `encode_basestring`)."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    return canonical_json(value).decode("utf-8")


def chained_line(record: Mapping[str, Any], *, seq: int, prev: str) -> tuple[bytes, str]:
    """``canonical_json(link(record, seq=seq, prev=prev)) + b"\\n"`` and that record's hash,
    with one JSON encoding instead of two (decision records take `decision_line`).

    The record is encoded once with a placeholder hash; the bytes hashed are that encoding
    without the ``"hash":"..."`` member, which is exactly the canonical JSON of the record
    without ``hash`` (keys sorted, so removing one member leaves the rest in order). The
    splice is safe only where ``"hash":"`` occurs once: inside JSON strings every quote is
    escaped, so the one occurrence is our top-level key; a nested ``hash`` key takes the
    two-encoding path."""
    out = {k: v for k, v in record.items() if k != "hash"}
    out["seq"] = seq
    out["prev"] = prev
    out["hash"] = _PLACEHOLDER
    full = canonical_json(out)
    at = full.find(_HASH_KEY)
    if at < 0 or full.find(_HASH_KEY, at + 1) >= 0:
        del out["hash"]
        digest = record_hash(out)
        out["hash"] = digest
        return canonical_json(out) + b"\n", digest
    value = at + len(_HASH_KEY)
    end = value + len(_PLACEHOLDER) + 1  # past the closing quote
    # Drop the member with one of its separating commas (it is never the only member).
    body = full[: at - 1] + full[end:] if full[at - 1 : at] == b"," else full[:at] + full[end + 1 :]
    digest = hashlib.sha256(body).hexdigest()
    return full[:value] + digest.encode("ascii") + full[value + len(_PLACEHOLDER) :] + b"\n", digest


_ALLOW_DENY = ('"deny"', '"allow"')


def decision_line(
    d: Decision, *, pod: str, namespace: str, now: float, seq: int, prev: str
) -> tuple[bytes, str]:
    """``chained_line(record_from_decision(d, ...), seq=seq, prev=prev)`` straight from the
    Decision, without the record dict (half the cost: this runs once per audited
    decision). Byte-identical to that definition (tests/property/test_audit_line.py)."""
    e = _encode_str
    head = (
        f'{{"agent":{e(d.agent) if d.agent else "null"},"code":{e(d.code)}'
        f',"decision":{_ALLOW_DENY[d.allowed]},"decision_id":{e(d.decision_id)}'
        f',"elevation":{"null" if d.grant is None else _json(_elevation(d.grant))}'
    )
    rest = (
        f',"host":{e(d.host) if d.host else "null"}'
        f',"identity_source":{e(d.identity_source) if d.identity_source else "null"}'
        f',"mcp_tools":{_json(list(d.mcp_tools)) if d.mcp_tools else "[]"}'
        f',"method":{e(d.method) if d.method else "null"}'
        f',"namespace":{e(namespace) if namespace else "null"}'
        f',"owner":{e(d.owner) if d.owner else "null"},"path":{e(d.path) if d.path else "null"}'
        f',"pod":{e(pod) if pod else "null"}'
        f',"port":{_json(d.port) if d.port else "null"},"prev":{e(prev)}'
        f',"purpose":{e(d.purpose) if d.purpose else "null"},"reason":{e(d.reason)}'
        f',"revocation":{e(d.rule) if d.rule and d.code == Code.REVOKED else "null"}'
        f',"risk":{_json(round(d.risk, 4)) if d.risk >= 0 else "null"}'
        f',"rule":{e(d.rule) if d.rule else "null"}'
        f',"seq":{int.__repr__(seq)},"task":{e(d.task) if d.task else "null"}'
        f',"time":"{utc_millis(now)}"'
        f',"trace_id":{e(d.trace_id) if d.trace_id else "null"},"type":"decision"}}'
    )
    digest = hashlib.sha256((head + rest).encode("utf-8", "backslashreplace")).hexdigest()
    return f'{head},"hash":"{digest}"{rest}\n'.encode("utf-8", "backslashreplace"), digest


def file_name(chain_id: str, index: int) -> str:
    return f"audit-{chain_id}-{index:06d}.jsonl"


def record_from_decision(
    decision: Decision, *, pod: str, namespace: str, now: float
) -> dict[str, Any]:
    """The audit record of one decision (not yet chained). Absent values are null.

    who: agent, owner, pod, namespace, identity_source; what: method, host, port, path,
    mcp_tools; why: purpose, task, rule, code, reason, elevation, revocation (for a revoked
    agent the revocation key, which is also the decision's rule); and decision_id, trace_id,
    time, decision ("allow"/"deny")."""
    d = decision
    return {
        "type": "decision",
        "time": utc_millis(now),
        "decision_id": d.decision_id,
        "decision": "allow" if d.allowed else "deny",
        "code": d.code,
        "reason": d.reason,
        "agent": d.agent or None,
        "owner": d.owner or None,
        "pod": pod or None,
        "namespace": namespace or None,
        "identity_source": d.identity_source or None,
        "method": d.method or None,
        "host": d.host or None,
        "port": d.port or None,
        "path": d.path or None,
        "mcp_tools": list(d.mcp_tools),
        "purpose": d.purpose or None,
        "task": d.task or None,
        "rule": d.rule or None,
        "elevation": _elevation(d.grant),
        "risk": round(d.risk, 4) if d.risk >= 0 else None,
        "revocation": (d.rule or None) if d.code == Code.REVOKED else None,
        "trace_id": d.trace_id or None,
    }


def _elevation(g: Grant | None) -> dict[str, Any] | None:
    if g is None:
        return None
    return {
        "name": g.elevation,
        "grant": g.id,
        "approver": g.approver,
        "justification": g.justification or None,
        "expires": utc_millis(g.expires_at),
    }


def event_record(event: str, *, now: float, **fields: Any) -> dict[str, Any]:
    """The audit record of a supervisor event (not yet chained): an elevation requested,
    granted, expired, refused; a task reported; an automatic revocation."""
    return {"type": event, "time": utc_millis(now), **fields}


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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


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
            self._pending.append(record)
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
            return decision_line(
                d, pod=pod, namespace=namespace, now=now, seq=self._seq, prev=self._prev
            )
        return chained_line(record, seq=self._seq, prev=self._prev)

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


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuditInputError(f"{path}: {_describe(exc)}") from None


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _chain_files(directory: Path) -> dict[str, list[tuple[int, Path]]]:
    chains: dict[str, list[tuple[int, Path]]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise AuditInputError(f"{directory}: {_describe(exc)}") from None
    for entry in entries:
        m = _FILE.match(entry.name)
        if m is not None and entry.is_file():
            chains.setdefault(m["chain"], []).append((int(m["index"]), entry))
    for files in chains.values():
        files.sort()
    return chains


def _trail(directory: str | os.PathLike[str], chain_id: str | None) -> dict[str, list[Path]]:
    d = Path(directory)
    if not d.is_dir():
        raise AuditInputError(f"{d}: no such directory")
    chains = _chain_files(d)
    if chain_id is not None:
        if chain_id not in chains:
            raise AuditInputError(f"{d}: no audit files of chain {chain_id!r}")
        chains = {chain_id: chains[chain_id]}
    if not chains:
        raise AuditInputError(f"{d}: no audit files (audit-<chain>-<index>.jsonl)")
    return {c: [p for _, p in files] for c, files in sorted(chains.items())}


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True, slots=True)
class Problem:
    """The first bad record of a chain. ``line`` is 1-based; ``seq`` is what the bad line
    holds, or the seq expected there when the line is unreadable (torn, not JSON) or the
    file is missing; ``kind`` is a stable code: missing_file, empty_file, torn_line,
    bad_record, hash_mismatch, not_canonical, seq_gap, reordered, prev_mismatch,
    bad_header, missing_tail_file; for the directory as a whole (see `verify`):
    missing_chain (listed in the manifest, no file left), unlisted_chain (files of a chain
    the manifest does not list), missing_manifest, bad_manifest (the manifest's own chain
    is broken: its ``chain`` is ``MANIFEST``)."""

    chain: str
    file: str
    line: int
    seq: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line} (seq {self.seq}): {self.kind}: {self.message}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """One chain's verification. ``records`` counts decision records; ``notes`` are what
    a valid chain admits to (recovered torn lines, recorded losses)."""

    chain: str
    files: int
    records: int
    last_seq: int | None
    last_hash: str | None
    lost: int
    notes: tuple[str, ...]
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """``chains``: the chains that have files; ``missing``: one missing_chain problem per
    chain the manifest lists and no file is left of; ``manifest``: what is wrong with the
    manifest itself (missing_manifest, bad_manifest, or a torn_line in it)."""

    directory: str
    chains: tuple[ChainReport, ...]
    missing: tuple[Problem, ...] = ()
    manifest: Problem | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains) and not self.missing and self.manifest is None

    @property
    def problem(self) -> Problem | None:
        """The first problem: chains in order of their ids, then missing chains, then the
        manifest's own."""
        found = next((c.problem for c in self.chains if c.problem is not None), None)
        if found is None and self.missing:
            found = self.missing[0]
        return found or self.manifest

    def to_json(self) -> dict[str, Any]:
        def problem(p: Problem | None) -> dict[str, Any] | None:
            if p is None:
                return None
            return {
                "chain": p.chain, "file": p.file, "line": p.line, "seq": p.seq,
                "kind": p.kind, "message": p.message,
            }  # fmt: skip

        return {
            "ok": self.ok,
            "directory": self.directory,
            "problem": problem(self.problem),
            "missing_chains": [problem(p) for p in self.missing],
            "manifest": problem(self.manifest),
            "chains": [
                {
                    "chain": c.chain,
                    "ok": c.ok,
                    "files": c.files,
                    "records": c.records,
                    "last_seq": c.last_seq,
                    "last_hash": c.last_hash,
                    "lost": c.lost,
                    "notes": list(c.notes),
                    "problem": problem(c.problem),
                }
                for c in self.chains
            ],
        }


class _Bad(Exception):
    def __init__(self, kind: str, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.seq = kind, message, seq


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except ValueError:
        raise _Bad("bad_record", "not a JSON record") from None
    if not isinstance(rec, dict):
        raise _Bad("bad_record", "not a JSON object")
    seq = rec.get("seq")
    if not _is_int(seq) or not isinstance(rec.get("prev"), str):
        raise _Bad("bad_record", "no integer seq or no prev")
    if not isinstance(rec.get("hash"), str):
        raise _Bad("bad_record", "no hash", seq)
    return rec


def _verify_chain(chain: str, files: list[Path]) -> ChainReport:
    seq, prev = 0, genesis(chain)
    records = lost = 0
    notes: list[str] = []
    last_hash: str | None = None
    last: tuple[str, int, dict[str, Any]] | None = None  # file, line, record

    def report(problem: Problem | None) -> ChainReport:
        return ChainReport(
            chain, len(files), records, seq - 1 if seq else None, last_hash, lost,
            tuple(notes), problem,
        )  # fmt: skip

    for expect_index, path in enumerate(files):
        name = path.name
        m = _FILE.match(name)
        assert m is not None
        index = int(m["index"])
        if index != expect_index:
            missing = (
                f"file {expect_index}" if index == expect_index + 1
                else f"files {expect_index}-{index - 1}"
            )  # fmt: skip
            why = f"{missing} of chain {chain!r} missing (deleted): this file has index {index}"
            try:
                at = _parse(_read(path).split(b"\n", 1)[0])["seq"]
            except _Bad:
                at = seq
            return report(Problem(chain, name, 1, at, "missing_file", why))
        data = _read(path)
        if not data:
            return report(Problem(chain, name, 1, seq, "empty_file", "empty file: no header"))
        lines = data.split(b"\n")
        torn = lines.pop() != b""  # the text after the last newline
        if torn:
            lines.append(data[data.rfind(b"\n") + 1 :])
        footer_at = 0
        for lineno, raw in enumerate(lines, 1):
            try:
                if torn and lineno == len(lines):
                    raise _Bad(
                        "torn_line",
                        "torn last line (no newline): the file was truncated or a write "
                        "interrupted (a restarted writer recovers a crash's torn line)",
                    )
                rec = _parse(raw)
                rseq: int = rec["seq"]
                if record_hash(rec) != rec["hash"]:
                    raise _Bad("hash_mismatch", "record edited: hash does not match content", rseq)
                if canonical_json(rec) != raw:
                    raise _Bad("not_canonical", "record re-encoded: not canonical JSON", rseq)
                if rseq != seq:
                    raise _seq_problem(seq, rseq, lines, lineno)
                if rec["prev"] != prev:
                    raise _Bad(
                        "prev_mismatch",
                        "prev is not the hash of the record before it (that record was "
                        "edited and re-hashed, or records were removed or inserted)",
                        rseq,
                    )
                kind = rec.get("type")
                if lineno == 1:
                    if kind != "header" or rec.get("chain") != chain:
                        raise _Bad("bad_header", f"not a header of chain {chain!r}", rseq)
                    if rec.get("file_index") != index:
                        why = f"header says file_index {rec.get('file_index')}, name says {index}"
                        raise _Bad("bad_header", why, rseq)
                elif kind == "header":
                    raise _Bad("bad_header", "a header inside a file", rseq)
                if footer_at:
                    why = f"a record after the file's footer (line {footer_at})"
                    raise _Bad("bad_record", why, rseq)
                if kind == "footer":
                    footer_at = lineno
                    if rec.get("next_file_index") != index + 1:
                        raise _Bad("bad_record", "footer announces a wrong next file", rseq)
            except _Bad as bad:
                at = seq if bad.seq is None else bad.seq
                return report(Problem(chain, name, lineno, at, bad.kind, bad.message))
            seq, prev, last_hash = seq + 1, rec["hash"], rec["hash"]
            last = (name, lineno, rec)
            if kind == "decision":
                records += 1
            elif kind == "recovered":
                notes.append(
                    f"{name} line {lineno} (seq {rseq}): recovered a torn line of "
                    f"{rec.get('torn_bytes')} bytes cut from {rec.get('file')}"
                )
            elif kind == "loss":
                n = _int(rec.get("failed")) + _int(rec.get("dropped"))
                lost += n
                notes.append(
                    f"{name} line {lineno} (seq {rseq}): {rec.get('failed')} record(s) failed, "
                    f"{rec.get('dropped')} dropped, {rec.get('unsynced')} unsynced "
                    f"({rec.get('error')})"
                )
    if last is not None and last[2].get("type") == "footer":
        name, lineno, rec = last
        why = (
            f"the chain ends with a footer announcing file {rec.get('next_file_index')}, "
            "which is missing (deleted)"
        )
        return report(Problem(chain, name, lineno, rec["seq"], "missing_tail_file", why))
    return report(None)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _seq_problem(expected: int, found: int, lines: list[bytes], lineno: int) -> _Bad:
    for later, raw in enumerate(lines[lineno:], lineno + 1):
        try:
            if _parse(raw)["seq"] == expected:
                why = f"out of order: expected seq {expected} here; it is at line {later}"
                return _Bad("reordered", why, found)
        except _Bad:
            continue
    if found > expected:
        why = f"seq gap: expected {expected}, found {found}: {found - expected} record(s) removed"
        return _Bad("seq_gap", why, found)
    why = f"seq goes back: expected {expected}, found {found} (duplicated or reordered)"
    return _Bad("reordered", why, found)


def _read_manifest(directory: Path) -> tuple[dict[str, int] | None, Problem | None]:
    """The chains the manifest lists (chain id -> line), None without a manifest; and the
    manifest's first problem. Chains listed after a broken line are not read."""
    path = directory / MANIFEST
    if not path.exists():
        return None, None
    data = _read(path)
    listed: dict[str, int] = {}
    lines = data.split(b"\n")
    torn = lines.pop() != b""
    if torn:
        lines.append(data[data.rfind(b"\n") + 1 :])
    seq, prev = 0, _MANIFEST_GENESIS
    for lineno, raw in enumerate(lines, 1):
        try:
            if torn and lineno == len(lines):
                raise _Bad("torn_line", "torn last line (no newline): the manifest was truncated")
            rec = _parse(raw)
            if record_hash(rec) != rec["hash"]:
                raise _Bad("bad_manifest", "entry edited: hash does not match", rec["seq"])
            if canonical_json(rec) != raw:
                raise _Bad("bad_manifest", "entry re-encoded: not canonical JSON", rec["seq"])
            if rec["seq"] != seq or rec["prev"] != prev:
                why = "entries removed, inserted or reordered: seq or prev does not follow"
                raise _Bad("bad_manifest", why, rec["seq"])
            kind, chain = rec.get("type"), rec.get("chain")
            if (lineno == 1) != (kind == "manifest"):
                raise _Bad("bad_manifest", "the first entry (only) is the manifest's header", seq)
            if lineno > 1 and (kind != "chain" or not isinstance(chain, str)):
                raise _Bad("bad_manifest", "not a chain entry", seq)
        except _Bad as bad:
            at = seq if bad.seq is None else bad.seq
            kind_ = "torn_line" if bad.kind == "torn_line" else "bad_manifest"
            return listed, Problem(MANIFEST, MANIFEST, lineno, at, kind_, bad.message)
        if isinstance(chain, str):
            listed.setdefault(chain, lineno)
        seq, prev = seq + 1, rec["hash"]
    return listed, None


def _missing_why(chain: str, line: int) -> str:
    return (
        f"chain {chain!r} is listed in the manifest (line {line}) but no file of it is left "
        "(deleted)"
    )


def verify(directory: str | os.PathLike[str], chain_id: str | None = None) -> VerifyResult:
    """Verify every chain in ``directory`` (or only ``chain_id``), each on its own, against
    the directory's manifest (``audit-manifest.jsonl``: every writer lists its chain there
    before the chain's first file): a listed chain with no file left is a missing_chain, a
    chain with files that is not listed an unlisted_chain, no manifest beside chain files a
    missing_manifest.

    Raises :class:`~sidecar.errors.AuditInputError` for a missing directory, or neither
    audit files nor a manifest. A chain's report names its first bad record; later ones
    are not examined."""
    d = Path(directory)
    if not d.is_dir():
        raise AuditInputError(f"{d}: no such directory")
    listed, manifest = _read_manifest(d)
    found = _chain_files(d)
    if listed is None and not found:
        raise AuditInputError(f"{d}: no audit files (audit-<chain>-<index>.jsonl)")
    expected = dict(listed or {})
    if chain_id is not None:
        if chain_id not in found and chain_id not in expected:
            raise AuditInputError(f"{d}: no audit files of chain {chain_id!r}")
        found = {c: f for c, f in found.items() if c == chain_id}
        expected = {c: n for c, n in expected.items() if c == chain_id}
    reports = []
    for c, files in sorted(found.items()):
        report = _verify_chain(c, [p for _, p in files])
        if report.ok and listed is not None and manifest is None and c not in expected:
            why = (
                f"chain {c!r} is not listed in {MANIFEST} (every writer lists its chain "
                "before its first file): files planted, or the manifest rewritten"
            )
            first = files[0][1].name
            report = replace(report, problem=Problem(c, first, 1, 0, "unlisted_chain", why))
        reports.append(report)
    missing = tuple(
        Problem(c, MANIFEST, line, 0, "missing_chain", _missing_why(c, line))
        for c, line in sorted(expected.items())
        if c not in found
    )
    if listed is None:
        manifest = Problem(
            MANIFEST, MANIFEST, 0, 0, "missing_manifest",
            f"no {MANIFEST} beside the chains: deleted (so deleted chains cannot be named), "
            "or the trail was written before mandate kept a manifest",
        )  # fmt: skip
    return VerifyResult(str(directory), tuple(reports), missing, manifest)


# ---------------------------------------------------------------------------------------------
# Query


def _bound(when: datetime) -> str:
    """A query bound in the records' own `time` format (naive datetimes are UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return utc_millis(when.timestamp())


def _records(chain: str, files: list[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        try:
            handle = path.open("rb")
        except OSError as exc:
            log.warning("audit query: skipping %s: %s", path, _describe(exc))
            continue
        with handle:
            for lineno, raw in enumerate(handle, 1):
                try:
                    rec = json.loads(raw)
                except ValueError:
                    log.warning("audit query: %s line %d is not JSON; skipped", path, lineno)
                    continue
                if isinstance(rec, dict) and rec.get("type") == "decision":
                    yield rec


def query(
    directory: str | os.PathLike[str],
    *,
    agent: str | None = None,
    decision: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    trace_id: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Decision records matching every filter given, all chains merged by time.

    ``since`` is inclusive, ``until`` exclusive (naive datetimes are UTC); ``decision`` is
    "allow" or "deny". Raises AuditInputError for a missing directory or no audit files.
    This does not verify: run `verify` for that."""
    chains = _trail(directory, None)
    lo = _bound(since) if since is not None else None
    hi = _bound(until) if until is not None else None
    trace = trace_id.lower() if trace_id else None
    merged = heapq.merge(
        *(_records(c, files) for c, files in chains.items()),
        key=lambda r: str(r.get("time", "")),
    )
    for rec in merged:
        t = str(rec.get("time", ""))
        if (
            (agent is None or rec.get("agent") == agent)
            and (decision is None or rec.get("decision") == decision)
            and (lo is None or t >= lo)
            and (hi is None or t < hi)
            and (trace is None or rec.get("trace_id") == trace)
        ):
            yield rec
