"""MCP (JSON-RPC over streamable HTTP) request bodies, read for authorization (pure).

A body is parsed at most once per decision into :class:`McpBody`. A rule with `mcpTools`
or `mcpMethods` allows the call only if every message in it passes (`mcp_allows`); a deny
rule with those fields matches if any message names what it lists (`mcp_denies`). A body
that is missing, truncated by Envoy's `with_request_body` limit, not JSON, or not JSON-RPC
2.0 never passes an allow rule and always matches a deny rule. This module must not import
any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "SESSION_METHODS",
    "McpBody",
    "McpMessage",
    "mcp_allows",
    "mcp_denies",
    "parse_mcp_body",
]

# Methods that open, keep alive or describe a session; they reach no tool or data.
SESSION_METHODS = frozenset({"initialize", "ping", "tools/list"})


@dataclass(frozen=True, slots=True)
class McpMessage:
    """One JSON-RPC message: ``method`` is None for a response; ``tool`` is set for tools/call."""

    method: str | None
    tool: str | None


@dataclass(frozen=True, slots=True)
class McpBody:
    """A parsed body: either messages, or an ``error`` saying why it is not usable."""

    messages: tuple[McpMessage, ...]
    error: str | None = None


def _message(obj: object) -> McpMessage | str:
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return "not a JSON-RPC 2.0 message"
    method = obj.get("method")
    if method is None:
        if "id" in obj and ("result" in obj or "error" in obj):
            return McpMessage(method=None, tool=None)  # the client answering a server request
        return "JSON-RPC message without a method"
    if not isinstance(method, str):
        return "JSON-RPC method is not a string"
    tool = None
    if method == "tools/call":
        params = obj.get("params")
        name = params.get("name") if isinstance(params, dict) else None
        if not isinstance(name, str):
            return "tools/call without a tool name"
        tool = name
    return McpMessage(method=method, tool=tool)


def parse_mcp_body(body: bytes | None, truncated: bool) -> McpBody:
    """Parse an MCP request body; never raises."""
    if body is None or body == b"":
        return McpBody((), "MCP body missing (is with_request_body set in Envoy?)")
    if truncated:
        return McpBody((), "MCP body truncated at Envoy's with_request_body limit")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return McpBody((), "MCP body is not JSON")
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


def _session_method(method: str) -> bool:
    return method in SESSION_METHODS or method.startswith("notifications/")


def mcp_allows(body: McpBody, tools: frozenset[str], methods: frozenset[str]) -> str | None:
    """None if every message is allowed by a rule listing ``tools`` and ``methods``;
    otherwise the reason the first refused message is refused."""
    if body.error is not None:
        return body.error
    for msg in body.messages:
        if msg.method is None or _session_method(msg.method) or msg.method in methods:
            continue
        if msg.tool is not None:
            if msg.tool not in tools:
                return f"MCP tool {msg.tool!r} not allowed"
            continue
        return f"MCP method {msg.method!r} not allowed"
    return None


def mcp_denies(body: McpBody, tools: frozenset[str], methods: frozenset[str]) -> bool:
    """True if a deny rule listing ``tools`` and ``methods`` matches this body."""
    if body.error is not None:
        return True
    return any(
        (msg.tool is not None and msg.tool in tools)
        or (msg.method is not None and msg.method in methods)
        for msg in body.messages
    )
