"""The lean tracer's pure parts: the parent it picks (W3C Trace Context, as the SDK's
propagator picks it), the bytes it encodes (parsed with opentelemetry-proto and compared
with the SDK's own encoding of the same span), its resource and export settings."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common._internal import _encode_key_value
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.core import Decision
from sidecar.core.agentstate import Grant
from sidecar.errors import ConfigError
from sidecar.telemetry import otlp_wire
from sidecar.telemetry.otlp_export import ExportSettings, parse_headers
from sidecar.telemetry.tracecontext import normalize_tracestate, parent_of, parse_traceparent
from sidecar.telemetry.tracing import Tracing, resource_attributes
from sidecar.telemetry.tracing_sdk import SdkTracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{SPAN}-01"
IDS = (bytes.fromhex(TRACE), bytes.fromhex(SPAN))

# --- traceparent -------------------------------------------------------------------

TRACEPARENTS: list[tuple[str, str, tuple[bytes, bytes, bool] | None]] = [
    ("valid, sampled", TP, (*IDS, True)),
    ("valid, not sampled", f"00-{TRACE}-{SPAN}-00", (*IDS, False)),
    ("sampled is bit 0 of the flags", f"00-{TRACE}-{SPAN}-03", (*IDS, True)),
    ("other flag bits alone: not sampled", f"00-{TRACE}-{SPAN}-fe", (*IDS, False)),
    ("blanks around the value", f" \t{TP}\t ", (*IDS, True)),
    ("a later version may add fields", f"01-{TRACE}-{SPAN}-01-more", (*IDS, True)),
    ("a later version with four fields", f"cc-{TRACE}-{SPAN}-01", (*IDS, True)),
    ("version ff is invalid", f"ff-{TRACE}-{SPAN}-01", None),
    ("version 00 has exactly four fields", f"{TP}-more", None),
    ("version 00 with a trailing dash", f"{TP}-", None),
    ("version not hex", f"0g-{TRACE}-{SPAN}-01", None),
    ("all-zero trace id", f"00-{'0' * 32}-{SPAN}-01", None),
    ("all-zero parent id", f"00-{TRACE}-{'0' * 16}-01", None),
    ("upper-case hex", f"00-{TRACE.upper()}-{SPAN}-01", None),
    ("upper-case version", f"0A-{TRACE}-{SPAN}-01", None),
    ("bad hex in the trace id", f"00-{TRACE[:-1]}z-{SPAN}-01", None),
    ("bad hex in the parent id", f"00-{TRACE}-{SPAN[:-1]}x-01", None),
    ("trace id too short", f"00-{TRACE[:-1]}-{SPAN}-01", None),
    ("trace id too long", f"00-{TRACE}0-{SPAN}-01", None),
    ("parent id too long", f"00-{TRACE}-{SPAN}0-01", None),
    ("flags of one digit", f"00-{TRACE}-{SPAN}-1", None),
    ("flags of three digits", f"00-{TRACE}-{SPAN}-011", None),
    ("junk after the flags", f"{TP}x", None),
    ("wrong separator", f"00_{TRACE}_{SPAN}_01", None),
    ("longer than 512 characters", f"01-{TRACE}-{SPAN}-01-{'a' * 500}", None),
    ("a later version, 512 characters", f"01-{TRACE}-{SPAN}-01-{'a' * 456}", (*IDS, True)),
    ("empty", "", None),
]


@pytest.mark.parametrize(
    ("case", "value", "expected"), TRACEPARENTS, ids=[c[0] for c in TRACEPARENTS]
)
def test_traceparent(case: str, value: str, expected: tuple[bytes, bytes, bool] | None) -> None:
    assert parse_traceparent(value) == expected
    assert _sdk_parent({"traceparent": value}) == (None if expected is None else (*expected, ""))


TRACESTATES = [
    ("members kept in order", "b=2,a=1", "b=2,a=1"),
    ("optional blanks and empty members dropped", " b=2 ,\t, a=1 ", "b=2,a=1"),
    ("a value with inner blanks", "a=1 2", "a=1 2"),
    ("a multi-tenant key", "t1@vendor=x", "t1@vendor=x"),
    ("32 members", ",".join(f"k{i}=v" for i in range(32)), ",".join(f"k{i}=v" for i in range(32))),
    ("33 members: all dropped", ",".join(f"k{i}=v" for i in range(33)), ""),
    ("a repeated key: all dropped", "a=1,b=2,a=3", ""),
    ("an upper-case key: all dropped", "a=1,B=2", ""),
    ("an empty value: all dropped", "a=1,b=", ""),
    ("a member without =: all dropped", "a=1,b", ""),
    ("longer than 8192 characters: dropped", "a=" + "x" * 8200, ""),
    ("empty", "", ""),
]


@pytest.mark.parametrize(
    ("case", "value", "expected"), TRACESTATES, ids=[c[0] for c in TRACESTATES]
)
def test_tracestate(case: str, value: str, expected: str) -> None:
    assert normalize_tracestate(value) == expected
    carrier = {"traceparent": TP, "tracestate": value}
    parent = parent_of(carrier)
    assert parent is not None and parent.tracestate == expected
    assert _sdk_parent(carrier) == (*IDS, True, expected)


def _sdk_parent(carrier: Mapping[str, str]) -> tuple[bytes, bytes, bool, str] | None:
    """The parent OpenTelemetry's propagator extracts, in the same shape."""
    ctx = trace.get_current_span(TraceContextTextMapPropagator().extract(carrier))
    sc = ctx.get_span_context()
    if not sc.is_valid:
        return None
    state = ",".join(f"{k}={v}" for k, v in sc.trace_state.items())
    return (
        sc.trace_id.to_bytes(16, "big"),
        sc.span_id.to_bytes(8, "big"),
        sc.trace_flags.sampled,
        state,
    )


