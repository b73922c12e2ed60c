"""What a fleet of sidecars costs the Kubernetes API server: the emulation of tests/kubeapi
against N = 1, 10, 100 simulated sidecars, each running mandate's real watchers.

A simulated sidecar is what `mandate run` starts in a pod's supervisor (`sidecar.kube
.start_watcher` and `start_elevation_watcher`, each with its own ApiClient from a
kubeconfig, default options), feeding a RevocationStore on a shared table of its own and an
approval sink that grants every approval for its duration (as every pod whose profile has
the elevation does). All N run in this process, on one event loop. The emulation
(`tests.kubeapi.KubeAPIServer`, the same one the tests use) runs in a child process of its
own, so its CPU time is its own; between the two, a byte-counting TCP relay (a third
process) sees every byte on the wire and every connection.

Per N, on a fresh emulation holding --objects AgentRevocations already marked Enforced (a
fleet restarted into a namespace with revocations in force):

  start-up      N sidecars start at once: list + watch of both resources until every
                store is complete and 2N watches are open
  idle          --idle s with nothing changing (the default watch timeouts: 240-300 s)
  re-watch      the server ends every watch stream (as it does after timeoutSeconds):
                what one round of re-watches costs; at idle a pod opens 2 watches per
                ~270 s, so idle req/s = 2 N / 270 (the measured bytes and CPU per round
                give the rest)
  relist        a compaction expires every watch (410 Gone): every watcher lists again
  revocation    --revocations times: an AgentRevocation created, until every store
                enforces it and the reports settle (Events, status patches, re-reads);
                then deleted, until every store dropped it
  elevation     --elevations times: an AgentElevation approved without a request (every
                sidecar grants it), until the statuses and Events settle; then deleted

For each phase: requests by kind (watch, list, status patch, status get, Event post),
bytes to and from the API server, watch connections, CPU seconds of the emulation and of
the sidecars (this process: the driver too), and for revocations the spread of the moment
each sidecar's table enforced it. Extrapolated to --extrapolate pods (1,000) by a least-
squares line through the N points of each figure. Every wait has a deadline.

Run: python -m bench kube_scale [--pods 1,10,100] [--revocations 3] [--elevations 2]
     [--idle 5] [--objects 10] [--spread S] [--name kube_scale] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import resource
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.lib import RESULTS, ROOT, BenchError
from bench.lib.proc import stop_process
from bench.lib.report import machine_base, package_version, write_results

CTX = mp.get_context("spawn")
NAMESPACE = "agents"
AGENT = "billing-agent"
# The sidecar's watch requests ask for a random timeout in this range (consumer.WatchOptions).
WATCH_TIMEOUT = (240.0, 300.0)
WATCHERS_PER_POD = 2  # AgentRevocation and AgentElevation
KINDS = ("watch", "list", "status_patch", "status_get", "event_post", "other")


# -- pure parts (tests/unit/test_bench_kube_scale.py) ---------------------------------------------


def request_kind(method: str, path: str, params: Mapping[str, str]) -> str:
    """What an API request is, for the tables: watch, list, status_patch, status_get,
    event_post or other."""
    method = method.upper()
    parts = path.strip("/").split("/")
    if method == "GET" and params.get("watch", "").lower() in ("1", "true"):
        return "watch"
    if method == "POST" and parts[-1] == "events":
        return "event_post"
    if parts[-1] == "status" and method in ("PATCH", "PUT"):
        return "status_patch"
    if parts[-1] == "status" and method == "GET":
        return "status_get"
    # .../namespaces/NS/PLURAL (a collection) rather than .../PLURAL/NAME
    if method == "GET" and len(parts) >= 2 and parts[-2] == "namespaces":
        return "other"  # a namespace object itself
    if method == "GET" and len(parts) >= 3 and parts[-3] == "namespaces":
        return "list"
    return "other"


def count_kinds(requests: Iterable[tuple[str, str, Mapping[str, str]]]) -> dict[str, int]:
    counts = dict.fromkeys(KINDS, 0)
    for method, path, params in requests:
        counts[request_kind(method, path, params)] += 1
    return counts


def linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of the least-squares line y = a + b x; one point: (y, 0)."""
    if not points:
        raise ValueError("no points")
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return my, 0.0
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def extrapolate(points: Sequence[tuple[float, float]], at: float) -> float:
    """The least-squares line through ``points`` at x = ``at`` (never below 0)."""
    a, b = linear_fit(points)
    return max(0.0, a + b * at)


