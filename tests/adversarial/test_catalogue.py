"""Runs the adversarial catalogue (catalogue.py) through real Envoy and mandate, once per
transport, and the context-API probes (state an agent can create: tasks, elevation
requests) that do not fit one request.

The main oracle is the recording upstream: for a case that must be refused, nothing arrived;
for an allowed one, exactly one request arrived and it carried exactly mandate's
`x-mandate-*` headers; for every case, nothing forbidden arrived (`leak`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import unicodedata
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from devstack.local import ENVOY_DIR
from sidecar.agentapi.client import AgentContext
from sidecar.errors import AgentStateError

from ..e2e.conftest import Stack, direct_check
from ..e2e.test_adversarial_headers import h2_request
from .catalogue import (
    ALLOWED_PATH,
    ALLOWED_TOOL,
    BANK,
    CATALOGUE,
    FILINGS,
    FORBIDDEN_TOOL,
    HR,
    SPOOF,
    TOKEN,
    TOOLS,
    WIKI,
    Case,
)
from .conftest import AdversarialStack

DECISION_ID = re.compile(r"^[0-9a-f]{32}$")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


# --- what may never reach an upstream -----------------------------------------------------


def _canonical_host(host: str) -> str:
    host = host.strip().lower()
    name, _, port = host.rpartition(":")
    if name and port.isdigit() and not host.endswith("]"):
        host = name
    return host.removesuffix(".")


def _as_an_upstream_may_read(path: str) -> list[str]:
    """The path's segments as the most lenient upstream reads them: decoded twice (also
    IIS `%uXXXX`), `\\` as `/`, NFKC, no zero-width characters, case-folded, trailing dots
    and spaces dropped, dot segments resolved."""
    path = path.split("?", 1)[0].split("#", 1)[0].split(";", 1)[0]
    for _ in range(2):
        path = re.sub(r"%u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), path)
        path = unquote(path)
    path = unicodedata.normalize("NFKC", path.replace("\\", "/")).translate(_ZERO_WIDTH).lower()
    out: list[str] = []
    for segment in path.split("/"):
        segment = segment.rstrip(". ") if segment not in (".", "..") else segment
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment.split(";", 1)[0])
    return out


def leak(seen: dict[str, Any]) -> str:
    """Why ``seen`` (a request the upstream received) should never have arrived, or ""."""
    host = _canonical_host(str(seen["host"]))
    segments = _as_an_upstream_may_read(str(seen["path"]))
    if host == HR and segments[:2] == ["v1", "secrets"]:
        return "a /v1/secrets spelling reached the HR host"
    exact = unquote(str(seen["path"]).split("?", 1)[0])
    if host == HR and exact.startswith("/v1/keys/"):
        return "/v1/keys reached the HR host"
    if host == WIKI and segments[:1] == ["admin"]:
        return "/admin reached the wiki"
    if host == BANK:
        return "a request reached the bank (no wire was ever approved)"
    if host == TOOLS and FORBIDDEN_TOOL in str(seen.get("body", "")):
        return f"{FORBIDDEN_TOOL} reached the MCP server"
    if any(name.lower().replace("_", "-") in _OVERRIDES for name, _ in seen.get("raw_headers", [])):
        return "a method/URL override header reached an upstream"
    return ""


_OVERRIDES = {"x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
              "x-rewrite-url"}  # fmt: skip


def _mandate_headers_exact(seen: dict[str, Any], agent: str, purpose: str, task: str) -> None:
    """The upstream saw mandate's headers, once each, spelt as mandate spells them, and no
    other `x-mandate-*` (nor `x_mandate_*`) header."""
    ours = [
        (k, v)
        for k, v in seen["raw_headers"]
        if k.lower().replace("_", "-").startswith("x-mandate-")
    ]
    names = sorted(k for k, _ in ours)
    expected = sorted(["x-mandate-agent", "x-mandate-purpose", "x-mandate-decision"]
                      + (["x-mandate-task"] if task else []))  # fmt: skip
    assert names == expected, ours
    values = dict(ours)
    assert values["x-mandate-agent"] == agent, ours
    assert values["x-mandate-purpose"] == purpose, ours
    assert DECISION_ID.match(values["x-mandate-decision"]), ours
    if task:
        assert values["x-mandate-task"] == task, ours


# --- sending ------------------------------------------------------------------------------


def _h1_bytes(case: Case) -> bytes:
    if case.raw is not None:
        return case.raw
    lines = [f"{case.method} {case.target} HTTP/1.1"]
    host = case.host if case.host is not None else urlsplit(case.target).netloc
    if host and not any(k.lower() == "host" for k, _ in case.headers):
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in case.headers]
    if case.body is not None:
        lines.append(f"Content-Length: {len(case.body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (case.body or b"")


def _send_h1(port: int, data: bytes, timeout: float = 4.0) -> tuple[int, dict[str, str], bytes]:
    """Raw bytes to an Envoy listener: (status, headers, body) of the first response; status
    0 if the connection closed (or timed out) without one."""
    reply = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # a refusal may close before all is sent
            s.sendall(data)
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            reply += chunk
            head, sep, body = reply.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    head, _, body = reply.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, {}, reply
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if length:
        body = body[: int(length.group(1))]
    return int(head[9:12]), headers, body


def _deny_body(status: int, body: bytes) -> dict[str, Any]:
    assert status == 403, (status, body[:400])
    assert b"/mandate" not in body, body[:400]
    deny: dict[str, Any] = json.loads(body)
    assert set(deny) == {"error", "reason", "decision", "trace_id"}, deny
    assert DECISION_ID.match(deny["decision"]), deny
    assert deny["trace_id"] == "" or DECISION_ID.match(deny["trace_id"]), deny  # never echoed
    return deny


def _refused(status: int, body: bytes) -> bool:
    """Refused before any upstream: a reset or closed stream, a 4xx, or Envoy's own 501 for
    a transfer coding it does not implement (never 502/503: mandate failing is no answer)."""
    return status == 0 or 400 <= status < 500 or (status == 501 and body == b"Not Implemented")


def _wait_quiet(stack: Stack, since: int, settle: float = 0.05) -> list[dict[str, Any]]:
    """What arrived at the upstream since ``since`` (a forwarded request arrives before its
    response; a short settle covers a second, smuggled one)."""
    time.sleep(settle)
    return list(stack.upstream.received[since:])


# --- one case -----------------------------------------------------------------------------


def _admin(stack: AdversarialStack, case: Case) -> tuple[int, bytes]:
    token = stack.token_file.read_text().strip()
    headers = {k: v.replace(TOKEN, token) for k, v in case.headers}
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.mandate.admin_port}{case.target}",
        data=case.body,
        method=case.method,
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_case(stack: AdversarialStack, case: Case) -> None:
    expect = case.expect
    since = len(stack.upstream.received)
    deny_header = ""
    if case.proto == "admin":
        status, body = _admin(stack, case)
        assert status == expect.status, (status, body[:400])
        if expect.keys:
            assert sorted(json.loads(body)) == sorted(expect.keys), body[:400]
        assert _wait_quiet(stack, since, 0) == []
        return
    if case.proto == "direct":
        host = case.host or HR
        status, deny = direct_check(
            stack.transport,
            stack.mandate.grpc_port,
            case.agent,
            host,
            case.target,
            dict(case.headers),
        )
        assert _wait_quiet(stack, since) == [], "a Check call forwarded something"
        if expect.kind == "direct":
            # Whatever mandate answered, the forged question gave the real agent nothing.
            assert status in (200, 403), (status, deny)
            assert _call_code(stack, "payroll-bot", TOOLS, "/rpc") == "outside_purpose"
            return
        assert status == 403, (status, deny)
        body = json.dumps(deny).encode()
    elif case.proto == "h2":
        status, body = h2_request(
            stack.port(case.agent), case.method, case.host or HR, case.target, dict(case.headers)
        )
        if len(case.headers) != len(dict(case.headers)):
            raise AssertionError("h2 cases take each header once")
    else:
        status, headers, body = _send_h1(stack.port(case.agent), _h1_bytes(case))
        deny_header = headers.get("x-mandate-decision", "")
    arrived = _wait_quiet(stack, since)
    for seen in arrived:
        assert not leak(seen), (leak(seen), seen)
    if expect.kind == "deny":
        deny = _deny_body(status, body)
        stack.denials.append((case.id, deny["decision"]))
        assert deny["error"] == expect.code, deny
        assert expect.reason in deny["reason"], deny
        if case.proto == "h1":
            assert deny_header == deny["decision"], (deny_header, deny)
        assert arrived == [], arrived
    elif expect.kind == "refuse":
        assert _refused(status, body), (status, body[:400])
        assert expect.status in (-1, status), (status, body[:400])
        if status == 403:  # mandate's deny, never a bare 403
            stack.denials.append((case.id, _deny_body(status, body)["decision"]))
        assert arrived == [], arrived
    elif expect.kind == "allow":
        assert status == 200, (status, body[:400])
        assert len(arrived) == 1, arrived
        (seen,) = arrived
        assert seen["path"] == expect.path, seen
        assert seen["method"] == case.method.upper(), seen
        assert _canonical_host(seen["host"]) == expect.host, seen
        _mandate_headers_exact(seen, case.agent, expect.purpose, expect.task)
    elif expect.kind == "guard":
        if 200 <= status < 300:
            assert len(arrived) == 1, arrived
            (seen,) = arrived
            assert _canonical_host(seen["host"]) == expect.host, seen
            _mandate_headers_exact(seen, case.agent, seen["mandate"]["x-mandate-purpose"], "")
        else:
            assert _refused(status, body), (status, body[:400])
            assert arrived == [], arrived
    else:
        raise AssertionError(f"unknown expectation {expect.kind}")


def _call_code(stack: Stack, agent: str, host: str, path: str, method: str = "POST",
               headers: dict[str, str] | None = None, body: bytes = b"{}") -> str:  # fmt: skip
    """The outcome of one call through Envoy: "allowed", or the deny body's `error`."""
    resp = stack.call(
        agent, method, f"http://{host}{path}", headers, body if method != "GET" else None
    )
    if resp.status == 200:
        return "allowed"
    return str(_deny_body(resp.status, resp.body)["error"])


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_catalogue(adversarial: AdversarialStack, case: Case) -> None:
    run_case(adversarial, case)


