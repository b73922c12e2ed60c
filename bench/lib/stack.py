"""The stacks under test: the benchmark request, Envoy with bench/envoy-*.yaml (the ceiling,
the RBAC floor, mandate over each transport) and `mandate run` behind it with the demo
profiles minus rate limits; start them (`running_stack`), check them (`verify`), ask them
(Envoy's counters, mandate's /metrics and /v1/status); the demo upstream in a process of its
own; `mandate run`'s start-up time and idle memory."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

from bench.lib import BENCH, PROFILES, ROOT, BenchError
from bench.lib.proc import Pinning, pin_tree, process_tree, spawning_on, tree_pss_mb, tree_rss_mb
from devstack.local import (
    ENVOY_DIR,
    EnvoyProcess,
    MandateProcess,
    render_envoy_config,
    start_envoy,
    start_mandate,
    stop_subprocess,
)

# The benchmark request: allowed by the RBAC policy of envoy-rbac.yaml and by the demo
# profile's rule RULE (agent AGENT); DENIED_PATH is denied by both.
HOST = "ledger.finance.svc.cluster.local"
ALLOWED_PATH = "/v1/invoices/42"
DENIED_PATH = "/v1/ledger/admin/x"
AGENT = "billing-agent"
RULE = "reconcile.allow[0]"
# Envoy configs of the stacks (bench/): the ceiling, the floor, mandate over each transport.
TEMPLATES = {
    "envoy": "envoy-direct.yaml",
    "rbac": "envoy-rbac.yaml",
    "grpc": "envoy-mandate.yaml",
    "http": "envoy-mandate-http.yaml",
}
# Behaviour analysis on: the `behavior:` section AGENT's profile gets. The window (5 s instead
# of the default 1 m) fits in the learning period, so that the learned peak rate and volume
# are those of the warm-up's load, the load then measured: a steady load must score low. The
# window's length does not change the cost (`observe` is O(1), `score` sums 13 buckets).
BEHAVIOUR_LEARNING_S = 8
BEHAVIOUR = {
    "mode": "enforce",
    "revokeAtRisk": 0.95,
    "learningPeriod": f"{BEHAVIOUR_LEARNING_S}s",
    "window": "5s",
}
BEHAVIOUR_WARMUP_S = BEHAVIOUR_LEARNING_S + 2  # warm-up at least this long, behaviour on
ALS_LOGGER = "envoy.access_loggers.http_grpc"


def unlimited_profiles(
    source: Path, work: Path, *, behaviour: Mapping[str, Mapping[str, Any]] | None = None
) -> Path:
    """A copy of the profile directory ``source`` under ``work`` without `rateLimit:` lines.
    The benchmarks drive one agent far above any sane rate limit; with the limit in place most
    calls would be cheap `rate` denies instead of the allow path being measured.

    ``behaviour``: agent -> the `behavior:` section its profile gets instead of its own
    (e.g. ``{"mode": "enforce", "learningPeriod": "8s"}``). Those files are rewritten from
    their YAML (comments dropped); ValueError if an agent has no profile in ``source``."""
    target = work / "profiles"
    target.mkdir(parents=True, exist_ok=True)
    for f in source.glob("*.y*ml"):
        lines = f.read_text().splitlines(keepends=True)
        (target / f.name).write_text("".join(x for x in lines if "rateLimit:" not in x))
    if behaviour:
        _set_behaviour(target, behaviour)
    return target


def _set_behaviour(profiles: Path, behaviour: Mapping[str, Mapping[str, Any]]) -> None:
    missing = set(behaviour)
    for f in sorted(profiles.glob("*.y*ml")):
        docs = list(yaml.safe_load_all(f.read_text()))
        changed = False
        for doc in docs:
            name = (doc or {}).get("metadata", {}).get("name") if isinstance(doc, dict) else None
            if name in behaviour:
                doc.setdefault("spec", {})["behavior"] = dict(behaviour[name])
                missing.discard(name)
                changed = True
        if changed:
            f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    if missing:
        raise ValueError(f"no profile for {', '.join(sorted(missing))} in {profiles}")


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body.decode()


def envoy_stats(envoy: EnvoyProcess) -> dict[str, int]:
    """Envoy's counters of the egress listener (and the mandate cluster, the gRPC access
    logger)."""
    pattern = urllib.parse.quote(
        r"^(http\.egress\.|cluster\.mandate\.upstream_rq_|access_logs\.grpc_access_log\.)"
    )
    text = http_get(f"http://127.0.0.1:{envoy.admin_port}/stats?usedonly&filter={pattern}")
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().isdigit():
            out[name] = int(value)
    return out


_DECISION = re.compile(r'^mandate_decisions_total\{[^}]*decision="(\w+)"[^}]*\}\s+([0-9.e+]+)$')


def mandate_decisions(mandate: MandateProcess) -> dict[str, int]:
    """mandate's Check decisions so far, by decision (allow/deny), from its /metrics."""
    out = {"allow": 0, "deny": 0}
    for line in http_get(f"http://127.0.0.1:{mandate.admin_port}/metrics").splitlines():
        m = _DECISION.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + round(float(m.group(2)))
    return out


