"""Issue 19 (7): the CRDs to the standard of cert-manager and Istio. Every field described
(`kubectl explain` is useful: checked with the real kubectl against the API emulation),
status conditions with observedGeneration in the shape `kubectl wait` reads (what the
sidecars write is accepted: tests/kube/test_kubectl_wait.py waits on them), CEL validation
rules that the emulation evaluates as the API server does (cel-python), kept on uninstall,
and valid for Kubernetes 1.29 and the latest."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.kube.status import (
    elevation_conditions,
    elevation_status,
    enforced_status,
    expired_status,
    in_force_again_status,
    revocation_status,
)
from sidecar.state.agentstate.limits import MAX_TTL
from tests.clocks import from_now
from tests.kubeapi.fixtures import Kubectl, kube_api, kubeconfig, kubectl  # noqa: F401
from tests.kubeapi.server import KubeAPIServer
from tests.kubeapi.store import ApiError

from .kustomize import DEPLOY, K8S_VERSIONS, render, validate_strictly

CRDS = {
    "agentrevocation": DEPLOY / "crds" / "agentrevocation.yaml",
    "agentelevation": DEPLOY / "crds" / "agentelevation.yaml",
}
# What `kubectl wait --for=condition=...` can wait for on each kind.
CONDITIONS = {
    "agentrevocation": {"Enforced", "Expired"},
    "agentelevation": {"Ready", "Expired", "Invalid"},
}


def schema_of(name: str) -> dict[str, Any]:
    crd = yaml.safe_load(CRDS[name].read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, schema) of the root and every property, list item and map value under it."""
    yield path or "<root>", schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("name", list(CRDS))
def test_every_field_is_described(name: str) -> None:
    undescribed = [p for p, node in nodes(schema_of(name)) if not node.get("description")]
    assert undescribed == []


def explained(out: str) -> dict[str, str]:
    """`kubectl explain` output: each field of the FIELDS section -> its description."""
    fields: dict[str, str] = {}
    current = None
    for line in out.split("FIELDS:", 1)[1].splitlines():
        start = re.match(r"^  (\S+)\t<", line)
        if start:
            current = start.group(1)
            fields[current] = ""
        elif current is not None and line.startswith("    "):
            fields[current] = f"{fields[current]} {line.strip()}".strip()
    return fields


@pytest.mark.parametrize(
    ("name", "path"),
    [(name, path) for name in CRDS for path in ("", "spec", "status", "status.conditions")],
)
def test_kubectl_explain_describes_every_field(
    kubectl: Kubectl,  # noqa: F811
    name: str,
    path: str,
) -> None:
    """The real kubectl, from the emulation's OpenAPI v3 (as from kube-apiserver's)."""
    out = kubectl("explain", f"{name}.{path}" if path else name).stdout
    node = schema_of(name)
    for part in path.split(".") if path else []:
        node = node["properties"][part]
        node = node.get("items", node)
    fields = explained(out)
    assert set(fields) == set(node["properties"])
    for field, text in fields.items():
        assert text, f"{name}.{path}.{field} has no description in kubectl explain"
        if field not in ("apiVersion", "kind", "metadata"):  # the API server's own words
            schema_text = " ".join(node["properties"][field]["description"].split())
            assert text == schema_text


@pytest.mark.parametrize("name", list(CRDS))
def test_status_conditions_have_the_shape_kubectl_wait_reads(name: str) -> None:
    status = schema_of(name)["properties"]["status"]
    assert status["properties"]["observedGeneration"]["type"] == "integer"
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert set(item["properties"]["type"]["enum"]) == CONDITIONS[name]
    assert item["properties"]["observedGeneration"]["format"] == "int64"
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"


@pytest.mark.parametrize("name", list(CRDS))
def test_every_rule_sees_bounded_values(name: str) -> None:
    """The API server refuses a CRD whose rules' estimated cost is too high; a rule over
    unbounded strings or lists is what makes it so. Every value a rule sees is bounded."""
    ruled = [
        (p, node) for p, node in nodes(schema_of(name)) if node.get("x-kubernetes-validations")
    ]
    assert ruled
    for path, node in ruled:
        for sub_path, sub in nodes(node, path):
            if sub.get("type") == "string":
                assert "maxLength" in sub or "enum" in sub, sub_path
            if sub.get("type") == "array":
                assert "maxItems" in sub, sub_path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_crds_validate_strictly(version: str, tmp_path: Path) -> None:
    validate_strictly(render(DEPLOY / "crds"), tmp_path, version)


# -- CEL rules, evaluated by the emulation as by kube-apiserver -----------------------------------


def elevation(name: str = "e1", **spec: Any) -> dict[str, Any]:
    body = {"agent": "billing-agent", "elevation": "refund", "approver": "alice", **spec}
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentElevation",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": body,
    }


