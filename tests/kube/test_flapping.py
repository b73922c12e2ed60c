"""The AgentRevocation watcher while the Kubernetes API flaps (issue 8): the API server goes
away and comes back, answers list/watch with 500s or 503s, cuts or ends its streams and
compacts its history, while AgentRevocations are created, changed, deleted and recreated.

What must hold, checked on every change the store publishes and at the end of every round:
- the store never removes or replaces a revocation the API server still holds unchanged;
- while the watcher is disconnected nothing changes at all (the last known state stays in
  force, the shared table stays complete) and its status says it is disconnected and why;
- once the API is healthy again the store, the shared table the workers read and the
  persisted state converge to exactly the API's objects.

Faults come from the emulation's hooks and tests/kubeapi/faults.py; every wait is bounded
and waits for evidence (failed requests, backoff attempts), never for time alone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.revocation import Revocation
from sidecar.kube import SOURCE, revocation_from_object
from sidecar.state.revocations import Change, RevocationStore
from sidecar.state.shm import SharedTable
from tests.clocks import YEAR, from_now
from tests.kubeapi.faults import ListWatchErrors
from tests.kubeapi.server import KubeAPIServer

from .conftest import wait_for

NS = "agents"
AGENTS = ("billing-agent", "research-agent", "*")
KINDS = ("down", "errors", "watch-errors", "end", "abort", "gone", "gone-while-down", "storm")


class Jitter(random.Random):
    """The watcher's jitter source (its `rng` option); counts the backoff delays it draws
    (`uniform(0, cap)`), i.e. failed attempts to reach the API."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.backoffs = 0

    def uniform(self, a: float, b: float) -> float:
        if a == 0:
            self.backoffs += 1
        return super().uniform(a, b)


def api_state(api: KubeAPIServer) -> dict[str, Revocation]:
    """The revocations the API server holds, as the watcher converts them."""
    out = {}
    for obj in api.objects("agentrevocations", NS):
        rev, _ = revocation_from_object(obj, NS)
        out[rev.key] = rev
    return out


def kube_entries(store: RevocationStore) -> dict[str, Revocation]:
    return {r.key: r for r in store.entries(SOURCE)}


class Recorder:
    """A store listener that checks the invariants on every published change."""

    def __init__(self, api: KubeAPIServer, store: RevocationStore) -> None:
        self.api = api
        self.store = store
        self.frozen = False  # set while the watcher is known to be disconnected
        self.changes = 0
        self.violations: list[str] = []
        self._was_complete = False

    def __call__(self, change: Change) -> None:
        added, removed, _, _ = change
        self.changes += 1
        what = f"+{[r.key for r in added]} -{[r.key for r in removed]}"
        if self.frozen:
            self.violations.append(f"changed while disconnected: {what}")
        if self._was_complete and not self.store.complete:
            self.violations.append(f"table incomplete again: {what}")
        self._was_complete = self._was_complete or self.store.complete
        held = api_state(self.api)
        for r in removed:
            if held.get(r.key) == r:
                self.violations.append(f"removed {r.key} ({r.reason}) the API still holds")


class Mutator:
    """Random writes to the API server's objects (as other clients make them)."""

    def __init__(self, api: KubeAPIServer, rng: random.Random) -> None:
        self.api = api
        self.rng = rng
        self.n = 0

    def _names(self) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.api.objects("agentrevocations", NS))

    def create(self, name: str | None = None) -> None:
        self.n += 1
        spec: dict[str, Any] = {
            "agent": self.rng.choice(AGENTS),
            "reason": f"reason {self.n}",
        }
        expiry = self.rng.choice([None, None, from_now(50 * YEAR), from_now(-50 * YEAR)])
        if expiry:
            spec["expiresAt"] = expiry
        self.api.create(
            {
                "apiVersion": "mandate.dev/v1alpha1",
                "kind": "AgentRevocation",
                "metadata": {"name": name or f"r{self.n}", "namespace": NS},
                "spec": spec,
            }
        )

    def step(self) -> None:
        names = self._names()
        op = self.rng.choice(
            ["create", "create", "delete", "patch", "recreate"] if names else ["create"]
        )
        if op == "create":
            self.create()
        elif op == "delete":
            self.api.delete("arev", NS, self.rng.choice(names))
        elif op == "patch":
            self.n += 1
            self.api.patch(
                "arev", NS, self.rng.choice(names), {"spec": {"reason": f"changed {self.n}"}}
            )
        else:  # the same name, a new object (new uid)
            name = self.rng.choice(names)
            self.api.delete("arev", NS, name)
            self.create(name)

    def steps(self, low: int = 1, high: int = 3) -> None:
        for _ in range(self.rng.randint(low, high)):
            self.step()


@dataclass
class Pod:
    """One pod's view: the supervisor's store, the shared table as a worker attaches it, and
    the persisted state a restart would load."""

    store: RevocationStore
    reader: SharedTable
    state: Path


@pytest.fixture
def pod(tmp_path: Path) -> Pod:
    table = SharedTable.create(tmp_path / "table")
    store = RevocationStore(table, tmp_path / "state.json")
    return Pod(store, SharedTable.attach(tmp_path / "table"), tmp_path / "state.json")


