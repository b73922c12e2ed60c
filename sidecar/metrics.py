"""Prometheus metrics of the sidecar (one registry, exposed by the admin server).

Label values are bounded: decision codes are the stable codes of `core.Code`, agents are
the profile names this sidecar serves. Nothing here may block or raise into a Check.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .core import Decision

__all__ = ["REGISTRY", "observe_decision", "observe_reload"]

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
REVOCATION_WRITES = Counter(
    "mandate_revocation_writes",
    "Generations of the shared revocation table written",
    registry=REGISTRY,
)


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