def idle_requests_per_second(
    pods: int,
    watchers: int = WATCHERS_PER_POD,
    timeout: tuple[float, float] = WATCH_TIMEOUT,
) -> float:
    """Watch requests per second from ``pods`` idle sidecars: each watcher opens a new watch
    when the server ends one, after a timeout drawn uniformly from ``timeout``."""
    return pods * watchers / ((timeout[0] + timeout[1]) / 2)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def delta(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """``after - before`` for every number (recursively for dicts)."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, Mapping):
            out[key] = delta(value, old if isinstance(old, Mapping) else {})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value - (old if isinstance(old, int | float) else 0)
        else:
            out[key] = value
    return out


# -- the emulation, in a process of its own -------------------------------------------------------


def _arev(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentRevocation",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"agent": AGENT, "reason": f"bench: {name}", **spec},
    }


def _aelev(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentElevation",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "agent": AGENT,
            "elevation": "refund",
            "duration": "10m",
            "approver": "bench@example.com",
            "reason": "bench: kube_scale",
        },
    }


def server_main(conn: Connection) -> None:
    """The emulation on 127.0.0.1:0; answers commands on ``conn`` until "stop"."""
    sys.path.insert(0, str(ROOT))
    from tests.kubeapi.server import KubeAPIServer

    server = KubeAPIServer(namespaces=("default", "kube-system", NAMESPACE)).start()
    seen = 0  # requests already counted into `kinds`
    kinds = dict.fromkeys(KINDS, 0)
    # Status writes: MODIFIED events after `last_rv` (the history restarts at a compaction).
    writes, last_rv = 0, 0
    conn.send(server.port)
    try:
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                break
            try:
                if cmd == "stats":
                    requests = server.requests
                    new = requests[seen:]
                    seen = len(requests)
                    for kind, n in count_kinds(
                        (str(getattr(r.method, "value", r.method)), r.url.path, dict(r.url.query))
                        for r in new
                    ).items():
                        kinds[kind] += n
                    newest = last_rv
                    for res in ("agentrevocations", "agentelevations"):
                        for rv, ev, _ in server.history(res):
                            if ev == "MODIFIED" and rv > last_rv:
                                writes += 1
                            newest = max(newest, rv)
                    last_rv = newest
                    usage = resource.getrusage(resource.RUSAGE_SELF)
                    conn.send(
                        {
                            "requests": dict(kinds),
                            "watches_open": server.cluster.open_watches,
                            "cpu_s": usage.ru_utime + usage.ru_stime,
                            "events": len(server.events(NAMESPACE)),
                            "status_writes": writes,
                        }
                    )
                elif cmd == "create":
                    conn.send(server.create(args[0]))
                elif cmd == "kubeconfig":
                    conn.send(str(server.write_kubeconfig(Path(args[0]), NAMESPACE)))
                elif cmd == "patch_status":
                    res, name, status = args
                    conn.send(
                        server.patch(res, NAMESPACE, name, {"status": status}, subresource="status")
                    )
                elif cmd == "get":
                    conn.send(server.get(args[0], NAMESPACE, args[1]))
                elif cmd == "delete":
                    conn.send(server.delete(args[0], NAMESPACE, args[1]))
                elif cmd == "end_watches":
                    conn.send(server.end_watches())
                elif cmd == "compact":
                    conn.send(server.compact(expire_watches=True))
                else:
                    conn.send(RuntimeError(f"unknown command {cmd!r}"))
            except Exception as exc:  # answered, so the driver fails with a message
                conn.send(RuntimeError(f"{cmd}: {exc!r}"))
    finally:
        server.stop()


class Server:
    """The driver's handle on the emulation process."""

    def __init__(self) -> None:
        self._conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=server_main, args=(child,), daemon=True)
        self.proc.start()
        if not self._conn.poll(30):
            raise BenchError("the API server emulation did not start within 30 s")
        self.port: int = self._conn.recv()
        self._lock = threading.Lock()

    def call(self, *cmd: Any) -> Any:
        with self._lock:
            self._conn.send(cmd)
            if not self._conn.poll(30):
                raise BenchError(f"the emulation did not answer {cmd[0]!r} within 30 s")
            answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise BenchError(str(answer))
        return answer

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.send(("stop",))
        self.proc.join(5)
        stop_process(self.proc)


