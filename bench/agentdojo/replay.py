"""Replaying AgentDojo sessions through real Envoy and `mandate run` (the I/O of the benchmark).

One stack per transport: an MCP upstream (aiohttp, in this process: it answers every
`tools/call` with a JSON-RPC result and records which call arrived, with the `x-mandate-*`
headers it got), `mandate run` with the generated profiles (one agent per suite and
configuration; the context API on a unix socket for each narrowing agent), and Envoy with
envoy/local(-http).yaml, one egress listener per agent, every host routed to the upstream.
Each call is an MCP `tools/call` JSON-RPC POST to `http://<suite>.mcp.agentdojo.test/mcp`
through the agent's listener; 200 = allowed (and it must have arrived), 403 with mandate's
JSON deny body = refused (and it must not have arrived); anything else aborts the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.agentdojo.policy import (
    MCP_PATH,
    SUITE_PURPOSE,
    Config,
    Session,
    Suite,
    agent_name,
    declaration,
    mcp_host,
    purpose_name,
)
from bench.agentdojo.score import Outcome
from bench.lib import BenchError
from devstack.local import (
    ENVOY_DIR,
    EnvoyProcess,
    MandateProcess,
    render_envoy_config,
    start_envoy,
    start_mandate,
)
from sidecar.agentapi.client import AgentContext
from sidecar.errors import AgentStateError

__all__ = ["McpUpstream", "Stack", "post_mcp", "read_answer", "replay", "running_stack"]

TEMPLATES = {"grpc": "local.yaml", "http": "local-http.yaml"}
# A declared task cannot be ended or dropped while it lasts, and an agent holds at most 64
# active tasks (and 64 KiB of declarations): each session's task lives a few seconds, and a
# ReportTask refused for room (or by the per-agent write rate, 10/s) is retried.
TASK_TTL_S = 5.0
REPORT_PATIENCE_S = 60.0
# Refusals that measure the policy; any other code (bad_task, rate, revoked, ...) means the
# replay is not measuring what it should: the run aborts.
POLICY_CODES = frozenset({"outside_purpose", "outside_task"})
CALL_TIMEOUT_S = 10.0
PROBE_TOOL = "agentdojo_bench_probe_not_a_tool"


class McpUpstream:
    """A minimal MCP server on 127.0.0.1 (port 0) in the running event loop: `tools/call`
    and `tools/list` get a JSON-RPC result; ``received`` maps each request's JSON-RPC id to
    the `x-mandate-*` headers it arrived with."""

    def __init__(self) -> None:
        self.received: dict[str, dict[str, str]] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            msg = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": "not JSON"}, status=400)
        if not isinstance(msg, dict) or "id" not in msg:
            return web.json_response({"error": "not a JSON-RPC request"}, status=400)
        headers = {
            k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-mandate-")
        }
        self.received[str(msg["id"])] = headers
        if msg.get("method") == "tools/call":
            name = (msg.get("params") or {}).get("name")
            result: Any = {"content": [{"type": "text", "text": f"{name}: done"}], "isError": False}
        elif msg.get("method") == "tools/list":
            result = {"tools": []}
        else:
            result = {}
        return web.json_response({"jsonrpc": "2.0", "id": msg["id"], "result": result})

    async def start(self) -> int:
        app = web.Application()
        app.router.add_route("POST", MCP_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server  # aiohttp has no public accessor for the bound port
        self.port = int(server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class Stack:
    transport: str
    envoy: EnvoyProcess
    mandate: MandateProcess
    upstream: McpUpstream
    sockets: dict[str, str] = field(default_factory=dict)  # narrowing agent -> unix:PATH

    def port(self, agent: str) -> int:
        return self.envoy.listeners[f"egress-{agent}"]


def write_profiles(docs: Sequence[Mapping[str, Any]], where: Path) -> Path:
    """One YAML file per agent profile in ``where``/profiles."""
    target = where / "profiles"
    target.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        name = doc["metadata"]["name"]
        (target / f"{name}.yaml").write_text(yaml.safe_dump(dict(doc), sort_keys=False))
    return target


@contextlib.asynccontextmanager
async def running_stack(
    transport: str,
    work: Path,
    profiles: Path,
    agents: Sequence[str],
    narrowing: Sequence[str],
    *,
    mandate_args: Sequence[str] = (),
    access_log: bool = False,
    timeout: float = 20.0,
) -> AsyncIterator[Stack]:
    """The upstream, `mandate run` and Envoy for ``agents`` (``narrowing``: those that get
    the context API), on 127.0.0.1 ports they pick; all stopped on exit. On an error inside,
    the last lines of mandate's and Envoy's logs go to the exception's message.
    ``mandate_args``: more arguments of `mandate run`; ``access_log``: behaviour analysis
    on, Envoy's access log streamed to it; ``timeout``: for each process to be up."""
    where = work / transport
    where.mkdir(parents=True, exist_ok=True)
    upstream = McpUpstream()
    await upstream.start()
    sockets = {a: f"unix:{where / f'ctx-{i}.sock'}" for i, a in enumerate(narrowing)}
    extra = ["--transport", transport, "--log-level", "WARNING", "--threads", "2"]
    for agent, address in sockets.items():
        extra += ["--context-api", f"{agent}={address}"]
    if access_log:
        extra += ["--access-log", "127.0.0.1:0"]
    extra += mandate_args
    mandate: MandateProcess | None = None
    envoy: EnvoyProcess | None = None
    try:
        mandate = await asyncio.to_thread(
            start_mandate, profiles, where / "mandate", extra=extra, timeout=timeout
        )
        config = render_envoy_config(
            ENVOY_DIR / TEMPLATES[transport],
            {
                "ADMIN_PORT": 0,
                "LISTEN_PORT": 0,
                "UPSTREAM_PORT": upstream.port,
                "ACCESS_LOG": where / "access.log",
            },
            agents=list(agents),
            mandate_ports=mandate.grpc_ports,
            als_port=mandate.access_log_port if access_log else None,
        )
        envoy = await asyncio.to_thread(start_envoy, config, where / "envoy", timeout=timeout)
        stack = Stack(transport, envoy, mandate, upstream, sockets)
        try:
            yield stack
        except BaseException as exc:
            tails = []
            for log in (envoy.log_path, mandate.log_path):
                if log.exists():
                    lines = log.read_text(errors="replace").splitlines()[-10:]
                    tails.append(f"--- {log.name} (last lines)\n" + "\n".join(lines))
            if tails and isinstance(exc, BenchError):
                raise BenchError(f"{exc}\n" + "\n".join(tails)) from exc
            raise
        if envoy.proc.poll() is not None or mandate.proc.poll() is not None:
            raise BenchError(f"{transport}: Envoy or mandate exited during the run")
    finally:
        if envoy is not None:
            await asyncio.to_thread(envoy.stop)
        if mandate is not None:
            await asyncio.to_thread(mandate.stop)
        await upstream.stop()


