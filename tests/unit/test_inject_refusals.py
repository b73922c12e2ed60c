"""Issue 19 (5, 8): no silent misconfiguration at injection time. A pod with another mesh's
sidecar, or a container on a port the sidecar uses, is refused with a message naming what
clashes and how to go on; what the injection overrides (the pod's proxy variables) is said;
an agent without a profile is caught offline (`mandate inject --profiles`) as the webhook
catches it; and `mandate inject` prints the webhook's warnings word for word."""

from __future__ import annotations

import argparse
import base64
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
    p["metadata"]["annotations"]["mandate.dev/mode"] = "proxy"
    out = inject(p, CONFIG)
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["mandate", "mandate-envoy"]


def test_istio_is_refused_in_proxy_mode_too() -> None:
    p = MESHES["istio-sidecar"]
    p["metadata"]["annotations"]["mandate.dev/mode"] = "proxy"
    assert "Istio's capture" in refusal(p)


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_a_pod_in_istio_ambient_mode_is_refused(mode: str) -> None:
    """ztunnel captures the pod's traffic before mandate-init and listens on 15001."""
    p = pod(labels={"istio.io/dataplane-mode": "ambient"})
    p["metadata"]["annotations"]["mandate.dev/mode"] = mode
    message = refusal(p)
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
        shareProcessNamespace=True,
        containers=[
            {"name": "agent", "env": [{"name": "HTTP_PROXY", "value": "http://corp:3128"}]}
        ],
        annotations={"mandate.dev/audit": "off"},
    )
    code, _, err = _cli(["inject", "-f", str(_manifest(tmp_path, p))], capsys)
    assert code == 0
    printed = [
        line.removeprefix("  warning: ")
        for line in err.splitlines()
        if line.startswith("  warning: ")
    ]
    body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                       "request": {"uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                                   "operation": "CREATE", "namespace": "agents", "object": p}}).encode()  # fmt: skip
    status, doc = review(body, CONFIG)
    assert (
        status == 200 and doc["response"]["allowed"] and base64.b64decode(doc["response"]["patch"])
    )
    assert printed == doc["response"]["warnings"]
    assert len(printed) == 4
    assert any("may run as root" in w for w in printed)
    assert any("replaces its HTTP_PROXY" in w for w in printed)
    assert any("cannot turn its audit off" in w for w in printed)
