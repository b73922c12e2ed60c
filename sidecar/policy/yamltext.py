"""YAML for people (pure): a mapping whose entries may carry comments, emitted in block style
with flow style for short leaves, so that a generated profile reads like a written one and
says where its values came from.

Scalars are written so that PyYAML (YAML 1.1, what `mandate validate` reads with) reads
them back as the same values: strings that would read as another type (`yes`, `null`,
`1.0`) and strings with characters YAML cannot hold raw are double-quoted with JSON's
escapes; floats always carry a `.` (`1.0e-07`). A key longer than a YAML simple key may be
(1024 characters) is written as an explicit `? key` entry; a comment shows what YAML cannot
hold in one (control characters, non-characters, line breaks) as `\\uXXXX`. No I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Commented", "plain", "render"]

_PLAIN = re.compile(r"^[A-Za-z/][A-Za-z0-9_./*-]*$")
# YAML 1.1 reads these plain scalars as booleans or null: they are quoted
_YAML_WORDS = frozenset(
    {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}
)  # fmt: skip
_FLOW_MAX = 96
# PyYAML reads a simple (implicit) key only within 1024 characters of its `:`; past this
# length a key is written as an explicit `? key` entry
_KEY_MAX = 1000


class Commented:
    """An ordered mapping whose entries may carry a comment (at the end of the key's line)
    and which may have comment lines above it (a list item's, the document's)."""

    def __init__(self, above: Sequence[str] = ()) -> None:
        self.items: list[tuple[str, Any, str]] = []
        self.above = list(above)

    def add(self, key: str, value: Any, comment: str = "") -> None:
        self.items.append((key, value, comment))

    def plain(self) -> dict[str, Any]:
        return {k: plain(v) for k, v, _ in self.items}


def plain(value: Any) -> Any:
    """``value`` with every Commented as a dict: what the YAML reads back as."""
    if isinstance(value, Commented):
        return value.plain()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


# What a double-quoted scalar may hold raw: YAML's printable characters except its line
# breaks (NEL, LS, PS), which would fold; the rest is written as a \u escape.
_YAML_PRINTABLE = re.compile(
    "[^\x09\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _quote(text: str) -> str:
    """A YAML double-quoted scalar: JSON's escapes, and \\uXXXX for what YAML may not hold."""
    out = json.dumps(text, ensure_ascii=False)
    return _YAML_PRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text:  # YAML 1.1 reads 1e-07 as a string
            mantissa, _, exp = text.partition("e")
            text = f"{mantissa}.0e{exp if exp[0] in '+-' else '+' + exp}"
        return text
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return _quote(text)


def _key(text: str) -> str:
    return _scalar(text)


def _long(key: str) -> bool:
    return len(_key(key)) > _KEY_MAX


def _flow(value: Any) -> str | None:
    """A flow rendering for short leaves (scalars, lists of scalars, small mappings of
    them), None for what goes in block style."""
    if isinstance(value, Commented):  # its lines above are the container's to write
        if any(c for _, _, c in value.items):
            return None
        value = {k: v for k, v, _ in value.items}
    if isinstance(value, Mapping):
        parts = []
        for k, v in value.items():
            if _long(k):
                return None
            inner = _flow(v)
            if inner is None:
                return None
            parts.append(f"{_key(k)}: {inner}")
        text = "{" + ", ".join(parts) + "}"
    elif isinstance(value, list | tuple):
        parts = []
        for v in value:
            inner = _flow(v)
            if inner is None or isinstance(v, Mapping | Commented):
                return None
            parts.append(inner)
        text = "[" + ", ".join(parts) + "]"
    else:
        return _scalar(value)
    return text if len(text) <= _FLOW_MAX else None


def _printable(text: str) -> str:
    """``text`` on one comment line: whitespace runs (line breaks too) as one space, and
    what YAML cannot hold raw as a `\\uXXXX` escape (a comment is not a scalar: YAML reads
    no escape in it, so it only shows the character)."""
    flat = " ".join(text.split())
    return _YAML_PRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", flat)


def _comment(text: str) -> str:
    return "  # " + _printable(text) if text else ""


def _emit_map(m: Commented | Mapping[str, Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    items = m.items if isinstance(m, Commented) else [(k, v, "") for k, v in m.items()]
    for key, value, comment in items:
        if isinstance(value, Commented):
            lines += _above(value, pad)
        flow = _flow(value)
        head = f"{pad}{_key(key)}:"
        if _long(key):  # an explicit key: `? key`, then `: value` on the next line
            lines.append(f"{pad}? {_key(key)}{_comment(comment)}")
            head, comment = f"{pad}:", ""
        if flow is not None:
            lines.append(f"{head} {flow}{_comment(comment)}")
            continue
        lines.append(f"{head}{_comment(comment)}")
        if isinstance(value, Commented | Mapping):
            _emit_map(value, indent + 2, lines)
        else:
            _emit_list(value, indent + 2, lines)


def _emit_list(values: Sequence[Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for value in values:
        if isinstance(value, Commented):
            lines += _above(value, pad)
        flow = _flow(value)
        if flow is not None:
            lines.append(f"{pad}- {flow}")
            continue
        inner: list[str] = []
        if isinstance(value, Commented | Mapping):
            _emit_map(value, indent + 2, inner)
        else:
            _emit_list(value, indent + 2, inner)
        # the item's first line that is not a comment (its first key's) takes the dash
        first = next(i for i, line in enumerate(inner) if not line.lstrip().startswith("#"))
        lines += inner[:first]
        lines.append(f"{pad}- {inner[first][indent + 2 :]}")
        lines += inner[first + 1 :]


def _above(value: Commented, pad: str) -> list[str]:
    return [f"{pad}# {_printable(a)}".rstrip() for a in value.above]


def render(doc: Commented) -> str:
    """The YAML document of ``doc``, its ``above`` lines as a comment at the top."""
    lines = _above(doc, "")
    _emit_map(doc, 0, lines)
    return "\n".join(lines) + "\n"
