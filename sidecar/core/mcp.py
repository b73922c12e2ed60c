"""MCP (JSON-RPC over streamable HTTP) request bodies, read for authorization (pure).

A body is parsed at most once per decision into :class:`McpBody`. A rule with `mcpTools`
or `mcpMethods` allows the call only if every message in it passes (`mcp_allows`); a deny
rule with those fields matches if any message names what it lists (`mcp_denies`). A body
that is missing, truncated by Envoy's `with_request_body` limit (`authz.body_truncated` also
counts a body without the call's Content-Length as truncated: nothing shows it whole), not JSON,
or not JSON-RPC 2.0 never passes an allow rule and always matches a deny rule.

"Not JSON" is strict (RFC 8259), because the upstream parses the same bytes with a parser
of its own and must not read a tool or method other than the one decided here: a body must
be UTF-8 without a byte order mark, without NaN/Infinity, with no object naming a key twice
(Python keeps the last value, other parsers the first: `{"name": "allowed", "name":
"forbidden"}`), and nested no deeper than the parser's recursion limit. A method that is
`tools/call` in another case is refused too (an upstream may fold it and run the tool), and
so is a method or tool name with a lone surrogate escape (`"\\udcff"`), and a message whose
`id` is not a string, an integer within +-(2**53 - 1) (what every JSON parser, JavaScript's
too, reads as the same integer) or null: `1e999` (Python reads infinity), `1.5`, `true`,
an object, an array, a 400-digit integer. A JSON-RPC notification is a message without an
`id`; `notifications/...` with an `id` is a request, so it passes only as a method a rule
lists in `mcpMethods`, never as a session notification.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.core.arguments import Validator, check

__all__ = [
    "SESSION_METHODS",
    "JsonRefusal",
    "McpBody",
    "McpMessage",
    "mcp_allows",
    "mcp_denies",
    "mcp_messages",
    "parse_json_body",
    "parse_mcp_body",
    "tool_call_body",
    "tool_call_from_json",
]

# Methods that open, keep alive or describe a session; they reach no tool or data.
SESSION_METHODS = frozenset({"initialize", "ping", "tools/list"})
_TOOLS_CALL = "tools/call"
_MAX_ID = 2**53 - 1  # JSON numbers beyond this are not the same integer to every parser
_TRUNCATED = (
    "MCP body truncated at Envoy's with_request_body limit "
    "(or, without a Content-Length, not shown complete)"
)


@dataclass(frozen=True, slots=True)
class McpMessage:
    """One JSON-RPC message: ``method`` is None for a response; ``tool`` is set for tools/call."""

    method: str | None
    tool: str | None
    notification: bool = False  # no `id` member: JSON-RPC's notification
    # tools/call: params.arguments as sent (None: absent); not part of the message's identity
    arguments: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class McpBody:
    """A parsed body: either messages, or an ``error`` saying why it is not usable."""

    messages: tuple[McpMessage, ...]
    error: str | None = None


def _message(obj: object) -> McpMessage | str:
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return "not a JSON-RPC 2.0 message"
    notification = "id" not in obj
    if not notification:
        id_ = obj["id"]
        if not (
            id_ is None
            or isinstance(id_, str)
            # bool is an int in Python: `true` is no id
            or (type(id_) is int and -_MAX_ID <= id_ <= _MAX_ID)
        ):
            why = "JSON-RPC id must be a string, an integer within +-(2**53 - 1) or null"
            return f"{why}, got {_short(id_)}"
    method = obj.get("method")
    if method is None:
        if "id" in obj and ("result" in obj or "error" in obj):
            return McpMessage(method=None, tool=None)  # the client answering a server request
        return "JSON-RPC message without a method"
    if not isinstance(method, str):
        return "JSON-RPC method is not a string"
    if not _unicode(method):
        return "JSON-RPC method is not valid Unicode (a lone surrogate escape)"
    if method != _TOOLS_CALL and method.casefold() == _TOOLS_CALL:
        return f"JSON-RPC method {method[:64]!r} is {_TOOLS_CALL!r} in another case"
    tool = None
    arguments: object = None
    if method == _TOOLS_CALL:
        params = obj.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str):
            return "tools/call without a tool name"
        if not _unicode(name):
            return "tools/call tool name is not valid Unicode (a lone surrogate escape)"
        tool = name
        arguments = params.get("arguments")  # type: ignore[union-attr]
    return McpMessage(method=method, tool=tool, notification=notification, arguments=arguments)


def _name(text: str) -> str:
    """A tool or method name as a reason quotes it: the call's text, so at most 64
    characters of it."""
    return repr(text) if len(text) <= 64 else repr(text[:61]) + "..."


def _short(value: object) -> str:
    if isinstance(value, dict | list):
        return "an object" if isinstance(value, dict) else "an array"
    text = repr(value)  # a float (inf, 1.5), a bool, a big int
    return text if len(text) <= 40 else text[:37] + "..."


def _unicode(s: str) -> bool:
    """False for a string with a lone surrogate: JSON lets `\\udcff` through, but it is no
    character (I-JSON, RFC 7493, refuses it), other parsers read it each their own way, and
    no UTF-8 can carry it (the audit trail, spans)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Refused(ValueError):
    """A body json.loads would take that this module refuses: ``args[0]`` says why."""


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _Refused(f"MCP body is not JSON: key {dup[:64]!r} appears twice in an object")
    return obj


