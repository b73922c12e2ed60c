"""AgentRevocation and AgentElevation objects as mandate's values: the resource names, the
Event reasons and states, the object → Revocation / Approval conversions, what a watcher
keeps of an object to write its status, and an ApprovalSink's answer, checked.

Pure: plain data in, values out. No I/O, no kubernetes_asyncio or aiohttp, no logging."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar.core.agentstate import Approval
from sidecar.core.model import parse_duration
from sidecar.core.revocation import ALL_AGENTS, Revocation, make_key
from sidecar.core.timefmt import parse_rfc3339

__all__ = [
    "ELEVATION_EVENT_REASON",
    "ELEVATION_EXPIRED_EVENT_REASON",
    "ELEVATION_KIND",
    "ELEVATION_PLURAL",
    "ELEVATION_STATES",
    "EVENT_REASON",
    "EXPIRED_EVENT_REASON",
    "GROUP",
    "KIND",
    "PLURAL",
    "SOURCE",
    "VERSION",
    "ObjectState",
    "SinkAnswer",
    "answer_from_sink",
    "approval_from_object",
    "object_key",
    "object_state",
    "revocation_from_object",
]

GROUP, VERSION, PLURAL, KIND = "mandate.dev", "v1alpha1", "agentrevocations", "AgentRevocation"
ELEVATION_PLURAL, ELEVATION_KIND = "agentelevations", "AgentElevation"
SOURCE = "kubernetes"
EVENT_REASON = "RevocationEnforced"
EXPIRED_EVENT_REASON = "RevocationExpired"
ELEVATION_EVENT_REASON = "ElevationGranted"
ELEVATION_EXPIRED_EVENT_REASON = "ElevationExpired"
# The values of an AgentElevation's status.state, from the least to the best informed: a
# status is only overwritten, for the same generation, by a better-informed state.
ELEVATION_STATES = ("Invalid", "Pending", "Granted", "Expired")
# What an ApprovalSink may answer (any case) → the state written; "refused" is Invalid.
_STATE_NAMES = {state.lower(): state for state in ELEVATION_STATES} | {"refused": "Invalid"}

# A profile or elevation name (the profile format's `Name`).
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def revocation_from_object(obj: Mapping[str, Any], namespace: str) -> tuple[Revocation, list[str]]:
    """An AgentRevocation object as the Revocation to enforce, and the problems found in it.

    Pure. Every object yields a revocation, malformed or not: an object the API server let
    through is an operator's intent to stop traffic, so doubt is resolved towards enforcing
    (an unparsable expiresAt: no expiry; no agent: every agent of the namespace)."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    ns = str(meta.get("namespace") or namespace)
    raw_spec = obj.get("spec")
    spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
    problems: list[str] = []
    agent = spec.get("agent")
    if not isinstance(agent, str) or not agent:
        problems.append(f"spec.agent {agent!r} is not an agent name: revoking every agent")
        agent = ALL_AGENTS
    reason = spec.get("reason")
    if not isinstance(reason, str) or not reason:
        problems.append("spec.reason is missing")
        reason = f"AgentRevocation {ns}/{name}"
    expires_at = None
    if spec.get("expiresAt") is not None:
        expires_at = parse_rfc3339(spec["expiresAt"])
        if expires_at is None:
            problems.append(
                f"spec.expiresAt {spec['expiresAt']!r} is not an RFC 3339 time: "
                "enforcing the revocation without expiry"
            )
    rev = Revocation(
        key=make_key(SOURCE, ns, name),
        agent=agent,
        namespace=ns,
        reason=reason,
        source=SOURCE,
        name=name,
        expires_at=expires_at,
        created_at=parse_rfc3339(meta.get("creationTimestamp")) or 0.0,
        uid=str(meta.get("uid", "")),
    )
    return rev, problems


def _text(spec: Mapping[str, Any], field: str, problems: list[str], *, required: bool) -> str:
    """spec.<field> as a non-empty string ("" when absent and optional); else a problem."""
    value = spec.get(field)
    if value is None:
        if required:
            problems.append(f"spec.{field}: Required value")
        return ""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"spec.{field}: {value!r} is not a non-empty string")
        return ""
    return value


