"""Behaviour analysis on the Check path (issue 21), pure, with plain data and fake times:
the engine's Baseline of an agent, what is new in one call (`call_novelty`), the score with
the call counted (`project`), and `decide` refusing, in `enforce` only, the very call whose
novelty brings the score to denyAtRisk (`novel_call`), the feature and the tool named. The
score keeps its properties: one novelty never denies on a calm window, one call never
reaches revokeAtRisk, every feature tops out at its weight."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.canonical import canonical_json
from sidecar.behaviour.service import BehaviourService
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Code, Decision, RequestView, Snapshot, load_profiles
from sidecar.core.agentstate import AgentStateTable, RiskState
from sidecar.core.behaviour import (
    FEATURES,
    Baseline,
    BehaviourEngine,
    BehaviourSettings,
    CallEvent,
    destination,
)
from sidecar.core.callfacts import CallFacts, decode, describe
from sidecar.core.callrisk import (
    NOTHING_HELD,
    CallNovelty,
    CallScoring,
    Recent,
    call_novelty,
    effective,
    explain,
    previous,
    project,
    remember,
)
from sidecar.core.decide import decide
from sidecar.core.mcp import tool_call_body

T0 = 1_800_000_000.0
NS, AGENT = "agents", "mail-agent"
S = BehaviourSettings(mode="enforce", learning_seconds=600.0, window_seconds=60.0)
AFTER = T0 + S.learning_seconds + 120  # the learning period's calls are out of the window
KEY = ArgumentKey.of(b"c" * 32)
MCP = "mcp.internal"
DEST = destination(MCP, "/mcp")


def fp(value: object) -> str:
    return KEY.mac(canonical_json(value))


def facts(tool: str, args: dict[str, Any]) -> CallFacts:
    return describe(tool_call_body(tool, args), False, frozenset({"to"}), fp, KEY.id)


def logged(f: CallFacts) -> CallFacts:
    """The facts as the engine gets them: through Envoy's access log, as text."""
    return decode(f.encode())


def event(at: float, tool: str, args: dict[str, Any], *, sent: int = 400) -> CallEvent:
    body = tool_call_body(tool, args)
    return CallEvent(
        at=at, agent=AGENT, namespace=NS, method="POST", host=MCP, path="/mcp", allowed=True,
        code="allowed", status=200, bytes_sent=sent, bytes_received=len(body),
        facts=logged(facts(tool, args)),
    )  # fmt: skip


KNOWN = ("alice@example.test", "bob@example.test")


def learned() -> BehaviourEngine:
    """A mail agent's learning period: read, search, send to one of two known people."""
    engine = BehaviourEngine()
    at = T0
    for i in range(40):
        for k, (tool, args) in enumerate(
            (
                ("read_inbox", {"folder": "inbox"}),
                ("search_contacts", {"query": "team"}),
                ("send_email", {"to": [KNOWN[i % 2]], "body": "weekly"}),
            )
        ):
            engine.observe(event(at + k, tool, args), S)
        at += 15.0
    return engine


def baseline(engine: BehaviourEngine, now: float = AFTER) -> Baseline:
    base = engine.baseline(NS, AGENT, now, S)
    assert base is not None
    return base


# -- the baseline the supervisor publishes ------------------------------------------------------


def test_no_baseline_while_learning_or_for_an_unknown_agent() -> None:
    engine = learned()
    assert engine.baseline(NS, AGENT, T0 + 100, S) is None  # still learning
    assert engine.baseline(NS, "other", AFTER, S) is None
    base = baseline(engine)
    assert base.tools == {"read_inbox", "search_contacts", "send_email"}
    assert ("read_inbox", "search_contacts") in base.transitions
    assert base.value_key == KEY.id and len(base.values) == 2
    assert base.destinations == {DEST}


def test_the_baseline_is_cached_until_the_agents_next_event() -> None:
    engine = learned()
    first = baseline(engine)
    assert baseline(engine) is first  # nothing happened: the same object
    engine.observe(event(AFTER, "read_inbox", {"folder": "inbox"}), S)
    after = baseline(engine, AFTER + 1)
    assert after is not first and after.last_tool == "read_inbox" and after.last_at == AFTER
    assert after.tools is first.tools  # the engine's own sets, never copied


