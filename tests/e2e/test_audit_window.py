"""Issue 15, finding 5, through real Envoy on both transports: the audit directory on a small
tmpfs that fills up while an agent's allowed calls go through two workers.

Before: the writers denied only after a write had failed, about 0.1 s after the disk was
full, so 10-16 allowed calls reached the upstream with no record on disk (named later only
in a `loss` record), and the second worker went on allowing until its own writer failed;
`/readyz` said ready. Now: under the free-space reserve every worker denies
(`audit_unavailable`) while there is still room, every allowed call's record is on disk,
readiness says `audit: failing` (503) and `mandate_audit_state` says so, and all of it
recovers by itself when space returns.

Needs root and `mount -t tmpfs` (a plain Linux CI machine running as root has both);
skipped otherwise. The reserve is set by MANDATE_AUDIT_RESERVE (the env form of
`--audit-reserve`) so that the same test runs against a mandate that does not know it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Stack, start_stack, stop_stack
from .test_faults import INVOICE, _unlimited_profiles, _wait

RESERVE = 1 << 20  # 1 MiB
FS_SIZE = "4m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "audit"
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0750", "tmpfs", str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, leave: int) -> Path:
    """A file outside the audit trail that leaves ``leave`` bytes free."""
    filler = path / "filler.bin"
    need = _free(path) - leave
    assert need > 0
    with filler.open("wb") as f:
        f.write(b"\xff" * need)
    return filler


def _audit_state_metric(stack: Stack) -> str:
    """The states mandate_audit_state has at 1, and mandate_audit_healthy: "ok/1.0". (The
    supervisor never set mandate_audit_healthy, so its 0 pinned the livemin at 0.)"""
    url = f"http://127.0.0.1:{stack.mandate.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    on = re.findall(r'^mandate_audit_state\{state="(\w+)"\} 1\.0$', text, re.M)
    healthy = re.findall(r"^mandate_audit_healthy ([0-9.]+)$", text, re.M)
    return ",".join(sorted(on)) + "/" + ",".join(healthy)


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(path.glob("audit-*-*.jsonl")):
        for line in f.read_bytes().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _call(stack: Stack, i: int) -> tuple[int, str, str]:
    """(status, decision id, deny code) of one allowed-by-policy call."""
    r = stack.call("billing-agent", "GET", f"{INVOICE}?n={i}")
    if r.status == 200:
        return 200, str(r.json()["mandate"]["x-mandate-decision"]), ""
    body = r.json() if r.status == 403 else {}
    return r.status, str(body.get("decision", "")), str(body.get("error", ""))


def test_a_filling_audit_disk_denies_before_an_allowed_call_goes_unrecorded(
    tmp_path: Path, small_fs: Path, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MANDATE_AUDIT_RESERVE", str(RESERVE))
    stack = start_stack(
        tmp_path, _unlimited_profiles(tmp_path), workers=2,
        extra=["--audit-dir", str(small_fs)], transport=transport,
    )  # fmt: skip
    try:
        assert _call(stack, 0)[0] == 200
        status, details = stack.readyz()
        assert status == 200 and details["audit"]["state"] == "ok", details
        _wait("mandate_audit_state ok", lambda: _audit_state_metric(stack) == "ok/1.0", timeout=15)

        filler = _fill(small_fs, RESERVE + 256 * 1024)
        allowed: list[str] = []
        answers: list[tuple[int, str]] = []
        first_deny = None
        for i in range(1, 6000):
            status, did, code = _call(stack, i)
            answers.append((status, code))
            if status == 200:
                allowed.append(did)
            elif first_deny is None:
                assert (status, code) == (403, "audit_unavailable"), (status, code)
                first_deny = len(answers) - 1
            if first_deny is not None and len(answers) - first_deny > 40:
                break
        assert first_deny is not None, "no audit_unavailable deny while the disk filled"
        # From the first deny on, every worker denies: no call goes out after it.
        after = answers[first_deny:]
        assert set(after) == {(403, "audit_unavailable")}, after

        # Every call that went out has its record on disk (not only a later `loss` record).
        def recorded() -> bool:
            have = {r.get("decision_id") for r in _records(small_fs) if r["type"] == "decision"}
            return set(allowed) <= have

        _wait("every allowed call's record on disk", recorded, timeout=5)
        assert not [r for r in _records(small_fs) if r["type"] == "loss"]
        status, details = stack.readyz()
        assert status == 503, details
        audit = details["audit"]
        assert (audit["state"], audit["denying"]) == ("failing", True), audit
        _wait(
            "audit failing metrics", lambda: _audit_state_metric(stack) == "failing/0.0", timeout=15
        )

        filler.unlink()  # space returns: every worker allows again by itself
        _wait(
            "an allowed call after space returned", lambda: _call(stack, 9000)[0] == 200, timeout=15
        )
        assert {_call(stack, 9001 + i)[0] for i in range(6)} == {200}  # both workers
        status, details = stack.readyz()
        assert status == 200 and details["audit"]["state"] == "ok", details
        _wait("audit ok again metrics", lambda: _audit_state_metric(stack) == "ok/1.0", timeout=15)
    finally:
        stop_stack(stack)
    verify = subprocess.run(
        [sys.executable, "-m", "sidecar", "audit", "verify", str(small_fs)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    chains = [line for line in verify.stdout.splitlines() if line.startswith("ok: chain")]
    assert len(chains) == 3, verify.stdout  # two workers and the supervisor


def test_audit_off_reads_off_not_unhealthy(stack: Stack) -> None:
    """Without --audit-dir, readiness and the metrics say "off" (and nothing unhealthy)."""
    status, details = stack.readyz()
    assert status == 200 and details["audit"] == {"state": "off"}, details
    _wait("mandate_audit_state off", lambda: _audit_state_metric(stack) == "off/1.0", timeout=15)
