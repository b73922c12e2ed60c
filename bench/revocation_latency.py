"""How fast a revocation stops an agent: real Envoy (envoy/local.yaml, one listener for
billing-agent, Envoy's --concurrency 1), `mandate run` (one process, as by default; --workers
N for more) and the demo upstream, all on 127.0.0.1.

C client processes (one keep-alive connection each, so that no client waits for another's
GIL) send `GET http://ledger.finance.svc.cluster.local/v1/invoices/42` through Envoy as an
HTTP proxy, back to back, and record (send time, receive time, status) with time.time(),
the clock of mandate's `visible_at`. The controller flips the agent: POST /v1/revocations
(the answer's `visible_at` is when the shared-table write became visible to the Check
workers), waits until every client has received a 403 and a short settle, DELETE
/v1/revocations/billing-agent, waits until every client has received a 200 and a settle,
and so on. From the clients' records, per flip:

  revoke -> first 403    first receive time of a "revoked" 403 minus visible_at
  stale allows           requests SENT after visible_at and ANSWERED before the DELETE was
                         sent, with a 200 (must be 0: their Check came after the write)
  restore -> first 200   first receive time of a 200 minus the restore's visible_at
  stale denies           requests sent after the restore's visible_at answered 403

Phase 1 runs --clients clients, phase 2 --load-clients (under load). Phase 3, on a stack of
its own (the Kubernetes API emulation of tests/kubeapi/ in a thread, `mandate run --kubernetes
on --kubeconfig FILE`), --clients clients: --applies times `kubectl apply -f -` (the venv's
real kubectl) an AgentRevocation for billing-agent, wait until every client has received a 403
and settle, `kubectl delete` it, wait for 200s and settle; per apply:

  apply exit -> first 403   first revoked 403 received minus the kubectl process's exit
                            (also from its start)
  stale allows              200s for requests sent after the write was visible for sure (the
                            earlier of the first 403 received and the watcher's Event's
                            visible_at, truncated to the ms, + 1 ms) and answered before
                            `kubectl delete` started (must be 0)
  delete exit -> first 200  and stale denies (sent after the first 200 received, 403)

`--kubectl` runs phase 3 only (its results replace those in an existing JSON), `--no-kubectl`
skips it.

Prints a table and writes bench/results/revocation_latency.{json,md}. Every wait has a
deadline; all processes are stopped on exit, errors and Ctrl-C included.
Run: python -m bench revocation_latency [--flips 100] [--clients 4] [--applies 30]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import math
import multiprocessing as mp
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bench.lib import PROFILES, RESULTS, ROOT, BenchError
from bench.lib.load import RawClient
from bench.lib.proc import (
    CLK_TCK,
    cpu_seconds,
    machine_ticks,
    process_tree,
    sigterm_as_interrupt,
    stop_process,
    wait_for,
)
from bench.lib.report import envoy_version, machine_base, package_version
from bench.lib.stack import unlimited_profiles, upstream_main
from devstack.local import (
    ENVOY_DIR,
    EnvoyProcess,
    MandateProcess,
    render_envoy_config,
    start_envoy,
    start_mandate,
)

AGENT = "billing-agent"
NAMESPACE = "agents"
HOST = "ledger.finance.svc.cluster.local"
URL = f"http://{HOST}/v1/invoices/42"
REASON = "bench: revocation latency"
OTHER_403 = 1403  # a 403 whose body is not the revocation's deny (recorded apart)
ERROR = 0  # no response (socket error, timeout)
GOAL_P99_MS = 2.0
CTX = mp.get_context("spawn")


# ---------------------------------------------------------------- child processes


def _quiet_child() -> None:
    """Children leave Ctrl-C to the controller, which stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


REQUEST = f"GET {URL} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


def client_main(
    index: int,
    port: int,
    stop: Any,
    last_403: Any,
    last_200: Any,
    out: Connection,
) -> None:
    """Send the request back to back over one keep-alive connection until ``stop.value``;
    publish the receive time of the latest 403 / 200 in the shared arrays (for the
    controller's pacing); send all records (send, receive, status) to ``out`` at the end."""
    _quiet_child()
    sent, received, statuses = array("d"), array("d"), array("i")
    client = RawClient(port, timeout=5)
    while not stop.value:
        t0 = time.time()
        try:
            status, _, body = client.send(REQUEST)
            t1 = time.time()
            if status == 403 and b'"revoked' not in body:
                status = OTHER_403
        except (OSError, ValueError, IndexError):
            t1, status = time.time(), ERROR
            client.close()
            time.sleep(0.01)
        sent.append(t0)
        received.append(t1)
        statuses.append(status)
        if status == 403:
            last_403[index] = t1
        elif status == 200:
            last_200[index] = t1
    client.close()
    for a in (sent, received, statuses):
        out.send_bytes(a.tobytes())
    out.close()


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    upstream: BaseProcess
    upstream_port: int
    mandate: MandateProcess
    envoy: EnvoyProcess
    token: str
    _admin: http.client.HTTPConnection | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return self.envoy.listeners[f"egress-{AGENT}"]

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One call to mandate's admin API over a kept-alive connection: (status, JSON)."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            if self._admin is None:
                self._admin = http.client.HTTPConnection(
                    "127.0.0.1", self.mandate.admin_port, timeout=5
                )
            try:
                self._admin.request(method, path, body=data, headers=headers)
                resp = self._admin.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            except (OSError, http.client.HTTPException):
                self._admin.close()
                self._admin = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def one_request(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", URL, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", HOST)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@contextlib.contextmanager
