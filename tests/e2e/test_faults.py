"""Faults under load, through real Envoy (issue 8): the supervisor killed, a worker killed
while a revocation is made, the Kubernetes API flapping while AgentRevocations come and go.

Each test keeps traffic flowing from threads (every call recorded with its start time,
status and deny reason) while the fault happens, and asserts on what every call got: never
an allow that the state at that moment denies; a 503 only while mandate cannot answer.
Every wait is bounded and waits for evidence (a process gone, a status field), never for
time alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.local import MandateProcess, start_mandate
from tests.kubeapi.faults import ListWatchErrors
from tests.kubeapi.fixtures import Kubectl, kube_api, kubeconfig, kubectl  # noqa: F401
from tests.kubeapi.server import KubeAPIServer

from .conftest import DEMO_PROFILES, E2E_PROFILES, Stack, direct_check, start_stack, stop_stack
from .test_revocation import _worker_pids

LEDGER_HOST = "ledger.finance.svc.cluster.local"
INVOICE = f"http://{LEDGER_HOST}/v1/invoices/9"
ARXIV = "http://export.arxiv.org/api/query"
OUTSIDE = f"http://{LEDGER_HOST}/v1/invoices/1"  # research-agent: outside its purpose


def _unlimited_profiles(tmp: Path) -> Path:
    """The demo profiles without billing-agent's rate limit: the load below would hit it."""
    profiles = tmp / "profiles"
    profiles.mkdir()
    text = (DEMO_PROFILES / "agents.yaml").read_text()
    unlimited = text.replace("rateLimit: {requests: 600, per: 1m}", "")
    assert unlimited != text
    (profiles / "agents.yaml").write_text(unlimited)
    shutil.copy(E2E_PROFILES / "tunnel.yaml", profiles / "tunnel.yaml")
    return profiles


@dataclass(frozen=True)
class Result:
    start: float
    end: float
    agent: str
    url: str
    status: int
    reason: str  # a deny's reason ("" otherwise)
    answered: bool  # by mandate (its decision header), not by Envoy alone


class Load:
    """Threads that call through Envoy until stopped (at most ``limit`` seconds), cycling
    through ``calls`` (agent, url), and record every result."""

    def __init__(
        self, stack: Stack, calls: Sequence[tuple[str, str]], threads: int = 3, limit: float = 60
    ) -> None:
        self.stack = stack
        self.calls = list(calls)
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            agent, url = self.calls[i % len(self.calls)]
            i += 1
            start = time.monotonic()
            try:
                resp = self.stack.call(agent, "GET", url, timeout=5)
            except OSError:  # Envoy itself never goes away here; count it as a failed call
                status, reason, answered = 0, "", False
            else:
                status, reason, answered = resp.status, "", False
                if resp.status == 200:
                    answered = "x-mandate-decision" in resp.json()["mandate"]
                elif "x-mandate-decision" in resp.headers:
                    answered = True
                    reason = resp.json().get("reason", "")
            with self._lock:
                self.results.append(
                    Result(start, time.monotonic(), agent, url, status, reason, answered)
                )

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def wait_for(
        self, what: str, cond: Callable[[list[Result]], bool], timeout: float = 20
    ) -> None:
        deadline = time.monotonic() + timeout
        while not cond(self.snapshot()):
            if time.monotonic() > deadline:
                raise AssertionError(f"load: {what} not seen within {timeout}s")
            time.sleep(0.02)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(what: str, cond: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.02)


