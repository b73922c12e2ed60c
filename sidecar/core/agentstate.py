"""The agent's run-time context as the decision sees it (pure): elevation grants, reported
tasks and the behaviour risk score.

The supervisor is the only writer of this state (the agent context API, operator approvals,
behaviour analysis); the Check workers read it, like the revocation table, from shared
memory. A :class:`AgentStateTable` is an immutable index of one generation of that state:
`decide` asks it for the agent's active grants, the purpose a reported task was bound to,
and the agent's current risk. Expiry is decided by the reader at `now`, so a grant ends
exactly on time with no writer involved.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from sidecar.core.rules import RuleIndex
from sidecar.core.taskscope import DENY_ALL, Declaration, compile_declaration

__all__ = [
    "EMPTY_AGENT_STATE",
    "UNKNOWN_AGENT_STATE",
    "AgentStateTable",
    "Approval",
    "ElevationRequest",
    "Grant",
    "RiskState",
    "TaskBinding",
]


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Grant:
    """An approved elevation: the elevation's rules apply to the agent in [starts_at,
    expires_at). ``approver`` says who approved it ("auto" for `approval: auto`)."""

    id: str
    agent: str
    namespace: str
    elevation: str
    starts_at: float
    expires_at: float
    approver: str
    justification: str = ""
    source: str = "auto"  # auto | admin | kubernetes
    request_id: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.expires_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Grant:
        """Inverse of `as_dict`; raises KeyError/TypeError/ValueError on a bad entry."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a grant must be an object, not {type(data).__name__}")
        return cls(
            id=str(data["id"]),
            agent=str(data["agent"]),
            namespace=str(data["namespace"]),
            elevation=str(data["elevation"]),
            starts_at=float(data["starts_at"]),
            expires_at=float(data["expires_at"]),
            approver=str(data["approver"]),
            justification=str(data.get("justification", "")),
            source=str(data.get("source", "auto")),
            request_id=str(data.get("request_id", "")),
        )


