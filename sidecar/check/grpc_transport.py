"""Envoy adapter: `envoy.service.auth.v3.Authorization/Check` on xds-protos classes.

Translates a CheckRequest into a :class:`~sidecar.core.RequestView` (:func:`view_from_check`),
runs the shared pipeline (`check.pipeline.CheckPipeline`: the pure `decide`, rate, audit,
metrics, span), and translates the Decision into a CheckResponse (:func:`response_for`):
- allow: OK with the `x-mandate-*` headers set (overwriting what the agent sent) and any
  other `x-mandate-*` header the agent sent removed;
- deny: PERMISSION_DENIED with HTTP 403, a JSON body {error, reason, decision, trace_id}
  and the `x-mandate-decision` header;
- both: dynamic metadata (Envoy files it under the filter's namespace,
  `envoy.filters.http.ext_authz`) for the access logs: `decision_id`, `decision`
  (allow/deny), `agent`, `code` and `purpose`, and for an agent under behaviour analysis
  `call` (the call's facts: `sidecar.core.callfacts`). Envoy's ALS entry carries it,
  allowed or denied, which attributes each call to its agent for behaviour analysis
  (`sidecar.behaviour.access_log`).
`Check` never raises into gRPC: malformed input, no snapshot or any internal error is a
deny with a reason (fail closed). The HTTP transport (`http_authz`) answers the same way.
This module must not contain decision logic.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import TRACE_KEYS, Identity, make_view, request_parents
from sidecar.check.response import deny_body, deny_status, upstream_headers
from sidecar.core import Decision, RequestView
from sidecar.credentials.broker import NOTHING, Injected
from sidecar.headers import DECISION_HEADER

__all__ = ["AuthorizationServicer", "response_for", "view_from_check"]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STATUS = {403: http_status_pb2.Forbidden, 503: http_status_pb2.ServiceUnavailable}


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
    return make_view(
        decision_id,
        identity,
        method=http.method or headers.get(":method", ""),
        authority=http.host or headers.get(":authority", ""),
        path=http.path or headers.get(":path", ""),
        scheme=http.scheme or headers.get(":scheme", "http"),
        headers=headers,
        body=body,
        context_extensions=dict(attrs.context_extensions),
        source_principal=attrs.source.principal,
    )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def response_for(
    d: Decision, agent_headers: Mapping[str, str], injected: Injected = NOTHING, facts: str = ""
) -> external_auth_pb2.CheckResponse:
    """The CheckResponse for a decision; ``agent_headers`` are the request's headers,
    ``injected`` the credentials an allowed call carries, ``facts`` the call's facts for
    behaviour analysis ('' for none)."""
    meta = struct_pb2.Struct()
    fields = meta.fields  # set directly: Struct.update() costs twice as much per Check
    fields["decision_id"].string_value = d.decision_id
    fields["decision"].string_value = "allow" if d.allowed else "deny"
    fields["agent"].string_value = d.agent
    fields["code"].string_value = d.code
    fields["purpose"].string_value = d.purpose
    if facts:
        fields["call"].string_value = facts
    if d.allowed:
        to_set, to_remove = upstream_headers(d, agent_headers, injected)
        ok = external_auth_pb2.OkHttpResponse(
            headers=[_header(k, v) for k, v in to_set], headers_to_remove=to_remove
        )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK), ok_response=ok, dynamic_metadata=meta
        )
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=_STATUS[deny_status(d)]),
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


_FALLBACK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message="internal_error")
)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """The Check handler: a CheckRequest through the shared :class:`CheckPipeline`."""

    def __init__(self, pipeline: CheckPipeline) -> None:
        self._pipeline = pipeline
        self._identity = pipeline.identity

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return self._pipeline.check(
            lambda did: view_from_check(request, self._identity, did),
            response_for,
            lambda: _FALLBACK,
            lambda headers: _parents(context, headers),
        )


def _parents(context: grpc.ServicerContext | None, headers: Mapping[str, str]) -> dict[str, str]:
    """The span to parent the decision span on: Envoy's ext_authz span (gRPC metadata),
    else the request's own `traceparent`."""
    if context is not None:
        meta = {k: v for k, v in context.invocation_metadata() if k in TRACE_KEYS}
        if "traceparent" in meta:
            return meta  # type: ignore[return-value]
    return request_parents(headers)
