"""MCP JSON-RPC bodies (sidecar/core/mcp.py), alone and through allow and deny rules."""

from __future__ import annotations

import json

import pytest

from sidecar.core.mcp import McpBody, McpMessage, mcp_allows, mcp_denies, parse_mcp_body
from sidecar.core.model import Rule
from sidecar.core.rules import compile_rules


def rpc(method: str, tool: str | None = None, *, id_: int | None = 1) -> dict[str, object]:
    """One JSON-RPC request (or notification when ``id_`` is None)."""
    msg: dict[str, object] = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        msg["id"] = id_
    if tool is not None:
        msg["params"] = {"name": tool, "arguments": {}}
    return msg


def body(*messages: object, batch: bool = False) -> bytes:
    doc = list(messages) if batch else messages[0]
    return json.dumps(doc).encode()


CALL_SEARCH = body(rpc("tools/call", "search_papers"))
CALL_DELETE = body(rpc("tools/call", "delete_all"))
RESPONSE = body({"jsonrpc": "2.0", "id": 7, "result": {}})


@pytest.mark.parametrize(
    ("raw", "truncated", "expected"),
    [
        pytest.param(
            CALL_SEARCH,
            False,
            McpBody((McpMessage("tools/call", "search_papers"),)),
            id="tools-call",
        ),
        pytest.param(
            body(rpc("initialize"), rpc("notifications/initialized", id_=None), batch=True),
            False,
            McpBody(
                (
                    McpMessage("initialize", None),
                    McpMessage("notifications/initialized", None, notification=True),
                )
            ),
            id="batch",
        ),
        pytest.param(RESPONSE, False, McpBody((McpMessage(None, None),)), id="response"),
        pytest.param(
            body({"jsonrpc": "2.0", "id": 7, "error": {"code": 1, "message": "x"}}),
            False,
            McpBody((McpMessage(None, None),)),
            id="error-response",
        ),
        pytest.param(None, False, McpBody((), "MCP body missing"), id="missing"),
        pytest.param(b"", False, McpBody((), "MCP body missing"), id="empty"),
        pytest.param(CALL_SEARCH, True, McpBody((), "MCP body truncated"), id="truncated"),
        pytest.param(b'{"jsonrpc": "2.0", "met', False, McpBody((), "not JSON"), id="cut-json"),
        pytest.param(b"\xff\xfe", False, McpBody((), "not JSON"), id="binary"),
        pytest.param(b"[" * 100_000, False, McpBody((), "not JSON"), id="deep-nesting"),
        pytest.param(b"[]", False, McpBody((), "empty JSON-RPC batch"), id="empty-batch"),
        pytest.param(b'"hello"', False, McpBody((), "not a JSON-RPC 2.0"), id="json-string"),
        pytest.param(
            body({"jsonrpc": "1.0", "id": 1, "method": "ping"}),
            False,
            McpBody((), "not a JSON-RPC 2.0"),
            id="wrong-version",
        ),
        pytest.param(
            body({"id": 1, "method": "ping"}),
            False,
            McpBody((), "not a JSON-RPC 2.0"),
            id="no-version",
        ),
        pytest.param(
            body({"jsonrpc": "2.0", "id": 1}),
            False,
            McpBody((), "without a method"),
            id="no-method-no-result",
        ),
        pytest.param(
            body({"jsonrpc": "2.0", "id": 1, "method": 5}),
            False,
            McpBody((), "method is not a string"),
            id="method-not-string",
        ),
        pytest.param(
            body({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}),
            False,
            McpBody((), "tools/call without a tool name"),
            id="tools-call-no-name",
        ),
        pytest.param(
            body({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["x"]}),
            False,
            McpBody((), "tools/call without a tool name"),
            id="tools-call-params-list",
        ),
        pytest.param(
            body(rpc("ping"), "junk", batch=True),
            False,
            McpBody((), "not a JSON-RPC 2.0"),
            id="batch-with-junk",
        ),
    ],
)
def test_parse_mcp_body(raw: bytes | None, truncated: bool, expected: McpBody) -> None:
    parsed = parse_mcp_body(raw, truncated)
    assert parsed.messages == expected.messages
    if expected.error is None:
        assert parsed.error is None
    else:
        assert parsed.error is not None
        assert expected.error in parsed.error


TOOLS = frozenset({"search_papers", "fetch_abstract"})


