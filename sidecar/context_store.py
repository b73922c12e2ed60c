"""The supervisor's context store: the single writer of the shared context table (elevation
requests and grants, reported tasks, behaviour risk scores).

The agent context API (`ReportTask`, `RequestElevation`), operator approvals (AgentElevation
objects, `mandate approve`) and behaviour analysis change the agents' context through this
store. Each change publishes a whole new table generation to shared memory (workers see it
on their next Check), persists tasks, requests and grants to a JSON file (atomic rename), and
hands an audit event to ``audit`` (requested, granted, refused, expired, withdrawn, task
reported). The rules an elevation grants live in the profiles; here only who holds which
elevation until when. Nothing here can approve a request on the agent's behalf: approval
arrives only through :meth:`approve` (operator paths) or the profile's `approval: auto`.
No network I/O here; every method is thread-safe (gRPC threads and the event loop).
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .core.context import (
    Approval,
    ContextTable,
    ElevationRequest,
    Grant,
    RiskState,
    TaskBinding,
)
from .core.snapshot import CompiledAgent, Snapshot
from .core.timefmt import utc_seconds
from .errors import ConfigError, ContextError
from .shm import SharedContext
from .statefile import write_json_durably

__all__ = ["ContextStore"]

log = logging.getLogger(__name__)
STATE_VERSION = 1
_TASK = re.compile(r"^[\x21-\x7e]{1,128}$")
MAX_TASKS_PER_AGENT = 1000
MAX_PENDING_PER_AGENT = 8
MAX_JUSTIFICATION = 2000
PENDING_TTL = 3600.0  # an operator request not approved within an hour lapses
KEEP_FINISHED = 300.0  # finished requests stay visible (status, audit) this long


def _span(seconds: float) -> str:
    s = round(seconds)
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


class ContextStore:
    def __init__(
        self,
        table: SharedContext,
        state_file: Path | None,
        snapshot: Callable[[], Snapshot | None],
        *,
        clock: Callable[[], float] = time.time,
        audit: Callable[[dict[str, Any]], None] = lambda _: None,
        pending_ttl: float = PENDING_TTL,
    ) -> None:
        self._table = table
        self._state_file = state_file
        self._snapshot = snapshot
        self._clock = clock
        self._audit = audit
        self._pending_ttl = pending_ttl
        self._lock = threading.RLock()
        self._tasks: dict[tuple[str, str, str], TaskBinding] = {}
        self._requests: dict[str, ElevationRequest] = {}
        self._grants: dict[str, Grant] = {}
        self._by_approval: dict[str, str] = {}  # approval key -> grant id
        self._risks: dict[tuple[str, str], RiskState] = {}
        self.generation = 0

    # -- reading --------------------------------------------------------------------------

    def table(self) -> ContextTable:
        with self._lock:
            return ContextTable.build(
                self.generation,
                self._grants.values(),
                self._tasks.values(),
                self._risks.values(),
            )

    def requests(
        self, namespace: str | None = None, agent: str | None = None
    ) -> list[ElevationRequest]:
        with self._lock:
            return sorted(
                (
                    r
                    for r in self._requests.values()
                    if (namespace is None or r.namespace == namespace)
                    and (agent is None or r.agent == agent)
                ),
                key=lambda r: (r.requested_at, r.id),
            )

    def grants(self, namespace: str | None = None, agent: str | None = None) -> list[Grant]:
        with self._lock:
            return sorted(
                (
                    g
                    for g in self._grants.values()
                    if (namespace is None or g.namespace == namespace)
                    and (agent is None or g.agent == agent)
                ),
                key=lambda g: (g.starts_at, g.id),
            )

    def tasks(self, namespace: str, agent: str) -> list[TaskBinding]:
        with self._lock:
            return sorted(
                (t for t in self._tasks.values() if t.namespace == namespace and t.agent == agent),
                key=lambda t: t.reported_at,
            )

    def risks(self) -> list[RiskState]:
        with self._lock:
            return sorted(self._risks.values(), key=lambda r: (r.namespace, r.agent))

    def risk(self, namespace: str, agent: str) -> RiskState | None:
        with self._lock:
            return self._risks.get((namespace, agent))

    # -- persistence ----------------------------------------------------------------------

    def load_persisted(self) -> int:
        """Load tasks, requests and grants saved by an earlier run; return how many. A
        corrupt file is refused (ConfigError): starting without it would drop grants an
        operator approved and tasks the agent relies on — better to say so."""
        path = self._state_file
        if path is None or not path.exists():
            self._publish()
            return 0
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"expected an object with version {STATE_VERSION}")
            tasks = [TaskBinding.from_dict(d) for d in data.get("tasks", [])]
            requests = [ElevationRequest.from_dict(d) for d in data.get("requests", [])]
            grants = [Grant.from_dict(d) for d in data.get("grants", [])]
            approvals = data.get("approvals", {})
            if not isinstance(approvals, dict):
                raise ValueError("approvals: expected an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"context state {path}: cannot be read ({exc})") from None
        with self._lock:
            self._tasks = {(t.namespace, t.agent, t.task): t for t in tasks}
            self._requests = {r.id: r for r in requests}
            self._grants = {g.id: g for g in grants}
            self._by_approval = {str(k): str(v) for k, v in approvals.items()}
            self._publish()
        return len(tasks) + len(requests) + len(grants)

    def _persist(self) -> None:
        path = self._state_file
        if path is None:
            return
        data = {
            "version": STATE_VERSION,
            "tasks": [t.as_dict() for t in self._tasks.values()],
            "requests": [r.as_dict() for r in self._requests.values()],
            "grants": [g.as_dict() for g in self._grants.values()],
            "approvals": self._by_approval,
        }
        try:
            write_json_durably(path, data)
        except OSError:
            # The shared table is already published: enforcement is right; only a restart
            # would lose this change. Loud, not fatal.
            log.exception("persisting the context state to %s failed", path)

    def _publish(self, persist: bool = True) -> None:
        table = ContextTable.build(
            0, self._grants.values(), self._tasks.values(), self._risks.values()
        )
        self.generation = self._table.write(table)
        if self._table.overflowed:
            log.error("the context table is full: grants and tasks are not visible to workers")
        if persist:
            self._persist()

    # -- tasks ----------------------------------------------------------------------------

    def report_task(
        self, agent: str, namespace: str, task: str, purpose: str, ttl: float | None
    ) -> TaskBinding:
        compiled = self._agent(agent)
        if not _TASK.match(task):
            raise ContextError("task_id must be 1-128 visible ASCII characters")
        if purpose not in compiled.purposes:
            known = ", ".join(sorted(compiled.purposes))
            raise ContextError(
                f"unknown purpose {purpose[:64]!r} for agent {agent!r} (known: {known})",
                "NOT_FOUND",
            )
        if ttl is not None and (not math.isfinite(ttl) or ttl <= 0):
            raise ContextError("ttl must be a positive number of seconds")
        now = self._clock()
        binding = TaskBinding(
            agent, namespace, task, purpose, now, None if ttl is None else now + ttl
        )
        with self._lock:
            mine = [
                k for k, t in self._tasks.items() if t.namespace == namespace and t.agent == agent
            ]
            if (namespace, agent, task) not in self._tasks and len(mine) >= MAX_TASKS_PER_AGENT:
                oldest = min(mine, key=lambda k: self._tasks[k].reported_at)
                del self._tasks[oldest]
            self._tasks[(namespace, agent, task)] = binding
            self._publish()
        self._audit({
            "type": "task_reported", "agent": agent, "namespace": namespace, "task": task,
            "purpose": purpose,
            "expires": None if binding.expires_at is None else utc_seconds(binding.expires_at),
        })  # fmt: skip
        return binding

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
        elev = compiled.elevations.get(elevation)
        if elev is None:
            known = ", ".join(sorted(compiled.elevations)) or "none"
            raise ContextError(
                f"agent {agent!r} has no elevation {elevation[:64]!r} (known: {known})",
                "NOT_FOUND",
            )
        justification = justification.strip()
        if len(justification) > MAX_JUSTIFICATION:
            raise ContextError(f"justification: at most {MAX_JUSTIFICATION} characters")
        if elev.justification_required and not justification:
            raise ContextError(
                f"elevation {elevation!r} requires a justification", "FAILED_PRECONDITION"
            )
        if duration is None or duration == 0:
            duration = elev.max_seconds
        if not math.isfinite(duration) or duration < 0:
            raise ContextError("duration must be a positive number of seconds")
        if duration > elev.max_seconds:
            raise ContextError(
                f"duration {_span(duration)} exceeds maxDuration {_span(elev.max_seconds)} "
                f"of elevation {elevation!r}"
            )
        now = self._clock()
        rid = f"elev-{secrets.token_hex(6)}"
        req = ElevationRequest(
            id=rid, agent=agent, namespace=namespace, elevation=elevation,
            justification=justification, requested_at=now, duration=duration,
            approval=elev.approval, expires_at=now + self._pending_ttl,
        )  # fmt: skip
        with self._lock:
            pending = [
                r for r in self._requests.values()
                if r.agent == agent and r.namespace == namespace and r.state == "pending"
            ]  # fmt: skip
            if elev.approval == "operator" and len(pending) >= MAX_PENDING_PER_AGENT:
                raise ContextError(
                    f"{len(pending)} elevation requests already pending for {agent!r}",
                    "RESOURCE_EXHAUSTED",
                )
            self._requests[rid] = req
            self._audit(self._request_event("elevation_requested", req))
            if elev.approval == "auto":
                req = self._grant_locked(
                    req, approver="auto", source="auto", start=now, seconds=duration
                )
            self._publish()
        return req

    def request(self, request_id: str) -> ElevationRequest | None:
        with self._lock:
            return self._requests.get(request_id)

    def approve(self, approval: Approval) -> tuple[str, str, str, float | None]:
        """An operator's approval; returns (state, message, grant id, grant end) for the
        AgentElevation's status. Idempotent per approval key (a relist re-applies it)."""
        with self._lock:
            existing = self._by_approval.get(approval.key)
            if existing is not None and existing in self._grants:
                g = self._grants[existing]
                state = "Granted" if g.expires_at > self._clock() else "Expired"
                return state, f"grant {g.id} until {utc_seconds(g.expires_at)}", g.id, g.expires_at
            snap = self._snapshot()
            compiled = snap.agents.get(approval.agent) if snap is not None else None
            if compiled is None:
                return "Invalid", f"no profile for agent {approval.agent!r}", "", None
            elev = compiled.elevations.get(approval.elevation)
            if elev is None:
                known = ", ".join(sorted(compiled.elevations)) or "none"
                msg = (
                    f"agent {approval.agent!r} has no elevation {approval.elevation!r} "
                    f"(known: {known})"
                )
                return "Invalid", msg, "", None
            if approval.duration is not None and approval.duration > elev.max_seconds:
                msg = (
                    f"duration {_span(approval.duration)} exceeds maxDuration "
                    f"{_span(elev.max_seconds)}"
                )
                return "Invalid", msg, "", None
            if approval.request_id:
                req = self._requests.get(approval.request_id)
                if req is None:
                    return "Invalid", f"no elevation request {approval.request_id!r}", "", None
                if (req.agent, req.namespace, req.elevation) != (
                    approval.agent, approval.namespace, approval.elevation,
                ):  # fmt: skip
                    msg = (
                        f"request {req.id} is agent {req.agent!r} elevation {req.elevation!r} "
                        f"in namespace {req.namespace!r}, not what this approval names"
                    )
                    return "Invalid", msg, "", None
                lapsed = req.state == "expired" or (
                    req.state == "pending"
                    and req.expires_at is not None
                    and req.expires_at <= self._clock()
                )
                if lapsed:
                    # Too late, not wrong: the request ran out before the approval came.
                    when = f" at {utc_seconds(req.expires_at)}" if req.expires_at else ""
                    msg = (
                        f"request {req.id} expired{when}, before this approval: nothing is "
                        "granted; the agent must ask again (or approve without requestId)"
                    )
                    return "Expired", msg, "", None
                if req.state != "pending":
                    return "Invalid", f"request {req.id} is {req.state}, not pending", "", None
            else:
                req = ElevationRequest(
                    id=f"elev-{secrets.token_hex(6)}", agent=approval.agent,
                    namespace=approval.namespace, elevation=approval.elevation,
                    justification=approval.reason, requested_at=approval.approved_at,
                    duration=approval.duration or elev.max_seconds, approval="operator",
                )  # fmt: skip
                self._requests[req.id] = req
            seconds = min(approval.duration or req.duration or elev.max_seconds, elev.max_seconds)
            where = (
                f"AgentElevation {approval.namespace}/{approval.name}"
                if approval.source == "kubernetes"
                else "mandate approve"
            )
            req = self._grant_locked(
                req, approver=f"{approval.approver} ({where})", source=approval.source,
                start=approval.approved_at, seconds=seconds,
            )  # fmt: skip
            self._by_approval[approval.key] = req.grant_id
            self._publish()
            g = self._grants[req.grant_id]
            state = "Granted" if g.expires_at > self._clock() else "Expired"
            return state, f"grant {g.id} until {utc_seconds(g.expires_at)}", g.id, g.expires_at

    def _grant_locked(
        self, req: ElevationRequest, *, approver: str, source: str, start: float, seconds: float
    ) -> ElevationRequest:
        gid = f"grant-{secrets.token_hex(6)}"
        grant = Grant(
            id=gid, agent=req.agent, namespace=req.namespace, elevation=req.elevation,
            starts_at=start, expires_at=start + seconds, approver=approver,
            justification=req.justification, source=source, request_id=req.id,
        )  # fmt: skip
        self._grants[gid] = grant
        granted = ElevationRequest(
            **{**req.as_dict(), "state": "granted", "grant_id": gid,
               "expires_at": grant.expires_at, "approver": approver},
        )  # fmt: skip
        self._requests[req.id] = granted
        self._audit({
            **self._request_event("elevation_granted", granted), "grant": gid,
            "approver": approver, "starts": utc_seconds(grant.starts_at),
            "expires": utc_seconds(grant.expires_at),
        })  # fmt: skip
        return granted

    def remove_approval(self, key: str) -> None:
        """The approval was withdrawn (its AgentElevation deleted): its grant ends now."""
        with self._lock:
            gid = self._by_approval.pop(key, None)
            grant = self._grants.pop(gid, None) if gid else None
            if grant is None:
                self._persist()
                return
            self._finish_request(grant.request_id, "expired", "approval withdrawn")
            self._publish()
        self._audit({**self._grant_event("elevation_withdrawn", grant), "approval": key})

    def replace_approvals(self, source: str, approvals: Sequence[Approval]) -> None:
        """The whole set of approvals from ``source`` (a Kubernetes relist)."""
        keep = {a.key for a in approvals}
        with self._lock:
            gone = [k for k in self._by_approval if k.startswith(f"{source}:") and k not in keep]
        for key in gone:
            self.remove_approval(key)
        for a in approvals:
            self.approve(a)

    def upsert_approval(self, approval: Approval) -> tuple[str, str, str, float | None]:
        return self.approve(approval)

    # -- risk -----------------------------------------------------------------------------

    def set_risks(self, risks: Iterable[RiskState]) -> bool:
        """Publish new risk scores when any changed by more than 0.01 or crossed learning."""
        with self._lock:
            changed = False
            for r in risks:
                old = self._risks.get((r.namespace, r.agent))
                if old is None or abs(old.score - r.score) >= 0.01 or old.learning != r.learning:
                    self._risks[(r.namespace, r.agent)] = r
                    changed = True
            if changed:
                self._publish(persist=False)
            return changed

    # -- housekeeping ---------------------------------------------------------------------

    def prune(self) -> int:
        """End what expired: grants (audited), pending requests, tasks. Return how many."""
        now = self._clock()
        events: list[dict[str, Any]] = []
        with self._lock:
            expired = [g for g in self._grants.values() if g.expires_at <= now]
            for g in expired:
                del self._grants[g.id]
                self._finish_request(g.request_id, "expired", "the grant ran out")
                events.append(self._grant_event("elevation_expired", g))
            lapsed = 0
            for r in list(self._requests.values()):
                if r.state == "pending" and r.expires_at is not None and r.expires_at <= now:
                    self._requests[r.id] = ElevationRequest(
                        **{**r.as_dict(), "state": "expired", "message": "not approved in time"}
                    )
                    events.append(self._request_event("elevation_lapsed", r))
                    lapsed += 1
                elif (
                    r.state in ("expired", "refused")
                    and (r.expires_at or r.requested_at) + KEEP_FINISHED <= now
                ):
                    del self._requests[r.id]
            old_tasks = [k for k, t in self._tasks.items() if not t.active(now)]
            for k in old_tasks:
                del self._tasks[k]
            n = len(expired) + lapsed + len(old_tasks)
            if n:
                self._publish()
        for e in events:
            self._audit(e)
        return n

    # -- helpers --------------------------------------------------------------------------

    def _agent(self, agent: str) -> CompiledAgent:
        snap = self._snapshot()
        compiled = snap.agents.get(agent) if snap is not None else None
        if compiled is None:
            raise ContextError(f"no profile for agent {agent!r}", "FAILED_PRECONDITION")
        return compiled

    def _finish_request(self, request_id: str, state: str, message: str) -> None:
        r = self._requests.get(request_id)
        if r is not None:
            self._requests[r.id] = ElevationRequest(
                **{**r.as_dict(), "state": state, "message": message, "expires_at": self._clock()}
            )

    @staticmethod
    def _request_event(kind: str, r: ElevationRequest) -> dict[str, Any]:
        return {
            "type": kind, "agent": r.agent, "namespace": r.namespace, "elevation": r.elevation,
            "request": r.id, "justification": r.justification or None, "approval": r.approval,
            "duration": _span(r.duration),
        }  # fmt: skip

    @staticmethod
    def _grant_event(kind: str, g: Grant) -> dict[str, Any]:
        return {
            "type": kind, "agent": g.agent, "namespace": g.namespace, "elevation": g.elevation,
            "request": g.request_id or None, "grant": g.id, "approver": g.approver,
            "justification": g.justification or None, "starts": utc_seconds(g.starts_at),
            "expires": utc_seconds(g.expires_at),
        }  # fmt: skip


def status_of(store: ContextStore, agent: str, namespace: str) -> Mapping[str, Any]:
    """The context part of an agent's status (admin API, `mandate status`)."""
    return {
        "tasks": [t.as_dict() for t in store.tasks(namespace, agent)],
        "requests": [r.as_dict() for r in store.requests(namespace, agent)],
        "grants": [g.as_dict() for g in store.grants(namespace, agent)],
        "risk": None if (r := store.risk(namespace, agent)) is None else r.as_dict(),
    }
