"""The statuses the watchers write on AgentRevocation and AgentElevation objects, as pure
functions of what the object says now and what mandate knows (`reporter` sends them):
conditions, Enforced / Expired / InForceAgain for revocations, an elevation's answer, and
whether this pod's answer replaces the status there (`elevation_verdict`). No I/O, no
library errors.

The status is for people (mandate never reads it to decide), but a status that says
otherwise than the sidecars know misleads the operator: "Expired" on a revocation that is
still enforced, "Enforced" on one that ended, "Granted" on an approval nobody granted, or
"Invalid" on one that holds a live grant. Anyone allowed to patch the status subresource can
write one (issue 17: the agent could, with the pod's token; the injection now keeps the token
out of its containers). So a sidecar that *knows* better overwrites it, and one that does not
know leaves it alone, so that several sidecars never take turns:

AgentRevocation (`revocation_status`): every sidecar of the namespace enforces every
revocation, and whether it is in force depends only on the object and the time, so every
pod knows the answer: in force, the status must say ``Enforced`` (firstEnforcedAt/By kept
when present, an Enforced condition, no Expired one); ended, it must say ``Expired`` with an
Expired condition. The one tolerated difference: ``Expired`` written for this generation by a
pod whose clock runs up to :data:`SKEW` ahead.

AgentElevation (`elevation_verdict`): several pods answer for one object, and only some
know. What this pod's answer rests on (its *knowledge*) decides what it may overwrite:

- ``object``: the object itself is invalid (the watcher's own check; every pod finds the
  same): any other status is replaced.
- ``holder``: the sink holds the request or the grant (Granted with its grantId, Expired,
  Pending). A status that contradicts it is replaced: for an approval that names a request
  (one pod holds it) anything but this pod's own answer; for one without (every pod with the
  profile grants, each its own grantId, all ending at the same time), a Granted/Expired whose
  end is earlier than this pod's (the latest end stands, so pods whose profiles briefly
  disagree on maxDuration still agree on one status). Expired in place of this pod's Granted
  is accepted once the end is within SKEW.
- ``profile``: Invalid for an approval without a request (no profile, no such elevation, a
  duration over maxDuration): every pod with the same profiles agrees, but a pod whose
  profiles lag might grant; it replaces a contradicting status once per object generation.
- ``opinion``: Invalid for an approval that names a request: perhaps only "I do not hold it".
  It writes only over nothing or a state no sidecar writes (the ranks of ELEVATION_STATES),
  never over a better-informed pod's answer.

A status of an older generation (or one forged with another) is always replaced. The
reporter caps the corrections one pod makes per object generation (a writer that keeps
rewriting the status wins, and the pod logs that it gave up), so no disagreement the rules
above did not foresee can make pods write forever. What no pod can refute: a Granted for a
request that no running pod holds (the pod that would know is gone, or never existed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from sidecar.core.timefmt import parse_rfc3339, utc_seconds
from sidecar.kube.convert import ELEVATION_STATES

__all__ = [
    "SKEW",
    "Knowledge",
    "elevation_status",
    "elevation_verdict",
    "ended",
    "enforced_status",
    "expired_status",
    "in_force_again_status",
    "revocation_status",
    "should_write",
    "with_condition",
]

_MESSAGE_MAX = 1000  # status.message: enough for every problem, bounded for etcd
_RANK = {state: rank for rank, state in enumerate(ELEVATION_STATES)}
# How far apart two pods' clocks may be before one calls the other's time-based status wrong.
SKEW = 5.0
Knowledge = Literal["object", "holder", "profile", "opinion"]


def with_condition(
    status: Mapping[str, Any],
    type_: str,
    reason: str,
    message: str,
    stamp: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """status.conditions with the condition `type_` set True (metav1.Condition's shape);
    the others kept. A merge patch replaces a list whole, so the caller sends all of them."""
    kept = [
        dict(c)
        for c in status.get("conditions") or []
        if isinstance(c, Mapping) and c.get("type") != type_
    ]
    condition: dict[str, Any] = {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message[:_MESSAGE_MAX],
        "lastTransitionTime": stamp,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return [*kept, condition]


def enforced_status(
    status: Mapping[str, Any], generation: int | None, *, pod: str, stamp: str
) -> dict[str, Any] | None:
    """An AgentRevocation's status once first enforced (by ``pod``); None if it says so
    already."""
    if status.get("firstEnforcedAt"):
        return None
    return {
        "firstEnforcedAt": stamp,
        "firstEnforcedBy": pod,
        # An Expired state written first (a race with the end) stays.
        "state": status.get("state") or "Enforced",
        "conditions": with_condition(
            status, "Enforced", "InForce", f"enforced by pod {pod} from {stamp}", stamp, generation
        ),
    }


def expired_status(
    status: Mapping[str, Any], generation: int | None, *, reason: str, message: str, stamp: str
) -> dict[str, Any] | None:
    """An AgentRevocation's status once its expiresAt passed; None if it says so already."""
    if status.get("state") == "Expired":
        return None
    conditions = with_condition(status, "Expired", reason, message, stamp, generation)
    return {"state": "Expired", "conditions": conditions}


def in_force_again_status(
    status: Mapping[str, Any],
    generation: int | None,
    *,
    expires_at: float | None,
    pod: str,
    stamp: str,
) -> dict[str, Any] | None:
    """An Expired AgentRevocation's status once its expiresAt moved ahead (or went): Enforced
    again, without the Expired condition; None unless it says Expired."""
    if status.get("state") != "Expired":
        return None
    kept = {**status, "conditions": [
        c for c in status.get("conditions") or []
        if isinstance(c, Mapping) and c.get("type") != "Expired"
    ]}  # fmt: skip
    until = "" if expires_at is None else f" until {utc_seconds(expires_at)}"
    return {
        "state": "Enforced",
        "firstEnforcedAt": status.get("firstEnforcedAt") or stamp,
        "firstEnforcedBy": status.get("firstEnforcedBy") or pod,
        "conditions": with_condition(
            kept,
            "Enforced",
            "InForceAgain",
            f"in force again{until}: spec.expiresAt changed (pod {pod})",
            stamp,
            generation,
        ),
    }


def elevation_status(
    state: str, message: str, grant_id: str, expires_at: float | None, generation: int | None
) -> dict[str, Any]:
    """An AgentElevation's status as a merge patch: None removes a field left from before."""
    return {
        "state": state,
        "message": message[:_MESSAGE_MAX] or None,
        "grantId": grant_id or None,
        "expiresAt": utc_seconds(expires_at) if expires_at is not None else None,
        "observedGeneration": generation,
    }


def ended(status: Mapping[str, Any]) -> dict[str, Any]:
    """A Granted status once the grant's time is up."""
    return {**status, "state": "Expired", "message": f"the grant ended at {status['expiresAt']}"}


def _present(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if v is not None and v != ""}


def should_write(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether an answer without knowledge (an ``opinion``) replaces the object's status:
    for one generation only by a better-informed state (ELEVATION_STATES order)."""
    return bool(elevation_verdict(current, desired, knowledge="opinion", single=True, now=0.0))


def elevation_verdict(
    current: Mapping[str, Any],
    desired: Mapping[str, Any],
    *,
    knowledge: Knowledge,
    single: bool,
    now: float,
) -> str:
    """Why this pod's answer ``desired`` replaces the status ``current``: "" if it does not;
    "new" (no status, or a state no sidecar writes), "generation" (a status for another
    generation), "better" (a state ranked higher in ELEVATION_STATES, as in the usual
    sequence), "contradicts" (a status this pod knows to be wrong that ranks no lower than
    its answer; the reporter logs it and caps how often). ``single``:
    the approval names a request, so at most one pod holds it. See the module docstring."""
    if _present(current) == _present(desired):
        return ""
    rank = _RANK.get(str(current.get("state", "")), -1)
    if rank < 0:
        return "new"
    if current.get("observedGeneration") != desired.get("observedGeneration"):
        return "generation"
    better = _RANK.get(str(desired.get("state", "")), -1) > rank
    if knowledge == "opinion":
        return "better" if better else ""
    if knowledge == "profile":
        if better:
            return "better"
        return "" if current.get("state") == "Invalid" else "contradicts"
    if knowledge == "holder" and _holder_accepts(current, desired, single=single, now=now):
        return ""
    # `object`, or a holder contradicted: the usual sequence, or a wrong status.
    return "better" if better else "contradicts"


def _end(status: Mapping[str, Any]) -> float | None:
    return parse_rfc3339(status.get("expiresAt"))


def _holder_accepts(
    current: Mapping[str, Any], desired: Mapping[str, Any], *, single: bool, now: float
) -> bool:
    """Whether a pod that holds the answer ``desired`` lets the status ``current`` stand."""
    state, there = desired.get("state"), current.get("state")
    grant = desired.get("grantId")
    if state in ("Granted", "Expired") and grant:
        mine, end = _end(desired), _end(current)
        if mine is None or end is None:
            return False
        if single:  # one holder: its own grant, exactly, or its end reported a moment early
            if current.get("grantId") != grant or end != mine:
                return False
            if there == "Expired" and state == "Granted":
                return mine <= now + SKEW
            return there == state and _present(current) == _present(desired)
        # Every pod with the profile granted: the latest end stands.
        if there == "Granted":
            if state == "Granted":
                return end >= mine
            return end > mine and end > now - SKEW  # a peer's longer grant, still running
        if there == "Expired":
            if state == "Granted":
                return end >= mine and end <= now + SKEW  # a peer's end, come (nearly) as ours
            return end >= mine
        return False
    if state == "Expired":  # the request this pod held lapsed before the approval
        return there == "Expired"
    if state == "Pending":
        return there == "Pending"
    return _present(current) == _present(desired)


# -- AgentRevocation: what a pod that enforces it knows -------------------------------------------


def revocation_status(
    status: Mapping[str, Any],
    generation: int | None,
    *,
    expires_at: float | None,
    now: float,
    pod: str,
    stamp: str,
) -> dict[str, Any] | None:
    """The status (a merge patch) an AgentRevocation must show according to a pod that
    enforces it (in force) or saw it end; None if it shows that already. In force: Enforced,
    firstEnforcedAt/By (kept if present: only the first pod knows them), an Enforced
    condition, no Expired one; ended: Expired and an Expired condition (the Enforced one is
    kept, as history). See the module docstring for the one difference tolerated."""
    conditions = {
        str(c.get("type")): c for c in status.get("conditions") or [] if isinstance(c, Mapping)
    }
    state, gone = status.get("state"), conditions.get("Expired")
    if expires_at is not None and expires_at <= now:
        if state == "Expired" and gone is not None and gone.get("status") == "True":
            return None
        message = f"the revocation ended at {utc_seconds(expires_at)} (spec.expiresAt)"
        return {
            "state": "Expired",
            "conditions": with_condition(status, "Expired", "Ended", message, stamp, generation),
        }
    if (
        state == "Expired"
        and gone is not None
        and gone.get("observedGeneration") == generation
        and expires_at is not None
        and expires_at <= now + SKEW
    ):
        return None  # ended by the clock of a pod a moment ahead: not worth a write
    if gone is not None and gone.get("observedGeneration") != generation:
        # Expired for an older spec: expiresAt moved ahead (or went). In force again.
        return in_force_again_status(
            {**status, "state": "Expired"}, generation, expires_at=expires_at, pod=pod, stamp=stamp
        )
    enforced = conditions.get("Enforced")
    first_at, first_by = status.get("firstEnforcedAt"), status.get("firstEnforcedBy")
    if (
        state == "Enforced"
        and gone is None
        and enforced is not None
        and enforced.get("status") == "True"
        and parse_rfc3339(first_at) is not None
        and isinstance(first_by, str)
        and first_by
    ):
        return None
    if not status:
        return enforced_status(status, generation, pod=pod, stamp=stamp)
    kept = {**status, "conditions": [c for t, c in conditions.items() if t != "Expired"]}
    if enforced is not None and enforced.get("status") == "True" and gone is None:
        fixed = list(kept["conditions"])
    else:
        fixed = with_condition(
            kept,
            "Enforced",
            "InForce",
            f"enforced by pod {pod}; the status said otherwise at {stamp}",
            stamp,
            generation,
        )
    keep_first = parse_rfc3339(first_at) is not None and isinstance(first_by, str) and first_by
    return {
        "state": "Enforced",
        "firstEnforcedAt": first_at if keep_first else stamp,
        "firstEnforcedBy": first_by if keep_first else pod,
        "conditions": fixed,
    }
