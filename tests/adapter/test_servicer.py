"""AuthorizationServicer.Check called directly with CheckRequests shaped like Envoy's."""

from __future__ import annotations

import json
import time
from typing import cast
from unittest import mock

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from sidecar.check.grpc_transport import AuthorizationServicer
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity, new_decision_id, trace_id_of
from sidecar.core import Snapshot

from .conftest import BILLING_SPIFFE, TRACE_ID, TRACEPARENT, CheckBuilder

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
MCP_HOST = "mcp.tools.svc.cluster.local"


def servicer(
    snapshot: Snapshot | None, agent: str | None = "billing-agent"
) -> AuthorizationServicer:
    return AuthorizationServicer(CheckPipeline(lambda: snapshot, Identity(agent=agent)))


def set_headers(resp: external_auth_pb2.CheckResponse) -> dict[str, str]:
    opts = (
        resp.ok_response.headers if resp.HasField("ok_response") else resp.denied_response.headers
    )
    for o in opts:
        assert o.append_action == OVERWRITE, o
    out = {o.header.key: o.header.value for o in opts}
    assert len(out) == len(opts), "a header is set twice"
    return out


def assert_allowed(resp: external_auth_pb2.CheckResponse) -> dict[str, str]:
    assert resp.status.code == code_pb2.OK, resp
    assert resp.HasField("ok_response")
    assert not resp.HasField("denied_response")
    headers = set_headers(resp)
    assert headers["x-mandate-decision"] == resp.dynamic_metadata["decision_id"]
    assert resp.dynamic_metadata["decision"] == "allow"
    return headers


def assert_denied(resp: external_auth_pb2.CheckResponse, error: str) -> dict[str, str]:
    """Check the deny contract; return the JSON body."""
    assert resp.status.code == code_pb2.PERMISSION_DENIED, resp
    assert resp.HasField("denied_response")
    assert not resp.HasField("ok_response")
    denied = resp.denied_response
    assert denied.status.code == 403
    body = json.loads(denied.body)
    assert set(body) == {"error", "reason", "decision", "trace_id"}
    assert body["error"] == error, body
    assert body["reason"]
    assert len(body["decision"]) == 32
    headers = set_headers(resp)
    assert headers["x-mandate-decision"] == body["decision"]
    assert headers["content-type"] == "application/json"
    assert resp.dynamic_metadata["decision_id"] == body["decision"]
    assert resp.dynamic_metadata["decision"] == "deny"
    return body  # type: ignore[no-any-return]


def mcp_call(tool: str, request_id: int = 1) -> bytes:
    msg = {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {"query": "ext_authz"}},
    }
    return json.dumps(msg).encode()


# --- allow -------------------------------------------------------------------------------