@pytest.mark.parametrize(
    ("duration", "message"),
    [
        ("0s", 'spec.duration: Invalid value: "string": must be more than 0s'),
        ("0ms", "must be more than 0s"),
        ("0h0m0s", "must be more than 0s"),
        ("999999h", 'spec.duration: Invalid value: "string": must be at most 720h (30 days)'),
        ("720h1ms", "must be at most 720h"),
        ("99999999999999999999h", "evaluating rule: must be more than 0s"),
    ],
)
def test_an_elevation_duration_out_of_bounds_is_refused(
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
    duration: str,
    message: str,
) -> None:
    """`duration: "0s"` and `"999999h"` were accepted (the pattern admits them): an
    approval that granted nothing, or a grant for 114 years capped in silence."""
    result = kubectl(
        "apply", "-f", "-", input=json.dumps(elevation(duration=duration)), check=False
    )
    assert result.returncode != 0
    assert 'The AgentElevation "e1" is invalid' in result.stderr
    assert message in result.stderr
    assert kube_api.objects("agentelevations") == []


@pytest.mark.parametrize("duration", ["250ms", "90s", "10m", "1h30m", "720h"])
def test_an_elevation_duration_in_bounds_is_accepted(
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
    duration: str,
) -> None:
    kubectl("apply", "-f", "-", input=json.dumps(elevation(duration=duration)))
    assert kube_api.get("aelev", "agents", "e1")["spec"]["duration"] == duration


def test_the_longest_duration_is_the_longest_grant_mandate_makes(
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    """The CRD's bound is what the agent API accepts (limits.MAX_TTL), to the second."""
    hours, rest = divmod(int(MAX_TTL), 3600)
    assert rest == 0
    kube_api.create(elevation("longest", duration=f"{hours}h"))
    kube_api.create(elevation("minutes", duration=f"{hours * 60}m"))
    with pytest.raises(ApiError) as err:
        kube_api.create(elevation("longer", duration=f"{hours}h1s"))
    assert err.value.code == 422 and "spec.duration" in err.value.message


def revocation(**spec: Any) -> str:
    body = {"agent": "billing-agent", "reason": "INC-1", **spec}
    return yaml.safe_dump(
        {
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentRevocation",
            "metadata": {"name": "r1", "namespace": "agents"},
            "spec": body,
        }
    )


def test_a_revocations_agent_cannot_change(
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    """Retargeted in place, a revocation would restore one agent and revoke another under
    the first one's status and Events: another agent is another AgentRevocation."""
    kubectl("apply", "-f", "-", input=revocation())
    result = kubectl("apply", "-f", "-", input=revocation(agent="*"), check=False)
    assert result.returncode != 0
    assert 'spec.agent: Invalid value: "string": the agent of a revocation cannot change' in (
        result.stderr
    )
    assert kube_api.get("arev", "agents", "r1")["spec"]["agent"] == "billing-agent"
    # The rest may change (the reason, the end), and a new object may name any agent.
    kubectl("apply", "-f", "-", input=revocation(reason="INC-2", expiresAt=from_now(3600)))
    assert kube_api.get("arev", "agents", "r1")["metadata"]["generation"] == 2
    kubectl("delete", "arev", "r1")
    kubectl("apply", "-f", "-", input=revocation(agent="*"))


# -- what the sidecars write, the CRDs accept ------------------------------------------------------


def test_every_revocation_status_the_sidecars_write_is_valid(
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    kube_api.create(yaml.safe_load(revocation()))
    stamp = from_now(0)
    seen: dict[str, Any] = {}

    def write(patch: dict[str, Any] | None) -> None:
        assert patch is not None
        stored = kube_api.patch("arev", "agents", "r1", {"status": patch}, subresource="status")
        seen.clear()
        seen.update(stored["status"])

    write(enforced_status(seen, 1, pod="pod-a", stamp=stamp))
    write(expired_status(seen, 1, reason="Ended", message="ended", stamp=stamp))
    write(in_force_again_status(seen, 1, expires_at=None, pod="pod-b", stamp=stamp))
    write(expired_status(seen, 1, reason="ExpiredOnArrival", message="never", stamp=stamp))
    write(revocation_status(seen, 2, expires_at=None, now=0.0, pod="pod-c", stamp=stamp))
    assert {c["type"] for c in seen["conditions"]} == {"Enforced"}


@pytest.mark.parametrize("state", ["Pending", "Granted", "Invalid", "Expired"])
def test_every_elevation_status_the_sidecars_write_is_valid(
    kube_api: KubeAPIServer,  # noqa: F811
    state: str,
) -> None:
    kube_api.create(elevation())
    answer = elevation_status(state, f"{state} because", "g-1", None, 1)
    status = elevation_conditions(answer, {}, from_now(0))
    stored = kube_api.patch("aelev", "agents", "e1", {"status": status}, subresource="status")
    assert {c["type"] for c in stored["status"]["conditions"]} <= CONDITIONS["agentelevation"]