# --- attribute and message encoding ------------------------------------------------

ATTRIBUTES: list[tuple[str, Any]] = [
    ("string", "ledger.finance.svc.cluster.local"),
    ("empty string", ""),
    ("non-ASCII string", "größe/∑/😀"),
    ("string of 127 bytes", "x" * 127),
    ("string of 300 bytes", "y" * 300),
    ("int", 8443),
    ("zero", 0),
    ("negative int", -5),
    ("int64 max", 2**63 - 1),
    ("int64 min", -(2**63)),
    ("float", 0.25),
    ("negative float", -1.5),
    ("infinity", math.inf),
    ("bool true", True),
    ("bool false", False),
    ("bytes", b"\x00\xff"),
    ("list of strings", ["read_invoice", "list_invoices"]),
    ("tuple of ints", (1, 2, 3)),
    ("empty list", []),
]


@pytest.mark.parametrize(("case", "value"), ATTRIBUTES, ids=[c[0] for c in ATTRIBUTES])
def test_attribute_encoding_is_the_sdks(case: str, value: Any) -> None:
    key = "mandate.attribute"
    expected = _encode_key_value(key, value)
    assert common_pb2.KeyValue.FromString(otlp_wire.key_value(key, value)) == expected
    span = trace_pb2.Span.FromString(otlp_wire.span_attribute(key, value))
    assert list(span.attributes) == [expected]
    if isinstance(value, str):
        fast = otlp_wire.string_attribute(otlp_wire.attribute_key(key), value)
        assert fast == otlp_wire.span_attribute(key, value)


def test_a_lone_surrogate_becomes_a_replacement_not_invalid_utf8() -> None:
    kv = common_pb2.KeyValue.FromString(otlp_wire.key_value("url.path", "/a\udcff"))
    assert kv.value.string_value == "/a?"


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1])
def test_an_integer_outside_int64_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="int64"):
        otlp_wire.any_value(value)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 2**35, 2**64 - 1])
def test_varint(n: int) -> None:
    # read back as AnyValue.int_value, an int64 varint
    encoded = otlp_wire.varint(n)
    assert common_pb2.AnyValue.FromString(b"\x18" + encoded).int_value == (
        n if n < 2**63 else n - 2**64
    )


def test_export_request_frames_resource_scope_and_spans() -> None:
    enc = otlp_wire.SpanEncoder("op", otlp_wire.SPAN_KIND_SERVER)
    spans = [
        enc.encode(*IDS, b"", "", i, i + 1, otlp_wire.span_attribute("i", i), False)
        for i in range(1, 301)
    ]
    res = otlp_wire.resource({"service.name": "mandate", "k8s.pod.name": ""})
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(
        otlp_wire.export_request(res, otlp_wire.scope("mandate", "1.0"), spans)
    )
    (rs,) = request.resource_spans
    assert {a.key: a.value.string_value for a in rs.resource.attributes} == {
        "service.name": "mandate", "k8s.pod.name": "",
    }  # fmt: skip
    (ss,) = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("mandate", "1.0")
    assert [s.start_time_unix_nano for s in ss.spans] == list(range(1, 301))
    assert [s.attributes[0].value.int_value for s in ss.spans] == list(range(1, 301))


def test_export_method_is_the_trace_services() -> None:
    method = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].methods_by_name["Export"]
    service, name = method.full_name.rsplit(".", 1)
    assert f"/{service}/{name}" == otlp_wire.EXPORT_METHOD


# --- a decision span, lean vs SDK --------------------------------------------------

