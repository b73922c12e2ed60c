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
the reader could take for a record (`stream.guard_log_lines`, which asks `may_frame_a_record`).

Containers. Only mandate's container writes records; another container of the pod (the
agent's) can print lines that look like them. Where the source names the container, each
line says which (`LogLine.container`): ``--prefix``'s ``[pod/<pod>/<container>]``, a CRI
directory or file of the kubelet (``/var/log/pods/<ns>_<pod>_<uid>/<container>/N.log``:
the path's, which wins over anything in the text), or ``/var/log/containers/
<pod>_<ns>_<container>-<id>.log``. Elsewhere (`kubectl logs POD -c mandate`, a captured
stdout, Docker's files) it is None: the source is trusted to be mandate's container.

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

__all__ = ["LogLine", "container_of", "log_lines", "log_sources", "may_frame_a_record"]

_CRI = re.compile(rb"^(\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d)) (stdout|stderr) (\S+)(?: |$)")
_TIMESTAMP = re.compile(rb"^\d{4}-\d\d-\d\dT[0-9:.]+(?:Z|[+-]\d\d:\d\d) ")
# kubectl's --prefix: [pod/<pod>/<container>] (the container: group 1; None if another form)
_PREFIX = re.compile(rb"^\[pod/(?:[^\]\s/]+/([^\]\s/]+)|[^\]\s]+)\] ")
# The kubelet's directories and links: /var/log/pods/<namespace>_<pod>_<uid>/<container>/
# and /var/log/containers/<pod>_<namespace>_<container>-<64 hex>.log (DNS names: no "_").
_POD_DIR = re.compile(r"^[a-z0-9][-a-z0-9]*_[a-z0-9][-.a-z0-9]*_[A-Za-z0-9-]+$")
_CONTAINER_LINK = re.compile(
    r"^[a-z0-9][-.a-z0-9]*_[a-z0-9][-a-z0-9]*_(?P<container>[a-z0-9][-a-z0-9]*)-[0-9a-f]{64}\.log$"
)
_DOCKER = b'{"log":'
_GZIP = b"\x1f\x8b"
_CRI_FILE = re.compile(r"^(?P<n>\d+)\.log(?:\.(?P<ts>\d{8}-\d{6}))?(?:\.gz)?$")


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line a container wrote, its framing taken off. ``line``: where it starts in
    ``source`` (1-based); ``stream``: "stdout" or "stderr" when the framing says, else
    None; ``complete``: False for a line that never ended (parts left open, or the last
    line of a source without its newline); ``container``: the container that wrote it
    when the source names it, else None."""

    source: str
    line: int
    text: bytes
    stream: str | None = None
    complete: bool = True
    container: str | None = None  # the container the framing names (module docstring)

    @property
    def candidate(self) -> bool:
        """May be a record: starts with the marker, not on stderr."""
        return self.stream != "stderr" and self.text.startswith(MARKER_PREFIX)


def log_sources(given: Sequence[str]) -> list[tuple[str, str | None, str | None]]:
    """The files to read, in order, each with the container instance it belongs to (a CRI
    file's restart count, so that parts are not joined across containers; None: unknown)
    and the container's name where the path names it (`container_of`; None: unnamed).
    A directory becomes its CRI log files; ``-`` is standard input."""
    out: list[tuple[str, str | None, str | None]] = []
    for source in given:
        if source == "-":
            out.append(("-", None, None))
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
            named = container_of(path / found[0][3])
            out.extend((str(path / name), f"{path}#{n}", named) for n, _, _, name in sorted(found))
            continue
        if not path.exists():
            raise AuditInputError(f"{path}: no such file")
        m = _CRI_FILE.match(path.name)
        out.append((source, None if m is None else f"{path.parent}#{m['n']}", container_of(path)))
    if not out:
        raise AuditInputError("no log given")
    return out


def container_of(path: Path) -> str | None:
    """The container whose log ``path`` is, where the kubelet's layout names it: a CRI file
    in ``/var/log/pods/<ns>_<pod>_<uid>/<container>/`` or a link
    ``/var/log/containers/<pod>_<ns>_<container>-<id>.log``; else None. Only the path's
    last three parts count (a copied directory keeps its name)."""
    m = _CONTAINER_LINK.match(path.name)
    if m is not None:
        return m["container"]
    if _CRI_FILE.match(path.name) and _POD_DIR.match(path.parent.parent.name):
        return path.parent.name
    return None


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
        self.open: dict[str, tuple[str, int, list[bytes], str | None]] = {}

    def part(
        self, source: str, line: int, stream: str, text: bytes, last: bool, container: str | None
    ) -> LogLine | None:
        started = self.open.pop(stream, None)
        if started is None:
            if last:
                return LogLine(source, line, text, stream, container=container)
            self.open[stream] = (source, line, [text], container)
            return None
        started[2].append(text)
        if last:
            return LogLine(
                started[0], started[1], b"".join(started[2]), stream, container=started[3]
            )
        self.open[stream] = started
        return None

    def flush(self) -> Iterator[LogLine]:
        """The lines still open (their container changed, or the log ended): torn."""
        for stream, (source, line, parts, container) in sorted(self.open.items()):
            yield LogLine(source, line, b"".join(parts), stream, False, container)
        self.open.clear()


def log_lines(given: Sequence[str]) -> Iterator[LogLine]:
    """Every line of the sources (`log_sources`), in order, framings taken off and long
    lines joined. AuditInputError for a source that cannot be read."""
    joiner = _Joiner()
    instance: str | None = None
    for source, belongs, container in log_sources(given):
        if belongs != instance or belongs is None:
            yield from joiner.flush()
            instance = belongs
        with _opened(source) as f:
            try:
                for lineno, raw in enumerate(f, 1):
                    ended = raw.endswith(b"\n")
                    text = raw[:-1] if ended else raw
                    line = _frame(source, lineno, text, ended, joiner, container)
                    if line is not None:
                        yield line
            except (OSError, EOFError) as exc:  # a damaged gzip file, a read error
                raise AuditInputError(f"{source}: {_describe(exc)}") from None
    yield from joiner.flush()


def _frame(
    source: str, lineno: int, raw: bytes, ended: bool, joiner: _Joiner, container: str | None
) -> LogLine | None:
    """The line ``raw`` with its framing taken off (None: a part of a longer line).
    ``container``: the one the source's path names (None: the line's prefix may)."""
    m = _CRI.match(raw)
    if m is not None:
        stream = m[2].decode()
        last = "P" not in m[3].decode("ascii", "replace").split(":")
        return joiner.part(source, lineno, stream, raw[m.end() :], last, container)
    if raw.startswith(_DOCKER):
        try:
            entry = json.loads(raw)
            text, stream = entry["log"], entry["stream"]
        except (ValueError, KeyError, TypeError):
            text = stream = None
        if isinstance(text, str) and isinstance(stream, str):
            last = text.endswith("\n")
            body = (text[:-1] if last else text).encode("utf-8", "surrogatepass")
            return joiner.part(source, lineno, stream, body, last, container)
    text, named = _unframe(raw)
    return LogLine(source, lineno, text, None, ended, container or named)


def _unframe(raw: bytes) -> tuple[bytes, str | None]:
    """A line of `kubectl logs` without its ``--prefix`` and ``--timestamps`` framing,
    and the container the prefix names (None: no prefix, or one that names none)."""
    text, named = raw, None
    prefix = _PREFIX.match(text)
    if prefix is not None:
        text = text[prefix.end() :]
        if prefix[1] is not None:
            named = prefix[1].decode("utf-8", "replace")
    stamp = _TIMESTAMP.match(text)
    if stamp is not None:
        text = text[stamp.end() :]
    return text, named


def may_frame_a_record(line: bytes) -> bool:
    """Whether a reader of merged, unframed output (`kubectl logs`: stdout and stderr) could
    take ``line``, a line a container wrote, for a record or a part of one: it looks like a
    CRI or Docker framed line, or it starts with the marker once a ``--prefix`` and a
    ``--timestamps`` framing are taken off. `stream.guard_log_lines` keeps mandate's own log
    lines from ever being one."""
    if _CRI.match(line) is not None or line.startswith(_DOCKER):
        return True
    return _unframe(line)[0].startswith(MARKER_PREFIX)