def test_catalogue_ids_are_unique() -> None:
    ids = [c.id for c in CATALOGUE]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


# --- Envoy's admin interface in the shipped sidecar configs -------------------------------


@pytest.mark.parametrize("config", ["sidecar.yaml", "sidecar-http.yaml"])
def test_envoy_admin_is_no_port_the_agent_can_reach(config: str) -> None:
    """envoy-admin: the agent shares the pod's network namespace, so an admin on TCP lets it
    `/quitquitquit` Envoy and read `/config_dump`. (tests/e2e/test_envoy_admin.py runs it.)"""
    admin = yaml.safe_load((ENVOY_DIR / config).read_text())["admin"]
    assert set(admin["address"]) == {"pipe"}, admin
    assert Path(admin["address"]["pipe"]["path"]).is_absolute(), admin


# --- mandate's Check port without Envoy's attribution ---------------------------------------


def _check_without_attribution(stack: Stack, raw_path: str) -> tuple[int, dict[str, Any]]:
    """A Check that names no agent the way Envoy does: over gRPC no `context_extensions`;
    over HTTP ``raw_path`` as the request path (Envoy's prefix missing or doubled)."""
    port = stack.mandate.grpc_port
    if stack.transport == "http":
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                f"GET {raw_path} HTTP/1.1\r\nHost: {TOOLS}\r\nConnection: close\r\n\r\n".encode()
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head[9:12]), json.loads(body)
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes.request.http
    attrs.method, attrs.host, attrs.path, attrs.scheme = "POST", TOOLS, "/rpc", "http"
    attrs.headers.update({"x-mandate-agent": SPOOF})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        resp = external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=5)
    assert resp.HasField("denied_response"), resp
    return resp.denied_response.status.code, json.loads(resp.denied_response.body)