GRANT = Grant("g-17", "billing-agent", "agents", "month-end", 0.0, 9e9, "alice")
DECISIONS: list[tuple[str, Decision]] = [
    (
        "allowed",
        Decision(
            "0190a1b2c3d4e5f6a7b8c9d0e1f2a3b4",
            True,
            "allowed",
            "allowed by rule reconcile.allow[0] of purpose 'reconcile'",
            agent="billing-agent",
            owner="finance-platform",
            purpose="reconcile",
            task="t-9",
            rule="reconcile.allow[0]",
            identity_source="sidecar-config",
            method="GET",
            host="ledger.finance.svc.cluster.local",
            port=80,
            path="/v1/invoices/42",
        ),
    ),
    ("denied, most fields empty", Decision("d2", False, "unattributed", "no identity")),
    (
        "mcp tools, a risk score, an elevation",
        Decision(
            "d3",
            True,
            "allowed",
            "allowed by rule r of elevation 'month-end'",
            agent="a",
            owner="o",
            purpose="p",
            rule="month-end.allow[0]",
            method="POST",
            host="mcp.internal",
            port=8443,
            path="/mcp",
            mcp_tools=("read_invoice", "list_invoices"),
            grant=GRANT,
            risk=0.42,
        ),
    ),
    ("risk 0.0 is left out, as before", Decision("d4", True, "allowed", "ok", agent="a", risk=0.0)),
    (
        "non-ASCII and a reason over 128 bytes",
        Decision(
            "d5",
            False,
            "denied_by_rule",
            "denied: " + "é" * 100,
            agent="agént",
            path="/größe/∑",
        ),
    ),
]
PARENTS: list[tuple[str, dict[str, str]]] = [
    ("Envoy's sampled span", {"traceparent": TP}),
    ("with a tracestate", {"traceparent": TP, "tracestate": "vendor=1, other=x"}),
    ("no parent: a new root", {}),
    ("an invalid parent: a new root", {"traceparent": f"00-{TRACE.upper()}-{SPAN}-01"}),
]


@pytest.fixture
def lean() -> Iterator[tuple[Tracing, list[bytes]]]:
    tracer = Tracing("http://127.0.0.1:9", schedule_delay_ms=3_600_000)  # never exports
    spans: list[bytes] = []
    # what the export thread would encode, as soon as it is queued
    tracer._submit = lambda item: spans.append(tracer.encode(item))  # type: ignore[method-assign]
    yield tracer, spans
    tracer.shutdown()


