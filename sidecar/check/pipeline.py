"""The Check pipeline both transports share: view → decide → rate → audit → answer →
observe, fail closed, in one place.

A transport (`grpc_transport`, `http_transport`) hands :meth:`CheckPipeline.check` four
things: how to build the call's view (`check.request`; a BadRequestError is the typed bad
request), how to encode a Decision in its wire format (`check.response`), the answer to
give if encoding fails, and where the decision span's parents are. The pipeline:
1. builds the view and runs the pure `decide` on the current snapshot and the shared
   tables' generations (an error anywhere is a deny: `bad_request` or `internal_error`);
2. counts an allowed call against its purpose's rate limit (`Decision.rate`), the one
   piece of per-process state a Check touches (:func:`~sidecar.core.decide.over_rate`);
3. records the decision in the audit trail (:class:`Audit`; fail-closed turns an allow it
   cannot record into a deny);
4. encodes the answer, falling back to the transport's deny;
5. counts the decision and its latency, and records its span.
Nothing here raises into a transport. No protobuf, no aiohttp, no decision logic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from sidecar.audit import AuditWriter
from sidecar.check.request import Identity, new_decision_id
from sidecar.core import Code, Decision, RequestView, Snapshot, decide
from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable
from sidecar.core.decide import over_rate
from sidecar.core.ratelimit import RateLimiter
from sidecar.core.revocation import EMPTY_TABLE, RevocationTable
from sidecar.errors import BadRequestError
from sidecar.telemetry import metrics

if TYPE_CHECKING:
    from sidecar.telemetry.tracing import Tracing

__all__ = ["Audit", "CheckPipeline"]

log = logging.getLogger(__name__)
R = TypeVar("R")
Headers = Mapping[str, str]


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


class CheckPipeline:
    """One worker's Check pipeline. ``snapshot`` returns the current snapshot (None before
    load); ``revocations`` and ``agent_state`` the shared tables' current generations;
    ``limiter`` enforces the purposes' rate limits (None: not counted)."""

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

    def check(
        self,
        view_of: Callable[[str], RequestView],
        respond: Callable[[Decision, Headers], R],
        fallback: Callable[[], R],
        parents: Callable[[Headers], Headers],
    ) -> R:
        """One Check: decide the call ``view_of(decision_id)`` describes, answer with
        ``respond(decision, request headers)`` (or ``fallback()`` if that fails), then count
        and trace it, the span parented on ``parents(request headers)``."""
        started = time.perf_counter()
        start_ns = time.time_ns() if self.tracing is not None else 0
        decision, headers = self.decide(view_of)
        try:
            answer = respond(decision, headers)
        except Exception:
            log.exception("encoding the answer failed; denying (decision %s)", decision.decision_id)
            answer = fallback()
        metrics.observe_decision(decision, time.perf_counter() - started)
        if self.tracing is not None:
            try:
                self.tracing.record(decision, parents(headers), start_ns, time.time_ns())
            except Exception:  # telemetry never changes a decision
                log.exception("recording the decision span failed")
        return answer

    def decide(self, view_of: Callable[[str], RequestView]) -> tuple[Decision, Headers]:
        """Steps 1-3 of :meth:`check`: the audited Decision and the request's headers.
        Never raises: an error building the view or deciding is a deny."""
        did = new_decision_id()
        headers: Headers = {}
        try:
            snap = self._snapshot()
            if snap is None:
                decision = Decision(did, False, Code.INTERNAL_ERROR, "profiles not loaded yet")
            else:
                view = view_of(did)
                headers = view.headers
                decision = decide(
                    snap, view, self._clock(), self._revocations(), self._agent_state()
                )
                rate, limiter = decision.rate, self._limiter
                if rate is not None and limiter is not None and not limiter.charge(rate):
                    decision = over_rate(decision)
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
