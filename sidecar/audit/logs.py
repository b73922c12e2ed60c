"""Reading an audit stream back from logs: the lines mandate wrote to stdout, out of what the
log pipeline kept (`logverify` and `query` read them).

Sources: a file (plain, or gzip as the kubelet compresses rotated logs), ``-`` (standard
input), or a directory of one container's CRI log files (the kubelet's
``/var/log/pods/<namespace>_<pod>_<uid>/<container>/``: ``0.log``,
``0.log.20261205-060000.gz``, ``1.log`` after a restart ...), read in order: by restart
count, rotated files before the live one.

Framings, recognised line by line:
- CRI (containerd, CRI-O): ``<RFC 3339 time> <stdout|stderr> <P|F> <text>``. A line longer
  than the runtime's limit (16 KiB) comes in ``P`` parts closed by an ``F`` part: joined
  again, per stream, across the rotated files of one container (a part still open when the
  container changes, or at the end, is a torn line);
- Docker's json-file: ``{"log":"<text>\\n","stream":"stdout","time":...}`` (a part without
  its newline goes on in the next);
- `kubectl logs --timestamps` (``<RFC 3339 time> <text>``) and ``--prefix``
  (``[pod/<pod>/<container>] <text>``), either or both;
- raw: `kubectl logs`, a captured stdout, or stdout and stderr merged.
Where the framing names the stream, only stdout's lines can be records. Elsewhere
(`kubectl logs` merges stdout and stderr) that rests on mandate never logging a line that
starts with the marker (`stream.guard_log_lines`).

A line is a candidate record when its text starts with `record.MARKER_PREFIX`; `logverify`
then requires it to be a record whole. Errors are :class:`~sidecar.errors.AuditInputError`
naming the source.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sidecar.audit.files import _describe
from sidecar.audit.record import MARKER_PREFIX
from sidecar.errors import AuditInputError

__all__ = ["LogLine", "log_lines", "log_sources"]

_CRI = re.compile(rb"^(\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d)) (stdout|stderr) (\S+)(?: |$)")
_TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d) ")
_PREFIX = re.compile(rb"^\[pod/[^\]\s]+\] ")
_DOCKER = b'{"log":'
_GZIP = b"\x1f\x8b"
_CRI_FILE = re.compile(r"^(?P<n>\d+)\.log(?:\.(?P<ts>\d{8}-\d{6}))?(?:\.gz)?$")


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a container wrote, its framing taken off. ``line``: where it starts in
    ``source`` (1-based); ``stream``: "stdout" or "stderr" when the framing says, else
    None; ``complete``: False for a line that never ended (parts left open, or the last
    line of a source without its newline)."""

    source: str
    line: int
    text: bytes
    stream: str | None = None
    complete: bool = True

    @property
    def candidate(self) -> bool:
        """May be a record: starts with the marker, not on stderr."""
        return self.stream != "stderr" and self.text.startswith(MARKER_PREFIX)


def log_sources(given: Sequence[str]) -> list[tuple[str, str | None]]:
    """The files to read, in order, with the container each belongs to (a CRI file's
    restart count, so that parts are not joined across containers; None: unknown).
    A directory becomes its CRI log files; ``-`` is standard input."""
    out: list[tuple[str, str | None]] = []
    for source in given:
        if source == "-":
            out.append(("-", None))
            continue
        path = Path(source)
        if path.is_dir():
            found = []
            try:
                names = os.listdir(path)
            except OSError as exc:
                raise AuditInputError(f"{path}: {_describe(exc)}") from None
            for name in names:
                m = _CRI_FILE.match(name)
                if m is not None and (path / name).is_file():
                    found.append((int(m["n"]), m["ts"] is None, m["ts"] or "", name))
            if not found:
                raise AuditInputError(
                    f"{path}: no container log files (N.log, N.log.YYYYMMDD-HHMMSS[.gz])"
                )
            out.extend((str(path / name), f"{path}#{n}") for n, _, _, name in sorted(found))
            continue
        if not path.exists():
            raise AuditInputError(f"{path}: no such file")
        m = _CRI_FILE.match(path.name)
        out.append((source, None if m is None else f"{path.parent}#{m['n']}"))
    if not out:
        raise AuditInputError("no log given")
    return out


