"""The HTTP transport (Envoy's ext_authz `http_service`): the path prefix grammar, and the
real Sidecar with `transport="http"` on 127.0.0.1:0, asked the way Envoy asks."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.authz import Authorizer, Identity
from sidecar.core import Snapshot
from sidecar.errors import BadRequestError, ConfigError
from sidecar.ext_authz import AuthorizationServicer
from sidecar.http_authz import HttpAuthzServer, parse_target
from sidecar.server import ServeConfig, Sidecar

from .conftest import TRACE_ID, TRACEPARENT, build_check

LEDGER = "ledger.finance.svc.cluster.local"
MCP_HOST = "mcp.tools.svc.cluster.local"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/mandate/v1/invoices/42?x=1", ("", False, "/v1/invoices/42?x=1")),
        ("/mandate;agent=billing-agent/v1/a", ("billing-agent", False, "/v1/a")),
        ("/mandate;agent=/v1/a", ("", False, "/v1/a")),
        ("/mandate;agent=billing-agent;connect", ("billing-agent", True, "")),
        ("/mandate;connect", ("", True, "")),
        ("/mandate/", ("", False, "/")),
        # Exactly one prefix: whatever follows is the call's own path, prefixes included.
        (
            "/mandate;agent=billing-agent/mandate;agent=research-agent/x",
            ("billing-agent", False, "/mandate;agent=research-agent/x"),
        ),
        ("/mandate/;agent=research-agent/x", ("", False, "/;agent=research-agent/x")),
        ("/mandate;agent=a/;connect", ("a", False, "/;connect")),
    ],
)
def test_parse_target(raw: str, expected: tuple[str, bool, str]) -> None:
    assert parse_target(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/invoices/42",  # no prefix: not from the envoy/ configs
        "/",
        "",
        "/mandatex/v1",
        "/mandate",  # no path and not a CONNECT check
        "/mandate*",
        "/mandate;agent=a",
        "/mandate;agent=a;connect/x",
        "/mandate;connect/x",
        "/mandate;agent=a;agent=b/x",
        "/mandate;other=1/x",
        "/MANDATE/v1",
    ],
)
def test_parse_target_rejects(raw: str) -> None:
    with pytest.raises(BadRequestError):
        parse_target(raw)


# --- the real server ---------------------------------------------------------------------


def config(profiles: Path, **kw: Any) -> ServeConfig:
    base: dict[str, Any] = {
        "profiles": profiles,
        "listen": "127.0.0.1:0",
        "admin": None,
        "agent": None,
        "poll_seconds": 0.2,
        "transport": "http",
    }
    return ServeConfig(**(base | kw))


@pytest.fixture
def sidecar(profiles_dir: Path) -> Iterator[Sidecar]:
    s = Sidecar(config(profiles_dir))
    s.start()
    try:
        yield s
    finally:
        s.stop(grace=0.2)


def ask(
    port: int,
    method: str,
    path: str,
    host: str = LEDGER,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request shaped as Envoy's ext_authz HTTP client sends it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_denied(answer: tuple[int, dict[str, str], bytes], error: str) -> dict[str, Any]:
    status, headers, raw = answer
    assert status == 403, raw
    assert headers["content-type"] == "application/json"
    assert headers["x-mandate-outcome"] == "deny"
    body: dict[str, Any] = json.loads(raw)
    assert set(body) == {"error", "reason", "decision", "trace_id"}
    assert body["error"] == error, body
    assert len(body["decision"]) == 32
    assert headers["x-mandate-decision"] == body["decision"]
    assert "x-mandate-agent" not in headers
    return body


def assert_allowed(answer: tuple[int, dict[str, str], bytes]) -> dict[str, str]:
    status, headers, raw = answer
    assert status == 200, raw
    assert headers["x-mandate-outcome"] == "allow"
    assert len(headers["x-mandate-decision"]) == 32
    return headers


def test_allow_sets_headers_and_lists_the_agents_others_to_remove(sidecar: Sidecar) -> None:
    headers = assert_allowed(
        ask(
            sidecar.http_port,
            "GET",
            "/mandate;agent=billing-agent/v1/invoices/42?expand=lines",
            headers={
                "x-mandate-agent": "research-agent",
                "x-mandate-decision": "forged",
                "x-mandate-foo": "1",
                "X-Mandate-Elevation": "refund",
                "x-mandate-task": "   ",  # blank: no task, so the agent's value must go
                "traceparent": TRACEPARENT,
            },
        )
    )
    assert headers["x-mandate-agent"] == "billing-agent"
    assert headers["x-mandate-purpose"] == "reconcile"
    assert headers["x-mandate-decision"] != "forged"
    assert "x-mandate-task" not in headers
    removed = set(headers["x-envoy-auth-headers-to-remove"].split(","))
    assert removed == {"x-mandate-foo", "x-mandate-elevation", "x-mandate-task"}


def test_allow_without_agent_headers_removes_nothing(sidecar: Sidecar) -> None:
    headers = assert_allowed(
        ask(
            sidecar.http_port,
            "POST",
            "/mandate;agent=billing-agent/v1/reports/2026-01",
            host="reports.finance.svc.cluster.local",
            headers={"x-mandate-purpose": "report", "x-mandate-task": "INV-1"},
            body=b'{"month": "2026-01"}',
        )
    )
    assert (headers["x-mandate-purpose"], headers["x-mandate-task"]) == ("report", "INV-1")
    # x-mandate-purpose and -task are the agent's declarations: Envoy overwrites them.
    assert "x-envoy-auth-headers-to-remove" not in headers


def test_deny_has_json_body_and_trace_id(sidecar: Sidecar) -> None:
    body = assert_denied(
        ask(
            sidecar.http_port,
            "GET",
            "/mandate;agent=billing-agent/v1/ledger/admin/x",
            headers={"traceparent": TRACEPARENT},
        ),
        "denied_by_rule",
    )
    assert "reconcile.deny[0]" in body["reason"]
    assert body["trace_id"] == TRACE_ID


def test_a_path_cannot_smuggle_another_agents_prefix(sidecar: Sidecar) -> None:
    """Envoy puts the prefix in front of the call's path: a prefix inside that path is
    just path, and the agent named by Envoy's stays the agent."""
    body = assert_denied(
        ask(
            sidecar.http_port,
            "GET",
            "/mandate;agent=billing-agent/mandate;agent=research-agent/api/query",
            host="export.arxiv.org",
        ),
        "bad_request",  # a `;` in the call's own path: refused as ambiguous
    )
    assert body["reason"] == "malformed or ambiguous path"
    assert_allowed(
        ask(
            sidecar.http_port,
            "GET",
            "/mandate;agent=research-agent/api/query",
            host="export.arxiv.org",
        )
    )


