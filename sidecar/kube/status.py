"""The statuses the watchers write on AgentRevocation and AgentElevation objects, as pure
functions of what the object says now and what mandate knows (`reporter` sends them):
conditions, Enforced / Expired / InForceAgain for revocations, an elevation's answer and
the conditions its state implies, and whether this pod's answer replaces the status there
(`elevation_verdict`). No I/O, no library errors.

Conditions follow metav1.Condition (what `kubectl wait --for=condition=...` reads): each has
an observedGeneration, and `lastTransitionTime` moves only when its status changes. kubectl
wait believes a condition only for the current generation, so a status whose generation is
behind the object's is brought up to date (one write per spec change, not a correction).
- AgentRevocation: `Enforced` is True while the sidecars enforce it and False once it ended
  (absent until some sidecar enforced it: one that expired on arrival never was); `Expired`
  is True once spec.expiresAt has passed, absent while in force. Plus status.state and
  status.observedGeneration.
- AgentElevation: `Ready` is True while the grant is in force (state Granted), False
  otherwise with the state as reason; `Expired` and `Invalid` are True in those states and
  absent otherwise (`elevation_conditions`, added when the status is written).

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
when present, Enforced True, no Expired condition); ended, it must say ``Expired`` with
Expired True (and Enforced False, if any); both for the object's generation. The one
tolerated difference: ``Expired`` written for this generation by a pod whose clock runs up
to :data:`SKEW` ahead.

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
    "contradicts",
    "elevation_conditions",
    "elevation_status",
    "elevation_verdict",
    "ended",
    "enforced_status",
    "expired_status",
    "in_force_again_status",
    "revocation_status",
    "set_condition",
    "should_write",
    "without_condition",
]

_MESSAGE_MAX = 1000  # status.message: enough for every problem, bounded for etcd
_RANK = {state: rank for rank, state in enumerate(ELEVATION_STATES)}
# How far apart two pods' clocks may be before one calls the other's time-based status wrong.
SKEW = 5.0
Knowledge = Literal["object", "holder", "profile", "opinion"]
ConditionStatus = Literal["True", "False"]
# The condition types of an AgentElevation (the CRD's enum): Ready, and one for each state
# in which the approval grants nothing and never will (the object must be replaced).
_ELEVATION_CONDITIONS = ("Ready", "Expired", "Invalid")


# -- conditions -----------------------------------------------------------------------------------


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """status.conditions by type (anything that is no condition left out)."""
    out: dict[str, Mapping[str, Any]] = {}
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and isinstance(c.get("type"), str):
            out.setdefault(c["type"], c)
    return out


def _is(condition: Mapping[str, Any] | None, value: ConditionStatus) -> bool:
    return condition is not None and condition.get("status") == value


def _current(condition: Mapping[str, Any] | None, generation: int | None) -> bool:
    return condition is not None and condition.get("observedGeneration") == generation


def _generation(generation: int | None) -> dict[str, int]:
    return {} if generation is None else {"observedGeneration": generation}


def set_condition(
    status: Mapping[str, Any],
    type_: str,
    value: ConditionStatus,
    reason: str,
    message: str,
    stamp: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """status.conditions with the condition ``type_`` set to ``value`` (metav1.Condition's
    shape: its lastTransitionTime kept when its status does not change), the others kept in
    their places. A merge patch replaces a list whole, so the caller sends all of them."""
    condition: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:_MESSAGE_MAX],
        "lastTransitionTime": stamp,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    out: list[dict[str, Any]] = []
    placed = False
    for c in status.get("conditions") or []:
        if not isinstance(c, Mapping):
            continue
        if c.get("type") != type_:
            out.append(dict(c))
            continue
        if placed:
            continue  # a second one of the type: only a forger writes that
        since = c.get("lastTransitionTime")
        if c.get("status") == value and parse_rfc3339(since) is not None:
            condition["lastTransitionTime"] = since
        out.append(condition)
        placed = True
    if not placed:
        out.append(condition)
    return out


def without_condition(status: Mapping[str, Any], type_: str) -> list[dict[str, Any]]:
    """status.conditions without the condition ``type_``."""
    return [
        dict(c)
        for c in status.get("conditions") or []
        if isinstance(c, Mapping) and c.get("type") != type_
    ]


def contradicts(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether the status ``after`` says otherwise than ``before`` (a field, or a condition's
    status), rather than the same for a newer generation: what the reporter counts as a
    correction. Reasons, messages and times of conditions follow their status."""

    def said(status: Mapping[str, Any]) -> dict[str, Any]:
        out = {
            k: v
            for k, v in status.items()
            if k not in ("observedGeneration", "conditions") and v is not None and v != ""
        }
        out["conditions"] = {t: c.get("status") for t, c in _conditions(status).items()}
        return out

    return said(before) != said(after)


# -- AgentRevocation ------------------------------------------------------------------------------


