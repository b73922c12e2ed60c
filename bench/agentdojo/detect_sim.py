"""The detection benchmark's sessions through mandate's decision and behaviour engine alone,
in-process (no Envoy, no `mandate run`): the same splits, sessions, settings and call facts
as the replay through Envoy (`detect_replay`). Each call is decided by the real `decide`
on the session agent's profile (`detect.detect_profile`, compiled), with the risk score the
supervisor would have published (the engine's score at the call's time) and, with
``check_path`` (the shipped default), the agent's baseline, so that the call's own novelty
is scored before it is made (`sidecar.core.callrisk`, code `novel_call`); the event is then
made as the access log would report it (`describe` of the very body the replay sends, an
HMAC key of its own) and observed. Pure, fast, deterministic; used for two figures of
`python -m bench agentdojo_detect`:

- **engine**: what mandate decides with the Check-path scoring shipped; the replay through
  Envoy should agree with it (a disagreement is a finding about the plumbing: facts lost in
  the metadata, a late access-log flush, a baseline not published in time);
- **published score only** (``check_path=False``): each call decided on the score as
  published after the calls before it, not counting the call itself (mandate before the
  Check-path scoring, and what several Check worker processes still do);
- **the trade-off** (``deny_at``): the same with another `denyAtRisk`;
- **the ceiling** (`detect.ceiling`): each step records what was new in its call
  (`TraceStep.novelty`: `callrisk.call_novelty` against the baseline it was decided on,
  whatever the decision), the facts any detector of call novelty has to go on.

Timing: the training stream 0.05 s apart from T0; the session's calls 2 s apart, 100 s after
the learning period (its calls out of the window); a call decided on the score at its time
(enforce: `risk` at denyAtRisk, `revoked` from revokeAtRisk on, `novel_call` when the call's
own novelty brings the score to denyAtRisk), the published score read 0.01 s after it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.agentdojo.detect import (
    DENY_AT,
    REVOKE_AT,
    Trace,
    TraceStep,
    detect_profile,
    folds,
    held_out_sessions,
    training_stream,
)
from bench.agentdojo.policy import MCP_PATH, Call, Suite, mcp_host
from bench.agentdojo.replay import write_profiles
from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.canonical import canonical_json
from sidecar.core import Snapshot, load_profiles
from sidecar.core.agentstate import AgentStateTable, RiskState
from sidecar.core.behaviour import (
    Baseline,
    BehaviourEngine,
    BehaviourSettings,
    CallEvent,
    Risk,
    destination,
)
from sidecar.core.callfacts import decode, describe
from sidecar.core.callrisk import CallScoring, Recent, call_novelty, unjudged
from sidecar.core.decide import Code, RequestView, decide

__all__ = ["simulate"]

T0 = 1_800_000_000.0
LEARNING_S = 300.0
_KEY = ArgumentKey.of(b"agentdojo-detect-simulation-key!")
_NS, _AGENT = "bench", "agent"
_RESPONSE_BYTES = 120  # about what the replay's MCP upstream answers


def _event(
    suite: Suite, call: Call, at: float, settings: BehaviourSettings, code: str = ""
) -> CallEvent:
    body = call.body("rpc")
    facts = describe(
        body, False, settings.sensitive, lambda v: _KEY.mac(canonical_json(v)), _KEY.id
    )
    return CallEvent(
        at=at, agent=_AGENT, namespace=_NS, method="POST", host=mcp_host(suite.name),
        path=MCP_PATH, allowed=not code, code=code or "allowed", status=403 if code else 200,
        bytes_sent=_RESPONSE_BYTES, bytes_received=len(body), facts=decode(facts.encode()),
    )  # fmt: skip


def _snapshot(suite: Suite, sensitive: str, deny_at: float) -> Snapshot:
    """The compiled profile of the simulation's one agent (`detect.detect_profile`)."""
    doc = detect_profile(suite, _AGENT, f"{int(LEARNING_S)}s", sensitive, deny_at)
    with tempfile.TemporaryDirectory(prefix="mandate-detect-sim-") as tmp:
        return load_profiles(write_profiles([doc], Path(tmp)))


def _fingerprint(value: object) -> str:
    return _KEY.mac(canonical_json(value))


def _novelty(
    suite: Suite, call: Call, base: Baseline | None, at: float, sensitive: frozenset[str]
) -> tuple[str, ...]:
    """What is new in ``call`` against ``base`` (the features `call_novelty` names)."""
    if base is None:
        return ()
    body = call.body("rpc")
    facts = describe(body, False, sensitive, _fingerprint, _KEY.id)
    where = destination(mcp_host(suite.name), MCP_PATH)
    return tuple(call_novelty(base, facts, where, len(body), at).features())


