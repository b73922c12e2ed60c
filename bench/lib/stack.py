"""What every benchmark under bench/ reads from /proc and records about the machine, and the
Envoy + authorizer stacks that check_throughput.py and matrix.py measure: start them, check
them, load them (wrk, closed loop; openloop.py, fixed rate), and measure around the load.

Imported by the benchmark scripts (`python bench/<script>.py` puts bench/ on sys.path).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from importlib import metadata
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import yaml

from devstack.local import (
    ENVOY_DIR,
    EnvoyProcess,
    MandateProcess,
    envoy_binary,
    render_envoy_config,
    start_envoy,
    start_mandate,
    stop_subprocess,
)

__all__ = [
    "AGENT",
    "ALLOWED_PATH",
    "BEHAVIOUR",
    "BEHAVIOUR_LEARNING_S",
    "BEHAVIOUR_WARMUP_S",
    "BENCH",
    "CLK_TCK",
    "DENIED_PATH",
    "HOST",
    "PROFILES",
    "RULE",
    "TEMPLATES",
    "WRK_SCRIPT",
    "BenchError",
    "MandateOptions",
    "Pinning",
    "RawClient",
    "Stack",
    "behaviour_state",
    "cpu_seconds",
    "discarding_otlp_receiver",
    "envoy_stats",
    "envoy_version",
    "first_line",
    "http_get",
    "machine_base",
    "machine_busy_seconds",
    "machine_ticks",
    "mandate_decisions",
    "mandate_status",
    "measure",
    "package_version",
    "pin_tree",
    "plan_pinning",
    "process_tree",
    "pss_mb",
    "request",
    "rss_mb",
    "run_main",
    "run_openloop",
    "run_wrk",
    "running_stack",
    "sigterm_as_interrupt",
    "spawning_on",
    "start_to_ready",
    "tree_affinity",
    "tree_cpu_seconds",
    "tree_cpu_split",
    "tree_pss_mb",
    "tree_rss_mb",
    "unlimited_profiles",
    "verify",
    "with_access_log",
    "write_results",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PROFILES = ROOT / "devstack" / "demo" / "profiles"

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


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (mandate: the supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid`` itself, of all its descendants): for mandate, the supervisor's
    and its Check workers'. A descendant that exited meanwhile no longer counts."""
    own = cpu_seconds(pid)
    return own, sum(cpu_seconds(p) for p in process_tree(pid) if p != pid)


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += rss_mb(p)
    return total


def pss_mb(pid: int) -> float:
    """Proportional set size (/proc/PID/smaps_rollup): shared pages divided among the
    processes that map them, so that a tree's sum counts them once; NaN if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tree_pss_mb(pid: int) -> float:
    return sum(pss_mb(p) for p in process_tree(pid))


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def machine_busy_seconds() -> tuple[float, str]:
    """CPU time used so far by every task, in seconds, and where it comes from: the root
    cgroup's accounting (scheduler run time, exact: cgroup v2 `cpu.stat` usage_usec or v1
    `cpuacct.usage`) if readable, else /proc/stat's busy ticks (sampled at each tick, which
    undercounts short bursts between idle periods: light, bursty loads look idler)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/sys/fs/cgroup/cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6, "cgroup cpu.stat"
    with contextlib.suppress(OSError, ValueError):
        usage = Path("/sys/fs/cgroup/cpuacct/cpuacct.usage").read_text()
        return int(usage) / 1e9, "cgroup cpuacct.usage"
    return machine_ticks()[0] / CLK_TCK, "/proc/stat ticks"


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def first_line(cmd: list[str]) -> str:
    """The first line a command prints (stdout, else stderr), or '' if it cannot run."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return lines[0] if lines else ""


def envoy_version() -> str:
    text = first_line([envoy_binary(), "--version"])
    m = re.search(r"/(\d+\.\d+\.\d+)/", text)
    return m.group(1) if m else text


def machine_base() -> dict[str, Any]:
    """The machine and checkout every result file records; scripts add their own fields."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(ROOT), "status", "--porcelain"])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git_commit": commit + (" (dirty)" if dirty else ""),
        "pinning": "none",
        "loadavg_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


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


# ---------------------------------------------------------------- the stacks under test


class BenchError(RuntimeError):
    """The benchmark cannot produce meaningful figures; the message says why."""


def write_results(stem: Path, doc: Any, text: str) -> None:
    """STEM.json (``doc``, indented) and STEM.md (``text``), then ``text`` on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)


def run_main(main: Callable[[], int], name: str) -> NoReturn:
    """Exit with ``main()``'s code; a BenchError is one line on stderr and exit code 1."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)


