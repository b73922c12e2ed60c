"""The agent-state store's facade: the single writer of the shared agent-state table.

It composes the concepts (`tasks`, `elevations`, `risks`), holds the one lock (in the
supervisor every caller is on its event loop; the lock keeps it safe for any other caller,
e.g. the behaviour service's save thread), and makes each change stick
through the shared mechanism (`publisher.GenerationPublisher`) in the order that never
gives rights that are not stored:
- what gives rights (a task, a request, a grant) is made in memory, then it must fit in the
  shared table without withholding its agent (`layout`), then the state file is written,
  then the audit records are handed over, then the table is published; a failure at any
  step undoes it in memory (and on disk), and the caller gets an error (StateWriteError for
  an operator, AgentStateError UNAVAILABLE for the agent, RESOURCE_EXHAUSTED for no room);
- what takes rights away (expiry, a withdrawn approval) is published first and never
  undone; a failed write then shows in `health()` and the metrics and is retried by `prune`.
No network I/O here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.core.agentstate import (
    AgentStateTable,
    Approval,
    ElevationRequest,
    Grant,
    RiskState,
    TaskBinding,
)
from sidecar.core.snapshot import CompiledAgent, Snapshot
from sidecar.errors import AgentStateError, StateWriteError
from sidecar.state.agentstate.elevations import Elevations, Saved, Status, grant_event, new_request
from sidecar.state.agentstate.layout import Layout, TableWriter
from sidecar.state.agentstate.limits import MAX_STATE_BYTES, PENDING_TTL, described
from sidecar.state.agentstate.risks import Risks
from sidecar.state.agentstate.tasks import TaskKey, Tasks, new_task
from sidecar.state.publisher import GenerationPublisher, durability_metrics
from sidecar.state.shm import SharedAgentState

__all__ = ["PERSIST_RETRY", "STATE_VERSION", "AgentStateStore", "status_of"]

log = logging.getLogger(__name__)
STATE_VERSION = 1
PERSIST_RETRY = 5.0  # seconds between retries of a failed write of the state file


@dataclass(frozen=True, slots=True)
class _Saved:
    """The store's state before a change, to undo it (risk scores are never undone)."""

    tasks: dict[TaskKey, TaskBinding]
    elevations: Saved


