"""Decision spans through the OpenTelemetry SDK: the implementation `tracing.Tracing`
replaced, kept as the reference it is tested against (tests/adapter/test_tracing_*.py
compare what both export) and measured against (bench/span_cost.py). `mandate run` does
not use it: it costs about 73 µs of CPU per span where the lean tracer costs a few (see
`tracing.py`). Same interface as `tracing.Tracing`; the OpenTelemetry SDK and its OTLP
exporter are imported only here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidecar.core import Decision

__all__ = ["SdkTracing"]

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()


class SdkTracing:
    """Owns a TracerProvider exporting to ``endpoint`` (e.g. http://127.0.0.1:4317)."""

    def __init__(
        self,
        endpoint: str,
        *,
        pod: str = "",
        namespace: str = "",
        service: str = "mandate",
        schedule_delay_ms: int = 200,
        processor: SpanProcessor | None = None,
    ) -> None:
        """``processor`` replaces the OTLP batch processor (tests: an in-memory exporter)."""
        resource = Resource.create(
            {
                "service.name": service,
                "service.instance.id": f"{pod or os.uname().nodename}/{os.getpid()}",
                "k8s.pod.name": pod,
                "k8s.namespace.name": namespace,
            }
        )
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
        if processor is None:
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
            processor = BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_ms)
        self._provider.add_span_processor(processor)
        self._tracer: Tracer = self._provider.get_tracer("mandate")

    def record(
        self,
        decision: Decision,
        parents: Mapping[str, str],
        start_ns: int,
        end_ns: int,
    ) -> None:
        """Record one decision span; ``parents`` holds `traceparent`/`tracestate`."""
        ctx = _PROPAGATOR.extract(parents)
        attributes: dict[str, str | int | float | list[str]] = {
            "mandate.decision": "allow" if decision.allowed else "deny",
            "mandate.decision_id": decision.decision_id,
            "mandate.code": decision.code,
            "mandate.reason": decision.reason,
            "mandate.rule": decision.rule,
            "mandate.agent": decision.agent,
            "mandate.owner": decision.owner,
            "mandate.purpose": decision.purpose,
            "mandate.task": decision.task,
            "mandate.identity_source": decision.identity_source,
            "mandate.mcp.tools": list(decision.mcp_tools),
            "http.request.method": decision.method,
            "server.address": decision.host,
            "server.port": decision.port,
            "url.path": decision.path,
        }
        if decision.risk >= 0:
            attributes["mandate.risk"] = decision.risk
        if decision.grant is not None:
            attributes["mandate.elevation"] = decision.grant.elevation
            attributes["mandate.elevation.grant"] = decision.grant.id
        span = self._tracer.start_span(
            "mandate.authorize",
            context=ctx,
            kind=SpanKind.SERVER,
            start_time=start_ns,
            # Empty values are left out: the SDK validates every attribute, per span.
            attributes={k: v for k, v in attributes.items() if v},
        )
        span.end(end_time=end_ns)  # a deny is a decision, not an error: status stays unset

    def flush(self, timeout: float = 10.0) -> bool:
        return self._provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        try:
            self._provider.shutdown()
        except Exception:  # exporting is best effort at exit
            log.exception("tracing shutdown failed")