def _decide(
    snap: Snapshot,
    risk: Risk,
    suite: Suite,
    call: Call,
    at: float,
    base: Baseline | None,
    recent: dict[tuple[str, str], Recent],
    settings: BehaviourSettings,
) -> str:
    """The decision code of ``call`` at ``at`` ('' when allowed), as the in-process Check
    path decides it with the published ``risk`` (and ``base``, the agent's baseline, for
    the Check-path scoring, with what it counted of the agent's latest calls, ``recent``,
    kept as the Check pipeline keeps it; None: the published score only)."""
    if not risk.learning and risk.score >= REVOKE_AT:
        return Code.REVOKED  # the supervisor's tick revoked the agent
    state = RiskState(
        _AGENT, _NS, risk.score, risk.explanation(), dict(risk.contributions), risk.learning
    )
    scoring = None
    if base is not None:
        scoring = CallScoring({(_NS, _AGENT): base}, _fingerprint, _KEY.id, recent)
    body = call.body("rpc")
    view = RequestView(
        decision_id="0" * 32, method="POST", authority=mcp_host(suite.name), path=MCP_PATH,
        headers={"content-type": "application/json", "content-length": str(len(body))},
        body=body, context_extensions={"agent": _AGENT}, namespace=_NS,
    )  # fmt: skip
    decision = decide(snap, view, at, agent_state=AgentStateTable.build(0, risks=[state]),
                      scoring=scoring)  # fmt: skip
    if decision.code not in (Code.ALLOWED, Code.RISK, Code.NOVEL_CALL):
        raise RuntimeError(f"unexpected decision {decision.code}: {decision.reason}")
    key = (_NS, _AGENT)
    latest = decision.scored
    if latest is None:  # kept as the pipeline keeps it (`CheckPipeline._follow`)
        facts = decision.facts or describe(body, False, settings.sensitive, _fingerprint, _KEY.id)
        where = destination(mcp_host(suite.name), MCP_PATH)
        epoch = base.epoch if base is not None else 0
        latest = unjudged(base, recent.get(key), risk.learning, risk.contributions, facts,
                          where, len(body), at, settings.window_seconds, epoch)  # fmt: skip
    if latest is not None:
        recent[key] = latest
    return "" if decision.allowed else decision.code


def simulate(
    suite: Suite,
    split: str,
    sensitive: str,
    *,
    check_path: bool = True,
    deny_at: float = DENY_AT,
    burst: bool = False,
) -> list[Trace]:
    """Each held-out session of ``suite`` under ``split`` decided and scored in-process
    (see the module docstring), with ``deny_at`` as `denyAtRisk`; ``burst``: the session's
    calls 0.05 s apart, each decided on the score and baseline published before the
    session began (nothing published during it: a fast or parallel agent's calls)."""
    snap = _snapshot(suite, sensitive, deny_at)
    compiled = snap.agents[_AGENT].behavior
    assert compiled is not None
    settings = compiled
    traces: list[Trace] = []
    for fold in folds(suite, split):
        stream = training_stream(fold)
        for session in held_out_sessions(suite, fold):
            engine = BehaviourEngine()
            for i, c in enumerate(stream):
                engine.observe(_event(suite, c, T0 + 0.05 * i, settings), settings)
            at = T0 + LEARNING_S + 100.0
            steps: list[TraceStep] = []
            revoked = False
            recent: dict[tuple[str, str], Recent] = {}
            before = (
                engine.score(_NS, _AGENT, at, settings),
                engine.baseline(_NS, _AGENT, at, settings),
            )
            for step in session.steps:
                risk, base = before
                if not burst:
                    risk = engine.score(_NS, _AGENT, at, settings)
                    base = engine.baseline(_NS, _AGENT, at, settings)
                novelty = _novelty(suite, step.call, base, at, settings.sensitive)
                code = "revoked" if revoked else ""
                if not revoked:
                    judged = base if check_path else None
                    code = _decide(snap, risk, suite, step.call, at, judged, recent, settings)
                    revoked = code == Code.REVOKED
                engine.observe(_event(suite, step.call, at, settings, code), settings)
                risk = engine.score(_NS, _AGENT, at + 0.01, settings)
                steps.append(
                    TraceStep(
                        step.role,
                        step.index,
                        step.call,
                        not code,
                        code,
                        risk.score,
                        risk.explanation(),
                        novelty,
                    )
                )
                at += 0.05 if burst else 2.0
            traces.append(Trace(session, fold.index, tuple(steps)))
    return traces
