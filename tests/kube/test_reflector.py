"""The reflector as an async generator (sidecar/kube/reflector.py) against the Kubernetes API
emulation over real HTTP, with no consumer but the test: what it yields after a list, a
change, a stream end, 410 Gone, an unreachable or forbidding API server, and a consumer's
failure thrown back into it.

Every wait is bounded and waits for evidence (an event, a watch request, a counted backoff),
never for time alone."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from sidecar.kube.reflector import Changed, Event, Listed, Reflector, ReflectorSettings
from tests.kubeapi.faults import ListWatchErrors
from tests.kubeapi.server import KubeAPIServer

from .conftest import FAST, wait_for

FAST_BASE, FAST_CAP = 0.02, 0.2
assert (FAST["backoff_base"], FAST["backoff_cap"]) == (FAST_BASE, FAST_CAP)


class Jitter(random.Random):
    """The reflector's jitter source; counts the backoff delays it draws (`uniform(0, x)`)."""

    def __init__(self) -> None:
        super().__init__(0)
        self.backoffs = 0

    def uniform(self, a: float, b: float) -> float:
        if a == 0:
            self.backoffs += 1
        return super().uniform(a, b)


def arev(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentRevocation",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {"agent": "billing-agent", "reason": f"reason {name}"},
    }


def names(event: Event) -> list[str]:
    objs = event.items if isinstance(event, Listed) else (event.obj,)
    return sorted(o["metadata"]["name"] for o in objs)


def change(event: Event) -> tuple[str, str]:
    assert isinstance(event, Changed), event
    return event.type, event.obj["metadata"]["name"]


def watch_rvs(api: KubeAPIServer) -> list[str]:
    return [
        r.params.get("resourceVersion", "")
        for r in api.requests
        if r.method == "GET" and r.params.get("watch")
    ]


@pytest.fixture
def jitter() -> Jitter:
    return Jitter()


@pytest.fixture
async def reflector(api_client: ApiClient, jitter: Jitter) -> Reflector:
    settings = ReflectorSettings(
        backoff_base=FAST_BASE,
        backoff_cap=FAST_CAP,
        watch_timeout=(30.0, 30.0),  # as the watchers' FAST options
        idle_timeout=10.0,
        request_timeout=5.0,
        rng=jitter,
    )
    return Reflector(
        api_client, "agents", plural="agentrevocations", kind="AgentRevocation", settings=settings
    )


@pytest.fixture
async def events(reflector: Reflector) -> AsyncIterator[AsyncGenerator[Event, None]]:
    gen = reflector.events()
    yield gen
    await gen.aclose()


async def next_event(events: AsyncGenerator[Event, None]) -> Event:
    return await asyncio.wait_for(anext(events), 10)


async def watching(events: AsyncGenerator[Event, None], api: KubeAPIServer) -> asyncio.Task[Event]:
    """Let the reflector go on from the event it yielded last (it opens its watch only when
    asked for the next one) and wait until the watch is open; the task gives the next
    event."""
    task = asyncio.ensure_future(asyncio.wait_for(anext(events), 10))
    await api.until_watches(1)
    return task


class Collector:
    """Consumes the generator in a task, as a watcher does; `seen` is what it yielded."""

    def __init__(self, events: AsyncGenerator[Event, None]) -> None:
        self.seen: list[Event] = []
        self._task = asyncio.create_task(self._run(events))

    async def _run(self, events: AsyncGenerator[Event, None]) -> None:
        async for event in events:
            self.seen.append(event)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_lists_then_watches_from_the_lists_resource_version(
    kube_api: KubeAPIServer, reflector: Reflector, events: AsyncGenerator[Event, None]
) -> None:
    kube_api.create(arev("a"))
    kube_api.create(arev("b"))
    listed_at = str(kube_api.resource_version)
    first = await next_event(events)
    assert isinstance(first, Listed)
    assert names(first) == ["a", "b"] and first.resource_version == listed_at
    kube_api.create(arev("c"))  # the watch, opened after the list, brings it
    assert change(await next_event(events)) == ("ADDED", "c")
    kube_api.patch("arev", "agents", "c", {"spec": {"reason": "changed"}})
    modified = await next_event(events)
    assert change(modified) == ("MODIFIED", "c")
    assert isinstance(modified, Changed) and modified.obj["spec"]["reason"] == "changed"
    kube_api.delete("arev", "agents", "a")
    assert change(await next_event(events)) == ("DELETED", "a")
    assert watch_rvs(kube_api) == [listed_at]
    health = reflector.health
    assert health.connected and health.last_error is None and health.last_sync_at
    assert (health.lists, health.relists) == (1, 0)


