"""Prometheus metrics of the sidecar (one registry, exposed by the admin server).

Label values are bounded: decision codes are the stable codes of `core.Code`, agents,
purposes and elevations are names from the profiles this sidecar serves (a caller that
invents one shares the label "-"), resources, results and events are fixed sets named
here, and a profile version is one hash per snapshot loaded. Nothing here may block or
raise into a Check.

The fleet view (deploy/components/monitoring): each pod says what it enforces, and
Prometheus compares the pods, so that no pod writes a per-pod fact to the API server.
`mandate_profiles_info{version}` is 1 for the profile snapshot in force (0 for those
before it in this process's life); `mandate_revocation_set_hash` is a 52-bit hash of the
AgentRevocations in the pod's table (the same objects give the same number in every pod:
`count_values` per namespace shows who enforces which set); `mandate_build_info` says which
build runs.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar import __version__
from sidecar.core import Decision
from sidecar.core.revocation import Revocation

__all__ = [
    "ELEVATION_EVENT_KINDS",
    "REGISTRY",
    "WATCHED_RESOURCES",
    "WRITE_RESULTS",
    "observe_audit_state",
    "observe_decision",
    "observe_elevation_event",
    "observe_elevations",
    "observe_kubernetes_write",
    "observe_reload",
    "observe_revocations",
    "observe_watch",
    "revocation_set_hash",
]

REGISTRY = CollectorRegistry(auto_describe=True)

DECISIONS = Counter(
    "mandate_decisions",
    "Check decisions by agent, purpose, decision and code (agent and purpose '-' when the "
    "call has none from a profile)",
    ["agent", "purpose", "decision", "code"],
    registry=REGISTRY,
)
CHECK_SECONDS = Histogram(
    "mandate_check_duration_seconds",
    "Time spent inside Check (decode, decide, encode)",
    buckets=(25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3),
    registry=REGISTRY,
)
RELOADS = Counter(
    "mandate_profile_reloads", "Profile (re)loads by result", ["result"], registry=REGISTRY
)
PROFILES_STALE = Gauge(
    "mandate_profiles_stale",
    "1 when the last profile reload failed and the previous snapshot is still enforced",
    registry=REGISTRY,
    multiprocess_mode="max",
)
PROFILE_AGENTS = Gauge(
    "mandate_profile_agents",
    "Agents in the enforced profile snapshot",
    registry=REGISTRY,
    multiprocess_mode="max",
)
REVOCATIONS = Gauge(
    "mandate_revocations",
    "Revocations in the shared table, by source and whether in force now",
    ["source", "active"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
KUBERNETES_CONNECTED = Gauge(
    "mandate_kubernetes_connected",
    "1 while the AgentRevocation watch is connected; 0 while the last known state is enforced",
    registry=REGISTRY,
    multiprocess_mode="max",
)
REVOCATION_WRITES = Counter(
    "mandate_revocation_writes",
    "Generations of the shared revocation table written",
    registry=REGISTRY,
)
# The `file` label is one of a fixed few names (`revocations`), never a path: paths and OS
# errors go to readiness details behind the admin token.
STATE_DURABLE = Gauge(
    "mandate_state_durable",
    "1 while what is in force is also in the state file; 0 after a failed write (in force in "
    "memory only, lost at a restart) until a later write succeeds",
    ["file"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
STATE_WRITE_FAILURES = Counter(
    "mandate_state_write_failures",
    "Failed writes of a state file (revocations.json, ...)",
    ["file"],
    registry=REGISTRY,
)
WOULD_DENY = Counter(
    "mandate_behaviour_would_deny",
    "Calls allowed in behaviour analysis's monitor mode that enforce would have refused, by "
    "agent and code (risk, novel_call)",
    ["agent", "code"],
    registry=REGISTRY,
)
RISK = Gauge(
    "mandate_agent_risk",
    "Behaviour risk score of each analysed agent, in [0, 1]",
    ["agent"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
HOUSEKEEPING_ERRORS = Counter(
    "mandate_housekeeping_errors",
    "Passes of the supervisor's housekeeping (expiries, state-file retries, context prune) "
    "that failed; each is logged with its traceback",
    registry=REGISTRY,
)
AUTO_REVOCATIONS = Counter(
    "mandate_automatic_revocations",
    "Agents revoked by behaviour analysis (score at the profile's revokeAtRisk)",
    registry=REGISTRY,
)
ELEVATION_EVENT_KINDS = ("requested", "granted", "expired", "lapsed", "withdrawn")
ELEVATION_EVENTS = Counter(
    "mandate_elevation_events",
    "Elevation requests and grants by event (requested, granted, expired, lapsed, withdrawn)",
    ["event"],
    registry=REGISTRY,
)
ELEVATION_GRANTS = Gauge(
    "mandate_elevation_grants",
    "Elevation grants in force, by agent",
    ["agent"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
ELEVATION_PENDING = Gauge(
    "mandate_elevation_requests_pending",
    "Elevation requests waiting for an operator's approval, by agent",
    ["agent"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
# The answers an AgentElevation gets from this pod (sidecar.kube.convert.ELEVATION_STATES,
# lower case; "none": this pod had no opinion, the object is another pod's to answer).
APPROVAL_RESULTS = ("pending", "granted", "expired", "invalid", "none")
APPROVALS = Counter(
    "mandate_elevation_approvals",
    "AgentElevation approvals this pod answered, by result (granted, pending, expired, "
    "invalid; none: not this pod's to answer)",
    ["result"],
    registry=REGISTRY,
)
# Issue 15, finding 2: the shared context table is full. `agent` is a profile name (the store
# only holds agents with a profile), so the label set stays bounded.
CONTEXT_WITHHELD = Gauge(
    "mandate_context_withheld",
    "1 while the agent's grants and tasks are withheld from the full shared context table "
    "(its calls get none of them: fail closed for that agent only)",
    ["agent"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
CONTEXT_TABLE_OVERFLOW = Gauge(
    "mandate_context_table_overflow",
    "1 while not even the risk scores fit in the shared context table (every agent: no grant, "
    "no task, maximum risk)",
    registry=REGISTRY,
    multiprocess_mode="max",
)
ALS_EVENTS = Counter(
    "mandate_access_log_events",
    "Envoy access-log entries received by outcome (analysed, ignored, skipped)",
    ["outcome"],
    registry=REGISTRY,
)


AUDIT_RECORDS = Counter(
    "mandate_audit_records",
    "Audit records by outcome: written, failed (write error), dropped (queue full)",
    ["outcome"],
    registry=REGISTRY,
)
AUDIT_BACKLOG = Gauge(
    "mandate_audit_backlog",
    "Audit records queued and not yet written",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
# Every process of a mandate sets this (a process that imports this module and never set it
# would report 0, and livemin would say unhealthy forever): 1 also with audit off, which
# mandate_audit_state says.
AUDIT_HEALTHY = Gauge(
    "mandate_audit_healthy",
    "1 unless the audit trail is failing (a write error, or its filesystem under the "
    "free-space reserve) until it recovers; 1 with audit off (see mandate_audit_state)",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
AUDIT_STATES = ("ok", "failing", "off")
AUDIT_STATE = Gauge(
    "mandate_audit_state",
    "The audit trail's state (1 for the current one): ok, failing (some writer of the audit "
    "directory or of stdout cannot write, or the directory is under the free-space reserve; "
    "fail-closed denies every allow), off (neither --audit-dir nor --audit-stdout)",
    ["state"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)


# -- build and fleet --------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO = Gauge(
    "mandate_build_info",
    "Always 1: the mandate version, Python version and grpcio version this process runs",
    ["version", "python", "grpc"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
BUILD_INFO.labels(__version__, platform.python_version(), _version("grpcio")).set(1)
PROFILES_INFO = Gauge(
    "mandate_profiles_info",
    "1 for the version (content hash) of the profile snapshot in force; 0 for the versions "
    "this process enforced before. While the workers of a pod reload, two versions read 1",
    ["version"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
_profile_versions: set[str] = set()
REVOCATION_SET = Gauge(
    "mandate_revocation_set_hash",
    "A 52-bit hash of the AgentRevocations in this pod's table (uid, agent, reason, end): "
    "equal in every pod that enforces the same objects; 0 for none",
    registry=REGISTRY,
    multiprocess_mode="max",
)
REVOCATION_DELAY = Histogram(
    "mandate_revocation_enforce_delay_seconds",
    "From an AgentRevocation's creationTimestamp (whole seconds) to its write into this "
    "pod's table being visible to the Check workers; objects created before the watcher's "
    "first list are not counted",
    buckets=(0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)

# -- the Kubernetes watchers ----------------------------------------------------------------

WATCHED_RESOURCES = ("agentrevocations", "agentelevations")
WATCH_CONNECTED = Gauge(
    "mandate_kubernetes_watch_connected",
    "1 while the list+watch of the resource is connected; 0 while the last known state "
    "stays in force",
    ["resource"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
WATCH_REFUSED = Gauge(
    "mandate_kubernetes_refused",
    "1 while the API server refuses the list or watch (401/403, or no such resource): a "
    "configuration error; for agentrevocations every Check is denied",
    ["resource"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
WATCH_SYNC = Gauge(
    "mandate_kubernetes_last_sync_timestamp_seconds",
    "When the watcher last heard from the API server (a list, an event, a bookmark or the "
    "clean end of a watch; Unix time)",
    ["resource"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
WATCH_LISTS = Counter(
    "mandate_kubernetes_lists",
    "Lists of the resource (the first, and relists after 410 Gone)",
    ["resource"],
    registry=REGISTRY,
)
_lists_seen: dict[str, int] = {}
WRITE_RESULTS = ("ok", "conflict", "gone", "error")
KUBERNETES_WRITES = Counter(
    "mandate_kubernetes_writes",
    "Writes this pod sent to the API server, by what (events, agentrevocations/status, "
    "agentelevations/status) and result (ok, conflict: 409, another pod wrote first; gone: "
    "404; error)",
    ["resource", "result"],
    registry=REGISTRY,
)
WORKER_RESTARTS = Counter(
    "mandate_worker_restarts",
    "Check worker processes that exited and were restarted by the supervisor",
    registry=REGISTRY,
)


def revocation_set_hash(entries: Iterable[Revocation], source: str = "kubernetes") -> int:
    """A 52-bit number (exact in a float64 sample) for the revocations of ``source``: the
    same objects (uid, agent, reason, end) give the same number in every pod; 0 for none."""
    items = sorted(
        (r.key, r.uid, r.agent, r.reason, r.expires_at) for r in entries if r.source == source
    )
    if not items:
        return 0
    digest = hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
    return int(digest[:13], 16) or 1


def observe_revocations(entries: Iterable[Revocation], now: float) -> None:
    """The revocation table's metrics after a write: counts by source and activity, and
    the fleet hash of the Kubernetes set."""
    entries = list(entries)
    counts = {
        (src, act): 0 for src in ("kubernetes", "admin", "behaviour") for act in (True, False)
    }
    for r in entries:
        key = (r.source, r.active(now))
        counts[key] = counts.get(key, 0) + 1
    for (src, act), n in counts.items():
        REVOCATIONS.labels(src, "true" if act else "false").set(n)
    REVOCATION_SET.set(revocation_set_hash(entries))


def observe_enforce_delay(seconds: float) -> None:
    REVOCATION_DELAY.observe(max(0.0, seconds))


def observe_watch(resource: str, status: Mapping[str, Any]) -> None:
    """A watcher's status (`Consumer.status()`) as the watch metrics of ``resource``."""
    WATCH_CONNECTED.labels(resource).set(1 if status.get("connected") else 0)
    WATCH_REFUSED.labels(resource).set(1 if status.get("refused") else 0)
    synced = status.get("last_sync_at")
    if isinstance(synced, int | float):
        WATCH_SYNC.labels(resource).set(synced)
    lists = status.get("lists")
    if isinstance(lists, int):
        new = lists - _lists_seen.get(resource, 0)
        if new > 0:
            WATCH_LISTS.labels(resource).inc(new)
        _lists_seen[resource] = lists