async def post_mcp(
    http: aiohttp.ClientSession, port: int, host: str, body: bytes, headers: Mapping[str, str]
) -> tuple[int, str]:
    hdrs = {
        "Host": host,
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        **headers,
    }
    url = f"http://127.0.0.1:{port}{MCP_PATH}"
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with http.post(url, data=body, headers=hdrs, timeout=timeout) as resp:
        return resp.status, await resp.text()


def read_answer(status: int, text: str, what: str) -> tuple[bool, str, str]:
    """(allowed, code, reason) of an answer through Envoy; BenchError unless it is a 200 or
    mandate's 403 (a 503 is mandate failing, anything else a broken stack)."""
    if status == 200:
        return True, "", ""
    if status == 403:
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body and "reason" in body:
            return False, str(body["error"]), str(body["reason"])
    raise BenchError(f"{what}: HTTP {status}, not 200 or mandate's 403: {text[:300]}")


async def probe(stack: Stack, http: aiohttp.ClientSession, agent: str, host: str) -> None:
    """Abort unless the agent's listener is up: `tools/list` passes (200, arrives) and a tool
    no profile lists is refused by mandate (403 outside_purpose, never arrives)."""
    port = stack.port(agent)
    deadline = time.monotonic() + 10.0
    rpc = f"probe/{agent}/list"
    body = json.dumps({"jsonrpc": "2.0", "id": rpc, "method": "tools/list"}).encode()
    while True:  # the first Check may race Envoy's connection to mandate
        status, text = await post_mcp(http, port, host, body, {})
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    read_answer(status, text, f"{stack.transport} {agent} probe tools/list")
    if status != 200 or rpc not in stack.upstream.received:
        raise BenchError(f"{stack.transport} {agent}: tools/list gave {status} or never arrived")
    rpc = f"probe/{agent}/deny"
    body = json.dumps(
        {"jsonrpc": "2.0", "id": rpc, "method": "tools/call",
         "params": {"name": PROBE_TOOL, "arguments": {}}}
    ).encode()  # fmt: skip
    status, text = await post_mcp(http, port, host, body, {})
    allowed, code, _ = read_answer(status, text, f"{stack.transport} {agent} probe deny")
    if allowed or code != "outside_purpose" or rpc in stack.upstream.received:
        raise BenchError(f"{stack.transport} {agent}: an unknown tool was not refused: {text}")


