"""Fixtures for the watcher tests: the Kubernetes API emulation (tests/kubeapi), a
RevocationStore on a real shared table in tmp_path, and watchers with fast backoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from sidecar.kube import RevocationWatcher, make_api_client
from sidecar.revocations import RevocationStore
from sidecar.shm import SharedTable
from tests.kubeapi.fixtures import kube_api, kubeconfig, kubectl  # noqa: F401

# Fast retries: every wait in these tests is bounded by a few seconds.
FAST = {
    "backoff_base": 0.02,
    "backoff_cap": 0.2,
    "watch_timeout": (30.0, 30.0),
    "idle_timeout": 10.0,
    "request_timeout": 5.0,
}


def make_store(path: Path) -> RevocationStore:
    path.mkdir(parents=True, exist_ok=True)
    return RevocationStore(SharedTable.create(path / "table"), path / "state.json")


@pytest.fixture
def store(tmp_path: Path) -> RevocationStore:
    return make_store(tmp_path / "pod-a")


@pytest.fixture
async def api_client(kubeconfig: Path) -> AsyncIterator[ApiClient]:  # noqa: F811
    client = await make_api_client(kubeconfig)
    yield client
    await client.close()


@pytest.fixture
async def start_watcher(kubeconfig: Path) -> AsyncIterator[Callable[..., Any]]:  # noqa: F811
    """start_watcher(store, pod_name="pod-a", **options) -> a running RevocationWatcher with
    its own ApiClient (as in a pod); all are stopped at the end."""
    running: list[RevocationWatcher] = []

    async def start(
        store: RevocationStore, pod_name: str = "pod-a", **options: Any
    ) -> RevocationWatcher:
        client = await make_api_client(kubeconfig)
        watcher = RevocationWatcher(
            store,
            "agents",
            api_client=client,
            pod_name=pod_name,
            owns_client=True,
            **{**FAST, **options},
        )
        running.append(watcher.start())
        return watcher

    yield start
    for watcher in running:
        await watcher.stop()


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


@pytest.fixture
def changes(store: RevocationStore) -> Iterator[list[tuple[list[str], list[str]]]]:
    """Every change the store publishes, as (added keys, removed keys)."""
    seen: list[tuple[list[str], list[str]]] = []
    store.subscribe(lambda c: seen.append(([r.key for r in c[0]], [r.key for r in c[1]])))
    yield seen