@pytest.mark.parametrize(
    "raw_path",
    ["/rpc", f"/mandate;agent=payroll-bot;agent={SPOOF}/rpc", f"/mandate;agent={SPOOF}%2Fx/rpc"],
    ids=["no-prefix", "agent-twice", "agent-with-escape"],
)
def test_direct_check_without_envoys_attribution_is_denied(
    adversarial: AdversarialStack, raw_path: str
) -> None:
    """direct-check: a Check naming no agent as Envoy does (a header naming one is no
    attribution) is a deny, and nothing is forwarded."""
    since = len(adversarial.upstream.received)
    status, deny = _check_without_attribution(adversarial, raw_path)
    assert status == 403, (status, deny)
    assert deny["error"] in ("unattributed", "bad_request", "unknown_agent"), deny
    assert _wait_quiet(adversarial, since) == []


# --- the agent context API: state an agent creates ----------------------------------------


def _ctx(stack: AdversarialStack, agent: str) -> AgentContext:
    return AgentContext(stack.context[agent], timeout=5)


async def _outcome(coro: Any) -> str:
    try:
        await coro
    except AgentStateError as exc:
        return exc.status
    return "OK"


ABSURD_TTLS = {"1e300": 1e300, "inf": float("inf"), "nan": float("nan"), "negative": -1.0,
               "30d-plus-1s": 2_592_001.0}  # fmt: skip


