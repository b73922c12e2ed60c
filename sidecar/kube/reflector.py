"""The list + watch of one custom resource in one namespace, as an async generator of events
(kopf's `infinite_watch`): `Reflector.events()`.

It lists (in pages) and yields :class:`Listed`, the complete set ("replace everything");
then watches from the list's resourceVersion with bookmarks and yields each
ADDED/MODIFIED/DELETED as :class:`Changed`. When a stream ends it resumes from the last
resourceVersion seen; on `410 Gone` it lists again and yields a new Listed; while the API
server cannot be reached (or refuses, 403 included) it yields nothing and retries with
exponential backoff and full jitter, so a consumer keeps its last known state: nothing here
ever means "there are no objects" except a list that succeeded. A refusal (401/403, or 404:
the resource is not served, its CRD missing) is also told to ``on_refused``: a consumer
that must not run on a configuration error (revocations) fails closed on it. A watch silent for
``idle_timeout`` (no event, no bookmark) is presumed dead and reopened.

A consumer that fails to apply an event throws the error back into the generator
(``events.athrow(exc)``): that counts as a failed attempt (backoff), and since the
resourceVersion only advances once the consumer has taken an event, the same event comes
again. `health` (connected, last_error, lists, relists, last_sync_at, resource_version)
is what readiness and metrics read.

It must not: interpret objects, write state or reports, or catch a library error (they
arrive as KubeErrors from `sidecar.kube.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from kubernetes_asyncio.client import ApiClient, CustomObjectsApi
from kubernetes_asyncio.watch import Watch

from sidecar.kube.convert import GROUP, VERSION
from sidecar.kube.errors import (
    KubeError,
    KubeForbidden,
    KubeGone,
    KubeInvalid,
    KubeNotFound,
    KubeTimeout,
    describe,
    error_from_response,
    translated,
)

__all__ = ["Changed", "Event", "Health", "Listed", "Reflector", "ReflectorSettings"]

log = logging.getLogger(__name__)

LIST_PAGE = 500


@dataclass(frozen=True, slots=True)
class Listed:
    """Every object there is (a list, the first or after 410 Gone): replace everything."""

    items: tuple[Mapping[str, Any], ...]
    resource_version: str


ChangeType = Literal["ADDED", "MODIFIED", "DELETED"]
_CHANGES: Mapping[str, ChangeType] = {
    "ADDED": "ADDED",
    "MODIFIED": "MODIFIED",
    "DELETED": "DELETED",
}


@dataclass(frozen=True, slots=True)
class Changed:
    """One object was created, changed or deleted."""

    type: ChangeType
    obj: Mapping[str, Any]


Event = Listed | Changed


@dataclass
class Health:
    """How the reflector is doing; readiness and metrics read it (field names are part of
    the status contract)."""

    connected: bool = False
    last_error: str | None = None
    lists: int = 0  # every list (the first sync included)
    relists: int = 0  # lists after the first: 410 Gone, or nothing to resume from
    last_sync_at: float | None = None  # last list, event, bookmark or clean end
    resource_version: str | None = None
    refused: str | None = None  # the last 401/403/404 since the last list that succeeded


@dataclass(frozen=True, slots=True)
class ReflectorSettings:
    backoff_base: float = 0.2
    backoff_cap: float = 10.0
    # The server ends each watch after a random 4-5 minutes (as client-go asks).
    watch_timeout: tuple[float, float] = (240.0, 300.0)
    idle_timeout: float = 90.0
    request_timeout: float = 30.0
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)


def _watch_event(raw: Any) -> tuple[str, Mapping[str, Any]]:
    """A line of the watch stream as (type, object); anything else is KubeInvalid."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("type"), str):
        raise KubeInvalid(f"not a watch event: {str(raw)[:200]}")
    obj = raw.get("raw_object", raw.get("object"))
    if not isinstance(obj, Mapping):
        raise KubeInvalid(f"watch event without an object: {str(raw)[:200]}")
    return raw["type"], obj