def enforced_status(
    status: Mapping[str, Any], generation: int | None, *, pod: str, stamp: str
) -> dict[str, Any] | None:
    """An AgentRevocation's status once first enforced (by ``pod``); None if it says so
    already. An Expired status (a race with the end: another pod saw it end first) keeps its
    state and conditions; only who enforced it first is added."""
    if status.get("firstEnforcedAt"):
        return None
    first = {"firstEnforcedAt": stamp, "firstEnforcedBy": pod}
    if status.get("state") == "Expired":
        return first
    kept = {"conditions": without_condition(status, "Expired")}
    message = f"enforced by pod {pod} from {stamp}"
    return {
        **first,
        "state": "Enforced",
        **_generation(generation),
        "conditions": set_condition(
            kept, "Enforced", "True", "InForce", message, stamp, generation
        ),
    }


def _ended(
    status: Mapping[str, Any], generation: int | None, *, reason: str, message: str, stamp: str
) -> dict[str, Any]:
    """Expired: Expired True and, if a sidecar had enforced it, Enforced False."""
    conditions = set_condition(status, "Expired", "True", reason, message, stamp, generation)
    if "Enforced" in _conditions(status):
        conditions = set_condition(
            {"conditions": conditions}, "Enforced", "False", "Expired", message, stamp, generation
        )
    return {"state": "Expired", **_generation(generation), "conditions": conditions}


def expired_status(
    status: Mapping[str, Any], generation: int | None, *, reason: str, message: str, stamp: str
) -> dict[str, Any] | None:
    """An AgentRevocation's status once its expiresAt passed (``reason``: Ended, or
    ExpiredOnArrival); None if it says so already."""
    if status.get("state") == "Expired":
        return None
    return _ended(status, generation, reason=reason, message=message, stamp=stamp)


def _in_force(
    status: Mapping[str, Any],
    generation: int | None,
    *,
    pod: str,
    stamp: str,
    reason: str,
    message: str,
) -> dict[str, Any]:
    """Enforced: Enforced True, no Expired condition, who was first (kept if known)."""
    first_at, first_by = status.get("firstEnforcedAt"), status.get("firstEnforcedBy")
    keep = parse_rfc3339(first_at) is not None and isinstance(first_by, str) and bool(first_by)
    kept = {"conditions": without_condition(status, "Expired")}
    return {
        "state": "Enforced",
        **_generation(generation),
        "firstEnforcedAt": first_at if keep else stamp,
        "firstEnforcedBy": first_by if keep else pod,
        "conditions": set_condition(kept, "Enforced", "True", reason, message, stamp, generation),
    }


def _again(expires_at: float | None, pod: str) -> str:
    until = "" if expires_at is None else f" until {utc_seconds(expires_at)}"
    return f"in force again{until}: spec.expiresAt changed (pod {pod})"


def in_force_again_status(
    status: Mapping[str, Any],
    generation: int | None,
    *,
    expires_at: float | None,
    pod: str,
    stamp: str,
) -> dict[str, Any] | None:
    """An Expired AgentRevocation's status once its expiresAt moved ahead (or went): Enforced
    again (InForceAgain), without the Expired condition; None unless it says Expired."""
    if status.get("state") != "Expired":
        return None
    message = _again(expires_at, pod)
    return _in_force(
        status, generation, pod=pod, stamp=stamp, reason="InForceAgain", message=message
    )


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
    enforces it (in force) or saw it end; None if it shows that already, for ``generation``.
    In force: Enforced, firstEnforcedAt/By (kept if present: only the first pod knows them),
    Enforced True, no Expired condition; ended: Expired, Expired True and Enforced False (if
    a sidecar had enforced it). A status that says so for an older generation keeps its
    words (reasons, messages, times) with the generation brought up to date. See the module
    docstring for the one difference tolerated."""
    conditions = _conditions(status)
    state, gone, enforced = (
        status.get("state"),
        conditions.get("Expired"),
        conditions.get("Enforced"),
    )
    up_to_date = status.get("observedGeneration") == generation
    if expires_at is not None and expires_at <= now:
        if (
            state == "Expired"
            and up_to_date
            and _is(gone, "True")
            and _current(gone, generation)
            and (enforced is None or (_is(enforced, "False") and _current(enforced, generation)))
        ):
            return None
        if gone is not None and _is(gone, "True"):
            reason, message = str(gone.get("reason") or "Ended"), str(gone.get("message") or "")
        else:
            reason = "Ended"
            message = f"the revocation ended at {utc_seconds(expires_at)} (spec.expiresAt)"
        return _ended(status, generation, reason=reason, message=message, stamp=stamp)
    if (
        state == "Expired"
        and _is(gone, "True")
        and _current(gone, generation)
        and expires_at is not None
        and expires_at <= now + SKEW
    ):
        return None  # ended by the clock of a pod a moment ahead: not worth a write
    first_at, first_by = status.get("firstEnforcedAt"), status.get("firstEnforcedBy")
    if (
        state == "Enforced"
        and up_to_date
        and gone is None
        and _is(enforced, "True")
        and _current(enforced, generation)
        and parse_rfc3339(first_at) is not None
        and isinstance(first_by, str)
        and first_by
    ):
        return None
    if not status:
        return enforced_status(status, generation, pod=pod, stamp=stamp)
    if enforced is not None and _is(enforced, "True") and gone is None:
        # It says so, for an older generation or without who was first: the same words.
        reason, message = str(enforced.get("reason") or "InForce"), str(enforced.get("message"))
    elif state == "Expired" and gone is not None and not _current(gone, generation):
        # Expired for an older spec: expiresAt moved ahead (or went). In force again.
        reason, message = "InForceAgain", _again(expires_at, pod)
    else:
        reason, message = "InForce", f"enforced by pod {pod}; the status said otherwise at {stamp}"
    return _in_force(status, generation, pod=pod, stamp=stamp, reason=reason, message=message)


# -- AgentElevation -------------------------------------------------------------------------------


def elevation_status(
    state: str, message: str, grant_id: str, expires_at: float | None, generation: int | None
) -> dict[str, Any]:
    """An AgentElevation's status as a merge patch: None removes a field left from before.
    Its conditions follow from the state (`elevation_conditions`, when it is written)."""
    return {
        "state": state,
        "message": message[:_MESSAGE_MAX] or None,
        "grantId": grant_id or None,
        "expiresAt": utc_seconds(expires_at) if expires_at is not None else None,
        "observedGeneration": generation,
    }


def ended(status: Mapping[str, Any]) -> dict[str, Any]:
    """A Granted status once the grant's time is up."""
    answer = {k: v for k, v in status.items() if k != "conditions"}
    return {**answer, "state": "Expired", "message": f"the grant ended at {status['expiresAt']}"}


