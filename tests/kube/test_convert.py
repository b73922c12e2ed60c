"""AgentRevocation object → Revocation (pure): table-driven, no server."""

from __future__ import annotations

import datetime

import pytest

from sidecar.kube import revocation_from_object

UTC = datetime.UTC


def ts(*args: int) -> float:
    return datetime.datetime(*args, tzinfo=UTC).timestamp()


def obj(**spec: object) -> dict[str, object]:
    return {
        "metadata": {
            "name": "r1",
            "namespace": "agents",
            "uid": "u-1",
            "creationTimestamp": "2026-11-01T00:00:00Z",
        },
        "spec": spec,
    }


def test_a_well_formed_object() -> None:
    rev, problems = revocation_from_object(
        obj(agent="billing-agent", reason="INC-1", expiresAt="2026-12-01T00:00:00Z"), "agents"
    )
    assert problems == []
    assert rev.as_dict() == {
        "key": "kubernetes:agents/r1",
        "agent": "billing-agent",
        "namespace": "agents",
        "reason": "INC-1",
        "source": "kubernetes",
        "name": "r1",
        "expires_at": ts(2026, 12, 1),
        "created_at": ts(2026, 11, 1),
        "uid": "u-1",
    }


@pytest.mark.parametrize(
    ("spec", "agent", "reason", "expires", "problem"),
    [
        (
            {"agent": "a", "reason": "r", "expiresAt": "2026-02-30T00:00:00Z"},
            "a",
            "r",
            None,
            "spec.expiresAt",
        ),
        ({"agent": "a", "reason": "r", "expiresAt": 7}, "a", "r", None, "spec.expiresAt"),
        ({"reason": "r"}, "*", "r", None, "spec.agent"),
        ({"agent": "", "reason": "r"}, "*", "r", None, "spec.agent"),
        ({"agent": "a"}, "a", "AgentRevocation agents/r1", None, "spec.reason"),
    ],
)
def test_malformed_objects_fail_closed(
    spec: dict[str, object], agent: str, reason: str, expires: float | None, problem: str
) -> None:
    rev, problems = revocation_from_object(obj(**spec), "agents")
    assert (rev.agent, rev.reason, rev.expires_at) == (agent, reason, expires)
    assert len(problems) == 1 and problems[0].startswith(problem)
    assert rev.active(4e9)  # in force, without end


def test_no_spec_and_no_namespace() -> None:
    rev, problems = revocation_from_object({"metadata": {"name": "x"}, "spec": None}, "agents")
    assert (rev.key, rev.agent, rev.namespace, rev.created_at) == (
        "kubernetes:agents/x",
        "*",
        "agents",
        0.0,
    )
    assert len(problems) == 2