def test_previous_and_read_follow_the_window() -> None:
    engine = learned()
    engine.observe(event(AFTER, "read_inbox", {"folder": "inbox"}, sent=3000), S)
    base = baseline(engine, AFTER)
    assert base.previous(AFTER + 59) == "read_inbox"
    assert base.previous(AFTER + 61) == ""  # out of the window: no transition
    assert base.read(AFTER + 1) == 3000.0
    assert base.read(AFTER + 120) == 0.0
    half = base.read(AFTER + 60 + base.width / 2)  # the window's old edge, pro-rated
    assert 0.0 < half < 3000.0


# -- what is new in one call ---------------------------------------------------------------------

NEW_TOOL = ("send_money", {"to": "mallory@evil.test", "amount": 1000})


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        # known tool, known recipient, known order: nothing new
        ([("read_inbox", {"folder": "x"}), ("search_contacts", {"query": "q"})],
         CallNovelty()),
        # a new tool, named with its argument shape, and a new recipient (by its argument)
        ([("read_inbox", {"folder": "x"}), NEW_TOOL],
         CallNovelty(tools=("send_money(amount:i,to:s)",), values=("to",))),
        # a known tool to a new recipient
        ([("read_inbox", {"folder": "x"}), ("search_contacts", {"query": "q"}),
          ("send_email", {"to": ["eve@evil.test"], "body": "b"})],
         CallNovelty(values=("to",))),
        # a known tool after another known one, never in that order while learning
        ([("send_email", {"to": [KNOWN[0]], "body": "b"}), ("search_contacts", {"query": "q"})],
         CallNovelty(transitions=("send_email -> search_contacts",))),
    ],
)  # fmt: skip
def test_call_novelty(calls: list[tuple[str, dict[str, Any]]], expected: CallNovelty) -> None:
    engine = learned()
    at = AFTER
    for tool, args in calls[:-1]:
        engine.observe(event(at, tool, args), S)
        at += 2.0
    tool, args = calls[-1]
    body = tool_call_body(tool, args)
    got = call_novelty(baseline(engine, at), facts(tool, args), DEST, len(body), at)
    assert got == expected
    # The engine, observing the same call, finds the same (the Check path only says it first).
    engine.observe(event(at, tool, args), S)
    risk = engine.score(NS, AGENT, at + 0.5, S)
    assert set(risk.contributions) == set(expected.features())


def test_a_new_tool_counts_alone_not_for_its_transitions() -> None:
    engine = learned()
    engine.observe(event(AFTER, "read_inbox", {"folder": "x"}), S)
    got = call_novelty(baseline(engine), facts("export", {}), DEST, 100, AFTER + 2)
    assert got == CallNovelty(tools=("export()",))


def test_values_under_another_key_are_not_compared() -> None:
    engine = learned()
    other = CallFacts(("send_email",), ("to:a",), "", (("to", "f" * 16),), "another-key")
    assert not call_novelty(baseline(engine), other, DEST, 100, AFTER)


@pytest.mark.parametrize(
    ("size", "read", "dest", "tool", "expected"),
    [
        (20_000, 3000, "exfil.example/upload", "read_inbox", True),  # large, new host, read
        (20_000, 3000, DEST, "read_inbox", False),  # known destination and tool: not new
        (20_000, 3000, DEST, "upload", True),  # a new tool is a new destination too
        (20_000, 0, "exfil.example/upload", "read_inbox", False),  # nothing read before
        (8_000, 3000, "exfil.example/upload", "read_inbox", False),  # not large
    ],
)
def test_the_exfiltration_shape(size: int, read: int, dest: str, tool: str, expected: bool) -> None:
    engine = learned()
    if read:
        engine.observe(event(AFTER, "read_inbox", {"folder": "x"}, sent=read), S)
    got = call_novelty(baseline(engine, AFTER), facts(tool, {}), dest, size, AFTER + 2)
    assert bool(got.exfiltration) is expected
    if expected:
        assert got.exfiltration.startswith(f"{size // 1024} KiB to {tool} after reading 2 KiB")


# -- the score with the call counted --------------------------------------------------------------

CALM: dict[str, float] = {}


def test_one_novelty_never_denies_on_a_calm_window_two_do() -> None:
    one = CallNovelty(tools=("send_money()",))
    assert project(one, CALM) == (0.56, {"new_tools": 0.56})
    two = CallNovelty(tools=("send_money()",), values=("to",))
    score, added = project(two, CALM)
    assert score == pytest.approx(0.8064) and score >= S.deny_at
    assert explain(two, added) == "new tools +0.56 (send_money()), new values +0.56 (to)"


