"""Decision spans: every Check becomes a span in the request's trace (OpenTelemetry).

The parent is the span Envoy opened around its ext_authz call (the `traceparent` of the
gRPC call's metadata); without Envoy tracing, the `traceparent` the request itself
carried. Sampling follows the parent (ParentBased): an unsampled request costs only the
parent lookup. Spans are exported with OTLP/gRPC through a batch processor, off the Check
path. With no endpoint configured, tracing is off and `record` is never called: the hot
path pays one `is None` check. Attribute names follow OpenTelemetry's semantic
conventions where they exist (`http.request.method`, `server.address`, `server.port`,
`url.path`) and `mandate.*` otherwise. No decision logic here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .core import Decision

__all__ = ["Tracing"]

log = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """Owns a TracerProvider exporting to ``endpoint`` (e.g. http://127.0.0.1:4317)."""

    def __init__(
        self,
        endpoint: str,
        *,
        pod: str = "",
        namespace: str = "",
        service: str = "mandate",
        schedule_delay_ms: int = 200,
    ) -> None:
        resource = Resource.create(
            {
                "service.name": service,
                "service.instance.id": f"{pod or os.uname().nodename}/{os.getpid()}",
                "k8s.pod.name": pod,
                "k8s.namespace.name": namespace,
            }
        )
        self._provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=schedule_delay_ms)
        )
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

    def shutdown(self) -> None:
        try:
            self._provider.shutdown()
        except Exception:  # exporting is best effort at exit
            log.exception("tracing shutdown failed")
