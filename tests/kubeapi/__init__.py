"""A Kubernetes API emulation for tests, built on kmock 0.8, faithful where mandate's watcher
and kubectl depend on the real API server (see server.py, store.py, schema.py).

Use it from any test directory by importing the fixtures into that directory's conftest.py:

    from tests.kubeapi.fixtures import kube_api, kubeconfig, kubectl  # noqa: F401
"""

from .fixtures import Kubectl, KubectlError, kubectl_binary
from .schema import ResourceType
from .server import CRD_PATH, CRD_PATHS, ELEVATION_CRD_PATH, KubeAPI, KubeAPIServer
from .store import ApiError, Cluster

__all__ = [
    "CRD_PATH",
    "CRD_PATHS",
    "ELEVATION_CRD_PATH",
    "ApiError",
    "Cluster",
    "KubeAPI",
    "KubeAPIServer",
    "Kubectl",
    "KubectlError",
    "ResourceType",
    "kubectl_binary",
]