async def _report(ctx: AgentContext, task_id: str, allow: list[dict[str, Any]]) -> None:
    deadline = time.monotonic() + REPORT_PATIENCE_S
    while True:
        try:
            await ctx.report_task(task_id, SUITE_PURPOSE, ttl=TASK_TTL_S, allow=allow)
            return
        except AgentStateError as exc:
            if exc.status != "RESOURCE_EXHAUSTED" or time.monotonic() > deadline:
                raise BenchError(f"ReportTask {task_id}: {exc.status}: {exc}") from None
            await asyncio.sleep(0.2)


async def replay(
    stack: Stack,
    http: aiohttp.ClientSession,
    suite: Suite,
    config: Config,
    sessions: Sequence[Session],
) -> list[Outcome]:
    """Every session of ``suite`` under ``config``, call by call, in order."""
    agent = agent_name(suite.name, config.id)
    host = mcp_host(suite.name)
    port = stack.port(agent)
    await probe(stack, http, agent, host)
    users = {t.id: t for t in suite.user_tasks}
    outcomes: list[Outcome] = []
    expected: dict[str, tuple[bool, dict[str, str]]] = {}
    ctx = AgentContext(stack.sockets[agent]) if config.narrowing else None
    try:
        for s in sessions:
            reported = 0.0
            if ctx is not None:
                headers = {"x-mandate-task": s.key}
                decl = declaration(suite, users[s.user_task], prompt_only=config.prompt_only)
                await _report(ctx, s.key, decl)
                reported = time.monotonic()
                want = {"x-mandate-task": s.key, "x-mandate-purpose": SUITE_PURPOSE}
            else:
                purpose = purpose_name(s.user_task) if config.per_task else SUITE_PURPOSE
                headers = {"x-mandate-purpose": purpose}
                want = {"x-mandate-purpose": purpose}
            for step in s.steps:
                rpc = f"{agent}/{s.key}/{step.role}{step.index}"
                status, text = await post_mcp(http, port, host, step.call.body(rpc), headers)
                what = f"{stack.transport} {agent} {rpc}"
                allowed, code, reason = read_answer(status, text, what)
                if not allowed and code not in POLICY_CODES:
                    raise BenchError(f"{what}: refused {code} ({reason}), not by the policy")
                expected[rpc] = (allowed, want)
                outcomes.append(
                    Outcome(s.key, step.role, step.index, step.call.tool, allowed, code, reason)
                )
            if reported and time.monotonic() - reported > TASK_TTL_S / 2:
                raise BenchError(
                    f"{stack.transport} {agent} {s.key}: the session outlasted half its task's "
                    f"TTL ({TASK_TTL_S} s): its later calls may have run without the task"
                )
    finally:
        if ctx is not None:
            await ctx.close()
    for rpc, (allowed, want) in expected.items():
        got = stack.upstream.received.get(rpc)
        if allowed and got is None:
            raise BenchError(f"{stack.transport} {rpc}: allowed (200) but never arrived")
        if not allowed and got is not None:
            raise BenchError(f"{stack.transport} {rpc}: refused (403) but arrived upstream")
        if got is not None and any(got.get(k) != v for k, v in want.items()):
            raise BenchError(f"{stack.transport} {rpc}: arrived with {got}, expected {want}")
    return outcomes