def test_one_call_never_reaches_revoke_at_risk_on_a_calm_window() -> None:
    parts = {
        "tools": ("t()",),
        "values": ("to",),
        "transitions": ("a -> b",),
        "exfiltration": "20 KiB to t after reading 2 KiB",
    }
    best = 0.0
    for n in range(1, 5):
        for names in itertools.combinations(parts, n):
            if "tools" in names and "transitions" in names:
                continue  # a call with a new tool never counts its transitions
            score, _ = project(CallNovelty(**{k: parts[k] for k in names}), CALM)  # type: ignore[arg-type]
            best = max(best, score)
    assert best == pytest.approx(0.8992, abs=1e-4) and best < 0.95


def test_every_feature_tops_out_at_its_weight() -> None:
    full = {name: weight for name, weight in FEATURES.items() if name == "new_tools"}
    score, added = project(CallNovelty(tools=("x()",)), full)
    assert score == FEATURES["new_tools"] and added == {}  # already at its weight: nothing
    partial = {"new_values": 0.56}
    score, added = project(CallNovelty(values=("to",)), partial)
    assert score == FEATURES["new_values"] and added == {"new_values": pytest.approx(0.14)}


def test_the_window_adds_to_the_call() -> None:
    # A new tool earlier in the window (0.56 published), a new recipient now: 0.81.
    score, _ = project(CallNovelty(values=("to",)), {"new_tools": 0.56})
    assert score == pytest.approx(0.8064)


# -- decide --------------------------------------------------------------------------------------

PROFILE = """
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: mail-agent}}
spec:
  owner: team
  defaultPurpose: mail
  purposes:
    mail:
      allow:
        - hosts: [mcp.internal]
          methods: [POST]
          mcpTools: [read_inbox, search_contacts, send_email, send_money]
        - hosts: [api.mail.test]
          methods: [POST]
          paths: [/v1/send]
  behavior:
    mode: {mode}
    learningPeriod: 10m
    sensitiveArguments: [to]
"""


def snapshot(tmp: Path, mode: str) -> Snapshot:
    (tmp / "a.yaml").write_text(PROFILE.format(mode=mode))
    return load_profiles(tmp)


def view(tool: str, args: dict[str, Any]) -> RequestView:
    body = tool_call_body(tool, args)
    return RequestView(
        decision_id="d" * 32, method="POST", authority=MCP, path="/mcp", body=body,
        headers={"content-type": "application/json"}, context_extensions={"agent": AGENT},
        namespace=NS,
    )  # fmt: skip


def table(score: float = 0.0, learning: bool = False, **contributions: float) -> AgentStateTable:
    risk = RiskState(AGENT, NS, score, f"risk {score:.2f}", contributions, learning)
    return AgentStateTable.build(1, risks=[risk])


def scoring(engine: BehaviourEngine) -> CallScoring:
    return CallScoring({(NS, AGENT): baseline(engine)}, fp, KEY.id)


def test_decide_refuses_the_novel_call_itself_in_enforce(tmp_path: Path) -> None:
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    d = decide(snap, view(*NEW_TOOL), AFTER, agent_state=table(), scoring=scoring(engine))
    assert (d.allowed, d.code) == (False, Code.NOVEL_CALL)
    assert d.reason == (
        "novel call: behaviour risk 0.81 with this call >= 0.80: new tools +0.56 "
        "(send_money(amount:i,to:s)), new values +0.56 (to); before it: risk 0.00"
    )
    assert d.risk == pytest.approx(0.8064) and d.rate is None
    assert d.facts == facts(*NEW_TOOL)  # described once: the pipeline sends these on
    # Without the baselines (several worker processes): decided on the published score only.
    assert decide(snap, view(*NEW_TOOL), AFTER, agent_state=table()).allowed


