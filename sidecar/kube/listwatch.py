"""The list + watch loop every watcher shares (`_ListWatch`): list, then watch from the
list's resourceVersion with bookmarks; relist on 410 Gone; resume when a stream ends;
exponential backoff with full jitter while the API server is unreachable, keeping the last
known state; and a queue of reports (Events, status writes) that never holds up the watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Self, TypedDict

import aiohttp
from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.watch import Watch

from sidecar.core.revocation import make_key
from sidecar.core.timefmt import utc_seconds
from sidecar.kube.client import _describe, _Job, _StreamError
from sidecar.kube.convert import GROUP, LIST_PAGE, SOURCE, VERSION

__all__ = ["WatchOptions"]

log = logging.getLogger(__name__)


class WatchOptions(TypedDict, total=False):
    """The keyword options every watcher takes (see `_ListWatch`)."""

    report: bool  # Events and status writes (False: read only)
    backoff_base: float
    backoff_cap: float
    watch_timeout: tuple[float, float]  # each watch request asks for a random one of these
    idle_timeout: float
    request_timeout: float
    clock: Callable[[], float]
    rng: random.Random | None
    owns_client: bool  # stop() closes the ApiClient


class _ListWatch:
    """List + watch of one custom resource in one namespace, with the relist on 410 Gone,
    resumption, backoff and a queue of reports (Events, status patches) that never holds
    up the watch. Subclasses say what a (re)list, a change and a deletion mean.

    `run()` is the infinite loop (bounded by `_iterations` in tests: one iteration is a list
    if needed plus one watch stream); `start()`/`stop()` run it as a task."""

    _plural = ""
    _kind = ""
    _noun = ""  # what the watcher keeps, for the logs: "revocation", "approval"

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
    ) -> None:
        self.namespace = namespace
        self.pod_name = pod_name
        self._client = api_client
        self._custom = CustomObjectsApi(api_client)
        self._core = CoreV1Api(api_client)
        self._report_enabled = report
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        # The server ends each watch after a random 4-5 minutes (as client-go asks); a watch
        # silent for idle_timeout (no event, no bookmark) is presumed dead and reopened.
        self._watch_timeout = watch_timeout
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        # kubernetes_asyncio would send a dict as a JSON patch; status needs a merge patch.
        # (Any: the library's stubs do not declare these keyword arguments.)
        self._merge_patch: Any = {
            "_content_type": "application/merge-patch+json",
            "_request_timeout": request_timeout,
        }
        self._clock = clock
        self._rng = rng or random.Random()
        self._owns_client = owns_client
        # -- what readiness and metrics read --
        self.connected = False
        self.last_error: str | None = None
        self.lists = 0  # every list (the first sync included)
        self.relists = 0  # lists after the first: 410 Gone, or nothing to resume from
        self.last_sync_at: float | None = None  # last list, event, bookmark or clean end
        self.resource_version: str | None = None
        self.reports_failed = 0
        # -- internal --
        self._failures = 0  # consecutive failed attempts: the backoff exponent
        self._short_streams = 0  # consecutive streams that ended at once with nothing
        self._gone_in_a_row = 0
        self._warned: set[tuple[str, str]] = set()
        self._reports: asyncio.Queue[_Job] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._stream_open = False  # the current watch request was answered 200

    # -- what a subclass defines --------------------------------------------------------------

    def _replace(self, items: list[Mapping[str, Any]]) -> str:
        """The complete set of objects, after a (re)list; returns a summary for the log."""
        raise NotImplementedError

    def _apply(self, obj: Mapping[str, Any]) -> None:
        """An object was created or changed."""
        raise NotImplementedError

    def _remove(self, obj: Mapping[str, Any]) -> None:
        """An object was deleted."""
        raise NotImplementedError

    def _kept(self) -> int:
        """How many entries the watcher keeps in force while it cannot reach the API."""
        raise NotImplementedError

    def _started(self) -> None:
        """In `run()`, before the first iteration."""

    def _finished(self) -> None:
        """In `run()`, when it ends (cancelled or bounded)."""

    # -- the loop -------------------------------------------------------------------------

    async def run(self, *, _iterations: int | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._reports = asyncio.Queue()
        self._running = True
        self._started()
        reporter = asyncio.create_task(
            self._report_loop(), name=f"mandate-kube-reports-{self._plural}"
        )
        try:
            n = 0
            while _iterations is None or n < _iterations:
                n += 1
                await self._iteration()
            await self._drain_reports()
        finally:
            self._running = False
            self._finished()
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

    async def _iteration(self) -> None:
        try:
            if self.resource_version is None:
                await self._list()
            started = time.monotonic()
            events = await self._watch()
        except ApiException as exc:
            if exc.status == 410:
                self._gone_in_a_row += 1
                log.info(
                    "%ss in %s: resourceVersion %s is gone (410): relisting",
                    self._kind,
                    self.namespace,
                    self.resource_version,
                )
                self.resource_version = None
                if self._gone_in_a_row > 1:  # relisting did not help: do not spin
                    await self._backoff(exc)
                return
            await self._backoff(exc)
            return
        except TimeoutError as exc:
            if self._stream_open:  # an open watch went silent: reopen it from where it was
                log.info("%s watch silent for %.0fs: reopening", self._kind, self._idle_timeout)
            else:  # no answer to a request: the API server is not reachable
                await self._backoff(exc)
            return
        except (aiohttp.ClientError, OSError, ValueError, _StreamError) as exc:
            await self._backoff(exc)
            return
        except Exception as exc:  # never let the watcher die: the state would freeze
            log.exception("%s watcher failed unexpectedly", self._kind)
            await self._backoff(exc)
            return
        # The stream ended cleanly (server timeout): resume from the last resourceVersion.
        self._gone_in_a_row = 0
        self._failures = 0
        self.last_sync_at = self._clock()
        if events == 0 and time.monotonic() - started < 1.0:
            self._short_streams += 1
            if self._short_streams > 1:  # a server ending every stream at once: slow down
                await asyncio.sleep(self._delay(self._short_streams - 2))
        else:
            self._short_streams = 0

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        return self._rng.uniform(
            0, min(self._backoff_cap, self._backoff_base * 2 ** min(attempt, 30))
        )

    async def _backoff(self, exc: BaseException) -> None:
        self.connected = False
        self.last_error = _describe(exc)
        delay = self._delay(self._failures)
        self._failures += 1
        log.warning(
            "%ss in %s: %s; keeping the last known %d %s(s); retrying in %.2fs",
            self._kind,
            self.namespace,
            self.last_error,
            self._kept(),
            self._noun,
            delay,
        )
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        items: list[Mapping[str, Any]] = []
        resource_version = ""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_request_timeout": self._request_timeout}
            if token:
                kwargs["_continue"] = token
            page = await self._custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, self._plural, **kwargs
            )
            if not isinstance(page, Mapping) or not isinstance(page.get("items"), list):
                raise _StreamError(f"unexpected list response: {str(page)[:200]}")
            meta = page.get("metadata") or {}
            resource_version = resource_version or str(meta.get("resourceVersion", ""))
            items.extend(page["items"])
            token = meta.get("continue")
            if not token:
                break
        summary = self._replace(items)
        if self.lists:
            self.relists += 1
        self.lists += 1
        self.resource_version = resource_version or None
        self.connected = True
        self.last_error = None
        self._failures = 0
        self.last_sync_at = self._clock()
        log.info(
            "listed %d %s(s) in %s at resourceVersion %s (%s)",
            len(items),
            self._kind,
            self.namespace,
            resource_version,
            summary,
        )

    async def _open(self, **kwargs: Any) -> Any:
        """The watch request, for Watch.stream: a non-200 answer becomes an ApiException here
        rather than being read as events."""
        resp = await self._custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self._plural, **kwargs
        )
        if resp.status != 200:
            body = await resp.text()
            resp.release()
            exc = ApiException(status=resp.status, reason=resp.reason)
            exc.body = body
            raise exc
        self._stream_open = True
        self.connected = True
        self.last_error = None
        self._failures = 0
        return resp

    async def _watch(self) -> int:
        """One watch stream from the last resourceVersion; returns the number of events."""
        timeout = int(self._rng.uniform(*self._watch_timeout))
        events = 0
        self._stream_open = False
        async with Watch() as w:
            stream = w.stream(
                self._open,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                _request_timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._request_timeout,
                    sock_read=min(timeout + 30.0, self._idle_timeout),
                ),
            )
            async for event in stream:
                self._on_event(event)
                events += 1
        return events

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, Mapping) or not isinstance(event.get("type"), str):
            raise _StreamError(f"not a watch event: {str(event)[:200]}")
        kind = event["type"]
        obj = event.get("raw_object", event.get("object"))
        if not isinstance(obj, Mapping):
            raise _StreamError(f"watch event without an object: {str(event)[:200]}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self._apply(obj)
        elif kind == "DELETED":
            self._remove(obj)
        elif kind != "BOOKMARK":
            log.warning("ignoring a watch event of type %r", kind)
        if rv:
            self.resource_version = str(rv)
        self._gone_in_a_row = 0
        self.last_sync_at = self._clock()

    def _key(self, obj: Mapping[str, Any]) -> str:
        return make_key(SOURCE, self.namespace, str((obj.get("metadata") or {}).get("name", "")))

    def _warn(self, name: str, uid: str, problems: Sequence[str]) -> None:
        """Log each problem of an object once (per uid), not at every relist."""
        for problem in problems:
            if (uid, problem) not in self._warned:
                self._warned.add((uid, problem))
                log.error("%s %s/%s: %s", self._kind, self.namespace, name, problem)

    # -- reports ----------------------------------------------------------------------------

    def _enqueue(self, job: Callable[[], Awaitable[None]], what: str) -> None:
        """Queue a report for the reporter task; safe from any thread."""
        if not self._running or self._loop is None or self._reports is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self._loop:
            self._reports.put_nowait((job, what))
        else:
            self._loop.call_soon_threadsafe(self._reports.put_nowait, (job, what))

    async def _report_loop(self) -> None:
        assert self._reports is not None
        while True:
            job, what = await self._reports.get()
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.reports_failed += 1
                log.warning("could not report %s: %s", what, _describe(exc))
            finally:
                self._reports.task_done()

    async def _drain_reports(self, timeout: float = 5.0) -> None:
        if self._reports is not None and self._report_enabled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reports.join(), timeout)

    async def _post_event(
        self, name: str, uid: str, reason: str, message: str, at: float, type_: str = "Normal"
    ) -> None:
        """A core/v1 Event on one of the watched objects, from this pod."""
        stamp = utc_seconds(at)
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            # Named as client-go names events: <object>.<nanoseconds in hex>.
            "metadata": {"name": f"{name[:236]}.{time.time_ns():x}", "namespace": self.namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": self._kind,
                "name": name,
                "namespace": self.namespace,
                "uid": uid,
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "mandate", "host": self.pod_name},
            "reportingComponent": "mandate",
            "reportingInstance": self.pod_name,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self._core.create_namespaced_event(
            self.namespace, body, _request_timeout=self._request_timeout
        )

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

    def status(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "connected": self.connected,
            "last_error": self.last_error,
            "lists": self.lists,
            "relists": self.relists,
            "last_sync_at": self.last_sync_at,
            "resource_version": self.resource_version,
            "reports_failed": self.reports_failed,
        }
