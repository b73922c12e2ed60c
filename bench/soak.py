"""Soak: minutes of mixed traffic through real Envoy while revocations, profile reloads and
elevation grants change underneath; is memory flat, is every answer the intended one?

The stack, all on 127.0.0.1 (ports picked at run time): the demo upstream (a process of its
own), `mandate run --workers N --state-dir D --audit-dir D --access-log 127.0.0.1:0
--context-api billing-agent=127.0.0.1:0` (behaviour analysis on, the agent context API for
billing-agent), real Envoy (envoy/local.yaml, or local-http.yaml with --transport http,
--concurrency 1, one listener per agent, its gRPC access log streamed to mandate).

Profiles: a copy of the demo profiles without `rateLimit:` lines; billing-agent's behaviour
keeps `enforce` but its learning period outlasts the run (so behaviour never denies or
revokes it: a soak of auto-revocations would be a soak of denies); billing-agent also gets
  - an extra allow rule GET ledger /v1/statements/*, which version B of the profile denies
    (a deny rule); the controller flips A <-> B by atomic rename every --reload-every s;
  - an auto-approved elevation `soak-export` (GET ledger /v1/exports/*), requested through
    the context API every --elevate-every s for --grant-seconds.

Traffic: --clients threads (one keep-alive connection per agent listener each), back to back
(or --rate req/s in all), cycling over ten kinds of call for the two agents whose outcome
is known from the state: allowed calls, rule denies, unknown purposes, MCP tool calls allowed
and denied, the toggled path and the elevated path. Every --revoke-every s the controller
revokes an agent (alternately billing-agent and research-agent) or restores it through the
admin API (bearer token in STATE_DIR/admin.token) and keeps the answer's `visible_at`.

Each call records its send and receive time (time.time(), the clock of visible_at and of the
grant's expiry). The Check of a call happened between the two, so for each piece of state
(an agent's revocation, the profile version, the grant) a call whose [send, receive] does not
overlap a change's window has one expected outcome; one that does may have either. Windows:
revocation [request sent, visible_at]; reload [just before the rename, first /readyz showing
the new version]; grant [request sent, answer received] and its expires_at. Outcomes:
  allowed / denied as intended   the answer is one of the expected ones (a deny: mandate's
                                 403 with the expected code)
  stale allow                    200 where only denies were expected (must be 0), with its
                                 cause: revocation, reload, grant expiry, or none (rules)
  error                          anything else: 5xx, a connection error, a 403 that is not
                                 mandate's, a 200 that did not pass mandate, mandate's deny
                                 with an unexpected code (e.g. a stale deny); must be 0
Every 5 s: RSS of the supervisor, each worker, Envoy (and the upstream), CPU, calls so far,
/readyz. At the end: the sample table, totals, RSS growth from the first sample after the
warm-up to the last (must be < 10 % for the supervisor, each worker and Envoy), and the audit
trail verified (`mandate audit verify`). Writes bench/results/soak[-http].{json,md}, the
latest run (git keeps the others; -http with --transport http); exits 1 on FAIL.

Run: python -m bench soak [--minutes 10] [--workers 2] [--transport grpc|http]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import yaml

from bench.lib import PROFILES, RESULTS, BenchError
from bench.lib.load import RawClient
from bench.lib.proc import (
    CLK_TCK,
    cpu_seconds,
    machine_ticks,
    process_tree,
    rss_mb,
    sigterm_as_interrupt,
    stop_process,
    wait_for,
)
from bench.lib.report import envoy_version, machine_base, package_version
from bench.lib.stack import unlimited_profiles, upstream_main
from devstack.local import (
    ENVOY_DIR,
    EnvoyProcess,
    MandateProcess,
    render_envoy_config,
    start_envoy,
    start_mandate,
)

NAMESPACE = "agents"
BILLING, RESEARCH = "billing-agent", "research-agent"
AGENTS = (BILLING, RESEARCH)
TEMPLATES = {"grpc": "local.yaml", "http": "local-http.yaml"}
LEDGER = "ledger.finance.svc.cluster.local"
REPORTS = "reports.finance.svc.cluster.local"
ARXIV = "export.arxiv.org"
MCP = "mcp.tools.svc.cluster.local"
ELEVATION = "soak-export"
REASON = "bench: soak"
SAMPLE_S = 5.0
RSS_GOAL_PCT = 10.0
CTX = mp.get_context("spawn")
# What a start-up wait polls through while the stack comes up.
_TRANSIENT = (OSError, http.client.HTTPException, ValueError)

ALLOW = "allow"
# Outcomes that are no answer of mandate's (errors whatever was expected).
CONN_ERROR = "connection error"
NOT_MANDATE_403 = "403 not from mandate"
NOT_MANDATE_200 = "200 without mandate's decision header"


# ---------------------------------------------------------------- profiles


def write_profiles(work: Path, learning_s: int) -> tuple[Path, dict[str, str]]:
    """The profile directory (a copy of the demo's, no rate limits, billing-agent's learning
    period ``learning_s``) and the text of agents.yaml in versions A and B."""
    behaviour = {"mode": "enforce", "revokeAtRisk": 0.95, "learningPeriod": f"{learning_s}s"}
    directory = unlimited_profiles(PROFILES, work, behaviour={BILLING: behaviour})
    path = directory / "agents.yaml"
    texts = {}
    for version in ("A", "B"):
        docs = list(yaml.safe_load_all(path.read_text()))
        for doc in docs:
            if doc["metadata"]["name"] != BILLING:
                continue
            spec = doc["spec"]
            reconcile = spec["purposes"]["reconcile"]
            reconcile["allow"].append(
                {"hosts": [LEDGER], "methods": ["GET"], "paths": ["/v1/statements/*"]}
            )
            if version == "B":  # deny wins over allow: the same call flips to a deny
                reconcile["deny"].append({"paths": ["/v1/statements/**"]})
            spec["elevations"][ELEVATION] = {
                "description": "soak: export the ledger (auto-approved, short grants)",
                "approval": "auto",
                "maxDuration": "30s",
                "allow": [{"hosts": [LEDGER], "methods": ["GET"], "paths": ["/v1/exports/*"]}],
            }
        texts[version] = yaml.safe_dump_all(docs, sort_keys=False)
    path.write_text(texts["A"])
    return directory, texts


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------- the calls


@dataclass(frozen=True)
class State:
    revoked: bool
    version: str  # "A" | "B"
    granted: bool


@dataclass(frozen=True)
class Kind:
    name: str
    agent: str
    method: str
    host: str
    path: str
    expect: Callable[[State], str]  # ALLOW or mandate's deny code, when not revoked
    weight: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    note: str = ""

    def expected(self, state: State) -> str:
        return "revoked" if state.revoked else self.expect(state)

    def encoded(self) -> bytes:
        lines = [f"{self.method} http://{self.host}{self.path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        if self.body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(self.body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (self.body or b"")


def _rpc(method: str, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


TOOL_USE = (("x-mandate-purpose", "tool-use"),)
KINDS: tuple[Kind, ...] = (
    Kind("invoice", BILLING, "GET", LEDGER, "/v1/invoices/42", lambda s: ALLOW, 4,
         note="reconcile.allow[0]"),
    Kind("ledger_admin", BILLING, "GET", LEDGER, "/v1/ledger/admin/users",
         lambda s: "denied_by_rule", 1, note="reconcile.deny[0]"),
    Kind("statements", BILLING, "GET", LEDGER, "/v1/statements/7",
         lambda s: ALLOW if s.version == "A" else "denied_by_rule", 2,
         note="profile A allows it, B denies it (reloads)"),
    Kind("export", BILLING, "GET", LEDGER, "/v1/exports/2026-11",
         lambda s: ALLOW if s.granted else "outside_purpose", 2,
         note=f"allowed only under a grant of the auto elevation {ELEVATION}"),
    Kind("payroll", BILLING, "GET", LEDGER, "/v1/invoices/42", lambda s: "unknown_purpose", 1,
         headers=(("x-mandate-purpose", "payroll"),), note="purpose not in the profile"),
    Kind("report", BILLING, "POST", REPORTS, "/v1/reports/2026-11", lambda s: ALLOW, 1,
         headers=(("x-mandate-purpose", "report"),), body=b'{"month": "2026-11"}',
         note="declared purpose report"),
    Kind("arxiv", RESEARCH, "GET", ARXIV, "/api/query?search_query=all:agents",
         lambda s: ALLOW, 3, note="default purpose literature-search"),
    Kind("mcp_search", RESEARCH, "POST", MCP, "/mcp", lambda s: ALLOW, 2, headers=TOOL_USE,
         body=_rpc("tools/call", name="search_papers", arguments={"q": "agents"}),
         note="MCP tool in mcpTools"),
    Kind("mcp_delete", RESEARCH, "POST", MCP, "/mcp", lambda s: "outside_purpose", 1,
         headers=TOOL_USE, body=_rpc("tools/call", name="delete_corpus", arguments={}),
         note="MCP tool not in mcpTools"),
    Kind("unknown_purpose", RESEARCH, "GET", ARXIV, "/api/query?q=x",
         lambda s: "unknown_purpose", 1, headers=(("x-mandate-purpose", "mining"),),
         note="purpose not in the profile"),
)  # fmt: skip
BASE = State(revoked=False, version="A", granted=False)
TOGGLED = next(k for k in KINDS if k.name == "statements")
ELEVATED = next(k for k in KINDS if k.name == "export")


# ---------------------------------------------------------------- child process: upstream


def outcome_of(status: int, headers: dict[str, str], body: bytes) -> str:
    """ALLOW (a 200 that passed mandate: the upstream echoes mandate's decision header),
    mandate's deny code (a 403 with its JSON body and decision header), else an error."""
    if status == 200:
        return ALLOW if b"x-mandate-decision" in body else NOT_MANDATE_200
    if status == 403:
        if "x-mandate-decision" not in headers:
            return NOT_MANDATE_403
        try:
            code = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return NOT_MANDATE_403
        return str(code)
    return f"HTTP {status}"


class Outcomes:
    """Outcome strings <-> small ints (the records keep ints)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.names: list[str] = []
        self._index: dict[str, int] = {}

    def index(self, name: str) -> int:
        i = self._index.get(name)
        if i is None:
            with self._lock:
                i = self._index.get(name)
                if i is None:
                    i = self._index[name] = len(self.names)
                    self.names.append(name)
        return i


@dataclass
class ClientRecords:
    sent: array[float] = field(default_factory=lambda: array("d"))
    received: array[float] = field(default_factory=lambda: array("d"))
    kind: array[int] = field(default_factory=lambda: array("B"))
    outcome: array[int] = field(default_factory=lambda: array("H"))
    examples: list[dict[str, Any]] = field(default_factory=list)  # first errors, raw


def client_loop(
    index: int,
    ports: dict[str, int],
    sequence: Sequence[int],
    outcomes: Outcomes,
    stop: threading.Event,
    interval: float,
    rec: ClientRecords,
) -> None:
    """Send the calls of ``sequence`` (indexes into KINDS), cycling, until ``stop``; one
    keep-alive connection per agent listener; ``interval`` s between sends (0: back to
    back)."""
    clients = {agent: RawClient(port) for agent, port in ports.items()}
    requests = [k.encoded() for k in KINDS]
    n = index * 7919  # threads start at different points of the cycle
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            k = sequence[n % len(sequence)]
            n += 1
            client = clients[KINDS[k].agent]
            t0 = time.time()
            try:
                status, headers, body = client.send(requests[k])
                t1 = time.time()
                outcome = outcome_of(status, headers, body)
            except (OSError, ValueError, IndexError) as exc:
                t1 = time.time()
                status, headers, body = 0, {}, repr(exc).encode()
                outcome = CONN_ERROR
                client.close()
            if outcome in (CONN_ERROR, NOT_MANDATE_200, NOT_MANDATE_403) or outcome.startswith(
                "HTTP "
            ):
                if len(rec.examples) < 20:
                    rec.examples.append(
                        {
                            "sent": t0, "received": t1, "kind": KINDS[k].name,
                            "status": status, "outcome": outcome,
                            "body": body[:300].decode("utf-8", "replace"),
                            "flags": headers.get("x-envoy-response-flags", ""),
                        }
                    )  # fmt: skip
                if outcome == CONN_ERROR:
                    time.sleep(0.01)
            rec.sent.append(t0)
            rec.received.append(t1)
            rec.kind.append(k)
            rec.outcome.append(outcomes.index(outcome))
    finally:
        for c in clients.values():
            c.close()


def call_sequence(seed: int = 7) -> list[int]:
    """Every kind ``weight`` times, shuffled (the same order every run)."""
    seq = [i for i, k in enumerate(KINDS) for _ in range(k.weight)]
    random.Random(seed).shuffle(seq)
    return seq


# ---------------------------------------------------------------- state timelines


class Timeline:
    """One piece of state over time: changes, each with a window [start, end] in which the
    Check may see the old or the new value. Changes are added in time order."""

    def __init__(self, initial: Any) -> None:
        self.initial = initial
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.values: list[Any] = []

    def add(self, start: float, end: float, value: Any) -> None:
        if self.starts and (start < self.starts[-1] or end < self.ends[-1]):
            raise BenchError("timeline changes out of order")
        self.starts.append(start)
        self.ends.append(end)
        self.values.append(value)

    def value(self, i: int) -> Any:
        return self.initial if i < 0 else self.values[i]

    def possible(self, sent: float, received: float) -> set[Any]:
        """Values a Check between ``sent`` and ``received`` may have seen."""
        out = {self.value(bisect_right(self.starts, sent) - 1)}
        for j in range(bisect_left(self.ends, sent), bisect_right(self.starts, received)):
            out.add(self.value(j - 1))
            out.add(self.values[j])
        return out

    def last_change_before(self, t: float) -> tuple[int, float | None]:
        """(index, end of the window) of the latest change whose window ended by ``t``."""
        i = bisect_right(self.ends, t) - 1
        return i, (self.ends[i] if i >= 0 else None)


@dataclass
class Timelines:
    revoked: dict[str, Timeline] = field(
        default_factory=lambda: {a: Timeline(False) for a in AGENTS}
    )
    version: Timeline = field(default_factory=lambda: Timeline("A"))
    granted: Timeline = field(default_factory=lambda: Timeline(False))

    def possible(self, agent: str, sent: float, received: float) -> dict[str, set[Any]]:
        return {
            "revocation": self.revoked[agent].possible(sent, received),
            "reload": self.version.possible(sent, received),
            "grant": self.granted.possible(sent, received) if agent == BILLING else {False},
        }


def acceptable(kind: Kind, poss: dict[str, set[Any]]) -> set[str]:
    return {
        kind.expected(State(r, v, g))
        for r, v, g in product(poss["revocation"], poss["reload"], poss["grant"])
    }


def cause_of(kind: Kind, poss: dict[str, set[Any]], outcome: str) -> str:
    """Which change would explain ``outcome`` had its old value still been seen: the
    revocation, the reload or the grant (its expiry or start); "rules" if none."""
    alternatives = {"revocation": {True, False}, "reload": {"A", "B"}, "grant": {True, False}}
    for dim, values in alternatives.items():
        if outcome in acceptable(kind, {**poss, dim: values}):
            return dim
    return "rules"


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    upstream: BaseProcess
    upstream_port: int
    mandate: MandateProcess
    envoy: EnvoyProcess
    token: str
    profiles: Path
    texts: dict[str, str]
    audit_dir: Path
    context: str  # the context API's address for billing-agent
    versions: dict[str, str] = field(default_factory=dict)  # "A"/"B" -> snapshot version

    def port(self, agent: str) -> int:
        return self.envoy.listeners[f"egress-{agent}"]


class Admin:
    """mandate's admin API over one kept-alive connection (one per thread)."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self._conn.request(method, path, body=data, headers=headers)
                resp = self._conn.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


@contextlib.contextmanager
def running_stack(work: Path, args: argparse.Namespace, learning_s: int) -> Iterator[Stack]:
    """Upstream, mandate, Envoy; stopped on the way out, whatever happens."""
    with contextlib.ExitStack() as es:
        parent, child = CTX.Pipe(duplex=False)
        upstream = CTX.Process(target=upstream_main, args=(child,), daemon=True)
        upstream.start()
        es.callback(stop_process, upstream)
        if not parent.poll(20):
            raise BenchError("the demo upstream did not start within 20 s")
        upstream_port = int(parent.recv())
        profiles, texts = write_profiles(work, learning_s)
        state, audit = work / "state", work / "audit"
        mandate = start_mandate(
            profiles,
            work / "mandate",
            extra=[
                "--workers", str(args.workers), "--state-dir", str(state),
                "--namespace", NAMESPACE, "--transport", args.transport,
                "--audit-dir", str(audit), "--access-log", "127.0.0.1:0",
                "--context-api", f"{BILLING}=127.0.0.1:0", "--log-level", "WARNING",
            ],
            timeout=60,
        )  # fmt: skip
        es.callback(mandate.stop)
        token_file = state / "admin.token"
        wait_for(
            lambda: token_file.exists() and token_file.read_text().strip(),
            "token",
            10,
            tolerate=_TRANSIENT,
        )
        if not mandate.access_log_port or not mandate.context_ports:
            raise BenchError(f"mandate serves no access log or context API: {mandate}")
        config = render_envoy_config(
            ENVOY_DIR / TEMPLATES[args.transport],
            {
                "ADMIN_PORT": 0,
                "LISTEN_PORT": 0,
                "UPSTREAM_PORT": upstream_port,
                "ACCESS_LOG": "/dev/null",
            },
            agents=list(AGENTS),
            mandate_ports=mandate.grpc_ports,
            als_port=mandate.access_log_port,
        )
        envoy = start_envoy(config, work / "envoy")
        es.callback(envoy.stop)
        stack = Stack(
            upstream, upstream_port, mandate, envoy, token_file.read_text().strip(),
            profiles, texts, audit, f"127.0.0.1:{mandate.context_ports[0]}",
        )  # fmt: skip
        try:
            yield stack
        except BaseException:
            for log in (envoy.log_path, mandate.log_path):
                if log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-20:]
                    print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
            raise


