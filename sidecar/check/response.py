"""The answer half of a Check (both transports): the headers an allowed call carries
upstream and the body of a deny. Each transport encodes them in its own wire format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from sidecar.core import Code, Decision
from sidecar.credentials.broker import NOTHING, Injected
from sidecar.headers import (
    AGENT_HEADER,
    DECISION_HEADER,
    OWN_PREFIXES,
    PURPOSE_HEADER,
    SET_HEADERS,
    TASK_HEADER,
)

__all__ = ["deny_body", "deny_status", "upstream_headers"]


def upstream_headers(
    d: Decision, agent_headers: Iterable[str], injected: Injected = NOTHING
) -> tuple[list[tuple[str, str]], list[str]]:
    """For an allowed call: the headers to set on the upstream request (overwriting any
    value the agent sent), its credentials among them, and the names of the headers the
    agent sent that must not reach the upstream: its other `x-mandate-*` headers (also
    spelt with "_") and, to a host with a credential, its own credential headers.
    ``agent_headers`` are the request's (lower-case) header names."""
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
    if injected.set or injected.remove:
        to_set.extend(injected.set)
        to_remove.extend(injected.remove)
    return to_set, to_remove


def deny_status(d: Decision) -> int:
    """The HTTP status of a deny: 503 when a credential the call needs cannot be had now
    (retry later), else 403."""
    return 503 if d.code == Code.CREDENTIAL_UNAVAILABLE else 403


def deny_body(d: Decision) -> bytes:
    return json.dumps(
        {"error": d.code, "reason": d.reason, "decision": d.decision_id, "trace_id": d.trace_id}
    ).encode()
