"""The supervisor's context store: tasks, elevation requests, approvals and grants, published
to the shared context table that workers read, persisted across restarts, every step audited.

Profiles: tests/fixtures/profiles/agents.yaml (billing-agent: elevation `refund`, approval
operator, maxDuration 10m, justification required) plus an auto elevation added here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.core import load_profiles
from sidecar.core.agentstate import AgentStateTable, Approval, Grant, RiskState, TaskBinding
from sidecar.core.decide import RequestView, decide
from sidecar.errors import AgentStateError, ConfigError, StateWriteError
from sidecar.state.agentstate import (
    MAX_FINISHED_PER_AGENT,
    MAX_TASKS_PER_AGENT,
    MAX_TTL,
    AgentStateStore,
)
from sidecar.state.shm import SharedAgentState
from sidecar.telemetry import metrics

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
NS = "agents"
T0 = 1_700_000_000.0

AUTO = """
  elevations:
    read-audit:
      approval: auto
      maxDuration: 2m
      allow:
        - hosts: [audit.finance.svc.cluster.local]
          methods: [GET]
    refund:
"""


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    d = tmp_path / "profiles"
    d.mkdir()
    text = (FIXTURES / "agents.yaml").read_text()
    text = text.replace(
        "\n  elevations:                         # temporary extra rights, asked for at run time\n    refund:\n",
        AUTO,
        1,
    )
    (d / "agents.yaml").write_text(text)
    return d


class Harness:
    def __init__(self, tmp: Path, profiles: Path) -> None:
        self.tmp = tmp
        self.snapshot = load_profiles(profiles)
        self.clock = Clock()
        self.events: list[dict[str, Any]] = []
        self.shared = SharedAgentState.create(tmp / "ctx")
        self.reader = SharedAgentState.attach(tmp / "ctx")
        self.state = tmp / "context.json"
        self.store = self.new_store()

    def new_store(self) -> AgentStateStore:
        return AgentStateStore(
            self.shared,
            self.state,
            lambda: self.snapshot,
            clock=self.clock,
            audit=self.events.append,
        )

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.events]


@pytest.fixture
def h(tmp_path: Path, profiles: Path) -> Harness:
    return Harness(tmp_path, profiles)


def test_auto_elevation_is_granted_at_once_and_published(h: Harness) -> None:
    req = h.store.request_elevation("billing-agent", NS, "read-audit", "", None)
    assert req.state == "granted" and req.approver == "auto"
    assert req.expires_at == T0 + 120
    table = h.reader.read()
    (g,) = table.active_grants(NS, "billing-agent", T0)
    assert (g.elevation, g.expires_at, g.request_id) == ("read-audit", T0 + 120, req.id)
    assert table.active_grants(NS, "billing-agent", T0 + 120) == ()  # ends exactly on time
    assert h.kinds() == ["elevation_requested", "elevation_granted"]


def test_operator_elevation_stays_pending_until_approved(h: Harness) -> None:
    req = h.store.request_elevation("billing-agent", NS, "refund", "INV-7 owed a refund", 300)
    assert req.state == "pending" and req.approval == "operator"
    assert h.reader.read().active_grants(NS, "billing-agent", T0) == ()
    h.clock.t += 5
    state, _, gid, expires = h.store.approve(Approval(
        key="admin:x", agent="billing-agent", namespace=NS, elevation="refund",
        approver="alice", approved_at=h.clock.t, request_id=req.id, source="admin", name=req.id,
    ))  # fmt: skip
    assert state == "Granted" and gid and expires == T0 + 5 + 300
    (g,) = h.reader.read().active_grants(NS, "billing-agent", h.clock.t)
    assert g.approver == "alice (mandate approve)" and g.justification == "INV-7 owed a refund"
    assert h.store.request(req.id).state == "granted"  # type: ignore[union-attr]
    granted = [e for e in h.events if e["type"] == "elevation_granted"]
    assert granted and granted[0]["approver"] == "alice (mandate approve)"
    assert granted[0]["justification"] == "INV-7 owed a refund"


@pytest.mark.parametrize(
    ("elevation", "justification", "duration", "status", "match"),
    [
        ("refund", "", None, "FAILED_PRECONDITION", "requires a justification"),
        ("refund", "   ", None, "FAILED_PRECONDITION", "requires a justification"),
        ("refund", "why", 601, "INVALID_ARGUMENT", "exceeds maxDuration 10m"),
        ("refund", "why", -1, "INVALID_ARGUMENT", "positive"),
        ("refund", "why", float("nan"), "INVALID_ARGUMENT", "positive"),
        ("refund", "x" * 1025, None, "INVALID_ARGUMENT", "at most 1024"),
        ("refund", "why", 1e300, "INVALID_ARGUMENT", "positive"),
        ("refund", "why", float("inf"), "INVALID_ARGUMENT", "positive"),
        ("nope", "why", None, "NOT_FOUND", "no elevation 'nope'"),
    ],
)
def test_bad_requests_are_refused_clearly(
    h: Harness, elevation: str, justification: str, duration: float | None, status: str, match: str
) -> None:
    with pytest.raises(AgentStateError, match=match) as exc:
        h.store.request_elevation("billing-agent", NS, elevation, justification, duration)
    assert exc.value.status == status
    assert h.store.requests() == []


def test_unknown_agent_is_refused(h: Harness) -> None:
    with pytest.raises(AgentStateError, match="no profile") as exc:
        h.store.request_elevation("ghost", NS, "refund", "why", None)
    assert exc.value.status == "FAILED_PRECONDITION"


def test_pending_requests_are_bounded_per_agent(h: Harness) -> None:
    for _ in range(8):
        h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    with pytest.raises(AgentStateError) as exc:
        h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    assert exc.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"request_id": "elev-nope"}, "no elevation request"),
        ({"agent": "research-agent"}, "not what this approval names|no elevation"),
        ({"elevation": "read-audit"}, "not what this approval names"),
        ({"duration": 3600.0}, "exceeds maxDuration"),
        ({"agent": "ghost"}, "no profile"),
    ],
)
def test_invalid_approvals_grant_nothing(h: Harness, change: dict[str, Any], match: str) -> None:
    req = h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    fields: dict[str, Any] = {
        "key": "kubernetes:agents/a1",
        "agent": "billing-agent",
        "namespace": NS,
        "elevation": "refund",
        "approver": "bob",
        "approved_at": T0,
        "request_id": req.id,
        "name": "a1",
    }
    fields.update(change)
    state, message, gid, _ = h.store.approve(Approval(**fields))
    assert state == "Invalid" and gid == ""
    import re

    assert re.search(match, message), message
    assert h.reader.read().active_grants(NS, "billing-agent", T0) == ()


def test_an_approval_is_idempotent_and_its_removal_ends_the_grant(h: Harness) -> None:
    req = h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    a = Approval(
        key="kubernetes:agents/a1",
        agent="billing-agent",
        namespace=NS,
        elevation="refund",
        approver="bob",
        approved_at=T0,
        request_id=req.id,
        name="a1",
    )
    first = h.store.approve(a)
    again = h.store.approve(a)
    assert first == again and first[0] == "Granted"
    assert first[3] == T0 + 600  # the request asked for maxDuration
    h.store.remove_approval(a.key)
    assert h.reader.read().active_grants(NS, "billing-agent", T0) == ()
    assert h.kinds()[-1] == "elevation_withdrawn"


def test_a_direct_approval_without_a_request_grants(h: Harness) -> None:
    a = Approval(
        key="kubernetes:agents/a2",
        agent="billing-agent",
        namespace=NS,
        elevation="refund",
        approver="bob",
        approved_at=T0 - 30,
        duration=60.0,
        reason="ticket 9",
        name="a2",
    )
    state, _, gid, expires = h.store.approve(a)
    assert state == "Granted" and expires == T0 + 30
    (g,) = h.reader.read().active_grants(NS, "billing-agent", T0)
    assert (
        g.id == gid and g.justification == "ticket 9" and "AgentElevation agents/a2" in g.approver
    )


def test_replace_approvals_withdraws_what_is_gone(h: Harness) -> None:
    a = Approval(
        key="kubernetes:agents/a2",
        agent="billing-agent",
        namespace=NS,
        elevation="refund",
        approver="bob",
        approved_at=T0,
        duration=60.0,
        name="a2",
    )
    h.store.replace_approvals("kubernetes", [a])
    assert len(h.reader.read().active_grants(NS, "billing-agent", T0)) == 1
    h.store.replace_approvals("kubernetes", [])
    assert h.reader.read().active_grants(NS, "billing-agent", T0) == ()


def test_prune_expires_grants_pending_requests_and_tasks_with_audit(h: Harness) -> None:
    h.store.request_elevation("billing-agent", NS, "read-audit", "", 10)
    pending = h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    h.store.report_task("billing-agent", NS, "T-1", "report", 5)
    h.clock.t += 11
    assert h.store.prune() == 2  # the grant and the task
    assert "elevation_expired" in h.kinds()
    table = h.reader.read()
    assert table.grants == () and table.tasks == ()
    h.clock.t += 3600
    h.store.prune()
    assert h.store.request(pending.id).state == "expired"  # type: ignore[union-attr]
    assert h.kinds()[-1] == "elevation_lapsed"


@pytest.mark.parametrize("pruned", [False, True], ids=["before-prune", "after-prune"])
def test_an_approval_after_the_request_lapsed_is_expired_and_grants_nothing(
    h: Harness, pruned: bool
) -> None:
    req = h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    assert req.expires_at is not None
    h.clock.t = req.expires_at + 1  # the operator approves one second too late
    if pruned:
        h.store.prune()
    state, message, grant, until = h.store.approve(
        Approval(
            key="kubernetes:agents/late",
            agent="billing-agent",
            namespace=NS,
            elevation="refund",
            approver="bob",
            approved_at=h.clock.t,
            request_id=req.id,
            name="late",
        )
    )
    assert (state, grant, until) == ("Expired", "", None)
    assert f"request {req.id} expired at " in message and "nothing is granted" in message
    assert h.reader.read().active_grants(NS, "billing-agent", h.clock.t) == ()
    assert "elevation_granted" not in h.kinds()


def test_tasks_are_checked_and_bounded(h: Harness) -> None:
    b = h.store.report_task("billing-agent", NS, "T-1", "report", None)
    assert b.purpose == "report" and b.expires_at is None
    assert h.reader.read().task(NS, "billing-agent", "T-1", T0 + 1e6) is not None
    with pytest.raises(AgentStateError, match="unknown purpose") as exc:
        h.store.report_task("billing-agent", NS, "T-2", "refunds", None)
    assert exc.value.status == "NOT_FOUND"
    for bad in ("", "has space", "x" * 129, "é"):
        with pytest.raises(AgentStateError, match="task_id"):
            h.store.report_task("billing-agent", NS, bad, "report", None)
    with pytest.raises(AgentStateError, match="ttl"):
        h.store.report_task("billing-agent", NS, "T-3", "report", 0)
    unpersisted = AgentStateStore(h.shared, None, lambda: h.snapshot, clock=h.clock)
    for i in range(100):
        h.clock.t += 0.001
        unpersisted.report_task("billing-agent", NS, f"bulk-{i}", "report", None)
    kept = unpersisted.tasks(NS, "billing-agent")
    assert len(kept) == MAX_TASKS_PER_AGENT == 64
    assert kept[0].task == "bulk-36" and kept[-1].task == "bulk-99"  # its own oldest went


def test_state_survives_a_restart(h: Harness) -> None:
    req = h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    h.store.approve(
        Approval(
            key="admin:r",
            agent="billing-agent",
            namespace=NS,
            elevation="refund",
            approver="al",
            approved_at=T0,
            request_id=req.id,
            source="admin",
        )
    )
    h.store.report_task("billing-agent", NS, "T-1", "report", None)
    restarted = h.new_store()
    assert restarted.load_persisted() == 3
    table = h.reader.read()
    assert len(table.active_grants(NS, "billing-agent", T0)) == 1
    assert table.task(NS, "billing-agent", "T-1", T0) is not None


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"version": 99}),
        json.dumps({"version": 1, "grants": [{"id": "g"}]}),
    ],
)
def test_a_corrupt_state_file_is_refused_naming_the_file(h: Harness, content: str) -> None:
    h.state.write_text(content)
    with pytest.raises(ConfigError, match=r"context\.json"):
        h.new_store().load_persisted()


def test_reader_of_an_overflowed_table_sees_no_rights_and_maximum_risk(
    tmp_path: Path, profiles: Path
) -> None:
    """Only when not even the risk scores fit: the readers fail closed on every count
    (no grant, no task, risk deny), where before the risk became unknown (no risk deny)."""
    h = Harness(tmp_path, profiles)
    small = SharedAgentState.create(tmp_path / "small", size=600)
    reader = SharedAgentState.attach(tmp_path / "small")
    tasks = [TaskBinding("billing-agent", NS, f"task-{i}", "report", T0) for i in range(20)]
    small.write(AgentStateTable.build(0, (), tasks, ()))
    assert small.overflowed
    table = reader.read()
    assert table.tasks == () and table.active_grants(NS, "billing-agent", T0) == ()
    risk = table.risk(NS, "billing-agent")
    assert risk is not None and risk.score == 1.0 and not risk.learning
    view = RequestView(
        decision_id="d1", method="GET", authority="ledger.finance.svc.cluster.local",
        path="/v1/invoices/7", configured_agent="billing-agent", namespace=NS,
    )  # fmt: skip
    assert decide(h.snapshot, view, T0).allowed  # the call itself is allowed...
    denied = decide(h.snapshot, view, T0, agent_state=table)
    assert (denied.allowed, denied.code) == (False, "risk")  # ...but not with risk unknown


# -- issue 15, finding 2: everything an agent can create is bounded -------------------------

LONG = "x" * 1024


def test_repeated_auto_requests_store_nothing_new(h: Harness) -> None:
    first = h.store.request_elevation("billing-agent", NS, "read-audit", LONG, None)
    for _ in range(2000):  # the review's flood: ~1,900 filled the table
        again = h.store.request_elevation("billing-agent", NS, "read-audit", LONG, None)
        assert again == first  # the same request: not a new one, not extended
    assert len(h.store.grants()) == 1 and len(h.store.requests()) == 1
    assert h.kinds() == ["elevation_requested", "elevation_granted"]
    assert h.state.stat().st_size < 8 * 1024
    # Once it has run out, the agent may ask again: a new grant.
    h.clock.t = (first.expires_at or 0) + 1
    h.store.prune()
    renewed = h.store.request_elevation("billing-agent", NS, "read-audit", "", None)
    assert renewed.id != first.id and renewed.state == "granted"


def test_finished_requests_are_bounded_per_agent(h: Harness) -> None:
    for _ in range(100):
        h.store.request_elevation("billing-agent", NS, "read-audit", LONG, 1)
        h.clock.t += 2
        h.store.prune()  # the grant expires: its request is finished
    finished = [r for r in h.store.requests() if r.state == "expired"]
    assert len(finished) <= MAX_FINISHED_PER_AGENT
    assert h.state.stat().st_size < 64 * 1024


def test_one_agent_flooding_within_its_bounds_fits_the_default_table(h: Harness) -> None:
    for i in range(1000):
        h.clock.t += 0.001
        h.store.report_task("billing-agent", NS, f"{i:04d}" + "t" * 124, "report", None)
        h.store.request_elevation("billing-agent", NS, "read-audit", LONG, None)
    h.store.report_task("research-agent", NS, "lit-1", "tool-use", None)
    table = h.reader.read()
    assert table.complete and len(table.tasks) == MAX_TASKS_PER_AGENT + 1
    assert table.task(NS, "research-agent", "lit-1", h.clock.t) is not None
    assert len(table.active_grants(NS, "billing-agent", h.clock.t)) == 1
    health = h.store.health()
    assert health["table"]["withheld"] == [] and not health["table"]["overflow"]
    assert health["table"]["bytes"] < 64 * 1024  # of 4 MiB: ~65 agents at their worst fit


def test_a_full_table_withholds_only_the_agent_that_fills_it(
    tmp_path: Path, profiles: Path
) -> None:
    h = Harness(tmp_path, profiles)
    small = SharedAgentState.create(tmp_path / "small", size=4096)
    reader = SharedAgentState.attach(tmp_path / "small")
    store = AgentStateStore(small, h.state, lambda: h.snapshot, clock=h.clock)
    store.load_persisted()
    store.set_risks(
        [RiskState("billing-agent", NS, 0.5, "new hosts"), RiskState("research-agent", NS, 0.1)]
    )
    store.report_task("research-agent", NS, "lit-1", "tool-use", None)
    refused = 0
    for i in range(64):
        h.clock.t += 0.001
        try:
            store.report_task("billing-agent", NS, f"{i:04d}" + "t" * 124, "report", None)
        except AgentStateError as exc:
            assert exc.status == "RESOURCE_EXHAUSTED" and "table is full" in str(exc)
            refused += 1
    assert refused  # the flood hit the table: refused, not stored unseen...
    table = reader.read()
    assert table.task(NS, "research-agent", "lit-1", h.clock.t) is not None  # ...others unhurt
    stored = store.tasks(NS, "billing-agent")
    assert stored and all(table.task(NS, "billing-agent", t.task, h.clock.t) for t in stored)
    # The other agent's next change still fits: the agent with the largest share is withheld.
    store.report_task("research-agent", NS, "lit-2" + "r" * 120, "tool-use", None)
    table = reader.read()
    assert table.task(NS, "research-agent", "lit-1", h.clock.t) is not None
    assert table.task(NS, "research-agent", "lit-2" + "r" * 120, h.clock.t) is not None
    assert table.task(NS, "billing-agent", stored[0].task, h.clock.t) is None  # fail closed
    billing_risk = table.risk(NS, "billing-agent")  # risk scores are never withheld
    assert billing_risk is not None and billing_risk.score == 0.5
    assert store.health()["table"]["withheld"] == [f"{NS}/billing-agent"]
    # Explain decides on the store's table: as the workers see it, without the withheld
    explained = store.table()
    assert explained.task(NS, "billing-agent", stored[0].task, h.clock.t) is None
    assert (NS, "billing-agent") in explained.withheld
    assert explained.task(NS, "research-agent", "lit-1", h.clock.t) is not None
    sample = metrics.REGISTRY.get_sample_value(
        "mandate_context_withheld", {"agent": "billing-agent"}
    )
    assert sample == 1.0
    with pytest.raises(AgentStateError) as exc:
        store.report_task("billing-agent", NS, "more", "report", None)
    assert exc.value.status == "RESOURCE_EXHAUSTED"
    # Its tasks end: it has room again.
    for t in stored:
        store._tasks.discard((NS, "billing-agent", t.task))  # as if they had expired
    store.report_task("billing-agent", NS, "after", "report", None)
    assert store.health()["table"]["withheld"] == []
    assert reader.read().task(NS, "billing-agent", "after", h.clock.t) is not None
    assert (
        metrics.REGISTRY.get_sample_value("mandate_context_withheld", {"agent": "billing-agent"})
        == 0.0
    )


def test_a_state_file_from_before_the_bounds_is_trimmed_at_load(h: Harness) -> None:
    grants = [
        Grant(f"grant-{i}", "billing-agent", NS, "read-audit", T0 - 10, T0 + 100 + i, "auto",
              "x" * 2000, "auto", f"elev-{i}").as_dict()
        for i in range(1900)
    ]  # fmt: skip
    requests = [
        {"id": f"elev-{i}", "agent": "billing-agent", "namespace": NS, "elevation": "read-audit",
         "justification": "x" * 2000, "requested_at": T0 - 10, "duration": 120.0,
         "state": "granted", "approval": "auto", "grant_id": f"grant-{i}",
         "expires_at": T0 + 100 + i, "approver": "auto"}
        for i in range(1900)
    ]  # fmt: skip
    tasks = [
        TaskBinding("billing-agent", NS, f"t-{i}", "report", T0 - i).as_dict() for i in range(500)
    ]
    doc = {"version": 1, "tasks": tasks, "requests": requests, "grants": grants, "approvals": {}}
    h.state.write_text(json.dumps(doc))
    store = h.new_store()
    assert store.load_persisted() == MAX_TASKS_PER_AGENT + 2
    (g,) = store.grants()
    assert g.id == "grant-1899"  # the one that lasts longest
    assert len(h.reader.read().tasks) == MAX_TASKS_PER_AGENT
    assert h.state.stat().st_size < 64 * 1024  # rewritten trimmed


# -- issue 15, finding 3: numbers are checked before anything is stored, and nothing is
# stored unless it is also audited and persisted ---------------------------------------------


@pytest.mark.parametrize("ttl", [1e300, float("inf"), float("nan"), -1.0, MAX_TTL + 1])
def test_a_ttl_that_is_not_a_sane_number_of_seconds_stores_nothing(h: Harness, ttl: float) -> None:
    with pytest.raises(AgentStateError, match="ttl") as exc:
        h.store.report_task("billing-agent", NS, "INC-1", "report", ttl)
    assert exc.value.status == "INVALID_ARGUMENT"
    assert h.store.tasks(NS, "billing-agent") == [] and h.reader.read().tasks == ()
    assert h.events == [] and not h.state.exists()


def test_the_longest_ttl_is_accepted_and_audited(h: Harness) -> None:
    b = h.store.report_task("billing-agent", NS, "INC-1", "report", MAX_TTL)
    assert b.expires_at == T0 + MAX_TTL
    assert h.kinds() == ["task_reported"] and h.events[0]["expires"]


class AuditDown(Exception):
    pass


def test_nothing_is_stored_when_its_audit_record_cannot_be_written(h: Harness) -> None:
    def fail(_: dict[str, Any]) -> None:
        raise AuditDown("audit refused the record")

    h.store._audit = fail
    with pytest.raises(AuditDown):
        h.store.report_task("billing-agent", NS, "INC-1", "report", 60)
    with pytest.raises(AuditDown):
        h.store.request_elevation("billing-agent", NS, "read-audit", "", None)
    assert h.store.tasks(NS, "billing-agent") == [] and h.store.grants() == []
    assert h.store.requests() == []
    table = h.reader.read()
    assert table.tasks == () and table.grants == ()
    assert not h.state.exists() or json.loads(h.state.read_text())["tasks"] == []
    restarted = h.new_store()
    restarted.load_persisted()
    assert restarted.tasks(NS, "billing-agent") == [] and restarted.grants() == []


def test_an_unwritable_state_file_fails_every_change_and_undoes_it(h: Harness) -> None:
    blocker = h.tmp / "state-dir"
    blocker.write_text("a file where the state directory should be")  # ENOTDIR, even as root
    store = AgentStateStore(
        h.shared, blocker / "context.json", lambda: h.snapshot, clock=h.clock,
        audit=h.events.append,
    )  # fmt: skip
    # The agent's change: UNAVAILABLE, nothing stored.
    with pytest.raises(AgentStateError) as exc:
        store.report_task("billing-agent", NS, "INC-1", "report", 60)
    assert exc.value.status == "UNAVAILABLE"
    assert store.tasks(NS, "billing-agent") == [] and h.reader.read().tasks == ()
    # An operator's approval: StateWriteError (the admin API answers 500), nothing granted.
    approval = Approval(
        key="admin:x", agent="billing-agent", namespace=NS, elevation="refund", approver="al",
        approved_at=T0, duration=60.0, source="admin", name="x",
    )  # fmt: skip
    with pytest.raises(StateWriteError, match=r"context\.json"):
        store.approve(approval)
    assert store.grants() == [] and store.requests() == []
    assert h.reader.read().active_grants(NS, "billing-agent", T0) == ()
    assert h.events == []  # nothing audited as granted
    persistence = store.health()["persistence"]
    assert persistence["durable"] is False and persistence["failures"] == 2
    assert "Not a directory" in persistence["error"]
    durable = metrics.REGISTRY.get_sample_value("mandate_state_durable", {"file": "context"})
    assert durable == 0.0
    # The volume is fixed: the next change is durable, and so says health.
    blocker.unlink()
    blocker.mkdir()
    state, *_ = store.approve(approval)
    assert state == "Granted" and store.health()["persistence"]["durable"] is True
    assert metrics.REGISTRY.get_sample_value("mandate_state_durable", {"file": "context"}) == 1.0


def test_a_failed_write_after_expiry_keeps_the_expiry_and_is_retried(h: Harness) -> None:
    h.store.request_elevation("billing-agent", NS, "read-audit", "", 10)
    h.state.unlink()
    h.state.mkdir()  # the file can no longer be replaced
    h.clock.t += 11
    h.store.prune()
    assert h.store.grants() == []  # rights taken away stay taken away
    assert h.reader.read().active_grants(NS, "billing-agent", h.clock.t) == ()
    assert h.store.health()["persistence"]["durable"] is False
    h.state.rmdir()
    h.store._published._retry_at = 0.0  # the retry is due
    h.store.prune()
    assert h.store.health()["persistence"]["durable"] is True
    assert json.loads(h.state.read_text())["grants"] == []


def test_an_agent_over_its_fair_share_cannot_push_another_out(
    tmp_path: Path, profiles: Path
) -> None:
    """A full table withholds the agents with the largest share, so an agent could grow
    until a larger one, doing its work, lost its grants and tasks (review F2: a denial of
    service on another agent). An agent over its fair share (the capacity over the agents
    in the table) may not: its change is refused; one within its share may."""
    h = Harness(tmp_path, profiles)
    small = SharedAgentState.create(tmp_path / "small", size=4096)
    reader = SharedAgentState.attach(tmp_path / "small")
    store = AgentStateStore(small, h.state, lambda: h.snapshot, clock=h.clock)
    store.load_persisted()
    big, little = ("team-a", "research-agent"), ("team-b", "research-agent")
    for i in range(9):  # the larger agent at work: under half of the table
        store.report_task(big[1], big[0], f"{i:04d}" + "r" * 120, "tool-use", None)
    store.report_task(little[1], little[0], "lit-1", "tool-use", None)
    refusal = ""
    for i in range(64):  # another agent grows until it is refused
        h.clock.t += 0.001
        try:
            store.report_task("billing-agent", NS, f"{i:04d}" + "t" * 120, "report", None)
        except AgentStateError as exc:
            assert exc.status == "RESOURCE_EXHAUSTED"
            refusal = str(exc)
            break
        table = reader.read()
        assert all(table.task(big[0], big[1], t.task, h.clock.t) for t in store.tasks(*big))
    assert "over its fair share" in refusal and "research-agent" in refusal, refusal
    assert store.health()["table"]["withheld"] == []
    # an agent within its fair share still gets room: the largest (over its share) yields
    store.report_task(little[1], little[0], "lit-2" + "x" * 120, "tool-use", None)
    table = reader.read()
    assert table.task(little[0], little[1], "lit-2" + "x" * 120, h.clock.t) is not None
