"""Fleet scale (issue 19, item 9): many sidecars of one namespace watch the same objects, and
the writes every one of them would make (the first enforcement's status and Event, an
end, an elevation every pod grants) are made once, by the pod whose delay (`draw`) is
shortest; the others find it done through their watch and send nothing. When that pod is
gone, the next one writes. What each pod enforces is in its metrics, not in API writes.

Against the API-server emulation with the real watchers, several per test (one ApiClient
each, as in a pod). Counts come from the emulation's request log, not from timing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sidecar.core.timefmt import utc_seconds
from sidecar.kube import ELEVATION_EVENT_REASON, EVENT_REASON
from sidecar.kube.reporter import draw
from sidecar.state.revocations import RevocationStore
from sidecar.telemetry import metrics
from tests.kubeapi.server import KubeAPIServer

from .conftest import FakeSink, make_store, wait_for
from .test_elevation_watcher import aelev
from .test_watcher import arev, names


def requests(api: KubeAPIServer, method: str, suffix: str) -> int:
    """Requests of ``method`` whose path ends with ``suffix`` the emulation served."""
    return sum(
        1
        for r in api.requests
        if str(getattr(r.method, "value", r.method)) == method and r.url.path.endswith(suffix)
    )


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def start_pods(
    start: Any, tmp_path: Path, pods: list[str], **options: Any
) -> tuple[dict[str, RevocationStore], dict[str, Any]]:
    stores = {pod: make_store(tmp_path / pod) for pod in pods}
    watchers = {pod: await start(s, pod_name=pod, **options) for pod, s in stores.items()}
    for s in stores.values():
        await wait_for(lambda s=s: s.complete, what="synced")
    return stores, watchers


def by_draw(pods: list[str], uid: str) -> list[str]:
    return sorted(pods, key=lambda p: draw(p, uid))


def spaced(uid: str, n: int, gap: float, low: float = 0.0) -> list[str]:
    """``n`` pod names whose draws for ``uid`` are at least ``low`` and ``gap`` apart: each
    pod's delay ends well after the previous pod's write has reached it (how many pods
    write must not depend on how fast the machine is)."""
    # Greedy over the draws in order packs them tightest (low, low+gap, ...), so the pick
    # never depends on the uid, which the API server makes up at random.
    chosen: list[str] = []
    last = low - gap
    for d, pod in sorted((draw(f"agent-pod-{i}", uid), f"agent-pod-{i}") for i in range(2000)):
        if d >= low and d - last >= gap:
            chosen.append(pod)
            last = d
            if len(chosen) == n:
                return chosen
    raise AssertionError("no such pods")


async def test_one_status_write_and_one_event_for_a_fleet_the_first_draw_writes(
    kube_api: KubeAPIServer, tmp_path: Path, start_watcher: Any
) -> None:
    obj = kube_api.create(arev("a"))
    uid = obj["metadata"]["uid"]
    pods = spaced(uid, 5, gap=0.15)  # x 2 s: 0.3 s between one pod's delay and the next
    events_ok = sample("mandate_kubernetes_writes_total", resource="events", result="ok")
    patches, reads = (
        requests(kube_api, "PATCH", "/status"),
        requests(kube_api, "GET", "/status"),
    )
    stores, watchers = await start_pods(start_watcher, tmp_path, pods, report_spread=2.0)
    for s in stores.values():
        await wait_for(lambda s=s: names(s) == ["a"], what="enforced by every pod")
    status = await wait_for(
        lambda: kube_api.get("arev", "agents", "a").get("status"), what="status", timeout=5
    )
    first = by_draw(pods, uid)[0]
    assert status["firstEnforcedBy"] == first
    [event] = await wait_for(lambda: kube_api.events("agents"), what="the event")
    assert event["reason"] == EVENT_REASON and event["reportingInstance"] == first
    # Every other pod's delay ends within the spread; none of them writes anything.
    await asyncio.sleep(2.0 * (1 - draw(first, uid)) + 0.1)
    assert len(kube_api.events("agents")) == 1
    assert requests(kube_api, "PATCH", "/status") - patches == 1
    assert requests(kube_api, "GET", "/status") - reads == 0
    assert all(w.reports_failed == 0 for w in watchers.values())
    assert sample("mandate_kubernetes_writes_total", resource="events", result="ok") == (
        events_ok + 1
    )


async def test_without_a_delay_the_losers_of_the_race_neither_post_nor_read_again(
    kube_api: KubeAPIServer, tmp_path: Path, start_watcher: Any
) -> None:
    """The pods race (spread 0): one conditional write wins, the others are answered 409
    and leave it to their watch (no re-read, no Event)."""
    pods = [f"pod-{i}" for i in range(4)]
    stores, _ = await start_pods(start_watcher, tmp_path, pods, report_spread=0.0)
    await kube_api.until_watches(len(pods))
    reads = requests(kube_api, "GET", "/status")
    delays = sample("mandate_revocation_enforce_delay_seconds_count")
    kube_api.create(arev("a"))
    for s in stores.values():
        await wait_for(lambda s=s: names(s) == ["a"])
    status = await wait_for(lambda: kube_api.get("arev", "agents", "a").get("status"))
    await asyncio.sleep(0.5)
    [event] = kube_api.events("agents")
    assert event["reportingInstance"] == status["firstEnforcedBy"]
    assert requests(kube_api, "GET", "/status") == reads
    modified = [ev for _, ev, o in kube_api.history() if ev == "MODIFIED"]
    assert len(modified) == 1
    # Per-pod truth is in the metrics: every pod timed its enforcement of the new object.
    assert sample("mandate_revocation_enforce_delay_seconds_count") - delays == len(pods)


async def test_when_the_first_pod_is_gone_the_next_draw_reports(
    kube_api: KubeAPIServer, tmp_path: Path, start_watcher: Any
) -> None:
    """No leader to elect or lose: a pod that saw the object dies before its delay ended,
    and the pods left do not wait for it: the shortest draw among them writes the status
    and posts the Event, once."""
    # The dying pod's delay must not end before it dies, however slow the machine: it is
    # held (its reporter arms no timer) rather than raced against the clock.
    stores, watchers = await start_pods(start_watcher, tmp_path, ["dying"], report_spread=2.0)
    held: list[str] = []
    watchers["dying"].reporter._later = lambda key, *_: held.append(key)
    obj = kube_api.create(arev("a"))
    await wait_for(lambda: names(stores["dying"]) == ["a"])
    assert held == ["first|kubernetes:agents/a"]  # it saw the object and waits to write
    second, third = spaced(obj["metadata"]["uid"], 2, gap=0.15, low=0.05)  # x 2 s
    more, _ = await start_pods(start_watcher, tmp_path, [third, second], report_spread=2.0)
    await watchers["dying"].stop()  # the pod is deleted (its delay had not ended)
    status = await wait_for(
        lambda: kube_api.get("arev", "agents", "a").get("status"), what="status", timeout=5
    )
    assert status["firstEnforcedBy"] == second
    [event] = await wait_for(lambda: kube_api.events("agents"), what="the event")
    assert event["reportingInstance"] == second
    await asyncio.sleep(2.1)  # every delay is over
    assert len(kube_api.events("agents")) == 1
    assert all(names(s) == ["a"] for s in more.values())


async def test_the_end_of_a_revocation_is_written_once_for_the_fleet(
    kube_api: KubeAPIServer, tmp_path: Path, start_watcher: Any
) -> None:
    end = time.time() + 2.0
    obj = kube_api.create(arev("brief", expiresAt=utc_seconds(end + 1)))  # whole seconds
    pods = spaced(obj["metadata"]["uid"], 4, gap=0.25)  # x 1 s
    stores, _ = await start_pods(start_watcher, tmp_path, pods, report_spread=1.0)
    for s in stores.values():
        await wait_for(lambda s=s: names(s) == ["brief"])
    await wait_for(
        lambda: kube_api.get("arev", "agents", "brief").get("status", {}).get("state") == "Expired",
        timeout=8,
        what="expired",
    )
    await asyncio.sleep(1.1)  # every pod's delay after the end is over
    writes = [
        o["status"].get("state")
        for _, ev, o in kube_api.history()
        if ev == "MODIFIED" and o["metadata"]["name"] == "brief"
    ]
    assert writes == ["Enforced", "Expired"]  # once each, not once per pod
    assert [e["reason"] for e in kube_api.events("agents")] == [EVENT_REASON]


async def test_an_elevation_every_pod_grants_gets_one_status_write_and_one_event(
    kube_api: KubeAPIServer, start_elevation_watcher: Any
) -> None:
    """An approval without a request: every pod with the profile grants it (its own grant);
    the status and the ElevationGranted Event come from one of them."""
    obj = kube_api.create(aelev("everyone", duration="10m"))
    uid = obj["metadata"]["uid"]
    pods = spaced(uid, 4, gap=0.2)  # x 1.5 s
    sinks = {pod: FakeSink() for pod in pods}
    granted = sample("mandate_elevation_approvals_total", result="granted")
    watchers = {
        pod: await start_elevation_watcher(sink, pod_name=pod, report_spread=1.5)
        for pod, sink in sinks.items()
    }
    for sink in sinks.values():
        await wait_for(lambda sink=sink: sink.approvals, what="granted by every pod")
    first = by_draw(pods, uid)[0]
    status = await wait_for(
        lambda: kube_api.get("aelev", "agents", "everyone").get("status"), timeout=5
    )
    assert status["state"] == "Granted" and status["grantId"] == "g-everyone"
    [event] = await wait_for(lambda: kube_api.events("agents"), what="the event")
    assert event["reason"] == ELEVATION_EVENT_REASON and event["reportingInstance"] == first
    await asyncio.sleep(1.5 * (1 - draw(first, uid)) + 0.1)
    assert len(kube_api.events("agents")) == 1
    assert sum(w.status_writes for w in watchers.values()) == 1
    assert requests(kube_api, "PATCH", "/status") == 1
    assert sample("mandate_elevation_approvals_total", result="granted") == granted + len(pods)


async def test_an_elevation_that_names_a_request_is_reported_by_its_holder_at_once(
    kube_api: KubeAPIServer, start_elevation_watcher: Any
) -> None:
    """One pod holds the request: it writes at once (no delay to wait) and posts the Event;
    the others have no opinion and write nothing."""
    holder, *others = [f"pod-{i}" for i in range(3)]
    sinks = {pod: FakeSink() for pod in (holder, *others)}
    for pod in others:
        sinks[pod].answer = lambda a: ("", "", "", None)
    for pod, sink in sinks.items():
        await start_elevation_watcher(sink, pod_name=pod, report_spread=30.0)
    await kube_api.until_watches(3)
    kube_api.create(aelev("held", requestId="elev-1"))
    status = await wait_for(
        lambda: kube_api.get("aelev", "agents", "held").get("status"), timeout=5
    )
    assert status["state"] == "Granted"
    [event] = await wait_for(lambda: kube_api.events("agents"), what="the event")
    assert event["reportingInstance"] == holder
