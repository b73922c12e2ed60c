"""Kubernetes adapter: the AgentRevocation watcher and its enforcement reports.

Role: keep the `kubernetes` source of the :class:`~sidecar.revocations.RevocationStore`
equal to the AgentRevocation objects of one namespace. It lists them, then watches from the
list's resourceVersion (with bookmarks), following every ADDED/MODIFIED/DELETED; on
`410 Gone` it lists again and replaces the source as a whole; when a stream ends it resumes
from the last resourceVersion it saw; when the API server is unreachable it retries with
exponential backoff and full jitter, and the table keeps the last known state: a watcher
that cannot reach Kubernetes never removes a revocation. `connected`, `last_error`,
`relists` and `last_sync_at` say how it is doing (readiness, metrics).

Operators see enforcement from kubectl: for each revocation newly in force in this pod, a
core/v1 Event on the object (reason RevocationEnforced, naming the pod, the time the table
write became visible and the delay since the object was created), and once per object, not
once per pod, `status.firstEnforcedAt`/`firstEnforcedBy` (a merge patch on the status
subresource, conditional on the resourceVersion, written only while absent). Reporting
failures are logged and never affect enforcement.

This module writes revocations only through RevocationStore (replace_source, upsert,
remove, mark_complete) and never clears the table because the API is unreachable. The
object → Revocation conversion is pure (`revocation_from_object`). kubernetes_asyncio and
aiohttp errors are translated here; nothing else imports them. No decision logic here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration, CoreV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.watch import Watch

from .core.revocation import ALL_AGENTS, Revocation, make_key
from .errors import ConfigError
from .revocations import Change, RevocationStore

__all__ = [
    "EVENT_REASON",
    "GROUP",
    "KIND",
    "PLURAL",
    "SOURCE",
    "VERSION",
    "RevocationWatcher",
    "make_api_client",
    "parse_time",
    "revocation_from_object",
    "start_watcher",
    "watch_revocations",
]

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "mandate.dev", "v1alpha1", "agentrevocations", "AgentRevocation"
SOURCE = "kubernetes"
EVENT_REASON = "RevocationEnforced"
LIST_PAGE = 500

# RFC 3339 as the API server lets it through (kube-openapi's `date-time`: `t`/`z` in any case,
# optional fraction). Values that pass the server's check yet name no real instant
# (2026-02-30, an offset of +25:00) fail here, and the revocation is then enforced without
# an expiry: fail closed.
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?([Zz]|[+-]\d{2}:\d{2})$"
)


def parse_time(value: object) -> float | None:
    """An RFC 3339 timestamp as seconds since the epoch, or None if it is not one."""
    if not isinstance(value, str):
        return None
    m = _RFC3339.match(value.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        if zone in ("Z", "z"):
            tz = datetime.UTC
        else:
            sign = -1 if zone[0] == "-" else 1
            offset = datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            tz = datetime.timezone(sign * offset)
        moment = datetime.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
        )
    except ValueError:
        return None
    return moment.timestamp() + (float(f"0.{frac}") if frac else 0.0)


def _rfc3339(ts: float, millis: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


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
        expires_at = parse_time(spec["expiresAt"])
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
        created_at=parse_time(meta.get("creationTimestamp")) or 0.0,
        uid=str(meta.get("uid", "")),
    )
    return rev, problems


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


class RevocationWatcher:
    """Lists and watches AgentRevocations of one namespace into a RevocationStore.

    `run()` is the infinite loop (bounded by `_iterations` in tests: one iteration is a list
    if needed plus one watch stream); `start()`/`stop()` run it as a task."""

    def __init__(
        self,
        store: RevocationStore,
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
        self.store = store
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
        self._objects: dict[str, tuple[str, str, bool]] = {}  # key -> (uid, rv, has status)
        self._reported: set[tuple[str, str]] = set()
        self._reports: asyncio.Queue[tuple[Revocation, float]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._subscribed = False
        self._stream_open = False  # the current watch request was answered 200

    # -- the loop -------------------------------------------------------------------------

    async def run(self, *, _iterations: int | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._reports = asyncio.Queue()
        self._running = True
        if self._report_enabled and not self._subscribed:
            self.store.subscribe(self._on_change)
            self._subscribed = True
        reporter = asyncio.create_task(self._report_loop(), name="mandate-kube-reports")
        try:
            n = 0
            while _iterations is None or n < _iterations:
                n += 1
                await self._iteration()
            await self._drain_reports()
        finally:
            self._running = False
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
                    "AgentRevocations in %s: resourceVersion %s is gone (410): relisting",
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
                log.info("AgentRevocation watch silent for %.0fs: reopening", self._idle_timeout)
            else:  # no answer to a request: the API server is not reachable
                await self._backoff(exc)
            return
        except (aiohttp.ClientError, OSError, ValueError, _StreamError) as exc:
            await self._backoff(exc)
            return
        except Exception as exc:  # never let the watcher die: the table would freeze
            log.exception("AgentRevocation watcher failed unexpectedly")
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
            "AgentRevocations in %s: %s; keeping the last known %d revocation(s); "
            "retrying in %.2fs",
            self.namespace,
            self.last_error,
            len(self.store.entries(SOURCE)),
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
                GROUP, VERSION, self.namespace, PLURAL, **kwargs
            )
            if not isinstance(page, Mapping) or not isinstance(page.get("items"), list):
                raise _StreamError(f"unexpected list response: {str(page)[:200]}")
            meta = page.get("metadata") or {}
            resource_version = resource_version or str(meta.get("resourceVersion", ""))
            items.extend(page["items"])
            token = meta.get("continue")
            if not token:
                break
        revocations = []
        self._objects.clear()
        for obj in items:
            revocations.append(self._convert(obj))
        added, removed = self.store.replace_source(SOURCE, revocations)
        self.store.mark_complete()
        if self.lists:
            self.relists += 1
        self.lists += 1
        self.resource_version = resource_version or None
        self.connected = True
        self.last_error = None
        self._failures = 0
        self.last_sync_at = self._clock()
        log.info(
            "listed %d AgentRevocation(s) in %s at resourceVersion %s (%d added, %d removed)",
            len(revocations),
            self.namespace,
            resource_version,
            added,
            removed,
        )

    async def _open(self, **kwargs: Any) -> Any:
        """The watch request, for Watch.stream: a non-200 answer becomes an ApiException here
        rather than being read as events."""
        resp = await self._custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, **kwargs
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
            self.store.upsert(self._convert(obj))
        elif kind == "DELETED":
            name = str((obj.get("metadata") or {}).get("name", ""))
            key = make_key(SOURCE, self.namespace, name)
            self._objects.pop(key, None)
            self.store.remove(key)
        elif kind != "BOOKMARK":
            log.warning("ignoring a watch event of type %r", kind)
        if rv:
            self.resource_version = str(rv)
        self._gone_in_a_row = 0
        self.last_sync_at = self._clock()

    def _convert(self, obj: Mapping[str, Any]) -> Revocation:
        rev, problems = revocation_from_object(obj, self.namespace)
        meta = obj.get("metadata") or {}
        status = obj.get("status")
        has_status = isinstance(status, Mapping) and bool(status.get("firstEnforcedAt"))
        self._objects[rev.key] = (rev.uid, str(meta.get("resourceVersion", "")), has_status)
        for problem in problems:
            if (rev.uid, problem) not in self._warned:
                self._warned.add((rev.uid, problem))
                log.error("AgentRevocation %s/%s: %s", rev.namespace, rev.name, problem)
        return rev

    # -- reporting ------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """Store listener (called inside the store's write, maybe from another thread): queue
        a report for each Kubernetes revocation newly in force here."""
        if not self._running or self._loop is None or self._reports is None:
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
            self._loop.call_soon_threadsafe(self._reports.put_nowait, (rev, visible_at))

    async def _report_loop(self) -> None:
        assert self._reports is not None
        while True:
            rev, visible_at = await self._reports.get()
            try:
                await self._report(rev, visible_at)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.reports_failed += 1
                log.warning(
                    "could not report enforcement of AgentRevocation %s/%s: %s",
                    rev.namespace,
                    rev.name,
                    _describe(exc),
                )
            finally:
                self._reports.task_done()

    async def _drain_reports(self, timeout: float = 5.0) -> None:
        if self._reports is not None and self._report_enabled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reports.join(), timeout)

    async def _report(self, rev: Revocation, visible_at: float) -> None:
        try:
            await self._create_event(rev, visible_at)
        finally:
            await self._set_first_enforced(rev, visible_at)

    async def _create_event(self, rev: Revocation, visible_at: float) -> None:
        stamp = _rfc3339(visible_at)
        message = f"enforced by pod {self.pod_name} from {_rfc3339(visible_at, millis=True)}"
        if rev.created_at:
            # creationTimestamp has whole seconds: the delay is exact to about a second.
            message += (
                f", {max(0.0, visible_at - rev.created_at):.3f}s after the object was created"
            )
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            # Named as client-go names events: <object>.<nanoseconds in hex>.
            "metadata": {
                "name": f"{rev.name[:236]}.{time.time_ns():x}",
                "namespace": rev.namespace,
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": rev.name,
                "namespace": rev.namespace,
                "uid": rev.uid,
            },
            "reason": EVENT_REASON,
            "message": message,
            "type": "Normal",
            "source": {"component": "mandate", "host": self.pod_name},
            "reportingComponent": "mandate",
            "reportingInstance": self.pod_name,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self._core.create_namespaced_event(
            rev.namespace, body, _request_timeout=self._request_timeout
        )

    async def _set_first_enforced(self, rev: Revocation, visible_at: float) -> None:
        """status.firstEnforcedAt/By, once per object: a merge patch conditional on the
        resourceVersion, so that of many pods racing exactly one writes it."""
        uid, rv, has_status = self._objects.get(rev.key, (rev.uid, "", False))
        if uid != rev.uid or has_status:
            return
        body = {
            "status": {"firstEnforcedAt": _rfc3339(visible_at), "firstEnforcedBy": self.pod_name}
        }
        # kubernetes_asyncio would send a dict as a JSON patch; status needs a merge patch.
        patch_options: Any = {
            "_content_type": "application/merge-patch+json",
            "_request_timeout": self._request_timeout,
        }
        for _ in range(3):
            if rv:
                try:
                    await self._custom.patch_namespaced_custom_object_status(
                        GROUP,
                        VERSION,
                        rev.namespace,
                        PLURAL,
                        rev.name,
                        {"metadata": {"resourceVersion": rv, "uid": rev.uid}, **body},
                        **patch_options,
                    )
                    return
                except ApiException as exc:
                    if exc.status == 404:
                        return  # deleted meanwhile
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
                    return
                raise
            meta = current.get("metadata") or {}
            if meta.get("uid") != rev.uid or (current.get("status") or {}).get("firstEnforcedAt"):
                return
            rv = str(meta.get("resourceVersion", ""))

    # -- lifecycle and status ---------------------------------------------------------------

    def start(self) -> RevocationWatcher:
        self._task = asyncio.create_task(self.run(), name="mandate-kube-watcher")
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


async def watch_revocations(
    store: RevocationStore,
    namespace: str,
    *,
    api_client: ApiClient,
    pod_name: str,
    _iterations: int | None = None,
    **options: Any,
) -> RevocationWatcher:
    """Run a RevocationWatcher (forever, unless `_iterations` bounds it); returns it."""
    watcher = RevocationWatcher(
        store, namespace, api_client=api_client, pod_name=pod_name, **options
    )
    await watcher.run(_iterations=_iterations)
    return watcher


async def start_watcher(
    store: RevocationStore,
    *,
    namespace: str,
    kubeconfig: str | Path | None,
    pod_name: str,
    **options: Any,
) -> RevocationWatcher:
    """Build the ApiClient (kubeconfig, else in-cluster) and run a watcher as a task; its
    `stop()` also closes the client."""
    client = await make_api_client(kubeconfig)
    watcher = RevocationWatcher(
        store, namespace, api_client=client, pod_name=pod_name, owns_client=True, **options
    )
    return watcher.start()
