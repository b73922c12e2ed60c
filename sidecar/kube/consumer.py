"""What the two watchers share: a :class:`Reflector` feeding one consumer, its
:class:`Reporter`, their run as a task and the status readiness and metrics read.

A watcher (`RevocationWatcher`, `ElevationWatcher`) says what a list, a change and a
deletion mean for its state (`_replace`, `_apply`, `_remove`); `run()` feeds it the
reflector's events. A consumer that fails on an event throws the error back into the
reflector, which backs off and brings the event again: a failure never skips a change and
never ends the watch.

It must not: talk to the API (the reflector and the reporter do), or catch library errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, Self, TypedDict

from kubernetes_asyncio.client import ApiClient

from sidecar.kube.errors import KubeError
from sidecar.kube.reflector import Event, Listed, Reflector, ReflectorSettings
from sidecar.kube.reporter import REPORT_SPREAD, Reporter, ReportOptions

__all__ = ["Consumer", "WatchOptions"]

log = logging.getLogger(__name__)


class WatchOptions(TypedDict, total=False):
    """The keyword options every watcher takes."""

    report: bool  # Events and status writes (False: read only)
    report_spread: float  # the longest delay before a write every pod would make (reporter)
    backoff_base: float
    backoff_cap: float
    watch_timeout: tuple[float, float]  # each watch request asks for a random one of these
    idle_timeout: float
    request_timeout: float
    clock: Callable[[], float]
    rng: random.Random | None
    owns_client: bool  # stop() closes the ApiClient


class Consumer:
    """One custom resource of one namespace, listed and watched into some state.

    `run()` is the infinite loop (bounded by `_iterations` in tests: one iteration is a list
    if needed plus one watch stream); `start()`/`stop()` run it as a task."""

    _plural = ""
    _kind = ""
    reporter: Reporter  # set by the subclass, from `_report_options`

    def __init__(
        self,
        namespace: str,
        *,
        api_client: ApiClient,
        pod_name: str,
        report: bool = True,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        watch_timeout: tuple[float, float] = (240.0, 300.0),
        idle_timeout: float = 90.0,
        request_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        owns_client: bool = False,
        report_spread: float = REPORT_SPREAD,
    ) -> None:
        self.namespace = namespace
        self.pod_name = pod_name
        self._client = api_client
        self._owns_client = owns_client
        self._clock = clock
        settings = ReflectorSettings(
            backoff_base=backoff_base,
            backoff_cap=backoff_cap,
            watch_timeout=watch_timeout,
            idle_timeout=idle_timeout,
            request_timeout=request_timeout,
            clock=clock,
            rng=rng or random.Random(),
        )
        self.reflector = Reflector(
            api_client,
            namespace,
            plural=self._plural,
            kind=self._kind,
            settings=settings,
            on_refused=self._refused,
        )
        self._report_options: ReportOptions = {
            "enabled": report,
            "clock": clock,
            "request_timeout": request_timeout,
            "spread": report_spread,
        }
        self._warned: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    # -- what a subclass defines --------------------------------------------------------------

    def _replace(self, items: Sequence[Mapping[str, Any]]) -> str:
        """The complete set of objects, after a (re)list; returns a summary for the log."""
        raise NotImplementedError

    def _apply(self, obj: Mapping[str, Any]) -> None:
        """An object was created or changed."""
        raise NotImplementedError

    def _remove(self, obj: Mapping[str, Any]) -> None:
        """An object was deleted."""
        raise NotImplementedError

    def _refused(self, exc: KubeError) -> None:
        """The API server refused the list or watch (401/403, or no such resource: 404).
        By default the last known state is kept (the reflector retries and logs)."""

    # -- the loop -------------------------------------------------------------------------

    async def run(self, *, _iterations: int | None = None) -> None:
        self.reporter.open()
        try:
            events = self.reflector.events(_iterations=_iterations)
            async with contextlib.aclosing(events):
                await self._follow(events)
            await self.reporter.drain()
        finally:
            await self.reporter.close()

    async def _follow(self, events: AsyncGenerator[Event, None]) -> None:
        """Consume every event; a failure is thrown back into the reflector (it backs off
        and brings the event again)."""
        try:
            event = await anext(events)
            while True:
                try:
                    self._consume(event)
                except Exception as exc:
                    event = await events.athrow(exc)
                else:
                    event = await anext(events)
        except StopAsyncIteration:
            return

    def _consume(self, event: Event) -> None:
        if isinstance(event, Listed):
            summary = self._replace(event.items)
            log.info(
                "listed %d %s(s) in %s at resourceVersion %s (%s)",
                len(event.items),
                self._kind,
                self.namespace,
                event.resource_version,
                summary,
            )
        elif event.type == "DELETED":
            self._remove(event.obj)
        else:
            self._apply(event.obj)

    def _warn(self, name: str, uid: str, problems: Sequence[str]) -> None:
        """Log each problem of an object once (per uid), not at every relist."""
        for problem in problems:
            if (uid, problem) not in self._warned:
                self._warned.add((uid, problem))
                log.error("%s %s/%s: %s", self._kind, self.namespace, name, problem)

    # -- lifecycle and status ---------------------------------------------------------------

    def start(self) -> Self:
        self._task = asyncio.create_task(self.run(), name=f"mandate-kube-{self._plural}")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._owns_client:
            await self._client.close()

    @property
    def connected(self) -> bool:
        return self.reflector.health.connected

    @property
    def last_error(self) -> str | None:
        return self.reflector.health.last_error

    @property
    def lists(self) -> int:
        return self.reflector.health.lists

    @property
    def relists(self) -> int:
        return self.reflector.health.relists

    @property
    def last_sync_at(self) -> float | None:
        return self.reflector.health.last_sync_at

    @property
    def resource_version(self) -> str | None:
        return self.reflector.health.resource_version

    @property
    def reports_failed(self) -> int:
        return self.reporter.reports_failed

    def status(self) -> dict[str, Any]:
        health = self.reflector.health
        return {
            "namespace": self.namespace,
            "connected": health.connected,
            "last_error": health.last_error,
            "lists": health.lists,
            "relists": health.relists,
            "last_sync_at": health.last_sync_at,
            "resource_version": health.resource_version,
            "reports_failed": self.reporter.reports_failed,
            "refused": health.refused,
        }