@pytest.mark.parametrize(
    ("mode", "state", "call", "allowed"),
    [
        ("monitor", table(), NEW_TOOL, True),  # monitor never denies
        ("enforce", table(learning=True), NEW_TOOL, True),  # still learning: not scored
        ("enforce", table(), ("send_money", {"to": KNOWN[0], "amount": 1}), True),  # one novelty
        ("enforce", table(0.56, new_tools=0.56), ("send_email", {"to": ["eve@x"], "body": "b"}),
         False),  # the window's new tool and this call's new recipient
        ("enforce", table(), ("read_inbox", {"folder": "inbox"}), True),  # nothing new
    ],
)  # fmt: skip
def test_decide_scores_the_call_only_in_enforce_after_learning(
    tmp_path: Path,
    mode: str,
    state: AgentStateTable,
    call: tuple[str, dict[str, Any]],
    allowed: bool,
) -> None:
    snap, engine = snapshot(tmp_path, mode), learned()
    d = decide(snap, view(*call), AFTER, agent_state=state, scoring=scoring(engine))
    assert d.allowed is allowed, d.reason
    if not allowed:
        assert d.code == Code.NOVEL_CALL and "new values +0.56 (to)" in d.reason


def test_monitor_allows_the_novel_call_and_says_enforce_would_have_refused_it(
    tmp_path: Path,
) -> None:
    snap, engine = snapshot(tmp_path, "monitor"), learned()
    d = decide(snap, view(*NEW_TOOL), AFTER, agent_state=table(), scoring=scoring(engine))
    assert (d.allowed, d.code) == (True, Code.ALLOWED)
    assert d.would.startswith("novel_call: novel call: behaviour risk 0.81 with this call")
    # The published score at denyAtRisk: monitor allows, and says enforce would refuse.
    d = decide(snap, view("read_inbox", {"folder": "inbox"}), AFTER,
               agent_state=table(0.9, new_tools=0.9), scoring=scoring(engine))  # fmt: skip
    assert d.allowed and d.would.startswith("risk: behaviour risk 0.90 >= 0.80")
    # Nothing new, a calm window: nothing to say.
    d = decide(snap, view("read_inbox", {"folder": "inbox"}), AFTER, agent_state=table(),
               scoring=scoring(engine))  # fmt: skip
    assert d.allowed and d.would == ""
    # Enforce: refused, and a deny carries no `would`.
    (tmp_path / "e").mkdir()
    enforce = snapshot(tmp_path / "e", "enforce")
    d = decide(enforce, view(*NEW_TOOL), AFTER, agent_state=table(), scoring=scoring(engine))
    assert not d.allowed and d.would == ""


def test_a_call_the_rules_refuse_is_not_scored(tmp_path: Path) -> None:
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    d = decide(snap, view("delete_all", {}), AFTER, agent_state=table(), scoring=scoring(engine))
    assert d.code == Code.OUTSIDE_PURPOSE and d.facts is None


def test_the_pipeline_scores_against_the_baselines_it_is_given(tmp_path: Path) -> None:
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines = {(NS, AGENT): baseline(engine)}
    pipeline = CheckPipeline(
        lambda: snap, Identity(), lambda: AFTER, agent_state=table, facts_key=KEY,
        behaviour=lambda: baselines,
    )  # fmt: skip
    decision, _, _, text = pipeline.decide(lambda did: view(*NEW_TOOL))
    assert decision.code == Code.NOVEL_CALL
    # the refused call is still reported, with the tool decided before it (none within
    # the window: the learning period's calls are out of it)
    assert decode(text) == replace(facts(*NEW_TOOL), previous="")
    # The next call, before the access log has reported the refused one (the published
    # score is still 0): refused for what the Check path counted, as the published score
    # will refuse it once it has
    held, _, _, text = pipeline.decide(lambda did: view("read_inbox", {"folder": "inbox"}))
    assert (held.code, held.risk) == (Code.RISK, pytest.approx(0.8064))
    assert "with the calls just made (not yet published): new tools 0.56, new values 0.56" in (
        held.reason
    )
    assert decode(text).tools == ("read_inbox",)