# -- the byte-counting relay, in a process of its own --------------------------------------------


def relay_main(conn: Connection, upstream: int) -> None:
    """A TCP relay on 127.0.0.1:0 to 127.0.0.1:``upstream`` that counts bytes and connections;
    answers "stats" on ``conn`` until "stop"."""
    stats = {"bytes_to_server": 0, "bytes_from_server": 0, "connections": 0, "open": 0}
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # connections open at the end
    loop = asyncio.new_event_loop()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str) -> None:
        try:
            while data := await reader.read(65536):
                stats[key] += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats["connections"] += 1
        stats["open"] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
            await asyncio.gather(
                pump(reader, up_writer, "bytes_to_server"),
                pump(up_reader, writer, "bytes_from_server"),
            )
        except OSError:
            writer.close()
        finally:
            stats["open"] -= 1

    async def start() -> int:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        return int(srv.sockets[0].getsockname()[1])

    port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    conn.send(port)
    while True:
        cmd = conn.recv()
        if cmd == "stop":
            break
        conn.send(dict(stats))
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


class Relay:
    def __init__(self, upstream: int) -> None:
        self._conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=relay_main, args=(child, upstream), daemon=True)
        self.proc.start()
        if not self._conn.poll(30):
            raise BenchError("the relay did not start within 30 s")
        self.port: int = self._conn.recv()

    def stats(self) -> dict[str, int]:
        self._conn.send("stats")
        if not self._conn.poll(10):
            raise BenchError("the relay did not answer within 10 s")
        answer: dict[str, int] = self._conn.recv()
        return answer

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.send("stop")
        self.proc.join(5)
        stop_process(self.proc)


# -- the simulated sidecars ------------------------------------------------------------------------


class GrantingSink:
    """An ApprovalSink that grants every approval for its duration (10 minutes if none), as
    every pod whose profile has the elevation does."""

    def __init__(self) -> None:
        self.approvals: dict[str, Any] = {}

    def replace_approvals(self, source: str, approvals: Sequence[Any]) -> None:
        self.approvals = {a.key: a for a in approvals}

    def upsert_approval(self, approval: Any) -> tuple[str, str, str, float | None]:
        self.approvals[approval.key] = approval
        end = approval.approved_at + (approval.duration or 600.0)
        return "Granted", f"granted {approval.elevation}", f"g-{approval.name}", end

    def remove_approval(self, key: str) -> None:
        self.approvals.pop(key, None)


@dataclass
class Pod:
    name: str
    store: Any
    sink: GrantingSink
    revocations: Any = None
    elevations: Any = None
    enforced_at: dict[str, float] = field(default_factory=dict)  # key -> when it was added

    def on_change(self, change: Any) -> None:
        added, _removed, _generation, visible_at = change
        for rev in added:
            self.enforced_at.setdefault(rev.key, visible_at)

    def enforced(self) -> set[str]:
        return {r.key for r in self.store.entries("kubernetes")}


async def start_pods(n: int, kubeconfig: Path, options: Mapping[str, Any]) -> list[Pod]:
    import sidecar.kube as kube
    from sidecar.state.revocations import RevocationStore
    from sidecar.state.shm import SharedTable

    pods = []
    for i in range(n):
        store = RevocationStore(SharedTable.create(None, size=256 * 1024), None)
        pod = Pod(f"agent-pod-{i:04d}", store, GrantingSink())
        store.subscribe(pod.on_change)
        pods.append(pod)

    async def start(pod: Pod) -> None:
        common = {"namespace": NAMESPACE, "kubeconfig": kubeconfig, "pod_name": pod.name}
        pod.revocations = await kube.start_watcher(pod.store, **common, **options)
        pod.elevations = await kube.start_elevation_watcher(pod.sink, **common, **options)

    await asyncio.gather(*(start(p) for p in pods))
    return pods


