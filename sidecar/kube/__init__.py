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

Modules: `convert` (pure conversions and names), `client` (the API client and its
errors), `listwatch` (the shared loop), `revocations` and `elevations` (the two consumers
and their reports), `watch` (running them). The public face is re-exported here.
"""

from sidecar.kube.client import make_api_client
from sidecar.kube.convert import (
    ELEVATION_EVENT_REASON,
    ELEVATION_EXPIRED_EVENT_REASON,
    ELEVATION_KIND,
    ELEVATION_PLURAL,
    ELEVATION_STATES,
    EVENT_REASON,
    EXPIRED_EVENT_REASON,
    GROUP,
    KIND,
    PLURAL,
    SOURCE,
    VERSION,
    approval_from_object,
    revocation_from_object,
)
from sidecar.kube.elevations import ApprovalSink, ElevationWatcher
from sidecar.kube.listwatch import WatchOptions
from sidecar.kube.revocations import RevocationWatcher
from sidecar.kube.watch import (
    publish_revocation,
    start_elevation_watcher,
    start_watcher,
    watch_elevations,
    watch_revocations,
)

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
