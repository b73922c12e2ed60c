"""Issue 19: what the operator's injector config changes in an injected pod. Envoy's tracing
(off unless a collector is set; then 1 % unless configured), log level, access log and a
config of the operator's; where the audit trail goes (stdout, a volume, off) and who may
choose; the image from the webhook's own (MANDATE_SIDECAR_IMAGE)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from sidecar.errors import ConfigError, InjectError
from sidecar.injection.cli import load_config
from sidecar.injection.config import DEFAULT_IMAGE, InjectConfig
from sidecar.injection.envoy import (
    ACCESS_LOG_KEY,
    OTEL_CLUSTER,
    SAMPLING_KEY,
    bootstrap_overlay,
    envoy_args,
    merge,
)
from sidecar.injection.pod import inject, patch_for, warnings_for

ROOT = Path(__file__).resolve().parents[2]


def pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "agent-1",
            "labels": {"mandate.dev/inject": "true"},
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "serviceAccountName": "billing-agent",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [{"name": "agent", "image": "agent:1"}],
        },
    }


def container(p: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in p["spec"]["initContainers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def overlay_of(args: list[str]) -> dict[str, Any]:
    return json.loads(args[args.index("--config-yaml") + 1])  # type: ignore[no-any-return]


# -- Envoy --------------------------------------------------------------------------------------


def test_tracing_is_off_by_default_everywhere() -> None:
    """Before: Envoy exported to the dev Jaeger at 100 % whatever the injector said."""
    out = inject(pod(), InjectConfig())
    args = container(out, "mandate-envoy")["args"]
    assert "--config-yaml" not in args
    assert "MANDATE_OTLP_ENDPOINT" not in env_of(container(out, "mandate"))
    assert bootstrap_overlay(InjectConfig()) == {}


def test_a_collector_adds_envoys_cluster_and_one_percent_sampling() -> None:
    config = InjectConfig.from_mapping({"otlpEndpoint": "http://otel.observability.svc:4317"})
    out = inject(pod(), config)
    overlay = overlay_of(container(out, "mandate-envoy")["args"])
    (cluster,) = overlay["static_resources"]["clusters"]
    assert cluster["name"] == OTEL_CLUSTER
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "otel.observability.svc",
        "port_value": 4317,
    }
    assert "transport_socket" not in cluster
    (layer,) = overlay["layered_runtime"]["layers"]
    assert layer["static_layer"] == {
        SAMPLING_KEY: {"numerator": 10_000, "denominator": "MILLION"}  # 1 %
    }
    # mandate exports to the same collector (its spans follow Envoy's sampling decision).
    env = env_of(container(out, "mandate"))
    assert env["MANDATE_OTLP_ENDPOINT"] == "http://otel.observability.svc:4317"


@pytest.mark.parametrize(
    ("percent", "numerator"), [(100, 1_000_000), (0.01, 100), (0, 0), (12.5, 125_000)]
)
def test_sampling_percent(percent: float, numerator: int) -> None:
    config = InjectConfig.from_mapping(
        {"otlpEndpoint": "http://c:4317", "tracingSamplingPercent": percent}
    )
    layer = bootstrap_overlay(config)["layered_runtime"]["layers"][0]["static_layer"]
    assert layer[SAMPLING_KEY]["numerator"] == numerator


def test_an_https_collector_is_verified() -> None:
    config = InjectConfig.from_mapping({"otlpEndpoint": "https://otel.example.com:443"})
    cluster = bootstrap_overlay(config)["static_resources"]["clusters"][0]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "otel.example.com"
    context = tls["common_tls_context"]["validation_context"]
    assert context["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "otel.example.com"}}
    ]


def test_envoy_log_level_access_log_and_overlay() -> None:
    config = InjectConfig.from_mapping(
        {
            "envoyLogLevel": "info",
            "envoyAccessLog": False,
            "envoyConfigOverlay": {
                "layered_runtime": {"layers": [{"name": "ops", "static_layer": {"x": 1}}]},
                "stats_flush_interval": "10s",
            },
        }
    )
    args = envoy_args(config)
    assert args[args.index("--log-level") + 1] == "info"
    overlay = overlay_of(args)
    # Envoy's merge: lists append (the operator's layer after the injector's: it wins).
    assert [layer["name"] for layer in overlay["layered_runtime"]["layers"]] == [
        "mandate-injector",
        "ops",
    ]
    assert overlay["layered_runtime"]["layers"][0]["static_layer"] == {ACCESS_LOG_KEY: 0}
    assert overlay["stats_flush_interval"] == "10s"


def test_merge_is_envoys() -> None:
    base = {"a": {"b": 1, "l": [1]}, "c": 1}
    assert merge(base, {"a": {"l": [2], "d": 2}, "c": 2}) == {
        "a": {"b": 1, "l": [1, 2], "d": 2},
        "c": 2,
    }
    assert base == {"a": {"b": 1, "l": [1]}, "c": 1}


def test_a_whole_envoy_config_from_a_configmap() -> None:
    config = InjectConfig.from_mapping({"envoyConfigMap": "team-envoy"})
    out = inject(pod(), config)
    envoy = container(out, "mandate-envoy")
    assert envoy["args"][:2] == ["-c", "/etc/mandate/envoy-custom/envoy.yaml"]
    mount = next(m for m in envoy["volumeMounts"] if m["name"] == "mandate-envoy-config")
    assert mount == {
        "name": "mandate-envoy-config",
        "mountPath": "/etc/mandate/envoy-custom",
        "readOnly": True,
    }
    volume = next(v for v in out["spec"]["volumes"] if v["name"] == "mandate-envoy-config")
    assert volume["configMap"] == {
        "name": "team-envoy",
        "items": [{"key": "envoy.yaml", "path": "envoy.yaml"}],
    }
    # Only Envoy's container mounts it.
    for c in out["spec"]["initContainers"] + out["spec"]["containers"]:
        if c["name"] != "mandate-envoy":
            assert "mandate-envoy-config" not in {m["name"] for m in c.get("volumeMounts", [])}
    with pytest.raises(InjectError, match="mandate-envoy-config"):
        inject(
            {
                **pod(),
                "spec": {
                    **pod()["spec"],
                    "volumes": [{"name": "mandate-envoy-config", "emptyDir": {}}],
                },
            },
            config,
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"otlpEndpoint": "jaeger:4317"}, "otlpEndpoint: expected http://HOST:PORT"),
        ({"otlpEndpoint": "http://jaeger"}, "otlpEndpoint: expected http://HOST:PORT"),
        ({"otlpEndpoint": "http://jaeger:4317/v1/traces"}, "only a scheme, host and port"),
        ({"tracingSamplingPercent": 101}, "tracingSamplingPercent: expected a percentage"),
        ({"tracingSamplingPercent": "1"}, "tracingSamplingPercent: expected a percentage"),
        ({"tracingSamplingPercent": True}, "tracingSamplingPercent: expected a percentage"),
        ({"envoyLogLevel": "loud"}, "envoyLogLevel: expected one of trace"),
        ({"envoyAccessLog": "no"}, "envoyAccessLog: expected true or false"),
        ({"envoyConfigOverlay": []}, "envoyConfigOverlay: expected a mapping"),
        ({"envoyConfigMap": "../etc"}, "looks like a path: name a ConfigMap"),
        ({"envoyConfigMap": "x", "envoyConfig": "/y.yaml"}, "set one"),
        ({"audit": "syslog"}, "audit: expected one of stdout, volume, off"),
        ({"auditVolume": {}}, "auditVolume: expected one volume source"),
        ({"allowPodAuditOverride": 1}, "allowPodAuditOverride: expected true or false"),
        ({"unknownAgent": "ignore"}, "unknownAgent: expected one of refuse, warn"),
        ({"adminPort": 15001}, "both port 15001"),
        ({"grpcPort": 9700, "workers": 2}, "both port 9701"),
    ],
)
def test_bad_operator_settings(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        InjectConfig.from_mapping(data, source="injector.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("injector.yaml")


def test_every_setting_is_documented_in_the_base_injector_config() -> None:
    """deploy/base/injector.yaml is the operator's reference: every key, commented."""
    text = (ROOT / "deploy/base/injector.yaml").read_text()
    data = yaml.safe_load(text)
    config = InjectConfig.from_mapping(data)
    from dataclasses import fields

    from sidecar.injection.config import _camel

    keys = {_camel(f.name) for f in fields(InjectConfig)}
    assert keys - set(data) == {"image"}  # the webhook's own image: see the file's comment
    assert "image:" in text  # ... which says so
    assert config.audit == "stdout" and config.unknown_agent == "refuse"


