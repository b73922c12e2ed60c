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
No network I/O here; every method is thread-safe (on the supervisor, every caller is on its
event loop).

The agent may be compromised and call the context API as often as it likes, with any values
(issue 15, findings 2 and 3). So:
- everything an agent can create is bounded per agent: tasks (`MAX_TASKS_PER_AGENT`, the
  oldest of its own evicted), pending requests (`MAX_PENDING_PER_AGENT`, then
  RESOURCE_EXHAUSTED), finished requests (`MAX_FINISHED_PER_AGENT`, its oldest dropped),
  auto grants (one active grant per agent and elevation: asking again while it is active
  returns that grant's request, unchanged and not extended), justifications
  (`MAX_JUSTIFICATION`), TTLs and durations (`MAX_TTL`), and the state file
  (`MAX_STATE_BYTES`: an agent's change that would pass it is refused);
- a change is stored only if it is also persisted and audited: it is made in memory, then
  the state file is written, then the audit records are handed over, then the table is
  published; a failure at any step undoes it in memory (and on disk), and the caller gets an
  error (StateWriteError for an operator, AgentStateError UNAVAILABLE for the agent). What
  takes rights away (expiry, a withdrawn approval) is never undone; a failed write then
  shows in `health()` and the metrics and is retried by `prune`;
- a shared table too small for everything never empties it for all agents: the agents with
  the largest share have their grants and tasks withheld (fail closed for them alone: fewer
  rights), one at a time, until the rest fits; risk scores are never withheld, so risk-based
  denial keeps working for every agent, the withheld ones included. A change that would
  leave its own agent withheld is refused (RESOURCE_EXHAUSTED) rather than stored unseen.
  Only if the risk scores alone do not fit is the table published as overflowed: readers
  then see no grant, no task and the maximum risk for every agent (fail closed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
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
from sidecar.core.timefmt import utc_seconds
from sidecar.errors import AgentStateError, ConfigError, StateWriteError
from sidecar.state.shm import SharedAgentState
from sidecar.state.statefile import os_error_text, write_json_durably
from sidecar.telemetry import metrics

__all__ = ["MAX_JUSTIFICATION", "MAX_TTL", "AgentStateStore", "check_seconds", "status_of"]

log = logging.getLogger(__name__)
STATE_VERSION = 1
_TASK = re.compile(r"^[\x21-\x7e]{1,128}$")
# Per-agent bounds. Sized so that one agent at every bound takes about 60 KB of the shared
# table (64 tasks of at most ~800 bytes, its auto grants, one risk score) and about 120 KB
# of the state file: the default 4 MiB table holds ~65 agents at their worst at once, far
# more than one pod serves; past that, the largest agents are withheld (see the docstring).
MAX_TASKS_PER_AGENT = 64
MAX_PENDING_PER_AGENT = 8
MAX_FINISHED_PER_AGENT = 16  # expired/refused requests kept for status, per agent
MAX_JUSTIFICATION = 1024  # characters (1 KiB): a ticket reference and a sentence or two
MAX_TTL = 30 * 86400.0  # seconds: the longest task TTL or elevation duration accepted
MAX_STATE_BYTES = 16 * 1024 * 1024  # context.json: an agent's change past this is refused
MAX_RISK_EXPLANATION = 512  # characters of a risk explanation published to the workers
PENDING_TTL = 3600.0  # an operator request not approved within an hour lapses
KEEP_FINISHED = 300.0  # finished requests stay visible (status, audit) this long
PERSIST_RETRY = 5.0  # seconds between retries of a failed write of the state file


@dataclass(frozen=True, slots=True)
class _Saved:
    """The store's state before a change, to undo it."""

    tasks: dict[tuple[str, str, str], TaskBinding]
    requests: dict[str, ElevationRequest]
    grants: dict[str, Grant]
    approvals: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Layout:
    """What one publication holds: the table, the agents withheld from it ("ns/agent"),
    and whether even the risk scores alone did not fit (published as overflowed)."""

    table: AgentStateTable
    withheld: frozenset[tuple[str, str]]
    overflow: bool
    size: int  # bytes of the table's JSON


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def check_seconds(field: str, value: float | None) -> float | None:
    """A TTL or duration from the agent: None (not given), or finite, > 0 and at most
    MAX_TTL. Refused before anything is stored: an infinite or huge value cannot be turned
    into an expiry time (OverflowError) and would outlive every restart."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise AgentStateError(f"{field} must be a number of seconds")
    if not math.isfinite(value) or value <= 0 or value > MAX_TTL:
        raise AgentStateError(
            f"{field} must be a positive number of seconds, at most {MAX_TTL:.0f} "
            f"({_span(MAX_TTL)}), not {value!r}"
        )
    return float(value)


def _span(seconds: float) -> str:
    s = round(seconds)
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


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
        self._table = table
        self._state_file = state_file
        self._snapshot = snapshot
        self._clock = clock
        # `audit` returns False when the record was not taken (the trail is failing closed);
        # `audit_blocked` says, before anything is stored, that it cannot take one now.
        self._audit = audit
        self._audit_blocked = audit_blocked
        self._pending_ttl = pending_ttl
        self._lock = threading.RLock()
        self._tasks: dict[tuple[str, str, str], TaskBinding] = {}
        self._requests: dict[str, ElevationRequest] = {}
        self._grants: dict[str, Grant] = {}
        self._by_approval: dict[str, str] = {}  # approval key -> grant id
        self._risks: dict[tuple[str, str], RiskState] = {}
        self._withheld: frozenset[tuple[str, str]] = frozenset()
        self._overflow = False
        self._table_bytes = 0
        self._persist_error: StateWriteError | None = None
        self._persist_since = 0.0
        self._persist_failures = 0
        self._persist_retry_at = 0.0
        self.generation = 0

    # -- reading --------------------------------------------------------------------------

    def table(self) -> AgentStateTable:
        with self._lock:
            return AgentStateTable.build(
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

    def health(self) -> dict[str, Any]:
        """Readiness details (supervisor `/readyz?verbose=1`): is the state durable, and does
        the shared table hold every agent's context? ``withheld`` names the agents whose
        grants and tasks the workers cannot see (they fail closed: fewer rights);
        ``overflow`` true: not even the risk scores fit (every agent fails closed)."""
        with self._lock:
            err = self._persist_error
            file = None if self._state_file is None else str(self._state_file)
            persistence: dict[str, Any] = {
                "durable": err is None and self._state_file is not None,
                "file": file,
                "error": None if err is None else err.os_error,
            }
            if err is not None:
                persistence["since"] = self._persist_since
                persistence["failures"] = self._persist_failures
            return {
                "persistence": persistence,
                "table": {
                    "bytes": self._table_bytes,
                    "capacity": self._table.capacity,
                    "withheld": [f"{ns}/{agent}" for ns, agent in sorted(self._withheld)],
                    "overflow": self._overflow,
                },
                "limits": {
                    "tasks_per_agent": MAX_TASKS_PER_AGENT,
                    "pending_requests_per_agent": MAX_PENDING_PER_AGENT,
                    "finished_requests_per_agent": MAX_FINISHED_PER_AGENT,
                    "auto_grants_per_agent_and_elevation": 1,
                    "justification_characters": MAX_JUSTIFICATION,
                    "max_ttl_seconds": MAX_TTL,
                    "state_file_bytes": MAX_STATE_BYTES,
                },
            }

    # -- persistence ----------------------------------------------------------------------

    def load_persisted(self) -> int:
        """Load tasks, requests and grants saved by an earlier run; return how many. A
        corrupt file is refused (ConfigError): starting without it would drop grants an
        operator approved and tasks the agent relies on — better to say so. A file written
        before the per-agent bounds existed is trimmed to them (and rewritten)."""
        path = self._state_file
        if path is None or not path.exists():
            with self._lock:
                self._publish()
                # Also the start-up check of the state dir: one that cannot be written shows
                # in health() from the start, not at the first approval.
                self._persist()
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
            if self._trim_locked(everything=True):
                log.warning("context state %s exceeded the per-agent bounds: trimmed", path)
                self._persist()
            self._publish()
            return len(self._tasks) + len(self._requests) + len(self._grants)

    def _document(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "tasks": [t.as_dict() for t in self._tasks.values()],
            "requests": [r.as_dict() for r in self._requests.values()],
            "grants": [g.as_dict() for g in self._grants.values()],
            "approvals": self._by_approval,
        }

    def _write_state(self) -> None:
        """Write the state file; raise StateWriteError (kept for health) on failure."""
        path = self._state_file
        if path is None:
            return
        try:
            write_json_durably(path, self._document())
        except OSError as exc:
            err = StateWriteError(str(path), os_error_text(exc))
            if self._persist_error is None:
                self._persist_since = self._clock()
                log.error("the context state is NOT persisted (lost at a restart): %s", err)
            self._persist_error = err
            self._persist_failures += 1
            self._persist_retry_at = time.monotonic() + PERSIST_RETRY
            metrics.STATE_DURABLE.labels("context").set(0)
            metrics.STATE_WRITE_FAILURES.labels("context").inc()
            raise err from None
        if self._persist_error is not None:
            log.warning("the context state is persisted to %s again: durable", path)
            self._persist_error = None
            self._persist_failures = 0
        metrics.STATE_DURABLE.labels("context").set(1)

    def _persist(self) -> None:
        """Best effort, for what takes rights away (expiry, withdrawal): that stays in force
        even when it cannot be written; the failure shows in health() and is retried."""
        with contextlib.suppress(StateWriteError):
            self._write_state()

    def _layout(self) -> _Layout:
        """The table to publish. If everything does not fit, withhold the grants and tasks
        of the agent with the largest share, then the next, until the rest fits: one agent
        that fills the table loses its own context, never another agent's."""
        risks = list(self._risks.values())
        table = AgentStateTable.build(0, self._grants.values(), self._tasks.values(), risks)
        capacity = self._table.capacity
        size = len(self._table.encode(table))
        if size <= capacity:
            return _Layout(table, frozenset(), False, size)
        share: dict[tuple[str, str], int] = {}
        entries: list[Grant | TaskBinding] = [*self._grants.values(), *self._tasks.values()]
        for entry in entries:
            key = (entry.namespace, entry.agent)
            share[key] = share.get(key, 0) + len(_compact(entry.as_dict())) + 1
        withheld: set[tuple[str, str]] = set()
        for key in sorted(share, key=lambda k: (-share[k], k)):
            withheld.add(key)
            size -= share[key]
            if size > capacity:
                continue
            table = AgentStateTable.build(
                0,
                (g for g in self._grants.values() if (g.namespace, g.agent) not in withheld),
                (t for t in self._tasks.values() if (t.namespace, t.agent) not in withheld),
                risks,
            )
            size = len(self._table.encode(table))
            if size <= capacity:
                return _Layout(table, frozenset(withheld), False, size)
        table = AgentStateTable.build(0, (), (), risks)
        return _Layout(table, frozenset(share), True, len(self._table.encode(table)))

    def _publish(self, layout: _Layout | None = None) -> None:
        layout = layout if layout is not None else self._layout()
        generation = None if layout.overflow else self._table.try_write(layout.table)
        if generation is None:  # only the risk scores, and even they do not fit
            generation = self._table.write(layout.table)
        self.generation = generation
        if layout.withheld != self._withheld or layout.overflow != self._overflow:
            for ns, agent in layout.withheld - self._withheld:
                log.error(
                    "the context table is full: the grants and tasks of agent %s/%s are "
                    "withheld from the workers (its calls get none of them)", ns, agent,
                )  # fmt: skip
                metrics.CONTEXT_WITHHELD.labels(agent).set(1)
            for _, agent in self._withheld - layout.withheld:
                log.warning("the context table has room again for agent %s", agent)
                metrics.CONTEXT_WITHHELD.labels(agent).set(0)
            if layout.overflow:
                log.error("the context table cannot hold even the risk scores: failing closed")
            metrics.CONTEXT_TABLE_OVERFLOW.set(1 if layout.overflow else 0)
        self._withheld, self._overflow = layout.withheld, layout.overflow
        self._table_bytes = layout.size

    def _save(self) -> _Saved:
        return _Saved(
            dict(self._tasks), dict(self._requests), dict(self._grants), dict(self._by_approval)
        )

    def _restore(self, saved: _Saved) -> None:
        self._tasks, self._requests = saved.tasks, saved.requests
        self._grants, self._by_approval = saved.grants, saved.approvals

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
        layout = self._layout()
        if agent in layout.withheld or layout.overflow:
            self._restore(saved)
            raise AgentStateError(
                f"the shared context table is full: this change for agent {agent[1]!r} would "
                "not be visible to the workers, so it is not made",
                "RESOURCE_EXHAUSTED",
            )
        if by_agent and self._state_file is not None:
            size = len(_compact(self._document()))
            if size > MAX_STATE_BYTES:
                self._restore(saved)
                raise AgentStateError(
                    f"the context state would exceed {MAX_STATE_BYTES} bytes: not stored",
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
        self, agent: str, namespace: str, task: str, purpose: str, ttl: float | None
    ) -> TaskBinding:
        compiled = self._agent(agent)
        if not _TASK.match(task):
            raise AgentStateError("task_id must be 1-128 visible ASCII characters")
        if purpose not in compiled.purposes:
            known = ", ".join(sorted(compiled.purposes))
            raise AgentStateError(
                f"unknown purpose {purpose[:64]!r} for agent {agent!r} (known: {known})",
                "NOT_FOUND",
            )
        ttl = check_seconds("ttl", ttl)
        now = self._clock()
        binding = TaskBinding(
            agent, namespace, task, purpose, now, None if ttl is None else now + ttl
        )
        # Built before anything is stored: a record that cannot be made stores nothing.
        event = {
            "type": "task_reported", "agent": agent, "namespace": namespace, "task": task,
            "purpose": purpose,
            "expires": None if binding.expires_at is None else utc_seconds(binding.expires_at),
        }  # fmt: skip
        with self._lock:
            saved = self._save()
            mine = [
                k
                for k, t in self._tasks.items()
                if t.namespace == namespace and t.agent == agent and k[2] != task
            ]
            for k in [k for k in mine if not self._tasks[k].active(now)]:
                del self._tasks[k]  # its own expired tasks first
                mine.remove(k)
            # At the bound, the agent's own oldest task makes room: never another agent's.
            mine.sort(key=lambda k: (self._tasks[k].reported_at, k))
            for k in mine[: max(0, len(mine) - MAX_TASKS_PER_AGENT + 1)]:
                del self._tasks[k]
            self._tasks[(namespace, agent, task)] = binding
            self._commit(saved, [event], (namespace, agent), by_agent=True)
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
            raise AgentStateError(
                f"agent {agent!r} has no elevation {elevation[:64]!r} (known: {known})",
                "NOT_FOUND",
            )
        justification = justification.strip()
        if len(justification) > MAX_JUSTIFICATION:
            raise AgentStateError(f"justification: at most {MAX_JUSTIFICATION} characters")
        if elev.justification_required and not justification:
            raise AgentStateError(
                f"elevation {elevation!r} requires a justification", "FAILED_PRECONDITION"
            )
        if duration == 0:
            duration = None
        duration = check_seconds("duration", duration)
        if duration is None:
            duration = elev.max_seconds
        if duration > elev.max_seconds:
            raise AgentStateError(
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
            if elev.approval == "auto":
                # One active grant per agent and elevation: asking again while it holds the
                # elevation stores nothing and extends nothing (issue 15, finding 2).
                held = self._active_grant(namespace, agent, elevation, now)
                current = self._requests.get(held.request_id) if held is not None else None
                if current is not None:
                    return current
            pending = [
                r for r in self._requests.values()
                if r.agent == agent and r.namespace == namespace and r.state == "pending"
            ]  # fmt: skip
            if elev.approval == "operator" and len(pending) >= MAX_PENDING_PER_AGENT:
                raise AgentStateError(
                    f"{len(pending)} elevation requests already pending for {agent!r}",
                    "RESOURCE_EXHAUSTED",
                )
            saved = self._save()
            self._requests[rid] = req
            events = [self._request_event("elevation_requested", req)]
            if elev.approval == "auto":
                req, granted = self._grant_locked(
                    req, approver="auto", source="auto", start=now, seconds=duration
                )
                events.append(granted)
            self._trim_locked(namespace, agent)
            self._commit(saved, events, (namespace, agent), by_agent=True)
        return req

    def request(self, request_id: str) -> ElevationRequest | None:
        with self._lock:
            return self._requests.get(request_id)

    def approve(self, approval: Approval) -> tuple[str, str, str, float | None]:
        """An operator's approval; returns (state, message, grant id, grant end) for the
        AgentElevation's status. Idempotent per approval key (a relist re-applies it).
        Raises StateWriteError when the grant cannot be persisted (nothing is granted then:
        an operator is told success only for what is durable) and AgentStateError
        (RESOURCE_EXHAUSTED) when the shared table has no room for the agent's grant."""
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
            if approval.duration is not None and not (
                math.isfinite(approval.duration) and 0 < approval.duration <= elev.max_seconds
            ):
                msg = (
                    f"duration {_span(approval.duration)} exceeds maxDuration "
                    f"{_span(elev.max_seconds)}"
                    if math.isfinite(approval.duration) and approval.duration > 0
                    else f"duration {approval.duration!r}: must be a positive number of seconds"
                )
                return "Invalid", msg, "", None
            saved = self._save()
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
            req, event = self._grant_locked(
                req, approver=f"{approval.approver} ({where})", source=approval.source,
                start=approval.approved_at, seconds=seconds,
            )  # fmt: skip
            self._by_approval[approval.key] = req.grant_id
            self._commit(saved, [event], (req.namespace, req.agent), by_agent=False)
            g = self._grants[req.grant_id]
            state = "Granted" if g.expires_at > self._clock() else "Expired"
            return state, f"grant {g.id} until {utc_seconds(g.expires_at)}", g.id, g.expires_at

    def _grant_locked(
        self, req: ElevationRequest, *, approver: str, source: str, start: float, seconds: float
    ) -> tuple[ElevationRequest, dict[str, Any]]:
        """Grant ``req`` in memory; return it and its audit record (the caller commits)."""
        gid = f"grant-{secrets.token_hex(6)}"
        grant = Grant(
            id=gid, agent=req.agent, namespace=req.namespace, elevation=req.elevation,
            starts_at=start, expires_at=start + seconds, approver=approver,
            justification=req.justification, source=source, request_id=req.id,
        )  # fmt: skip
        granted = ElevationRequest(
            **{**req.as_dict(), "state": "granted", "grant_id": gid,
               "expires_at": grant.expires_at, "approver": approver},
        )  # fmt: skip
        event = {
            **self._request_event("elevation_granted", granted), "grant": gid,
            "approver": approver, "starts": utc_seconds(grant.starts_at),
            "expires": utc_seconds(grant.expires_at),
        }  # fmt: skip
        self._grants[gid] = grant
        self._requests[req.id] = granted
        return granted, event

    def _active_grant(self, namespace: str, agent: str, elevation: str, now: float) -> Grant | None:
        for g in self._grants.values():
            if (g.namespace, g.agent, g.elevation) == (namespace, agent, elevation) and g.active(
                now
            ):
                return g
        return None

    def remove_approval(self, key: str) -> None:
        """The approval was withdrawn (its AgentElevation deleted): its grant ends now, even
        if that cannot be written (then health() says so and prune retries)."""
        with self._lock:
            gid = self._by_approval.pop(key, None)
            grant = self._grants.pop(gid, None) if gid else None
            if grant is None:
                self._persist()
                return
            self._finish_request(grant.request_id, "expired", "approval withdrawn")
            self._publish()
            self._persist()
        self._audit({**self._grant_event("elevation_withdrawn", grant), "approval": key})

    def replace_approvals(self, source: str, approvals: Sequence[Approval]) -> None:
        """The whole set of approvals from ``source`` (a Kubernetes relist)."""
        keep = {a.key for a in approvals}
        with self._lock:
            gone = [k for k in self._by_approval if k.startswith(f"{source}:") and k not in keep]
        for key in gone:
            self.remove_approval(key)
        for a in approvals:
            try:
                self.approve(a)
            except (StateWriteError, AgentStateError) as exc:
                # One approval that cannot be stored must not stop the others; it is not
                # granted, and the next relist or event tries again.
                log.error("approval %s not granted: %s", a.key, exc)

    def upsert_approval(self, approval: Approval) -> tuple[str, str, str, float | None]:
        return self.approve(approval)

    # -- risk -----------------------------------------------------------------------------

    def set_risks(self, risks: Iterable[RiskState]) -> bool:
        """Publish new risk scores when any changed by more than 0.01 or crossed learning.
        Explanations are cut to MAX_RISK_EXPLANATION characters: they name hosts the agent
        chose, and a risk score must always fit in the table."""
        with self._lock:
            changed = False
            for r in risks:
                if len(r.explanation) > MAX_RISK_EXPLANATION:
                    r = replace(r, explanation=r.explanation[: MAX_RISK_EXPLANATION - 3] + "...")
                old = self._risks.get((r.namespace, r.agent))
                if old is None or abs(old.score - r.score) >= 0.01 or old.learning != r.learning:
                    self._risks[(r.namespace, r.agent)] = r
                    changed = True
            if changed:
                self._publish()
            return changed

    # -- housekeeping ---------------------------------------------------------------------

    def prune(self) -> int:
        """End what expired: grants (audited), pending requests, tasks. Return how many.
        Also retries a failed write of the state file (every PERSIST_RETRY seconds)."""
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
                self._trim_locked()
                self._publish()
                self._persist()
            elif self._persist_error is not None and time.monotonic() >= self._persist_retry_at:
                self._persist()
        for e in events:
            self._audit(e)
        return n

    def _trim_locked(
        self, namespace: str | None = None, agent: str | None = None, *, everything: bool = False
    ) -> bool:
        """Hold every agent (or the one given) to its bound on finished requests and, with
        ``everything`` (a loaded file), on auto grants and tasks too, dropping its own
        oldest first; True if anything was dropped."""
        dropped = False
        by_agent: dict[tuple[str, str], list[ElevationRequest]] = {}
        for r in self._requests.values():
            if r.state in ("expired", "refused") and (namespace, agent) in (
                (None, None),
                (r.namespace, r.agent),
            ):
                by_agent.setdefault((r.namespace, r.agent), []).append(r)
        for finished in by_agent.values():
            finished.sort(key=lambda r: (r.expires_at or r.requested_at, r.id))
            for r in finished[: max(0, len(finished) - MAX_FINISHED_PER_AGENT)]:
                del self._requests[r.id]
                dropped = True
        if not everything:
            return dropped
        # Loading a file from before the bounds: one auto grant per agent and elevation
        # (the one that lasts longest), at most MAX_TASKS_PER_AGENT tasks (the newest).
        best: dict[tuple[str, str, str], Grant] = {}
        for g in sorted(self._grants.values(), key=lambda g: (g.expires_at, g.id)):
            if g.source == "auto":
                key = (g.namespace, g.agent, g.elevation)
                if key in best:
                    del self._grants[best[key].id]
                    self._requests.pop(best[key].request_id, None)
                    dropped = True
                best[key] = g
        tasks: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for k, t in self._tasks.items():
            tasks.setdefault((t.namespace, t.agent), []).append(k)
        for keys in tasks.values():
            keys.sort(key=lambda k: (self._tasks[k].reported_at, k))
            for k in keys[: max(0, len(keys) - MAX_TASKS_PER_AGENT)]:
                del self._tasks[k]
                dropped = True
        granted = {g.request_id for g in self._grants.values()}
        for r in list(self._requests.values()):
            if r.state == "granted" and r.approval == "auto" and r.id not in granted:
                del self._requests[r.id]  # the request of a dropped duplicate auto grant
                dropped = True
        return dropped

    # -- helpers --------------------------------------------------------------------------

    def _agent(self, agent: str) -> CompiledAgent:
        snap = self._snapshot()
        compiled = snap.agents.get(agent) if snap is not None else None
        if compiled is None:
            raise AgentStateError(f"no profile for agent {agent!r}", "FAILED_PRECONDITION")
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


def status_of(store: AgentStateStore, agent: str, namespace: str) -> Mapping[str, Any]:
    """The context part of an agent's status (admin API, `mandate status`)."""
    return {
        "tasks": [t.as_dict() for t in store.tasks(namespace, agent)],
        "requests": [r.as_dict() for r in store.requests(namespace, agent)],
        "grants": [g.as_dict() for g in store.grants(namespace, agent)],
        "risk": None if (r := store.risk(namespace, agent)) is None else r.as_dict(),
    }


def _unaudited() -> AgentStateError:
    """The audit trail cannot take the record of a change (fail-closed and failing, under
    its free-space reserve, or its queue full): the change is not made."""
    return AgentStateError(
        "the audit trail cannot record this change now, so it is not made; retry later",
        "UNAVAILABLE",
    )
