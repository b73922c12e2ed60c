"""Envoy adapter: `envoy.service.auth.v3.Authorization/Check` on xds-protos classes.

Translates a CheckRequest into a :class:`~sidecar.core.RequestView`, calls the pure
`decide`, and translates the Decision into a CheckResponse:
- allow: OK with the `x-mandate-*` headers set (overwriting what the agent sent) and any
  other `x-mandate-*` header the agent sent removed; the decision id also goes into
  dynamic metadata (filter namespace) for the access log.
- deny: PERMISSION_DENIED with HTTP 403, a JSON body {error, reason, decision, trace_id}
  and the `x-mandate-decision` header.
`Check` never raises into gRPC: malformed input, no snapshot or any internal error is a
deny with a reason (fail closed). This module must not contain decision logic.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from . import metrics
from .audit import AuditWriter, record_from_decision
from .core import Code, Decision, RequestView, Snapshot, decide
from .core.revocation import EMPTY_TABLE, RevocationTable

if TYPE_CHECKING:
    from .tracing import Tracing

__all__ = [
    "AGENT_HEADER",
    "DECISION_HEADER",
    "AuthorizationServicer",
    "Identity",
    "view_from_check",
]

log = logging.getLogger(__name__)
# Decision ids need uniqueness, not secrecy; `random` is re-seeded in forked children.
_random_bits = random.getrandbits

AGENT_HEADER = "x-mandate-agent"
DECISION_HEADER = "x-mandate-decision"
PURPOSE_HEADER = "x-mandate-purpose"
TASK_HEADER = "x-mandate-task"
_SET_HEADERS = (AGENT_HEADER, PURPOSE_HEADER, TASK_HEADER, DECISION_HEADER)
_PARTIAL_BODY = "x-envoy-auth-partial-body"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_TRACE_KEYS = ("traceparent", "tracestate")
# version-traceid-parentid-flags[-more]; a character class, not int(x, 16), which also
# takes a sign, "_" and whitespace.
_TRACEPARENT = re.compile(
    r"[0-9a-fA-F]{2}-([0-9a-fA-F]{32})-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}(?:-|\Z)"
)
_NO_TRACE = "0" * 32


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the sidecar serves, from its own configuration (the pod), not from requests."""

    agent: str | None = None
    service_account: str | None = None
    namespace: str = ""


def new_decision_id() -> str:
    """A 32-hex-digit, time-ordered id: 48 bits of Unix milliseconds, then 80 random bits.

    Hex rather than base32: Python's base32 is pure Python and cost a tenth of a Check."""
    return f"{(time.time_ns() // 1_000_000) << 80 | _random_bits(80):032x}"


def trace_id_of(traceparent: str) -> str:
    """The trace id of a W3C traceparent header, or '' if it is not well formed."""
    m = _TRACEPARENT.match(traceparent)
    if m is None or m.group(1) == _NO_TRACE:
        return ""
    return m.group(1).lower()


def _body_truncated(headers: dict[str, str], size: int) -> bool:
    if headers.get(_PARTIAL_BODY, "false").lower() != "false":
        return True
    length = headers.get("content-length")
    if length is not None:
        try:
            return int(length) != size
        except ValueError:
            return True
    return False


