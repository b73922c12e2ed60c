"""Through real Envoy: what reaches the upstream, what is denied and how."""

from __future__ import annotations

import json
import socket
import time

from .conftest import MAX_BODY, Stack

LEDGER = "http://ledger.finance.svc.cluster.local"
MCP = "http://mcp.tools.svc.cluster.local/mcp"
TRACE = "0af7651916cd43dd8448eb211c80319c"


def _arrived(stack: Stack, path: str) -> list[dict[str, object]]:
    return [r for r in stack.upstream.received if r["path"] == path]


def _assert_denied(resp, stack: Stack, path: str, code: str) -> dict[str, object]:  # type: ignore[no-untyped-def]
    assert resp.status == 403, resp.body
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error", "reason", "decision", "trace_id"}
    assert body["error"] == code, body
    assert body["decision"] == resp.headers["x-mandate-decision"]
    assert len(body["decision"]) == 32
    assert not _arrived(stack, path), "a denied call reached the upstream"
    return body  # type: ignore[no-any-return]


def test_allowed_call_reaches_upstream_with_mandate_headers(stack: Stack) -> None:
    path = "/v1/invoices/e2e-allowed"
    resp = stack.call(
        "billing-agent",
        "GET",
        LEDGER + path,
        headers={
            "x-mandate-agent": "research-agent",  # forged: replaced
            "x-mandate-decision": "forged",  # forged: replaced
            "x-mandate-foo": "smuggled",  # not ours: removed
            "x-mandate-task": "inv-42",
            "traceparent": f"00-{TRACE}-b7ad6b7169203331-01",
        },
    )
    assert resp.status == 200, resp.body
    seen = resp.json()
    assert seen["host"] == "ledger.finance.svc.cluster.local"
    assert seen["mandate"]["x-mandate-agent"] == "billing-agent"
    assert seen["mandate"]["x-mandate-purpose"] == "reconcile"
    assert seen["mandate"]["x-mandate-task"] == "inv-42"
    assert "x-mandate-foo" not in seen["mandate"]
    decision = seen["mandate"]["x-mandate-decision"]
    assert decision != "forged" and len(decision) == 32
    assert seen["traceparent"].split("-")[1] == TRACE
    # Envoy's access log records the same decision id.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ids = [r["mandate_decision_id"] for r in stack.envoy.access_records() if r["path"] == path]
        if ids:
            break
        time.sleep(0.05)
    assert ids == [decision]


def test_denied_call_gets_403_json_and_never_leaves(stack: Stack) -> None:
    path = "/v1/ledger/admin/e2e-denied"
    resp = stack.call(
        "billing-agent",
        "GET",
        LEDGER + path,
        headers={"traceparent": f"00-{TRACE}-b7ad6b7169203331-01"},
    )
    body = _assert_denied(resp, stack, path, "denied_by_rule")
    assert "reconcile.deny[0]" in str(body["reason"])
    assert body["trace_id"] == TRACE


def test_dot_segments_cannot_escape_into_a_denied_prefix(stack: Stack) -> None:
    for raw in ["/v1/ledger/x/../admin/e2e-dots", "/v1/ledger/x/%2e%2e/admin/e2e-dots"]:
        resp = stack.call("billing-agent", "GET", LEDGER + raw)
        _assert_denied(resp, stack, "/v1/ledger/admin/e2e-dots", "denied_by_rule")


def test_outside_purpose_and_unknown_purpose(stack: Stack) -> None:
    path = "/v1/reports/e2e-1"
    url = "http://reports.finance.svc.cluster.local" + path
    body = _assert_denied(
        stack.call("billing-agent", "POST", url, body=b"{}"), stack, path, "outside_purpose"
    )
    assert body["reason"] == "outside purpose 'reconcile'"
    body = _assert_denied(
        stack.call("billing-agent", "POST", url, {"X-Mandate-Purpose": "payroll"}, b"{}"),
        stack,
        path,
        "unknown_purpose",
    )
    assert "payroll" in str(body["reason"])
    # The same call under the declared purpose that covers it is allowed.
    resp = stack.call("billing-agent", "POST", url, {"X-Mandate-Purpose": "report"}, b"{}")
    assert resp.status == 200
    assert resp.json()["mandate"]["x-mandate-purpose"] == "report"


def test_spoofed_identity_header_gains_nothing(stack: Stack) -> None:
    """billing-agent's pod claims to be research-agent by header and by purpose name."""
    path = "/api/query?e2e=spoof"
    url = "http://export.arxiv.org" + path
    assert stack.call("research-agent", "GET", url).status == 200
    stack.upstream.received.clear()
    for headers in (
        {"x-mandate-agent": "research-agent"},
        {"x-mandate-agent": "research-agent", "x-mandate-purpose": "literature-search"},
    ):
        resp = stack.call("billing-agent", "GET", url, headers)
        assert resp.status == 403
        assert resp.json()["error"] in ("outside_purpose", "unknown_purpose")
        assert not _arrived(stack, path)


