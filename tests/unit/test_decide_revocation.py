"""decide() phase 2: revocation. A revoked agent (or `*` in its namespace) is denied before
anything it declares is looked at; an incomplete table denies every attributed call.

Profiles: tests/fixtures/profiles/agents.yaml (billing-agent, research-agent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.core import Code, RequestView, decide, load_profiles
from sidecar.core.revocation import ALL_AGENTS, EMPTY_TABLE, Revocation, RevocationTable, make_key

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
SNAPSHOT = load_profiles(FIXTURES)
LEDGER = "ledger.finance.svc.cluster.local"
BILLING_SPIFFE = "spiffe://cluster.local/ns/agents/sa/billing-agent"
NS = "agents"
NOW = 1_700_000_000.0


def view(**fields: Any) -> RequestView:
    """An allowed GET of an invoice by billing-agent in namespace `agents`, with overrides."""
    base: dict[str, Any] = {
        "decision_id": "dec-1",
        "method": "GET",
        "authority": LEDGER,
        "path": "/v1/invoices/7",
        "configured_agent": "billing-agent",
        "namespace": NS,
    }
    base.update(fields)
    return RequestView(**base)


def research(**fields: Any) -> RequestView:
    return view(
        configured_agent="research-agent",
        authority="api.semanticscholar.org",
        path="/graph/v1/paper/search",
        **fields,
    )


def rev(
    agent: str = "billing-agent",
    namespace: str = NS,
    *,
    source: str = "admin",
    name: str = "",
    reason: str = "incident 42",
    expires_at: float | None = None,
) -> Revocation:
    name = name or ("all" if agent == ALL_AGENTS else agent)
    return Revocation(
        key=make_key(source, namespace, name),
        agent=agent,
        namespace=namespace,
        reason=reason,
        source=source,
        name=name,
        expires_at=expires_at,
        created_at=NOW - 60,
    )


def table(*entries: Revocation, complete: bool = True) -> RevocationTable:
    return RevocationTable.build(4, entries, complete)


ALLOWED, REVOKED, UNKNOWN = Code.ALLOWED, Code.REVOKED, Code.REVOCATIONS_UNKNOWN


def test_a_refused_table_denies_every_agent_saying_why() -> None:
    """Issue 19: revocations the API server refused (403, no CRD) deny every call with their
    own code and the missing permission, before anything the agent declares."""
    why = "HTTP 403 Forbidden: needs get, list and watch on agentrevocations.mandate.dev"
    refused = RevocationTable.build(4, [], True, why)
    for v in (view(), research()):
        d = decide(SNAPSHOT, v, NOW, refused)
        assert (d.allowed, d.code) == (False, Code.REVOCATIONS_REFUSED)
        assert d.reason == f"revocations cannot be read: {why}: failing closed"


CASES = [
    pytest.param(view(), table(), ALLOWED, "reconcile.allow[0]", "", id="empty-table-allows"),
    pytest.param(view(), EMPTY_TABLE, ALLOWED, "reconcile.allow[0]", "", id="default-table"),
    pytest.param(
        view(),
        table(rev()),
        REVOKED,
        "admin:agents/billing-agent",
        "revoked: incident 42",
        id="own-agent-revoked",
    ),
    pytest.param(
        view(source_principal=BILLING_SPIFFE, context_extensions={"agent": "billing-agent"}),
        table(rev(source="kubernetes", name="stop-billing", reason="leaked key")),
        REVOKED,
        "kubernetes:agents/stop-billing",
        "revoked: leaked key",
        id="kubernetes-revocation-any-attribution",
    ),
    pytest.param(
        research(), table(rev()), ALLOWED, "literature-search.allow[0]", "", id="other-agent-free"
    ),
    pytest.param(
        view(),
        table(rev(ALL_AGENTS)),
        REVOKED,
        "admin:agents/all",
        "revoked: incident 42",
        id="star-revokes-billing",
    ),
    pytest.param(
        research(),
        table(rev(ALL_AGENTS)),
        REVOKED,
        "admin:agents/all",
        "",
        id="star-revokes-research",
    ),
    pytest.param(
        view(), table(rev(namespace="ops")), ALLOWED, "reconcile.allow[0]", "", id="other-namespace"
    ),
    pytest.param(
        view(),
        table(rev(ALL_AGENTS, "ops")),
        ALLOWED,
        "reconcile.allow[0]",
        "",
        id="other-namespace-star",
    ),
    pytest.param(
        view(namespace="ops"),
        table(rev(ALL_AGENTS, "ops")),
        REVOKED,
        "admin:ops/all",
        "",
        id="star-in-the-pods-namespace",
    ),
    pytest.param(
        view(namespace=""), table(rev()), ALLOWED, "reconcile.allow[0]", "", id="no-namespace"
    ),
    pytest.param(
        view(), table(rev(expires_at=NOW)), ALLOWED, "reconcile.allow[0]", "", id="expired-at-now"
    ),
    pytest.param(
        view(), table(rev(expires_at=NOW - 1)), ALLOWED, "reconcile.allow[0]", "", id="expired"
    ),
    pytest.param(
        view(),
        table(rev(expires_at=NOW + 1)),
        REVOKED,
        "admin:agents/billing-agent",
        "",
        id="not-yet-expired",
    ),
    pytest.param(
        view(),
        table(rev(expires_at=NOW - 1), rev(source="kubernetes", name="k", reason="still")),
        REVOKED,
        "kubernetes:agents/k",
        "revoked: still",
        id="one-expired-one-active",
    ),
    pytest.param(
        view(),
        table(complete=False),
        UNKNOWN,
        "",
        "revocation state not known yet",
        id="incomplete-denies-allowed-call",
    ),
    pytest.param(
        view(), table(rev(), complete=False), UNKNOWN, "", "", id="incomplete-beats-revoked"
    ),
    pytest.param(research(), table(complete=False), UNKNOWN, "", "", id="incomplete-any-agent"),
    # revocation beats everything the agent declares
    pytest.param(
        view(
            headers={"x-mandate-purpose": "report"},
            method="PUT",
            authority="reports.finance.svc.cluster.local",
            path="/v1/reports/q1",
        ),
        table(rev()),
        REVOKED,
        "admin:agents/billing-agent",
        "",
        id="beats-declared-purpose",
    ),
    pytest.param(
        view(headers={"x-mandate-purpose": "no-such-purpose"}),
        table(rev()),
        REVOKED,
        "admin:agents/billing-agent",
        "",
        id="beats-unknown-purpose",
    ),
    pytest.param(
        view(headers={"x-mandate-task": "bad task with spaces"}),
        table(rev()),
        REVOKED,
        "admin:agents/billing-agent",
        "",
        id="beats-bad-task",
    ),
    pytest.param(
        view(authority="bad host:99999", path="/../x"),
        table(rev()),
        REVOKED,
        "admin:agents/billing-agent",
        "",
        id="beats-bad-request",
    ),
    pytest.param(
        view(path="/v1/ledger/admin/keys"),
        table(rev()),
        REVOKED,
        "admin:agents/billing-agent",
        "",
        id="beats-deny-rule",
    ),
    pytest.param(
        view(headers={"x-mandate-agent": "research-agent"}),
        table(rev()),
        REVOKED,
        "admin:agents/billing-agent",
        "",
        id="header-does-not-change-identity",
    ),
    pytest.param(
        research(headers={"x-mandate-agent": "billing-agent"}),
        table(rev()),
        ALLOWED,
        "literature-search.allow[0]",
        "",
        id="header-cannot-borrow-a-revocation",
    ),
    # attribution failures keep their own code, even with a revoked or unknown table
    pytest.param(
        view(configured_agent=None),
        table(rev(ALL_AGENTS)),
        Code.UNATTRIBUTED,
        "",
        "",
        id="unattributed-star",
    ),
    pytest.param(
        view(configured_agent=None),
        table(complete=False),
        Code.UNATTRIBUTED,
        "",
        "",
        id="unattributed-incomplete",
    ),
    pytest.param(
        view(context_extensions={"agent": "research-agent"}),
        table(rev()),
        Code.IDENTITY_CONFLICT,
        "",
        "",
        id="conflict-revoked",
    ),
    pytest.param(
        view(configured_agent="ghost"),
        table(rev("ghost")),
        Code.UNKNOWN_AGENT,
        "",
        "",
        id="unknown-agent-revoked",
    ),
    pytest.param(
        view(configured_agent="ghost"),
        table(complete=False),
        Code.UNKNOWN_AGENT,
        "",
        "",
        id="unknown-agent-incomplete",
    ),
]


@pytest.mark.parametrize(("request_", "revocations", "code", "rule", "reason"), CASES)
def test_decide_with_revocations(
    request_: RequestView, revocations: RevocationTable, code: str, rule: str, reason: str
) -> None:
    d = decide(SNAPSHOT, request_, NOW, revocations)
    assert (d.allowed, d.code, d.rule) == (code == ALLOWED, code, rule)
    assert reason in d.reason
    assert decide(SNAPSHOT, request_, NOW, revocations) == d


def test_revoked_decision_carries_the_agent_but_no_purpose() -> None:
    d = decide(SNAPSHOT, view(headers={"x-mandate-purpose": "report"}), NOW, table(rev()))
    assert (d.allowed, d.code, d.reason, d.rule) == (
        False,
        REVOKED,
        "revoked: incident 42",
        "admin:agents/billing-agent",
    )
    assert (d.agent, d.owner, d.identity_source, d.method) == (
        "billing-agent",
        "finance-platform",
        "sidecar-config",
        "GET",
    )
    assert (d.purpose, d.host, d.port, d.path) == ("", "", 0, "")


def test_revocation_follows_now() -> None:
    t = table(rev(expires_at=NOW + 60))
    assert decide(SNAPSHOT, view(), NOW + 59.9, t).code == REVOKED
    assert decide(SNAPSHOT, view(), NOW + 60, t).code == ALLOWED


def test_own_revocation_reason_wins_over_star() -> None:
    t = table(rev(ALL_AGENTS, reason="everyone"), rev(reason="just billing"))
    assert decide(SNAPSHOT, view(), NOW, t).reason == "revoked: just billing"
    assert decide(SNAPSHOT, research(), NOW, t).reason == "revoked: everyone"
