"""What tracing and the audit trail cost a Check (issue 4): real Envoy + `mandate run` (gRPC
or HTTP transport, 1 worker), wrk -t1 -c16 for --duration s per run, in four configurations:

  off     no tracing, no audit trail
  audit   --audit-dir (every decision, allows too; fsync interval)
  trace   --otlp-endpoint: every decision a span (100 % sampled: the load sends no
          traceparent, so each span is a root), exported over OTLP/gRPC to a receiver in
          this process that drops them
  both    audit + trace

The configurations run in --rounds rounds, in order within a round, each on a fresh stack, so
that a noisy moment of the machine spreads over all of them. Reports per configuration the
median over rounds of req/s and of mandate's CPU per Check (all its processes and threads,
from /proc), and the cost relative to `off` (issue 4's goal: `both` within 20 % of `off`'s
throughput). Writes bench/results/telemetry_cost.{md,json}.

--pin puts mandate (all its processes and threads) on a CPU of its own and Envoy, wrk, this
script and its receiver on the other (bench.lib.proc.plan_pinning): mandate is then the bottleneck
and other parties' noise stays off its CPU, so rounds vary less.

Run: python -m bench telemetry_cost [--duration 8] [--rounds 3] [--transport grpc]
     [--pin]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib import RESULTS, BenchError
from bench.lib.load import WRK_SCRIPT, run_wrk
from bench.lib.proc import Pinning, pin_tree, plan_pinning, tree_cpu_seconds
from bench.lib.report import machine_base, write_results
from bench.lib.stack import (
    TEMPLATES,
    MandateOptions,
    discarding_otlp_receiver,
    running_stack,
    verify,
)

CASES = ("off", "audit", "trace", "both")


def run_once(
    case: str, transport: str, args: argparse.Namespace, work: Path, pinning: Pinning | None
) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    script = work / "report.lua"
    script.write_text(WRK_SCRIPT)
    with contextlib.ExitStack() as stack:
        extra: list[str] = []
        if case in ("audit", "both"):
            extra += ["--audit-dir", str(work / f"audit-{case}-{time.monotonic_ns()}")]
        if case in ("trace", "both"):
            port = stack.enter_context(discarding_otlp_receiver())
            extra += ["--otlp-endpoint", f"http://127.0.0.1:{port}"]
        opts = MandateOptions(transport=transport, threads=args.threads, extra=tuple(extra))
        s = stack.enter_context(
            running_stack(case, TEMPLATES[transport], work, opts, pinning=pinning)
        )
        assert s.mandate is not None
        verify(case, s.envoy, s.mandate)
        run_wrk(s.envoy.port, script, args.connections, args.warmup)
        if pinning is not None:  # threads started since (gRPC pools, exporters) inherit; re-check
            pin_tree(s.envoy.proc.pid, pinning.envoy)
            pin_tree(s.mandate.proc.pid, pinning.mandate)
        cpu0 = tree_cpu_seconds(s.mandate.proc.pid)
        load = run_wrk(s.envoy.port, script, args.connections, args.duration)
        cpu = tree_cpu_seconds(s.mandate.proc.pid) - cpu0
    if load["non_2xx"] or load["socket_errors"]:
        raise BenchError(f"{case}: {load['non_2xx']} non-2xx, {load['socket_errors']} errors")
    return {"rps": load["rps"], "cpu_us_per_check": cpu / load["requests"] * 1e6}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med = {
        c: {
            "rps": statistics.median(r["rps"] for r in rs),
            "cpu_us_per_check": statistics.median(r["cpu_us_per_check"] for r in rs),
        }
        for c, rs in runs.items()
    }
    base = med["off"]
    for c in med:
        med[c]["throughput_cost_pct"] = 100 * (1 - med[c]["rps"] / base["rps"])
        med[c]["added_cpu_us"] = med[c]["cpu_us_per_check"] - base["cpu_us_per_check"]
    return med


def markdown(info: dict[str, Any], runs: dict[str, Any], med: dict[str, Any]) -> str:
    out = [
        "# What tracing and the audit trail cost a Check",
        "",
        "Written by `python -m bench telemetry_cost`; see its docstring. "
        f"Transport {info['transport']}, 1 worker, {info['threads'] or 'default'} Check "
        f"threads, wrk -t1 -c{info['connections']}, "
        f"{info['duration']:g} s per run, {info['rounds']} rounds (medians). "
        f"Pinning: {info['pinning']}.",
        "",
        "| configuration | req/s | throughput cost vs off | mandate CPU µs/Check | added µs "
        "| req/s per round |",
        "|---|---|---|---|---|---|",
    ]
    for c in runs:
        m = med[c]
        per_round = ", ".join(f"{r['rps']:,.0f}" for r in runs[c])
        out.append(
            f"| {c} | {m['rps']:,.0f} | {m['throughput_cost_pct']:.1f}% | "
            f"{m['cpu_us_per_check']:.0f} | {m['added_cpu_us']:+.0f} | {per_round} |"
        )
    if "both" in med:
        verdict = "met" if med["both"]["throughput_cost_pct"] <= 20 else "missed"
        out += [
            "",
            f"Issue 4 goal (tracing + audit within 20 % of off's throughput): "
            f"{med['both']['throughput_cost_pct']:.1f}%: {verdict}.",
        ]
    out += [
        "",
        f"Machine: {info['machine']}; git {info.get('git', '?')}; {info['when']}.",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench telemetry_cost", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--transport", choices=["grpc", "http"], default="grpc")
    p.add_argument("--threads", type=int, default=None, help="mandate's Check threads")
    p.add_argument("--cases", default=",".join(CASES), help="a subset of " + ",".join(CASES))
    p.add_argument("--name", default="", help="results file stem (default telemetry_cost)")
    p.add_argument("--pin", action="store_true", help="mandate on a CPU of its own")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    pinning = plan_pinning() if args.pin else None
    if pinning is not None:
        os.sched_setaffinity(0, pinning.load)  # this script, its receiver and wrk
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if "off" not in cases or any(c not in CASES for c in cases):
        p.error(f"--cases: a subset of {','.join(CASES)} that includes off")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="mandate-telemetry-") as tmp:
        for r in range(args.rounds):
            for case in cases:
                result = run_once(case, args.transport, args, Path(tmp) / f"r{r}", pinning)
                runs[case].append(result)
                print(
                    f"round {r + 1}/{args.rounds} {case:5}: {result['rps']:,.0f} req/s, "
                    f"{result['cpu_us_per_check']:.0f} µs/Check",
                    flush=True,
                )
    med = summarize(runs)
    base = machine_base()
    info = {
        "transport": args.transport,
        "connections": args.connections,
        "threads": args.threads,
        "duration": args.duration,
        "rounds": args.rounds,
        "pinning": pinning.describe() if pinning else "none",
        "machine": f"{base.get('nproc')} CPUs, {base.get('cpu_model', '?')}",
        "git": base.get("git_commit"),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    stem = args.out / (
        args.name
        or ("telemetry_cost" if args.transport == "grpc" else f"telemetry_cost-{args.transport}")
    )
    write_results(stem, {"info": info, "runs": runs, "median": med}, markdown(info, runs, med))
    return 0
