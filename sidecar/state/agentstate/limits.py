"""The bounds on what an agent can make the agent-state store keep (issue 15, finding 2),
and the check of the numbers of seconds an agent sends. Nothing is stored here.

The agent may be compromised and call the context API as often as it likes, with any
values, so everything it can create is bounded per agent. Sized so that one agent at every
bound takes about 155 KB of the shared table (64 tasks of at most ~800 bytes and 64 KiB of
task declarations, 256 ended tasks kept until their TTL, its auto grants, one risk score)
and about 220 KB of the state file: the default 4 MiB table holds ~26 agents at their worst
at once, far more than one pod serves; past that, the largest agents are withheld (see
`layout`).
"""

from __future__ import annotations

import math
from typing import Any

from sidecar.errors import AgentStateError

__all__ = [
    "KEEP_FINISHED",
    "MAX_DECLARED_BYTES_PER_AGENT",
    "MAX_ENDED_PER_AGENT",
    "MAX_FINISHED_PER_AGENT",
    "MAX_JUSTIFICATION",
    "MAX_PENDING_PER_AGENT",
    "MAX_RISK_EXPLANATION",
    "MAX_STATE_BYTES",
    "MAX_TASKS_PER_AGENT",
    "MAX_TTL",
    "PENDING_TTL",
    "check_seconds",
    "described",
    "span",
]

MAX_TASKS_PER_AGENT = 64
MAX_DECLARED_BYTES_PER_AGENT = 64 * 1024  # the declarations of one agent's tasks, as JSON
MAX_ENDED_PER_AGENT = 256  # declared tasks ended early, kept (no rights) until their TTL
MAX_PENDING_PER_AGENT = 8
MAX_FINISHED_PER_AGENT = 16  # expired/refused requests kept for status, per agent
MAX_JUSTIFICATION = 1024  # characters (1 KiB): a ticket reference and a sentence or two
MAX_TTL = 30 * 86400.0  # seconds: the longest task TTL or elevation duration accepted
MAX_STATE_BYTES = 16 * 1024 * 1024  # context.json: an agent's change past this is refused
MAX_RISK_EXPLANATION = 512  # characters of a risk explanation published to the workers
PENDING_TTL = 3600.0  # an operator request not approved within an hour lapses
KEEP_FINISHED = 300.0  # finished requests stay visible (status, audit) this long


def check_seconds(field: str, value: float | None) -> float | None:
    """A TTL or duration from the agent: None (not given), or finite, > 0 and at most
    MAX_TTL. Refused before anything is stored: an infinite or huge value cannot be turned
    into an expiry time (OverflowError) and would outlive every restart."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise AgentStateError(f"{field} must be a number of seconds")
    if not math.isfinite(value) or value <= 0 or value > MAX_TTL:
        raise AgentStateError(
            f"{field} must be a positive number of seconds, at most {MAX_TTL:.0f} "
            f"({span(MAX_TTL)}), not {value!r}"
        )
    return float(value)


def span(seconds: float) -> str:
    """``seconds`` as an operator writes a duration: 2h, 10m, 45s."""
    s = round(seconds)
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


def described() -> dict[str, Any]:
    """The bounds as readiness details show them."""
    return {
        "tasks_per_agent": MAX_TASKS_PER_AGENT,
        "declared_bytes_per_agent": MAX_DECLARED_BYTES_PER_AGENT,
        "ended_tasks_per_agent": MAX_ENDED_PER_AGENT,
        "pending_requests_per_agent": MAX_PENDING_PER_AGENT,
        "finished_requests_per_agent": MAX_FINISHED_PER_AGENT,
        "auto_grants_per_agent_and_elevation": 1,
        "justification_characters": MAX_JUSTIFICATION,
        "max_ttl_seconds": MAX_TTL,
        "state_file_bytes": MAX_STATE_BYTES,
    }
