"""`mandate simulate` on a trail recorded through real Envoy and `mandate run`, both
transports (issue 18, point 4): replayed against the profiles that recorded it, nothing
changes (so every recorded call is rebuilt as the core saw it: encoded paths, queries, MCP
tool calls, a task); against a candidate, the calls that would change are named."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.policy.cli import add_simulate_parser, read_records, run_simulate

from .conftest import DEMO_PROFILES, Stack, start_stack, stop_stack

LEDGER = "http://ledger.finance.svc.cluster.local"
MCP = "http://mcp.tools.svc.cluster.local/mcp"
TOOL_USE = {"x-mandate-purpose": "tool-use", "Content-Type": "application/json"}


def _rpc(method: str, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


@pytest.fixture(scope="module")
def recorded(
    tmp_path_factory: pytest.TempPathFactory, transport: str
) -> Iterator[tuple[Stack, Path]]:
    """A stack with an audit trail, and a recorded session of nine calls."""
    tmp = tmp_path_factory.mktemp(f"simulate-{transport}")
    audit = tmp / "audit"
    stack = start_stack(tmp, transport=transport, extra=["--audit-dir", str(audit)])
    try:
        session = [
            ("billing-agent", "GET", LEDGER + "/v1/invoices/7", {}, None, 200),
            ("billing-agent", "GET", LEDGER + "/v1/invoices/a%20b%3F?x=1", {}, None, 200),
            ("billing-agent", "GET", LEDGER + "/v1/invoices/8", {"x-mandate-task": "t-42"}, None, 200),
            ("billing-agent", "GET", LEDGER + "/v1/ledger/admin/users", {}, None, 403),
            ("billing-agent", "GET", LEDGER + "/v1/payments/1", {}, None, 403),
            ("research-agent", "POST", MCP, TOOL_USE, _rpc("tools/call", name="search_papers", arguments={"q": "x"}), 200),
            ("research-agent", "POST", MCP, TOOL_USE, _rpc("tools/call", name="delete_corpus"), 403),
            ("research-agent", "POST", MCP, TOOL_USE, _rpc("initialize"), 200),
        ]  # fmt: skip
        for agent, method, url, headers, body, status in session:
            resp = stack.call(agent, method, url, headers=headers, body=body)
            assert resp.status == status, (url, resp.body)
        revoked = stack.mandate_cli("revoke", "billing-agent", "--reason", "INC-1")
        assert revoked.returncode == 0, revoked.stderr
        resp = stack.call("billing-agent", "GET", LEDGER + "/v1/invoices/9")
        assert resp.status == 403 and resp.json()["reason"] == "revoked: INC-1"
        deadline = time.monotonic() + 10  # the worker writes records off the Check path
        while len(list(read_records(audit))) < 9 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(read_records(audit))) == 9
        yield stack, audit
    finally:
        stop_stack(stack)


def simulate(
    capsys: pytest.CaptureFixture[str], profiles: Path, audit: Path
) -> tuple[int, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="mandate")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    args = ["simulate", "--profiles", str(profiles), "--audit", str(audit), "--json"]
    code = run_simulate(parser.parse_args(args))
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return code, doc


def test_the_recording_profiles_change_nothing(recorded: tuple[Stack, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    stack, audit = recorded
    code, doc = simulate(capsys, stack.profiles, audit)
    assert code == 0, doc
    assert doc["totals"] == {
        "records": 9, "replayed": 8, "unchanged": 8, "unchanged_other_rule": 0,
        "allow_to_deny": 0, "deny_to_allow": 0, "not_replayable": 1,
    }  # fmt: skip
    # the revocation is run-time state; `initialize` named no tool, but the trail kept its
    # body's messages (`arguments`, the default hashes), so the MCP rule reads it again
    assert doc["not_replayable"] == {"revoked": 1}


def test_a_candidate_names_the_calls_that_would_change(recorded: tuple[Stack, Path],
                                                       capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:  # fmt: skip
    stack, audit = recorded
    text = (DEMO_PROFILES / "agents.yaml").read_text()
    text = text.replace('paths: ["/v1/invoices/*", "/v1/ledger/**"]', 'paths: ["/v1/ledger/**"]')
    text = text.replace(
        "mcpTools: [search_papers, fetch_abstract]",
        "mcpTools: [search_papers, fetch_abstract, delete_corpus]",
    )
    new = tmp_path / "candidate"
    new.mkdir()
    (new / "agents.yaml").write_text(text)
    for other in stack.profiles.iterdir():
        if other.name != "agents.yaml":
            (new / other.name).write_text(other.read_text())
    code, doc = simulate(capsys, new, audit)
    assert code == 1
    a2d, d2a = doc["changes"]
    assert (a2d["change"], a2d["agent"], a2d["purpose"], a2d["old"], a2d["new"]["code"], a2d["count"]) == (
        "allow_to_deny", "billing-agent", "reconcile",
        {"code": "allowed", "rule": "reconcile.allow[0]"}, "outside_purpose", 3,
    )  # fmt: skip
    assert [e["path"] for e in a2d["examples"]] == [
        "/v1/invoices/7",
        "/v1/invoices/a b?",
        "/v1/invoices/8",
    ]
    assert (d2a["change"], d2a["agent"], d2a["new"]["rule"], d2a["examples"][0]["tools"]) == (
        "deny_to_allow", "research-agent", "tool-use.allow[0]", ["delete_corpus"],
    )  # fmt: skip