@pytest.mark.parametrize("name", ABSURD_TTLS)
def test_context_report_task_with_an_absurd_ttl_stores_nothing(
    adversarial: AdversarialStack, name: str
) -> None:
    """ReportTask ttl 1e300: before, INTERNAL for the agent, yet the binding was stored and
    enforced. Now: INVALID_ARGUMENT, nothing stored, the task selects nothing."""
    ttl, task = ABSURD_TTLS[name], f"absurd-{name}"

    async def go() -> tuple[str, list[str]]:
        async with _ctx(adversarial, "payroll-bot") as ctx:
            outcome = await _outcome(ctx.report_task(task, "filing", ttl=ttl))
            return outcome, [t.task_id for t in (await ctx.status()).tasks]

    outcome, tasks = asyncio.run(asyncio.wait_for(go(), 20))
    assert outcome == "INVALID_ARGUMENT", outcome
    assert task not in tasks
    # The task does not select `filing`: decided under payrun, which has no such rule.
    code = _call_code(
        adversarial,
        "payroll-bot",
        f"{FILINGS}:8443",
        "/returns/q4",
        "PUT",
        {"x-mandate-task": task},
    )
    assert code == "outside_purpose"


def test_context_tasks_and_requests_an_agent_cannot_make(adversarial: AdversarialStack) -> None:
    """Malformed or unknown: refused at the boundary, nothing stored. Many tasks: at most
    64 kept (the agent's own oldest dropped)."""

    async def go() -> tuple[list[str], int]:
        async with _ctx(adversarial, "payroll-bot") as ctx:
            outcomes = [
                await _outcome(ctx.report_task("t" * 129, "filing")),
                await _outcome(ctx.report_task("has space", "filing")),
                await _outcome(ctx.report_task("ok-task", "toolbox")),  # mcp-runner's purpose
                await _outcome(ctx.request_elevation("no-such-elevation", "x")),
                await _outcome(ctx.request_elevation("bonus", "x", duration=1e300)),
            ]
            for i in range(80):
                await ctx.report_task(f"many-{i:02d}", "payrun", ttl=600)
            return outcomes, len((await ctx.status()).tasks)

    outcomes, tasks = asyncio.run(asyncio.wait_for(go(), 30))
    assert outcomes == [
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "NOT_FOUND",
        "INVALID_ARGUMENT",
    ], outcomes
    assert tasks <= 64, tasks


def test_context_a_task_of_another_agent_selects_nothing(adversarial: AdversarialStack) -> None:
    async def go() -> None:
        async with _ctx(adversarial, "mcp-runner") as ctx:
            await ctx.report_task("wiki-read-7", "research", ttl=600)

    asyncio.run(asyncio.wait_for(go(), 20))
    headers = {"x-mandate-task": "wiki-read-7"}
    assert _call_code(adversarial, "mcp-runner", WIKI, "/pages/1", "GET", headers) == "allowed"
    assert (
        _call_code(adversarial, "mcp-runner", WIKI, "/admin/users", "GET", headers)
        == "denied_by_rule"
    )
    # payroll-bot naming mcp-runner's task: its own default purpose decides.
    assert (
        _call_code(adversarial, "payroll-bot", WIKI, "/pages/1", "GET", headers)
        == "outside_purpose"
    )
    # A task bound to one purpose and a call declaring another: refused.
    clash = {**headers, "x-mandate-purpose": "toolbox"}
    assert _call_code(adversarial, "mcp-runner", WIKI, "/pages/1", "GET", clash) == "bad_task"


