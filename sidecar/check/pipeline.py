"""The transport-neutral half of the Envoy adapters (`ext_authz`: gRPC, `http_authz`: HTTP).

Both adapters turn what Envoy sent into a :class:`~sidecar.core.RequestView` with
:func:`make_view`, run the same pipeline (:class:`Authorizer`: `decide`, the audit record,
metrics, the decision span) and answer with the same headers (:func:`upstream_headers`)
and deny body (:func:`deny_body`); only the encoding differs. Nothing here raises into a
transport: any error is a deny (fail closed). No protobuf, no aiohttp, no decision logic.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sidecar.audit import AuditWriter
from sidecar.core import Code, Decision, RequestView, Snapshot, decide
from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable
from sidecar.core.ratelimit import RateLimiter
from sidecar.core.revocation import EMPTY_TABLE, RevocationTable
from sidecar.errors import BadRequestError
from sidecar.headers import (
    AGENT_HEADER,
    DECISION_HEADER,
    OWN_PREFIXES,
    PURPOSE_HEADER,
    SET_HEADERS,
    TASK_HEADER,
)
from sidecar.telemetry import metrics

if TYPE_CHECKING:
    from sidecar.telemetry.tracing import Tracing

__all__ = [
    "AGENT_HEADER",
    "DECISION_HEADER",
    "PURPOSE_HEADER",
    "TASK_HEADER",
    "TRACE_KEYS",
    "Audit",
    "Authorizer",
    "Identity",
    "body_truncated",
    "deny_body",
    "make_view",
    "new_decision_id",
    "request_parents",
    "trace_id_of",
    "upstream_headers",
]

log = logging.getLogger(__name__)
# Decision ids need uniqueness, not secrecy; `random` is re-seeded in forked children.
_random_bits = random.getrandbits

_PARTIAL_BODY = "x-envoy-auth-partial-body"
TRACE_KEYS = ("traceparent", "tracestate")
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


def body_truncated(headers: Mapping[str, str], size: int) -> bool:
    """Whether the body Envoy buffered (``size`` bytes) may be less than the request's:
    Envoy says so in `x-envoy-auth-partial-body`; a `content-length` that differs says so;
    and without a `content-length` (chunked, or HTTP/2 without one) nothing can show it
    whole. Envoy sends the check as soon as it has buffered max_request_bytes and then says
    `x-envoy-auth-partial-body: false` although more may follow (seen with Envoy 1.40 on
    both transports): a body cut there was allowed before this rule, and the rest of it
    reached the upstream (tests/e2e/test_adversarial.py)."""
    if headers.get(_PARTIAL_BODY, "false").lower() != "false":
        return True
    length = headers.get("content-length")
    if length is None:
        return True
    try:
        return int(length) != size
    except ValueError:
        return True


def make_view(
    decision_id: str,
    identity: Identity,
    *,
    method: str,
    authority: str,
    path: str,
    scheme: str,
    headers: dict[str, str],
    body: bytes | None,
    context_extensions: Mapping[str, str],
    source_principal: str = "",
) -> RequestView:
    """The request view of one call as Envoy reported it; ``headers`` have lower-case names
    and hold the request's own `content-length` (if it had one)."""
    return RequestView(
        decision_id=decision_id,
        method=method,
        authority=authority,
        path=path,
        scheme=scheme,
        headers=headers,
        body=body,
        body_truncated=body is not None and body_truncated(headers, len(body)),
        context_extensions=context_extensions,
        source_principal=source_principal,
        configured_agent=identity.agent,
        configured_service_account=identity.service_account,
        namespace=identity.namespace,
        trace_id=trace_id_of(headers.get("traceparent", "")),
    )


