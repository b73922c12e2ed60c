"""Learn, review, simulate, enforce, through real Envoy and `mandate run`, both transports
(issue 18, point 3): an agent runs under a wide purpose with an audit trail that records its
arguments (hashes by default, some values in clear); `mandate profile suggest` proposes a
profile from the trail; `mandate simulate` replays the recording against the proposal and
nothing changes (exit 0); loaded into the running mandate, the proposal still allows what
the agent did and refuses what it did not (another recipient, another tool, another host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.policy.cli import read_records

from .conftest import Stack, start_stack, stop_stack

MCP = "http://mcp.tools.svc.cluster.local/mcp"
LEDGER = "http://ledger.finance.svc.cluster.local"
IBANS = ["DE89370400440532013000", "GB29NWBK60161331926819"]
ATTACKER = "GB33BUKB20201555555555"
CARD = "4111111111111111"  # recorded as a hash only: must never appear in the trail
WIDE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: bank-agent
spec:
  owner: payments
  audit:
    arguments: hashes
    values: [to, amount, status]
  defaultPurpose: pay
  purposes:
    pay:
      description: learning what the agent needs
      allow:
        - {}
      deny:
        - hosts: [ledger.finance.svc.cluster.local]
          paths: ["/v1/admin/**"]
"""
JSON = {"Content-Type": "application/json"}


def _rpc(method: str, i: int = 1, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}).encode()


def _send(to: str, amount: int, card: str = CARD) -> bytes:
    args = {"to": to, "amount": amount, "card": card}
    return _rpc("tools/call", name="send_money", arguments=args)


SESSION: list[tuple[str, str, bytes | None, int]] = [
    ("POST", MCP, _rpc("initialize", protocolVersion="2025-06-18"), 200),
    ("POST", MCP, _send(IBANS[0], 40), 200),
    ("POST", MCP, _send(IBANS[1], 95), 200),
    ("POST", MCP, _send(IBANS[0], 12), 200),
    ("POST", MCP, _rpc("tools/call", name="get_balance", arguments={"account": "main"}), 200),
    *[("GET", f"{LEDGER}/v1/invoices/{n}", None, 200) for n in (1001, 1002, 1003)],
    ("GET", f"{LEDGER}/v1/invoices?status=open", None, 200),
    ("GET", f"{LEDGER}/v1/invoices?status=paid", None, 200),
    ("POST", f"{LEDGER}/v1/transfers", json.dumps({"to": IBANS[0], "amount": 10}).encode(), 200),
    ("GET", f"{LEDGER}/v1/admin/users", None, 403),  # denied by rule: never learned
]


def _mandate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def learned(
    tmp_path_factory: pytest.TempPathFactory, transport: str
) -> Iterator[tuple[Stack, Path]]:
    """A stack recording the session under the wide purpose, and its audit directory."""
    tmp = tmp_path_factory.mktemp(f"learn-{transport}")
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "bank.yaml").write_text(WIDE)
    audit = tmp / "audit"
    stack = start_stack(
        tmp, profiles, transport=transport, agents=["bank-agent"],
        extra=["--audit-dir", str(audit)],
    )  # fmt: skip
    try:
        for method, url, body, status in SESSION:
            headers = JSON if body is not None else {}
            resp = stack.call("bank-agent", method, url, headers=headers, body=body)
            assert resp.status == status, (url, resp.body)
        deadline = time.monotonic() + 10  # the worker writes records off the Check path
        while len(list(read_records(audit))) < len(SESSION) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(list(read_records(audit))) == len(SESSION)
        yield stack, audit
    finally:
        stop_stack(stack)


