"""Generalizing what an agent did (pure): path templates from recorded paths, and JSON
Schema constraints from recorded arguments, for `sidecar.policy.suggest`.

Paths: a segment that looks like an id (digits, a UUID, a long token mixing letters and
digits) or that a pattern cannot hold literally becomes `*`, and so does every segment at
a place where more than :data:`LITERALS_MAX` literal ones were seen; the first segment
(it names the API, not an instance) becomes `*` only for the latter two reasons. Under a
`*`, a tail becomes `**` only when it is justified: at least :data:`TAIL_PATHS_MIN`
distinct paths below the `*`, ending at two depths or more, holding only `*`s or literal
segments each seen in one path only, and a literal first segment before it (never `/**`
nor `/*/**`); otherwise the paths stay templates of their own depth (`/files/*`,
`/files/*/*`). A literal segment several paths share stays.

Arguments (as `sidecar.audit.arguments` records them): the type (integer and number
together: number); from values recorded in clear, `minimum`/`maximum` for numbers, `enum`
for at most :data:`ENUM_MAX` distinct strings or other scalars, else `maxLength` and a
`pattern` when every string has one shape of letters, digits and literal characters; for
objects and arrays their members' and elements' types; from hashes or types only, the type
and the nested shape the record keeps. Each comes with a comment counting calls and
distinct values (hashes: distinct under one key). No I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.audit.arguments import json_type
from sidecar.core.arguments import validate_schema
from sidecar.policy.yamltext import Commented

__all__ = [
    "ENUM_MAX",
    "LITERALS_MAX",
    "TAIL_PATHS_MIN",
    "Seen",
    "covers",
    "expressible",
    "object_schema",
    "path_templates",
    "recorded_name",
    "segments",
    "string_shape",
]

ENUM_MAX = 10
LITERALS_MAX = 5
TAIL_PATHS_MIN = 3
_SEGMENT_LITERAL = re.compile(r"^[^/*?#%;\\\x00-\x20\x7f]+$")
_ID = re.compile(
    r"^(?:[0-9][0-9._:,-]*"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
)
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{12,}$")
_PATTERN_MAX = 200


class _Node:
    __slots__ = ("children", "end", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.end: list[str] = []  # the recorded paths that end here
        self.rest = False  # a `**` leaf: ``end`` holds every path of the subtree


def segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def _writable(seg: str) -> bool:
    """A segment a path pattern can hold literally."""
    return bool(_SEGMENT_LITERAL.match(seg)) and seg not in (".", "..")


def _varying(seg: str) -> bool:
    """A segment that names an instance (an id, a token) or cannot be written literally."""
    if len(seg) > 48 or not _writable(seg):
        return True
    if _ID.match(seg):
        return True
    return bool(
        _TOKEN.match(seg) and any(c.isdigit() for c in seg) and any(c.isalpha() for c in seg)
    )


def _merge(into: _Node, other: _Node) -> None:
    stack = [(into, other)]
    while stack:  # iterative: a recorded path may have thousands of segments
        a, b = stack.pop()
        a.end += b.end
        for seg, child in b.children.items():
            mine = a.children.get(seg)
            if mine is None:
                a.children[seg] = child
            else:
                stack.append((mine, child))


def _star(node: _Node, root: bool) -> None:
    """Merge ``node``'s children that vary into one `*` child. The first segment of a path
    (``root``) names the API, not an instance: it becomes `*` only where a pattern cannot
    write it, or where more than :data:`LITERALS_MAX` were seen."""
    kids = node.children
    if root:
        wild = [s for s in kids if s == "*" or not _writable(s)]
    else:
        wild = [s for s in kids if s == "*" or _varying(s)]
    literal = [s for s in kids if s not in wild]
    if len(literal) > LITERALS_MAX:
        wild, literal = wild + literal, []
    if wild:
        merged = _Node()
        for seg in wild:
            _merge(merged, kids.pop(seg))
        kids["*"] = merged


def _tail(node: _Node) -> None:
    """Turn ``node``'s `*` child into `**` when the paths below it justify a tail of any
    depth: at least :data:`TAIL_PATHS_MIN` distinct paths ending at two depths or more, the
    subtree holding only `*`s or literal segments each seen in one path only."""
    star = node.children.get("*")
    if star is None:
        return
    paths = list(_paths(star))
    if len(paths) < TAIL_PATHS_MIN or len({len(segments(p)) for p in paths}) < 2:
        return
    if _only_wild(star) or _varying_tail(star):
        rest = _Node()
        rest.rest = True
        rest.end = paths
        del node.children["*"]
        node.children["**"] = rest


def _collapse(root: _Node) -> None:
    """`*` where segments vary, then `**` for varying tails below a literal first segment
    (never at the root: `/**` would allow every path), children before their parent.
    Iterative: a recorded path may have thousands of segments."""
    # (node, depth, its children done, a `**` may end its prefix)
    stack: list[tuple[_Node, int, bool, bool]] = [(root, 0, False, False)]
    while stack:
        node, depth, done, anchored = stack.pop()
        if done:
            if anchored:
                _tail(node)
            continue
        _star(node, depth == 0)
        stack.append((node, depth, True, anchored))
        for seg, child in node.children.items():
            below = anchored or (depth == 0 and seg != "*")
            stack.append((child, depth + 1, False, below))


def _varying_tail(star: _Node) -> bool:
    """Paths below a `*` that end at several depths, through literal segments each seen in
    one path only (`/files/*` over `a.txt`, `dir/b.txt`, `x/y/c.txt`): a tail of any
    depth, `**`. A literal that several paths share (`/repos/*/issues`) is stable: kept."""
    literal = [child for seg, child in star.children.items() if seg not in ("*", "**")]
    return len(literal) > 1 and all(sum(1 for _ in _paths(c)) == 1 for c in literal)


def _only_wild(node: _Node) -> bool:
    """Whether every segment below ``node`` is a `*` or `**`."""
    stack = [node]
    while stack:
        n = stack.pop()
        for seg, child in n.children.items():
            if seg not in ("*", "**"):
                return False
            stack.append(child)
    return True


def _paths(node: _Node) -> Iterator[str]:
    stack = [node]
    while stack:
        n = stack.pop()
        yield from n.end
        stack.extend(n.children.values())


def _emit(root: _Node) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    stack: list[tuple[_Node, list[str]]] = [(root, [])]
    while stack:
        node, prefix = stack.pop()
        if node.rest:  # its segment, `**`, ends the prefix
            out["/" + "/".join(prefix)] = node.end
            continue
        if node.end:
            out["/" + "/".join(prefix)] = node.end
        for seg in sorted(node.children, reverse=True):
            stack.append((node.children[seg], [*prefix, seg]))
    return out


def path_templates(paths: Iterable[str]) -> dict[str, list[str]]:
    """Path templates for recorded (canonical, decoded) paths: each template with the
    distinct paths it was made from. See the module docstring for the rules."""
    root = _Node()
    for path in dict.fromkeys(paths):
        node = root
        for seg in segments(path):
            node = node.children.setdefault(seg, _Node())
        node.end.append(path)
    _collapse(root)
    return _emit(root)


def covers(general: str, specific: str) -> bool:
    g, s = segments(general), segments(specific)
    if g and g[-1] == "**":
        g = g[:-1]
        return len(s) >= len(g) and all(a in ("*", b) for a, b in zip(g, s, strict=False))
    return len(g) == len(s) and all(a in ("*", b) for a, b in zip(g, s, strict=True))


# ---------------------------------------------------------------------------------------------
# Argument domains


@dataclass(slots=True)
class Seen:
    """One argument as recorded in one call: its entry and the id of the key its hash is
    under ("" without)."""

    entry: Mapping[str, Any]
    key: str


def _type_of(types: set[str]) -> str | list[str]:
    if {"integer", "number"} <= types:
        types = types - {"integer"}
    return next(iter(types)) if len(types) == 1 else sorted(types)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _distinct(values: Iterable[object]) -> list[object]:
    seen: dict[str, object] = {}
    for v in values:
        seen.setdefault(json.dumps(v, sort_keys=True), v)
    return [seen[k] for k in sorted(seen)]


def _char_class(ch: str, fine: bool) -> str:
    if "A" <= ch <= "Z":
        return "A" if fine else "w"
    if "a" <= ch <= "z":
        return "a" if fine else "w"
    if "0" <= ch <= "9":
        return "9" if fine else "w"
    return "\x00" + ch  # a literal character


_CLASS_RE = {"A": "[A-Z]", "a": "[a-z]", "9": "[0-9]", "w": "[A-Za-z0-9]"}


def _runs(text: str, fine: bool) -> list[list[Any]]:
    runs: list[list[Any]] = []
    for ch in text:
        c = _char_class(ch, fine)
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return runs


_META = frozenset(".+*?()|[]{}^$\\")


def _literal(ch: str) -> str:
    """``ch`` in a pattern, escaped only where both Python's and Rust's regex syntax (the
    profile's `pattern` runs in the latter) read it as a metacharacter."""
    return "\\" + ch if ch in _META else ch


def string_shape(values: Sequence[str]) -> str | None:
    """A `pattern` every value matches, when they share one shape of letters, digits and
    literal characters (``DE89...`` and ``GB29...``: ``^[A-Za-z0-9]{22}$``); else None."""
    if not values or any(not v for v in values):
        return None
    for fine in (True, False):
        runs = [_runs(v, fine) for v in values]
        shapes = {tuple(c for c, _ in r) for r in runs}
        if len(shapes) != 1:
            continue
        parts = []
        for i, c in enumerate(next(iter(shapes))):
            lo, hi = min(r[i][1] for r in runs), max(r[i][1] for r in runs)
            part = _CLASS_RE.get(c) or _literal(c[1:])
            if (lo, hi) != (1, 1):
                part += f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"
            parts.append(part)
        pattern = "^" + "".join(parts) + "$"
        if len(pattern) <= _PATTERN_MAX and all(re.search(pattern, v) for v in values):
            return pattern
    return None


def _value_schema(seen: Sequence[Seen]) -> tuple[dict[str, Any], str]:
    """The schema of one argument from its recorded entries, and a comment with counts."""
    entries = [s.entry for s in seen]
    types = {str(e.get("type")) for e in entries}
    schema: dict[str, Any] = {"type": _type_of(types)}
    n = len(entries)
    calls = f"{n} call{'s' if n != 1 else ''}"
    clear = [e["value"] for e in entries if "value" in e]
    if len(clear) == n:
        return _from_values(schema, clear, calls)
    _shape(schema, entries, types)
    hashes = {(s.key, s.entry["hash"]) for s in seen if "hash" in s.entry}
    if hashes:
        keys = {k for k, _ in hashes}
        under = f" under {len(keys)} keys, not comparable" if len(keys) > 1 else ""
        partly = ", some in clear" if clear else ""
        return schema, (
            f"{calls}, {len(hashes)} distinct value{'s' if len(hashes) != 1 else ''} "
            f"(hashed{under}{partly}: record values to propose an enum)"
        )
    return schema, f"{calls}, values not recorded (audit.arguments: types)"


def recorded_name(name: str) -> bool:
    """Whether a record shows an argument's name itself: not one it replaced by `#` and a
    hash or position (`sidecar.audit.arguments`: a name that does not look like an
    identifier, which may be the call's data), nor one a profile cannot hold."""
    return not name.startswith("#") and expressible(name)


def expressible(value: object) -> bool:
    """Whether a profile can hold ``value`` (its strings and member names): not a string
    with a lone surrogate (`"\\udcff"`, which JSON lets through and no UTF-8 holds)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(expressible(k) and expressible(v) for k, v in value.items())
    if isinstance(value, list):
        return all(expressible(v) for v in value)
    return True


def _from_values(
    schema: dict[str, Any], values: list[Any], calls: str
) -> tuple[dict[str, Any], str]:
    if not all(expressible(v) for v in values):
        return schema, f"{calls}, values a profile cannot hold (a lone surrogate): type only"
    if all(isinstance(v, dict) for v in values):
        keys: dict[str, set[str]] = {}
        for v in values:
            for k, x in v.items():
                keys.setdefault(k, set()).add(json_type(x))
        if keys:
            schema["properties"] = {k: {"type": _type_of(t)} for k, t in sorted(keys.items())}
        return schema, f"{calls}, {len(_distinct(values))} distinct values"
    if all(isinstance(v, list) for v in values):
        items = [x for v in values for x in v]
        if items:
            item_schema, _ = _from_values(
                {"type": _type_of({json_type(x) for x in items})}, items, ""
            )
            schema["items"] = item_schema
        schema["maxItems"] = max(len(v) for v in values)
        return schema, f"{calls}, {len(_distinct(values))} distinct values"
    if any(isinstance(v, dict | list) for v in values):
        return schema, f"{calls}, values of several kinds"
    distinct = _distinct(values)
    count = f"{calls}, {len(distinct)} distinct value{'s' if len(distinct) != 1 else ''}"
    if all(isinstance(v, bool) for v in values):
        return schema, count
    if all(_is_number(v) for v in values):
        lo, hi = min(values), max(values)
        schema["minimum"], schema["maximum"] = lo, hi
        return schema, f"{count}, {_number(lo)} to {_number(hi)}"
    if len(distinct) <= ENUM_MAX:
        schema["enum"] = distinct
        return schema, count
    if all(isinstance(v, str) for v in values):
        schema["maxLength"] = max(len(v) for v in values)
        pattern = string_shape([str(v) for v in distinct])
        if pattern is not None:
            schema["pattern"] = pattern
    return schema, count


def _number(v: object) -> str:
    text = json.dumps(v)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} characters)"


def _checked(schema: dict[str, Any], comment: str) -> tuple[dict[str, Any], str]:
    """``schema`` if the profile's own check takes it (`validate_schema`, as `mandate
    validate` runs it), else its type alone: a value no constraint can hold (an integer
    beyond a float's range) constrains nothing but the type, and the comment says so."""
    try:
        validate_schema(schema)
    except ValueError as exc:
        why = str(exc).partition(": ")[2] or str(exc)
        return {"type": schema["type"]}, (
            f"{comment}; type only: the values give no constraint a profile can hold ({why})"
        )
    return schema, comment


def _shape(schema: dict[str, Any], entries: Sequence[Mapping[str, Any]], types: set[str]) -> None:
    """Nested shape from what hashed or typed entries keep: members of an object, element
    types of an array."""
    if types == {"object"}:
        keys: dict[str, set[str]] = {}
        for e in entries:
            for k, t in (e.get("keys") or {}).items():
                if recorded_name(k):
                    keys.setdefault(k, set()).add(str(t))
        if keys:
            schema["properties"] = {k: {"type": _type_of(t)} for k, t in sorted(keys.items())}
    elif types == {"array"}:
        items = {str(t) for e in entries for t in (e.get("items") or [])}
        if items:
            schema["items"] = {"type": _type_of(items)}


def object_schema(calls: Sequence[tuple[Mapping[str, Any], str, bool]]) -> Commented:
    """The schema of a call's arguments (a tool's, a JSON body's, a query's) from each
    call's entries, its key id, and whether some of them were left out of the record."""
    names: dict[str, list[Seen]] = {}
    # a name the record does not show (hashed) or a profile cannot hold: not listed, so
    # additionalProperties stays open (else the call itself would be refused)
    unnamed = 0
    for entries, key, _ in calls:
        for name, entry in entries.items():
            if not recorded_name(name):
                unnamed += 1
            elif isinstance(entry, Mapping):
                names.setdefault(name, []).append(Seen(entry, key))
    props = Commented()
    for name in sorted(names):
        schema, comment = _checked(*_value_schema(names[name]))
        props.add(name, schema, comment)
    out = Commented()
    if unnamed:
        out.above.append(
            f"{unnamed} argument{'s' if unnamed != 1 else ''} whose name the record does "
            "not show (hashed: not an identifier) or a profile cannot hold: not listed, so "
            "additionalProperties is left open (any other argument passes)"
        )
    out.add("type", "object")
    if names:
        out.add("properties", props)
    required = [n for n in sorted(names) if len(names[n]) == len(calls)]
    if required:
        out.add("required", required)
    if not unnamed and not any(omitted for _, _, omitted in calls):
        out.add("additionalProperties", False)
    return out