def test_a_smuggled_path_prefix_gains_nothing(stack: Stack) -> None:
    """Over the HTTP transport the agent is named by the path prefix Envoy adds
    (`/mandate;agent=NAME`); a path that starts with another agent's prefix is still the
    calling agent's path (over gRPC it is just a path)."""
    path = "/mandate;agent=research-agent/api/query"
    resp = stack.call("billing-agent", "GET", "http://export.arxiv.org" + path)
    # A `;` in the call's own path is a path parameter: refused as ambiguous (bad_request),
    # whatever follows it; and never decided as research-agent's call.
    body = _assert_denied(resp, stack, path, "bad_request")
    assert "research-agent" not in str(body.get("reason"))


def _rpc(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode()


def test_mcp_tools_are_authorised_from_the_body(stack: Stack) -> None:
    purpose = {"x-mandate-purpose": "tool-use", "content-type": "application/json"}
    ok = stack.call(
        "research-agent", "POST", MCP, purpose, _rpc("tools/call", name="search_papers")
    )
    assert ok.status == 200, ok.body
    assert ok.json()["mcp"]["result"]["content"][0]["text"].startswith("search_papers")
    stack.upstream.received.clear()
    for body, why in [
        (_rpc("tools/call", name="delete_corpus"), "MCP tool 'delete_corpus' not allowed"),
        (_rpc("resources/read", uri="file:///etc/passwd"), "MCP method 'resources/read'"),
        (b"not json", "not JSON"),
        (
            b"["
            + _rpc("tools/call", name="search_papers")
            + b","
            + _rpc("tools/call", name="rm")
            + b"]",
            "MCP tool 'rm' not allowed",
        ),
    ]:
        resp = stack.call("research-agent", "POST", MCP, purpose, body)
        denied = _assert_denied(resp, stack, "/mcp", "outside_purpose")
        assert why in str(denied["reason"]), denied


def test_mcp_body_over_the_limit_is_truncated_and_denied(stack: Stack) -> None:
    """Envoy forwards at most MAX_BODY bytes to mandate; a tool call padded past the limit
    must not be judged from its first bytes."""
    padding = "x" * (MAX_BODY * 2)
    body = _rpc("tools/call", name="search_papers", arguments={"q": padding})
    purpose = {"x-mandate-purpose": "tool-use", "content-type": "application/json"}
    stack.upstream.received.clear()
    resp = stack.call("research-agent", "POST", MCP, purpose, body)
    denied = _assert_denied(resp, stack, "/mcp", "outside_purpose")
    assert "truncated" in str(denied["reason"])
    # A forged "not partial" header does not change that.
    forged = purpose | {"x-envoy-auth-partial-body": "false"}
    resp = stack.call("research-agent", "POST", MCP, forged, body)
    _assert_denied(resp, stack, "/mcp", "outside_purpose")


def _connect(stack: Stack, agent: str, target: str) -> tuple[int, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", stack.port(agent)), timeout=5)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, sock


def test_connect_tunnels_are_authorised_by_host_and_port(stack: Stack) -> None:
    status, sock = _connect(stack, "tunnel-agent", "tunnel.example.com:443")
    try:
        assert status == 200
        # The tunnel is real: plain HTTP through it reaches the (test) upstream.
        sock.sendall(
            b"GET /through-tunnel HTTP/1.1\r\nHost: tunnel.example.com\r\nConnection: close\r\n\r\n"
        )
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        assert b"/through-tunnel" in data
    finally:
        sock.close()
    for agent, target in [
        ("tunnel-agent", "tunnel.example.com:8443"),  # port not in the rule
        ("tunnel-agent", "files.example.com:443"),  # a path rule never admits a tunnel
        ("billing-agent", "tunnel.example.com:443"),  # another agent's rule
    ]:
        status, sock = _connect(stack, agent, target)
        sock.close()
        assert status == 403, (agent, target)


def test_header_based_purpose_is_case_insensitive_and_rules_are_per_agent(stack: Stack) -> None:
    resp = stack.call("tunnel-agent", "GET", "http://files.example.com/public/a/b")
    assert resp.status == 200
    assert resp.json()["mandate"]["x-mandate-agent"] == "tunnel-agent"
    resp = stack.call("tunnel-agent", "GET", "http://FILES.example.com/public/secret/x")
    assert resp.status == 403
    assert resp.json()["error"] == "denied_by_rule"
