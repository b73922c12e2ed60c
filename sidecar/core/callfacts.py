"""What behaviour analysis knows of a call beyond its method, host, path and sizes (pure):
the MCP tools it calls, the shape of their arguments (names and JSON types), and for the
arguments a profile marks sensitive (`behavior.sensitiveArguments`) a keyed fingerprint of
each value; for a JSON object body that is not MCP, its top-level keys and their types.

:func:`describe` makes :class:`CallFacts` on the Check path, from the call's body, only for
an agent whose profile has `behavior:` (the Check pipeline, `sidecar.check.pipeline`).
They reach the supervisor's behaviour engine with Envoy's access log: mandate's answer puts
:meth:`CallFacts.encode`'s text in Envoy's dynamic metadata (gRPC transport: `call`; HTTP
transport: the `x-mandate-call` header, `dynamic_metadata_from_headers`), Envoy copies it
into the call's access log entry, and `sidecar.behaviour.access_log` reads it back with
:func:`decode`.

Nothing in the text is a value the agent sent: a value is only ever its fingerprint,
HMAC-SHA256 under the key the caller gives (the audit directory's argument key, so that a
fingerprint equals the hash the audit trail records of the same value: an operator finds
the calls that carried it with `mandate audit query`), 8 bytes in hex. Names are the call's
data too: a tool or argument name is written as it is only if it looks like an identifier
(the audit trail's rule, :data:`NAME`), else as ``#`` and its fingerprint (``#`` and its
position without a key). Without a key (None) there is no value fingerprint at all.

Bounds, which never hide what is beyond them (an agent must not slip a new tool or a new
recipient past behaviour analysis by padding the call with known ones): at most 8 tools of a
JSON-RPC batch, the 8th standing for all the rest (``+`` and the fingerprint of their names,
``+N`` without a key); 8 fingerprints per argument (the items of an array, each on its own:
one new recipient among known ones is new), the 8th of the rest of the array as one value;
16 fingerprints per call, the 16th (argument ``+``) of all the others as one value; 32
arguments per shape (the rest counted as ``+N``). What judges a call (`callrisk`, on the
Check path) and what learns it (the engine, from the access log) must see the same facts:
:func:`describe` makes them fit the text (shapes are shortened, never tools or values), so
that ``decode(f.encode()) == f``. The text is at most 2 KiB.

Text: fields joined by ``;``: ``t=TOOL(SHAPE)|TOOL(SHAPE)`` (MCP `tools/call` messages, in
order), ``j=SHAPE`` (another JSON object body), ``v=ARG:FP,ARG:FP`` and ``k=KEYID`` (the
key's public id, with any fingerprint), ``p=TOOL`` (the tool the Check path decided before
this call, '' none within the window; absent: not known, as with several Check processes:
added by the Check pipeline, room is kept for it). SHAPE is ``name:T,name:T`` sorted by name, T one
letter of :data:`TYPES`. Identifiers hold none of ``;|(),:=``, so no escaping is needed.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

from sidecar.core.mcp import JsonRefusal, mcp_messages, parse_json_body

__all__ = [
    "NAME",
    "NO_FACTS",
    "TYPES",
    "CallFacts",
    "Fingerprint",
    "decode",
    "describe",
    "json_type",
]

# What a name must look like to be written as it is, here and in the audit trail's records
# (`sidecar.audit.arguments`): a letter or `_`, then up to 63 letters, digits, `_`, `-`, `.`.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
# JSON type -> its letter in a shape.
TYPES = {
    "string": "s",
    "integer": "i",
    "number": "n",
    "boolean": "b",
    "null": "z",
    "object": "o",
    "array": "a",
}
_MAX_TOOLS = 8
_MAX_KEYS = 32
_MAX_VALUES = 16
_MAX_ITEMS = 8
_MAX_TEXT = 2048
_ROOM = 2 + 1 + 65  # ";p=" and a tool as `describe` names it: what `_fit` keeps free
_FP = re.compile(r"[0-9a-f]{16}")

# A value (or a name) -> its keyed fingerprint (16 hex digits); raises ValueError for a
# value without a canonical JSON form.
Fingerprint = Callable[[object], str]


@dataclass(frozen=True, slots=True)
class CallFacts:
    """One call as behaviour analysis sees it (see the module docstring)."""

    tools: tuple[str, ...] = ()  # MCP tools/call tool names, in the body's order
    shapes: tuple[str, ...] = ()  # each tool call's argument shape ("amount:n,to:s")
    body_shape: str = ""  # a JSON object body's top-level keys (not MCP)
    values: tuple[tuple[str, str], ...] = ()  # (sensitive argument, fingerprint)
    key_id: str = ""  # the fingerprints' key (its public id)
    # The tool the Check path decided before this call ('' none; None: not known)
    previous: str | None = None

    def encode(self) -> str:
        """The text Envoy's dynamic metadata carries ('' for no facts)."""
        parts = []
        if self.tools:
            calls = "|".join(f"{t}({s})" for t, s in zip(self.tools, self.shapes, strict=True))
            parts.append("t=" + calls)
        if self.body_shape:
            parts.append("j=" + self.body_shape)
        if self.values:
            parts.append("v=" + ",".join(f"{a}:{fp}" for a, fp in self.values))
            parts.append("k=" + self.key_id)
        if self.previous is not None and parts:
            parts.append("p=" + self.previous)
        return ";".join(parts)[:_MAX_TEXT]  # `describe`'s facts fit: never cut (`_fit`)