async def test_the_resource_version_moves_once_the_consumer_took_the_event(
    kube_api: KubeAPIServer, reflector: Reflector, events: AsyncGenerator[Event, None]
) -> None:
    listed = await next_event(events)
    assert isinstance(listed, Listed) and reflector.health.resource_version is None
    obj = kube_api.create(arev("a"))
    await next_event(events)  # the list was taken; "a" is yielded, not yet taken
    assert reflector.health.resource_version == listed.resource_version
    kube_api.create(arev("b"))
    await next_event(events)
    assert reflector.health.resource_version == obj["metadata"]["resourceVersion"]


async def test_a_stream_end_resumes_from_the_last_resource_version(
    kube_api: KubeAPIServer, reflector: Reflector, events: AsyncGenerator[Event, None]
) -> None:
    await next_event(events)
    pending = await watching(events, kube_api)
    kube_api.create(arev("a"))
    assert change(await pending) == ("ADDED", "a")
    last = str(kube_api.resource_version)
    pending = await watching(events, kube_api)
    assert kube_api.end_watches() == 1
    kube_api.create(arev("b"))  # made while the reflector reconnects: not missed
    assert change(await pending) == ("ADDED", "b")  # no Listed: resumed
    assert watch_rvs(kube_api)[1] == last
    assert (reflector.health.lists, reflector.health.relists) == (1, 0)


async def test_410_gone_lists_again_and_yields_replace_everything(
    kube_api: KubeAPIServer,
    reflector: Reflector,
    jitter: Jitter,
    events: AsyncGenerator[Event, None],
) -> None:
    for n in ("a", "b"):
        kube_api.create(arev(n))
    await next_event(events)
    collector = Collector(events)
    await kube_api.until_watches(1)
    kube_api.down()
    await wait_for(lambda: jitter.backoffs >= 2, what="two failed attempts")
    # Changes the watch cannot bring: its history is compacted while it is away.
    kube_api.delete("arev", "agents", "a")
    kube_api.create(arev("c"))
    kube_api.compact()
    kube_api.up()
    await wait_for(lambda: collector.seen, what="the relist")
    await collector.stop()
    [relisted] = collector.seen
    assert isinstance(relisted, Listed) and names(relisted) == ["b", "c"]
    assert relisted.resource_version == str(kube_api.resource_version)
    assert (reflector.health.lists, reflector.health.relists) == (2, 1)


async def test_410_on_an_open_stream_lists_again(
    kube_api: KubeAPIServer, reflector: Reflector, events: AsyncGenerator[Event, None]
) -> None:
    kube_api.create(arev("a"))
    await next_event(events)
    pending = await watching(events, kube_api)
    kube_api.compact(expire_watches=True)  # an ERROR event with a 410 Status on the stream
    relisted = await pending
    assert isinstance(relisted, Listed) and names(relisted) == ["a"]
    assert reflector.health.relists == 0  # counted once taken
    pending = await watching(events, kube_api)
    assert reflector.health.relists == 1
    assert reflector.health.resource_version == relisted.resource_version
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending


async def test_unreachable_backs_off_yields_nothing_then_resumes(
    kube_api: KubeAPIServer,
    reflector: Reflector,
    jitter: Jitter,
    events: AsyncGenerator[Event, None],
) -> None:
    kube_api.create(arev("a"))
    await next_event(events)
    collector = Collector(events)
    await kube_api.until_watches(1)
    kube_api.down()
    await wait_for(lambda: jitter.backoffs >= 3, what="three failed attempts")
    # Nothing yielded: no empty list, no deletion; the consumer keeps what it has.
    assert collector.seen == []
    health = reflector.health
    assert not health.connected and "Connect" in (health.last_error or "")
    kube_api.delete("arev", "agents", "a")
    kube_api.create(arev("b"))
    kube_api.up()
    await wait_for(lambda: len(collector.seen) == 2, what="the changes made while down")
    await collector.stop()
    assert [change(e) for e in collector.seen] == [("DELETED", "a"), ("ADDED", "b")]
    assert health.connected and health.last_error is None and health.relists == 0


async def test_delays_grow_with_full_jitter_up_to_the_cap(reflector: Reflector) -> None:
    base, cap = FAST_BASE, FAST_CAP
    for attempt in range(12):
        bound = min(cap, base * 2**attempt)
        delays = [reflector._delay(attempt) for _ in range(50)]
        assert all(0 <= d <= bound for d in delays)
    assert max(reflector._delay(30) for _ in range(200)) > cap / 2  # spread, not fixed


