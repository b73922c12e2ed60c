"""Temporary elevation and reported tasks end to end: the agent uses the context API client
(sidecar/agentapi/client.py) on the port `mandate run --context-api` serves, and its calls go through
real Envoy. An auto grant allows the elevated call until it expires, then the call is denied;
an operator grant stays pending until `mandate approve`; a revoked agent with a grant is
denied; the agent cannot approve itself on any port it can reach.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.agentapi.client import AgentContext
from sidecar.errors import AgentStateError

from .conftest import DEMO_PROFILES, Stack, start_stack, stop_stack

REFUND = "http://api.stripe.com/v1/refunds"
EXPORT = "http://ledger.finance.svc.cluster.local/v1/exports/2026-11"
REPORT = "http://reports.finance.svc.cluster.local/v1/reports/november"

AUTO = """  elevations:                         # temporary extra rights, asked for at run time
    ledger-export:
      description: Export the month's ledger for the auditors
      approval: auto
      maxDuration: {max_duration}
      allow:
        - hosts: [ledger.finance.svc.cluster.local]
          methods: [GET]
          paths: ["/v1/exports/*"]
"""


def profiles_with_auto(tmp_path: Path, max_duration: str) -> Path:
    """The demo's profiles with billing-agent's auto elevation `ledger-export`."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (DEMO_PROFILES / "agents.yaml").read_text()
    marker = (
        "  elevations:                         # temporary extra rights, asked for at run time\n"
    )
    assert marker in text
    auto = AUTO.format(max_duration=max_duration)
    (profiles / "agents.yaml").write_text(text.replace(marker, auto, 1))
    return profiles


@pytest.fixture
def elevated_stack(tmp_path: Path, transport: str) -> Iterator[tuple[Stack, str]]:
    profiles = profiles_with_auto(tmp_path, "2s")
    sock = tmp_path / "ctx" / "billing.sock"
    sock.parent.mkdir()
    stack = start_stack(
        tmp_path,
        profiles=profiles,
        transport=transport,
        extra=["--context-api", f"billing-agent=unix:{sock}"],
    )
    try:
        yield stack, f"unix:{sock}"
    finally:
        stop_stack(stack)
        shutil.rmtree(sock.parent, ignore_errors=True)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_auto_grant_allows_until_it_expires(elevated_stack: tuple[Stack, str]) -> None:
    stack, target = elevated_stack
    assert stack.call("billing-agent", "GET", EXPORT).status == 403

    async def request() -> Any:
        async with AgentContext(target) as ctx:
            return await ctx.request_elevation("ledger-export", "auditors asked", 2)

    req = run(request())
    assert req.state == "granted" and req.approver == "auto"
    resp = stack.call("billing-agent", "GET", EXPORT)
    assert resp.status == 200, resp.body
    assert resp.json()["mandate"]["x-mandate-decision"]
    # Until expires_at, then denied: the decision reads the grant's end at every Check.
    assert req.expires_at is not None
    while time.time() < req.expires_at - 0.3:
        assert stack.call("billing-agent", "GET", EXPORT).status == 200
        time.sleep(0.1)
    time.sleep(max(0.0, req.expires_at - time.time()) + 0.05)
    denied = stack.call("billing-agent", "GET", EXPORT)
    assert denied.status == 403
    assert denied.json()["error"] == "outside_purpose"


def test_operator_grant_stays_pending_until_approved(elevated_stack: tuple[Stack, str]) -> None:
    stack, target = elevated_stack

    async def request() -> Any:
        async with AgentContext(target) as ctx:
            with pytest.raises(AgentStateError, match="justification"):
                await ctx.request_elevation("refund", "", 60)
            return await ctx.request_elevation("refund", "INV-7 was charged twice", 60)

    req = run(request())
    assert req.state == "pending"
    assert stack.call("billing-agent", "POST", REFUND, body=b"{}").status == 403

    # The agent has no admin token: every approve attempt it can make is refused.
    admin = f"http://127.0.0.1:{stack.mandate.admin_port}/v1/elevations/{req.id}/approve"
    for headers in ({}, {"Authorization": "Bearer guess"}, {"x-mandate-agent": "operator"}):
        r = urllib.request.Request(
            admin, data=b'{"approver": "me"}', method="POST", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(r, timeout=5)
        assert exc.value.code == 401
    assert stack.call("billing-agent", "POST", REFUND, body=b"{}").status == 403

    listed = json.loads(stack.mandate_cli("elevations").stdout)
    assert [r["id"] for r in listed["requests"] if r["state"] == "pending"] == [req.id]
    approved = stack.mandate_cli("approve", req.id, "--approver", "alice", "--reason", "FIN-12")
    assert approved.returncode == 0, approved.stderr
    assert json.loads(approved.stdout)["state"] == "Granted"
    resp = stack.call("billing-agent", "POST", REFUND, body=b"{}")
    assert resp.status == 200, resp.body

    async def wait() -> Any:
        async with AgentContext(target) as ctx:
            granted = await ctx.wait_for_grant(req.id, timeout=5)
            status = await ctx.status()
            return granted, status

    granted, status = run(wait())
    assert granted.state == "granted" and "alice" in granted.approver
    assert [g.elevation for g in status.grants] == ["refund"]

    # Revocation overrides any grant.
    revoked = stack.mandate_cli("revoke", "billing-agent", "--reason", "incident 9")
    assert revoked.returncode == 0, revoked.stderr
    resp = stack.call("billing-agent", "POST", REFUND, body=b"{}")
    assert resp.status == 403 and resp.json()["error"] == "revoked"


def test_a_reported_task_selects_its_purpose(elevated_stack: tuple[Stack, str]) -> None:
    stack, target = elevated_stack
    headers = {"x-mandate-task": "close-nov"}
    assert stack.call("billing-agent", "PUT", REPORT, headers=headers, body=b"{}").status == 403

    async def report() -> Any:
        async with AgentContext(target) as ctx:
            await ctx.report_task("close-nov", "report", ttl=60)
            return await ctx.explain("PUT", REPORT, task="close-nov")

    explained = run(report())
    assert explained.allowed and explained.purpose == "report"
    resp = stack.call("billing-agent", "PUT", REPORT, headers=headers, body=b"{}")
    assert resp.status == 200, resp.body
    seen = resp.json()["mandate"]
    assert seen["x-mandate-purpose"] == "report" and seen["x-mandate-task"] == "close-nov"
    # The task selects among the agent's own purposes; contradicting it is refused.
    clash = stack.call(
        "billing-agent",
        "PUT",
        REPORT,
        headers={**headers, "x-mandate-purpose": "reconcile"},
        body=b"{}",
    )
    assert clash.status == 403 and clash.json()["error"] == "bad_task"


def test_the_context_api_has_no_way_to_approve(elevated_stack: tuple[Stack, str]) -> None:
    _, target = elevated_stack
    with grpc.insecure_channel(target) as channel:
        approve = channel.unary_unary("/mandate.agent.v1.AgentContext/Approve")
        with pytest.raises(grpc.RpcError) as exc:
            approve(b"", timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
