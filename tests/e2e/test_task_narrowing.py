"""Tasks that narrow rights, end to end on both transports (issue 18, part 2): the agent
reports a task with a declaration through the context API client, before it reads untrusted
data; its calls then go through real Envoy, and only those within both its purpose and the
declaration reach the upstream. Every attempt to widen by declaration is refused.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.agentapi.client import AgentContext
from sidecar.errors import AgentStateError

from .conftest import Response, Stack, start_stack, stop_stack

MCP = "http://mcp.tools.svc.cluster.local/mcp"
LEDGER = "http://ledger.finance.svc.cluster.local/v1/accounts"
MINE, OTHER, ATTACKER = "DE89370400440532013000", "FR1420041010050500013M02606", "GB33BUKB2020"
PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: bank-agent}
spec:
  owner: payments
  defaultPurpose: pay
  purposes:
    pay:
      allow:
        - hosts: [mcp.tools.svc.cluster.local]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [send_money, get_balance, read_inbox]
          mcpArguments:
            send_money:
              properties: {amount: {type: number, maximum: 1000}}
              required: [amount]
        - hosts: [ledger.finance.svc.cluster.local]
          methods: [GET]
    strict:
      requireTask: true
      allow:
        - hosts: [mcp.tools.svc.cluster.local]
          mcpTools: [get_balance, read_inbox]
"""
PAY_TWO = [
    {
        "hosts": ["mcp.tools.svc.cluster.local"],
        "mcpTools": ["send_money"],
        "mcpArguments": {
            "send_money": {
                "properties": {"to": {"enum": [MINE, OTHER]}, "amount": {"maximum": 100}},
                "required": ["to", "amount"],
            }
        },
    },
    {"mcpTools": ["get_balance"]},
]


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[tuple[Stack, str]]:
    tmp: Path = tmp_path_factory.mktemp(f"narrowing-{transport}")
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "bank.yaml").write_text(PROFILE)
    sock = tmp / "ctx" / "bank.sock"
    sock.parent.mkdir()
    stack = start_stack(
        tmp,
        profiles,
        transport=transport,
        agents=["bank-agent"],
        extra=["--context-api", f"bank-agent=unix:{sock}"],
    )
    try:
        yield stack, f"unix:{sock}"
    finally:
        stop_stack(stack)
        shutil.rmtree(sock.parent, ignore_errors=True)


def report(target: str, task: str, allow: Any, purpose: str = "pay") -> Any:
    async def go() -> Any:
        async with AgentContext(target) as ctx:
            return await ctx.report_task(task, purpose, ttl=300, allow=allow)

    return asyncio.run(go())


def tool(stack: Stack, name: str, arguments: Any, marker: str, **headers: str) -> Response:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": marker, "method": "tools/call",
         "params": {"name": name, "arguments": arguments}}
    ).encode()  # fmt: skip
    hdrs = {"Content-Type": "application/json", **headers}
    return stack.call("bank-agent", "POST", MCP, headers=hdrs, body=body)


def arrived(stack: Stack, marker: str) -> bool:
    return any(marker in r["body"] for r in stack.upstream.received)


def test_calls_within_the_declaration_reach_the_upstream(bank: tuple[Stack, str]) -> None:
    stack, target = bank
    t = report(target, "pay-rent", PAY_TWO)
    assert list(t.allow) == PAY_TWO
    resp = tool(stack, "send_money", {"to": MINE, "amount": 80}, "within-1",
                **{"x-mandate-task": "pay-rent"})  # fmt: skip
    assert resp.status == 200, resp.body
    assert arrived(stack, "within-1")
    (seen,) = [r["mandate"] for r in stack.upstream.received if "within-1" in r["body"]]
    assert seen["x-mandate-task"] == "pay-rent" and seen["x-mandate-purpose"] == "pay"
    balance = tool(stack, "get_balance", {}, "within-2", **{"x-mandate-task": "pay-rent"})
    assert balance.status == 200, balance.body


