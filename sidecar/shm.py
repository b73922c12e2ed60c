"""The revocation table in shared memory: one writer (the supervisor), many readers (the
Check workers), no IPC round trip on a Check.

The table is a memory-mapped file (put it on tmpfs: /dev/shm, or an emptyDir with
`medium: Memory`). Layout, little-endian:
    0  magic  b"MNDTREV1"
    8  u64    generation: a seqlock, odd while a write is in progress
    16 u32    payload length
    20 u32    flags: 1 = complete (first sync done), 2 = overflow (an entry was dropped)
    24 ...    payload: JSON list of revocations
A reader compares the generation with the one it parsed last (one 8-byte read per Check);
on change it copies the payload between two reads of the same even generation, so it never
sees a torn write, and the first Check after a write completes sees the new table. A table
that cannot be read consistently, or that overflowed, reads as incomplete: every Check is
then denied (fail closed). No decision logic here.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from .core.revocation import Revocation, RevocationTable
from .errors import ConfigError

__all__ = ["DEFAULT_SIZE", "SharedTable"]

MAGIC = b"MNDTREV1"
_GEN = struct.Struct("<Q")
_META = struct.Struct("<II")
_HEADER = 24
DEFAULT_SIZE = 4 * 1024 * 1024
COMPLETE, OVERFLOW = 1, 2
_INCOMPLETE = RevocationTable(generation=-1, complete=False)
_MAX_WAIT = 0.005  # seconds a reader waits for a write in progress before failing closed


class SharedTable:
    """Open with `create` (the writer) or `attach` (a reader)."""

    def __init__(self, path: Path, mm: mmap.mmap, writer: bool) -> None:
        self.path = path
        self._mm = mm
        self._writer = writer
        self._cached = _INCOMPLETE
        self._generation = 0

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int = DEFAULT_SIZE) -> SharedTable:
        p = Path(path)
        if size < _HEADER + 2:
            raise ConfigError(f"revocation table size {size}: too small")
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        # Start from a time-based even generation: a reader still attached to an earlier table
        # at this path can never mistake the new one for what it cached.
        start = (time.time_ns() // 1000) & ~1 & (2**63 - 1)
        mm[0:8] = MAGIC
        _GEN.pack_into(mm, 8, start)
        _META.pack_into(mm, 16, 2, 0)
        mm[_HEADER : _HEADER + 2] = b"[]"
        table = cls(p, mm, writer=True)
        table._generation = start
        return table

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> SharedTable:
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"revocation table {p}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER:
                raise ConfigError(f"revocation table {p}: too small ({size} bytes)")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:  # e.g. a directory
            raise ConfigError(f"revocation table {p}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if mm[0:8] != MAGIC:
            mm.close()
            raise ConfigError(f"revocation table {p}: not a mandate revocation table")
        return cls(p, mm, writer=False)

    # -- writer ---------------------------------------------------------------------------

    def write(self, entries: Iterable[Revocation], complete: bool) -> int:
        """Publish a whole new table; return its generation. An oversized table is not
        truncated: it is published empty with the overflow flag, so readers deny all."""
        assert self._writer, "attached read-only"
        payload = json.dumps([e.as_dict() for e in entries], separators=(",", ":")).encode()
        flags = COMPLETE if complete else 0
        if _HEADER + len(payload) > len(self._mm):
            payload, flags = b"[]", OVERFLOW
        mm = self._mm
        gen = self._generation + 1
        _GEN.pack_into(mm, 8, gen)  # odd: write in progress
        mm[_HEADER : _HEADER + len(payload)] = payload
        _META.pack_into(mm, 16, len(payload), flags)
        gen += 1
        _GEN.pack_into(mm, 8, gen)  # even: done
        self._generation = gen
        return gen

    # -- reader ---------------------------------------------------------------------------

    def read(self) -> RevocationTable:
        """The current table; one 8-byte read when nothing changed since the last call."""
        mm = self._mm
        if _GEN.unpack_from(mm, 8)[0] == self._cached.generation:
            return self._cached
        deadline = 0.0
        while True:
            g1 = _GEN.unpack_from(mm, 8)[0]
            length, flags = _META.unpack_from(mm, 16)
            payload = mm[_HEADER : _HEADER + length] if _HEADER + length <= len(mm) else None
            if not g1 & 1 and payload is not None and _GEN.unpack_from(mm, 8)[0] == g1:
                break
            # A write takes microseconds; one that lasts longer means a stuck writer.
            now = time.monotonic()
            if not deadline:
                deadline = now + _MAX_WAIT
            elif now > deadline:
                return _INCOMPLETE  # fail closed
        try:
            entries = [Revocation.from_dict(d) for d in json.loads(payload)]
        except (ValueError, KeyError, TypeError):
            return _INCOMPLETE
        complete = bool(flags & COMPLETE) and not flags & OVERFLOW
        self._cached = RevocationTable.build(g1, entries, complete)
        return self._cached

    def close(self) -> None:
        self._mm.close()
