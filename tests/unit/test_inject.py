"""Sidecar injection as pure functions: selection, idempotency, both modes, the JSON patch
(applied with jsonpatch, it gives exactly the injected pod), hardening, and clear errors."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from sidecar.errors import ConfigError, InjectError
from sidecar.injection.pod import (
    ANNOTATION_INJECTED,
    CAPTURE_SCRIPT,
    InjectConfig,
    capture_env,
    inject,
    is_injected,
    patch_for,
    selected,
    warnings_for,
)

ROOT = Path(__file__).resolve().parents[2]
# These tests pick each pod's mode by its annotation; who may pick a less strict mode than
# the injector's (allowPodModeOverride, false by default) is tested in test_inject_refusals.
CONFIG = InjectConfig(allow_pod_mode_override=True)
PROXY_VARS = {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}


def pod(**changes: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent-1",
            "namespace": "agents",
            "labels": {"mandate.dev/inject": "true"},
        },
        "spec": {
            "serviceAccountName": "billing-agent",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [{"name": "agent", "image": "agent:1"}],
        },
    }
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = p
        for key in parents:
            node = node.setdefault(key, {})
        if value is _DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return p


_DELETE = object()


def names(containers: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in containers]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def sidecar(p: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in p["spec"]["initContainers"] if c["name"] == name)


# -- selection and idempotency ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "namespace_selected", "expected"),
    [
        ("true", False, True),
        ("true", True, True),
        ("false", True, False),
        ("false", False, False),
        (None, False, False),
        (None, True, True),
        ("yes", False, False),
    ],
)
def test_selection(label: str | None, namespace_selected: bool, expected: bool) -> None:
    p = pod(metadata__labels={} if label is None else {"mandate.dev/inject": label})
    assert selected(p, namespace_selected=namespace_selected) is expected
    # An opt-out where the namespace selects the pod is the injector's to allow (below).
    config = dataclasses.replace(CONFIG, allow_pod_opt_out=True)
    out = inject(p, config, namespace_selected=namespace_selected)
    assert is_injected(out) is expected
    if not expected:
        assert out == p
        assert patch_for(p, config, namespace_selected=namespace_selected) == []


def test_an_opt_out_in_a_selected_namespace_is_refused_unless_the_injector_allows_it() -> None:
    """Review 19: a pod labelled "false" in a namespace labelled for injection ran without
    the sidecar, so the pod owner chose whether its agent was governed and audited."""
    opted_out = pod(metadata__labels={"mandate.dev/inject": "false"})
    with pytest.raises(InjectError) as err:
        inject(opted_out, CONFIG, namespace_selected=True)
    assert 'metadata.labels[mandate.dev/inject]: "false"' in str(err.value)
    assert "allowPodOptOut" in str(err.value)
    with pytest.raises(InjectError):
        patch_for(opted_out, CONFIG, namespace_selected=True)
    # Where only labelled pods are injected, "false" is just "not selected".
    assert inject(opted_out, CONFIG) == opted_out
    allowing = dataclasses.replace(CONFIG, allow_pod_opt_out=True)
    assert inject(opted_out, allowing, namespace_selected=True) == opted_out


def test_unlabelled_malformed_pod_is_left_alone() -> None:
    p = pod(metadata__labels={}, spec="not a spec")
    assert inject(p, CONFIG) == p
    assert patch_for(p, CONFIG) == []


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_second_pass_changes_nothing(mode: str) -> None:
    once = inject(pod(metadata__annotations={"mandate.dev/mode": mode}), CONFIG)
    assert once["metadata"]["annotations"][ANNOTATION_INJECTED] == mode
    assert inject(once, CONFIG) == once
    assert patch_for(once, CONFIG) == []


@pytest.mark.parametrize("config", [CONFIG, InjectConfig(mode="proxy")], ids=["iptables", "proxy"])
def test_injecting_twice_is_injecting_once(config: InjectConfig) -> None:
    """The injection is authoritative (review 19): a pod that carries the sidecar is stripped
    of it and injected again, which gives back the same pod."""
    for name, p in VARIANTS.items():
        once = inject(p, config)
        assert inject(once, config) == once, name
        assert patch_for(once, config) == [], name


def test_an_injected_pod_without_the_annotation_gets_it_back() -> None:
    once = inject(pod(), CONFIG)
    bare = copy.deepcopy(once)
    del bare["metadata"]["annotations"][ANNOTATION_INJECTED]
    assert is_injected(bare)
    assert inject(bare, CONFIG) == once
    assert patch_for(bare, CONFIG) == [
        {"op": "add", "path": "/metadata/annotations/mandate.dev~1injected", "value": "iptables"}
    ]


def test_a_pod_claiming_to_be_injected_without_the_sidecar_gets_it() -> None:
    """Issue 19, finding 5: the annotation alone used to skip injection, so a pod could opt
    out by claiming it had been injected. Now what carries the claim is injected again."""
    claim = pod(metadata__annotations={ANNOTATION_INJECTED: "proxy"})
    out = inject(claim, CONFIG)
    assert out == inject(pod(), CONFIG)  # the operator's mode, not the claim's
    assert jsonpatch.apply_patch(claim, patch_for(claim, CONFIG)) == out
    half = inject(pod(), CONFIG)  # one of the two containers removed, the annotation kept
    half["spec"]["initContainers"] = [
        c for c in half["spec"]["initContainers"] if c["name"] != "mandate-envoy"
    ]
    assert inject(half, CONFIG) == inject(pod(), CONFIG)
    # not selected: the annotation is none of mandate's business
    assert inject(pod(metadata__labels={}, metadata__annotations={ANNOTATION_INJECTED: "x"}),
                  CONFIG)["metadata"]["annotations"] == {ANNOTATION_INJECTED: "x"}  # fmt: skip


def test_input_is_not_modified() -> None:
    p = pod()
    before = copy.deepcopy(p)
    inject(p, CONFIG)
    patch_for(p, CONFIG)
    assert p == before


# -- what is injected -------------------------------------------------------------------------


def test_iptables_mode_adds_init_then_native_sidecars_before_the_pods_own_init() -> None:
    p = pod(spec__initContainers=[{"name": "migrate", "image": "m:1"}])
    out = inject(p, CONFIG)
    assert names(out["spec"]["initContainers"]) == [
        "mandate-init",
        "mandate",
        "mandate-envoy",
        "migrate",
    ]
    assert names(out["spec"]["containers"]) == ["agent"]
    assert sidecar(out, "mandate")["restartPolicy"] == "Always"
    assert sidecar(out, "mandate-envoy")["restartPolicy"] == "Always"
    assert "restartPolicy" not in sidecar(out, "mandate-init")
    init = sidecar(out, "mandate-init")
    assert init["command"] == ["sh", "-c", CAPTURE_SCRIPT]
    assert env_of(init) == capture_env(CONFIG)


def test_proxy_mode_has_no_init_container_and_no_privilege() -> None:
    out = inject(pod(metadata__annotations={"mandate.dev/mode": "proxy"}), CONFIG)
    assert names(out["spec"]["initContainers"]) == ["mandate", "mandate-envoy"]
    for c in out["spec"]["initContainers"]:
        assert "add" not in c["securityContext"]["capabilities"]


def test_default_mode_comes_from_the_config() -> None:
    out = inject(pod(), InjectConfig(mode="proxy"))
    assert out["metadata"]["annotations"][ANNOTATION_INJECTED] == "proxy"


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_every_app_container_gets_the_proxy_and_existing_values_are_replaced(mode: str) -> None:
    p = pod(
        metadata__annotations={"mandate.dev/mode": mode},
        spec__containers=[
            {"name": "agent", "env": [{"name": "HTTPS_PROXY", "value": "http://corp:3128"}]},
            {"name": "helper", "env": [{"name": "KEEP", "value": "1"}]},
        ],
        spec__initContainers=[{"name": "setup"}],
    )
    out = inject(p, CONFIG)
    app = out["spec"]["containers"] + [
        c for c in out["spec"]["initContainers"] if c["name"] == "setup"
    ]
    for c in app:
        env = env_of(c)
        assert set(env) >= PROXY_VARS
        assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://127.0.0.1:15001"
        assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
        assert [e["name"] for e in c["env"]].count("HTTPS_PROXY") == 1
    assert env_of(out["spec"]["containers"][1])["KEEP"] == "1"
    for c in out["spec"]["initContainers"]:
        if c["name"].startswith("mandate"):
            assert not PROXY_VARS & set(env_of(c)), "the sidecar must not proxy through itself"


def test_agent_from_the_annotation_else_the_service_account() -> None:
    annotated = inject(pod(metadata__annotations={"mandate.dev/agent": "research-agent"}), CONFIG)
    assert env_of(sidecar(annotated, "mandate"))["MANDATE_AGENT"] == "research-agent"
    plain = inject(pod(), CONFIG)
    assert env_of(sidecar(plain, "mandate"))["MANDATE_AGENT"] == {
        "fieldRef": {"fieldPath": "spec.serviceAccountName"}
    }


def test_mandate_env_and_downward_api() -> None:
    env = env_of(sidecar(inject(pod(), CONFIG), "mandate"))
    assert env["MANDATE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["MANDATE_POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # Not TCP: the agent shares the network namespace (a volume only Envoy and mandate mount).
    assert env["MANDATE_LISTEN"] == "unix:/run/mandate-io/check.sock"
    assert env["MANDATE_PROFILES"] == "/etc/mandate/profiles"
    assert env["MANDATE_STATE_DIR"] == "/var/lib/mandate"
    assert env["MANDATE_ADMIN_TOKEN_FILE"] == "/etc/mandate/admin/token"
    assert "MANDATE_OTLP_ENDPOINT" not in env
    otlp = InjectConfig(otlp_endpoint="http://collector:4317")
    assert env_of(sidecar(inject(pod(), otlp), "mandate"))["MANDATE_OTLP_ENDPOINT"] == (
        "http://collector:4317"
    )


@pytest.mark.parametrize(
    ("transport", "config_file"), [("grpc", "sidecar.yaml"), ("http", "sidecar-http.yaml")]
)
def test_transport_picks_envoys_config(transport: str, config_file: str) -> None:
    out = inject(pod(), InjectConfig(transport=transport))
    assert env_of(sidecar(out, "mandate"))["MANDATE_TRANSPORT"] == transport
    args = sidecar(out, "mandate-envoy")["args"]
    assert args[args.index("-c") + 1] == f"/etc/mandate/envoy/{config_file}"
    custom = InjectConfig(transport=transport, envoy_config="/etc/custom/envoy.yaml")
    args = sidecar(inject(pod(), custom), "mandate-envoy")["args"]
    assert args[args.index("-c") + 1] == "/etc/custom/envoy.yaml"


def test_hardened_security_contexts() -> None:
    out = inject(pod(), CONFIG)
    for c in out["spec"]["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["resources"]["requests"] and c["resources"]["limits"]
        if c["name"] == "mandate-init":
            assert sc["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
            assert sc["runAsUser"] == 0  # iptables needs root with those two capabilities
        else:
            assert sc["runAsNonRoot"] is True
            assert "add" not in sc["capabilities"]
    assert sidecar(out, "mandate")["securityContext"]["runAsUser"] == CONFIG.mandate_uid
    assert sidecar(out, "mandate-envoy")["securityContext"]["runAsUser"] == CONFIG.envoy_uid


def test_probes_on_mandates_health_endpoints() -> None:
    m = sidecar(inject(pod(), CONFIG), "mandate")
    assert m["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9901, "scheme": "HTTP"}
    assert m["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert m["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9901, "scheme": "HTTP"}
    assert env_of(m)["MANDATE_ADMIN"] == "0.0.0.0:9901"  # the kubelet probes the pod IP


def test_volumes_and_where_they_are_mounted() -> None:
    out = inject(pod(spec__volumes=[{"name": "data", "emptyDir": {}}]), CONFIG)
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert "data" in volumes
    assert volumes["mandate-profiles"]["configMap"] == {"name": "mandate-profiles"}
    assert "mandate-table" not in volumes  # the shared tables are nameless memfds
    assert volumes["mandate-state"] == {"name": "mandate-state", "emptyDir": {}}
    assert volumes["mandate-admin-token"]["secret"]["secretName"] == "mandate-admin-token"
    mounts = {m["name"]: m for m in sidecar(out, "mandate")["volumeMounts"]}
    # No subPath on the profiles: a ConfigMap update (the ..data symlink swap) must reach mandate.
    assert "subPath" not in mounts["mandate-profiles"]
    assert mounts["mandate-profiles"]["readOnly"] is True
    assert sidecar(out, "mandate")["args"] == ["run"]  # no --table: no table file at all
    # The admin token and the state only in mandate's container.
    for c in out["spec"]["containers"] + out["spec"]["initContainers"]:
        if c["name"] != "mandate":
            used = {m["name"] for m in c.get("volumeMounts", [])}
            assert not used & {"mandate-admin-token", "mandate-state"}, c["name"]


def test_every_volume_the_injection_adds_is_a_reserved_name() -> None:
    """A pod that already had one of these names would be refused by the API server (two
    volumes of one name): the injection names it instead."""
    from sidecar.injection.pod import _VOLUMES

    added = {v["name"] for v in inject(pod(), CONFIG)["spec"]["volumes"]}
    assert added <= set(_VOLUMES)
    for name in sorted(added):
        with pytest.raises(InjectError, match=f"{name!r} is reserved"):
            inject(pod(spec__volumes=[{"name": name, "emptyDir": {}}]), CONFIG)


def test_state_on_a_shared_claim_gets_a_directory_per_pod() -> None:
    cfg = InjectConfig(state_volume={"persistentVolumeClaim": {"claimName": "mandate-state"}})
    out = inject(pod(), cfg)
    mounts = {m["name"]: m for m in sidecar(out, "mandate")["volumeMounts"]}
    assert mounts["mandate-state"]["subPathExpr"] == "$(MANDATE_POD_NAME)"
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["mandate-state"]["persistentVolumeClaim"] == {"claimName": "mandate-state"}


def test_without_an_admin_token_secret_mandate_generates_one() -> None:
    out = inject(pod(), InjectConfig(admin_token_secret=""))
    assert "MANDATE_ADMIN_TOKEN_FILE" not in env_of(sidecar(out, "mandate"))
    assert "mandate-admin-token" not in {v["name"] for v in out["spec"]["volumes"]}


def test_capture_env_lists_exclusions() -> None:
    cfg = InjectConfig(exclude_outbound_ports=(5432, 6379), exclude_outbound_cidrs=("10.0.0.0/8",))
    env = capture_env(cfg)
    assert env["EXCLUDE_PORTS"] == "5432 6379"
    assert env["EXCLUDE_CIDRS"] == "10.0.0.0/8"
    assert env["ENVOY_UID"] == "1337" and env["MANDATE_UID"] == "1338"
    assert env["PROXY_PORT"] == "15001"
    for rule in (
        '-m owner --uid-owner "$uid" -j RETURN',
        'REDIRECT --to-ports "$PROXY_PORT"',
        "-o lo -j RETURN",
        "-j REJECT",
    ):
        assert rule in CAPTURE_SCRIPT


def test_a_root_agent_is_refused_in_iptables_mode_or_warned_about() -> None:
    """rootAgents: refuse (the default): root could setuid to Envoy's UID and leave the pod
    uncaptured. warn: injected, with a warning (as before review 19)."""
    risky = pod(
        spec__securityContext={},
        spec__initContainers=[{"name": "setup", "securityContext": {"runAsUser": 0}}],
    )
    with pytest.raises(InjectError) as err:
        inject(risky, CONFIG)
    assert "spec.initContainers[0] (setup), spec.containers[0] (agent): may run as root" in str(
        err.value
    )
    assert "runAsNonRoot" in str(err.value) and "rootAgents" in str(err.value)
    warn = dataclasses.replace(CONFIG, root_agents="warn")
    warnings = warnings_for(inject(risky, warn), warn)
    assert [w.split(" may run as root")[0] for w in warnings] == [
        "mandate: container setup",
        "mandate: container agent",
    ]
    assert warnings_for(inject(pod(), CONFIG), CONFIG) == []
    # A container's own securityContext wins over the pod's.
    inject(pod(spec__securityContext={}, spec__containers=[
        {"name": "agent", "securityContext": {"runAsUser": 10001}}]), CONFIG)  # fmt: skip
    with pytest.raises(InjectError, match=r"\(agent\): may run as root"):
        inject(pod(spec__containers=[
            {"name": "agent", "securityContext": {"runAsNonRoot": False, "runAsUser": 0}}]), CONFIG)  # fmt: skip
    # Proxy mode has no capture to bypass: neither refused nor warned about.
    proxy = pod(spec__securityContext={}, metadata__annotations={"mandate.dev/mode": "proxy"})
    assert warnings_for(inject(proxy, CONFIG), CONFIG) == []


# -- the JSON patch -----------------------------------------------------------------------------

VARIANTS = {
    "plain": pod(),
    "no-annotations-key": pod(metadata__annotations=_DELETE),
    "annotations": pod(metadata__annotations={"team": "billing", "a/b~c": "x"}),
    "init-and-volumes": pod(
        spec__initContainers=[{"name": "setup", "image": "s:1"}],
        spec__volumes=[{"name": "data", "emptyDir": {}}],
    ),
    "env-and-two-containers": pod(
        spec__containers=[
            {"name": "agent", "env": [{"name": "HTTP_PROXY", "value": "x"}]},
            {"name": "tool"},
        ]
    ),
    "proxy": pod(metadata__annotations={"mandate.dev/mode": "proxy"}),
    "template-without-name": {
        "metadata": {"labels": {"mandate.dev/inject": "true"}},
        "spec": {
            "containers": [{"name": "agent", "securityContext": {"runAsNonRoot": True}}],
        },
    },
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_patch_applied_gives_the_injected_pod(name: str) -> None:
    p = VARIANTS[name]
    ops = patch_for(p, CONFIG)
    assert ops and all(op["op"] in ("add", "replace") for op in ops)
    assert jsonpatch.apply_patch(p, ops) == inject(p, CONFIG)


def test_patch_adds_metadata_when_there_is_none() -> None:
    p = {"spec": {"containers": [{"name": "a"}], "securityContext": {"runAsUser": 10001}}}
    ops = patch_for(p, CONFIG, namespace_selected=True)
    assert ops[0]["path"] == "/metadata"
    assert jsonpatch.apply_patch(p, ops) == inject(p, CONFIG, namespace_selected=True)


# -- errors -------------------------------------------------------------------------------------

BROKEN = [
    ("no-spec", {"spec": _DELETE}, "spec: missing"),
    ("spec-not-object", {"spec": "x"}, "spec: missing or not an object"),
    (
        "containers-not-list",
        {"spec__containers": {"name": "a"}},
        "spec.containers: expected a list",
    ),
    ("no-containers", {"spec__containers": []}, "spec.containers: expected at least one"),
    ("container-without-name", {"spec__containers": [{"image": "x"}]}, "spec.containers[0]"),
    (
        "env-not-list",
        {"spec__containers": [{"name": "a", "env": "X=1"}]},
        "spec.containers[0].env: expected a list",
    ),
    ("env-entry", {"spec__containers": [{"name": "a", "env": ["X=1"]}]}, "containers[0].env[0]"),
    ("init-not-list", {"spec__initContainers": "x"}, "spec.initContainers: expected a list"),
    ("volumes-not-list", {"spec__volumes": {}}, "spec.volumes: expected a list"),
    ("host-network", {"spec__hostNetwork": True}, "spec.hostNetwork"),
    ("reserved-name", {"spec__containers": [{"name": "mandate-envoy"}]}, "reserved"),
    ("reserved-volume", {"spec__volumes": [{"name": "mandate-state"}]}, "volumes[0].name"),
    (
        "reserved-volume-run",
        {"spec__volumes": [{"name": "x"}, {"name": "mandate-run"}]},
        "volumes[1].name",
    ),
    ("envoy-uid-pod", {"spec__securityContext": {"runAsUser": 1337}}, "UID 1337"),
    (
        "mandate-uid-container",
        {"spec__containers": [{"name": "a", "securityContext": {"runAsUser": 1338}}]},
        "UID 1338",
    ),
    ("bad-mode", {"metadata__annotations": {"mandate.dev/mode": "ebpf"}}, "mandate.dev/mode"),
    ("bad-agent", {"metadata__annotations": {"mandate.dev/agent": "Bad Agent!"}}, "agent id"),
    ("label-not-string", {"metadata__labels": {"mandate.dev/inject": "true", "n": 1}}, "labels[n]"),
]


@pytest.mark.parametrize(
    ("changes", "message"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_malformed_selected_pods_get_a_clear_error(changes: dict[str, Any], message: str) -> None:
    p = pod(**changes)
    with pytest.raises(InjectError) as err:
        patch_for(p, CONFIG)
    assert message in str(err.value)
    assert str(err.value).startswith("pod agent-1") or "mandate.dev" in str(err.value)
    assert err.value.code == "inject_invalid"


def test_reserved_uids_are_fine_in_proxy_mode() -> None:
    p = pod(
        spec__securityContext={"runAsUser": 1337},
        metadata__annotations={"mandate.dev/mode": "proxy"},
    )
    assert is_injected(inject(p, CONFIG))


def test_not_an_object() -> None:
    with pytest.raises(InjectError):
        inject("pod", CONFIG)  # type: ignore[arg-type]


# -- the injector's configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["deploy/base/injector.yaml", "deploy/overlays/prod/injector.yaml"]
)
def test_shipped_injector_configs_load(path: str) -> None:
    cfg = InjectConfig.from_mapping(yaml.safe_load((ROOT / path).read_text()), source=path)
    assert cfg.image and cfg.mode in ("iptables", "proxy")


def test_base_injector_config_spells_out_the_defaults() -> None:
    data = yaml.safe_load((ROOT / "deploy/base/injector.yaml").read_text())
    cfg = InjectConfig.from_mapping(data)
    defaults = InjectConfig()
    for name in ("envoy_uid", "mandate_uid", "proxy_port", "grpc_port", "admin_port", "mode"):
        assert getattr(cfg, name) == getattr(defaults, name)
    assert cfg.resources == defaults.resources


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"imagee": "x"}, "unknown key 'imagee'"),
        ({"mode": "ebpf"}, "mode: expected one of iptables, proxy"),
        ({"transport": "udp"}, "transport: expected one of grpc, http"),
        ({"proxyPort": "15001"}, "proxyPort: expected an integer"),
        ({"workers": 0}, "workers: expected at least 1"),
        ({"image": ""}, "image: must not be empty"),
        ({"stateVolume": {}}, "stateVolume: expected one volume source"),
        ({"resources": {"app": {}}}, "resources: expected a mapping"),
        ({"excludeOutboundPorts": [0]}, "excludeOutboundPorts"),
        ({"excludeOutboundCIDRs": ["10.0.0.0/8; rm -rf /"]}, "excludeOutboundCIDRs"),
        ("image: x", "expected a mapping"),
    ],
)
def test_bad_injector_config(data: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        InjectConfig.from_mapping(data, source="injector.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("injector.yaml")


def test_resources_override_one_container_and_keep_the_others() -> None:
    custom = {"mandate": {"requests": {"cpu": "1"}, "limits": {"cpu": "2"}}}
    cfg = InjectConfig.from_mapping({"resources": custom})
    assert cfg.resources["mandate"] == custom["mandate"]
    assert cfg.resources["mandate-envoy"] == InjectConfig().resources["mandate-envoy"]


def test_proxy_mode_meets_pod_security_restricted() -> None:
    """The rules of Pod Security "restricted" that a sidecar can break, on ours."""
    out = inject(pod(metadata__annotations={"mandate.dev/mode": "proxy"}), CONFIG)
    ours = [c for c in out["spec"]["initContainers"] if c["name"].startswith("mandate")]
    assert ours
    for c in ours:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert "privileged" not in sc and "hostPort" not in str(c.get("ports"))
    allowed = {
        "configMap",
        "emptyDir",
        "projected",
        "secret",
        "downwardAPI",
        "persistentVolumeClaim",
    }
    for v in out["spec"]["volumes"]:
        assert set(v) - {"name"} <= allowed, v


def test_access_log_socket_is_shared_by_envoy_and_mandate_only() -> None:
    out = inject(pod(), InjectConfig())
    env = {e["name"]: e.get("value") for e in sidecar(out, "mandate")["env"]}
    assert env["MANDATE_ACCESS_LOG"] == "unix:/run/mandate-io/als.sock"
    assert env["MANDATE_CONTEXT_API"] == "127.0.0.1:9701"
    for name in ("mandate", "mandate-envoy"):
        mounts = {m["name"]: m["mountPath"] for m in sidecar(out, name)["volumeMounts"]}
        assert mounts["mandate-run"] == "/run/mandate-io"
    for c in out["spec"]["containers"]:  # the agent's own containers
        assert "mandate-run" not in {m["name"] for m in c.get("volumeMounts", [])}
    (vol,) = [v for v in out["spec"]["volumes"] if v["name"] == "mandate-run"]
    assert vol["emptyDir"]["medium"] == "Memory"
    envoy_yaml = (Path(__file__).resolve().parents[2] / "envoy" / "sidecar.yaml").read_text()
    assert "pipe: { path: /run/mandate-io/als.sock }" in envoy_yaml
    assert "pipe: { path: /run/mandate-io/check.sock }" in envoy_yaml


def test_envoy_admin_is_a_socket_only_envoys_container_mounts() -> None:
    """Issue 15: Envoy's admin on 127.0.0.1:15000 let the agent (same network namespace)
    stop Envoy (/quitquitquit), read /config_dump and change logging. It is a unix socket
    in a volume that Envoy's container alone mounts, and the startup probe asks it there."""
    import json

    from sidecar.injection.pod import ENVOY_ADMIN_SOCKET, envoy_ready_probe

    for mode in ("iptables", "proxy"):
        out = inject(pod(metadata__annotations={"mandate.dev/mode": mode}), CONFIG)
        (vol,) = [v for v in out["spec"]["volumes"] if v["name"] == "mandate-envoy-admin"]
        assert vol["emptyDir"]["medium"] == "Memory"
        for c in out["spec"]["containers"] + out["spec"]["initContainers"]:
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["name"] == "mandate-envoy":
                assert mounts["mandate-envoy-admin"] == str(Path(ENVOY_ADMIN_SOCKET).parent)
            else:  # the agent's containers, mandate, the init container
                assert "mandate-envoy-admin" not in mounts, c["name"]
        envoy = sidecar(out, "mandate-envoy")
        assert envoy["startupProbe"]["exec"]["command"] == ["python", "-c", envoy_ready_probe()]
        assert repr(ENVOY_ADMIN_SOCKET) in envoy_ready_probe()
        assert "15000" not in json.dumps(out)  # no TCP admin port anywhere in the pod
    assert not hasattr(CONFIG, "envoy_admin_port")
    for name in ("sidecar.yaml", "sidecar-http.yaml"):
        envoy_yaml = yaml.safe_load((ROOT / "envoy" / name).read_text())
        assert envoy_yaml["admin"]["address"] == {
            "pipe": {"path": ENVOY_ADMIN_SOCKET, "mode": 0o600}
        }, name
