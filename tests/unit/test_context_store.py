"""The supervisor's context store: tasks, elevation requests, approvals and grants, published
to the shared context table that workers read, persisted across restarts, every step audited.

Profiles: tests/fixtures/profiles/agents.yaml (billing-agent: elevation `refund`, approval
operator, maxDuration 10m, justification required) plus an auto elevation added here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sidecar.context_store import ContextStore
from sidecar.core import load_profiles
from sidecar.core.context import Approval
from sidecar.errors import ConfigError, ContextError
from sidecar.shm import SharedContext

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
        self.shared = SharedContext.create(tmp / "ctx")
        self.reader = SharedContext.attach(tmp / "ctx")
        self.state = tmp / "context.json"
        self.store = self.new_store()

    def new_store(self) -> ContextStore:
        return ContextStore(
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
        ("refund", "x" * 2001, None, "INVALID_ARGUMENT", "at most 2000"),
        ("nope", "why", None, "NOT_FOUND", "no elevation 'nope'"),
    ],
)
def test_bad_requests_are_refused_clearly(
    h: Harness, elevation: str, justification: str, duration: float | None, status: str, match: str
) -> None:
    with pytest.raises(ContextError, match=match) as exc:
        h.store.request_elevation("billing-agent", NS, elevation, justification, duration)
    assert exc.value.status == status
    assert h.store.requests() == []


def test_unknown_agent_is_refused(h: Harness) -> None:
    with pytest.raises(ContextError, match="no profile") as exc:
        h.store.request_elevation("ghost", NS, "refund", "why", None)
    assert exc.value.status == "FAILED_PRECONDITION"


def test_pending_requests_are_bounded_per_agent(h: Harness) -> None:
    for _ in range(8):
        h.store.request_elevation("billing-agent", NS, "refund", "why", None)
    with pytest.raises(ContextError) as exc:
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
    with pytest.raises(ContextError, match="unknown purpose") as exc:
        h.store.report_task("billing-agent", NS, "T-2", "refunds", None)
    assert exc.value.status == "NOT_FOUND"
    for bad in ("", "has space", "x" * 129, "é"):
        with pytest.raises(ContextError, match="task_id"):
            h.store.report_task("billing-agent", NS, bad, "report", None)
    with pytest.raises(ContextError, match="ttl"):
        h.store.report_task("billing-agent", NS, "T-3", "report", 0)
    unpersisted = ContextStore(h.shared, None, lambda: h.snapshot, clock=h.clock)
    for i in range(1005):
        h.clock.t += 0.001
        unpersisted.report_task("billing-agent", NS, f"bulk-{i}", "report", None)
    assert len(unpersisted.tasks(NS, "billing-agent")) == 1000


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


def test_reader_sees_an_empty_context_when_the_table_overflows(
    tmp_path: Path, profiles: Path
) -> None:
    h = Harness(tmp_path, profiles)
    small = SharedContext.create(tmp_path / "small", size=600)
    store = ContextStore(small, None, lambda: h.snapshot, clock=h.clock)
    reader = SharedContext.attach(tmp_path / "small")
    for i in range(20):
        store.report_task("billing-agent", NS, f"task-{i}", "report", None)
    assert small.overflowed
    assert reader.read().tasks == ()
    shutil.rmtree(tmp_path / "profiles", ignore_errors=True)
