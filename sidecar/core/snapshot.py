"""Immutable compiled snapshots of a profile directory (pure).

A :class:`Snapshot` is everything a decision needs from the profiles, compiled once and
never mutated: the agents by name, an index from identity (service account, SPIFFE id) to
agent, and per purpose the compiled allow and deny rule indexes. Reload builds a whole new
snapshot and swaps the reference; a Check holds one snapshot from start to end.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from sidecar.core.behaviour import BehaviourSettings
from sidecar.core.model import (
    AgentProfile,
    Behavior,
    Credential,
    RateLimit,
    credential_host,
    parse_duration,
)
from sidecar.core.ratelimit import RateCharge
from sidecar.core.recording import DEFAULT_RECORDING, ArgumentRecording
from sidecar.core.rules import RuleIndex, compile_rules

__all__ = [
    "CompiledAgent",
    "CompiledCredential",
    "CompiledElevation",
    "CompiledPurpose",
    "Snapshot",
    "SourceRef",
    "compile_snapshot",
]


@dataclass(frozen=True, slots=True)
class SourceRef:
    """Where a profile came from, for messages and audit: file and 1-based document."""

    file: str
    document: int

    def __str__(self) -> str:
        return f"{self.file}, document {self.document}"


@dataclass(frozen=True, slots=True)
class CompiledPurpose:
    name: str
    description: str
    allow: RuleIndex
    deny: RuleIndex
    rate_limit: RateLimit | None
    # What an allowed call of this purpose is charged against (None: no limit)
    rate: RateCharge | None = None
    require_task: bool = False  # calls must name an active task with a declaration


@dataclass(frozen=True, slots=True)
class CompiledElevation:
    """Temporary extra rights: its allow rules apply only while a grant is active."""

    name: str
    description: str
    approval: str  # auto | operator
    max_seconds: float
    justification_required: bool
    allow: RuleIndex


@dataclass(frozen=True, slots=True)
class CompiledCredential:
    """A credential mandate adds to allowed calls to its hosts (the profile's
    `spec.credentials.NAME`); ``spec`` is the validated source the broker builds it from.
    A host without a port means port 443 (:data:`DEFAULT_CREDENTIAL_PORT`): the credential
    goes only where the sidecar originates TLS, unless the profile names another port. The
    hosts are kept as sets of (name, port) and (`*.` parent, port) for a lookup per Check."""

    name: str
    refuse_connect: bool
    spec: Credential
    header: str = ""  # spec.header, read once per Check
    names: frozenset[tuple[str, int]] = frozenset()
    parents: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def compile(cls, name: str, spec: Credential) -> CompiledCredential:
        hosts = tuple(credential_host(h) for h in spec.hosts)
        return cls(
            name=name,
            refuse_connect=spec.connect == "refuse",
            spec=spec,
            header=spec.header,
            names=frozenset((h.host, h.port or 0) for h in hosts if not h.wildcard),
            parents=frozenset((h.host, h.port or 0) for h in hosts if h.wildcard),
        )

    def matches(self, host: str, port: int) -> bool:
        if (host, port) in self.names:
            return True
        return bool(self.parents) and (host.partition(".")[2], port) in self.parents


@dataclass(frozen=True, slots=True)
class CompiledAgent:
    name: str
    owner: str
    default_purpose: str | None
    purposes: Mapping[str, CompiledPurpose]
    profile: AgentProfile  # the validated source, for explain and later phases
    source: SourceRef
    elevations: Mapping[str, CompiledElevation] = field(
        default_factory=lambda: MappingProxyType({})
    )
    behavior: BehaviourSettings | None = None  # compiled from the profile's `behavior`
    credentials: tuple[CompiledCredential, ...] = ()
    recording: ArgumentRecording = DEFAULT_RECORDING  # what the trail keeps of arguments


@dataclass(frozen=True, slots=True)
class Snapshot:
    agents: Mapping[str, CompiledAgent]
    by_service_account: Mapping[str, str]
    by_spiffe: Mapping[str, str]
    version: str = ""
    files: tuple[str, ...] = field(default=())

    def agent_of_service_account(self, sa: str) -> str | None:
        """The agent whose profile names service account ``sa`` (NAMESPACE/NAME), or, as a
        profile may, NAME alone (an account in the pod's own namespace); None if none."""
        agent = self.by_service_account.get(sa)
        if agent is None:
            agent = self.by_service_account.get(sa.rpartition("/")[2])
        return agent


def _rate(agent: str, purpose: str, limit: RateLimit | None) -> RateCharge | None:
    if limit is None:
        return None
    return RateCharge((agent, purpose), limit.requests, parse_duration(limit.per), limit.per)


def _compile_agent(profile: AgentProfile, source: SourceRef) -> CompiledAgent:
    purposes = {}
    for name, p in profile.spec.purposes.items():
        purposes[name] = CompiledPurpose(
            name=name,
            description=p.description,
            allow=compile_rules(p.allow, f"{name}.allow"),
            deny=compile_rules(p.deny, f"{name}.deny"),
            rate_limit=p.rate_limit,
            rate=_rate(profile.metadata.name, name, p.rate_limit),
            require_task=p.require_task,
        )
    elevations = {
        name: CompiledElevation(
            name=name,
            description=e.description,
            approval=e.approval,
            max_seconds=parse_duration(e.max_duration),
            justification_required=e.justification_required,
            allow=compile_rules(e.allow, f"elevation:{name}.allow"),
        )
        for name, e in profile.spec.elevations.items()
    }
    return CompiledAgent(
        name=profile.metadata.name,
        owner=profile.spec.owner,
        default_purpose=profile.spec.default_purpose,
        purposes=MappingProxyType(purposes),
        profile=profile,
        source=source,
        elevations=MappingProxyType(elevations),
        behavior=compile_behaviour(profile.spec.behavior),
        credentials=tuple(
            CompiledCredential.compile(name, c) for name, c in profile.spec.credentials.items()
        ),
        recording=ArgumentRecording.compile(profile.spec.audit),
    )


def compile_behaviour(b: Behavior | None) -> BehaviourSettings | None:
    """A profile's `behavior` as the engine and `decide` use it: durations in seconds, the
    deny threshold resolved (``denyAtRisk``, else 0.8, or ``revokeAtRisk`` if lower). The one
    spelling of behaviour settings after loading."""
    if b is None:
        return None
    if b.deny_at_risk is not None:
        deny_at = b.deny_at_risk
    else:
        deny_at = min(0.8, b.revoke_at_risk) if b.revoke_at_risk is not None else 0.8
    return BehaviourSettings(
        mode=b.mode,
        deny_at=deny_at,
        revoke_at=b.revoke_at_risk,
        learning_seconds=parse_duration(b.learning_period),
        window_seconds=parse_duration(b.window),
        min_calls=b.min_calls,
        sensitive=frozenset(b.sensitive_arguments),
    )


def compile_snapshot(
    profiles: Sequence[tuple[AgentProfile, SourceRef]],
    *,
    version: str = "",
    files: Sequence[str] = (),
) -> Snapshot:
    """Compile validated, cross-checked profiles (see loader.py) into a snapshot."""
    agents: dict[str, CompiledAgent] = {}
    by_sa: dict[str, str] = {}
    by_spiffe: dict[str, str] = {}
    for profile, source in profiles:
        agent = _compile_agent(profile, source)
        agents[agent.name] = agent
        for ident in profile.spec.identities:
            if ident.service_account is not None:
                by_sa[ident.service_account] = agent.name
            if ident.spiffe is not None:
                by_spiffe[ident.spiffe] = agent.name
    return Snapshot(
        agents=MappingProxyType(agents),
        by_service_account=MappingProxyType(by_sa),
        by_spiffe=MappingProxyType(by_spiffe),
        version=version,
        files=tuple(files),
    )
