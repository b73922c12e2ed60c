"""The benchmark runner: `python -m bench NAME [ARGS]`, from the repository root (where
`sidecar` and `devstack` are importable). `python -m bench` or `--help` lists the benchmarks;
`python -m bench NAME --help` gives one's options. Each benchmark is the module bench/NAME.py
(or the package bench/NAME/) and its `main(argv)`; results go to bench/results/ unless --out
says otherwise."""

from __future__ import annotations

import importlib
import sys

from bench.lib import BenchError

# name -> what it measures, in one line (bench/README.md says more).
BENCHMARKS: dict[str, str] = {
    "matrix": "Envoy alone / + RBAC / + mandate configurations, 4 loads, start-up (~10 min)",
    "check_throughput": "what one Check costs: req/s, latency, CPU; Envoy alone, RBAC, mandate",
    "http_server": "the HTTP transport's servers, aiohttp vs lean: check_throughput x3 each",
    "grpc_shapes": "the gRPC transport's server shapes (threads, aio): c1 cost, wake-ups, c16",
    "telemetry_cost": "what tracing at 100 % and the audit trail cost a Check (~5 min)",
    "revocation_latency": "revocation (admin API, kubectl apply) -> first 403; stale allows",
    "soak": "mixed traffic while state changes: every answer right, memory flat (~10 min)",
    "memory_breakdown": "mandate's idle memory by process, mapping and import (~10 s)",
    "profile_check": "where a Check worker's CPU goes under load (py-spy, per thread)",
    "decide_scaling": "decide() latency from 10 to 10,000 rules, in-process (~40 s)",
    "behaviour_cost": "what behaviour analysis costs per call, in-process (~15 s)",
    "span_cost": "CPU per decision span: OpenTelemetry SDK vs lean tracer, in-process",
    "openloop": "the fixed-rate load generator matrix runs; prints one JSON line",
    "credential_cost": "what minting a Txn-Token costs per algorithm and JOSE library (~30 s)",
    "credential_check": "CPU per Check: no credential, secret, cached OAuth, Txn-Token (~3 min)",
    "agentdojo": "AgentDojo's ground truth through Envoy + mandate: utility, attacks blocked",
    "agentdojo_detect": "behaviour analysis on AgentDojo sessions: attacks flagged, benign FPR",
    "kube_scale": "API-server load of N = 1, 10, 100 sidecars' watchers; 1,000 extrapolated",
}


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    rows = [f"  {name:<{width}}  {text}" for name, text in BENCHMARKS.items()]
    return "\n".join(
        [
            "usage: python -m bench NAME [ARGS]   (from the repository root)",
            "       python -m bench NAME --help   (the benchmark's options)",
            "",
            "benchmarks (bench/README.md; results in bench/results/):",
            *rows,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"python -m bench: no benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    try:
        code: int = module.main(rest)
    except BenchError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
