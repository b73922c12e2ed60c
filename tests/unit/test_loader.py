"""Loading a profile directory into a Snapshot (sidecar/core/loader.py, snapshot.py, model.py).

Rejected profiles are in test_profiles_rejected.py; this file covers what loads and how.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from sidecar.core import fingerprint, load_profiles
from sidecar.core.loader import profile_files
from sidecar.core.model import parse_duration
from sidecar.errors import MandateError, ProfileError, ProfileErrors, ProfileProblem

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
EXAMPLE = FIXTURES / "agents.yaml"


def profile(name: str, *, identity: str | None = None, owner: str = "team") -> str:
    identities = f"  identities:\n    - serviceAccount: {identity}\n" if identity else ""
    return (
        "apiVersion: mandate.dev/v1alpha1\n"
        "kind: AgentProfile\n"
        f"metadata:\n  name: {name}\n"
        f"spec:\n  owner: {owner}\n{identities}"
        "  defaultPurpose: work\n"
        "  purposes:\n    work:\n      allow:\n        - hosts: [api.example.com]\n"
    )


def test_example_profiles_load() -> None:
    snap = load_profiles(FIXTURES)
    assert sorted(snap.agents) == ["billing-agent", "research-agent"]
    assert snap.files == (str(EXAMPLE),)
    assert re.fullmatch(r"[0-9a-f]{12}", snap.version)
    assert dict(snap.by_service_account) == {
        "agents/billing-agent": "billing-agent",
        "agents/research-agent": "research-agent",
    }
    assert dict(snap.by_spiffe) == {
        "spiffe://cluster.local/ns/agents/sa/billing-agent": "billing-agent"
    }
    billing = snap.agents["billing-agent"]
    assert (billing.owner, billing.default_purpose) == ("finance-platform", "reconcile")
    assert list(billing.purposes) == ["reconcile", "report"]
    assert (billing.source.file, billing.source.document) == (str(EXAMPLE), 1)
    assert str(billing.source) == f"{EXAMPLE}, document 1"
    assert snap.agents["research-agent"].source.document == 2
    reconcile = billing.purposes["reconcile"]
    assert (reconcile.allow.size, reconcile.deny.size) == (2, 1)
    assert reconcile.rate_limit is not None and reconcile.rate_limit.requests == 600
    assert reconcile.rate is not None
    assert (reconcile.rate.key, reconcile.rate.per_seconds) == (
        ("billing-agent", "reconcile"),
        60.0,
    )
    assert billing.purposes["report"].rate is None
    elevation = billing.profile.spec.elevations["refund"]
    assert (elevation.approval, elevation.max_duration, elevation.justification_required) == (
        "operator",
        "10m",
        True,
    )
    assert billing.profile.spec.behavior is not None
    assert billing.profile.spec.behavior.revoke_at_risk == 0.95


def test_snapshot_is_immutable() -> None:
    snap = load_profiles(FIXTURES)
    with pytest.raises(TypeError):
        snap.agents["x"] = snap.agents["billing-agent"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        snap.version = "other"  # type: ignore[misc]


def test_version_is_stable_and_follows_content(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(profile("a"))
    first = load_profiles(tmp_path).version
    assert load_profiles(tmp_path).version == first
    (tmp_path / "a.yaml").write_text(profile("a", owner="other-team"))
    assert load_profiles(tmp_path).version != first


def test_yml_files_are_read_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.yml").write_text(profile("b"))
    (tmp_path / "a.yaml").write_text(profile("a"))
    (tmp_path / "c.json").write_text("{not yaml")
    (tmp_path / "notes.txt").write_text(": : :")
    (tmp_path / "d.yaml.bak").write_text(": : :")
    (tmp_path / "sub.yaml").mkdir()
    snap = load_profiles(tmp_path)
    assert sorted(snap.agents) == ["a", "b"]
    assert snap.files == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yml"))
    assert profile_files(tmp_path) == [tmp_path / "a.yaml", tmp_path / "b.yml"]


def test_hidden_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(profile("a"))
    (tmp_path / ".b.yaml").write_text("{broken: [")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.yaml").write_text("{broken: [")
    assert list(load_profiles(tmp_path).agents) == ["a"]


def test_configmap_volume_layout(tmp_path: Path) -> None:
    """A mounted ConfigMap: visible symlinks into `..data`, itself a symlink to a hidden
    timestamped folder. Each profile is read once, through the visible name."""
    stamp = tmp_path / "..2024_07_01_12_00_00.123"
    stamp.mkdir()
    (stamp / "agents.yaml").write_text(profile("a") + "---\n" + profile("b"))
    os.symlink(stamp.name, tmp_path / "..data")
    os.symlink("..data/agents.yaml", tmp_path / "agents.yaml")
    snap = load_profiles(tmp_path)
    assert sorted(snap.agents) == ["a", "b"]
    assert snap.files == (str(tmp_path / "agents.yaml"),)


def test_empty_documents_are_skipped_but_counted(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("---\n# nothing\n---\n" + profile("a") + "---\n")
    snap = load_profiles(tmp_path)
    assert list(snap.agents) == ["a"]
    assert snap.agents["a"].source.document == 2


def test_kubernetes_metadata_is_allowed(tmp_path: Path) -> None:
    text = profile("a").replace(
        "metadata:\n  name: a\n",
        "metadata:\n  name: a\n  namespace: agents\n  labels: {team: x}\n  annotations: {}\n",
    )
    (tmp_path / "a.yaml").write_text(text)
    assert load_profiles(tmp_path).agents["a"].profile.metadata.namespace == "agents"


def test_same_identity_twice_in_one_agent_is_fine(tmp_path: Path) -> None:
    text = profile("a", identity="ns/a").replace(
        "    - serviceAccount: ns/a\n", "    - serviceAccount: ns/a\n    - serviceAccount: ns/a\n"
    )
    (tmp_path / "a.yaml").write_text(text)
    assert dict(load_profiles(tmp_path).by_service_account) == {"ns/a": "a"}


def test_several_agents_across_files(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "agents.yaml")
    (tmp_path / "ops.yaml").write_text(profile("ops", identity="ops/ops"))
    snap = load_profiles(tmp_path)
    assert sorted(snap.agents) == ["billing-agent", "ops", "research-agent"]
    assert snap.by_service_account["ops/ops"] == "ops"


def test_fingerprint_follows_visible_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(profile("a"))
    first = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == first
    (tmp_path / ".hidden.yaml").write_text("x")
    (tmp_path / "readme.txt").write_text("x")
    assert fingerprint(tmp_path) == first
    (tmp_path / "b.yml").write_text(profile("b"))
    second = fingerprint(tmp_path)
    assert second != first
    (tmp_path / "b.yml").write_text(profile("b", owner="someone-else"))
    assert fingerprint(tmp_path) != second


def test_fingerprint_of_missing_directory_does_not_raise(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint(gone))
    assert fingerprint(gone) != fingerprint(tmp_path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("1m30s", 90),
        ("250ms", 0.25),
        ("1s500ms", 1.5),
        ("2h0m5s", 7205),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "is not a duration", id="empty"),
        pytest.param("10", "is not a duration", id="no-unit"),
        pytest.param("1d", "is not a duration", id="days"),
        pytest.param("m", "is not a duration", id="unit-only"),
        pytest.param("1s1m", "is not a duration", id="wrong-order"),
        pytest.param("-1s", "is not a duration", id="negative"),
        pytest.param("1.5s", "is not a duration", id="fraction"),
        pytest.param(" 1s", "is not a duration", id="space"),
        pytest.param("0s", "greater than zero", id="zero"),
        pytest.param("0h0m", "greater than zero", id="zero-compound"),
    ],
)
def test_parse_duration_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_duration(text)


def test_profile_errors_format() -> None:
    problems = [
        ProfileProblem("p/a.yaml", 2, "spec.owner", "required field is missing"),
        ProfileProblem("p/b.yaml", None, "", "not UTF-8 text (byte 3)"),
    ]
    err = ProfileErrors(problems)
    assert isinstance(err, ProfileError) and isinstance(err, MandateError)
    assert err.code == "profile_invalid"
    assert err.problems == tuple(problems)
    assert str(err) == (
        "p/a.yaml, document 2, spec.owner: required field is missing\n"
        "p/b.yaml: not UTF-8 text (byte 3)"
    )
