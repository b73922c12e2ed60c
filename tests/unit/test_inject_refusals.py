"""Issue 19 (5, 8): no silent misconfiguration at injection time. A pod with another mesh's
sidecar, or a container on a port the sidecar uses, is refused with a message naming what
clashes and how to go on; what the injection overrides (the pod's proxy variables) is said;
an agent without a profile is caught offline (`mandate inject --profiles`) as the webhook
catches it; and `mandate inject` prints the webhook's warnings word for word."""

from __future__ import annotations

import argparse
import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.injection.cli import add_inject_parser, run_inject
from sidecar.injection.config import InjectConfig
from sidecar.injection.pod import agent_name, inject, unknown_agent_problem, warnings_for
from sidecar.injection.webhook import review

ROOT = Path(__file__).resolve().parents[2]
CONFIG = InjectConfig()
# Where the operator lets a pod pick proxy mode (allowPodModeOverride).
OVERRIDE = InjectConfig(allow_pod_mode_override=True)


def pod(**spec: Any) -> dict[str, Any]:
    annotations = spec.pop("annotations", {})
    labels = {"mandate.dev/inject": "true", **spec.pop("labels", {})}
    base: dict[str, Any] = {
        "serviceAccountName": "billing-agent",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
        "containers": [{"name": "agent", "image": "agent:1"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-1", "labels": labels, "annotations": annotations},
        "spec": {**base, **spec},
    }


def refusal(p: dict[str, Any], config: InjectConfig = CONFIG) -> str:
    from sidecar.errors import InjectError

    with pytest.raises(InjectError) as err:
        inject(p, config)
    return str(err.value)


# -- other meshes -------------------------------------------------------------------------------

ISTIO_PROXY = {
    "name": "istio-proxy",
    "image": "istio/proxyv2:1.27",
    "securityContext": {"runAsUser": 1337},
}

MESHES = {
    "istio-sidecar": pod(
        containers=[{"name": "agent"}, ISTIO_PROXY], initContainers=[{"name": "istio-init"}]
    ),
    "istio-native-sidecar": pod(initContainers=[{**ISTIO_PROXY, "restartPolicy": "Always"}]),
    "istio-status": pod(annotations={"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}),
    "istio-asked": pod(labels={"sidecar.istio.io/inject": "true"}),
    "linkerd-sidecar": pod(containers=[{"name": "agent"}, {"name": "linkerd-proxy"}]),
    "linkerd-asked": pod(annotations={"linkerd.io/inject": "enabled"}),
}


@pytest.mark.parametrize("name", list(MESHES))
def test_a_pod_with_another_mesh_is_refused_saying_what_to_do(name: str) -> None:
    """Before: a pod with Istio was refused with only 'runs as UID 1337, reserved'."""
    message = refusal(MESHES[name])
    mesh = "Istio" if name.startswith("istio") else "Linkerd"
    assert message.startswith("pod agent-1: ")
    assert f"{mesh}'s capture" in message and "To go on:" in message
    assert "reserved for the sidecar" not in message
    if mesh == "Istio":
        assert 'sidecar.istio.io/inject: "false"' in message and "UID 1337" in message
    else:
        assert "mandate.dev/mode: proxy" in message and "linkerd.io/inject: disabled" in message


def test_linkerd_coexists_in_proxy_mode() -> None:
    p = MESHES["linkerd-sidecar"]
    out = inject(p, InjectConfig(mode="proxy"))
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["mandate", "mandate-envoy"]
    p["metadata"]["annotations"]["mandate.dev/mode"] = "proxy"
    assert inject(p, OVERRIDE)["spec"] == out["spec"]
    # Where the operator says iptables, the pod cannot pick proxy mode by itself.
    assert "allowPodModeOverride: false" in refusal(p)


def test_istio_is_refused_in_proxy_mode_too() -> None:
    p = MESHES["istio-sidecar"]
    p["metadata"]["annotations"]["mandate.dev/mode"] = "proxy"
    assert "Istio's capture" in refusal(p, OVERRIDE)


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_a_pod_in_istio_ambient_mode_is_refused(mode: str) -> None:
    """ztunnel captures the pod's traffic before mandate-init and listens on 15001."""
    p = pod(labels={"istio.io/dataplane-mode": "ambient"})
    p["metadata"]["annotations"]["mandate.dev/mode"] = mode
    message = refusal(p, OVERRIDE)
    assert "Istio ambient's capture (istio.io/dataplane-mode: 'ambient')" in message
    assert 'istio.io/dataplane-mode: "none"' in message and "15001" in message


def test_mesh_opt_outs_are_not_meshes() -> None:
    inject(pod(labels={"sidecar.istio.io/inject": "false"}), CONFIG)
    inject(pod(labels={"istio.io/dataplane-mode": "none"}), CONFIG)
    inject(pod(annotations={"linkerd.io/inject": "disabled"}), CONFIG)


# -- ports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "what"),
    [
        (15001, "Envoy's egress listener"),
        (9001, "mandate's Check server"),
        (9901, "mandate's admin"),
        (9701, "agent context API"),
    ],
)
@pytest.mark.parametrize("key", ["containers", "initContainers"])
def test_a_container_on_a_sidecar_port_is_refused(port: int, what: str, key: str) -> None:
    p = pod()
    p["spec"][key] = [
        *(p["spec"][key] if key == "containers" else []),
        {
            "name": "web",
            "ports": [{"containerPort": 8080}, {"name": "admin", "containerPort": port}],
        },
    ]
    message = refusal(p)
    assert f"container 'web' uses port {port}" in message
    assert f"spec.{key}[" in message and ".ports[1].containerPort" in message
    assert what in message


def test_the_ports_follow_the_injectors_config() -> None:
    config = InjectConfig.from_mapping({"grpcPort": 9100, "workers": 3, "adminPort": 9200})
    for port in (9100, 9101, 9102, 9200):
        p = pod(containers=[{"name": "app", "ports": [{"containerPort": port}]}])
        assert f"port {port}" in refusal(p, config)
    inject(pod(containers=[{"name": "app", "ports": [{"containerPort": 9001}]}]), config)


# -- what the injection overrides ---------------------------------------------------------------


def test_the_pods_proxy_variables_are_replaced_with_a_warning_naming_container_and_variable() -> (
    None
):
    p = pod(
        containers=[
            {"name": "agent", "env": [
                {"name": "HTTPS_PROXY", "value": "http://user:secret@corp-proxy:3128"},
                {"name": "no_proxy", "value": ".internal"},
                {"name": "OTHER", "value": "x"},
            ]},
            {"name": "tool", "env": [{"name": "HTTP_PROXY", "valueFrom": {"configMapKeyRef": {"name": "p", "key": "k"}}}]},
            {"name": "quiet", "env": [{"name": "HTTP_PROXY", "value": "http://127.0.0.1:15001"}]},
        ]
    )  # fmt: skip
    out = inject(p, CONFIG)
    warnings = [w for w in warnings_for(out, CONFIG, original=p) if "replaces" in w]
    assert len(warnings) == 2
    agent, tool = warnings
    assert agent.startswith(
        "mandate: container agent: the injection replaces its HTTPS_PROXY, no_proxy:"
    )
    assert tool.startswith("mandate: container tool: the injection replaces its HTTP_PROXY:")
    assert not any("secret" in w or "corp-proxy" in w for w in warnings)  # values not repeated
    assert "noProxy" in agent
    # Without the original pod (as before) nothing is said about it.
    assert not [w for w in warnings_for(out, CONFIG) if "replaces" in w]


# -- agents without a profile -------------------------------------------------------------------


def test_agent_name_is_what_mandate_serves() -> None:
    assert agent_name(pod()) == "billing-agent"
    assert agent_name(pod(annotations={"mandate.dev/agent": "research-agent"})) == "research-agent"
    no_account = pod()
    del no_account["spec"]["serviceAccountName"]
    assert agent_name(no_account) == "default"


def test_unknown_agent_problem_names_agent_source_and_known_agents() -> None:
    assert unknown_agent_problem(pod(), {"billing-agent"}, "DIR") == ""
    message = unknown_agent_problem(
        pod(annotations={"mandate.dev/agent": "billing"}), {"billing-agent"}, "profiles/"
    )
    assert (
        "agent 'billing' (from the annotation mandate.dev/agent) has no profile in profiles/"
        in message
    )
    assert "(agents: billing-agent)" in message and "unknown_agent" in message
    message = unknown_agent_problem(pod(), set(), "ConfigMap agents/mandate-profiles")
    assert "service account 'billing-agent'" in message and "(agents: none)" in message


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_inject_parser(parser.add_subparsers(dest="command"))
    code = run_inject(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


PROFILES = ROOT / "deploy/agents/profiles"


def _manifest(tmp_path: Path, p: dict[str, Any]) -> Path:
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


def test_offline_inject_refuses_an_agent_without_a_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = pod(annotations={"mandate.dev/agent": "no-such-agent"})
    code, out, err = _cli(
        ["inject", "-f", str(_manifest(tmp_path, p)), "--profiles", str(PROFILES)], capsys
    )
    assert code == 2 and out == ""
    assert "document 1 (Pod agent-1): pod agent-1: agent 'no-such-agent'" in err
    assert "has no profile in" in err
    # Without --profiles nothing is known about it; a known agent passes.
    assert _cli(["inject", "-f", str(_manifest(tmp_path, p))], capsys)[0] == 0
    known = pod(annotations={"mandate.dev/agent": "billing-agent"})
    assert (
        _cli(
            ["inject", "-f", str(_manifest(tmp_path, known)), "--profiles", str(PROFILES)], capsys
        )[0]
        == 0
    )


def test_offline_inject_warns_when_the_injector_says_warn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "injector.yaml"
    config.write_text("unknownAgent: warn\n")
    p = pod(annotations={"mandate.dev/agent": "no-such-agent"})
    code, out, err = _cli(
        [
            "inject",
            "-f",
            str(_manifest(tmp_path, p)),
            "--profiles",
            str(PROFILES),
            "--config",
            str(config),
        ],
        capsys,
    )
    assert code == 0 and "mandate.dev/injected" in out
    assert "  warning: mandate: pod agent-1: agent 'no-such-agent'" in err


def test_offline_inject_refuses_invalid_profiles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "profiles"
    bad.mkdir()
    (bad / "a.yaml").write_text("kind: AgentProfile\n")
    code, _, err = _cli(
        ["inject", "-f", str(_manifest(tmp_path, pod())), "--profiles", str(bad)], capsys
    )
    assert code == 2 and "a.yaml" in err


def test_offline_inject_prints_the_webhooks_warnings_word_for_word(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19 (5): offline `mandate inject` omitted warnings the webhook gave."""
    p = pod(
        securityContext={},  # may run as root: the capture could be bypassed
        containers=[
            {"name": "agent", "env": [{"name": "HTTP_PROXY", "value": "http://corp:3128"}]}
        ],
        annotations={"mandate.dev/audit": "off"},
    )
    config_file = tmp_path / "injector.yaml"
    config_file.write_text("rootAgents: warn\n")
    config = InjectConfig(root_agents="warn")
    code, _, err = _cli(
        ["inject", "-f", str(_manifest(tmp_path, p)), "--config", str(config_file)], capsys
    )
    assert code == 0
    printed = [
        line.removeprefix("  warning: ")
        for line in err.splitlines()
        if line.startswith("  warning: ")
    ]
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                   "operation": "CREATE", "namespace": "agents", "object": p}}).encode()  # fmt: skip
    status, doc = review(body, config)
    assert (
        status == 200 and doc["response"]["allowed"] and base64.b64decode(doc["response"]["patch"])
    )
    assert printed == doc["response"]["warnings"]
    assert len(printed) == 3
    assert any("may run as root" in w for w in printed)
    assert any("replaces its HTTP_PROXY" in w for w in printed)
    assert any("cannot turn its audit off" in w for w in printed)


# -- review 19: the pod owner (and the agent) are not trusted ------------------------------------


def _review(p: dict[str, Any], config: InjectConfig = CONFIG, path_ns: bool = False) -> Any:
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                   "operation": "CREATE", "namespace": "agents", "object": p}}).encode()  # fmt: skip
    status, doc = review(body, config, namespace_selected=path_ns)
    assert status == 200
    return doc["response"]


LOOK_ALIKES = [
    {"name": "mandate", "image": "busybox:1.37", "command": ["sleep", "infinity"],
     "restartPolicy": "Always"},
    {"name": "mandate-envoy", "image": "busybox:1.37", "command": ["sleep", "infinity"],
     "restartPolicy": "Always"},
]  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"initContainers": LOOK_ALIKES},
        {"initContainers": [{"name": "mandate-init", "image": "busybox:1.37"}, *LOOK_ALIKES]},
        {"initContainers": LOOK_ALIKES, "annotations": {"mandate.dev/injected": "iptables"}},
        {"initContainers": LOOK_ALIKES[:1], "volumes": [{"name": "mandate-state", "emptyDir": {}}]},
    ],
    ids=["look-alikes", "with-init", "with-claim", "half-with-a-volume"],
)
def test_look_alike_sidecar_containers_are_replaced_by_the_real_sidecar(
    change: dict[str, Any],
) -> None:
    """Review 19 (1): is_injected checked the names only, so two busybox init containers
    named mandate and mandate-envoy let a selected pod through with no sidecar at all."""
    import jsonpatch

    p = pod(**json.loads(json.dumps(change)))
    real = inject(pod(), CONFIG)
    out = inject(p, CONFIG)
    assert out["spec"] == real["spec"]
    assert out["metadata"]["annotations"]["mandate.dev/injected"] == "iptables"
    response = _review(p)
    assert response["allowed"] is True
    patched = jsonpatch.apply_patch(p, json.loads(base64.b64decode(response["patch"])))
    assert patched == out
    assert any("named like mandate's sidecar (mandate" in w for w in response["warnings"])
    # ... and the injected pod, reviewed again, needs no patch: injection is idempotent.
    assert inject(out, CONFIG) == out
    assert _review(out) == {"uid": "u1", "allowed": True}


def test_a_look_alike_named_like_the_sidecar_in_containers_is_refused() -> None:
    """mandate never puts its sidecar in spec.containers: such a name is the pod's mistake."""
    p = pod(containers=[{"name": "agent"}, {"name": "mandate", "image": "busybox:1.37"}])
    assert "spec.containers[1].name: 'mandate' is reserved" in refusal(p)


def test_a_pod_cannot_pick_a_less_strict_mode_than_the_operators() -> None:
    """Review 19 (2a): mandate.dev/mode: proxy removed the capture (and the UID check) of a
    pod the operator meant to capture."""
    message = refusal(pod(annotations={"mandate.dev/mode": "proxy"}))
    assert message.startswith("pod agent-1: metadata.annotations[mandate.dev/mode]: proxy is less")
    assert "allowPodModeOverride: false" in message
    assert _review(pod(annotations={"mandate.dev/mode": "proxy"}))["allowed"] is False
    # A stricter mode is the pod's to pick; a less strict one where the operator allows it.
    stricter = inject(pod(annotations={"mandate.dev/mode": "iptables"}), InjectConfig(mode="proxy"))
    assert stricter["metadata"]["annotations"]["mandate.dev/injected"] == "iptables"
    assert "mandate-init" in {c["name"] for c in stricter["spec"]["initContainers"]}
    lax = inject(pod(annotations={"mandate.dev/mode": "proxy"}), OVERRIDE)
    assert lax["metadata"]["annotations"]["mandate.dev/injected"] == "proxy"


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_a_shared_process_namespace_is_refused_in_every_mode(mode: str) -> None:
    """Review 19 (2c): with shareProcessNamespace, the agent (as mandate's UID, not refused in
    proxy mode, or as root) read /proc/<mandate's pid>/root: credentials, token, keys."""
    p = pod(
        annotations={"mandate.dev/mode": mode, "mandate.dev/credential-secrets": "ledger-api-key"},
        shareProcessNamespace=True,
        securityContext={"runAsNonRoot": True, "runAsUser": CONFIG.mandate_uid},
    )
    assert "spec.shareProcessNamespace: true" in refusal(p, OVERRIDE)


def test_a_root_agent_is_refused_by_default() -> None:
    """Review 19 (2d): root may setuid to Envoy's UID, whose traffic the capture lets out."""
    message = refusal(pod(securityContext={}))
    assert "spec.containers[0] (agent): may run as root" in message
    assert "rootAgents" in message and "runAsNonRoot" in message
    assert InjectConfig.from_mapping({"rootAgents": "warn"}).root_agents == "warn"
    inject(pod(securityContext={}), InjectConfig(root_agents="warn"))


def test_no_agent_container_may_gain_privileges_in_iptables_mode() -> None:
    """Review 19 (open): a non-root agent running a setuid-root program in its image becomes
    root, and root may switch to Envoy's UID. The injection sets allowPrivilegeEscalation:
    false where it is unset (no_new_privs: setuid bits are ignored) and refuses an explicit
    true (rootAgents: refuse), or warns (rootAgents: warn)."""
    import jsonpatch

    from sidecar.injection.pod import patch_for

    p = pod(
        initContainers=[{"name": "setup", "image": "setup:1"}],
        containers=[
            {
                "name": "agent",
                "image": "agent:1",
                "securityContext": {"readOnlyRootFilesystem": True},
            },
            {"name": "helper", "image": "helper:1"},
        ],
    )
    out = inject(p, CONFIG)
    own = [c for c in out["spec"]["initContainers"] if c["name"] == "setup"]
    own += out["spec"]["containers"]
    assert [c["securityContext"]["allowPrivilegeEscalation"] for c in own] == [False] * 3
    assert own[1]["securityContext"]["readOnlyRootFilesystem"] is True  # the rest kept
    assert inject(out, CONFIG) == out  # idempotent
    assert jsonpatch.apply_patch(p, patch_for(p, CONFIG)) == out  # the webhook's patch too
    # An explicit false stays; an explicit true is refused, naming the container.
    explicit = pod(containers=[
        {"name": "agent", "image": "agent:1", "securityContext": {"allowPrivilegeEscalation": True}}
    ])  # fmt: skip
    message = refusal(explicit)
    assert "spec.containers[0] (agent): allowPrivilegeEscalation: true" in message
    assert "setuid" in message and "rootAgents" in message
    warned = InjectConfig(root_agents="warn")
    injected = inject(explicit, warned)
    assert injected["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    assert any("allowPrivilegeEscalation: true" in w for w in warnings_for(injected, warned))
    # Proxy mode captures nothing by UID: the containers are left as they are.
    proxy = pod(annotations={"mandate.dev/mode": "proxy"})
    untouched = inject(proxy, OVERRIDE)["spec"]["containers"][0]
    assert "securityContext" not in untouched


@pytest.mark.parametrize(
    ("config", "volume"),
    [
        ({"audit": "volume", "auditVolume": {"persistentVolumeClaim": {"claimName": "mandate-audit"}}},
         {"persistentVolumeClaim": {"claimName": "mandate-audit", "readOnly": True}}),
        ({"auditVolume": {"persistentVolumeClaim": {"claimName": "mandate-audit"}}},
         {"persistentVolumeClaim": {"claimName": "mandate-audit"}}),
        ({"stateVolume": {"persistentVolumeClaim": {"claimName": "mandate-state"}}},
         {"persistentVolumeClaim": {"claimName": "mandate-state"}}),
        ({"stateVolume": {"nfs": {"server": "nfs.example", "path": "/mandate"}}},
         {"nfs": {"server": "nfs.example", "path": "/mandate", "readOnly": True}}),
    ],
    ids=["audit-claim-read-only", "audit-claim-any-mode", "state-claim", "state-nfs"],
)  # fmt: skip
def test_the_agent_cannot_mount_the_injectors_state_or_audit_volume(
    config: dict[str, Any], volume: dict[str, Any]
) -> None:
    """Review 19 (5): the same claim under another volume name gave the agent every pod's
    audit files (the hash chain is unkeyed: an edited, re-hashed tail verifies)."""
    cfg = InjectConfig.from_mapping(config)
    p = pod(
        volumes=[{"name": "logs", **volume}],
        containers=[{"name": "agent", "volumeMounts": [{"name": "logs", "mountPath": "/l"}]}],
    )
    message = refusal(p, cfg)
    assert "spec.volumes[0] (logs)." in message and "the injector's " in message
    # Another claim, and the per-pod emptyDir the injector uses by default, are the pod's own.
    inject(pod(volumes=[{"name": "logs", "persistentVolumeClaim": {"claimName": "other"}}]), cfg)
    inject(pod(volumes=[{"name": "scratch", "emptyDir": {}}]), CONFIG)


BASELINE = [
    ("hostPID", {"hostPID": True}, "spec.hostPID: true"),
    ("hostIPC", {"hostIPC": True}, "spec.hostIPC: true"),
    ("hostPath", {"volumes": [{"name": "node-logs", "hostPath": {"path": "/var/log/pods"}}]},
     "spec.volumes[0] (node-logs).hostPath"),
    ("privileged", {"containers": [{"name": "agent", "securityContext": {"privileged": True}}]},
     "spec.containers[0] (agent).securityContext.privileged: true"),
    ("NET_ADMIN", {"containers": [{"name": "agent", "securityContext": {
        "capabilities": {"add": ["NET_BIND_SERVICE", "NET_ADMIN", "SYS_PTRACE"]}}}]},
     "spec.containers[0] (agent).securityContext.capabilities.add: NET_ADMIN, SYS_PTRACE"),
    ("init-NET_RAW", {"initContainers": [{"name": "setup", "securityContext": {
        "capabilities": {"add": ["NET_RAW"]}}}]},
     "spec.initContainers[0] (setup).securityContext.capabilities.add: NET_RAW"),
    ("hostPort", {"containers": [{"name": "agent", "ports": [{"containerPort": 8080, "hostPort": 8080}]}]},
     "spec.containers[0] (agent).ports[0].hostPort: 8080"),
    ("procMount", {"containers": [{"name": "agent", "securityContext": {"procMount": "Unmasked"}}]},
     "spec.containers[0] (agent).securityContext.procMount: Unmasked"),
    ("seccomp-pod", {"securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "Unconfined"}}},
     "spec.securityContext.seccompProfile.type: Unconfined"),
    ("seccomp-container", {"containers": [{"name": "agent", "securityContext": {
        "seccompProfile": {"type": "Unconfined"}}}]},
     "spec.containers[0] (agent).securityContext.seccompProfile.type: Unconfined"),
    ("apparmor-field", {"containers": [{"name": "agent", "securityContext": {
        "appArmorProfile": {"type": "Unconfined"}}}]},
     "spec.containers[0] (agent).securityContext.appArmorProfile.type: Unconfined"),
    ("apparmor-annotation", {"annotations": {
        "container.apparmor.security.beta.kubernetes.io/mandate": "unconfined"}},
     "metadata.annotations[container.apparmor.security.beta.kubernetes.io/mandate]: unconfined"),
    ("selinux-type", {"securityContext": {"runAsNonRoot": True, "seLinuxOptions": {"type": "spc_t"}}},
     "spec.securityContext.seLinuxOptions.type: spc_t"),
    ("selinux-user", {"containers": [{"name": "agent", "securityContext": {
        "seLinuxOptions": {"user": "system_u", "role": "system_r"}}}]},
     "spec.containers[0] (agent).securityContext.seLinuxOptions.user: system_u; "
     "spec.containers[0] (agent).securityContext.seLinuxOptions.role: system_r"),
    ("hostProcess", {"containers": [{"name": "agent", "securityContext": {
        "windowsOptions": {"hostProcess": True}}}]},
     "spec.containers[0] (agent).securityContext.windowsOptions.hostProcess: true"),
    ("sysctl", {"securityContext": {"runAsNonRoot": True, "sysctls": [
        {"name": "net.ipv4.tcp_syncookies", "value": "1"}, {"name": "net.ipv4.ip_forward", "value": "1"}]}},
     "spec.securityContext.sysctls[1].name: net.ipv4.ip_forward"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "field"), [b[1:] for b in BASELINE], ids=[b[0] for b in BASELINE]
)
@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_what_pod_security_baseline_forbids_is_refused(
    change: dict[str, Any], field: str, mode: str
) -> None:
    """Review 19 (3): the agent namespace is labelled `privileged` (for mandate-init's
    NET_ADMIN), which let the pod give the agent hostPID (every pod's mandate on the node
    through /proc), a hostPath of /var/log/pods (the node's audit trails), privileged or
    NET_ADMIN (flush the capture)."""
    p = pod(**json.loads(json.dumps(change)))
    p["metadata"]["annotations"]["mandate.dev/mode"] = mode
    message = refusal(p, OVERRIDE)
    assert message.startswith(f"pod agent-1: {field}: Pod Security's baseline level forbids")


def test_what_pod_security_baseline_allows_is_injected() -> None:
    p = pod(
        annotations={"container.apparmor.security.beta.kubernetes.io/agent": "runtime/default"},
        securityContext={
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
            "seLinuxOptions": {"type": "container_t", "level": "s0:c1,c2"},
            "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
        },
        containers=[{
            "name": "agent",
            "ports": [{"containerPort": 8080, "hostPort": 0}],
            "securityContext": {
                "capabilities": {"add": ["NET_BIND_SERVICE", "CHOWN"], "drop": ["ALL"]},
                "procMount": "Default", "privileged": False,
                "appArmorProfile": {"type": "Localhost", "localhostProfile": "agent"},
            },
        }],
    )  # fmt: skip
    inject(p, CONFIG)


@pytest.mark.parametrize(
    ("dns", "field"),
    [
        ({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["203.0.113.7"]}},
         "spec.dnsPolicy: None; spec.dnsConfig.nameservers: 203.0.113.7"),
        ({"dnsConfig": {"nameservers": ["203.0.113.7"]}}, "spec.dnsConfig.nameservers: 203.0.113.7"),
        ({"dnsPolicy": "None"}, "spec.dnsPolicy: None"),
    ],
    ids=["none-and-nameservers", "extra-nameserver", "none"],
)  # fmt: skip
def test_a_pod_cannot_name_its_own_nameservers_in_iptables_mode(
    dns: dict[str, Any], field: str
) -> None:
    """Review 19 (6): the capture lets TCP and UDP 53 out to every nameserver of the pod's
    resolv.conf, which these fields write: a direct way out to any host's port 53. Proxy
    mode has no capture to get around (an agent there reaches anything that ignores
    HTTP_PROXY anyway): nothing to refuse."""
    message = refusal(pod(**copy.deepcopy(dns)))
    assert message.startswith(f"pod agent-1: {field}: the capture lets DNS")
    inject(pod(annotations={"mandate.dev/mode": "proxy"}, **copy.deepcopy(dns)), OVERRIDE)
    inject(pod(dnsPolicy="ClusterFirst", dnsConfig={"searches": ["svc.example"],
                                                    "options": [{"name": "ndots", "value": "2"}]}), CONFIG)  # fmt: skip


@pytest.mark.parametrize("key", ["containers", "initContainers"])
def test_a_port_named_like_the_sidecars_is_refused(key: str) -> None:
    """Review 19 (7): the PodMonitor scrapes the port named mandate-admin; an agent serving
    a fresh mandate_kubernetes_last_sync_timestamp_seconds there masked the alerts."""
    p = pod()
    p["spec"][key] = [
        *(p["spec"][key] if key == "containers" else []),
        {"name": "web", "ports": [{"name": "mandate-admin", "containerPort": 8080}]},
    ]
    message = refusal(p)
    assert f"spec.{key}[" in message and ".ports[0].name: container 'web' names a port" in message
