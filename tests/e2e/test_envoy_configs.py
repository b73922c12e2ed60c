"""Every Envoy configuration shipped in envoy/ (and bench/) passes `envoy --mode validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.local import ENVOY_DIR, render_envoy_config
from sidecar.headers import CREDENTIAL_HEADERS

from .conftest import validate_envoy_config

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


SIDECAR_CONFIGS = ["sidecar.yaml", "sidecar-http.yaml"]  # gRPC and HTTP transports
LOCAL_CONFIGS = ["local.yaml", "local-http.yaml"]


@pytest.mark.parametrize("name", SIDECAR_CONFIGS)
def test_sidecar_config_validates(tmp_path: Path, name: str) -> None:
    validate_envoy_config((ENVOY_DIR / name).read_text(), tmp_path)


@pytest.mark.parametrize("name", LOCAL_CONFIGS)
@pytest.mark.parametrize("agents", [None, ["billing-agent", "research-agent"]])
def test_local_config_validates(tmp_path: Path, agents: list[str] | None, name: str) -> None:
    validate_envoy_config(render_envoy_config(ENVOY_DIR / name, VALUES, agents=agents), tmp_path)


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_bench_configsvalidate_envoy_config(tmp_path: Path, path: Path) -> None:
    validate_envoy_config(render_envoy_config(path, VALUES | {"RBAC_HOST": "x"}), tmp_path)


def test_broken_config_is_rejected(tmp_path: Path) -> None:
    """The validation above can fail: a config with a typo does not pass."""
    text = (
        (ENVOY_DIR / "sidecar.yaml").read_text().replace("failure_mode_allow", "failure_mode_alow")
    )
    with pytest.raises(AssertionError):
        validate_envoy_config(text, tmp_path)


def test_configs_fail_closed() -> None:
    for name in SIDECAR_CONFIGS + LOCAL_CONFIGS:
        text = (ENVOY_DIR / name).read_text()
        assert "failure_mode_allow: false" in text, name
        assert "failure_mode_allow: true" not in text, name


@pytest.mark.parametrize("name", ["sidecar-http.yaml", "local-http.yaml"])
def test_http_configs_match_the_grpc_ones(name: str) -> None:
    """The HTTP variants differ from the gRPC ones only in how the ext_authz filter asks:
    the listener's normalisation, limits and logging are the same, the agent's headers all
    reach mandate, exactly mandate's four headers and the credential headers (issue 17) are
    set upstream, and the CONNECT check
    (Lua) uses the same path prefix as ext_authz."""
    config = yaml.safe_load(render_envoy_config(ENVOY_DIR / name, VALUES))
    twin = yaml.safe_load(render_envoy_config(ENVOY_DIR / name.replace("-http", ""), VALUES))

    def hcm(c: dict[str, Any]) -> dict[str, Any]:
        return c["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]  # type: ignore[no-any-return]

    http, grpc = hcm(config), hcm(twin)
    same = ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action", "tracing")
    for key in (*same, "common_http_protocol_options", "upgrade_configs", "stat_prefix"):
        assert http.get(key) == grpc.get(key), key
    filters = {f["name"]: f["typed_config"] for f in http["http_filters"]}
    twin_authz = {f["name"]: f["typed_config"] for f in grpc["http_filters"]}[
        "envoy.filters.http.ext_authz"
    ]
    authz = filters["envoy.filters.http.ext_authz"]
    for key in ("failure_mode_allow", "status_on_error", "with_request_body"):
        assert authz[key] == twin_authz[key], key
    assert authz["allowed_headers"] == {"patterns": [{"safe_regex": {"regex": ".*"}}]}
    service = authz["http_service"]
    upstream = service["authorization_response"]["allowed_upstream_headers"]["patterns"]
    assert sorted(p["exact"] for p in upstream) == sorted(
        ["x-mandate-agent", "x-mandate-decision", "x-mandate-purpose", "x-mandate-task",
         *CREDENTIAL_HEADERS]
    )  # fmt: skip
    lua = filters["envoy.filters.http.lua"]["default_source_code"]["inline_string"]
    assert f'"{service["path_prefix"]};connect"' in lua
    assert list(filters).index("envoy.filters.http.lua") < list(filters).index(
        "envoy.filters.http.ext_authz"
    )


@pytest.mark.parametrize("name", SIDECAR_CONFIGS + LOCAL_CONFIGS)
def test_header_names_with_underscores_are_refused_and_admin_is_private(name: str) -> None:
    """Issue 15: `x_mandate_agent` reached the upstream next to mandate's x-mandate-agent
    (one CGI variable); and in a pod, Envoy's admin on TCP was the agent's to use."""
    config = yaml.safe_load(render_envoy_config(ENVOY_DIR / name, VALUES))
    for listener in config["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        options = hcm["common_http_protocol_options"]
        assert options["headers_with_underscores_action"] == "REJECT_REQUEST", name
    if name in SIDECAR_CONFIGS:  # tests and the demo may keep 127.0.0.1 (envoy/local*.yaml)
        assert set(config["admin"]["address"]) == {"pipe"}, name