@pytest.mark.parametrize(
    "path", ["/v1/invoices/42", "/mandate", "/mandate;agent=billing-agent", "/healthz"]
)
def test_no_prefix_or_no_path_is_a_bad_request_deny(sidecar: Sidecar, path: str) -> None:
    body = assert_denied(ask(sidecar.http_port, "GET", path), "bad_request")
    assert "prefix" in body["reason"] or "path" in body["reason"]


def test_no_identity_is_unattributed(sidecar: Sidecar) -> None:
    assert_denied(ask(sidecar.http_port, "GET", "/mandate/v1/invoices/42"), "unattributed")


def test_configured_agent_attributes_and_a_conflicting_prefix_is_denied(
    profiles_dir: Path,
) -> None:
    s = Sidecar(config(profiles_dir, agent="billing-agent"))
    s.start()
    try:
        headers = assert_allowed(ask(s.http_port, "GET", "/mandate/v1/invoices/42"))
        assert headers["x-mandate-agent"] == "billing-agent"
        assert_denied(
            ask(s.http_port, "GET", "/mandate;agent=research-agent/v1/invoices/42"),
            "identity_conflict",
        )
    finally:
        s.stop(grace=0.2)


PARITY_CALLS: list[tuple[str, str, str, str, dict[str, str], bytes | None]] = [
    # (agent, method, host, path, headers, body)
    (
        "billing-agent",
        "GET",
        LEDGER,
        "/v1/invoices/42?expand=lines",
        {"traceparent": TRACEPARENT},
        None,
    ),
    ("billing-agent", "GET", LEDGER, "/v1/ledger/admin/x", {"traceparent": TRACEPARENT}, None),
    ("billing-agent", "GET", LEDGER, "/v1/ledger/x/%2e%2e/admin/y", {}, None),
    (
        "billing-agent",
        "GET",
        LEDGER,
        "/v1/invoices/1",
        {"x-mandate-foo": "1", "x-mandate-task": "t-1", "x-mandate-agent": "x"},
        None,
    ),
    (
        "billing-agent",
        "POST",
        "reports.finance.svc.cluster.local",
        "/v1/reports/1",
        {"x-mandate-purpose": "payroll"},
        b"{}",
    ),
    (
        "billing-agent",
        "POST",
        "reports.finance.svc.cluster.local",
        "/v1/reports/1",
        {"x-mandate-purpose": "report"},
        b"{}",
    ),
    (
        "billing-agent",
        "GET",
        "export.arxiv.org",
        "/api/query",
        {"x-mandate-agent": "research-agent"},
        None,
    ),
    ("research-agent", "GET", "export.arxiv.org", "/api/query", {}, None),
    (
        "research-agent",
        "POST",
        MCP_HOST,
        "/mcp",
        {"x-mandate-purpose": "tool-use"},
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_papers"}}',
    ),
    ("research-agent", "POST", MCP_HOST, "/mcp", {"x-mandate-purpose": "tool-use"}, b"not json"),
    ("billing-agent", "CONNECT", "ledger.finance.svc.cluster.local:443", "", {}, None),
    ("billing-agent", "CONNECT", "files.example.com:443", "", {}, None),
    ("nobody", "GET", LEDGER, "/v1/invoices/1", {}, None),
]


