"""decide() phases 3, 6 and 7 with the agent's run-time context: reported tasks select a
purpose, elevation grants add their rules after the purpose's own (deny rules and
revocation still win), behaviour risk denies in `enforce` mode only, and rate limits count
allowed calls only.

Profiles: tests/fixtures/profiles/agents.yaml (billing-agent: elevation `refund`, behaviour
enforce with revokeAtRisk 0.95, rateLimit 600/1m on `reconcile`; research-agent: none).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Code, Decision, RequestView, decide, load_profiles
from sidecar.core.agentstate import AgentStateTable, Grant, RiskState, TaskBinding
from sidecar.core.decide import over_rate
from sidecar.core.ratelimit import RateLimiter
from sidecar.core.revocation import Revocation, RevocationTable, make_key

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
SNAPSHOT = load_profiles(FIXTURES)
NS = "agents"
NOW = 1_700_000_000.0
REFUND = {"method": "POST", "authority": "api.stripe.com", "path": "/v1/refunds"}


def view(**fields: Any) -> RequestView:
    base: dict[str, Any] = {
        "decision_id": "dec-1",
        "method": "GET",
        "authority": "ledger.finance.svc.cluster.local",
        "path": "/v1/invoices/7",
        "configured_agent": "billing-agent",
        "namespace": NS,
    }
    base.update(fields)
    return RequestView(**base)


def grant(**fields: Any) -> Grant:
    base: dict[str, Any] = {
        "id": "grant-1",
        "agent": "billing-agent",
        "namespace": NS,
        "elevation": "refund",
        "starts_at": NOW - 60,
        "expires_at": NOW + 60,
        "approver": "alice (mandate approve)",
        "justification": "refund INV-7 owed",
    }
    base.update(fields)
    return Grant(**base)


def ctx(
    *,
    grants: tuple[Grant, ...] = (),
    tasks: tuple[TaskBinding, ...] = (),
    risks: tuple[RiskState, ...] = (),
) -> AgentStateTable:
    return AgentStateTable.build(1, grants, tasks, risks)


def risk(score: float, *, agent: str = "billing-agent", learning: bool = False) -> RiskState:
    return RiskState(agent, NS, score, explanation=f"synthetic {score}", learning=learning)


# -- elevation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "g", "at", "allowed", "code"),
    [
        ("no grant: outside purpose", None, NOW, False, Code.OUTSIDE_PURPOSE),
        ("active grant allows", grant(), NOW, True, Code.ALLOWED),
        ("grant at its first instant", grant(starts_at=NOW), NOW, True, Code.ALLOWED),
        (
            "grant ends exactly at expires_at",
            grant(expires_at=NOW),
            NOW,
            False,
            Code.OUTSIDE_PURPOSE,
        ),
        ("grant not started yet", grant(starts_at=NOW + 1), NOW, False, Code.OUTSIDE_PURPOSE),
        ("another agent's grant", grant(agent="research-agent"), NOW, False, Code.OUTSIDE_PURPOSE),
        ("grant in another namespace", grant(namespace="other"), NOW, False, Code.OUTSIDE_PURPOSE),
        (
            "grant of an elevation the profile lacks",
            grant(elevation="delete-all"),
            NOW,
            False,
            Code.OUTSIDE_PURPOSE,
        ),
    ],
)
def test_elevation_grants(case: str, g: Grant | None, at: float, allowed: bool, code: str) -> None:
    d = decide(SNAPSHOT, view(**REFUND), at, agent_state=ctx(grants=(g,) if g else ()))
    assert (d.allowed, d.code) == (allowed, code), case
    if allowed:
        assert d.grant == g
        assert d.rule == "elevation:refund.allow[0]"
        assert "grant grant-1" in d.reason and "alice" in d.reason
    else:
        assert d.grant is None


def test_a_grant_adds_only_its_own_rules() -> None:
    c = ctx(grants=(grant(),))
    other = decide(
        SNAPSHOT,
        view(method="DELETE", authority="api.stripe.com", path="/v1/refunds"),
        NOW,
        agent_state=c,
    )
    assert (other.allowed, other.code) == (False, Code.OUTSIDE_PURPOSE)


def test_own_rules_come_first_and_record_no_grant() -> None:
    d = decide(SNAPSHOT, view(), NOW, agent_state=ctx(grants=(grant(),)))
    assert d.allowed and d.grant is None and d.rule == "reconcile.allow[0]"


def test_deny_rules_win_over_a_grant() -> None:
    # reconcile's deny rule covers /v1/ledger/admin/** on any host
    g = grant()
    snap_view = view(method="POST", authority="api.stripe.com", path="/v1/ledger/admin/x")
    d = decide(SNAPSHOT, snap_view, NOW, agent_state=ctx(grants=(g,)))
    assert (d.allowed, d.code) == (False, Code.DENIED_BY_RULE)


def test_revocation_wins_over_a_grant() -> None:
    rev = Revocation(
        make_key("admin", NS, "billing-agent"), "billing-agent", NS, "incident", "admin"
    )
    table = RevocationTable.build(1, [rev])
    d = decide(SNAPSHOT, view(**REFUND), NOW, table, ctx(grants=(grant(),)))
    assert (d.allowed, d.code) == (False, Code.REVOKED)


def test_a_grant_applies_under_any_purpose_of_the_agent() -> None:
    d = decide(
        SNAPSHOT,
        view(**REFUND, headers={"x-mandate-purpose": "report"}),
        NOW,
        agent_state=ctx(grants=(grant(),)),
    )
    assert d.allowed and d.purpose == "report" and d.grant is not None


# -- tasks ----------------------------------------------------------------------------------


def task(t: str = "T-1", purpose: str = "report", **fields: Any) -> TaskBinding:
    return TaskBinding("billing-agent", NS, t, purpose, NOW - 10, **fields)


REPORT = {
    "method": "PUT",
    "authority": "reports.finance.svc.cluster.local",
    "path": "/v1/reports/m1",
}


@pytest.mark.parametrize(
    ("case", "headers", "tasks", "allowed", "code", "purpose"),
    [
        (
            "task alone selects its purpose",
            {"x-mandate-task": "T-1"},
            (task(),),
            True,
            Code.ALLOWED,
            "report",
        ),
        (
            "unknown task: default purpose",
            {"x-mandate-task": "T-9"},
            (task(),),
            False,
            Code.OUTSIDE_PURPOSE,
            "reconcile",
        ),
        (
            "expired task: default purpose",
            {"x-mandate-task": "T-1"},
            (task(expires_at=NOW),),
            False,
            Code.OUTSIDE_PURPOSE,
            "reconcile",
        ),
        (
            "declared purpose agrees",
            {"x-mandate-task": "T-1", "x-mandate-purpose": "report"},
            (task(),),
            True,
            Code.ALLOWED,
            "report",
        ),
        (
            "declared purpose contradicts the task",
            {"x-mandate-task": "T-1", "x-mandate-purpose": "reconcile"},
            (task(),),
            False,
            Code.BAD_TASK,
            "",
        ),
        (
            "another agent's task binding is not ours",
            {"x-mandate-task": "T-1"},
            (replace(task(), agent="research-agent"),),
            False,
            Code.OUTSIDE_PURPOSE,
            "reconcile",
        ),
    ],
)
def test_reported_tasks(
    case: str,
    headers: dict[str, str],
    tasks: tuple[TaskBinding, ...],
    allowed: bool,
    code: str,
    purpose: str,
) -> None:
    d = decide(SNAPSHOT, view(**REPORT, headers=headers), NOW, agent_state=ctx(tasks=tasks))
    assert (d.allowed, d.code, d.purpose) == (allowed, code, purpose), case


# -- behaviour ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "r", "allowed", "code"),
    [
        ("no score", None, True, Code.ALLOWED),
        ("low score", risk(0.2), True, Code.ALLOWED),
        ("just under the default threshold 0.8", risk(0.79), True, Code.ALLOWED),
        ("at the threshold", risk(0.8), False, Code.RISK),
        (
            "high score while learning is never denied",
            risk(0.99, learning=True),
            True,
            Code.ALLOWED,
        ),
        ("another agent's score", risk(0.99, agent="research-agent"), True, Code.ALLOWED),
    ],
)
def test_risk_in_enforce_mode(case: str, r: RiskState | None, allowed: bool, code: str) -> None:
    d = decide(SNAPSHOT, view(), NOW, agent_state=ctx(risks=(r,) if r else ()))
    assert (d.allowed, d.code) == (allowed, code), case
    if r is not None and r.agent == "billing-agent":
        assert d.risk == r.score
    if code == Code.RISK:
        assert "synthetic" in d.reason and "0.80" in d.reason


def test_risk_never_denies_a_monitor_mode_agent() -> None:
    # research-agent has no behaviour section: monitor is the default
    r = risk(0.99, agent="research-agent")
    d = decide(
        SNAPSHOT,
        view(configured_agent="research-agent", authority="api.semanticscholar.org", path="/x"),
        NOW,
        agent_state=ctx(risks=(r,)),
    )
    assert d.allowed and d.risk == 0.99


def test_risk_does_not_turn_a_deny_into_another_reason() -> None:
    d = decide(SNAPSHOT, view(path="/v1/ledger/admin/x"), NOW, agent_state=ctx(risks=(risk(0.99),)))
    assert d.code == Code.DENIED_BY_RULE


# -- rate -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def limited(call: RequestView, limiter: RateLimiter) -> Decision:
    """The decision as a worker's Check pipeline makes it: decide, then count an allowed
    call against its purpose's rate limit."""
    pipeline = CheckPipeline(lambda: SNAPSHOT, Identity(), clock=lambda: NOW, limiter=limiter)
    return pipeline.decide(lambda did: call)[0]


