# ruff: noqa: E402 (lazyimport is installed before any import of kubernetes_asyncio)
"""Kubernetes adapter: the AgentRevocation and AgentElevation watchers and their reports.

Role: keep mandate's state equal to two kinds of custom resources of one namespace, and
tell operators, in kubectl, what it did.

- AgentRevocation → the `kubernetes` source of the
  :class:`~sidecar.state.revocations.RevocationStore`.
- AgentElevation → the operator approvals of an :class:`ApprovalSink` (the supervisor's
  agent state), which turns them into elevation grants.

Split as kopf splits its clients (`sidecar/kube/`):

- `reflector`: list, then watch from the list's resourceVersion (with bookmarks), as an
  async generator of events; on `410 Gone` list again and yield "replace everything"; when
  a stream ends resume from the last resourceVersion seen; while the API server is
  unreachable (or refuses, 403 included) yield nothing and retry with exponential backoff
  and full jitter, so the last known state stays: a watcher that cannot reach Kubernetes
  never removes a revocation or ends a grant. Its health (`connected`, `last_error`,
  `relists`, `last_sync_at`, ...) is what readiness and metrics read.
- `convert`: the resource names and the pure object → Revocation / Approval conversions.
- `revocations`, `elevations`: the two consumers: events → store / sink writes and calls
  to their reporter; `consumer` is what they share (the run, the status).
- `reporter`: the Events and status patches (RevocationEnforced/Expired,
  ElevationGranted/Expired, conditions, which elevation answer wins). Reporting failures
  are logged and never affect enforcement.
- `errors`: the one boundary where kubernetes_asyncio, aiohttp, timeout and OS errors
  become KubeErrors (KubeUnavailable, KubeTimeout, KubeForbidden, KubeNotFound,
  KubeConflict, KubeGone, KubeInvalid) with one description; nothing else catches them.
- `client`: the API client; `watch`: running the watchers, publishing a revocation.

- `lazyimport`: kubernetes_asyncio's packages imported name by name, not whole (installed
  here, before anything imports the library: -57 MB per pod).

No decision logic here. The public face is re-exported here.
"""

from sidecar.kube import lazyimport

lazyimport.install()

from sidecar.kube.client import make_api_client
from sidecar.kube.consumer import WatchOptions
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
