"""The shared tables in shared memory: one writer (the supervisor), many readers (the Check
workers), no IPC round trip on a Check. Two tables use the same layout: the revocation table
(:class:`SharedTable`) and the agents' run-time context (:class:`SharedAgentState`: elevation
grants, reported tasks, risk scores).

The table is a memory-mapped file. By default (`create(None)`) it has no name at all: a
memfd (or, where there is none, a file unlinked as soon as it is made), which the supervisor
hands to its workers as an open file descriptor (`subprocess.Popen(pass_fds=...)`,
`attach_fd`). Its memory is then freed when the last process that maps it exits, however it
exits: a SIGKILLed supervisor leaves nothing behind in /dev/shm. A table created at a path
(`mandate run --table`: put it on tmpfs, e.g. an emptyDir with `medium: Memory`) is the
caller's file; it outlives a SIGKILL, and the next `create` at that path reuses it.
Layout, little-endian:
    0  magic  b"MNDTREV1" (revocations) or b"MNDTCTX1" (context)
    8  u64    generation: a seqlock, odd while a write is in progress
    16 u32    payload length
    20 u32    flags: 1 = complete (first sync done), 2 = overflow (an entry was dropped)
    24 ...    payload: JSON (a list of revocations, or {"entries": [...], "refused": why}
              when the API server refused them; the context as an object)
A reader compares the generation with the one it parsed last (one 8-byte read per Check);
on change it copies the payload between two reads of the same even generation, so it never
sees a torn write, and the first Check after a write completes sees the new table. A table
that cannot be read consistently, or that overflowed, reads as incomplete: every Check is
then denied (fail closed). No decision logic here.

:class:`RunDir` is the other thing a supervisor shares with its workers: a directory (their
port files, profile versions, metrics) named in the temp directory, locked while any process
of that run lives; see there how it is removed even after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from sidecar.core.agentstate import UNKNOWN_AGENT_STATE, AgentStateTable
from sidecar.core.revocation import Revocation, RevocationTable
from sidecar.errors import ConfigError

__all__ = ["DEFAULT_SIZE", "RunDir", "SharedAgentState", "SharedTable"]

MAGIC = b"MNDTREV1"
CONTEXT_MAGIC = b"MNDTCTX1"
_GEN = struct.Struct("<Q")
_META = struct.Struct("<II")
_HEADER = 24
DEFAULT_SIZE = 4 * 1024 * 1024
COMPLETE, OVERFLOW = 1, 2
_INCOMPLETE = RevocationTable(generation=-1, complete=False)
_MAX_WAIT = 0.005  # seconds a reader waits for a write in progress before failing closed


def _anonymous_file(kind: str) -> int:
    """A new file with no name: a memfd, else (no memfd_create, or a seccomp profile that
    forbids it) a file in /dev/shm or the temp directory that is unlinked at once
    (O_TMPFILE where the file system has it). Freed with its last descriptor or mapping."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            fd: int = memfd_create(f"mandate-{kind}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            return fd
        except OSError:
            pass
    shm = Path("/dev/shm")
    directory = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryFile(prefix=f"mandate-{kind}-", dir=directory) as f:
        return os.dup(f.fileno())


def _seal_size(fd: int) -> None:
    """Fix a memfd's size for good: nobody holding the descriptor can shrink it under a
    reader's mapping (SIGBUS). A file that is not a memfd takes no seals; nothing to do."""
    add_seals = getattr(fcntl, "F_ADD_SEALS", None)
    if add_seals is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, add_seals, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)