def observe_kubernetes_write(resource: str, result: str) -> None:
    KUBERNETES_WRITES.labels(resource, result if result in WRITE_RESULTS else "error").inc()


def observe_approval(state: str) -> None:
    result = state.lower() or "none"
    APPROVALS.labels(result if result in APPROVAL_RESULTS else "invalid").inc()


def observe_elevation_event(kind: str) -> None:
    """A supervisor event (its audit record's type): `elevation_<event>` is counted."""
    event = kind.removeprefix("elevation_")
    if kind.startswith("elevation_") and event in ELEVATION_EVENT_KINDS:
        ELEVATION_EVENTS.labels(event).inc()


_elevation_agents: set[str] = set()


def observe_elevations(
    grants: Iterable[Any], requests: Iterable[Any], now: float, agents: Iterable[str] = ()
) -> None:
    """Grants in force and pending requests by agent (``agents``: the profiles' agents, each
    shown even at 0; the context store holds only agents with a profile)."""
    active: dict[str, int] = {}
    pending: dict[str, int] = {}
    for g in grants:
        if g.active(now):
            active[g.agent] = active.get(g.agent, 0) + 1
    for r in requests:
        if r.state == "pending":
            pending[r.agent] = pending.get(r.agent, 0) + 1
    agents = _elevation_agents | set(agents) | set(active) | set(pending)
    for agent in agents:
        ELEVATION_GRANTS.labels(agent).set(active.get(agent, 0))
        ELEVATION_PENDING.labels(agent).set(pending.get(agent, 0))
    _elevation_agents.update(agents)