def test_the_trail_keeps_types_hashes_and_chosen_values_only(learned: tuple[Stack, Path]) -> None:
    _, audit = learned
    data = b"".join(p.read_bytes() for p in sorted(audit.glob("audit-*.jsonl")))
    assert CARD.encode() not in data and b"main" not in data
    decisions = [r for r in map(json.loads, data.splitlines()) if r.get("type") == "decision"]
    (send,) = [r for r in decisions if IBANS[1] in json.dumps(r.get("arguments"))]
    (message,) = send["arguments"]["mcp"]
    assert message["args"]["to"] == {"type": "string", "value": IBANS[1]}
    assert message["args"]["amount"] == {"type": "integer", "value": 95}
    assert (
        message["args"]["card"]["type"] == "string" and len(message["args"]["card"]["hash"]) == 16
    )
    key = audit / ".audit-arguments.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert key.read_text().strip() not in data.decode()


def test_suggest_then_simulate_changes_nothing_then_enforce(
    learned: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, audit = learned
    suggested = tmp_path / "suggested"
    suggested.mkdir()
    out = suggested / "bank.yaml"
    result = _mandate("profile", "suggest", "--audit", str(audit), "--agent", "bank-agent",
                      "--profiles", str(stack.profiles), "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "0 would change" in result.stderr
    text = out.read_text()
    assert "# 5 MCP calls, 1 distinct path" in text  # initialize and four tool calls
    assert "Not learned from: 1 denied_by_rule" in text
    valid = _mandate("validate", str(suggested))
    assert valid.returncode == 0, valid.stdout + valid.stderr

    pay = yaml.safe_load(text)["spec"]["purposes"]["pay"]
    mcp = next(r for r in pay["allow"] if "mcpTools" in r)
    assert mcp["mcpTools"] == ["get_balance", "send_money"]
    send = mcp["mcpArguments"]["send_money"]["properties"]
    assert send["to"] == {"type": "string", "enum": IBANS}
    assert send["amount"] == {"type": "integer", "minimum": 12, "maximum": 95}
    assert send["card"] == {"type": "string"}  # hashed: the type only
    invoices = next(r for r in pay["allow"] if r.get("paths") == ["/v1/invoices"])
    assert invoices["query"]["properties"]["status"] == {"type": "string", "enum": ["open", "paid"]}
    assert pay["deny"] == [
        {"hosts": ["ledger.finance.svc.cluster.local"], "paths": ["/v1/admin/**"]}
    ]

    # the round trip: the recording replayed against its own proposal changes nothing
    sim = _mandate("simulate", "--profiles", str(suggested), "--audit", str(audit), "--json")
    assert sim.returncode == 0, sim.stdout + sim.stderr
    report = json.loads(sim.stdout)
    assert report["changed"] is False
    assert report["totals"]["records"] == len(SESSION) and report["totals"]["replayed"] > 0
    # the tool calls kept `card` as a hash: simulate says it cannot tell, never guesses
    assert report["not_replayable"].get("mcp_arguments") == 4

    # enforce: the proposal replaces the wide purpose in the running mandate
    before = stack.mandate.ready()["profiles"]["reloads"]
    tmp = stack.profiles / ".bank.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, stack.profiles / "bank.yaml")
    deadline = time.monotonic() + 10
    while stack.mandate.ready()["profiles"]["reloads"] <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.mandate.ready()["profiles"]["reloads"] > before
    for method, url, body, status in SESSION:  # what the agent did still passes
        resp = stack.call("bank-agent", method, url, headers=JSON if body else {}, body=body)
        assert resp.status == status, (url, resp.body)
    refused = [
        ("POST", MCP, _send(ATTACKER, 40), "argument to breaks enum"),
        ("POST", MCP, _send(IBANS[0], 5000), "argument amount breaks maximum 95"),
        ("POST", MCP, _rpc("tools/call", name="delete_account", arguments={}), "delete_account"),
        ("GET", f"{LEDGER}/v1/payments/1", None, "outside purpose 'pay'"),
        ("GET", "http://files.example.com/x", None, "outside purpose 'pay'"),
    ]
    for method, url, body, why in refused:
        resp = stack.call("bank-agent", method, url, headers=JSON if body else {}, body=body)
        assert resp.status == 403 and why in resp.json()["reason"], (url, resp.body)