def running_stack(work: Path, workers: int, extra: Sequence[str] = ()) -> Iterator[Stack]:
    """Upstream, `mandate run --workers N [extra]` and Envoy; stopped on the way out,
    whatever happens."""
    with contextlib.ExitStack() as stack:
        parent, child = CTX.Pipe(duplex=False)
        upstream = CTX.Process(target=upstream_main, args=(child,), daemon=True)
        upstream.start()
        stack.callback(stop_process, upstream)
        if not parent.poll(20):
            raise BenchError("the demo upstream did not start within 20 s")
        upstream_port = int(parent.recv())
        state = work / "state"
        mandate = start_mandate(
            unlimited_profiles(PROFILES, work),
            work / "mandate",
            extra=[
                "--workers", str(workers), "--state-dir", str(state),
                "--namespace", NAMESPACE, *extra,
            ],
        )  # fmt: skip
        stack.callback(mandate.stop)
        token_file = state / "admin.token"
        wait_for(lambda: token_file.exists() and token_file.read_text().strip(), "token", 10)
        config = render_envoy_config(
            ENVOY_DIR / "local.yaml",
            {
                "ADMIN_PORT": 0,
                "LISTEN_PORT": 0,
                "UPSTREAM_PORT": upstream_port,
                "ACCESS_LOG": "/dev/null",
            },
            agents=[AGENT],
            mandate_ports=mandate.grpc_ports,
        )
        envoy = start_envoy(config, work / "envoy")
        stack.callback(envoy.stop)
        s = Stack(upstream, upstream_port, mandate, envoy, token_file.read_text().strip())
        try:
            verify(s, workers)
            yield s
        except BaseException:
            for log in (envoy.log_path, mandate.log_path):
                if log.exists():
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
            raise
        finally:
            if s._admin is not None:
                s._admin.close()


def verify(stack: Stack, workers: int) -> None:
    """Abort unless the request is allowed (200) by every worker and a revocation denies it
    with mandate's deny body; leave the agent restored."""

    def ok() -> bool:
        with contextlib.suppress(OSError, http.client.HTTPException):
            return one_request(stack.port)[0] == 200
        return False

    wait_for(ok, f"GET {URL} through Envoy -> 200", 20, 0.1)
    got = [one_request(stack.port) for _ in range(4 * workers)]
    if {s for s, _ in got} != {200}:
        raise BenchError(f"GET {URL}: {[s for s, _ in got]}, not all 200")
    status, body = stack.admin("POST", "/v1/revocations", {"agent": AGENT, "reason": REASON})
    if status != 201 or not isinstance(body.get("visible_at"), float):
        raise BenchError(f"POST /v1/revocations: {status} {body}")
    got = [one_request(stack.port) for _ in range(4 * workers)]
    if any(s != 403 or REASON.encode() not in b for s, b in got):
        raise BenchError(f"revoked: {got[:2]}, not mandate's 403 'revoked: {REASON}'")
    status, body = stack.admin("DELETE", f"/v1/revocations/{AGENT}")
    if status != 200:
        raise BenchError(f"DELETE /v1/revocations/{AGENT}: {status} {body}")
    wait_for(ok, "restored -> 200", 5)


# ---------------------------------------------------------------- one phase of flips


@dataclass
class Flip:
    post_sent: float  # just before the POST was written
    post_answered: float
    revoke_visible: float  # mandate's visible_at
    delete_sent: float
    delete_answered: float
    restore_visible: float
    revoke_seen: bool  # every client received a 403 before the deadline
    restore_seen: bool


@dataclass
class Records:
    sent: array[float]
    received: array[float]
    status: array[int]


@dataclass
class Fleet:
    """Client processes sending continuously; ``last_403`` / ``last_200``: the receive time of
    each client's latest revoked 403 / 200 (for the controller's pacing)."""

    procs: list[tuple[BaseProcess, Connection]]
    stop: Any
    last_403: Any
    last_200: Any

    def pids(self) -> list[int]:
        return [proc.pid or 0 for proc, _ in self.procs]

    def collect(self) -> Records:
        """Stop the clients and gather their records."""
        self.stop.value = 1
        return collect(self.procs)


@contextlib.contextmanager
def client_fleet(port: int, clients: int) -> Iterator[Fleet]:
    """Start ``clients`` client processes against Envoy's ``port``, wait until each has
    received a 200; stop them on the way out, whatever happens."""
    fleet = Fleet(
        [],
        CTX.RawValue("b", 0),  # polled by every client on every request: no lock
        CTX.Array("d", clients, lock=False),
        CTX.Array("d", clients, lock=False),
    )
    try:
        for i in range(clients):
            parent, child = CTX.Pipe(duplex=False)
            p = CTX.Process(
                target=client_main,
                args=(i, port, fleet.stop, fleet.last_403, fleet.last_200, child),
                daemon=True,
            )
            p.start()
            child.close()
            fleet.procs.append((p, parent))
        start = time.time()
        wait_for(lambda: min(fleet.last_200) > start, "every client received a 200", 30, 0.01)
        yield fleet
    finally:
        fleet.stop.value = 1
        for proc, conn in fleet.procs:
            proc.join(2)
            stop_process(proc)
            conn.close()


def stack_pids(stack: Stack) -> list[int]:
    """This process, the upstream, Envoy, mandate and its workers (for CPU accounting)."""
    mandate = stack.mandate.proc.pid
    return [os.getpid(), stack.upstream.pid or 0, stack.envoy.proc.pid, *process_tree(mandate)]


