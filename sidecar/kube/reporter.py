"""What the watchers tell operators, in kubectl: core/v1 Events on the watched objects and
their `status` (merge patches on the status subresource).

Both correct a status that contradicts what this pod knows (the module `status` says what
each pod knows and may overwrite), on the next event of the object: at most
:data:`MAX_CORRECTIONS` per object generation and pod, then a warning, so that pods never
take turns with each other or with a writer that insists.

AgentRevocations (:class:`RevocationReporter`): once per object, not once per pod,
`status.firstEnforcedAt`/`firstEnforcedBy` with `state: Enforced` and an Enforced condition
(conditional on the resourceVersion, written only while absent), and an Event
(RevocationEnforced, naming the pod, the time the table write became visible and the delay
since the object was created) from the one pod whose status write succeeded. A revocation
whose `expiresAt` has passed gets `state: Expired` and an Expired condition, once per
object: when it ends while watched, or when it was already past on arrival, which also
earns a Warning Event (RevocationExpired) from the one pod that wrote the status, since such
an object revokes nothing. An Expired one whose end moves ahead is Enforced again
(InForceAgain). After each store write the watcher calls `check`, which writes what this
pod knows when the status says otherwise (`status.revocation_status`).

Fleet scale (issue 19, 9): every pod of a namespace sees each object at about the same
moment, and with N pods "everyone writes, the API server picks one" costs N Events, N
patches and N-1 re-reads per revocation (bench/results/kube_scale-before.md). So each
write that every pod would make (the first enforcement, an end, a correction; for
AgentElevations, what several pods answer alike) waits a delay of its own first,
``spread`` x a number in [0, 1) drawn from a hash of the pod's name and the object's uid
(rendezvous hashing): the pod with the smallest draw writes, its write reaches the others
through their watch before their own delays end, and they find nothing left to write. No
pod needs to know the others (pods cannot list pods), and no leader needs electing: if the
first pod is gone, or its write fails, the next draw writes. A write that loses the race
anyway (409) is not retried by re-reading: the watch brings the new version, and `check`
sees whether anything is still wrong. What each pod enforces is in its metrics
(`mandate_revocation_set_hash`, `mandate_revocation_enforce_delay_seconds`), which
Prometheus aggregates: per-pod truth never costs an API write.

AgentElevations (:class:`ElevationReporter`): the ApprovalSink's answer in `status` (state,
message, grantId, expiresAt, observedGeneration; conditional on the resourceVersion, where
what the answer rests on decides what it overwrites, see `status.elevation_verdict`), an
invalid object's problems as state Invalid, Expired when a grant's time is up, an Event
(ElevationGranted) from the pod that holds the grant (for an approval without a request,
which every pod with the profile grants: from the pod whose Granted status was written),
and a Warning Event (ElevationExpired) from the pod that held a request approved after it
lapsed.

Reports go through a queue and one task per watcher, so a report never holds up the
watch; a failed report is counted (`reports_failed`) and logged, never raised: reporting
never affects enforcement. The shapes of the statuses are pure functions in `status`.

It must not write to the RevocationStore or the ApprovalSink, nor catch a library error
(API calls are made inside `sidecar.kube.errors.translated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi

from sidecar.core.agentstate import Approval
from sidecar.core.revocation import Revocation
from sidecar.core.timefmt import utc_millis, utc_seconds
from sidecar.kube.convert import (
    ELEVATION_EVENT_REASON,
    ELEVATION_EXPIRED_EVENT_REASON,
    ELEVATION_KIND,
    ELEVATION_PLURAL,
    EVENT_REASON,
    EXPIRED_EVENT_REASON,
    GROUP,
    KIND,
    PLURAL,
    SOURCE,
    VERSION,
    ObjectState,
    SinkAnswer,
    object_state,
)
from sidecar.kube.errors import KubeConflict, KubeNotFound, describe, translated
from sidecar.kube.status import (
    Knowledge,
    contradicts,
    elevation_conditions,
    elevation_status,
    elevation_verdict,
    ended,
    enforced_status,
    expired_status,
    revocation_status,
)
from sidecar.state.revocations import Change, RevocationStore
from sidecar.telemetry import metrics

__all__ = [
    "MAX_CORRECTIONS",
    "REPORT_SPREAD",
    "ElevationReporter",
    "ReportOptions",
    "Reporter",
    "RevocationReporter",
    "draw",
]

log = logging.getLogger(__name__)


# Corrections of a status that contradicts this pod's knowledge, per object generation and
# pod: one is what a forged status needs; more means another writer disagrees on purpose.
MAX_CORRECTIONS = 3
# The longest a pod waits before a write that every pod of the namespace would make (see the
# module docstring). The first of N pods writes after spread/(N+1) on average; the others
# write only if its write has not reached them within their own delay, about 1 + N x
# (patch + watch latency) / spread pods in all. 2 s: one writer of 100 pods in the
# emulation (bench/results/kube_scale.md); for one pod, the status 1 s late on average.
REPORT_SPREAD = 2.0

_Job = tuple[Callable[[], Awaitable[None]], str]  # a report to send, and what it reports
_Desired = Callable[[Mapping[str, Any], int | None], dict[str, Any] | None]


class ReportOptions(TypedDict, total=False):
    enabled: bool  # False: read only, nothing is written
    clock: Callable[[], float]
    request_timeout: float
    spread: float  # REPORT_SPREAD: the longest delay before a write every pod would make


@contextlib.contextmanager
def counted(resource: str) -> Iterator[None]:
    """Count the write inside (a KubeError, once translated) in mandate_kubernetes_writes:
    ok, conflict (409: another pod wrote first), gone (404) or error."""
    try:
        yield
    except KubeConflict:
        metrics.observe_kubernetes_write(resource, "conflict")
        raise
    except KubeNotFound:
        metrics.observe_kubernetes_write(resource, "gone")
        raise
    except BaseException:
        metrics.observe_kubernetes_write(resource, "error")
        raise
    metrics.observe_kubernetes_write(resource, "ok")


def _object_of(timer_key: str) -> str:
    """The object key of a timer: "<what>|<key>" for a job, else the key itself (object
    keys hold no "|")."""
    return timer_key.partition("|")[2] if "|" in timer_key else timer_key


def draw(pod: str, uid: str) -> float:
    """This pod's place in [0, 1) among the pods that would write for the object ``uid``:
    the same pod and object always draw the same; different objects spread the first
    writes over different pods."""
    digest = hashlib.sha256(f"{uid}\x00{pod}".encode()).digest()
    return int.from_bytes(digest[:7]) / 2**56


class Reporter:
    """The reports of one watcher: a queue, the task that sends them, the Event and the
    timers they share. `open()` in the watcher's task before it consumes, `drain()` to
    flush, `close()` at the end."""

    _kind = ""

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        *,
        pod_name: str,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
        request_timeout: float = 30.0,
        spread: float = REPORT_SPREAD,
    ) -> None:
        self.namespace = namespace
        self.pod_name = pod_name
        self.enabled = enabled
        self.spread = max(0.0, spread)
        self.reports_failed = 0
        self._custom = CustomObjectsApi(api_client)
        self._core = CoreV1Api(api_client)
        self._clock = clock
        self._request_timeout = request_timeout
        # kubernetes_asyncio would send a dict as a JSON patch; status needs a merge patch.
        # (Any: the library's stubs do not declare these keyword arguments.)
        self._merge_patch: Any = {
            "_content_type": "application/merge-patch+json",
            "_request_timeout": request_timeout,
        }
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Writes waiting for this pod's delay (`_spread`): timer key -> (callback, args).
        self._spread_jobs: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {}
        self.corrections = 0  # statuses replaced because they contradicted this pod's knowledge
        self._corrected: dict[tuple[str, str, int | None], int] = {}  # per object generation
        self._gave_up: set[tuple[str, str, int | None]] = set()
        self._queue: asyncio.Queue[_Job] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.running = False

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self.running = True
        self._opened()
        self._task = asyncio.create_task(
            self._send_all(), name=f"mandate-kube-reports-{self._kind}"
        )

    def _opened(self) -> None:
        """In `open()`, before the first report."""

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) until every queued report is sent; the reports waiting for this
        pod's delay are queued at once first."""
        for job in list(self._spread_jobs):
            timer = self._timers.pop(job, None)
            if timer is not None:
                timer.cancel()
            self._run_spread(job)
        if self._queue is not None and self.enabled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)

    async def close(self) -> None:
        self.running = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._spread_jobs.clear()
        self._closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _closed(self) -> None:
        """In `close()`."""

    # -- the queue --------------------------------------------------------------------------

    def _enqueue(self, job: Callable[[], Awaitable[None]], what: str) -> None:
        """Queue a report for the task; safe from any thread."""
        if not self.enabled or not self.running or self._loop is None or self._queue is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self._loop:
            self._queue.put_nowait((job, what))
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (job, what))

    async def _send_all(self) -> None:
        assert self._queue is not None
        while True:
            job, what = await self._queue.get()
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never into the watch: reporting is no enforcement
                self.reports_failed += 1
                log.warning("could not report %s: %s", what, describe(exc))
            finally:
                self._queue.task_done()

    def _later(self, key: str, delay: float, callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args)`` after ``delay`` seconds, while running; one per key.
        Safe from any thread (a store listener may run in another)."""
        if self._loop is None or not self.running:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not self._loop:
            self._loop.call_soon_threadsafe(self._later, key, delay, callback, *args)
            return
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = self._loop.call_later(delay, callback, *args)

    def _delay(self, uid: str) -> float:
        """How long this pod waits before a write that every pod would make for ``uid``."""
        return self.spread * draw(self.pod_name, uid)

    def _spread(self, job: str, uid: str, callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args)`` after this pod's delay for the object ``uid`` (`draw`):
        the timer ``job`` ("<what>|<object key>"), one per job; `drain()` runs the waiting
        ones at once. Safe from any thread."""
        if self._loop is None or not self.running:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is not self._loop:
            self._loop.call_soon_threadsafe(self._spread, job, uid, callback, *args)
            return
        self._spread_jobs[job] = (callback, args)
        self._later(job, self._delay(uid), self._run_spread, job)

    def _run_spread(self, job: str) -> None:
        self._timers.pop(job, None)
        waiting = self._spread_jobs.pop(job, None)
        if waiting is not None:
            callback, args = waiting
            callback(*args)

    def _cancel_timer(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._spread_jobs.pop(key, None)

    def _cancel_object(self, key: str) -> None:
        """Every timer of the object ``key`` (its own and its jobs')."""
        for timer_key in [k for k in self._timers if _object_of(k) == key]:
            self._cancel_timer(timer_key)

    # -- corrections ------------------------------------------------------------------------

    def _may_correct(self, key: str, seen: ObjectState, budget: int = MAX_CORRECTIONS) -> bool:
        """Whether this pod may still replace a status of this object generation that
        contradicts what it knows; once the budget is spent it says so, once, and stops."""
        slot = (key, seen.uid, seen.generation)
        if self._corrected.get(slot, 0) < budget:
            return True
        if slot not in self._gave_up:
            self._gave_up.add(slot)
            log.warning(
                "%s %s/%s: its status was set again against what pod %s knows, after %d "
                "correction(s); leaving it (another writer disagrees: who may patch its status?)",
                self._kind,
                self.namespace,
                seen.name,
                self.pod_name,
                self._corrected.get(slot, 0),
            )
        return False

    def _count_correction(
        self, key: str, seen: ObjectState, before: Mapping[str, Any], after: Mapping[str, Any]
    ) -> None:
        slot = (key, seen.uid, seen.generation)
        self._corrected[slot] = self._corrected.get(slot, 0) + 1
        self.corrections += 1
        log.warning(
            "%s %s/%s: replaced a status that contradicted what pod %s knows (state %r, now %r)",
            self._kind,
            self.namespace,
            seen.name,
            self.pod_name,
            before.get("state"),
            after.get("state"),
        )

    def _forget_corrections(self, keep: Callable[[str], bool]) -> None:
        self._corrected = {k: n for k, n in self._corrected.items() if keep(k[0])}
        self._gave_up = {k for k in self._gave_up if keep(k[0])}

    # -- an Event ---------------------------------------------------------------------------

    async def post_event(
        self, name: str, uid: str, reason: str, message: str, at: float, type_: str = "Normal"
    ) -> None:
        """A core/v1 Event on one of the watched objects, from this pod."""
        involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": self._kind, "name": name,
                    "namespace": self.namespace, "uid": uid}  # fmt: skip
        await self._event(involved, reason, message, at, type_)

    async def post_pod_event(self, reason: str, message: str, type_: str = "Warning") -> None:
        """A core/v1 Event on this pod (what `kubectl describe pod` shows): for what concerns
        the pod itself rather than one watched object."""
        involved = {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name,
                    "namespace": self.namespace}  # fmt: skip
        await self._event(involved, reason, message[:1024], self._clock(), type_)

    async def _event(
        self, involved: dict[str, str], reason: str, message: str, at: float, type_: str
    ) -> None:
        stamp = utc_seconds(at)
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            # Named as client-go names events: <object>.<nanoseconds in hex>.
            "metadata": {
                "name": f"{involved['name'][:236]}.{time.time_ns():x}",
                "namespace": self.namespace,
            },
            "involvedObject": involved,
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
        with counted("events"), translated():
            await self._core.create_namespaced_event(
                self.namespace, body, _request_timeout=self._request_timeout
            )


