"""The audit directory's writer (`AuditWriter`): records appended to size-rotated files off
the hot path by one thread (`chainwriter.ChainWriter`: the queue, the thread, the failure
modes, the health board and the argument key; here: the files).

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

Failures: see `chainwriter`. A partial write is cut back before the next one, so a failure
never leaves a torn line in the middle of a file.

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

The health board (``.audit-health`` in the directory, `chainwriter`): every writer of the
directory (a mandate's workers and its supervisor) sets its byte while it cannot write or is
under the reserve.

The argument key (``.audit-arguments.key``, `keyfile`): the directory's (`chainwriter`).

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
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from sidecar.audit.chainwriter import (
    DEFAULT_QUEUE_MAX,
    AuditStats,
    ChainWriter,
    FailureMode,
)
from sidecar.audit.files import _chain_files, _describe, _read
from sidecar.audit.record import (
    _MANIFEST_GENESIS,
    FORMAT,
    MANIFEST,
    _is_int,
    chained_line,
    file_name,
    record_hash,
)
from sidecar.core.timefmt import utc_millis
from sidecar.errors import AuditBusyError, AuditInputError, AuditResumeError, ConfigError

__all__ = ["DEFAULT_RESERVE_BYTES", "AuditStats", "AuditWriter", "FailureMode", "FsyncMode"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_TORN_TEXT_MAX = 64 * 1024
# Fail closed while the audit filesystem has less free space than this (see "Free-space
# reserve" in the module docstring); back to normal at 5/4 of it.
DEFAULT_RESERVE_BYTES = 8 * 1024 * 1024

FsyncMode = Literal["always", "interval", "never"]


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


class AuditWriter(ChainWriter):
    """Appends records to one hash chain in ``directory``; the I/O runs on a daemon thread.

    `write` never blocks on disk; `flush` and `close` wait at most their timeout. See the
    module docstring for the fsync policy and resuming, `chainwriter` for the failure
    modes."""

    sink = "directory"
    noun = "file"

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
        if fsync not in ("always", "interval", "never"):
            raise ConfigError(f"audit fsync {fsync!r}: expected always, interval or never")
        if max_bytes < 1024 or fsync_interval <= 0 or reserve_bytes < 0 or space_interval <= 0:
            raise ConfigError(
                "audit: max_bytes >= 1024, fsync_interval > 0, reserve_bytes >= 0 and "
                "space_interval > 0 are required"
            )
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
        self.directory = Path(directory)
        super().__init__(
            chain_id=chain_id, on_failure=on_failure, queue_max=queue_max,
            retry_interval=retry_interval, clock=clock, linger=linger,
            board_interval=space_interval, key_directory=self.directory,
        )  # fmt: skip
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._fsync_interval = fsync_interval
        # Free-space reserve (module docstring): checked by the writer thread after every
        # batch and every `space_interval` when idle; `_low` is read by `must_deny`.
        self._reserve = reserve_bytes
        self._space_interval = space_interval
        self._next_space = 0.0
        self._low = False
        self._free: int | None = None
        self._listed = False  # this chain is in the directory's manifest

        # File state: owned by the writer thread once it runs.
        self._index = 0
        self._fd: int | None = None
        self._size = 0  # bytes of complete records in the current file
        self._dirty = False  # a partial write may follow `_size`: cut it before writing
        self._has_header = False
        self._footer_done = False
        self._file_records = 0  # records after the header in the current file
        self._unsynced = 0
        self._last_sync = time.monotonic()

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
        self._start(self.directory)

    def stats(self) -> AuditStats:
        return dataclasses.replace(super().stats(), file_index=self._index, low_space=self._low)

    # -- the sink: files ---------------------------------------------------------------------

    def _ready(self) -> bool:
        return self._fd is not None

    def _open_sink(self) -> None:
        """The chain listed in the directory's manifest before its first file exists; an
        open file with a header."""
        if not self._listed:
            _list_in_manifest(self.directory, self.chain_id, self._clock(), self._fsync != "never")
            self._listed = True
        self._ensure_file()

    def _emit(self, lines: list[bytes], mark: tuple[int, ...]) -> None:
        fd = self._fd
        assert fd is not None
        self._write_all(fd, mark[0], b"".join(lines))

    def _mark(self) -> tuple[int, ...]:
        return (self._size, self._file_records)

    def _rewind(self, mark: tuple[int, ...], done: list[bytes]) -> None:
        size, records = mark
        self._size = size + sum(map(len, done))
        self._file_records = records + len(done)

    def _advance(self, size: int, records: int) -> None:
        self._size += size
        self._file_records += records

    def _make_room(self, size: int) -> bool:
        if self._file_records > 0 and self._size + size > self._max_bytes:
            self._rotate()
            self._ensure_file()
            return True
        return False

    def _wrote(self, records: int) -> None:
        self._unsynced += records

    def _sink_housekeeping(self, force: bool) -> None:
        self._sync(force=force)
        self._check_space()

    def _sink_deadline(self) -> float | None:
        deadlines = []
        if self._unsynced and self._fsync == "interval":
            deadlines.append(self._last_sync + self._fsync_interval)
        if self._reserve:
            deadlines.append(self._next_space)  # free space, also when idle
        return min(deadlines) if deadlines else None

    def _sink_failing(self) -> bool:
        return self._low

    def _sink_health(self) -> dict[str, Any]:
        """The free space (read now: one statvfs) and the reserve."""
        try:
            free: int | None = _free_bytes(self.directory)
        except OSError:
            free = None
        return {"low_space": self._low, "free_bytes": free, "reserve_bytes": self._reserve}

    def _finish_sink(self) -> None:
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
        self._release()

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

    # -- free-space reserve (writer thread) --------------------------------------------------

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