def test_a_burst_is_judged_as_if_it_were_spaced(tmp_path: Path) -> None:
    """An agent that makes its calls faster than the access log reports them (or in
    parallel) is judged on what its earlier calls brought: the published score lags."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines = {(NS, AGENT): baseline(engine)}
    now = [AFTER]
    pipeline = CheckPipeline(
        lambda: snap, Identity(), lambda: now[0], agent_state=table, facts_key=KEY,
        behaviour=lambda: baselines,
    )  # fmt: skip
    # A new tool to a known recipient (0.56): allowed. Then a known tool to a new
    # recipient, 10 ms later, nothing published yet: 0.56 alone, 0.81 with the first
    first, _, _, _ = pipeline.decide(lambda did: view("send_money", {"to": KNOWN[0]}))
    assert first.allowed, first.reason
    now[0] += 0.01
    second, _, _, _ = pipeline.decide(
        lambda did: view("send_email", {"to": ["mallory@evil.test"], "body": "x"})
    )
    assert second.code == Code.NOVEL_CALL, second.reason
    assert "new values +0.56 (to)" in second.reason
    assert "not yet published): new tools 0.56" in second.reason
    # The same two calls a window apart: the first one's novelty has left it
    fresh = CheckPipeline(
        lambda: snap, Identity(), lambda: now[0], agent_state=table, facts_key=KEY,
        behaviour=lambda: baselines,
    )  # fmt: skip
    now[0] = AFTER
    assert fresh.decide(lambda did: view("send_money", {"to": KNOWN[0]}))[0].allowed
    now[0] += S.window_seconds + 1
    late, _, _, _ = fresh.decide(
        lambda did: view("send_email", {"to": ["mallory@evil.test"], "body": "x"})
    )
    assert late.allowed, late.reason


def test_the_check_path_follows_the_tool_it_decided_last() -> None:
    """A transition is judged from the agent's last decided call, not the last the access
    log reported (the order the calls were decided in, which the facts tell the engine):
    search_contacts decided after the reported send_email makes the next send_email a
    learned order, and the reported one alone a new one."""
    engine = learned()
    engine.observe(event(AFTER - 1, "send_email", {"to": [KNOWN[0]], "body": "x"}), S)
    base = baseline(engine)
    assert (base.last_tool, base.last_at) == ("send_email", AFTER - 1)  # as reported
    recent = remember(None, AFTER, 60.0, "search_contacts", {})
    # search_contacts -> send_email was learned; send_email -> send_email was not
    f = facts("send_email", {"to": [KNOWN[0]], "body": "x"})
    assert previous(base, recent, AFTER + 0.01) == "search_contacts"
    assert call_novelty(base, f, DEST, 100, AFTER + 0.01, recent) == CallNovelty()
    assert call_novelty(base, f, DEST, 100, AFTER + 0.01).transitions == (
        "send_email -> send_email",
    )
    # decided more than a window ago: the call follows nothing (as the engine is told)
    old = Recent({}, "search_contacts", AFTER - 61)
    assert previous(base, old, AFTER) == ""
    assert call_novelty(base, f, DEST, 100, AFTER, old) == CallNovelty()


def test_held_contributions_count_once_and_leave_with_the_window() -> None:
    published = {"new_tools": 0.56}
    # the Check path counted a new value 0.5 s ago, the log has not reported it yet
    r = remember(None, AFTER, 60.0, "send_email", {"new_values": 0.56})
    assert r.held == {"new_values": (0.56, AFTER)} and r.tool == "send_email"
    assert effective(published, r, AFTER + 0.5, 60.0) == {"new_tools": 0.56, "new_values": 0.56}
    # once published, the larger of the two counts, never their sum
    reported = {"new_tools": 0.56, "new_values": 0.56}
    assert effective(reported, r, AFTER + 0.5, 60.0) == reported
    assert effective(published, r, AFTER + 61, 60.0) is published  # out of the window
    # a call without novelty keeps what is held (and its time), with its own tool
    r2 = remember(r, AFTER + 30, 60.0, "read_inbox", {})
    assert r2.held == r.held and (r2.tool, r2.tool_at) == ("read_inbox", AFTER + 30)
    # a call with the feature at its weight holds it from its own time: the engine counts
    # that call for a window from it, though it added nothing
    r3 = remember(r2, AFTER + 31, 60.0, "", {"new_values": 0.7})
    assert r3.held["new_values"] == (0.7, AFTER + 31) and r3.tool == "read_inbox"
    assert effective({}, r3, AFTER + 90, 60.0) == {"new_values": 0.7}
    assert remember(r3, AFTER + 200, 60.0, "", {}) is NOTHING_HELD
    # a cleared window (a behaviour revocation ended) ends what was held before it; the
    # last tool stays (the engine keeps following it)
    cleared = remember(r3, AFTER + 32, 60.0, "", {}, epoch=1)
    assert (dict(cleared.held), cleared.tool, cleared.epoch) == ({}, "read_inbox", 1)


# -- the service publishes the baselines of agents in enforce mode ----------------------------


class _Context:
    def set_risks(self, states: object) -> None:
        pass


class _Revocations:
    def subscribe(self, fn: object) -> None:
        pass

    def entries(self, source: str) -> list[object]:
        return []


@pytest.mark.parametrize(("mode", "published"), [("enforce", True), ("monitor", True)])
def test_the_service_publishes_baselines_each_tick(
    tmp_path: Path, mode: str, published: bool
) -> None:
    """Past learning, in both modes: enforce refuses on them, monitor says it would."""
    snap = snapshot(tmp_path, mode)
    clock = [T0]
    settings = snap.agents[AGENT].behavior
    assert settings is not None
    engine = BehaviourEngine()
    service = BehaviourService(
        lambda: snap, _Context(), _Revocations(), NS, clock=lambda: clock[0],  # type: ignore[arg-type]
        engine=engine,
    )  # fmt: skip
    service.observe([event(T0, "read_inbox", {"folder": "inbox"})])
    service.tick()
    assert service.baselines() == {}  # learning
    clock[0] = AFTER
    service.tick()
    got = service.baselines()
    assert ((NS, AGENT) in got) is published
    if published:
        assert got[(NS, AGENT)].tools == {"read_inbox"}
        with pytest.raises(TypeError):
            got[(NS, "x")] = got[(NS, AGENT)]  # type: ignore[index]
    json.dumps(engine.export_state())  # the engine's state is untouched by publishing


def test_a_would_deny_call_refused_later_is_neither_marked_nor_counted(tmp_path: Path) -> None:
    """Review: a monitor-mode call enforce would have refused, then refused for another
    reason (its rate, a credential, the audit trail), is a deny like any other."""
    from sidecar.audit.record import decision_line, record_from_decision
    from sidecar.core.decide import over_rate
    from sidecar.telemetry import metrics

    snap, engine = snapshot(tmp_path, "monitor"), learned()
    d = decide(snap, view(*NEW_TOOL), AFTER, agent_state=table(), scoring=scoring(engine))
    assert d.allowed and d.would
    record = record_from_decision(d, pod="p", namespace=NS, now=AFTER)
    assert record["would_deny"]["code"] == "novel_call"
    refused = over_rate(d)
    assert not refused.allowed and refused.would == ""
    assert "would_deny" not in record_from_decision(refused, pod="p", namespace=NS, now=AFTER)
    assert b"would_deny" not in decision_line(refused, pod="p", namespace=NS, now=AFTER,
                                              seq=0, prev="0" * 64)[0]  # fmt: skip
    labels = {"agent": AGENT, "code": "novel_call"}
    before = metrics.REGISTRY.get_sample_value("mandate_behaviour_would_deny_total", labels) or 0
    metrics.observe_decision(refused, 0.001)
    after = metrics.REGISTRY.get_sample_value("mandate_behaviour_would_deny_total", labels) or 0
    assert after == before
    metrics.observe_decision(d, 0.001)
    assert metrics.REGISTRY.get_sample_value("mandate_behaviour_would_deny_total", labels) == (
        before + 1
    )


def test_denies_only_audit_still_records_what_enforce_would_have_refused(tmp_path: Path) -> None:
    """`--audit-allows none` keeps denies only; monitor mode's would-deny allows are what
    an operator reads before enforcing, so they are kept too."""
    from sidecar.check.pipeline import Audit

    written: list[Decision] = []

    class Writer:
        fail_closed = False

        def must_deny(self) -> bool:
            return False

        def write_decision(self, d: Decision, **_: object) -> bool:
            written.append(d)
            return True

    snap, engine = snapshot(tmp_path, "monitor"), learned()
    would = decide(snap, view(*NEW_TOOL), AFTER, agent_state=table(), scoring=scoring(engine))
    plain = decide(snap, view("read_inbox", {"folder": "inbox"}), AFTER, agent_state=table(),
                   scoring=scoring(engine))  # fmt: skip
    audit = Audit(Writer(), "p", NS, allows=False)  # type: ignore[arg-type]
    assert audit.record(would) is would and audit.record(plain) is plain
    assert written == [would]


def test_the_pipeline_notes_the_tools_of_calls_it_did_not_score(tmp_path: Path) -> None:
    """A call decided while the agent has no baseline yet (it learns), or refused by the
    rules, is not scored, but the engine will follow its tool: so does the Check path."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    engine.observe(event(AFTER - 1, "send_email", {"to": [KNOWN[0]], "body": "x"}), S)
    baselines: dict[tuple[str, str], Baseline] = {}
    pipeline = CheckPipeline(
        lambda: snap, Identity(), lambda: AFTER, agent_state=table, facts_key=KEY,
        behaviour=lambda: baselines,
    )  # fmt: skip
    quiet, _, _, _ = pipeline.decide(lambda did: view("search_contacts", {"query": "x"}))
    assert quiet.allowed and quiet.scored is None
    refused, _, _, _ = pipeline.decide(lambda did: view("delete_all", {}))
    assert refused.code == Code.OUTSIDE_PURPOSE
    baselines[(NS, AGENT)] = baseline(engine)  # as reported: send_email at AFTER - 1
    # delete_all -> send_email: delete_all is no learned tool, so no transition is judged
    # (as the engine judges it); the reported send_email -> send_email would have been one
    ok, _, _, _ = pipeline.decide(lambda did: view("send_email", {"to": [KNOWN[0]], "body": "x"}))
    assert ok.allowed and ok.scored is not None and ok.scored.held == {}, ok.reason
    assert ok.scored.tool == "send_email"
    # send_email (the call just scored) -> search_contacts: an order never learned
    again, _, _, _ = pipeline.decide(lambda did: view("search_contacts", {"query": "x"}))
    assert again.scored is not None and "new_transitions" in again.scored.held


