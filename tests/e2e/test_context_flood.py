"""Issue 15, findings 2 and 3, end to end: one agent floods the context API as a compromised
agent would (about 2,000 `approval: auto` RequestElevation calls with long justifications,
tasks with absurd TTLs, many distinct tasks) while mandate serves two agents through real
Envoy, on both transports. The other agent's reported task, and the flooding agent's own
grant, task and purpose calls, keep working; nothing the flood sent grows the state file
without bound; readiness details say the table has room and the state is durable.

Before the bounds, the auto grants filled the shared context table: from then on no task and
no grant reached the workers (every agent's task calls 200 -> 403), and a TTL of 1e300 was
stored and enforced although the agent got INTERNAL.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.agentapi.client import AgentContext
from sidecar.errors import AgentStateError

from .conftest import Stack, start_stack, stop_stack
from .test_elevation import profiles_with_auto

EXPORT = "http://ledger.finance.svc.cluster.local/v1/exports/2026-11"
INVOICE = "http://ledger.finance.svc.cluster.local/v1/invoices/7"
REPORT = "http://reports.finance.svc.cluster.local/v1/reports/november"
MCP = "http://mcp.tools.svc.cluster.local/mcp"
SEARCH = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "search_papers", "arguments": {"q": "x"}},
    }
).encode()


@pytest.fixture
def two_agents(tmp_path: Path, transport: str) -> Iterator[tuple[Stack, str, str]]:
    profiles = profiles_with_auto(tmp_path, "10m")
    sockets = tmp_path / "ctx"
    sockets.mkdir()
    billing, research = sockets / "billing.sock", sockets / "research.sock"
    stack = start_stack(
        tmp_path,
        profiles=profiles,
        transport=transport,
        extra=[
            "--context-api", f"billing-agent=unix:{billing}",
            "--context-api", f"research-agent=unix:{research}",
        ],
    )  # fmt: skip
    try:
        yield stack, f"unix:{billing}", f"unix:{research}"
    finally:
        stop_stack(stack)
        shutil.rmtree(sockets, ignore_errors=True)


async def _flood(calls: list[Callable[[], Awaitable[Any]]], batch: int = 8) -> dict[str, int]:
    """Run ``calls`` a few at a time (the listener's own concurrency limit is 16); count the
    outcomes by gRPC status name."""
    outcomes: dict[str, int] = {}
    for i in range(0, len(calls), batch):
        results = await asyncio.gather(*(c() for c in calls[i : i + batch]), return_exceptions=True)
        for r in results:
            name = r.status if isinstance(r, AgentStateError) else type(r).__name__
            if isinstance(r, BaseException) and not isinstance(r, AgentStateError):
                raise r
            outcomes[name] = outcomes.get(name, 0) + 1
    return outcomes


def test_one_agent_flooding_the_context_api_stops_no_one(
    two_agents: tuple[Stack, str, str],
) -> None:
    stack, billing_api, research_api = two_agents
    task = {"x-mandate-task": "close-nov"}
    lit = {"x-mandate-task": "lit-1", "content-type": "application/json"}

    async def setup() -> Any:
        async with AgentContext(research_api) as research, AgentContext(billing_api) as billing:
            await research.report_task("lit-1", "tool-use")
            await billing.report_task("close-nov", "report", ttl=600)
            return await billing.request_elevation("ledger-export", "auditors asked")

    granted = asyncio.run(setup())
    assert granted.state == "granted"
    assert stack.call("research-agent", "POST", MCP, lit, SEARCH).status == 200
    assert stack.call("billing-agent", "GET", EXPORT).status == 200

    async def flood() -> dict[str, int]:
        async with AgentContext(billing_api) as ctx:
            calls: list[Callable[[], Awaitable[Any]]] = []
            for _ in range(2000):  # the review's flood (2,000-character justifications)
                calls.append(lambda: ctx.request_elevation("ledger-export", "j" * 2000))
                calls.append(lambda: ctx.request_elevation("ledger-export", "k" * 1024))
            for i in range(200):
                calls.append(lambda i=i: ctx.report_task(f"flood-{i}", "report", ttl=1e300))
                calls.append(lambda i=i: ctx.report_task(f"bulk-{i:03d}" + "t" * 119, "report"))
            return await _flood(calls)

    outcomes = asyncio.run(flood())

    # The other agent's task still selects its purpose...
    resp = stack.call("research-agent", "POST", MCP, lit, SEARCH)
    assert resp.status == 200, resp.body
    assert resp.json()["mcp"]["result"]  # only purpose tool-use, selected by the task, allows it
    # ...and the flooding agent's own grant and purposes still work.
    resp = stack.call("billing-agent", "GET", EXPORT)
    assert resp.status == 200, resp.body
    assert stack.call("billing-agent", "GET", INVOICE).status == 200
    # Refused at the boundary: the over-long justifications and the absurd TTLs (a TTL of
    # 1e300 was stored and enforced while the agent got INTERNAL).
    assert outcomes.get("INVALID_ARGUMENT") == 2000 + 200, outcomes
    assert "INTERNAL" not in outcomes
    # The valid ones spend the agent's bucket of state-changing calls (10/s, burst 100).
    assert outcomes.get("RESOURCE_EXHAUSTED", 0) > 0, outcomes
    time.sleep(0.3)  # three tokens back, by the bucket's clock

    async def after() -> Any:
        async with AgentContext(billing_api) as ctx:
            again = await ctx.request_elevation("ledger-export", "once more")
            # Its own tasks are bounded: the flood pushed out its oldest, so it reports the
            # one it works on again (an agent that floods only harms itself).
            await ctx.report_task("close-nov", "report", ttl=600)
            return again, await ctx.status()

    again, status = asyncio.run(after())
    assert again.id == granted.id and again.expires_at == granted.expires_at  # not extended
    assert [g.elevation for g in status.grants] == ["ledger-export"]
    assert len(status.tasks) <= 64 and not any(t.task_id.startswith("flood-") for t in status.tasks)
    resp = stack.call("billing-agent", "PUT", REPORT, headers=task, body=b"{}")
    assert resp.status == 200, resp.body

    _, ready = stack.readyz()
    assert ready["ready"] is True
    context = ready["context"]
    assert context["table"]["withheld"] == [] and context["table"]["overflow"] is False
    assert context["persistence"]["durable"] is True
    assert (stack.tmp / "state" / "context.json").stat().st_size < 256 * 1024


def test_a_change_the_audit_trail_cannot_record_is_not_made(tmp_path: Path, transport: str) -> None:
    """A fail-closed audit trail that cannot take records (here: under a free-space reserve
    no disk has) refuses the agent's task and auto grant instead of enforcing them with no
    record (review of issue 15: the store only undid a change when the audit callback
    raised, and the real writer only queues)."""
    socket_path = tmp_path / "billing.sock"
    stack = start_stack(
        tmp_path,
        profiles=profiles_with_auto(tmp_path, "10m"),
        transport=transport,
        extra=[
            "--context-api", f"billing-agent=unix:{socket_path}",
            "--audit-dir", str(tmp_path / "audit"), "--audit-reserve", "100000000G",
        ],
    )  # fmt: skip
    try:

        async def attempt() -> tuple[dict[str, int], Any]:
            async with AgentContext(f"unix:{socket_path}") as ctx:
                outcomes = await _flood(
                    [
                        lambda: ctx.report_task("close-nov", "report", ttl=600),
                        lambda: ctx.request_elevation("ledger-export", "INV-7"),
                    ]
                )
                return outcomes, await ctx.status()

        outcomes, status = asyncio.run(attempt())
        assert outcomes == {"UNAVAILABLE": 2}, outcomes
        assert list(status.tasks) == [] and list(status.grants) == []
        _, ready = stack.readyz()
        assert ready["audit"]["state"] == "failing"
        # The calls themselves are denied for the audit trail too (fail closed).
        resp = stack.call("billing-agent", "GET", INVOICE)
        assert resp.status == 403 and "audit trail" in resp.json()["reason"]
    finally:
        stop_stack(stack)
