"""Every Envoy configuration shipped in envoy/ (and bench/) passes `envoy --mode validate`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sidecar.local import ENVOY_DIR, envoy_binary, render_envoy_config

ROOT = ENVOY_DIR.parent
VALUES = {
    "ADMIN_PORT": 0,
    "LISTEN_PORT": 0,
    "MANDATE_PORT": 9001,
    "UPSTREAM_PORT": 8080,
    "MAX_BODY": 65536,
    "ACCESS_LOG": "/dev/null",
    "AGENT": "billing-agent",
}


def _validate(text: str, tmp_path: Path) -> None:
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(text)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(cfg), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_sidecar_config_validates(tmp_path: Path) -> None:
    _validate((ENVOY_DIR / "sidecar.yaml").read_text(), tmp_path)


@pytest.mark.parametrize("agents", [None, ["billing-agent", "research-agent"]])
def test_local_config_validates(tmp_path: Path, agents: list[str] | None) -> None:
    _validate(render_envoy_config(ENVOY_DIR / "local.yaml", VALUES, agents=agents), tmp_path)


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_bench_configs_validate(tmp_path: Path, path: Path) -> None:
    _validate(render_envoy_config(path, VALUES | {"RBAC_HOST": "x"}), tmp_path)


def test_broken_config_is_rejected(tmp_path: Path) -> None:
    """The validation above can fail: a config with a typo does not pass."""
    text = (
        (ENVOY_DIR / "sidecar.yaml").read_text().replace("failure_mode_allow", "failure_mode_alow")
    )
    with pytest.raises(AssertionError):
        _validate(text, tmp_path)


def test_configs_fail_closed() -> None:
    for text in [(ENVOY_DIR / "sidecar.yaml").read_text(), (ENVOY_DIR / "local.yaml").read_text()]:
        assert "failure_mode_allow: false" in text
        assert "failure_mode_allow: true" not in text