def run_flips(stack: Stack, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``clients`` client processes, flip ``args.flips`` times, stop the clients and
    analyse their records."""
    print(f"== {clients} clients, {args.flips} flips", flush=True)
    flips: list[Flip] = []
    with client_fleet(stack.port, clients) as fleet:
        time.sleep(args.warmup)
        ours = stack_pids(stack) + fleet.pids()
        cpu0 = sum(cpu_seconds(pid) for pid in ours)
        busy0, total0 = machine_ticks()
        t_start = time.time()
        for n in range(args.flips):
            flips.append(flip(stack, fleet.last_403, fleet.last_200, args))
            if (n + 1) % 25 == 0:
                print(f"   {n + 1} flips", flush=True)
        t_end = time.time()
        busy1, total1 = machine_ticks()
        cpu1 = sum(cpu_seconds(pid) for pid in ours)
        records = fleet.collect()
    result = analyse(records, flips, t_start, t_end)
    result["clients"] = clients
    result["under_load"] = clients >= 4
    result["machine_busy_pct"] = 100 * (busy1 - busy0) / max(1, total1 - total0)
    # CPUs used meanwhile by processes other than this benchmark's (others' noise).
    wall = (total1 - total0) / CLK_TCK / (os.cpu_count() or 1)
    other = ((busy1 - busy0) / CLK_TCK - (cpu1 - cpu0)) / wall if wall > 0 else None
    result["other_cpus"] = other
    rv, rs = result["revoke_ms"], result["restore_ms"]
    print(
        f"   revoke -> first 403: p50 {fmt(rv['p50'])} / p99 {fmt(rv['p99'])} / max "
        f"{fmt(rv['max'])} ms; stale allows {result['stale_allows']}; restore -> first 200 "
        f"p50 {fmt(rs['p50'])} / p99 {fmt(rs['p99'])} ms; {result['rps']:,.0f} req/s",
        flush=True,
    )
    return result


def flip(
    stack: Stack,
    last_403: Any,
    last_200: Any,
    args: argparse.Namespace,
) -> Flip:
    """Revoke, wait for every client to be denied and settle, restore, wait for every
    client to be allowed again and settle (the settles are jittered so that flips do not
    lock in phase with the clients' requests)."""
    post_sent = time.time()
    status, body = stack.admin("POST", "/v1/revocations", {"agent": AGENT, "reason": REASON})
    post_answered = time.time()
    if status != 201:
        raise BenchError(f"POST /v1/revocations: {status} {body}")
    visible = float(body["visible_at"])
    revoke_seen = poll(lambda: min(last_403) >= visible, args.deadline)
    time.sleep(random.uniform(args.settle, 2 * args.settle))
    delete_sent = time.time()
    status, body = stack.admin("DELETE", f"/v1/revocations/{AGENT}")
    delete_answered = time.time()
    if status != 200:
        raise BenchError(f"DELETE /v1/revocations/{AGENT}: {status} {body}")
    restored = float(body["visible_at"])
    restore_seen = poll(lambda: min(last_200) >= restored, args.deadline)
    time.sleep(random.uniform(args.settle, 2 * args.settle))
    return Flip(
        post_sent, post_answered, visible, delete_sent, delete_answered, restored,
        revoke_seen, restore_seen,
    )  # fmt: skip


def poll(cond: Any, timeout: float) -> bool:
    """Wait (1 ms steps) until ``cond()``; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


def collect(procs: Sequence[tuple[BaseProcess, Connection]]) -> Records:
    """Every client's records, merged and sorted by send time."""
    rows: list[tuple[float, float, int]] = []
    for p, conn in procs:
        parts: list[bytes] = []
        for _ in range(3):
            if not conn.poll(30):
                raise BenchError(f"client {p.name} did not send its records within 30 s")
            parts.append(conn.recv_bytes())
        sent, received, status = array("d"), array("d"), array("i")
        sent.frombytes(parts[0])
        received.frombytes(parts[1])
        status.frombytes(parts[2])
        rows.extend(zip(sent, received, status, strict=True))
    rows.sort()
    return Records(
        array("d", (r[0] for r in rows)),
        array("d", (r[1] for r in rows)),
        array("i", (r[2] for r in rows)),
    )


# ---------------------------------------------------------------- analysis


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def dist(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "min": min(values) if values else None,
    }


def analyse(rec: Records, flips: list[Flip], t_start: float, t_end: float) -> dict[str, Any]:
    """Per flip, from the merged records (sorted by send time). A request was checked
    between its send and its receive time, so one sent after the revocation's visible_at and
    received before the DELETE was sent must have been denied; one that straddles the
    DELETE may legitimately be allowed (counted apart)."""
    revoke_ms: list[float] = []
    first_403_sent_ms: list[float] = []  # send time of the first-received 403, vs visible_at
    first_403_rtt_ms: list[float] = []  # that request's own send -> receive time
    restore_ms: list[float] = []
    post_ms: list[float] = []
    stale_allows = stale_denies = errors_revoked = in_flight_allowed = straddling = 0
    stale_examples: list[dict[str, float]] = []
    checked_revoked = checked_restored = 0
    per_flip: list[dict[str, Any]] = []
    for i, f in enumerate(flips):
        v, r = f.revoke_visible, f.restore_visible
        nxt = flips[i + 1].post_sent if i + 1 < len(flips) else t_end
        post_ms.append((f.post_answered - f.post_sent) * 1e3)
        # Revoked: the first revoked 403 received after the POST was sent (visible_at is
        # stamped just after the write, so a 403 may even come a little before it).
        lo, hi = bisect_left(rec.sent, f.post_sent - 1.0), bisect_right(rec.sent, f.delete_sent)
        firsts = [
            (rec.received[j], rec.sent[j])
            for j in range(lo, hi)
            if rec.status[j] == 403 and rec.received[j] >= f.post_sent
        ]
        first = (min(firsts)[0] - v) * 1e3 if firsts else None
        if firsts:
            revoke_ms.append((min(firsts)[0] - v) * 1e3)
            first_403_sent_ms.append((min(firsts)[1] - v) * 1e3)
            first_403_rtt_ms.append((min(firsts)[0] - min(firsts)[1]) * 1e3)
        for j in range(bisect_right(rec.sent, v), hi):
            if rec.received[j] >= f.delete_sent:
                straddling += rec.status[j] == 200
                continue
            checked_revoked += 1
            if rec.status[j] == 200:
                stale_allows += 1
                if len(stale_examples) < 10:
                    stale_examples.append(
                        {
                            "flip": i,
                            "sent_after_visible_ms": (rec.sent[j] - v) * 1e3,
                            "received_after_visible_ms": (rec.received[j] - v) * 1e3,
                            "delete_sent_after_visible_ms": (f.delete_sent - v) * 1e3,
                        }
                    )
            elif rec.status[j] != 403:
                errors_revoked += 1
        for j in range(lo, bisect_right(rec.sent, v)):
            if rec.status[j] == 200 and rec.received[j] > v:
                in_flight_allowed += 1  # sent before the write, answered after: legitimate
        # Restored: the first 200 received after the DELETE was sent.
        lo, hi = bisect_left(rec.sent, f.delete_sent - 1.0), bisect_right(rec.sent, nxt)
        ok = [
            rec.received[j]
            for j in range(lo, hi)
            if rec.status[j] == 200 and rec.received[j] >= f.delete_sent
        ]
        restored = (min(ok) - r) * 1e3 if ok else None
        if restored is not None:
            restore_ms.append(restored)
        for j in range(bisect_right(rec.sent, r), hi):
            if rec.received[j] < nxt:
                checked_restored += 1
                stale_denies += rec.status[j] == 403
        per_flip.append(
            {
                "revoke_ms": first,
                "restore_ms": restored,
                "post_ms": (f.post_answered - f.post_sent) * 1e3,
                "visible_after_post_sent_ms": (v - f.post_sent) * 1e3,
                "delete_ms": (f.delete_answered - f.delete_sent) * 1e3,
                "restore_visible_after_delete_sent_ms": (r - f.delete_sent) * 1e3,
                "revoke_seen_by_all": f.revoke_seen,
                "restore_seen_by_all": f.restore_seen,
            }
        )
    inside = [
        k for k in range(len(rec.sent)) if t_start <= rec.sent[k] and rec.received[k] <= t_end
    ]
    by_status: dict[str, int] = {}
    for k in inside:
        s = rec.status[k]
        name = {ERROR: "error", OTHER_403: "403 (not revoked)"}.get(s, str(s))
        by_status[name] = by_status.get(name, 0) + 1
    rtt_200 = [(rec.received[k] - rec.sent[k]) * 1e3 for k in inside if rec.status[k] == 200]
    rtt_403 = [(rec.received[k] - rec.sent[k]) * 1e3 for k in inside if rec.status[k] == 403]
    return {
        "flips": len(flips),
        "revoke_missed": sum(not f.revoke_seen for f in flips),
        "restore_missed": sum(not f.restore_seen for f in flips),
        "revoke_ms": dist(revoke_ms),
        "first_403_sent_vs_visible_ms": dist(first_403_sent_ms),
        "first_403_request_ms": dist(first_403_rtt_ms),
        "restore_ms": dist(restore_ms),
        "post_round_trip_ms": dist(post_ms),
        "stale_allows": stale_allows,
        "stale_allow_examples": stale_examples,
        "requests_checked_revoked": checked_revoked,
        "errors_while_revoked": errors_revoked,
        "in_flight_allowed": in_flight_allowed,
        "stale_denies": stale_denies,
        "requests_checked_restored": checked_restored,
        "allowed_straddling_restore": straddling,
        "per_flip": per_flip,
        "requests": len(inside),
        "duration_s": t_end - t_start,
        "rps": len(inside) / (t_end - t_start) if t_end > t_start else 0.0,
        "by_status": by_status,
        "other_responses": sum(n for k, n in by_status.items() if k not in ("200", "403")),
        "request_ms_200": dist(rtt_200),
        "request_ms_403": dist(rtt_403),
    }


# ---------------------------------------------------------------- kubectl apply -> first 403


KUBE_PIECES = (ROOT / "tests" / "kubeapi", ROOT / "sidecar" / "kube")
KUBE_NAME = "bench-billing"
KUBE_REASON = "bench: kubectl apply"
POD_NAME = "bench-pod"
GOAL_KUBECTL_P99_MS = 25.0
REVOCATION_DOC = json.dumps(
    {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentRevocation",
        "metadata": {"name": KUBE_NAME, "namespace": NAMESPACE},
        "spec": {"agent": AGENT, "reason": KUBE_REASON},
    }
)
# The watcher's RevocationEnforced Event: "enforced by pod P from <visible_at, ms>Z, ...".
EVENT_FROM = re.compile(r" from (\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3})Z")


def kube_missing() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in KUBE_PIECES if not p.exists()]


@dataclass
class Apply:
    start: float  # just before kubectl apply was started
    exit: float  # just after it exited
    visible: float | None  # visible_at from the watcher's Event, truncated to the ms
    delete_start: float
    delete_exit: float
    revoke_seen: bool  # every client received a 403 before the deadline
    restore_seen: bool


def run_kubectl(kubectl: Any, *args: str, input: str | None = None) -> tuple[float, float]:
    """Run kubectl (killed after its timeout); (start, exit) times. Raises BenchError unless
    it exits 0."""
    t0 = time.time()
    try:
        result = kubectl(*args, input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"kubectl {' '.join(args)}: not done within {exc.timeout:g} s") from exc
    t1 = time.time()
    if result.returncode != 0:
        raise BenchError(
            f"kubectl {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[:500]}"
        )
    return t0, t1


def enforced_at(kube_api: Any, uid: str, timeout: float) -> float | None:
    """visible_at of the revocation of object ``uid`` (truncated to the ms), from the
    RevocationEnforced Event mandate's watcher creates; None if none within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        for event in kube_api.events(NAMESPACE):
            if (event.get("involvedObject") or {}).get("uid") != uid:
                continue
            m = EVENT_FROM.search(str(event.get("message", "")))
            if event.get("reason") == "RevocationEnforced" and m:
                moment = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f")
                return moment.replace(tzinfo=datetime.UTC).timestamp()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def watcher_ready(stack: Stack) -> bool:
    status, body = stack.admin("GET", "/v1/status")
    if status != 200:
        raise BenchError(f"GET /v1/status: {status} {body}")
    kube = body.get("kubernetes") or {}
    return bool(kube.get("connected") and body["revocations"]["complete"])


def apply_and_delete(kube_api: Any, kubectl: Any, fleet: Fleet, args: argparse.Namespace) -> Apply:
    """`kubectl apply`, wait until every client has received a 403 and settle, `kubectl
    delete`, wait until every client has received a 200 and settle."""
    start, exit_ = run_kubectl(kubectl, "apply", "-f", "-", input=REVOCATION_DOC)
    revoke_seen = poll(lambda: min(fleet.last_403) >= start, args.deadline)
    settled = time.time() + random.uniform(args.settle, 2 * args.settle)
    uid = kube_api.get("agentrevocations", NAMESPACE, KUBE_NAME)["metadata"]["uid"]
    visible = enforced_at(kube_api, uid, args.deadline)
    time.sleep(max(0.0, settled - time.time()))
    delete_start, delete_exit = run_kubectl(
        kubectl, "delete", "agentrevocation", KUBE_NAME, "-n", NAMESPACE
    )
    restore_seen = poll(lambda: min(fleet.last_200) >= delete_start, args.deadline)
    time.sleep(random.uniform(args.settle, 2 * args.settle))
    return Apply(start, exit_, visible, delete_start, delete_exit, revoke_seen, restore_seen)


def kubectl_phase(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`kubectl apply -f -` of an AgentRevocation for billing-agent in namespace agents ->
    first 403 (and `kubectl delete` -> first 200), ``args.applies`` times, on a stack of its
    own: the Kubernetes API emulation (tests/kubeapi/, in a thread of this process) and
    `mandate run --kubernetes on --kubeconfig FILE` (its AgentRevocation watcher)."""
    from tests.kubeapi.fixtures import Kubectl
    from tests.kubeapi.server import KubeAPIServer

    print(f"== kubectl: {args.clients} clients, {args.applies} applies", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    applies: list[Apply] = []
    with contextlib.ExitStack() as es:
        kube_api = KubeAPIServer().start()
        es.callback(kube_api.stop)
        kubeconfig = kube_api.write_kubeconfig(work / "kubeconfig", namespace=NAMESPACE)
        cache = work / "kubectl-home" / "cache"
        cache.mkdir(parents=True)
        kubectl = Kubectl(kubeconfig, cache)
        extra = ["--kubernetes", "on", "--kubeconfig", str(kubeconfig), "--pod-name", POD_NAME]
        stack = es.enter_context(running_stack(work, args.workers, extra))
        wait_for(lambda: watcher_ready(stack), "mandate's watcher connected, table complete", 15)
        print(f"   stack up: Envoy :{stack.port}, Kubernetes API {kube_api.url}", flush=True)
        # One apply/delete not timed: kubectl's discovery cache, the watch's first event.
        run_kubectl(kubectl, "apply", "-f", "-", input=REVOCATION_DOC)
        wait_for(lambda: one_request(stack.port)[0] == 403, "kubectl apply -> 403", 10, 0.01)
        status, body = one_request(stack.port)
        if KUBE_REASON.encode() not in body:
            raise BenchError(f"after kubectl apply: {status} {body[:200]!r}, not the revocation")
        run_kubectl(kubectl, "delete", "agentrevocation", KUBE_NAME, "-n", NAMESPACE)
        wait_for(lambda: one_request(stack.port)[0] == 200, "kubectl delete -> 200", 10, 0.01)
        with client_fleet(stack.port, args.clients) as fleet:
            time.sleep(args.warmup)
            ours = stack_pids(stack) + fleet.pids()
            cpu0 = sum(cpu_seconds(pid) for pid in ours)
            kube0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # kubectl, once reaped
            busy0, total0 = machine_ticks()
            t_start = time.time()
            for n in range(args.applies):
                applies.append(apply_and_delete(kube_api, kubectl, fleet, args))
                if (n + 1) % 10 == 0:
                    print(f"   {n + 1} applies", flush=True)
            t_end = time.time()
            busy1, total1 = machine_ticks()
            kube1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu1 = sum(cpu_seconds(pid) for pid in ours)
            records = fleet.collect()
        if stack.envoy.proc.poll() is not None or stack.mandate.proc.poll() is not None:
            raise BenchError("Envoy or mandate exited during the kubectl phase")
    result = analyse_kubectl(records, applies, t_start, t_end)
    kubectl_cpu = (kube1.ru_utime + kube1.ru_stime) - (kube0.ru_utime + kube0.ru_stime)
    result.update(
        clients=args.clients,
        date=date,
        loadavg_before=loadavg,
        goal_p99_ms=GOAL_KUBECTL_P99_MS,
        kubectl_cpu_ms_per_call=kubectl_cpu * 1e3 / max(1, 2 * len(applies)),
        machine_busy_pct=100 * (busy1 - busy0) / max(1, total1 - total0),
    )
    wall = (total1 - total0) / CLK_TCK / (os.cpu_count() or 1)
    ours_cpu = (cpu1 - cpu0) + kubectl_cpu
    result["other_cpus"] = ((busy1 - busy0) / CLK_TCK - ours_cpu) / wall if wall > 0 else None
    ex, rs = result["apply_exit_to_403_ms"], result["delete_exit_to_200_ms"]
    print(
        f"   kubectl apply exit -> first 403: p50 {fmt(ex['p50'])} / p99 {fmt(ex['p99'])} / max "
        f"{fmt(ex['max'])} ms; stale allows {result['stale_allows']}; delete exit -> first 200 "
        f"p50 {fmt(rs['p50'])} / p99 {fmt(rs['p99'])} ms",
        flush=True,
    )
    return result


def analyse_kubectl(
    rec: Records, applies: list[Apply], t_start: float, t_end: float
) -> dict[str, Any]:
    """Per apply, from the merged records (sorted by send time).

    The revocation's write was visible to the workers no later than ``bound``: the earlier
    of the first revoked 403 received (its Check came after the write) and the Event's
    visible_at (truncated to the ms) + 1 ms. A request sent after ``bound`` and answered
    before `kubectl delete` started must be denied: a 200 is a stale allow. Apart, the 200s
    of requests sent after kubectl exited (the watcher may not have written yet: not
    necessarily stale)."""
    exit_ms: list[float] = []
    start_ms: list[float] = []
    apply_ms = [(a.exit - a.start) * 1e3 for a in applies]
    delete_ms = [(a.delete_exit - a.delete_start) * 1e3 for a in applies]
    visible_ms: list[float] = []  # Event visible_at - kubectl exit
    after_visible_ms: list[float] = []  # first 403 received - Event visible_at
    restore_ms: list[float] = []
    stale_allows = checked = after_exit = after_exit_allowed = errors_revoked = 0
    stale_denies = checked_restored = 0
    stale_examples: list[dict[str, float]] = []
    per_apply: list[dict[str, Any]] = []
    for i, a in enumerate(applies):
        nxt = applies[i + 1].start if i + 1 < len(applies) else t_end
        lo, hi = bisect_left(rec.sent, a.start - 1.0), bisect_right(rec.sent, a.delete_start)
        firsts = [
            rec.received[j]
            for j in range(lo, hi)
            if rec.status[j] == 403 and rec.received[j] >= a.start
        ]
        first = min(firsts) if firsts else None
        bound = min(
            first if first is not None else math.inf,
            a.visible + 0.001 + 1e-6 if a.visible is not None else math.inf,
        )
        if first is not None:
            exit_ms.append((first - a.exit) * 1e3)
            start_ms.append((first - a.start) * 1e3)
        if a.visible is not None:
            visible_ms.append((a.visible - a.exit) * 1e3)
            if first is not None:
                after_visible_ms.append((first - a.visible) * 1e3)
        for j in range(bisect_right(rec.sent, min(bound, a.exit)), hi):
            if rec.received[j] >= a.delete_start:
                continue
            if rec.sent[j] > a.exit:
                after_exit += 1
                after_exit_allowed += rec.status[j] == 200
            if rec.sent[j] > bound:
                checked += 1
                if rec.status[j] == 200:
                    stale_allows += 1
                    if len(stale_examples) < 10:
                        stale_examples.append(
                            {
                                "apply": i,
                                "sent_after_bound_ms": (rec.sent[j] - bound) * 1e3,
                                "received_after_bound_ms": (rec.received[j] - bound) * 1e3,
                            }
                        )
                elif rec.status[j] != 403:
                    errors_revoked += 1
        # Restored: the first 200 received after `kubectl delete` started; a request sent
        # after it was received must be allowed.
        lo, hi = bisect_left(rec.sent, a.delete_start - 1.0), bisect_right(rec.sent, nxt)
        ok = [
            rec.received[j]
            for j in range(lo, hi)
            if rec.status[j] == 200 and rec.received[j] >= a.delete_start
        ]
        if ok:
            restore_ms.append((min(ok) - a.delete_exit) * 1e3)
            for j in range(bisect_right(rec.sent, min(ok)), hi):
                if rec.received[j] < nxt:
                    checked_restored += 1
                    stale_denies += rec.status[j] == 403
        per_apply.append(
            {
                "apply_ms": (a.exit - a.start) * 1e3,
                "exit_to_403_ms": (first - a.exit) * 1e3 if first is not None else None,
                "visible_after_exit_ms": (a.visible - a.exit) * 1e3
                if a.visible is not None
                else None,
                "delete_ms": (a.delete_exit - a.delete_start) * 1e3,
                "delete_exit_to_200_ms": (min(ok) - a.delete_exit) * 1e3 if ok else None,
                "revoke_seen_by_all": a.revoke_seen,
                "restore_seen_by_all": a.restore_seen,
            }
        )
    inside = [
        k for k in range(len(rec.sent)) if t_start <= rec.sent[k] and rec.received[k] <= t_end
    ]
    by_status: dict[str, int] = {}
    for k in inside:
        name = {ERROR: "error", OTHER_403: "403 (not revoked)"}.get(rec.status[k])
        name = name or str(rec.status[k])
        by_status[name] = by_status.get(name, 0) + 1
    return {
        "applies": len(applies),
        "revoke_missed": sum(not a.revoke_seen for a in applies),
        "restore_missed": sum(not a.restore_seen for a in applies),
        "apply_exit_to_403_ms": dist(exit_ms),
        "apply_start_to_403_ms": dist(start_ms),
        "kubectl_apply_ms": dist(apply_ms),
        "kubectl_delete_ms": dist(delete_ms),
        "events_found": sum(a.visible is not None for a in applies),
        "visible_after_exit_ms": dist(visible_ms),
        "first_403_after_visible_ms": dist(after_visible_ms),
        "stale_allows": stale_allows,
        "stale_allow_examples": stale_examples,
        "requests_checked_revoked": checked,
        "errors_while_revoked": errors_revoked,
        "requests_after_exit": after_exit,
        "allowed_after_exit": after_exit_allowed,
        "delete_exit_to_200_ms": dist(restore_ms),
        "stale_denies": stale_denies,
        "requests_checked_restored": checked_restored,
        "per_apply": per_apply,
        "requests": len(inside),
        "duration_s": t_end - t_start,
        "rps": len(inside) / (t_end - t_start) if t_end > t_start else 0.0,
        "by_status": by_status,
        "other_responses": sum(n for k, n in by_status.items() if k not in ("200", "403")),
    }


# ---------------------------------------------------------------- report


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **machine_base(),
        "grpcio": package_version("grpcio"),
        "envoy": envoy_version(),
        "envoy_concurrency": 1,
        "mandate_workers": args.workers,
        "flips": args.flips,
        "settle_s": args.settle,
        "deadline_s": args.deadline,
        "request": f"GET {URL} (absolute-form, Envoy as HTTP proxy), keep-alive",
        "clock": "time.time() in every process (CLOCK_REALTIME, one machine)",
    }


def fmt(value: Any, spec: str = "{:.2f}") -> str:
    return "-" if value is None else spec.format(value)


def markdown(info: dict[str, Any], phases: list[dict[str, Any]], kubectl: Any) -> str:
    """The flip phases' table and notes (if any), then the kubectl phase's."""
    if not phases:
        return kubectl_markdown(kubectl)
    lines = [
        "| clients | flips | req/s | revoke → first 403 ms p50 / p99 / max | **stale allows** "
        "| restore → first 200 ms p50 / p99 / max | stale denies | missed | other responses "
        "| request ms p50 (200 / 403) | CPU busy (others) |",
        "|" + "---|" * 11,
    ]
    for r in phases:
        rv, rs = r["revoke_ms"], r["restore_ms"]
        lines.append(
            f"| {r['clients']}{' (under load)' if r['under_load'] else ''} | {r['flips']} "
            f"| {r['rps']:,.0f} | {fmt(rv['p50'])} / {fmt(rv['p99'])} / {fmt(rv['max'])} "
            f"| **{r['stale_allows']}** of {r['requests_checked_revoked']:,} "
            f"| {fmt(rs['p50'])} / {fmt(rs['p99'])} / {fmt(rs['max'])} | {r['stale_denies']} "
            f"| {r['revoke_missed']} / {r['restore_missed']} | {r['other_responses']} "
            f"| {fmt(r['request_ms_200']['p50'])} / {fmt(r['request_ms_403']['p50'])} "
            f"| {r['machine_busy_pct']:.0f} % ({fmt(r['other_cpus'])} CPU) |"
        )
    total_stale = sum(r["stale_allows"] for r in phases)
    worst = max((r["revoke_ms"]["p99"] or math.inf) for r in phases)
    lines += [
        "",
        "Stale allows (requests sent after `visible_at` and answered before the DELETE was "
        f"sent, with a 200): **{total_stale}** (must be 0). Worst p99 revoke → first 403: "
        f"{fmt(worst)} ms (issue 3's goal: ≤ {GOAL_P99_MS:g} ms, under load too). "
        "Other responses: neither 200 nor the revocation's 403 (socket errors, 5xx, other "
        "403s), whole run; should be 0.",
        "First 403's send time vs `visible_at`, p50 / min ms: "
        + "; ".join(
            f"{r['clients']} clients {fmt(r['first_403_sent_vs_visible_ms']['p50'])} / "
            f"{fmt(r['first_403_sent_vs_visible_ms']['min'])}"
            for r in phases
        )
        + " (negative: the request was in flight at the write and its Check came after it); "
        "that request's own round trip p50 vs any 403's: "
        + "; ".join(
            f"{fmt(r['first_403_request_ms']['p50'])} vs {fmt(r['request_ms_403']['p50'])} ms"
            for r in phases
        )
        + ". "
        "Requests sent before `visible_at` and answered 200 after it (legitimate): "
        + ", ".join(str(r["in_flight_allowed"]) for r in phases)
        + "; sent while revoked, answered 200 after the DELETE was sent (legitimate if checked "
        "after the restore): "
        + ", ".join(str(r["allowed_straddling_restore"]) for r in phases)
        + ". Admin POST round trip p50: "
        + ", ".join(fmt(r["post_round_trip_ms"]["p50"]) for r in phases)
        + " ms (includes the fsync of the state file, after `visible_at`).",
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; Python "
        f"{info['python']}, grpcio {info['grpcio']}, Envoy {info['envoy']} (--concurrency 1); "
        f"mandate --workers {info['mandate_workers']}; pinning: {info['pinning']}; git "
        f"{info['git_commit']}; {info['date']}; load average before: {info['loadavg_before']}.",
        f"Clients: one process each, {info['request']}; settle {info['settle_s'] * 1e3:g} to "
        f"{info['settle_s'] * 2e3:g} ms after each flip is seen; deadline "
        f'{info["deadline_s"]:g} s per flip ("missed": revoke / restore not seen by every '
        "client in time).",
        "",
    ]
    return "\n".join(lines) + "\n" + kubectl_markdown(kubectl)


def kubectl_markdown(k: Any) -> str:
    if not isinstance(k, dict):
        return f"`kubectl apply` → first 403: {k}.\n"
    ex, st, rs = k["apply_exit_to_403_ms"], k["apply_start_to_403_ms"], k["delete_exit_to_200_ms"]
    ap, vi, av = k["kubectl_apply_ms"], k["visible_after_exit_ms"], k["first_403_after_visible_ms"]
    met = ex["p99"] is not None and ex["p99"] <= k["goal_p99_ms"]
    lines = [
        "### `kubectl apply` → first 403",
        "",
        "| clients | applies | apply exit → first 403 ms p50 / p99 / max | apply start → first "
        "403 ms p50 / p99 / max | kubectl apply ms p50 / p99 | **stale allows** | 200s sent "
        "after kubectl exited | delete exit → first 200 ms p50 / p99 / max | stale denies "
        "| missed | other responses | CPU busy (others) |",
        "|" + "---|" * 12,
        f"| {k['clients']} | {k['applies']} | {fmt(ex['p50'])} / {fmt(ex['p99'])} / "
        f"{fmt(ex['max'])} | {fmt(st['p50'])} / {fmt(st['p99'])} / {fmt(st['max'])} "
        f"| {fmt(ap['p50'])} / {fmt(ap['p99'])} | **{k['stale_allows']}** of "
        f"{k['requests_checked_revoked']:,} | {k['allowed_after_exit']} of "
        f"{k['requests_after_exit']:,} | {fmt(rs['p50'])} / {fmt(rs['p99'])} / {fmt(rs['max'])} "
        f"| {k['stale_denies']} | {k['revoke_missed']} / {k['restore_missed']} "
        f"| {k['other_responses']} | {k['machine_busy_pct']:.0f} % ({fmt(k['other_cpus'])} "
        "CPU) |",
        "",
        f"p99 apply exit → first 403: {fmt(ex['p99'])} ms (issue 3's goal: ≤ "
        f"{k['goal_p99_ms']:g} ms: {'met' if met else 'missed'}). The watcher's table write "
        "became visible (`visible_at` from its RevocationEnforced Event, ms resolution; "
        f"{k['events_found']} of {k['applies']} found) at p50 / min / max "
        f"{fmt(vi['p50'])} / {fmt(vi['min'])} / {fmt(vi['max'])} ms after kubectl exited "
        "(negative: before kubectl's process was gone); first 403 after it p50 / p99 "
        f"{fmt(av['p50'])} / {fmt(av['p99'])} ms (overstated by < 1 ms). Stale allows: 200s "
        "for requests sent after the write was visible for sure (the earlier of the first "
        "revoked 403 received and the Event's `visible_at` + 1 ms) and answered before "
        "`kubectl delete` started; must be 0. 200s sent after kubectl exited: requests sent "
        "after kubectl's exit, answered before `kubectl delete` started, allowed (not "
        "necessarily stale: the watcher may not have written yet). kubectl: the venv's real "
        "kubectl, one process per call, "
        f"{fmt(k['kubectl_cpu_ms_per_call'], '{:.0f}')} ms CPU each; the Kubernetes API "
        "emulation in a thread of the controller; `mandate run --kubernetes on`; one untimed "
        f"apply/delete first; {k['date']}, load average before {k['loadavg_before']}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench revocation_latency",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--flips", type=int, default=100, help="revoke/restore flips per phase")
    p.add_argument("--clients", type=int, default=4, help="client processes, phase 1")
    p.add_argument(
        "--load-clients", type=int, default=16, help="client processes, phase 2 (0: skip)"
    )
    p.add_argument("--workers", type=int, default=1, help="Check worker processes (1: one process)")
    p.add_argument("--settle", type=float, default=0.05, help="s after a flip is seen (x1-2)")
    p.add_argument("--deadline", type=float, default=2.0, help="s to see a flip, per flip")
    p.add_argument("--warmup", type=float, default=1.0, help="s of load before the flips")
    p.add_argument(
        "--kubectl",
        action="store_true",
        help="only the kubectl phase (its results replace those in an existing JSON)",
    )
    p.add_argument("--no-kubectl", action="store_true", help="skip the kubectl phase")
    p.add_argument("--applies", type=int, default=30, help="kubectl applies (kubectl phase)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if not 1 <= args.flips <= 10000 or not 1 <= args.clients <= 256:
        p.error("--flips: 1..10000; --clients: 1..256")
    if not 0 <= args.load_clients <= 256 or not 1 <= args.workers <= 16:
        p.error("--load-clients: 0..256; --workers: 1..16")
    if args.kubectl and args.no_kubectl:
        p.error("--kubectl and --no-kubectl exclude each other")
    if not 1 <= args.applies <= 10000:
        p.error("--applies: 1..10000")
    if not 0 <= args.settle <= 5 or not 0.1 <= args.deadline <= 30 or not 0 <= args.warmup <= 60:
        p.error("--settle: 0..5 s; --deadline: 0.1..30 s; --warmup: 0..60 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with_kubectl = not args.no_kubectl
    if with_kubectl and kube_missing():  # fail before starting anything
        print(
            f"revocation_latency: the kubectl phase needs {', '.join(kube_missing())} "
            "(or --no-kubectl)",
            file=sys.stderr,
        )
        return 2
    info = machine_info(args)
    phases: list[dict[str, Any]] = []
    kubectl: Any = "not measured (`--no-kubectl`)"
    previous = args.out / "revocation_latency.json"
    if args.kubectl and previous.exists():  # keep the flip phases of the last full run
        with contextlib.suppress(OSError, ValueError, KeyError):
            doc = json.loads(previous.read_text())
            info, phases = doc["machine"], doc["phases"]
    try:
        with (
            sigterm_as_interrupt(),
            tempfile.TemporaryDirectory(prefix="mandate-revbench-") as tmp,
        ):
            if not args.kubectl:
                with running_stack(Path(tmp), args.workers) as stack:
                    print(f"   stack up: Envoy :{stack.port}, mandate {stack.mandate.grpc_ports}")
                    for clients in (args.clients, args.load_clients):
                        if clients:
                            phases.append(run_flips(stack, clients, args))
                        if stack.envoy.proc.poll() is not None or (
                            stack.mandate.proc.poll() is not None
                        ):
                            raise BenchError("Envoy or mandate exited during the run")
            if with_kubectl:
                kubectl = kubectl_phase(Path(tmp) / "kube", args)
    except (BenchError, OSError, RuntimeError) as exc:
        print(f"revocation_latency: aborted: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("revocation_latency: interrupted; processes stopped", file=sys.stderr)
        return 130
    table = markdown(info, phases, kubectl)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": info,
        "phases": phases,
        "kubectl": kubectl,
        "goal_p99_ms": GOAL_P99_MS,
        "kubectl_goal_p99_ms": GOAL_KUBECTL_P99_MS,
    }
    (args.out / "revocation_latency.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "revocation_latency.md").write_text(
        "# Revocation latency: flag written → first 403 through Envoy\n\n"
        "Written by `python -m bench revocation_latency`; see bench/README.md for what each column "
        "means.\n\n" + table
    )
    print(f"wrote {args.out / 'revocation_latency.json'} and {args.out / 'revocation_latency.md'}")
    stale = sum(r["stale_allows"] for r in phases)
    stale += kubectl["stale_allows"] if isinstance(kubectl, dict) else 0
    if stale:
        print(f"revocation_latency: FAIL: {stale} stale allow(s)", file=sys.stderr)
        return 1
    return 0