def test_allow_sets_mandate_headers_and_decision_metadata(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check(
        "GET", path="/v1/invoices/42?expand=lines", headers={"traceparent": TRACEPARENT}
    )
    context = mock.create_autospec(grpc.ServicerContext, instance=True)
    resp = servicer(snapshot).Check(req, context)
    headers = assert_allowed(resp)
    assert headers["x-mandate-agent"] == "billing-agent"
    assert headers["x-mandate-purpose"] == "reconcile"
    assert len(headers["x-mandate-decision"]) == 32
    assert "x-mandate-task" not in headers
    assert list(resp.ok_response.headers_to_remove) == []
    assert context.method_calls == []  # Check answers in the response, never via the context


def test_allow_with_declared_purpose_and_task(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    req = make_check(
        "POST",
        "reports.finance.svc.cluster.local",
        "/v1/reports/2026-01",
        headers={"x-mandate-purpose": "report", "x-mandate-task": "INV-2026-0042"},
        body=b'{"month": "2026-01"}',
    )
    headers = assert_allowed(servicer(snapshot).Check(req, None))
    assert headers["x-mandate-purpose"] == "report"
    assert headers["x-mandate-task"] == "INV-2026-0042"
    assert headers["x-mandate-agent"] == "billing-agent"


def test_allow_removes_other_mandate_headers_the_agent_sent(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check(
        headers={
            "x-mandate-foo": "1",
            "x-mandate-elevation": "refund",
            "x-mandate-task": "   ",  # blank: no task, so the agent's value must not pass
            "x-mandate-decision": "forged-decision-id",
            "x-mandate-agent": "research-agent",
        }
    )
    resp = servicer(snapshot).Check(req, None)
    headers = assert_allowed(resp)
    removed = set(resp.ok_response.headers_to_remove)
    assert removed == {"x-mandate-foo", "x-mandate-elevation", "x-mandate-task"}
    assert "x-mandate-task" not in headers
    # the set headers overwrite whatever the agent sent
    assert headers["x-mandate-decision"] != "forged-decision-id"
    assert headers["x-mandate-agent"] == "billing-agent"


def test_spiffe_principal_that_agrees_with_the_sidecar_allows(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check(principal=BILLING_SPIFFE, agent="billing-agent")
    headers = assert_allowed(servicer(snapshot).Check(req, None))
    assert headers["x-mandate-agent"] == "billing-agent"


def test_route_context_extension_attributes_without_configured_agent(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check(
        "GET", "export.arxiv.org", "/api/query?search_query=all:envoy", agent="research-agent"
    )
    headers = assert_allowed(servicer(snapshot, agent=None).Check(req, None))
    assert headers["x-mandate-agent"] == "research-agent"
    assert headers["x-mandate-purpose"] == "literature-search"


# --- deny --------------------------------------------------------------------------------


def test_deny_by_rule_has_json_body_and_trace_id(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check(path="/v1/ledger/admin/purge", headers={"traceparent": TRACEPARENT})
    body = assert_denied(servicer(snapshot).Check(req, None), "denied_by_rule")
    assert body["trace_id"] == TRACE_ID
    assert "reconcile" in body["reason"]


def test_deny_outside_purpose_without_traceparent(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check("DELETE", path="/v1/invoices/42")
    body = assert_denied(servicer(snapshot).Check(req, None), "outside_purpose")
    assert body["trace_id"] == ""
    assert "reconcile" in body["reason"]


def test_dot_segments_cannot_escape_into_the_denied_prefix(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check(path="/v1/ledger/entries/%2e%2e/admin/purge")
    resp = servicer(snapshot).Check(req, None)
    assert resp.status.code == code_pb2.PERMISSION_DENIED


def test_declared_purpose_never_adds_rights(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    req = make_check(headers={"x-mandate-purpose": "report"})  # GET the ledger under "report"
    assert_denied(servicer(snapshot).Check(req, None), "outside_purpose")
    req = make_check(headers={"x-mandate-purpose": "refund"})  # an elevation, not a purpose
    assert_denied(servicer(snapshot).Check(req, None), "unknown_purpose")


def test_spoofed_agent_header_gains_nothing(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    # research-agent's sidecar; the agent claims to be billing-agent to reach the ledger
    req = make_check(headers={"x-mandate-agent": "billing-agent"})
    body = assert_denied(
        servicer(snapshot, agent="research-agent").Check(req, None), "outside_purpose"
    )
    assert "literature-search" in body["reason"]


def test_forged_context_extension_conflicts_with_configured_agent(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    req = make_check("GET", "export.arxiv.org", "/api/query", agent="research-agent")
    body = assert_denied(
        servicer(snapshot, agent="billing-agent").Check(req, None), "identity_conflict"
    )
    assert "research-agent" in body["reason"] and "billing-agent" in body["reason"]


def test_unknown_spiffe_principal_is_denied(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    req = make_check(principal="spiffe://cluster.local/ns/agents/sa/intruder")
    assert_denied(servicer(snapshot).Check(req, None), "identity_conflict")


def test_no_identity_at_all_is_unattributed(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    assert_denied(servicer(snapshot, agent=None).Check(make_check(), None), "unattributed")


# --- MCP ---------------------------------------------------------------------------------


def mcp_request(
    make_check: CheckBuilder, body: bytes, **kw: object
) -> external_auth_pb2.CheckRequest:
    headers = {"x-mandate-purpose": "tool-use", "accept": "application/json, text/event-stream"}
    return make_check("POST", MCP_HOST, "/mcp", headers=headers, body=body, **kw)


@pytest.mark.parametrize(
    "body",
    [
        mcp_call("search_papers"),
        mcp_call("fetch_abstract"),
        b'{"jsonrpc":"2.0","id":1,"method":"tools/list"}',
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
        b"[" + mcp_call("search_papers", 1) + b"," + mcp_call("fetch_abstract", 2) + b"]",
    ],
)
def test_mcp_allowed(snapshot: Snapshot, make_check: CheckBuilder, body: bytes) -> None:
    resp = servicer(snapshot, agent="research-agent").Check(mcp_request(make_check, body), None)
    headers = assert_allowed(resp)
    assert headers["x-mandate-purpose"] == "tool-use"


@pytest.mark.parametrize(
    "body",
    [
        mcp_call("delete_everything"),
        b'{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"file:///etc"}}',
        b"[" + mcp_call("search_papers", 1) + b"," + mcp_call("drop_tables", 2) + b"]",
        b"not json",
        b'{"id":1,"method":"tools/call","params":{"name":"search_papers"}}',  # not JSON-RPC 2.0
    ],
)
def test_mcp_denied(snapshot: Snapshot, make_check: CheckBuilder, body: bytes) -> None:
    resp = servicer(snapshot, agent="research-agent").Check(mcp_request(make_check, body), None)
    assert_denied(resp, "outside_purpose")


def test_mcp_body_sent_as_string_field(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    """Without pack_as_bytes Envoy sends the body in `body` (a string), not `raw_body`."""
    req = mcp_request(make_check, mcp_call("search_papers"))
    http = req.attributes.request.http
    http.body = http.raw_body.decode()
    http.ClearField("raw_body")
    assert_allowed(servicer(snapshot, agent="research-agent").Check(req, None))


def test_mcp_without_body_is_denied(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    req = make_check("POST", MCP_HOST, "/mcp", headers={"x-mandate-purpose": "tool-use"})
    assert_denied(servicer(snapshot, agent="research-agent").Check(req, None), "outside_purpose")


@pytest.mark.parametrize(
    "kw",
    [
        {"partial_body": True},  # Envoy hit with_request_body.max_request_bytes
        {"content_length": 70_000},  # the agent declared more than Envoy buffered
    ],
    ids=["partial-body-header", "content-length-larger"],
)
def test_mcp_truncated_body_is_denied(
    snapshot: Snapshot, make_check: CheckBuilder, kw: dict[str, object]
) -> None:
    req = mcp_request(make_check, mcp_call("search_papers"), **kw)
    body = assert_denied(
        servicer(snapshot, agent="research-agent").Check(req, None), "outside_purpose"
    )
    assert "trunc" in body["reason"]


@pytest.mark.parametrize("tool", ["search_papers", "delete_corpus"])
def test_mcp_body_without_the_calls_content_length_is_truncated(
    snapshot: Snapshot, make_check: CheckBuilder, tool: str
) -> None:
    """A chunked call has no Content-Length; Envoy says `x-envoy-auth-partial-body: false`
    also when it stopped at exactly max_request_bytes with more to come, so such a body is
    never shown complete (tests/e2e/test_adversarial.py sends one cut at the limit)."""
    req = mcp_request(make_check, mcp_call(tool))
    del req.attributes.request.http.headers["content-length"]
    assert req.attributes.request.http.headers["x-envoy-auth-partial-body"] == "false"
    no_context = cast(grpc.ServicerContext, None)
    body = assert_denied(
        servicer(snapshot, agent="research-agent").Check(req, no_context), "outside_purpose"
    )
    assert "trunc" in body["reason"]


# --- fail closed -------------------------------------------------------------------------


@pytest.mark.parametrize("agent", ["billing-agent", None])
def test_empty_check_request_is_denied(snapshot: Snapshot, agent: str | None) -> None:
    resp = servicer(snapshot, agent=agent).Check(external_auth_pb2.CheckRequest(), None)
    assert_denied(resp, "unattributed" if agent is None else "bad_request")


def test_no_snapshot_yet_is_denied(make_check: CheckBuilder) -> None:
    body = assert_denied(servicer(None).Check(make_check(), None), "internal_error")
    assert "not loaded" in body["reason"]


def test_snapshot_provider_raising_is_denied(
    make_check: CheckBuilder, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Snapshot:
        raise RuntimeError("disk on fire")

    svc = AuthorizationServicer(CheckPipeline(broken, Identity(agent="billing-agent")))
    body = assert_denied(svc.Check(make_check(), None), "internal_error")
    assert body["reason"] == "internal error: RuntimeError"
    assert "disk on fire" not in body["reason"]  # internals stay in the log
    assert any("denying" in r.getMessage() for r in caplog.records)


def test_clock_raising_is_denied(snapshot: Snapshot, make_check: CheckBuilder) -> None:
    def clock() -> float:
        raise OSError("clock")

    svc = AuthorizationServicer(
        CheckPipeline(lambda: snapshot, Identity(agent="billing-agent"), clock=clock)
    )
    assert_denied(svc.Check(make_check(), None), "internal_error")


def test_response_building_failure_still_denies(
    snapshot: Snapshot, make_check: CheckBuilder
) -> None:
    with mock.patch("sidecar.check.grpc_transport.response_for", side_effect=ValueError("boom")):
        resp = servicer(snapshot).Check(make_check(), None)
    assert resp.status.code == code_pb2.PERMISSION_DENIED
    assert not resp.HasField("ok_response")


# --- ids ---------------------------------------------------------------------------------


def decode_ms(decision_id: str) -> int:
    return int(decision_id[:12], 16)  # the first 48 bits: Unix milliseconds


def test_decision_id_shape_and_uniqueness() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_decision_id() for _ in range(10_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert len(i) == 32
        assert set(i) <= set("0123456789abcdef")
        assert before <= decode_ms(i) <= after


def test_decision_ids_are_time_ordered() -> None:
    ids = []
    for _ in range(5):
        ids.append(new_decision_id())
        time.sleep(0.003)
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (GOOD, TRACE_ID),
        (GOOD.upper().replace("0X", "0x"), TRACE_ID),  # lower-cased on the way out
        (GOOD + "-future-field", TRACE_ID),  # later versions may append fields
        ("", ""),
        ("garbage", ""),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736", ""),  # too few fields
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", ""),  # all-zero: invalid
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", ""),  # 31 hex digits
        ("00-4bf92f3577b34da6a3ce929d0e0e47360-00f067aa0ba902b7-01", ""),  # 33 hex digits
        ("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", ""),  # not hex
        ("00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ""),  # int() takes a sign
        ("00-4bf92f3577b34da6a3ce929d0e0e_736-00f067aa0ba902b7-01", ""),  # ... and underscores
        ("00- bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", ""),  # ... and spaces
    ],
)
def test_trace_id_of(traceparent: str, expected: str) -> None:
    assert trace_id_of(traceparent) == expected
