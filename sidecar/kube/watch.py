"""Kubernetes adapter: the AgentRevocation and AgentElevation watchers and their reports.

Role: keep mandate's state equal to two kinds of custom resources of one namespace.

- AgentRevocation → the `kubernetes` source of the
  :class:`~sidecar.state.revocations.RevocationStore`.
- AgentElevation → the operator approvals of an :class:`ApprovalSink` (the supervisor's
  context store), which turns them into elevation grants.

Both watchers share one loop (`_ListWatch`): list, then watch from the list's
resourceVersion (with bookmarks), following every ADDED/MODIFIED/DELETED; on `410 Gone`
list again and replace the whole source; when a stream ends resume from the last
resourceVersion seen; when the API server is unreachable retry with exponential backoff and
full jitter, keeping the last known state: a watcher that cannot reach Kubernetes never
removes a revocation or ends a grant. `connected`, `last_error`, `relists` and
`last_sync_at` say how it is doing (readiness, metrics).

Operators see the results from kubectl. Revocations: for each revocation newly in force in
this pod, a core/v1 Event on the object (reason RevocationEnforced, naming the pod, the time
the table write became visible and the delay since the object was created), and once per
object, not once per pod, `status.firstEnforcedAt`/`firstEnforcedBy` with `state: Enforced`
and an Enforced condition (a merge patch on the status subresource, conditional on the
resourceVersion, written only while absent). A revocation whose `expiresAt` has passed gets
`state: Expired` and an Expired condition, once per object: when it ends while watched, or
at once when it was already past on arrival, which also earns a Warning Event
(RevocationExpired) from the one pod that wrote the status, since such an object revokes
nothing and the operator who applied it must learn that.
Elevations: the sink's answer in `status` (state, message, grantId, expiresAt,
observedGeneration; a merge patch conditional on the resourceVersion, where a better-informed
answer wins over a worse one, see `_should_write`), an invalid object's problems as state
Invalid, and an Event (ElevationGranted) from each pod that holds the grant; an approval that
came after its request lapsed is Expired, with a Warning Event (ElevationExpired) from the pod
that held the request. Reporting
failures are logged and never affect enforcement.

This module writes revocations only through RevocationStore (replace_source, upsert,
remove, mark_complete) and approvals only through the ApprovalSink; it never clears either
because the API is unreachable. The object → Revocation / Approval conversions are pure
(`revocation_from_object`, `approval_from_object`). kubernetes_asyncio and aiohttp errors
are translated here; nothing else imports them. No decision logic here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TypedDict, Unpack

import aiohttp
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.watch import Watch

from sidecar.core.context import Approval
from sidecar.core.model import parse_duration
from sidecar.core.revocation import ALL_AGENTS, Revocation, make_key
from sidecar.core.timefmt import parse_rfc3339, utc_millis, utc_seconds
from sidecar.errors import ConfigError
from sidecar.state.revocations import Change, RevocationStore

__all__ = [
    "ELEVATION_EVENT_REASON",
    "ELEVATION_EXPIRED_EVENT_REASON",
    "ELEVATION_KIND",
    "ELEVATION_PLURAL",
    "ELEVATION_STATES",
    "EVENT_REASON",
    "EXPIRED_EVENT_REASON",
    "GROUP",
    "KIND",
    "PLURAL",
    "SOURCE",
    "VERSION",
    "ApprovalSink",
    "ElevationWatcher",
    "RevocationWatcher",
    "WatchOptions",
    "approval_from_object",
    "make_api_client",
    "publish_revocation",
    "revocation_from_object",
    "start_elevation_watcher",
    "start_watcher",
    "watch_elevations",
    "watch_revocations",
]

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "mandate.dev", "v1alpha1", "agentrevocations", "AgentRevocation"
ELEVATION_PLURAL, ELEVATION_KIND = "agentelevations", "AgentElevation"
SOURCE = "kubernetes"
EVENT_REASON = "RevocationEnforced"
EXPIRED_EVENT_REASON = "RevocationExpired"
ELEVATION_EVENT_REASON = "ElevationGranted"
ELEVATION_EXPIRED_EVENT_REASON = "ElevationExpired"
# The values of an AgentElevation's status.state, from the least to the best informed: a
# status is only overwritten, for the same generation, by a better-informed state.
ELEVATION_STATES = ("Invalid", "Pending", "Granted", "Expired")
LIST_PAGE = 500
_MESSAGE_MAX = 1000  # status.message: enough for every problem, bounded for etcd

# A profile or elevation name (the profile format's `Name`).
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def revocation_from_object(obj: Mapping[str, Any], namespace: str) -> tuple[Revocation, list[str]]:
    """An AgentRevocation object as the Revocation to enforce, and the problems found in it.

    Pure. Every object yields a revocation, malformed or not: an object the API server let
    through is an operator's intent to stop traffic, so doubt is resolved towards enforcing
    (an unparsable expiresAt: no expiry; no agent: every agent of the namespace)."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    ns = str(meta.get("namespace") or namespace)
    raw_spec = obj.get("spec")
    spec: Mapping[str, Any] = raw_spec if isinstance(raw_spec, Mapping) else {}
    problems: list[str] = []
    agent = spec.get("agent")
    if not isinstance(agent, str) or not agent:
        problems.append(f"spec.agent {agent!r} is not an agent name: revoking every agent")
        agent = ALL_AGENTS
    reason = spec.get("reason")
    if not isinstance(reason, str) or not reason:
        problems.append("spec.reason is missing")
        reason = f"AgentRevocation {ns}/{name}"
    expires_at = None
    if spec.get("expiresAt") is not None:
        expires_at = parse_rfc3339(spec["expiresAt"])
        if expires_at is None:
            problems.append(
                f"spec.expiresAt {spec['expiresAt']!r} is not an RFC 3339 time: "
                "enforcing the revocation without expiry"
            )
    rev = Revocation(
        key=make_key(SOURCE, ns, name),
        agent=agent,
        namespace=ns,
        reason=reason,
        source=SOURCE,
        name=name,
        expires_at=expires_at,
        created_at=parse_rfc3339(meta.get("creationTimestamp")) or 0.0,
        uid=str(meta.get("uid", "")),
    )
    return rev, problems