def one_call(stack: Stack, kind: Kind) -> str:
    client = RawClient(stack.port(kind.agent))
    try:
        return outcome_of(*client.send(kind.encoded()))
    finally:
        client.close()


def readyz(stack: Stack) -> dict[str, Any]:
    return stack.mandate.ready()


def reload_to(stack: Stack, version: str, timeout: float = 10.0) -> tuple[float, float, str]:
    """Write profile ``version`` atomically and wait until /readyz shows a new snapshot:
    (just before the write, when /readyz first showed it, the snapshot version)."""
    before = readyz(stack)["profiles"]
    start = time.time()
    write_atomically(stack.profiles / "agents.yaml", stack.texts[version])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = readyz(stack)["profiles"]
        except (OSError, ValueError):
            now = before
        # `version` is the one every worker enforces (empty while they differ)
        if (
            now["reloads"] > before["reloads"]
            and now.get("converged")
            and now["version"] != before["version"]
        ):
            return start, time.time(), str(now["version"])
        if now.get("failures", 0) > before.get("failures", 0):
            raise BenchError(f"profile reload to {version} failed: {now.get('last_error')}")
        time.sleep(0.01)
    raise BenchError(f"profile version {version} not visible in /readyz within {timeout:g} s")


def verify(stack: Stack, admin: Admin, workers: int) -> None:
    """Abort unless every kind of call gets its expected outcome through Envoy (on every
    worker), a revocation turns each into mandate's `revoked` deny, and profile B flips the
    toggled path; learn the snapshot versions of A and B; leave the base state."""

    def all_expected(state: State, tries: int) -> list[str]:
        bad = []
        for kind in KINDS:
            for _ in range(tries):
                got = one_call(stack, kind)
                if got != kind.expected(state):
                    bad.append(f"{kind.name}: {got}, expected {kind.expected(state)}")
                    break
        return bad

    first = KINDS[0]
    wait_for(
        lambda: one_call(stack, first) == ALLOW,
        f"{first.name} through Envoy",
        30,
        0.1,
        tolerate=_TRANSIENT,
    )
    tries = 2 * workers
    if bad := all_expected(BASE, tries):
        raise BenchError("base state: " + "; ".join(bad))
    stack.versions["A"] = str(readyz(stack)["profiles"]["version"])
    for agent in AGENTS:
        status, body = admin.call("POST", "/v1/revocations", {"agent": agent, "reason": REASON})
        if status != 201:
            raise BenchError(f"POST /v1/revocations {agent}: {status} {body}")
    if bad := all_expected(State(True, "A", False), tries):
        raise BenchError("revoked: " + "; ".join(bad))
    for agent in AGENTS:
        status, body = admin.call("DELETE", f"/v1/revocations/{agent}")
        if status != 200:
            raise BenchError(f"DELETE /v1/revocations/{agent}: {status} {body}")
    _, _, stack.versions["B"] = reload_to(stack, "B")
    time.sleep(1.0)  # every worker's own reload (they watch the directory themselves)
    if bad := all_expected(State(False, "B", False), tries):
        raise BenchError("profile B: " + "; ".join(bad))
    _, _, version = reload_to(stack, "A")
    if version != stack.versions["A"]:
        raise BenchError(f"profile A again: version {version}, first {stack.versions['A']}")
    time.sleep(1.0)
    if bad := all_expected(BASE, tries):
        raise BenchError("back to base: " + "; ".join(bad))


