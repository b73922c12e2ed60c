"""The lean tracer against a real OTLP/gRPC TraceService on 127.0.0.1 (port 0): what it
exports is what the OpenTelemetry SDK path exported, retries reach a receiver that
failed, shutdown delivers what was queued, and the exporter's environment is honoured."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.unknown_fields import UnknownFieldSet
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from sidecar.core import Decision
from sidecar.telemetry import otlp_wire
from sidecar.telemetry.metrics import REGISTRY
from sidecar.telemetry.otlp_export import BatchExporter, ExportSettings, GrpcTransport
from sidecar.telemetry.tracing import Tracing
from sidecar.telemetry.tracing_sdk import SdkTracing

from ..e2e.otlp import OtlpReceiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


class Receiver(OtlpReceiver):
    """Keeps each request and its metadata; fails the first ``fail`` calls with ``code``."""

    def __init__(self, fail: int = 0, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, Any]] = []
        self.calls = 0
        self._fail, self._code = fail, code
        self._calls_lock = threading.Lock()
        super().__init__()

    def Export(self, request: Any, context: Any) -> Any:
        with self._calls_lock:
            self.calls += 1
            failing = self.calls <= self._fail
        if failing:
            context.abort(self._code, "injected failure")
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return super().Export(request, context)

    def raw_spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, Span message) of every span received."""
        return [
            ({a.key: a.value.string_value for a in rs.resource.attributes}, span)
            for req in list(self.requests)
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def decision(i: int, allowed: bool = True) -> Decision:
    return Decision(
        f"decision-{i}", allowed, "allowed" if allowed else "denied_by_rule", f"reason {i % 3}",
        agent="billing-agent", owner="finance-platform", purpose="reconcile",
        rule="reconcile.allow[0]", identity_source="sidecar-config", method="GET",
        host="ledger.finance.svc.cluster.local", port=80, path=f"/v1/invoices/{i}",
        mcp_tools=("read_invoice",) if i % 2 else (),
    )  # fmt: skip


def record_all(tracer: Tracing | SdkTracing) -> None:
    for i in range(20):
        parents = {"traceparent": f"00-{TRACE}-{i + 1:016x}-01"} if i % 4 else {}
        if i == 5:
            parents["tracestate"] = "vendor=x"
        tracer.record(decision(i, allowed=i % 5 != 0), parents, 1_000 + i, 2_000 + i)
    tracer.record(decision(99), {"traceparent": f"00-{TRACE}-00000000000000aa-00"}, 1, 2)


def test_the_lean_tracer_exports_what_the_sdk_exported(receiver: Receiver) -> None:
    endpoint = f"http://127.0.0.1:{receiver.port}"
    lean = Tracing(endpoint, pod="agent-pod-1", namespace="agents")
    record_all(lean)
    lean.shutdown()
    got = receiver.raw_spans()
    receiver.requests.clear()
    sdk = SdkTracing(endpoint, pod="agent-pod-1", namespace="agents")
    record_all(sdk)
    sdk.shutdown()
    expected = receiver.raw_spans()

    assert len(got) == len(expected) == 20  # the unsampled parent's decision has no span
    for (got_res, got_span), (exp_res, exp_span) in zip(got, expected, strict=True):
        assert {k: v for k, v in got_res.items() if not k.startswith("telemetry.sdk.")} == {
            k: v for k, v in exp_res.items() if not k.startswith("telemetry.sdk.")
        }
        assert got_res["k8s.pod.name"] == "agent-pod-1" and got_res["service.name"] == "mandate"
        if not exp_span.parent_span_id:  # roots: each path drew its own trace id
            assert got_span.trace_id != exp_span.trace_id
            got_span.trace_id = exp_span.trace_id
        got_span.span_id = exp_span.span_id
        assert got_span == exp_span
    parented = [s for _, s in got if s.parent_span_id]
    assert {s.trace_id.hex() for s in parented} == {TRACE}
    assert [s.trace_state for _, s in got if s.trace_state] == ["vendor=x"]
    assert all(s.kind == trace_pb2.Span.SPAN_KIND_SERVER for _, s in got)
    ua = receiver.metadata[0]["user-agent"]
    assert ua.startswith("mandate/"), ua


def test_an_export_is_retried_until_the_receiver_takes_it() -> None:
    receiver = Receiver(fail=2, code=grpc.StatusCode.UNAVAILABLE)
    try:
        settings = ExportSettings.from_env(f"http://127.0.0.1:{receiver.port}", {})
        exporter = BatchExporter(
            GrpcTransport(settings),
            otlp_wire.resource({"service.name": "mandate"}),
            otlp_wire.scope("mandate"),
            retry_base=0.05,
        )
        enc = otlp_wire.SpanEncoder("mandate.authorize", otlp_wire.SPAN_KIND_SERVER)
        for i in range(1, 4):
            exporter.submit(
                enc.encode(bytes(range(1, 17)), i.to_bytes(8, "big"), b"", "", i, i, b"", False)
            )
        assert exporter.flush()
        assert receiver.calls == 3
        assert [s.span_id for s in receiver.spans] == [f"{i:016x}" for i in range(1, 4)]
        assert exporter.stats().exported == 3 and exporter.stats().failed == 0
        exporter.shutdown()
    finally:
        receiver.stop()


def test_a_receiver_that_refuses_fails_the_batch_without_retrying() -> None:
    receiver = Receiver(fail=10, code=grpc.StatusCode.INVALID_ARGUMENT)
    try:
        tracer = Tracing(f"http://127.0.0.1:{receiver.port}")
        tracer.record(decision(1), {"traceparent": TRACEPARENT}, 1, 2)
        assert tracer.flush()
        assert receiver.calls == 1
        assert tracer.stats().failed == 1
        tracer.shutdown()
    finally:
        receiver.stop()


def test_shutdown_delivers_every_queued_span(receiver: Receiver) -> None:
    before = _exported_metric()
    tracer = Tracing(f"http://127.0.0.1:{receiver.port}", schedule_delay_ms=3_600_000)
    for i in range(1_500):
        tracer.record(decision(i), {"traceparent": TRACEPARENT}, 1, 2)
    tracer.shutdown()
    ids = [s.attributes["mandate.decision_id"] for s in receiver.spans]
    assert ids == [f"decision-{i}" for i in range(1_500)]
    assert tracer.stats().exported == 1_500
    assert _exported_metric() - before == 1_500  # mandate_trace_spans_total on /metrics


def _exported_metric() -> float:
    value = REGISTRY.get_sample_value("mandate_trace_spans_total", {"outcome": "exported"})
    return value or 0.0


def test_headers_and_gzip_from_the_environment(receiver: Receiver) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=finance,x-token=a%20b",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod",
    }
    tracer = Tracing(f"http://127.0.0.1:{receiver.port}", environ=env)
    tracer.record(decision(1), {"traceparent": TRACEPARENT}, 1, 2)
    tracer.shutdown()
    (span,) = receiver.spans  # gzip-compressed; gRPC decompresses it for the servicer
    assert span.resource["deployment.environment"] == "prod"
    assert receiver.metadata[0]["x-tenant"] == "finance"
    assert receiver.metadata[0]["x-token"] == "a b"


def test_the_export_request_is_a_valid_message(receiver: Receiver) -> None:
    """The receiver parsed it with opentelemetry-proto; re-encoding it gives the same
    message (nothing unknown or malformed was skipped)."""
    tracer = Tracing(f"http://127.0.0.1:{receiver.port}")
    tracer.record(decision(1), {"traceparent": TRACEPARENT, "tracestate": "a=1"}, 1, 2)
    tracer.shutdown()
    (request,) = receiver.requests
    again = trace_service_pb2.ExportTraceServiceRequest.FromString(request.SerializeToString())
    assert again == request
    rs = request.resource_spans[0]
    for message in (request, rs, rs.resource, rs.scope_spans[0], rs.scope_spans[0].spans[0]):
        assert len(UnknownFieldSet(message)) == 0
