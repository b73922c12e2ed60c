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
    elevation_status,
    elevation_verdict,
    ended,
    enforced_status,
    expired_status,
    in_force_again_status,
    revocation_status,
    should_write,
    with_condition,
)

STAMP = "2030-01-02T03:04:05Z"
END = 1_900_000_000.0  # 2030-03-17T17:46:40Z


def cond(type_: str, reason: str = "R", generation: int | None = 1) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": "m",
        "lastTransitionTime": STAMP,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def test_with_condition_replaces_its_type_and_keeps_the_others() -> None:
    status = {"conditions": [cond("Enforced", "InForce"), cond("Expired", "Ended"), "junk"]}
    out = with_condition(status, "Expired", "ExpiredOnArrival", "x" * 2000, STAMP, 3)
    assert [c["type"] for c in out] == ["Enforced", "Expired"]
    assert out[1]["reason"] == "ExpiredOnArrival" and out[1]["observedGeneration"] == 3
    assert len(out[1]["message"]) == 1000  # bounded for etcd
    assert "observedGeneration" not in with_condition({}, "Enforced", "R", "m", STAMP, None)[0]


def test_enforced_is_written_once() -> None:
    first = enforced_status({}, 1, pod="pod-a", stamp=STAMP)
    assert first is not None
    assert (first["firstEnforcedAt"], first["firstEnforcedBy"], first["state"]) == (
        STAMP,
        "pod-a",
        "Enforced",
    )
    assert [c["reason"] for c in first["conditions"]] == ["InForce"]
    assert enforced_status(first, 1, pod="pod-b", stamp=STAMP) is None
    # An Expired state written first (a race with the end) stays.
    raced = enforced_status({"state": "Expired"}, 1, pod="pod-a", stamp=STAMP)
    assert raced is not None and raced["state"] == "Expired"


def test_expired_is_written_once() -> None:
    out = expired_status({}, 2, reason="Ended", message="ended", stamp=STAMP)
    assert out is not None and out["state"] == "Expired"
    assert out["conditions"][0]["reason"] == "Ended"
    assert expired_status(out, 2, reason="Ended", message="ended", stamp=STAMP) is None


def test_in_force_again_drops_the_expired_condition() -> None:
    status = {
        "state": "Expired",
        "firstEnforcedAt": "2029-01-01T00:00:00Z",
        "firstEnforcedBy": "pod-z",
        "conditions": [cond("Enforced", "InForce"), cond("Expired", "Ended")],
    }
    out = in_force_again_status(status, 2, expires_at=END, pod="pod-a", stamp=STAMP)
    assert out is not None and out["state"] == "Enforced"
    assert (out["firstEnforcedAt"], out["firstEnforcedBy"]) == ("2029-01-01T00:00:00Z", "pod-z")
    assert [(c["type"], c["reason"]) for c in out["conditions"]] == [("Enforced", "InForceAgain")]
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
GOOD = rev_status("Enforced", cond("Enforced", "InForce"), **FIRST)


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


def test_an_ended_revocation_shows_expired_even_if_someone_wrote_enforced() -> None:
    out = revst(GOOD, NOW - 1)
    assert out is not None and out["state"] == "Expired"
    assert {c["type"]: c["reason"] for c in out["conditions"]} == {
        "Enforced": "InForce",  # kept, as history
        "Expired": "Ended",
    }
    assert revst({**GOOD, **out}, NOW - 1) is None
    expired = rev_status("Expired", cond("Expired", "ExpiredOnArrival"))
    assert revst(expired, NOW - 1) is None  # whatever the reason, it says so


def test_expired_a_moment_early_by_another_pods_clock_is_tolerated() -> None:
    early = rev_status("Expired", cond("Enforced"), cond("Expired", "Ended", 1), **FIRST)
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
