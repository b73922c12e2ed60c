"""Finding and reading a trail's files: the chains of a directory and their files in order.
Errors become :class:`~sidecar.errors.AuditInputError` naming the path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from sidecar.audit.record import _FILE
from sidecar.errors import AuditInputError

__all__ = ["trail_files"]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{name}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuditInputError(f"{path}: {_describe(exc)}") from None


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


def trail_files(directory: str | os.PathLike[str], chain_id: str | None) -> dict[str, list[Path]]:
    """The audit files of ``directory`` by chain (one chain with ``chain_id``), in order, as
    `mandate audit query` and `mandate simulate` read them; AuditInputError if none."""
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
