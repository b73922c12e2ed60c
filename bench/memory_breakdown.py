"""Where mandate's idle memory is: RSS of each of its processes, split by mapping, and the RSS a
fresh interpreter reaches after each import a worker and the supervisor make.

1. `mandate run` (the demo profiles minus rate limits, Kubernetes off, 1 worker unless
   --workers; with --pod, as the injector starts it in a pod instead: its defaults, with
   Kubernetes on against the API server emulation, Envoy's access log service, the context
   API and audit on stdout) is started, left idle for --idle seconds, and each of its
   processes' mappings are read from /proc/PID/smaps: Rss and Pss per shared object
   (libpython, grpcio's cygrpc, protobuf's upb, OpenSSL, ...), the heap and other anonymous
   memory.
2. For each role, a fresh `python -c` imports the modules that role imports, one at a time,
   printing the RSS after each (`/proc/self/statm`): what each import adds.

Writes bench/results/memory_breakdown.{md,json}. Run:
    python -m bench memory_breakdown [--workers 1] [--transport grpc|http]
    python -m bench memory_breakdown --pod      (bench/results/memory_breakdown-pod.*)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.lib import PROFILES, RESULTS, ROOT, BenchError
from bench.lib.proc import process_tree
from bench.lib.report import write_results
from bench.lib.stack import unlimited_profiles
from devstack.local import MandateProcess, start_mandate

POD_AGENT = "research-agent"  # a demo profile's agent (devstack/demo/profiles)

# What each role imports, in order (sidecar.run.worker is the worker's entry, sidecar.run.supervisor
# the supervisor's; the third-party modules first, so that their share shows on its own).
ROLES: dict[str, list[str]] = {
    "worker": [
        "google.protobuf",
        "envoy.service.auth.v3.external_auth_pb2",
        "grpc",
        "prometheus_client",
        "yaml",
        "sidecar.core",
        "sidecar.run.worker",
    ],
    "supervisor": [
        "google.protobuf",
        "grpc",
        "prometheus_client",
        "aiohttp",
        "yaml",
        "sidecar.run.supervisor",
    ],
}
# --pod: the one process of an injected pod (supervisor and Check server), in the order that
# shows each library's own share: what the pod's defaults need, then mandate's own modules.
POD_ROLES: dict[str, list[str]] = {
    "one process as injected (fresh interpreter)": [
        "google.protobuf",
        "grpc",
        "envoy.service.auth.v3.external_auth_pb2",
        "envoy.service.accesslog.v3.als_pb2",
        "prometheus_client",
        "aiohttp",
        "aiohttp.web",
        "pydantic",
        "jsonschema_rs",
        "yaml",
        "uvloop",
        "httptools",
        "sidecar.core",
        "sidecar.kube",  # kubernetes_asyncio, name by name (sidecar/kube/lazyimport.py)
        "sidecar.run.supervisor",
        "sidecar.run.worker",
        "sidecar.check.http_lean",
        "sidecar.agentapi.server",
        "sidecar.behaviour.access_log",
        "sidecar.cli",
    ],
}

_PROBE = """
import importlib, json, os, sys
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page / 2**20
out = [["(interpreter)", rss()]]
for name in sys.argv[1:]:
    importlib.import_module(name)
    out.append([name, rss()])