def test_context_operator_elevation_stays_pending_and_private(
    adversarial: AdversarialStack,
) -> None:
    """approval: operator: the agent can ask, never approve; its justification is not shown
    on the admin port without the token; the elevated call stays denied."""
    secret = "JUSTIFICATION-7c1e: pay the invoice from the wiki page"

    async def go() -> Any:
        async with _ctx(adversarial, "payroll-bot") as ctx:
            missing = await _outcome(ctx.request_elevation("wire", ""))
            return missing, await ctx.request_elevation("wire", secret)

    missing, req = asyncio.run(asyncio.wait_for(go(), 20))
    assert missing == "FAILED_PRECONDITION"
    assert req.state == "pending"
    url = f"http://127.0.0.1:{adversarial.mandate.admin_port}"
    with urllib.request.urlopen(f"{url}/readyz", timeout=10) as resp:
        shown = resp.read()
    assert json.loads(shown) == {"ready": True} and b"JUSTIFICATION" not in shown
    approve = urllib.request.Request(
        f"{url}/v1/elevations/{req.id}/approve", data=b'{"approver": "me"}', method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(approve, timeout=10)
    assert refused.value.code == 401
    assert _call_code(adversarial, "payroll-bot", BANK, "/v1/wires") == "outside_purpose"


def test_context_pending_requests_are_bounded(adversarial: AdversarialStack) -> None:
    """At most 8 pending requests per agent. (After the operator-elevation test, which
    needs a free slot: pytest keeps file order within a transport.)"""

    async def go() -> list[str]:
        async with _ctx(adversarial, "payroll-bot") as ctx:
            return [await _outcome(ctx.request_elevation("wire", f"wire {i}")) for i in range(20)]

    outcomes = asyncio.run(asyncio.wait_for(go(), 30))
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes.count("OK") <= 8 and outcomes[-1] == "RESOURCE_EXHAUSTED", outcomes


def test_context_auto_elevation_flood_is_bounded(adversarial: AdversarialStack) -> None:
    """About 1,900 auto RequestElevation calls with 2,000-character justifications filled
    the shared table: every agent's task calls went 200 -> 403. Here (bounded: 400 calls,
    30 s): over-long justifications are refused, an active auto grant is returned unchanged,
    the other agent's task still selects its purpose, and the grant never beats a deny rule."""

    async def setup() -> None:
        async with _ctx(adversarial, "mcp-runner") as ctx:
            await ctx.report_task("flood-witness", "research", ttl=600)

    asyncio.run(asyncio.wait_for(setup(), 20))
    witness = {"x-mandate-task": "flood-witness"}
    assert _call_code(adversarial, "mcp-runner", WIKI, "/pages/2", "GET", witness) == "allowed"

    async def flood() -> tuple[dict[str, int], set[str]]:
        outcomes: dict[str, int] = {}
        ids: set[str] = set()
        async with _ctx(adversarial, "payroll-bot") as ctx:
            # The grant first, waiting (bounded) for a token if earlier tests spent them.
            deadline = time.monotonic() + 10
            while not ids:
                try:
                    ids.add((await ctx.request_elevation("bonus", "first")).id)
                except AgentStateError as exc:
                    if exc.status != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

            async def one(justification: str) -> None:
                try:
                    ids.add((await ctx.request_elevation("bonus", justification)).id)
                    outcomes["OK"] = outcomes.get("OK", 0) + 1
                except AgentStateError as exc:
                    outcomes[exc.status] = outcomes.get(exc.status, 0) + 1

            for i in range(0, 400, 8):
                await asyncio.gather(*(one(("j" if (i + k) % 2 else "k") * (2000 if (i + k) % 2 else 1024))
                                       for k in range(8)))  # fmt: skip
        return outcomes, ids

    outcomes, ids = asyncio.run(asyncio.wait_for(flood(), 30))
    # The 2,000-character ones are refused at the boundary; of the others, the agent's
    # bucket of state-changing calls (burst 100, 10/s) lets some through, the rest wait.
    assert outcomes["INVALID_ARGUMENT"] == 200, outcomes
    assert set(outcomes) <= {"INVALID_ARGUMENT", "OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes.get("OK", 0) + outcomes.get("RESOURCE_EXHAUSTED", 0) == 200, outcomes
    assert len(ids) == 1, ids  # one active auto grant, returned unchanged
    assert _call_code(adversarial, "mcp-runner", WIKI, "/pages/3", "GET", witness) == "allowed"
    assert _call_code(adversarial, "payroll-bot", HR, "/v2/bonus/q4") == "allowed"
    assert _call_code(adversarial, "payroll-bot", HR, "/v1/secrets/db", "GET") == "denied_by_rule"
    assert _call_code(adversarial, "payroll-bot", HR, ALLOWED_PATH, "GET") == "allowed"
    token = adversarial.token_file.read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{adversarial.mandate.admin_port}/readyz?verbose=1",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        ready = json.loads(resp.read())
    assert ready["ready"] is True, ready
    state = adversarial.tmp / "state" / "context.json"
    assert not state.exists() or state.stat().st_size < 256 * 1024


def test_mcp_allowed_tool_still_works_after_the_catalogue(adversarial: AdversarialStack) -> None:
    """Nothing in the catalogue broke mandate: a plain allowed call still goes through."""
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": ALLOWED_TOOL}}
    )
    headers = {"content-type": "application/json"}
    assert (
        _call_code(adversarial, "mcp-runner", TOOLS, "/rpc", "POST", headers, body.encode())
        == "allowed"
    )


# --- the audit trail: every deny recorded, and a deleted chain noticed ---------------------
# (after the catalogue: pytest runs a module's tests for one transport in file order)


_BY_ID = {c.id: c for c in CATALOGUE}


def _audit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "audit", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_audit_every_deny_of_the_catalogue_has_a_record(adversarial: AdversarialStack) -> None:
    run_case(adversarial, _BY_ID["path-plain-denied"])  # at least one, when run alone
    wanted = dict((decision, cid) for cid, decision in adversarial.denials)
    deadline = time.monotonic() + 15
    while True:
        out = _audit("query", str(adversarial.tmp / "audit"), "--decision", "deny")
        found = {
            json.loads(line)["decision_id"] for line in out.stdout.splitlines() if line.strip()
        }
        missing = sorted(cid for decision, cid in wanted.items() if decision not in found)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert missing == [], missing


@pytest.mark.parametrize(
    "tamper",
    [
        "intact",
        "delete-worker-chain",
        "delete-chain-and-manifest",
        "edit-record",
        "drop-a-record-inside",
    ],
)
def test_audit_verify_names_what_was_done_to_the_trail(
    adversarial: AdversarialStack, tmp_path: Path, tamper: str
) -> None:
    """`mandate audit verify` on a copy of the stack's trail. Before: deleting every file of
    one worker's chain gave exit 0."""
    run_case(adversarial, _BY_ID["path-plain-denied"])  # at least one deny, when run alone
    audit = adversarial.tmp / "audit"
    deadline = time.monotonic() + 10  # the worker writes off the Check path
    while not any('"decision":"deny"' in p.read_text() for p in audit.glob("audit-*-w0-*.jsonl")):
        assert time.monotonic() < deadline, "no deny record written"
        time.sleep(0.1)
    copy = tmp_path / "audit"
    shutil.copytree(audit, copy, ignore=shutil.ignore_patterns(".*"))
    worker = sorted(copy.glob("audit-*-w0-*.jsonl"))
    assert worker, sorted(p.name for p in copy.iterdir())
    if tamper in ("delete-worker-chain", "delete-chain-and-manifest"):
        for path in worker:
            path.unlink()
    if tamper == "delete-chain-and-manifest":
        (copy / "audit-manifest.jsonl").unlink()
    if tamper == "edit-record":
        lines = worker[-1].read_text().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if '"decision":"deny"' in line)
        lines[at] = lines[at].replace('"decision":"deny"', '"decision":"allow"', 1)
        worker[-1].write_text("".join(lines))
    if tamper == "drop-a-record-inside":  # (a chain's tail is only known to its writer)
        lines = worker[-1].read_text().splitlines(keepends=True)
        assert len(lines) > 3, lines
        worker[-1].write_text("".join(lines[:2] + lines[3:]))
    out = _audit("verify", str(copy))
    if tamper == "intact":
        assert out.returncode == 0, out.stdout + out.stderr
    else:
        assert out.returncode == 1, out.stdout + out.stderr
    if tamper == "delete-worker-chain":
        assert "missing_chain" in out.stdout and "w0" in out.stdout, out.stdout + out.stderr
    if tamper == "delete-chain-and-manifest":
        assert "missing_manifest" in out.stdout, out.stdout + out.stderr


