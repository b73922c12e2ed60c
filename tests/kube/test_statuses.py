"""The statuses the reporter writes (sidecar/kube/reporter.py's pure functions) and the
values it reads them from (convert.object_state, convert.answer_from_sink): table-driven,
no server, no clock. Also which status a pod's knowledge lets it overwrite (issue 17: a
forged status is corrected by a pod that knows better, never flapped between pods)."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.kube.convert import ObjectState, SinkAnswer, answer_from_sink, object_state
from sidecar.kube.status import (
    SKEW,
    contradicts,
    elevation_conditions,
    elevation_status,
    elevation_verdict,
    ended,
    enforced_status,
    expired_status,
    in_force_again_status,
    revocation_status,
    set_condition,
    should_write,
    without_condition,
)

STAMP = "2030-01-02T03:04:05Z"
LATER = "2030-01-02T04:00:00Z"
END = 1_900_000_000.0  # 2030-03-17T17:46:40Z


def cond(
    type_: str, reason: str = "R", generation: int | None = 1, status: str = "True"
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": "m",
        "lastTransitionTime": STAMP,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def kinds(conditions: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """type -> (status, reason)"""
    return {c["type"]: (c["status"], c["reason"]) for c in conditions}


def test_set_condition_replaces_its_type_in_place_and_keeps_the_others() -> None:
    status = {"conditions": [cond("Enforced", "InForce"), cond("Expired", "Ended"), "junk"]}
    out = set_condition(status, "Enforced", "True", "InForceAgain", "x" * 2000, LATER, 3)
    assert [c["type"] for c in out] == ["Enforced", "Expired"]
    assert out[0]["reason"] == "InForceAgain" and out[0]["observedGeneration"] == 3
    assert len(out[0]["message"]) == 1000  # bounded for etcd
    assert out[1] == cond("Expired", "Ended")
    assert (
        "observedGeneration" not in set_condition({}, "Enforced", "True", "R", "m", STAMP, None)[0]
    )
    assert without_condition(status, "Expired") == [cond("Enforced", "InForce")]


def test_a_conditions_transition_time_moves_only_when_its_status_changes() -> None:
    """metav1.Condition: lastTransitionTime is when the status last changed, not when the
    condition was last written (a refresh for a new generation keeps it)."""
    status = {"conditions": [cond("Enforced", "InForce")]}
    same = set_condition(status, "Enforced", "True", "InForce", "m", LATER, 2)
    assert same[0]["lastTransitionTime"] == STAMP and same[0]["observedGeneration"] == 2
    flipped = set_condition(status, "Enforced", "False", "Expired", "m", LATER, 2)
    assert flipped[0]["lastTransitionTime"] == LATER
    doubled = {"conditions": [cond("Expired"), cond("Expired", "Forged")]}
    assert len(set_condition(doubled, "Expired", "True", "Ended", "m", LATER, 1)) == 1


def test_enforced_is_written_once() -> None:
    first = enforced_status({}, 1, pod="pod-a", stamp=STAMP)
    assert first is not None
    assert (first["firstEnforcedAt"], first["firstEnforcedBy"], first["state"]) == (
        STAMP,
        "pod-a",
        "Enforced",
    )
    assert first["observedGeneration"] == 1
    assert kinds(first["conditions"]) == {"Enforced": ("True", "InForce")}
    assert enforced_status(first, 1, pod="pod-b", stamp=STAMP) is None
    # An Expired status written first (a race with the end) stays Expired, Enforced nowhere:
    # only who enforced it first is added.
    expired = {"state": "Expired", "conditions": [cond("Expired", "Ended")]}
    raced = enforced_status(expired, 1, pod="pod-a", stamp=STAMP)
    assert raced == {"firstEnforcedAt": STAMP, "firstEnforcedBy": "pod-a"}


def test_expired_is_written_once_and_says_it_is_no_longer_enforced() -> None:
    out = expired_status({}, 2, reason="ExpiredOnArrival", message="never", stamp=STAMP)
    assert out is not None and out["state"] == "Expired" and out["observedGeneration"] == 2
    # Never enforced: no Enforced condition at all.
    assert kinds(out["conditions"]) == {"Expired": ("True", "ExpiredOnArrival")}
    assert expired_status(out, 2, reason="Ended", message="ended", stamp=STAMP) is None
    was = {"state": "Enforced", "conditions": [cond("Enforced", "InForce")]}
    out = expired_status(was, 2, reason="Ended", message="ended", stamp=LATER)
    assert out is not None
    assert kinds(out["conditions"]) == {
        "Enforced": ("False", "Expired"),
        "Expired": ("True", "Ended"),
    }
    assert {c["lastTransitionTime"] for c in out["conditions"]} == {LATER}


def test_in_force_again_drops_the_expired_condition() -> None:
    status = {
        "state": "Expired",
        "firstEnforcedAt": "2029-01-01T00:00:00Z",
        "firstEnforcedBy": "pod-z",
        "conditions": [cond("Enforced", "InForce"), cond("Expired", "Ended")],
    }
    out = in_force_again_status(status, 2, expires_at=END, pod="pod-a", stamp=STAMP)
    assert out is not None and out["state"] == "Enforced" and out["observedGeneration"] == 2
    assert (out["firstEnforcedAt"], out["firstEnforcedBy"]) == ("2029-01-01T00:00:00Z", "pod-z")
    assert kinds(out["conditions"]) == {"Enforced": ("True", "InForceAgain")}
    assert "until 2030-03-17T17:46:40Z" in out["conditions"][0]["message"]
    assert (
        in_force_again_status({"state": "Enforced"}, 2, expires_at=None, pod="p", stamp=STAMP)
        is None
    )


def test_an_elevation_status_removes_what_the_answer_lacks() -> None:
    assert elevation_status("Invalid", "", "", None, 1) == {
        "state": "Invalid",
        "message": None,
        "grantId": None,
        "expiresAt": None,
        "observedGeneration": 1,
    }
    granted = elevation_status("Granted", "ok", "g-1", END, 2)
    assert granted["expiresAt"] == "2030-03-17T17:46:40Z"
    assert ended(granted) == {
        **granted,
        "state": "Expired",
        "message": "the grant ended at 2030-03-17T17:46:40Z",
    }


def st(state: str, generation: int = 1, **more: Any) -> dict[str, Any]:
    return elevation_status(state, more.pop("message", ""), "", None, generation) | more


@pytest.mark.parametrize(
    ("current", "desired", "write"),
    [
        ({}, st("Invalid"), True),  # nothing written yet
        (st("Invalid"), st("Invalid"), False),  # the same answer
        (st("Invalid", message="a"), st("Invalid", message="b"), False),  # equal rank
        (st("Invalid"), st("Pending"), True),
        (st("Pending"), st("Granted"), True),
        (st("Granted"), st("Expired"), True),
        (st("Granted"), st("Invalid"), False),  # worse informed
        (st("Expired"), st("Granted"), False),
        (st("Granted", 1), st("Invalid", 2), True),  # an answer for a newer generation
        (st("Granted", 2), st("Granted", 1), True),  # generations differ: rewrite
        ({"state": "Weird", "observedGeneration": 1}, st("Invalid"), True),
    ],
)
def test_should_write_ranks_the_answers(
    current: dict[str, Any], desired: dict[str, Any], write: bool
) -> None:
    assert should_write(current, desired) is write


def test_object_state() -> None:
    obj = {
        "metadata": {"name": "a", "uid": "u", "resourceVersion": 7, "generation": 3},
        "status": {"state": "Granted"},
    }
    assert object_state(obj) == ObjectState("a", "u", "7", 3, {"state": "Granted"})
    assert object_state({"metadata": {"generation": True}}).generation is None
    assert object_state("not an object") == ObjectState("", "", "", None, {})


@pytest.mark.parametrize(
    ("value", "answer", "problem"),
    [
        (("Granted", "ok", "g-1", END), SinkAnswer("Granted", "ok", "g-1", END), ""),
        (("granted", "ok", "g-1", "12"), SinkAnswer("Granted", "ok", "g-1", 12.0), ""),
        (("refused", "no", "", None), SinkAnswer("Invalid", "no", "", None), ""),
        (("", "", "", None), SinkAnswer("", "", "", None), ""),  # no opinion
        (("Maybe", "?", "", None), SinkAnswer("", "?", "", None), "state 'Maybe': not one of"),
        (("Granted", "no end"), None, "not (state, message, grant, end)"),
        (("Granted", "m", "g", "soon"), None, "not (state, message, grant, end)"),
        (None, None, "not (state, message, grant, end)"),
    ],
)
def test_answer_from_sink(value: Any, answer: SinkAnswer | None, problem: str) -> None:
    got, why = answer_from_sink(value)
    assert got == answer
    assert (problem in why) if problem else why == ""


# -- issue 17: a status that contradicts what a pod knows ----------------------------------------

NOW = 1_900_000_000.0  # END, as "now"


def rev_status(state: str | None, *conds: dict[str, Any], **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"conditions": list(conds), **more}
    if state is not None:
        out["state"] = state
    return out


FIRST = {"firstEnforcedAt": "2029-01-01T00:00:00Z", "firstEnforcedBy": "pod-z"}
GOOD = rev_status("Enforced", cond("Enforced", "InForce"), observedGeneration=1, **FIRST)


def revst(status: dict[str, Any], expires_at: float | None, generation: int = 1) -> Any:
    return revocation_status(
        status, generation, expires_at=expires_at, now=NOW, pod="pod-a", stamp=STAMP
    )


def test_a_revocation_in_force_that_shows_it_is_left_alone() -> None:
    assert revst(GOOD, None) is None
    assert revst(GOOD, NOW + 60) is None


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("forged-expired", rev_status("Expired", cond("Enforced"), cond("Expired"), **FIRST)),
        ("expired-no-condition", rev_status("Expired", cond("Enforced"), **FIRST)),
        (
            "condition-false",
            rev_status("Enforced", {**cond("Enforced"), "status": "False"}, **FIRST),
        ),
        ("no-state", rev_status(None, **FIRST)),
        ("no-first", rev_status("Enforced", cond("Enforced"))),
        (
            "stray-expired-condition",
            rev_status("Enforced", cond("Enforced"), cond("Expired"), **FIRST),
        ),
    ],
)
def test_a_revocation_in_force_that_says_otherwise_is_corrected(
    name: str, status: dict[str, Any]
) -> None:
    out = revst(status, None)
    assert out is not None and out["state"] == "Enforced", name
    types = {c["type"]: c for c in out["conditions"]}
    assert set(types) == {"Enforced"} and types["Enforced"]["status"] == "True"
    if "firstEnforcedAt" in status:  # only the first pod knows them: kept
        assert (out["firstEnforcedAt"], out["firstEnforcedBy"]) == (
            FIRST["firstEnforcedAt"],
            FIRST["firstEnforcedBy"],
        )
    else:
        assert (out["firstEnforcedAt"], out["firstEnforcedBy"]) == (STAMP, "pod-a")
    assert revst({**status, **out}, None) is None  # one write settles it


def test_an_empty_status_gets_the_first_enforcement() -> None:
    assert revst({}, None) == enforced_status({}, 1, pod="pod-a", stamp=STAMP)


def test_an_ended_revocation_shows_expired_and_not_enforced() -> None:
    """Issue 19 (7): Enforced stayed True after the end, so `kubectl wait
    --for=condition=Enforced` said an ended revocation was enforced."""
    out = revst(GOOD, NOW - 1)
    assert out is not None and out["state"] == "Expired"
    assert kinds(out["conditions"]) == {
        "Enforced": ("False", "Expired"),
        "Expired": ("True", "Ended"),
    }
    assert revst({**GOOD, **out}, NOW - 1) is None
    old_history = rev_status(
        "Expired", cond("Enforced"), cond("Expired", "Ended"), observedGeneration=1, **FIRST
    )  # as statuses were written before: Enforced True kept "as history"
    fixed = revst(old_history, NOW - 1)
    assert fixed is not None and kinds(fixed["conditions"])["Enforced"] == ("False", "Expired")
    expired = rev_status("Expired", cond("Expired", "ExpiredOnArrival"), observedGeneration=1)
    assert revst(expired, NOW - 1) is None  # whatever the reason, it says so


@pytest.mark.parametrize("ends", [None, NOW - 1], ids=["in-force", "ended"])
def test_a_status_for_an_older_generation_is_brought_up_to_date_in_its_own_words(
    ends: float | None,
) -> None:
    """kubectl wait believes a condition only for the object's generation: after a spec
    change the conditions must say the new one. The same words, not a correction."""
    settled = revst({}, ends) if ends is None else revst(GOOD, ends)
    assert settled is not None
    status = {**GOOD, **settled}
    assert revst(status, ends) is None
    out = revst(status, ends, generation=2)
    assert out is not None and out["observedGeneration"] == 2
    assert {c["observedGeneration"] for c in out["conditions"]} == {2}
    assert [{**c, "observedGeneration": 1} for c in out["conditions"]] == status["conditions"]
    assert not contradicts(status, {**status, **out})
    assert revst({**status, **out}, ends, generation=2) is None


def test_expired_a_moment_early_by_another_pods_clock_is_tolerated() -> None:
    early = rev_status(
        "Expired",
        cond("Enforced", status="False"),
        cond("Expired", "Ended", 1),
        observedGeneration=1,
        **FIRST,
    )
    assert revst(early, NOW + SKEW / 2) is None
    assert revst(early, NOW + SKEW + 60) is not None  # not a clock: wrong
    # An Expired of an older generation: expiresAt moved ahead, in force again.
    again = revst(early, NOW + SKEW / 2, generation=2)
    assert again is not None and again["state"] == "Enforced"
    assert again["conditions"][-1]["reason"] == "InForceAgain"


def el(
    state: str, grant: str = "", end: float | None = None, generation: int = 1, message: str = "m"
) -> dict[str, Any]:
    return elevation_status(state, message, grant, end, generation)


def verdict(
    current: dict[str, Any],
    desired: dict[str, Any],
    knowledge: str,
    single: bool = True,
    now: float = NOW - 600,
) -> str:
    return elevation_verdict(
        current,
        desired,
        knowledge=knowledge,  # type: ignore[arg-type]
        single=single,
        now=now,
    )


MINE = el("Granted", "g-a", END, message="grant g-a")


@pytest.mark.parametrize(
    ("name", "current", "desired", "knowledge", "single", "now", "expected"),
    [
        # The usual sequence: an opinion first, then the holder.
        ("nothing-yet", {}, el("Invalid"), "opinion", True, NOW, "new"),
        ("holder-over-opinion", el("Invalid"), MINE, "holder", True, NOW - 600, "better"),
        ("opinion-never-over-holder", MINE, el("Invalid"), "opinion", True, NOW, ""),
        (
            "opinion-not-over-other-opinion",
            el("Invalid", message="x"),
            el("Invalid"),
            "opinion",
            True,
            NOW,
            "",
        ),
        (
            "forged-state",
            {"state": "Denied", "observedGeneration": 1},
            el("Invalid"),
            "opinion",
            True,
            NOW,
            "new",
        ),
        (
            "forged-generation",
            {**MINE, "observedGeneration": 7},
            el("Invalid"),
            "opinion",
            True,
            NOW,
            "generation",
        ),
        # One holder (the approval names its request): anything but its own answer is wrong.
        ("own-answer", MINE, MINE, "holder", True, NOW - 600, ""),
        (
            "forged-grant",
            el("Granted", "g-forged", END),
            MINE,
            "holder",
            True,
            NOW - 600,
            "contradicts",
        ),
        (
            "forged-longer",
            el("Granted", "g-a", END + 3600),
            MINE,
            "holder",
            True,
            NOW - 600,
            "contradicts",
        ),
        (
            "forged-message",
            el("Granted", "g-a", END, message="by the CEO"),
            MINE,
            "holder",
            True,
            NOW - 600,
            "contradicts",
        ),
        (
            "forged-expired",
            el("Expired", "g-a", END),
            MINE,
            "holder",
            True,
            NOW - 600,
            "contradicts",
        ),
        ("forged-lapsed", el("Expired"), MINE, "holder", True, NOW - 600, "contradicts"),
        (
            "ended-a-moment-early",
            el("Expired", "g-a", END),
            MINE,
            "holder",
            True,
            END - SKEW / 2,
            "",
        ),
        ("own-end", MINE, ended(MINE), "holder", True, END, "better"),
        ("granted-after-own-end", ended(MINE), MINE, "holder", True, END + 1, ""),
        (
            "lapsed-holder-any-expired",
            el("Expired", "g-old", END),
            el("Expired", message="lapsed"),
            "holder",
            True,
            NOW,
            "",
        ),
        (
            "lapsed-holder-forged-grant",
            el("Granted", "g-x", END),
            el("Expired", message="lapsed"),
            "holder",
            True,
            NOW,
            "better",
        ),
        (
            "pending-holder",
            el("Granted", "g-x", END),
            el("Pending"),
            "holder",
            True,
            NOW,
            "contradicts",
        ),
        # Every pod grants (no request named): each its own grant id, the latest end stands.
        ("peer-grant-same-end", el("Granted", "g-b", END), MINE, "holder", False, NOW - 600, ""),
        ("peer-grant-longer", el("Granted", "g-b", END + 60), MINE, "holder", False, NOW - 600, ""),
        (
            "peer-grant-shorter",
            el("Granted", "g-b", END - 60),
            MINE,
            "holder",
            False,
            NOW - 600,
            "contradicts",
        ),
        ("peer-ended-first", el("Expired", "g-b", END), MINE, "holder", False, END - SKEW / 2, ""),
        (
            "forged-ended-early",
            el("Expired", "g-b", END),
            MINE,
            "holder",
            False,
            NOW - 600,
            "contradicts",
        ),
        (
            "own-end-over-peer-grant",
            el("Granted", "g-b", END),
            ended(MINE),
            "holder",
            False,
            END,
            "better",
        ),
        (
            "own-end-under-longer-peer",
            el("Granted", "g-b", END + 60),
            ended(MINE),
            "holder",
            False,
            END,
            "",
        ),
        ("own-end-peer-ended", el("Expired", "g-b", END), ended(MINE), "holder", False, END, ""),
        # The object is invalid: everyone knows.
        (
            "object-invalid",
            MINE,
            el("Invalid", message="spec.duration"),
            "object",
            True,
            NOW,
            "contradicts",
        ),
        (
            "object-invalid-same-state",
            el("Invalid", message="x"),
            el("Invalid", message="y"),
            "object",
            True,
            NOW,
            "contradicts",
        ),
        # The profiles say no elevation (no request named): corrects (the reporter: once).
        (
            "profile-over-granted",
            el("Granted", "g-x", END),
            el("Invalid"),
            "profile",
            False,
            NOW,
            "contradicts",
        ),
        (
            "profile-other-invalid",
            el("Invalid", message="x"),
            el("Invalid"),
            "profile",
            False,
            NOW,
            "",
        ),
    ],
)
def test_elevation_verdict(
    name: str,
    current: dict[str, Any],
    desired: dict[str, Any],
    knowledge: str,
    single: bool,
    now: float,
    expected: str,
) -> None:
    assert verdict(current, desired, knowledge, single, now) == expected, name


def test_should_write_is_the_verdict_of_an_opinion() -> None:
    for current in ({}, el("Invalid"), MINE, ended(MINE)):
        for desired in (el("Invalid"), el("Pending"), MINE, ended(MINE)):
            assert should_write(current, desired) is bool(verdict(current, desired, "opinion"))


# -- conditions of an AgentElevation, and what counts as a correction ----------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("Granted", {"Ready": ("True", "Granted")}),
        ("Pending", {"Ready": ("False", "Pending")}),
        ("Invalid", {"Ready": ("False", "Invalid"), "Invalid": ("True", "Invalid")}),
        ("Expired", {"Ready": ("False", "Expired"), "Expired": ("True", "Expired")}),
    ],
)
def test_an_elevations_conditions_follow_its_state(
    state: str, expected: dict[str, tuple[str, str]]
) -> None:
    out = elevation_conditions(el(state, message="why"), {}, STAMP)
    assert kinds(out["conditions"]) == expected
    assert {c["observedGeneration"] for c in out["conditions"]} == {1}
    assert {c["message"] for c in out["conditions"]} == {"why"}
    assert {k: v for k, v in out.items() if k != "conditions"} == el(state, message="why")


def test_an_elevations_conditions_move_with_its_state() -> None:
    granted = elevation_conditions(MINE, elevation_conditions(el("Pending"), {}, STAMP), LATER)
    assert kinds(granted["conditions"]) == {"Ready": ("True", "Granted")}
    assert granted["conditions"][0]["lastTransitionTime"] == LATER
    over = elevation_conditions(ended(MINE), granted, "2030-03-17T17:46:40Z")
    assert kinds(over["conditions"]) == {
        "Ready": ("False", "Expired"),
        "Expired": ("True", "Expired"),
    }
    # Rewritten in the same state (a new message): the times stay.
    again = elevation_conditions({**ended(MINE), "message": "x"}, over, "2031-01-01T00:00:00Z")
    assert [c["lastTransitionTime"] for c in again["conditions"]] == [
        c["lastTransitionTime"] for c in over["conditions"]
    ]


def test_the_verdict_reads_an_elevations_conditions() -> None:
    """A status written with conditions equals its answer; one without (written before
    conditions existed) is not rewritten for that alone; a forged condition is wrong."""
    written = elevation_conditions(MINE, {}, STAMP)
    assert verdict(written, MINE, "holder") == ""
    assert verdict(MINE, MINE, "holder") == ""
    forged = {**written, "conditions": [cond("Ready", "Granted", status="False")]}
    assert verdict(forged, MINE, "holder") == "contradicts"
    pending = elevation_conditions(el("Pending"), {}, STAMP)
    lying = {**pending, "conditions": [cond("Ready", "Granted")]}
    assert verdict(lying, el("Pending"), "holder") == "contradicts"
    invalid = elevation_conditions(el("Invalid"), {}, STAMP)
    assert verdict(invalid, el("Invalid"), "profile", single=False) == ""
    ready = {**invalid, "conditions": [cond("Ready", "Granted")]}
    assert verdict(ready, el("Invalid"), "profile", single=False) == "contradicts"


def test_only_a_changed_meaning_is_a_correction() -> None:
    assert contradicts(GOOD, {**GOOD, "state": "Expired"})
    assert contradicts(GOOD, {**GOOD, "conditions": [cond("Enforced", status="False")]})
    assert contradicts({}, GOOD)
    newer = {**GOOD, "observedGeneration": 2, "conditions": [cond("Enforced", "Other", 2)]}
    assert not contradicts(GOOD, newer)
