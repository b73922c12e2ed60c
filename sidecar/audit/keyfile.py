"""The audit directory's argument key: the HMAC key of the hashes decision records keep of
call arguments (`sidecar.audit.arguments`).

One key per audit directory, in ``.audit-arguments.key`` (64 hex digits and a newline,
mode 0600), created on first use by whichever writer needs it first: written to a file of
its own, then linked into place, so that writers starting together (a mandate's workers)
all end up with the one key that won. The key never appears in a record; records name it
by an id derived from it. Keep the file with the trail (the hashes of a trail compare only
under one key) and as private as the trail itself: whoever has it can test guesses against
the hashes.

A key that cannot be read (permissions, a damaged file) is not replaced: replacing it
would silently split the trail into incomparable halves. The caller is told why
(:class:`~sidecar.errors.AuditInputError` naming the file); the writer logs it and records
argument types without hashes until it can read the key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from pathlib import Path

from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.files import _describe
from sidecar.errors import AuditInputError

__all__ = ["KEY_FILE", "load_argument_key"]

log = logging.getLogger(__name__)

KEY_FILE = ".audit-arguments.key"
_KEY_TEXT = re.compile(rb"^[0-9a-f]{64}\n?$")


def load_argument_key(directory: str | os.PathLike[str]) -> ArgumentKey:
    """The key of ``directory``, created (0600) if there is none yet. AuditInputError naming
    the file when it cannot be read or created."""
    path = Path(directory) / KEY_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise AuditInputError(f"{path}: cannot read the argument key: {_describe(exc)}") from None
    try:
        _create(path)
        key = _read(path)
    except OSError as exc:
        raise AuditInputError(f"{path}: cannot create the argument key: {_describe(exc)}") from None
    if any(Path(directory).glob("audit-*.jsonl")):
        log.warning(
            "audit argument key %s (id %s) created in a directory that already holds audit "
            "files: the key they were hashed under is gone (deleted or moved?), so their "
            "argument hashes do not compare with new ones", path, key.id,
        )  # fmt: skip
    else:
        log.info("audit argument key %s created (id %s)", path, key.id)
    return key


def _read(path: Path) -> ArgumentKey:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        mode = os.fstat(fd).st_mode
        data = os.read(fd, 256)
    finally:
        os.close(fd)
    if not _KEY_TEXT.match(data):
        raise AuditInputError(
            f"{path}: not an argument key (64 lower-case hex digits); it is left as it is: "
            "restore it, or move it aside to start a new key (hashes recorded under the old "
            "one then no longer compare with new ones)"
        )
    if mode & 0o077:
        log.warning("audit argument key %s is readable by others (mode %o): chmod 600", path,
                    mode & 0o777)  # fmt: skip
    return ArgumentKey.of(bytes.fromhex(data[:64].decode("ascii")))


def _create(path: Path) -> None:
    """Write a new key beside ``path`` and link it into place; a key another writer linked
    first is kept (the link fails, ours is dropped)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, secrets.token_hex(32).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