def upstream_headers(
    d: Decision, agent_headers: Iterable[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """For an allowed call: the headers to set on the upstream request (overwriting any
    value the agent sent) and the names of the other `x-mandate-*` headers the agent sent
    (also spelt with "_"), to remove. ``agent_headers`` are the request's (lower-case)
    header names."""
    to_set = [
        (AGENT_HEADER, d.agent),
        (PURPOSE_HEADER, d.purpose),
        (DECISION_HEADER, d.decision_id),
    ]
    if d.task:
        to_set.append((TASK_HEADER, d.task))
    to_remove = [
        name
        for name in agent_headers
        if name.startswith(OWN_PREFIXES)
        and (name not in SET_HEADERS or (name == TASK_HEADER and not d.task))
    ]
    return to_set, to_remove


def deny_body(d: Decision) -> bytes:
    return json.dumps(
        {"error": d.code, "reason": d.reason, "decision": d.decision_id, "trace_id": d.trace_id}
    ).encode()


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
            self.writer.write_decision(
                decision, pod=self.pod, namespace=self.namespace, now=time.time()
            )
        return decision


class Authorizer:
    """The Check pipeline both transports share. ``snapshot`` returns the current snapshot
    (or None before load). A transport calls :meth:`decide`, encodes the Decision, then
    calls :meth:`observe`."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        identity: Identity,
        clock: Callable[[], float] = time.time,
        revocations: Callable[[], RevocationTable] = lambda: EMPTY_TABLE,
        tracing: Tracing | None = None,
        audit: Audit | None = None,
        agent_state: Callable[[], AgentStateTable] = lambda: EMPTY_AGENT_STATE,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.identity = identity
        self.tracing = tracing
        self._snapshot = snapshot
        self._clock = clock
        self._revocations = revocations
        self._audit = audit
        self._agent_state = agent_state
        self._limiter = limiter

    def decide(self, view_of: Callable[[str], RequestView]) -> tuple[Decision, Mapping[str, str]]:
        """Decide the call ``view_of(decision_id)`` describes and record it in the audit
        trail; return the Decision and the request's headers. Never raises: an error
        building the view or deciding is a deny (`internal_error`)."""
        did = new_decision_id()
        headers: Mapping[str, str] = {}
        try:
            snap = self._snapshot()
            if snap is None:
                decision = Decision(did, False, Code.INTERNAL_ERROR, "profiles not loaded yet")
            else:
                view = view_of(did)
                headers = view.headers
                decision = decide(
                    snap,
                    view,
                    self._clock(),
                    self._revocations(),
                    self._agent_state(),
                    self._limiter,
                )
        except BadRequestError as exc:  # what Envoy sent cannot be a call: say why
            decision = Decision(did, False, Code.BAD_REQUEST, str(exc))
        except Exception as exc:  # fail closed on anything at all
            log.exception("Check failed; denying (decision %s)", did)
            decision = Decision(
                did, False, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"
            )
        if self._audit is not None:
            decision = self._audit.record(decision)
        return decision, headers

    def observe(
        self,
        decision: Decision,
        started: float,
        start_ns: int,
        parents: Callable[[], Mapping[str, str]],
    ) -> None:
        """Count the decision and its time since ``started`` (perf_counter), and record its
        span from ``start_ns`` under ``parents()`` (`traceparent`/`tracestate`)."""
        metrics.observe_decision(decision, time.perf_counter() - started)
        if self.tracing is not None:
            try:
                self.tracing.record(decision, parents(), start_ns, time.time_ns())
            except Exception:  # telemetry never changes a decision
                log.exception("recording the decision span failed")


def request_parents(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's own `traceparent`/`tracestate`, to parent a decision span on."""
    return {k: headers[k] for k in TRACE_KEYS if k in headers}


def view_from_url(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    decision_id: str,
    agent: str | None = None,
    service_account: str | None = None,
    spiffe: str | None = None,
    namespace: str = "",
) -> RequestView:
    """The view of a call described by METHOD and an absolute URL (or HOST:PORT for
    CONNECT), as `mandate explain` and the context API's Explain describe it. Headers are
    lower-cased here. Raises BadRequestError naming what is wrong."""
    method = method.upper()
    if method == "CONNECT":
        authority, path, scheme = url.removeprefix("//"), "", "https"
        if "/" in authority or ":" not in authority:
            raise BadRequestError(f"CONNECT target {url!r}: expected HOST:PORT")
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadRequestError(f"URL {url!r}: expected an absolute http:// or https:// URL")
        authority, scheme = parts.netloc, parts.scheme
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return RequestView(
        decision_id=decision_id,
        method=method,
        authority=authority,
        path=path,
        scheme=scheme,
        headers={k.lower(): v for k, v in headers.items()},
        body=body,
        source_principal=spiffe or "",
        configured_agent=agent,
        configured_service_account=service_account,
        namespace=namespace,
    )
