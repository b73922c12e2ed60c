"""Through real Envoy and `mandate run` with two workers: revocation stops an agent at
once, restore and expiry bring it back, it survives a restart, a worker crash never opens
the gate, and the agent cannot undo it from inside its pod."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from devstack.local import MandateProcess

from .conftest import Stack, direct_check, start_mandate_for, start_stack, stop_stack

LEDGER = "http://ledger.finance.svc.cluster.local"
INVOICE = LEDGER + "/v1/invoices/9"
ARXIV = "http://export.arxiv.org/api/query"


@pytest.fixture
def two_workers(tmp_path: Path, transport: str) -> Iterator[Stack]:
    s = start_stack(tmp_path, workers=2, transport=transport)
    yield s
    stop_stack(s)


def _statuses(stack: Stack, agent: str, url: str, n: int = 8) -> list[tuple[int, str]]:
    """n calls (Envoy spreads them over both workers): (status, deny reason or '')."""
    out = []
    for _ in range(n):
        resp = stack.call(agent, "GET", url)
        out.append((resp.status, resp.json().get("reason", "") if resp.status == 403 else ""))
    return out


def test_revoke_restore_through_envoy_on_every_worker(two_workers: Stack) -> None:
    stack = two_workers
    assert {s for s, _ in _statuses(stack, "billing-agent", INVOICE)} == {200}
    result = stack.mandate_cli("revoke", "billing-agent", "--reason", "INC-4412 refund spike")
    assert result.returncode == 0, result.stderr
    stack.upstream.received.clear()
    got = _statuses(stack, "billing-agent", INVOICE, n=12)
    assert got == [(403, "revoked: INC-4412 refund spike")] * 12
    assert stack.upstream.received == []
    # Other agents are untouched.
    assert {s for s, _ in _statuses(stack, "research-agent", ARXIV)} == {200}
    status = json.loads(stack.mandate_cli("status").stdout)
    assert status["revocations"]["entries"] == 1
    assert [w["ready"] for w in status["workers"]] == [True, True]
    result = stack.mandate_cli("restore", "billing-agent")
    assert result.returncode == 0, result.stderr
    assert {s for s, _ in _statuses(stack, "billing-agent", INVOICE)} == {200}


def test_star_revokes_every_agent_and_expiry_restores(two_workers: Stack) -> None:
    stack = two_workers
    expires = (datetime.now(UTC) + timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    result = stack.mandate_cli(
        "revoke", "*", "--reason", "namespace lockdown", "--expires", expires
    )
    assert result.returncode == 0, result.stderr
    assert {r for _, r in _statuses(stack, "billing-agent", INVOICE)} == {
        "revoked: namespace lockdown"
    }
    assert {r for _, r in _statuses(stack, "research-agent", ARXIV)} == {
        "revoked: namespace lockdown"
    }
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if stack.call("billing-agent", "GET", INVOICE).status == 200:
            break
        time.sleep(0.1)
    assert {s for s, _ in _statuses(stack, "billing-agent", INVOICE)} == {200}
    assert {s for s, _ in _statuses(stack, "research-agent", ARXIV)} == {200}


def test_persisted_revocation_denies_the_first_check_after_restart(
    tmp_path: Path, transport: str
) -> None:
    stack = start_stack(tmp_path, transport=transport)
    try:
        assert (
            stack.mandate_cli("revoke", "billing-agent", "--reason", "persist me").returncode == 0
        )
        stack.mandate.stop()
        # A new mandate on the same state volume; Envoy still points at the old port, so ask
        # the new worker directly, as Envoy would, before anything else happens.
        fresh: MandateProcess = start_mandate_for(tmp_path / "again", stack.profiles, extra=[
            "--state-dir", str(tmp_path / "state")], transport=transport)  # fmt: skip
        try:
            status, body = direct_check(
                transport,
                fresh.grpc_port,
                "billing-agent",
                "ledger.finance.svc.cluster.local",
                "/v1/invoices/1",
            )
            assert status == 403
            assert body["reason"] == "revoked: persist me"
        finally:
            fresh.stop()
    finally:
        stop_stack(stack)


def test_killed_worker_never_lets_a_call_through_and_comes_back(two_workers: Stack) -> None:
    stack = two_workers
    assert stack.mandate_cli("revoke", "billing-agent", "--reason", "still revoked").returncode == 0
    status = json.loads(stack.mandate_cli("status").stdout)
    worker_pid = _worker_pids(stack.mandate)[0]
    os.kill(worker_pid, signal.SIGKILL)
    stack.upstream.received.clear()
    seen = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        resp = stack.call("billing-agent", "GET", INVOICE)
        seen.add(resp.status)
        st = json.loads(stack.mandate_cli("status").stdout)
        if all(w["ready"] for w in st["workers"]) and st["workers"][0]["restarts"] >= 1:
            break
    assert seen <= {403, 503}, seen  # denied by mandate, or by Envoy while a worker is down
    assert stack.upstream.received == []
    st = json.loads(stack.mandate_cli("status").stdout)
    assert st["workers"][0]["restarts"] >= 1 and all(w["ready"] for w in st["workers"])
    assert st["workers"][0]["listen"] == status["workers"][0]["listen"]  # same endpoint
    assert {r for _, r in _statuses(stack, "billing-agent", INVOICE)} == {"revoked: still revoked"}


def _worker_pids(mandate: MandateProcess) -> list[int]:
    """Children of the supervisor that run `sidecar worker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == mandate.proc.pid and b"worker" in cmdline:
            pids.append(int(entry.name))
    assert pids, "no worker processes found"
    return sorted(pids)


def _admin(stack: Stack, method: str, path: str, token: str | None, body: object = None) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.mandate.admin_port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
    )
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_agent_cannot_undo_its_revocation_from_inside_the_pod(two_workers: Stack) -> None:
    """The agent reaches every localhost port of its pod but not the sidecar's token file."""
    stack = two_workers
    assert stack.mandate_cli("revoke", "billing-agent", "--reason", "contained").returncode == 0
    for token in (None, "", "guess", stack.token_file.read_text().strip()[:-1]):
        assert _admin(stack, "DELETE", "/v1/revocations/billing-agent", token) == 401
        assert _admin(stack, "POST", "/v1/revocations", token, {"agent": "x", "reason": "y"}) == 401
    # Direct Checks on every worker endpoint, forging what Envoy would set, change nothing.
    for port in stack.mandate.grpc_ports:
        status, body = direct_check(
            stack.transport,
            port,
            "billing-agent",
            "ledger.finance.svc.cluster.local",
            "/v1/invoices/1",
            {"x-mandate-agent": "research-agent"},
        )
        assert status == 403 and body["reason"] == "revoked: contained"
    assert {r for _, r in _statuses(stack, "billing-agent", INVOICE)} == {"revoked: contained"}


def test_an_open_tunnel_outlives_a_revocation_by_at_most_max_stream_duration(
    tmp_path: Path, transport: str
) -> None:
    """Envoy checks a CONNECT once; envoy/ bounds every stream (300 s in envoy/sidecar.yaml,
    2 s here) so a revoked agent's open tunnel is cut within that bound."""
    from .test_enforcement import _connect

    stack = start_stack(tmp_path, max_stream="2s", transport=transport)
    try:
        status, sock = _connect(stack, "tunnel-agent", "tunnel.example.com:443")
        assert status == 200
        opened = time.monotonic()
        assert stack.mandate_cli("revoke", "tunnel-agent", "--reason", "cut").returncode == 0
        status2, sock2 = _connect(stack, "tunnel-agent", "tunnel.example.com:443")
        sock2.close()
        assert status2 == 403  # a new tunnel is refused at once
        sock.settimeout(10)
        closed = b"x"
        try:
            while closed:
                closed = sock.recv(4096)
        except OSError:
            pass
        elapsed = time.monotonic() - opened
        sock.close()
        assert 1.5 <= elapsed <= 5, elapsed
    finally:
        stop_stack(stack)