def _implied(status: Mapping[str, Any]) -> dict[str, ConditionStatus]:
    """The condition types and statuses an elevation's state implies."""
    state = status.get("state")
    out: dict[str, ConditionStatus] = {"Ready": "True" if state == "Granted" else "False"}
    if state in ("Expired", "Invalid"):
        out[str(state)] = "True"
    return out


def elevation_conditions(
    desired: Mapping[str, Any], current: Mapping[str, Any], stamp: str
) -> dict[str, Any]:
    """``desired`` (an `elevation_status`) with the conditions its state implies, to write
    over the status ``current`` (a condition whose status stays keeps its
    lastTransitionTime): Ready True when Granted, else False with the state as reason;
    Expired and Invalid True in those states, absent otherwise."""
    state = str(desired.get("state") or "Unknown")
    raw = desired.get("observedGeneration")
    generation = raw if isinstance(raw, int) else None
    message = str(desired.get("message") or "") or f"state {state}"
    implied = _implied(desired)
    conditions: list[dict[str, Any]] = [
        dict(c)
        for c in current.get("conditions") or []
        if isinstance(c, Mapping) and c.get("type") in _ELEVATION_CONDITIONS
    ]
    for type_ in _ELEVATION_CONDITIONS:
        base = {"conditions": conditions}
        value = implied.get(type_)
        if value is None:
            conditions = without_condition(base, type_)
        else:
            conditions = set_condition(base, type_, value, state, message, stamp, generation)
    return {**desired, "conditions": conditions}


def _present(status: Mapping[str, Any]) -> dict[str, Any]:
    """What a status says, to compare: its fields, and its conditions' types, statuses and
    generations (those its state implies when it has none, as statuses written before
    conditions existed: they are not rewritten for that alone)."""
    out = {k: v for k, v in status.items() if k != "conditions" and v is not None and v != ""}
    if status.get("conditions"):
        out["conditions"] = {
            (t, str(c.get("status")), c.get("observedGeneration"))
            for t, c in _conditions(status).items()
        }
    else:
        generation = status.get("observedGeneration")
        out["conditions"] = {(t, s, generation) for t, s in _implied(status).items()}
    return out


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
        return "" if current.get("state") == "Invalid" and _consistent(current) else "contradicts"
    if knowledge == "holder" and _holder_accepts(current, desired, single=single, now=now):
        return ""
    # `object`, or a holder contradicted: the usual sequence, or a wrong status.
    return "better" if better else "contradicts"


def _consistent(status: Mapping[str, Any]) -> bool:
    """Whether a status's conditions say what its state implies (not, e.g., Ready True on a
    Pending one, which `kubectl wait --for=condition=Ready` would believe)."""
    said: Any = _present(status)["conditions"]
    implied: Any = _present({**status, "conditions": None})["conditions"]
    return bool(said == implied)


def _end(status: Mapping[str, Any]) -> float | None:
    return parse_rfc3339(status.get("expiresAt"))


def _holder_accepts(
    current: Mapping[str, Any], desired: Mapping[str, Any], *, single: bool, now: float
) -> bool:
    """Whether a pod that holds the answer ``desired`` lets the status ``current`` stand."""
    if not _consistent(current):
        return False
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
