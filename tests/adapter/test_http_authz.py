"""The HTTP transport (Envoy's ext_authz `http_service`): the path prefix grammar, and the
real Sidecar with `transport="http"` on 127.0.0.1:0, asked the way Envoy asks, with each of
its servers (`http_server`: aiohttp, lean)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2

from sidecar.check.grpc_transport import AuthorizationServicer
from sidecar.check.http_wire import parse_target
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Snapshot, load_profiles
from sidecar.errors import BadRequestError, ConfigError
from sidecar.run.worker import Sidecar
from sidecar.settings import (
    CheckSettings,
    HttpServer,
    IdentitySettings,
    ProfileSettings,
    Settings,
    Transport,
    WorkerSettings,
)

from .conftest import HTTP_SERVER_CLASSES, TRACE_ID, TRACEPARENT, build_check

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


def config(
    profiles: Path,
    *,
    listen: str = "127.0.0.1:0",
    agent: str | None = None,
    transport: Transport = "http",
    port_file: Path | None = None,
    http_server: HttpServer = "aiohttp",
) -> WorkerSettings:
    return WorkerSettings(
        run=Settings(
            profiles=ProfileSettings(profiles, poll_seconds=0.2),
            check=CheckSettings(listen=listen, transport=transport, http_server=http_server),
            identity=IdentitySettings(agent=agent, namespace=""),
            port_file=port_file,
        )
    )


@pytest.fixture
def sidecar(profiles_dir: Path, http_server: HttpServer) -> Iterator[Sidecar]:
    s = Sidecar(config(profiles_dir, http_server=http_server))
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
            headers={
                "x-mandate-purpose": "report",
                "x-mandate-task": "INV-1",
                "content-type": "application/json",
            },
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
    profiles_dir: Path, http_server: HttpServer
) -> None:
    s = Sidecar(config(profiles_dir, agent="billing-agent", http_server=http_server))
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
    grpc_resp = AuthorizationServicer(CheckPipeline(lambda: snapshot, Identity())).Check(req, None)
    extra: dict[str, str] = {}
    if method == "CONNECT":
        status, got, raw = ask(
            sidecar.http_port, "GET", f"/mandate;agent={agent};connect", host, headers
        )
    else:
        extra = (
            {
                "x-envoy-auth-partial-body": "false",
                "x-mandate-content-length": "len=" + str(len(body)),
            }
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
    complete = {
        "x-envoy-auth-partial-body": "false",
        "x-mandate-content-length": "len=" + str(len(body)),
    }
    assert_allowed(ask(port, "POST", path, MCP_HOST, purpose | complete, body))
    # Envoy's flag, or the call's own Content-Length (set by Envoy's config), say truncated.
    for extra in (
        {
            "x-envoy-auth-partial-body": "true",
            "x-mandate-content-length": "len=" + str(len(body) * 2),
        },
        {
            "x-envoy-auth-partial-body": "false",
            "x-mandate-content-length": "len=" + str(len(body) * 2),
        },
        {"x-envoy-auth-partial-body": "true"},
    ):
        denied = assert_denied(
            ask(port, "POST", path, MCP_HOST, purpose | extra, body), "outside_purpose"
        )
        assert "truncated" in denied["reason"]
    # Envoy's own Content-Length (the buffered body's) says nothing about the call's: a call
    # without one (chunked) cannot be shown complete, whatever Envoy's flag says (Envoy
    # says "false" when it buffered exactly max_request_bytes and more is on its way).
    denied = assert_denied(
        ask(port, "POST", path, MCP_HOST, purpose | {"x-envoy-auth-partial-body": "false"}, body),
        "outside_purpose",
    )
    assert "truncated" in denied["reason"]
    # Envoy's config sends "len=" and the call's Content-Length, never an empty value: a bare
    # number (what an agent forges when the config sets nothing) or "len=" alone (a chunked
    # call) shows nothing complete.
    for forged in (str(len(body)), "len=", f"len {len(body)}", f"LEN={len(body)}"):
        extra = {"x-envoy-auth-partial-body": "false", "x-mandate-content-length": forged}
        denied = assert_denied(
            ask(port, "POST", path, MCP_HOST, purpose | extra, body), "outside_purpose"
        )
        assert "truncated" in denied["reason"], forged
    forbidden = _mcp("delete_corpus")
    length = {"x-mandate-content-length": "len=" + str(len(forbidden))}
    denied = assert_denied(
        ask(port, "POST", path, MCP_HOST, purpose | length, forbidden), "outside_purpose"
    )
    assert "delete_corpus" in denied["reason"]


def test_scheme_from_envoys_header_sets_the_default_port(sidecar: Sidecar) -> None:
    port, path = sidecar.http_port, "/mandate;agent=billing-agent/v1/invoices/42"
    assert_allowed(ask(port, "GET", path, headers={"x-mandate-scheme": "http"}))
    # The rule names no port: https means 443, still the same host rule.
    assert_allowed(ask(port, "GET", path, headers={"x-mandate-scheme": "https"}))


def test_no_snapshot_and_internal_errors_deny(snapshot: Snapshot, http_server: HttpServer) -> None:
    def boom() -> float:
        raise RuntimeError("clock")

    for authz, error in (
        (CheckPipeline(lambda: None, Identity(agent="billing-agent")), "internal_error"),
        (
            CheckPipeline(lambda: snapshot, Identity(agent="billing-agent"), clock=boom),
            "internal_error",
        ),
    ):
        server = HTTP_SERVER_CLASSES[http_server](authz, "127.0.0.1", 0)
        port = server.start()
        try:
            body = assert_denied(ask(port, "GET", "/mandate/v1/invoices/42"), error)
            assert body["reason"] in ("profiles not loaded yet", "internal error: RuntimeError")
        finally:
            server.stop(0.2)


def test_port_file_and_unix_socket(
    profiles_dir: Path, tmp_path: Path, http_server: HttpServer
) -> None:
    port_file = tmp_path / "ports.json"
    s = Sidecar(config(profiles_dir, port_file=port_file, http_server=http_server))
    s.start()
    try:
        assert json.loads(port_file.read_text())["http"] == s.http_port > 0
        assert s.grpc_port == 0
    finally:
        s.stop(grace=0.2)
    sock_path = tmp_path / "check.sock"
    s = Sidecar(
        config(
            profiles_dir, listen=f"unix:{sock_path}", agent="billing-agent", http_server=http_server
        )
    )
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
    """Refused when the settings are built, before anything starts."""
    with pytest.raises(ConfigError, match=f"--{next(iter(kw))}"):
        config(profiles_dir, **kw)


def test_port_in_use(profiles_dir: Path, http_server: HttpServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = Sidecar(config(profiles_dir, listen=f"127.0.0.1:{port}", http_server=http_server))
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
        "x-mandate-content-length": "len=" + str(len(body)),
    }
    denied = assert_denied(
        ask(port, "POST", "/mandate;agent=research-agent/mcp", MCP_HOST, headers, body),
        "outside_purpose",
    )
    assert "JSON" in denied["reason"]


# --- the agent calls the worker's HTTP port itself -----------------------------------------
# In a pod the worker serves one agent (`--agent`, envoy/sidecar-http.yaml) and the agent can
# reach its port on localhost. Whatever it sends, the call is decided as that agent's or
# refused: never as another agent's. (A direct Check only returns a decision to the caller;
# it sends nothing upstream.)

RESEARCH_SPIFFE = "spiffe://cluster.local/ns/agents/sa/research-agent"
ARXIV = "export.arxiv.org"  # research-agent may GET it; billing-agent may not


@pytest.mark.parametrize(
    ("path", "headers", "error"),
    [
        ("/mandate;agent=research-agent/api/query", {}, "identity_conflict"),
        ("/mandate;agent=research-agent;connect", {}, "identity_conflict"),
        ("/mandate;agent=Research-Agent/api/query", {}, "identity_conflict"),
        ("/mandate;agent=billing-agent;agent=research-agent/api/query", {}, "bad_request"),
        ("/mandate;agent=research-agent;agent=billing-agent/api/query", {}, "bad_request"),
        ("/mandate;agent=billing-agent/mandate;agent=research-agent/api/query", {}, "bad_request"),
        ("/mandate/mandate;agent=research-agent/api/query", {}, "bad_request"),
        ("/mandate%3Bagent=research-agent/api/query", {}, "bad_request"),
        ("/MANDATE;agent=research-agent/api/query", {}, "bad_request"),
        ("//mandate;agent=research-agent/api/query", {}, "bad_request"),
        ("/api/query", {}, "bad_request"),
        # Headers that name an identity elsewhere: none counts here.
        ("/mandate/api/query", {"x-mandate-agent": "research-agent"}, "outside_purpose"),
        (
            "/mandate/api/query",
            {"x-forwarded-client-cert": f"By={RESEARCH_SPIFFE};URI={RESEARCH_SPIFFE}"},
            "outside_purpose",
        ),
        (
            "/mandate/api/query",
            {"x-mandate-log-agent": "research-agent", "x-mandate-outcome": "allow"},
            "outside_purpose",
        ),
        (
            "/mandate/api/query",
            {"x-spiffe-id": RESEARCH_SPIFFE, "x-client-principal": RESEARCH_SPIFFE},
            "outside_purpose",
        ),
        ("/mandate/api/query", {"x-mandate-purpose": "literature-search"}, "unknown_purpose"),
        (
            "/mandate;agent=research-agent/api/query",
            {"x-forwarded-client-cert": f"URI={RESEARCH_SPIFFE}", "x-mandate-agent": "x"},
            "identity_conflict",
        ),
    ],
    ids=[
        "other-agents-prefix",
        "other-agents-connect",
        "prefix-other-case",
        "second-agent-param",
        "second-agent-param-first",
        "prefix-in-path",
        "bare-prefix-then-prefix",
        "encoded-semicolon",
        "upper-case-prefix",
        "double-slash",
        "no-prefix",
        "x-mandate-agent",
        "xfcc",
        "log-headers",
        "principal-headers",
        "other-agents-purpose",
        "prefix-and-xfcc",
    ],
)
def test_a_direct_call_to_the_http_port_never_gets_another_agents_rights(
    profiles_dir: Path, path: str, headers: dict[str, str], error: str, http_server: HttpServer
) -> None:
    s = Sidecar(config(profiles_dir, agent="billing-agent", http_server=http_server))
    s.start()
    try:
        host = f"{ARXIV}:443" if path.endswith(";connect") else ARXIV
        status, got, raw = ask(s.http_port, "GET", path, host, headers)
        assert_denied((status, got, raw), error)
        # Attributed to the worker's own agent, or to no one; never to research-agent.
        assert got.get("x-mandate-log-agent", "billing-agent") == "billing-agent"
    finally:
        s.stop(grace=0.2)


def test_the_same_call_from_its_own_agents_worker_is_allowed(
    profiles_dir: Path, http_server: HttpServer
) -> None:
    """The control for the test above: the denies are about who asks, not about the call."""
    s = Sidecar(config(profiles_dir, agent="research-agent", http_server=http_server))
    s.start()
    try:
        headers = assert_allowed(ask(s.http_port, "GET", "/mandate/api/query", ARXIV))
        assert headers["x-mandate-agent"] == "research-agent"
    finally:
        s.stop(grace=0.2)


def _raw_ask(port: int, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return (int(reply[9:12]) if reply.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0), reply


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1/mandate;agent=research-agent/api/query",  # absolute form
        f"http://{ARXIV}/mandate;agent=research-agent/api/query",
        "*",
    ],
)
def test_odd_request_targets_on_the_http_port_are_refused(
    profiles_dir: Path, target: str, http_server: HttpServer
) -> None:
    s = Sidecar(config(profiles_dir, agent="billing-agent", http_server=http_server))
    s.start()
    try:
        status, reply = _raw_ask(
            s.http_port,
            f"GET {target} HTTP/1.1\r\nHost: {ARXIV}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status in (400, 403), reply[:300]
        assert b"x-mandate-agent:" not in reply.lower()
        if status == 403:
            body = reply.partition(b"\r\n\r\n")[2]
            assert json.loads(body)["error"] in ("bad_request", "identity_conflict"), body
    finally:
        s.stop(grace=0.2)


KUBE_PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: kube-agent
spec:
  owner: platform
  identities:
    - serviceAccount: agents/kube-agent
  defaultPurpose: ops
  purposes:
    ops:
      allow:
        - hosts: [kube.example.com]
          methods: [GET]
"""