async def stop_pods(pods: Sequence[Pod]) -> None:
    for pod in pods:
        for watcher in (pod.revocations, pod.elevations):
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        pod.store._table.close()


async def until(cond: Callable[[], Any], what: str, timeout: float, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(interval)
    raise BenchError(f"{what}: not within {timeout:g} s")


# -- one N -----------------------------------------------------------------------------------------


@dataclass
class Meter:
    server: Server
    relay: Relay

    async def snapshot(self) -> dict[str, Any]:
        stats = await asyncio.to_thread(self.server.call, "stats")
        wire = await asyncio.to_thread(self.relay.stats)
        return {**stats, **wire, "sidecar_cpu_s": time.process_time()}

    async def settle(self, quiet: float, timeout: float) -> dict[str, Any]:
        """Wait until no request arrives for ``quiet`` s; the snapshot then."""
        deadline = time.monotonic() + timeout
        last = await self.snapshot()
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet)
            now = await self.snapshot()
            same = now["requests"] == last["requests"] and (
                now["bytes_from_server"] == last["bytes_from_server"]
            )
            if same:
                return now
            last = now
        raise BenchError(f"the API traffic did not settle within {timeout:g} s")


def _phase(after: Mapping[str, Any], before: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    d = delta(after, before)
    return {
        "seconds": round(seconds, 3),
        "requests": d["requests"],
        "requests_total": sum(d["requests"].values()),
        "bytes_to_server": d["bytes_to_server"],
        "bytes_from_server": d["bytes_from_server"],
        "connections_opened": d["connections"],
        "server_cpu_s": round(d["cpu_s"], 4),
        "sidecar_cpu_s": round(d["sidecar_cpu_s"], 4),
        "events_posted": d["events"],
        "status_writes": d["status_writes"],
    }


async def run_n(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = Server()
    relay = Relay(server.port)
    meter = Meter(server, relay)
    pods: list[Pod] = []
    options: dict[str, Any] = {}
    if args.spread is not None:
        options["report_spread"] = args.spread
    try:
        # Revocations already in force, their status written long ago by a pod since gone
        # (what the sidecars' own status module says it must be: they find nothing to fix).
        from sidecar.kube.status import revocation_status

        for i in range(args.objects):
            name = f"existing-{i:03d}"
            created = await asyncio.to_thread(server.call, "create", _arev(name))
            status = revocation_status(
                {},
                created["metadata"].get("generation"),
                expires_at=None,
                now=time.time(),
                pod="agent-pod-gone",
                stamp="2020-01-01T00:00:00Z",
            )
            await asyncio.to_thread(server.call, "patch_status", "agentrevocations", name, status)
        kubeconfig = workdir / f"kubeconfig-{n}"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "e", "cluster": {"server": f"http://127.0.0.1:{relay.port}"}}
                    ],
                    "users": [{"name": "u", "user": {}}],
                    "contexts": [
                        {
                            "name": "e",
                            "context": {"cluster": "e", "user": "u", "namespace": NAMESPACE},
                        }
                    ],
                    "current-context": "e",
                }
            )
        )
        # Long enough for every report waiting for its pod's delay (the reporter's spread).
        quiet = max(0.3, (args.spread or 0.0) + 0.3, args.report_wait)
        result: dict[str, Any] = {"pods": n}
        base = await meter.snapshot()
        t0 = time.monotonic()
        pods = await start_pods(n, kubeconfig, options)
        await until(
            lambda: all(p.store.complete and p.elevations.lists for p in pods),
            f"{n} sidecars synced",
            60,
        )
        await until(
            lambda: server.call("stats")["watches_open"] >= WATCHERS_PER_POD * n,
            f"{WATCHERS_PER_POD * n} watches open",
            60,
            interval=0.1,
        )
        synced = time.monotonic() - t0
        await asyncio.sleep(quiet)  # the reports waiting for their delays, if any
        after = await meter.settle(0.3, 30)
        result["startup"] = {**_phase(after, base, synced), "watches_open": after["watches_open"]}

        # Idle.
        before = after
        t0 = time.monotonic()
        await asyncio.sleep(args.idle)
        after = await meter.snapshot()
        result["idle"] = _phase(after, before, time.monotonic() - t0)

        # One round of re-watches (the server ends every stream, as at timeoutSeconds).
        before = after
        t0 = time.monotonic()
        await asyncio.to_thread(server.call, "end_watches")
        await asyncio.sleep(0.2)
        await until(
            lambda: server.call("stats")["watches_open"] >= WATCHERS_PER_POD * n,
            "watches reopened",
            60,
            interval=0.1,
        )
        after = await meter.settle(0.3, 30)
        result["rewatch"] = _phase(after, before, time.monotonic() - t0)

        # A relist storm: every watch expired (410 Gone).
        lists = sum(p.revocations.lists + p.elevations.lists for p in pods)
        before = after
        t0 = time.monotonic()
        await asyncio.to_thread(server.call, "compact")
        await until(
            lambda: (
                sum(p.revocations.lists + p.elevations.lists for p in pods)
                >= lists + WATCHERS_PER_POD * n
            ),
            "every watcher relisted",
            60,
        )
        await until(
            lambda: server.call("stats")["watches_open"] >= WATCHERS_PER_POD * n,
            "watches reopened",
            60,
            interval=0.1,
        )
        after = await meter.settle(0.3, 30)
        result["relist"] = _phase(after, before, time.monotonic() - t0)

        # Revocations applied, then deleted.
        result["revocations"] = []
        for i in range(args.revocations):
            name = f"bench-{i:03d}"
            key = f"kubernetes:{NAMESPACE}/{name}"
            before = await meter.snapshot()
            t0 = time.monotonic()
            created = await asyncio.to_thread(server.call, "create", _arev(name))
            made_at = time.time()
            await until(lambda key=key: all(key in p.enforced() for p in pods), "enforced", 30)
            enforced = time.monotonic() - t0
            await asyncio.sleep(quiet)
            after = await meter.settle(0.3, 60)
            applied = _phase(after, before, time.monotonic() - t0)
            lags = [p.enforced_at[key] - made_at for p in pods if key in p.enforced_at]
            applied["enforced_all_s"] = round(enforced, 4)
            applied["enforced_lag_p50_ms"] = round(percentile(lags, 50) * 1000, 2)
            applied["enforced_lag_max_ms"] = round(max(lags) * 1000, 2)
            status = (await asyncio.to_thread(server.call, "get", "arev", name)).get("status", {})
            applied["status_state"] = status.get("state")
            applied["uid"] = created["metadata"]["uid"]
            before = after
            t0 = time.monotonic()
            await asyncio.to_thread(server.call, "delete", "arev", name)
            await until(lambda key=key: all(key not in p.enforced() for p in pods), "deleted", 30)
            after = await meter.settle(0.3, 30)
            result["revocations"].append(
                {"applied": applied, "deleted": _phase(after, before, time.monotonic() - t0)}
            )

        # Elevations approved without a request (every sidecar grants them), then deleted.
        result["elevations"] = []
        for i in range(args.elevations):
            name = f"bench-elev-{i:03d}"
            key = f"kubernetes:{NAMESPACE}/{name}"
            before = await meter.snapshot()
            t0 = time.monotonic()
            await asyncio.to_thread(server.call, "create", _aelev(name))
            await until(lambda key=key: all(key in p.sink.approvals for p in pods), "granted", 30)
            await asyncio.sleep(quiet)
            after = await meter.settle(0.3, 60)
            approved = _phase(after, before, time.monotonic() - t0)
            status = (await asyncio.to_thread(server.call, "get", "aelev", name)).get("status", {})
            approved["status_state"] = status.get("state")
            before = after
            t0 = time.monotonic()
            await asyncio.to_thread(server.call, "delete", "aelev", name)
            await until(
                lambda key=key: all(key not in p.sink.approvals for p in pods), "withdrawn", 30
            )
            after = await meter.settle(0.3, 30)
            result["elevations"].append(
                {"approved": approved, "deleted": _phase(after, before, time.monotonic() - t0)}
            )
        result["reports_failed"] = sum(
            p.revocations.reports_failed + p.elevations.reports_failed for p in pods
        )
        return result
    finally:
        await stop_pods(pods)
        relay.stop()
        server.stop()


