"""The HTTP transport's two servers side by side (`mandate run --transport http
--http-server aiohttp|lean`): `python -m bench check_throughput --transport http` run --runs
times per server, the servers alternating (aiohttp, lean, aiohttp, lean, ...), so that a
noisy stretch of a shared machine hits both. Each run is a whole check_throughput (its own
Envoy-alone and RBAC baselines, 2 s warm-up, wrk -c16 then -c1).

Writes bench/results/http_server.{md,json}: per run, req/s at c=16 (and vs RBAC), the latency
added over Envoy alone at c=1 (p50 / p99), mandate's CPU per Check (c=16 / c=1), its RSS,
the load average before the run and the CPU other processes used meanwhile; then the median
of each server's runs and lean / aiohttp. The last run of each server is also written as
check_throughput-http.* (aiohttp) and check_throughput-http-lean.*.

Run: python -m bench http_server [--runs 3] [--duration 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import check_throughput
from bench.lib import RESULTS
from bench.lib.report import machine_base

SERVERS = ("aiohttp", "lean")
STEMS = {"aiohttp": "check_throughput-http", "lean": "check_throughput-http-lean"}


def figures(doc: dict[str, Any]) -> dict[str, Any]:
    """What the comparison keeps of one check_throughput run."""
    by = {r["case"]: r for r in doc["results"]}
    man, envoy = by["mandate"], by["envoy"]
    ld, ul = man["loaded"], man["unloaded"]
    return {
        "rps_c16": ld["rps"],
        "rps_vs_rbac": man["rps_vs_rbac"],
        "envoy_rps_c16": envoy["loaded"]["rps"],
        "added_p50_us": man["added_p50_us"],
        "added_p99_us": man["added_p99_us"],
        "p50_us": ul["p50_us"],
        "p99_us": ul["p99_us"],
        "envoy_p50_us": envoy["unloaded"]["p50_us"],
        "envoy_p99_us": envoy["unloaded"]["p99_us"],
        "cpu_us_per_check_c16": ld.get("mandate_cpu_us_per_check"),
        "cpu_us_per_check_c1": ul.get("mandate_cpu_us_per_check"),
        "rss_mb": ld.get("mandate_rss_mb"),
        "non_2xx": ld["non_2xx"] + ld["socket_errors"] + ul["non_2xx"] + ul["socket_errors"],
        "other_cpus": max(ld["other_cpus"] or 0.0, ul["other_cpus"] or 0.0),
        "loadavg_before": doc["machine"]["loadavg_before"],
    }


_KEYS = (
    "rps_c16", "rps_vs_rbac", "added_p50_us", "added_p99_us", "cpu_us_per_check_c16",
    "cpu_us_per_check_c1", "rss_mb",
)  # fmt: skip


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in _KEYS}


def _row(label: str, f: dict[str, Any], extra: str = "") -> str:
    return (
        f"| {label} | {f['rps_c16']:,.0f} | {f['rps_vs_rbac']:.1%} | {f['added_p50_us']:+.0f} / "
        f"{f['added_p99_us']:+.0f} | {f['cpu_us_per_check_c16']:.0f} / "
        f"{f['cpu_us_per_check_c1']:.0f} | {f['rss_mb']:.0f} |{extra}"
    )


def markdown(info: dict[str, Any], runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = [
        "# The HTTP transport's servers: aiohttp vs lean (httptools on uvloop)",
        "",
        "Written by `python -m bench http_server`: `python -m bench check_throughput --transport "
        f"http --http-server SERVER --duration {info['duration_s']:g}` {info['runs']} times per "
        "server, alternating; see bench/README.md (check_throughput) for the columns.",
        "",
        "| run | req/s (c=16) | vs RBAC | added p50 / p99 µs (c=1) | mandate CPU µs/Check "
        "(c=16 / c=1) | mandate RSS MB | non-2xx | other CPUs | load avg before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        extra = f" {r['non_2xx']} | {r['other_cpus']:.2f} | {r['loadavg_before']} |"
        lines.append(_row(f"{i}. {r['server']}", r, extra))
    lines += [
        "",
        "| median of the runs | req/s (c=16) | vs RBAC | added p50 / p99 µs (c=1) | mandate CPU "
        "µs/Check (c=16 / c=1) | mandate RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for server in SERVERS:
        lines.append(_row(server, summary[server]))
    ratio = summary["lean_vs_aiohttp"]
    lines += [
        "",
        f"lean / aiohttp (medians): req/s x{ratio['rps_c16']:.2f}; CPU per Check x"
        f"{ratio['cpu_us_per_check_c16']:.2f} (c=16), x{ratio['cpu_us_per_check_c1']:.2f} "
        f"(c=1); added p50 {ratio['added_p50_us']:+.0f} µs, p99 {ratio['added_p99_us']:+.0f} µs.",
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; Python "
        f"{info['python']}; git {info['git_commit']}; {info['date']}. Other processes ran "
        "on the machine meanwhile (other CPUs: their CPU use during the run, of "
        f"{info['nproc']}); the per-run files of the last run of each server are "
        "check_throughput-http.md (aiohttp) and check_throughput-http-lean.md.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench http_server", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--runs", type=int, default=3, help="check_throughput runs per server")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20:
        p.error("--runs: 1..20")
    info = {**machine_base(), "runs": args.runs, "duration_s": args.duration}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mandate-http-server-") as tmp:
        for i in range(args.runs):
            for server in SERVERS:
                out = Path(tmp) / f"{i}-{server}"
                print(f"==== run {i + 1}/{args.runs}: {server}", flush=True)
                code = check_throughput.main(
                    ["--transport", "http", "--http-server", server,
                     "--duration", str(args.duration), "--out", str(out)]
                )  # fmt: skip
                if code != 0:
                    print(f"http_server: check_throughput failed ({code})", file=sys.stderr)
                    return code
                doc = json.loads((out / f"{STEMS[server]}.json").read_text())
                runs.append({"server": server, **figures(doc)})
                if i == args.runs - 1:  # the last run of each server: its own files
                    args.out.mkdir(parents=True, exist_ok=True)
                    for name in (f"{STEMS[server]}.json", f"{STEMS[server]}.md"):
                        shutil.copy(out / name, args.out / name)
    summary: dict[str, Any] = {s: medians([r for r in runs if r["server"] == s]) for s in SERVERS}
    a, b = summary["aiohttp"], summary["lean"]
    summary["lean_vs_aiohttp"] = {
        "rps_c16": b["rps_c16"] / a["rps_c16"],
        "cpu_us_per_check_c16": b["cpu_us_per_check_c16"] / a["cpu_us_per_check_c16"],
        "cpu_us_per_check_c1": b["cpu_us_per_check_c1"] / a["cpu_us_per_check_c1"],
        "added_p50_us": b["added_p50_us"] - a["added_p50_us"],
        "added_p99_us": b["added_p99_us"] - a["added_p99_us"],
    }
    text = markdown(info, runs, summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_server.json").write_text(
        json.dumps({"machine": info, "summary": summary, "runs": runs}, indent=2) + "\n"
    )
    (args.out / "http_server.md").write_text(text)
    print(text)
    return 0
