"""Argument rules (issue 18): an MCP tool rule's `mcpArguments` constrain what a tools/call
may pass. Decided by the pure core; the deny reason names the argument and the constraint,
never the value (values can be secrets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core import Code, RequestView, Snapshot, decide, load_profiles

IBANS = ["DE89370400440532013000", "FR1420041010050500013M02606"]
PROFILE = f"""\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: bank-agent}}
spec:
  owner: payments
  defaultPurpose: pay
  purposes:
    pay:
      allow:
        - hosts: [mcp.bank]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [send_money, get_balance, search]
          mcpArguments:
            send_money:
              type: object
              properties:
                recipient: {{type: string, enum: {json.dumps(IBANS)}}}
                amount: {{type: number, exclusiveMinimum: 0, maximum: 100}}
                note: {{type: string, maxLength: 140, pattern: "^[^<>]*$"}}
              required: [recipient, amount]
              additionalProperties: false
            search:
              type: object
              properties:
                tags: {{type: array, items: {{type: string, minLength: 1}}, maxItems: 3}}
"""


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    d: Path = tmp_path_factory.mktemp("profiles")
    (d / "bank.yaml").write_text(PROFILE)
    return load_profiles(d)


def call(snapshot: Snapshot, tool: str, arguments: Any, *, omit: bool = False) -> Any:
    params: dict[str, Any] = {"name": tool}
    if not omit:
        params["arguments"] = arguments
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    ).encode()
    view = RequestView(
        decision_id="d", method="POST", authority="mcp.bank", path="/mcp", body=body,
        headers={"content-length": str(len(body))}, configured_agent="bank-agent",
        namespace="ns",
    )  # fmt: skip
    return decide(snapshot, view, 1e9)


OK = {"recipient": IBANS[0], "amount": 50}


@pytest.mark.parametrize(
    ("tool", "arguments", "reason"),
    [
        ("send_money", OK, None),
        ("send_money", {**OK, "amount": 100, "note": "rent"}, None),
        ("get_balance", {"anything": ["goes"]}, None),  # no constraint on this tool
        ("send_money", {**OK, "recipient": "GB33BUKB20201555555555"}, "argument recipient breaks enum"),
        ("send_money", {**OK, "amount": 100.01}, "argument amount breaks maximum 100"),
        ("send_money", {**OK, "amount": 0}, "argument amount breaks exclusiveMinimum 0"),
        ("send_money", {**OK, "amount": "50"}, 'argument amount breaks type "number"'),
        ("send_money", {**OK, "amount": True}, 'argument amount breaks type "number"'),
        ("send_money", {"recipient": IBANS[0]}, 'lacks one of required ["recipient", "amount"]'),
        ("send_money", {**OK, "cc": "attacker"}, "has properties the rule does not list"),
        ("send_money", {**OK, "note": "<script>"}, "argument note breaks pattern"),
        ("send_money", {**OK, "note": "x" * 141}, "argument note breaks maxLength 140"),
        ("send_money", [IBANS[0], 50], "arguments not an object"),
        ("send_money", None, "arguments missing"),
        ("search", {"tags": ["a", "b", "c", "d"]}, "argument tags breaks maxItems 3"),
        ("search", {"tags": ["a", ""]}, "argument tags.1 breaks minLength 1"),
    ],
)  # fmt: skip
def test_arguments_decide_the_call(
    snapshot: Snapshot, tool: str, arguments: Any, reason: str | None
) -> None:
    d = call(snapshot, tool, arguments, omit=arguments is None)
    if reason is None:
        assert d.allowed, d.reason
        assert d.mcp_tools == (tool,)
        return
    assert (d.allowed, d.code) == (False, Code.OUTSIDE_PURPOSE)
    assert reason in d.reason, d.reason
    assert f"MCP tool {tool!r}" in d.reason


def test_a_batch_passes_only_if_every_call_satisfies_its_constraints(snapshot: Snapshot) -> None:
    def msg(i: int, args: Any) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                "params": {"name": "send_money", "arguments": args}}  # fmt: skip

    for batch, allowed in (([msg(1, OK), msg(2, OK)], True),
                           ([msg(1, OK), msg(2, {**OK, "amount": 1e6})], False)):  # fmt: skip
        body = json.dumps(batch).encode()
        view = RequestView(
            decision_id="d", method="POST", authority="mcp.bank", path="/mcp", body=body,
            headers={"content-length": str(len(body))}, configured_agent="bank-agent",
        )  # fmt: skip
        assert decide(snapshot, view, 1e9).allowed is allowed


_VALUES = st.one_of(
    st.text(min_size=8, max_size=40).filter(lambda t: t.strip() == t and len(set(t)) > 3),
    st.integers(min_value=10**9),
)


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["recipient", "amount", "note", "cc"]), value=_VALUES)
def test_a_deny_never_echoes_the_value(snapshot: Snapshot, field: str, value: Any) -> None:
    d = call(snapshot, "send_money", {**OK, field: value})
    if not d.allowed:
        assert str(value) not in d.reason, d.reason


HTTP_PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: bank-agent}
spec:
  owner: payments
  defaultPurpose: pay
  purposes:
    pay:
      allow:
        - hosts: [bank.svc]
          methods: [POST]
          paths: ["/v1/transfers"]
          jsonBody:
            type: object
            properties:
              to: {type: string, enum: [DE89370400440532013000]}
              amount: {type: number, maximum: 100}
            required: [to, amount]
        - hosts: [bank.svc]
          methods: [GET]
          paths: ["/v1/statements"]
          query:
            type: object
            properties:
              month: {type: string, pattern: "^2026-(0[1-9]|1[0-2])$"}
            required: [month]
            additionalProperties: false
"""


