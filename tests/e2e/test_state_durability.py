"""Through real Envoy and `mandate run` (issue 15, findings 6 and 7):

- a state dir that cannot be written: `mandate revoke` exits non-zero and says the revocation
  is not durable, naming the file and the OS error, while the agent is denied at once (fail
  closed); a restore is refused and leaves the agent revoked; readiness details and
  `mandate_state_durable` show it until a write succeeds, and then the revocation survives a
  restart;
- the open probes say only ready or not: a justification and a revocation reason planted with
  a unique string never appear in what an agent (no admin token) can read on the admin port.

A root test process ignores permissions, so the state dir is made read-only for real:
`chattr +i` (ext4, xfs, btrfs), else a read-only bind mount, else (not root) chmod 0555.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.local import MandateProcess
from sidecar.agentapi.client import AgentContext

from .conftest import DEMO_PROFILES, Stack, direct_check, start_mandate_for, start_stack, stop_stack

LEDGER_HOST = "ledger.finance.svc.cluster.local"
INVOICE = f"http://{LEDGER_HOST}/v1/invoices/9"


def _writable(directory: Path) -> bool:
    probe = directory / ".write-probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[str]:
    """``directory`` cannot be written (by root either) inside the block; yields how."""
    undo: list[list[str]] = []
    how = ""
    try:
        if os.geteuid() != 0:
            directory.chmod(0o555)
            how = "chmod 0555"
        elif shutil.which("chattr") and _run(["chattr", "+i", str(directory)]):
            undo.append(["chattr", "-i", str(directory)])
            how = "chattr +i"
        bind = ["mount", "--bind", str(directory), str(directory)]
        if (not how or _writable(directory)) and os.geteuid() == 0 and _run(bind):
            undo.append(["umount", str(directory)])
            if _run(["mount", "-o", "remount,bind,ro", str(directory)]):
                how = "read-only bind mount"
        if not how or _writable(directory):
            pytest.skip(f"cannot make {directory} read-only on this machine")
        yield how
    finally:
        for cmd in reversed(undo):
            _run(cmd)
        if os.geteuid() != 0:
            directory.chmod(0o755)


def _run(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def _admin(stack: Stack, path: str, token: bool = True) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {stack.token_file.read_text().strip()}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{stack.mandate.admin_port}{path}")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _durable_metric(stack: Stack) -> float | None:
    _, text = _admin(stack, "/metrics", token=False)
    for line in text.splitlines():
        if line.startswith('mandate_state_durable{file="revocations"}'):
            return float(line.split()[-1])
    return None


def _wait(what: str, cond: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _denied_with(stack: Stack, reason: str, n: int = 6) -> bool:
    for _ in range(n):
        resp = stack.call("billing-agent", "GET", INVOICE)
        if resp.status != 403 or resp.json().get("reason") != f"revoked: {reason}":
            return False
    return True


@pytest.fixture
def own_stack(tmp_path: Path, transport: str) -> Iterator[Stack]:
    s = start_stack(tmp_path, transport=transport)
    yield s
    stop_stack(s)


def test_revoke_on_a_read_only_state_dir_fails_loudly_and_still_denies(
    own_stack: Stack, tmp_path: Path, transport: str
) -> None:
    stack = own_stack
    state = tmp_path / "state"
    state_file = state / "revocations.json"
    assert stack.call("billing-agent", "GET", INVOICE).status == 200
    with read_only(state):
        result = stack.mandate_cli("revoke", "billing-agent", "--reason", "ro incident")
        # Not "done": exit 3, and stderr names the file and says it is not durable.
        assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
        assert str(state_file) in result.stderr and "NOT durable" in result.stderr
        answer = json.loads(result.stdout)
        assert answer["error"] == "state_not_durable" and answer["file"] == str(state_file)
        assert answer["os_error"]  # e.g. "Operation not permitted (EPERM)", "... (EROFS)"
        # ... and yet the agent is denied now: a failed disk never weakens enforcement.
        stack.upstream.received.clear()
        assert _denied_with(stack, "ro incident", n=8)
        assert stack.upstream.received == []
        # Visible to the operator: status (token), verbose readiness (token), metrics (open).
        status = json.loads(stack.mandate_cli("status").stdout)
        persistence = status["persistence"]["revocations"]
        assert persistence["durable"] is False and persistence["file"] == str(state_file)
        code, body = _admin(stack, "/readyz?verbose=1")
        assert code == 200 and json.loads(body)["persistence"]["revocations"]["durable"] is False
        assert _durable_metric(stack) == 0.0
        # A restore that cannot be written is not done: revoked now and after a restart.
        restored = stack.mandate_cli("restore", "billing-agent")
        assert restored.returncode == 3, restored.stderr
        assert "restore NOT done" in restored.stderr and str(state_file) in restored.stderr
        assert _denied_with(stack, "ro incident")
    # Writable again: the supervisor's retry makes the revocation durable, and says so.
    _wait("a durable state file", lambda: _durable_metric(stack) == 1.0)
    status = json.loads(stack.mandate_cli("status").stdout)
    assert status["persistence"]["revocations"] == {
        "durable": True,
        "file": str(state_file),
        "error": None,
    }
    saved = json.loads(state_file.read_text())["revocations"]
    assert [(r["agent"], r["reason"]) for r in saved] == [("billing-agent", "ro incident")]
    # ... so it survives a restart (the adversarial review's agent was allowed again here).
    stack.mandate.stop()
    fresh: MandateProcess = start_mandate_for(
        tmp_path / "again", stack.profiles, extra=["--state-dir", str(state)], transport=transport
    )
    try:
        code, deny = direct_check(
            transport, fresh.grpc_port, "billing-agent", LEDGER_HOST, "/v1/invoices/1"
        )
        assert (code, deny.get("reason")) == (403, "revoked: ro incident")
    finally:
        fresh.stop()


def test_start_on_a_read_only_state_dir_is_visibly_degraded_or_refused(
    tmp_path: Path, transport: str
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(DEMO_PROFILES / "agents.yaml", profiles / "agents.yaml")
    state = tmp_path / "state"
    state.mkdir()
    with read_only(state):
        # No admin token can be generated: a clear refusal, not a traceback.
        with pytest.raises(RuntimeError, match="exited with code 2"):
            start_mandate_for(
                tmp_path / "refused",
                profiles,
                transport=transport,
                extra=["--state-dir", str(state)],
            )
        log = (tmp_path / "refused" / "mandate" / "mandate.log").read_text()
        assert f"cannot create the admin token {state / 'admin.token'}" in log
        assert "Traceback" not in log
    (state / "admin.token").write_text("t" * 40 + "\n")
    with read_only(state):
        mandate = start_mandate_for(
            tmp_path / "degraded", profiles, transport=transport, extra=["--state-dir", str(state)]
        )
        try:
            ready = mandate.ready()  # with the token: the details
            assert ready["ready"] is True  # enforcing; revocations just cannot be made durable
            persistence = ready["persistence"]["revocations"]
            assert persistence["durable"] is False
            assert persistence["file"] == str(state / "revocations.json")
        finally:
            mandate.stop()


# -- finding 7: the open probes leak nothing --------------------------------------------------

CANARY_JUSTIFICATION = "canary-just-5d1e0b7c-INV-0042"
CANARY_REASON = "canary-reason-9a4f22e1-incident"
APPROVE_ELEVATION = "refund"  # approval: operator in the demo profiles (stays pending)


@pytest.fixture
def context_stack(tmp_path: Path, transport: str) -> Iterator[tuple[Stack, str]]:
    sock = tmp_path / "ctx" / "billing.sock"
    sock.parent.mkdir()
    stack = start_stack(
        tmp_path, transport=transport, extra=["--context-api", f"billing-agent=unix:{sock}"]
    )
    try:
        yield stack, f"unix:{sock}"
    finally:
        stop_stack(stack)


def test_unauthenticated_probes_never_show_justifications_or_reasons(
    context_stack: tuple[Stack, str],
) -> None:
    stack, target = context_stack

    async def request() -> Any:
        async with AgentContext(target) as ctx:
            return await ctx.request_elevation(APPROVE_ELEVATION, CANARY_JUSTIFICATION, 60)

    assert asyncio.run(request()).state == "pending"
    revoked = stack.mandate_cli("revoke", "research-agent", "--reason", CANARY_REASON)
    assert revoked.returncode == 0, revoked.stderr
    canaries = (CANARY_JUSTIFICATION, CANARY_REASON)
    # Planted: with the token, the readiness details hold the justification (where /readyz
    # showed it to anyone) and the revocation list holds the reason.
    code, body = _admin(stack, "/readyz?verbose=1")
    assert code == 200 and CANARY_JUSTIFICATION in body
    code, body = _admin(stack, "/v1/revocations")
    assert code == 200 and CANARY_REASON in body
    # What the agent (no token) can read on the admin port:
    code, body = _admin(stack, "/readyz", token=False)
    assert (code, json.loads(body)) == (200, {"ready": True})
    for path in ("/readyz?verbose=1", "/readyz?verbose=true", "/v1/status", "/v1/elevations"):
        code, body = _admin(stack, path, token=False)
        assert code == 401, path
        assert not any(c in body for c in canaries), path
    for path in ("/healthz", "/metrics", "/readyz?verbose=0"):
        code, body = _admin(stack, path, token=False)
        assert code == 200, path
        assert not any(c in body for c in canaries), path
