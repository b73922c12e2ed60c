"""Request-path canonicalisation and compiled path patterns (pure).

A request path is canonicalised once per decision: query and fragment dropped,
percent-decoding applied until stable (so double encoding cannot hide `..` or `/`),
backslashes read as `/`, empty and `.` segments dropped, `..` resolved against what precedes
it (never above the root). Rules then match the canonical form, so a path that uses `..` or
`%2e%2e` to leave a prefix never matches that prefix. A path that cannot be canonicalised
(bad UTF-8, control characters, encoding nested too deep) is reported as ``None`` and the
decision denies it: an ambiguous path must not slip past a deny rule. Path parameters (a
`;` in the path, encoded or not) are refused the same way: upstreams disagree on them —
servlet containers and some frameworks drop `;...` from a segment, others keep it — so
`/v1/ledger/admin;x/users` would dodge a deny rule on `/v1/ledger/admin/**` at one kind
of upstream and not at the other (found by tests/e2e/test_adversarial.py).

Patterns (`/v1/invoices/*`, `/v1/ledger/**`) are compiled to one anchored regular
expression per rule when profiles load; nothing here compiles a regex per request.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote

__all__ = [
    "MAX_PATH_LENGTH",
    "canonical_path",
    "compile_path_patterns",
    "display_path",
    "validate_path_pattern",
]

MAX_PATH_LENGTH = 8192
_MAX_DECODE_ROUNDS = 3
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
# Control characters (C0, DEL, C1) never belong in a path that a rule should match.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Segments that need no decoding or resolution: not starting with '.', and without '%',
# '\\' or control characters (C0, DEL, C1). An optional trailing slash.
_CLEAN = re.compile(r"(?:/[^/.%;\\\x00-\x1f\x7f-\x9f][^/%;\\\x00-\x1f\x7f-\x9f]*)+/?|/")
_SEGMENT_LITERAL = re.compile(r"^[^/*?#%;\\\x00-\x20\x7f]+$")


def canonical_path(raw: str) -> str | None:
    """Return the canonical form of a request path, or None if it cannot be trusted.

    The canonical form is ``""`` for the root and otherwise ``"/a/b/c"``: every segment
    non-empty, no trailing slash.
    """
    if len(raw) > MAX_PATH_LENGTH:
        return None
    cut = len(raw)
    for sep in ("?", "#"):
        i = raw.find(sep)
        if i != -1 and i < cut:
            cut = i
    path = raw[:cut]
    if _CLEAN.fullmatch(path) is not None:
        # The common case: no escapes, no dot or empty segments, no backslash or control
        # character. Canonical already, but for a trailing slash.
        return path.rstrip("/")
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in path:
            break
        try:
            decoded = unquote(path, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            return None
        if decoded == path:
            break
        path = decoded
    else:
        if _PERCENT.search(path):
            return None  # still encoded after several rounds: refuse to guess
    if _CONTROL.search(path) or ";" in path:
        return None
    if not path.startswith(("/", "\\")):
        return None  # asterisk-form, absolute-form leftovers, empty: not an origin path
    out: list[str] = []
    for seg in path.replace("\\", "/").split("/"):
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return "".join("/" + s for s in out)


def display_path(canonical: str) -> str:
    """The canonical path as people write it (the root is ``/``)."""
    return canonical or "/"


def validate_path_pattern(pattern: str) -> str:
    """Check one path pattern; return it unchanged or raise ValueError saying what is expected."""
    if not pattern.startswith("/"):
        raise ValueError(f"path pattern {pattern!r} must start with '/'")
    if pattern == "/":
        return pattern
    if pattern.endswith("/"):
        raise ValueError(
            f"path pattern {pattern!r} must not end with '/' (use '/**' for a subtree)"
        )
    for seg in pattern[1:].split("/"):
        if seg in ("*", "**"):
            continue
        if seg == "":
            raise ValueError(f"path pattern {pattern!r} has an empty segment ('//')")
        if seg in (".", ".."):
            raise ValueError(f"path pattern {pattern!r} has a '{seg}' segment")
        if "*" in seg:
            raise ValueError(
                f"path pattern {pattern!r}: '*' and '**' must be whole segments, not in {seg!r}"
            )
        if not _SEGMENT_LITERAL.match(seg):
            raise ValueError(
                f"path pattern {pattern!r}: segment {seg!r} may not contain spaces, '?', '#', "
                "'%', ';', '\\' or control characters (write paths decoded, without a query)"
            )
    return pattern


def _pattern_regex(pattern: str) -> str:
    if pattern == "/":
        return ""
    parts: list[str] = []
    for seg in pattern[1:].split("/"):
        if seg == "*":
            parts.append("/[^/]+")
        elif seg == "**":
            parts.append("(?:/[^/]+)*")
        else:
            parts.append("/" + re.escape(seg))
    return "".join(parts)


def compile_path_patterns(patterns: Sequence[str]) -> re.Pattern[str]:
    """One anchored regex matching a canonical path against any of ``patterns``."""
    body = "|".join(f"(?:{_pattern_regex(p)})" for p in patterns)
    return re.compile(f"^(?:{body})$", re.DOTALL)