@pytest.mark.parametrize(
    ("raw", "methods", "refusal"),
    [
        pytest.param(CALL_SEARCH, (), None, id="listed-tool"),
        pytest.param(CALL_DELETE, (), "MCP tool 'delete_all' not allowed", id="unlisted-tool"),
        pytest.param(body(rpc("initialize")), (), None, id="initialize"),
        pytest.param(body(rpc("ping")), (), None, id="ping"),
        pytest.param(body(rpc("tools/list")), (), None, id="tools-list"),
        pytest.param(body(rpc("notifications/initialized", id_=None)), (), None, id="notification"),
        pytest.param(
            body(rpc("notifications/cancelled", id_=None)), (), None, id="any-notification"
        ),
        # Issue 15: with an `id` it is a request, not a notification: an unknown method.
        pytest.param(
            body(rpc("notifications/cancelled")),
            (),
            "MCP method 'notifications/cancelled' not allowed",
            id="notification-with-id-is-a-request",
        ),
        pytest.param(
            body(rpc("notifications/initialized", "delete_all")),
            (),
            "MCP method 'notifications/initialized' not allowed",
            id="notification-with-id-and-tool-name",
        ),
        pytest.param(
            body({"jsonrpc": "2.0", "id": None, "method": "notifications/initialized"}),
            (),
            "MCP method 'notifications/initialized' not allowed",
            id="notification-with-null-id",
        ),
        pytest.param(
            body(rpc("notifications/cancelled")),
            ("notifications/cancelled",),
            None,
            id="notification-with-id-listed",
        ),
        pytest.param(
            body(rpc("initialize"), rpc("notifications/initialized", "delete_all"), batch=True),
            (),
            "MCP method 'notifications/initialized' not allowed",
            id="notification-with-id-in-a-batch",
        ),
        pytest.param(RESPONSE, (), None, id="json-rpc-response"),
        pytest.param(
            body(rpc("resources/read")),
            (),
            "MCP method 'resources/read' not allowed",
            id="resources-read-denied",
        ),
        pytest.param(body(rpc("resources/read")), ("resources/read",), None, id="resources-listed"),
        pytest.param(
            body(rpc("prompts/get")),
            ("resources/read",),
            "MCP method 'prompts/get' not allowed",
            id="prompts-not-listed",
        ),
        pytest.param(
            body(rpc("resources/list")),
            (),
            "MCP method 'resources/list' not allowed",
            id="resources-list-denied",
        ),
        pytest.param(
            body(rpc("initialize"), rpc("tools/call", "fetch_abstract"), batch=True),
            (),
            None,
            id="batch-all-pass",
        ),
        pytest.param(
            body(rpc("tools/call", "search_papers"), rpc("tools/call", "delete_all"), batch=True),
            (),
            "MCP tool 'delete_all' not allowed",
            id="batch-one-fails",
        ),
        pytest.param(None, (), "MCP body missing", id="missing"),
        pytest.param(b"not json", (), "not JSON", id="not-json"),
        pytest.param(body({"hello": "world"}), (), "not a JSON-RPC 2.0", id="not-json-rpc"),
    ],
)
def test_mcp_allows(raw: bytes | None, methods: tuple[str, ...], refusal: str | None) -> None:
    why = mcp_allows(parse_mcp_body(raw, False), TOOLS, frozenset(methods))
    if refusal is None:
        assert why is None
    else:
        assert why is not None
        assert refusal in why


@pytest.mark.parametrize(
    ("raw", "tools", "methods", "denied"),
    [
        pytest.param(CALL_DELETE, {"delete_all"}, (), True, id="listed-tool"),
        pytest.param(CALL_SEARCH, {"delete_all"}, (), False, id="other-tool"),
        pytest.param(
            body(rpc("ping"), rpc("tools/call", "delete_all"), batch=True),
            {"delete_all"},
            (),
            True,
            id="batch-any-element",
        ),
        pytest.param(body(rpc("prompts/get")), set(), ("prompts/get",), True, id="listed-method"),
        pytest.param(body(rpc("ping")), set(), ("prompts/get",), False, id="other-method"),
        pytest.param(RESPONSE, {"delete_all"}, ("prompts/get",), False, id="response"),
        pytest.param(None, {"delete_all"}, (), True, id="missing-body"),
        pytest.param(b"{", {"delete_all"}, (), True, id="not-json"),
        pytest.param(body([1]), {"delete_all"}, (), True, id="not-json-rpc"),
    ],
)
def test_mcp_denies(
    raw: bytes | None, tools: set[str], methods: tuple[str, ...], denied: bool
) -> None:
    assert mcp_denies(parse_mcp_body(raw, False), frozenset(tools), frozenset(methods)) is denied


def test_truncated_body_never_allowed_and_always_denied() -> None:
    parsed = parse_mcp_body(CALL_SEARCH, True)
    assert mcp_allows(parsed, TOOLS, frozenset()) is not None
    assert mcp_denies(parsed, frozenset({"other"}), frozenset())


# Through compiled rules: the body is read only by rules that name MCP fields.

ALLOW = [
    {
        "hosts": ["mcp.tools.svc.cluster.local"],
        "methods": ["POST"],
        "paths": ["/mcp"],
        "mcpTools": ["search_papers", "fetch_abstract"],
    },
]
DENY = [{"hosts": ["mcp.tools.svc.cluster.local"], "mcpTools": ["delete_all"]}]


