"""Decision spans: every Check becomes a span in the request's trace, exported over OTLP.

The parent is the span Envoy opened around its ext_authz call (the `traceparent` of the
gRPC call's metadata); without Envoy tracing, the `traceparent` the request itself
carried. Sampling follows the parent (ParentBased(ALWAYS_ON)): a parent with the sampled
flag unset means no span, and an unsampled request costs only the parent lookup; no
valid parent starts a new, sampled trace. The span (`mandate.authorize`, kind SERVER,
the Check's start and end, the parent's tracestate) carries the decision's attributes:
OpenTelemetry's semantic conventions where they exist (`http.request.method`,
`server.address`, `server.port`, `url.path`), `mandate.*` otherwise; empty values are left
out. With no endpoint configured, tracing is off and `record` is never called: the hot
path pays one `is None` check. No decision logic here.

Why not the OpenTelemetry SDK (`tracing_sdk.py`, which this replaced): at 100 % sampling
it cost about 73 µs of CPU per decision span on the 2-CPU bench machine (the Span object
and its attribute validation, the BatchSpanProcessor, the exporter's encoding), and with
the audit trail it halved gRPC Check throughput (3,342 → 1,552 req/s). This tracer does
only what a decision span needs: it parses the parent itself (`tracecontext`, the SDK
propagator's rules), queues the decision and its parent on a bounded queue, and one
thread encodes each span straight into OTLP protobuf bytes (`otlp_wire`; repeated
attribute groups are encoded once and remembered) and exports them in batches with the
SDK exporter's retry policy (`otlp_export`). `bench/span_cost.py` measured 6 µs of CPU
per span in all against the SDK's 85 (30 on the Check thread). Encoding on the export
thread, a batch at a time, costs the worker less than on the Check thread between
Checks: +13 against +21 µs of CPU per Check through real Envoy (bench/README.md).

What it does not do, unlike the SDK: no span processors, samplers, exporters or ID
generators to plug in (ParentBased(ALWAYS_ON) and OTLP/gRPC are fixed); no other span
kinds, events, links or status; no span or attribute limits (a decision span has at most
18 attributes); the `OTEL_*` variables read are `OTEL_RESOURCE_ATTRIBUTES` and the
exporter's `OTEL_EXPORTER_OTLP_[TRACES_]{HEADERS,TIMEOUT,COMPRESSION,CERTIFICATE,
CLIENT_KEY,CLIENT_CERTIFICATE}`, no others (OTEL_BSP_*, OTEL_TRACES_SAMPLER, ...); the
resource's `telemetry.sdk.*` name mandate, not the SDK, and so does the exporter's
user agent; a full queue drops the newest span (the SDK dropped the oldest); and a process
that forks after `Tracing` starts has no export thread in the child (mandate's workers
create theirs after they start).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar
from urllib.parse import unquote

from prometheus_client import Counter

from sidecar import __version__
from sidecar.core import Decision
from sidecar.telemetry.metrics import REGISTRY
from sidecar.telemetry.otlp_export import BatchExporter, ExportSettings, ExportStats, GrpcTransport
from sidecar.telemetry.otlp_wire import (
    SPAN_KIND_SERVER,
    AttributeValue,
    SpanEncoder,
    attribute_key,
    resource,
    scope,
    span_attribute,
    string_attribute,
)
from sidecar.telemetry.tracecontext import Parent, parent_of

__all__ = ["Tracing", "resource_attributes"]

# Defined here, not in metrics.py: the series exists only in processes that trace.
SPANS = Counter(
    "mandate_trace_spans",
    "Decision spans by outcome: exported, dropped (queue full), failed (export error)",
    ["outcome"],
    registry=REGISTRY,
)

_ENCODER = SpanEncoder("mandate.authorize", SPAN_KIND_SERVER)
_DECISION = {
    True: string_attribute(attribute_key("mandate.decision"), "allow"),
    False: string_attribute(attribute_key("mandate.decision"), "deny"),
}
_DECISION_ID = attribute_key("mandate.decision_id")
_TASK = attribute_key("mandate.task")
_PATH = attribute_key("url.path")
_MEMO_SIZE = 1024
_random_bits = random.getrandbits  # ids need uniqueness, not secrecy (as the SDK's)
_K = TypeVar("_K", bound=Hashable)
_Where = tuple[str, tuple[str, ...], str, str, int]
# A span `record` queued for the export thread: its parent (None: a new root), start and
# end (ns), and the decision.
_Pending = tuple[Parent | None, int, int, Decision]


class Tracing:
    """Records decision spans and exports them to ``endpoint`` (e.g. http://127.0.0.1:4317)
    from a background thread."""

    def __init__(
        self,
        endpoint: str,
        *,
        pod: str = "",
        namespace: str = "",
        service: str = "mandate",
        schedule_delay_ms: int = 200,
        max_queue: int = 2048,
        max_batch: int = 512,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        settings = ExportSettings.from_env(endpoint, environ)
        attrs = resource_attributes(service, pod, namespace, environ)
        self._last = {"exported": 0, "dropped": 0, "failed": 0}
        self._exporter = BatchExporter(
            GrpcTransport(settings),
            resource(attrs),
            scope("mandate"),
            max_queue=max_queue,
            max_batch=max_batch,
            delay=schedule_delay_ms / 1000,
            timeout=settings.timeout,
            on_cycle=self._count,
            encode=self.encode,
        )
        self._submit = self._exporter.submit
        # Encoded attribute groups, by the fields they encode: most decisions repeat them.
        # Used by the export thread only.
        self._who: dict[tuple[str, ...], bytes] = {}
        self._where: dict[_Where, bytes] = {}

    def record(
        self,
        decision: Decision,
        parents: Mapping[str, str],
        start_ns: int,
        end_ns: int,
    ) -> None:
        """Record one decision span; ``parents`` holds `traceparent`/`tracestate`. Only the
        sampling decision is made here; the span is encoded on the export thread, in
        batches (`encode`): per span it costs the worker less there than between Checks
        (bench/README.md, telemetry section)."""
        parent = parent_of(parents)
        if parent is not None and not parent.sampled:
            return
        self._submit((parent, start_ns, end_ns, decision))

    def encode(self, item: _Pending) -> bytes:
        """The `ScopeSpans.spans` entry of a span `record` queued (export thread)."""
        parent, start_ns, end_ns, decision = item
        if parent is None:
            trace_id = (_random_bits(128) or 1).to_bytes(16, "big")
            parent_id, state = b"", ""
        else:
            trace_id, parent_id, _, state = parent
        return _ENCODER.encode(
            trace_id,
            (_random_bits(64) or 1).to_bytes(8, "big"),
            parent_id,
            state,
            start_ns,
            end_ns,
            self._attributes(decision),
            parent is not None,
        )

    def _attributes(self, d: Decision) -> bytes:
        # The SDK path's attributes, in its order: decision, decision_id, who (code ...
        # purpose), task, where (identity source ... port), path, risk, elevation.
        who = _memo(self._who, (d.code, d.reason, d.rule, d.agent, d.owner, d.purpose), _who)
        where = _memo(
            self._where, (d.identity_source, d.mcp_tools, d.method, d.host, d.port), _where
        )
        parts = [
            _DECISION[d.allowed],
            string_attribute(_DECISION_ID, d.decision_id) if d.decision_id else b"",
            who,
            string_attribute(_TASK, d.task) if d.task else b"",
            where,
            string_attribute(_PATH, d.path) if d.path else b"",
        ]
        if d.risk > 0:  # the SDK path's `risk >= 0`, less the empty value 0.0
            parts.append(span_attribute("mandate.risk", d.risk))
        if d.grant is not None:
            parts.append(_encode_pairs(
                ("mandate.elevation", d.grant.elevation), ("mandate.elevation.grant", d.grant.id)
            ))  # fmt: skip
        return b"".join(parts)

    def stats(self) -> ExportStats:
        return self._exporter.stats()

    def flush(self, timeout: float = 10.0) -> bool:
        """Export the spans recorded so far; True once done."""
        return self._exporter.flush(timeout)

    def shutdown(self) -> None:
        """Export what is queued, then stop (at most ~10 s)."""
        self._exporter.shutdown()

    def _count(self, stats: ExportStats) -> None:
        for outcome, value in (
            ("exported", stats.exported), ("dropped", stats.dropped), ("failed", stats.failed),
        ):  # fmt: skip
            if value > self._last[outcome]:
                SPANS.labels(outcome).inc(value - self._last[outcome])
                self._last[outcome] = value


def resource_attributes(
    service: str, pod: str, namespace: str, environ: Mapping[str, str]
) -> dict[str, AttributeValue]:
    """The resource of every span: as `Resource.create` made it for the SDK path
    (`OTEL_RESOURCE_ATTRIBUTES` under the explicit attributes), except that the
    `telemetry.sdk.*` attributes name mandate's tracer, not OpenTelemetry's SDK."""
    attrs: dict[str, AttributeValue] = {
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "mandate",
        "telemetry.sdk.version": __version__,
    }
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, eq, value = item.partition("=")
        if eq and key.strip():
            attrs[key.strip()] = unquote(value.strip())
    attrs.update(
        {
            "service.name": service,
            "service.instance.id": f"{pod or os.uname().nodename}/{os.getpid()}",
            "k8s.pod.name": pod,
            "k8s.namespace.name": namespace,
        }
    )
    return attrs


def _memo(cache: dict[_K, bytes], key: _K, encode: Callable[[_K], bytes]) -> bytes:
    found = cache.get(key)
    if found is None:
        if len(cache) >= _MEMO_SIZE:  # a reason or path-like value that never repeats
            cache.clear()
        found = cache[key] = encode(key)
    return found


def _encode_pairs(*pairs: tuple[str, AttributeValue]) -> bytes:
    return b"".join(span_attribute(k, v) for k, v in pairs if v)


def _who(key: tuple[str, ...]) -> bytes:
    names = ("mandate.code", "mandate.reason", "mandate.rule", "mandate.agent",
             "mandate.owner", "mandate.purpose")  # fmt: skip
    return _encode_pairs(*zip(names, key, strict=True))


def _where(key: _Where) -> bytes:
    source, tools, method, host, port = key
    return _encode_pairs(
        ("mandate.identity_source", source),
        ("mandate.mcp.tools", list(tools)),
        ("http.request.method", method),
        ("server.address", host),
        ("server.port", port),
    )
