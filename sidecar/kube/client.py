"""The Kubernetes API client (kubernetes_asyncio), from a kubeconfig or the pod's service
account. Loading errors become ConfigError (in `sidecar.kube.errors`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration

from sidecar.kube.errors import loading_config

__all__ = ["make_api_client"]


async def make_api_client(
    kubeconfig: str | Path | None = None, *, context: str | None = None
) -> ApiClient:
    """An ApiClient from a kubeconfig file, or from the pod's service account when None."""
    cfg = Configuration()
    where = f"kubeconfig {kubeconfig}" if kubeconfig is not None else "in-cluster config"
    with loading_config(where):
        if kubeconfig is not None:
            await kube_config.load_kube_config(
                config_file=str(kubeconfig),
                context=context,
                client_configuration=cfg,
                persist_config=False,
            )
        else:
            load_incluster: Any = kube_config.load_incluster_config  # untyped in the library
            load_incluster(client_configuration=cfg)
    return ApiClient(configuration=cfg)