# -- AgentRevocation ------------------------------------------------------------------------------


class RevocationReporter(Reporter):
    """The reports of the AgentRevocation watcher. The watcher tells it each object it
    sees (`seen`, `replaced`, `forget`); the store tells it what became enforced."""

    _kind = KIND

    def __init__(
        self,
        store: RevocationStore,
        api_client: ApiClient,
        namespace: str,
        *,
        pod_name: str,
        **options: Unpack[ReportOptions],
    ) -> None:
        super().__init__(api_client, namespace, pod_name=pod_name, **options)
        self.store = store
        self._objects: dict[str, ObjectState] = {}
        self._reported: set[tuple[str, str]] = set()
        self._expiry_reported: set[tuple[str, str]] = set()
        self._correcting: set[str] = set()  # keys with a correction waiting or queued
        # (key, uid) whose first enforcement report (status, then Event) waits or is queued
        self._first_pending: set[tuple[str, str]] = set()
        self._listed_at: float | None = None  # the first list: later objects are timed
        self._subscribed = False

    def _opened(self) -> None:
        if self.enabled and not self._subscribed:
            self.store.subscribe(self._on_change)
            self._subscribed = True

    # -- what the watcher sees --------------------------------------------------------------

    def refused(self, why: str) -> None:
        """The revocations cannot be read (401/403, no CRD): a Warning Event on this pod,
        once per distinct reason (the watcher calls it when the reason changes)."""
        self._enqueue(
            lambda: self.post_pod_event("RevocationsRefused", f"denying every call: {why}"),
            "RevocationsRefused event",
        )

    def warn_pod(self, reason: str, message: str) -> bool:
        """A Warning Event on this pod about its own configuration (e.g. UnknownAgent);
        False if the reporter is not running yet (the caller tries again later); True
        also when it writes nothing (read only)."""
        if not self.enabled:
            return True
        if not self.running:
            return False
        self._enqueue(lambda: self.post_pod_event(reason, message), f"{reason} event")
        return True

    def seen(self, rev: Revocation, state: ObjectState) -> None:
        """An object as listed or watched (before the store write)."""
        self._objects[rev.key] = state
        self._watch_expiry(rev)

    def replaced(self, seen: Iterable[tuple[Revocation, ObjectState]]) -> None:
        """A (re)list: these are all the objects there are."""
        if self._listed_at is None:
            self._listed_at = self._clock()
        self._objects.clear()
        current = set()
        for rev, state in seen:
            self.seen(rev, state)
            current.add(rev.key)
        for key in [k for k in self._timers if _object_of(k) not in current]:
            self._cancel_timer(key)
        self._expiry_reported = {k for k in self._expiry_reported if k[0] in current}
        self._first_pending = {k for k in self._first_pending if k[0] in current}
        self._correcting &= current
        self._forget_corrections(lambda k: k in current)

    def forget(self, key: str) -> None:
        """The object was deleted."""
        self._objects.pop(key, None)
        self._expiry_reported = {k for k in self._expiry_reported if k[0] != key}
        self._first_pending = {k for k in self._first_pending if k[0] != key}
        self._correcting.discard(key)
        self._cancel_object(key)
        self._forget_corrections(lambda k: k != key)

    def check(self, rev: Revocation) -> None:
        """After the store wrote ``rev`` (so this pod enforces it while it is in force): if
        its status says otherwise than this pod knows (`status.revocation_status`), correct
        it after this pod's delay (by then another pod may have). An object that ended
        before this pod reported its end is left to that report (and its Warning); an empty
        status to the first enforcement report, if one is on its way."""
        if not self.enabled or not self.running or rev.key in self._correcting:
            return
        seen = self._objects.get(rev.key)
        if seen is None or seen.uid != rev.uid:
            return
        over = rev.expires_at is not None and rev.expires_at <= self._clock()
        if over and (rev.key, rev.uid) not in self._expiry_reported:
            return
        if not seen.status and (rev.key, rev.uid) in self._first_pending:
            return
        if self._known(rev)(seen.status, seen.generation) is None:
            return
        if not self._may_correct(rev.key, seen):
            return
        self._correcting.add(rev.key)
        self._spread(f"correct|{rev.key}", rev.uid, self._queue_correction, rev)

    def _queue_correction(self, rev: Revocation) -> None:
        self._enqueue(
            functools.partial(self._correct, rev),
            f"the status of AgentRevocation {rev.namespace}/{rev.name}",
        )

    def _known(self, rev: Revocation) -> _Desired:
        """What this pod knows the status must say, as a `_patch_status` desire."""

        def desired(status: Mapping[str, Any], generation: int | None) -> dict[str, Any] | None:
            now = self._clock()
            return revocation_status(
                status,
                generation,
                expires_at=rev.expires_at,
                now=now,
                pod=self.pod_name,
                stamp=utc_seconds(now),
            )

        return desired

    async def _correct(self, rev: Revocation) -> None:
        self._correcting.discard(rev.key)
        seen = self._objects.get(rev.key)
        if seen is None or seen.uid != rev.uid:
            return
        before = dict(seen.status)
        # Lost to another writer (409): the watch brings what it wrote, and `check` decides.
        if await self._patch_status(rev, self._known(rev), reread=False):
            after = self._objects.get(rev.key)
            # An empty status is no contradiction, nor one for an older spec version that
            # said the same (only its generation brought up to date).
            if after is not None and before and contradicts(before, after.status):
                self._count_correction(rev.key, after, before, after.status)

    # -- enforced ---------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """Store listener (called inside the store's write, maybe from another thread): for
        each Kubernetes revocation newly in force here, time it and have it reported."""
        if not self.running:
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
            listed = self._listed_at
            if rev.created_at and listed is not None and rev.created_at >= listed - 1:
                # Created while this pod watched: the delay tells how fast the fleet enforces.
                metrics.observe_enforce_delay(visible_at - rev.created_at)
            self._first_pending.add((rev.key, rev.uid))
            self._spread(f"first|{rev.key}", rev.uid, self._queue_enforced, rev, visible_at)

    def _queue_enforced(self, rev: Revocation, visible_at: float) -> None:
        self._enqueue(
            functools.partial(self._report_enforced, rev, visible_at),
            f"enforcement of AgentRevocation {rev.namespace}/{rev.name}",
        )

    async def _report_enforced(self, rev: Revocation, visible_at: float) -> None:
        """The first enforcement: the status, if no pod wrote it yet; then, from the pod
        that wrote it, the Event. A pod that finds it written (its watch brought another
        pod's write during its delay), or loses the race (409), reports nothing."""
        self._first_pending.discard((rev.key, rev.uid))
        seen = self._objects.get(rev.key)
        if seen is None or seen.uid != rev.uid:
            return  # deleted (or replaced) meanwhile
        stamp = utc_seconds(visible_at)
        desired = functools.partial(enforced_status, pod=self.pod_name, stamp=stamp)
        if not await self._patch_status(rev, desired, reread=False):
            return
        message = f"enforced by pod {self.pod_name} from {utc_millis(visible_at)}"
        if rev.created_at:
            # creationTimestamp has whole seconds: the delay is exact to about a second.
            message += (
                f", {max(0.0, visible_at - rev.created_at):.3f}s after the object was created"
            )
        message += " (the first of the namespace's sidecars to report it)"
        await self.post_event(rev.name, rev.uid, EVENT_REASON, message, visible_at)

    # -- expired ----------------------------------------------------------------------------

    def _watch_expiry(self, rev: Revocation) -> None:
        """An expiresAt already past: report it after this pod's delay. One still ahead:
        report it that delay after it comes (the revocation itself ends by the reader's
        clock; this is what kubectl shows)."""
        self._cancel_timer(rev.key)
        if not self.enabled:
            return
        now = self._clock()
        if rev.expires_at is None or rev.expires_at > now:
            # In force (again, if the operator moved expiresAt ahead or removed it): its end,
            # if it comes, is reported anew. `check` turns an Expired status back to Enforced.
            self._expiry_reported.discard((rev.key, rev.uid))
        if rev.expires_at is None:
            return
        delay = self._delay(rev.uid)
        if rev.expires_at <= now:
            on_arrival = (rev.key, rev.uid) not in self._reported
            self._later(rev.key, delay, self._expiry_due, rev, on_arrival)
        else:
            self._later(rev.key, rev.expires_at - now + delay, self._expiry_due, rev, False)

    def _expiry_due(self, rev: Revocation, on_arrival: bool) -> None:
        self._timers.pop(rev.key, None)
        seen = self._objects.get(rev.key)
        if seen is None or seen.uid != rev.uid:
            return  # deleted or replaced meanwhile
        if rev.expires_at is not None and rev.expires_at > self._clock():
            self._watch_expiry(rev)  # the loop's timer fired early: wait again
            return
        self._report_expiry(rev, on_arrival=on_arrival)

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
        desired = functools.partial(
            expired_status, reason=reason, message=message, stamp=utc_seconds(now)
        )
        try:
            wrote = await self._patch_status(rev, desired)
        except Exception:
            self._expiry_reported.discard((rev.key, rev.uid))  # the next sight tries again
            raise
        if wrote and on_arrival:
            await self.post_event(
                rev.name, rev.uid, EXPIRED_EVENT_REASON, message, now, type_="Warning"
            )

    # -- the status write -------------------------------------------------------------------

    async def _patch_status(
        self, rev: Revocation, desired: _Desired, *, reread: bool = True
    ) -> bool:
        """A merge patch of the status that `desired(current status, generation)` asks for
        (None: nothing to write), conditional on the resourceVersion: of many pods racing,
        one writes. Answered 409, a pod reads the object again and asks once more; without
        ``reread`` it gives up instead (the watch brings the new version, and `check` sees
        whether anything is still wrong). True if this pod wrote it."""
        seen: ObjectState | None = self._objects.get(rev.key)
        if seen is None or seen.uid != rev.uid:
            seen = ObjectState(rev.name, rev.uid, "", None, {})
        for _ in range(3):
            status = desired(seen.status, seen.generation)
            if status is None:
                return False
            if seen.resource_version:
                wrote = await self._write(rev, seen.resource_version, status)
                if wrote is not None:
                    return wrote
                if not reread:
                    return False
            seen = await self._read(rev)
            if seen is None:
                return False
        return False

    async def _write(self, rev: Revocation, resource_version: str, status: Any) -> bool | None:
        """One conditional write: True if written, False if the object is gone, None if it
        changed since ``resource_version``."""
        body = {
            "metadata": {"resourceVersion": resource_version, "uid": rev.uid},
            "status": status,
        }
        try:
            with counted(f"{PLURAL}/status"), translated():
                written = await self._custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, rev.namespace, PLURAL, rev.name, body, **self._merge_patch
                )
        except KubeNotFound:
            return False  # deleted meanwhile
        except KubeConflict:
            return None
        self._remember(rev, written)
        return True

    async def _read(self, rev: Revocation) -> ObjectState | None:
        """The object's status as it is now; None if it is gone (or another object of the
        same name took its place)."""
        try:
            with translated():
                current = await self._custom.get_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    rev.namespace,
                    PLURAL,
                    rev.name,
                    _request_timeout=self._request_timeout,
                )
        except KubeNotFound:
            return None
        seen = self._remember(rev, current)
        return seen if seen.uid == rev.uid else None

    def _remember(self, rev: Revocation, obj: Any) -> ObjectState:
        """What this pod now knows of the object's status (a write's answer, or a read), so
        that the next write of the same object starts from it."""
        seen = object_state(obj)
        known = self._objects.get(rev.key)
        if known is not None and known.uid == rev.uid and seen.uid == rev.uid:
            self._objects[rev.key] = seen
        return seen


