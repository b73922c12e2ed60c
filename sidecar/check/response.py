"""The answer half of a Check (both transports): the headers an allowed call carries
upstream and the body of a deny. Each transport encodes them in its own wire format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sidecar.core import Decision
from sidecar.headers import (
    AGENT_HEADER,
    DECISION_HEADER,
    OWN_PREFIXES,
    PURPOSE_HEADER,
    SET_HEADERS,
    TASK_HEADER,
)

__all__ = ["deny_body", "upstream_headers"]


def upstream_headers(
    d: Decision, agent_headers: Iterable[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """For an allowed call: the headers to set on the upstream request (overwriting any
    value the agent sent) and the names of the other `x-mandate-*` headers the agent sent
    (also spelt with "_"), to remove. ``agent_headers`` are the request's (lower-case)
    header names."""
    to_set = [
        (AGENT_HEADER, d.agent),
        (PURPOSE_HEADER, d.purpose),
        (DECISION_HEADER, d.decision_id),
    ]
    if d.task:
        to_set.append((TASK_HEADER, d.task))
    to_remove = [
        name
        for name in agent_headers
        if name.startswith(OWN_PREFIXES)
        and (name not in SET_HEADERS or (name == TASK_HEADER and not d.task))
    ]
    return to_set, to_remove


def deny_body(d: Decision) -> bytes:
    return json.dumps(
        {"error": d.code, "reason": d.reason, "decision": d.decision_id, "trace_id": d.trace_id}
    ).encode()
