"""Argument rules (pure): a JSON Schema subset an MCP tool call's `arguments` must satisfy.

A profile's allow rule may constrain, per tool, what a `tools/call` may pass
(`mcpArguments: {send_money: {properties: {to: {enum: [...]}}, required: [to]}}`). The
schema is checked against :data:`KEYWORDS` when profiles load (anything else is refused,
naming the field) and compiled once with jsonschema-rs (a Rust validator: no code is
generated from the schema, which an agent writes in a task declaration; ~0.2 µs per call,
`python -m bench decide_scaling`). At call time :func:`check` says which argument broke
which constraint, from the schema's own words: never the value, which may be a secret.

`pattern` is a regular expression searched anywhere in the string, as in JSON Schema: anchor
it with `^...$`. It is run by Rust's `regex` engine, which matches in linear time (no
catastrophic backtracking, whoever wrote the pattern) and so has no lookaround and no
backreferences: a pattern it cannot compile is refused at load.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import jsonschema_rs

__all__ = [
    "KEYWORDS",
    "Validator",
    "check",
    "compile_arguments",
    "compile_schema",
    "query_arguments",
    "validate_schema",
]

# The subset: editor-friendly, fast to check, and nothing that reaches outside the value.
KEYWORDS = frozenset(
    {
        "type", "enum", "const", "pattern", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "minLength", "maxLength", "items", "minItems", "maxItems",
        "properties", "required", "additionalProperties", "description", "title",
    }
)  # fmt: skip
_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems")

# Bounds on one compiled `pattern` (bytes): a pattern that needs more is refused at load
# (what compiling may cost: agents write patterns too, in task declarations).
_REGEX = jsonschema_rs.RegexOptions(size_limit=256 * 1024, dfa_size_limit=256 * 1024)


class Validator:
    """A compiled schema: the Rust validator and the schema, whose words a reason quotes."""

    __slots__ = ("_rs", "schema")

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = schema
        self._rs = jsonschema_rs.Draft7Validator(
            dict(schema), pattern_options=_REGEX, validate_formats=False, offline=True
        )

    def first_error(self, instance: object) -> jsonschema_rs.ValidationError | None:
        if self._rs.is_valid(instance):
            return None
        return next(iter(self._rs.iter_errors(instance)), None)


def validate_schema(schema: object, where: str = "", *, top: bool = True) -> None:
    """Raise ValueError naming the first keyword outside the subset or malformed value
    (``where`` is the dotted path of ``schema`` in the profile; the whole schema is compiled
    once, at the top)."""
    at = where or "the schema"
    if not isinstance(schema, dict):
        raise ValueError(f"{at}: expected a JSON Schema object")
    for key, value in schema.items():
        here = f"{where}.{key}" if where else key
        if key not in KEYWORDS:
            supported = ", ".join(sorted(KEYWORDS - {"description", "title"}))
            raise ValueError(f"{here}: keyword {key!r} is not supported (supported: {supported})")
        _check_keyword(key, value, here)
    if not top:
        return
    try:
        _compiled(_key(schema))
    except Exception as exc:  # the library may raise anything on a schema it cannot use
        raise ValueError(f"{at}: not a usable schema ({exc})") from None


def _check_keyword(key: str, value: object, here: str) -> None:
    if key == "type":
        types = value if isinstance(value, list) else [value]
        if not types or any(t not in _TYPES for t in types):
            raise ValueError(f"{here}: expected one of {', '.join(sorted(_TYPES))}")
    elif key == "enum":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{here}: expected a non-empty list of values")
    elif key in _NUMBERS:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{here}: expected a number")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond a float (a 400-digit literal)
            finite = False
        if not finite:
            raise ValueError(f"{here}: expected a number (a finite one, within a float's range)")
    elif key in _COUNTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{here}: expected a whole number >= 0")
    elif key == "pattern":
        if not isinstance(value, str):
            raise ValueError(f"{here}: expected a regular expression")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{here}: not a regular expression ({exc})") from None
        if not _runs(value):
            raise ValueError(
                f"{here}: not a regular expression mandate runs (a linear-time engine: no "
                "lookaround, no backreferences, at most 256 KiB compiled)"
            ) from None
    elif key == "required":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{here}: expected a list of property names")
    elif key == "properties":
        if not isinstance(value, dict):
            raise ValueError(f"{here}: expected an object of property schemas")
        for name, sub in value.items():
            validate_schema(sub, f"{here}.{name}", top=False)
    elif key == "items":
        validate_schema(value, here, top=False)
    elif key == "additionalProperties":
        if not isinstance(value, bool):
            validate_schema(value, here, top=False)
    elif key in ("description", "title") and not isinstance(value, str):
        raise ValueError(f"{here}: expected a string")


@functools.lru_cache(maxsize=4096)
def _runs(pattern: str) -> bool:
    """Whether the Rust engine compiles ``pattern`` within the bounds (cached: a schema's
    patterns are checked once per distinct pattern, not at every validation)."""
    try:
        jsonschema_rs.Draft7Validator({"pattern": pattern}, pattern_options=_REGEX)
    except Exception:
        return False
    return True


def _key(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=8192)
def _compiled(key: str) -> Validator:
    """One compilation per distinct schema: validation at load and use share it (compiling
    is ~1 ms, most of a profile load with many argument rules)."""
    return Validator(json.loads(key))


def compile_arguments(schemas: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Validator]:
    """The validators of a rule's `mcpArguments` (already checked by validate_schema)."""
    return {tool: _compiled(_key(schema)) for tool, schema in schemas.items()}


