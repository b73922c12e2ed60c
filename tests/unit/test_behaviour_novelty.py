"""Behaviour analysis of what an agent does (issue 21), pure, with plain data and fake
times: new tools, new sensitive values, new tool-to-tool transitions and the exfiltration
shape; each in the explanation, each topping out at its weight; one odd call never
revokes, persistent novelty does; bounded memory; state version 2 (and version 1 still)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import pytest

from sidecar.core.behaviour import FEATURES, BehaviourEngine, BehaviourSettings, CallEvent, Risk
from sidecar.core.callfacts import CallFacts

T0 = 1_800_000_000.0
NS, AGENT = "agents", "mail-agent"
S = BehaviourSettings(learning_seconds=600.0, window_seconds=60.0, min_calls=10)
LEARNED = T0 + S.learning_seconds
KEY = "key1"
MCP = "mcp.internal"


def tool(
    at: float,
    name: str,
    shape: str = "",
    values: Sequence[tuple[str, str]] = (),
    *,
    allowed: bool = True,
    code: str = "",
    key: str = KEY,
    host: str = MCP,
    received: int = 300,
    sent: int = 400,
) -> CallEvent:
    return CallEvent(
        at=at, agent=AGENT, namespace=NS, method="POST", host=host, path="/mcp",
        allowed=allowed, code=code or ("allowed" if allowed else "outside_purpose"),
        status=200 if allowed else 403, bytes_sent=sent, bytes_received=received,
        facts=CallFacts((name,), (shape,), "", tuple(values), key if values else ""),
    )  # fmt: skip


def fp(n: int) -> str:
    return f"{n:016x}"


# The agent's usual session: read the inbox, search, send to one of 3 known recipients.
def session(at: float, i: int) -> list[CallEvent]:
    return [
        tool(at, "read_inbox", "folder:s"),
        tool(at + 1, "search_contacts", "query:s"),
        tool(at + 2, "send_email", "body:s,to:a", [("to", fp(i % 3))]),
    ]


def learned(engine: BehaviourEngine | None = None) -> BehaviourEngine:
    engine = engine or BehaviourEngine()
    at = T0
    for i in range(40):  # a session every 15 s through the learning period
        for e in session(at, i):
            engine.observe(e, S)
        at += 15.0
    return engine


def feed(engine: BehaviourEngine, events: Iterable[CallEvent]) -> Risk:
    last = LEARNED
    for e in events:
        engine.observe(e, S)
        last = e.at
    return engine.score(NS, AGENT, last + 0.5, S)


AFTER = LEARNED + 120  # the learning period's calls are out of the window


# -- each feature, from the first call (fewer than min_calls calls in the window) ----------------


def test_a_known_session_scores_nothing() -> None:
    risk = feed(learned(), session(AFTER, 1))
    assert risk.score == 0.0 and "too little evidence" in risk.explanation()


def test_a_first_time_tool_raises_the_score_and_is_named_with_its_argument_shape() -> None:
    risk = feed(learned(), [tool(AFTER, "delete_account", "id:s,purge:b")])
    assert risk.contributions == {"new_tools": pytest.approx(0.56)}
    assert risk.calls == 1 < S.min_calls  # a tool is a fact: no min_calls for it
    assert "new tools 0.56 (1 call: delete_account(id:s,purge:b))" in risk.explanation()


def test_a_new_sensitive_value_raises_the_score_and_names_the_argument() -> None:
    assert feed(learned(), [tool(AFTER, "send_email", "to:a", [("to", fp(2))])]).score == 0.0
    risk = feed(learned(), [tool(AFTER, "send_email", "to:a", [("to", fp(1)), ("to", fp(99))])])
    assert risk.contributions == {"new_values": pytest.approx(0.56)}
    assert "new values 0.56 (1 call: to)" in risk.explanation()


def test_a_new_transition_between_known_tools_raises_the_score() -> None:
    # learned: read_inbox -> search_contacts -> send_email -> read_inbox (next session)
    risk = feed(learned(), [tool(AFTER, "read_inbox"), tool(AFTER + 1, "send_email", "to:a",
                                                             [("to", fp(0))])])  # fmt: skip
    assert risk.contributions == {"new_transitions": pytest.approx(0.56)}
    assert "new transitions 0.56 (1 call: read_inbox -> send_email)" in risk.explanation()


def test_a_transition_is_one_within_the_window_only() -> None:
    later = AFTER + S.window_seconds + 1  # the previous tool call is too old to follow
    risk = feed(learned(), [tool(AFTER, "read_inbox"), tool(later, "send_email")])
    assert risk.score == 0.0


def test_a_call_of_a_new_tool_counts_for_the_tool_alone() -> None:
    risk = feed(learned(), [tool(AFTER, "read_inbox"), tool(AFTER + 1, "export_all")])
    assert set(risk.contributions) == {"new_tools"}


def reads_then_uploads(
    host: str, received: int, read: int = 200_000, path: str = "/upload"
) -> list[CallEvent]:
    return [
        tool(AFTER, "read_inbox", sent=read),
        CallEvent(at=AFTER + 1, agent=AGENT, namespace=NS, method="PUT", host=host,
                  path=path, allowed=True, code="allowed", bytes_received=received),
    ]  # fmt: skip


def test_reading_then_a_large_write_to_a_new_destination_is_the_exfiltration_shape() -> None:
    risk = feed(learned(), reads_then_uploads("drop.evil.test", 500_000))
    assert risk.contributions["exfiltration"] == pytest.approx(0.48)
    assert "exfiltration 0.48 (1 call: 488 KiB to drop.evil.test/upload after reading 195 KiB)" in (
        risk.explanation()
    )


@pytest.mark.parametrize(
    ("host", "path", "received", "read"),
    [
        pytest.param("drop.evil.test", "/upload", 8_000, 200_000, id="small-write"),
        pytest.param(MCP, "/mcp", 500_000, 200_000, id="known-destination"),
        pytest.param("drop.evil.test", "/upload", 500_000, 0, id="nothing-read-before"),
    ],
)
def test_not_the_exfiltration_shape(host: str, path: str, received: int, read: int) -> None:
    risk = feed(learned(), reads_then_uploads(host, received, read, path))
    assert "exfiltration" not in risk.contributions


# -- the score's properties ----------------------------------------------------------------------


def test_each_feature_tops_out_at_its_weight_however_many_calls() -> None:
    engine = learned()
    events = [tool(AFTER + i, f"new_tool_{i}", "", [("to", fp(1000 + i))]) for i in range(20)]
    risk = feed(engine, events)
    assert risk.contributions["new_tools"] == FEATURES["new_tools"] == 0.7
    assert risk.contributions["new_values"] == FEATURES["new_values"] == 0.7
    # the details name the first three of the novelties kept (the last 16), and count the rest
    assert "new tools 0.70 (20 calls: new_tool_12(), new_tool_13(), new_tool_14() and 5 more)" in (
        risk.explanation()
    )
    for name, value in risk.contributions.items():
        assert 0 < value <= FEATURES[name]


def test_one_novelty_alone_never_reaches_the_deny_threshold() -> None:
    new_recipients = [  # the usual sessions, each to a recipient never seen
        e if e.facts.tools[0] != "send_email" else tool(e.at, "send_email", "", [("to", fp(100 + i))])
        for i in range(4)
        for e in session(AFTER + 12 * i, i)
    ]  # fmt: skip
    for events in ([tool(AFTER + i, f"lookup_{i}") for i in range(10)], new_recipients):
        assert feed(learned(), events).score < S.deny_at


def test_one_odd_call_never_revokes_even_new_in_every_way() -> None:
    def odd(at: float) -> CallEvent:
        return tool(at, "export_all", "", [("to", fp(666))], received=900_000, host="x.evil")

    engine = learned()
    risk = feed(engine, [tool(AFTER, "read_inbox", sent=500_000), odd(AFTER + 1)])
    assert set(risk.contributions) == {"new_tools", "new_values", "exfiltration"}
    assert S.deny_at <= risk.score < 0.95  # two novelties in one call: denied, not revoked
    # The same among ordinary traffic (min_calls reached): still under any revokeAtRisk.
    engine = learned()
    usual = [e for i in range(4) for e in session(AFTER + 10 * i, i)]
    risk = feed(engine, [*usual, tool(AFTER + 45, "read_inbox", sent=500_000), odd(AFTER + 46)])
    assert risk.calls >= S.min_calls and risk.score < 0.95, risk.explanation()


def test_persistent_novelty_revokes() -> None:
    rogue = [
        tool(AFTER, "export_contacts"),
        tool(AFTER + 1, "send_email", "to:a", [("to", fp(700))]),
        tool(AFTER + 2, "read_inbox"),
        tool(AFTER + 3, "send_email", "to:a", [("to", fp(701))]),
        tool(AFTER + 4, "delete_account"),
    ]
    risk = feed(learned(), rogue)
    assert risk.score >= 0.95, risk.explanation()
    assert {"new_tools", "new_values", "new_transitions"} <= set(risk.contributions)


def test_novelty_with_probing_revokes() -> None:
    probing = [tool(AFTER + i, f"admin_{i % 3}", allowed=i % 2 == 0) for i in range(24)]
    risk = feed(learned(), probing)
    assert risk.score >= 0.95 and {"new_tools", "denied_share"} <= set(risk.contributions)


def test_calls_denied_for_the_risk_itself_are_not_probing() -> None:
    """Counted as denied, calls refused because of the score would feed the score up to a
    revocation after one odd call."""
    engine = learned()
    odd = tool(AFTER, "export_all", "", [("to", fp(666))])
    refused = [
        tool(AFTER + 1 + i, "read_inbox", allowed=False, code=code)
        for i, code in enumerate(["risk"] * 10 + ["revoked"] * 5)
    ]
    risk = feed(engine, [odd, *refused])
    assert "denied_share" not in risk.contributions and risk.score < 0.95


def test_novelty_ages_out_of_the_window() -> None:
    engine = learned()
    assert feed(engine, [tool(AFTER, "export_all")]).score > 0
    assert engine.score(NS, AGENT, AFTER + S.window_seconds + 10, S).score == 0.0


def test_during_learning_new_things_are_learned_not_scored() -> None:
    engine = learned()
    risk = engine.score(NS, AGENT, LEARNED - 1, S)
    assert risk.learning and risk.score == 0.0
    engine.observe(tool(LEARNED - 1, "rare_tool"), S)  # still learning: now known
    assert feed(engine, [tool(AFTER, "rare_tool")]).score == 0.0


def test_values_under_another_key_are_not_compared() -> None:
    risk = feed(learned(), [tool(AFTER, "send_email", "to:a", [("to", fp(99))], key="key2")])
    assert risk.score == 0.0


# -- bounds and state ---------------------------------------------------------------------------


def test_learned_facts_are_bounded() -> None:
    engine = BehaviourEngine(max_tools=2, max_transitions=1, max_values=2)
    learned(engine)
    agent = engine.export_state()["agents"][0]
    assert len(agent["tools"]) == 2 and len(agent["transitions"]) == 1
    assert len(agent["values"]) == 2
    # what was not learned counts as new
    assert "new_tools" in feed(engine, [tool(AFTER, "send_email")]).contributions


def test_facts_survive_a_restart() -> None:
    engine = learned()
    state = json.loads(json.dumps(engine.export_state()))
    assert state["version"] == 2
    agent = state["agents"][0]
    assert agent["tools"] == ["read_inbox", "search_contacts", "send_email"]
    assert ["read_inbox", "search_contacts"] in agent["transitions"]
    assert agent["values"] == [fp(0), fp(1), fp(2)] and agent["value_key"] == KEY
    restored = BehaviourEngine()
    restored.import_state(state)
    assert restored.export_state() == engine.export_state()
    rogue = [tool(AFTER, "export_all"), tool(AFTER + 1, "send_email", "", [("to", fp(9))])]
    assert feed(restored, rogue) == feed(engine, rogue)


def test_a_version_1_state_learns_facts_from_its_next_call() -> None:
    """Baselines saved before facts existed know no tool: their facts get a learning
    period of their own, instead of every tool counting as new."""
    state = learned().export_state()
    old = {"version": 1, "agents": [
        {k: v for k, v in a.items() if k not in ("learned_out", "facts_started", "tools",
                                                  "transitions", "value_key", "values")}
        for a in state["agents"]
    ]}  # fmt: skip
    engine = BehaviourEngine()
    engine.import_state(old)
    assert feed(engine, [tool(AFTER, "read_inbox"), tool(AFTER + 1, "any_tool")]).score == 0.0
    after = AFTER + S.learning_seconds + 120
    risk = feed(engine, [tool(after, "another_tool")])
    assert "new_tools" in risk.contributions and "any_tool" not in risk.explanation()
    assert engine.export_state()["agents"][0]["facts_started"] == AFTER


def _v2(**changes: object) -> dict[str, object]:
    state = learned().export_state()
    state["agents"][0].update(changes)
    return state


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_v2(tools="read_inbox"), r"agents\[0\]\.tools: expected a list of strings"),
        (_v2(values=[1]), r"agents\[0\]\.values: expected a list of strings"),
        (_v2(transitions=[["a"]]), r"transitions: expected a list of \[tool, tool\] pairs"),
        (_v2(transitions="a"), r"transitions: expected a list"),
        (_v2(value_key=None), r"value_key: expected a string"),
        (_v2(facts_started="now"), r"facts_started: expected a number or null"),
        (_v2(facts_started=float("nan")), r"facts_started: expected a finite number"),
        (_v2(learned_out=-1), r"learned_out: expected a non-negative integer"),
        (_v2(tools=[f"t{i}" for i in range(1001)]), r"tools: 1001, more than 1000"),
    ],
)
def test_bad_facts_in_a_state_are_refused_whole(data: object, message: str) -> None:
    engine = BehaviourEngine()
    with pytest.raises(ValueError, match=message):
        engine.import_state(data)  # type: ignore[arg-type]
    assert engine.agents() == []


# -- the profile ------------------------------------------------------------------------------


def test_sensitive_arguments_come_from_the_profile() -> None:
    from pydantic import ValidationError

    from sidecar.core.model import Behavior
    from sidecar.core.snapshot import compile_behaviour

    settings = compile_behaviour(Behavior.model_validate({"sensitiveArguments": ["to", "iban"]}))
    assert settings is not None and settings.sensitive == frozenset({"to", "iban"})
    assert compile_behaviour(Behavior.model_validate({})) == BehaviourSettings()
    with pytest.raises(ValidationError, match="'to' is listed twice"):
        Behavior.model_validate({"sensitiveArguments": ["to", "to"]})
    with pytest.raises(ValidationError):
        Behavior.model_validate({"sensitiveArguments": [""]})