@contextlib.contextmanager
def _opened(source: str) -> Iterator[IO[bytes]]:
    """``source`` for reading, gunzipped if it is gzip (standard input is not closed)."""
    if source == "-":
        stdin = sys.stdin.buffer
        f = stdin if isinstance(stdin, io.BufferedReader) else io.BufferedReader(stdin)  # type: ignore[type-var]
        if f.peek(2)[:2] == _GZIP:
            yield gzip.GzipFile(fileobj=f)  # type: ignore[misc]
        else:
            yield f
        return
    try:
        opened = open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise AuditInputError(f"{source}: {_describe(exc)}") from None
    with opened:
        if opened.peek(2)[:2] == _GZIP:
            with gzip.GzipFile(fileobj=opened) as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield opened


class _Joiner:
    """Parts of long lines (CRI ``P``, Docker's unended ``log``), per stream, until their
    last part."""

    def __init__(self) -> None:
        self.open: dict[str, tuple[str, int, list[bytes]]] = {}

    def part(self, source: str, line: int, stream: str, text: bytes, last: bool) -> LogLine | None:
        started = self.open.pop(stream, None)
        if started is None:
            if last:
                return LogLine(source, line, text, stream)
            self.open[stream] = (source, line, [text])
            return None
        started[2].append(text)
        if last:
            return LogLine(started[0], started[1], b"".join(started[2]), stream)
        self.open[stream] = started
        return None

    def flush(self) -> Iterator[LogLine]:
        """The lines still open (their container changed, or the log ended): torn."""
        for stream, (source, line, parts) in sorted(self.open.items()):
            yield LogLine(source, line, b"".join(parts), stream, complete=False)
        self.open.clear()


def log_lines(given: Sequence[str]) -> Iterator[LogLine]:
    """Every line of the sources (`log_sources`), in order, framings taken off and long
    lines joined. AuditInputError for a source that cannot be read."""
    joiner = _Joiner()
    container: str | None = None
    for source, belongs in log_sources(given):
        if belongs != container or belongs is None:
            yield from joiner.flush()
            container = belongs
        with _opened(source) as f:
            try:
                for lineno, raw in enumerate(f, 1):
                    ended = raw.endswith(b"\n")
                    line = _frame(source, lineno, raw[:-1] if ended else raw, ended, joiner)
                    if line is not None:
                        yield line
            except (OSError, EOFError) as exc:  # a damaged gzip file, a read error
                raise AuditInputError(f"{source}: {_describe(exc)}") from None
    yield from joiner.flush()


def _frame(source: str, lineno: int, raw: bytes, ended: bool, joiner: _Joiner) -> LogLine | None:
    """The line ``raw`` with its framing taken off (None: a part of a longer line)."""
    m = _CRI.match(raw)
    if m is not None:
        stream = m[2].decode()
        last = "P" not in m[3].decode("ascii", "replace").split(":")
        return joiner.part(source, lineno, stream, raw[m.end() :], last)
    if raw.startswith(_DOCKER):
        try:
            entry = json.loads(raw)
            text, stream = entry["log"], entry["stream"]
        except (ValueError, KeyError, TypeError):
            text = stream = None
        if isinstance(text, str) and isinstance(stream, str):
            last = text.endswith("\n")
            body = (text[:-1] if last else text).encode("utf-8", "surrogatepass")
            return joiner.part(source, lineno, stream, body, last)
    text = raw
    prefix = _PREFIX.match(text)
    if prefix is not None:
        text = text[prefix.end() :]
    stamp = _TIMESTAMP.match(text)
    if stamp is not None:
        text = text[stamp.end() :]
    return LogLine(source, lineno, text, None, complete=ended)