# -- the report ------------------------------------------------------------------------------------


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows]
    return sum(values) / len(values) if values else math.nan


def summarise(run: Mapping[str, Any]) -> dict[str, float]:
    """The figures per N that the tables show (per revocation / elevation: means)."""
    applied = [r["applied"] for r in run["revocations"]]
    deleted = [r["deleted"] for r in run["revocations"]]
    approved = [e["approved"] for e in run["elevations"]]
    out = {
        "pods": float(run["pods"]),
        "watches_open": float(run["startup"]["watches_open"]),
        "startup_requests": float(run["startup"]["requests_total"]),
        "startup_kib_from_server": run["startup"]["bytes_from_server"] / 1024,
        "startup_server_cpu_s": float(run["startup"]["server_cpu_s"]),
        "idle_requests_per_s": run["idle"]["requests_total"] / max(run["idle"]["seconds"], 1e-9),
        "idle_server_cpu_per_s": run["idle"]["server_cpu_s"] / max(run["idle"]["seconds"], 1e-9),
        "rewatch_requests": float(run["rewatch"]["requests_total"]),
        "rewatch_kib": (run["rewatch"]["bytes_from_server"] + run["rewatch"]["bytes_to_server"])
        / 1024,
        "rewatch_server_cpu_s": float(run["rewatch"]["server_cpu_s"]),
        "relist_requests": float(run["relist"]["requests_total"]),
        "relist_kib_from_server": run["relist"]["bytes_from_server"] / 1024,
        "relist_server_cpu_s": float(run["relist"]["server_cpu_s"]),
    }
    if applied:
        for kind in ("event_post", "status_patch", "status_get"):
            out[f"rev_{kind}"] = sum(a["requests"][kind] for a in applied) / len(applied)
        out["rev_requests"] = _mean(applied, "requests_total")
        out["rev_events"] = _mean(applied, "events_posted")
        out["rev_status_writes"] = _mean(applied, "status_writes")
        out["rev_kib_from_server"] = _mean(applied, "bytes_from_server") / 1024
        out["rev_kib_to_server"] = _mean(applied, "bytes_to_server") / 1024
        out["rev_server_cpu_s"] = _mean(applied, "server_cpu_s")
        out["rev_sidecar_cpu_ms_per_pod"] = _mean(applied, "sidecar_cpu_s") * 1000 / run["pods"]
        out["rev_enforced_all_ms"] = _mean(applied, "enforced_all_s") * 1000
        out["rev_lag_max_ms"] = _mean(applied, "enforced_lag_max_ms")
        out["del_requests"] = _mean(deleted, "requests_total")
        out["del_kib_from_server"] = _mean(deleted, "bytes_from_server") / 1024
        out["del_server_cpu_s"] = _mean(deleted, "server_cpu_s")
    if approved:
        out["elev_requests"] = _mean(approved, "requests_total")
        out["elev_events"] = _mean(approved, "events_posted")
        out["elev_status_patches"] = sum(a["requests"]["status_patch"] for a in approved) / len(
            approved
        )
        out["elev_status_writes"] = _mean(approved, "status_writes")
        out["elev_kib_from_server"] = _mean(approved, "bytes_from_server") / 1024
        out["elev_server_cpu_s"] = _mean(approved, "server_cpu_s")
    return out