class RawClient:
    """HTTP/1.1 over one keep-alive socket, requests pre-encoded: far less client CPU than
    http.client, which matters when clients, Envoy and mandate share two CPUs."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def send(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, lower-case headers, body). Raises OSError (or ValueError on garbage)."""
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(request)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end + 4 :]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        if "content-length" not in headers:
            raise OSError(f"response without content-length: {head[:200]!r}")
        length = int(headers["content-length"])
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body

    def _more(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise OSError("connection closed by Envoy")
        self.buf += data


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


# ---------------------------------------------------------------- load


# wrk prints one JSON line at the end; latencies are in microseconds.
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "mean_us": %.1f, "max_us": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk(
    port: int, script: Path, connections: int, duration: float, *, latency: bool = False
) -> dict[str, Any]:
    """Closed loop: `wrk -t1 -c<connections>` for ``duration`` s, the benchmark request;
    latencies (µs) are wrk's, from each request's send. ``load_cpu_s``: wrk's CPU time.
    wrk takes whole seconds: ``duration`` is rounded up."""
    secs = max(1, math.ceil(duration))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{secs}s", "--timeout", "2s"]
    cmd += ["-s", str(script), "-H", f"Host: {HOST}"]
    if latency:
        cmd.append("--latency")
    cmd.append(f"http://127.0.0.1:{port}{ALLOWED_PATH}")
    before = _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30, check=False)
    cpu = _children_cpu() - before  # wrk is the only child reaped meanwhile
    line = next((x for x in proc.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["non_2xx"] = result["status"]
    result["socket_errors"] = sum(result[k] for k in ("connect", "read", "write", "timeout"))
    result["wrk_cpu_s"] = result["load_cpu_s"] = cpu
    return result


OPENLOOP = BENCH / "openloop.py"


def run_openloop(
    port: int, rate: float, duration: float, *, connections: int = 32, drain: float = 2.0
) -> dict[str, Any]:
    """Open loop: bench/openloop.py sends the benchmark request at ``rate`` per second for
    ``duration`` s over ``connections`` keep-alive connections, latencies (µs) from each
    request's scheduled time (see its docstring). ``load_cpu_s``: the generator's CPU time."""
    cmd = [sys.executable, str(OPENLOOP), "--port", str(port), "--host", HOST]
    cmd += ["--path", ALLOWED_PATH, "--rate", f"{rate:g}", "--duration", f"{duration:g}"]
    cmd += ["--connections", str(connections), "--drain", f"{drain:g}"]
    before = _children_cpu()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + drain + 30, check=False
    )
    cpu = _children_cpu() - before
    line = next((x for x in proc.stdout.splitlines() if x.startswith("OPENLOOP_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"openloop failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(line.removeprefix("OPENLOOP_JSON "))
    result["load_cpu_s"] = cpu
    answered = result["requests"]
    result["load_cpu_us_per_request"] = cpu / answered * 1e6 if answered else None
    return result


def measure(
    envoy: EnvoyProcess,
    mandate: MandateProcess | None,
    load: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``load`` (one wrk or openloop run) and add the CPU and request counts measured
    around it, from /proc, Envoy's admin stats and mandate's /metrics."""
    stats0 = envoy_stats(envoy)
    dec0 = mandate_decisions(mandate) if mandate else None
    busy0, source = machine_busy_seconds()
    wall0 = time.monotonic()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    env_cpu0 = cpu_seconds(envoy.proc.pid)
    sup_cpu0, wrk_cpu0 = tree_cpu_split(mandate.proc.pid) if mandate else (0.0, 0.0)
    result = load()
    env_cpu = cpu_seconds(envoy.proc.pid) - env_cpu0
    sup_cpu1, wrk_cpu1 = tree_cpu_split(mandate.proc.pid) if mandate else (0.0, 0.0)
    sup_cpu, workers_cpu = sup_cpu1 - sup_cpu0, wrk_cpu1 - wrk_cpu0
    man_cpu = sup_cpu + workers_cpu
    busy1, _ = machine_busy_seconds()
    wall = time.monotonic() - wall0
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    stats1 = envoy_stats(envoy)

    def delta(name: str) -> int:
        return stats1.get(name, 0) - stats0.get(name, 0)

    served = delta("http.egress.downstream_rq_total")
    result["envoy_requests"] = served
    result["envoy_2xx"] = delta("http.egress.downstream_rq_2xx")
    # Started minus 2xx: also the requests a closed-loop client abandons in flight at its end.
    result["envoy_non_2xx"] = served - result["envoy_2xx"]
    result["envoy_4xx_5xx"] = delta("http.egress.downstream_rq_4xx") + delta(
        "http.egress.downstream_rq_5xx"
    )
    result["envoy_cpu_s"] = env_cpu
    result["envoy_cpu_us_per_request"] = env_cpu / served * 1e6 if served else None
    result["envoy_rss_mb"] = rss_mb(envoy.proc.pid)
    ncpu = os.cpu_count() or 1
    result["machine_busy_pct"] = 100 * (busy1 - busy0) / (wall * ncpu) if wall > 0 else None
    result["machine_busy_source"] = source
    # This script's own CPU meanwhile (its polling; with tracing on, the OTLP receiver).
    driver = (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
    result["driver_cpu_s"] = driver
    # CPU used meanwhile by processes other than Envoy, mandate, the load generator and this
    # script (others' noise), in CPUs: the machine's busy time minus ours, over the wall time
    # of the run. Ours come from /proc/PID/stat in ticks (10 ms): about ±0.05 CPU over 10 s.
    ours = env_cpu + man_cpu + result["load_cpu_s"] + driver
    result["other_cpus"] = (busy1 - busy0 - ours) / wall if wall > 0 else None
    result["authz"] = {
        k.removeprefix("http.egress."): delta(k)
        for k in sorted(stats1)
        if k.startswith(("http.egress.ext_authz.", "http.egress.rbac."))
    }
    # The gRPC access logger (behaviour analysis): entries written to / dropped before mandate.
    result["access_log"] = {
        k.removeprefix("access_logs.grpc_access_log."): delta(k)
        for k in sorted(stats1)
        if k.startswith("access_logs.grpc_access_log.")
    }
    if mandate is not None and dec0 is not None:
        dec1 = mandate_decisions(mandate)
        allow, deny = dec1["allow"] - dec0["allow"], dec1["deny"] - dec0["deny"]
        checks = allow + deny
        result["checks"] = checks
        result["checks_allowed"] = allow
        result["checks_denied"] = deny
        result["mandate_cpu_s"] = man_cpu
        result["mandate_cpu_us_per_check"] = man_cpu / checks * 1e6 if checks else None
        # Split by process: the Check workers (the Check path) and the supervisor (admin,
        # tables; with behaviour analysis, the access log's decoding and scoring).
        result["mandate_workers_cpu_s"] = workers_cpu
        result["mandate_supervisor_cpu_s"] = sup_cpu
        result["mandate_workers_cpu_us_per_check"] = workers_cpu / checks * 1e6 if checks else None
        result["mandate_supervisor_cpu_us_per_check"] = sup_cpu / checks * 1e6 if checks else None
        result["mandate_rss_mb"] = tree_rss_mb(mandate.proc.pid)
        result["mandate_pss_mb"] = tree_pss_mb(mandate.proc.pid)
    return result


# ---------------------------------------------------------------- pinning


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each party runs on (--pin). Set with sched_setaffinity(2): the starting
    thread of this script takes a party's CPUs just while it spawns that party (children and
    their threads inherit them), and every thread of the party's process tree is set again
    once it runs (pin_tree). The load generators (wrk, openloop.py) are children of this
    script, which otherwise runs on the ``load`` CPUs."""

    envoy: tuple[int, ...]
    mandate: tuple[int, ...]
    load: tuple[int, ...]

    def describe(self) -> str:
        def cpus(c: tuple[int, ...]) -> str:
            return ("CPU " if len(c) == 1 else "CPUs ") + ",".join(map(str, c))

        return (
            f"Envoy (all threads) on {cpus(self.envoy)}; mandate (supervisor, workers, all "
            f"threads) on {cpus(self.mandate)}; load generator (wrk / openloop.py) and the "
            f"driver on {cpus(self.load)}; sched_setaffinity on every thread"
        )


@contextlib.contextmanager
def spawning_on(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """This thread on ``cpus`` while it starts a process (which inherits them), then back;
    nothing if None."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def plan_pinning() -> Pinning:
    """Envoy on the first CPU this script may use, mandate on the second, the load generator
    on the third if there is one, else with Envoy (on 2 CPUs mandate is the busiest party)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError(f"--pin needs at least 2 CPUs; this process may use {cpus}")
    load = cpus[2] if len(cpus) > 2 else cpus[0]
    return Pinning((cpus[0],), (cpus[1],), (load,))


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin_tree(pid: int, cpus: tuple[int, ...]) -> int:
    """Every thread of ``pid`` and its descendants on ``cpus``; the number of threads set.
    Two passes: a thread started during the first inherits from one already set, or is set
    by the second."""
    done: set[int] = set()
    for _ in range(2):
        for p in process_tree(pid):
            for tid in _threads(p):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)
                    done.add(tid)
    return len(done)


def tree_affinity(pid: int) -> dict[str, Any]:
    """The processes and threads of ``pid``'s tree and the CPUs any of them may run on."""
    procs = process_tree(pid)
    threads = [t for p in procs for t in _threads(p)]
    allowed: set[int] = set()
    for t in threads:
        with contextlib.suppress(OSError):
            allowed |= os.sched_getaffinity(t)
    return {"processes": len(procs), "threads": len(threads), "cpus": sorted(allowed)}


# ---------------------------------------------------------------- one stack


@dataclass(frozen=True)
class MandateOptions:
    """How `mandate run` is started behind Envoy's ext_authz filter."""

    transport: str = "grpc"
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
                PROFILES, where, behaviour={AGENT: BEHAVIOUR} if mandate.behaviour_profile else None
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


def wait_for(
    cond: Callable[[], Any],
    what: str,
    timeout: float,
    interval: float = 0.05,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """``cond()``'s first true value, polled every ``interval`` s; BenchError after
    ``timeout`` s. Exceptions of the ``tolerate`` types count as not yet (the last one is
    named in the error)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except tolerate as exc:
            last = exc
        time.sleep(interval)
    raise BenchError(f"{what}: not after {timeout:g} s" + (f" ({last})" if last else ""))


def stop_process(proc: BaseProcess, timeout: float = 5.0) -> None:
    """Stop a multiprocessing child: terminate, then kill."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- start-up


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