# -- AgentElevation -------------------------------------------------------------------------------


class ElevationReporter(Reporter):
    """The reports of the AgentElevation watcher. The watcher tells it each object it sees
    (`seen`, `retain`, `forget`) and what it makes of it (`invalid`, `answered`); it writes
    the status this pod wants (one write per object in the queue at a time) and the Events."""

    _kind = ELEVATION_KIND

    def __init__(
        self,
        api_client: ApiClient,
        namespace: str,
        *,
        pod_name: str,
        **options: Unpack[ReportOptions],
    ) -> None:
        super().__init__(api_client, namespace, pod_name=pod_name, **options)
        self.status_writes = 0  # status patches the API server accepted
        self._seen: dict[str, ObjectState] = {}
        self._desired: dict[str, dict[str, Any]] = {}  # key -> the status this pod wants
        # key -> what that answer rests on, and whether the approval names a request (then
        # at most one pod holds it): see status.elevation_verdict
        self._knowledge: dict[str, tuple[Knowledge, bool]] = {}
        self._queued: set[str] = set()  # keys with a status write waiting or queued
        self._granted: set[tuple[str, str, str]] = set()  # (key, uid, grant id) reported
        # key -> (uid, grant id, message): the ElevationGranted Event of a grant that every
        # pod with the profile makes, posted only by the pod whose Granted status is written
        self._announce: dict[str, tuple[str, str, str]] = {}

    def _closed(self) -> None:
        self._queued.clear()

    # -- what the watcher sees --------------------------------------------------------------

    def seen(self, key: str, state: ObjectState) -> None:
        """The latest version of an object (its status, resourceVersion, generation)."""
        self._seen[key] = state

    def retain(self, keys: set[str]) -> None:
        """A (re)list: forget every object not in ``keys``."""
        for key in [k for k in self._seen if k not in keys]:
            self.forget(key)

    def forget(self, key: str) -> None:
        """The object was deleted."""
        self._seen.pop(key, None)
        self._desired.pop(key, None)
        self._knowledge.pop(key, None)
        self._announce.pop(key, None)
        self._queued.discard(key)
        self._cancel_object(key)
        self._granted = {g for g in self._granted if g[0] != key}
        self._forget_corrections(lambda k: k != key)

    def invalid(self, key: str, problems: Sequence[str]) -> None:
        """The object is no approval: its status says why."""
        self._cancel_timer(key)
        seen = self._seen[key]
        status = elevation_status("Invalid", "; ".join(problems), "", None, seen.generation)
        self._want(key, status, ("object", True))  # every pod finds the same in the object

    def answered(self, key: str, approval: Approval, answer: SinkAnswer, *, fresh: bool) -> None:
        """The sink's answer for the object's approval (``fresh``: just asked, not cached)."""
        if fresh:
            self._cancel_timer(key)
        if not answer.state:
            return  # no opinion here: the status is some other sidecar's to write
        seen = self._seen[key]
        expires_at = answer.expires_at
        desired = elevation_status(
            answer.state, answer.message, answer.grant_id, expires_at, seen.generation
        )
        if answer.state == "Granted" and expires_at is not None:
            if expires_at <= self._clock():
                desired = ended(desired)
            elif key not in self._timers:
                delay = max(0.0, expires_at - self._clock())
                self._later(key, delay, self._expired, key, answer.grant_id)
        single = bool(approval.request_id)
        # Granted, Expired, Pending: the sink holds the request or the grant. Invalid for a
        # request: perhaps only "no such request here"; without one: the profiles' answer.
        knowledge: Knowledge = (
            "holder" if answer.state != "Invalid" else "opinion" if single else "profile"
        )
        announce = ""
        if answer.state == "Granted" and (key, seen.uid, answer.grant_id) not in self._granted:
            self._granted.add((key, seen.uid, answer.grant_id))
            until = f" until {utc_seconds(expires_at)}" if expires_at is not None else ""
            announce = (
                f"{approval.elevation} granted to {approval.agent} by pod {self.pod_name}"
                f" (grant {answer.grant_id or '?'}{until}; approver {approval.approver})"
            )
            if not single:
                # Every pod with the profile grants it: one Event, from the pod whose status
                # is written (`_write_status`), not one per pod.
                self._announce[key] = (seen.uid, answer.grant_id, announce)
        self._want(key, desired, (knowledge, single))
        if announce and single:
            message = announce
            self._enqueue(
                functools.partial(
                    self.post_event,
                    seen.name,
                    seen.uid,
                    ELEVATION_EVENT_REASON,
                    message,
                    self._clock(),
                ),
                f"the grant of AgentElevation {self.namespace}/{seen.name}",
            )

    def _expired(self, key: str, grant_id: str) -> None:
        """At the grant's end, the status says Expired (the grant itself ends by the reader's
        clock, with no writer involved: this is only what kubectl shows)."""
        self._timers.pop(key, None)
        desired = self._desired.get(key)
        if desired is None or desired.get("state") != "Granted":
            return
        if (desired.get("grantId") or "") != grant_id:
            return
        self._want(key, ended(desired), self._knowledge.get(key, ("holder", True)))

    # -- the status write -------------------------------------------------------------------

    def _want(self, key: str, desired: dict[str, Any], knowledge: tuple[Knowledge, bool]) -> None:
        """Record the status this pod would write and what it rests on, and queue the write
        (one per object in the queue at a time: it writes whatever is wanted when its turn
        comes)."""
        self._desired[key] = desired
        self._knowledge[key] = knowledge
        seen = self._seen.get(key)
        if seen is None or key in self._queued or not self._verdict(key, seen):
            return
        if self.enabled and self.running:
            self._queued.add(key)
            if knowledge == ("holder", True):  # the one pod that holds the request
                self._queue_write(key)
            else:  # what several pods would write alike: after this pod's delay
                self._spread(f"write|{key}", seen.uid, self._queue_write, key)

    def _queue_write(self, key: str) -> None:
        seen = self._seen.get(key)
        if seen is None:
            self._queued.discard(key)
            return
        self._enqueue(
            functools.partial(self._write_status, key),
            f"the status of AgentElevation {self.namespace}/{seen.name}",
        )

    def _verdict(self, key: str, seen: ObjectState) -> str:
        """Why this pod's wanted status replaces the one there ("" = it does not)."""
        desired, knowledge = self._desired.get(key), self._knowledge.get(key)
        if desired is None or knowledge is None:
            return ""
        kind, single = knowledge
        verdict = elevation_verdict(
            seen.status, desired, knowledge=kind, single=single, now=self._clock()
        )
        if verdict == "contradicts":
            # A profile's Invalid may be a lagging ConfigMap: it corrects once.
            budget = 1 if kind == "profile" else MAX_CORRECTIONS
            if not self._may_correct(key, seen, budget):
                return ""
        return verdict

    async def _write_status(self, key: str) -> None:
        self._queued.discard(key)
        seen, desired = self._seen.get(key), self._desired.get(key)
        verdict = self._verdict(key, seen) if seen is not None else ""
        if seen is None or desired is None or not verdict:
            return
        meta: dict[str, Any] = {"uid": seen.uid}
        if seen.resource_version:
            meta["resourceVersion"] = seen.resource_version
        try:
            with counted(f"{ELEVATION_PLURAL}/status"), translated():
                await self._custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.namespace,
                    ELEVATION_PLURAL,
                    seen.name,
                    {
                        "metadata": meta,
                        "status": elevation_conditions(
                            desired, seen.status, utc_seconds(self._clock())
                        ),
                    },
                    **self._merge_patch,
                )
        except (KubeNotFound, KubeConflict):
            # Deleted, or changed since: the watch brings the new version, and its answer
            # is weighed against the new status then.
            return
        self.status_writes += 1
        if verdict == "contradicts":
            self._count_correction(key, seen, seen.status, desired)
        announce = self._announce.get(key)
        if (
            announce is not None
            and desired.get("state") == "Granted"
            and announce[:2] == (seen.uid, desired.get("grantId") or "")
        ):
            del self._announce[key]
            await self.post_event(
                seen.name, seen.uid, ELEVATION_EVENT_REASON, announce[2], self._clock()
            )
        if desired.get("state") == "Expired" and not desired.get("grantId"):
            # Approved after the request had lapsed: nothing was granted. The pod that wrote
            # this status (the one that held the request) warns the operator once.
            await self.post_event(
                seen.name,
                seen.uid,
                ELEVATION_EXPIRED_EVENT_REASON,
                str(desired.get("message", "")),
                self._clock(),
                type_="Warning",
            )
