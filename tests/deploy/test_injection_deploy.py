"""Issue 19, the injection's side of deploy/, rendered with the real `kubectl kustomize`:
the image in one place (an overlay's `images:` changes the webhook and what it injects),
production exports no trace anywhere, the webhook may read exactly the profiles ConfigMap
it checks agents against, and the ValidatingAdmissionPolicy that refuses a pod claiming
mandate.dev/injected without the sidecar, and the one that keeps the sidecar as injected
(UPDATE, ephemeral containers), their CEL evaluated with cel-python; which pods the
webhook configuration sends to the webhook (a namespace's opt-outs included)."""

from __future__ import annotations

import base64
import copy
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
from sidecar.injection.webhook import review

from .kustomize import find as _find
from .kustomize import render as _render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
IMAGE = "ghcr.io/mandate-dev/mandate"


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


def _agent(**labels: str) -> dict[str, Any]:
    """A pod that asks for the sidecar and can have it."""
    return {
        "metadata": {"name": "a", "labels": {"mandate.dev/inject": "true", **labels}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [{"name": "agent", "image": "agent:1"}],
        },
    }


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
    injected = inject(_agent(), config)
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
    injected = inject(_agent(), config)
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


# -- the ValidatingAdmissionPolicies ------------------------------------------------------------

CLAIM_POLICY, INTEGRITY_POLICY = "mandate-injected-claim", "mandate-sidecar-integrity"


def _policy(docs: list[dict[str, Any]], name: str = CLAIM_POLICY) -> dict[str, Any]:
    return _find(docs, "ValidatingAdmissionPolicy", name)


def _admits(
    policy: dict[str, Any], operation: str, pod: Any, old: Any = None, sub: str = ""
) -> bool:
    """What the API server decides with this policy (Deny): the match conditions, then
    every validation, evaluated by cel-python as the API server's CEL would."""
    return not _denials(policy, operation, pod, old, sub)


def _denials(
    policy: dict[str, Any], operation: str, pod: Any, old: Any = None, sub: str = ""
) -> list[str]:
    """The messages of the validations that fail (none when the policy does not match)."""
    resource = f"pods/{sub}" if sub else "pods"
    (rules,) = policy["spec"]["matchConstraints"]["resourceRules"]
    if operation not in rules["operations"] or resource not in rules["resources"]:
        return []
    limit = sys.getrecursionlimit()
    env = celpy.Environment()
    sys.setrecursionlimit(limit)  # celpy raises it process-wide (tests/kubeapi/cel.py)
    activation = {
        "object": celpy.json_to_cel(pod),
        "oldObject": celpy.json_to_cel(old),
        "request": celpy.json_to_cel({"operation": operation, "subResource": sub}),
    }

    def run(expression: str) -> bool:
        result = env.program(env.compile(expression)).evaluate(activation)
        assert isinstance(result, celpy.celtypes.BoolType), (expression, result)
        return bool(result)

    if not all(run(c["expression"]) for c in policy["spec"].get("matchConditions", [])):
        return []
    variables: dict[Any, Any] = {}
    for variable in policy["spec"].get("variables", []):
        program = env.program(env.compile(variable["expression"]))
        variables[celpy.celtypes.StringType(variable["name"])] = program.evaluate(activation)
        activation["variables"] = celpy.celtypes.MapType(variables)
    return [v["message"] for v in policy["spec"]["validations"] if not run(v["expression"])]


_SIDECARS = {
    "mandate-init": {"command": ["sh", "-c", "..."]},
    "mandate": {"command": ["mandate"], "restartPolicy": "Always"},
    "mandate-envoy": {"command": ["envoy"], "restartPolicy": "Always"},
}


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
        pod["spec"]["initContainers"] = [
            {"name": n, "image": "x", **_SIDECARS.get(n, {})} for n in init
        ]
    return pod


