"""What one authorization costs: real Envoy answering a `direct_response` 200, measured side
by side in one run, three ways that differ only in authorization:

  envoy    Envoy alone, no authorization (the ceiling)              bench/envoy-direct.yaml
  rbac     Envoy's native RBAC HTTP filter, in-process C++ (floor)  bench/envoy-rbac.yaml
  mandate  Envoy + ext_authz gRPC to `mandate run`                  bench/envoy-mandate.yaml
           (--transport http: ext_authz http_service, `mandate run --transport http`,
           bench/envoy-mandate-http.yaml; --http-server lean: its lean server)

The request is `GET /v1/invoices/42` with `Host: ledger.finance.svc.cluster.local`, allowed by
the RBAC policy and by the demo profile's rule reconcile.allow[0] (agent billing-agent). For
each case: a short warm-up, a throughput run (wrk -t1 -c16), then an unloaded latency run
(wrk -t1 -c1). Around each run it reads, from /proc, the CPU time (user+system, all threads) of
Envoy and of mandate, and from Envoy's admin stats and mandate's /metrics how many requests and
Checks were served, giving CPU microseconds per request and per Check. Before measuring, it
checks that the allowed request gets 200 and a denied one (/v1/ledger/admin/x) gets 403, and
that mandate saw both; otherwise it aborts.

With --behaviour, a fourth case joins the mandate one: mandate with behaviour analysis on
(`--access-log 127.0.0.1:0`; Envoy streams its gRPC access log to the supervisor, with the
logger and cluster of envoy/local.yaml), the agent's profile in `enforce` mode with a learning
period that ends during the warm-up, so that the measured calls are scored. Both mandate cases
get the same profiles and a --state-dir (the admin token the script reads the risk score with,
from /v1/status); their stacks run side by side and their runs are interleaved (--rounds
rounds, the order alternating), so that a noisy moment of the machine hits both alike;
mandate's CPU is split into its Check workers and its supervisor (where the access log is
decoded and scored). Written to check_throughput-behaviour.{json,md}.

With --telemetry, mandate traces every decision (OTLP to a discarding receiver in this script)
and audits it. Written to check_throughput-telemetry.{json,md}.

Prints a table with ratios and writes bench/results/check_throughput[-http[-lean]].{json,md}
(-lean: --http-server lean). Everything
listens on 127.0.0.1; Envoy runs with --concurrency 1; processes are not pinned. Needs `wrk`
(apt-get install -y wrk). Run: python -m bench check_throughput [--duration 10]
[--transport grpc|http] [--http-server aiohttp|lean] [--grpc-server threads|aio] [--behaviour]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.lib import RESULTS, BenchError
from bench.lib.load import WRK_SCRIPT, measure, run_wrk
from bench.lib.proc import sigterm_as_interrupt
from bench.lib.report import envoy_version, first_line, machine_base, package_version
from bench.lib.stack import (
    AGENT,
    ALLOWED_PATH,
    BEHAVIOUR,
    BEHAVIOUR_LEARNING_S,
    BEHAVIOUR_WARMUP_S,
    HOST,
    TEMPLATES,
    MandateOptions,
    behaviour_state,
    running_stack,
    verify,
)


@dataclass(frozen=True)
class Case:
    key: str
    template: str
    label: str
    behaviour: bool = False  # mandate with --access-log, Envoy with the ALS logger


CASES = (
    Case("envoy", TEMPLATES["envoy"], "Envoy alone (direct_response)"),
    Case("rbac", TEMPLATES["rbac"], "Envoy + RBAC filter"),
    Case("mandate", TEMPLATES["grpc"], "Envoy + mandate (ext_authz gRPC)"),
)
# The mandate case over each transport (--transport).
MANDATE_CASES = {
    "grpc": CASES[2],
    "http": Case("mandate", TEMPLATES["http"], "Envoy + mandate (ext_authz HTTP)"),
}
# --behaviour: the mandate case again, behaviour analysis on.
BEHAVIOUR_CASES = {
    t: Case("behaviour", c.template, c.label.replace(")", ", behaviour analysis on)"), True)
    for t, c in MANDATE_CASES.items()
}

# ---------------------------------------------------------------- one case


def mandate_options(case: Case, args: argparse.Namespace) -> MandateOptions | None:
    if case.key not in ("mandate", "behaviour"):
        return None
    return MandateOptions(
        transport=args.transport,
        http_server=args.http_server,
        grpc_server=args.grpc_server,
        workers=args.workers,
        threads=args.threads,
        telemetry=args.telemetry,
        behaviour_profile=args.behaviour,  # both mandate cases: the same profiles
        access_log=case.behaviour,
    )


def run_case(case: Case, args: argparse.Namespace, work: Path, script: Path) -> dict[str, Any]:
    print(f"== {case.label}", flush=True)
    behaviour: dict[str, Any] = {}
    options = mandate_options(case, args)
    with running_stack(case.key, case.template, work, options) as stack:
        envoy, mandate, token = stack.envoy, stack.mandate, stack.token
        verify(case.key, envoy, mandate, authorizer=case.key != "envoy")
        print("   verified: allowed request 200" + (", denied 403" if case.key != "envoy" else ""))
        if args.warmup > 0:
            run_wrk(envoy.port, script, args.connections, args.warmup)
        if case.behaviour:
            assert mandate is not None
            time.sleep(0.3)  # Envoy flushes its access log every 0.1 s, mandate scores too
            behaviour["after_warmup"] = state = behaviour_state(mandate, token, AGENT)
            if state["score"] is None or state["learning"] is not False:
                raise BenchError(
                    f"behaviour: after the warm-up {AGENT} is not scored yet ({state}): "
                    "the access log does not reach mandate, or the warm-up is shorter than "
                    "the learning period"
                )
            print(f"   behaviour after warm-up: {state['explanation']}", flush=True)
        loaded = measure(
            envoy, mandate, lambda: run_wrk(envoy.port, script, args.connections, args.duration)
        )
        print(f"   throughput: {loaded['rps']:,.0f} req/s (c={args.connections})", flush=True)
        if case.behaviour:
            assert mandate is not None
            time.sleep(0.3)
            behaviour["after_throughput"] = state = behaviour_state(mandate, token, AGENT)
            print(f"   behaviour after the throughput run: {state['explanation']}", flush=True)
        unloaded = measure(
            envoy,
            mandate,
            lambda: run_wrk(envoy.port, script, 1, args.latency_duration, latency=True),
        )
        print(f"   unloaded p50/p99: {unloaded['p50_us']}/{unloaded['p99_us']} µs", flush=True)
        if case.behaviour:
            assert mandate is not None
            time.sleep(0.3)
            behaviour["after_latency"] = state = behaviour_state(mandate, token, AGENT)
            print(f"   behaviour after the latency run: {state['explanation']}", flush=True)
            if any(s["revocations"] for s in behaviour.values()):
                raise BenchError(f"behaviour: {AGENT} was revoked during the run: {behaviour}")
    out = {"case": case.key, "label": case.label, "loaded": loaded, "unloaded": unloaded}
    if behaviour:
        out["behaviour"] = behaviour
    return out


# Figures of interleaved rounds (run_pair) that add up; the latency percentiles are the
# median over the rounds; per-request and per-Check figures are recomputed from the sums.
_SUMMED = (
    "requests", "duration_us", "bytes", "connect", "read", "write", "status", "timeout",
    "non_2xx", "socket_errors", "wrk_cpu_s", "load_cpu_s", "driver_cpu_s", "envoy_requests",
    "envoy_2xx", "envoy_non_2xx", "envoy_4xx_5xx", "envoy_cpu_s", "checks", "checks_allowed",
    "checks_denied", "mandate_cpu_s", "mandate_workers_cpu_s", "mandate_supervisor_cpu_s",
)  # fmt: skip
_MEDIAN = ("mean_us", "p50_us", "p90_us", "p99_us", "p999_us")
_MEAN = ("machine_busy_pct", "other_cpus")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One set of figures from the rounds of one case (each a `measure` result)."""
    out: dict[str, Any] = dict(runs[-1])  # RSS and the like: after the last round
    for key in _SUMMED:
        if key in out:
            out[key] = sum(r[key] for r in runs)
    for key in _MEDIAN:
        out[key] = statistics.median_low(r[key] for r in runs)
    out["max_us"] = max(r["max_us"] for r in runs)
    for key in _MEAN:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    for key in ("authz", "access_log"):
        out[key] = {k: sum(r[key].get(k, 0) for r in runs) for k in runs[-1][key]}

    def per(num: str, den: str) -> float | None:
        return out[num] / out[den] * 1e6 if out.get(den) else None

    out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
    out["envoy_cpu_us_per_request"] = per("envoy_cpu_s", "envoy_requests")
    if "checks" in out:
        out["mandate_cpu_us_per_check"] = per("mandate_cpu_s", "checks")
        out["mandate_workers_cpu_us_per_check"] = per("mandate_workers_cpu_s", "checks")
        out["mandate_supervisor_cpu_us_per_check"] = per("mandate_supervisor_cpu_s", "checks")
    out["rounds"] = len(runs)
    return out


