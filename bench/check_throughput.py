"""What one authorization costs: real Envoy answering a `direct_response` 200, measured side
by side in one run, three ways that differ only in authorization:

  envoy    Envoy alone, no authorization (the ceiling)              bench/envoy-direct.yaml
  rbac     Envoy's native RBAC HTTP filter, in-process C++ (floor)  bench/envoy-rbac.yaml
  mandate  Envoy + ext_authz gRPC to `mandate run`                  bench/envoy-mandate.yaml
           (--transport http: ext_authz http_service, `mandate run --transport http`,
           bench/envoy-mandate-http.yaml)

The request is `GET /v1/invoices/42` with `Host: ledger.finance.svc.cluster.local`, allowed by
the RBAC policy and by the demo profile's rule reconcile.allow[0] (agent billing-agent). For
each case: a short warm-up, a throughput run (wrk -t1 -c16), then an unloaded latency run
(wrk -t1 -c1). Around each run it reads, from /proc, the CPU time (user+system, all threads) of
Envoy and of mandate, and from Envoy's admin stats and mandate's /metrics how many requests and
Checks were served, giving CPU microseconds per request and per Check. Before measuring, it
checks that the allowed request gets 200 and a denied one (/v1/ledger/admin/x) gets 403, and
that mandate saw both; otherwise it aborts.

Prints a table with ratios and writes bench/results/check_throughput.{json,md}. Everything
listens on 127.0.0.1; Envoy runs with --concurrency 1; processes are not pinned. Needs `wrk`
(apt-get install -y wrk). Run: .venv/bin/python bench/check_throughput.py [--duration 10]
[--transport grpc|http]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchlib import (  # noqa: E402
    CLK_TCK,
    cpu_seconds,
    envoy_version,
    first_line,
    machine_base,
    machine_ticks,
    package_version,
    rss_mb,
    tree_cpu_seconds,
    tree_rss_mb,
    unlimited_profiles,
)

from sidecar.local import (  # noqa: E402
    EnvoyProcess,
    MandateProcess,
    render_envoy_config,
    start_envoy,
    start_mandate,
)

BENCH = Path(__file__).resolve().parent
PROFILES = ROOT / "sidecar" / "demo" / "profiles"
HOST = "ledger.finance.svc.cluster.local"
ALLOWED_PATH = "/v1/invoices/42"
DENIED_PATH = "/v1/ledger/admin/x"
AGENT = "billing-agent"
RULE = "reconcile.allow[0]"


@dataclass(frozen=True)
class Case:
    key: str
    template: str
    label: str


CASES = (
    Case("envoy", "envoy-direct.yaml", "Envoy alone (direct_response)"),
    Case("rbac", "envoy-rbac.yaml", "Envoy + RBAC filter"),
    Case("mandate", "envoy-mandate.yaml", "Envoy + mandate (ext_authz gRPC)"),
)
# The mandate case over each transport (--transport).
MANDATE_CASES = {
    "grpc": CASES[2],
    "http": Case("mandate", "envoy-mandate-http.yaml", "Envoy + mandate (ext_authz HTTP)"),
}

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


class BenchError(RuntimeError):
    """The benchmark cannot produce meaningful figures; the message says why."""


# ---------------------------------------------------------------- probes of the processes


def _get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body.decode()


def envoy_stats(envoy: EnvoyProcess) -> dict[str, int]:
    """Envoy's counters of the egress listener (and the mandate cluster)."""
    pattern = urllib.parse.quote(r"^(http\.egress\.|cluster\.mandate\.upstream_rq_)")
    text = _get(f"http://127.0.0.1:{envoy.admin_port}/stats?usedonly&filter={pattern}")
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
    for line in _get(f"http://127.0.0.1:{mandate.admin_port}/metrics").splitlines():
        m = _DECISION.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + round(float(m.group(2)))
    return out