def _look_alikes(annotations: dict[str, str]) -> dict[str, Any]:
    """Review 19: busybox init containers that carry the sidecar's names."""
    pod = _pod(annotations, ["mandate", "mandate-envoy"])
    for c in pod["spec"]["initContainers"]:
        c.update(image="busybox:1.37", command=["sleep", "infinity"])
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
    ("claim-with-look-alikes", "CREATE", _look_alikes(CLAIM), None, False),
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
    """What the injection makes passes; a claim without the sidecar, on a pod the webhook
    did not see, the policy refuses (the webhook injects such a pod: the claim is then true)."""
    policy = _policy(base)
    for mode in ("iptables", "proxy"):
        injected = inject(_agent(), InjectConfig(mode=mode))
        assert is_injected(injected)
        assert _admits(policy, "CREATE", injected)
        look = _look_alikes(CLAIM)
        look["metadata"]["labels"] = {"mandate.dev/inject": "true"}
        look["spec"]["securityContext"] = {"runAsNonRoot": True}
        assert not _admits(policy, "CREATE", look)  # as a pod the webhook does not see
        assert _admits(policy, "CREATE", inject(look, InjectConfig(mode=mode)))  # as it sees it
    claimed = _pod(CLAIM)
    assert not is_injected(claimed)
    assert not _admits(policy, "CREATE", claimed)


def _injected(mode: str = "iptables", **spec: Any) -> dict[str, Any]:
    pod = _agent()
    pod["metadata"].update(name="agent-1", namespace="agents")
    pod["spec"].update(spec)
    return inject(pod, InjectConfig(mode=mode, credential_secrets=("ledger-api-key",)))


def _changed(pod: dict[str, Any], change: Any) -> dict[str, Any]:
    new = copy.deepcopy(pod)
    change(new)
    return new


def _sidecar(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == name)  # type: ignore[no-any-return]


UPDATES = {
    "image": lambda p: _sidecar(p, "mandate").update(image="evil:1"),
    "envoy-image": lambda p: _sidecar(p, "mandate-envoy").update(image="evil:1"),
    "init-image": lambda p: _sidecar(p, "mandate-init").update(image="evil:1"),
    "command": lambda p: _sidecar(p, "mandate").update(command=["sh"]),
    "args": lambda p: _sidecar(p, "mandate-envoy").update(args=["-c", "/tmp/open.yaml"]),
    "env": lambda p: _sidecar(p, "mandate")["env"].append({"name": "X", "value": "1"}),
    "mounts": lambda p: _sidecar(p, "mandate")["volumeMounts"].pop(),
    "removed": lambda p: p["spec"]["initContainers"].pop(1),
}


@pytest.mark.parametrize("change", list(UPDATES))
def test_an_update_cannot_change_mandates_containers(
    base: list[dict[str, Any]], change: str
) -> None:
    """Review 19 (4): an image is mutable on a running pod, and neither the webhook (CREATE)
    nor the claim policy (a new claim only) looked: `kubectl patch pod` put any image in
    mandate's place, which then held the credentials and the token."""
    policy = _policy(base, INTEGRITY_POLICY)
    old = _injected()
    denied = _denials(policy, "UPDATE", _changed(old, UPDATES[change]), old)
    assert len(denied) == 1 and "cannot be changed on a running pod" in denied[0]


def test_an_update_that_leaves_the_sidecar_alone_passes(base: list[dict[str, Any]]) -> None:
    policy = _policy(base, INTEGRITY_POLICY)
    for mode in ("iptables", "proxy"):
        old = _injected(mode)
        agent_image = _changed(old, lambda p: p["spec"]["containers"][0].update(image="agent:2"))
        labels = _changed(old, lambda p: p["metadata"]["labels"].update(team="x"))
        for new in (old, agent_image, labels):
            assert _admits(policy, "UPDATE", new, old)
    # Pods without the sidecar are none of its business.
    plain = _pod(init=["setup"])
    assert _admits(policy, "UPDATE", _changed(plain, lambda p: p["spec"]["initContainers"][0]
                                              .update(image="y")), plain)  # fmt: skip