ROWS: list[tuple[str, str, str]] = [
    # (key, label, format)
    ("watches_open", "watch connections open", "{:.0f}"),
    ("startup_requests", "start-up (all at once): requests", "{:.0f}"),
    ("startup_kib_from_server", "start-up: KiB from the server", "{:.1f}"),
    ("startup_server_cpu_s", "start-up: server CPU s", "{:.3f}"),
    ("idle_requests_per_s", "idle: requests/s (measured)", "{:.2f}"),
    ("idle_server_cpu_per_s", "idle: server CPU s per s ⚠emulation polls", "{:.4f}"),
    ("rewatch_requests", "one re-watch round: requests", "{:.0f}"),
    ("rewatch_kib", "one re-watch round: KiB both ways", "{:.1f}"),
    ("rewatch_server_cpu_s", "one re-watch round: server CPU s", "{:.3f}"),
    ("relist_requests", "relist storm (410): requests", "{:.0f}"),
    ("relist_kib_from_server", "relist storm: KiB from the server", "{:.1f}"),
    ("relist_server_cpu_s", "relist storm: server CPU s", "{:.3f}"),
    ("rev_requests", "per revocation applied: requests", "{:.1f}"),
    ("rev_event_post", "  Events posted (requests)", "{:.1f}"),
    ("rev_events", "  Events stored", "{:.1f}"),
    ("rev_status_patch", "  status patches sent", "{:.1f}"),
    ("rev_status_writes", "  status writes accepted", "{:.1f}"),
    ("rev_status_get", "  status re-reads", "{:.1f}"),
    ("rev_kib_from_server", "  KiB from the server (watch fan-out)", "{:.1f}"),
    ("rev_kib_to_server", "  KiB to the server", "{:.1f}"),
    ("rev_server_cpu_s", "  server CPU s", "{:.3f}"),
    ("rev_sidecar_cpu_ms_per_pod", "  sidecar CPU ms per pod", "{:.2f}"),
    ("rev_enforced_all_ms", "  create → every pod enforces, ms", "{:.1f}"),
    ("del_requests", "per revocation deleted: requests", "{:.1f}"),
    ("del_kib_from_server", "  KiB from the server", "{:.1f}"),
    ("del_server_cpu_s", "  server CPU s", "{:.3f}"),
    ("elev_requests", "per elevation approved (all pods grant): requests", "{:.1f}"),
    ("elev_events", "  Events stored", "{:.1f}"),
    ("elev_status_patches", "  status patches sent", "{:.1f}"),
    ("elev_status_writes", "  status writes accepted", "{:.1f}"),
    ("elev_kib_from_server", "  KiB from the server", "{:.1f}"),
    ("elev_server_cpu_s", "  server CPU s", "{:.3f}"),
]
# Figures the before/after table shows (--before).
COMPARED = {
    "startup_requests",
    "rev_requests",
    "rev_event_post",
    "rev_status_patch",
    "rev_status_get",
    "rev_kib_from_server",
    "rev_kib_to_server",
    "rev_server_cpu_s",
    "elev_requests",
    "elev_events",
    "elev_status_patches",
}
# Figures that are not linear in N (means, latencies): not extrapolated.
NOT_EXTRAPOLATED = {"rev_enforced_all_ms", "rev_sidecar_cpu_ms_per_pod", "idle_server_cpu_per_s"}