@pytest.mark.parametrize("requests", ["list", "both"])
async def test_forbidden_is_never_an_empty_list(
    kube_api: KubeAPIServer,
    reflector: Reflector,
    jitter: Jitter,
    events: AsyncGenerator[Event, None],
    requests: str,
) -> None:
    """RBAC refuses the list (and the watch): the reflector yields nothing at all, so a
    consumer can never take a 403 for "there are no objects"; it says it is unhealthy."""
    kube_api.create(arev("a"))
    forbidden = ListWatchErrors(kube_api, status=403, requests=requests)
    forbidden.on()
    collector = Collector(events)
    await wait_for(lambda: forbidden.failed >= 3, what="three refused lists")
    assert collector.seen == [] and jitter.backoffs >= 2
    health = reflector.health
    assert not health.connected and health.lists == 0
    assert (health.last_error or "").startswith("HTTP 403")
    forbidden.off()
    await wait_for(lambda: collector.seen, what="the list once allowed")
    await collector.stop()
    assert isinstance(collector.seen[0], Listed) and names(collector.seen[0]) == ["a"]
    assert health.connected and health.last_error is None


async def test_a_forbidden_watch_keeps_the_position_and_yields_nothing(
    kube_api: KubeAPIServer,
    reflector: Reflector,
    events: AsyncGenerator[Event, None],
) -> None:
    kube_api.create(arev("a"))
    await next_event(events)
    collector = Collector(events)
    await kube_api.until_watches(1)
    position = reflector.health.resource_version
    forbidden = ListWatchErrors(kube_api, status=403, requests="watch")
    forbidden.on()
    kube_api.end_watches()
    await wait_for(lambda: forbidden.failed >= 3, what="three refused watches")
    assert collector.seen == [] and reflector.health.resource_version == position
    assert (reflector.health.last_error or "").startswith("HTTP 403")
    kube_api.delete("arev", "agents", "a")
    forbidden.off()
    await wait_for(lambda: collector.seen, what="the deletion")
    await collector.stop()
    assert [change(e) for e in collector.seen] == [("DELETED", "a")]  # resumed, no relist


async def test_a_consumers_failure_backs_off_and_brings_the_event_again(
    kube_api: KubeAPIServer,
    reflector: Reflector,
    jitter: Jitter,
    events: AsyncGenerator[Event, None],
) -> None:
    await next_event(events)
    pending = await watching(events, kube_api)
    kube_api.create(arev("a"))
    assert change(await pending) == ("ADDED", "a")
    backoffs = jitter.backoffs
    again = await asyncio.wait_for(events.athrow(RuntimeError("the store is full")), 10)
    assert change(again) == ("ADDED", "a")
    assert jitter.backoffs == backoffs + 1
    assert reflector.health.lists == 1  # resumed from before the event, not relisted


async def test_a_failure_on_a_list_lists_again(
    kube_api: KubeAPIServer, reflector: Reflector, events: AsyncGenerator[Event, None]
) -> None:
    kube_api.create(arev("a"))
    listed = await next_event(events)
    assert isinstance(listed, Listed) and reflector.health.lists == 0  # not taken yet
    again = await asyncio.wait_for(events.athrow(RuntimeError("replace failed")), 10)
    assert isinstance(again, Listed) and names(again) == ["a"]
    assert (reflector.health.lists, reflector.health.relists) == (0, 0)
    kube_api.create(arev("b"))
    assert change(await next_event(events)) == ("ADDED", "b")
    assert (reflector.health.lists, reflector.health.relists) == (1, 0)


async def test_bookmarks_move_the_resource_version_without_an_event(
    kube_api: KubeAPIServer, reflector: Reflector, events: AsyncGenerator[Event, None]
) -> None:
    await next_event(events)
    collector = Collector(events)
    await kube_api.until_watches(1)
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "elsewhere"}})
    assert kube_api.bookmark() == 1
    await wait_for(
        lambda: reflector.health.resource_version == str(kube_api.resource_version),
        what="the bookmark",
    )
    await collector.stop()
    assert collector.seen == []


async def test_iterations_bound_the_generator(
    kube_api: KubeAPIServer, api_client: ApiClient
) -> None:
    kube_api.create(arev("a"))
    settings = ReflectorSettings(watch_timeout=(1.0, 1.0), request_timeout=5.0)
    reflector = Reflector(
        api_client, "agents", plural="agentrevocations", kind="AgentRevocation", settings=settings
    )

    async def run() -> list[Event]:
        return [e async for e in reflector.events(_iterations=1)]

    seen = await asyncio.wait_for(run(), 10)  # one list and one 1-second stream
    assert [type(e) for e in seen] == [Listed] and reflector.health.lists == 1
