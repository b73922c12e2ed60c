"""Argument rules through real Envoy and `mandate run`, both transports (issue 18): an MCP
tools/call reaches the upstream only with arguments its rule allows; a denied one never
arrives, and its deny body names the argument and the constraint, not the value."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Stack, start_stack, stop_stack

MCP = "http://mcp.tools.svc.cluster.local/mcp"
IBAN = "DE89370400440532013000"
PROFILE = f"""\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: bank-agent
spec:
  owner: payments
  defaultPurpose: pay
  purposes:
    pay:
      allow:
        - hosts: [mcp.tools.svc.cluster.local]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [send_money]
          mcpArguments:
            send_money:
              type: object
              properties:
                recipient: {{type: string, enum: [{IBAN}]}}
                amount: {{type: number, exclusiveMinimum: 0, maximum: 100}}
              required: [recipient, amount]
              additionalProperties: false
        - hosts: [ledger.finance.svc.cluster.local]
          methods: [POST]
          paths: ["/v1/transfers"]
          jsonBody:
            type: object
            properties:
              to: {{type: string, enum: [{IBAN}]}}
              amount: {{type: number, maximum: 100}}
            required: [to, amount]
"""


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"arguments-{transport}")
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "bank.yaml").write_text(PROFILE)
    stack = start_stack(tmp, profiles, transport=transport, agents=["bank-agent"])
    yield stack
    stop_stack(stack)


def _send(stack: Stack, arguments: Any, marker: str) -> Any:
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": marker,
            "method": "tools/call",
            "params": {"name": "send_money", "arguments": arguments},
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    return stack.call("bank-agent", "POST", MCP, headers=headers, body=body)


def _arrived(stack: Stack, marker: str) -> bool:
    return any(marker in r["body"] for r in stack.upstream.received)


def test_a_tool_call_with_allowed_arguments_reaches_the_upstream(bank: Stack) -> None:
    resp = _send(bank, {"recipient": IBAN, "amount": 42}, "ok-1")
    assert resp.status == 200, resp.body
    assert _arrived(bank, "ok-1")


@pytest.mark.parametrize(
    ("arguments", "why", "secret"),
    [
        ({"recipient": "GB33BUKB20201555555555", "amount": 42}, "argument recipient breaks enum",
         "GB33BUKB20201555555555"),
        ({"recipient": IBAN, "amount": 4200}, "argument amount breaks maximum 100", "4200"),
        ({"recipient": IBAN, "amount": 42, "bcc": "attacker@evil.example"},
         "has properties the rule does not list", "attacker@evil.example"),
        ({"recipient": IBAN}, "lacks one of required", None),
    ],
)  # fmt: skip
def test_an_injected_recipient_or_amount_is_denied_and_never_arrives(
    bank: Stack, arguments: dict[str, Any], why: str, secret: str | None
) -> None:
    marker = f"deny-{abs(hash(json.dumps(arguments, sort_keys=True)))}"
    resp = _send(bank, arguments, marker)
    assert resp.status == 403
    body = resp.json()
    assert body["error"] == "outside_purpose"
    assert why in body["reason"] and "send_money" in body["reason"]
    if secret is not None:
        assert secret not in body["reason"]
    assert not _arrived(bank, marker)


@pytest.mark.parametrize(
    ("body", "allowed"),
    [
        ({"to": IBAN, "amount": 10}, True),
        ({"to": "GB33BUKB20201555555555", "amount": 10}, False),
        ({"to": IBAN, "amount": 10_000}, False),
    ],
)
def test_a_plain_http_json_body_is_judged_by_its_fields(
    bank: Stack, body: dict[str, Any], allowed: bool
) -> None:
    marker = f"transfer-{body['to']}-{body['amount']}"
    raw = json.dumps({**body, "memo": marker}).encode()
    resp = bank.call(
        "bank-agent", "POST", "http://ledger.finance.svc.cluster.local/v1/transfers",
        headers={"Content-Type": "application/json"}, body=raw,
    )  # fmt: skip
    assert (resp.status == 200) is allowed, resp.body
    assert _arrived(bank, marker) is allowed
    if not allowed:
        reason = resp.json()["reason"]
        assert reason.startswith("outside purpose 'pay': JSON body: argument ")
        assert "GB33BUKB20201555555555" not in reason and "10000" not in reason
