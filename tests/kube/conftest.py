"""Fixtures for the watcher tests: the Kubernetes API emulation (tests/kubeapi), a
RevocationStore on a real shared table in tmp_path, a recording ApprovalSink, and watchers
with fast backoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from sidecar.core.agentstate import Approval
from sidecar.kube import ElevationWatcher, RevocationWatcher, make_api_client
from sidecar.state.revocations import RevocationStore
from sidecar.state.shm import SharedTable
from tests.kubeapi.fixtures import kube_api, kubeconfig, kubectl  # noqa: F401

# Fast retries: every wait in these tests is bounded by a few seconds.
FAST = {
    "backoff_base": 0.02,
    "backoff_cap": 0.2,
    "watch_timeout": (30.0, 30.0),
    "idle_timeout": 10.0,
    "request_timeout": 5.0,
    # No delay before the writes every pod would make (tests/kube/test_fleet.py sets one).
    "report_spread": 0.0,
}


def make_store(path: Path) -> RevocationStore:
    path.mkdir(parents=True, exist_ok=True)
    return RevocationStore(SharedTable.create(path / "table"), path / "state.json")


def create_unchecked(api: Any, obj: dict[str, Any]) -> dict[str, Any]:
    """Store an object as if created before the CRD's validation refused it (an upgrade
    keeps such objects): no schema or CEL check, so the watcher's own check is what runs."""
    rtype = api.cluster.type_for_kind(obj["apiVersion"], obj["kind"])
    created: dict[str, Any] = api.cluster.create(rtype, obj["metadata"]["namespace"], obj)
    return created


@pytest.fixture
def store(tmp_path: Path) -> RevocationStore:
    return make_store(tmp_path / "pod-a")


@pytest.fixture
async def api_client(kubeconfig: Path) -> AsyncIterator[ApiClient]:  # noqa: F811
    client = await make_api_client(kubeconfig)
    yield client
    await client.close()


async def _watchers(
    config: Path, cls: type[RevocationWatcher] | type[ElevationWatcher]
) -> AsyncIterator[Callable[..., Any]]:
    """start(target, pod_name="pod-a", **options) -> a running watcher of ``cls`` on the
    namespace `agents` with its own ApiClient (as in a pod); all are stopped at the end."""
    running: list[Any] = []

    async def start(target: Any, pod_name: str = "pod-a", **options: Any) -> Any:
        client = await make_api_client(config)
        watcher = cls(
            target,
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


@pytest.fixture
async def start_watcher(kubeconfig: Path) -> AsyncIterator[Callable[..., Any]]:  # noqa: F811
    """start_watcher(store, pod_name="pod-a", **options) -> a running RevocationWatcher."""
    async for start in _watchers(kubeconfig, RevocationWatcher):
        yield start


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


class FakeSink:
    """An ApprovalSink that records every call. By default it grants every approval for its
    duration (else 10 minutes) from approved_at; `answer` decides otherwise, `fail` makes
    upsert_approval raise."""

    def __init__(self) -> None:
        self.approvals: dict[str, Approval] = {}
        self.calls: list[tuple[str, Any]] = []
        self.answer: Callable[[Approval], tuple[str, str, str, float | None]] = self.grant
        self.fail = False

    @staticmethod
    def grant(a: Approval) -> tuple[str, str, str, float | None]:
        return (
            "Granted",
            f"grant g-{a.name} granted",
            f"g-{a.name}",
            a.approved_at + (a.duration or 600.0),
        )

    def replace_approvals(self, source: str, approvals: Any) -> None:
        self.calls.append(("replace", sorted(a.key for a in approvals)))
        self.approvals = {a.key: a for a in approvals}

    def upsert_approval(self, approval: Approval) -> tuple[str, str, str, float | None]:
        self.calls.append(("upsert", approval.key))
        if self.fail:
            raise RuntimeError("the sink is broken")
        self.approvals[approval.key] = approval
        return self.answer(approval)

    def remove_approval(self, key: str) -> None:
        self.calls.append(("remove", key))
        self.approvals.pop(key, None)

    def count(self, what: str, key: str | None = None) -> int:
        return sum(1 for c, k in self.calls if c == what and (key is None or k == key))


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
async def start_elevation_watcher(
    kubeconfig: Path,  # noqa: F811
) -> AsyncIterator[Callable[..., Any]]:
    """start_elevation_watcher(sink, pod_name="pod-a", **options) -> a running
    ElevationWatcher."""
    async for start in _watchers(kubeconfig, ElevationWatcher):
        yield start