def _pipeline(
    snap: Snapshot, baselines: dict[tuple[str, str], Baseline], now: list[float]
) -> CheckPipeline:
    return CheckPipeline(
        lambda: snap, Identity(), lambda: now[0], agent_state=table, facts_key=KEY,
        behaviour=lambda: baselines,
    )  # fmt: skip


def test_more_of_a_novelty_at_its_weight_keeps_it_held(tmp_path: Path) -> None:
    """A call with a feature already at its weight adds nothing, but the engine counts it
    for a window from its own time: held from then too, so that decoy calls do not make
    the first ones' novelty expire early."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines, now = {(NS, AGENT): baseline(engine)}, [AFTER]
    p = _pipeline(snap, baselines, now)
    for at in (0.0, 1.0, 59.0):  # a new tool to a known recipient: 0.56, 0.70, 0.70
        now[0] = AFTER + at
        assert p.decide(lambda did: view("send_money", {"to": KNOWN[0]}))[0].allowed
    now[0] = AFTER + 70  # the first two calls have left the window, the third has not
    d, _, _, _ = p.decide(
        lambda did: view("send_email", {"to": ["mallory@evil.test"], "body": "x"})
    )
    assert d.code == Code.NOVEL_CALL and d.risk == pytest.approx(0.868), d.reason


def test_the_engine_follows_the_order_the_calls_were_decided_in(tmp_path: Path) -> None:
    """Parallel calls complete (and are logged) in any order; the facts say which tool
    was decided before each, and the engine follows that order, as the Check path does."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines, now = {(NS, AGENT): baseline(engine)}, [AFTER]
    p = _pipeline(snap, baselines, now)
    texts = []
    for tool, args in (
        ("read_inbox", {"folder": "inbox"}),
        ("search_contacts", {"query": "team"}),
        ("send_email", {"to": [KNOWN[0]], "body": "x"}),
    ):
        now[0] += 0.01
        d, _, _, text = p.decide(lambda did, t=tool, a=args: view(t, a))  # type: ignore[misc]
        assert d.allowed and d.scored is not None and not d.scored.held, d.reason
        texts.append(text)
    # the first: what the access log reported last, as `decide` judged it (none within the
    # window), and the engine is told so
    assert [decode(t).previous for t in texts] == ["", "read_inbox", "search_contacts"]
    # logged in another order (send_email finished first): no order is new to the engine
    for i in (0, 2, 1):
        engine.observe(replace(event(now[0], "x", {}), facts=decode(texts[i])), S)
    risk = engine.score(NS, AGENT, now[0] + 0.01, S)
    assert risk.contributions.get("new_transitions", 0.0) == 0.0, risk.explanation()
    # without the order, the engine would have judged search_contacts after send_email
    plain = learned()
    for i in (0, 2, 1):
        f = replace(decode(texts[i]), previous=None)
        plain.observe(replace(event(now[0], "x", {}), facts=f), S)
    assert plain.score(NS, AGENT, now[0] + 0.01, S).contributions["new_transitions"] > 0