# ---------------------------------------------------------------- controller


@dataclass
class Change:
    kind: str  # revoke | restore | reload | elevation
    target: str  # agent, profile version, or grant id
    start: float  # request sent / just before the write
    visible: float  # visible_at / first seen in /readyz / answer received
    answered: float
    detail: dict[str, Any] = field(default_factory=dict)


class Controller(threading.Thread):
    """Revokes/restores, reloads and requests elevations on schedule; keeps the timelines."""

    def __init__(self, stack: Stack, args: argparse.Namespace, timelines: Timelines) -> None:
        super().__init__(name="controller", daemon=True)
        self.stack, self.args, self.timelines = stack, args, timelines
        self.stop = threading.Event()
        self.changes: list[Change] = []
        self.errors: list[str] = []
        self.version = "A"
        self.revoked: str | None = None
        self.flips = 0
        self._admin = Admin(stack.mandate.admin_port, stack.token)
        self._loop = asyncio.new_event_loop()
        self._ctx: Any = None

    def run(self) -> None:
        from sidecar.agentapi.client import AgentContext

        self._ctx = AgentContext(self.stack.context)
        a = self.args
        t0 = time.monotonic()
        due = {
            "revocation": t0 + min(1.0, a.revoke_every),
            "reload": t0 + min(2.0, a.reload_every),
            "elevation": t0 + min(0.5, a.elevate_every),
        }
        every = {"revocation": a.revoke_every, "reload": a.reload_every,
                 "elevation": a.elevate_every}  # fmt: skip
        actions = {"revocation": self._flip, "reload": self._reload, "elevation": self._elevate}
        try:
            while not self.stop.is_set():
                name = min(due, key=lambda k: due[k])
                if self.stop.wait(max(0.0, due[name] - time.monotonic())):
                    break
                try:
                    actions[name]()
                except (BenchError, OSError, ValueError, http.client.HTTPException) as exc:
                    self.errors.append(f"{time.time():.3f} {name}: {exc}")
                except Exception as exc:  # e.g. AgentStateError; keep the soak going, count it
                    self.errors.append(f"{time.time():.3f} {name}: {type(exc).__name__}: {exc}")
                due[name] += every[name]
            with contextlib.suppress(Exception):  # leave no revocation behind
                if self.revoked is not None:
                    self._flip()
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._ctx.close())
            self._loop.close()
            self._admin.close()

    def _flip(self) -> None:
        if self.revoked is None:
            agent = AGENTS[self.flips % 2]
            self.flips += 1
            start = time.time()
            status, body = self._admin.call(
                "POST", "/v1/revocations", {"agent": agent, "reason": REASON}
            )
            answered = time.time()
            if status != 201:
                raise BenchError(f"POST /v1/revocations {agent}: {status} {body}")
            self.revoked = agent
            kind, value = "revoke", True
        else:
            agent = self.revoked
            start = time.time()
            status, body = self._admin.call("DELETE", f"/v1/revocations/{agent}")
            answered = time.time()
            if status != 200:
                raise BenchError(f"DELETE /v1/revocations/{agent}: {status} {body}")
            self.revoked = None
            kind, value = "restore", False
        visible = float(body["visible_at"])
        self.timelines.revoked[agent].add(start, visible, value)
        self.changes.append(Change(kind, agent, start, visible, answered))

    def _reload(self) -> None:
        new = "B" if self.version == "A" else "A"
        start, visible, snapshot = reload_to(self.stack, new)
        self.version = new
        self.timelines.version.add(start, visible, new)
        if snapshot != self.stack.versions[new]:
            raise BenchError(
                f"profile {new}: version {snapshot}, expected {self.stack.versions[new]}"
            )
        self.changes.append(Change("reload", new, start, visible, visible, {"version": snapshot}))

    def _elevate(self) -> None:
        seconds = self.args.grant_seconds
        start = time.time()
        req = self._loop.run_until_complete(
            self._ctx.request_elevation(ELEVATION, "bench: soak", seconds)
        )
        answered = time.time()
        if req.state != "granted" or req.expires_at is None:
            raise BenchError(f"elevation {req.id}: {req.state} {req.message}")
        expires = float(req.expires_at)
        self.timelines.granted.add(start, answered, True)
        self.timelines.granted.add(expires, expires, False)
        self.changes.append(
            Change("elevation", req.grant_id, start, answered, answered, {"expires_at": expires})
        )