def view_from_check(
    req: external_auth_pb2.CheckRequest, identity: Identity, decision_id: str
) -> RequestView:
    """Translate a CheckRequest (protobuf) into the pure request view."""
    attrs = req.attributes
    http = attrs.request.http
    headers = dict(http.headers)
    body: bytes | None
    if http.raw_body:
        body = http.raw_body
    elif http.body:
        body = http.body.encode("utf-8", "surrogateescape")
    else:
        body = None
    return RequestView(
        decision_id=decision_id,
        method=http.method or headers.get(":method", ""),
        authority=http.host or headers.get(":authority", ""),
        path=http.path or headers.get(":path", ""),
        scheme=http.scheme or headers.get(":scheme", "http"),
        headers=headers,
        body=body,
        body_truncated=body is not None and _body_truncated(headers, len(body)),
        context_extensions=dict(attrs.context_extensions),
        source_principal=attrs.source.principal,
        configured_agent=identity.agent,
        configured_service_account=identity.service_account,
        namespace=identity.namespace,
        trace_id=trace_id_of(headers.get("traceparent", "")),
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def deny_body(d: Decision) -> bytes:
    return json.dumps(
        {"error": d.code, "reason": d.reason, "decision": d.decision_id, "trace_id": d.trace_id}
    ).encode()


def response_for(d: Decision, agent_headers: dict[str, str]) -> external_auth_pb2.CheckResponse:
    """The CheckResponse for a decision; ``agent_headers`` are the request's headers."""
    meta = struct_pb2.Struct()
    fields = meta.fields  # set directly: Struct.update() costs twice as much per Check
    fields["decision_id"].string_value = d.decision_id
    fields["decision"].string_value = "allow" if d.allowed else "deny"
    if d.allowed:
        ok = external_auth_pb2.OkHttpResponse(
            headers=[
                _header(AGENT_HEADER, d.agent),
                _header(PURPOSE_HEADER, d.purpose),
                _header(DECISION_HEADER, d.decision_id),
            ],
        )
        if d.task:
            ok.headers.append(_header(TASK_HEADER, d.task))
        for name in agent_headers:
            if name.startswith("x-mandate-") and (
                name not in _SET_HEADERS or (name == TASK_HEADER and not d.task)
            ):
                ok.headers_to_remove.append(name)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK), ok_response=ok, dynamic_metadata=meta
        )
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
        headers=[
            _header("content-type", "application/json"),
            _header(DECISION_HEADER, d.decision_id),
        ],
        body=deny_body(d).decode(),
    )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=d.code),
        denied_response=denied,
        dynamic_metadata=meta,
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The Check handler. ``snapshot`` returns the current snapshot (or None before load)."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        identity: Identity,
        clock: Callable[[], float] = time.time,
        revocations: Callable[[], RevocationTable] = lambda: EMPTY_TABLE,
        tracing: Tracing | None = None,
        audit: Audit | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._identity = identity
        self._clock = clock
        self._revocations = revocations
        self._tracing = tracing
        self._audit = audit

    def decide(self, request: external_auth_pb2.CheckRequest) -> tuple[Decision, dict[str, str]]:
        """Decide one CheckRequest; never raises."""
        did = new_decision_id()
        headers: dict[str, str] = {}
        try:
            snap = self._snapshot()
            if snap is None:
                return Decision(did, False, Code.INTERNAL_ERROR, "profiles not loaded yet"), headers
            view = view_from_check(request, self._identity, did)
            headers = dict(view.headers)
            return decide(snap, view, self._clock(), self._revocations()), headers
        except Exception as exc:  # fail closed on anything at all
            log.exception("Check failed; denying (decision %s)", did)
            return Decision(
                did, False, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"
            ), headers

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        start = time.perf_counter()
        start_ns = time.time_ns() if self._tracing is not None else 0
        decision, headers = self.decide(request)
        if self._audit is not None:
            decision = self._audit.record(decision)
        try:
            response = response_for(decision, headers)
        except Exception:
            log.exception("building the CheckResponse failed; denying")
            response = external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="internal_error")
            )
        metrics.observe_decision(decision, time.perf_counter() - start)
        if self._tracing is not None:
            try:
                self._tracing.record(decision, _parents(context, headers), start_ns, time.time_ns())
            except Exception:  # telemetry never changes a decision
                log.exception("recording the decision span failed")
        return response


@dataclass(frozen=True, slots=True)
class Audit:
    """Where a worker's decisions go: every deny, and every allow unless ``allows`` is
    false. With the writer in fail-closed mode and unable to write, an allow becomes a
    deny (`audit_unavailable`): no call leaves without its record."""

    writer: AuditWriter
    pod: str
    namespace: str
    allows: bool = True

    def record(self, decision: Decision) -> Decision:
        if decision.allowed and self.writer.must_deny():
            decision = replace(
                decision,
                allowed=False,
                code=Code.AUDIT_UNAVAILABLE,
                reason="the audit trail cannot be written: failing closed",
            )
        if self.allows or not decision.allowed:
            self.writer.write(
                record_from_decision(
                    decision, pod=self.pod, namespace=self.namespace, now=time.time()
                )
            )
        return decision


def _parents(context: grpc.ServicerContext | None, headers: dict[str, str]) -> dict[str, str]:
    """The span to parent the decision span on: Envoy's ext_authz span (gRPC metadata),
    else the request's own `traceparent`."""
    if context is not None:
        meta = {k: v for k, v in context.invocation_metadata() if k in _TRACE_KEYS}
        if "traceparent" in meta:
            return meta  # type: ignore[return-value]
    return {k: headers[k] for k in _TRACE_KEYS if k in headers}