def _text(spec: Mapping[str, Any], field: str, problems: list[str], *, required: bool) -> str:
    """spec.<field> as a non-empty string ("" when absent and optional); else a problem."""
    value = spec.get(field)
    if value is None:
        if required:
            problems.append(f"spec.{field}: Required value")
        return ""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"spec.{field}: {value!r} is not a non-empty string")
        return ""
    return value


def approval_from_object(
    obj: Mapping[str, Any], namespace: str, *, now: float | None = None
) -> tuple[Approval | None, list[str]]:
    """An AgentElevation object as the operator's Approval, and the problems found in it.

    Pure (given ``now``). Unlike a revocation, doubt is resolved towards granting nothing:
    an object with any problem yields None (its status says why). The grant window starts at
    metadata.creationTimestamp, so that every replica and every restart computes the same
    window; only an object without one (never from a real API server) falls back to ``now``
    (default: the current time)."""
    raw_meta = obj.get("metadata")
    meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
    name = str(meta.get("name", ""))
    ns = str(meta.get("namespace") or namespace)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return None, ["spec: Required value"]
    problems: list[str] = []
    agent = _text(spec, "agent", problems, required=True)
    if agent and not _NAME.match(agent):
        problems.append(f"spec.agent: {agent!r} is not an agent (profile) name")
    elevation = _text(spec, "elevation", problems, required=True)
    if elevation and not _NAME.match(elevation):
        problems.append(f"spec.elevation: {elevation!r} is not an elevation name")
    approver = _text(spec, "approver", problems, required=True)
    request_id = _text(spec, "requestId", problems, required=False)
    reason = spec.get("reason")
    if reason is not None and not isinstance(reason, str):
        problems.append(f"spec.reason: {reason!r} is not a string")
    duration = None
    if spec.get("duration") is not None:
        try:
            duration = parse_duration(spec["duration"])
        except ValueError as exc:
            problems.append(f"spec.duration: {exc}")
    if problems:
        return None, problems
    approved_at = parse_rfc3339(meta.get("creationTimestamp"))
    if approved_at is None:
        approved_at = time.time() if now is None else now
    approval = Approval(
        key=make_key(SOURCE, ns, name),
        agent=agent,
        namespace=ns,
        elevation=elevation,
        approver=approver,
        approved_at=approved_at,
        request_id=request_id,
        duration=duration,
        reason=reason if isinstance(reason, str) else "",
        source=SOURCE,
        name=name,
        uid=str(meta.get("uid", "")),
    )
    return approval, []


