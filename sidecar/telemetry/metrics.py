"""Prometheus metrics of the sidecar (one registry, exposed by the admin server).

Label values are bounded: decision codes are the stable codes of `core.Code`, agents are
the profile names this sidecar serves. Nothing here may block or raise into a Check.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.core import Decision

__all__ = ["REGISTRY", "observe_audit_state", "observe_decision", "observe_reload"]

REGISTRY = CollectorRegistry(auto_describe=True)

DECISIONS = Counter(
    "mandate_decisions",
    "Check decisions by agent, decision and code",
    ["agent", "decision", "code"],
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
ELEVATION_EVENTS = Counter(
    "mandate_elevation_events",
    "Elevation requests and grants by event (requested, granted, expired, lapsed, withdrawn)",
    ["event"],
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
    "directory cannot write or is under the free-space reserve; fail-closed denies every "
    "allow), off (no --audit-dir)",
    ["state"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)


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


# Labelled children by (agent, allowed, code): `labels()` validates and locks on every call.
_children: dict[tuple[str, bool, str], Counter] = {}


def observe_decision(d: Decision, seconds: float) -> None:
    # Only agents with a profile (they have an owner) become label values: a caller that
    # invents agent names must not be able to grow the registry without bound.
    agent = d.agent if d.owner else "-"
    key = (agent, d.allowed, d.code)
    child = _children.get(key)
    if child is None:
        child = _children[key] = DECISIONS.labels(agent, "allow" if d.allowed else "deny", d.code)
    child.inc()
    CHECK_SECONDS.observe(seconds)


def observe_reload(ok: bool, agents: int | None = None) -> None:
    RELOADS.labels("ok" if ok else "error").inc()
    PROFILES_STALE.set(0 if ok else 1)
    if agents is not None:
        PROFILE_AGENTS.set(agents)
