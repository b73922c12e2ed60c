"""The AgentElevation watcher: operator approvals into the ApprovalSink (the supervisor's
agent state), and the sink's answer for each object handed to its :class:`ElevationReporter`
(status, Events; the best-informed answer of all pods wins).

It calls the sink only through replace_approvals (after a list), upsert_approval and
remove_approval; it never withdraws an approval because the API is unreachable (the
reflector then yields nothing). It must not: talk to the API, or decide what to report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Unpack

from kubernetes_asyncio.client import ApiClient

from sidecar.core.agentstate import Approval
from sidecar.kube.consumer import Consumer, WatchOptions
from sidecar.kube.convert import (
    ELEVATION_KIND,
    ELEVATION_PLURAL,
    SOURCE,
    SinkAnswer,
    answer_from_sink,
    approval_from_object,
    object_key,
    object_state,
)
from sidecar.kube.reporter import ElevationReporter
from sidecar.telemetry import metrics

__all__ = ["ApprovalSink", "ElevationWatcher"]

log = logging.getLogger(__name__)


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


class ElevationWatcher(Consumer):
    """Lists and watches AgentElevations of one namespace into an ApprovalSink, and has
    each object's status written from the sink's answer.

    `run()` is the infinite loop (bounded by `_iterations` in tests); `start()`/`stop()` run
    it as a task. With `report=False` it writes no status and no Event."""

    _plural = ELEVATION_PLURAL
    _kind = ELEVATION_KIND
    reporter: ElevationReporter

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
        self.reporter = ElevationReporter(
            api_client, namespace, pod_name=pod_name, **self._report_options
        )
        # Valid objects the sink answered for: the approval and the answer (the sink is
        # asked again only when the approval changes).
        self._answers: dict[str, tuple[Approval, SinkAnswer]] = {}
        self._invalid: set[str] = set()

    @property
    def status_writes(self) -> int:
        return self.reporter.status_writes

    # -- objects → sink ---------------------------------------------------------------------

    def _replace(self, items: Sequence[Mapping[str, Any]]) -> str:
        converted = []
        for obj in items:
            key = object_key(obj, self.namespace)
            self.reporter.seen(key, object_state(obj))
            approval, problems = approval_from_object(obj, self.namespace, now=self._clock())
            converted.append((key, obj, approval, problems))
        listed = {key for key, *_ in converted}
        for key in (set(self._answers) | self._invalid) - listed:
            self._forget(key)  # deleted while this watcher was not watching
        self.reporter.retain(listed)
        # The sink gets the whole valid set first (it withdraws what is gone), then each
        # object's answer is asked for again only where the approval is new or changed.
        self.sink.replace_approvals(SOURCE, [a for _, _, a, _ in converted if a is not None])
        for key, obj, approval, problems in converted:
            if approval is None:
                self._answers.pop(key, None)
                self._set_invalid(key, obj, problems)
            else:
                self._invalid.discard(key)
                self._answer(key, approval)
        valid = sum(1 for *_, a, _ in converted if a is not None)
        return f"{valid} valid, {len(converted) - valid} invalid"

    def _apply(self, obj: Mapping[str, Any]) -> None:
        key = object_key(obj, self.namespace)
        self.reporter.seen(key, object_state(obj))
        approval, problems = approval_from_object(obj, self.namespace, now=self._clock())
        if approval is None:
            # No longer (or never) an approval: whatever it granted ends.
            self._answers.pop(key, None)
            self._call_sink(self.sink.remove_approval, key)
            self._set_invalid(key, obj, problems)
            return
        self._invalid.discard(key)
        self._answer(key, approval)

    def _remove(self, obj: Mapping[str, Any]) -> None:
        key = object_key(obj, self.namespace)
        self._forget(key)
        self.reporter.forget(key)
        self._call_sink(self.sink.remove_approval, key)

    def _forget(self, key: str) -> None:
        self._answers.pop(key, None)
        self._invalid.discard(key)

    def _set_invalid(self, key: str, obj: Mapping[str, Any], problems: Sequence[str]) -> None:
        self._invalid.add(key)
        meta = obj.get("metadata") or {}
        self._warn(str(meta.get("name", "")), str(meta.get("uid", "")), problems)
        self.reporter.invalid(key, problems)

    def _answer(self, key: str, approval: Approval) -> None:
        cached = self._answers.get(key)
        fresh = cached is None or cached[0] != approval
        if fresh:
            # New or changed: ask the sink. (An unchanged approval, e.g. after a status
            # write, keeps its answer: the sink is not asked once per status update.)
            answer = self._ask(approval)
            if answer is None:
                return
            self._answers[key] = (approval, answer)
            metrics.observe_approval(answer.state)
        else:
            assert cached is not None
            answer = cached[1]
        self.reporter.answered(key, approval, answer, fresh=fresh)

    def _ask(self, approval: Approval) -> SinkAnswer | None:
        """The sink's answer for an approval, checked; None if it failed or made no sense."""
        raw = self._call_sink(self.sink.upsert_approval, approval)
        if raw is None:
            return None
        answer, problem = answer_from_sink(raw)
        if problem:
            log.error("AgentElevation %s/%s: %s", self.namespace, approval.name, problem)
        return answer

    def _call_sink(self, method: Callable[..., Any], *args: Any) -> Any:
        """A sink call that cannot stop the watch: a failing sink is logged, and the same
        event is not retried (it would fail the same way, forever)."""
        try:
            return method(*args)
        except Exception:
            name = getattr(method, "__name__", "a call")
            log.exception("the approval sink failed on %s(%r)", name, args[0] if args else "")
            return None

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "approvals": len(self._answers),
            "invalid": len(self._invalid),
            "status_writes": self.reporter.status_writes,
        }
