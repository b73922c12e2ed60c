"""Issue 19 (1, the component left over): deploy/components/behaviour-revocations hard-coded
the namespace and the group `agents`. Its RoleBinding now takes the namespace and the
subjects of the sidecar's RoleBinding (mandate-sidecar), wherever an overlay moves that
one, so the sidecar may `create` AgentRevocations in its own namespace only. Rendered with
the real `kubectl kustomize` on copies of deploy/."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .kustomize import DEPLOY, K8S_VERSIONS, find, render, validate_strictly

COMPONENT = DEPLOY / "components" / "behaviour-revocations"


def copy_deploy(tmp_path: Path) -> Path:
    root = tmp_path / "deploy"
    shutil.copytree(DEPLOY, root)
    return root


def namespace_overlay(root: Path, namespace: str) -> Path:
    """A copy of deploy/overlays/agent-namespace for ``namespace``, with the component."""
    overlay = root / "overlays" / namespace
    overlay.mkdir()
    doc = yaml.safe_load(
        (DEPLOY / "overlays" / "agent-namespace" / "kustomization.yaml").read_text()
    )
    doc["namespace"] = namespace
    doc["components"] = ["../../components/behaviour-revocations"]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return overlay


def copied_kit(root: Path, namespace: str) -> Path:
    """deploy/agents copied for ``namespace``, with the component in the kit itself."""
    kit = root / namespace
    shutil.copytree(DEPLOY / "agents", kit)
    doc = yaml.safe_load((kit / "kustomization.yaml").read_text())
    doc["namespace"] = namespace
    doc["components"] = ["../components/behaviour-revocations"]
    (kit / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return kit


def plain_overlay(root: Path, namespace: str) -> Path:
    """An overlay that adds the component and moves nothing (as the dev overlay would)."""
    assert namespace == "agents"
    overlay = root / "overlays" / "with-component"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["../../agents"],
                "components": ["../../components/behaviour-revocations"],
            }
        )
    )
    return overlay


SETUPS = {
    "namespace-overlay": (namespace_overlay, "team-c"),
    "copied-kit": (copied_kit, "billing"),
    "no-move": (plain_overlay, "agents"),
}


def bindings(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    return find(docs, "RoleBinding", "mandate-sidecar"), find(
        docs, "RoleBinding", "mandate-behaviour-revoker"
    )


@pytest.mark.parametrize("setup", list(SETUPS))
def test_the_revokers_binding_follows_the_sidecars_binding(setup: str, tmp_path: Path) -> None:
    make, namespace = SETUPS[setup]
    docs = render(make(copy_deploy(tmp_path), namespace))
    sidecar, revoker = bindings(docs)
    group = {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Group",
        "name": f"system:serviceaccounts:{namespace}",
    }
    assert sidecar["metadata"]["namespace"] == revoker["metadata"]["namespace"] == namespace
    assert sidecar["subjects"] == revoker["subjects"] == [group]
    assert revoker["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "mandate-behaviour-revoker",
    }
    role = find(docs, "ClusterRole", "mandate-behaviour-revoker")
    assert role["rules"] == [
        {"apiGroups": ["mandate.dev"], "resources": ["agentrevocations"], "verbs": ["create"]}
    ]
    # Nothing of it stays in `agents` when it moved.
    if namespace != "agents":
        assert not [d for d in docs if d["metadata"].get("namespace") == "agents"]
        assert not [d for d in docs if "serviceaccounts:agents" in yaml.safe_dump(d)]


def test_the_component_names_no_namespace_of_its_own() -> None:
    docs = [d for d in yaml.safe_load_all((COMPONENT / "rbac.yaml").read_text()) if d]
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert "namespace" not in binding["metadata"] and "subjects" not in binding


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_moved_component_validates_strictly(version: str, tmp_path: Path) -> None:
    docs = render(namespace_overlay(copy_deploy(tmp_path), "team-c"))
    validate_strictly(docs, tmp_path, version)
