"""Through real Envoy with tracing on: the agent's request, Envoy's spans, mandate's
decision span and the upstream call are one trace, received over real OTLP/gRPC."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Stack, start_stack, stop_stack
from .otlp import OtlpReceiver

LEDGER = "http://ledger.finance.svc.cluster.local"


@pytest.fixture
def traced(tmp_path: Path, transport: str) -> Iterator[tuple[Stack, OtlpReceiver]]:
    receiver = OtlpReceiver()
    stack = start_stack(
        tmp_path,
        transport=transport,
        extra=[
            "--otlp-endpoint",
            f"http://127.0.0.1:{receiver.port}",
            "--pod-name",
            "agent-pod-1",
            "--audit-dir",
            str(tmp_path / "audit"),
        ],
        envoy_values={"OTLP_PORT": receiver.port},
    )
    yield stack, receiver
    stop_stack(stack)
    receiver.stop()


def test_decision_span_is_a_child_of_envoys_span_in_the_requests_trace(
    traced: tuple[Stack, OtlpReceiver],
) -> None:
    stack, receiver = traced
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    resp = stack.call(
        "billing-agent",
        "GET",
        LEDGER + "/v1/invoices/traced",
        headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01", "x-mandate-task": "t-9"},
    )
    assert resp.status == 200
    seen = resp.json()
    # The upstream call is in the same trace and carries the decision id.
    assert seen["traceparent"].split("-")[1] == trace
    decision_id = seen["mandate"]["x-mandate-decision"]
    spans = receiver.wait_for(lambda s: s.name == "mandate.authorize" and s.trace_id == trace)
    assert len(spans) == 1, receiver.spans
    span = spans[0]
    assert span.service == "mandate"
    assert span.resource["k8s.pod.name"] == "agent-pod-1"
    assert span.resource["k8s.namespace.name"] == "agents"
    attrs = span.attributes
    assert attrs["mandate.decision"] == "allow"
    assert attrs["mandate.decision_id"] == decision_id
    assert attrs["mandate.agent"] == "billing-agent"
    assert attrs["mandate.owner"] == "finance-platform"
    assert attrs["mandate.purpose"] == "reconcile"
    assert attrs["mandate.task"] == "t-9"
    assert attrs["mandate.rule"] == "reconcile.allow[0]"
    assert attrs["http.request.method"] == "GET"
    assert attrs["server.address"] == "ledger.finance.svc.cluster.local"
    assert attrs["url.path"] == "/v1/invoices/traced"
    # Its parent is a span Envoy exported in the same trace (Envoy's ext_authz call).
    envoy = receiver.wait_for(
        lambda s: s.service == "mandate-envoy" and s.span_id == span.parent_span_id
    )
    assert envoy and envoy[0].trace_id == trace
    assert span.parent_span_id != "00f067aa0ba902b7"  # not the agent's span: Envoy's
    # The audit record says who, what and why, with the same decision id and trace id.
    record = stack.audit_record(trace)
    assert record["decision_id"] == decision_id
    assert (record["agent"], record["owner"], record["pod"]) == (
        "billing-agent", "finance-platform", "agent-pod-1",
    )  # fmt: skip
    assert (record["method"], record["host"], record["path"]) == (
        "GET", "ledger.finance.svc.cluster.local", "/v1/invoices/traced",
    )  # fmt: skip
    assert (record["purpose"], record["task"], record["rule"]) == (
        "reconcile", "t-9", "reconcile.allow[0]",
    )  # fmt: skip
    verify = subprocess.run(
        [sys.executable, "-m", "sidecar", "audit", "verify", str(stack.tmp / "audit")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_denied_call_has_a_span_with_the_reason(traced: tuple[Stack, OtlpReceiver]) -> None:
    stack, receiver = traced
    trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    resp = stack.call(
        "billing-agent",
        "GET",
        LEDGER + "/v1/ledger/admin/x",
        headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert resp.status == 403
    body = resp.json()
    assert body["trace_id"] == trace
    spans = receiver.wait_for(lambda s: s.name == "mandate.authorize" and s.trace_id == trace)
    assert spans and spans[0].attributes["mandate.decision"] == "deny"
    assert spans[0].attributes["mandate.decision_id"] == body["decision"]
    assert spans[0].attributes["mandate.code"] == "denied_by_rule"
    record = stack.audit_record(trace)
    assert (record["decision"], record["decision_id"]) == ("deny", body["decision"])
    assert record["code"] == "denied_by_rule" and record["rule"] == "reconcile.deny[0]"


def test_sampling_follows_the_parent(traced: tuple[Stack, OtlpReceiver]) -> None:
    stack, receiver = traced
    unsampled = "6bf92f3577b34da6a3ce929d0e0e4736"
    sampled = "7bf92f3577b34da6a3ce929d0e0e4736"
    for trace, flags in ((unsampled, "00"), (sampled, "01")):
        resp = stack.call(
            "billing-agent",
            "GET",
            LEDGER + "/v1/invoices/1",
            headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-{flags}"},
        )
        assert resp.status == 200
    assert receiver.wait_for(lambda s: s.name == "mandate.authorize" and s.trace_id == sampled)
    time.sleep(0.5)  # the batch that carried the sampled span is exported; nothing else came
    assert not [s for s in receiver.spans if s.trace_id == unsampled]
