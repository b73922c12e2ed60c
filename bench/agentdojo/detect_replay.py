"""The detection benchmark through real Envoy and `mandate run` (the I/O of
`python -m bench agentdojo_detect`).

One stack per suite (`replay.running_stack`): the MCP upstream (answers every `tools/call`,
records what arrived), `mandate run` with behaviour analysis (`--access-log`; the profiles of
`detect.detect_profile`, one agent per test session) and Envoy with envoy/local(-http).yaml,
one egress listener per agent, its access log streamed to mandate. Each call is an MCP
`tools/call` JSON-RPC POST through the agent's listener, as in `python -m bench agentdojo`.

1. **Learning**: every agent replays its fold's training stream (`detect.training_stream`),
   all agents at once (at most ``CONCURRENCY`` calls in flight), within their learning
   period; every call must be allowed (the profile allows every tool of the suite).
2. **Quiet**: until the learning period is over and the training calls have left the
   window (1 minute), so that a session is scored on its own calls.
3. **Sessions**, in lockstep: call k of every session that has one, at once; then, once
   Envoy's gRPC access logger has written an entry for every call so far (its
   `logs_written` counter), ``SETTLE_S`` for its 0.1 s flush and the supervisor's 0.1 s
   scoring tick, the published scores are read (`GET /v1/status`, the admin API). An
   agent's next call is decided on that score, as an agent's next call seconds later would
   be (an LLM's pace).

A call's answer: 200 (allowed, and it must have arrived upstream) or mandate's 403 with the
`risk`, `novel_call` or `revoked` code (and it must not have arrived); anything else aborts
the run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.agentdojo.detect import (
    WINDOW_S,
    Fold,
    Trace,
    TraceStep,
    detect_profile,
    folds,
    held_out_sessions,
    session_agent,
    training_stream,
)
from bench.agentdojo.policy import Session, Suite, mcp_host
from bench.agentdojo.replay import post_mcp, read_answer, running_stack, write_profiles
from bench.lib import BenchError

__all__ = ["Plan", "plan", "replay_suite"]

CONCURRENCY = 48  # calls in flight while learning
SETTLE_S = 0.4  # after Envoy wrote the entries: its flush (0.1 s) and two scoring ticks
LOGGED = "access_logs.grpc_access_log.logs_written"
QUIET_MARGIN_S = 6.0  # past the window's edge bucket (a twelfth of the minute) and a tick
REFUSALS = frozenset({"risk", "novel_call", "revoked"})


@dataclass(frozen=True)
class Plan:
    """One test session of one (sensitive list, split): its agent and what it learns."""

    sensitive: str
    split: str
    fold: Fold
    session: Session
    agent: str


def plan(suite: Suite, sensitives: Sequence[str], splits: Sequence[str]) -> list[Plan]:
    out = []
    for sensitive in sensitives:
        for split in splits:
            n = 0
            for fold in folds(suite, split):
                for session in held_out_sessions(suite, fold):
                    agent = session_agent(suite.name, sensitive, split, n)
                    out.append(Plan(sensitive, split, fold, session, agent))
                    n += 1
    return out


def _log(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


async def _status(http: aiohttp.ClientSession, admin: int, token: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{admin}/v1/status"
    headers = {"Authorization": f"Bearer {token}"}
    async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as r:
        if r.status != 200:
            raise BenchError(f"GET /v1/status: HTTP {r.status}")
        doc: dict[str, Any] = await r.json()
        return doc


async def _logged(http: aiohttp.ClientSession, envoy_admin: int) -> int:
    url = f"http://127.0.0.1:{envoy_admin}/stats?usedonly&filter=^access_logs"
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        text = await r.text()
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name == LOGGED:
            return int(value)
    return 0


async def _risks_after(
    http: aiohttp.ClientSession, envoy_admin: int, admin: int, token: str, calls: int
) -> dict[str, dict[str, Any]]:
    """The published risks once Envoy logged ``calls`` calls and mandate scored them."""
    deadline = time.monotonic() + 30.0
    while (logged := await _logged(http, envoy_admin)) < calls:
        if time.monotonic() > deadline:
            raise BenchError(f"Envoy logged {logged} of {calls} calls within 30 s")
        await asyncio.sleep(0.02)
    await asyncio.sleep(SETTLE_S)
    risks = (await _status(http, admin, token))["behaviour"]["risks"]
    return {str(r["agent"]): r for r in risks}


async def replay_suite(
    suite: Suite,
    plans: Sequence[Plan],
    work: Path,
    transport: str,
    learning_s: float,
) -> dict[tuple[str, str], list[Trace]]:
    """Every planned session of ``suite`` through Envoy and mandate; the traces by
    (sensitive list, split)."""
    work.mkdir(parents=True, exist_ok=True)
    learning = f"{int(learning_s)}s"
    profiles = write_profiles(
        [detect_profile(suite, p.agent, learning, p.sensitive) for p in plans], work
    )
    host = mcp_host(suite.name)
    agents = [p.agent for p in plans]
    token_file = work / "admin.token"
    token = "agentdojo-detect-" + "x" * 32
    token_file.write_text(token + "\n")
    state = ["--admin-token-file", str(token_file), "--state-dir", str(work / "state")]
    async with (
        running_stack(
            transport, work, profiles, agents, (), mandate_args=state, access_log=True,
            timeout=120.0,
        ) as stack,
        aiohttp.ClientSession(auto_decompress=False) as http,
    ):  # fmt: skip
        mandate, envoy, upstream = stack.mandate, stack.envoy, stack.upstream
        ports = {a: envoy.listeners[f"egress-{a}"] for a in agents}
        gate = asyncio.Semaphore(CONCURRENCY)

        async def learn(p: Plan) -> float:
            for i, call in enumerate(training_stream(p.fold)):
                async with gate:
                    status, text = await post_mcp(
                        http, ports[p.agent], host, call.body(f"{p.agent}/learn/{i}"), {}
                    )
                if status != 200:
                    raise BenchError(f"{p.agent} learning call {i}: HTTP {status}: {text[:200]}")
            return time.time()

        started = time.time()
        ends = await asyncio.gather(*(learn(p) for p in plans))
        calls = sum(len(training_stream(p.fold)) for p in plans)
        took = max(ends) - started
        _log(f"{transport} {suite.name}: {len(plans)} agents learned {calls} calls in {took:.0f} s")
        if took > learning_s - 2.0:
            raise BenchError(
                f"learning took {took:.0f} s, more than the learning period ({learning_s:.0f} s) "
                "allows: pass a longer --learning"
            )
        quiet = max(started + learning_s + 1.0, max(ends) + WINDOW_S + QUIET_MARGIN_S)
        await asyncio.sleep(max(0.0, quiet - time.time()))

        traces_steps: dict[str, list[TraceStep]] = {p.agent: [] for p in plans}
        expected: dict[str, bool] = {}
        longest = max(len(p.session.steps) for p in plans)
        for k in range(longest):
            todo = [p for p in plans if k < len(p.session.steps)]

            async def one(p: Plan, k: int = k) -> tuple[bool, str]:
                step = p.session.steps[k]
                rpc = f"{p.agent}/test/{k}"
                async with gate:
                    body = step.call.body(rpc)
                    status, text = await post_mcp(http, ports[p.agent], host, body, {})
                allowed, code, reason = read_answer(status, text, f"{transport} {rpc}")
                if not allowed and code not in REFUSALS:
                    raise BenchError(f"{transport} {rpc}: refused {code} ({reason})")
                expected[rpc] = allowed
                return allowed, code

            answers = await asyncio.gather(*(one(p) for p in todo))
            calls += len(todo)
            risks = await _risks_after(http, envoy.admin_port, mandate.admin_port, token, calls)
            for p, (allowed, code) in zip(todo, answers, strict=True):
                r = risks.get(p.agent, {})
                step = p.session.steps[k]
                traces_steps[p.agent].append(
                    TraceStep(
                        step.role,
                        step.index,
                        step.call,
                        allowed,
                        code,
                        float(r.get("score", 0.0)),
                        str(r.get("explanation", "")),
                    )
                )
        for rpc, allowed in expected.items():
            arrived = rpc in upstream.received
            if allowed != arrived:
                raise BenchError(f"{transport} {rpc}: allowed={allowed} but arrived={arrived}")
    out: dict[tuple[str, str], list[Trace]] = {}
    for p in plans:
        trace = Trace(p.session, p.fold.index, tuple(traces_steps[p.agent]))
        out.setdefault((p.sensitive, p.split), []).append(trace)
    return out


def dump(traces: Mapping[tuple[str, str], Sequence[Trace]]) -> str:
    """The traces as JSON lines (for --save-traces)."""
    lines = []
    for (sensitive, split), ts in traces.items():
        for t in ts:
            lines.append(
                json.dumps(
                    {
                        "sensitive": sensitive,
                        "split": split,
                        "session": t.session.key,
                        "fold": t.fold,
                        "steps": [
                            [
                                s.role,
                                s.index,
                                s.call.tool,
                                s.allowed,
                                s.code,
                                s.score,
                                s.explanation,
                            ]
                            for s in t.steps
                        ],
                    }
                )
            )
    return "\n".join(lines) + "\n"
