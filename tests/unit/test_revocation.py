"""Revocation and RevocationTable (pure): lookup by (namespace, agent) then `*`, expiry at
`now`, the complete flag, and the dict form the shared table and the state file use."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core.revocation import (
    ALL_AGENTS,
    EMPTY_TABLE,
    Revocation,
    RevocationTable,
    make_key,
)

NOW = 1_700_000_000.0
NS = "agents"


def rev(
    agent: str = "billing-agent",
    namespace: str = NS,
    *,
    source: str = "admin",
    name: str = "",
    reason: str = "",
    expires_at: float | None = None,
) -> Revocation:
    name = name or agent
    return Revocation(
        key=make_key(source, namespace, name),
        agent=agent,
        namespace=namespace,
        reason=reason or f"stop {agent}",
        source=source,
        name=name,
        expires_at=expires_at,
        created_at=NOW - 100,
    )


def test_make_key() -> None:
    assert make_key("kubernetes", "agents", "stop-billing") == "kubernetes:agents/stop-billing"


def test_active_is_strictly_before_expiry() -> None:
    r = rev(expires_at=NOW)
    assert r.active(NOW - 0.001)
    assert not r.active(NOW)
    assert not r.active(NOW + 1)
    assert rev(expires_at=None).active(1e18)


FIND_CASES = [
    pytest.param([], NS, "billing-agent", None, id="empty"),
    pytest.param([rev()], NS, "billing-agent", "admin:agents/billing-agent", id="own-agent"),
    pytest.param([rev()], NS, "research-agent", None, id="other-agent-not-revoked"),
    pytest.param(
        [rev(ALL_AGENTS, name="all")], NS, "research-agent", "admin:agents/all", id="star"
    ),
    pytest.param(
        [rev(ALL_AGENTS, name="all"), rev()],
        NS,
        "billing-agent",
        "admin:agents/billing-agent",
        id="own-before-star",
    ),
    pytest.param([rev(namespace="ops")], NS, "billing-agent", None, id="other-namespace"),
    pytest.param(
        [rev(ALL_AGENTS, "ops", name="all")], NS, "billing-agent", None, id="other-namespace-star"
    ),
    pytest.param(
        [rev(namespace="ops")], "ops", "billing-agent", "admin:ops/billing-agent", id="ns-ops"
    ),
    pytest.param([rev(expires_at=NOW)], NS, "billing-agent", None, id="expires-exactly-now"),
    pytest.param(
        [rev(expires_at=NOW + 0.5)],
        NS,
        "billing-agent",
        "admin:agents/billing-agent",
        id="not-yet-expired",
    ),
    pytest.param([rev(expires_at=NOW - 1)], NS, "billing-agent", None, id="expired"),
    pytest.param(
        [rev(name="a-old", expires_at=NOW - 1), rev(name="b-new", expires_at=NOW + 60)],
        NS,
        "billing-agent",
        "admin:agents/b-new",
        id="two-entries-one-expired",
    ),
    pytest.param(
        [rev(name="a-new", expires_at=NOW + 60), rev(name="b-old", expires_at=NOW - 1)],
        NS,
        "billing-agent",
        "admin:agents/a-new",
        id="two-entries-other-order",
    ),
    pytest.param(
        [rev(expires_at=NOW - 1), rev(ALL_AGENTS, name="all")],
        NS,
        "billing-agent",
        "admin:agents/all",
        id="own-expired-star-active",
    ),
    pytest.param(
        [rev(source="kubernetes", name="stop"), rev(source="admin")],
        NS,
        "billing-agent",
        "admin:agents/billing-agent",
        id="two-sources-first-key-wins",
    ),
    pytest.param([rev("*", name="all")], NS, "*", "admin:agents/all", id="literal-star-agent"),
]


@pytest.mark.parametrize(("entries", "namespace", "agent", "key"), FIND_CASES)
def test_find(entries: list[Revocation], namespace: str, agent: str, key: str | None) -> None:
    table = RevocationTable.build(3, entries)
    found = table.find(namespace, agent, NOW)
    assert (found.key if found else None) == key


def test_build_sorts_by_key_and_counts() -> None:
    entries = [rev("z-agent"), rev("a-agent"), rev(ALL_AGENTS, name="all")]
    table = RevocationTable.build(7, entries, complete=False)
    assert [r.key for r in table.entries] == sorted(r.key for r in entries)
    assert (table.generation, len(table), table.complete) == (7, 3, False)


def test_complete_flag_does_not_change_find() -> None:
    # `decide` checks `complete`; `find` still answers from what is there.
    table = RevocationTable.build(1, [rev()], complete=False)
    assert not table.complete
    assert table.find(NS, "billing-agent", NOW) == rev()
    assert RevocationTable.build(1, [rev()]).complete


def test_empty_table() -> None:
    assert EMPTY_TABLE.complete
    assert len(EMPTY_TABLE) == 0
    assert EMPTY_TABLE.find(NS, "billing-agent", NOW) is None


def test_tables_compare_by_content_not_index() -> None:
    assert RevocationTable.build(1, [rev()]) == RevocationTable.build(1, [rev()])


@pytest.mark.parametrize(
    "r",
    [
        rev(),
        rev(ALL_AGENTS, name="all", expires_at=NOW + 3600.5),
        Revocation("k", "a", "n", "r\u00e9ason \u2603", "kubernetes", "nm", 1.0, 2.0, "uid-1"),
    ],
    ids=["plain", "star-expiring", "all-fields-unicode"],
)
def test_dict_round_trip(r: Revocation) -> None:
    d = r.as_dict()
    assert set(d) == {
        "key",
        "agent",
        "namespace",
        "reason",
        "source",
        "name",
        "expires_at",
        "created_at",
        "uid",
    }
    assert Revocation.from_dict(d) == r


def test_from_dict_defaults_optional_fields() -> None:
    r = Revocation.from_dict(
        {"key": "k", "agent": "a", "namespace": "n", "reason": "r", "source": "admin"}
    )
    assert (r.name, r.expires_at, r.created_at, r.uid) == ("", None, 0.0, "")


GOOD: dict[str, Any] = {
    "key": "k",
    "agent": "a",
    "namespace": "n",
    "reason": "r",
    "source": "admin",
}


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param({k: v for k, v in GOOD.items() if k != "key"}, KeyError, id="no-key"),
        pytest.param({k: v for k, v in GOOD.items() if k != "agent"}, KeyError, id="no-agent"),
        pytest.param({k: v for k, v in GOOD.items() if k != "namespace"}, KeyError, id="no-ns"),
        pytest.param({k: v for k, v in GOOD.items() if k != "reason"}, KeyError, id="no-reason"),
        pytest.param({k: v for k, v in GOOD.items() if k != "source"}, KeyError, id="no-source"),
        pytest.param({**GOOD, "expires_at": "soon"}, ValueError, id="expires-not-a-number"),
        pytest.param({**GOOD, "expires_at": [1]}, TypeError, id="expires-a-list"),
        pytest.param({**GOOD, "created_at": "x"}, ValueError, id="created-not-a-number"),
        pytest.param({**GOOD, "created_at": None}, TypeError, id="created-null"),
        pytest.param({}, KeyError, id="empty"),
        pytest.param("not a dict", TypeError, id="a-string"),
        pytest.param(["key", "agent"], TypeError, id="a-list"),
        pytest.param(None, TypeError, id="null"),
    ],
)
def test_from_dict_rejects_bad_entries(data: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        Revocation.from_dict(data)
