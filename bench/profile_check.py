"""Where a worker's CPU goes under load: py-spy samples mandate's Check worker while wrk
drives real Envoy at it, once per configuration, and prints for each the share of samples
per thread and the functions with the most samples (self and total, Python and native frames).

The stack is the one of bench/check_throughput.py (Envoy --concurrency 1, the demo profiles
minus rate limits, `GET /v1/invoices/42` allowed). Configurations (--cases, comma-separated):

  off        tracing and audit off
  telemetry  every decision traced (OTLP to a discarding receiver) and audited

py-spy runs with --threads and, by default, --gil --nonblocking (the thread holding the GIL,
without stopping the worker); --native adds the C frames of grpcio's core and CPython but
pauses the worker per sample. With --idle, samples of threads that wait (GIL, futex, epoll)
are kept too, which shows how many threads hand work around. Meanwhile /proc gives the
worker's CPU per OS thread name. Writes, per case, the folded stacks (flamegraph.pl / speedscope
input) and a summary to bench/results/profile/. Needs py-spy (`pip install py-spy`, in the
dev extras) and wrk, and ptrace rights over the worker (same user; on hardened kernels
`kernel.yama.ptrace_scope` 0).

Run: python -m bench profile_check [--duration 10] [--cases off,telemetry]
     [--transport grpc|http] [--http-server aiohttp|lean] [--idle]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib import RESULTS, BenchError
from bench.lib.load import WRK_SCRIPT, run_wrk
from bench.lib.proc import process_tree
from bench.lib.report import write_results
from bench.lib.stack import TEMPLATES, MandateOptions, running_stack, verify


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise BenchError("py-spy not found: .venv/bin/pip install py-spy")
    return found


def worker_pid(supervisor: int) -> int:
    """The process serving the Checks: the worker, or (single-process) the supervisor."""
    kids = [p for p in process_tree(supervisor) if p != supervisor]
    return kids[0] if kids else supervisor


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) per thread name (/proc/PID/task/*/comm) of one process.
    grpcio's C-core threads name themselves; Python's threads all carry the process name."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        out[comm] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(out)


def summarize(folded: str, top: int) -> dict[str, Any]:
    """Per-thread shares and the hottest functions of py-spy's folded output
    (`thread (0x..);frame;frame N` per line with --threads)."""
    threads: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        body = frames[1:] if thread != "?" else frames
        # Name a thread by its first Python frame that is not threading's bootstrap.
        name = next((f for f in body if "threading.py" not in f and "_bootstrap" not in f), thread)
        threads[_short(name)] += n
        if body:
            self_[_short(body[-1])] += n
        for f in set(body):
            total[_short(f)] += n
    pct = (lambda c: round(100 * c / samples, 1)) if samples else (lambda c: 0.0)
    return {
        "samples": samples,
        "threads": [[t, pct(c)] for t, c in threads.most_common(12)],
        "self": [[f, pct(c)] for f, c in self_.most_common(top)],
        "total": [[f, pct(c)] for f, c in total.most_common(top)],
    }


def _short(frame: str) -> str:
    # "func (module/path.py:123)" -> "func (path.py)"; native frames keep their library.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0] if where else ""
    return f"{name} ({file})" if file else name


def run_case(
    name: str, opts: MandateOptions, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    script = work / "report.lua"
    script.write_text(WRK_SCRIPT)
    template = TEMPLATES[opts.transport]
    with running_stack(name, template, work, opts) as stack:
        assert stack.mandate is not None
        verify(name, stack.envoy, stack.mandate)
        pid = worker_pid(stack.mandate.proc.pid)
        run_wrk(stack.envoy.port, script, args.connections, 2)  # warm-up
        folded = work / f"{name}.folded"
        cmd = [py_spy(), "record", "--pid", str(pid), "--threads"]
        # --native pauses the worker per sample (throughput drops ~6x): opt-in. By default
        # py-spy reads without stopping it and keeps only the thread holding the GIL.
        cmd += ["--native"] if args.native else ["--nonblocking", "--gil"]
        cmd += ["--rate", str(args.rate), "--duration", str(int(args.duration)), "--format", "raw"]
        cmd += ["--output", str(folded)]
        if args.idle:
            cmd.append("--idle")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        cpu0 = thread_cpu(pid)
        load = run_wrk(stack.envoy.port, script, args.connections, args.duration)
        cpu1 = thread_cpu(pid)
        _, err = spy.communicate(timeout=args.duration + 30)
        if spy.returncode != 0 or not folded.exists():
            raise BenchError(f"py-spy failed ({spy.returncode}): {err.strip()[-600:]}")
    result = summarize(folded.read_text(), args.top)
    per_check = {
        comm: round((cpu1.get(comm, 0.0) - cpu0.get(comm, 0.0)) / load["requests"] * 1e6, 1)
        for comm in cpu1
    }
    result |= {
        "case": name,
        "rps": round(load["rps"]),
        "folded": folded.name,
        "cpu_us_per_check_by_thread_name": dict(sorted(per_check.items(), key=lambda kv: -kv[1])),
    }
    return result


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = ["# Where a Check worker's CPU goes (py-spy under wrk load)", ""]
    out.append(
        f"Written by `python -m bench profile_check`; transport {args.transport}"
        f"{f' (server {args.http_server})' if args.http_server else ''}, wrk -t1 "
        f"-c{args.connections} for {args.duration:g} s, py-spy {args.rate} Hz"
        f"{', --native (the worker is paused per sample)' if args.native else ', --gil'}"
        f"{' with idle samples' if args.idle else ''}."
    )
    for r in results:
        out += ["", f"## {r['case']}: {r['rps']:,} req/s, {r['samples']:,} samples", ""]
        by_thread = r["cpu_us_per_check_by_thread_name"]
        out += [
            f"Worker CPU per Check by OS thread name (/proc, while py-spy samples; "
            f"total {sum(by_thread.values()):.0f} µs):",
            "",
            "| thread name | µs per Check |",
            "|---|---|",
        ]
        out += [f"| `{k}` | {v} |" for k, v in by_thread.items() if v >= 0.5]
        out += ["", "Python frames of the thread holding the GIL (py-spy):", ""]
        out += ["| thread | share |", "|---|---|"]
        out += [f"| `{t}` | {p}% |" for t, p in r["threads"]]
        out += ["", "| function (self) | share |", "|---|---|"]
        out += [f"| `{f}` | {p}% |" for f, p in r["self"]]
        out += ["", "| function (total) | share |", "|---|---|"]
        out += [f"| `{f}` | {p}% |" for f, p in r["total"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench profile_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds sampled per case")
    p.add_argument("--cases", default="off,telemetry", help="off, telemetry (comma-separated)")
    p.add_argument("--transport", choices=["grpc", "http"], default="grpc")
    p.add_argument(
        "--http-server",
        choices=["aiohttp", "lean"],
        help="the HTTP transport's server (default: mandate's); its name joins the results'",
    )
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--idle", action="store_true", help="keep samples of waiting threads")
    p.add_argument(
        "--native", action="store_true", help="C frames too (stops the worker per sample)"
    )
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=RESULTS / "profile")
    args = p.parse_args(argv)
    cases = {
        "off": MandateOptions(transport=args.transport, http_server=args.http_server),
        "telemetry": MandateOptions(
            transport=args.transport, http_server=args.http_server, telemetry=True
        ),
    }
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in cases]
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {sorted(cases)}")
    args.out.mkdir(parents=True, exist_ok=True)
    variant = args.transport + (f"-{args.http_server}" if args.http_server else "")
    results = []
    with tempfile.TemporaryDirectory(prefix="mandate-profile-") as tmp:
        work = Path(tmp)
        for name in wanted:
            results.append(run_case(name, cases[name], args, work))
            shutil.copy(work / f"{name}.folded", args.out / f"{name}-{variant}.folded")
    stem = args.out / f"profile-{variant}{'-idle' if args.idle else ''}"
    write_results(stem, results, markdown(results, args))
    return 0
