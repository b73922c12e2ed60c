"""Any CheckRequest, well-formed or not, gets a valid allow or a 403 JSON deny, quickly; an
allow only ever for a call the profiles allow. Directly on the servicer, and as raw bytes
through a real gRPC server, which must answer (error or deny) and keep serving."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from sidecar.check.grpc_transport import AuthorizationServicer, view_from_check
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Snapshot, decide, load_profiles
from sidecar.run.worker import Sidecar
from sidecar.settings import (
    CheckSettings,
    IdentitySettings,
    ProfileSettings,
    Settings,
    WorkerSettings,
)

from .test_matchers import ref_authority, ref_canonical, ref_matches_any

DEMO = Path(__file__).resolve().parents[2] / "devstack" / "demo" / "profiles"
SNAPSHOT: Snapshot = load_profiles(DEMO)
BILLING_SPIFFE = "spiffe://cluster.local/ns/agents/sa/billing-agent"
LEDGER = "ledger.finance.svc.cluster.local"
CHECK = "/envoy.service.auth.v3.Authorization/Check"
BOUND_SECONDS = 0.050
MANDATE_HEADERS = {"x-mandate-agent", "x-mandate-purpose", "x-mandate-decision"}

IDENTITIES = [Identity(agent="billing-agent"), Identity(agent="research-agent"), Identity()]
SERVICERS = [AuthorizationServicer(CheckPipeline(lambda: SNAPSHOT, ident)) for ident in IDENTITIES]


def request(
    method: str = "GET",
    host: str = LEDGER,
    path: str = "/v1/invoices/42",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    extensions: dict[str, str] | None = None,
    principal: str = "",
    scheme: str = "http",
) -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method=method, host=host, path=path, scheme=scheme, headers=headers or {}, raw_body=body
    )
    ctx = attribute_context_pb2.AttributeContext(
        source=attribute_context_pb2.AttributeContext.Peer(principal=principal),
        request=attribute_context_pb2.AttributeContext.Request(http=http),
        context_extensions=extensions or {},
    )
    return external_auth_pb2.CheckRequest(attributes=ctx)


GOOD = request()


def reference_allows(agent: str, purpose: str, req: external_auth_pb2.CheckRequest) -> bool:
    """Whether the example profile lets ``agent`` make this call for ``purpose``, by the
    reference matchers (hosts, methods, paths; MCP bodies are left to decide())."""
    profile = SNAPSHOT.agents[agent].profile
    rules = profile.spec.purposes[purpose]
    http = req.attributes.request.http
    method = (http.method or http.headers.get(":method", "")).upper()
    authority = http.host or http.headers.get(":authority", "")
    scheme = http.scheme or http.headers.get(":scheme", "http")
    hp = ref_authority(authority, "" if method == "CONNECT" else scheme)
    path = "" if method == "CONNECT" else ref_canonical(http.path or http.headers.get(":path", ""))
    if hp is None or path is None:
        return False
    host, port = hp

    def hits(rule: object) -> bool:
        from .test_matchers import ref_host_matches, ref_host_pattern

        hosts = getattr(rule, "hosts", None)
        methods = getattr(rule, "methods", None)
        paths = getattr(rule, "paths", None)
        if hosts is not None and not any(
            ref_host_matches(ref_host_pattern(h), host, port)  # type: ignore[arg-type]
            for h in hosts
        ):
            return False
        if methods is not None and method not in {m.upper() for m in methods}:
            return False
        return paths is None or ref_matches_any(paths, path)

    if any(hits(r) and getattr(r, "mcp_tools", None) is None for r in rules.deny):
        return False
    return any(hits(r) for r in rules.allow)


def check_contract(resp: external_auth_pb2.CheckResponse) -> bool:
    """Assert the response is a well-formed allow or deny; return whether it allows."""
    meta = resp.dynamic_metadata
    if resp.status.code == code_pb2.OK:
        assert resp.HasField("ok_response") and not resp.HasField("denied_response")
        set_headers = {o.header.key: o.header.value for o in resp.ok_response.headers}
        assert MANDATE_HEADERS <= set(set_headers) <= {*MANDATE_HEADERS, "x-mandate-task"}
        assert set_headers["x-mandate-decision"] == meta["decision_id"]
        assert meta["decision"] == "allow"
        return True
    assert resp.status.code == code_pb2.PERMISSION_DENIED, resp
    assert resp.HasField("denied_response") and not resp.HasField("ok_response")
    assert resp.denied_response.status.code == 403
    body = json.loads(resp.denied_response.body)
    assert set(body) == {"error", "reason", "decision", "trace_id"}, body
    assert body["error"] and body["reason"] and len(body["decision"]) == 32
    assert meta["decision"] == "deny" and meta["decision_id"] == body["decision"]
    return False


def check_one(servicer: AuthorizationServicer, req: external_auth_pb2.CheckRequest) -> None:
    start = time.perf_counter()
    resp = servicer.Check(req, None)
    elapsed = time.perf_counter() - start
    assert elapsed < BOUND_SECONDS, f"Check took {elapsed * 1000:.1f} ms"
    allowed = check_contract(resp)
    event("allow" if allowed else "deny")
    identity = servicer._identity
    direct = decide(SNAPSHOT, view_from_check(req, identity, "d"), time.time())
    assert allowed == direct.allowed, (resp, direct)
    if allowed:
        headers = {o.header.key: o.header.value for o in resp.ok_response.headers}
        agent, purpose = headers["x-mandate-agent"], headers["x-mandate-purpose"]
        # only ever the rights of the agent the non-forgeable sources name: the sidecar's
        # own configuration, else Envoy's route or the verified peer certificate
        attrs = req.attributes
        claimed = {
            identity.agent,
            attrs.context_extensions.get("agent") or None,
            SNAPSHOT.by_spiffe.get(attrs.source.principal) if attrs.source.principal else None,
        } - {None}
        assert claimed == {agent}, (claimed, agent)
        assert reference_allows(agent, purpose, req), (req, headers)


# --- strategies ------------------------------------------------------------------------------

anything = st.text(max_size=20)  # any Unicode, control characters included (no surrogates)
methods = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "CONNECT", "get", "Get", "", "G\x00ET"]),
    anything,
)
hosts = st.one_of(
    st.sampled_from(
        [
            LEDGER, LEDGER.upper() + ".", LEDGER + ":80", LEDGER + ":443", "api.stripe.com",
            "a.b.stripe.com", "API.STRIPE.COM:443", "reports.finance.svc.cluster.local",
            "mcp.tools.svc.cluster.local", "api.semanticscholar.org", "\u212aey", "", ":80",
            "ledger.finance.svc.cluster.local\x00.evil", "ledger\u3002finance.svc.cluster.local",
        ]
    ),
    anything,
)  # fmt: skip
paths = st.one_of(
    st.sampled_from(
        [
            "/v1/invoices/42", "/v1/invoices/42?x=1", "/v1/ledger/a/b", "/v1/ledger/admin/x",
            "/v1/ledger/%2e%2e/admin/x", "/v1/invoices/../ledger/admin/x", "/v1/ledger/x/..%2fadmin",
            "/v1/charges/ch_1", "/v1/reports/2026-01", "/mcp", "/", "", "*", "/v1/invoices/%00",
            "/v1/ledger/%252e%252e/admin", "\\v1\\ledger\\admin", "/v1/invoices/" + "a" * 9000,
        ]
    ),
    anything,
    anything.map(lambda s: "/v1/ledger/" + s),
)  # fmt: skip
header_names = st.one_of(
    st.sampled_from(
        [
            "x-mandate-purpose", "x-mandate-task", "x-mandate-agent", "x-mandate-decision",
            "x-mandate-other", "X-Mandate-Purpose", ":method", ":path", ":authority", ":scheme",
            "content-length", "x-envoy-auth-partial-body", "traceparent", "content-type",
        ]
    ),
    anything,
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(
        [
            "reconcile", "report", "literature-search", "tool-use", "refund", "", " reconcile ",
            "INV-1", "true", "false", "-1", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ]
    ),
    anything,
)  # fmt: skip
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=64),
    st.sampled_from(
        [
            b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_papers"}}',
            b'[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all"}}]',
            b"[" * 5000,
            b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"search_papers"}' + b"}" * 3,
        ]
    ),
)
ext_values = st.one_of(
    st.sampled_from(["billing-agent", "research-agent", "ops-agent", ""]), anything
)
principals = st.one_of(st.sampled_from(["", BILLING_SPIFFE, "spiffe://x/ns/a/sa/b"]), anything)

check_requests = st.builds(
    request,
    method=methods,
    host=hosts,
    path=paths,
    headers=st.dictionaries(header_names, header_values, max_size=5),
    body=bodies,
    extensions=st.dictionaries(st.one_of(st.just("agent"), anything), ext_values, max_size=2),
    principal=principals,
    scheme=st.sampled_from(["http", "https", "", "HTTP", "ftp"]),
)

plausible = st.builds(
    request,
    method=st.sampled_from(["GET", "POST", "get", "PUT", "CONNECT"]),
    host=hosts.filter(lambda h: h.isascii() and "." in h),
    path=paths,
    headers=st.dictionaries(
        st.sampled_from(["x-mandate-purpose", "x-mandate-task", "x-mandate-agent"]),
        st.sampled_from(["reconcile", "report", "tool-use", "INV-1", "billing-agent"]),
        max_size=2,
    ),
    extensions=st.dictionaries(st.just("agent"), ext_values, max_size=1),
    principal=principals,
)
check_requests = st.one_of(check_requests, plausible)


@given(st.sampled_from(SERVICERS), check_requests)
@example(SERVICERS[0], GOOD)
@example(SERVICERS[0], request(path="/v1/ledger/%2e%2e/admin/x"))
@example(SERVICERS[0], request(extensions={"agent": "research-agent"}))
@example(SERVICERS[2], request(principal=BILLING_SPIFFE))
def test_structured_check_requests_get_a_valid_decision(
    servicer: AuthorizationServicer, req: external_auth_pb2.CheckRequest
) -> None:
    check_one(servicer, req)


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """A serialised CheckRequest with some bytes flipped, dropped or inserted."""
    data = bytearray(draw(check_requests).SerializeToString())
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if not data:
            break
        i = draw(st.integers(min_value=0, max_value=len(data) - 1))
        op = draw(st.sampled_from(["flip", "drop", "insert", "truncate"]))
        if op == "flip":
            data[i] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "drop":
            del data[i]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[i:]
    return bytes(data)


raw_bytes = st.one_of(st.binary(max_size=200), mutated_bytes())


@given(st.sampled_from(SERVICERS), raw_bytes)
def test_any_bytes_that_parse_get_a_valid_decision(
    servicer: AuthorizationServicer, data: bytes
) -> None:
    try:
        req = external_auth_pb2.CheckRequest.FromString(data)
    except DecodeError:
        return  # gRPC refuses these before Check: see the server test below
    check_one(servicer, req)


# --- through a real gRPC server --------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    profiles = tmp_path_factory.mktemp("profiles")
    shutil.copy(DEMO / "agents.yaml", profiles / "agents.yaml")
    sidecar = Sidecar(
        WorkerSettings(
            run=Settings(
                profiles=ProfileSettings(profiles, poll_seconds=5.0),
                check=CheckSettings(listen="127.0.0.1:0"),
                identity=IdentitySettings(agent="billing-agent", namespace=""),
            )
        )
    )
    sidecar.start()
    ch = grpc.insecure_channel(
        f"127.0.0.1:{sidecar.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
    )
    try:
        grpc.channel_ready_future(ch).result(timeout=5)
        yield ch
    finally:
        ch.close()
        sidecar.stop(grace=0.2)


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(data=raw_bytes)
@example(data=b"\xff" * 8)
@example(data=GOOD.SerializeToString())
def test_raw_bytes_through_a_real_server(channel: grpc.Channel, data: bytes) -> None:
    raw = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
    try:
        answer = raw(data, timeout=5)
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the server hung"
        assert exc.code() != grpc.StatusCode.UNAVAILABLE, "the server went away"
    else:
        resp = external_auth_pb2.CheckResponse.FromString(answer)
        if check_contract(resp):  # an allow: only for a request the profiles allow
            req = external_auth_pb2.CheckRequest.FromString(data)
            direct = decide(SNAPSHOT, view_from_check(req, Identity(agent="billing-agent"), "d"), 0)
            assert direct.allowed
    # and it keeps serving
    resp = external_auth_pb2.CheckResponse.FromString(raw(GOOD.SerializeToString(), timeout=5))
    assert check_contract(resp)
