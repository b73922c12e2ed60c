"""Clock jumps (issue 8): which clock each time-based rule reads, and what a jump does.

- Ends given as instants (a revocation's `expiresAt`, an elevation grant's end) are wall-clock
  times, as Kubernetes writes them: an end at T ends when the wall clock reads T, whatever
  the monotonic clock says. A jump forward past the end ends it; the supervisor's prune then
  removes a grant for good, so a jump back does not revive it. A jump back never ends
  anything early (a Kubernetes revocation whose end has passed is in force again: it errs
  towards denying).
- Rate limits count on the monotonic clock: no wall-clock jump, either way, frees the budget
  early or holds it longer.

Everything runs the Check pipeline (`Authorizer`, as a worker does) with injected clocks.
Profiles: tests/fixtures/profiles/agents.yaml (billing-agent: purpose `reconcile` with a
rate limit, operator elevation `refund`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Code, Decision, RequestView, load_profiles
from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable, Approval
from sidecar.core.ratelimit import RateLimiter
from sidecar.core.revocation import Revocation, RevocationTable, make_key
from sidecar.core.timefmt import parse_rfc3339
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.revocations import RevocationStore
from sidecar.state.shm import SharedAgentState, SharedTable

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
NS = "agents"
HOUR = 3600.0
# An AgentRevocation's `expiresAt` as the API server stores it, and the instant it names.
EXPIRES_AT = "2030-06-01T12:00:00.250+02:00"
T = parse_rfc3339(EXPIRES_AT) or 0.0
INVOICE = {
    "method": "GET",
    "authority": "ledger.finance.svc.cluster.local",
    "path": "/v1/invoices/7",
}
REFUND = {"method": "POST", "authority": "api.stripe.com", "path": "/v1/refunds"}


class Clock:
    """A clock a test sets and jumps."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def check(
    authz: CheckPipeline, call: dict[str, str] = INVOICE, agent: str = "billing-agent"
) -> Decision:
    def view(did: str) -> RequestView:
        return RequestView(
            decision_id=did,
            method=call["method"],
            authority=call["authority"],
            path=call["path"],
            configured_agent=agent,
            namespace=NS,
        )

    return authz.decide(view)[0]


def authorizer(
    wall: Callable[[], float] | None = None,
    revocations: RevocationTable | Callable[[], RevocationTable] | None = None,
    agent_state: Callable[[], AgentStateTable] = lambda: EMPTY_AGENT_STATE,
    limiter: RateLimiter | None = None,
    profiles: Path = FIXTURES,
) -> CheckPipeline:
    table = revocations
    read = table if callable(table) else (lambda: table or RevocationTable())
    snapshot = load_profiles(profiles)
    options: dict[str, Any] = {} if wall is None else {"clock": wall}
    return CheckPipeline(
        lambda: snapshot,
        Identity(agent="billing-agent", namespace=NS),
        revocations=read,
        agent_state=agent_state,
        limiter=limiter,
        **options,
    )


def revocation(name: str, expires_at: float | None, source: str = "kubernetes") -> Revocation:
    return Revocation(
        key=make_key(source, NS, name),
        agent="billing-agent",
        namespace=NS,
        reason=name,
        source=source,
        name=name,
        expires_at=expires_at,
    )


# -- revocations: wall-clock instants ---------------------------------------------------------


def test_a_revocation_ends_when_the_wall_clock_reads_its_expires_at() -> None:
    assert T == 1_906_538_400.25  # 10:00:00.25 UTC
    wall = Clock(T - 0.001)
    authz = authorizer(wall, RevocationTable.build(1, [revocation("inc-1", T)]))
    d = check(authz)
    assert (d.allowed, d.reason) == (False, "revoked: inc-1")
    wall.t = T  # the instant it names: over, to the millisecond
    assert check(authz).allowed


def test_wall_clock_jumps_move_a_revocations_end_with_the_wall_clock() -> None:
    wall = Clock(T - 10)
    authz = authorizer(wall, RevocationTable.build(1, [revocation("inc-1", T)]))
    wall.t -= HOUR  # back: still in force, never ended early
    assert check(authz).code == Code.REVOKED
    wall.t = T + HOUR  # forward past the end: ended
    assert check(authz).allowed
    wall.t = T - HOUR  # back again: the object is still in the table, so in force again
    assert check(authz).code == Code.REVOKED