@pytest.fixture
def sdk() -> Iterator[tuple[SdkTracing, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    tracer = SdkTracing("", processor=SimpleSpanProcessor(memory))
    yield tracer, memory
    tracer.shutdown()


@pytest.mark.parametrize("parents", [p[1] for p in PARENTS], ids=[p[0] for p in PARENTS])
@pytest.mark.parametrize("decision", [d[1] for d in DECISIONS], ids=[d[0] for d in DECISIONS])
def test_the_span_is_the_sdks(
    decision: Decision,
    parents: dict[str, str],
    lean: tuple[Tracing, list[bytes]],
    sdk: tuple[SdkTracing, InMemorySpanExporter],
) -> None:
    """Field by field, attribute order included; only the new ids differ."""
    tracer, entries = lean
    tracer.record(decision, parents, 1_700_000_000_123_456_789, 1_700_000_000_123_756_789)
    sdk_tracer, memory = sdk
    sdk_tracer.record(decision, parents, 1_700_000_000_123_456_789, 1_700_000_000_123_756_789)
    request = encode_spans(memory.get_finished_spans())
    expected = request.resource_spans[0].scope_spans[0].spans[0]
    (entry,) = entries
    (got,) = trace_pb2.ScopeSpans.FromString(entry).spans
    assert len(got.span_id) == 8 and got.span_id != bytes(8)
    if "traceparent" in parents and got.parent_span_id:
        assert got.trace_id == expected.trace_id == IDS[0]
    else:  # a root: a trace id of its own
        assert len(got.trace_id) == 16 and got.trace_id not in (bytes(16), expected.trace_id)
        got.trace_id = expected.trace_id
    got.span_id = expected.span_id
    assert got == expected
    assert got.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


def test_a_parent_not_sampled_means_no_span(lean: tuple[Tracing, list[bytes]]) -> None:
    tracer, entries = lean
    tracer.record(DECISIONS[0][1], {"traceparent": f"00-{TRACE}-{SPAN}-00"}, 1, 2)
    tracer.record(
        DECISIONS[0][1], {"traceparent": f"00-{TRACE}-{SPAN}-02", "tracestate": "a=1"}, 1, 2
    )
    assert entries == []
    tracer.record(DECISIONS[0][1], {"traceparent": f"00-{TRACE}-{SPAN}-01"}, 1, 2)
    assert len(entries) == 1


def test_roots_and_spans_get_fresh_ids(lean: tuple[Tracing, list[bytes]]) -> None:
    tracer, entries = lean
    for _ in range(200):
        tracer.record(DECISIONS[0][1], {}, 1, 2)
        tracer.record(DECISIONS[0][1], {"traceparent": TP}, 1, 2)
    spans = [trace_pb2.ScopeSpans.FromString(e).spans[0] for e in entries]
    roots = [s for s in spans if not s.parent_span_id]
    assert len(roots) == 200 and len({s.trace_id for s in roots}) == 200
    assert len({s.span_id for s in spans}) == 400
    assert {s.flags for s in roots} == {0x100}  # parent remoteness known: no parent
    assert {s.flags for s in spans if s.parent_span_id} == {0x300}  # a remote parent


def test_remembered_attribute_groups_stay_right_past_the_memo_size(
    lean: tuple[Tracing, list[bytes]],
) -> None:
    tracer, entries = lean
    for i in range(2_500):  # reasons that never repeat: the memo is cleared, twice
        d = Decision(f"d{i}", False, "outside_purpose", f"reason {i}", agent="a", host=f"h{i % 3}")
        tracer.record(d, {"traceparent": TP}, 1, 2)
    for i in (0, 1023, 1024, 2048, 2499):
        attrs = {
            a.key: a.value for a in trace_pb2.ScopeSpans.FromString(entries[i]).spans[0].attributes
        }
        assert attrs["mandate.reason"].string_value == f"reason {i}"
        assert attrs["server.address"].string_value == f"h{i % 3}"


# --- resource and export settings --------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        None,
        "deployment.environment=prod,team=fin%20ops",
        "service.name=other,k8s.pod.name=x,broken",
    ],
)
def test_resource_is_the_sdks_but_for_telemetry_sdk(
    env: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    else:
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", env)
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    explicit = {
        "service.name": "mandate",
        "service.instance.id": f"pod-1/{os.getpid()}",
        "k8s.pod.name": "pod-1",
        "k8s.namespace.name": "agents",
    }
    sdk = dict(Resource.create(explicit).attributes)
    ours = resource_attributes("mandate", "pod-1", "agents", os.environ)
    assert {k: v for k, v in ours.items() if not k.startswith("telemetry.sdk.")} == {
        k: v for k, v in sdk.items() if not k.startswith("telemetry.sdk.")
    }
    assert ours["telemetry.sdk.name"] == "mandate" and ours["telemetry.sdk.language"] == "python"
    encoded = resource_pb2.Resource.FromString(otlp_wire.resource(ours))
    assert {a.key: a.value.string_value for a in encoded.attributes} == ours


def test_export_settings_from_the_endpoint_and_environment(tmp_path: Path) -> None:
    plain = ExportSettings.from_env("http://collector:4317", {})
    assert (plain.target, plain.secure, plain.headers, plain.timeout, plain.gzip) == (
        "collector:4317", False, (), 10.0, False,
    )  # fmt: skip
    assert ExportSettings.from_env("collector:4317", {}).target == "collector:4317"
    assert ExportSettings.from_env("unix:///run/otel.sock", {}).target == "unix:///run/otel.sock"
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"PEM")
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=fin,Authorization=Bearer%20t",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-only=traces",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2.5",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca),
    }
    plain_env = ExportSettings.from_env("http://collector:4317", env)
    assert (plain_env.target, plain_env.secure, plain_env.timeout, plain_env.gzip) == (
        "collector:4317", False, 2.5, True,
    )  # fmt: skip
    assert plain_env.headers == (("x-only", "traces"),)  # the traces variable wins, whole
    # certificates are read for TLS only (a real CA: tests/adapter/test_otlp_transport.py)
    assert plain_env.root_certificates is None
    with pytest.raises(ConfigError, match=r"OTEL_EXPORTER_OTLP_CERTIFICATE=.*not a PEM"):
        ExportSettings.from_env("https://collector:4317", env)


@pytest.mark.parametrize(
    ("endpoint", "env", "message"),
    [
        ("http://", {}, "--otlp-endpoint"),
        ("http://c:4317", {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
        ("http://c:4317", {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "0"}, "seconds > 0"),
        ("http://c:4317", {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "gzip or none"),
        ("https://c:4317", {"OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem"}, "ca.pem"),
    ],
)
def test_bad_export_settings_are_config_errors(
    endpoint: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ExportSettings.from_env(endpoint, env)


def test_header_parsing() -> None:
    assert parse_headers(" A=1 , b = x%2Cy ,broken,=v, c=d=e") == (
        ("a", "1"),
        ("b", "x,y"),
        ("c", "d=e"),
    )
