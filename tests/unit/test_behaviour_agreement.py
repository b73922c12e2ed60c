"""The Check path and the behaviour engine judge every call alike (a differential test).

The Check pipeline judges each call of an analysed agent before it is made (what is new in
it: `callrisk.call_novelty`, with what it holds of the agent's latest calls); the engine
counts the same call once Envoy's access log reports it, from the facts the pipeline put in
the answer (`CallFacts`, through their text). Random sessions, seeded: MCP calls and
batches (known, new and odd tool names, known and new recipients), REST JSON calls, calls
the rules refuse, calls made in parallel and reported in any order, long pauses, and
restores (the engine's window cleared). For every call, the novelties the Check path saw
must be the engine's: a difference would be a call refused for what the engine never
counts, or a novelty the Check path missed (found by a review: after a restore, parallel
calls were judged in different orders).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit.arguments import ArgumentKey
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Code, RequestView, load_profiles
from sidecar.core.agentstate import AgentStateTable, RiskState
from sidecar.core.behaviour import Baseline, BehaviourEngine, BehaviourSettings, CallEvent
from sidecar.core.behaviour import destination as destination_of
from sidecar.core.callfacts import decode
from sidecar.core.callrisk import call_novelty, current

T0 = 1_800_000_000.0
NS, AGENT = "agents", "mail-agent"
S = BehaviourSettings(
    mode="enforce", learning_seconds=600.0, window_seconds=60.0, sensitive=frozenset({"to"})
)
KEY = ArgumentKey.of(b"d" * 32)
MCP, API = "mcp.internal", "api.mail.test"
KNOWN = ("alice@example.test", "bob@example.test")
TOOLS = ("read_inbox", "search_contacts", "send_email", "send_money", "archive", "x" * 64,
         "odd tool!", "delete_all")  # fmt: skip
PROFILE = """
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: mail-agent}
spec:
  owner: team
  defaultPurpose: mail
  purposes:
    mail:
      allow:
        - hosts: [mcp.internal]
          methods: [POST]
          mcpTools: [read_inbox, search_contacts, send_email, send_money, archive]
        - hosts: [api.mail.test]
          methods: [POST]
  behavior:
    mode: enforce
    learningPeriod: 10m
    sensitiveArguments: [to]
"""


class World:
    """A Check pipeline in mandate's own process and the engine it feeds."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "a.yaml").write_text(PROFILE)
        snap = load_profiles(tmp)
        self.engine = BehaviourEngine()
        self.now = T0
        self.table = AgentStateTable.build(1)
        self.baselines: dict[tuple[str, str], Baseline] = {}
        self.pipeline = CheckPipeline(
            lambda: snap, Identity(), lambda: self.now, agent_state=lambda: self.table,
            facts_key=KEY, behaviour=lambda: self.baselines,
        )  # fmt: skip

    def publish(self) -> None:
        """The supervisor's scoring tick: the score and baseline, as published."""
        r = self.engine.score(NS, AGENT, self.now, S)
        risk = RiskState(AGENT, NS, r.score, r.explanation(), dict(r.contributions), r.learning)
        self.table = AgentStateTable.build(1, risks=[risk])
        base = None if r.learning else self.engine.baseline(NS, AGENT, self.now, S)
        self.baselines = {(NS, AGENT): base} if base is not None else {}

    def decide(self, body: bytes, host: str) -> tuple[Any, str]:
        path = "/mcp" if host == MCP else "/v1/send"
        view = RequestView(
            decision_id="d" * 32, method="POST", authority=host, path=path, body=body,
            headers={"content-type": "application/json"}, context_extensions={"agent": AGENT},
            namespace=NS,
        )  # fmt: skip
        d, _, _, text = self.pipeline.decide(lambda did: view)
        return d, text

    def report(self, at: float, d: Any, text: str, body: bytes, host: str) -> None:
        """Envoy's access log entry of the call, with the facts of mandate's answer."""
        path = "/mcp" if host == MCP else "/v1/send"
        self.engine.observe(
            CallEvent(
                at=at, agent=AGENT, namespace=NS, method="POST", host=host, path=path,
                allowed=d.allowed, code=d.code, status=200 if d.allowed else 403,
                bytes_sent=400, bytes_received=len(body), facts=decode(text),
            ),
            S,
        )  # fmt: skip


def _mcp(rng: random.Random, n: int, tools: tuple[str, ...]) -> bytes:
    messages = []
    for i in range(n):
        args: dict[str, Any] = {"q": "a"}
        if rng.random() < 0.4:
            args = {"to": [rng.choice((*KNOWN, "eve@x.test"))]}
        params = {"name": rng.choice(tools), "arguments": args}
        messages.append({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call", "params": params})
    return json.dumps(messages if n > 1 else messages[0]).encode()


def _call(rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.15:
        to = rng.choice((*KNOWN, "eve@x.test"))
        return json.dumps({"to": to, "n": 1}).encode(), API
    n = rng.choice((1, 1, 1, 2, 3, 9))
    return _mcp(rng, n, TOOLS[:3] * 4 + TOOLS), MCP


def _learn(w: World) -> None:
    for i in range(40):
        for k, (tool, args) in enumerate(
            (("read_inbox", {"folder": "inbox"}), ("search_contacts", {"query": "team"}),
             ("send_email", {"to": [KNOWN[i % 2]], "body": "weekly"}))
        ):  # fmt: skip
            w.now = T0 + 15.0 * i + k
            body = json.dumps(
                {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                 "params": {"name": tool, "arguments": args}}
            ).encode()  # fmt: skip
            d, text = w.decide(body, MCP)
            w.report(w.now, d, text, body, MCP)
    w.now = T0 + S.learning_seconds + 120
    w.publish()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_check_path_and_the_engine_see_the_same_novelties(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    counted: list[tuple[bool, bool, bool]] = []
    facts_of = BehaviourEngine._facts

    def spy(self: BehaviourEngine, *args: Any) -> tuple[bool, bool, bool]:
        got = facts_of(self, *args)
        counted.append(got)
        return got

    monkeypatch.setattr(BehaviourEngine, "_facts", spy)
    rng = random.Random(seed)
    w = World(tmp_path)
    _learn(w)
    compared = restores = parallel = 0
    for _ in range(500):
        if rng.random() < 0.02:
            w.engine.clear_window(NS, AGENT)  # `mandate restore` of a behaviour revocation
            w.now += 0.2
            w.publish()
            restores += 1
        group = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            w.now += rng.choice((0.01, 0.5, 5.0, 30.0, 70.0))
            body, host = _call(rng)
            base = w.baselines.get((NS, AGENT))
            held = w.pipeline._recent.get((NS, AGENT))
            d, text = w.decide(body, host)
            assert d.code != Code.INTERNAL_ERROR, d.reason
            seen = None
            if base is not None:  # what the Check path judged new in the call
                where = destination_of(host, "/mcp" if host == MCP else "/v1/send")
                got = call_novelty(base, decode(text), where, 0, w.now, current(held, base.epoch))
                seen = (bool(got.tools), bool(got.values), bool(got.transitions))
            group.append((w.now, d, text, body, host, seen))
        parallel += len(group) > 1
        rng.shuffle(group)  # calls made at once complete, and are logged, in any order
        for at, d, text, body, host, seen in group:
            counted.clear()
            w.report(at, d, text, body, host)
            if seen is not None and counted:
                assert counted[0] == seen, (at - T0, decode(text), d.reason)
                compared += 1
        w.now += 0.2
        w.publish()
    assert compared > 400 and restores and parallel  # the run covered what it claims
