"""The AgentRevocation watcher: the `kubernetes` source of the RevocationStore, an Event per
pod that enforces a revocation, and the object's status (Enforced, Expired) written once
per object."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Unpack

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from sidecar.core.revocation import Revocation
from sidecar.core.timefmt import utc_millis, utc_seconds
from sidecar.kube.convert import (
    _MESSAGE_MAX,
    EVENT_REASON,
    EXPIRED_EVENT_REASON,
    GROUP,
    KIND,
    PLURAL,
    SOURCE,
    VERSION,
    revocation_from_object,
)
from sidecar.kube.listwatch import WatchOptions, _ListWatch
from sidecar.state.revocations import Change, RevocationStore

__all__ = ["RevocationWatcher"]


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