def _admin(stack: Stack, method: str, path: str, body: object = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.mandate.admin_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {stack.token_file.read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _worker_index(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (value,) = [e.split(b"=", 1)[1] for e in env if e.startswith(b"MANDATE_WORKER_INDEX=")]
    return int(value)


# -- the supervisor killed ------------------------------------------------------------------


def test_killed_supervisor_takes_its_workers_down_and_envoy_fails_closed(
    tmp_path: Path, transport: str
) -> None:
    """Chosen behaviour: a worker stops as soon as its supervisor is gone (nothing would
    update its table any more: revocations made after the crash would never be enforced),
    so Envoy fails closed with 503. Until it has stopped it enforces the last state."""
    stack = start_stack(
        tmp_path, profiles=_unlimited_profiles(tmp_path), workers=2, transport=transport
    )
    workers: list[int] = []
    try:
        revoked = stack.mandate_cli("revoke", "billing-agent", "--reason", "before the crash")
        assert revoked.returncode == 0, revoked.stderr
        workers = _worker_pids(stack.mandate)
        assert len(workers) == 2
        stack.upstream.received.clear()
        calls = [("billing-agent", INVOICE), ("research-agent", ARXIV), ("research-agent", OUTSIDE)]
        with Load(stack, calls) as load:
            load.wait_for("30 answered calls", lambda rs: sum(r.answered for r in rs) >= 30)
            killed_at = time.monotonic()
            os.kill(stack.mandate.proc.pid, signal.SIGKILL)
            stack.mandate.proc.wait(5)
            _wait("the workers to exit", lambda: not any(_alive(p) for p in workers), timeout=10)
            gone_at = time.monotonic()
            load.wait_for(
                "30 calls after the workers exited",
                lambda rs: sum(r.start > gone_at for r in rs) >= 30,
            )
        results = load.snapshot()
        assert gone_at - killed_at < 5, "the workers outlived their supervisor"
        before = [r for r in results if r.end < killed_at]
        assert before and all(r.answered for r in before)
        for r in results:  # the last state, or fail closed; never more
            if r.agent == "billing-agent":
                assert (r.status, r.reason) in ((403, "revoked: before the crash"), (503, "")), r
            elif r.url == OUTSIDE:
                assert r.status in (403, 503), r
                assert r.status == 503 or r.reason.startswith("outside purpose"), r
            else:
                assert r.status in (200, 503), r
        after = [r for r in results if r.start > gone_at]
        assert all(r.status == 503 and not r.answered for r in after), {r.status for r in after}
        assert {rec["mandate"]["x-mandate-agent"] for rec in stack.upstream.received} == {
            "research-agent"
        }
        assert len(stack.upstream.received) == sum(r.status == 200 for r in results)
    finally:
        for pid in workers:  # never leave an orphan behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        stop_stack(stack)  # the tables have no name: nothing of them to remove (see below)


# -- what a killed supervisor leaves behind -----------------------------------------------------


def _start_in(
    tmp: Path, tmpdir: Path, workers: int = 2, extra: Sequence[str] = ()
) -> MandateProcess:
    """`mandate run` with a temp directory of its own (TMPDIR): whatever a run makes there
    is this test's alone, whatever other tests run beside it."""
    assert not os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # else the metrics would go there
    return start_mandate(
        DEMO_PROFILES,
        tmp / "mandate",
        extra=[
            "--workers", str(workers), "--state-dir", str(tmp / "state"),
            "--namespace", "agents", *extra,
        ],
        env={"TMPDIR": str(tmpdir)},
    )  # fmt: skip


def _named_files(pid: int) -> set[str]:
    """Every file the process has open or mapped, by the name /proc shows for it."""
    names = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            names.add(os.readlink(fd))
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            names.add(fields[5])
    return {n for n in names if n.startswith("/")}


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _revoke(mandate: MandateProcess, tmp: Path, reason: str) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{mandate.admin_port}/v1/revocations",
        method="POST",
        data=json.dumps({"agent": "billing-agent", "reason": reason}).encode(),
        headers={"Authorization": f"Bearer {(tmp / 'state' / 'admin.token').read_text().strip()}"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status in (200, 201)


def _billing_check(port: int) -> tuple[int, str]:
    status, body = direct_check("grpc", port, "billing-agent", LEDGER_HOST, "/v1/invoices/1")
    return status, str(body.get("reason", ""))


def _kill_all(mandate: MandateProcess, workers: Sequence[int]) -> None:
    for pid in workers:  # never leave an orphan behind, even when a test fails
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    mandate.stop()


def test_a_killed_supervisor_leaves_no_file_behind(tmp_path: Path) -> None:
    """Issue 8 (hardening): a SIGKILLed supervisor (OOM, crash) used to leave its two 4 MiB
    tables in /dev/shm and its directories in /tmp, and each container restart in the same
    pod made new ones: /dev/shm and the pod's /tmp volume filled up. Now the tables have no
    name (memfds, inherited by the workers), and the last worker to exit removes the run
    directory: once the workers are gone, nothing the run made is left."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    shm_before = _shm()
    mandate = _start_in(tmp_path, tmpdir)
    workers: list[int] = []
    try:
        workers = _worker_pids(mandate)
        pids = [mandate.proc.pid, *workers]
        held = set().union(*(_named_files(pid) for pid in pids))
        assert {n for n in held if n.startswith("/memfd:")} == {
            "/memfd:mandate-revocations (deleted)",
            "/memfd:mandate-context (deleted)",
        }
        # (libfaketime's own segments are there when tests/timeshift.sh moves the clock.)
        assert not [n for n in held if n.startswith("/dev/shm/") and "faketime_" not in n], held
        made = {n for n in held if n.startswith(f"{tmpdir}/")}
        (run_dir,) = tmpdir.iterdir()
        assert made and all(n.startswith(f"{run_dir}/") for n in made), made  # lock, metrics
        assert _billing_check(mandate.grpc_ports[0])[0] == 200

        os.kill(mandate.proc.pid, signal.SIGKILL)
        mandate.proc.wait(5)
        _wait("the workers to exit", lambda: not any(_alive(p) for p in workers), timeout=10)
        assert list(tmpdir.iterdir()) == []
        assert not [n for n in made if os.path.lexists(n)]
        left = [n for n in _shm() - shm_before if any(str(p) in n for p in pids)]
        assert left == []
    finally:
        _kill_all(mandate, workers)


def test_the_next_start_removes_what_a_run_killed_at_once_left(tmp_path: Path) -> None:
    """Every process SIGKILLed at once (a container's OOM kill with memory.oom.group): no
    worker is left to clean up, so the run directory stays; the restarted container's
    `mandate run` removes it before making its own, and a clean stop removes that."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    first = _start_in(tmp_path, tmpdir)
    workers: list[int] = []
    try:
        workers = _worker_pids(first)
        (old,) = tmpdir.iterdir()
        os.kill(first.proc.pid, signal.SIGSTOP)  # no restarts, no death signal meanwhile
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        _wait("the workers to die", lambda: not any(_alive(p) for p in workers), timeout=10)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(5)
        assert old.is_dir()  # nobody was left to remove it
    finally:
        _kill_all(first, workers)
    second = _start_in(tmp_path, tmpdir, workers=1)
    try:
        (new,) = tmpdir.iterdir()
        assert new != old and not old.exists()
        assert _billing_check(second.grpc_port)[0] == 200
    finally:
        second.stop()
    assert second.proc.returncode == 0
    assert list(tmpdir.iterdir()) == []


def test_a_restarted_worker_inherits_the_supervisors_table(tmp_path: Path) -> None:
    """The tables reach the workers as descriptors the supervisor keeps: a worker it
    restarts maps the very table it writes, and sees a revocation written afterwards."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    mandate = _start_in(tmp_path, tmpdir)
    workers: list[int] = []
    try:
        workers = _worker_pids(mandate)
        assert mandate.table is not None
        table = os.stat(mandate.table)  # /proc/PID/fd/N: the supervisor's descriptor
        victim = workers[0]
        index = _worker_index(victim)
        os.kill(victim, signal.SIGKILL)
        _wait("the worker to die", lambda: not _alive(victim), timeout=5)
        token = (tmp_path / "state" / "admin.token").read_text().strip()

        def restarted() -> bool:
            req = urllib.request.Request(
                f"http://127.0.0.1:{mandate.admin_port}/v1/status",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                w = json.loads(resp.read())["workers"][index]
            return bool(w["ready"] and w["restarts"] >= 1)

        _wait("the worker restarted", restarted)
        workers = _worker_pids(mandate)
        (new,) = [p for p in workers if _worker_index(p) == index]
        assert new != victim
        mapped = [
            os.stat(fd)
            for fd in Path(f"/proc/{new}/fd").iterdir()
            if os.readlink(fd) == "/memfd:mandate-revocations (deleted)"
        ]
        assert [(s.st_dev, s.st_ino) for s in mapped] == [(table.st_dev, table.st_ino)]
        port = mandate.grpc_ports[index]
        assert _billing_check(port)[0] == 200
        _revoke(mandate, tmp_path, "after the restart")
        assert _billing_check(port) == (403, "revoked: after the restart")
    finally:
        _kill_all(mandate, workers)


def test_a_table_file_given_with_table_is_the_callers(tmp_path: Path) -> None:
    """`--table PATH` still works; the file is the caller's: it stays after a SIGKILL (on a
    memory volume of fixed size, as the injected sidecar has), and the next start reuses
    it rather than making another."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    table = tmp_path / "volume" / "revocations.table"
    table.parent.mkdir()
    first = _start_in(tmp_path, tmpdir, extra=["--table", str(table)])
    workers: list[int] = []
    try:
        assert first.table == table
        workers = _worker_pids(first)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(5)
        _wait("the workers to exit", lambda: not any(_alive(p) for p in workers), timeout=10)
    finally:
        _kill_all(first, workers)
    assert sorted(p.name for p in table.parent.iterdir()) == [
        "revocations.context",
        "revocations.table",
    ]
    assert list(tmpdir.iterdir()) == []
    second = _start_in(tmp_path, tmpdir, extra=["--table", str(table)])
    try:
        _revoke(second, tmp_path, "on a table file")
        assert _billing_check(second.grpc_ports[1]) == (403, "revoked: on a table file")
        assert sorted(p.name for p in table.parent.iterdir()) == [
            "revocations.context",
            "revocations.table",
        ]
    finally:
        second.stop()
    assert table.exists()


# -- a worker killed --------------------------------------------------------------------------


def test_a_revocation_made_while_a_worker_is_down_holds_from_its_first_check(
    tmp_path: Path, transport: str
) -> None:
    """A worker SIGKILLed under load: its share of the calls gets 503 from Envoy, never an
    allow; the supervisor restarts it on the same endpoint; a revocation written while it
    was down is enforced from the restarted worker's first Check (it reads the shared
    table, not a copy of its own)."""
    stack = start_stack(
        tmp_path, profiles=_unlimited_profiles(tmp_path), workers=2, transport=transport
    )
    agents = stack.profiles / "agents.yaml"
    try:
        victim = _worker_pids(stack.mandate)[0]
        index = _worker_index(victim)
        port = stack.mandate.grpc_ports[index]
        stack.upstream.received.clear()
        calls = [("billing-agent", INVOICE), ("research-agent", ARXIV)]
        with Load(stack, calls) as load:
            load.wait_for("20 answered calls", lambda rs: sum(r.answered for r in rs) >= 20)
            killed_at = time.monotonic()
            # Keep the restart from serving before the revocation is written (the write
            # fsyncs, which can take longer than a restart): a worker refuses to start on
            # broken profiles, while the running processes keep their last good snapshot.
            good = agents.read_text()
            _write_atomically(agents, good + "\n  bogus: [\n")
            os.kill(victim, signal.SIGKILL)
            _wait("the worker to die", lambda: not _alive(victim), timeout=5)
            code, _ = _admin(
                stack, "POST", "/v1/revocations",
                {"agent": "billing-agent", "reason": "while a worker was down"},
            )  # fmt: skip
            assert code in (200, 201)
            revoked_at = time.monotonic()
            _write_atomically(agents, good)  # only now can the restart come up
            _wait(
                "the worker restarted on its endpoint",
                lambda: (
                    (w := _admin(stack, "GET", "/v1/status")[1]["workers"][index])["ready"]
                    and w["restarts"] >= 1
                ),
            )
            back_at = time.monotonic()
            # The restarted worker, asked directly, as Envoy would.
            status, body = direct_check(
                transport, port, "billing-agent", LEDGER_HOST, "/v1/invoices/1"
            )
            assert (status, body.get("reason")) == (403, "revoked: while a worker was down")
            load.wait_for(
                "40 answered calls after the restart",
                lambda rs: sum(r.start > back_at and r.answered for r in rs) >= 40,
            )
        results = load.snapshot()
        for r in results:
            assert r.status in (200, 403, 503), r
            if r.agent == "research-agent":
                assert r.status in (200, 503), r  # never refused by mandate, at most by Envoy
            elif r.start > revoked_at:
                assert (r.status, r.reason) in (
                    (403, "revoked: while a worker was down"),
                    (503, ""),
                ), r
            if r.status == 503:
                assert not r.answered and r.end > killed_at, r
        assert [r for r in results if r.end < killed_at and r.status != 200] == []
        billing_allowed = sum(r.agent == "billing-agent" and r.status == 200 for r in results)
        received = [rec["mandate"]["x-mandate-agent"] for rec in stack.upstream.received]
        assert received.count("billing-agent") == billing_allowed
        # Both workers answer again: the last calls were all decided by mandate.
        tail = sorted(results, key=lambda r: r.start)[-20:]
        assert all(r.answered for r in tail), tail
    finally:
        stop_stack(stack)


# -- the Kubernetes API flapping ----------------------------------------------------------


def _revocation(name: str, agent: str, reason: str) -> str:
    return json.dumps(
        {
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentRevocation",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {"agent": agent, "reason": reason},
        }
    )


@pytest.fixture
def kube_stack(tmp_path: Path, kubeconfig: Path) -> Iterator[Stack]:  # noqa: F811
    stack = start_stack(
        tmp_path,
        workers=2,
        extra=["--kubernetes", "on", "--kubeconfig", str(kubeconfig), "--pod-name", "flappy"],
    )
    try:
        _wait("first sync", lambda: stack.readyz()[0] == 200)
        yield stack
    finally:
        stop_stack(stack)


def _answers(stack: Stack) -> tuple[tuple[int, str], tuple[int, str]]:
    """(status, reason) of a billing-agent and a research-agent call."""
    out = []
    for agent, url in (("billing-agent", INVOICE), ("research-agent", ARXIV)):
        resp = stack.call(agent, "GET", url)
        out.append((resp.status, resp.json().get("reason", "") if resp.status == 403 else ""))
    return out[0], out[1]


def _connected_metric(stack: Stack) -> float:
    url = f"http://127.0.0.1:{stack.mandate.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("mandate_kubernetes_connected ")]
    return float(line.split()[1])


def _kube_status(stack: Stack) -> dict[str, Any]:
    code, body = stack.readyz()
    assert code == 200 and body["ready"] is True, body  # the last known state is enforced
    kube: dict[str, Any] = body["kubernetes"]
    return kube


def test_kubernetes_api_flapping_during_revocations(
    kube_stack: Stack,
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    stack, api = kube_stack, kube_api
    revoked_a = (403, "revoked: flap A")
    kubectl("apply", "-f", "-", input=_revocation("flap-a", "billing-agent", "flap A"))
    _wait("A enforced", lambda: _answers(stack) == (revoked_a, (200, "")))
    kube = _kube_status(stack)
    assert (kube["state"], kube["connected"], kube["last_error"]) == ("synced", True, None)

    # 1. The API server goes away; meanwhile A is deleted and B created (through another
    # replica: the objects change, this pod cannot see it).
    api.down()
    kube = _wait(
        "the disconnection reported", lambda: (k := _kube_status(stack))["connected"] is False and k
    )
    assert kube["last_error"] and kube["state"] == "synced", kube  # synced once, now cut off
    _wait("the metric to say so", lambda: _connected_metric(stack) == 0)
    api.delete("arev", "agents", "flap-a")
    api.create(json.loads(_revocation("flap-b", "research-agent", "flap B")))
    for _ in range(10):  # A stays in force, B is unknown: nothing changes while disconnected
        assert _answers(stack) == (revoked_a, (200, ""))
    assert _kube_status(stack)["connected"] is False  # still down: the calls above count
    api.up()
    revoked_b = (403, "revoked: flap B")
    _wait("converged after the outage", lambda: _answers(stack) == ((200, ""), revoked_b))
    kube = _wait("reconnected", lambda: (k := _kube_status(stack))["connected"] and k)
    assert kube["last_error"] is None
    _wait("the metric to say so", lambda: _connected_metric(stack) == 1)

    # 2. The API server answers the watcher's list and watch with 500s (kubectl still works);
    # its history is compacted meanwhile, so the watcher must relist when it recovers.
    errors = ListWatchErrors(api, status=500)
    errors.on()
    api.end_watches()
    kube = _wait(
        "the errors reported", lambda: (k := _kube_status(stack))["connected"] is False and k
    )
    assert "HTTP 500" in kube["last_error"], kube
    kubectl("apply", "-f", "-", input=_revocation("flap-c", "billing-agent", "flap C"))
    kubectl("delete", "agentrevocation", "flap-b", "-n", "agents")
    failed = errors.failed
    _wait("two more failed attempts", lambda: errors.failed >= failed + 2)
    for _ in range(10):  # B is not lifted, C not yet known
        assert _answers(stack) == ((200, ""), revoked_b)
    api.compact()
    errors.off()
    revoked_c = (403, "revoked: flap C")
    _wait("converged after the errors", lambda: _answers(stack) == (revoked_c, (200, "")))
    kube = _wait("reconnected", lambda: (k := _kube_status(stack))["connected"] and k)
    assert kube["relists"] >= 1 and kube["last_error"] is None

    # Exactly the API's final state: what the admin API lists is what the API server holds.
    _, listed = _admin(stack, "GET", "/v1/revocations")
    assert sorted((r["name"], r["agent"], r["reason"]) for r in listed["revocations"]) == [
        ("flap-c", "billing-agent", "flap C")
    ]
    assert [o["metadata"]["name"] for o in api.objects("agentrevocations", "agents")] == ["flap-c"]