def render(doc: Mapping[str, Any]) -> str:
    sums = [summarise(run) for run in doc["runs"]]
    at = doc["settings"]["extrapolate"]
    ns = [int(s["pods"]) for s in sums]
    header = "| figure | " + " | ".join(f"N={n}" for n in ns) + f" | {at:,} (fit) |"
    lines = [
        f"# kube_scale: API-server load of N sidecars ({doc['machine']['date']})",
        "",
        *([doc["note"], ""] if doc.get("note") else []),
        f"Machine: {doc['machine']['nproc']} CPUs, {doc['machine']['cpu_model']}; "
        f"git {doc['machine']['git_commit']}; kubernetes_asyncio "
        f"{doc['versions']['kubernetes_asyncio']}. Settings: {json.dumps(doc['settings'])}.",
        "",
        "Command: `"
        + shlex.join(["python", "-m", "bench", "kube_scale", *doc["settings"].get("argv", [])])
        + "`",
        "",
        header,
        "|---|" + "---:|" * (len(ns) + 1),
    ]
    for key, label, fmt in ROWS:
        if not all(key in s for s in sums):
            continue
        cells = [fmt.format(s[key]) for s in sums]
        if key in NOT_EXTRAPOLATED:
            fit = "-"
        else:
            fit = fmt.format(extrapolate([(s["pods"], s[key]) for s in sums], at))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fit} |")
    before = doc.get("before")
    if before:
        old = {int(r["pods"]): r for r in before["summary"]}
        lines += [
            "",
            f"Before and after ({before['machine']['git_commit']}, "
            f"{before['machine']['date']}: `{before['file']}`), same settings:",
            "",
            "| figure | "
            + " | ".join(f"N={n} before / now" for n in ns)
            + " | 1,000 before / now |",
            "|---|" + "---:|" * (len(ns) + 1),
        ]
        for key, label, fmt in ROWS:
            if key not in COMPARED or not all(
                key in s and key in old.get(int(s["pods"]), {}) for s in sums
            ):
                continue
            cells = [f"{fmt.format(old[int(s['pods'])][key])} / {fmt.format(s[key])}" for s in sums]
            was = extrapolate([(r["pods"], r[key]) for r in before["summary"]], at)
            now = extrapolate([(s["pods"], s[key]) for s in sums], at)
            lines.append(
                f"| {label.strip()} | "
                + " | ".join(cells)
                + f" | {fmt.format(was)} / {fmt.format(now)} |"
            )
    idle = idle_requests_per_second(at)
    rewatch = extrapolate([(s["pods"], s["rewatch_kib"]) for s in sums], at)
    lines += [
        "",
        f"At idle with the default watch timeouts ({WATCH_TIMEOUT[0]:.0f}-{WATCH_TIMEOUT[1]:.0f}"
        f" s), {at:,} pods open {WATCHERS_PER_POD * at:,} watches and re-open them at "
        f"{idle:.1f} requests/s, about {rewatch / 270 * 1024 / 1000 * WATCHERS_PER_POD:.1f}"
        " kB/s on the wire (one round's bytes spread over 270 s).",
        "",
        f"Failed reports over the whole run: {sum(r['reports_failed'] for r in doc['runs'])}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench kube_scale", description=__doc__)
    parser.add_argument("--pods", default="1,10,100", help="comma-separated N (default 1,10,100)")
    parser.add_argument("--revocations", type=int, default=3)
    parser.add_argument("--elevations", type=int, default=2)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measured")
    parser.add_argument("--objects", type=int, default=10, help="revocations already in force")
    parser.add_argument(
        "--spread",
        type=float,
        default=None,
        help="the watchers' report_spread option (default: theirs)",
    )
    parser.add_argument(
        "--report-wait",
        type=float,
        default=2.5,
        help="seconds to wait after each change before waiting for quiet (>= the spread)",
    )
    parser.add_argument("--extrapolate", type=int, default=1000)
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="an earlier run's JSON (e.g. bench/results/kube_scale-before.json) to compare",
    )
    parser.add_argument("--note", default="", help="a line for the top of the results")
    parser.add_argument("--name", default="kube_scale")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    ns = [int(x) for x in args.pods.split(",") if x.strip()]
    import tempfile

    runs = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kube-scale-") as tmp:
        for n in ns:
            print(f"N={n} ...", file=sys.stderr, flush=True)
            runs.append(asyncio.run(run_n(n, args, Path(tmp))))
    doc = {
        "benchmark": "kube_scale",
        "machine": machine_base(),
        "versions": {
            "kubernetes_asyncio": package_version("kubernetes_asyncio"),
            "kmock": package_version("kmock"),
        },
        "settings": {
            "pods": ns,
            "revocations": args.revocations,
            "elevations": args.elevations,
            "idle_s": args.idle,
            "objects": args.objects,
            "spread": args.spread,
            "extrapolate": args.extrapolate,
            "argv": list(argv if argv is not None else sys.argv[2:]),
        },
        "note": args.note,
        "wall_s": round(time.monotonic() - started, 1),
        "runs": runs,
        "summary": [summarise(r) for r in runs],
    }
    if args.before is not None:
        earlier = json.loads(args.before.read_text())
        doc["before"] = {
            "file": str(args.before),
            "machine": earlier["machine"],
            "summary": earlier["summary"],
        }
    write_results(args.out / args.name, doc, render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