def mandate_status(mandate: MandateProcess, token: str) -> dict[str, Any]:
    """The supervisor's /v1/status (admin API, bearer token)."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{mandate.admin_port}/v1/status",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=2.0) as resp:
        status: dict[str, Any] = json.loads(resp.read())
    return status


def behaviour_state(mandate: MandateProcess, token: str, agent: str) -> dict[str, Any]:
    """The agent's risk as /v1/status gives it (score, learning, explanation; None before its
    first score) and the revocations in force. /v1/status has the score last *published* to
    the workers (a new one only when it moves by 0.01 or learning ends); ``score_now`` is the
    last one computed (every 0.1 s), from the `mandate_agent_risk` gauge of /metrics."""
    status = mandate_status(mandate, token)
    risks = [r for r in status["behaviour"]["risks"] if r["agent"] == agent]
    risk = risks[0] if risks else None
    now = None
    for line in http_get(f"http://127.0.0.1:{mandate.admin_port}/metrics").splitlines():
        if line.startswith(f'mandate_agent_risk{{agent="{agent}"}} '):
            now = float(line.rsplit(" ", 1)[1])
    return {
        "analysing": status["behaviour"]["analysing"],
        "score": risk["score"] if risk else None,
        "score_now": now,
        "learning": risk["learning"] if risk else None,
        "explanation": risk["explanation"] if risk else None,
        "published_at": risk["updated_at"] if risk else None,
        "revocations": status["revocations"]["entries"],
        "at": time.time(),
    }


def with_access_log(config_text: str, transport: str, als_port: int) -> str:
    """A rendered benchmark config plus what behaviour analysis adds to the sidecar's Envoy:
    the gRPC access logger streaming to mandate's ALS on ``als_port`` and its cluster — and,
    over HTTP, the metadata the ALS attributes calls by (`dynamic_metadata_from_headers`) —
    taken from envoy/local(-http).yaml rendered with ``als_port``, so that the benchmark runs
    the sidecar's own settings (buffer size, flush interval)."""
    source = ENVOY_DIR / ("local.yaml" if transport == "grpc" else "local-http.yaml")
    dummy = {"ADMIN_PORT": 0, "LISTEN_PORT": 0, "MANDATE_PORT": 1, "UPSTREAM_PORT": 1}
    local = yaml.safe_load(
        render_envoy_config(source, {**dummy, "ACCESS_LOG": "/dev/null"}, als_port=als_port)
    )
    config = yaml.safe_load(config_text)

    def hcm(cfg: dict[str, Any]) -> dict[str, Any]:
        typed: dict[str, Any] = cfg["static_resources"]["listeners"][0]["filter_chains"][0][
            "filters"
        ][0]["typed_config"]
        return typed

    def ext_authz(cfg: dict[str, Any]) -> dict[str, Any]:
        return next(
            f["typed_config"]
            for f in hcm(cfg)["http_filters"]
            if f["name"] == "envoy.filters.http.ext_authz"
        )

    loggers = [x for x in hcm(local).get("access_log", []) if x["name"] == ALS_LOGGER]
    cluster_names = {
        x["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        for x in loggers
    }
    clusters = [c for c in local["static_resources"]["clusters"] if c["name"] in cluster_names]
    if len(loggers) != 1 or len(clusters) != 1:
        raise BenchError(f"{source.name}: expected one {ALS_LOGGER} logger and its cluster")
    hcm(config).setdefault("access_log", []).extend(loggers)
    config["static_resources"]["clusters"].extend(clusters)
    if transport == "http":
        key = "dynamic_metadata_from_headers"
        want = ext_authz(local)["http_service"]["authorization_response"][key]
        ext_authz(config)["http_service"]["authorization_response"][key] = want
    return yaml.safe_dump(config, sort_keys=False)


def request(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """One GET through Envoy with the benchmark's Host header: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": HOST})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def verify(
    name: str, envoy: EnvoyProcess, mandate: MandateProcess | None, *, authorizer: bool = True
) -> None:
    """Abort unless the benchmark request is allowed (200) and, with an authorizer, a denied
    path really is denied (403) by that authorizer (mandate: its deny body, both Checks
    counted in its /metrics)."""
    before = mandate_decisions(mandate) if mandate else None
    deadline = time.monotonic() + 5.0
    status, body = 0, ""
    while time.monotonic() < deadline:  # the first Check may race Envoy's connect to mandate
        with contextlib.suppress(OSError):
            status, body = request(envoy.port, ALLOWED_PATH)
            if status == 200:
                break
        time.sleep(0.1)
    if status != 200:
        raise BenchError(f"{name}: GET {ALLOWED_PATH} gave {status}, not 200: {body[:300]}")
    for _ in range(3):
        status, body = request(envoy.port, ALLOWED_PATH)
        if status != 200:
            raise BenchError(f"{name}: GET {ALLOWED_PATH} gave {status} on a repeat")
    if not authorizer:
        return
    status, body = request(envoy.port, DENIED_PATH)
    if status != 403:
        raise BenchError(f"{name}: GET {DENIED_PATH} gave {status}, not 403: {body[:300]}")
    if mandate is not None and before is not None:
        if '"denied_by_rule"' not in body:
            raise BenchError(f"{name}: the 403 is not mandate's deny body: {body[:300]}")
        after = mandate_decisions(mandate)
        if after["allow"] - before["allow"] < 4 or after["deny"] - before["deny"] < 1:
            raise BenchError(f"{name}: mandate did not see the probes' Checks: {before} -> {after}")


@dataclass(frozen=True)
class MandateOptions:
    """How `mandate run` is started behind Envoy's ext_authz filter."""

    transport: str = "grpc"
    http_server: str | None = None  # --http-server (None: mandate's default)
    grpc_server: str | None = None  # --grpc-server (None: mandate's default)
    workers: int | None = None  # --workers (None: mandate's default, 1)
    threads: int | None = None  # --threads (None: mandate's default)
    # Every decision traced (OTLP to a discarding receiver in this script) and audited.
    telemetry: bool = False
    # AGENT's profile gets BEHAVIOUR, mandate a --state-dir (the admin token /v1/status needs).
    behaviour_profile: bool = False
    # Behaviour analysis on: --access-log, and Envoy streams its access log to it.
    access_log: bool = False
    # More `mandate run` arguments, appended last (e.g. ("--audit-dir", DIR) alone).
    extra: tuple[str, ...] = ()
    # The profile directory (minus its `rateLimit:` lines); None: the demo profiles.
    profiles: Path | None = None


@dataclass
class Stack:
    name: str
    envoy: EnvoyProcess
    mandate: MandateProcess | None
    token: str  # mandate's admin token ("" without a state dir)


@contextlib.contextmanager
def discarding_otlp_receiver() -> Iterator[int]:
    """An OTLP/gRPC TraceService on 127.0.0.1 that accepts and drops spans without parsing
    them (a collector runs elsewhere; parsing here would take CPU from the parties measured);
    yields its port."""
    import grpc

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(lambda request, context: b"")},
    )  # bytes in, bytes out: an empty ExportTraceServiceResponse
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


