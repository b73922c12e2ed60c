"""Metric labels stay bounded: a caller that invents agent names (forged context extensions,
unknown service accounts) must not grow the Prometheus registry. Only agents with a profile
become label values; every unattributed or unknown caller shares the label "-"."""

from __future__ import annotations

from sidecar.core import Code, Decision
from sidecar.telemetry import metrics


def test_invented_agent_names_share_one_label() -> None:
    before = len(metrics._children)
    for i in range(500):
        metrics.observe_decision(
            Decision(f"d{i}", False, Code.UNKNOWN_AGENT, "no profile", agent=f"invented-{i}"), 0.001
        )
    added = len(metrics._children) - before
    assert added <= 1
    labels = {key[0] for key in metrics._children}
    assert not any(a.startswith("invented-") for a in labels)


def test_an_agent_with_a_profile_is_its_own_label() -> None:
    d = Decision("d", True, Code.ALLOWED, "ok", agent="billing-agent", owner="finance")
    metrics.observe_decision(d, 0.001)
    assert ("billing-agent", "-", True, Code.ALLOWED) in metrics._children


def test_the_purpose_label_is_the_profiles_purpose_or_dash() -> None:
    """decide() names a purpose only once it is one of the agent's (an invented
    x-mandate-purpose is denied unknown_purpose with no purpose): the label is bounded by
    the profiles, and a caller without a profile never sets one."""
    allowed = Decision(
        "d", True, Code.ALLOWED, "ok", agent="billing-agent", owner="finance", purpose="reconcile"
    )
    unknown = Decision(
        "d", False, Code.UNKNOWN_PURPOSE, "unknown purpose 'x'", agent="billing-agent",
        owner="finance",
    )  # fmt: skip
    forged = Decision("d", False, Code.UNKNOWN_AGENT, "x", agent="ghost", purpose="reconcile")
    before = metrics.REGISTRY.get_sample_value(
        "mandate_decisions_total",
        {"agent": "billing-agent", "purpose": "reconcile", "decision": "allow", "code": "allowed"},
    )
    for d in (allowed, unknown, forged):
        metrics.observe_decision(d, 0.001)
    assert ("billing-agent", "reconcile", True, Code.ALLOWED) in metrics._children
    assert ("billing-agent", "-", False, Code.UNKNOWN_PURPOSE) in metrics._children
    assert ("-", "-", False, Code.UNKNOWN_AGENT) in metrics._children
    assert not any(k[0] == "ghost" for k in metrics._children)
    after = metrics.REGISTRY.get_sample_value(
        "mandate_decisions_total",
        {"agent": "billing-agent", "purpose": "reconcile", "decision": "allow", "code": "allowed"},
    )
    assert after == (before or 0.0) + 1
