"""A pod whose agent has no profile (a `mandate.dev/agent` or service account that no profile
names) would deny every call `unknown_agent`: the supervisor is not ready and says why (in
the readiness details, once in the log, and once as a Warning Event on the pod), and turns
ready by itself once a profile for the agent is loaded (issue 19, item 5)."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.run.supervisor import Supervisor
from sidecar.settings import (
    AdminSettings,
    CheckSettings,
    IdentitySettings,
    KubernetesSettings,
    ProfileSettings,
    Settings,
    StateSettings,
)

NS = "agents"
NEW_PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: ghost-agent}
spec:
  owner: platform
  purposes:
    read:
      allow:
        - hosts: [api.example.com]
          methods: [GET]
"""


def _supervisor(tmp_path: Path, profiles_dir: Path, identity: IdentitySettings) -> Supervisor:
    return Supervisor(
        Settings(
            profiles=ProfileSettings(profiles_dir, poll_seconds=0.2),
            check=CheckSettings(listen="127.0.0.1:0"),
            identity=identity,
            admin=AdminSettings(listen="127.0.0.1:0"),
            state=StateSettings(directory=tmp_path / "state"),
            kubernetes=KubernetesSettings(mode="off"),
        )
    )


async def _until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "metrics").mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))


@pytest.mark.usefixtures("metrics_dir")
async def test_a_pod_whose_agent_has_no_profile_is_not_ready_until_one_is_loaded(
    tmp_path: Path, profiles_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sup = _supervisor(tmp_path, profiles_dir, IdentitySettings(agent="ghost-agent", namespace=NS))
    with caplog.at_level(logging.INFO, logger="sidecar.run.supervisor"):
        try:
            await sup.start()
            await _until(lambda: all(w.ready for w in sup._workers))
            ready, details = sup._ready()
            assert not ready
            problem = details["agent"]["problem"]
            assert "'ghost-agent'" in problem and "billing-agent" in problem
            assert "unknown_agent" in problem
            # Said once, not on every housekeeping pass.
            await asyncio.sleep(1.0)
            said = [
                r
                for r in caplog.records
                if r.levelno == logging.ERROR and "ghost" in r.msg % r.args
            ]
            assert len(said) == 1
            # A profile for it arrives (hot reload): ready, and the log says so.
            (profiles_dir / "ghost.yaml").write_text(NEW_PROFILE)
            await _until(lambda: sup._ready()[0])
            assert sup._ready()[1]["agent"] == {"problem": None}
            await _until(lambda: any("has a profile again" in r.msg for r in caplog.records))
        finally:
            await sup.stop()


@pytest.mark.usefixtures("metrics_dir")
async def test_a_known_agent_or_service_account_is_ready(
    tmp_path: Path, profiles_dir: Path
) -> None:
    sup = _supervisor(tmp_path, profiles_dir, IdentitySettings(agent="billing-agent", namespace=NS))
    try:
        await sup.start()
        await _until(lambda: sup._ready()[0])
        assert sup._ready()[1]["agent"] == {"problem": None}
    finally:
        await sup.stop()


def test_an_unknown_service_account_is_a_problem(tmp_path: Path, profiles_dir: Path) -> None:
    sup = _supervisor(
        tmp_path, profiles_dir, IdentitySettings(service_account=f"{NS}/nobody", namespace=NS)
    )
    sup.holder.load_initial()
    problem = sup._agent_problem()
    assert problem is not None and "'agents/nobody'" in problem


class _Reporter:
    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str]] = []

    def warn_pod(self, reason: str, message: str) -> bool:
        self.calls.append((reason, message))
        return self.answers.pop(0)


class _Watcher:
    def __init__(self, reporter: _Reporter) -> None:
        self.reporter = reporter


def test_the_unknown_agent_event_is_sent_once_and_retried_until_the_reporter_runs(
    tmp_path: Path, profiles_dir: Path
) -> None:
    sup = _supervisor(tmp_path, profiles_dir, IdentitySettings(agent="ghost-agent", namespace=NS))
    sup.holder.load_initial()
    reporter = _Reporter([False, True])
    sup._watcher = _Watcher(reporter)
    for _ in range(4):
        sup._check_agent()
    # Not running yet, then queued; never again while the problem stays the same.
    assert [reason for reason, _ in reporter.calls] == ["UnknownAgent", "UnknownAgent"]
    assert "ghost-agent" in reporter.calls[0][1]
