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

So is a path whose spelling some upstream reads as another path (issue 15, finding 8):
- a `%` that does not start a two-hex-digit escape, as sent or after a decoding round:
  `%zz`, `%2`, the IIS-style `%u0073` (`s` there), a literal `%` sent as `%25`;
- an invisible code point (zero-width, bidi and other format characters, variation
  selectors, ...): `secrets%E2%80%8B` looks like, and to some upstreams is, `secrets`;
- a segment of only dots and spaces (`...`, `..%20`, `%20`): Windows-style upstreams strip
  trailing dots and spaces and read `.` or `..`;
- a character whose compatibility (NFKC) form or best-fit spelling is a `/`, `\\`, `%` or
  `;`, or that makes a dot segment (the full-width solidus U+FF0F, full stop U+FF0E and
  semicolon U+FF1B, the division slash U+2215): an upstream that normalises Unicode would
  read other segments than the rules matched.

Otherwise the canonical form keeps the spelling: rules match paths case-sensitively and a
segment keeps trailing dots and spaces (`/v1/SECRETS`, `secrets.` and full-width letters are
other paths than `/v1/secrets`, as RFC 3986 has it). A deny rule with `foldPaths: true` is
for upstreams that do not keep them apart: it matches `fold_path` of the canonical path
(each segment NFKC-normalised, case-folded, trailing dots and spaces stripped) against its
patterns folded the same way. Allow rules never fold: that would widen what they allow.

Patterns (`/v1/invoices/*`, `/v1/ledger/**`) are compiled to one anchored regular
expression per rule when profiles load; nothing here compiles a regex per request.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from urllib.parse import unquote

__all__ = [
    "MAX_PATH_LENGTH",
    "canonical_path",
    "compile_path_patterns",
    "display_path",
    "fold_path",
    "validate_path_pattern",
]

MAX_PATH_LENGTH = 8192
_MAX_DECODE_ROUNDS = 3
# A '%' that does not start an escape of two hex digits: `%zz`, `%2`, `%u0073`, a lone `%`.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Control characters (C0, DEL, C1) never belong in a path that a rule should match.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Invisible code points: Unicode's Default_Ignorable_Code_Point set (soft hyphen, combining
# grapheme joiner, zero-width space/joiners, bidi controls, word joiner, variation selectors,
# BOM, Hangul fillers, tags, ...), the other format (Cf) characters, the line and paragraph
# separators, the interlinear annotation characters and the noncharacters U+FFFE/U+FFFF.
# Listed explicitly so the decision does not depend on the Python build's Unicode version.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u0600-\u0605\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160"
    "\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164"
    "\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb\ufffe\uffff\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
# What an upstream that normalises Unicode (NFKC, or a best-fit code page) may read as path
# structure; NFKC covers the full-width and small forms, the rest are best-fit slashes.
_STRUCTURE = ("/", "\\", "%", ";")
_SLASH_LIKE = re.compile("[\u2044\u2215\u2216\u29f5\u29f8\u29f9]")
# Segments that need no decoding or resolution: ASCII only (checked apart), not starting
# with '.', and without '%', ';', '\\', spaces or control characters (C0, DEL, C1). An
# optional trailing slash.
_CLEAN = re.compile(r"(?:/[^/.%;\\\x00-\x20\x7f-\x9f][^/%;\\\x00-\x20\x7f-\x9f]*)+/?|/")
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
    if _CLEAN.fullmatch(path) is not None and path.isascii():
        # The common case: no escapes, no dot or empty segments, no backslash, space or
        # control character. Canonical already, but for a trailing slash.
        return path.rstrip("/")
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in path:
            break
        if _BAD_ESCAPE.search(path):
            return None  # `%zz`, `%2`, `%u0073`: upstreams decode these each their own way
        try:
            decoded = unquote(path, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            return None
        path = decoded
    else:
        if "%" in path:
            return None  # still encoded after several rounds, or a malformed escape
    if _CONTROL.search(path) or ";" in path:
        return None
    if not path.startswith(("/", "\\")):
        return None  # asterisk-form, absolute-form leftovers, empty: not an origin path
    unicode = not path.isascii()
    if unicode and (_INVISIBLE.search(path) or _SLASH_LIKE.search(path)):
        return None
    out: list[str] = []
    for seg in path.replace("\\", "/").split("/"):
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        if _ambiguous_segment(seg, unicode):
            return None
        out.append(seg)
    return "".join("/" + s for s in out)


def _ambiguous_segment(seg: str, unicode: bool) -> bool:
    """A segment some upstream reads as path structure: only dots and spaces (Windows strips
    trailing dots and spaces: `..%20` is `..`), or, in its NFKC form, a `/`, `\\`, `%`, `;` or
    only dots and spaces (two full-width full stops)."""
    if seg.strip(". ") == "":
        return True
    if unicode and not seg.isascii():
        nfkc = unicodedata.normalize("NFKC", seg)
        if nfkc != seg and (nfkc.strip(". ") == "" or any(c in nfkc for c in _STRUCTURE)):
            return True
    return False


def _fold_segment(seg: str) -> str:
    if seg.isascii():
        return seg.lower().rstrip(". ")
    nfkc = unicodedata.normalize("NFKC", seg)
    return unicodedata.normalize("NFKC", nfkc.casefold()).rstrip(". ")


def fold_path(canonical: str) -> str:
    """The canonical path as an upstream that does not tell case, Unicode compatibility forms
    or trailing dots and spaces apart reads it: each segment NFKC-normalised, case-folded and
    stripped of trailing dots and spaces (what a `foldPaths: true` deny rule matches)."""
    if canonical.isascii() and "./" not in canonical and " /" not in canonical:
        folded = canonical.lower()
        return folded if not folded.endswith((".", " ")) else folded.rstrip(". ")
    return "".join("/" + f for f in map(_fold_segment, canonical[1:].split("/")) if f)


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


def _pattern_regex(pattern: str, fold: bool) -> str:
    if pattern == "/":
        return ""
    parts: list[str] = []
    for seg in pattern[1:].split("/"):
        if seg == "*":
            parts.append("/[^/]+")
        elif seg == "**":
            parts.append("(?:/[^/]+)*")
        else:
            parts.append("/" + re.escape(_fold_segment(seg) if fold else seg))
    return "".join(parts)


def compile_path_patterns(patterns: Sequence[str], *, fold: bool = False) -> re.Pattern[str]:
    """One anchored regex matching a canonical path against any of ``patterns``; with
    ``fold``, matching `fold_path` of a canonical path against the folded patterns."""
    body = "|".join(f"(?:{_pattern_regex(p, fold)})" for p in patterns)
    return re.compile(f"^(?:{body})$", re.DOTALL)