def _init_children() -> None:
    """Label values known in advance exist from the start (at 0), so that rates and
    alerts see them before the first event."""
    for event in ELEVATION_EVENT_KINDS:
        ELEVATION_EVENTS.labels(event)
    for result in APPROVAL_RESULTS:
        APPROVALS.labels(result)
    for resource in ("events", *(f"{r}/status" for r in WATCHED_RESOURCES)):
        for result in WRITE_RESULTS:
            KUBERNETES_WRITES.labels(resource, result)


_init_children()


def observe_audit_state(state: str) -> None:
    """Set mandate_audit_state (and this process's mandate_audit_healthy) to ``state``."""
    for name in AUDIT_STATES:
        AUDIT_STATE.labels(name).set(1 if name == state else 0)
    AUDIT_HEALTHY.set(0 if state == "failing" else 1)


class AuditMeter:
    """Turns an audit writer's cumulative stats into the metrics above (call `update`
    periodically from one thread)."""

    def __init__(self) -> None:
        self._last = {"written": 0, "failed": 0, "dropped": 0}

    def update(self, written: int, failed: int, dropped: int, backlog: int, healthy: bool) -> None:
        for outcome, value in (("written", written), ("failed", failed), ("dropped", dropped)):
            delta = value - self._last[outcome]
            if delta > 0:
                AUDIT_RECORDS.labels(outcome).inc(delta)
            self._last[outcome] = value
        AUDIT_BACKLOG.set(backlog)
        AUDIT_HEALTHY.set(1 if healthy else 0)