def request(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """One GET through Envoy with the benchmark's Host header: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": HOST})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def verify(case: Case, envoy: EnvoyProcess, mandate: MandateProcess | None) -> None:
    """Abort unless the benchmark request is allowed (200) and, with an authorizer, a denied
    path really is denied (403) by that authorizer."""
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
        raise BenchError(f"{case.key}: GET {ALLOWED_PATH} gave {status}, not 200: {body[:300]}")
    for _ in range(3):
        status, body = request(envoy.port, ALLOWED_PATH)
        if status != 200:
            raise BenchError(f"{case.key}: GET {ALLOWED_PATH} gave {status} on a repeat")
    if case.key == "envoy":
        return
    status, body = request(envoy.port, DENIED_PATH)
    if status != 403:
        raise BenchError(f"{case.key}: GET {DENIED_PATH} gave {status}, not 403: {body[:300]}")
    if mandate is not None and before is not None:
        if '"denied_by_rule"' not in body:
            raise BenchError(f"mandate: the 403 is not mandate's deny body: {body[:300]}")
        after = mandate_decisions(mandate)
        if after["allow"] - before["allow"] < 4 or after["deny"] - before["deny"] < 1:
            raise BenchError(f"mandate did not see the probes' Checks: {before} -> {after}")


# ---------------------------------------------------------------- wrk


def run_wrk(
    port: int, script: Path, connections: int, duration: float, *, latency: bool = False
) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "2s"]
    cmd += ["-s", str(script), "-H", f"Host: {HOST}"]
    if latency:
        cmd.append("--latency")
    cmd.append(f"http://127.0.0.1:{port}{ALLOWED_PATH}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped here
    line = next((x for x in proc.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["non_2xx"] = result["status"]
    result["socket_errors"] = sum(result[k] for k in ("connect", "read", "write", "timeout"))
    result["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def measure(
    envoy: EnvoyProcess,
    mandate: MandateProcess | None,
    load: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``load`` (one wrk run) and add the CPU and request counts measured around it."""
    stats0 = envoy_stats(envoy)
    dec0 = mandate_decisions(mandate) if mandate else None
    busy0, total0 = machine_ticks()
    env_cpu0 = cpu_seconds(envoy.proc.pid)
    man_cpu0 = tree_cpu_seconds(mandate.proc.pid) if mandate else 0.0
    result = load()
    env_cpu = cpu_seconds(envoy.proc.pid) - env_cpu0
    man_cpu = tree_cpu_seconds(mandate.proc.pid) - man_cpu0 if mandate else 0.0
    busy1, total1 = machine_ticks()
    stats1 = envoy_stats(envoy)

    def delta(name: str) -> int:
        return stats1.get(name, 0) - stats0.get(name, 0)

    served = delta("http.egress.downstream_rq_total")
    result["envoy_requests"] = served
    result["envoy_2xx"] = delta("http.egress.downstream_rq_2xx")
    result["envoy_non_2xx"] = served - result["envoy_2xx"]
    result["envoy_cpu_s"] = env_cpu
    result["envoy_cpu_us_per_request"] = env_cpu / served * 1e6 if served else None
    result["envoy_rss_mb"] = rss_mb(envoy.proc.pid)
    result["machine_busy_pct"] = 100 * (busy1 - busy0) / max(1, total1 - total0)
    # CPU used meanwhile by processes other than Envoy, mandate and wrk (others' noise),
    # in CPUs: busy ticks of the machine minus ours, over the wall time of the run.
    ours = env_cpu + man_cpu + result["wrk_cpu_s"]
    wall = (total1 - total0) / CLK_TCK / (os.cpu_count() or 1)
    result["other_cpus"] = ((busy1 - busy0) / CLK_TCK - ours) / wall if wall > 0 else None
    result["authz"] = {
        k.removeprefix("http.egress."): delta(k)
        for k in sorted(stats1)
        if k.startswith(("http.egress.ext_authz.", "http.egress.rbac."))
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
        result["mandate_rss_mb"] = tree_rss_mb(mandate.proc.pid)
    return result


@contextlib.contextmanager
def discarding_otlp_receiver() -> Iterator[int]:
    """An OTLP/gRPC TraceService on 127.0.0.1 that accepts and drops spans; yields its port."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    class Discard(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
        def Export(self, request: Any, context: Any) -> Any:
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Discard(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


# ---------------------------------------------------------------- one case


def run_case(case: Case, args: argparse.Namespace, work: Path, script: Path) -> dict[str, Any]:
    print(f"== {case.label}", flush=True)
    values: dict[str, object] = {"ADMIN_PORT": 0, "LISTEN_PORT": 0}
    with contextlib.ExitStack() as stack:
        mandate: MandateProcess | None = None
        if case.key == "mandate":
            extra = ["--agent", AGENT, "--log-level", "WARNING", "--kubernetes", "off"]
            extra += ["--transport", args.transport]
            if args.threads is not None:
                extra += ["--threads", str(args.threads)]
            if args.workers is not None:
                extra += ["--workers", str(args.workers)]
            if args.telemetry:
                # Every decision traced (100 % sampled: wrk sends no traceparent, so the span
                # is a root, always sampled) and audited, into a discarding OTLP receiver.
                receiver = stack.enter_context(discarding_otlp_receiver())
                extra += [
                    "--otlp-endpoint", f"http://127.0.0.1:{receiver}",
                    "--audit-dir", str(work / case.key / "audit"),
                ]  # fmt: skip
            profiles = unlimited_profiles(PROFILES, work / case.key)
            mandate = start_mandate(profiles, work / case.key, extra=extra)
            stack.callback(mandate.stop)
            values |= {"AGENT": AGENT}
        config = render_envoy_config(
            BENCH / case.template, values, mandate_ports=mandate.grpc_ports if mandate else None
        )
        envoy = start_envoy(config, work / case.key, concurrency=1)
        stack.callback(envoy.stop)
        try:
            verify(case, envoy, mandate)
            print(
                "   verified: allowed request 200" + (", denied 403" if case.key != "envoy" else "")
            )
            if args.warmup > 0:
                run_wrk(envoy.port, script, args.connections, args.warmup)
            loaded = measure(
                envoy, mandate, lambda: run_wrk(envoy.port, script, args.connections, args.duration)
            )
            print(f"   throughput: {loaded['rps']:,.0f} req/s (c={args.connections})", flush=True)
            unloaded = measure(
                envoy,
                mandate,
                lambda: run_wrk(envoy.port, script, 1, args.latency_duration, latency=True),
            )
            print(f"   unloaded p50/p99: {unloaded['p50_us']}/{unloaded['p99_us']} µs", flush=True)
            if envoy.proc.poll() is not None or (mandate and mandate.proc.poll() is not None):
                raise BenchError(f"{case.key}: a process exited during the run")
        except BaseException:
            for proc_log in (envoy.log_path, mandate.log_path if mandate else None):
                if proc_log is not None and proc_log.exists():
                    tail = proc_log.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- {proc_log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
            raise
    return {"case": case.key, "label": case.label, "loaded": loaded, "unloaded": unloaded}


# ---------------------------------------------------------------- report


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **machine_base(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "grpcio": package_version("grpcio"),
        "protobuf": package_version("protobuf"),
        "envoy": envoy_version(),
        "wrk": first_line(["wrk", "--version"]).split(" Copyright")[0],
        "envoy_concurrency": 1,
        "mandate_threads": args.threads if args.threads is not None else "default",
        "mandate_workers": args.workers if args.workers is not None else 1,
        "transport": args.transport,
        "telemetry": "tracing+audit on" if args.telemetry else "off",
        "GRPC_EXPERIMENTS": os.environ.get("GRPC_EXPERIMENTS", ""),
        "duration_s": args.duration,
        "latency_duration_s": args.latency_duration,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "request": f"GET http://{HOST}{ALLOWED_PATH} (Host header, origin-form)",
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["case"]: r for r in results}
    base, rbac, man = by["envoy"], by["rbac"], by["mandate"]
    out: dict[str, Any] = {}
    for r in results:
        rps = r["loaded"]["rps"]
        r["rps_vs_envoy"] = _ratio(rps, base["loaded"]["rps"])
        r["rps_vs_rbac"] = _ratio(rps, rbac["loaded"]["rps"])
        r["added_p50_us"] = r["unloaded"]["p50_us"] - base["unloaded"]["p50_us"]
        r["added_p99_us"] = r["unloaded"]["p99_us"] - base["unloaded"]["p99_us"]
    out["mandate_rps_vs_envoy"] = man["rps_vs_envoy"]
    out["mandate_rps_vs_rbac"] = man["rps_vs_rbac"]
    out["mandate_cpu_us_per_check"] = man["loaded"].get("mandate_cpu_us_per_check")
    out["goal_rps_vs_rbac_grpc"] = 0.20
    out["goal_cpu_us_per_check_grpc"] = 100
    out["goal_rps_vs_rbac_http"] = 0.40  # the best transport
    out["goal_cpu_us_per_check_http"] = 35
    return out


def _f(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(info: dict[str, Any], results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    t = info.get("transport", "grpc")
    over = "gRPC" if t == "grpc" else "HTTP"
    head = (
        "| case | req/s (c={c}) | vs Envoy alone | vs RBAC | non-2xx | p50 µs (c=1) | p90 | p99 "
        "| p99.9 | added p50/p99 µs | Envoy CPU µs/req | mandate CPU µs/Check (c={c} / c=1) "
        "| mandate RSS MB |"
    ).format(c=info["connections"])
    lines = [head, "|" + "---|" * 13]
    for r in results:
        ld, ul = r["loaded"], r["unloaded"]
        non2xx = ld["non_2xx"] + ld["socket_errors"] + ul["non_2xx"] + ul["socket_errors"]
        mandate_cpu = (
            f"{_f(ld.get('mandate_cpu_us_per_check'))} / {_f(ul.get('mandate_cpu_us_per_check'))}"
            if "checks" in ld
            else "-"
        )
        lines.append(
            f"| {r['label']} | {_f(ld['rps'])} | {_f(r['rps_vs_envoy'], '{:.1%}')} "
            f"| {_f(r['rps_vs_rbac'], '{:.1%}')} | {non2xx} | {ul['p50_us']} | {ul['p90_us']} "
            f"| {ul['p99_us']} | {ul['p999_us']} | {r['added_p50_us']:+d} / {r['added_p99_us']:+d} "
            f"| {_f(ld['envoy_cpu_us_per_request'], '{:.1f}')} | {mandate_cpu} "
            f"| {_f(ld.get('mandate_rss_mb'), '{:.0f}')} |"
        )
    man = next(r for r in results if r["case"] == "mandate")["loaded"]
    lines += [
        "",
        f"mandate / Envoy alone: {_f(summary['mandate_rps_vs_envoy'], '{:.1%}')} of the "
        f"throughput; mandate / RBAC: {_f(summary['mandate_rps_vs_rbac'], '{:.1%}')} "
        f"(issue 7 goal over {over}: ≥ {summary[f'goal_rps_vs_rbac_{t}']:.0%}).",
        f"mandate CPU per Check under load: {_f(summary['mandate_cpu_us_per_check'], '{:.0f}')} "
        f"µs (goal over {over}: ≤ {summary[f'goal_cpu_us_per_check_{t}']} µs); "
        f"Checks {man.get('checks')} (allowed {man.get('checks_allowed')}, denied "
        f"{man.get('checks_denied')}); Envoy's counters: "
        + ", ".join(f"{k} {v}" for k, v in man["authz"].items())
        + ".",
        "Machine CPU busy during the throughput runs: "
        + ", ".join(f"{r['case']} {r['loaded']['machine_busy_pct']:.0f} %" for r in results)
        + f" (of {info['nproc']} CPUs; wrk, Envoy and mandate share them); CPUs used by "
        "other processes meanwhile: "
        + ", ".join(f"{r['case']} {_f(r['loaded']['other_cpus'], '{:.2f}')}" for r in results)
        + f"; load average before the run: {info['loadavg_before']}.",
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; "
        f"Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, "
        f"Envoy {info['envoy']} (--concurrency 1), {info['wrk']}; pinning: {info['pinning']}; "
        f"mandate transport: {t}; threads: {info['mandate_threads']}; "
        f"workers: {info['mandate_workers']}; "
        f"tracing/audit: {info['telemetry']}; GRPC_EXPERIMENTS="
        f"{info['GRPC_EXPERIMENTS'] or '(unset)'}; git {info['git_commit']}; {info['date']}.",
        f"Load: wrk -t1 -c{info['connections']} for {info['duration_s']:g} s (after "
        f"{info['warmup_s']:g} s warm-up); latency: wrk -t1 -c1 for "
        f"{info['latency_duration_s']:g} s; {info['request']}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    p.add_argument(
        "--latency-duration",
        type=float,
        help="seconds per unloaded latency run (default: --duration)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per case")
    p.add_argument("--connections", type=int, default=16, help="wrk connections under load")
    p.add_argument("--threads", type=int, help="mandate's Check threads (default: mandate's)")
    p.add_argument("--workers", type=int, help="mandate's Check worker processes (default: 1)")
    p.add_argument(
        "--transport",
        choices=sorted(MANDATE_CASES),
        default="grpc",
        help="how Envoy asks mandate: ext_authz grpc_service or http_service (default grpc)",
    )
    p.add_argument(
        "--telemetry",
        action="store_true",
        help="mandate with tracing (every decision, OTLP to a discarding receiver) and audit on",
    )
    p.add_argument("--out", type=Path, default=BENCH / "results", help="results directory")
    args = p.parse_args(argv)
    if args.latency_duration is None:
        args.latency_duration = args.duration
    for name in ("duration", "latency_duration"):
        if not 0 < getattr(args, name) <= 600:
            p.error(f"--{name.replace('_', '-')}: expected 0 < seconds <= 600")
    if not 0 <= args.warmup <= 60 or not 1 <= args.connections <= 1000:
        p.error("--warmup: 0..60 s; --connections: 1..1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "check_throughput: `wrk` is not on PATH. Install it: apt-get install -y wrk",
            file=sys.stderr,
        )
        return 2
    info = machine_info(args)
    results: list[dict[str, Any]] = []
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="mandate-bench-") as tmp:
            work = Path(tmp)
            script = work / "report.lua"
            script.write_text(WRK_SCRIPT)
            for case in (*CASES[:2], MANDATE_CASES[args.transport]):
                results.append(run_case(case, args, work, script))
    except BenchError as exc:
        print(f"check_throughput: aborted: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("check_throughput: interrupted; processes stopped", file=sys.stderr)
        return 130
    summary = summarize(results)
    table = markdown(info, results, summary)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "summary": summary, "results": results}
    # One pair of files per transport: check_throughput.* (gRPC), check_throughput-http.*
    stem = "check_throughput" + ("" if args.transport == "grpc" else f"-{args.transport}")
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(
        "# Check throughput: Envoy alone vs Envoy + RBAC vs Envoy + mandate"
        f" ({args.transport})\n\n"
        "Written by `bench/check_throughput.py`; see bench/README.md for what each column means."
        "\n\n" + table
    )
    print(f"wrote {args.out / stem}.json and {args.out / stem}.md")
    bad = [r["case"] for r in results if r["loaded"]["non_2xx"] or r["loaded"]["socket_errors"]]
    if bad:
        print(f"check_throughput: WARNING: non-2xx or socket errors in {bad}", file=sys.stderr)
    noisy = [r["case"] for r in results if (r["loaded"]["other_cpus"] or 0) > 0.25]
    if noisy:
        print(
            f"check_throughput: WARNING: other processes used over 0.25 CPU during {noisy}; "
            "the figures are noisy, run again on a quiet machine",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