print(json.dumps(out))
"""


def import_steps(modules: list[str]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"import probe failed: {proc.stderr.strip()[-600:]}")
    steps = json.loads(proc.stdout)
    out, before = [], 0.0
    for name, mb in steps:
        out.append({"module": name, "rss_mb": round(mb, 1), "added_mb": round(mb - before, 1)})
        before = mb
    return out


def mappings(pid: int) -> dict[str, Any]:
    """Rss/Pss (kB) per mapping name from /proc/PID/smaps, grouped."""
    rss: collections.Counter[str] = collections.Counter()
    pss: collections.Counter[str] = collections.Counter()
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if len(head) >= 5 and "-" in head[0] and ":" not in head[0]:
                path = head[5].strip() if len(head) > 5 else ""
                name = _group(path)
            elif line.startswith("Rss:"):
                rss[name] += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss[name] += int(line.split()[1])
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return {
        "pid": pid,
        "command": cmd[:120],
        "rss_mb": round(sum(rss.values()) / 1024, 1),
        "pss_mb": round(sum(pss.values()) / 1024, 1),
        "by_mapping": [
            {"mapping": k, "rss_mb": round(v / 1024, 1), "pss_mb": round(pss[k] / 1024, 1)}
            for k, v in rss.most_common()
            if v >= 256
        ],
    }


def _group(path: str) -> str:
    if not path:
        return "anonymous (Python objects, arenas, thread stacks)"
    if path in ("[heap]", "[stack]"):
        return path if path == "[stack]" else "[heap] (malloc)"
    if path.startswith("["):
        return "other kernel mappings"
    base = path.rsplit("/", 1)[-1]
    if ".so" in base:
        return base.split(".cpython")[0].split(".abi3")[0]
    if base.endswith(".pyc") or "python" in path:
        return "Python files"
    return base


def markdown(result: dict[str, Any]) -> str:
    out = ["# mandate's idle memory, by process, mapping and import", ""]
    out.append(
        f"Written by `python -m bench memory_breakdown{' --pod' if result.get('pod') else ''}`; "
        + (
            "`mandate run` as the injector starts it in a pod (its default config: "
            f"transport {result['transport']}, {result['workers']} worker, Kubernetes on "
            "against the API server emulation, Envoy's access log service, the context API, "
            "audit on stdout)"
            if result.get("pod")
            else f"`mandate run --transport {result['transport']} --workers {result['workers']}`"
        )
        + f" idle for {result['idle_s']} s. "
        "RSS counts a shared page in every process that maps it; PSS divides it among them "
        "(what a pod's memory cgroup is charged is close to the sum of PSS, plus page cache)."
    )
    total_rss = sum(p["rss_mb"] for p in result["processes"])
    total_pss = sum(p["pss_mb"] for p in result["processes"])
    out += ["", f"All processes: RSS {total_rss:.1f} MB, PSS {total_pss:.1f} MB.", ""]
    for p in result["processes"]:
        out += [f"## pid {p['pid']}: RSS {p['rss_mb']} MB, PSS {p['pss_mb']} MB", ""]
        out += [f"`{p['command']}`", "", "| mapping | RSS MB | PSS MB |", "|---|---|---|"]
        out += [f"| {m['mapping']} | {m['rss_mb']} | {m['pss_mb']} |" for m in p["by_mapping"]]
        out.append("")
    for role, steps in result["imports"].items():
        title = role if "(" in role else f"{role} (fresh interpreter)"
        out += [f"## What each import adds: {title}", ""]
        out += ["| import | RSS after, MB | added, MB |", "|---|---|---|"]
        out += [f"| `{s['module']}` | {s['rss_mb']} | +{s['added_mb']} |" for s in steps]
        out.append("")
    return "\n".join(out)


def pod_environment(work: Path, profiles: Path, kubeconfig: Path) -> dict[str, str]:
    """The environment the injector, with its default config, gives mandate's container in
    a pod of POD_AGENT; the pod's paths moved under ``work``, the API server the emulation's
    (``kubeconfig``), the admin API and the context API on free loopback ports."""
    from sidecar.injection.cli import load_config
    from sidecar.injection.pod import inject

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent-pod",
            "namespace": "agents",
            "labels": {"mandate.dev/inject": "true", "mandate.dev/agent": POD_AGENT},
        },
        "spec": {
            "serviceAccountName": POD_AGENT,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
            "containers": [{"name": "agent", "image": "agent"}],
        },
    }
    new = inject(pod, load_config(None, environ={}))
    spec = new["spec"]
    [container] = [
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "mandate"
    ]
    fields = {
        "metadata.namespace": "agents",
        "metadata.name": "agent-pod",
        "spec.serviceAccountName": POD_AGENT,
    }
    token = work / "admin-token"
    token.write_text("bench-admin-token\n")
    (work / "state").mkdir(exist_ok=True)
    moved = {
        "MANDATE_PROFILES": str(profiles),
        "MANDATE_ADMIN": "127.0.0.1:0",
        "MANDATE_CONTEXT_API": "127.0.0.1:0",
        "MANDATE_ADMIN_TOKEN_FILE": str(token),
        "MANDATE_STATE_DIR": str(work / "state"),
        "MANDATE_AUDIT_DIR": str(work / "audit"),
        "MANDATE_LOG_LEVEL": "WARNING",
    }
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            value = str(item["value"])
        else:
            value = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        if value.startswith("unix:/"):
            value = f"unix:{work / value.rsplit('/', 1)[1]}"
        env[name] = moved.get(name, value)
    env["KUBECONFIG"] = str(kubeconfig)
    return env


@contextlib.contextmanager
def pod_mandate(work: Path, profiles: Path) -> Iterator[tuple[MandateProcess, dict[str, str]]]:
    """mandate as the injector starts it in a pod (`pod_environment`), watching the API
    server emulation (bench/kube_scale.py's, in a process of its own): the running process
    and its environment; both stopped on the way out."""
    from bench.kube_scale import Server

    server = Server()
    try:
        kubeconfig = Path(server.call("kubeconfig", str(work / "kubeconfig")))
        env = pod_environment(work, profiles, kubeconfig)
        # start_mandate's own flags (loopback ports, --kubernetes off) come before these:
        # the last of a flag wins, so the pod's listen address and Kubernetes mode stand.
        extra = ["--listen", env["MANDATE_LISTEN"], "--kubernetes", env["MANDATE_KUBERNETES"]]
        extra += ["--kubeconfig", str(kubeconfig)]
        mandate = start_mandate(profiles, work / "mandate", extra=extra, env=env, timeout=40)
        try:
            yield mandate, env
        finally:
            mandate.stop()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench memory_breakdown", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--transport", choices=["grpc", "http"], default="grpc")
    p.add_argument("--idle", type=float, default=2.0, help="seconds idle before reading")
    p.add_argument(
        "--pod",
        action="store_true",
        help="as injected in a pod: the injector's defaults, Kubernetes on (the API server "
        "emulation); --transport and --workers are then the injector's",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="mandate-mem-") as tmp,
        contextlib.ExitStack() as on_exit,  # mandate (and the emulation) stop first
    ):
        work = Path(tmp)
        profiles = unlimited_profiles(PROFILES, work)
        if args.pod:
            mandate, env = on_exit.enter_context(pod_mandate(work, profiles))
            args.transport = env["MANDATE_TRANSPORT"]
            args.workers = int(env["MANDATE_WORKERS"])
        else:
            extra = ["--transport", args.transport, "--workers", str(args.workers)]
            extra += ["--log-level", "WARNING"]
            mandate = start_mandate(profiles, work / "mandate", extra=extra)
            on_exit.callback(mandate.stop)
        time.sleep(args.idle)
        procs = [mappings(pid) for pid in process_tree(mandate.proc.pid)]
    result = {
        "pod": args.pod,
        "transport": args.transport,
        "workers": args.workers,
        "idle_s": args.idle,
        "processes": procs,
        "imports": {
            role: import_steps(mods) for role, mods in (POD_ROLES if args.pod else ROLES).items()
        },
    }
    stem = "memory_breakdown-pod" if args.pod else "memory_breakdown"
    write_results(args.out / stem, result, markdown(result))
    return 0
