"""What an operator does with AgentElevations through the real kubectl against the
emulation: apply and see them, and have a bad one refused with the field named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.clocks import from_now
from tests.kubeapi.fixtures import Kubectl
from tests.kubeapi.server import ELEVATION_CRD_PATH, KubeAPIServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "elevation.yaml"
NAME = "billing-agent-refund-inc-4413"


def elevation(name: str = "e1", **spec: object) -> str:
    body = {"agent": "billing-agent", "elevation": "refund", "approver": "alice", **spec}
    return yaml.safe_dump(
        {
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentElevation",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {k: v for k, v in body.items() if v is not None},
        }
    )


def test_apply_get_and_delete_the_example(kubectl: Kubectl, kube_api: KubeAPIServer) -> None:
    out = kubectl("apply", "-f", str(EXAMPLE)).stdout
    assert f"agentelevation.mandate.dev/{NAME} created" in out
    stored = kube_api.get("aelev", "agents", NAME)
    assert stored["spec"]["requestId"] == "elev-3f9a1c2b7d10"
    assert stored["metadata"]["generation"] == 1
    table = kubectl("get", "aelev").stdout.splitlines()
    assert table[0].split() == ["NAME", "AGENT", "ELEVATION", "REQUEST", "STATE", "EXPIRES", "AGE"]
    assert table[1].split()[:4] == [NAME, "billing-agent", "refund", "elev-3f9a1c2b7d10"]
    # Both mandate kinds under one category.
    assert "agentelevation.mandate.dev/" + NAME in kubectl("get", "mandate", "-o", "name").stdout
    assert "unchanged" in kubectl("apply", "-f", str(EXAMPLE)).stdout
    assert f'"{NAME}" deleted' in kubectl("delete", "-f", str(EXAMPLE)).stdout
    assert kube_api.objects("agentelevations") == []


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"approver": None}, "spec.approver", "Required value"),
        ({"elevation": None}, "spec.elevation", "Required value"),
        ({"agent": None}, "spec.agent", "Required value"),
        ({"duration": "10 minutes"}, "spec.duration", "should match"),
        ({"duration": "1.5h"}, "spec.duration", "should match"),
        ({"agent": "*"}, "spec.agent", "should match"),
        ({"elevation": "Refund"}, "spec.elevation", "should match"),
        ({"requestId": ""}, "spec.requestId", "at least 1 chars long"),
        ({"approver": ""}, "spec.approver", "at least 1 chars long"),
    ],
)
def test_bad_elevation_refused_naming_the_field(
    kubectl: Kubectl, kube_api: KubeAPIServer, spec: dict[str, object], field: str, message: str
) -> None:
    result = kubectl("apply", "-f", "-", input=elevation("bad", **spec), check=False)
    assert result.returncode != 0
    assert 'The AgentElevation "bad" is invalid' in result.stderr
    assert field in result.stderr and message in result.stderr
    assert kube_api.objects("agentelevations") == []


def test_unknown_field_refused(kubectl: Kubectl, kube_api: KubeAPIServer) -> None:
    result = kubectl("apply", "-f", "-", input=elevation("bad", grantedBy="me"), check=False)
    assert result.returncode != 0 and 'unknown field "spec.grantedBy"' in result.stderr
    assert kube_api.objects("agentelevations") == []


def test_status_is_a_subresource_with_known_states(
    kubectl: Kubectl, kube_api: KubeAPIServer
) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    # Through the main resource the status is ignored: an operator cannot fake an answer.
    kubectl("patch", "aelev", NAME, "--type=merge", "-p", '{"status": {"state": "Granted"}}')
    assert "status" not in kube_api.get("aelev", "agents", NAME)
    patch = ("patch", "aelev", NAME, "--subresource=status", "--type=merge", "-p")
    result = kubectl(*patch, '{"status": {"state": "granted"}}', check=False)
    assert result.returncode != 0 and "status.state" in result.stderr
    assert "Unsupported value" in result.stderr
    expires = from_now(600)  # a grant ten minutes from now
    answer = {"state": "Granted", "grantId": "g-1", "expiresAt": expires}
    kubectl(*patch, json.dumps({"status": {**answer, "observedGeneration": 1}}))
    row = kubectl("get", "aelev").stdout.splitlines()[1].split()
    assert row[4:6] == ["Granted", expires]


def test_explain_uses_the_crd_schema(kubectl: Kubectl) -> None:
    out = kubectl("explain", "agentelevations.spec").stdout
    for field in ("agent", "elevation", "requestId", "duration", "approver", "reason"):
        assert field in out
    assert "<string> -required-" in out


def test_the_spec_is_immutable(kubectl: Kubectl, kube_api: KubeAPIServer, tmp_path: Path) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    changed = tmp_path / "changed.yaml"
    changed.write_text(EXAMPLE.read_text().replace("duration: 10m", "duration: 5m"))
    result = kubectl("apply", "-f", str(changed), check=False)
    assert result.returncode != 0
    assert f'The AgentElevation "{NAME}" is invalid: spec: Invalid value: "object"' in (
        result.stderr
    )
    assert "an approval cannot be changed" in result.stderr
    assert kube_api.get("aelev", "agents", NAME)["spec"]["duration"] == "10m"
    # Labels and annotations may change; the status is the sidecars'.
    kubectl("label", "aelev", NAME, "ticket=inc-4413")
    assert kube_api.get("aelev", "agents", NAME)["metadata"]["generation"] == 1
    # Delete and create again is how an approval changes.
    kubectl("delete", "-f", str(EXAMPLE))
    kubectl("apply", "-f", str(changed))
    assert kube_api.get("aelev", "agents", NAME)["spec"]["duration"] == "5m"


def test_a_crd_rule_is_evaluated_and_one_that_does_not_compile_refused(
    kubectl: Kubectl, kube_api: KubeAPIServer, tmp_path: Path
) -> None:
    """The emulation evaluates any validation rule of a CRD (cel-python), as the API server
    would: a new rule applies to the next write; a rule that does not compile refuses the
    CRD, so no rule goes unchecked silently."""
    crd = yaml.safe_load(ELEVATION_CRD_PATH.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["x-kubernetes-validations"] = [
        {"rule": "self.agent != 'root'", "message": "not root", "fieldPath": ".agent"}
    ]
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(crd))
    kubectl("apply", "-f", str(path))
    result = kubectl("apply", "-f", "-", input=elevation("r", agent="root"), check=False)
    assert result.returncode != 0
    assert 'spec.agent: Invalid value: "object": not root' in result.stderr
    kubectl("apply", "-f", "-", input=elevation("fine"))
    assert kube_api.get("aelev", "agents", "fine")["spec"]["agent"] == "billing-agent"

    spec["x-kubernetes-validations"] = [{"rule": "self.agent !="}]
    path.write_text(yaml.safe_dump(crd))
    result = kubectl("apply", "-f", str(path), check=False)
    assert result.returncode != 0
    assert "x-kubernetes-validations[0].rule" in result.stderr
    assert "compilation failed" in result.stderr
