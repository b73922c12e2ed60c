"""Issue 19 (2), through real Envoy on both transports: `mandate run --audit-stdout`, the
Kubernetes form of the audit trail. Every record goes to mandate's stdout as one JSON line,
for the cluster's log pipeline; `mandate audit verify --log` verifies the chains from what
the log kept.

The log here is what `kubectl logs` shows: mandate's stdout and stderr merged in one file
(devstack.local.start_mandate), so the records sit among mandate's own log lines. Also
checked: the same log as containerd writes it (CRI lines, long lines in ``P`` parts), a
worker SIGKILLed and restarted (a new chain that names the last record of the killed
worker's), every call's record found by `mandate audit query --log`, a removed line named,
and a stdout nobody reads any more (EPIPE), which fails closed and says so in readiness and
metrics.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from devstack.local import ROOT, stop_subprocess

from .conftest import NAMESPACE, Stack, direct_check, start_stack, stop_stack
from .test_faults import (
    ARXIV,
    INVOICE,
    LEDGER_HOST,
    OUTSIDE,
    _unlimited_profiles,
    _wait,
    _worker_index,
)
from .test_revocation import _worker_pids

MARKER = b'{"@mandate":"audit",'


def _mandate(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        input=None if stdin is None else stdin.decode(), capture_output=True, text=True,
        timeout=120, cwd=ROOT,
    )  # fmt: skip


def _call(stack: Stack, agent: str, url: str) -> tuple[int, str]:
    r = stack.call(agent, "GET", url)
    if r.status == 200:
        return 200, str(r.json()["mandate"]["x-mandate-decision"])
    assert r.status == 403, (r.status, r.body)
    return 403, str(r.json()["decision"])


def _metric_state(admin_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    on = re.findall(r'^mandate_audit_state\{state="(\w+)"\} 1\.0$', text, re.M)
    healthy = re.findall(r"^mandate_audit_healthy ([0-9.]+)$", text, re.M)
    return ",".join(sorted(on)) + "/" + ",".join(healthy)


def _logged_ids(log: Path) -> set[str]:
    out = _mandate("audit", "query", "--log", str(log))
    return {json.loads(line)["decision_id"] for line in out.stdout.splitlines() if line}


def _as_cri(log: bytes, part: int) -> bytes:
    """``log`` as containerd writes a container's log: records on stdout, the rest on
    stderr, lines longer than ``part`` in P parts."""
    out = []
    for n, line in enumerate(log.splitlines()):
        stream = b"stdout" if line.startswith(MARKER) else b"stderr"
        stamp = b"2026-12-05T06:00:%02d.%09dZ" % (n // 1000 % 60, n)
        pieces = [line[i : i + part] for i in range(0, len(line), part)] or [b""]
        for i, piece in enumerate(pieces):
            tag = b"F" if i == len(pieces) - 1 else b"P"
            out.append(b"%s %s %s %s\n" % (stamp, stream, tag, piece))
    return b"".join(out)


def test_records_on_stdout_verify_from_the_log_across_a_worker_restart(
    tmp_path: Path, transport: str
) -> None:
    stack = start_stack(
        tmp_path, _unlimited_profiles(tmp_path), workers=2, extra=["--audit-stdout"],
        transport=transport,
    )  # fmt: skip
    log = stack.mandate.log_path
    ids: dict[str, int] = {}
    try:
        status, details = stack.readyz()
        assert status == 200, details
        assert (details["audit"]["state"], details["audit"]["sink"]) == ("ok", "stdout"), details
        _wait("mandate_audit_state ok", lambda: _metric_state(stack.mandate.admin_port) == "ok/1.0")
        for i in range(6):
            for agent, url in (("billing-agent", f"{INVOICE}?n={i}"), ("research-agent", OUTSIDE)):
                status, did = _call(stack, agent, url)
                ids[did] = status
        assert sorted(set(ids.values())) == [200, 403]
        _wait("the records in the log", lambda: set(ids) <= _logged_ids(log), timeout=15)

        victim = _worker_pids(stack.mandate)[0]
        killed_index = _worker_index(victim)
        os.kill(victim, signal.SIGKILL)

        def restarted() -> bool:
            code, status = stack.readyz()
            workers = status.get("workers") or []
            return code == 200 and any(w["restarts"] == 1 and w["ready"] for w in workers)

        _wait("the worker restarted", restarted, timeout=30)
        for i in range(6):
            status, did = _call(stack, "research-agent", f"{ARXIV}?n={i}")
            ids[did] = status
        _wait("the records in the log", lambda: set(ids) <= _logged_ids(log), timeout=15)
    finally:
        stop_stack(stack)  # SIGTERM: every writer ends its chain

    text = log.read_bytes()
    assert b"INFO" in text and MARKER in text  # records among mandate's own log lines
    done = _mandate("audit", "verify", "--log", str(log), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    chains = result["chains"]
    by_writer: dict[str, list[dict[str, Any]]] = {}
    for c in chains:
        by_writer.setdefault(c["writer"], []).append(c)
    twice = f"w{killed_index}"
    assert {w: len(cs) for w, cs in by_writer.items()} == {
        "supervisor": 1, "w0": 1, "w1": 1, twice: 2,
    }, chains  # fmt: skip
    killed, restarted_chain = by_writer[twice]
    assert not killed["ended"] and killed["successor"] == restarted_chain["chain"]
    assert restarted_chain["previous"]["chain"] == killed["chain"]
    assert restarted_chain["previous"]["seq"] <= killed["last_seq"]
    assert all(c["ended"] for c in chains if c is not killed)
    assert sum(c["records"] for c in chains) == len(ids)
    assert set(ids) <= _logged_ids(log)

    cri = tmp_path / "pods" / "mandate"
    cri.mkdir(parents=True)
    (cri / "0.log").write_bytes(_as_cri(text, part=300))
    assert b" stdout P " in (cri / "0.log").read_bytes()
    done = _mandate("audit", "verify", "--log", str(cri))
    assert done.returncode == 0, done.stdout + done.stderr
    done = _mandate("audit", "verify", "--log", "-", stdin=text)
    assert done.returncode == 0, done.stdout + done.stderr

    lines = text.splitlines(keepends=True)
    at = next(i for i, x in enumerate(lines) if x.startswith(MARKER) and b'"type":"decision"' in x)
    (tmp_path / "cut.log").write_bytes(b"".join(lines[:at] + lines[at + 1 :]))
    done = _mandate("audit", "verify", "--log", str(tmp_path / "cut.log"))
    assert done.returncode == 1 and "seq_gap" in done.stderr, done.stdout + done.stderr


def _readyz(admin_port: int, token: Path) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/readyz?verbose=1",
        headers={"Authorization": f"Bearer {token.read_text().strip()}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_a_stdout_nobody_reads_fails_closed(tmp_path: Path, transport: str) -> None:
    """The log pipeline is gone (the read end of mandate's stdout closed: EPIPE): allowed
    calls are denied `audit_unavailable`, readiness says the stdout sink is failing (503),
    and the metrics say failing, not ok."""
    port_file, state = tmp_path / "ports.json", tmp_path / "state"
    read_end, write_end = os.pipe()
    args = [
        sys.executable, "-m", "sidecar", "run", "--profiles", str(_unlimited_profiles(tmp_path)),
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--port-file", str(port_file),
        "--kubernetes", "off", "--workers", "1", "--state-dir", str(state), "--namespace",
        NAMESPACE, "--transport", transport,
    ]  # fmt: skip
    with (tmp_path / "mandate.log").open("ab") as err:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=write_end, stderr=err, cwd=ROOT,
            env={**os.environ, "MANDATE_AUDIT_STDOUT": "true"},
        )  # fmt: skip
    os.close(write_end)
    try:
        _wait("mandate serving", lambda: port_file.exists(), timeout=30)
        ports = json.loads(port_file.read_text())
        check_port, admin_port = ports["grpc"][0], ports["admin"]
        token = state / "admin.token"

        def ask() -> tuple[int, dict[str, Any]]:
            return direct_check(
                transport, check_port, "billing-agent", LEDGER_HOST, "/v1/invoices/9"
            )

        assert ask()[0] == 200
        status, details = _readyz(admin_port, token)
        assert status == 200 and details["audit"]["state"] == "ok", details
        os.read(read_end, 1 << 16)  # the header lines and the first record: a live pipe
        os.close(read_end)
        read_end = -1

        def denied() -> bool:
            status, body = ask()
            return status == 403 and body.get("error") == "audit_unavailable"

        _wait("audit_unavailable", denied, timeout=15)
        status, details = _readyz(admin_port, token)
        audit = details["audit"]
        assert status == 503 and (audit["state"], audit["denying"]) == ("failing", True), details
        # The supervisor's writer of the stream reports the worker's through the board.
        assert audit["sink"] == "stdout" and audit["other_writers_failing"] == 1, audit
        _wait(
            "audit failing metrics", lambda: _metric_state(admin_port) == "failing/0.0", timeout=15
        )
    finally:
        if read_end >= 0:
            os.close(read_end)
        stop_subprocess(proc)