# ---------------------------------------------------------------- sampler


def worker_pids(mandate: MandateProcess) -> list[int]:
    """The Check workers' pids in worker order (by the port in their command line)."""
    found: dict[int, int] = {}
    for pid in process_tree(mandate.proc.pid):
        if pid == mandate.proc.pid:
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"worker" in argv and b"--listen" in argv:
                port = int(argv[argv.index(b"--listen") + 1].rsplit(b":", 1)[1])
                if port in mandate.grpc_ports:
                    found[mandate.grpc_ports.index(port)] = pid
    return [found[i] for i in sorted(found)]


class Sampler(threading.Thread):
    """Every SAMPLE_S s: RSS and CPU of each process, machine busy, calls so far, /readyz."""

    def __init__(self, stack: Stack, records: list[ClientRecords], start: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.stack, self.records, self.t0 = stack, records, start
        self.stop = threading.Event()
        self.samples: list[dict[str, Any]] = []
        self.problem: str | None = None  # a process died or a worker was replaced
        self.dead = False
        self.workers = worker_pids(stack.mandate)
        self.pids = {
            "supervisor": stack.mandate.proc.pid,
            **{f"worker{i}": pid for i, pid in enumerate(self.workers)},
            "envoy": stack.envoy.proc.pid,
            "upstream": stack.upstream.pid or 0,
            "soak": os.getpid(),
        }
        self._last: tuple[float, dict[str, float], tuple[int, int]] | None = None

    def sample(self) -> dict[str, Any]:
        now = time.time()
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        ticks = machine_ticks()
        rss: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            try:
                rss[name] = rss_mb(pid)
            except OSError:
                rss[name] = None
        row: dict[str, Any] = {
            "t": now - self.t0,
            "time": now,
            "rss_mb": rss,
            "calls": sum(len(r.received) for r in self.records),
        }
        if self._last is not None:
            t_prev, cpu_prev, ticks_prev = self._last
            wall = now - t_prev
            row["cpu_pct"] = {k: 100 * (cpu[k] - cpu_prev[k]) / wall for k in cpu}
            row["machine_busy_pct"] = (
                100 * (ticks[0] - ticks_prev[0]) / max(1, ticks[1] - ticks_prev[1])
            )
            # CPUs used meanwhile by processes that are not the soak's (others' noise)
            busy_s = (ticks[0] - ticks_prev[0]) / CLK_TCK
            ours = sum(cpu[k] - cpu_prev[k] for k in cpu)
            row["other_cpus"] = (busy_s - ours) / wall
        self._last = (now, cpu, ticks)
        try:
            ready = readyz(self.stack)
            row["ready"] = ready.get("ready")
            row["profiles_version"] = ready["profiles"]["version"]
            row["reload_failures"] = ready["profiles"]["failures"]
            row["worker_restarts"] = sum(w["restarts"] for w in ready["workers"])
            row["workers_ready"] = all(w["ready"] for w in ready["workers"])
            row["revocation_entries"] = ready["revocations"]["entries"]
        except (OSError, ValueError, KeyError) as exc:
            row["ready_error"] = repr(exc)
        return row

    def run(self) -> None:
        next_at = time.monotonic()
        while True:
            row = self.sample()
            self.samples.append(row)
            dead = [
                name
                for name, proc in (
                    ("Envoy", self.stack.envoy.proc),
                    ("mandate", self.stack.mandate.proc),
                )
                if proc.poll() is not None
            ]
            if dead:
                self.problem = f"{', '.join(dead)} exited during the soak"
                self.dead = True
                return
            if self.problem is None and worker_pids(self.stack.mandate) != self.workers:
                self.problem = (
                    f"mandate's worker pids changed: {self.workers} -> "
                    f"{worker_pids(self.stack.mandate)}"
                )
            next_at += SAMPLE_S
            if self.stop.wait(max(0.0, next_at - time.monotonic())):
                last = self.sample()  # traffic just stopped: RSS only
                last.pop("cpu_pct", None)
                last.pop("machine_busy_pct", None)
                last.pop("other_cpus", None)
                last["final"] = True
                self.samples.append(last)
                return


# ---------------------------------------------------------------- analysis


def analyse(
    records: list[ClientRecords],
    outcomes: Outcomes,
    timelines: Timelines,
    samples: list[dict[str, Any]],
) -> dict[str, Any]:
    """Classify every call against the timelines; bin by receive time into the samples."""
    edges = [s["time"] for s in samples]
    nbins = len(edges) + 1
    per_bin: list[Counter[str]] = [Counter() for _ in range(nbins)]
    totals: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {k.name: Counter() for k in KINDS}
    errors_by_outcome: Counter[str] = Counter()
    stale_by_cause: Counter[str] = Counter()
    unexpected_deny_by_cause: Counter[str] = Counter()
    stale_examples: list[dict[str, Any]] = []
    deny_examples: list[dict[str, Any]] = []
    latency: list[float] = []
    names = outcomes.names
    cache: dict[tuple[int, frozenset[Any], frozenset[Any], frozenset[Any]], set[str]] = {}
    for rec in records:
        for sent, received, k, o in zip(rec.sent, rec.received, rec.kind, rec.outcome, strict=True):
            kind, got = KINDS[k], names[o]
            b = bisect_right(edges, received)
            latency.append(received - sent)
            poss = timelines.possible(kind.agent, sent, received)
            key = (k, frozenset(poss["revocation"]), frozenset(poss["reload"]),
                   frozenset(poss["grant"]))  # fmt: skip
            ok = cache.get(key)
            if ok is None:
                ok = cache[key] = acceptable(kind, poss)
            if poss["revocation"] == {True}:
                totals["checked_while_revoked"] += 1
            elif poss["revocation"] == {False}:
                if kind is TOGGLED and len(poss["reload"]) == 1:
                    totals["toggled_path_checked"] += 1
                elif kind is ELEVATED and len(poss["grant"]) == 1:
                    totals["elevated_path_checked"] += 1
            if got in ok:
                label = "allowed" if got == ALLOW else "denied_as_intended"
                if len(ok) > 1:
                    totals["in_transition"] += 1
            elif got == ALLOW:
                label = "stale_allow"
                cause = cause_of(kind, poss, got)
                stale_by_cause[cause] += 1
                if len(stale_examples) < 20:
                    stale_examples.append(example(kind, sent, received, got, ok, cause, timelines))
            elif got in (CONN_ERROR, NOT_MANDATE_200, NOT_MANDATE_403) or got.startswith("HTTP "):
                label = "error"
                errors_by_outcome[got] += 1
            else:  # mandate's deny, not one that was expected
                label = "error"
                cause = cause_of(kind, poss, got)
                errors_by_outcome[f"unexpected deny {got}"] += 1
                unexpected_deny_by_cause[cause] += 1
                if len(deny_examples) < 20:
                    deny_examples.append(example(kind, sent, received, got, ok, cause, timelines))
            totals[label] += 1
            totals["calls"] += 1
            per_bin[b][label] += 1
            per_bin[b]["calls"] += 1
            by_kind[kind.name][label] += 1
    latency.sort()

    def pct(q: float) -> float | None:
        return latency[max(0, math.ceil(q / 100 * len(latency)) - 1)] * 1e3 if latency else None

    return {
        "totals": dict(totals),
        "per_bin": [dict(c) for c in per_bin],
        "by_kind": {k: dict(v) for k, v in by_kind.items()},
        "errors_by_outcome": dict(errors_by_outcome),
        "stale_allows_by_cause": dict(stale_by_cause),
        "unexpected_denies_by_cause": dict(unexpected_deny_by_cause),
        "stale_allow_examples": stale_examples,
        "unexpected_deny_examples": deny_examples,
        "latency_ms": {"p50": pct(50), "p99": pct(99), "p999": pct(99.9), "max": pct(100)},
    }


def example(
    kind: Kind,
    sent: float,
    received: float,
    got: str,
    ok: set[str],
    cause: str,
    timelines: Timelines,
) -> dict[str, Any]:
    """A misclassified call, with where it stands against the change that explains it."""
    timeline = {
        "revocation": timelines.revoked[kind.agent],
        "reload": timelines.version,
        "grant": timelines.granted,
    }.get(cause)
    out: dict[str, Any] = {
        "kind": kind.name, "sent": sent, "received": received, "got": got,
        "expected": sorted(ok), "cause": cause,
    }  # fmt: skip
    if timeline is not None:
        i, end = timeline.last_change_before(sent)
        if i >= 0 and end is not None:
            out["change"] = {
                "value": timeline.values[i],
                "window_start": timeline.starts[i],
                "visible": end,
                "sent_after_visible_ms": (sent - end) * 1e3,
                "received_after_visible_ms": (received - end) * 1e3,
            }
    return out


def rss_growth(samples: list[dict[str, Any]], warmup: float) -> dict[str, dict[str, Any]]:
    """Per process: the first sample at or after the warm-up vs the last one, and the
    least-squares slope over those samples (MB per minute)."""
    after = [s for s in samples if s["t"] >= warmup]
    out: dict[str, dict[str, Any]] = {}
    if len(after) < 2:
        return out
    for name in after[0]["rss_mb"]:
        pts = [(s["t"], s["rss_mb"][name]) for s in after if s["rss_mb"].get(name) is not None]
        if len(pts) < 2:
            continue
        first, last = pts[0][1], pts[-1][1]
        n = len(pts)
        mt = sum(t for t, _ in pts) / n
        mv = sum(v for _, v in pts) / n
        den = sum((t - mt) ** 2 for t, _ in pts)
        slope = sum((t - mt) * (v - mv) for t, v in pts) / den * 60 if den else 0.0
        out[name] = {
            "first_mb": first,
            "last_mb": last,
            "max_mb": max(v for _, v in pts),
            "growth_mb": last - first,
            "growth_pct": 100 * (last - first) / first if first else None,
            "slope_mb_per_min": slope,
            "from_t": pts[0][0],
            "to_t": pts[-1][0],
        }
    return out


def dist(values: Sequence[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "max": None}
    return {"n": len(ordered), "p50": ordered[(len(ordered) - 1) // 2], "max": ordered[-1]}


def change_stats(changes: list[Change]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("revoke", "restore", "reload", "elevation"):
        cs = [c for c in changes if c.kind == kind]
        out[kind] = {
            "count": len(cs),
            "visible_after_start_ms": dist([(c.visible - c.start) * 1e3 for c in cs]),
            "answered_after_start_ms": dist([(c.answered - c.start) * 1e3 for c in cs]),
        }
    return out


# ---------------------------------------------------------------- end of run


def envoy_stats(envoy: EnvoyProcess) -> dict[str, int]:
    pattern = (
        r"^(http\.egress\.(ext_authz\.|downstream_rq_[2-5]xx|downstream_cx_destroy_remote)|"
        r"cluster\.(mandate|mandate_als|upstream)\.(upstream_rq_(5xx|timeout|retry)|"
        r"upstream_cx_connect_fail|upstream_rq_pending_overflow)|access_logs\.)"
    )
    url = f"http://127.0.0.1:{envoy.admin_port}/stats?filter={pattern}"
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        import urllib.request

        with urllib.request.urlopen(url, timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                name, _, value = line.partition(": ")
                if value.strip().isdigit():
                    out[name] = out.get(name, 0) + int(value)
    return out


_WORKER_FILE = re.compile(r"-w(\d+)-\d+\.jsonl$")


def worker_reload_lag(directory: Path, reloads: Sequence[Change]) -> dict[str, Any]:
    """Per worker, from its audit chain: each reload against /readyz, seen in the worker's
    decisions on the toggled path (allowed under A, denied_by_rule under B; revoked denies
    ignored). The time of a decision is its id's (48 bits of Unix ms, truncated, taken
    before the worker reads its snapshot): a decision under the previous profile whose id
    time is at or after the reload's /readyz time was certainly made after /readyz showed
    the new version. Per worker: in how many reloads that happened and by how much (max);
    and the first decision under the new profile seen vs /readyz (an upper bound of the
    worker's switch: it depends on when the next such call came)."""
    decided: dict[str, list[tuple[float, str]]] = {}
    for f in sorted(directory.glob("*.jsonl")):
        m = _WORKER_FILE.search(f.name)
        if m is None:
            continue
        rows = decided.setdefault(f"worker{m.group(1)}", [])
        with f.open() as fh:
            for line in fh:
                if TOGGLED.path not in line:
                    continue
                r = json.loads(line)
                if r.get("type") == "decision" and r.get("code") in ("allowed", "denied_by_rule"):
                    rows.append(((int(r["decision_id"], 16) >> 80) / 1e3, r["code"]))
    out: dict[str, Any] = {}
    for worker, rows in sorted(decided.items()):
        rows.sort()
        times = [t for t, _ in rows]
        late: list[float] = []
        switch: list[float] = []
        for i, c in enumerate(reloads):
            nxt = reloads[i + 1].start if i + 1 < len(reloads) else math.inf
            new = "allowed" if c.target == "A" else "denied_by_rule"
            inside = rows[bisect_left(times, c.start) : bisect_left(times, nxt)]
            stale = [t for t, code in inside if code != new and t >= c.visible]
            if stale:
                late.append((max(stale) - c.visible) * 1e3)
            first_new = next((t for t, code in inside if code == new), None)
            if first_new is not None:
                switch.append((first_new - c.visible) * 1e3)
        out[worker] = {
            "reloads": len(reloads),
            "old_profile_after_readyz": len(late),
            "old_profile_after_readyz_max_ms": max(late) if late else None,
            "first_new_vs_readyz_ms": dist(switch),
        }
    return out


def audit_verify(directory: Path) -> dict[str, Any]:
    """`mandate audit verify DIR --json` (mandate stopped: chains closed)."""
    cmd = [sys.executable, "-m", "sidecar", "audit", "verify", str(directory), "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "mandate audit verify: no answer within 600 s"}
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()[:500]}"}
    chains = result.get("chains", [])
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return {
        "ok": bool(result.get("ok")) and proc.returncode == 0,
        "exit": proc.returncode,
        "chains": len(chains),
        "records": sum(c.get("records", 0) for c in chains),
        "lost": sum(c.get("lost", 0) or 0 for c in chains),
        "problem": result.get("problem"),
        "bytes": size,
    }


# ---------------------------------------------------------------- report


def fmt(value: Any, spec: str = "{:.1f}") -> str:
    return "-" if value is None else spec.format(value)


def markdown(doc: dict[str, Any]) -> str:
    info, res, tot = doc["machine"], doc["result"], doc["result"]["totals"]
    crit, growth = doc["criteria"], doc["rss_growth"]
    procs = [p for p in doc["samples"][0]["rss_mb"] if p != "soak"]
    lines = [
        f"# Soak: {doc['settings']['minutes']:g} min, {doc['settings']['transport']}, "
        f"{doc['settings']['workers']} workers: **{'PASS' if doc['pass'] else 'FAIL'}**",
        "",
        "Written by `python -m bench soak`; see bench/README.md. Command: "
        f"`{doc['settings']['command']}`.",
        "",
        "| criterion | value | goal | |",
        "|---|---|---|---|",
    ]
    for c in crit:
        lines.append(
            f"| {c['name']} | {c['value']} | {c['goal']} | {'ok' if c['ok'] else 'FAIL'} |"
        )
    ch = doc["changes"]
    lines += [
        "",
        "| calls | allowed | denied as intended | in a transition window | errors | stale "
        "allows | req/s | revocations (revoke + restore) | reloads | elevation grants |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {tot.get('calls', 0):,} | {tot.get('allowed', 0):,} "
        f"| {tot.get('denied_as_intended', 0):,} | {tot.get('in_transition', 0):,} "
        f"| {tot.get('error', 0):,} | {tot.get('stale_allow', 0):,} | {doc['rps']:,.0f} "
        f"| {ch['revoke']['count']} + {ch['restore']['count']} | {ch['reload']['count']} "
        f"| {ch['elevation']['count']} |",
        "",
        "Calls with one right answer only (no change's window overlapped), checked: "
        f"{tot.get('checked_while_revoked', 0):,} to a revoked agent, "
        f"{tot.get('toggled_path_checked', 0):,} on the reloaded path (agent not revoked), "
        f"{tot.get('elevated_path_checked', 0):,} on the elevated path (agent not revoked; "
        "under a grant or not).",
        "",
        f"RSS growth, first sample at or after the {doc['settings']['warmup_s']:g} s warm-up vs "
        "the last (slope: least squares over those samples):",
        "",
        "| process | first MB | last MB | max MB | growth MB | growth % | slope MB/min |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in growth.items():
        if name == "soak":
            continue
        lines.append(
            f"| {name} | {g['first_mb']:.1f} | {g['last_mb']:.1f} | {g['max_mb']:.1f} "
            f"| {g['growth_mb']:+.2f} | {fmt(g['growth_pct'], '{:+.2f}')} "
            f"| {g['slope_mb_per_min']:+.3f} |"
        )
    head = " | ".join(f"{p} MB" for p in procs)
    lines += [
        "",
        f"| t s | {head} | req/s | errors | stale allows | mandate CPU % | Envoy CPU % "
        "| machine busy % | others' CPUs |",
        "|" + "---|" * (len(procs) + 8),
    ]
    prev_t = 0.0
    bins = res["per_bin"]
    for i, s in enumerate(doc["samples"]):
        b = bins[i] if i < len(bins) else {}
        wall = s["t"] - prev_t
        rps = (b.get("calls", 0) / wall) if i and wall > 0 else None
        prev_t = s["t"]
        cpu = s.get("cpu_pct") or {}
        mandate_cpu = sum(v for k, v in cpu.items() if k == "supervisor" or k.startswith("worker"))
        rss = " | ".join(fmt(s["rss_mb"].get(p)) for p in procs)
        lines.append(
            f"| {s['t']:.0f}{' (end)' if s.get('final') else ''} | {rss} "
            f"| {fmt(rps, '{:,.0f}')} | {b.get('error', 0)} | {b.get('stale_allow', 0)} "
            f"| {fmt(mandate_cpu if cpu else None, '{:.0f}')} "
            f"| {fmt(cpu.get('envoy'), '{:.0f}')} | {fmt(s.get('machine_busy_pct'), '{:.0f}')} "
            f"| {fmt(s.get('other_cpus'), '{:.2f}')} |"
        )
    lat = res["latency_ms"]
    rv, rl, el = ch["revoke"], ch["reload"], ch["elevation"]
    audit, es = doc["audit"], doc["envoy_stats"]
    lines += [
        "",
        "Errors by outcome: "
        + (", ".join(f"{k} {v}" for k, v in res["errors_by_outcome"].items()) or "none")
        + "; stale allows by cause: "
        + (", ".join(f"{k} {v}" for k, v in res["stale_allows_by_cause"].items()) or "none")
        + "; controller errors: "
        + str(len(doc["controller_errors"]))
        + ". Call latency through Envoy (client side) p50 / p99 / p99.9 / max: "
        f"{fmt(lat['p50'], '{:.2f}')} / {fmt(lat['p99'], '{:.2f}')} / "
        f"{fmt(lat['p999'], '{:.2f}')} / {fmt(lat['max'], '{:.2f}')} ms.",
        "Revocation write → visible_at p50 / max: "
        f"{fmt(rv['visible_after_start_ms']['p50'], '{:.2f}')} / "
        f"{fmt(rv['visible_after_start_ms']['max'], '{:.2f}')} ms; profile write → new version "
        f"in /readyz p50 / max: {fmt(rl['visible_after_start_ms']['p50'], '{:.0f}')} / "
        f"{fmt(rl['visible_after_start_ms']['max'], '{:.0f}')} ms; elevation request round trip "
        f"p50 / max: {fmt(el['answered_after_start_ms']['p50'], '{:.2f}')} / "
        f"{fmt(el['answered_after_start_ms']['max'], '{:.2f}')} ms.",
        "Envoy (both listeners): ext_authz ok / denied / error / failure_mode_allowed "
        + " / ".join(
            f"{es.get('http.egress.ext_authz.' + k, 0):,}"
            for k in ("ok", "denied", "error", "failure_mode_allowed")
        )
        + f", 5xx {es.get('http.egress.downstream_rq_5xx', 0):,}, access log entries to "
        "mandate flushed / dropped "
        f"{es.get('access_logs.grpc_access_log.grpc_entries_flushed', 0):,} / "
        f"{es.get('access_logs.grpc_access_log.logs_dropped', 0):,}.",
        "Audit trail after the run (`mandate audit verify`): "
        f"{'ok' if audit.get('ok') else 'NOT ok'}, {audit.get('chains', 0)} chains, "
        f"{audit.get('records', 0):,} decision records for "
        f"{doc['calls_started']:,} calls sent, {audit.get('lost', 0)} lost, "
        f"{(audit.get('bytes') or 0) / 1e6:,.0f} MB.",
        "Profile reloads as each worker's decisions on the toggled path show them (audit "
        "trail; decision ids' ms clock): "
        + "; ".join(
            f"{w}: under the previous profile after /readyz showed the new one in "
            f"{v['old_profile_after_readyz']} of {v['reloads']} reloads (max "
            f"{fmt(v['old_profile_after_readyz_max_ms'], '{:.0f}')} ms after)"
            for w, v in doc["worker_reload_lag"].items()
        )
        + ".",
        "Behaviour analysis at the end: "
        + ("on" if doc["behaviour"].get("analysing") else "NOT on")
        + "; "
        + (
            "; ".join(
                f"{r.get('agent')}: score {fmt(r.get('score'), '{:.2f}')}, "
                f"{'learning' if r.get('learning') else 'scored'} ({r.get('explanation')})"
                for r in doc["behaviour"].get("risks") or []
            )
            or "no risk state"
        )
        + f"; revocations left {doc['behaviour'].get('revocation_entries_left')}.",
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; Python "
        f"{info['python']}, grpcio {info['grpcio']}, Envoy {info['envoy']} (--concurrency 1); "
        f"pinning: {info['pinning']}; git {info['git_commit']}; {info['date']}; load average "
        f"before: {info['loadavg_before']}; other processes used "
        f"{fmt(doc['other_cpus']['mean'], '{:.2f}')} CPUs on average (max "
        f"{fmt(doc['other_cpus']['max'], '{:.2f}')}) meanwhile. Clients: "
        f"{doc['settings']['clients']} threads, "
        + (f"{doc['settings']['rate']:g} req/s in all" if doc["settings"]["rate"] else
           "back to back")
        + f"; revoke/restore every {doc['settings']['revoke_every']:g} s, reload every "
        f"{doc['settings']['reload_every']:g} s, a {doc['settings']['grant_seconds']:g} s grant "
        f"every {doc['settings']['elevate_every']:g} s.",
    ]  # fmt: skip
    for title, key in (
        ("Stale allows (first 20)", "stale_allow_examples"),
        ("Unexpected denies (first 20)", "unexpected_deny_examples"),
    ):
        if res[key]:
            lines += ["", f"{title}:", "", "```", *map(json.dumps, res[key]), "```"]
    if doc["error_examples"]:
        lines += ["", "Errors (first per client):", "", "```"]
        lines += [json.dumps(e) for e in doc["error_examples"][:20]] + ["```"]
    if doc["controller_errors"]:
        lines += ["", "Controller errors:", "", "```", *doc["controller_errors"][:20], "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def work_directory(keep: bool) -> Iterator[str]:
    """A temporary directory for the stack (profiles, state, audit trail, logs); with
    ``keep``, left in place for inspection."""
    if not keep:
        with tempfile.TemporaryDirectory(prefix="mandate-soak-") as tmp:
            yield tmp
        return
    tmp = tempfile.mkdtemp(prefix="mandate-soak-")
    print(f"   work directory (kept): {tmp}", flush=True)
    yield tmp


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--minutes", type=float, default=10.0, help="length of the traffic phase")
    p.add_argument("--workers", type=int, default=2, help="mandate's Check worker processes")
    p.add_argument("--transport", choices=["grpc", "http"], default="grpc")
    p.add_argument("--clients", type=int, default=4, help="client threads (concurrency)")
    p.add_argument("--rate", type=float, default=0.0, help="req/s in all (0: back to back)")
    p.add_argument("--revoke-every", type=float, default=3.0, help="s between revoke/restore")
    p.add_argument("--reload-every", type=float, default=5.0, help="s between profile flips")
    p.add_argument("--elevate-every", type=float, default=7.0, help="s between elevations")
    p.add_argument("--grant-seconds", type=float, default=2.0, help="each grant's length")
    p.add_argument(
        "--warmup", type=float, default=None,
        help="s before the RSS baseline sample (default 60, at most a quarter of the run)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument(
        "--keep", action="store_true", help="keep the work directory (audit trail, logs)"
    )
    args = p.parse_args(argv)
    if not 0.2 <= args.minutes <= 24 * 60:
        p.error("--minutes: 0.2..1440")
    if not 1 <= args.workers <= 16 or not 1 <= args.clients <= 64:
        p.error("--workers: 1..16; --clients: 1..64")
    if args.rate < 0:
        p.error("--rate: >= 0")
    for name in ("revoke_every", "reload_every", "elevate_every"):
        if not 0.5 <= getattr(args, name) <= 600:
            p.error(f"--{name.replace('_', '-')}: 0.5..600 s")
    if not 0.5 <= args.grant_seconds <= 30 or args.elevate_every < args.grant_seconds + 1:
        p.error("--grant-seconds: 0.5..30, and --elevate-every at least 1 s longer")
    if args.warmup is None:
        args.warmup = min(60.0, args.minutes * 60 / 4)
    if not 0 <= args.warmup < args.minutes * 60:
        p.error("--warmup: 0 .. the run's length")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    duration = args.minutes * 60
    learning_s = int(duration) + 600  # billing-agent's behaviour stays learning throughout
    info = {
        **machine_base(),
        "grpcio": package_version("grpcio"),
        "aiohttp": package_version("aiohttp"),
        "envoy": envoy_version(),
    }
    settings = {
        "command": "python -m bench soak " + " ".join(sys.argv[1:] if argv is None else argv),
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "warmup_s": args.warmup,
        "learning_period_s": learning_s,
        "sample_s": SAMPLE_S,
        "kinds": [
            {
                "name": k.name,
                "agent": k.agent,
                "call": f"{k.method} http://{k.host}{k.path}",
                "headers": dict(k.headers),
                "weight": k.weight,
                "note": k.note,
                "expected": {v: k.expected(State(False, v, False)) for v in ("A", "B")},
                "expected_granted": k.expected(State(False, "A", True)),
            }
            for k in KINDS
        ],
    }
    timelines = Timelines()
    outcomes = Outcomes()
    records = [ClientRecords() for _ in range(args.clients)]
    try:
        with (
            sigterm_as_interrupt(),
            work_directory(args.keep) as tmp,
            running_stack(Path(tmp), args, learning_s) as stack,
        ):
            admin = Admin(stack.mandate.admin_port, stack.token)
            verify(stack, admin, args.workers)
            print(
                f"   stack up: Envoy {stack.envoy.listeners}, mandate {args.transport} "
                f"{stack.mandate.grpc_ports}, admin :{stack.mandate.admin_port}; profiles "
                f"A={stack.versions['A']} B={stack.versions['B']}",
                flush=True,
            )
            stop = threading.Event()
            ports = {a: stack.port(a) for a in AGENTS}
            interval = args.clients / args.rate if args.rate else 0.0
            seq = call_sequence()
            clients = [
                threading.Thread(
                    target=client_loop,
                    args=(i, ports, seq, outcomes, stop, interval, records[i]),
                    name=f"client{i}",
                    daemon=True,
                )
                for i in range(args.clients)
            ]
            start = time.time()
            sampler = Sampler(stack, records, start)
            controller = Controller(stack, args, timelines)
            for t in clients:
                t.start()
            sampler.start()
            controller.start()
            try:
                end = time.monotonic() + duration
                next_print = time.monotonic() + 30
                while time.monotonic() < end and sampler.is_alive():
                    time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                    if time.monotonic() >= next_print:
                        next_print += 30
                        last = sampler.samples[-1] if sampler.samples else {}
                        print(
                            f"   {time.time() - start:4.0f} s: {last.get('calls', 0):,} calls, "
                            f"RSS MB {json.dumps(last.get('rss_mb', {}))}",
                            flush=True,
                        )
            finally:
                controller.stop.set()
                controller.join(30)
                stop.set()
                for t in clients:
                    t.join(30)
                sampler.stop.set()
                sampler.join(30)
            t_end = time.time()
            body: Any = None
            with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                _, body = admin.call("GET", "/v1/status")
            behaviour = {
                "analysing": (body or {}).get("behaviour", {}).get("analysing"),
                "risks": (body or {}).get("behaviour", {}).get("risks"),
                "revocation_entries_left": (body or {}).get("revocations", {}).get("entries"),
            }
            admin.close()
            estats = envoy_stats(stack.envoy)
            stack.mandate.stop()
            audit = audit_verify(stack.audit_dir)
            reloads = [c for c in controller.changes if c.kind == "reload"]
            worker_lag = worker_reload_lag(stack.audit_dir, reloads)
            samples = sampler.samples
    except (BenchError, OSError, RuntimeError) as exc:
        print(f"soak: aborted: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted; processes stopped", file=sys.stderr)
        return 130

    result = analyse(records, outcomes, timelines, samples)
    growth = rss_growth(samples, args.warmup)
    tot = result["totals"]
    calls_started = sum(len(r.sent) for r in records)
    errors = tot.get("error", 0) + len(controller.errors)
    stale = tot.get("stale_allow", 0)
    watched = [n for n in growth if n == "supervisor" or n.startswith("worker") or n == "envoy"]
    worst = max(watched, key=lambda n: growth[n]["growth_pct"] or 0.0) if watched else None
    worst_pct = growth[worst]["growth_pct"] if worst else None
    restarts = max((s.get("worker_restarts") or 0) for s in samples)
    reload_failures = max((s.get("reload_failures") or 0) for s in samples)
    criteria = [
        {"name": "errors (calls + controller)", "value": errors, "goal": "0", "ok": errors == 0},
        {"name": "stale allows", "value": stale, "goal": "0", "ok": stale == 0},
        {
            "name": f"RSS growth after warm-up, worst process ({worst})",
            "value": fmt(worst_pct, "{:+.2f} %"),
            "goal": f"< {RSS_GOAL_PCT:g} %",
            "ok": worst_pct is not None
            and all((growth[n]["growth_pct"] or 0.0) < RSS_GOAL_PCT for n in watched),
        },
        {
            "name": "every process up to the end, same worker pids",
            "value": sampler.problem or "yes",
            "goal": "yes",
            "ok": sampler.problem is None,
        },
        {
            "name": "worker restarts / reload failures",
            "value": f"{restarts} / {reload_failures}",
            "goal": "0 / 0",
            "ok": restarts == 0 and reload_failures == 0,
        },
        {
            "name": "audit trail verifies, no record lost",
            "value": f"{'ok' if audit.get('ok') else 'not ok'}, {audit.get('lost', '?')} lost",
            "goal": "ok, 0 lost",
            "ok": bool(audit.get("ok")) and not audit.get("lost"),
        },
    ]
    passed = all(c["ok"] for c in criteria)
    error_examples = [e for r in records for e in r.examples]
    others = [x["other_cpus"] for x in samples if x.get("other_cpus") is not None]
    doc = {
        "machine": info,
        "settings": settings,
        "pass": passed,
        "criteria": criteria,
        "duration_s": t_end - start,
        "calls_started": calls_started,
        "rps": tot.get("calls", 0) / max(1e-9, t_end - start),
        "result": result,
        "rss_growth": growth,
        "samples": samples,
        "changes": change_stats(controller.changes),
        "change_log": [vars(c) for c in controller.changes],
        "controller_errors": controller.errors,
        "error_examples": error_examples,
        "envoy_stats": estats,
        "audit": audit,
        "worker_reload_lag": worker_lag,
        "other_cpus": {
            "mean": sum(others) / len(others) if others else None,
            "max": max(others) if others else None,
        },
        "behaviour": behaviour,
        "profile_versions": stack.versions,
    }
    table = markdown(doc)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    # The latest run only: git keeps the earlier ones (the file says when it ran).
    base = args.out / f"soak{'-http' if args.transport == 'http' else ''}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    base.with_suffix(".md").write_text(table)
    print(f"wrote {base}.json and {base}.md")
    if not passed:
        failed = ", ".join(c["name"] for c in criteria if not c["ok"])
        print(f"soak: FAIL: {failed}", file=sys.stderr)
        return 1
    return 0