@pytest.mark.parametrize("call", PARITY_CALLS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}{c[3]}")
def test_same_decision_headers_and_body_as_grpc(
    sidecar: Sidecar,
    snapshot: Snapshot,
    call: tuple[str, str, str, str, dict[str, str], bytes | None],
) -> None:
    """The same call, asked over gRPC (a CheckRequest as Envoy builds it) and over HTTP (as
    envoy/local-http.yaml asks), gets the same answer; decision ids differ, nothing else."""
    agent, method, host, path, headers, body = call
    req = build_check(method, host, path, headers=headers, body=body, agent=agent)
    grpc_resp = AuthorizationServicer(lambda: snapshot, Identity()).Check(req, None)
    extra: dict[str, str] = {}
    if method == "CONNECT":
        status, got, raw = ask(
            sidecar.http_port, "GET", f"/mandate;agent={agent};connect", host, headers
        )
    else:
        extra = (
            {"x-envoy-auth-partial-body": "false", "x-mandate-content-length": str(len(body))}
            if body is not None
            else {}
        )
        status, got, raw = ask(
            sidecar.http_port, method, f"/mandate;agent={agent}{path}", host, headers | extra, body
        )
    got.pop("x-mandate-decision")
    if grpc_resp.HasField("ok_response"):
        ok: external_auth_pb2.OkHttpResponse = grpc_resp.ok_response
        assert status == 200, raw
        expected = {
            o.header.key: o.header.value for o in ok.headers if o.header.key != "x-mandate-decision"
        }
        assert {k: v for k, v in got.items() if k in expected} == expected
        assert set(got).issuperset(expected)
        removed = got.get("x-envoy-auth-headers-to-remove", "")
        # Plus the headers Envoy's config adds to its request (x-mandate-content-length,
        # -scheme): the agent may have sent its own, which Envoy overwrote only there.
        envoy_set = {"x-mandate-content-length"} if "x-mandate-content-length" in extra else set()
        assert set(filter(None, removed.split(","))) == set(ok.headers_to_remove) | envoy_set
    else:
        assert status == grpc_resp.denied_response.status.code == 403
        want = json.loads(grpc_resp.denied_response.body)
        have = json.loads(raw)
        assert want.pop("decision") and have.pop("decision")
        assert have == want


def _mcp(tool: str, pad: int = 0) -> bytes:
    params: dict[str, Any] = {"name": tool, "arguments": {"q": "x" * pad}}
    return json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    ).encode()


def test_body_and_its_truncation(sidecar: Sidecar) -> None:
    port, path = sidecar.http_port, "/mandate;agent=research-agent/mcp"
    purpose = {"x-mandate-purpose": "tool-use", "content-type": "application/json"}
    body = _mcp("search_papers")
    complete = {"x-envoy-auth-partial-body": "false", "x-mandate-content-length": str(len(body))}
    assert_allowed(ask(port, "POST", path, MCP_HOST, purpose | complete, body))
    # Envoy's flag, or the call's own Content-Length (set by Envoy's config), say truncated.
    for extra in (
        {"x-envoy-auth-partial-body": "true", "x-mandate-content-length": str(len(body) * 2)},
        {"x-envoy-auth-partial-body": "false", "x-mandate-content-length": str(len(body) * 2)},
        {"x-envoy-auth-partial-body": "true"},
    ):
        denied = assert_denied(
            ask(port, "POST", path, MCP_HOST, purpose | extra, body), "outside_purpose"
        )
        assert "truncated" in denied["reason"]
    # Envoy's own Content-Length (the buffered body's) says nothing about the call's.
    assert_allowed(
        ask(port, "POST", path, MCP_HOST, purpose | {"x-envoy-auth-partial-body": "false"}, body)
    )
    denied = assert_denied(
        ask(port, "POST", path, MCP_HOST, purpose, _mcp("delete_corpus")), "outside_purpose"
    )
    assert "delete_corpus" in denied["reason"]


