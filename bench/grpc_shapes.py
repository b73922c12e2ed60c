"""The gRPC transport's server shapes side by side (`mandate run --grpc-server threads|aio`,
`--threads N`), unloaded first: what a Check costs at one connection, and which threads it
wakes.

Shapes (--shapes, comma-separated):

  threads   grpcio's synchronous server, a ThreadPoolExecutor of --threads 2 (the default)
  threads1  the same with --threads 1
  aio       grpc.aio on an event loop in a thread of its own (`--grpc-server aio`)

The stack is check_throughput's (Envoy --concurrency 1 answering a direct_response 200, the
demo profiles minus rate limits, `mandate run` in the one-process default, `GET
/v1/invoices/42` allowed). Each round starts Envoy alone (the latency baseline, wrk -c1) and
then each shape in turn, the order rotating from round to round so that a noisy stretch of a
shared machine hits every shape; per shape: 2 s warm-up at c16, then wrk -t1 -c1 for
--duration s, then wrk -t1 -c16 for --duration s. Around each run: mandate's CPU per Check
(/proc, all threads), and per thread (/proc/PID/task/TID: user+system CPU and voluntary
context switches, i.e. how often the thread went to sleep to be woken again) per Check, the
threads named by py-spy (`py-spy dump`: Python's thread names; grpcio's C threads name
themselves). With --profile (the default), the last round also samples each shape at c1 with
py-spy (--gil --nonblocking, --idle) for the Python frames that run per Check.

Writes bench/results/grpc_shapes.{md,json}: per run and the median per shape of req/s (c16),
the latency added over Envoy alone at c1 (p50 / p99), mandate's CPU per Check (c1 / c16), and
the per-thread CPU and wake-ups per Check at c1.

Run: python -m bench grpc_shapes [--runs 3] [--duration 8] [--shapes threads,threads1,aio]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib import RESULTS, BenchError
from bench.lib.load import WRK_SCRIPT, measure, run_wrk
from bench.lib.proc import sigterm_as_interrupt
from bench.lib.report import envoy_version, machine_base, package_version, write_results
from bench.lib.stack import TEMPLATES, MandateOptions, running_stack, verify
from bench.profile_check import py_spy, summarize, worker_pid

SHAPES: dict[str, MandateOptions] = {
    "threads": MandateOptions(transport="grpc", grpc_server="threads", threads=2),
    "threads1": MandateOptions(transport="grpc", grpc_server="threads", threads=1),
    "aio": MandateOptions(transport="grpc", grpc_server="aio"),
}
WARMUP_S = 2.0


def thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> a name: Python's thread name (py-spy dump), its `Thread-N (target)`
    shortened to the target; else the OS name (grpcio's C threads set theirs)."""
    names: dict[int, str] = {}
    proc = subprocess.run(
        [py_spy(), "dump", "--pid", str(pid), "--json", "--nonblocking"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if proc.returncode == 0:
        for t in json.loads(proc.stdout):
            name = re.sub(r"^Thread-\d+ \((.*)\)$", r"\1", t.get("thread_name") or "")
            if t.get("os_thread_id") and name:
                names[int(t["os_thread_id"])] = re.sub(r"_\d+$", "_N", name)
    return names


Task = tuple[str, float, float, int]  # OS name, user s, system s, voluntary switches


def task_stats(pid: int) -> dict[int, Task]:
    """OS thread id -> (OS name, user CPU s, system CPU s, voluntary context switches)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, Task] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        m = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M)
        user, system = int(fields[11]) / ticks, int(fields[12]) / ticks
        out[int(task.name)] = (comm, user, system, int(m.group(1)) if m else 0)
    return out


def per_thread(
    before: dict[int, Task], after: dict[int, Task], names: dict[int, str], checks: int
) -> dict[str, dict[str, float]]:
    """Per thread name (threads of one name summed): CPU µs (of which in the kernel) and
    wake-ups per Check; only threads that ran."""
    cpu: dict[str, float] = collections.defaultdict(float)
    sys_: dict[str, float] = collections.defaultdict(float)
    wakes: dict[str, int] = collections.defaultdict(int)
    for tid, (comm, u1, s1, w1) in after.items():
        _, u0, s0, w0 = before.get(tid, (comm, 0.0, 0.0, 0))
        name = names.get(tid, comm)
        cpu[name] += (u1 - u0) + (s1 - s0)
        sys_[name] += s1 - s0
        wakes[name] += w1 - w0
    out = {
        n: {
            "cpu_us": round(cpu[n] / checks * 1e6, 1),
            "sys_us": round(sys_[n] / checks * 1e6, 1),
            "wakeups": round(wakes[n] / checks, 2),
        }
        for n in cpu
        if cpu[n] > 0 or wakes[n] > checks * 0.05
    }
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["cpu_us"]))


def run_envoy(work: Path, script: Path, duration: float, tag: str) -> dict[str, Any]:
    with running_stack(f"envoy-{tag}", TEMPLATES["envoy"], work) as stack:
        verify("envoy", stack.envoy, None, authorizer=False)
        run_wrk(stack.envoy.port, script, 16, 1)
        c1 = run_wrk(stack.envoy.port, script, 1, duration)
    return {"p50_us": c1["p50_us"], "p99_us": c1["p99_us"]}


def run_shape(
    shape: str, work: Path, script: Path, args: argparse.Namespace, tag: str, profile: bool
) -> dict[str, Any]:
    print(f"== {shape} ({tag})", flush=True)
    with running_stack(f"{shape}-{tag}", TEMPLATES["grpc"], work, SHAPES[shape]) as stack:
        envoy, mandate = stack.envoy, stack.mandate
        assert mandate is not None
        verify(shape, envoy, mandate)
        pid = worker_pid(mandate.proc.pid)
        run_wrk(envoy.port, script, 16, WARMUP_S)
        names = thread_names(pid)
        t0 = task_stats(pid)
        c1 = measure(envoy, mandate, lambda: run_wrk(envoy.port, script, 1, args.duration))
        t1 = task_stats(pid)
        c16 = measure(envoy, mandate, lambda: run_wrk(envoy.port, script, 16, args.duration))
        t2 = task_stats(pid)
        names |= thread_names(pid)
        spy: dict[str, Any] = {}
        if profile:
            spy = profile_c1(pid, envoy.port, script, work / f"{shape}.folded", args)
    for run in (c1, c16):
        if run["non_2xx"] or run["socket_errors"] or not run.get("checks"):
            raise BenchError(f"{shape}: errors or no Checks: {run}")
    out = {
        "shape": shape,
        "rps_c16": c16["rps"],
        "p50_us": c1["p50_us"],
        "p99_us": c1["p99_us"],
        "cpu_us_per_check_c1": c1["mandate_cpu_us_per_check"],
        "cpu_us_per_check_c16": c16["mandate_cpu_us_per_check"],
        "envoy_cpu_us_per_request_c1": c1["envoy_cpu_us_per_request"],
        "threads_c1": per_thread(t0, t1, names, c1["checks"]),
        "threads_c16": per_thread(t1, t2, names, c16["checks"]),
        "other_cpus": max(c1["other_cpus"] or 0.0, c16["other_cpus"] or 0.0),
        "rss_mb": c16.get("mandate_rss_mb"),
    }
    if spy:
        out["profile_c1"] = spy
    print(
        f"   c1 p50/p99 {out['p50_us']}/{out['p99_us']} µs, CPU/Check "
        f"{out['cpu_us_per_check_c1']:.0f} µs; c16 {out['rps_c16']:,.0f} req/s, "
        f"{out['cpu_us_per_check_c16']:.0f} µs; others {out['other_cpus']:.2f} CPU",
        flush=True,
    )
    return out


def profile_c1(
    pid: int, port: int, script: Path, folded: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """py-spy at c1: the thread holding the GIL (what Python runs per Check), and with
    --idle every thread's stack (where the others wait)."""
    result: dict[str, Any] = {}
    for label, extra in (("gil", ["--gil"]), ("idle", ["--idle"])):
        out = folded.with_suffix(f".{label}.folded")
        cmd = [py_spy(), "record", "--pid", str(pid), "--threads", "--nonblocking", *extra]
        cmd += ["--rate", "250", "--duration", str(int(args.duration)), "--format", "raw"]
        cmd += ["--output", str(out)]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        run_wrk(port, script, 1, args.duration)
        _, err = spy.communicate(timeout=args.duration + 30)
        if spy.returncode != 0 or not out.exists():
            raise BenchError(f"py-spy failed ({spy.returncode}): {err.strip()[-600:]}")
        result[label] = summarize(out.read_text(), 15)
    return result


NOTES = """## Why no shape answers an idle Check on one thread (grpcio {grpcio})

- **Socket I/O is the C core's, in every shape**: grpcio's `event_engine` thread reads
  Envoy's request and writes the answer (about 3 wake-ups per Check at c=1 in each table).
- **threads**: the `_serve` thread polls the server's completion queue and hands each call
  to the executor (`grpc/_server.py`: `_handle_with_method_handler` -> `thread_pool.submit`);
  the pool thread asks for the request message and waits on the call's Condition until
  `_serve` delivers it (`_unary_request`), answers, and `_serve` takes the send and close
  completions. An executor that runs the handler inline on `_serve` (the public
  `thread_pool` argument) deadlocks: the handler waits in `unary_request`'s
  `condition.wait()` for a completion only `_serve` would deliver (tried: the call ends in
  DEADLINE_EXCEEDED). The public API has no other place to run a handler.
- **aio**: the handler runs on the loop that awaits the call, but grpc.aio drains its
  completion queue on one poller thread per process (`_poll_wrapper`), which writes a byte
  to a socketpair per event to wake the loop; every loop of the process that uses grpc.aio
  watches that socket, and the one that reads the byte hands other loops' events on
  (`call_soon_threadsafe`), so in the one-process default the supervisor's loop (access log,
  context API) can sit on a Check's path. Fewer wake-ups per Check than `threads` but as
  much CPU at c=1, and more under load: per call a Task, an `asyncio.wait` and grpc.aio's
  Cython callbacks (they show as `Handle._run`'s self time).
- **threads1**: the same hand-offs at c=1; under load the one pool thread serves one call
  at a time and waits for each request message in between.
- Tried once and not kept (same harness, exploratory single runs on a noisy machine,
  grpcio 1.85.1): the channel arguments `grpc.http2.bdp_probe=0` and
  `grpc.optimization_target=latency` on the threads shape (c=1 CPU per Check 438-519 µs,
  against 438-537 µs without: within the spread); grpc.aio on a uvloop loop (578 / 460 µs
  per Check at c=1 / c=16).
- What answers on one thread lies outside grpcio's Python API: the HTTP transport's lean
  server (one uvloop thread: bench/results/http_server.md), or a gRPC server not built on
  grpcio's completion queues (not measured here)."""


_KEYS = ("rps_c16", "added_p50_us", "added_p99_us", "cpu_us_per_check_c1", "cpu_us_per_check_c16")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in _KEYS}
    threads: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    for r in runs:
        for name, f in r["threads_c1"].items():
            threads[name].append(f)
    out["threads_c1"] = {
        name: {k: statistics.median(x[k] for x in fs) for k in ("cpu_us", "sys_us", "wakeups")}
        for name, fs in sorted(threads.items(), key=lambda kv: -kv[1][0]["cpu_us"])
    }
    out["wakeups_c1"] = round(sum(t["wakeups"] for t in out["threads_c1"].values()), 2)
    out["sys_us_c1"] = round(sum(t["sys_us"] for t in out["threads_c1"].values()), 1)
    return out


def _row(label: str, f: dict[str, Any], extra: str = "") -> str:
    return (
        f"| {label} | {f['rps_c16']:,.0f} | {f['added_p50_us']:+.0f} / {f['added_p99_us']:+.0f} "
        f"| {f['cpu_us_per_check_c1']:.0f} / {f['cpu_us_per_check_c16']:.0f} |{extra}"
    )


def markdown(info: dict[str, Any], runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "# The gRPC transport's server shapes at one connection (threads, threads1, aio)",
        "",
        f"Written by `python -m bench grpc_shapes --runs {info['runs']} --duration "
        f"{info['duration_s']:g}`; see the module's docstring. Added latency: over Envoy "
        "alone in the same round.",
        "",
        "| run | req/s (c=16) | added p50 / p99 µs (c=1) | mandate CPU µs/Check (c=1 / c=16) "
        "| wake-ups/Check (c=1) | other CPUs |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        wakes = sum(t["wakeups"] for t in r["threads_c1"].values())
        lines.append(_row(f"{i}. {r['shape']}", r, f" {wakes:.1f} | {r['other_cpus']:.2f} |"))
    lines += [
        "",
        "| median of the runs | req/s (c=16) | added p50 / p99 µs (c=1) | mandate CPU µs/Check "
        "(c=1 / c=16) | of which kernel µs (c=1) | wake-ups/Check (c=1) |",
        "|---|---|---|---|---|---|",
    ]
    for shape in info["shapes"]:
        f = summary[shape]
        lines.append(_row(shape, f, f" {f['sys_us_c1']:.0f} | {f['wakeups_c1']:.1f} |"))
    for shape in info["shapes"]:
        lines += [
            "",
            f"### {shape}: per thread at c=1 (medians per Check: CPU µs, of which in the "
            "kernel, and voluntary context switches)",
            "",
            "| thread | CPU µs/Check | of which kernel µs | wake-ups/Check |",
            "|---|---|---|---|",
        ]
        for name, f in summary[shape]["threads_c1"].items():
            lines.append(
                f"| `{name}` | {f['cpu_us']:.1f} | {f['sys_us']:.1f} | {f['wakeups']:.2f} |"
            )
        prof = next((r["profile_c1"] for r in reversed(runs) if r["shape"] == shape and
                     "profile_c1" in r), None)  # fmt: skip
        if prof:
            lines += ["", "py-spy at c=1, the thread holding the GIL (share of samples):", ""]
            lines += [f"- `{t}` {p}%" for t, p in prof["gil"]["threads"][:6]]
            lines += ["", "hottest functions (self):", ""]
            lines += [f"- `{t}` {p}%" for t, p in prof["gil"]["self"][:10]]
            lines += [
                "",
                "py-spy --idle at c=1, where the threads are (self, share of samples):",
                "",
            ]
            lines += [f"- `{t}` {p}%" for t, p in prof["idle"]["self"][:6]]
    lines += ["", *NOTES.format(grpcio=info["grpcio"]).splitlines()]
    lines += [
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; Python "
        f"{info['python']}, grpcio {info['grpcio']}, Envoy {info['envoy']}; git "
        f"{info['git_commit']}; {info['date']}; load average before: {info['loadavg_before']}. "
        "Other CPUs: CPU used by other processes during a run (of "
        f"{info['nproc']}); above 0.25 the run is noisy.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench grpc_shapes", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--runs", type=int, default=3, help="rounds (each shape once per round)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    p.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES)
    )
    p.add_argument("--no-profile", action="store_true", help="no py-spy in the last round")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    if not shapes or any(s not in SHAPES for s in shapes):
        p.error(f"--shapes: choose among {', '.join(SHAPES)}")
    if not 1 <= args.runs <= 20 or not 1 <= args.duration <= 120:
        p.error("--runs: 1..20; --duration: 1..120 s")
    info = {
        **machine_base(), "runs": args.runs, "duration_s": args.duration, "shapes": shapes,
        "grpcio": package_version("grpcio"), "envoy": envoy_version(),
    }  # fmt: skip
    runs: list[dict[str, Any]] = []
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="mandate-shapes-") as tmp:
            work = Path(tmp)
            script = work / "report.lua"
            script.write_text(WRK_SCRIPT)
            for i in range(args.runs):
                tag = f"r{i + 1}"
                base = run_envoy(work, script, args.duration, tag)
                print(f"== round {i + 1}/{args.runs}: Envoy alone c1 p50/p99 {base}", flush=True)
                order = shapes[i % len(shapes) :] + shapes[: i % len(shapes)]
                last = i == args.runs - 1 and not args.no_profile
                for shape in order:
                    r = run_shape(shape, work, script, args, tag, last)
                    r["added_p50_us"] = r["p50_us"] - base["p50_us"]
                    r["added_p99_us"] = r["p99_us"] - base["p99_us"]
                    r["envoy_alone"] = base
                    runs.append(r)
    except BenchError as exc:
        print(f"grpc_shapes: aborted: {exc}")
        return 1
    except KeyboardInterrupt:
        print("grpc_shapes: interrupted; processes stopped")
        return 130
    summary = {s: medians([r for r in runs if r["shape"] == s]) for s in shapes}
    text = markdown(info, runs, summary)
    doc = {"machine": info, "summary": summary, "runs": runs}
    write_results(args.out / "grpc_shapes", doc, text)
    return 0
