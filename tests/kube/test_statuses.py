"""The statuses the reporter writes (sidecar/kube/reporter.py's pure functions) and the
values it reads them from (convert.object_state, convert.answer_from_sink): table-driven,
no server, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.kube.convert import ObjectState, SinkAnswer, answer_from_sink, object_state
from sidecar.kube.status import (
    elevation_status,
    ended,
    enforced_status,
    expired_status,
    in_force_again_status,
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