def _lookup(rules: list[dict[str, object]], raw: bytes | None, *, deny: bool) -> str | None:
    index = compile_rules([Rule.model_validate(r) for r in rules], "p.deny" if deny else "p.allow")
    match = index.lookup(
        "mcp.tools.svc.cluster.local",
        80,
        "POST",
        "/mcp",
        lambda: parse_mcp_body(raw, False),
        deny=deny,
    )
    if match.rule is not None:
        return match.rule.rule_id
    return match.mcp_refusal


@pytest.mark.parametrize(
    ("rules", "raw", "deny", "expected"),
    [
        pytest.param(ALLOW, CALL_SEARCH, False, "p.allow[0]", id="allow-listed-tool"),
        pytest.param(
            ALLOW, CALL_DELETE, False, "MCP tool 'delete_all' not allowed", id="allow-refuses"
        ),
        pytest.param(
            ALLOW,
            None,
            False,
            "MCP body missing (is with_request_body set in Envoy?)",
            id="allow-missing-body",
        ),
        pytest.param(
            [*ALLOW, {"hosts": ["mcp.tools.svc.cluster.local"], "mcpMethods": ["resources/read"]}],
            body(rpc("resources/read")),
            False,
            "p.allow[1]",
            id="second-rule-lists-method",
        ),
        pytest.param(DENY, CALL_DELETE, True, "p.deny[0]", id="deny-listed-tool"),
        pytest.param(DENY, CALL_SEARCH, True, None, id="deny-other-tool"),
        pytest.param(DENY, b"garbage", True, "p.deny[0]", id="deny-unparseable"),
        pytest.param(DENY, None, True, "p.deny[0]", id="deny-missing-body"),
    ],
)
def test_mcp_rules(
    rules: list[dict[str, object]], raw: bytes | None, deny: bool, expected: str | None
) -> None:
    assert _lookup(rules, raw, deny=deny) == expected


# Issue 15: a JSON-RPC id is a string, an integer or null. Anything else is malformed: a
# number Python reads as infinity (`1e999`), a fraction, a boolean, an object or array, or
# an integer past 2**53 - 1 (JavaScript and other double-based parsers read another number).
_ID_ERROR = "JSON-RPC id must be a string, an integer within +-(2**53 - 1) or null"


def _with_id(id_text: str, method: str = "tools/call") -> bytes:
    return (
        f'{{"jsonrpc": "2.0", "id": {id_text}, "method": "{method}", '
        '"params": {"name": "search_papers"}}'
    ).encode()


@pytest.mark.parametrize(
    "id_text",
    [
        pytest.param("1e999", id="infinite"),
        pytest.param("-1e999", id="minus-infinite"),
        pytest.param("1e308", id="huge-float"),
        pytest.param("1.5", id="fraction"),
        pytest.param("1.0", id="float-integral"),
        pytest.param("1e2", id="exponent"),
        pytest.param("-0.0", id="negative-zero"),
        pytest.param("true", id="true"),
        pytest.param("false", id="false"),
        pytest.param("{}", id="object"),
        pytest.param('{"a": 1}', id="object-with-member"),
        pytest.param("[]", id="array"),
        pytest.param("[1]", id="array-of-int"),
        pytest.param(str(2**53), id="past-2-53"),
        pytest.param(str(-(2**53)), id="past-minus-2-53"),
        pytest.param("9" * 400, id="400-digits"),
    ],
)
def test_a_malformed_id_is_refused(id_text: str) -> None:
    for raw in (_with_id(id_text), _with_id(id_text, "notifications/initialized")):
        parsed = parse_mcp_body(raw, False)
        assert parsed.error is not None and _ID_ERROR in parsed.error, parsed
        assert mcp_allows(parsed, TOOLS, frozenset()) is not None
        assert mcp_denies(parsed, frozenset(), frozenset())
    response = f'{{"jsonrpc": "2.0", "id": {id_text}, "result": {{}}}}'.encode()
    assert _ID_ERROR in (parse_mcp_body(response, False).error or "")


@pytest.mark.parametrize(
    "id_text",
    [
        pytest.param("1", id="one"),
        pytest.param("0", id="zero"),
        pytest.param("-7", id="negative"),
        pytest.param(str(2**53 - 1), id="max-safe"),
        pytest.param(str(-(2**53 - 1)), id="min-safe"),
        pytest.param('"abc"', id="string"),
        pytest.param('""', id="empty-string"),
        pytest.param("null", id="null"),
    ],
)
def test_a_well_formed_id_is_accepted(id_text: str) -> None:
    parsed = parse_mcp_body(_with_id(id_text), False)
    assert parsed.error is None
    assert parsed.messages == (McpMessage("tools/call", "search_papers"),)
    assert mcp_allows(parsed, TOOLS, frozenset()) is None