class _Segment:
    """A seqlock-protected JSON payload in a memory-mapped file. Open with `create` (the
    writer), `attach` (a reader, by path) or `attach_fd` (a reader, by inherited descriptor)."""

    MAGIC = b""
    WHAT = ""
    KIND = ""  # the memfd's name: mandate-KIND (shown in /proc/PID/fd)

    def __init__(
        self, path: Path | None, mm: mmap.mmap, writer: bool, fd: int | None = None
    ) -> None:
        self.path = path  # None: a table with no name
        self.fd = fd  # the writer's open file, for the readers it starts (pass_fds)
        # Closed by close(), or when the table is collected (like the mapping itself).
        self._close_fd = None if fd is None else weakref.finalize(self, os.close, fd)
        self._mm = mm
        self._writer = writer
        self._generation = 0

    @classmethod
    def create(cls, path: str | os.PathLike[str] | None = None, size: int = DEFAULT_SIZE) -> Self:
        """The writer: a new table at ``path`` (an existing file there is truncated) or, with
        None, one that has no name. Its descriptor stays open in ``fd`` until close()."""
        p = None if path is None else Path(path)
        if size < _HEADER + 2:
            raise ConfigError(f"{cls.WHAT} size {size}: too small")
        if p is None:
            fd = _anonymous_file(cls.KIND)
        else:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            if p is None:
                _seal_size(fd)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        # Start from a time-based even generation: a reader still attached to an earlier table
        # at this path can never mistake the new one for what it cached.
        start = (time.time_ns() // 1000) & ~1 & (2**63 - 1)
        mm[0:8] = cls.MAGIC
        _GEN.pack_into(mm, 8, start)
        empty = cls._empty_payload()
        _META.pack_into(mm, 16, len(empty), 0)
        mm[_HEADER : _HEADER + len(empty)] = empty
        table = cls(p, mm, writer=True, fd=fd)
        table._generation = start
        return table

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> Self:
        """A reader of the table at ``path``."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{cls.WHAT} {p}: {exc.strerror or exc}") from None
        try:
            return cls(p, cls._map(fd, str(p)), writer=False)
        finally:
            os.close(fd)

    @classmethod
    def attach_fd(cls, fd: int) -> Self:
        """A reader of the table open as descriptor ``fd`` (inherited from the supervisor).
        Takes the descriptor over and closes it: the read-only mapping keeps the table."""
        try:
            return cls(None, cls._map(fd, f"(descriptor {fd})"), writer=False)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    @classmethod
    def _map(cls, fd: int, where: str) -> mmap.mmap:
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER:
                raise ConfigError(f"{cls.WHAT} {where}: too small ({size} bytes)")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:  # e.g. a directory, or no such descriptor
            raise ConfigError(f"{cls.WHAT} {where}: {exc.strerror or exc}") from None
        if mm[0:8] != cls.MAGIC:
            mm.close()
            raise ConfigError(f"{cls.WHAT} {where}: not a mandate {cls.WHAT}")
        return mm

    @property
    def name(self) -> str:
        """Where the table can be found: its path; with no name, the writer's descriptor
        under /proc (openable by the same user while the writer lives)."""
        if self.path is not None:
            return str(self.path)
        if self.fd is not None:
            return f"/proc/{os.getpid()}/fd/{self.fd}"
        return f"(a {self.WHAT} with no name)"

    @staticmethod
    def _empty_payload() -> bytes:
        return b"[]"

    def _write(self, payload: bytes, flags: int) -> tuple[int, bool]:
        """Publish ``payload``; (generation, False) when it did not fit: the empty payload
        is published with the overflow flag instead."""
        assert self._writer, "attached read-only"
        fits = _HEADER + len(payload) <= len(self._mm)
        if not fits:
            payload, flags = self._empty_payload(), OVERFLOW
        mm = self._mm
        gen = self._generation + 1
        _GEN.pack_into(mm, 8, gen)  # odd: write in progress
        mm[_HEADER : _HEADER + len(payload)] = payload
        _META.pack_into(mm, 16, len(payload), flags)
        gen += 1
        _GEN.pack_into(mm, 8, gen)  # even: done
        self._generation = gen
        return gen, fits

    def _changed(self, cached_generation: int) -> bool:
        return bool(_GEN.unpack_from(self._mm, 8)[0] != cached_generation)

    def _read(self) -> tuple[int, bytes, int] | None:
        """(generation, payload, flags) of a consistent snapshot, or None (stuck writer)."""
        mm = self._mm
        deadline = 0.0
        while True:
            g1 = _GEN.unpack_from(mm, 8)[0]
            length, flags = _META.unpack_from(mm, 16)
            payload = mm[_HEADER : _HEADER + length] if _HEADER + length <= len(mm) else None
            if not g1 & 1 and payload is not None and _GEN.unpack_from(mm, 8)[0] == g1:
                return g1, payload, flags
            # A write takes microseconds; one that lasts longer means a stuck writer.
            now = time.monotonic()
            if not deadline:
                deadline = now + _MAX_WAIT
            elif now > deadline:
                return None
            # Yield the interpreter lock: with the Checks in the writer's own process (one
            # process, issue 20) a writer preempted mid-write cannot finish while this loop
            # holds it, and the reader would fail closed after a whole switch interval.
            time.sleep(0)

    def close(self) -> None:
        self._mm.close()
        if self._close_fd is not None:
            self._close_fd()
        self.fd = None


class SharedTable(_Segment):
    """The revocation table."""

    MAGIC = MAGIC
    WHAT = "revocation table"
    KIND = "revocations"

    def __init__(
        self, path: Path | None, mm: mmap.mmap, writer: bool, fd: int | None = None
    ) -> None:
        super().__init__(path, mm, writer, fd)
        self._cached = _INCOMPLETE

    def write(self, entries: Iterable[Revocation], complete: bool, refused: str = "") -> int:
        """Publish a whole new table; return its generation. An oversized table is not
        truncated: it is published empty with the overflow flag, so readers deny all.
        ``refused``: why the writer could not get the revocations (readers deny all, saying
        it)."""
        doc: object = [e.as_dict() for e in entries]
        if refused:
            doc, complete = {"entries": doc, "refused": refused}, False
        payload = json.dumps(doc, separators=(",", ":")).encode()
        return self._write(payload, COMPLETE if complete else 0)[0]

    def read(self) -> RevocationTable:
        """The current table; one 8-byte read when nothing changed since the last call."""
        if not self._changed(self._cached.generation):
            return self._cached
        got = self._read()
        if got is None:
            return _INCOMPLETE  # fail closed
        generation, payload, flags = got
        try:
            doc = json.loads(payload)
            refused = ""
            if isinstance(doc, dict):
                refused, doc = str(doc["refused"]) or "refused", doc["entries"]
            entries = [Revocation.from_dict(d) for d in doc]
        except (ValueError, KeyError, TypeError):
            return _INCOMPLETE
        complete = bool(flags & COMPLETE) and not flags & OVERFLOW
        self._cached = RevocationTable.build(generation, entries, complete, refused)
        return self._cached


class SharedAgentState(_Segment):
    """The agents' run-time context: elevation grants, reported tasks, risk scores.

    A context that cannot be read (stuck writer, corrupt payload) or overflowed reads as
    :data:`~sidecar.core.agentstate.UNKNOWN_AGENT_STATE`: no grant, no task binding (no extra
    rights), and every agent's risk at the maximum, so risk-based denial fails closed too.
    The writer (the context store) avoids that state: it checks with `try_write` that a
    table fits, and when it does not, withholds the grants and tasks of the agents that
    fill it (see `AgentStateStore`) rather than let one agent empty the table for all."""

    MAGIC = CONTEXT_MAGIC
    WHAT = "context table"
    KIND = "context"

    def __init__(
        self, path: Path | None, mm: mmap.mmap, writer: bool, fd: int | None = None
    ) -> None:
        super().__init__(path, mm, writer, fd)
        self._cached = AgentStateTable(generation=-1)
        self.overflowed = False

    @staticmethod
    def _empty_payload() -> bytes:
        return b"{}"

    @property
    def capacity(self) -> int:
        """The largest payload (bytes of JSON) the table holds."""
        return len(self._mm) - _HEADER

    @staticmethod
    def encode(table: AgentStateTable) -> bytes:
        return json.dumps(table.as_dict(), separators=(",", ":")).encode()

    def write(self, table: AgentStateTable) -> int:
        """Publish ``table``; one that does not fit is published as overflowed (readers
        then see UNKNOWN_AGENT_STATE). Prefer `try_write`."""
        generation, fits = self._write(self.encode(table), COMPLETE)
        self.overflowed = not fits
        return generation

    def try_write(self, table: AgentStateTable) -> int | None:
        """Publish ``table`` if it fits and return its generation; else write nothing (the
        readers keep the previous generation) and return None."""
        payload = self.encode(table)
        if _HEADER + len(payload) > len(self._mm):
            return None
        generation, _ = self._write(payload, COMPLETE)
        self.overflowed = False
        return generation

    def read(self) -> AgentStateTable:
        if not self._changed(self._cached.generation):
            return self._cached
        got = self._read()
        if got is None:
            return UNKNOWN_AGENT_STATE
        generation, payload, flags = got
        if flags & OVERFLOW:
            return UNKNOWN_AGENT_STATE  # fail closed, including the risk deny
        try:
            table = AgentStateTable.from_dict(generation, json.loads(payload))
        except (ValueError, KeyError, TypeError):
            return UNKNOWN_AGENT_STATE
        self._cached = table
        return table


class RunDir:
    """The directory one `mandate run` shares with its workers by name (their port files and
    profile versions, and the metrics of all of them): TMPDIR/mandate-run-XXXXXXXX.

    Its ``run.lock`` is locked (flock) by the supervisor, and through an inherited
    descriptor by every worker, so it stays locked while any process of the run lives and
    is free once all are gone, however they ended. Whoever then finds it free removes the
    directory: the supervisor on a clean stop, the last worker to exit after its supervisor
    died (`release`), or, when every process was SIGKILLed at once (a container's OOM kill),
    the next `mandate run` with the same temp directory (`create` sweeps first). A restarted
    container therefore never piles up directories in its /tmp volume."""

    PREFIX = "mandate-run-"
    LOCK = "run.lock"
    # A directory still without its lock this long after it was made: its maker died.
    _UNFINISHED_AGE = 60.0

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self.lock_fd = lock_fd  # hand it to the workers (pass_fds) and they hold the lock too

    @classmethod
    def create(cls, parent: str | os.PathLike[str] | None = None) -> RunDir:
        """Remove the dead runs' directories in ``parent`` (default: the temp directory),
        then make and lock a new one."""
        base = Path(parent) if parent is not None else Path(tempfile.gettempdir())
        cls.sweep(base)
        path = Path(tempfile.mkdtemp(prefix=cls.PREFIX, dir=base))
        new = path / f"{cls.LOCK}.new"
        fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The lock appears under its name already held: a sweep never mistakes a run
            # that is starting for a dead one.
            os.rename(new, path / cls.LOCK)
        except BaseException:
            os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, fd)

    def remove(self) -> None:
        """The supervisor's clean stop: remove the directory, then let go of the lock."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    @classmethod
    def release(cls, path: str | os.PathLike[str], lock_fd: int) -> bool:
        """A worker's exit: close its inherited lock descriptor; if no other process of the
        run holds the lock any more (the supervisor is gone, and so are the other workers),
        remove the directory. True if it was removed."""
        with contextlib.suppress(OSError):
            os.close(lock_fd)
        return cls._remove_if_free(Path(path))

    @classmethod
    def sweep(cls, parent: str | os.PathLike[str]) -> list[Path]:
        """Remove the run directories in ``parent`` that no live process holds; only this
        user's, and only directories with mandate's lock file in them."""
        removed: list[Path] = []
        try:
            entries = list(os.scandir(parent))
        except OSError:
            return removed
        for entry in entries:
            if not entry.name.startswith(cls.PREFIX):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if not entry.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
                    continue
            except OSError:
                continue
            path = Path(entry.path)
            if cls._remove_if_free(path) or cls._remove_if_unfinished(path, st.st_mtime):
                removed.append(path)
        return removed

    @classmethod
    def _remove_if_free(cls, path: Path) -> bool:
        try:
            fd = os.open(path / cls.LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False  # no lock (yet): not ours to judge here
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a process of that run still lives
            shutil.rmtree(path, ignore_errors=True)
            return True
        finally:
            os.close(fd)

    @classmethod
    def _remove_if_unfinished(cls, path: Path, mtime: float) -> bool:
        """A directory that holds nothing but a lock file not yet in place, for a minute: its
        supervisor died while making it (between mkdtemp and the rename)."""
        try:
            names = set(os.listdir(path))
        except OSError:
            return False
        if not names <= {f"{cls.LOCK}.new"} or time.time() - mtime < cls._UNFINISHED_AGE:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
