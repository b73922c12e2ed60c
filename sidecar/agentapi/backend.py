"""What the agent context API does, on the supervisor: the `AgentAPIBackend` the gRPC servicer
(context_api.py) calls with the agent its listener serves.

Tasks and elevation requests go to the context store; `Explain` runs the same `decide()` the
workers run, against the same snapshot, revocation table and context, with no side effects
(no rate-limit budget used, no audit record, no span). The agent's identity is always the
listener's, never anything in the request. No decision logic and no network I/O here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sidecar.agentapi.server import AgentStatus
from sidecar.check.request import new_decision_id, view_from_url
from sidecar.core import Decision, Snapshot, decide
from sidecar.core.agentstate import ElevationRequest, TaskBinding
from sidecar.errors import AgentStateError, BadRequestError
from sidecar.headers import PURPOSE_HEADER, TASK_HEADER
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.revocations import RevocationStore

__all__ = ["SupervisorBackend"]


class SupervisorBackend:
    def __init__(
        self,
        store: AgentStateStore,
        revocations: RevocationStore,
        snapshot: Callable[[], Snapshot | None],
        namespace: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._revocations = revocations
        self._snapshot = snapshot
        self._namespace = namespace
        self._clock = clock

    def report_task(
        self,
        agent: str,
        task: str,
        purpose: str,
        ttl: float | None,
        allow: Sequence[Mapping[str, Any]] = (),
    ) -> TaskBinding:
        return self._store.report_task(agent, self._namespace, task, purpose, ttl, allow)

    def end_task(self, agent: str, task: str) -> TaskBinding | None:
        return self._store.end_task(agent, self._namespace, task)

    def request_elevation(
        self, agent: str, elevation: str, justification: str, duration: float | None
    ) -> ElevationRequest:
        return self._store.request_elevation(
            agent, self._namespace, elevation, justification, duration
        )

    def agent_status(self, agent: str) -> AgentStatus:
        snap = self._snapshot()
        compiled = snap.agents.get(agent) if snap is not None else None
        if compiled is None:
            raise AgentStateError(f"no profile for agent {agent!r}", "FAILED_PRECONDITION")
        ns, now = self._namespace, self._clock()
        revoked = self._revocations.table().find(ns, agent, now)
        return AgentStatus(
            agent=agent,
            owner=compiled.owner,
            namespace=ns,
            purposes=tuple(sorted(compiled.purposes)),
            default_purpose=compiled.default_purpose or "",
            tasks=tuple(self._store.tasks(ns, agent)),
            requests=tuple(self._store.requests(ns, agent)),
            grants=tuple(g for g in self._store.grants(ns, agent) if g.active(now)),
            revoked=revoked is not None,
            revocation_reason=revoked.reason if revoked is not None else "",
            risk=self._store.risk(ns, agent),
        )

    def explain(
        self,
        agent: str,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        purpose: str,
        task: str,
    ) -> Decision:
        snap = self._snapshot()
        if snap is None:
            raise AgentStateError("profiles not loaded yet", "FAILED_PRECONDITION")
        hdrs = dict(headers)  # view_from_url lower-cases the names
        if purpose:
            hdrs[PURPOSE_HEADER] = purpose
        if task:
            hdrs[TASK_HEADER] = task
        try:
            view = view_from_url(
                method, url, hdrs, body, decision_id=f"explain-{new_decision_id()}",
                agent=agent, namespace=self._namespace,
            )  # fmt: skip
        except BadRequestError as exc:
            raise AgentStateError(str(exc)) from None
        return decide(snap, view, self._clock(), self._revocations.table(), self._store.table())