def run_pair(
    off: Case, on: Case, args: argparse.Namespace, work: Path, script: Path
) -> list[dict[str, Any]]:
    """The two mandate cases of --behaviour, both stacks up at once, their runs interleaved:
    --rounds rounds, each a throughput run of each case (--duration / rounds s), the order
    alternating, then the same for the latency runs; so a noisy moment of the machine hits
    both alike. A case's figures are those of its rounds together (`combine`)."""
    print(f"== {off.label} / {on.label}: {args.rounds} rounds each, interleaved", flush=True)
    behaviour: dict[str, Any] = {}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.key: {"loaded": [], "unloaded": []} for c in (off, on)
    }
    with (
        running_stack(off.key, off.template, work, mandate_options(off, args)) as a,
        running_stack(on.key, on.template, work, mandate_options(on, args)) as b,
    ):
        pairs = ((off, a), (on, b))
        # One stack after the other: verified, then warmed up at once. The behaviour stack's
        # learning period starts with its first call (verify) and ends during its warm-up.
        for case, stack in pairs:
            verify(case.key, stack.envoy, stack.mandate)
            if args.warmup > 0:
                run_wrk(stack.envoy.port, script, args.connections, args.warmup)
        print("   verified (allowed request 200, denied 403) and warmed up: both")
        assert b.mandate is not None

        def state(when: str) -> dict[str, Any]:
            assert b.mandate is not None
            time.sleep(0.3)  # Envoy flushes its access log every 0.1 s, mandate scores too
            behaviour[when] = got = behaviour_state(b.mandate, b.token, AGENT)
            print(f"   behaviour {when.replace('_', ' ')}: {got['explanation']}", flush=True)
            return got

        got = state("after_warmup")
        if got["score"] is None or got["learning"] is not False:
            raise BenchError(
                f"behaviour: after the warm-up {AGENT} is not scored yet ({got}): the access "
                "log does not reach mandate, or the warm-up is shorter than the learning period"
            )
        if (got["score_now"] or 0.0) > 0.2:  # the steady load must not look anomalous
            raise BenchError(f"behaviour: the warm-up's steady load scores high: {got}")
        for run, connections, duration in (
            ("loaded", args.connections, args.duration),
            ("unloaded", 1, args.latency_duration),
        ):
            for r in range(args.rounds):
                for case, stack in pairs if r % 2 == 0 else pairs[::-1]:
                    port = stack.envoy.port
                    result = measure(
                        stack.envoy,
                        stack.mandate,
                        lambda p=port, c=connections, d=duration: run_wrk(
                            p, script, c, d / args.rounds, latency=c == 1
                        ),
                    )
                    runs[case.key][run].append(result)
            for case, _ in pairs:
                got_run = combine(runs[case.key][run])
                print(
                    f"   {case.key} {run}: {got_run['rps']:,.0f} req/s, p50/p99 "
                    f"{got_run['p50_us']}/{got_run['p99_us']} µs",
                    flush=True,
                )
            state("after_throughput" if run == "loaded" else "after_latency")
        if any(s["revocations"] for s in behaviour.values()):
            raise BenchError(f"behaviour: {AGENT} was revoked during the run: {behaviour}")
    out: list[dict[str, Any]] = []
    for case in (off, on):
        r = runs[case.key]
        result: dict[str, Any] = {
            "case": case.key,
            "label": case.label,
            "loaded": combine(r["loaded"]),
            "unloaded": combine(r["unloaded"]),
            "rounds": r,
        }
        if case is on:
            result["behaviour"] = behaviour
        out.append(result)
    return out


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
        "http_server": args.http_server or "default",
        "grpc_server": args.grpc_server or "default",
        "telemetry": "tracing+audit on" if args.telemetry else "off",
        "behaviour": {"profile": {AGENT: BEHAVIOUR}, "access_log": "127.0.0.1:0"}
        if args.behaviour
        else "off",
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
    if "behaviour" in by:
        out["behaviour"] = behaviour_summary(man, by["behaviour"])
    return out