def test_decide_is_pure_and_leaves_the_rate_to_its_caller() -> None:
    first = decide(SNAPSHOT, view(), NOW)
    again = [decide(SNAPSHOT, view(), NOW) for _ in range(1000)]  # over the 600/min limit
    assert first.allowed and all(d == first for d in again)
    assert first.rate is not None
    assert first.rate.key == ("billing-agent", first.purpose)
    assert (first.rate.requests, first.rate.per_seconds, first.rate.per) == (600, 60.0, "1m")
    no_limit = decide(SNAPSHOT, view(**REPORT, headers={"x-mandate-purpose": "report"}), NOW)
    assert no_limit.allowed and no_limit.rate is None
    assert decide(SNAPSHOT, view(path="/v1/ledger/admin/x"), NOW).rate is None  # denied
    over = over_rate(first)
    assert (over.allowed, over.code) == (False, Code.RATE)
    assert over.reason == f"rate: over the rate limit of purpose {first.purpose!r} (600 per 1m)"


def test_rate_limit_counts_allowed_calls_in_a_sliding_window() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    results = [limited(view(), limiter).code for _ in range(601)]
    assert results[:600] == [Code.ALLOWED] * 600
    assert results[600] == Code.RATE
    # denied calls do not use the budget
    assert limited(view(path="/v1/ledger/admin/x"), limiter).code == Code.DENIED_BY_RULE
    clock.t += 59.9
    assert limited(view(), limiter).code == Code.RATE
    clock.t += 0.2  # the first calls leave the window
    assert limited(view(), limiter).code == Code.ALLOWED


def test_rate_limit_is_per_purpose_and_absent_without_a_limit() -> None:
    limiter = RateLimiter(clock=FakeClock())
    for _ in range(600):
        limited(view(), limiter)
    assert limited(view(), limiter).code == Code.RATE
    # `report` has no rate limit
    assert limited(view(**REPORT, headers={"x-mandate-purpose": "report"}), limiter).allowed


def test_rate_share_splits_the_limit_between_workers() -> None:
    limiter = RateLimiter(share=0.5, clock=FakeClock())
    codes = [limited(view(), limiter).code for _ in range(301)]
    assert codes.count(Code.ALLOWED) == 300 and codes[-1] == Code.RATE


def test_rate_limiter_rejects_a_bad_share() -> None:
    for share in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="share"):
            RateLimiter(share=share)


def test_rate_limiter_table_is_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock, max_keys=10)
    for i in range(100):
        assert limiter.allow(("ns", f"agent-{i}", "p"), 1, 1.0)
        clock.t += 2.0  # every earlier key is idle
    assert len(limiter._calls) <= 10