async def make_api_client(
    kubeconfig: str | Path | None = None, *, context: str | None = None
) -> ApiClient:
    """An ApiClient from a kubeconfig file, or from the pod's service account when None."""
    cfg = Configuration()
    try:
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
    except (ConfigException, OSError, ValueError, KeyError) as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig is not None else "in-cluster config"
        raise ConfigError(f"{where}: cannot be loaded ({exc})") from None
    return ApiClient(configuration=cfg)


class _StreamError(Exception):
    """The watch stream carried something that is not a watch event."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        message = ""
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(exc.body or b"").get("message", "")
        return f"HTTP {exc.status} {exc.reason or ''}".strip() + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_Job = tuple[Callable[[], Awaitable[None]], str]  # a report to send, and what it reports


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


class RevocationWatcher(_ListWatch):
    """Lists and watches AgentRevocations of one namespace into a RevocationStore.

    `run()` is the infinite loop (bounded by `_iterations` in tests: one iteration is a list
    if needed plus one watch stream); `start()`/`stop()` run it as a task."""

    _plural = PLURAL
    _kind = KIND
    _noun = "revocation"

    def __init__(
        self,
        store: RevocationStore,
        namespace: str,
        *,
        api_client: ApiClient,
        pod_name: str,
        **options: Unpack[WatchOptions],
    ) -> None:
        super().__init__(namespace, api_client=api_client, pod_name=pod_name, **options)
        self.store = store
        self._objects: dict[str, _Object] = {}
        self._reported: set[tuple[str, str]] = set()
        self._expiry_reported: set[tuple[str, str]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._subscribed = False

    def _started(self) -> None:
        if self._report_enabled and not self._subscribed:
            self.store.subscribe(self._on_change)
            self._subscribed = True

    def _finished(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _kept(self) -> int:
        return len(self.store.entries(SOURCE))

    def _replace(self, items: list[Mapping[str, Any]]) -> str:
        self._objects.clear()
        revocations = [self._convert(obj) for obj in items]
        current = {r.key for r in revocations}
        for key in set(self._timers) - current:
            self._timers.pop(key).cancel()
        self._expiry_reported = {k for k in self._expiry_reported if k[0] in current}
        added, removed = self.store.replace_source(SOURCE, revocations)
        self.store.mark_complete()
        return f"{added} added, {removed} removed"

    def _apply(self, obj: Mapping[str, Any]) -> None:
        self.store.upsert(self._convert(obj))

    def _remove(self, obj: Mapping[str, Any]) -> None:
        key = self._key(obj)
        self._objects.pop(key, None)
        self._expiry_reported = {k for k in self._expiry_reported if k[0] != key}
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self.store.remove(key)

    def _convert(self, obj: Mapping[str, Any]) -> Revocation:
        rev, problems = revocation_from_object(obj, self.namespace)
        meta = obj.get("metadata") or {}
        status = obj.get("status")
        self._objects[rev.key] = _Object(
            rev.uid,
            str(meta.get("resourceVersion", "")),
            dict(status) if isinstance(status, Mapping) else {},
            _generation(meta),
        )
        self._warn(rev.name, rev.uid, problems)
        self._watch_expiry(rev)
        return rev

    # -- reporting ------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """Store listener (called inside the store's write, maybe from another thread): queue
        a report for each Kubernetes revocation newly in force here."""
        if not self._running:
            return
        added, removed, _generation, visible_at = change
        replaced = {r.key: r for r in removed}
        added_keys = {r.key for r in added}
        for r in removed:
            if r.key not in added_keys:
                self._reported.discard((r.key, r.uid))
        for rev in added:
            if rev.source != SOURCE or not rev.active(visible_at):
                continue
            old = replaced.get(rev.key)
            if (old is not None and old.uid == rev.uid) or (rev.key, rev.uid) in self._reported:
                continue  # an object already enforced here, changed
            self._reported.add((rev.key, rev.uid))
            self._enqueue(
                functools.partial(self._report, rev, visible_at),
                f"enforcement of AgentRevocation {rev.namespace}/{rev.name}",
            )

    async def _report(self, rev: Revocation, visible_at: float) -> None:
        try:
            await self._create_event(rev, visible_at)
        finally:
            await self._set_first_enforced(rev, visible_at)

    async def _create_event(self, rev: Revocation, visible_at: float) -> None:
        message = f"enforced by pod {self.pod_name} from {utc_millis(visible_at)}"
        if rev.created_at:
            # creationTimestamp has whole seconds: the delay is exact to about a second.
            message += (
                f", {max(0.0, visible_at - rev.created_at):.3f}s after the object was created"
            )
        await self._post_event(rev.name, rev.uid, EVENT_REASON, message, visible_at)

    async def _set_first_enforced(self, rev: Revocation, visible_at: float) -> None:
        """status.firstEnforcedAt/By, state Enforced and the Enforced condition, once per
        object: of many pods racing, exactly one writes it."""
        stamp = utc_seconds(visible_at)

        def desired(status: Mapping[str, Any], generation: int | None) -> dict[str, Any] | None:
            if status.get("firstEnforcedAt"):
                return None
            return {
                "firstEnforcedAt": stamp,
                "firstEnforcedBy": self.pod_name,
                # An Expired state written first (a race with the end) stays.
                "state": status.get("state") or "Enforced",
                "conditions": _with_condition(
                    status,
                    "Enforced",
                    "InForce",
                    f"enforced by pod {self.pod_name} from {stamp}",
                    stamp,
                    generation,
                ),
            }

        await self._patch_status(rev, desired)

    # -- expiry -----------------------------------------------------------------------------

    def _watch_expiry(self, rev: Revocation) -> None:
        """An expiresAt already past: report it now. One still ahead: report it when it comes
        (the revocation itself ends by the reader's clock; this is what kubectl shows)."""
        timer = self._timers.pop(rev.key, None)
        if timer is not None:
            timer.cancel()
        if not self._report_enabled:
            return
        now = self._clock()
        seen = self._objects.get(rev.key)
        if seen is not None and seen.status.get("state") == "Expired":
            if rev.expires_at is None or rev.expires_at > now:
                # The operator moved expiresAt ahead (or removed it): the agent is revoked
                # again, and kubectl must not keep calling the object inert.
                self._expiry_reported.discard((rev.key, rev.uid))
                self._enqueue(
                    functools.partial(self._set_in_force_again, rev),
                    f"the renewal of AgentRevocation {rev.namespace}/{rev.name}",
                )
            else:
                return
        if rev.expires_at is None:
            return
        if rev.expires_at <= now:
            self._report_expiry(rev, on_arrival=(rev.key, rev.uid) not in self._reported)
        elif self._loop is not None and self._running:
            self._timers[rev.key] = self._loop.call_later(
                rev.expires_at - now, self._expiry_due, rev
            )

    def _expiry_due(self, rev: Revocation) -> None:
        self._timers.pop(rev.key, None)
        seen = self._objects.get(rev.key)
        if seen is None or seen.uid != rev.uid:
            return  # deleted or replaced meanwhile
        if rev.expires_at is not None and rev.expires_at > self._clock():
            self._watch_expiry(rev)  # the loop's timer fired early: wait again
            return
        self._report_expiry(rev, on_arrival=False)

    def _report_expiry(self, rev: Revocation, *, on_arrival: bool) -> None:
        if (rev.key, rev.uid) in self._expiry_reported:
            return
        self._expiry_reported.add((rev.key, rev.uid))
        self._enqueue(
            functools.partial(self._set_expired, rev, on_arrival),
            f"the expiry of AgentRevocation {rev.namespace}/{rev.name}",
        )

    async def _set_expired(self, rev: Revocation, on_arrival: bool) -> None:
        """state Expired and the Expired condition, once per object. An object that was
        already expired when it arrived revokes nothing: the pod that wrote the status also
        posts a Warning Event, so that `kubectl describe` and `kubectl get events` say so."""
        assert rev.expires_at is not None
        now = self._clock()
        ended = utc_seconds(rev.expires_at)
        if on_arrival:
            reason = "ExpiredOnArrival"
            message = (
                f"spec.expiresAt {ended} had already passed when pod {self.pod_name} first saw "
                f"this revocation at {utc_seconds(now)}: it revokes nothing. Delete it, or "
                "set expiresAt in the future (or remove it) to revoke."
            )
        else:
            reason, message = "Ended", f"the revocation ended at {ended} (spec.expiresAt)"

        def desired(status: Mapping[str, Any], generation: int | None) -> dict[str, Any] | None:
            if status.get("state") == "Expired":
                return None
            conditions = _with_condition(
                status, "Expired", reason, message, utc_seconds(now), generation
            )
            return {"state": "Expired", "conditions": conditions}

        try:
            wrote = await self._patch_status(rev, desired)
        except Exception:
            self._expiry_reported.discard((rev.key, rev.uid))  # the next sight tries again
            raise
        if wrote and on_arrival:
            await self._post_event(
                rev.name, rev.uid, EXPIRED_EVENT_REASON, message, now, type_="Warning"
            )

    async def _set_in_force_again(self, rev: Revocation) -> None:
        """state Enforced again, without the Expired condition, after expiresAt moved ahead."""
        now = self._clock()
        stamp = utc_seconds(now)

        def desired(status: Mapping[str, Any], generation: int | None) -> dict[str, Any] | None:
            if status.get("state") != "Expired":
                return None
            if rev.expires_at is not None and rev.expires_at <= self._clock():
                return None  # ended again meanwhile
            kept = {**status, "conditions": [
                c for c in status.get("conditions") or []
                if isinstance(c, Mapping) and c.get("type") != "Expired"
            ]}  # fmt: skip
            until = "" if rev.expires_at is None else f" until {utc_seconds(rev.expires_at)}"
            return {
                "state": "Enforced",
                "firstEnforcedAt": status.get("firstEnforcedAt") or stamp,
                "firstEnforcedBy": status.get("firstEnforcedBy") or self.pod_name,
                "conditions": _with_condition(
                    kept,
                    "Enforced",
                    "InForceAgain",
                    f"in force again{until}: spec.expiresAt changed (pod {self.pod_name})",
                    stamp,
                    generation,
                ),
            }

        await self._patch_status(rev, desired)

    # -- status writes ------------------------------------------------------------------------

    async def _patch_status(
        self,
        rev: Revocation,
        desired: Callable[[Mapping[str, Any], int | None], dict[str, Any] | None],
    ) -> bool:
        """A merge patch of the status that `desired(current status, generation)` asks for
        (None: nothing to write), conditional on the resourceVersion: of many pods racing,
        one writes and the others, answered 409, read the object again and ask once more.
        True if this pod wrote it."""
        seen = self._objects.get(rev.key)
        if seen is None or seen.uid != rev.uid:
            seen = _Object(rev.uid, "", {}, None)
        for _ in range(3):
            status = desired(seen.status, seen.generation)
            if status is None:
                return False
            if seen.resource_version:
                try:
                    written = await self._custom.patch_namespaced_custom_object_status(
                        GROUP,
                        VERSION,
                        rev.namespace,
                        PLURAL,
                        rev.name,
                        {
                            "metadata": {"resourceVersion": seen.resource_version, "uid": rev.uid},
                            "status": status,
                        },
                        **self._merge_patch,
                    )
                    self._remember(rev, written)
                    return True
                except ApiException as exc:
                    if exc.status == 404:
                        return False  # deleted meanwhile
                    if exc.status != 409:
                        raise
            try:
                current = await self._custom.get_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    rev.namespace,
                    PLURAL,
                    rev.name,
                    _request_timeout=self._request_timeout,
                )
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            meta = current.get("metadata") or {}
            if meta.get("uid") != rev.uid:
                return False
            seen = self._remember(rev, current)
        return False

    def _remember(self, rev: Revocation, obj: Any) -> _Object:
        """What this pod now knows of the object's status (a write's answer, or a read), so
        that the next write of the same object starts from it."""
        if not isinstance(obj, Mapping):
            obj = {}
        meta = obj.get("metadata") or {}
        status = obj.get("status")
        seen = _Object(
            rev.uid,
            str(meta.get("resourceVersion", "")),
            dict(status) if isinstance(status, Mapping) else {},
            _generation(meta),
        )
        known = self._objects.get(rev.key)
        if known is not None and known.uid == rev.uid:
            self._objects[rev.key] = seen
        return seen


@dataclass(frozen=True, slots=True)
class _Object:
    """What the revocation watcher last saw of one AgentRevocation."""

    uid: str
    resource_version: str
    status: Mapping[str, Any]
    generation: int | None


def _generation(meta: Mapping[str, Any]) -> int | None:
    value = meta.get("generation")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _with_condition(
    status: Mapping[str, Any],
    type_: str,
    reason: str,
    message: str,
    stamp: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """status.conditions with the condition `type_` set True (metav1.Condition's shape);
    the others kept. A merge patch replaces a list whole, so the caller sends all of them."""
    kept = [
        dict(c)
        for c in status.get("conditions") or []
        if isinstance(c, Mapping) and c.get("type") != type_
    ]
    condition: dict[str, Any] = {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": message[:_MESSAGE_MAX],
        "lastTransitionTime": stamp,
    }
    if generation is not None:
        condition["observedGeneration"] = generation
    return [*kept, condition]


# -- AgentElevation -----------------------------------------------------------------------------


class ApprovalSink(Protocol):
    """Where the ElevationWatcher delivers operator approvals (the supervisor's context
    store). Called from the watcher's event loop.

    - `replace_approvals`: the full set from ``source`` after a (re)list: approvals not in
      it are withdrawn (their grants end).
    - `upsert_approval`: one approval, new or changed; returns (state, message, grant_id,
      expires_at) for the object's status. state is one of ELEVATION_STATES (any case), or
      "" when this sidecar has no opinion (then the status is left to others). It must be
      idempotent per `approval.key`: after every (re)list the watcher asks it again for the
      answer of each object whose approval it has not seen yet.
    - `remove_approval`: the object was deleted (or became invalid): its grant ends. Keys
      the sink does not know are ignored."""

    def replace_approvals(self, source: str, approvals: Sequence[Approval]) -> None: ...

    def upsert_approval(self, approval: Approval) -> tuple[str, str, str, float | None]: ...

    def remove_approval(self, key: str) -> None: ...


_RANK = {state: rank for rank, state in enumerate(ELEVATION_STATES)}
_STATE_NAMES = {state.lower(): state for state in ELEVATION_STATES} | {"refused": "Invalid"}


@dataclass(frozen=True, slots=True)
class _Seen:
    """The latest version of an AgentElevation this watcher has seen."""

    name: str
    uid: str
    resource_version: str
    generation: int | None
    status: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Answer:
    """The sink's answer for an approval (only used while the approval is unchanged)."""

    approval: Approval
    state: str
    message: str
    grant_id: str
    expires_at: float | None


def _status(
    state: str, message: str, grant_id: str, expires_at: float | None, generation: int | None
) -> dict[str, Any]:
    """An AgentElevation's status as a merge patch: None removes a field left from before."""
    return {
        "state": state,
        "message": message[:_MESSAGE_MAX] or None,
        "grantId": grant_id or None,
        "expiresAt": utc_seconds(expires_at) if expires_at is not None else None,
        "observedGeneration": generation,
    }


def _ended(status: Mapping[str, Any]) -> dict[str, Any]:
    """A Granted status once the grant's time is up."""
    return {**status, "state": "Expired", "message": f"the grant ended at {status['expiresAt']}"}


def _present(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if v is not None and v != ""}


def _should_write(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether this pod's answer should replace the object's status.

    Every sidecar of the namespace answers for every AgentElevation, but only the pod that
    holds the agent's request knows it can grant; the others answer, say, Invalid ("no
    such request"). So for one generation of the object a status is replaced only by a
    better-informed state (ELEVATION_STATES order), never by an equal or worse one: the
    writes end after at most one per state, and the status the operator sees is the best
    answer any pod had."""
    if _present(current) == _present(desired):
        return False
    if current.get("observedGeneration") != desired.get("observedGeneration"):
        return True  # an answer for an older version of the object
    return _RANK.get(desired["state"], -1) > _RANK.get(current.get("state", ""), -1)


class ElevationWatcher(_ListWatch):
    """Lists and watches AgentElevations of one namespace into an ApprovalSink, and writes
    each object's status from the sink's answer.

    `run()` is the infinite loop (bounded by `_iterations` in tests); `start()`/`stop()` run
    it as a task. With `report=False` it writes no status and no Event."""

    _plural = ELEVATION_PLURAL
    _kind = ELEVATION_KIND
    _noun = "approval"

    def __init__(
        self,
        sink: ApprovalSink,
        namespace: str,
        *,
        api_client: ApiClient,
        pod_name: str,
        **options: Unpack[WatchOptions],
    ) -> None:
        super().__init__(namespace, api_client=api_client, pod_name=pod_name, **options)
        self.sink = sink
        self.status_writes = 0  # status patches the API server accepted
        self._seen: dict[str, _Seen] = {}
        self._answers: dict[str, _Answer] = {}  # valid objects the sink answered for
        self._invalid: set[str] = set()
        self._desired: dict[str, dict[str, Any]] = {}  # key -> the status this pod wants
        self._queued: set[str] = set()  # keys with a status write in the queue
        self._granted: set[tuple[str, str, str]] = set()  # (key, uid, grant id) reported
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def _kept(self) -> int:
        return len(self._answers)

    def _finished(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queued.clear()

    # -- objects → sink ---------------------------------------------------------------------

    def _see(self, obj: Mapping[str, Any]) -> tuple[str, _Seen]:
        meta = obj.get("metadata") or {}
        status = obj.get("status")
        generation = meta.get("generation")
        seen = _Seen(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            resource_version=str(meta.get("resourceVersion", "")),
            generation=generation if isinstance(generation, int) else None,
            status=status if isinstance(status, Mapping) else {},
        )
        key = self._key(obj)
        self._seen[key] = seen
        return key, seen

    def _replace(self, items: list[Mapping[str, Any]]) -> str:
        converted = []
        for obj in items:
            key, seen = self._see(obj)
            approval, problems = approval_from_object(obj, self.namespace, now=self._clock())
            converted.append((key, seen, approval, problems))
        listed = {key for key, *_ in converted}
        for key in [k for k in self._seen if k not in listed]:
            self._forget(key)  # deleted while this watcher was not watching
        # The sink gets the whole valid set first (it withdraws what is gone), then each
        # object's answer is asked for again only where the approval is new or changed.
        self.sink.replace_approvals(SOURCE, [a for _, _, a, _ in converted if a is not None])
        for key, seen, approval, problems in converted:
            if approval is None:
                self._answers.pop(key, None)
                self._set_invalid(key, seen, problems)
            else:
                self._invalid.discard(key)
                self._answer(key, seen, approval)
        valid = sum(1 for *_, a, _ in converted if a is not None)
        return f"{valid} valid, {len(converted) - valid} invalid"

    def _apply(self, obj: Mapping[str, Any]) -> None:
        key, seen = self._see(obj)
        approval, problems = approval_from_object(obj, self.namespace, now=self._clock())
        if approval is None:
            # No longer (or never) an approval: whatever it granted ends.
            if self._answers.pop(key, None) is not None:
                self._cancel_timer(key)
            self._call_sink(self.sink.remove_approval, key)
            self._set_invalid(key, seen, problems)
            return
        self._invalid.discard(key)
        self._answer(key, seen, approval)

    def _remove(self, obj: Mapping[str, Any]) -> None:
        key = self._key(obj)
        self._forget(key)
        self._call_sink(self.sink.remove_approval, key)

    def _forget(self, key: str) -> None:
        self._seen.pop(key, None)
        self._answers.pop(key, None)
        self._invalid.discard(key)
        self._desired.pop(key, None)
        self._cancel_timer(key)
        self._granted = {g for g in self._granted if g[0] != key}

    def _call_sink(self, method: Callable[..., Any], *args: Any) -> Any:
        """A sink call that cannot stop the watch: a failing sink is logged, and the same
        event is not retried (it would fail the same way, forever)."""
        try:
            return method(*args)
        except Exception:
            name = getattr(method, "__name__", "a call")
            log.exception("the approval sink failed on %s(%r)", name, args[0] if args else "")
            return None

    def _set_invalid(self, key: str, seen: _Seen, problems: Sequence[str]) -> None:
        self._invalid.add(key)
        self._warn(seen.name, seen.uid, problems)
        self._want(key, _status("Invalid", "; ".join(problems), "", None, seen.generation))

    def _answer(self, key: str, seen: _Seen, approval: Approval) -> None:
        cached = self._answers.get(key)
        if cached is None or cached.approval != approval:
            # New or changed: ask the sink. (An unchanged approval, e.g. after a status
            # write, keeps its answer: the sink is not asked once per status update.)
            answer = self._call_sink(self.sink.upsert_approval, approval)
            if answer is None:
                return
            try:
                state, message, grant_id, expires = answer
                expires_at = None if expires is None else float(expires)
            except (TypeError, ValueError):
                log.error("the approval sink answered %r: not (state, message, grant, end)", answer)
                return
            cached = _Answer(approval, str(state), str(message), str(grant_id), expires_at)
            self._answers[key] = cached
            self._cancel_timer(key)
            if cached.state and cached.state.lower() not in _STATE_NAMES:
                log.error(
                    "the approval sink answered state %r for AgentElevation %s/%s: "
                    "not one of %s; leaving the status alone",
                    cached.state,
                    self.namespace,
                    seen.name,
                    ", ".join(ELEVATION_STATES),
                )
        state = _STATE_NAMES.get(cached.state.lower(), "")
        if not state:
            return  # no opinion here: the status is some other sidecar's to write
        expires_at = cached.expires_at
        desired = _status(state, cached.message, cached.grant_id, expires_at, seen.generation)
        if state == "Granted" and expires_at is not None:
            if expires_at <= self._clock():
                desired = _ended(desired)
            else:
                self._expire_later(key, cached.grant_id, expires_at)
        self._want(key, desired)
        if state == "Granted" and (key, seen.uid, cached.grant_id) not in self._granted:
            self._granted.add((key, seen.uid, cached.grant_id))
            until = f" until {utc_seconds(expires_at)}" if expires_at is not None else ""
            self._enqueue_report(
                functools.partial(
                    self._post_event,
                    seen.name,
                    seen.uid,
                    ELEVATION_EVENT_REASON,
                    f"{approval.elevation} granted to {approval.agent} by pod {self.pod_name}"
                    f" (grant {cached.grant_id or '?'}{until}; approver {approval.approver})",
                    self._clock(),
                ),
                f"the grant of AgentElevation {self.namespace}/{seen.name}",
            )

    # -- expiry -------------------------------------------------------------------------------

    def _expire_later(self, key: str, grant_id: str, expires_at: float) -> None:
        """At the grant's end, the status says Expired (the grant itself ends by the reader's
        clock, with no writer involved: this is only what kubectl shows)."""
        if key in self._timers or self._loop is None or not self._running:
            return
        delay = max(0.0, expires_at - self._clock())
        self._timers[key] = self._loop.call_later(delay, self._expired, key, grant_id)

    def _expired(self, key: str, grant_id: str) -> None:
        self._timers.pop(key, None)
        desired = self._desired.get(key)
        if desired is None or desired.get("state") != "Granted":
            return
        if (desired.get("grantId") or "") != grant_id:
            return
        self._want(key, _ended(desired))

    def _cancel_timer(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    # -- status -------------------------------------------------------------------------------

    def _enqueue_report(self, job: Callable[[], Awaitable[None]], what: str) -> None:
        if self._report_enabled:
            self._enqueue(job, what)

    def _want(self, key: str, desired: dict[str, Any]) -> None:
        """Record the status this pod would write, and queue the write (one per object in
        the queue at a time: it writes whatever is wanted when its turn comes)."""
        self._desired[key] = desired
        seen = self._seen.get(key)
        if seen is None or key in self._queued or not _should_write(seen.status, desired):
            return
        if self._report_enabled and self._running:
            self._queued.add(key)
            self._enqueue(
                functools.partial(self._write_status, key),
                f"the status of AgentElevation {self.namespace}/{seen.name}",
            )

    async def _write_status(self, key: str) -> None:
        self._queued.discard(key)
        seen, desired = self._seen.get(key), self._desired.get(key)
        if seen is None or desired is None or not _should_write(seen.status, desired):
            return
        meta: dict[str, Any] = {"uid": seen.uid}
        if seen.resource_version:
            meta["resourceVersion"] = seen.resource_version
        try:
            await self._custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                ELEVATION_PLURAL,
                seen.name,
                {"metadata": meta, "status": desired},
                **self._merge_patch,
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                # Deleted, or changed since: the watch brings the new version, and its
                # answer is weighed against the new status then.
                return
            raise
        self.status_writes += 1
        if desired.get("state") == "Expired" and not desired.get("grantId"):
            # Approved after the request had lapsed: nothing was granted. The pod that wrote
            # this status (the one that held the request) warns the operator once.
            await self._post_event(
                seen.name,
                seen.uid,
                ELEVATION_EXPIRED_EVENT_REASON,
                str(desired.get("message", "")),
                self._clock(),
                type_="Warning",
            )

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "approvals": len(self._answers),
            "invalid": len(self._invalid),
            "status_writes": self.status_writes,
        }


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
    object's name. The object is an ordinary one: deleting it is how an operator ends it."""
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
        created: Any = await CustomObjectsApi(client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )
        return str(created["metadata"]["name"])
    finally:
        await client.close()