def _debug(**container: Any) -> Any:
    def add(pod: dict[str, Any]) -> None:
        pod["spec"].setdefault("ephemeralContainers", []).append(
            {
                "name": f"debugger-{len(pod['spec'].get('ephemeralContainers', []))}",
                "image": "busybox:1.37",
                **container,
            }
        )

    return add


NON_ROOT = {"runAsNonRoot": True, "runAsUser": 10001}
# What `kubectl debug --profile=restricted` sets: a debug container that gains no privileges.
NO_ESCALATION = {"allowPrivilegeEscalation": False}
DEBUG = {**NON_ROOT, **NO_ESCALATION}
EPHEMERAL = [
    # (name, mode, the debug container, refused because)
    ("kubectl-debug", "iptables", _debug(securityContext=DEBUG), ""),
    ("targets-agent", "iptables", _debug(targetContainerName="agent", securityContext=DEBUG), ""),
    ("own-mount", "iptables", _debug(securityContext=DEBUG,
                                     volumeMounts=[{"name": "work", "mountPath": "/w"}]), ""),
    ("root-in-proxy-mode", "proxy", _debug(), ""),
    ("targets-mandate", "iptables", _debug(targetContainerName="mandate", securityContext=DEBUG),
     "may not target mandate's containers"),
    ("targets-envoy", "proxy", _debug(targetContainerName="mandate-envoy"),
     "may not target mandate's containers"),
    ("mounts-token", "iptables", _debug(securityContext=DEBUG, volumeMounts=[
        {"name": "mandate-kube-api-access", "mountPath": "/t"}]), "may not mount mandate's volumes"),
    ("mounts-credentials", "proxy", _debug(volumeMounts=[
        {"name": "mandate-credential-0", "mountPath": "/c"}]), "may not mount mandate's volumes"),
    ("mounts-run", "proxy", _debug(volumeMounts=[{"name": "mandate-run", "mountPath": "/r"}]),
     "may not mount mandate's volumes"),
    ("net-admin", "proxy", _debug(securityContext={"capabilities": {"add": ["NET_ADMIN"]}}),
     "beyond Pod Security's baseline"),
    ("privileged", "proxy", _debug(securityContext={"privileged": True}),
     "may not be privileged"),
    ("envoy-uid", "iptables", _debug(securityContext={"runAsUser": 1337, **NO_ESCALATION}),
     "the UIDs of mandate's"),
    ("pods-non-root", "iptables", _debug(securityContext=NO_ESCALATION), ""),
    ("root-explicit", "iptables", _debug(securityContext={"runAsNonRoot": False, "runAsUser": 0,
                                                          **NO_ESCALATION}),
     "may not run as root"),
    # A setuid-root program in a debug image would make it root (review: the webhook sets
    # the pod's own containers so; a debug container must ask for it itself).
    ("may-escalate", "iptables", _debug(securityContext=NON_ROOT),
     "allowPrivilegeEscalation: false"),
    ("escalates", "iptables", _debug(securityContext={**NON_ROOT, "allowPrivilegeEscalation": True}),
     "allowPrivilegeEscalation: false"),
    ("escalates-in-proxy-mode", "proxy", _debug(securityContext=NON_ROOT), ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "change", "why"), [e[1:] for e in EPHEMERAL], ids=[e[0] for e in EPHEMERAL]
)
def test_what_an_ephemeral_container_may_do_in_a_pod_with_the_sidecar(
    base: list[dict[str, Any]], mode: str, change: Any, why: str
) -> None:
    """Review 19 (4): kubectl debug (pods/ephemeralcontainers) could add a container that
    mounts mandate-kube-api-access or mandate-credential-0 by name, or shares the mandate
    container's processes; neither the webhook nor the policy looked at the subresource."""
    policy = _policy(base, INTEGRITY_POLICY)
    old = _injected(mode, volumes=[{"name": "work", "emptyDir": {}}])
    new = _changed(old, change)
    denied = _denials(policy, "UPDATE", new, old, sub="ephemeralcontainers")
    if not why:
        assert denied == []
    else:
        assert len(denied) == 1 and why in denied[0], denied
    # Only what the request adds is checked: one there before (e.g. from before the policy)
    # does not block the next.
    after = _changed(new, _debug(securityContext=DEBUG))
    assert _admits(policy, "UPDATE", after, new, sub="ephemeralcontainers")