@pytest.fixture(scope="module")
def http_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    d: Path = tmp_path_factory.mktemp("http-profiles")
    (d / "bank.yaml").write_text(HTTP_PROFILE)
    return load_profiles(d)


def http(snapshot: Snapshot, method: str, path: str, body: bytes | None = None) -> Any:
    headers = {} if body is None else {"content-length": str(len(body))}
    view = RequestView(
        decision_id="d", method=method, authority="bank.svc", path=path, body=body,
        headers=headers, configured_agent="bank-agent", namespace="ns",
    )  # fmt: skip
    return decide(snapshot, view, 1e9)


@pytest.mark.parametrize(
    ("method", "path", "body", "reason"),
    [
        ("POST", "/v1/transfers", b'{"to": "DE89370400440532013000", "amount": 5}', None),
        ("POST", "/v1/transfers", b'{"to": "ATTACKER-IBAN", "amount": 5}', "JSON body: argument to breaks enum"),
        ("POST", "/v1/transfers", b'{"to": "DE89370400440532013000", "amount": 500}', "JSON body: argument amount breaks maximum 100"),
        ("POST", "/v1/transfers", b'{"to": "DE89370400440532013000", "to": "ATTACKER-IBAN", "amount": 5}', "appears twice"),
        ("POST", "/v1/transfers", b"to=ATTACKER-IBAN&amount=5", "JSON body: not JSON"),
        ("POST", "/v1/transfers", None, "JSON body: missing"),
        ("POST", "/v1/transfers", b'[1, 2]', "JSON body: arguments not an object"),
        ("GET", "/v1/statements?month=2026-03", None, None),
        ("GET", "/v1/statements?month=2026-03&month=2026-04", None, 'query: argument month breaks type "string"'),
        ("GET", "/v1/statements?month=2026-13", None, "query: argument month breaks pattern"),
        ("GET", "/v1/statements?month=2026-03&debug=1", None, "has properties the rule does not list"),
        ("GET", "/v1/statements", None, "lacks one of required"),
    ],
)  # fmt: skip
def test_query_and_json_body_rules_decide_plain_http_calls(
    http_snapshot: Snapshot, method: str, path: str, body: bytes | None, reason: str | None
) -> None:
    d = http(http_snapshot, method, path, body)
    if reason is None:
        assert d.allowed, d.reason
        return
    assert (d.allowed, d.code) == (False, Code.OUTSIDE_PURPOSE)
    assert reason in d.reason, d.reason
    assert "ATTACKER" not in d.reason


def test_a_body_seen_only_in_part_is_denied(http_snapshot: Snapshot) -> None:
    body = b'{"to": "DE89370400440532013000", "amount": 5}'
    view = RequestView(
        decision_id="d", method="POST", authority="bank.svc", path="/v1/transfers", body=body,
        body_truncated=True, configured_agent="bank-agent", namespace="ns",
        headers={"content-type": "application/json"},
    )  # fmt: skip
    d = decide(http_snapshot, view, 1e9)
    assert not d.allowed and "JSON body: not seen whole" in d.reason