# -- audit --------------------------------------------------------------------------------------


def test_audit_goes_to_stdout_by_default() -> None:
    out = inject(pod(), InjectConfig())
    env = env_of(container(out, "mandate"))
    assert env["MANDATE_AUDIT_STDOUT"] == "true"
    assert "MANDATE_AUDIT_DIR" not in env


def test_audit_in_the_state_volume() -> None:
    out = inject(pod(), InjectConfig.from_mapping({"audit": "volume"}))
    mandate = container(out, "mandate")
    env = env_of(mandate)
    assert env["MANDATE_AUDIT_DIR"] == "/var/lib/mandate/audit"
    assert "MANDATE_AUDIT_STDOUT" not in env
    state = next(m for m in mandate["volumeMounts"] if m["name"] == "mandate-state")
    assert env["MANDATE_AUDIT_DIR"].startswith(state["mountPath"] + "/")
    assert "mandate-audit" not in {v["name"] for v in out["spec"]["volumes"]}


@pytest.mark.parametrize(
    ("volume", "per_pod"),
    [
        ({"persistentVolumeClaim": {"claimName": "audit"}}, True),
        ({"emptyDir": {"sizeLimit": "1Gi"}}, False),
    ],
)
def test_audit_in_a_volume_of_its_own(volume: dict[str, Any], per_pod: bool) -> None:
    out = inject(pod(), InjectConfig.from_mapping({"audit": "volume", "auditVolume": volume}))
    mandate = container(out, "mandate")
    mount = next(m for m in mandate["volumeMounts"] if m["name"] == "mandate-audit")
    assert mount["mountPath"] == env_of(mandate)["MANDATE_AUDIT_DIR"] == "/var/lib/mandate/audit"
    assert ("subPathExpr" in mount) is per_pod
    assert {"name": "mandate-audit", **volume} in out["spec"]["volumes"]
    agent = out["spec"]["containers"][0]
    assert "mandate-audit" not in {m["name"] for m in agent.get("volumeMounts", [])}