class AgentStateStore:
    def __init__(
        self,
        table: SharedAgentState,
        state_file: Path | None,
        snapshot: Callable[[], Snapshot | None],
        *,
        clock: Callable[[], float] = time.time,
        audit: Callable[[dict[str, Any]], bool | None] = lambda _: None,
        audit_blocked: Callable[[], bool] = lambda: False,
        pending_ttl: float = PENDING_TTL,
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock
        # `audit` returns False when the record was not taken (the trail is failing closed);
        # `audit_blocked` says, before anything is stored, that it cannot take one now.
        self._audit = audit
        self._audit_blocked = audit_blocked
        self._pending_ttl = pending_ttl
        self._lock = threading.RLock()
        self._tasks = Tasks()
        self._elevations = Elevations()
        self._risks = Risks()
        self._shared = TableWriter(table)
        self._published = GenerationPublisher(
            state_file,
            describe="the agent state",
            version=STATE_VERSION,
            clock=clock,
            retry_every=PERSIST_RETRY,
            on_persist=durability_metrics("context"),
            log=log,
        )

    @property
    def generation(self) -> int:
        """The generation of the context table last published."""
        return self._published.generation

    # -- reading --------------------------------------------------------------------------

    def table(self) -> AgentStateTable:
        """The agents' state as the workers see it: without the grants and tasks of the
        agents the last publication withheld (`Explain` decides on it as a Check would)."""
        with self._lock:
            withheld = self._shared.withheld
            return AgentStateTable.build(
                self.generation,
                (
                    g
                    for g in self._elevations.all_grants()
                    if (g.namespace, g.agent) not in withheld
                ),
                (t for t in self._tasks.values() if (t.namespace, t.agent) not in withheld),
                self._risks.values(),
                withheld,
            )

    def requests(
        self, namespace: str | None = None, agent: str | None = None
    ) -> list[ElevationRequest]:
        with self._lock:
            return self._elevations.requests(namespace, agent)

    def request(self, request_id: str) -> ElevationRequest | None:
        with self._lock:
            return self._elevations.request(request_id)

    def grants(self, namespace: str | None = None, agent: str | None = None) -> list[Grant]:
        with self._lock:
            return self._elevations.grants(namespace, agent)

    def tasks(self, namespace: str, agent: str) -> list[TaskBinding]:
        with self._lock:
            return self._tasks.of(namespace, agent)

    def risks(self) -> list[RiskState]:
        with self._lock:
            return self._risks.ordered()

    def risk(self, namespace: str, agent: str) -> RiskState | None:
        with self._lock:
            return self._risks.get(namespace, agent)

    def health(self) -> dict[str, Any]:
        """Readiness details (supervisor `/readyz?verbose=1`): is the state durable, and does
        the shared table hold every agent's context? ``withheld`` names the agents whose
        grants and tasks the workers cannot see (they fail closed: fewer rights);
        ``overflow`` true: not even the risk scores fit (every agent fails closed)."""
        with self._lock:
            return {
                "persistence": self._published.health(),
                "table": self._shared.health(),
                "limits": described(),
            }

    # -- persistence ----------------------------------------------------------------------

    def load_persisted(self) -> int:
        """Load tasks, requests and grants saved by an earlier run; return how many. A
        corrupt file is refused (ConfigError): starting without it would drop grants an
        operator approved and tasks the agent relies on — better to say so. A file written
        before the per-agent bounds existed is trimmed to them (and rewritten)."""
        loaded = self._published.load(_parse, what="agent state")
        with self._lock:
            if loaded is None:
                self._publish()
                # Also the start-up check of the state dir: one that cannot be written shows
                # in health() from the start, not at the first approval.
                self._persist()
                return 0
            tasks, requests, grants, approvals = loaded
            self._tasks.load(tasks)
            self._elevations.load(requests, grants, approvals)
            trimmed = self._elevations.trim(everything=True)
            trimmed = self._tasks.trim(self._clock()) or trimmed
            if trimmed:
                log.warning(
                    "agent state %s exceeded the per-agent bounds: trimmed",
                    self._published.path,
                )
                self._persist()
            self._publish()
            return len(self._tasks) + len(self._elevations)

    def _body(self) -> dict[str, Any]:
        return {"tasks": self._tasks.as_list(), **self._elevations.as_document()}

    def _write_state(self) -> None:
        """Write the state file; raise StateWriteError (kept for health) on failure."""
        failure = self._published.persist(self._body)
        if failure is not None:
            raise failure

    def _persist(self) -> None:
        """Best effort, for what takes rights away (expiry, withdrawal): that stays in force
        even when it cannot be written; the failure shows in health() and is retried."""
        self._published.persist(self._body)

    def _lay_out(self) -> Layout:
        return self._shared.lay_out(
            self._elevations.all_grants(), self._tasks.values(), self._risks.values()
        )

    def _publish(self, layout: Layout | None = None) -> None:
        laid_out = layout if layout is not None else self._lay_out()
        self._published.publish(lambda: self._shared.write(laid_out))

    def _save(self) -> _Saved:
        return _Saved(self._tasks.saved(), self._elevations.saved())

    def _restore(self, saved: _Saved) -> None:
        self._tasks.restore(saved.tasks)
        self._elevations.restore(saved.elevations)

    def _commit(
        self,
        saved: _Saved,
        events: Sequence[dict[str, Any]],
        agent: tuple[str, str],
        *,
        by_agent: bool,
    ) -> None:
        """Make a change already made in memory (lock held) stick: it must fit in the shared
        table without withholding ``agent``, be written to the state file and be audited;
        else it is undone and the caller gets the error. Published last, so a worker never
        enforces what was not stored (issue 15, finding 3)."""
        if events and self._audit_blocked():
            self._restore(saved)
            raise _unaudited()
        layout = self._lay_out()
        if agent in layout.withheld or layout.overflow:
            self._restore(saved)
            raise AgentStateError(
                f"the shared context table is full: this change for agent {agent[1]!r} would "
                "not be visible to the workers, so it is not made",
                "RESOURCE_EXHAUSTED",
            )
        pushed = layout.withheld - self._shared.withheld
        if by_agent and pushed and layout.over_fair_share(agent):
            # An agent over its fair share of a full table may not push another agent's
            # context out of it (that agent would fail closed: a denial of service)
            self._restore(saved)
            others = ", ".join(sorted(name for _, name in pushed))
            raise AgentStateError(
                f"the shared context table is full: agent {agent[1]!r} holds "
                f"{layout.shares.get(agent, 0)} bytes of it, over its fair share "
                f"({layout.capacity // len(layout.shares)} of {layout.capacity} among "
                f"{len(layout.shares)} agents), and this change would withhold the grants and "
                f"tasks of {others}: not made",
                "RESOURCE_EXHAUSTED",
            )
        if (
            by_agent
            and self._published.persistent
            and self._published.encoded_size(self._body()) > MAX_STATE_BYTES
        ):
            self._restore(saved)
            raise AgentStateError(
                f"the agent state would exceed {MAX_STATE_BYTES} bytes: not stored",
                "RESOURCE_EXHAUSTED",
            )
        try:
            self._write_state()
        except StateWriteError as exc:
            self._restore(saved)
            if by_agent:
                raise AgentStateError(
                    f"mandate cannot store this change durably ({exc.os_error}): not made; "
                    "retry later",
                    "UNAVAILABLE",
                ) from None
            raise
        try:
            for event in events:
                if self._audit(event) is False:
                    raise _unaudited()
        except Exception:
            self._restore(saved)
            self._persist()
            raise
        self._publish(layout)

    # -- tasks ----------------------------------------------------------------------------

    def report_task(
        self,
        agent: str,
        namespace: str,
        task: str,
        purpose: str,
        ttl: float | None,
        allow: Sequence[object] = (),
    ) -> TaskBinding:
        """Bind ``task`` to ``purpose``, within the declaration ``allow`` if not empty; an
        active declared task is returned unchanged for the same request, else refused."""
        compiled = self._agent(agent)
        now = self._clock()
        binding, event = new_task(compiled, agent, namespace, task, purpose, ttl, now, allow)
        with self._lock:
            same = self._tasks.unchanged(binding, now)
            if same is not None:
                return same
            saved = self._save()
            self._tasks.report(binding, now)
            self._commit(saved, [event], (namespace, agent), by_agent=True)
        return binding

    def end_task(self, agent: str, namespace: str, task: str) -> TaskBinding | None:
        """End an active task early (`EndTask`): see `Tasks.end`. Returns what is kept (the
        ended declared task) or None (dropped)."""
        self._agent(agent)
        now = self._clock()
        with self._lock:
            saved = self._save()
            kept, event = self._tasks.end((namespace, agent, task), now)
            self._commit(saved, [event], (namespace, agent), by_agent=True)
        return kept

    # -- elevation ------------------------------------------------------------------------

    def request_elevation(
        self,
        agent: str,
        namespace: str,
        elevation: str,
        justification: str,
        duration: float | None,
    ) -> ElevationRequest:
        compiled = self._agent(agent)
        now = self._clock()
        req = new_request(
            compiled, agent, namespace, elevation, justification, duration, now,
            self._pending_ttl,
        )  # fmt: skip
        with self._lock:
            saved = self._save()
            req, events = self._elevations.ask(req, now)
            if events:  # none: the agent holds that auto elevation already
                self._commit(saved, events, (namespace, agent), by_agent=True)
        return req

    def approve(self, approval: Approval) -> Status:
        """An operator's approval; returns (state, message, grant id, grant end) for the
        AgentElevation's status. Idempotent per approval key (a relist re-applies it).
        Raises StateWriteError when the grant cannot be persisted (nothing is granted then:
        an operator is told success only for what is durable) and AgentStateError
        (RESOURCE_EXHAUSTED) when the shared table has no room for the agent's grant."""
        with self._lock:
            now = self._clock()
            status = self._elevations.approved(approval.key, now)
            if status is not None:
                return status
            snap = self._snapshot()
            compiled = snap.agents.get(approval.agent) if snap is not None else None
            saved = self._save()
            outcome = self._elevations.approve(approval, compiled, now)
            if not isinstance(outcome, dict):
                return outcome  # nothing granted, nothing changed
            self._commit(saved, [outcome], (approval.namespace, approval.agent), by_agent=False)
            status = self._elevations.approved(approval.key, self._clock())
            assert status is not None
            return status

    def remove_approval(self, key: str) -> None:
        """The approval was withdrawn (its AgentElevation deleted): its grant ends now, even
        if that cannot be written (then health() says so and prune retries)."""
        with self._lock:
            grant = self._elevations.withdraw(key, self._clock())
            if grant is None:
                self._persist()
                return
            self._publish()
            self._persist()
        self._audit({**grant_event("elevation_withdrawn", grant), "approval": key})

    def replace_approvals(self, source: str, approvals: Sequence[Approval]) -> None:
        """The whole set of approvals from ``source`` (a Kubernetes relist)."""
        keep = {a.key for a in approvals}
        with self._lock:
            gone = [k for k in self._elevations.approval_keys(source) if k not in keep]
        for key in gone:
            self.remove_approval(key)
        for a in approvals:
            try:
                self.approve(a)
            except (StateWriteError, AgentStateError) as exc:
                # One approval that cannot be stored must not stop the others; it is not
                # granted, and the next relist or event tries again.
                log.error("approval %s not granted: %s", a.key, exc)

    def upsert_approval(self, approval: Approval) -> Status:
        return self.approve(approval)

    # -- risk -----------------------------------------------------------------------------

    def set_risks(self, risks: Iterable[RiskState]) -> bool:
        """Publish new risk scores when any changed by more than 0.01 or crossed learning
        (see `risks`)."""
        with self._lock:
            changed = self._risks.update(risks)
            if changed:
                self._publish()
            return changed

    # -- housekeeping ---------------------------------------------------------------------

    def prune(self) -> int:
        """End what expired: grants (audited), pending requests, tasks. Return how many.
        Also retries a failed write of the state file (every PERSIST_RETRY seconds)."""
        now = self._clock()
        with self._lock:
            n, events = self._elevations.expire(now)
            n += self._tasks.expire(now)
            if n:
                self._elevations.trim()
                self._publish()
                self._persist()
            else:
                self._published.retry(self._body)
        for e in events:
            self._audit(e)
        return n

    def _agent(self, agent: str) -> CompiledAgent:
        snap = self._snapshot()
        compiled = snap.agents.get(agent) if snap is not None else None
        if compiled is None:
            raise AgentStateError(f"no profile for agent {agent!r}", "FAILED_PRECONDITION")
        return compiled


def status_of(store: AgentStateStore, agent: str, namespace: str) -> Mapping[str, Any]:
    """The context part of an agent's status (admin API, `mandate status`)."""
    return {
        "tasks": [t.as_dict() for t in store.tasks(namespace, agent)],
        "requests": [r.as_dict() for r in store.requests(namespace, agent)],
        "grants": [g.as_dict() for g in store.grants(namespace, agent)],
        "risk": None if (r := store.risk(namespace, agent)) is None else r.as_dict(),
    }


def _parse(
    data: Mapping[str, Any],
) -> tuple[list[TaskBinding], list[ElevationRequest], list[Grant], dict[str, str]]:
    """The state file's content (refused with KeyError, TypeError or ValueError)."""
    tasks = [TaskBinding.from_dict(d) for d in data.get("tasks", [])]
    requests = [ElevationRequest.from_dict(d) for d in data.get("requests", [])]
    grants = [Grant.from_dict(d) for d in data.get("grants", [])]
    approvals = data.get("approvals", {})
    if not isinstance(approvals, dict):
        raise ValueError("approvals: expected an object")
    return tasks, requests, grants, {str(k): str(v) for k, v in approvals.items()}


def _unaudited() -> AgentStateError:
    """The audit trail cannot take the record of a change (fail-closed and failing, under
    its free-space reserve, or its queue full): the change is not made."""
    return AgentStateError(
        "the audit trail cannot record this change now, so it is not made; retry later",
        "UNAVAILABLE",
    )
