"""Canonical JSON: the one encoding of audit records, and of the argument values they hash.

Pure, no I/O. Keys sorted, compact separators, UTF-8, no ASCII escaping.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical_json"]


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes of a JSON value: keys sorted, compact, UTF-8, no ASCII escaping.
    NaN and infinities are refused (ValueError): they have no JSON form. A lone surrogate,
    which has no UTF-8 form, is written as its JSON escape (``\\udcff``), which reads back
    as the same string: no record is refused for a string an agent made up."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8", "backslashreplace")
