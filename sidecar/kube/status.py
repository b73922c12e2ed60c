"""The statuses the watchers write on AgentRevocation and AgentElevation objects, as pure
functions of what the object says now and what mandate knows (`reporter` sends them):
conditions, Enforced / Expired / InForceAgain for revocations, an elevation's answer, and
which of two elevation answers wins (`should_write`). No I/O, no library errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.core.timefmt import utc_seconds
from sidecar.kube.convert import ELEVATION_STATES

__all__ = [
    "elevation_status",
    "ended",
    "enforced_status",
    "expired_status",
    "in_force_again_status",
    "should_write",
    "with_condition",
]

_MESSAGE_MAX = 1000  # status.message: enough for every problem, bounded for etcd
_RANK = {state: rank for rank, state in enumerate(ELEVATION_STATES)}


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
    """Whether this pod's answer should replace the object's status.

    Every sidecar of the namespace answers for every AgentElevation, but only the pod that
    holds the agent's request knows it can grant; the others answer, say, Invalid ("no
    such request"). So for one generation of the object a status is replaced only by a
    better-informed state (ELEVATION_STATES order), never by an equal or worse one: the
    writes end after at most one per state, and the status the operator sees is the best
    answer any pod had."""
    if _present(current) == _present(desired):
        return False
    if current.get("observedGeneration") != desired.get("observedGeneration"):
        return True  # an answer for an older version of the object
    return _RANK.get(desired["state"], -1) > _RANK.get(current.get("state", ""), -1)
