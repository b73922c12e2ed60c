"""AgentElevation object → Approval (pure): table-driven, no server."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from sidecar.core.agentstate import Approval
from sidecar.kube import approval_from_object

CREATED = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC).timestamp()
NOW = CREATED + 3600.0


def obj(meta: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = {"agent": "billing-agent", "elevation": "refund", "approver": "alice", **spec}
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentElevation",
        "metadata": {
            "name": "e1",
            "namespace": "agents",
            "uid": "u-1",
            "creationTimestamp": "2026-11-01T00:00:00Z",
            "generation": 1,
            **(meta or {}),
        },
        "spec": {k: v for k, v in body.items() if v is not None},
    }


def test_a_well_formed_object_approving_a_request() -> None:
    approval, problems = approval_from_object(
        obj(requestId="elev-1", duration="10m", reason="INC-1"), "agents", now=NOW
    )
    assert problems == []
    assert approval == Approval(
        key="kubernetes:agents/e1",
        agent="billing-agent",
        namespace="agents",
        elevation="refund",
        approver="alice",
        approved_at=CREATED,
        request_id="elev-1",
        duration=600.0,
        reason="INC-1",
        source="kubernetes",
        name="e1",
        uid="u-1",
    )


def test_minimal_object_grants_directly_for_the_default_duration() -> None:
    approval, problems = approval_from_object(obj(), "agents", now=NOW)
    assert problems == [] and approval is not None
    assert (approval.request_id, approval.duration, approval.reason) == ("", None, "")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25)],
)
def test_durations(text: str, seconds: float) -> None:
    approval, problems = approval_from_object(obj(duration=text), "agents", now=NOW)
    assert problems == [] and approval is not None and approval.duration == seconds


def test_the_window_starts_at_creation_for_every_replica_and_restart() -> None:
    """approved_at comes from the object, not from when a sidecar saw it."""
    first, _ = approval_from_object(obj(), "agents", now=NOW)
    later, _ = approval_from_object(obj(), "agents", now=NOW + 86400)
    assert first is not None and first == later and first.approved_at == CREATED


@pytest.mark.parametrize("stamp", [None, "", "yesterday", "2026-02-30T00:00:00Z"])
def test_without_a_creation_time_the_window_starts_now(stamp: str | None) -> None:
    approval, problems = approval_from_object(obj({"creationTimestamp": stamp}), "agents", now=NOW)
    assert problems == [] and approval is not None and approval.approved_at == NOW


def test_namespace_from_the_object_else_the_watched_one() -> None:
    approval, _ = approval_from_object(obj({"namespace": None}), "elsewhere", now=NOW)
    assert approval is not None
    assert (approval.key, approval.namespace) == ("kubernetes:elsewhere/e1", "elsewhere")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"duration": "10 minutes"}, "spec.duration: '10 minutes' is not a duration like"),
        ({"duration": "1.5h"}, "spec.duration: '1.5h' is not a duration like"),
        ({"duration": "0s"}, "spec.duration: duration '0s' must be greater than zero"),
        ({"duration": ""}, "spec.duration: '' is not a duration like"),
        ({"duration": 600}, "spec.duration: 600 is not a duration like"),
        ({"agent": None}, "spec.agent: Required value"),
        ({"agent": ""}, "spec.agent: '' is not a non-empty string"),
        ({"agent": "*"}, "spec.agent: '*' is not an agent (profile) name"),
        ({"agent": "Billing Agent"}, "spec.agent: 'Billing Agent' is not an agent (profile) name"),
        ({"agent": 7}, "spec.agent: 7 is not a non-empty string"),
        ({"elevation": None}, "spec.elevation: Required value"),
        ({"elevation": "Refund!"}, "spec.elevation: 'Refund!' is not an elevation name"),
        ({"approver": None}, "spec.approver: Required value"),
        ({"approver": "  "}, "spec.approver: '  ' is not a non-empty string"),
        ({"requestId": ""}, "spec.requestId: '' is not a non-empty string"),
        ({"requestId": 12}, "spec.requestId: 12 is not a non-empty string"),
        ({"reason": ["a"]}, "spec.reason: ['a'] is not a string"),
    ],
)
def test_a_malformed_object_is_no_approval(spec: dict[str, Any], problem: str) -> None:
    approval, problems = approval_from_object(obj(**spec), "agents", now=NOW)
    assert approval is None
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_every_problem_is_listed() -> None:
    approval, problems = approval_from_object(
        obj(agent=None, elevation=None, approver=None, duration="soon"), "agents", now=NOW
    )
    assert approval is None
    assert [p.split(":")[0] for p in problems] == [
        "spec.agent",
        "spec.elevation",
        "spec.approver",
        "spec.duration",
    ]


@pytest.mark.parametrize("spec", [None, "refund", ["agent"]])
def test_no_spec(spec: Any) -> None:
    approval, problems = approval_from_object(
        {"metadata": {"name": "x"}, "spec": spec}, "agents", now=NOW
    )
    assert approval is None and problems == ["spec: Required value"]
