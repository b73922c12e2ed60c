"""Issue 19 (6): uninstalling mandate is not destructive.

`kubectl delete -k DIR` deletes every object `kubectl kustomize DIR` renders, and kubectl
has no "keep" annotation. Deleting a Namespace deletes every workload in it; deleting a CRD
deletes every object of its kind (every AgentRevocation: every revoked agent restored). So
no overlay renders a Namespace or a CRD: the CRDs (deploy/crds) and the namespaces
(deploy/namespaces, deploy/overlays/dev/namespaces) are applied once by themselves before
the overlays, and deleted, if ever, on purpose and last (deploy/README.md, Uninstall)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.kubeapi.fixtures import Kubectl, kube_api, kubeconfig, kubectl  # noqa: F401
from tests.kubeapi.server import KubeAPIServer

from .kustomize import DEPLOY, K8S_VERSIONS, find, render, validate_strictly

# Every kustomization an operator applies and may `delete -k`: the quick start and every
# overlay (a new overlay is covered without a change here).
OVERLAYS = {
    "quick-start": DEPLOY,
    **{p.parent.name: p.parent for p in sorted((DEPLOY / "overlays").glob("*/kustomization.yaml"))},
}
# What each is applied over (deploy/README.md, Install). An agent namespace of your own
# (overlays/agent-namespace) is yours: created and labelled by you, before the overlay.
NAMESPACES = {
    "quick-start": DEPLOY / "namespaces",
    "dev": DEPLOY / "overlays" / "dev" / "namespaces",
    "prod": DEPLOY / "namespaces",
}
KEPT = ("Namespace", "CustomResourceDefinition")


def test_every_overlay_is_covered() -> None:
    assert {"quick-start", "dev", "prod", "agent-namespace"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_deleting_an_overlay_deletes_no_namespace_and_no_crd(overlay: str) -> None:
    """`kubectl delete -k deploy/overlays/dev` deleted the `agents` and `finance` Namespaces
    with every workload in them, `mandate-system`, and both CRDs with every AgentRevocation
    and AgentElevation of the cluster."""
    docs = render(OVERLAYS[overlay])
    deleted = sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in KEPT)
    assert deleted == []


@pytest.mark.parametrize("overlay", list(NAMESPACES))
def test_every_namespace_an_overlay_uses_is_installed_before_it(overlay: str) -> None:
    docs = render(OVERLAYS[overlay])
    used = {d["metadata"]["namespace"] for d in docs if d["metadata"].get("namespace")}
    installed = {d["metadata"]["name"] for d in render(NAMESPACES[overlay])}
    assert used and used <= installed, used - installed
    # Where the webhook injects: the agent namespaces the overlay serves are labelled.
    labelled = {
        d["metadata"]["name"]
        for d in render(NAMESPACES[overlay])
        if d["metadata"].get("labels", {}).get("mandate.dev/inject") == "true"
    }
    profiles = {
        d["metadata"]["namespace"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mandate-profiles"
    }
    assert profiles and profiles <= labelled


def test_the_prerequisites_hold_only_namespaces_and_crds() -> None:
    crds = render(DEPLOY / "crds")
    assert sorted(d["metadata"]["name"] for d in crds) == [
        "agentelevations.mandate.dev",
        "agentrevocations.mandate.dev",
    ]
    for crd in crds:
        assert crd["kind"] == "CustomResourceDefinition"
        # What Helm honours; kubectl does not, hence deploy/crds by itself.
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    namespaces = render(DEPLOY / "namespaces")
    assert {d["kind"] for d in namespaces} == {"Namespace"}
    assert {d["metadata"]["name"] for d in namespaces} == {"mandate-system", "agents"}
    dev = render(DEPLOY / "overlays" / "dev" / "namespaces")
    assert {d["kind"] for d in dev} == {"Namespace"}
    assert {d["metadata"]["name"] for d in dev} == {"mandate-system", "agents", "finance"}
    assert "mandate.dev/inject" not in find(dev, "Namespace", "finance")["metadata"]["labels"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_prerequisites_validate_strictly(version: str, tmp_path: Path) -> None:
    docs = [*render(DEPLOY / "crds"), *render(DEPLOY / "overlays" / "dev" / "namespaces")]
    validate_strictly(docs, tmp_path, version)


def test_the_prerequisites_apply_with_kubectl_and_survive_the_overlay(
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    """The install order against the API emulation with the real kubectl: CRDs, namespaces,
    then objects in them. Uninstalling an overlay leaves them (the test above); the CRDs and
    the namespaces go only when deleted by themselves."""
    out = kubectl("apply", "-k", str(DEPLOY / "crds")).stdout
    assert "agentrevocations.mandate.dev" in out and "agentelevations.mandate.dev" in out
    out = kubectl("apply", "-k", str(DEPLOY / "overlays" / "dev" / "namespaces")).stdout
    assert "namespace/finance created" in out and "namespace/mandate-system created" in out
    kubectl("apply", "-f", str(DEPLOY / "examples" / "revocation.yaml"))
    assert [o["metadata"]["name"] for o in kube_api.objects()] == ["billing-agent-inc-4412"]
    # Applying them again (an upgrade) changes nothing.
    again = kubectl("apply", "-k", str(DEPLOY / "crds")).stdout
    assert again.count("unchanged") == 2
    names: list[Any] = [n["metadata"]["name"] for n in kube_api.objects("namespaces")]
    assert {"mandate-system", "agents", "finance"} <= set(names)