class Reflector:
    """List + watch of the ``plural`` custom resources of one namespace: `events()`."""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        *,
        plural: str,
        kind: str,
        settings: ReflectorSettings,
        on_refused: Callable[[KubeError], None] | None = None,
    ) -> None:
        self.namespace = namespace
        self._on_refused = on_refused
        self._plural = plural
        self._kind = kind
        self._custom = CustomObjectsApi(api_client)
        self._settings = settings
        self.health = Health()
        self._failures = 0  # consecutive failed attempts: the backoff exponent
        self._short_streams = 0  # consecutive streams that ended at once with nothing
        self._gone_in_a_row = 0
        self._stream_open = False  # the current watch request was answered 200

    async def events(self, *, _iterations: int | None = None) -> AsyncGenerator[Event, None]:
        """The events, forever (or for `_iterations` iterations in tests: one iteration is a
        list if needed plus one watch stream, or one failed attempt)."""
        n = 0
        while _iterations is None or n < _iterations:
            n += 1
            self._stream_open = False  # (a list that times out is no silent watch)
            try:
                if self.health.resource_version is None:
                    listed = await self._list()
                    yield listed
                    self._listed(listed)
                started, count = time.monotonic(), 0
                async with contextlib.aclosing(self._stream()) as stream:
                    async for type_, obj in stream:
                        if (change := _CHANGES.get(type_)) is not None:
                            yield Changed(change, obj)
                        elif type_ != "BOOKMARK":
                            log.warning("ignoring a watch event of type %r", type_)
                        self._advanced(obj)
                        count += 1
            except KubeError as exc:
                await self._failed(exc)
            except Exception as exc:  # a consumer's failure thrown back, or a bug: go on
                log.exception("%s watcher failed unexpectedly", self._kind)
                await self._backoff(exc)
            else:
                await self._ended(started, count)

    # -- what happened ----------------------------------------------------------------------

    def _listed(self, listed: Listed) -> None:
        """The consumer took a list."""
        health = self.health
        if health.lists:
            health.relists += 1
        health.lists += 1
        health.resource_version = listed.resource_version or None
        health.connected, health.last_error, health.refused = True, None, None
        health.last_sync_at = self._settings.clock()
        self._failures = 0

    def _advanced(self, obj: Mapping[str, Any]) -> None:
        """The consumer took an event (or a bookmark came): resume after it."""
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.health.resource_version = str(rv)
        self._gone_in_a_row = 0
        self.health.last_sync_at = self._settings.clock()

    async def _ended(self, started: float, count: int) -> None:
        """The stream ended cleanly (the server's timeout): resume from where it was."""
        self._gone_in_a_row = 0
        self._failures = 0
        self.health.last_sync_at = self._settings.clock()
        if count == 0 and time.monotonic() - started < 1.0:
            self._short_streams += 1
            if self._short_streams > 1:  # a server ending every stream at once: slow down
                await asyncio.sleep(self._delay(self._short_streams - 2))
        else:
            self._short_streams = 0

    async def _failed(self, exc: KubeError) -> None:
        if isinstance(exc, KubeGone):
            self._gone_in_a_row += 1
            log.info(
                "%ss in %s: resourceVersion %s is gone (410): relisting",
                self._kind,
                self.namespace,
                self.health.resource_version,
            )
            self.health.resource_version = None
            if self._gone_in_a_row > 1:  # relisting did not help: do not spin
                await self._backoff(exc)
        elif isinstance(exc, KubeTimeout) and self._stream_open:
            # An open watch went silent: reopen it from where it was.
            log.info(
                "%s watch silent for %.0fs: reopening", self._kind, self._settings.idle_timeout
            )
        else:  # unreachable, refused (403 included), or nonsense: keep the last known state
            if isinstance(exc, KubeForbidden | KubeNotFound):
                self.health.refused = describe(exc)
                if self._on_refused is not None:
                    try:
                        self._on_refused(exc)
                    except Exception:
                        log.exception("%s watcher: handling a refusal failed", self._kind)
            await self._backoff(exc)

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        cap = min(self._settings.backoff_cap, self._settings.backoff_base * 2 ** min(attempt, 30))
        return self._settings.rng.uniform(0, cap)

    async def _backoff(self, exc: BaseException) -> None:
        self.health.connected = False
        self.health.last_error = describe(exc)
        delay = self._delay(self._failures)
        self._failures += 1
        log.warning(
            "%ss in %s: %s; keeping the last known state; retrying in %.2fs",
            self._kind,
            self.namespace,
            self.health.last_error,
            delay,
        )
        await asyncio.sleep(delay)

    # -- the requests -----------------------------------------------------------------------

    async def _list(self) -> Listed:
        items: list[Mapping[str, Any]] = []
        resource_version = ""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "limit": LIST_PAGE,
                "_request_timeout": self._settings.request_timeout,
            }
            if token:
                kwargs["_continue"] = token
            with translated():
                page = await self._custom.list_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, self._plural, **kwargs
                )
            if not isinstance(page, Mapping) or not isinstance(page.get("items"), list):
                raise KubeInvalid(f"unexpected list response: {str(page)[:200]}")
            meta = page.get("metadata") or {}
            resource_version = resource_version or str(meta.get("resourceVersion", ""))
            items.extend(page["items"])
            token = meta.get("continue")
            if not token:
                return Listed(tuple(items), resource_version)

    async def _open(self, **kwargs: Any) -> Any:
        """The watch request, for Watch.stream: a non-200 answer becomes a KubeError here
        rather than being read as events."""
        resp = await self._custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self._plural, **kwargs
        )
        if resp.status != 200:
            raise await error_from_response(resp)
        self._stream_open = True
        self.health.connected, self.health.last_error = True, None
        self._failures = 0
        return resp

    async def _stream(self) -> AsyncGenerator[tuple[str, Mapping[str, Any]], None]:
        """One watch request from the last resourceVersion: its events, until it ends."""
        settings = self._settings
        timeout = int(settings.rng.uniform(*settings.watch_timeout))
        self._stream_open = False
        watch = Watch()
        stream = watch.stream(
            self._open,
            resource_version=self.health.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=settings.request_timeout,
                sock_read=min(timeout + 30.0, settings.idle_timeout),
            ),
        )
        try:
            while True:
                with translated():
                    try:
                        raw = await anext(stream)
                    except StopAsyncIteration:
                        return
                yield _watch_event(raw)
        finally:
            with translated():
                await watch.close()
