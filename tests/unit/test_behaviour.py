"""Behaviour analysis (pure): path templates, learning, each feature, the score's
properties and persistence, with plain data and fake times."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from sidecar.core.behaviour import (
    FEATURES,
    BehaviourEngine,
    BehaviourSettings,
    CallEvent,
    Risk,
    destination,
    path_template,
)
from sidecar.core.model import Behavior
from sidecar.core.snapshot import compile_behaviour

T0 = 1_800_000_000.0
NS = "agents"
AGENT = "billing-agent"
S = BehaviourSettings()  # learning 600 s, window 60 s, min_calls 10
LEARNED = T0 + S.learning_seconds  # when the learning period ends
LEDGER = "ledger.finance.svc.cluster.local"

Make = Callable[[int, float], CallEvent]


def call(
    at: float,
    host: str = LEDGER,
    path: str = "/v1/invoices/1",
    method: str = "GET",
    allowed: bool = True,
    sent: int = 1000,
    received: int = 0,
    agent: str = AGENT,
) -> CallEvent:
    return CallEvent(
        at=at,
        agent=agent,
        namespace=NS,
        method=method,
        host=host,
        path=path,
        allowed=allowed,
        code="allowed" if allowed else "denied_by_rule",
        status=200 if allowed else 403,
        bytes_sent=sent,
        bytes_received=received,
    )


def normal(i: int, at: float) -> CallEvent:
    """The agent's usual conduct: invoices by id, ledger entries, charges; a report POST
    every tenth call; one call in 25 denied."""
    kind = i % 5
    if i % 10 == 9:
        return call(at, "reports.finance.svc.cluster.local", f"/v1/reports/2026-{i % 12:02d}",
                    "POST", received=300)  # fmt: skip
    if kind in (0, 1):
        return call(at, path=f"/v1/invoices/{1000 + i}")
    if kind == 2:
        return call(at, path="/v1/ledger/entries", sent=4000)
    if kind == 3:
        return call(at, "api.stripe.com", f"/v1/charges/ch_3MtwBwLkdIwHu7ix{i:08d}",
                    allowed=i % 25 != 3)  # fmt: skip
    return call(at, path=f"/v1/invoices/{i}/lines")


def traffic(start: float, seconds: float, per_minute: float, make: Make) -> Iterator[CallEvent]:
    """Evenly spaced calls."""
    step = 60.0 / per_minute
    n = int(seconds / step)
    for i in range(n):
        yield make(i, start + i * step)


def learned(per_minute: float = 20, settings: BehaviourSettings = S) -> BehaviourEngine:
    """An engine whose agent learned ``normal`` conduct at ``per_minute`` calls."""
    engine = BehaviourEngine()
    for e in traffic(T0, settings.learning_seconds, per_minute, normal):
        engine.observe(e, settings)
    return engine


def after(engine: BehaviourEngine, seconds: float, per_minute: float, make: Make) -> Risk:
    """Feed ``seconds`` of calls right after learning; the risk at their end."""
    for e in traffic(LEARNED, seconds, per_minute, make):
        engine.observe(e, S)
    return engine.score(NS, AGENT, LEARNED + seconds, S)


# -- destinations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/invoices/42", "/v1/invoices/{}"),
        ("/v1/invoices/42?expand=lines#x", "/v1/invoices/{}"),
        ("/v1/users/3f2504e0-4f89-11d3-9a0c-0305e82c3301/cards", "/v1/users/{}/cards"),
        ("/v1/blobs/0123456789abcdef0123", "/v1/blobs/{}"),
        ("/v1/charges/ch_3MtwBwLkdIwHu7ix28a3tqPa", "/v1/charges/{}"),
        ("/v1/reports/2026-01", "/v1/reports/{}"),
        ("/orders/inv-420", "/orders/{}"),
        ("/v1/ledger/entries", "/v1/ledger/entries"),
        ("/v1beta1/oauth2/token", "/v1beta1/oauth2/token"),
        ("/api/ipv6/e2e-allowed", "/api/ipv6/e2e-allowed"),
        ("/deadbeef", "/deadbeef"),  # short hex: a name, not an id
        ("/" + "x" * 65, "/{}"),
        ("", ""),
        ("/", "/"),
        ("/" + "/a" * 300, ("/" + "/a" * 300)[:256]),
    ],
)
def test_path_template(path: str, template: str) -> None:
    assert path_template(path) == template


def test_destination_is_host_and_template() -> None:
    assert destination("API.Stripe.com", "/v1/charges/42") == "api.stripe.com/v1/charges/{}"
    assert destination("tunnel.example.com", "") == "tunnel.example.com"


# -- learning and evidence ----------------------------------------------------------------


def test_an_unknown_agent_is_learning_with_no_calls() -> None:
    risk = BehaviourEngine().score(NS, "nobody", T0, S)
    assert (risk.score, risk.learning, risk.calls, dict(risk.contributions)) == (0, True, 0, {})


def test_the_learning_period_scores_zero_whatever_the_agent_does() -> None:
    engine = BehaviourEngine()
    for i, e in enumerate(traffic(T0, 300, 120, normal)):
        engine.observe(e if i % 2 else replace(e, host=f"h{i}.evil", allowed=False), S)
    risk = engine.score(NS, AGENT, T0 + 300, S)
    assert (risk.score, risk.learning) == (0.0, True)
    assert risk.calls == pytest.approx(120, abs=2)
    assert risk.explanation() == f"risk not scored: learning ({risk.calls} calls in the window)"
    # The learning period starts at the agent's first call and ends learning_seconds later.
    assert engine.score(NS, AGENT, LEARNED - 0.001, S).learning
    assert not engine.score(NS, AGENT, LEARNED, S).learning


def test_too_little_evidence_scores_zero() -> None:
    engine = learned()
    later = LEARNED + 120  # the learning period's calls are out of the window
    for i in range(S.min_calls - 1):
        engine.observe(call(later + i, host=f"h{i}.evil", allowed=False), S)
    risk = engine.score(NS, AGENT, later + 10, S)
    assert (risk.score, risk.learning, risk.calls) == (0.0, False, S.min_calls - 1)
    assert "too little evidence" in risk.explanation()


# -- the score's properties ---------------------------------------------------------------


def new_hosts(i: int, at: float) -> CallEvent:
    return call(at, f"h{i % 7}.exfil.example", "/upload")


def probing(i: int, at: float) -> CallEvent:
    """New hosts and paths, half of them denied, some POSTs."""
    return call(at, f"h{i % 7}.exfil.example", f"/admin/{'users' if i % 2 else 'keys'}",
                "POST" if i % 3 == 0 else "GET", allowed=i % 2 == 0)  # fmt: skip


def denied_usual(i: int, at: float) -> CallEvent:
    return replace(normal(i, at), allowed=i % 2 == 0)


def deletes(i: int, at: float) -> CallEvent:
    return replace(normal(i, at), method="DELETE" if i % 2 else "GET")


def big(i: int, at: float) -> CallEvent:
    return replace(normal(i, at), bytes_received=2_000_000)


@pytest.mark.parametrize(
    ("make", "per_minute", "low", "high", "top"),
    [
        # (conduct after learning, its rate, the score's range, the largest contribution)
        pytest.param(normal, 20, 0.0, 0.05, None, id="as-learned"),
        pytest.param(normal, 24, 0.0, 0.3, None, id="as-learned-a-little-faster"),
        pytest.param(new_hosts, 20, 0.4, 0.8, "new_destinations", id="only-new-destinations"),
        pytest.param(probing, 80, 0.95, 1.0, "denied_share", id="burst-new-hosts-denied-faster"),
        pytest.param(probing, 20, 0.9, 1.0, "denied_share", id="probing-at-the-usual-rate"),
        pytest.param(denied_usual, 20, 0.6, 0.9, "denied_share", id="many-denied"),
        pytest.param(normal, 80, 0.3, 0.6, "rate", id="rate-only"),
        pytest.param(deletes, 20, 0.2, 0.45, "method_mix", id="method-mix-only"),
        pytest.param(big, 20, 0.2, 0.5, "volume", id="volume-only"),
    ],
)
def test_score_by_conduct(make: Make, per_minute: float, low: float, high: float,
                          top: str | None) -> None:  # fmt: skip
    risk = after(learned(), 120, per_minute, make)
    assert low <= risk.score <= high, risk.explanation()
    assert 0.0 <= risk.score <= 1.0 and not risk.learning
    if top is None:
        return
    assert max(risk.contributions, key=lambda k: risk.contributions[k]) == top
    for name, value in risk.contributions.items():
        assert 0 < value <= FEATURES[name]


@pytest.mark.parametrize(
    "odd",
    [
        pytest.param(lambda at: call(at, "once.example", "/x"), id="one-new-destination"),
        pytest.param(lambda at: call(at, path="/v1/ledger/admin", allowed=False), id="one-denied"),
        pytest.param(lambda at: call(at, method="DELETE"), id="one-delete"),
        pytest.param(lambda at: call(at, sent=500_000_000), id="one-huge-download"),
    ],
)
def test_one_odd_call_does_not_spike_the_score(odd: Callable[[float], CallEvent]) -> None:
    engine = learned()
    for i, e in enumerate(traffic(LEARNED, 60, 20, normal)):
        engine.observe(odd(e.at) if i == 10 else e, S)
    for calls in (S.min_calls, 20):  # right at the evidence threshold, and a full window
        risk = engine.score(NS, AGENT, LEARNED + 3 * calls, S)
        assert risk.score < 0.1, risk.explanation()


def test_a_burst_ages_out_of_the_window() -> None:
    engine = learned()
    risk = after(engine, 60, 80, probing)
    assert risk.score >= 0.95
    quiet = LEARNED + 60
    for e in traffic(quiet, 30, 20, normal):
        engine.observe(e, S)
    assert engine.score(NS, AGENT, quiet + 30, S).score > 0.9  # half the window still burst
    for e in traffic(quiet + 30, 40, 20, normal):
        engine.observe(e, S)
    assert engine.score(NS, AGENT, quiet + 70, S).score < 0.05  # the burst is gone


def test_baselines_stay_fixed_after_learning() -> None:
    """Calls after learning are never learned: the tenth minute of new hosts is as new as
    the first."""
    engine = learned()
    first = after(engine, 60, 20, new_hosts)
    for e in traffic(LEARNED + 60, 540, 20, new_hosts):
        engine.observe(e, S)
    later = engine.score(NS, AGENT, LEARNED + 600, S)
    assert later.score == first.score
    assert later.contributions["new_destinations"] == first.contributions["new_destinations"]


def test_forget_starts_a_new_learning_period() -> None:
    engine = learned()
    after(engine, 60, 20, new_hosts)
    engine.forget(NS, AGENT)
    assert engine.agents() == []
    for e in traffic(LEARNED + 60, 600, 20, new_hosts):
        engine.observe(e, S)
    assert engine.score(NS, AGENT, LEARNED + 600, S).learning
    assert engine.score(NS, AGENT, LEARNED + 660, S).score == 0.0  # new hosts are usual now


def test_clear_window_keeps_the_baseline() -> None:
    engine = learned()
    assert after(engine, 60, 80, probing).score >= 0.95
    engine.clear_window(NS, AGENT)
    engine.clear_window(NS, "nobody")  # unknown: nothing to do
    assert engine.score(NS, AGENT, LEARNED + 60, S).calls == 0
    for e in traffic(LEARNED + 60, 60, 20, new_hosts):
        engine.observe(e, S)
    assert 0.4 <= engine.score(NS, AGENT, LEARNED + 120, S).score <= 0.8  # still learned


def test_same_events_same_scores() -> None:
    a, b = learned(), learned()
    assert after(a, 90, 50, probing) == after(b, 90, 50, probing)


def test_explanation_names_what_contributes_largest_first() -> None:
    risk = after(learned(), 120, 80, probing)
    text = risk.explanation()
    assert text.startswith(f"risk {risk.score:.2f}: denied share 0.88 (")
    assert "new destinations 0.60 (80 of 80 calls)" in text
    assert "rate" in text and "x baseline" in text
    assert risk.details.keys() == risk.contributions.keys()
    quiet = after(learned(), 120, 20, normal)
    assert quiet.explanation() == f"risk 0.00: nothing unusual ({quiet.calls} calls in the window)"


# -- time, order and bounds ---------------------------------------------------------------


def test_the_window_follows_now_and_its_old_edge_is_pro_rated() -> None:
    engine = BehaviourEngine()
    settings = replace(S, learning_seconds=0.0, min_calls=1)
    for i in range(60):  # one call a second for a minute
        engine.observe(call(T0 + i), settings)
    assert engine.score(NS, AGENT, T0 + 59.5, settings).calls == 60
    # (T0 + 27.5, T0 + 87.5] holds 32 calls; the oldest bucket, [T0 + 25, T0 + 30), counts
    # for the half of it in the window: 30 + 2.5.
    assert engine.score(NS, AGENT, T0 + 87.5, settings).calls == 32
    assert engine.score(NS, AGENT, T0 + 200, settings).calls == 0
    assert engine.score(NS, AGENT, T0 - 1, settings).calls == 0  # all in the future


def test_late_events_count_unless_older_than_the_window() -> None:
    engine = BehaviourEngine()
    settings = replace(S, learning_seconds=0.0, min_calls=1)
    engine.observe(call(T0 + 100), settings)
    engine.observe(call(T0 + 90), settings)  # late, within the window
    engine.observe(call(T0 + 20), settings)  # older than the window
    assert engine.score(NS, AGENT, T0 + 100, settings).calls == 2


def test_a_changed_window_restarts_it() -> None:
    engine = learned()
    after(engine, 60, 20, normal)
    wider = replace(S, window_seconds=120.0)
    assert engine.score(NS, AGENT, LEARNED + 60, wider).calls == 0
    for e in traffic(LEARNED + 60, 120, 40, normal):
        engine.observe(e, wider)
    # The learned peak (about 20 a minute) is rescaled to the wider window: 40 a minute
    # is about twice as fast.
    rate = engine.score(NS, AGENT, LEARNED + 180, wider).details["rate"]
    assert 1.8 <= float(rate.removesuffix("x baseline")) <= 2.1, rate


def test_at_most_max_agents_the_least_recently_seen_dropped() -> None:
    engine = BehaviourEngine(max_agents=3)
    for i, name in enumerate(["a", "b", "c", "a", "d"]):
        engine.observe(call(T0 + i, agent=name), S)
    assert engine.agents() == [(NS, "c"), (NS, "a"), (NS, "d")]


def test_at_most_max_destinations_learned_later_ones_are_new() -> None:
    engine = BehaviourEngine(max_destinations=2)
    for i, e in enumerate(traffic(T0, 600, 20, new_hosts)):
        engine.observe(e, S)
        assert len(engine.export_state()["agents"][0]["destinations"]) == min(i + 1, 2)
    risk = after(engine, 60, 20, new_hosts)
    assert risk.details["new_destinations"] == "14 of 20 calls"  # h0, h1 learned; h2..h6 not


def test_namespaces_keep_agents_apart() -> None:
    engine = learned()
    other = replace(call(LEARNED), namespace="other")
    engine.observe(other, S)
    assert sorted(engine.agents()) == [(NS, AGENT), ("other", AGENT)]
    assert engine.score("other", AGENT, LEARNED, S).learning


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "block"}, "mode"),
        ({"deny_at": 0.0}, "deny_at"),
        ({"deny_at": 1.5}, "deny_at"),
        ({"revoke_at": -1.0}, "revoke_at"),
        ({"learning_seconds": -1.0}, "learning_seconds"),
        ({"learning_seconds": float("nan")}, "learning_seconds"),
        ({"window_seconds": 0.0}, "window_seconds"),
        ({"min_calls": 0}, "min_calls"),
    ],
)
def test_settings_out_of_range(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BehaviourSettings(**changes)


# -- persistence --------------------------------------------------------------------------


def test_baselines_survive_a_restart() -> None:
    engine = learned()
    state = json.loads(json.dumps(engine.export_state()))  # JSON all the way
    restored = BehaviourEngine()
    restored.import_state(state)
    assert restored.agents() == engine.agents()
    assert restored.export_state() == engine.export_state()
    # The same conduct after the restart scores the same as without one.
    assert after(restored, 120, 80, probing) == after(engine, 120, 80, probing)


def test_a_restart_during_learning_continues_it() -> None:
    engine = BehaviourEngine()
    for e in traffic(T0, 300, 20, normal):
        engine.observe(e, S)
    restored = BehaviourEngine()
    restored.import_state(engine.export_state())
    for e in traffic(T0 + 300, 300, 20, normal):
        restored.observe(e, S)
    assert restored.score(NS, AGENT, T0 + 599, S).learning
    assert after(restored, 60, 20, normal).score < 0.05


def test_import_replaces_agents_of_the_same_name_and_keeps_others() -> None:
    engine = learned()
    engine.observe(call(T0, agent="other"), S)
    fresh = BehaviourEngine()
    fresh.observe(call(T0 + 5, agent=AGENT), S)
    engine.import_state(fresh.export_state())
    agents = {a["agent"]: a for a in engine.export_state()["agents"]}
    assert set(agents) == {AGENT, "other"}
    assert agents[AGENT]["started"] == T0 + 5 and agents[AGENT]["learned_calls"] == 1


def _state() -> dict[str, Any]:
    return learned().export_state()


def _agent(**changes: Any) -> dict[str, Any]:
    state = _state()
    state["agents"][0].update(changes)
    return state


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "expected an object"),
        ({"version": 3, "agents": []}, "version 3"),
        ({"version": True, "agents": []}, "version True"),
        ({"version": 1}, "'agents' must be a list"),
        ({"version": 1, "agents": ["x"]}, r"agents\[0\]: expected an object"),
        (_agent(agent=""), r"agents\[0\]\.agent: expected a non-empty string"),
        (_agent(namespace=None), r"agents\[0\]\.namespace"),
        (_agent(started="yesterday"), r"agents\[0\]\.started: expected a number"),
        (_agent(started=float("inf")), r"agents\[0\]\.started: expected a finite number"),
        (_agent(learned_calls=-1), r"agents\[0\]\.learned_calls: expected a non-negative integer"),
        (_agent(learned_calls=True), r"agents\[0\]\.learned_calls"),
        (_agent(learned_denied=10**6), r"learned_denied: more than learned_calls"),
        (_agent(learned_methods={"BREW": 1}), r"unknown method 'BREW'"),
        (_agent(learned_methods={"GET": 1}), r"do not add up to learned_calls"),
        (_agent(learned_methods={"GET": -1}), r"learned_methods\.GET"),
        (_agent(peak_window=0), r"peak_window"),
        (_agent(peak_bytes=-5.0), r"peak_bytes"),
        (_agent(destinations="ledger"), r"destinations: expected a list of strings"),
        (_agent(destinations=[1]), r"destinations: expected a list of strings"),
        ({"version": 1, "agents": _state()["agents"] * 2}, r"agents\[1\]: agent agents/billing-agent appears twice"),
    ],
)  # fmt: skip
def test_bad_state_is_refused_whole(data: Any, message: str) -> None:
    engine = BehaviourEngine()
    engine.observe(call(T0, agent="kept"), S)
    before = engine.export_state()
    with pytest.raises(ValueError, match=message):
        engine.import_state(data)
    assert engine.export_state() == before


def test_a_state_too_large_for_the_caps_is_refused() -> None:
    big = BehaviourEngine()
    for name in "abc":
        big.observe(call(T0, agent=name), S)
    small = BehaviourEngine(max_agents=2)
    with pytest.raises(ValueError, match=r"3 agents .* more than 2"):
        small.import_state(big.export_state())
    assert small.agents() == []
    with pytest.raises(ValueError, match="destinations: 5, more than 1"):
        BehaviourEngine(max_destinations=1).import_state(_state())


# -- compiled from the profile: the one spelling of the settings ---------------------------------


@pytest.mark.parametrize(
    ("spec", "deny_at", "revoke_at"),
    [
        ({}, 0.8, None),
        ({"revokeAtRisk": 0.6}, 0.6, 0.6),  # a lower revokeAtRisk lowers the default deny
        ({"revokeAtRisk": 0.95}, 0.8, 0.95),
        ({"revokeAtRisk": 0.95, "denyAtRisk": 0.5}, 0.5, 0.95),
    ],
)
def test_a_profiles_behavior_compiles_to_the_engines_settings(
    spec: dict[str, Any], deny_at: float, revoke_at: float | None
) -> None:
    settings = compile_behaviour(
        Behavior.model_validate(
            {"mode": "enforce", "learningPeriod": "2m", "window": "30s", **spec}
        )
    )
    assert settings == BehaviourSettings(
        mode="enforce", deny_at=deny_at, revoke_at=revoke_at, learning_seconds=120.0,
        window_seconds=30.0, min_calls=10,
    )  # fmt: skip
    assert compile_behaviour(None) is None


def test_the_template_cache_holds_paths_not_what_the_agent_puts_in_queries() -> None:
    from sidecar.core import behaviour

    behaviour._template.cache_clear()
    for i in range(500):  # distinct queries, one path
        assert path_template(f"/v1/invoices/42?page={i}&x={'q' * 1000}") == "/v1/invoices/{}"
    assert behaviour._template.cache_info().currsize == 1
    long = "/v1/" + "/".join(["segment"] * 300)
    assert path_template(long) == long[: behaviour._MAX_TEMPLATE]
    assert behaviour._template.cache_info().currsize == 1  # a long path is not kept
