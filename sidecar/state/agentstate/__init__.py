"""The supervisor's agent-state store: the single writer of the shared context table
(elevation requests and grants, reported tasks, behaviour risk scores).

The agent context API (`ReportTask`, `RequestElevation`), operator approvals (AgentElevation
objects, `mandate approve`) and behaviour analysis change the agents' context through
:class:`AgentStateStore`. Each change publishes a whole new table generation to shared
memory (workers see it on their next Check), persists tasks, requests and grants to a JSON
file (atomic rename), and hands an audit event to ``audit`` (requested, granted, refused,
expired, withdrawn, task reported). The rules an elevation grants live in the profiles;
here only who holds which elevation until when. Nothing here can approve a request on the
agent's behalf: approval arrives only through `approve` (operator paths) or the profile's
`approval: auto`. No network I/O here.

Split by concept:
- `tasks`: the tasks agents report, bounded per agent;
- `elevations`: requests, approvals and grants;
- `risks`: the behaviour risk scores;
- `limits`: the per-agent bounds (issue 15: a compromised agent may call as often as it
  likes, with any values) and the check of the seconds an agent sends;
- `layout`: what fits in the shared table (the largest agents withheld, never everyone);
- `store`: the facade that composes them, holds the lock and commits each change through
  the shared publish-and-persist mechanism (`sidecar.state.publisher`).
"""

from sidecar.state.agentstate.limits import (
    MAX_FINISHED_PER_AGENT,
    MAX_JUSTIFICATION,
    MAX_PENDING_PER_AGENT,
    MAX_STATE_BYTES,
    MAX_TASKS_PER_AGENT,
    MAX_TTL,
    check_seconds,
)
from sidecar.state.agentstate.store import AgentStateStore, status_of

__all__ = [
    "MAX_FINISHED_PER_AGENT",
    "MAX_JUSTIFICATION",
    "MAX_PENDING_PER_AGENT",
    "MAX_STATE_BYTES",
    "MAX_TASKS_PER_AGENT",
    "MAX_TTL",
    "AgentStateStore",
    "check_seconds",
    "status_of",
]