def test_scheme_from_envoys_header_sets_the_default_port(sidecar: Sidecar) -> None:
    port, path = sidecar.http_port, "/mandate;agent=billing-agent/v1/invoices/42"
    assert_allowed(ask(port, "GET", path, headers={"x-mandate-scheme": "http"}))
    # The rule names no port: https means 443, still the same host rule.
    assert_allowed(ask(port, "GET", path, headers={"x-mandate-scheme": "https"}))


def test_no_snapshot_and_internal_errors_deny(snapshot: Snapshot) -> None:
    def boom() -> float:
        raise RuntimeError("clock")

    for authz, error in (
        (Authorizer(lambda: None, Identity(agent="billing-agent")), "internal_error"),
        (
            Authorizer(lambda: snapshot, Identity(agent="billing-agent"), clock=boom),
            "internal_error",
        ),
    ):
        server = HttpAuthzServer(authz, "127.0.0.1", 0)
        port = server.start()
        try:
            body = assert_denied(ask(port, "GET", "/mandate/v1/invoices/42"), error)
            assert body["reason"] in ("profiles not loaded yet", "internal error: RuntimeError")
        finally:
            server.stop(0.2)


def test_port_file_and_unix_socket(profiles_dir: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    s = Sidecar(config(profiles_dir, port_file=port_file))
    s.start()
    try:
        assert json.loads(port_file.read_text())["http"] == s.http_port > 0
        assert s.grpc_port == 0
    finally:
        s.stop(grace=0.2)
    sock_path = tmp_path / "check.sock"
    s = Sidecar(config(profiles_dir, listen=f"unix:{sock_path}", agent="billing-agent"))
    s.start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(sock_path))
            sock.sendall(
                b"GET /mandate/v1/invoices/42 HTTP/1.1\r\nHost: " + LEDGER.encode()
                + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )  # fmt: skip
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"x-mandate-agent: billing-agent" in data.lower()
    finally:
        s.stop(grace=0.2)


@pytest.mark.parametrize("kw", [{"transport": "h2"}, {"listen": "nonsense"}])
def test_bad_config(profiles_dir: Path, kw: dict[str, Any]) -> None:
    s = Sidecar(config(profiles_dir, **kw))
    try:
        with pytest.raises(ConfigError):
            s.start()
    finally:
        s.stop(grace=0.2)


def test_port_in_use(profiles_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = Sidecar(config(profiles_dir, listen=f"127.0.0.1:{port}"))
        try:
            with pytest.raises(ConfigError, match="cannot bind"):
                s.start()
        finally:
            s.stop(grace=0.2)


def test_large_headers_and_encoded_bodies_reach_the_decision(sidecar: Sidecar) -> None:
    """aiohttp's limits are above Envoy's, and the body is decided as sent (a gzip body is
    not JSON-RPC, as over gRPC)."""
    import gzip

    port = sidecar.http_port
    big = {"x-big": "a" * 20000, **{f"x-h{i}": "v" for i in range(150)}}
    assert_allowed(ask(port, "GET", "/mandate;agent=billing-agent/v1/invoices/42", headers=big))
    # A 9 KB path is answered by mandate (its JSON deny), not refused by aiohttp (400).
    long_path = "/mandate;agent=billing-agent/v1/invoices/" + "b" * 9000
    assert_denied(ask(port, "GET", long_path), "bad_request")
    body = gzip.compress(_mcp("search_papers"))
    headers = {
        "x-mandate-purpose": "tool-use",
        "content-encoding": "gzip",
        "x-envoy-auth-partial-body": "false",
        "x-mandate-content-length": str(len(body)),
    }
    denied = assert_denied(
        ask(port, "POST", "/mandate;agent=research-agent/mcp", MCP_HOST, headers, body),
        "outside_purpose",
    )
    assert "JSON" in denied["reason"]