@pytest.mark.parametrize(
    ("case", "name", "arguments", "why", "secret"),
    [
        ("an injected recipient", "send_money", {"to": ATTACKER, "amount": 80},
         "argument to breaks enum", ATTACKER),
        ("more than declared, within the purpose", "send_money", {"to": MINE, "amount": 900},
         "argument amount breaks maximum 100", "900"),
        ("a tool the purpose allows, not declared", "read_inbox", {"folder": "in"},
         "MCP tool 'read_inbox' not allowed", None),
    ],
)  # fmt: skip
def test_calls_outside_the_declaration_are_denied_and_never_arrive(
    bank: tuple[Stack, str], case: str, name: str, arguments: Any, why: str, secret: str | None
) -> None:
    stack, target = bank
    report(target, "pay-rent-2", PAY_TWO)
    marker = f"outside-{abs(hash(case))}"
    resp = tool(stack, name, arguments, marker, **{"x-mandate-task": "pay-rent-2"})
    assert resp.status == 403, resp.body
    body = resp.json()
    assert body["error"] == "outside_task", body
    assert why in body["reason"]
    if secret is not None:
        assert secret not in body["reason"]
    assert not arrived(stack, marker)


def test_without_the_task_the_purpose_decides(bank: tuple[Stack, str]) -> None:
    """A declaration binds the calls that name its task (README: `requireTask` makes that
    every call of a purpose)."""
    stack, _ = bank
    assert tool(stack, "read_inbox", {}, "plain-1").status == 200


def test_a_declaration_cannot_widen_the_purpose(bank: tuple[Stack, str]) -> None:
    stack, target = bank
    wide = [{"mcpTools": ["send_money", "delete_account"]}, {"hosts": ["evil.example"]}, {}]
    report(target, "wide", wide)
    task = {"x-mandate-task": "wide"}
    # a tool the purpose does not grant, a host it does not reach, an amount it forbids
    assert tool(stack, "delete_account", {}, "w-1", **task).json()["error"] == "outside_purpose"
    evil = stack.call("bank-agent", "GET", "http://evil.example/", headers=task)
    assert evil.status == 403 and evil.json()["error"] == "outside_purpose"
    big = tool(stack, "send_money", {"to": ATTACKER, "amount": 5000}, "w-3", **task)
    assert big.status == 403 and "argument amount breaks maximum 1000" in big.json()["reason"]
    assert not any(arrived(stack, m) for m in ("w-1", "w-3"))


@pytest.mark.parametrize(
    ("case", "allow", "purpose"),
    [
        ("a wider declaration", [{"mcpTools": ["send_money", "read_inbox"]}], "pay"),
        ("no declaration", None, "pay"),
        ("another purpose", PAY_TWO, "strict"),
    ],
)
def test_an_active_declared_task_cannot_be_rebound(
    bank: tuple[Stack, str], case: str, allow: Any, purpose: str
) -> None:
    stack, target = bank
    task = f"locked-{abs(hash(case))}"
    report(target, task, PAY_TWO)
    with pytest.raises(AgentStateError) as err:
        report(target, task, allow, purpose)
    assert err.value.status == "FAILED_PRECONDITION"
    resp = tool(stack, "read_inbox", {}, f"{task}-m", **{"x-mandate-task": task})
    assert resp.status == 403 and resp.json()["error"] == "outside_task"  # still narrowed
    # and the declaration cannot be escaped by claiming another purpose for the task
    clash = tool(stack, "read_inbox", {}, f"{task}-c",
                 **{"x-mandate-task": task, "x-mandate-purpose": "strict"})  # fmt: skip
    assert clash.status == 403 and clash.json()["error"] == "bad_task"


