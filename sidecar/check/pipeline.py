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
3. adds the credentials of the call's host (`Decision.credentials`, from the broker: a
   credential it cannot have now refuses the call, `credential_unavailable`), and drops a
   revoked agent's cached tokens;
4. records the decision in the audit trail (:class:`Audit`; fail-closed turns an allow it
   cannot record into a deny, and a deny carries no credential);
5. for an agent whose profile has `behavior:`, describes the call for behaviour analysis
   (`sidecar.core.callfacts`: its MCP tools, argument shapes and the fingerprints of its
   sensitive arguments, under ``facts_key``), which the answer carries to Envoy's access
   log in its dynamic metadata (`decide` already described it when it scored the call's
   own novelty against the agents' baselines, ``behaviour``: then that description); in
   mandate's own process, with the tool decided before it, and the agent's latest call
   kept for its next (see :meth:`CheckPipeline._decide`);
6. encodes the answer, falling back to the transport's deny;
7. counts the decision and its latency, and records its span.
Nothing here raises into a transport. No protobuf, no aiohttp, no decision logic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

from sidecar.audit import Trail
from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.canonical import canonical_json
from sidecar.check.request import Identity, new_decision_id
from sidecar.core import Code, Decision, RequestView, Snapshot, decide
from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable
from sidecar.core.behaviour import Baseline, destination
from sidecar.core.callfacts import NO_FACTS, CallFacts, Fingerprint, describe
from sidecar.core.callrisk import NO_BASELINES, CallScoring, Recent, current, told, unjudged
from sidecar.core.decide import over_rate, request_bytes
from sidecar.core.ratelimit import RateLimiter
from sidecar.core.revocation import EMPTY_TABLE, RevocationTable
from sidecar.credentials.broker import NOTHING, CredentialBroker, Injected
from sidecar.errors import BadRequestError, CredentialUnavailable
from sidecar.headers import TXN_TOKEN_HEADER
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
    false (an allow that enforce would have refused, `Decision.would`, always: monitor
    mode's finding). With the writer in fail-closed mode and unable to write, an allow becomes a
    deny (`audit_unavailable`): no call leaves without its record."""

    writer: Trail
    pod: str
    namespace: str
    allows: bool = True

    def record(self, decision: Decision) -> Decision:
        writer = self.writer
        unrecordable = decision.allowed and writer.must_deny()
        # Denies always; allows when asked, and those enforce would have refused (`would`:
        # monitor mode's finding, what an operator reads before enforcing) in any case.
        wanted = self.allows or not decision.allowed or bool(decision.would)
        if not unrecordable and wanted:
            queued = writer.write_decision(
                decision, pod=self.pod, namespace=self.namespace, now=time.time()
            )
            # must_deny saw room, but the queue filled (other Checks' records) or the writer
            # closed before this record got in: it is lost (the next loss record names its
            # id), so a fail-closed trail must not let the call go.
            unrecordable = not queued and decision.allowed and writer.fail_closed
        if unrecordable:
            decision = replace(
                decision,
                allowed=False,
                code=Code.AUDIT_UNAVAILABLE,
                reason="the audit trail cannot be written: failing closed",
                credentials=(),
                txn="",
                would="",
            )
            writer.write_decision(decision, pod=self.pod, namespace=self.namespace, now=time.time())
        return decision


# What the Check-path scoring holds of an agent without a baseline (it learns, or is no
# longer analysed) is dropped this long after its last call.
_FORGET_AFTER = 600.0


def _latest(recent: Recent) -> float:
    return max((recent.tool_at, *(at for _, at in recent.held.values())))


class CheckPipeline:
    """One worker's Check pipeline. ``snapshot`` returns the current snapshot (None before
    load); ``revocations`` and ``agent_state`` the shared tables' current generations;
    ``limiter`` enforces the purposes' rate limits (None: not counted); ``facts_key``
    fingerprints sensitive arguments for behaviour analysis (None: no fingerprints; the
    tools and argument shapes are still described); ``behaviour`` returns the current
    generation of the agents' behaviour baselines (`BehaviourService.baselines`, when the
    Checks run in the supervisor's process; empty: a call's own novelty is not scored)."""

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
        broker: CredentialBroker | None = None,
        facts_key: ArgumentKey | None = None,
        behaviour: Callable[[], Mapping[tuple[str, str], Baseline]] | None = None,
    ) -> None:
        self.identity = identity
        self.tracing = tracing
        self._snapshot = snapshot
        self._clock = clock
        self._revocations = revocations
        self._audit = audit
        self._agent_state = agent_state
        self._limiter = limiter
        self._broker = broker
        self._facts_key = facts_key
        self._fingerprint: Fingerprint | None = None
        if facts_key is not None:
            key = facts_key
            self._fingerprint = lambda value: key.mac(canonical_json(value))
        self._behaviour = behaviour or (lambda: NO_BASELINES)
        # Mandate's own process: this pipeline decides every call of the pod's agents (one
        # Check process), so the order it decides them in is theirs
        self._in_process = behaviour is not None
        self._scoring = CallScoring(NO_BASELINES)  # the last generation's, reused
        # What the Check-path scoring counted of each agent's latest calls (`Decision.scored`,
        # `callrisk.Recent`): its next call is judged with them before the access log has
        # reported them. Written and read under the lock, so that calls of one agent decided
        # at once (gRPC's thread pool) are judged one after the other.
        self._recent: dict[tuple[str, str], Recent] = {}
        self._scoring_lock = threading.Lock()

    def _scoring_now(self) -> CallScoring | None:
        """The agents' baselines for this Check (None: none to score against)."""
        baselines = self._behaviour()
        if not baselines:
            return None
        scoring = self._scoring
        if scoring.baselines is not baselines:  # a new generation (a race only makes two)
            key = self._facts_key
            stale = self._clock() - _FORGET_AFTER
            for gone in [
                k for k, r in self._recent.items() if k not in baselines and _latest(r) < stale
            ]:
                del self._recent[gone]  # an agent no longer analysed, or not for long
            scoring = CallScoring(
                baselines,
                self._fingerprint,
                "" if key is None else key.id,
                MappingProxyType(self._recent),
            )
            self._scoring = scoring
        return scoring

    def _decide(
        self,
        snap: Snapshot,
        view: RequestView,
        now: float,
        revocations: RevocationTable,
    ) -> tuple[Decision, str]:
        """`decide` (with the Check-path scoring when an agent has a baseline) and the
        text of the call's facts for behaviour analysis (:meth:`_describe`). One call at a
        time: in mandate's own process each remembers for the agent's next what the scoring
        counted and the tool it called (``_recent``), and its facts say which tool was
        decided before it (`CallFacts.previous`), so that the engine and the Check path
        follow the same order, the order the calls were decided in (parallel calls too)."""
        with self._scoring_lock:
            scoring = self._scoring_now()
            if scoring is None:
                decision = decide(snap, view, now, revocations, self._agent_state())
            else:
                decision = decide(snap, view, now, revocations, self._agent_state(), scoring)
            facts = self._describe(snap, view, decision)
            before = None
            if self._in_process and decision.agent:
                before = self._follow(snap, view, decision, facts, scoring, now)
        if facts is NO_FACTS:
            return decision, ""
        text = facts.encode()  # with room kept for the tool decided before (`_fit`)
        return decision, text if before is None else f"{text};p={before}"

    def _follow(
        self,
        snap: Snapshot,
        view: RequestView,
        decision: Decision,
        facts: CallFacts,
        scoring: CallScoring | None,
        now: float,
    ) -> str | None:
        """The tool decided before the call (lock held; None: not known, or the call has
        none), and the call of an
        analysed agent kept as its latest: what the scoring counted of it
        (`Decision.scored`); for a call refused before the scoring (by the rules, or the
        published score), what the engine will count of it (`callrisk.counted`); while the
        agent learns, its tool. The tool decided before is `callrisk.previous`, as `decide`
        judged it (after a restart, the access log's last, which the engine is told too)."""
        agent = snap.agents.get(decision.agent)
        if agent is None or agent.behavior is None:
            return None
        key = (view.namespace, decision.agent)
        window = agent.behavior.window_seconds
        base = scoring.baselines.get(key) if scoring is not None else None
        old = self._recent.get(key)
        epoch = base.epoch if base is not None else old.epoch if old is not None else 0
        old = current(old, epoch)
        before = told(base, old, now, window)
        latest = decision.scored
        if latest is None:  # refused before the scoring, or the agent learns
            risk = self._agent_state().risk(view.namespace, decision.agent)
            latest = unjudged(
                base,
                old,
                risk is not None and risk.learning,
                risk.contributions if risk is not None else {},
                facts,
                destination(decision.host or view.authority, view.path),
                request_bytes(view),
                now,
                window,
                epoch,
            )
        if latest is not None:
            self._recent[key] = latest
        return before if facts.tools else None

    def check(
        self,
        view_of: Callable[[str], RequestView],
        respond: Callable[[Decision, Headers, Injected, str], R],
        fallback: Callable[[], R],
        parents: Callable[[Headers], Headers],
    ) -> R:
        """One Check: decide the call ``view_of(decision_id)`` describes, answer with
        ``respond(decision, request headers, credentials, call facts)`` (or ``fallback()``
        if that fails), then count and trace it, the span parented on ``parents(request
        headers)``. The call facts are `CallFacts.encode`'s text ('' for none)."""
        started = time.perf_counter()
        start_ns = time.time_ns() if self.tracing is not None else 0
        decision, headers, injected, facts = self.decide(view_of)
        try:
            answer = respond(decision, headers, injected, facts)
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

    def decide(
        self, view_of: Callable[[str], RequestView]
    ) -> tuple[Decision, Headers, Injected, str]:
        """Steps 1-5 of :meth:`check`: the audited Decision, the request's headers, the
        credentials an allowed call carries and the call's facts for behaviour analysis
        ('' for none). Never raises: an error building the view or deciding is a deny."""
        did = new_decision_id()
        headers: Headers = {}
        injected = NOTHING
        view: RequestView | None = None
        snap: Snapshot | None = None
        facts = ""
        try:
            snap = self._snapshot()
            if snap is None:
                decision = Decision(did, False, Code.INTERNAL_ERROR, "profiles not loaded yet")
            else:
                view = view_of(did)
                headers = view.headers
                now, revocations = self._clock(), self._revocations()
                decision, facts = self._decide(snap, view, now, revocations)
                rate, limiter = decision.rate, self._limiter
                if rate is not None and limiter is not None and not limiter.charge(rate):
                    decision = over_rate(decision)
                if self._broker is not None:
                    decision, injected = self._credentials(decision, view, snap, revocations, now)
        except BadRequestError as exc:  # what Envoy sent cannot be a call: say why
            decision = Decision(did, False, Code.BAD_REQUEST, str(exc))
        except Exception as exc:  # fail closed on anything at all
            log.exception("Check failed; denying (decision %s)", did)
            decision = Decision(
                did, False, Code.INTERNAL_ERROR, f"internal error: {type(exc).__name__}"
            )
        if self._audit is not None:
            decision = self._audit.record(decision)
        if not decision.allowed:
            injected = NOTHING
        return decision, headers, injected, facts

    def _describe(self, snap: Snapshot, view: RequestView, decision: Decision) -> CallFacts:
        """The call's facts for behaviour analysis, if its agent is analysed (NO_FACTS if
        not, or without a body)."""
        if not view.body or not decision.agent:
            return NO_FACTS
        agent = snap.agents.get(decision.agent)
        settings = agent.behavior if agent is not None else None
        if settings is None:
            return NO_FACTS
        if decision.facts is not None:  # described by decide, to score it
            return decision.facts
        key = self._facts_key
        try:
            return describe(
                view.body,
                view.body_truncated,
                settings.sensitive,
                self._fingerprint,
                "" if key is None else key.id,
            )
        except Exception:  # describing never changes a decision
            log.exception("describing the call for behaviour analysis failed")
            return NO_FACTS

    def _credentials(
        self,
        decision: Decision,
        view: RequestView,
        snap: Snapshot,
        revocations: RevocationTable,
        now: float,
    ) -> tuple[Decision, Injected]:
        broker = self._broker
        assert broker is not None
        broker.prepare(snap)
        if decision.code == Code.REVOKED:
            broker.forget(decision.agent)
        broker.observe(revocations, now)
        if not (decision.allowed and decision.credentials):
            return decision, NOTHING
        try:
            injected = broker.inject(decision, view, snap)
        except CredentialUnavailable as exc:
            denied = replace(
                decision,
                allowed=False,
                code=Code.CREDENTIAL_UNAVAILABLE,
                reason=str(exc),
                credentials=(),
                would="",
            )
            return denied, NOTHING
        if any(name == TXN_TOKEN_HEADER for name, _ in injected.set):
            decision = replace(decision, txn=decision.decision_id)
        return decision, injected
