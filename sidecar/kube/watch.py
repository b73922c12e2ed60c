"""Running the watchers: as bounded loops (`watch_*`, for tests and tools) or as tasks
(`start_*`), and publishing an automatic revocation as an AgentRevocation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Unpack

from kubernetes_asyncio.client import ApiClient, CustomObjectsApi

from sidecar.core.revocation import Revocation
from sidecar.kube.client import make_api_client
from sidecar.kube.consumer import WatchOptions
from sidecar.kube.convert import GROUP, KIND, PLURAL, VERSION
from sidecar.kube.elevations import ApprovalSink, ElevationWatcher
from sidecar.kube.errors import translated
from sidecar.kube.revocations import RevocationWatcher
from sidecar.state.revocations import RevocationStore

__all__ = [
    "publish_revocation",
    "start_elevation_watcher",
    "start_watcher",
    "watch_elevations",
    "watch_revocations",
]

# -- running them ---------------------------------------------------------------------------------


async def watch_revocations(
    store: RevocationStore,
    namespace: str,
    *,
    api_client: ApiClient,
    pod_name: str,
    _iterations: int | None = None,
    **options: Unpack[WatchOptions],
) -> RevocationWatcher:
    """Run a RevocationWatcher (forever, unless `_iterations` bounds it); returns it."""
    watcher = RevocationWatcher(
        store, namespace, api_client=api_client, pod_name=pod_name, **options
    )
    await watcher.run(_iterations=_iterations)
    return watcher


async def watch_elevations(
    sink: ApprovalSink,
    namespace: str,
    *,
    api_client: ApiClient,
    pod_name: str,
    _iterations: int | None = None,
    **options: Unpack[WatchOptions],
) -> ElevationWatcher:
    """Run an ElevationWatcher (forever, unless `_iterations` bounds it); returns it."""
    watcher = ElevationWatcher(sink, namespace, api_client=api_client, pod_name=pod_name, **options)
    await watcher.run(_iterations=_iterations)
    return watcher


async def start_watcher(
    store: RevocationStore,
    *,
    namespace: str,
    kubeconfig: str | Path | None,
    pod_name: str,
    **options: Unpack[WatchOptions],
) -> RevocationWatcher:
    """Build the ApiClient (kubeconfig, else in-cluster) and run a watcher as a task; its
    `stop()` also closes the client."""
    client = await make_api_client(kubeconfig)
    options["owns_client"] = True
    return RevocationWatcher(
        store, namespace, api_client=client, pod_name=pod_name, **options
    ).start()


async def start_elevation_watcher(
    sink: ApprovalSink,
    *,
    namespace: str,
    kubeconfig: str | Path | None,
    pod_name: str,
    **options: Unpack[WatchOptions],
) -> ElevationWatcher:
    """As `start_watcher`, for AgentElevations into ``sink``; `stop()` closes the client."""
    client = await make_api_client(kubeconfig)
    options["owns_client"] = True
    return ElevationWatcher(
        sink, namespace, api_client=client, pod_name=pod_name, **options
    ).start()


async def publish_revocation(
    rev: Revocation, *, namespace: str, kubeconfig: str | Path | None, pod_name: str
) -> str:
    """Create an AgentRevocation object for a revocation mandate decided itself (behaviour
    analysis), so that every sidecar of the namespace and the operators see it; return the
    object's name (a KubeError if the API refused it). The object is an ordinary one:
    deleting it is how an operator ends it."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "generateName": f"behaviour-{rev.agent}-"[:58],
            "namespace": namespace,
            "labels": {"mandate.dev/source": "behaviour", "mandate.dev/agent": rev.agent},
            "annotations": {"mandate.dev/revoked-by": pod_name},
        },
        "spec": {"agent": rev.agent, "reason": rev.reason[:1024]},
    }
    client = await make_api_client(kubeconfig)
    try:
        with translated():
            created: Any = await CustomObjectsApi(client).create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body
            )
        return str(created["metadata"]["name"])
    finally:
        await client.close()
