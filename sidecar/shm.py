"""The shared tables in shared memory: one writer (the supervisor), many readers (the Check
workers), no IPC round trip on a Check. Two tables use the same layout: the revocation table
(:class:`SharedTable`) and the agents' run-time context (:class:`SharedContext`: elevation
grants, reported tasks, risk scores).

The table is a memory-mapped file (put it on tmpfs: /dev/shm, or an emptyDir with
`medium: Memory`). Layout, little-endian:
    0  magic  b"MNDTREV1" (revocations) or b"MNDTCTX1" (context)
    8  u64    generation: a seqlock, odd while a write is in progress
    16 u32    payload length
    20 u32    flags: 1 = complete (first sync done), 2 = overflow (an entry was dropped)
    24 ...    payload: JSON (a list of revocations; the context as an object)
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
from typing import Self

from .core.context import EMPTY_CONTEXT, ContextTable
from .core.revocation import Revocation, RevocationTable
from .errors import ConfigError

__all__ = ["DEFAULT_SIZE", "SharedContext", "SharedTable"]

MAGIC = b"MNDTREV1"
CONTEXT_MAGIC = b"MNDTCTX1"
_GEN = struct.Struct("<Q")
_META = struct.Struct("<II")
_HEADER = 24
DEFAULT_SIZE = 4 * 1024 * 1024
COMPLETE, OVERFLOW = 1, 2
_INCOMPLETE = RevocationTable(generation=-1, complete=False)
_MAX_WAIT = 0.005  # seconds a reader waits for a write in progress before failing closed


class _Segment:
    """A seqlock-protected JSON payload in a memory-mapped file. Open with `create` (the
    writer) or `attach` (a reader)."""

    MAGIC = b""
    WHAT = ""

    def __init__(self, path: Path, mm: mmap.mmap, writer: bool) -> None:
        self.path = path
        self._mm = mm
        self._writer = writer
        self._generation = 0

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int = DEFAULT_SIZE) -> Self:
        p = Path(path)
        if size < _HEADER + 2:
            raise ConfigError(f"{cls.WHAT} size {size}: too small")
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        # Start from a time-based even generation: a reader still attached to an earlier table
        # at this path can never mistake the new one for what it cached.
        start = (time.time_ns() // 1000) & ~1 & (2**63 - 1)
        mm[0:8] = cls.MAGIC
        _GEN.pack_into(mm, 8, start)
        empty = cls._empty_payload()
        _META.pack_into(mm, 16, len(empty), 0)
        mm[_HEADER : _HEADER + len(empty)] = empty
        table = cls(p, mm, writer=True)
        table._generation = start
        return table

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> Self:
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            raise ConfigError(f"{cls.WHAT} {p}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER:
                raise ConfigError(f"{cls.WHAT} {p}: too small ({size} bytes)")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:  # e.g. a directory
            raise ConfigError(f"{cls.WHAT} {p}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if mm[0:8] != cls.MAGIC:
            mm.close()
            raise ConfigError(f"{cls.WHAT} {p}: not a mandate {cls.WHAT}")
        return cls(p, mm, writer=False)

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

    def close(self) -> None:
        self._mm.close()


class SharedTable(_Segment):
    """The revocation table."""

    MAGIC = MAGIC
    WHAT = "revocation table"

    def __init__(self, path: Path, mm: mmap.mmap, writer: bool) -> None:
        super().__init__(path, mm, writer)
        self._cached = _INCOMPLETE

    def write(self, entries: Iterable[Revocation], complete: bool) -> int:
        """Publish a whole new table; return its generation. An oversized table is not
        truncated: it is published empty with the overflow flag, so readers deny all."""
        payload = json.dumps([e.as_dict() for e in entries], separators=(",", ":")).encode()
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
            entries = [Revocation.from_dict(d) for d in json.loads(payload)]
        except (ValueError, KeyError, TypeError):
            return _INCOMPLETE
        complete = bool(flags & COMPLETE) and not flags & OVERFLOW
        self._cached = RevocationTable.build(generation, entries, complete)
        return self._cached


class SharedContext(_Segment):
    """The agents' run-time context: elevation grants, reported tasks, risk scores.

    Unlike revocations, nothing here is needed to deny: a context that cannot be read
    (stuck writer, corrupt payload) or overflowed reads as empty — no grant, no task
    binding — and the risk scores are then unknown (no risk deny). What fails closed for
    rights (grants) fails open only for the behaviour deny, which revocation backs up."""

    MAGIC = CONTEXT_MAGIC
    WHAT = "context table"

    def __init__(self, path: Path, mm: mmap.mmap, writer: bool) -> None:
        super().__init__(path, mm, writer)
        self._cached = ContextTable(generation=-1)
        self.overflowed = False

    @staticmethod
    def _empty_payload() -> bytes:
        return b"{}"

    def write(self, table: ContextTable) -> int:
        payload = json.dumps(table.as_dict(), separators=(",", ":")).encode()
        generation, fits = self._write(payload, COMPLETE)
        self.overflowed = not fits
        return generation

    def read(self) -> ContextTable:
        if not self._changed(self._cached.generation):
            return self._cached
        got = self._read()
        if got is None:
            return EMPTY_CONTEXT
        generation, payload, _ = got
        try:
            table = ContextTable.from_dict(generation, json.loads(payload))
        except (ValueError, KeyError, TypeError):
            return EMPTY_CONTEXT
        self._cached = table
        return table