async def converged(api: KubeAPIServer, pod: Pod, watcher: Any) -> None:
    """Wait (bounded) until the store equals the API's objects and the watch is back; then
    the workers' view of the shared table and the persisted state must be the same."""
    await wait_for(
        lambda: watcher.connected and kube_entries(pod.store) == api_state(api),
        timeout=15,
        what="the store to converge to the API's objects",
    )
    await api.until_watches(1)
    table = pod.reader.read()
    assert table.complete
    assert {r.key: r for r in table.entries} == api_state(api)
    persisted = json.loads(pod.state.read_text())["revocations"]
    assert {d["key"]: Revocation.from_dict(d) for d in persisted} == api_state(api)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_flapping_converges_and_never_clears_while_disconnected(
    seed: int,
    kube_api: KubeAPIServer,
    pod: Pod,
    start_watcher: Any,
) -> None:
    rng = random.Random(seed)
    api = kube_api
    mutate = Mutator(api, rng)
    for _ in range(3):
        mutate.create()
    store, reader = pod.store, pod.reader
    store.load_persisted()
    recorder = Recorder(api, store)
    store.subscribe(recorder)
    jitter = Jitter(seed)
    errors = ListWatchErrors(api, status=500)
    watch_errors = ListWatchErrors(api, status=503, requests="watch")
    watcher = await start_watcher(store, rng=jitter)
    await converged(api, pod, watcher)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    kinds += [rng.choice(KINDS) for _ in range(3)]

    async def disconnected(evidence: Callable[[], int]) -> None:
        """The watcher lost the API: freeze, change the API, see it retry, check that
        nothing moved and that its status says so."""
        await wait_for(lambda: not watcher.connected, what="the watcher to notice")
        recorder.frozen = True
        before, table_before = kube_entries(store), reader.read()
        status = watcher.status()
        assert status["connected"] is False and status["last_error"], status
        mutate.steps()
        seen = evidence()
        await wait_for(lambda: evidence() >= seen + 2, what="two more failed attempts")
        assert kube_entries(store) == before
        table = reader.read()
        assert table.complete and table.entries == table_before.entries
        assert watcher.status()["connected"] is False
        recorder.frozen = False

    for kind in kinds:
        if kind in ("down", "gone-while-down"):
            api.down()
            await disconnected(lambda: jitter.backoffs)
            if kind == "gone-while-down":
                api.compact()  # the watcher's resourceVersion is gone: 410, then a relist
            api.up()
        elif kind in ("errors", "watch-errors"):
            faults = errors if kind == "errors" else watch_errors
            faults.on()
            api.end_watches()  # the reconnection is what fails
            await disconnected(lambda faults=faults: faults.failed)  # type: ignore[misc]
            if rng.random() < 0.5:
                api.compact()
            faults.off()
        elif kind == "end":
            mutate.steps(0, 2)
            api.end_watches()
            mutate.steps()
        elif kind == "abort":
            mutate.steps(0, 2)
            api.cluster.abort_watches()  # cut mid-stream, no clean end
            mutate.steps()
        elif kind == "gone":
            mutate.steps()
            api.compact(expire_watches=True)
            mutate.steps(0, 2)
        else:  # storm: down and up again and again, changes in between, no waiting
            for _ in range(4):
                api.down()
                mutate.steps(0, 1)
                api.up()
        await converged(api, pod, watcher)
        assert recorder.violations == [], (kind, recorder.violations)
    assert recorder.changes > 0 and watcher.relists >= 1
    assert store.complete


async def test_a_failing_relist_keeps_the_last_state_until_a_list_succeeds(
    kube_api: KubeAPIServer,
    pod: Pod,
    start_watcher: Any,
) -> None:
    api = kube_api
    mutate = Mutator(api, random.Random(0))
    mutate.create("a")
    mutate.create("b")
    store, reader = pod.store, pod.reader
    recorder = Recorder(api, store)
    store.subscribe(recorder)
    lists = ListWatchErrors(api, status=500, requests="list")
    watcher = await start_watcher(store)
    await converged(api, pod, watcher)
    before = kube_entries(store)
    api.down()
    await wait_for(lambda: not watcher.connected, what="disconnected")
    api.delete("arev", NS, "a")
    mutate.create("c")
    api.compact()  # the resumed watch gets 410 Gone; the relist then fails with 500s
    lists.on()
    recorder.frozen = True
    api.up()
    await wait_for(lambda: lists.failed >= 3, what="three failed relists")
    assert kube_entries(store) == before  # "a" is still enforced: nothing confirmed it gone
    assert reader.read().complete
    status = watcher.status()
    assert status["connected"] is False and "HTTP 500" in (status["last_error"] or "")
    recorder.frozen = False
    changes = recorder.changes
    lists.off()
    await converged(api, pod, watcher)
    assert sorted(r.name for r in kube_entries(store).values()) == ["b", "c"]
    assert recorder.changes == changes + 1  # the relist wrote the difference in one change
    assert watcher.relists == 1 and recorder.violations == []


async def test_a_silent_api_server_is_reported_and_changes_nothing(
    kube_api: KubeAPIServer,
    pod: Pod,
    start_watcher: Any,
) -> None:
    """Connections are accepted and never answered (packets dropped, etcd stuck): the
    watcher gives up on each request after its timeouts and says so."""
    api = kube_api
    mutate = Mutator(api, random.Random(1))
    mutate.create("a")
    store, reader = pod.store, pod.reader
    recorder = Recorder(api, store)
    store.subscribe(recorder)
    silent = ListWatchErrors(api, status=503, hang=True)
    watcher = await start_watcher(store, idle_timeout=0.5, request_timeout=0.5)
    await converged(api, pod, watcher)
    before = kube_entries(store)
    silent.on()
    api.end_watches()
    await wait_for(lambda: not watcher.connected, what="the silence noticed")
    recorder.frozen = True
    api.delete("arev", NS, "a")
    await wait_for(lambda: silent.failed >= 3, what="three unanswered requests")
    assert kube_entries(store) == before and reader.read().complete
    status = watcher.status()
    assert status["connected"] is False and "Timeout" in (status["last_error"] or ""), status
    recorder.frozen = False
    silent.off()
    await converged(api, pod, watcher)
    assert kube_entries(store) == {} and recorder.violations == []
