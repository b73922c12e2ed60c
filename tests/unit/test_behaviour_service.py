"""The supervisor's behaviour service with the real engine, plain data and a fake clock:
events of an agent whose profile has `behavior:` are scored and published to the shared
context; in `enforce` mode a score at `revokeAtRisk` revokes the agent through the
revocation store (audited, once); `monitor` only reports; agents without `behavior:` and
events of another namespace are ignored; an operator's restore clears the window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.behaviour.service import BehaviourService
from sidecar.core import load_profiles
from sidecar.core.behaviour import CallEvent
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.revocations import RevocationStore
from sidecar.state.shm import SharedAgentState, SharedTable

NS = "agents"
T0 = 1_700_000_000.0

PROFILE = """
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: {name}}}
spec:
  owner: team
  defaultPurpose: work
  purposes:
    work:
      allow:
        - hosts: [api.internal]
          methods: [GET]
  behavior:
    mode: {mode}
    revokeAtRisk: 0.95
    learningPeriod: 60s
    window: 10s
    minCalls: 5
"""


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Harness:
    def __init__(self, tmp: Path, mode: str) -> None:
        d = tmp / "profiles"
        d.mkdir()
        (d / "a.yaml").write_text(PROFILE.format(name="agent-a", mode=mode))
        (d / "plain.yaml").write_text(
            PROFILE.format(name="plain", mode="enforce").split("  behavior:")[0]
        )
        self.snapshot = load_profiles(d)
        self.clock = Clock()
        self.audit: list[dict[str, Any]] = []
        self.revocations = RevocationStore(SharedTable.create(tmp / "rev"), None, self.clock)
        self.revocations.mark_complete()
        shared = SharedAgentState.create(tmp / "ctx")
        self.reader = SharedAgentState.attach(tmp / "ctx")
        self.context = AgentStateStore(shared, None, lambda: self.snapshot, clock=self.clock)
        self.service = BehaviourService(
            lambda: self.snapshot, self.context, self.revocations, NS,
            audit=self.audit.append, clock=self.clock, state_file=tmp / "behaviour.json",
        )  # fmt: skip

    def calls(
        self,
        n: int,
        *,
        agent: str = "agent-a",
        host: str = "api.internal",
        path: str = "/v1/items",
        allowed: bool = True,
        every: float = 1.0,
        ns: str = NS,
    ) -> None:
        for _ in range(n):
            self.clock.t += every
            self.service.observe(
                [
                    CallEvent(
                        self.clock.t,
                        agent,
                        ns,
                        "GET",
                        host,
                        path,
                        allowed,
                        "allowed" if allowed else "outside_purpose",
                        200 if allowed else 403,
                        100,
                    )
                ]
            )

    def learn(self) -> None:
        self.calls(70, every=1.0)  # a steady call a second through the 60 s learning period

    def rogue(self) -> None:
        for i in range(30):
            self.calls(1, host=f"exfil-{i}.example", path=f"/dump/{i}", allowed=False, every=0.05)


def test_a_rogue_burst_in_enforce_mode_revokes_once_with_the_explanation(tmp_path: Path) -> None:
    h = Harness(tmp_path, "enforce")
    h.learn()
    (state,) = h.service.tick()
    assert not state.learning and state.score < 0.3
    h.rogue()
    (state,) = h.service.tick()
    assert state.score >= 0.95, state.explanation
    published = h.reader.read().risk(NS, "agent-a")
    assert published is not None and published.score == state.score
    (rev,) = h.revocations.entries("behaviour")
    assert rev.agent == "agent-a" and rev.reason.startswith("behaviour: risk ")
    assert h.revocations.table().find(NS, "agent-a", h.clock.t) is not None
    h.service.tick()
    assert len(h.revocations.entries("behaviour")) == 1  # once
    (event,) = [e for e in h.audit if e["type"] == "revocation_automatic"]
    assert event["agent"] == "agent-a" and event["risk"] >= 0.95 and event["contributions"]


def test_restore_clears_the_window_so_the_agent_is_not_revoked_again_at_once(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, "enforce")
    h.learn()
    h.rogue()
    h.service.tick()
    assert h.revocations.entries("behaviour")
    h.revocations.remove_matching(lambda r: r.source == "behaviour")
    (state,) = h.service.tick()
    assert state.score < 0.95
    assert h.revocations.entries("behaviour") == []


def test_monitor_mode_reports_but_never_revokes(tmp_path: Path) -> None:
    h = Harness(tmp_path, "monitor")
    h.learn()
    h.rogue()
    (state,) = h.service.tick()
    assert state.score >= 0.95
    assert h.revocations.entries() == []
    assert h.reader.read().risk(NS, "agent-a") is not None


@pytest.mark.parametrize("kind", ["no behavior section", "other namespace"])
def test_events_outside_analysis_are_ignored(tmp_path: Path, kind: str) -> None:
    h = Harness(tmp_path, "enforce")
    if kind == "no behavior section":
        h.calls(10, agent="plain")
    else:
        h.calls(10, ns="elsewhere")
    assert h.service.tick() == []
    assert h.service.ignored == 10 and h.service.observed == 0


def test_learning_is_reported_and_baselines_survive_a_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path, "enforce")
    h.calls(10)
    (state,) = h.service.tick()
    assert state.learning and state.score == 0
    h.learn()
    h.service.save()
    again = BehaviourService(
        lambda: h.snapshot,
        h.context,
        h.revocations,
        NS,
        clock=h.clock,
        state_file=tmp_path / "behaviour.json",
    )
    assert again.load() == 1
    # Learned before the restart: the new service scores at once, no new learning period.
    (state,) = again.tick() if again.engine.agents() else (None,)
    assert state is not None and not state.learning
    h.service = again
    h.rogue()
    (state,) = again.tick()
    assert not state.learning and state.score >= 0.95
