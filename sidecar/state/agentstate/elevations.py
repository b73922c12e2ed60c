"""Elevation requests, operator approvals and the grants they make.

An agent asks (`RequestElevation`): an `approval: auto` elevation is granted at once (one
active grant per agent and elevation: asking again while it holds one returns that grant's
request, unchanged and not extended); an operator elevation waits, pending, for an approval
(an AgentElevation object or `mandate approve`, idempotent per approval key) and lapses
after the pending TTL. A withdrawn approval ends its grant; grants and requests expire.
Bounded per agent: pending requests (`MAX_PENDING_PER_AGENT`, then RESOURCE_EXHAUSTED) and
finished ones (`MAX_FINISHED_PER_AGENT`, its oldest dropped). Nothing here approves a
request on the agent's behalf: only `approve` (operator paths) or `approval: auto`.

In memory only: the store holds the lock, commits (persist, audit, publish) and undoes;
each change returns the audit records it needs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any

from sidecar.core.agentstate import Approval, ElevationRequest, Grant
from sidecar.core.snapshot import CompiledAgent
from sidecar.core.timefmt import utc_seconds
from sidecar.errors import AgentStateError
from sidecar.state.agentstate.limits import (
    KEEP_FINISHED,
    MAX_FINISHED_PER_AGENT,
    MAX_JUSTIFICATION,
    MAX_PENDING_PER_AGENT,
    check_seconds,
    span,
)

__all__ = ["Elevations", "Status", "grant_event", "new_request", "request_event"]

Status = tuple[str, str, str, float | None]
"""An approval's outcome for the AgentElevation's status: (state, message, grant id, end)."""


def new_request(
    compiled: CompiledAgent,
    agent: str,
    namespace: str,
    elevation: str,
    justification: str,
    duration: float | None,
    now: float,
    pending_ttl: float,
) -> ElevationRequest:
    """The request ``agent`` makes (pending until `Elevations.ask` stores it), checked
    against its profile; AgentStateError if it cannot be made."""
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
            f"duration {span(duration)} exceeds maxDuration {span(elev.max_seconds)} "
            f"of elevation {elevation!r}"
        )
    return ElevationRequest(
        id=f"elev-{secrets.token_hex(6)}", agent=agent, namespace=namespace,
        elevation=elevation, justification=justification, requested_at=now, duration=duration,
        approval=elev.approval, expires_at=now + pending_ttl,
    )  # fmt: skip


def request_event(kind: str, r: ElevationRequest) -> dict[str, Any]:
    return {
        "type": kind, "agent": r.agent, "namespace": r.namespace, "elevation": r.elevation,
        "request": r.id, "justification": r.justification or None, "approval": r.approval,
        "duration": span(r.duration),
    }  # fmt: skip


def grant_event(kind: str, g: Grant) -> dict[str, Any]:
    return {
        "type": kind, "agent": g.agent, "namespace": g.namespace, "elevation": g.elevation,
        "request": g.request_id or None, "grant": g.id, "approver": g.approver,
        "justification": g.justification or None, "starts": utc_seconds(g.starts_at),
        "expires": utc_seconds(g.expires_at),
    }  # fmt: skip


def _status(g: Grant, now: float) -> Status:
    state = "Granted" if g.expires_at > now else "Expired"
    return state, f"grant {g.id} until {utc_seconds(g.expires_at)}", g.id, g.expires_at


def _invalid(message: str) -> Status:
    return "Invalid", message, "", None


@dataclass(frozen=True, slots=True)
class Saved:
    """The elevations before a change, to undo it."""

    requests: dict[str, ElevationRequest]
    grants: dict[str, Grant]
    approvals: dict[str, str]


class Elevations:
    """Requests by id, grants by id, and which grant each approval made. Not thread-safe:
    the store's lock."""

    def __init__(self) -> None:
        self._requests: dict[str, ElevationRequest] = {}
        self._grants: dict[str, Grant] = {}
        self._by_approval: dict[str, str] = {}  # approval key -> grant id

    # -- reading ---------------------------------------------------------------------------

    def requests(self, namespace: str | None, agent: str | None) -> list[ElevationRequest]:
        return sorted(
            (
                r
                for r in self._requests.values()
                if (namespace is None or r.namespace == namespace)
                and (agent is None or r.agent == agent)
            ),
            key=lambda r: (r.requested_at, r.id),
        )

    def grants(self, namespace: str | None, agent: str | None) -> list[Grant]:
        return sorted(
            (
                g
                for g in self._grants.values()
                if (namespace is None or g.namespace == namespace)
                and (agent is None or g.agent == agent)
            ),
            key=lambda g: (g.starts_at, g.id),
        )

    def all_grants(self) -> ValuesView[Grant]:
        return self._grants.values()

    def request(self, request_id: str) -> ElevationRequest | None:
        return self._requests.get(request_id)

    def approval_keys(self, source: str) -> list[str]:
        return [k for k in self._by_approval if k.startswith(f"{source}:")]

    def approved(self, key: str, now: float) -> Status | None:
        """The status of approval ``key`` if it made a grant that is still kept."""
        gid = self._by_approval.get(key)
        if gid is None or gid not in self._grants:
            return None
        return _status(self._grants[gid], now)

    def __len__(self) -> int:
        return len(self._requests) + len(self._grants)

    # -- changes (the store commits the audit records they return) -------------------------

    def ask(
        self, req: ElevationRequest, now: float
    ) -> tuple[ElevationRequest, list[dict[str, Any]]]:
        """Store the agent's request ``req``; an auto one is granted at once. If the agent
        holds that auto elevation already, nothing is stored (no records): that grant's
        request comes back. Too many pending: AgentStateError, nothing stored."""
        auto = req.approval == "auto"
        if auto:
            # One active grant per agent and elevation: asking again while it holds the
            # elevation stores nothing and extends nothing (issue 15, finding 2).
            held = self._active_grant(req.namespace, req.agent, req.elevation, now)
            current = self._requests.get(held.request_id) if held is not None else None
            if current is not None:
                return current, []
        else:
            pending = sum(
                1
                for r in self._requests.values()
                if r.agent == req.agent and r.namespace == req.namespace and r.state == "pending"
            )
            if pending >= MAX_PENDING_PER_AGENT:
                raise AgentStateError(
                    f"{pending} elevation requests already pending for {req.agent!r}",
                    "RESOURCE_EXHAUSTED",
                )
        self._requests[req.id] = req
        events = [request_event("elevation_requested", req)]
        if auto:
            req, granted = self._grant(
                req, approver="auto", source="auto", start=now, seconds=req.duration
            )
            events.append(granted)
        self.trim(req.namespace, req.agent)
        return req, events

    def approve(
        self, approval: Approval, compiled: CompiledAgent | None, now: float
    ) -> Status | dict[str, Any]:
        """An operator's approval: the audit record of the grant it makes (in memory), or
        the status that says why it makes none (nothing changed)."""
        if compiled is None:
            return _invalid(f"no profile for agent {approval.agent!r}")
        elev = compiled.elevations.get(approval.elevation)
        if elev is None:
            known = ", ".join(sorted(compiled.elevations)) or "none"
            return _invalid(
                f"agent {approval.agent!r} has no elevation {approval.elevation!r} (known: {known})"
            )
        if approval.duration is not None and not (
            math.isfinite(approval.duration) and 0 < approval.duration <= elev.max_seconds
        ):
            return _invalid(
                f"duration {span(approval.duration)} exceeds maxDuration {span(elev.max_seconds)}"
                if math.isfinite(approval.duration) and approval.duration > 0
                else f"duration {approval.duration!r}: must be a positive number of seconds"
            )
        if approval.request_id:
            req = self._requests.get(approval.request_id)
            if req is None:
                return _invalid(f"no elevation request {approval.request_id!r}")
            if (req.agent, req.namespace, req.elevation) != (
                approval.agent, approval.namespace, approval.elevation,
            ):  # fmt: skip
                return _invalid(
                    f"request {req.id} is agent {req.agent!r} elevation {req.elevation!r} "
                    f"in namespace {req.namespace!r}, not what this approval names"
                )
            lapsed = req.state == "expired" or (
                req.state == "pending" and req.expires_at is not None and req.expires_at <= now
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
                return _invalid(f"request {req.id} is {req.state}, not pending")
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
        req, event = self._grant(
            req, approver=f"{approval.approver} ({where})", source=approval.source,
            start=approval.approved_at, seconds=seconds,
        )  # fmt: skip
        self._by_approval[approval.key] = req.grant_id
        return event

    def withdraw(self, key: str, now: float) -> Grant | None:
        """Approval ``key`` was withdrawn: its grant (returned) ends now."""
        gid = self._by_approval.pop(key, None)
        grant = self._grants.pop(gid, None) if gid else None
        if grant is not None:
            self._finish(grant.request_id, "expired", "approval withdrawn", now)
        return grant

    def expire(self, now: float) -> tuple[int, list[dict[str, Any]]]:
        """End the grants that ran out and the pending requests not approved in time, and
        forget finished requests kept long enough; return how many ended, and the records."""
        events: list[dict[str, Any]] = []
        expired = [g for g in self._grants.values() if g.expires_at <= now]
        for g in expired:
            del self._grants[g.id]
            self._finish(g.request_id, "expired", "the grant ran out", now)
            events.append(grant_event("elevation_expired", g))
        lapsed = 0
        for r in list(self._requests.values()):
            if r.state == "pending" and r.expires_at is not None and r.expires_at <= now:
                self._requests[r.id] = ElevationRequest(
                    **{**r.as_dict(), "state": "expired", "message": "not approved in time"}
                )
                events.append(request_event("elevation_lapsed", r))
                lapsed += 1
            elif (
                r.state in ("expired", "refused")
                and (r.expires_at or r.requested_at) + KEEP_FINISHED <= now
            ):
                del self._requests[r.id]
        return len(expired) + lapsed, events

    def trim(
        self, namespace: str | None = None, agent: str | None = None, *, everything: bool = False
    ) -> bool:
        """Hold every agent (or the one given) to its bound on finished requests and, with
        ``everything`` (a loaded file), to one auto grant per elevation, dropping its own
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
        # (the one that lasts longest).
        best: dict[tuple[str, str, str], Grant] = {}
        for g in sorted(self._grants.values(), key=lambda g: (g.expires_at, g.id)):
            if g.source == "auto":
                key = (g.namespace, g.agent, g.elevation)
                if key in best:
                    del self._grants[best[key].id]
                    self._requests.pop(best[key].request_id, None)
                    dropped = True
                best[key] = g
        granted = {g.request_id for g in self._grants.values()}
        for r in list(self._requests.values()):
            if r.state == "granted" and r.approval == "auto" and r.id not in granted:
                del self._requests[r.id]  # the request of a dropped duplicate auto grant
                dropped = True
        return dropped

    def _grant(
        self, req: ElevationRequest, *, approver: str, source: str, start: float, seconds: float
    ) -> tuple[ElevationRequest, dict[str, Any]]:
        """Grant ``req``; return it and its audit record."""
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
            **request_event("elevation_granted", granted), "grant": gid,
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

    def _finish(self, request_id: str, state: str, message: str, now: float) -> None:
        r = self._requests.get(request_id)
        if r is not None:
            self._requests[r.id] = ElevationRequest(
                **{**r.as_dict(), "state": state, "message": message, "expires_at": now}
            )

    # -- undo and persistence --------------------------------------------------------------

    def saved(self) -> Saved:
        return Saved(dict(self._requests), dict(self._grants), dict(self._by_approval))

    def restore(self, saved: Saved) -> None:
        self._requests = dict(saved.requests)
        self._grants = dict(saved.grants)
        self._by_approval = dict(saved.approvals)

    def load(
        self,
        requests: Iterable[ElevationRequest],
        grants: Iterable[Grant],
        approvals: Mapping[str, str],
    ) -> None:
        self._requests = {r.id: r for r in requests}
        self._grants = {g.id: g for g in grants}
        self._by_approval = dict(approvals)

    def as_document(self) -> dict[str, Any]:
        return {
            "requests": [r.as_dict() for r in self._requests.values()],
            "grants": [g.as_dict() for g in self._grants.values()],
            "approvals": self._by_approval,
        }