def test_an_ephemeral_container_that_may_run_as_root_is_refused_where_the_capture_is(
    base: list[dict[str, Any]],
) -> None:
    """Root can switch to Envoy's UID: in a pod whose agent is non-root by its container's
    securityContext only, a debug container without one runs as the image's user."""
    policy = _policy(base, INTEGRITY_POLICY)
    for mode in ("iptables", "proxy"):
        old = _injected(mode, securityContext={}, containers=[
            {"name": "agent", "image": "agent:1", "securityContext": NON_ROOT}])  # fmt: skip
        root = _debug(securityContext=NO_ESCALATION)
        denied = _denials(policy, "UPDATE", _changed(old, root), old, "ephemeralcontainers")
        if mode == "iptables":
            assert len(denied) == 1 and "may not run as root" in denied[0], denied
        else:  # no capture to get around
            assert denied == []
        fine = _changed(old, _debug(securityContext={"runAsUser": 10002, **NO_ESCALATION}))
        assert _admits(policy, "UPDATE", fine, old, "ephemeralcontainers")


def test_the_policies_are_bound_everywhere_but_kube_system(base: list[dict[str, Any]]) -> None:
    claim = _policy(base)["spec"]
    assert claim["failurePolicy"] == "Fail"
    (rule,) = claim["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pods"] and set(rule["operations"]) == {"CREATE", "UPDATE"}
    (validation,) = claim["validations"]
    assert "mandate.dev/injected" in validation["message"]
    assert 'mandate.dev/inject: "true"' in validation["message"]
    integrity = _policy(base, INTEGRITY_POLICY)["spec"]
    assert integrity["failurePolicy"] == "Fail"
    (rule,) = integrity["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pods", "pods/ephemeralcontainers"]
    assert rule["operations"] == ["UPDATE"]
    for name in (CLAIM_POLICY, INTEGRITY_POLICY):
        binding = _find(base, "ValidatingAdmissionPolicyBinding", name)
        assert binding["spec"]["policyName"] == name
        assert binding["spec"]["validationActions"] == ["Deny"]
        selector = binding["spec"]["matchResources"]["namespaceSelector"]
        assert selector == {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": ["kube-system"],
                }
            ]
        }


def test_the_policy_knows_mandates_volumes() -> None:
    """The integrity policy's list of mandate's volumes is the injection's."""
    from sidecar.injection.pod import _CREDENTIAL_VOLUME, _VOLUMES

    text = (DEPLOY / "base" / "injected-claim-policy.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    policy = _policy(docs, INTEGRITY_POLICY)
    (volumes,) = [v for v in policy["spec"]["variables"] if v["name"] == "mandateVolumes"]
    assert sorted(celpy.json_to_cel(yaml.safe_load(volumes["expression"]))) == sorted(_VOLUMES)
    assert f"'{_CREDENTIAL_VOLUME}'" in json.dumps(policy["spec"]["validations"])


# -- which pods the webhook sees ------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) on a set of labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _admission(
    docs: list[dict[str, Any]], namespace: dict[str, str], pod: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """What the webhook answers, for each webhook of the rendered configuration that the API
    server would call for this pod CREATE in a namespace with these labels."""
    (mwc,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    config = _injector_config(docs, {IMAGE_ENV: "x"})
    answers = []
    for hook in mwc["webhooks"]:
        if not (_selects(hook["namespaceSelector"], namespace)
                and _selects(hook["objectSelector"], pod["metadata"].get("labels") or {})):  # fmt: skip
            continue
        assert {"CREATE"} <= set(hook["rules"][0]["operations"])
        path = hook["clientConfig"]["service"]["path"]
        assert path in ("/mutate", "/mutate-namespace")
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "request": {"uid": "u", "operation": "CREATE", "object": pod,
                                       "namespace": namespace["kubernetes.io/metadata.name"],
                                       "kind": {"group": "", "version": "v1", "kind": "Pod"}}})  # fmt: skip
        status, doc = review(body.encode(), config, namespace_selected=path == "/mutate-namespace")
        assert status == 200
        answers.append((hook["name"], doc["response"]))
    return answers