# Per-Check (per-request for Envoy) CPU figures the behaviour comparison adds up.
_CPU_PARTS = (
    ("workers", "mandate_workers_cpu_us_per_check"),
    ("supervisor", "mandate_supervisor_cpu_us_per_check"),
    ("envoy", "envoy_cpu_us_per_request"),
)


def behaviour_summary(off: dict[str, Any], on: dict[str, Any]) -> dict[str, Any]:
    """What behaviour analysis adds: mandate without (``off``) vs with it (``on``), same run."""
    out: dict[str, Any] = {"goal_added_us_per_check": 10}
    for run in ("loaded", "unloaded"):
        a, b = off[run], on[run]
        fig: dict[str, Any] = {"rps_off": a["rps"], "rps_on": b["rps"]}
        total_off = total_on = 0.0
        for name, key in _CPU_PARTS:
            fig[f"{name}_off"], fig[f"{name}_on"] = a.get(key), b.get(key)
            fig[f"added_{name}_us"] = (
                b[key] - a[key] if a.get(key) is not None and b.get(key) is not None else None
            )
            total_off += a.get(key) or 0.0
            total_on += b.get(key) or 0.0
        fig["total_off"], fig["total_on"] = total_off, total_on
        fig["added_total_us"] = total_on - total_off
        out[run] = fig
    out["rps_on_vs_off"] = _ratio(on["loaded"]["rps"], off["loaded"]["rps"])
    for q in ("p50", "p90", "p99", "p999"):
        out[f"added_{q}_us"] = on["unloaded"][f"{q}_us"] - off["unloaded"][f"{q}_us"]
    # The spread of the added CPU over the interleaved rounds (paired: round i of each case).
    if "rounds" in off and "rounds" in on:
        spread: dict[str, Any] = {}
        for name, key in _CPU_PARTS:
            added = [
                b[key] - a[key]
                for a, b in zip(off["rounds"]["loaded"], on["rounds"]["loaded"], strict=True)
                if a.get(key) is not None and b.get(key) is not None
            ]
            if added:
                spread[name] = {"min": min(added), "median": statistics.median(added),
                                "max": max(added)}  # fmt: skip
        out["loaded"]["added_per_round"] = spread
        pairs = list(zip(off["rounds"]["unloaded"], on["rounds"]["unloaded"], strict=True))
        out["added_latency_per_round"] = {
            q: {
                "min": min(b[f"{q}_us"] - a[f"{q}_us"] for a, b in pairs),
                "median": statistics.median(b[f"{q}_us"] - a[f"{q}_us"] for a, b in pairs),
                "max": max(b[f"{q}_us"] - a[f"{q}_us"] for a, b in pairs),
            }
            for q in ("p50", "p99")
        }
    out["risk"] = on.get("behaviour", {})
    out["access_log"] = {**on["loaded"]["access_log"], "requests": on["loaded"]["envoy_requests"]}
    return out