@contextlib.contextmanager
def running_stack(
    name: str,
    template: str,
    work: Path,
    mandate: MandateOptions | None = None,
    *,
    pinning: Pinning | None = None,
    envoy_concurrency: int = 1,
) -> Iterator[Stack]:
    """Envoy with bench/``template`` (and, given ``mandate``, `mandate run` as its ext_authz
    server with the demo profiles minus rate limits) on 127.0.0.1 ports they pick, in
    ``work``/``name``; both stopped on exit. On an error inside, the last lines of their logs
    go to stderr."""
    where = work / name
    values: dict[str, object] = {"ADMIN_PORT": 0, "LISTEN_PORT": 0}
    token = ""
    with contextlib.ExitStack() as stack:
        proc: MandateProcess | None = None
        if mandate is not None:
            extra = ["--agent", AGENT, "--log-level", "WARNING", "--kubernetes", "off"]
            extra += ["--transport", mandate.transport]
            if mandate.http_server is not None:
                extra += ["--http-server", mandate.http_server]
            if mandate.grpc_server is not None:
                extra += ["--grpc-server", mandate.grpc_server]
            if mandate.threads is not None:
                extra += ["--threads", str(mandate.threads)]
            if mandate.workers is not None:
                extra += ["--workers", str(mandate.workers)]
            if mandate.telemetry:
                # Every decision traced (100 % sampled: the load sends no traceparent, so the
                # span is a root, always sampled) and audited, into a discarding receiver.
                receiver = stack.enter_context(discarding_otlp_receiver())
                extra += [
                    "--otlp-endpoint", f"http://127.0.0.1:{receiver}",
                    "--audit-dir", str(where / "audit"),
                ]  # fmt: skip
            if mandate.behaviour_profile:
                extra += ["--state-dir", str(where / "state")]
            if mandate.access_log:
                extra += ["--access-log", "127.0.0.1:0"]
            extra += mandate.extra
            profiles = unlimited_profiles(
                mandate.profiles or PROFILES,
                where,
                behaviour={AGENT: BEHAVIOUR} if mandate.behaviour_profile else None,
            )
            with spawning_on(pinning.mandate if pinning else None):
                proc = start_mandate(profiles, where, extra=extra)
            stack.callback(proc.stop)
            values |= {"AGENT": AGENT}
            if mandate.behaviour_profile:
                token = (where / "state" / "admin.token").read_text().strip()
        config = render_envoy_config(
            BENCH / template, values, mandate_ports=proc.grpc_ports if proc else None
        )
        if mandate is not None and mandate.access_log:
            assert proc is not None
            if not proc.access_log_port:
                raise BenchError("mandate reported no access log port (--access-log ignored?)")
            config = with_access_log(config, mandate.transport, proc.access_log_port)
        with spawning_on(pinning.envoy if pinning else None):
            envoy = start_envoy(config, where, concurrency=envoy_concurrency)
        stack.callback(envoy.stop)
        if pinning is not None:
            pin_tree(envoy.proc.pid, pinning.envoy)
            if proc is not None:
                pin_tree(proc.proc.pid, pinning.mandate)
        try:
            yield Stack(name, envoy, proc, token)
            if envoy.proc.poll() is not None or (proc and proc.proc.poll() is not None):
                raise BenchError(f"{name}: a process exited during the run")
        except BaseException:
            for log in (envoy.log_path, proc.log_path if proc else None):
                if log is not None and log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    print(
                        f"--- {name}: {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr
                    )
            raise