# Labelled children by (agent, purpose, allowed, code): `labels()` validates and locks on
# every call.
_children: dict[tuple[str, str, bool, str], Counter] = {}


def observe_decision(d: Decision, seconds: float) -> None:
    # Only agents with a profile (they have an owner) become label values: a caller that
    # invents agent names must not be able to grow the registry without bound. The purpose
    # is the profile's (decide() sets it only once the name is one of the agent's
    # purposes), never the declared header.
    agent = d.agent if d.owner else "-"
    purpose = (d.purpose or "-") if d.owner else "-"
    key = (agent, purpose, d.allowed, d.code)
    child = _children.get(key)
    if child is None:
        child = _children[key] = DECISIONS.labels(
            agent, purpose, "allow" if d.allowed else "deny", d.code
        )
    child.inc()
    CHECK_SECONDS.observe(seconds)
    if d.would and d.allowed:  # monitor mode: what enforce would have refused
        WOULD_DENY.labels(agent, d.would.partition(":")[0]).inc()


def observe_reload(ok: bool, agents: int | None = None, version: str | None = None) -> None:
    """A profile (re)load: ``version`` is the snapshot now in force (ok only)."""
    RELOADS.labels("ok" if ok else "error").inc()
    PROFILES_STALE.set(0 if ok else 1)
    if agents is not None:
        PROFILE_AGENTS.set(agents)
    if ok and version is not None:
        for old in _profile_versions - {version}:
            PROFILES_INFO.labels(old).set(0)
        PROFILES_INFO.labels(version).set(1)
        _profile_versions.add(version)
