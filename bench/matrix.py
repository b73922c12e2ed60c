"""The benchmark matrix (`make bench`): real Envoy answering a `direct_response` 200, in one
run on one machine, as

  (a) envoy     Envoy alone, no authorization (the ceiling)            bench/envoy-direct.yaml
  (b) rbac      Envoy's native RBAC filter, a policy equivalent to the demo profile's rule
                that allows the request (the floor for any authorizer) bench/envoy-rbac.yaml
  (c) mandate   Envoy + ext_authz to `mandate run` with the demo profiles, once per mandate
                configuration: transport (grpc|http), worker processes, tracing + audit
                (off|on), behaviour analysis (off|on)

each under four loads: closed loop at a fixed concurrency (wrk -t1 -c16, -c64) and open loop
at a fixed rate (bench/openloop.py, 1000 and 3000 req/s, latency from each request's
scheduled send time). For every case and load: req/s, p50 / p99 / p99.9, Envoy's CPU per
request, mandate's CPU per Check (all its processes and threads, /proc), mandate's RSS, and
each figure as a ratio to (b) under the same load in the same run. Before the loads, `mandate
run` is started a few times per (transport, workers) to time start → /readyz 200 and to read
its idle RSS, and once as the injector starts it in a pod (its defaults: Kubernetes on
against the API server emulation, the access log service, the context API; bench/
memory_breakdown.py --pod) for the idle memory a pod pays. Issue 20's goals are checked in
a table of their own: the first transport of --transports is the default one (the
injector's, http), and each goal of the issue is a column.

Default matrix: a baseline configuration (the first value of each dimension: grpc, 1 worker,
telemetry off, behaviour off), one configuration per other value of each dimension (the
baseline with that one value changed), and one with every dimension at its last value (http,
2 workers, telemetry on, behaviour on); --full runs the whole cross product. --dry-run lists
the cases and the expected duration. --pin puts Envoy, mandate and the load generator on
CPUs of their own (bench.lib.proc.Pinning).

Writes bench/results/matrix.{json,md,png} (--out, --name). Needs `wrk` (apt-get install -y
wrk) and matplotlib (dev extras) for the plot. Everything listens on 127.0.0.1; Envoy runs
with --concurrency 1. Run: python -m bench matrix [--duration 15] [--full] [--pin]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.lib import RESULTS, BenchError
from bench.lib.load import WRK_SCRIPT, measure, run_openloop, run_wrk
from bench.lib.proc import (
    Pinning,
    pin_tree,
    plan_pinning,
    sigterm_as_interrupt,
    tree_affinity,
    tree_pss_mb,
    tree_rss_mb,
)
from bench.lib.report import envoy_version, first_line, machine_base, package_version
from bench.lib.stack import (
    AGENT,
    ALLOWED_PATH,
    BEHAVIOUR,
    BEHAVIOUR_WARMUP_S,
    HOST,
    TEMPLATES,
    MandateOptions,
    Stack,
    behaviour_state,
    running_stack,
    start_to_ready,
    verify,
)

# Issue 20's goals (issue 7's start-up goal stands).
GOAL_ADDED_P99_US = {1000: 400, 3000: 400}  # added p99 over Envoy alone at that rate
GOAL_ADDED_P50_C1_US = 150  # added p50 over Envoy alone at one connection
GOAL_POD_VCPU_AT_1000 = 0.20  # Envoy + mandate at 1,000 req/s (Istio's sidecar)
GOAL_IDLE_RSS_MB = 45  # mandate's idle RSS, all processes, as injected in a pod
GOAL_READY_S = 1.0  # start -> /readyz 200, median (issue 7)
GOAL_RPS_VS_RBAC = {"grpc": 0.12, "http": 0.40}  # at c=16: default transport 40 %, gRPC 12 %
TIMES = "\u00d7"  # the multiplication sign of ratios and counts
NOISE_CPUS = 0.25  # other processes' CPUs above which a figure is flagged as noisy
SETTLE_S = 0.5  # pause between two loads of a case
# Per-case and per-load overheads of the duration estimate (s): start and stop of Envoy and
# mandate, the probes; openloop.py's start and drain; one `mandate run` start and its idle wait.
CASE_OVERHEAD_S = 2.0
LOAD_OVERHEAD_S = 0.3
START_OVERHEAD_S = 2.6
OPENLOOP_START_S = 0.3


@dataclass(frozen=True)
class Config:
    """One mandate configuration of the matrix."""

    transport: str
    workers: int
    telemetry: bool
    behaviour: bool

    @property
    def key(self) -> str:
        return f"mandate-{self.transport}-w{self.workers}" + "".join(
            f"-{name}" for name, on in (("tel", self.telemetry), ("beh", self.behaviour)) if on
        )

    @property
    def label(self) -> str:
        on = [
            name
            for name, v in (("tracing+audit", self.telemetry), ("behaviour", self.behaviour))
            if v
        ]
        return (
            f"mandate {self.transport}, {self.workers} worker{'s' if self.workers > 1 else ''}"
            + (f", {' + '.join(on)}" if on else "")
        )


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    template: str
    config: Config | None = None  # None: no mandate


@dataclass(frozen=True)
class Load:
    key: str
    label: str
    concurrency: int = 0  # closed loop (wrk) ...
    rate: float = 0.0  # ... or open loop (openloop.py)


@dataclass
class Dimensions:
    transports: list[str]
    workers: list[int]
    telemetry: list[bool]
    behaviour: list[bool]


def plan_configs(d: Dimensions, full: bool) -> list[Config]:
    """--full: the cross product. Else: the baseline (every dimension's first value), the
    baseline with one dimension changed (each of its other values), and every dimension at its
    last value; without duplicates, in that order."""
    if full:
        product = itertools.product(d.transports, d.workers, d.telemetry, d.behaviour)
        return [Config(*c) for c in product]
    base = Config(d.transports[0], d.workers[0], d.telemetry[0], d.behaviour[0])
    out = [base]
    for name, values in (
        ("transport", d.transports),
        ("workers", d.workers),
        ("telemetry", d.telemetry),
        ("behaviour", d.behaviour),
    ):
        for v in values[1:]:
            out.append(Config(**{**base.__dict__, name: v}))
    out.append(Config(d.transports[-1], d.workers[-1], d.telemetry[-1], d.behaviour[-1]))
    return list(dict.fromkeys(out))


def plan_cases(configs: Sequence[Config]) -> list[Case]:
    cases = [
        Case("envoy", "(a) Envoy alone (direct_response)", TEMPLATES["envoy"]),
        Case("rbac", "(b) Envoy + RBAC filter", TEMPLATES["rbac"]),
    ]
    cases += [Case(c.key, f"(c) {c.label}", TEMPLATES[c.transport], c) for c in configs]
    return cases


def plan_loads(concurrency: Sequence[int], rates: Sequence[float]) -> list[Load]:
    loads = [
        Load(f"c{c}", f"{c} connections (wrk, closed loop)", concurrency=c) for c in concurrency
    ]
    loads += [Load(f"r{r:g}", f"{r:,.0f} req/s (openloop.py, open loop)", rate=r) for r in rates]
    return loads


def startup_configs(configs: Sequence[Config]) -> list[tuple[str, int]]:
    """The (transport, workers) pairs of the matrix, in order: one start-up measure each."""
    out: list[tuple[str, int]] = []
    for c in configs:
        if (c.transport, c.workers) not in out:
            out.append((c.transport, c.workers))
    return out


def estimate_s(args: argparse.Namespace, cases: Sequence[Case], loads: Sequence[Load]) -> float:
    """Seconds the run should take (overheads measured on a 2-CPU machine)."""
    configs = [c.config for c in cases if c.config]
    duration: float = args.duration
    starts: int = args.starts
    total = len(startup_configs(configs)) * starts * START_OVERHEAD_S
    for case in cases:
        warmup: float = args.warmup
        if case.config and case.config.behaviour:
            warmup = max(warmup, BEHAVIOUR_WARMUP_S)
        total += CASE_OVERHEAD_S + warmup
        for load in loads:
            total += duration + LOAD_OVERHEAD_S + SETTLE_S
            total += OPENLOOP_START_S if load.rate else 0.0
    return total


# ---------------------------------------------------------------- running


def run_load(load: Load, stack: Stack, args: argparse.Namespace, script: Path) -> dict[str, Any]:
    """One load on a running stack, measured (bench.lib.load.measure)."""
    envoy = stack.envoy

    def go() -> dict[str, Any]:
        if load.concurrency:
            return run_wrk(envoy.port, script, load.concurrency, args.duration)
        return run_openloop(
            envoy.port, load.rate, args.duration, connections=args.connections, drain=args.drain
        )

    result = measure(envoy, stack.mandate, go)
    result["kind"] = "closed" if load.concurrency else "open"
    return result


def run_case(
    case: Case,
    loads: Sequence[Load],
    args: argparse.Namespace,
    work: Path,
    script: Path,
    pinning: Pinning | None,
) -> dict[str, Any]:
    print(f"== {case.label}", flush=True)
    cfg = case.config
    options = None
    if cfg is not None:
        options = MandateOptions(
            transport=cfg.transport,
            workers=cfg.workers,
            threads=args.threads,
            telemetry=cfg.telemetry,
            behaviour_profile=cfg.behaviour,
            access_log=cfg.behaviour,
        )
    out: dict[str, Any] = {
        "case": case.key,
        "label": case.label,
        "config": None if cfg is None else cfg.__dict__,
        "loads": {},
    }
    behaviour: dict[str, Any] = {}
    with running_stack(case.key, case.template, work, options, pinning=pinning) as stack:
        envoy, mandate = stack.envoy, stack.mandate
        verify(case.key, envoy, mandate, authorizer=case.key != "envoy")
        out["idle_envoy_rss_mb"] = tree_rss_mb(envoy.proc.pid)
        if mandate is not None:
            out["idle_mandate_rss_mb"] = tree_rss_mb(mandate.proc.pid)
            out["idle_mandate_pss_mb"] = tree_pss_mb(mandate.proc.pid)
        # Warm-up at the highest concurrency: with behaviour analysis on, that load is what
        # the agent's baseline is learned from, and no later load is busier.
        warmup = args.warmup
        if cfg is not None and cfg.behaviour:
            warmup = max(warmup, BEHAVIOUR_WARMUP_S)
        if warmup > 0:
            run_wrk(envoy.port, script, max(args.concurrency or [16]), warmup)
        if cfg is not None and cfg.behaviour:
            assert mandate is not None
            time.sleep(0.3)  # Envoy flushes its access log every 0.1 s, mandate scores too
            behaviour["after_warmup"] = state = behaviour_state(mandate, stack.token, AGENT)
            if state["score"] is None or state["learning"] is not False:
                raise BenchError(
                    f"{case.key}: after the warm-up {AGENT} is not scored yet ({state}): the "
                    "access log does not reach mandate, or the warm-up is shorter than the "
                    "learning period"
                )
        for load in loads:
            if pinning is not None:  # threads started since (gRPC pools) inherit; a re-check
                pin_tree(envoy.proc.pid, pinning.envoy)
                if mandate is not None:
                    pin_tree(mandate.proc.pid, pinning.mandate)
            r = run_load(load, stack, args, script)
            out["loads"][load.key] = r
            bound = "≥" if r.get("p99_lower_bound") else ""
            print(
                f"   {load.key:>6}: {r['rps']:>9,.0f} req/s, p50 {r['p50_us'] / 1e3:.2f} ms, "
                f"p99 {bound}{r['p99_us'] / 1e3:.2f} ms"
                + (
                    f", mandate {r['mandate_cpu_us_per_check']:.0f} µs/Check"
                    if r.get("mandate_cpu_us_per_check")
                    else ""
                )
                + f", others {r['other_cpus'] or 0:.2f} CPU",
                flush=True,
            )
            if cfg is not None and cfg.behaviour:
                assert mandate is not None
                time.sleep(0.3)
                behaviour[f"after_{load.key}"] = state = behaviour_state(
                    mandate, stack.token, AGENT
                )
                if state["revocations"]:
                    raise BenchError(f"{case.key}: {AGENT} was revoked during {load.key}: {state}")
            time.sleep(SETTLE_S)
        out["affinity"] = {"envoy": tree_affinity(envoy.proc.pid)}
        if mandate is not None:
            out["affinity"]["mandate"] = tree_affinity(mandate.proc.pid)
    if behaviour:
        out["behaviour"] = behaviour
    return out


def run_startup(
    configs: Sequence[Config], args: argparse.Namespace, work: Path, pinning: Pinning | None
) -> list[dict[str, Any]]:
    out = []
    for transport, workers in startup_configs(configs):
        print(f"== start → ready: mandate {transport}, {workers} worker(s) {TIMES} {args.starts}")
        extra = ["--agent", AGENT, "--kubernetes", "off", "--log-level", "WARNING"]
        extra += ["--transport", transport, "--workers", str(workers)]
        r = start_to_ready(
            work / f"start-{transport}-w{workers}",
            extra=extra,
            repeats=args.starts,
            cpus=pinning.mandate if pinning else None,
        )
        r |= {"transport": transport, "workers": workers}
        print(
            f"   median {r['median_ready_s'] * 1e3:.0f} ms (max {r['max_ready_s'] * 1e3:.0f}); "
            f"idle RSS {r['median_idle_rss_mb']:.0f} MB, PSS {r['median_idle_pss_mb']:.0f} MB",
            flush=True,
        )
        out.append(r)
    return out


# ---------------------------------------------------------------- figures


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def derive(results: list[dict[str, Any]], loads: Sequence[Load]) -> None:
    """Add to every case's load results: the totals over Envoy and mandate, each figure as a
    ratio to (b) under the same load (`vs_rbac`), and the latency added over (a)."""
    by = {r["case"]: r for r in results if "loads" in r}
    for r in results:
        for load in loads:
            x = r.get("loads", {}).get(load.key)
            if x is None:
                continue
            served = x["envoy_requests"]
            cpu_all = x["envoy_cpu_s"] + x.get("mandate_cpu_s", 0.0)
            x["cpu_us_per_request_all"] = cpu_all / served * 1e6 if served else None
            x["rss_mb_all"] = x["envoy_rss_mb"] + x.get("mandate_rss_mb", 0.0)
            # The pod's cost: Envoy + mandate, in CPUs over the load's wall time.
            wall = x.get("wall_s")
            x["vcpu_all"] = cpu_all / wall if wall else None
            # Non-2xx as the client saw them or as Envoy counted them, whichever is more.
            x["errors"] = (
                max(x["non_2xx"], x["envoy_4xx_5xx"]) + x["socket_errors"] + x.get("incomplete", 0)
            )
            x["overloaded"] = bool(
                load.rate and (x.get("incomplete") or (x["rps"] or 0) < 0.95 * load.rate)
            )
    for r in results:
        for load in loads:
            x = r.get("loads", {}).get(load.key)
            if x is None:
                continue
            b = by.get("rbac", {}).get("loads", {}).get(load.key)
            a = by.get("envoy", {}).get("loads", {}).get(load.key)
            if b is not None:
                x["vs_rbac"] = {
                    k: _ratio(x.get(k), b.get(k))
                    for k in (
                        "rps",
                        "p50_us",
                        "p99_us",
                        "p999_us",
                        "envoy_cpu_us_per_request",
                        "cpu_us_per_request_all",
                        "rss_mb_all",
                    )
                }
            if a is not None and r["case"] != "envoy":
                x["added_vs_envoy_us"] = {
                    q: x[q] - a[q]
                    for q in ("p50_us", "p99_us", "p999_us")
                    if x.get(q) is not None and a.get(q) is not None
                }


def _goal(
    kind: str, goal: str, case: str, target: str, measured: float | None, unit: str, met: Any
) -> dict[str, Any]:
    return {"kind": kind, "goal": goal, "case": case, "target": target, "measured": measured,
            "unit": unit, "met": None if measured is None else bool(met)}  # fmt: skip


def goals(
    results: list[dict[str, Any]],
    startup: list[dict[str, Any]],
    loads: Sequence[Load],
    pod: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Issue 20's goals, one row per (goal, case): target, measured, met. ``pod``: the idle
    memory of mandate as injected (`pod_memory`)."""
    out: list[dict[str, Any]] = []
    mandates = [r for r in results if r.get("config") and "loads" in r]
    for r in mandates:
        c1 = r["loads"].get("c1")
        added = (c1 or {}).get("added_vs_envoy_us", {}).get("p50_us")
        out.append(_goal(
            "load", "added p50 over (a) at 1 connection", r["label"],
            f"≤ {GOAL_ADDED_P50_C1_US} µs", None if added is None else added / 1e3, "ms",
            added is not None and added <= GOAL_ADDED_P50_C1_US,
        ))  # fmt: skip
    for load in loads:
        target = GOAL_ADDED_P99_US.get(int(load.rate)) if load.rate else None
        if target is None:
            continue
        for r in mandates:
            x = r["loads"].get(load.key)
            added = (x or {}).get("added_vs_envoy_us", {}).get("p99_us")
            lower = bool(x and x.get("p99_lower_bound"))
            row = _goal(
                "load", f"added p99 over (a) at {load.rate:,.0f} req/s", r["label"],
                f"≤ {target / 1e3:g} ms", None if added is None else added / 1e3, "ms",
                added is not None and added <= target and not lower,
            )  # fmt: skip
            row["lower_bound"] = lower
            out.append(row)
    for r in mandates:
        x = r["loads"].get("r1000")
        vcpu = (x or {}).get("vcpu_all")
        out.append(_goal(
            "load", "Envoy + mandate vCPU at 1,000 req/s", r["label"],
            f"≤ {GOAL_POD_VCPU_AT_1000:.2f}", vcpu, "vCPU",
            vcpu is not None and vcpu <= GOAL_POD_VCPU_AT_1000,
        ))  # fmt: skip
    for r in mandates:
        x = r["loads"].get("c16")
        t = r["config"]["transport"]
        rps = ((x or {}).get("vs_rbac") or {}).get("rps")
        out.append(_goal(
            "load", "req/s at 16 connections vs (b)", r["label"],
            f"≥ {GOAL_RPS_VS_RBAC[t]:.0%}", rps, "ratio",
            rps is not None and rps >= GOAL_RPS_VS_RBAC[t],
        ))  # fmt: skip
    if pod is not None:
        out.append(_goal(
            "startup", "idle RSS, all processes", f"as injected in a pod ({pod['transport']})",
            f"≤ {GOAL_IDLE_RSS_MB} MB", pod["rss_mb"], "MB", pod["rss_mb"] <= GOAL_IDLE_RSS_MB,
        ))  # fmt: skip
    for s in startup:
        label = f"mandate {s['transport']}, {s['workers']} worker{'s' if s['workers'] > 1 else ''}"
        out.append(_goal(
            "startup", "idle RSS, all processes", label, f"≤ {GOAL_IDLE_RSS_MB} MB",
            s["median_idle_rss_mb"], "MB", s["median_idle_rss_mb"] <= GOAL_IDLE_RSS_MB,
        ))  # fmt: skip
        out.append(_goal(
            "startup", "start → /readyz 200, median", label, f"≤ {GOAL_READY_S:g} s",
            s["median_ready_s"], "s", s["median_ready_s"] <= GOAL_READY_S,
        ))  # fmt: skip
    return out


def pod_memory(work: Path, idle_s: float = 2.0) -> dict[str, Any]:
    """mandate as the injector starts it in a pod (bench/memory_breakdown.py --pod), idle:
    its RSS and PSS, all processes."""
    from bench.lib import PROFILES
    from bench.lib.stack import unlimited_profiles
    from bench.memory_breakdown import pod_mandate

    work.mkdir(parents=True, exist_ok=True)
    with pod_mandate(work, unlimited_profiles(PROFILES, work)) as (mandate, env):
        time.sleep(idle_s)
        return {
            "transport": env["MANDATE_TRANSPORT"],
            "workers": int(env["MANDATE_WORKERS"]),
            "rss_mb": tree_rss_mb(mandate.proc.pid),
            "pss_mb": tree_pss_mb(mandate.proc.pid),
        }


# ---------------------------------------------------------------- report


def _num(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _ms(us: float | None, lower: bool = False) -> str:
    if us is None:
        return "-"
    ms = us / 1e3
    text = f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:,.0f}"
    return ("≥" if lower else "") + text


def _x(r: float | None) -> str:
    if r is None:
        return ""
    return f" {TIMES}" + (f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 100 else f"{r:,.0f}")


def load_table(results: list[dict[str, Any]], load: Load) -> list[str]:
    open_loop = bool(load.rate)
    head = (
        "| case | req/s | p50 ms | p99 ms | p99.9 ms | added p50 / p99 over (a), ms "
        "| Envoy CPU µs/req | mandate CPU µs/Check (workers / supervisor) "
        "| CPU µs/req, Envoy + mandate | RSS MB, Envoy + mandate (mandate) | errors "
        + ("| generator lag p99 ms " if open_loop else "")
        + "| others' CPUs |"
    )
    lines = [head, "|" + "---|" * (12 if open_loop else 11)]
    for r in results:
        x = r.get("loads", {}).get(load.key)
        if x is None:
            continue
        v = x.get("vs_rbac") or {}
        added = x.get("added_vs_envoy_us") or {}
        mandate = "-"
        if x.get("mandate_cpu_us_per_check") is not None:
            mandate = (
                f"{x['mandate_cpu_us_per_check']:.0f} "
                f"({_num(x.get('mandate_workers_cpu_us_per_check'))} / "
                f"{_num(x.get('mandate_supervisor_cpu_us_per_check'))})"
            )
        rss = _num(x["rss_mb_all"]) + _x(v.get("rss_mb_all"))
        if x.get("mandate_rss_mb") is not None:
            rss += f" ({x['mandate_rss_mb']:.0f})"
        rps = _num(x["rps"]) + _x(v.get("rps"))
        if x.get("overloaded"):
            rps += " **overloaded**"
        other = x.get("other_cpus")
        noisy = " ⚠" if other is not None and other > NOISE_CPUS else ""
        lines.append(
            f"| {r['label']} | {rps} "
            f"| {_ms(x['p50_us'], x.get('p50_lower_bound', False))}{_x(v.get('p50_us'))} "
            f"| {_ms(x['p99_us'], x.get('p99_lower_bound', False))}{_x(v.get('p99_us'))} "
            f"| {_ms(x['p999_us'], x.get('p999_lower_bound', False))}{_x(v.get('p999_us'))} "
            f"| {_ms(added.get('p50_us'))} / {_ms(added.get('p99_us'))} "
            f"| {_num(x['envoy_cpu_us_per_request'], '{:.1f}')}"
            f"{_x(v.get('envoy_cpu_us_per_request'))} "
            f"| {mandate} "
            f"| {_num(x['cpu_us_per_request_all'], '{:.1f}')}{_x(v.get('cpu_us_per_request_all'))} "
            f"| {rss} | {x['errors']} "
            + (f"| {_ms(x.get('lag_p99_us'))} " if open_loop else "")
            + f"| {_num(other, '{:.2f}')}{noisy} |"
        )
    return lines


def _goal_value(g: dict[str, Any]) -> str:
    m = g["measured"]
    if m is None:
        return "-"
    if g["unit"] == "ratio":
        return f"{m:.1%}"
    if g["unit"] == "ms":
        text = f"{m:+.2f}" if abs(m) < 10 else f"{m:+.1f}" if abs(m) < 100 else f"{m:+,.0f}"
        return ("≥ " if g.get("lower_bound") else "") + text + " ms"
    if g["unit"] == "s":
        return f"{m * 1e3:.0f} ms"
    if g["unit"] == "vCPU":
        return f"{m:.3f} vCPU"
    return f"{m:.1f} {g['unit']}"


def goals_table(rows: list[dict[str, Any]]) -> list[str]:
    """One row per case, one column per goal (its target in the header, or in the cell when
    it depends on the case, e.g. the transport); each cell: the measure, met or **missed**."""
    if not rows:
        return []
    goal_names = list(dict.fromkeys(g["goal"] for g in rows))
    case_names = list(dict.fromkeys(g["case"] for g in rows))
    targets = {n: {g["target"] for g in rows if g["goal"] == n} for n in goal_names}
    cells = {(g["case"], g["goal"]): g for g in rows}
    head = [
        n + (f" ({next(iter(targets[n]))})" if len(targets[n]) == 1 else "") for n in goal_names
    ]
    lines = ["| case | " + " | ".join(head) + " |", "|---|" + "---|" * len(goal_names)]
    for case in case_names:
        out = []
        for n in goal_names:
            g = cells.get((case, n))
            if g is None:
                out.append("")
                continue
            text = _goal_value(g) + (f" ({g['target']})" if len(targets[n]) > 1 else "")
            if g["met"] is not None:
                text = f"{text}: met" if g["met"] else f"**{text}: missed**"
            out.append(text)
        lines.append(f"| {case} | " + " | ".join(out) + " |")
    return lines


def startup_table(startup: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| mandate | start → port file ms (median) | start → /readyz 200 ms, median / max "
        "| idle RSS MB, all processes, median / max | idle PSS MB (median) | processes |",
        "|---|---|---|---|---|---|",
    ]
    for s in startup:
        lines.append(
            f"| {s['transport']}, {s['workers']} worker(s) | {s['median_port_file_s'] * 1e3:.0f} "
            f"| {s['median_ready_s'] * 1e3:.0f} / {s['max_ready_s'] * 1e3:.0f} "
            f"| {s['median_idle_rss_mb']:.0f} / {s['max_idle_rss_mb']:.0f} "
            f"| {s['median_idle_pss_mb']:.0f} | {s['runs'][0]['processes']} |"
        )
    return lines


def pod_line(pod: dict[str, Any] | None) -> list[str]:
    if pod is None:
        return []
    return [
        "",
        f"As the injector starts it in a pod (transport {pod['transport']}, {pod['workers']} "
        "worker, Kubernetes on against the API server emulation, Envoy's access log service, "
        f"the context API, audit on stdout), idle: RSS {pod['rss_mb']:.1f} MB, PSS "
        f"{pod['pss_mb']:.1f} MB (where it goes: `python -m bench memory_breakdown --pod`).",
    ]


def pod_cost_table(results: list[dict[str, Any]], loads: Sequence[Load]) -> list[str]:
    """Issue 20's table: one row per case, the figures a platform team compares."""
    lines = [
        "| case | req/s c16 | vs RBAC | added p50 / p99 at c1, µs | mandate CPU/Check c16 / c1, µs "
        "| at 1,000 req/s: Envoy + mandate vCPU, RSS MB, added p50 / p99 µs "
        "| mandate idle RSS / PSS MB, all processes |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = {x.key for x in loads}
    for r in results:
        lx = r.get("loads", {})
        c16, c1, k = lx.get("c16") or {}, lx.get("c1") or {}, lx.get("r1000") or {}
        if not lx:
            continue
        add1 = c1.get("added_vs_envoy_us") or {}
        addk = k.get("added_vs_envoy_us") or {}
        pod = "-"
        if "r1000" in keys and k:
            pod = (
                f"{_num(k.get('vcpu_all'), '{:.3f}')}, {_num(k.get('rss_mb_all'))}, "
                f"{_num(addk.get('p50_us'), '{:+,.0f}')} / {_num(addk.get('p99_us'), '{:+,.0f}')}"
            )
        lines.append(
            f"| {r['label']} | {_num(c16.get('rps'))} "
            f"| {_num((c16.get('vs_rbac') or {}).get('rps'), '{:.1%}')} "
            f"| {_num(add1.get('p50_us'), '{:+,.0f}')} / {_num(add1.get('p99_us'), '{:+,.0f}')} "
            f"| {_num(c16.get('mandate_cpu_us_per_check'))} / "
            f"{_num(c1.get('mandate_cpu_us_per_check'))} "
            f"| {pod} | {_num(r.get('idle_mandate_rss_mb'), '{:.1f}')} / "
            f"{_num(r.get('idle_mandate_pss_mb'), '{:.1f}')} |"
        )
    return lines


def noise_line(results: list[dict[str, Any]]) -> str:
    others = [
        (x["other_cpus"], f"{r['case']}/{k}")
        for r in results
        for k, x in r.get("loads", {}).items()
        if x.get("other_cpus") is not None
    ]
    if not others:
        return "Noise: not measured."
    noisy = [o for o in others if o[0] > NOISE_CPUS]
    worst = max(others)
    return (
        f"Noise: other processes used over {NOISE_CPUS} CPU during {len(noisy)} of the "
        f"{len(others)} loads (⚠ in the tables; at most {worst[0]:.2f} CPU, {worst[1]})"
        + (": run again on a quiet machine before comparing figures." if noisy else ".")
    )


def markdown(doc: dict[str, Any], loads: Sequence[Load]) -> str:
    info, results = doc["machine"], doc["results"]
    s = doc["settings"]
    lines = [
        "# Benchmark matrix: Envoy alone (a), Envoy + RBAC (b), Envoy + mandate (c)",
        "",
        "Written by `python -m bench matrix` (`make bench`); see bench/README.md for what "
        "each column means. Every figure is followed by its ratio to (b) under the same load "
        f"in this run ({TIMES}1.00 = as RBAC).",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpus_available']} usable), {info['cpu_model']}, "
        f"Linux {info['kernel']}; Python {info['python']}, grpcio {info['grpcio']}, Envoy "
        f"{info['envoy']} (--concurrency 1), {info['wrk']}; git {info['git_commit']}; "
        f"{info['date']}. Pinning: {info['pinning']}. Load average before / after: "
        f"{info['loadavg_before']} / {info.get('loadavg_after', '-')}. Run took "
        f"{_num(doc.get('elapsed_s'))} s ({s['matrix']}).",
        "",
        f"Per case: verify (allowed 200, denied 403 by the authorizer), warm-up {s['warmup_s']:g}"
        f" s at {max(s['concurrency'] or [16])} connections ({BEHAVIOUR_WARMUP_S} s with "
        f"behaviour on), then each load for {s['duration_s']:g} s. Request: {s['request']}. "
        f"Open loop: {s['openloop_connections']} keep-alive connections, latency from each "
        f"request's scheduled send, {s['drain_s']:g} s drain; ≥ marks a lower bound "
        "(requests unanswered at the end), **overloaded** a rate not sustained "
        f"(answered < 95 % of offered, or unanswered requests). ⚠: other processes used over "
        f"{NOISE_CPUS} CPU meanwhile. Behaviour on: {AGENT}'s profile "
        + json.dumps(BEHAVIOUR, separators=(", ", ": "))
        + ". Tracing + audit on: every decision traced (OTLP to a discarding receiver) and "
        "audited.",
        "",
        noise_line(results),
        "",
        "## Goals (issue 20)",
        "",
        *goals_table([g for g in doc["goals"] if g["kind"] == "load"]),
        "",
        *goals_table([g for g in doc["goals"] if g["kind"] == "startup"]),
        "",
        "## Start-up and idle memory",
        "",
        f"`mandate run` started {s['starts']} times per row, nothing else running in it; "
        "RSS summed over the supervisor and its workers (shared pages counted in each), PSS "
        "(shared pages divided among them) for comparison.",
        "",
        *startup_table(doc["startup"]),
        *pod_line(doc.get("pod")),
        "",
        "## The pod's cost (issue 20)",
        "",
        *pod_cost_table(results, loads),
    ]
    for load in loads:
        lines += ["", f"## {load.label}", "", *load_table(results, load)]
    failed = [r for r in results if r.get("error")]
    if failed:
        lines += ["", "## Failed cases", ""]
        lines += [f"- {r['label']}: {r['error']}" for r in failed]
    if doc.get("plot"):
        lines += ["", f"![latency vs offered rate]({doc['plot']})"]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], loads: Sequence[Load], path: Path) -> bool:
    """p99 (solid) and p50 (dashed) latency against the offered rate, one colour and marker
    per case; a hollow triangle marks a lower bound, a black bar the goal (Envoy alone's p99
    plus the added latency allowed at that rate)."""
    rate_loads = [x for x in loads if x.rate]
    if not rate_loads:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        print("matrix: matplotlib is not installed: no plot (pip install -e '.[dev]')")
        return False
    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    colours = plt.get_cmap("tab10")
    markers = "osD^vP*Xhp"
    handles = []
    cases = [r for r in results if r.get("loads")]
    for i, r in enumerate(cases):
        pts = [(ld.rate, r["loads"].get(ld.key)) for ld in rate_loads]
        pts = [(rate, x) for rate, x in pts if x is not None and x.get("p99_us") is not None]
        if not pts:
            continue
        colour, marker = colours(i % 10), markers[i % len(markers)]
        rates = [p[0] for p in pts]
        for q, style in (("p99", "-"), ("p50", "--")):
            ax.plot(rates, [x[f"{q}_us"] / 1e3 for _, x in pts], style, color=colour, marker=marker)
            for rate, x in pts:
                if x.get(f"{q}_lower_bound"):
                    y = x[f"{q}_us"] / 1e3
                    ax.plot([rate], [y * 1.25], marker="^", mfc="none", color=colour, ms=9)
        handles.append(Line2D([], [], color=colour, marker=marker, label=r["label"]))
    envoy = next((r for r in cases if r["case"] == "envoy"), None)
    goal_drawn = False
    for ld in rate_loads:
        added = GOAL_ADDED_P99_US.get(int(ld.rate))
        x = (envoy or {}).get("loads", {}).get(ld.key)
        if added is None or x is None:
            continue
        ax.plot([ld.rate], [(x["p99_us"] + added) / 1e3], marker="_", color="black", ms=30, mew=2)
        goal_drawn = True
    handles += [
        Line2D([], [], color="grey", linestyle="-", label="p99"),
        Line2D([], [], color="grey", linestyle="--", label="p50"),
    ]
    if goal_drawn:
        handles.append(
            Line2D([], [], color="black", marker="_", ms=15, mew=2, linestyle="none",
                   label="goal: p99 of (a) + 1 ms at 1,000, + 3 ms at 3,000 req/s")
        )  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, req/s (open loop, bench/openloop.py)")
    ax.set_ylabel("latency from the scheduled send, ms (log scale)")
    ax.set_xticks([x.rate for x in rate_loads])
    ax.set_xticklabels([f"{x.rate:,.0f}" for x in rate_loads])
    ax.set_title("Latency vs offered rate (a hollow triangle above a point: a lower bound)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _onoff(text: str) -> list[bool]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals or any(v not in ("off", "on") for v in vals):
        raise argparse.ArgumentTypeError("expected off, on or off,on")
    return [v == "on" for v in vals]


def _transports(text: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals or any(v not in ("grpc", "http") for v in vals):
        raise argparse.ArgumentTypeError("expected grpc, http or grpc,http")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench matrix", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--duration", type=float, default=15.0, help="seconds per load (default 15)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per case")
    p.add_argument("--concurrency", type=_ints, default=[1, 16, 64], help="closed loop: 1,16,64")
    p.add_argument("--rates", type=_floats, default=[1000.0, 3000.0], help="open loop: 1000,3000")
    p.add_argument(
        "--transports",
        type=_transports,
        default=["http", "grpc"],
        help="the first is the baseline: the injector's default, http",
    )
    p.add_argument("--workers", type=_ints, default=[1, 2], help="mandate worker processes")
    p.add_argument("--telemetry", type=_onoff, default=[False, True], help="tracing+audit off,on")
    p.add_argument("--behaviour", type=_onoff, default=[False, True], help="off,on")
    p.add_argument("--full", action="store_true", help="the whole cross product of the above")
    p.add_argument("--threads", type=int, help="mandate's Check threads (default: mandate's)")
    p.add_argument("--pin", action="store_true", help="Envoy, mandate, load on CPUs of their own")
    p.add_argument("--starts", type=int, default=5, help="`mandate run` starts per start-up row")
    p.add_argument("--connections", type=int, default=32, help="open loop: keep-alive connections")
    p.add_argument("--drain", type=float, default=2.0, help="open loop: seconds for the last ones")
    p.add_argument("--dry-run", action="store_true", help="list the cases and the expected time")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--name", default="matrix", help="file stem of the results (default matrix)")
    args = p.parse_args(argv)
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 60:
        p.error("--duration: 0..600 s; --warmup: 0..60 s")
    if any(not 1 <= c <= 1000 for c in args.concurrency) or any(
        not 0 < r <= 100_000 for r in args.rates
    ):
        p.error("--concurrency: 1..1000 each; --rates: 0..100000 each")
    if not args.concurrency and not args.rates:
        p.error("no load: give --concurrency or --rates")
    if any(not 1 <= w <= 16 for w in args.workers) or not args.workers:
        p.error("--workers: 1..16 each")
    if not 1 <= args.starts <= 50 or not 1 <= args.connections <= 500:
        p.error("--starts: 1..50; --connections: 1..500")
    if not 0 <= args.drain <= 60:
        p.error("--drain: 0..60 s")
    return args


def machine_info(args: argparse.Namespace, pinning: Pinning | None) -> dict[str, Any]:
    return {
        **machine_base(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "grpcio": package_version("grpcio"),
        "protobuf": package_version("protobuf"),
        "matplotlib": package_version("matplotlib"),
        "envoy": envoy_version(),
        "wrk": first_line(["wrk", "--version"]).split(" Copyright")[0],
        "envoy_concurrency": 1,
        "pinning": pinning.describe() if pinning else "none (the kernel schedules everything)",
        "pinning_cpus": pinning.__dict__ if pinning else None,
        "taskset": shutil.which("taskset"),
        "GRPC_EXPERIMENTS": os.environ.get("GRPC_EXPERIMENTS", ""),
    }


@dataclass
class Timer:
    start: float = field(default_factory=time.monotonic)

    def __call__(self) -> float:
        return time.monotonic() - self.start


def _each(cases: Sequence[Case], run: Callable[[Case], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Run every case; a case that fails (BenchError, a process exiting) is recorded with its
    error and the matrix goes on."""
    for case in cases:
        try:
            yield run(case)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # BenchError too
            print(f"matrix: {case.key} failed: {exc}", file=sys.stderr, flush=True)
            yield {"case": case.key, "label": case.label, "error": str(exc)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dims = Dimensions(args.transports, args.workers, args.telemetry, args.behaviour)
    configs = plan_configs(dims, args.full)
    cases = plan_cases(configs)
    loads = plan_loads(args.concurrency, args.rates)
    expected = estimate_s(args, cases, loads)
    kind = "full" if args.full else "default"
    matrix = f"{kind} matrix: {len(cases)} cases {TIMES} {len(loads)} loads"
    print(f"{matrix}, expected about {expected / 60:.1f} min:")
    for c in cases:
        print(f"  {c.key:34} {c.label}")
    print("  loads: " + ", ".join(x.key for x in loads))
    if args.dry_run:
        return 0
    if shutil.which("wrk") is None:
        print("matrix: `wrk` is not on PATH. Install it: apt-get install -y wrk", file=sys.stderr)
        return 2
    try:
        pinning = plan_pinning() if args.pin else None
    except BenchError as exc:
        print(f"matrix: {exc}", file=sys.stderr)
        return 2
    info = machine_info(args, pinning)
    if pinning is not None:
        os.sched_setaffinity(0, pinning.load)  # this script and its load generators
    settings = {
        "matrix": matrix,
        "full": args.full,
        "configs": [c.__dict__ for c in configs],
        "loads": [x.__dict__ for x in loads],
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "behaviour_warmup_s": BEHAVIOUR_WARMUP_S,
        "concurrency": args.concurrency,
        "rates": args.rates,
        "openloop_connections": args.connections,
        "drain_s": args.drain,
        "starts": args.starts,
        "mandate_threads": args.threads if args.threads is not None else "default",
        "request": f"GET http://{HOST}{ALLOWED_PATH} (Host header, origin-form)",
        "expected_s": expected,
    }
    timer = Timer()
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="mandate-matrix-") as tmp:
            work = Path(tmp)
            script = work / "report.lua"
            script.write_text(WRK_SCRIPT)
            startup = run_startup(configs, args, work / "startup", pinning)
            print("== idle memory as injected in a pod", flush=True)
            pod = pod_memory(work / "pod")
            print(f"   RSS {pod['rss_mb']:.1f} MB, PSS {pod['pss_mb']:.1f} MB", flush=True)
            results = list(_each(cases, lambda c: run_case(c, loads, args, work, script, pinning)))
    except BenchError as exc:
        print(f"matrix: aborted: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("matrix: interrupted; processes stopped, nothing written", file=sys.stderr)
        return 130
    info["loadavg_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    derive(results, loads)
    doc: dict[str, Any] = {
        "machine": info,
        "settings": settings,
        "elapsed_s": timer(),
        "startup": startup,
        "pod": pod,
        "goals": goals(results, startup, loads, pod),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{args.name}.png"
    if plot(results, loads, png):
        doc["plot"] = png.name
    table = markdown(doc, loads)
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(table)
    print()
    print(table)
    written = [f"{args.name}.json", f"{args.name}.md"] + ([png.name] if "plot" in doc else [])
    print(f"wrote {', '.join(str(args.out / w) for w in written)} in {timer():.0f} s")
    bad = [r["case"] for r in results if r.get("error")]
    errors = [
        f"{r['case']}/{k}" for r in results for k, x in r.get("loads", {}).items() if x["errors"]
    ]
    noisy = [
        f"{r['case']}/{k}"
        for r in results
        for k, x in r.get("loads", {}).items()
        if (x.get("other_cpus") or 0) > NOISE_CPUS
    ]
    if errors:
        print(f"matrix: WARNING: errors (non-2xx, socket, unanswered) in {errors}", file=sys.stderr)
    if noisy:
        print(
            f"matrix: WARNING: other processes used over {NOISE_CPUS} CPU during {len(noisy)} "
            f"of the loads ({', '.join(noisy[:6])}{', ...' if len(noisy) > 6 else ''}); the "
            "figures are noisy, run again on a quiet machine",
            file=sys.stderr,
        )
    if bad:
        print(f"matrix: FAILED cases: {bad}", file=sys.stderr)
        return 1
    return 0
