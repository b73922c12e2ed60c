"""SnapshotHolder: whole-snapshot swaps, last-good on errors, the watcher thread (in-place
edits and Kubernetes ConfigMap `..data` swaps), and readers during reloads."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.check.reload import SnapshotHolder
from sidecar.core import Snapshot
from sidecar.telemetry.metrics import REGISTRY

from .conftest import DEMO_PROFILES

AGENTS = {"billing-agent", "research-agent"}
THIRD_AGENT = """
---
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: triage-agent
spec:
  owner: support
  defaultPurpose: triage
  purposes:
    triage:
      allow:
        - hosts: [tickets.support.svc.cluster.local]
          methods: [GET]
"""


def stale() -> float | None:
    return REGISTRY.get_sample_value("mandate_profiles_stale")


def reload_errors() -> float:
    return REGISTRY.get_sample_value("mandate_profile_reloads_total", {"result": "error"}) or 0.0


def with_owner(text: str, owner: str) -> str:
    out = text.replace("owner: data-science", f"owner: {owner}")
    assert out != text
    return out


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"{what} not reached within {timeout} s")


@pytest.fixture
def holder(profiles_dir: Path) -> Iterator[SnapshotHolder]:
    h = SnapshotHolder(profiles_dir)
    h.load_initial()
    try:
        yield h
    finally:
        h.stop()


def current(h: SnapshotHolder) -> Snapshot:
    snap = h.get()
    assert snap is not None
    return snap


def test_valid_edit_swaps_to_a_new_version(holder: SnapshotHolder, profiles_dir: Path) -> None:
    first = current(holder)
    assert holder.reload() is False  # nothing changed: same object stays in force
    assert current(holder) is first

    agents = profiles_dir / "agents.yaml"
    agents.write_text(agents.read_text() + THIRD_AGENT)
    assert holder.reload() is True
    second = current(holder)
    assert second is not first
    assert second.version != first.version
    assert set(second.agents) == AGENTS | {"triage-agent"}
    assert set(first.agents) == AGENTS  # the old snapshot is untouched
    status = holder.status()
    assert status.version == second.version
    assert status.agents == 3
    assert status.reloads == 1
    assert status.last_error is None
    assert REGISTRY.get_sample_value("mandate_profile_agents") == 3


def test_broken_edit_keeps_last_good_snapshot(holder: SnapshotHolder, profiles_dir: Path) -> None:
    good = current(holder)
    agents = profiles_dir / "agents.yaml"
    text = agents.read_text()
    errors_before = reload_errors()

    agents.write_text(text.replace("owner: data-science", "owner: [1, 2]"))
    assert holder.reload() is False
    assert holder.get() is good
    status = holder.status()
    assert status.last_error is not None
    assert f"{agents}, document 2, spec.owner" in status.last_error
    assert status.last_error_at is not None
    assert status.failures == 1
    assert status.version == good.version
    assert status.as_dict()["ok"] is False
    assert stale() == 1
    assert reload_errors() == errors_before + 1

    # a second, different breakage: still the same snapshot, the error names the new place
    agents.write_text(text.replace("defaultPurpose: reconcile", "defaultPurpose: [oops"))
    assert holder.reload() is False
    assert holder.get() is good
    assert holder.status().last_error is not None
    assert f"{agents}, document 1" in (holder.status().last_error or "")
    assert stale() == 1

    # the fix: a real change is installed and the stale flag clears
    agents.write_text(with_owner(text, "data-science-2"))
    assert holder.reload() is True
    fixed = current(holder)
    assert fixed.agents["research-agent"].owner == "data-science-2"
    assert holder.status().last_error is None
    assert holder.status().as_dict()["ok"] is True
    assert stale() == 0


def test_revert_to_the_enforced_content_clears_the_error(
    holder: SnapshotHolder, profiles_dir: Path
) -> None:
    good = current(holder)
    agents = profiles_dir / "agents.yaml"
    text = agents.read_text()
    agents.write_text("kind: [")
    assert holder.reload() is False
    assert stale() == 1
    agents.write_text(text)  # back to exactly what is enforced
    assert holder.reload() is False
    assert holder.get() is good
    assert holder.status().last_error is None
    assert stale() == 0


def test_emptied_directory_keeps_last_good_snapshot(
    holder: SnapshotHolder, profiles_dir: Path
) -> None:
    good = current(holder)
    (profiles_dir / "agents.yaml").unlink()
    assert holder.reload() is False
    assert holder.get() is good
    assert "no *.yaml" in (holder.status().last_error or "")
    assert stale() == 1


def test_watcher_picks_up_in_place_edit(holder: SnapshotHolder, profiles_dir: Path) -> None:
    holder.start(poll_seconds=0.2)
    agents = profiles_dir / "agents.yaml"
    text = agents.read_text()
    agents.write_text(with_owner(text, "edited-in-place"))
    wait_for(
        lambda: current(holder).agents["research-agent"].owner == "edited-in-place",
        what="in-place edit in force",
    )
    # and a broken edit followed by a fix, through the watcher
    agents.write_text("apiVersion: [")
    wait_for(lambda: holder.status().last_error is not None, what="failed reload noticed")
    assert current(holder).agents["research-agent"].owner == "edited-in-place"
    agents.write_text(with_owner(text, "fixed"))
    wait_for(lambda: current(holder).agents["research-agent"].owner == "fixed", what="fix in force")
    assert holder.status().last_error is None
    assert stale() == 0


def test_watcher_picks_up_configmap_symlink_swap(tmp_path: Path) -> None:
    """The layout kubelet writes for a ConfigMap volume, and its atomic `..data` swap."""
    cm = tmp_path / "configmap"
    cm.mkdir()
    v1 = cm / "..2026_01_01_v1"
    v1.mkdir()
    shutil.copy(DEMO_PROFILES / "agents.yaml", v1 / "agents.yaml")
    os.symlink("..2026_01_01_v1", cm / "..data")
    os.symlink("..data/agents.yaml", cm / "agents.yaml")

    h = SnapshotHolder(cm)
    try:
        first = h.load_initial()
        assert set(first.agents) == AGENTS
        h.start(poll_seconds=0.2)

        v2 = cm / "..2026_01_01_v2"
        v2.mkdir()
        (v2 / "agents.yaml").write_text((v1 / "agents.yaml").read_text() + THIRD_AGENT)
        os.symlink("..2026_01_01_v2", cm / "..data_tmp")
        os.rename(cm / "..data_tmp", cm / "..data")  # the atomic swap
        shutil.rmtree(v1)

        wait_for(lambda: "triage-agent" in current(h).agents, what="ConfigMap update in force")
        snap = current(h)
        assert set(snap.agents) == AGENTS | {"triage-agent"}
        assert snap.version != first.version
        assert h.status().last_error is None
    finally:
        h.stop()


def test_readers_only_ever_see_complete_snapshots(
    holder: SnapshotHolder, profiles_dir: Path
) -> None:
    agents = profiles_dir / "agents.yaml"
    text = agents.read_text()
    owners = {}
    for owner in ("owner-a", "owner-b"):
        agents.write_text(with_owner(text, owner))
        assert holder.reload() is True
        owners[current(holder).version] = owner
    assert len(owners) == 2

    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()
    reads = 0

    def reader() -> None:
        nonlocal reads
        deadline = time.monotonic() + 2.0
        while not stop.is_set() and time.monotonic() < deadline:
            snap = holder.get()
            reads += 1
            if snap is None:
                problems.append("None")
                continue
            if snap.version not in owners:
                problems.append(f"unknown version {snap.version!r}")
                continue
            if set(snap.agents) != AGENTS:
                problems.append(f"agents {sorted(snap.agents)}")
                continue
            research = snap.agents["research-agent"]
            if research.owner != owners[snap.version] or set(research.purposes) != {
                "literature-search",
                "tool-use",
            }:
                problems.append(f"version {snap.version} with inconsistent content")
            seen.add(snap.version)

    thread = threading.Thread(target=reader, name="reader")
    thread.start()
    try:
        for i in range(20):
            agents.write_text(with_owner(text, "owner-a" if i % 2 == 0 else "owner-b"))
            assert holder.reload() is True
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert problems == []
    assert reads > 0
    assert seen <= set(owners)
    assert holder.status().reloads == 22