def test_the_supervisor_prunes_by_the_wall_clock_and_keeps_kubernetes_objects(
    tmp_path: Path,
) -> None:
    """Admin and behaviour revocations are dropped once their end has passed (wall clock);
    an AgentRevocation stays in the table until deleted, in force only before its end."""
    wall = Clock(T - 10)
    store = RevocationStore(SharedTable.create(tmp_path / "table"), None, clock=wall)
    store.mark_complete()
    store.upsert(revocation("admin-1", T, source="admin"))
    store.upsert(revocation("k8s-1", T))
    reader = SharedTable.attach(tmp_path / "table")
    authz = authorizer(wall, reader.read)
    assert store.prune_expired() == 0
    wall.t = T + HOUR  # a jump forward past both ends
    assert store.prune_expired() == 1
    assert [r.name for r in reader.read().entries] == ["k8s-1"]
    assert check(authz).allowed
    wall.t = T - HOUR  # and back: the admin entry is gone, the object is in force again
    d = check(authz)
    assert (d.allowed, d.reason) == (False, "revoked: k8s-1")


def test_the_check_pipeline_reads_the_wall_clock_by_default() -> None:
    """Without an injected clock, a worker's Authorizer and the supervisor's store use the
    wall clock: a revocation whose end passed a minute ago is over, one ending in an hour is
    in force (on the monotonic clock, seconds since boot, both would be in force)."""
    assert time.monotonic() < time.time() - HOUR  # the two clocks are far apart here
    now = time.time()
    over = authorizer(None, RevocationTable.build(1, [revocation("over", now - 60)]))
    assert check(over).allowed
    running = authorizer(None, RevocationTable.build(1, [revocation("running", now + HOUR)]))
    assert check(running).code == Code.REVOKED
    assert inspect.signature(RevocationStore).parameters["clock"].default is time.time
    assert inspect.signature(AgentStateStore).parameters["clock"].default is time.time


# -- elevation grants: wall-clock instants ---------------------------------------------------


def test_a_jump_forward_past_a_grants_end_ends_it_for_good(tmp_path: Path) -> None:
    wall = Clock(T)
    snapshot = load_profiles(FIXTURES)
    store = AgentStateStore(
        SharedAgentState.create(tmp_path / "ctx"), None, lambda: snapshot, clock=wall
    )
    reader = SharedAgentState.attach(tmp_path / "ctx")
    state, _, _, end = store.approve(Approval(
        key="admin:a1", agent="billing-agent", namespace=NS, elevation="refund",
        approver="alice", approved_at=T, duration=120, source="admin",
    ))  # fmt: skip
    assert (state, end) == ("Granted", T + 120)
    authz = authorizer(wall, agent_state=reader.read)
    assert check(authz, REFUND).allowed
    wall.t = T - HOUR  # back: before the grant started, so not in force (never extended)
    assert check(authz, REFUND).code == Code.OUTSIDE_PURPOSE
    wall.t = T + 119.999
    assert check(authz, REFUND).allowed
    wall.t = T + HOUR  # forward past the end: over at once, no writer needed
    assert check(authz, REFUND).code == Code.OUTSIDE_PURPOSE
    assert store.prune() == 1  # the supervisor's next prune (every 0.25 s) removes it
    wall.t = T + 60  # so a jump back inside its old window does not revive it
    assert check(authz, REFUND).code == Code.OUTSIDE_PURPOSE
    assert reader.read().active_grants(NS, "billing-agent", wall.t) == ()


# -- rate limits: the monotonic clock -------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path) -> Path:
    """The fixture profiles with billing-agent's `reconcile` limited to 3 calls a minute."""
    d = tmp_path / "profiles"
    d.mkdir()
    text = (FIXTURES / "agents.yaml").read_text()
    changed = text.replace(
        "rateLimit: {requests: 600, per: 1m}", "rateLimit: {requests: 3, per: 1m}"
    )
    assert changed != text
    (d / "agents.yaml").write_text(changed)
    return d


def test_wall_clock_jumps_neither_free_nor_hold_the_rate_budget(limited: Path) -> None:
    wall, mono = Clock(T), Clock(1000.0)
    authz = authorizer(wall, limiter=RateLimiter(clock=mono), profiles=limited)
    for _ in range(3):
        assert check(authz).allowed
        mono.t += 1
    assert check(authz).code == Code.RATE
    for jump in (-HOUR, +2 * HOUR, -30 * 24 * HOUR, +365 * 24 * HOUR):
        wall.t = T + jump  # no wall jump, either way, frees the budget
        assert check(authz).code == Code.RATE, jump
    mono.t = 1000.0 + 59.999  # 60 s of monotonic time after the first call: not yet
    assert check(authz).code == Code.RATE
    wall.t = T - HOUR  # and with the wall clock an hour back, it is not held longer either
    mono.t = 1000.0 + 60  # the first call has left the window: one call free again
    assert check(authz).allowed
    assert check(authz).code == Code.RATE
    mono.t = 1000.0 + 62  # the other two have left too
    assert check(authz).allowed and check(authz).allowed
    assert check(authz).code == Code.RATE


def test_the_rate_limiter_counts_on_the_monotonic_clock_by_default() -> None:
    assert inspect.signature(RateLimiter).parameters["clock"].default is time.monotonic