def _constant(name: str) -> object:
    raise _Refused(f"MCP body is not JSON: {name} is not a JSON value")


def parse_mcp_body(body: bytes | None, truncated: bool) -> McpBody:
    """Parse an MCP request body; never raises."""
    if body is None or body == b"":
        return McpBody((), "MCP body missing (is with_request_body set in Envoy?)")
    if truncated:
        return McpBody((), _TRUNCATED)
    if body.startswith(b"\xef\xbb\xbf"):
        return McpBody((), "MCP body is not JSON: it starts with a byte order mark")
    try:
        # Decoded here, strictly: json.loads(bytes) would also take UTF-16/32 and a BOM.
        doc = json.loads(body.decode("utf-8"), object_pairs_hook=_object, parse_constant=_constant)
    except _Refused as exc:
        return McpBody((), str(exc))
    except RecursionError:
        return McpBody((), "MCP body is not JSON: nested too deeply")
    except UnicodeDecodeError:
        return McpBody((), "MCP body is not JSON: not UTF-8")
    except ValueError:
        return McpBody((), "MCP body is not JSON")
    return mcp_messages(doc)


def mcp_messages(doc: object) -> McpBody:
    """The JSON-RPC messages of a body already parsed as strict JSON (a message, or a batch
    of them): what `parse_mcp_body` makes of the same bytes."""
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        return McpBody((), "empty JSON-RPC batch")
    messages: list[McpMessage] = []
    for item in items:
        msg = _message(item)
        if isinstance(msg, str):
            return McpBody((), msg)
        messages.append(msg)
    return McpBody(tuple(messages))


def _session_method(msg: McpMessage, method: str) -> bool:
    """`initialize`, `ping`, `tools/list`, and a notification (no `id`) `notifications/...`."""
    return method in SESSION_METHODS or (msg.notification and method.startswith("notifications/"))


def mcp_allows(
    body: McpBody,
    tools: frozenset[str],
    methods: frozenset[str],
    arguments: Mapping[str, Validator] | None = None,
) -> str | None:
    """None if every message is allowed by a rule listing ``tools`` and ``methods`` (and,
    for a tool with ``arguments`` constraints, whose arguments satisfy them); otherwise the
    reason the first refused message is refused."""
    if body.error is not None:
        return body.error
    for msg in body.messages:
        if msg.method is None or _session_method(msg, msg.method) or msg.method in methods:
            continue
        if msg.tool is not None:
            if msg.tool not in tools:
                return f"MCP tool {_name(msg.tool)} not allowed"
            if arguments:
                validator = arguments.get(msg.tool)
                if validator is not None:
                    why = check(validator, msg.arguments, msg.tool)
                    if why is not None:
                        return why
            continue
        return f"MCP method {_name(msg.method)} not allowed"
    return None


def mcp_denies(body: McpBody, tools: frozenset[str], methods: frozenset[str]) -> bool:
    """True if a deny rule listing ``tools`` and ``methods`` (case-folded: the compiled
    rule's `mcp_methods_folded`) matches this body. Methods match in any case: an upstream
    that folds case must not run a method denied here."""
    if body.error is not None:
        return True
    return any(
        (msg.tool is not None and msg.tool in tools)
        or (msg.method is not None and msg.method.casefold() in methods)
        for msg in body.messages
    )


@dataclass(frozen=True, slots=True)
class JsonRefusal:
    """Why a body cannot be checked against a rule's `jsonBody`."""

    why: str


def parse_json_body(body: bytes | None, truncated: bool) -> object:
    """The JSON value of a plain HTTP body for `jsonBody` rules, read as strictly as an MCP
    body (UTF-8, no byte order mark, no duplicate keys, no NaN/Infinity), or a JsonRefusal.
    Never raises."""
    if body is None or body == b"":
        return JsonRefusal("missing (is with_request_body set in Envoy?)")
    if truncated:
        return JsonRefusal("not seen whole (Envoy's with_request_body limit, or no length)")
    if body.startswith(b"\xef\xbb\xbf"):
        return JsonRefusal("not JSON: it starts with a byte order mark")
    try:
        return json.loads(body.decode("utf-8"), object_pairs_hook=_object, parse_constant=_constant)
    except _Refused as exc:
        return JsonRefusal(str(exc).removeprefix("MCP body is "))
    except RecursionError:
        return JsonRefusal("not JSON: nested too deeply")
    except (UnicodeDecodeError, ValueError):
        return JsonRefusal("not JSON")


def tool_call_body(tool: str, arguments: object = None, request_id: int = 1) -> bytes:
    """The JSON-RPC body of an MCP `tools/call` of ``tool`` (``arguments`` None: without
    arguments), as `mandate explain` and the context API's Explain build it."""
    params: dict[str, object] = {"name": tool}
    if arguments is not None:
        params["arguments"] = arguments
    message = {"jsonrpc": "2.0", "id": request_id, "method": _TOOLS_CALL, "params": params}
    return json.dumps(message, ensure_ascii=False, allow_nan=False).encode()


def tool_call_from_json(tool: str, arguments: str | bytes | None) -> bytes:
    """`tool_call_body` with the arguments given as JSON text (None or empty: none); a
    ValueError says what is wrong with them (the caller names the field)."""
    args: object = None
    if arguments:
        try:
            args = json.loads(arguments)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(args, dict):
            raise ValueError("expected a JSON object")
    try:
        return tool_call_body(tool, args)
    except (TypeError, ValueError):
        raise ValueError("not plain JSON") from None
