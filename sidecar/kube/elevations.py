"""The AgentElevation watcher: operator approvals into the ApprovalSink (the supervisor's
context store), the sink's answer into the object's status (the best-informed answer of
all pods wins), and an Event from each pod that holds the grant."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Unpack

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from sidecar.core.agentstate import Approval
from sidecar.core.timefmt import utc_seconds
from sidecar.kube.convert import (
    _MESSAGE_MAX,
    ELEVATION_EVENT_REASON,
    ELEVATION_EXPIRED_EVENT_REASON,
    ELEVATION_KIND,
    ELEVATION_PLURAL,
    ELEVATION_STATES,
    GROUP,
    SOURCE,
    VERSION,
    approval_from_object,
)
from sidecar.kube.listwatch import WatchOptions, _ListWatch

__all__ = ["ApprovalSink", "ElevationWatcher"]

log = logging.getLogger(__name__)

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
