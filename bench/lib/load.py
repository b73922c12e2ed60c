"""The load: wrk (closed loop), openloop.py (fixed rate, bench/openloop.py run as a child
process), a raw keep-alive HTTP client, and `measure`: the CPU, requests and Checks counted
around one load, from /proc, Envoy's admin stats and mandate's /metrics."""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.lib import BENCH, BenchError
from bench.lib.proc import (
    cpu_seconds,
    machine_busy_seconds,
    rss_mb,
    tree_cpu_split,
    tree_pss_mb,
    tree_rss_mb,
)
from bench.lib.stack import ALLOWED_PATH, HOST, envoy_stats, mandate_decisions
from devstack.local import EnvoyProcess, MandateProcess

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
    result["wall_s"] = wall  # the load's wall time: CPU seconds over it are CPUs (vCPU)
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
