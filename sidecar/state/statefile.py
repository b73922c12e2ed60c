"""Durable JSON state files (revocations, elevation context, behaviour baselines).

One way to write them: a temporary file beside the target, fsynced, renamed over it, then
the directory fsynced, so a crash leaves either the old file or the new one, never a torn
one. No decision logic here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["os_error_text", "write_json_durably"]


def write_json_durably(path: Path, doc: Any, *, indent: int | None = None) -> None:
    """Replace ``path`` with ``doc`` as JSON, atomically and durably. Raises OSError (the
    temporary file removed); the caller decides whether that is fatal."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w") as f:
            if indent is None:
                json.dump(doc, f, separators=(",", ":"))
            else:
                json.dump(doc, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError:
        # Best effort: on a read-only or broken volume the clean-up fails too, and the
        # caller must see the first error (the one that says why), not the clean-up's.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def os_error_text(exc: OSError) -> str:
    """An OS error as an operator reads it: ``Read-only file system (EROFS)``."""
    name = errno.errorcode.get(exc.errno or 0, "")
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text