NO_FACTS = CallFacts()


@functools.lru_cache(maxsize=4096)
def _plain(name: str) -> bool:
    """Whether ``name`` may be written as it is (cached: tools and argument names repeat)."""
    return NAME.fullmatch(name) is not None


def json_type(value: object) -> str:
    """The JSON Schema type of a parsed JSON value."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "array"


class _Describer:
    __slots__ = ("fingerprint", "sensitive", "values")

    def __init__(self, sensitive: Collection[str], fingerprint: Fingerprint | None) -> None:
        self.sensitive = sensitive
        self.fingerprint = fingerprint
        self.values: list[tuple[str, str]] = []

    def name(self, name: str, i: int) -> str:
        if len(name) <= 64 and _plain(name):  # a longer one is never plain (nor cached)
            return name
        if self.fingerprint is not None:
            try:
                return "#" + self.fingerprint(name)
            except (ValueError, RecursionError):
                pass
        return f"#{i}"

    def shape(self, obj: dict[str, object]) -> str:
        """The argument shape of ``obj``; its sensitive values fingerprinted on the way."""
        entries = []
        for i, (key, value) in enumerate(obj.items()):
            if i < _MAX_KEYS:
                entries.append(f"{self.name(key, i)}:{TYPES[json_type(value)]}")
            if key in self.sensitive and self.fingerprint is not None:
                self.value(self.name(key, i), value)
        entries.sort()
        if len(obj) > _MAX_KEYS:
            entries.append(f"+{len(obj) - _MAX_KEYS}")
        return ",".join(entries)

    def value(self, name: str, value: object) -> None:
        items: list[object] | tuple[object, ...] = (value,)
        if isinstance(value, list):  # beyond 8 items, the rest is one value (never unseen)
            items = (
                value
                if len(value) <= _MAX_ITEMS
                else [*value[: _MAX_ITEMS - 1], value[_MAX_ITEMS - 1 :]]
            )
        fingerprint = self.fingerprint
        assert fingerprint is not None
        for item in items:
            if item is None or item == "":
                continue
            with contextlib.suppress(ValueError, RecursionError):  # no canonical form: skip
                self.values.append((name, fingerprint(item)))

    def bounded_values(self) -> tuple[tuple[str, str], ...]:
        """The call's fingerprints, the 16th standing for all the others (argument ``+``)."""
        values = self.values
        if len(values) <= _MAX_VALUES:
            return tuple(values)
        assert self.fingerprint is not None
        rest = sorted(f"{a}:{fp}" for a, fp in values[_MAX_VALUES - 1 :])
        return (*values[: _MAX_VALUES - 1], ("+", self.fingerprint(rest)))

    def bounded_tools(
        self, tools: list[str], shapes: list[str]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The tools, the 8th standing for all the rest (``+`` and their names' fingerprint,
        or ``+N``)."""
        if len(tools) <= _MAX_TOOLS:
            return tuple(tools), tuple(shapes)
        rest = tools[_MAX_TOOLS - 1 :]
        tail = f"+{len(rest)}"
        if self.fingerprint is not None:
            with contextlib.suppress(ValueError, RecursionError):
                tail = "+" + self.fingerprint(rest)
        return (*tools[: _MAX_TOOLS - 1], tail), (*shapes[: _MAX_TOOLS - 1], "")


def describe(
    body: bytes | None,
    truncated: bool,
    sensitive: Collection[str] = (),
    fingerprint: Fingerprint | None = None,
    key_id: str = "",
) -> CallFacts:
    """The facts of a call with ``body``: MCP `tools/call` messages (their tools, argument
    shapes and sensitive values), else a JSON object's top-level keys (and sensitive
    values), else none (no body, not seen whole, not strict JSON, another JSON value).
    Never raises."""
    if not body or truncated or body.lstrip()[:1] not in (b"{", b"["):
        return NO_FACTS  # the common GET, and bodies that cannot be JSON objects
    doc = parse_json_body(body, truncated)
    if isinstance(doc, JsonRefusal):
        return NO_FACTS
    d = _Describer(sensitive, fingerprint)
    parsed = mcp_messages(doc)
    if parsed.error is None:
        tools: list[str] = []
        shapes: list[str] = []
        for i, m in enumerate(parsed.messages):  # every one: the rules parsed them all too
            if m.tool is None:
                continue  # initialize, tools/list, a notification, a response
            tools.append(d.name(m.tool, i))
            args = m.arguments
            shapes.append(d.shape(args) if isinstance(args, dict) else "")
        if not tools:
            return NO_FACTS
        values = d.bounded_values()
        bounded, their_shapes = d.bounded_tools(tools, shapes)
        facts = CallFacts(bounded, their_shapes, "", values, key_id if values else "")
        return _fit(facts)
    if not isinstance(doc, dict):
        return NO_FACTS
    shape = d.shape(doc)
    values = d.bounded_values()
    return _fit(CallFacts(body_shape=shape, values=values, key_id=key_id if values else ""))


def _fit(facts: CallFacts) -> CallFacts:
    """``facts`` with their shapes shortened, longest first, until the text fits: shapes
    only explain; tools and values are what is judged and learned, and stay whole."""
    if len(facts.encode()) < _MAX_TEXT - _ROOM:
        return facts
    shapes = list(facts.shapes)
    body = facts.body_shape
    for i in sorted(range(len(shapes)), key=lambda i: -len(shapes[i])):
        shapes[i] = _summary(shapes[i])
        if len(replace(facts, shapes=tuple(shapes)).encode()) < _MAX_TEXT - _ROOM:
            return replace(facts, shapes=tuple(shapes))
    return replace(facts, shapes=tuple(shapes), body_shape=_summary(body) if body else "")


def _summary(shape: str) -> str:
    """A shape as its number of arguments (``+N``)."""
    if not shape:
        return shape
    n = 0
    for entry in shape.split(","):
        n += int(entry[1:]) if entry.startswith("+") and entry[1:].isdigit() else 1
    return f"+{n}"


def decode(text: str) -> CallFacts:
    """What :meth:`CallFacts.encode` wrote (bounded as it bounds it); a part that is not
    what it wrote is left out. Never raises."""
    if not text:
        return NO_FACTS
    tools: list[str] = []
    shapes: list[str] = []
    body_shape = key_id = ""
    previous: str | None = None
    values: list[tuple[str, str]] = []
    for part in text[:_MAX_TEXT].split(";"):
        kind, _, rest = part.partition("=")
        if kind == "t":
            for call in rest.split("|")[:_MAX_TOOLS]:
                tool, paren, shape = call.partition("(")
                if tool and paren and shape.endswith(")"):
                    tools.append(tool)
                    shapes.append(shape[:-1])
        elif kind == "j":
            body_shape = rest
        elif kind == "v":
            for item in rest.split(",")[:_MAX_VALUES]:
                arg, _, fp = item.rpartition(":")
                if arg and _FP.fullmatch(fp):
                    values.append((arg, fp))
        elif kind == "k":
            key_id = rest[:64]
        elif kind == "p":
            previous = rest[:65]
    return CallFacts(tuple(tools), tuple(shapes), body_shape, tuple(values), key_id, previous)