def test_a_cleared_window_ends_what_the_check_path_held(tmp_path: Path) -> None:
    """`mandate restore` of a behaviour revocation clears the agent's window in the engine
    (a new epoch): what the Check path held of the calls before it is dropped too."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines, now = {(NS, AGENT): baseline(engine)}, [AFTER]
    p = _pipeline(snap, baselines, now)
    assert p.decide(lambda did: view(*NEW_TOOL))[0].code == Code.NOVEL_CALL
    now[0] += 1
    assert p.decide(lambda did: view("read_inbox", {"folder": "inbox"}))[0].code == Code.RISK
    engine.clear_window(NS, AGENT)
    baselines[(NS, AGENT)] = baseline(engine, now[0])
    now[0] += 1
    ok, _, _, _ = p.decide(lambda did: view("read_inbox", {"folder": "inbox"}))
    assert ok.allowed, ok.reason


def test_a_call_the_rules_refuse_counts_as_the_engine_will_count_it(tmp_path: Path) -> None:
    """A refused call's facts still reach the engine (its new tool scores once logged):
    the Check path holds them too, so that a burst cannot hide a novelty behind a refusal."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines, now = {(NS, AGENT): baseline(engine)}, [AFTER]
    p = _pipeline(snap, baselines, now)
    refused, _, _, text = p.decide(lambda did: view("delete_all", {}))
    assert refused.code == Code.OUTSIDE_PURPOSE and refused.scored is None
    assert decode(text).tools == ("delete_all",)
    now[0] += 0.01
    d, _, _, _ = p.decide(
        lambda did: view("send_email", {"to": ["mallory@evil.test"], "body": "x"})
    )
    assert d.code == Code.NOVEL_CALL, d.reason
    assert "not yet published): new tools 0.56" in d.reason
    # as spaced: the engine counted the refused call, the published score says so
    spaced = learned()
    spaced.observe(replace(event(now[0] - 0.01, "x", {}), facts=decode(text)), S)
    risk = spaced.score(NS, AGENT, now[0], S)
    assert risk.contributions["new_tools"] == pytest.approx(0.56)


