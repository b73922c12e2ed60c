"""The detection benchmark's sessions through the behaviour engine alone, in-process (no
Envoy, no mandate run): the same splits, sessions, settings and call facts as the replay
through Envoy (`detect_replay`), the events made as the access log would report them
(`describe` of the very body the replay sends, an HMAC key of its own). Pure, fast,
deterministic; used for two figures of `python -m bench agentdojo_detect`:

- **engine**: what the engine alone predicts; the replay through Envoy should agree with it
  (a disagreement is a finding about the plumbing: facts lost in the metadata, a late
  access-log flush);
- **pre-call projection** (``precall=True``): what it would give if each call were decided
  on a score that already counts the call itself (novelty scored on the Check path, not
  after the access log): a projection of a design not shipped, labelled as such.

Timing: the training stream 0.05 s apart from T0; the session's calls 2 s apart, 100 s after
the learning period (its calls out of the window); each call decided on the score at its
time (enforce: `risk` at denyAtRisk, `revoked` from revokeAtRisk on), the published score
read 0.01 s after it.
"""

from __future__ import annotations

import copy

from bench.agentdojo.detect import (
    BEHAVIOR,
    DENY_AT,
    REVOKE_AT,
    SENSITIVE,
    WINDOW_S,
    Trace,
    TraceStep,
    folds,
    held_out_sessions,
    training_stream,
)
from bench.agentdojo.policy import MCP_PATH, Call, Suite, mcp_host
from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.canonical import canonical_json
from sidecar.core.behaviour import BehaviourEngine, BehaviourSettings, CallEvent
from sidecar.core.callfacts import decode, describe

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


def simulate(suite: Suite, split: str, sensitive: str, *, precall: bool = False) -> list[Trace]:
    settings = BehaviourSettings(
        mode=str(BEHAVIOR["mode"]),
        deny_at=DENY_AT,
        revoke_at=REVOKE_AT,
        learning_seconds=LEARNING_S,
        window_seconds=WINDOW_S,
        min_calls=int(BEHAVIOR["minCalls"]),  # type: ignore[call-overload]
        sensitive=SENSITIVE[sensitive],
    )
    traces: list[Trace] = []
    for fold in folds(suite, split):
        stream = training_stream(fold)
        for session in held_out_sessions(suite, fold):
            engine = BehaviourEngine()
            for i, c in enumerate(stream):
                engine.observe(_event(suite, c, T0 + 0.05 * i, settings), settings)
            at = T0 + LEARNING_S + 100.0
            revoked = False
            steps: list[TraceStep] = []
            for step in session.steps:
                if precall:  # the score with this call counted (a copy observes it first)
                    probe = copy.deepcopy(engine)
                    probe.observe(_event(suite, step.call, at, settings), settings)
                    before = probe.score(_NS, _AGENT, at, settings).score
                else:
                    before = engine.score(_NS, _AGENT, at, settings).score
                revoked = revoked or before >= REVOKE_AT
                code = "revoked" if revoked else "risk" if before >= DENY_AT else ""
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
                    )
                )
                at += 2.0
            traces.append(Trace(session, fold.index, tuple(steps)))
    return traces