def compile_schema(schema: Mapping[str, Any]) -> Validator:
    """One validator (a rule's `query` or `jsonBody`, already checked by validate_schema)."""
    return _compiled(_key(schema))


def query_arguments(path: str) -> dict[str, object] | str:
    """The query parameters of a request target as the checked object: a name given once is
    a string, a name given again a list of its values (so a rule expecting one string
    refuses `to=a&to=b`, which upstreams read differently); or why it cannot be read."""
    _, _, query = path.partition("?")
    out: dict[str, object] = {}
    if not query:
        return out
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError):
        return "the query cannot be read as name=value pairs"
    for name, value in pairs:
        if name in out:
            prev = out[name]
            out[name] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[name] = value
    return out


def check(validator: Validator, arguments: object, tool: str, label: str = "") -> str | None:
    """None if ``arguments`` satisfy the constraints, else the reason: the argument and the
    constraint it broke (the schema's words, never the value). ``label`` names what was
    checked ("query", "JSON body"); by default the MCP tool ``tool``."""
    label = label or f"MCP tool {tool[:64]!r}"
    if not isinstance(arguments, dict):
        what = "missing" if arguments is None else "not an object"
        return f"{label}: arguments {what}"
    try:
        error = validator.first_error(arguments)
    except Exception:  # a value the validator cannot take (an integer beyond 64 bits, ...)
        return f"{label}: arguments could not be checked"
    if error is None:
        return None
    name = _argument_name(validator.schema, list(error.instance_path))
    where = list(error.schema_path)
    rule = str(where[-1]) if where else "schema"
    if rule.isdigit() and len(where) > 1:  # e.g. [..., "required", 0]
        rule = str(where[-2])
        where = where[:-1]
    definition = _at(validator.schema, where)
    if rule == "additionalProperties":
        return f"{label}: argument {name} has properties the rule does not list"
    if rule == "required":
        return f"{label}: argument {name} lacks one of required {_show(definition)}"
    return f"{label}: argument {name} breaks {rule} {_show(definition)}"


def _argument_name(schema: Mapping[str, Any], path: list[str | int]) -> str:
    """The argument an error is about, as the schema names it: a key the call sent that the
    schema does not name is shown as `*` (keys are the call's data, and may be secrets),
    an array index as its number; each part at most 64 characters."""
    parts: list[str] = []
    node: object = schema
    for p in path:
        props = node.get("properties") if isinstance(node, Mapping) else None
        if isinstance(p, int):
            parts.append(str(p))
            node = node.get("items") if isinstance(node, Mapping) else None
        elif isinstance(props, Mapping) and p in props:
            parts.append(p if len(p) <= 64 else p[:61] + "...")
            node = props[p]
        else:
            parts.append("*")
            extra = node.get("additionalProperties") if isinstance(node, Mapping) else None
            node = extra if isinstance(extra, Mapping) else None
    return ".".join(parts) or "(the arguments)"


def _at(schema: object, path: list[str | int]) -> object:
    """The part of ``schema`` at a validation error's schema path (None if it is not
    there): the constraint's own words, never the value checked."""
    node = schema
    for part in path:
        if isinstance(node, Mapping) and str(part) in node:
            node = node[str(part)]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return None
    return node


def _show(definition: object) -> str:
    text = json.dumps(definition, ensure_ascii=False, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