# --- revocation: an operator's revoke holds on every path the agent has --------------------


def test_revocation_holds_over_h1_h2_and_connect_and_restore_ends_it(
    adversarial: AdversarialStack,
) -> None:
    """Last in the module (it revokes tunnel-bot, which no later case uses)."""
    stack = adversarial
    revoked = stack.mandate_cli(
        "revoke", "tunnel-bot", "--reason", "catalogue revocation", "--expires", "10m"
    )
    assert revoked.returncode == 0, revoked.stderr
    try:
        deadline = time.monotonic() + 5
        while (
            _call_code(stack, "tunnel-bot", "cdn.partner.example", "/assets/a.js", "GET")
            != "revoked"
        ):
            assert time.monotonic() < deadline, "revocation not in force after 5 s"
            time.sleep(0.05)
        since = len(stack.upstream.received)
        status, body = h2_request(
            stack.port("tunnel-bot"), "GET", "cdn.partner.example", "/assets/a.js"
        )
        assert _deny_body(status, body)["reason"] == "revoked: catalogue revocation"
        status, _, body = _send_h1(
            stack.port("tunnel-bot"),
            b"CONNECT relay.partner.example:443 HTTP/1.1\r\nHost: relay.partner.example:443\r\n\r\n",
        )
        assert _deny_body(status, body)["error"] == "revoked"
        # A spoofed identity does not escape it.
        spoofed = {"x-mandate-agent": "payroll-bot"}
        assert (
            _call_code(stack, "tunnel-bot", "cdn.partner.example", "/assets/b.js", "GET", spoofed)
            == "revoked"
        )
        assert _wait_quiet(stack, since) == []
    finally:
        restored = stack.mandate_cli("restore", "tunnel-bot")
        assert restored.returncode == 0, restored.stderr
    deadline = time.monotonic() + 5
    while (
        _call_code(stack, "tunnel-bot", "cdn.partner.example", "/assets/a.js", "GET") != "allowed"
    ):
        assert time.monotonic() < deadline, "restore not in force after 5 s"
        time.sleep(0.05)