INJECTED_NS = {"kubernetes.io/metadata.name": "agents", "mandate.dev/inject": "true"}
PLAIN_NS = {"kubernetes.io/metadata.name": "finance"}


def test_an_opt_out_in_an_injected_namespace_is_seen_and_refused(
    base: list[dict[str, Any]],
) -> None:
    """Review 19 (2b): the namespace webhook's objectSelector excluded pods labelled "false",
    so the webhook never saw them: the pod owner opted out of governance and audit."""
    out = _agent()
    out["metadata"]["labels"]["mandate.dev/inject"] = "false"
    ((hook, response),) = _admission(base, INJECTED_NS, out)
    assert hook == "namespaces.inject.mandate.dev"
    assert response["allowed"] is False
    assert "allowPodOptOut" in response["status"]["message"]
    # Where only labelled pods are injected, "false" is not sent to the webhook at all.
    assert _admission(base, PLAIN_NS, out) == []


@pytest.mark.parametrize(
    ("namespace", "label", "hook"),
    [
        (INJECTED_NS, None, "namespaces.inject.mandate.dev"),
        (INJECTED_NS, "true", "pods.inject.mandate.dev"),
        (INJECTED_NS, "yes", "namespaces.inject.mandate.dev"),
        (PLAIN_NS, "true", "pods.inject.mandate.dev"),
    ],
)
def test_each_selected_pod_goes_to_one_webhook_and_gets_the_sidecar(
    base: list[dict[str, Any]], namespace: dict[str, str], label: str | None, hook: str
) -> None:
    pod = _agent()
    if label is None:
        del pod["metadata"]["labels"]["mandate.dev/inject"]
    else:
        pod["metadata"]["labels"]["mandate.dev/inject"] = label
    ((called, response),) = _admission(base, namespace, pod)
    assert called == hook and response["allowed"] is True
    assert "mandate.dev/injected" in base64.b64decode(response["patch"]).decode()


def test_unlabelled_pods_elsewhere_and_system_namespaces_are_not_sent(
    base: list[dict[str, Any]],
) -> None:
    pod = _agent()
    del pod["metadata"]["labels"]["mandate.dev/inject"]
    assert _admission(base, PLAIN_NS, pod) == []
    for system in ("kube-system", "mandate-system"):
        ns = {"kubernetes.io/metadata.name": system, "mandate.dev/inject": "true"}
        assert _admission(base, ns, _agent()) == []


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
    assert [d["apiVersion"] for d in old] == ["admissionregistration.k8s.io/v1beta1"] * 4
    assert [d["apiVersion"] for d in new] == ["admissionregistration.k8s.io/v1"] * 4
    # The same policies, word for word, in the other version.
    strip = [{k: v for k, v in d.items() if k != "apiVersion"} for d in old]
    assert json.dumps(strip, sort_keys=True) == json.dumps(
        [{k: v for k, v in d.items() if k != "apiVersion"} for d in new], sort_keys=True
    )
    for version, objects in (("1.29.0", old), ("1.37.0", new)):
        output = _kubernetes_validate(objects, version, tmp_path)
        assert output.count("passed") == 4, output