def test_require_task(bank: tuple[Stack, str]) -> None:
    stack, target = bank
    strict = {"x-mandate-purpose": "strict"}
    resp = tool(stack, "get_balance", {}, "req-1", **strict)
    assert resp.status == 403 and resp.json()["error"] == "outside_task"
    report(target, "check-balance", [{"mcpTools": ["get_balance"]}], purpose="strict")
    ok = tool(stack, "get_balance", {}, "req-2", **{"x-mandate-task": "check-balance"})
    assert ok.status == 200, ok.body
    no = tool(stack, "read_inbox", {}, "req-3", **{"x-mandate-task": "check-balance"})
    assert no.status == 403 and no.json()["error"] == "outside_task"


def test_a_bad_declaration_is_refused_naming_the_field(bank: tuple[Stack, str]) -> None:
    _, target = bank
    bad = [{"mcpTools": ["send_money"], "mcpArguments": {"send_money": {"format": "iban"}}}]
    with pytest.raises(AgentStateError) as err:
        report(target, "bad", bad)
    assert err.value.status == "INVALID_ARGUMENT"
    assert "allow[0].mcpArguments.send_money.format" in str(err.value)


def test_explain_names_the_constraint_that_decided(bank: tuple[Stack, str]) -> None:
    _, target = bank
    report(target, "explained", PAY_TWO)

    async def go() -> tuple[Any, Any]:
        async with AgentContext(target) as ctx:
            ok = await ctx.explain(
                "POST", MCP, task="explained", tool="send_money",
                arguments={"to": OTHER, "amount": 10},
            )  # fmt: skip
            no = await ctx.explain(
                "POST", MCP, task="explained", tool="send_money",
                arguments={"to": ATTACKER, "amount": 10},
            )  # fmt: skip
            return ok, no

    ok, no = asyncio.run(go())
    assert ok.allowed and ok.constraint == (
        "pay.allow[0] mcpArguments.send_money; task[explained].allow[0] mcpArguments.send_money"
    )
    assert (no.code, no.task) == ("outside_task", "explained")
    assert "argument to breaks enum" in no.constraint and ATTACKER not in no.constraint


def test_a_task_header_sent_twice_is_refused_through_envoy(bank: tuple[Stack, str]) -> None:
    """Review finding: Envoy joins a repeated header with ",", and `T,T` named no task, so
    the call escaped its declaration with the purpose's whole rights."""
    import http.client

    stack, target = bank
    report(target, "twice", PAY_TWO)
    body = json.dumps(
        {"jsonrpc": "2.0", "id": "dup-1", "method": "tools/call",
         "params": {"name": "send_money", "arguments": {"to": ATTACKER, "amount": 900}}}
    ).encode()  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", stack.port("bank-agent"), timeout=10)
    try:
        conn.putrequest("POST", MCP, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "mcp.tools.svc.cluster.local")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("x-mandate-task", "twice")
        conn.putheader("x-mandate-task", "twice")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        status, answer = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 403, answer
    assert json.loads(answer)["error"] == "bad_task"
    assert not arrived(stack, "dup-1")


def test_ending_a_declared_task_early(bank: tuple[Stack, str]) -> None:
    """EndTask: the task's calls are denied at once, and its id cannot be reported again
    (without the declaration, or at all) until its TTL is over."""
    stack, target = bank
    report(target, "short", PAY_TWO)
    task = {"x-mandate-task": "short"}
    assert tool(stack, "get_balance", {}, "end-1", **task).status == 200

    async def end() -> Any:
        async with AgentContext(target) as ctx:
            return await ctx.end_task("short")

    ended = asyncio.run(end())
    assert ended.ended and ended.allow == ()
    resp = tool(stack, "get_balance", {}, "end-2", **task)
    assert resp.status == 403 and resp.json()["error"] == "outside_task"
    with pytest.raises(AgentStateError) as err:
        report(target, "short", None)
    assert err.value.status == "FAILED_PRECONDITION"
    assert not arrived(stack, "end-2")