def test_audit_off() -> None:
    env = env_of(container(inject(pod(), InjectConfig.from_mapping({"audit": "off"})), "mandate"))
    assert "MANDATE_AUDIT_STDOUT" not in env and "MANDATE_AUDIT_DIR" not in env


AUDIT_CASES = [
    # (operator's audit, allowPodAuditOverride, the pod's mandate.dev/audit, result, warned)
    ("stdout", False, None, "stdout", False),
    ("stdout", False, "stdout", "stdout", False),
    ("stdout", False, "off", "stdout", True),
    ("stdout", False, "volume", "stdout", True),
    ("stdout", True, "volume", "volume", False),
    ("volume", True, "stdout", "stdout", False),
    ("stdout", True, "off", "stdout", True),  # never off by the pod
    ("volume", True, "off", "volume", True),
    ("off", False, "stdout", "off", True),
    ("off", True, "stdout", "stdout", False),  # a pod may turn it on where allowed
    ("off", True, "off", "off", False),
]


@pytest.mark.parametrize(("mode", "allowed", "asked", "result", "warned"), AUDIT_CASES)
def test_who_chooses_where_audit_goes(
    mode: str, allowed: bool, asked: str | None, result: str, warned: bool
) -> None:
    config = InjectConfig.from_mapping({"audit": mode, "allowPodAuditOverride": allowed})
    p = pod({"mandate.dev/audit": asked} if asked else None)
    out = inject(p, config)
    env = env_of(container(out, "mandate"))
    got = (
        "stdout"
        if "MANDATE_AUDIT_STDOUT" in env
        else "volume"
        if "MANDATE_AUDIT_DIR" in env
        else "off"
    )
    assert got == result
    warnings = [w for w in warnings_for(out, config, original=p) if "mandate.dev/audit" in w]
    assert bool(warnings) is warned
    assert jsonpatch.apply_patch(p, patch_for(p, config)) == out


def test_a_bad_audit_annotation_is_refused() -> None:
    with pytest.raises(
        InjectError, match=r"mandate.dev/audit\]: expected one of stdout, volume, off"
    ):
        inject(pod({"mandate.dev/audit": "syslog"}), InjectConfig())


# -- the image: one place ----------------------------------------------------------------------


def test_the_image_comes_from_the_webhooks_own(tmp_path: Path) -> None:
    env = {"MANDATE_SIDECAR_IMAGE": "registry.example/mandate:1.2.3"}
    base = ROOT / "deploy/base/injector.yaml"
    assert load_config(base, env).image == "registry.example/mandate:1.2.3"
    assert load_config(None, env).image == "registry.example/mandate:1.2.3"
    assert load_config(base, {}).image == DEFAULT_IMAGE
    # A config that names an image keeps it (to inject another image than the webhook runs).
    own = tmp_path / "injector.yaml"
    own.write_text("image: other/mandate:9\n")
    assert load_config(own, env).image == "other/mandate:9"
    out = inject(pod(), load_config(base, env))
    assert {c["image"] for c in out["spec"]["initContainers"]} == {"registry.example/mandate:1.2.3"}