@pytest.mark.parametrize(
    ("host", "error"),
    [
        ("kube.example.com", None),
        ("KUBE.Example.COM", None),
        ("kube.example.com.", None),
        ("kube.example.com:8443", None),  # the rule names no port
        ("\u212aube.example.com", "bad_request"),  # Kelvin sign: str.lower() gives "kube..."
        ("\u212a\u1d1c\u0299\u1d07.example.com", "bad_request"),
        ("\uff4b\uff55\uff42\uff45.example.com", "bad_request"),  # full-width letters
        ("xn--ube-bed.example.com", "outside_purpose"),  # IDNA of "\u043aube" (Cyrillic ka)
        ("\u043aube.example.com", "bad_request"),
        ("kube.example.com..", "bad_request"),
    ],
)
def test_a_look_alike_host_is_never_the_allowed_host_on_either_transport(
    profiles_dir: Path, host: str, error: str | None, http_server: HttpServer
) -> None:
    """Envoy refuses a non-ASCII Host itself (tests/e2e/test_adversarial.py); mandate must
    refuse it too when asked directly, over both transports, for a host that lower-cases
    into an allowed one."""
    (profiles_dir / "kube.yaml").write_text(KUBE_PROFILE)
    snapshot = load_profiles(profiles_dir)
    no_context = cast(grpc.ServicerContext, None)  # Check is called as Envoy's stub would
    grpc_resp = AuthorizationServicer(
        CheckPipeline(lambda: snapshot, Identity(agent="kube-agent"))
    ).Check(build_check("GET", host, "/api/v1/pods", agent="kube-agent"), no_context)
    if error is None:
        assert grpc_resp.HasField("ok_response"), grpc_resp
    else:
        assert json.loads(grpc_resp.denied_response.body)["error"] == error, grpc_resp
    s = Sidecar(config(profiles_dir, agent="kube-agent", http_server=http_server))
    s.start()
    try:
        status, reply = _raw_ask(
            s.http_port,
            b"GET /mandate/api/v1/pods HTTP/1.1\r\nHost: "
            + host.encode()
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        if error is None:
            assert status == 200, reply[:300]
        else:
            assert status == 403, reply[:300]
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == error, reply
    finally:
        s.stop(grace=0.2)


_HTTP_ONLY = """
import http.client, json, sys
from pathlib import Path
from sidecar.run.worker import Sidecar
from sidecar.settings import (CheckSettings, IdentitySettings, ProfileSettings, Settings,
                              WorkerSettings)
s = Sidecar(WorkerSettings(run=Settings(
    profiles=ProfileSettings(Path(sys.argv[1])),
    check=CheckSettings(listen="127.0.0.1:0", transport="http"),
    identity=IdentitySettings(agent="billing-agent", namespace="agents"))))
s.start()
try:
    conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=5)
    conn.putrequest("GET", "/mandate/v1/invoices/42", skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", "ledger.finance.svc.cluster.local")
    conn.putheader("Content-Length", "0")
    conn.endheaders()
    status = conn.getresponse().status
finally:
    s.stop(grace=0.2)
print(json.dumps({"status": status, "loaded": sorted(
    m for m in ("grpc", "grpc_health", "envoy", "google.protobuf") if m in sys.modules)}))
"""


def test_the_http_transport_loads_neither_grpc_nor_the_envoy_protobufs(
    profiles_dir: Path,
) -> None:
    """Import only what runs (issue 20): an HTTP Check server is ~23 MB lighter without them."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _HTTP_ONLY, str(profiles_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"status": 200, "loaded": []}