def _f(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def behaviour_markdown(info: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """The behaviour off / on comparison below the main table (nothing without it)."""
    b = summary.get("behaviour")
    if b is None:
        return []
    c = info["connections"]
    ld, ul = b["loaded"], b["unloaded"]

    def pair(name: str, which: str, fmt: str = "{:.1f}") -> str:
        return f"{_f(ld[f'{name}_{which}'], fmt)} / {_f(ul[f'{name}_{which}'], fmt)}"

    def added(name: str) -> str:
        return f"{_f(ld[f'added_{name}_us'], '{:+.1f}')} / {_f(ul[f'added_{name}_us'], '{:+.1f}')}"

    lines = [
        "",
        "Behaviour analysis off → on (the two mandate cases of this run; CPU µs per Check, "
        f"Envoy's per request; c={c} / c=1):",
        "",
        f"| mandate | req/s (c={c}) | CPU workers (Check path) | CPU supervisor (ALS + "
        "scoring) | CPU Envoy | sum |",
        "|---|---|---|---|---|---|",
    ]
    for which, label in (("off", "behaviour off"), ("on", "behaviour on")):
        lines.append(
            f"| {label} | {_f(ld[f'rps_{which}'])} | {pair('workers', which)} "
            f"| {pair('supervisor', which)} | {pair('envoy', which)} | {pair('total', which)} |"
        )
    lines.append(
        f"| added | {_f(b['rps_on_vs_off'], '{:.1%}')} of off | {added('workers')} "
        f"| {added('supervisor')} | {added('envoy')} | {added('total')} |"
    )
    spread = ld.get("added_per_round") or {}
    if spread:
        lines += [
            "",
            f"Added CPU per round (c={c}, paired rounds, min / median / max µs): "
            + "; ".join(
                f"{name} {v['min']:+.1f} / {v['median']:+.1f} / {v['max']:+.1f}"
                for name, v in spread.items()
            )
            + ".",
        ]
    lat = b.get("added_latency_per_round")
    if lat:
        lines.append(
            "Added latency per round (c=1, paired rounds, min / median / max µs): "
            + "; ".join(
                f"{q} {v['min']:+d} / {v['median']:+g} / {v['max']:+d}" for q, v in lat.items()
            )
            + "."
        )
    risk = b["risk"]
    states = ", ".join(
        f"after the {name} {_f(risk[when]['score_now'], '{:.2f}')}"
        for when, name in (
            ("after_warmup", "warm-up"),
            ("after_throughput", "throughput run"),
            ("after_latency", "latency run"),
        )
        if when in risk
    )
    last = risk.get("after_latency") or {}
    als = b["access_log"]
    lines += [
        "",
        f"Latency added at c=1 (the medians over the rounds): p50 {b['added_p50_us']:+d} µs, "
        f"p90 {b['added_p90_us']:+d}, p99 {b['added_p99_us']:+d}. Goal (issue 5): "
        f"≤ {b['goal_added_us_per_check']} µs "
        f"added per Check. {AGENT}'s risk score (learning over, scored every 0.1 s): {states}; "
        f"last published: {last.get('explanation')}; revocations: {last.get('revocations')}. "
        f"Envoy's gRPC access logger under load: {als.get('logs_written', 0)} entries written, "
        f"{als.get('logs_dropped', 0)} dropped, for {als['requests']} requests.",
    ]
    return lines


def markdown(info: dict[str, Any], results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    t = info.get("transport", "grpc")
    over = "gRPC" if t == "grpc" else "HTTP"
    head = (
        "| case | req/s (c={c}) | vs Envoy alone | vs RBAC | non-2xx | p50 µs (c=1) | p90 | p99 "
        "| p99.9 | added p50/p99 µs | Envoy CPU µs/req | mandate CPU µs/Check (c={c} / c=1) "
        "| of which workers / supervisor (c={c}) | mandate RSS MB |"
    ).format(c=info["connections"])
    lines = [head, "|" + "---|" * 14]
    for r in results:
        ld, ul = r["loaded"], r["unloaded"]
        non2xx = ld["non_2xx"] + ld["socket_errors"] + ul["non_2xx"] + ul["socket_errors"]
        mandate_cpu = (
            f"{_f(ld.get('mandate_cpu_us_per_check'))} / {_f(ul.get('mandate_cpu_us_per_check'))}"
            if "checks" in ld
            else "-"
        )
        split = (
            f"{_f(ld.get('mandate_workers_cpu_us_per_check'))} / "
            f"{_f(ld.get('mandate_supervisor_cpu_us_per_check'))}"
            if "checks" in ld
            else "-"
        )
        lines.append(
            f"| {r['label']} | {_f(ld['rps'])} | {_f(r['rps_vs_envoy'], '{:.1%}')} "
            f"| {_f(r['rps_vs_rbac'], '{:.1%}')} | {non2xx} | {ul['p50_us']} | {ul['p90_us']} "
            f"| {ul['p99_us']} | {ul['p999_us']} | {r['added_p50_us']:+d} / {r['added_p99_us']:+d} "
            f"| {_f(ld['envoy_cpu_us_per_request'], '{:.1f}')} | {mandate_cpu} | {split} "
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
        "other processes meanwhile (throughput / latency run): "
        + ", ".join(
            f"{r['case']} {_f(r['loaded']['other_cpus'], '{:.2f}')} / "
            f"{_f(r['unloaded']['other_cpus'], '{:.2f}')}"
            for r in results
        )
        + f"; load average before the run: {info['loadavg_before']}.",
        *behaviour_markdown(info, summary),
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; "
        f"Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, "
        f"Envoy {info['envoy']} (--concurrency 1), {info['wrk']}; pinning: {info['pinning']}; "
        f"mandate transport: {t}"
        + (f" (server {info['http_server']})" if t == "http" else "")
        + (f" (server {info.get('grpc_server', 'default')})" if t == "grpc" else "")
        + f"; threads: {info['mandate_threads']}; "
        f"workers: {info['mandate_workers']}; "
        f"tracing/audit: {info['telemetry']}; "
        + (
            "behaviour analysis: in the last case, "
            + json.dumps(info["behaviour"]["profile"][AGENT], separators=(", ", ": "))
            + "; "
            if isinstance(info.get("behaviour"), dict)
            else ""
        )
        + "GRPC_EXPERIMENTS="
        f"{info['GRPC_EXPERIMENTS'] or '(unset)'}; git {info['git_commit']}; {info['date']}.",
        f"Load: wrk -t1 -c{info['connections']} for {info['duration_s']:g} s (after "
        f"{info['warmup_s']:g} s warm-up); latency: wrk -t1 -c1 for "
        f"{info['latency_duration_s']:g} s; {info['request']}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench check_throughput",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
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
        "--http-server",
        choices=("aiohttp", "lean"),
        help="--transport http: mandate's HTTP server (default: mandate's); lean adds -lean "
        "to the results' names",
    )
    p.add_argument(
        "--grpc-server",
        choices=("threads", "aio"),
        help="--transport grpc: mandate's gRPC server (default: mandate's); aio adds -aio to "
        "the results' names",
    )
    p.add_argument(
        "--telemetry",
        action="store_true",
        help="mandate with tracing (every decision, OTLP to a discarding receiver) and audit on",
    )
    p.add_argument(
        "--behaviour",
        action="store_true",
        help="add a case: mandate with behaviour analysis on (Envoy's gRPC access log to "
        f"--access-log; {AGENT} in enforce mode, learning for {BEHAVIOUR_LEARNING_S} s); "
        f"the warm-up becomes at least {BEHAVIOUR_WARMUP_S} s",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="--behaviour: the two mandate cases run interleaved in this many rounds, each of "
        "--duration / rounds s (default 5)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if args.latency_duration is None:
        args.latency_duration = args.duration
    for name in ("duration", "latency_duration"):
        if not 0 < getattr(args, name) <= 600:
            p.error(f"--{name.replace('_', '-')}: expected 0 < seconds <= 600")
    if not 0 <= args.warmup <= 60 or not 1 <= args.connections <= 1000:
        p.error("--warmup: 0..60 s; --connections: 1..1000")
    if not 1 <= args.rounds <= 50:
        p.error("--rounds: 1..50")
    if args.behaviour and args.warmup < BEHAVIOUR_WARMUP_S:
        # The learning period must end during the warm-up: the measured calls are scored.
        args.warmup = float(BEHAVIOUR_WARMUP_S)
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
            mandate_case = MANDATE_CASES[args.transport]
            if args.transport == "http" and args.http_server == "lean":
                mandate_case = replace(mandate_case, label="Envoy + mandate (ext_authz HTTP, lean)")
            if args.transport == "grpc" and args.grpc_server == "aio":
                mandate_case = replace(mandate_case, label="Envoy + mandate (ext_authz gRPC, aio)")
            cases = [*CASES[:2]] + ([] if args.behaviour else [mandate_case])
            for case in cases:
                results.append(run_case(case, args, work, script))
            if args.behaviour:
                off, on = MANDATE_CASES[args.transport], BEHAVIOUR_CASES[args.transport]
                results += run_pair(off, on, args, work, script)
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
    # One pair of files per variant: check_throughput.* (gRPC), check_throughput-http.*;
    # -telemetry and -behaviour added with --telemetry and --behaviour (e.g.
    # check_throughput-http-behaviour.*).
    stem = "check_throughput" + ("" if args.transport == "grpc" else f"-{args.transport}")
    stem += "-lean" if args.transport == "http" and args.http_server == "lean" else ""
    stem += "-aio" if args.transport == "grpc" and args.grpc_server == "aio" else ""
    stem += "-telemetry" if args.telemetry else ""
    stem += "-behaviour" if args.behaviour else ""
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(
        "# Check throughput: Envoy alone vs Envoy + RBAC vs Envoy + mandate"
        + (", behaviour analysis off vs on" if args.behaviour else "")
        + f" ({args.transport}{', lean server' if '-lean' in stem else ''}"
        + f"{', aio server' if '-aio' in stem else ''})\n\n"
        "Written by `python -m bench check_throughput`; see bench/README.md for what each "
        "column means."
        "\n\n" + table
    )
    print(f"wrote {args.out / stem}.json and {args.out / stem}.md")
    bad = [r["case"] for r in results if r["loaded"]["non_2xx"] or r["loaded"]["socket_errors"]]
    if bad:
        print(f"check_throughput: WARNING: non-2xx or socket errors in {bad}", file=sys.stderr)
    noisy = [
        r["case"]
        for r in results
        if max(r["loaded"]["other_cpus"] or 0, r["unloaded"]["other_cpus"] or 0) > 0.25
    ]
    if noisy:
        print(
            f"check_throughput: WARNING: other processes used over 0.25 CPU during {noisy}; "
            "the figures are noisy, run again on a quiet machine",
            file=sys.stderr,
        )
    return 0
