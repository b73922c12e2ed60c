"""A secret value read from a file: a Kubernetes Secret (or a projected service-account token,
or a SPIFFE JWT-SVID) mounted only into mandate's container.

:class:`SecretFile` serves the file's content and re-reads it when the file changed. The
kubelet updates a mounted Secret by writing a new timestamped directory and swapping the
``..data`` symlink to it, so the path resolves to a new file (a new inode): `value()` notices
by a `stat` of the path (following the symlinks) compared with the device, inode, size and
modification time of what it last read. It stats at most once every ``recheck_every`` seconds,
so the hot path costs a clock read and a comparison (~1 µs).

A removed, unreadable or empty file means the credential is unavailable
(:class:`~sidecar.errors.CredentialUnavailable`): the last good value is *not* kept, because
a Secret that was removed was revoked. The error names the file, never its content.

This module does not log, does no network I/O, and never puts a secret value in an exception
message, a log record or a ``repr``.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import CredentialUnavailable

__all__ = ["MAX_SECRET_BYTES", "SecretFile"]

# A Kubernetes Secret holds at most 1 MiB in all; a larger file is not a Secret we mount.
MAX_SECRET_BYTES = 1 << 20

_FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the last look at the file found: read at `checked_at` (the clock's time), the
    file's identity `key`, and either its `value` or the `error` it gave."""

    checked_at: float
    key: _FileKey | None
    value: str | None
    error: str | None


def _key(st: os.stat_result) -> _FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _reason(exc: OSError) -> str:
    # strerror only: never str(exc), which repeats the path and could in principle carry more
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return exc.strerror or type(exc).__name__


class SecretFile:
    """The content of the file at `path`, one trailing newline stripped.

    `value()` re-reads the file when it changed (checked at most every `recheck_every`
    seconds of `clock`, 0 = on every call) and raises
    :class:`~sidecar.errors.CredentialUnavailable` naming the file when it is missing,
    unreadable, not UTF-8, larger than 1 MiB or empty; a failure is remembered for
    `recheck_every` seconds too. Thread-safe: the state is one immutable record replaced
    whole; concurrent re-reads at worst read the file twice.
    """

    __slots__ = ("_clock", "_lock", "_recheck_every", "_seen", "path")

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        recheck_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if recheck_every < 0:
            raise ValueError(f"recheck_every must be >= 0, got {recheck_every}")
        self.path = Path(path)
        self._recheck_every = recheck_every
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: _Seen | None = None

    def __repr__(self) -> str:
        return f"SecretFile({str(self.path)!r})"

    def value(self, *, fresh: bool = False) -> str:
        """The file's content. ``fresh=True`` looks at the file now whatever the recheck
        interval (a token fetch does, so that a rotated client secret is used at once)."""
        seen = self._seen
        if fresh or seen is None or self._clock() - seen.checked_at >= self._recheck_every:
            seen = self._look()
        if seen.value is None:
            raise CredentialUnavailable(f"secret file {self.path}: {seen.error}")
        return seen.value

    def _look(self) -> _Seen:
        with self._lock:  # one re-read at a time; the hot path does not take this lock
            previous = self._seen
            now = self._clock()
            try:
                st = os.stat(self.path)  # follows ..data -> ..2026_..._/name
            except OSError as exc:
                seen = _Seen(now, None, None, _reason(exc))
            else:
                if previous is not None and previous.value is not None and previous.key == _key(st):
                    seen = _Seen(now, previous.key, previous.value, None)
                else:
                    seen = self._read(now)
            self._seen = seen
            return seen

    def _read(self, now: float) -> _Seen:
        try:
            with open(self.path, "rb") as f:
                # the identity of what was read, not of what was stat'ed a moment before: the
                # kubelet may swap the symlink in between
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return _Seen(now, None, None, "not a regular file")
                data = f.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            return _Seen(now, None, None, f"unreadable: {_reason(exc)}")
        if len(data) > MAX_SECRET_BYTES:
            return _Seen(now, None, None, f"larger than {MAX_SECRET_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # its message quotes a byte of the content
            return _Seen(now, None, None, "not UTF-8 text")
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if not text:
            return _Seen(now, None, None, "empty")
        return _Seen(now, _key(st), text, None)