@dataclass(frozen=True, slots=True)
class TaskBinding:
    """A task the agent reported (`ReportTask`): later calls may carry only the task id and
    get the purpose it was reported for. It selects among the agent's own purposes.

    ``allow`` (not empty): the task's declaration (`core.taskscope`): calls naming the task
    are allowed only within both the purpose and one of these rules."""

    agent: str
    namespace: str
    task: str
    purpose: str
    reported_at: float
    expires_at: float | None = None
    allow: Declaration = ()
    # Ended early (`EndTask`) while it had a declaration: kept, with no rights at all, until
    # it would have expired, so that its id cannot be used without the declaration
    ended: bool = False

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    @property
    def narrowed(self) -> bool:
        return bool(self.allow)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.allow:
            del d["allow"]  # the file format of a task without a declaration is unchanged
        else:
            d["allow"] = [dict(r) for r in self.allow]
        if not self.ended:
            del d["ended"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskBinding:
        if not isinstance(data, Mapping):
            raise TypeError(f"a task must be an object, not {type(data).__name__}")
        return cls(
            agent=str(data["agent"]),
            namespace=str(data["namespace"]),
            task=str(data["task"]),
            purpose=str(data["purpose"]),
            reported_at=float(data["reported_at"]),
            expires_at=_opt_float(data.get("expires_at")),
            allow=_declaration(data.get("allow")),
            ended=bool(data.get("ended", False)),
        )


def _declaration(value: object) -> Declaration:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(r, Mapping) for r in value):
        raise TypeError("a task's allow must be a list of rule objects")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class RiskState:
    """The agent's behaviour risk score in [0, 1] as last computed by the supervisor, with
    the explanation (feature -> contribution). ``learning``: still in the learning period."""

    agent: str
    namespace: str
    score: float
    explanation: str = ""
    contributions: Mapping[str, float] = field(default_factory=dict)
    learning: bool = False
    updated_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["contributions"] = dict(self.contributions)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RiskState:
        if not isinstance(data, Mapping):
            raise TypeError(f"a risk state must be an object, not {type(data).__name__}")
        contrib = data.get("contributions") or {}
        if not isinstance(contrib, Mapping):
            raise TypeError("contributions must be an object")
        return cls(
            agent=str(data["agent"]),
            namespace=str(data["namespace"]),
            score=float(data["score"]),
            explanation=str(data.get("explanation", "")),
            contributions=MappingProxyType({str(k): float(v) for k, v in contrib.items()}),
            learning=bool(data.get("learning", False)),
            updated_at=float(data.get("updated_at", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class Approval:
    """An operator's approval, from an `AgentElevation` object or `mandate approve`.

    With ``request_id`` it approves that pending request of the agent; without, it grants
    the elevation directly. The grant lasts ``duration`` seconds (None: what was requested,
    else the elevation's maxDuration) from ``approved_at``, never more than maxDuration."""

    key: str  # "kubernetes:<namespace>/<name>" or "admin:<id>": unique per source object
    agent: str
    namespace: str
    elevation: str
    approver: str
    approved_at: float
    request_id: str = ""
    duration: float | None = None
    reason: str = ""
    source: str = "kubernetes"
    name: str = ""
    uid: str = ""


@dataclass(frozen=True, slots=True)
class ElevationRequest:
    """An agent's `RequestElevation`. ``state``: pending (waiting for an operator),
    granted (``grant_id`` names the grant), expired (not approved in time, or the grant
    ran out) or refused (``message`` says why)."""

    id: str
    agent: str
    namespace: str
    elevation: str
    justification: str
    requested_at: float
    duration: float  # seconds asked for (already capped at the elevation's maxDuration)
    state: str = "pending"  # pending | granted | expired | refused
    approval: str = "operator"  # auto | operator
    grant_id: str = ""
    expires_at: float | None = None  # pending: when the request lapses; granted: grant end
    approver: str = ""
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ElevationRequest:
        if not isinstance(data, Mapping):
            raise TypeError(f"a request must be an object, not {type(data).__name__}")
        return cls(
            id=str(data["id"]),
            agent=str(data["agent"]),
            namespace=str(data["namespace"]),
            elevation=str(data["elevation"]),
            justification=str(data.get("justification", "")),
            requested_at=float(data["requested_at"]),
            duration=float(data["duration"]),
            state=str(data.get("state", "pending")),
            approval=str(data.get("approval", "operator")),
            grant_id=str(data.get("grant_id", "")),
            expires_at=_opt_float(data.get("expires_at")),
            approver=str(data.get("approver", "")),
            message=str(data.get("message", "")),
        )


UNKNOWN_RISK = 1.0
"""The score a reader assumes for every agent while the context cannot be read (the table
overflowed, a stuck writer, a corrupt payload): risk-based denial fails closed."""


@dataclass(frozen=True, slots=True)
class AgentStateTable:
    """One generation of the shared context, indexed by (namespace, agent).

    ``complete`` False: the reader could not get the writer's table (it overflowed, or could
    not be read). Such a table has no grants and no tasks (no extra rights), and `risk`
    answers :data:`UNKNOWN_RISK` (not learning) for every agent, so an agent whose profile
    enforces a risk threshold is denied rather than let through unscored."""

    generation: int = 0
    grants: tuple[Grant, ...] = ()
    tasks: tuple[TaskBinding, ...] = ()
    risks: tuple[RiskState, ...] = ()
    complete: bool = True
    # (namespace, agent) whose grants and tasks the writer withheld (the table was full):
    # their tasks are unknown, so a call naming one cannot be held to its declaration
    withheld: frozenset[tuple[str, str]] = frozenset()
    _grants: Mapping[tuple[str, str], tuple[Grant, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _tasks: Mapping[tuple[str, str, str], TaskBinding] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _risks: Mapping[tuple[str, str], RiskState] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _declared: Mapping[tuple[str, str, str], RuleIndex] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    @classmethod
    def build(
        cls,
        generation: int,
        grants: Iterable[Grant] = (),
        tasks: Iterable[TaskBinding] = (),
        risks: Iterable[RiskState] = (),
        withheld: Iterable[tuple[str, str]] = (),
    ) -> AgentStateTable:
        g = tuple(sorted(grants, key=lambda x: (x.namespace, x.agent, x.elevation, x.id)))
        t = tuple(tasks)
        r = tuple(risks)
        gi: dict[tuple[str, str], list[Grant]] = {}
        for x in g:
            gi.setdefault((x.namespace, x.agent), []).append(x)
        ti = {(x.namespace, x.agent, x.task): x for x in t}
        ri = {(x.namespace, x.agent): x for x in r}
        di = {k: compile_declaration(x.task, x.allow) for k, x in ti.items() if x.allow}
        return cls(
            generation,
            g,
            t,
            r,
            withheld=frozenset(withheld),
            _grants=MappingProxyType({k: tuple(v) for k, v in gi.items()}),
            _tasks=MappingProxyType(ti),
            _risks=MappingProxyType(ri),
            _declared=MappingProxyType(di),
        )

    def active_grants(self, namespace: str, agent: str, now: float) -> tuple[Grant, ...]:
        if not self._grants:
            return ()
        return tuple(g for g in self._grants.get((namespace, agent), ()) if g.active(now))

    def task(self, namespace: str, agent: str, task: str, now: float) -> TaskBinding | None:
        if not self._tasks:
            return None
        t = self._tasks.get((namespace, agent, task))
        return t if t is not None and t.active(now) else None

    def tasks_known(self, namespace: str, agent: str) -> bool:
        """False when the agent's tasks could not be published or read (table full or
        unreadable): a call naming a task must then not be decided as if it had none."""
        return self.complete and (namespace, agent) not in self.withheld

    def declared(self, binding: TaskBinding) -> RuleIndex | None:
        """The compiled declaration of ``binding`` (a task of this table), None if it has
        none."""
        if not binding.allow:
            return None
        return self._declared.get((binding.namespace, binding.agent, binding.task), DENY_ALL)

    def risk(self, namespace: str, agent: str) -> RiskState | None:
        if not self.complete:
            why = "risk unknown: the shared context table could not be read (failing closed)"
            return RiskState(agent, namespace, UNKNOWN_RISK, why)
        if not self._risks:
            return None
        return self._risks.get((namespace, agent))

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "grants": [g.as_dict() for g in self.grants],
            "tasks": [t.as_dict() for t in self.tasks],
            "risks": [r.as_dict() for r in self.risks],
        }
        if self.withheld:
            d["withheld"] = [list(k) for k in sorted(self.withheld)]
        return d

    @classmethod
    def from_dict(cls, generation: int, data: Mapping[str, Any]) -> AgentStateTable:
        """Inverse of `as_dict`; raises KeyError/TypeError/ValueError on bad data."""
        if not isinstance(data, Mapping):
            raise TypeError("the context table must be an object")
        return cls.build(
            generation,
            (Grant.from_dict(d) for d in data.get("grants", ())),
            (TaskBinding.from_dict(d) for d in data.get("tasks", ())),
            (RiskState.from_dict(d) for d in data.get("risks", ())),
            ((str(ns), str(agent)) for ns, agent in data.get("withheld", ())),
        )


EMPTY_AGENT_STATE = AgentStateTable()
UNKNOWN_AGENT_STATE = AgentStateTable(generation=-1, complete=False)
"""What a reader uses when the shared context cannot be read: no grant, no task, and every
agent's risk at :data:`UNKNOWN_RISK`."""