def rest(host: str, to: str) -> RequestView:
    body = json.dumps({"to": to, "body": "x"}).encode()
    return RequestView(
        decision_id="d" * 32, method="POST", authority=host, path="/v1/send", body=body,
        headers={"content-type": "application/json"}, context_extensions={"agent": AGENT},
        namespace=NS,
    )  # fmt: skip


@pytest.mark.parametrize("host", ["api.mail.test", "api.other.test"])
def test_a_call_without_tools_is_held_too(tmp_path: Path, host: str) -> None:
    """A JSON call to a REST API carries sensitive values too (and may be a large write):
    what it brought is held whether it was allowed (api.mail.test) or refused by the rules
    (api.other.test), so a new recipient over REST and a new tool over MCP still meet."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines, now = {(NS, AGENT): baseline(engine)}, [AFTER]
    p = _pipeline(snap, baselines, now)
    first, _, _, text = p.decide(lambda did: rest(host, "mallory@evil.test"))
    assert first.allowed is (host == "api.mail.test"), first.reason
    assert decode(text).previous is None  # no tool: nothing to follow
    now[0] += 0.01
    d, _, _, _ = p.decide(lambda did: view("send_money", {"to": KNOWN[0]}))
    assert d.code == Code.NOVEL_CALL, d.reason
    assert "not yet published): new values 0.56" in d.reason


def test_after_a_restore_the_engine_is_told_the_order_decide_judged(tmp_path: Path) -> None:
    """A cleared window ends what was held, not the last tool decided: the next call's
    facts name it, so the engine judges its transition as the Check path did."""
    snap, engine = snapshot(tmp_path, "enforce"), learned()
    baselines, now = {(NS, AGENT): baseline(engine)}, [AFTER]
    p = _pipeline(snap, baselines, now)
    assert p.decide(lambda did: view("read_inbox", {"folder": "inbox"}))[0].allowed
    engine.clear_window(NS, AGENT)
    baselines[(NS, AGENT)] = baseline(engine, now[0])
    now[0] += 0.01
    d, _, _, text = p.decide(lambda did: view("search_contacts", {"query": "x"}))
    assert d.allowed and decode(text).previous == "read_inbox", d.reason
    assert d.scored is not None and d.scored.epoch == 1 and not d.scored.held