# --- the oracle itself, on plain data ------------------------------------------------------


def _seen(
    path: str, host: str = HR, headers: list[tuple[str, str]] | None = None, body: str = ""
) -> dict[str, Any]:
    return {"path": path, "host": host, "raw_headers": headers or [], "body": body, "mandate": {}}


@pytest.mark.parametrize(
    "seen",
    [
        _seen("/v1/secrets/db"),
        _seen("/v1/SECRETS./db", HR + ":80"),
        _seen("/v1/%u0073ecrets/db"),
        _seen("/v1/secrets%252Fdb"),
        _seen("/v1/x/%2e%2e/secrets/db"),
        _seen("/v1\\secrets\\db"),
        _seen("/v1/%EF%BD%93ecrets/db", HR.upper() + "."),
        _seen("/v1/sec%E2%80%8Brets/db"),
        _seen("/v1/keys/x"),
        _seen("/admin/x", WIKI),
        _seen("/v1/wires", BANK),
        _seen("/rpc", TOOLS, body=f'{{"name": "{FORBIDDEN_TOOL}"}}'),
        _seen(ALLOWED_PATH, headers=[("X-HTTP-Method-Override", "DELETE")]),
    ],
)
def test_oracle_leak_names_what_must_not_arrive(seen: dict[str, Any]) -> None:
    assert leak(seen)


@pytest.mark.parametrize(
    "path", [ALLOWED_PATH, "/v1/secrets-public/a", "/v1/KEYS/x", "/v1/reports?next=/v1/secrets/x"]
)
def test_oracle_leak_lets_allowed_paths_through(path: str) -> None:
    assert leak(_seen(path)) == ""


_MANDATE = [
    ("x-mandate-agent", "payroll-bot"),
    ("x-mandate-purpose", "payrun"),
    ("x-mandate-decision", "0" * 32),
]


@pytest.mark.parametrize(
    "extra",
    [
        [("x_mandate_agent", SPOOF)],
        [("x-mandate-agent", SPOOF)],
        [("X-Mandate-Agent", SPOOF)],
        [("x-mandate_purpose", "filing")],
        [("x-mandate-task", "t")],
        [("x-mandate-grant", "g")],
    ],
)
def test_oracle_headers_catch_every_spoofed_spelling(extra: list[tuple[str, str]]) -> None:
    _mandate_headers_exact(_seen(ALLOWED_PATH, headers=_MANDATE), "payroll-bot", "payrun", "")
    with pytest.raises(AssertionError):
        _mandate_headers_exact(
            _seen(ALLOWED_PATH, headers=_MANDATE + extra), "payroll-bot", "payrun", ""
        )