def upstream_main(port_out: Connection) -> None:
    """The demo upstream in a process of its own (its GIL is not the clients'); sends its
    port through ``port_out``. It keeps every request it receives: that list is cleared
    every second so its memory stays flat. Ctrl-C is left to the controller."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import asyncio

    from aiohttp import web

    from devstack.demo.upstream import RECEIVED, make_app

    async def serve() -> None:
        app = make_app()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server  # aiohttp has no public accessor for the bound port
        port_out.send(int(server.sockets[0].getsockname()[1]))
        try:
            while True:  # until the controller terminates this process
                await asyncio.sleep(1.0)
                app[RECEIVED].clear()
        finally:
            await runner.cleanup()

    asyncio.run(serve())


def start_to_ready(
    work: Path,
    *,
    extra: list[str],
    repeats: int,
    idle_s: float = 1.0,
    timeout: float = 20.0,
    cpus: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Start `mandate run` (the venv's console script) ``repeats`` times with the demo profiles
    (minus rate limits) and ``extra`` arguments, each time measuring the wall time from just
    before spawning it to its port file and to the first 200 of /readyz (polled every 5 ms),
    then, ``idle_s`` later, the RSS and PSS of all its processes (idle: no request yet).
    Stopped after each start. ``cpus``: spawned on those (inherited by its workers)."""
    script = Path(sys.executable).parent / "mandate"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "sidecar"]
    profiles = unlimited_profiles(PROFILES, work)
    runs: list[dict[str, Any]] = []
    for i in range(repeats):
        where = work / f"start-{i}"
        where.mkdir(parents=True, exist_ok=True)
        port_file = where / "ports.json"
        args = [*cmd, "run", "--profiles", str(profiles), "--listen", "127.0.0.1:0"]
        args += ["--admin", "127.0.0.1:0", "--port-file", str(port_file), *extra]
        with (where / "mandate.log").open("ab") as log, spawning_on(cpus):
            t0 = time.monotonic()
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        try:
            admin = 0
            t_ports = t_ready = None
            while t_ready is None:
                now = time.monotonic()
                if proc.poll() is not None:
                    raise BenchError(f"mandate exited ({proc.returncode}) before ready: {args}")
                if now - t0 > timeout:
                    raise BenchError(f"mandate not ready after {timeout} s: {args}")
                if not admin:
                    with contextlib.suppress(OSError, ValueError, KeyError):
                        admin = int(json.loads(port_file.read_text())["admin"])
                        t_ports = now - t0
                if admin:
                    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=1.0)
                    with contextlib.suppress(OSError, http.client.HTTPException):
                        conn.request("GET", "/readyz")
                        if conn.getresponse().status == 200:
                            t_ready = time.monotonic() - t0
                    conn.close()
                if t_ready is None:
                    time.sleep(0.005)
            time.sleep(idle_s)
            runs.append(
                {
                    "port_file_s": t_ports,
                    "ready_s": t_ready,
                    "idle_rss_mb": tree_rss_mb(proc.pid),
                    "idle_pss_mb": tree_pss_mb(proc.pid),
                    "processes": len(process_tree(proc.pid)),
                }
            )
        finally:
            stop_subprocess(proc)
    return {
        "command": " ".join(Path(a).name if a == cmd[0] else a for a in [cmd[0], "run", *extra]),
        "repeats": repeats,
        "idle_s": idle_s,
        "runs": runs,
        "median_ready_s": statistics.median(r["ready_s"] for r in runs),
        "max_ready_s": max(r["ready_s"] for r in runs),
        "median_port_file_s": statistics.median(r["port_file_s"] for r in runs),
        "median_idle_rss_mb": statistics.median(r["idle_rss_mb"] for r in runs),
        "max_idle_rss_mb": max(r["idle_rss_mb"] for r in runs),
        "median_idle_pss_mb": statistics.median(r["idle_pss_mb"] for r in runs),
    }