def approval_from_object(
    obj: Mapping[str, Any], namespace: str, *, now: float | None = None
) -> tuple[Approval | None, list[str]]:
    """An AgentElevation object as the operator's Approval, and the problems found in it.

    Pure (given ``now``). Unlike a revocation, doubt is resolved towards granting nothing:
    an object with any problem yields None (its status says why). The grant window starts at
    metadata.creationTimestamp, so that every replica and every restart computes the same
    window; only an object without one (never from a real API server) falls back to ``now``
    (default: the current time)."""
    raw_meta = obj.get("metadata")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    name = str(meta.get("name", ""))
    ns = str(meta.get("namespace") or namespace)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return None, ["spec: Required value"]
    problems: list[str] = []
    agent = _text(spec, "agent", problems, required=True)
    if agent and not _NAME.match(agent):
        problems.append(f"spec.agent: {agent!r} is not an agent (profile) name")
    elevation = _text(spec, "elevation", problems, required=True)
    if elevation and not _NAME.match(elevation):
        problems.append(f"spec.elevation: {elevation!r} is not an elevation name")
    approver = _text(spec, "approver", problems, required=True)
    request_id = _text(spec, "requestId", problems, required=False)
    reason = spec.get("reason")
    if reason is not None and not isinstance(reason, str):
        problems.append(f"spec.reason: {reason!r} is not a string")
    duration = None
    if spec.get("duration") is not None:
        try:
            duration = parse_duration(spec["duration"])
        except ValueError as exc:
            problems.append(f"spec.duration: {exc}")
    if problems:
        return None, problems
    approved_at = parse_rfc3339(meta.get("creationTimestamp"))
    if approved_at is None:
        approved_at = time.time() if now is None else now
    approval = Approval(
        key=make_key(SOURCE, ns, name),
        agent=agent,
        namespace=ns,
        elevation=elevation,
        approver=approver,
        approved_at=approved_at,
        request_id=request_id,
        duration=duration,
        reason=reason if isinstance(reason, str) else "",
        source=SOURCE,
        name=name,
        uid=str(meta.get("uid", "")),
    )
    return approval, []


# -- what a watcher keeps of an object ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectState:
    """What a watcher last saw of one object: enough to write its status conditionally
    (on the resourceVersion, for the generation) and to weigh a new status against it."""

    name: str
    uid: str
    resource_version: str
    generation: int | None
    status: Mapping[str, Any]


def object_state(obj: Any) -> ObjectState:
    """The ObjectState of an object (a watch event's, a list item, a write's answer); an
    answer that is no object gives an empty one."""
    if not isinstance(obj, Mapping):
        obj = {}
    raw_meta = obj.get("metadata")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    status = obj.get("status")
    generation = meta.get("generation")
    return ObjectState(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        resource_version=str(meta.get("resourceVersion", "")),
        generation=generation
        if isinstance(generation, int) and not isinstance(generation, bool)
        else None,
        status=dict(status) if isinstance(status, Mapping) else {},
    )


def object_key(obj: Mapping[str, Any], namespace: str) -> str:
    """The key of a watched object of ``namespace`` (as Revocation.key / Approval.key)."""
    meta = obj.get("metadata")
    name = meta.get("name", "") if isinstance(meta, Mapping) else ""
    return make_key(SOURCE, namespace, str(name))


# -- an ApprovalSink's answer ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkAnswer:
    """An ApprovalSink's answer for an approval, checked: ``state`` is one of
    ELEVATION_STATES, or "" when the sink has no opinion (the status is left to others)."""

    state: str
    message: str
    grant_id: str
    expires_at: float | None


def answer_from_sink(value: Any) -> tuple[SinkAnswer | None, str]:
    """The sink's (state, message, grant_id, expires_at) as a SinkAnswer, and the problem
    with it ("" if none). None when it is no such tuple; a state that is none of
    ELEVATION_STATES is an answer without an opinion, and a problem."""
    try:
        state, message, grant_id, expires = value
        expires_at = None if expires is None else float(expires)
    except (TypeError, ValueError):
        return None, f"the approval sink answered {value!r}: not (state, message, grant, end)"
    raw = str(state)
    known = _STATE_NAMES.get(raw.lower(), "")
    problem = ""
    if raw and not known:
        problem = (
            f"the approval sink answered state {raw!r}: not one of "
            f"{', '.join(ELEVATION_STATES)}; leaving the status alone"
        )
    return SinkAnswer(known, str(message), str(grant_id), expires_at), problem
