"""Issue 17, "the agent container holds nothing": the injected pod spec, from the webhook (an
AdmissionReview as the API server sends it, i.e. after its ServiceAccount admission mounted
the token into every container) and from `mandate inject`, inspected container by container.

Every container but mandate's holds no service-account token (no projected
serviceAccountToken volume mounted, nothing under /var/run/secrets/kubernetes.io), no
credential Secret (no volume, no env, no envFrom), and the pod says
``automountServiceAccountToken: false``; Envoy's container holds no token and no Secret at
all. mandate's container gets a short-lived, audience-bound token at the standard path and
the credential Secrets. Bad names, and pods whose own containers reference those Secrets,
are refused with a message naming the field.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate.utils as kv
import pytest
import yaml

from sidecar.errors import ConfigError, InjectError
from sidecar.injection.cli import add_inject_parser, run_inject
from sidecar.injection.pod import (
    ANNOTATION_CREDENTIAL_SECRETS,
    ANNOTATION_SERVICE_ACCOUNT_TOKEN,
    ANNOTATION_TXN_KEYS_SECRET,
    CREDENTIALS_DIR,
    SA_DIR,
    TXN_KEYS_DIR,
    InjectConfig,
    credential_secrets_of,
    inject,
    patch_for,
    warnings_for,
)
from sidecar.injection.webhook import review

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "agent.yaml"
K8S = "1.37.0"
CONFIG = InjectConfig.from_mapping(yaml.safe_load((ROOT / "deploy/base/injector.yaml").read_text()))
MANDATE, ENVOY = "mandate", "mandate-envoy"
SECRETS = ("ledger-api-key", "stripe-key")


# -- the pods ---------------------------------------------------------------------------------------


def example_template() -> dict[str, Any]:
    """The example agent's pod template (deploy/examples/agent.yaml), as a Pod."""
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        if doc and doc.get("kind") == "Deployment":
            template = copy.deepcopy(doc["spec"]["template"])
            template["metadata"]["name"] = "billing-agent-7d9f-x1"
            template["metadata"]["namespace"] = "agents"
            return {"apiVersion": "v1", "kind": "Pod", **template}
    raise AssertionError("no Deployment in the example")


def agent_pod(**spec: Any) -> dict[str, Any]:
    """An agent pod that uses the Kubernetes defaults (no automount setting), two containers
    and an init container of its own, and two credential Secrets by annotation."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "agent-1",
            "namespace": "agents",
            "labels": {"mandate.dev/inject": "true"},
            "annotations": {ANNOTATION_CREDENTIAL_SECRETS: ",".join(SECRETS)},
        },
        "spec": {
            "serviceAccountName": "billing-agent",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "initContainers": [{"name": "setup", "image": "busybox:1.37", "args": ["true"]}],
            "containers": [
                {"name": "agent", "image": "agent:1", "env": [{"name": "MODE", "value": "x"}]},
                {"name": "tool", "image": "tool:1"},
            ],
            **spec,
        },
    }
    return pod


def as_admitted(pod: dict[str, Any], suffix: str = "x7k2p") -> dict[str, Any]:
    """The pod as the API server hands it to admission webhooks: its ServiceAccount admission
    (which runs first) mounted the token into every container unless automount is off."""
    out = copy.deepcopy(pod)
    spec = out["spec"]
    if spec.get("automountServiceAccountToken") is False:
        return out
    name = f"kube-api-access-{suffix}"
    spec.setdefault("volumes", []).append(
        {
            "name": name,
            "projected": {
                "defaultMode": 420,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                    {
                        "downwardAPI": {
                            "items": [
                                {
                                    "path": "namespace",
                                    "fieldRef": {
                                        "apiVersion": "v1",
                                        "fieldPath": "metadata.namespace",
                                    },
                                }
                            ]
                        }
                    },
                ],
            },
        }
    )
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            c.setdefault("volumeMounts", []).append(
                {"name": name, "mountPath": SA_DIR, "readOnly": True}
            )
    return out


def through_webhook(pod: dict[str, Any], config: InjectConfig = CONFIG) -> dict[str, Any]:
    """The admitted pod, reviewed by the webhook, its patch applied."""
    body = json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "agents",
                "operation": "CREATE",
                "object": as_admitted(pod),
            },
        }
    ).encode()
    status, doc = review(body, config)
    assert status == 200 and doc["response"]["allowed"] is True, doc
    ops = json.loads(base64.b64decode(doc["response"]["patch"]))
    assert all(op["op"] in ("add", "replace") for op in ops)
    patched: dict[str, Any] = jsonpatch.apply_patch(as_admitted(pod), ops)
    patched["_warnings"] = doc["response"].get("warnings", [])
    return patched


def through_cli(
    pod: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    config_file: Path = ROOT / "deploy" / "base" / "injector.yaml",
) -> dict[str, Any]:
    """The pod template of a Deployment, injected offline by `mandate inject`."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "agent", "namespace": "agents"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {
                    **copy.deepcopy(pod["metadata"]),
                    "labels": {**pod["metadata"]["labels"], "app": "agent"},
                },
                "spec": copy.deepcopy(pod["spec"]),
            },
        },
    }
    for key in ("name", "namespace"):
        deployment["spec"]["template"]["metadata"].pop(key, None)
    manifest = tmp_path / "agent.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    parser = argparse.ArgumentParser()
    add_inject_parser(parser.add_subparsers(dest="command"))
    config = str(config_file)
    code = run_inject(parser.parse_args(["inject", "-f", str(manifest), "--config", config]))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "service-account token: mandate-only" in out.err
    (doc,) = [d for d in yaml.safe_load_all(out.out) if d]
    template = doc["spec"]["template"]
    injected = {"apiVersion": "v1", "kind": "Pod", **template}
    injected["metadata"]["name"] = "agent-1"
    injected["_warnings"] = [
        line.split("warning: ", 1)[1] for line in out.err.splitlines() if "warning: " in line
    ]
    # What the API server then does with it: automount is off, so no token is added.
    return as_admitted(injected)


# -- what a container holds -------------------------------------------------------------------------


def _volumes(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["spec"].get("volumes") or []}


def _secrets_of(volume: dict[str, Any]) -> set[str]:
    out = set()
    if "secret" in volume:
        out.add(volume["secret"]["secretName"])
    for source in (volume.get("projected") or {}).get("sources") or []:
        if "secret" in source:
            out.add(source["secret"]["name"])
    return out


def holdings(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, set[str]]:
    """What a container can read: service-account tokens (by volume or path) and Secrets (by
    volume, env or envFrom)."""
    volumes = _volumes(pod)
    tokens, secrets = set(), set()
    for m in container.get("volumeMounts") or []:
        volume = volumes[m["name"]]
        sources = (volume.get("projected") or {}).get("sources") or []
        if any("serviceAccountToken" in s for s in sources):
            tokens.add(f"volume {m['name']}")
        if (
            m["mountPath"]
            .rstrip("/")
            .startswith(("/var/run/secrets/kubernetes.io", "/run/secrets/kubernetes.io"))
        ):
            tokens.add(f"path {m['mountPath']}")
        secrets |= _secrets_of(volume)
    for e in container.get("env") or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            secrets.add(ref["name"])
    for e in container.get("envFrom") or []:
        if e.get("secretRef"):
            secrets.add(e["secretRef"]["name"])
    return {"tokens": tokens, "secrets": secrets}


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for key in ("initContainers", "containers") for c in spec.get(key) or []}


def assert_agent_holds_nothing(pod: dict[str, Any], protected: set[str]) -> None:
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN].startswith(
        "mandate-only"
    )
    every = containers(pod)
    others = {n: c for n, c in every.items() if n != MANDATE}
    assert ENVOY in others and len(others) >= 2  # Envoy and at least one of the pod's own
    for name, c in others.items():
        held = holdings(pod, c)
        assert not held["tokens"], f"{name} holds a token: {held['tokens']}"
        assert not held["secrets"] & protected, f"{name} holds {held['secrets'] & protected}"
    envoy = holdings(pod, every[ENVOY])
    assert envoy == {"tokens": set(), "secrets": set()}, "Envoy holds nothing either"
    # Nothing left of the API server's token volume, which no one mounts any more.
    assert not [v for v in _volumes(pod) if v.startswith("kube-api-access-")]
    # ... and mandate alone holds the token and the credentials.
    mine = holdings(pod, every[MANDATE])
    assert mine["tokens"] == {"volume mandate-kube-api-access", f"path {SA_DIR}"}
    assert protected <= mine["secrets"]


def mandate_mounts(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in containers(pod)[MANDATE]["volumeMounts"]}


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
@pytest.mark.parametrize("via", ["webhook", "mandate inject"])
def test_the_agents_containers_hold_no_token_and_no_secret(
    via: str, mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = agent_pod()
    pod["metadata"]["annotations"][ANNOTATION_TXN_KEYS_SECRET] = "mandate-txn-keys"
    # The operator's mode (a pod may not pick a less strict one: allowPodModeOverride).
    data = {**yaml.safe_load((ROOT / "deploy/base/injector.yaml").read_text()), "mode": mode}
    config_file = tmp_path / "injector.yaml"
    config_file.write_text(yaml.safe_dump(data))
    config = InjectConfig.from_mapping(data)
    out = (
        through_webhook(pod, config)
        if via == "webhook"
        else through_cli(pod, tmp_path, capsys, config_file)
    )
    warnings = out.pop("_warnings")
    kv.validate(out, K8S, strict=True)
    protected = {*SECRETS, "mandate-txn-keys", "mandate-admin-token"}
    assert_agent_holds_nothing(out, protected)
    note = out["metadata"]["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN]
    if via == "webhook":  # the API server had mounted its token into the three containers
        assert note == (
            "mandate-only (automountServiceAccountToken was unset, set to false; removed the "
            "API server's token (kube-api-access-x7k2p) from agent, setup, tool)"
        )
    else:  # offline: the template said nothing, so the API server never mounts one
        assert note == "mandate-only (automountServiceAccountToken was unset, set to false)"
    assert warnings == []  # the pod did not ask for the token: nothing to warn about
    # mandate's token: at the standard path, with the CA and the namespace (in-cluster
    # configuration works unchanged), short-lived, bound to the API server's audience.
    mounts = mandate_mounts(out)
    assert mounts[SA_DIR] == {
        "name": "mandate-kube-api-access",
        "mountPath": SA_DIR,
        "readOnly": True,
    }
    sources = _volumes(out)["mandate-kube-api-access"]["projected"]["sources"]
    (token,) = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
    assert token == {"path": "token", "expirationSeconds": 3600}  # no audience: the API server's
    assert 600 <= token["expirationSeconds"] != 3607
    assert {"key": "ca.crt", "path": "ca.crt"} in next(
        s["configMap"]["items"] for s in sources if "configMap" in s
    )
    assert next(s for s in sources if "downwardAPI" in s)["downwardAPI"]["items"][0]["path"] == (
        "namespace"
    )
    # The credentials, read-only, one directory per Secret; the keys with their env.
    for i, name in enumerate(SECRETS):
        assert mounts[f"{CREDENTIALS_DIR}/{name}"] == {
            "name": f"mandate-credential-{i}",
            "mountPath": f"{CREDENTIALS_DIR}/{name}",
            "readOnly": True,
        }
        assert _volumes(out)[f"mandate-credential-{i}"]["secret"] == {
            "secretName": name,
            "defaultMode": 0o444,
        }
    assert mounts[TXN_KEYS_DIR]["readOnly"] is True
    env = {e["name"]: e.get("value") for e in containers(out)[MANDATE]["env"]}
    assert env["MANDATE_TXN_TOKEN_KEYS"] == TXN_KEYS_DIR


@pytest.mark.parametrize("via", ["webhook", "mandate inject"])
def test_the_example_agent_holds_nothing(
    via: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = example_template()
    annotated = pod["metadata"]["annotations"].get(ANNOTATION_CREDENTIAL_SECRETS)
    assert annotated, "the example agent uses a credential Secret through the annotation"
    out = through_webhook(pod) if via == "webhook" else through_cli(pod, tmp_path, capsys)
    out.pop("_warnings")
    kv.validate(out, K8S, strict=True)
    names = set(credential_secrets_of(pod, CONFIG))
    assert names and names == {n.strip() for n in annotated.split(",")}
    assert_agent_holds_nothing(out, names | {"mandate-admin-token"})
    # The example profile reads its credential from where the Secret is mounted.
    profiles = yaml.safe_load_all((ROOT / "deploy/agents/profiles/agents.yaml").read_text())
    agent = pod["metadata"]["annotations"]["mandate.dev/agent"]
    profile = next(p for p in profiles if p and p["metadata"]["name"] == agent)
    files = [c["secret"]["file"] for c in profile["spec"]["credentials"].values() if "secret" in c]
    assert files
    for f in files:
        secret = f.removeprefix(f"{CREDENTIALS_DIR}/").split("/")[0]
        assert f.startswith(f"{CREDENTIALS_DIR}/") and secret in names, f


@pytest.mark.parametrize("via", ["webhook", "mandate inject"])
def test_a_pod_that_asked_for_the_token_is_overridden_and_told(
    via: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pod = agent_pod(automountServiceAccountToken=True)
    out = through_webhook(pod) if via == "webhook" else through_cli(pod, tmp_path, capsys)
    warnings = out.pop("_warnings")
    assert_agent_holds_nothing(out, set(SECRETS))
    note = out["metadata"]["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN]
    assert "automountServiceAccountToken was true, set to false" in note
    assert any("mounted into the mandate container only" in w for w in warnings), warnings


def test_a_pod_that_turned_automount_off_keeps_it_off() -> None:
    out = through_webhook(agent_pod(automountServiceAccountToken=False))
    out.pop("_warnings")
    assert out["metadata"]["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN] == "mandate-only"
    assert_agent_holds_nothing(out, set(SECRETS))


def test_a_container_that_mounts_a_token_itself_keeps_it_with_a_warning() -> None:
    """Not added by mandate, not taken away: the pod asked for it explicitly. The webhook
    warns that it is the sidecar's identity too."""
    pod = agent_pod(
        automountServiceAccountToken=False,
        volumes=[
            {
                "name": "api-token",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}}
                    ]
                },
            }
        ],
    )
    pod["spec"]["containers"][1]["volumeMounts"] = [
        {"name": "api-token", "mountPath": "/var/run/tool", "readOnly": True}
    ]
    out = through_webhook(pod)
    warnings = out.pop("_warnings")
    assert holdings(out, containers(out)["tool"])["tokens"] == {"volume api-token"}
    assert holdings(out, containers(out)["agent"])["tokens"] == set()
    assert holdings(out, containers(out)[ENVOY]) == {"tokens": set(), "secrets": set()}
    assert any(
        "container tool mounts a service-account token (volume api-token)" in w for w in warnings
    )
    # A token for another audience (a cloud's workload identity) is no API credential.
    cloud = copy.deepcopy(pod)
    cloud["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"] = (
        "sts.example.com"
    )
    assert warnings_for(inject(cloud, CONFIG), CONFIG) == []


def test_the_token_audience_and_lifetime_come_from_the_config() -> None:
    config = InjectConfig.from_mapping(
        {
            "serviceAccountTokenAudience": "https://kubernetes.default.svc",
            "serviceAccountTokenSeconds": 900,
        }
    )
    out = inject(agent_pod(), config)
    sources = _volumes(out)["mandate-kube-api-access"]["projected"]["sources"]
    assert sources[0] == {
        "serviceAccountToken": {
            "path": "token",
            "expirationSeconds": 900,
            "audience": "https://kubernetes.default.svc",
        }
    }


def test_injector_config_secrets_and_the_annotation_add_up() -> None:
    config = InjectConfig.from_mapping(
        {"credentialSecrets": ["shared-llm-key", "stripe-key"], "txnTokenKeysSecret": "txn-keys"}
    )
    pod = agent_pod()
    assert credential_secrets_of(pod, config) == ("shared-llm-key", "stripe-key", "ledger-api-key")
    out = inject(pod, config)
    assert_agent_holds_nothing(
        as_admitted(out), {"shared-llm-key", "stripe-key", "ledger-api-key", "txn-keys"}
    )
    assert mandate_mounts(out)[TXN_KEYS_DIR]["name"] == "mandate-txn-keys"
    assert _volumes(out)["mandate-txn-keys"]["secret"]["secretName"] == "txn-keys"
    # The pod's annotation wins for the keys.
    pod["metadata"]["annotations"][ANNOTATION_TXN_KEYS_SECRET] = "other-keys"
    assert _volumes(inject(pod, config))["mandate-txn-keys"]["secret"]["secretName"] == "other-keys"
    # No Secret named anywhere: no credential volume, no keys env.
    bare = agent_pod()
    del bare["metadata"]["annotations"]
    out = inject(bare, CONFIG)
    assert not [
        v for v in _volumes(out) if v.startswith("mandate-credential-") or v == "mandate-txn-keys"
    ]
    assert "MANDATE_TXN_TOKEN_KEYS" not in {e["name"] for e in containers(out)[MANDATE]["env"]}


@pytest.mark.parametrize("pod_shape", ["plain", "admitted", "admitted-with-own-mounts"])
def test_the_patch_gives_the_injected_pod(pod_shape: str) -> None:
    pod = agent_pod()
    if pod_shape != "plain":
        pod = as_admitted(pod)
    if pod_shape == "admitted-with-own-mounts":
        pod["spec"]["volumes"].append({"name": "data", "emptyDir": {}})
        pod["spec"]["containers"][0]["volumeMounts"].insert(
            0, {"name": "data", "mountPath": "/data"}
        )
        pod["metadata"]["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN] = "set by someone"
    ops = patch_for(pod, CONFIG)
    assert all(op["op"] in ("add", "replace") for op in ops)
    injected = jsonpatch.apply_patch(pod, ops)
    assert injected == inject(pod, CONFIG)
    if pod_shape == "admitted-with-own-mounts":
        assert injected["spec"]["containers"][0]["volumeMounts"] == [
            {"name": "data", "mountPath": "/data"}
        ]
    assert patch_for(injected, CONFIG) == []


# -- refused --------------------------------------------------------------------------------------

BAD_ANNOTATIONS = [
    ("path", "../etc/passwd", "looks like a path"),
    ("slash", "stripe-key/api-key", "looks like a path"),
    ("upper-case", "Stripe-Key", "is not a Secret name (a DNS-1123 subdomain"),
    ("underscore", "stripe_key", "is not a Secret name"),
    ("too-long", "a" * 254, "at most 253 characters"),
    ("empty-entry", "stripe-key,,ledger", "entry 2 is empty"),
    ("trailing-comma", "stripe-key,", "entry 2 is empty"),
    ("twice", "stripe-key, stripe-key", "Secret 'stripe-key' is named twice"),
    ("admin-token", "mandate-admin-token", "is the admin token; mount it once"),
]


@pytest.mark.parametrize(
    ("value", "message"), [b[1:] for b in BAD_ANNOTATIONS], ids=[b[0] for b in BAD_ANNOTATIONS]
)
def test_bad_credential_secret_annotations_are_refused(value: str, message: str) -> None:
    pod = agent_pod()
    pod["metadata"]["annotations"][ANNOTATION_CREDENTIAL_SECRETS] = value
    with pytest.raises(InjectError) as err:
        inject(pod, CONFIG)
    assert str(err.value).startswith(
        f"pod agent-1: metadata.annotations[{ANNOTATION_CREDENTIAL_SECRETS}]: "
    )
    assert message in str(err.value)


def test_the_keys_secret_is_no_credential_secret_and_no_path() -> None:
    pod = agent_pod()
    pod["metadata"]["annotations"][ANNOTATION_TXN_KEYS_SECRET] = "stripe-key"
    with pytest.raises(InjectError, match="'stripe-key' is the txn-token keys Secret"):
        inject(pod, CONFIG)
    pod["metadata"]["annotations"][ANNOTATION_TXN_KEYS_SECRET] = "/etc/keys"
    with pytest.raises(
        InjectError, match=r"txn-token-keys-secret\]: '/etc/keys' looks like a path"
    ):
        inject(pod, CONFIG)


def _refs(kind: str, secret: str) -> dict[str, Any]:
    """Changes to agent_pod() through which the container `tool` would read ``secret``."""
    if kind == "env":
        tool = {
            "name": "tool",
            "env": [
                {"name": "A", "value": "1"},
                {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}},
            ],
        }
        return {"containers": [{"name": "agent"}, tool]}
    if kind == "envFrom":
        return {
            "containers": [
                {"name": "agent"},
                {"name": "tool", "envFrom": [{"secretRef": {"name": secret}}]},
            ]
        }
    if kind == "init-envFrom":
        return {"initContainers": [{"name": "setup", "envFrom": [{"secretRef": {"name": secret}}]}]}
    if kind == "volume":
        return {
            "containers": [
                {"name": "agent"},
                {"name": "tool", "volumeMounts": [{"name": "keys", "mountPath": "/keys"}]},
            ],
            "volumes": [{"name": "keys", "secret": {"secretName": secret}}],
        }
    assert kind == "projected"
    return {
        "containers": [{"name": "agent"}],
        "volumes": [
            {"name": "other", "emptyDir": {}},
            {"name": "keys", "projected": {"sources": [{"secret": {"name": secret}}]}},
        ],
    }


REFS = [
    (
        "env",
        "stripe-key",
        "spec.containers[1] (tool).env[1].valueFrom.secretKeyRef: Secret 'stripe-key' is a credential Secret",
    ),
    (
        "envFrom",
        "ledger-api-key",
        "spec.containers[1] (tool).envFrom[0].secretRef: Secret 'ledger-api-key' is a credential Secret",
    ),
    (
        "init-envFrom",
        "stripe-key",
        "spec.initContainers[0] (setup).envFrom[0].secretRef: Secret 'stripe-key'",
    ),
    (
        "volume",
        "stripe-key",
        "spec.volumes[0] (keys, mounted by tool): Secret 'stripe-key' is a credential Secret",
    ),
    (
        "projected",
        "ledger-api-key",
        "spec.volumes[1] (keys, mounted by no container yet): Secret 'ledger-api-key'",
    ),
    ("env", "mandate-txn-keys", "Secret 'mandate-txn-keys' is the txn-token keys Secret"),
    (
        "volume",
        "mandate-admin-token",
        "Secret 'mandate-admin-token' is mandate's admin token Secret",
    ),
]


@pytest.mark.parametrize(("kind", "secret", "message"), REFS, ids=[f"{r[0]}-{r[1]}" for r in REFS])
def test_a_pod_whose_own_containers_reference_a_protected_secret_is_refused(
    kind: str, secret: str, message: str
) -> None:
    pod = agent_pod(**_refs(kind, secret))
    pod["metadata"]["annotations"][ANNOTATION_TXN_KEYS_SECRET] = "mandate-txn-keys"
    with pytest.raises(InjectError) as err:
        patch_for(pod, CONFIG)
    assert str(err.value).startswith("pod agent-1: ")
    assert message in str(err.value)
    assert "the agent must not hold it" in str(err.value)
    # The webhook refuses the pod with the same message.
    body = json.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-2",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "object": pod,
            },
        }
    ).encode()
    status, doc = review(body, CONFIG)
    assert status == 200 and doc["response"]["allowed"] is False
    assert message in doc["response"]["status"]["message"]


def test_an_unrelated_secret_of_the_agent_is_its_own_business() -> None:
    pod = agent_pod(**_refs("env", "agent-own-config"))
    out = inject(pod, CONFIG)
    assert holdings(out, containers(out)["tool"])["secrets"] == {"agent-own-config"}


@pytest.mark.parametrize(
    "volume",
    [
        "mandate-credential-0",
        "mandate-txn-keys",
        "mandate-kube-api-access",
        "mandate-envoy-admin",
        "mandate-run",
        "mandate-admin-token",
    ],
)
@pytest.mark.parametrize("key", ["containers", "initContainers", "ephemeralContainers"])
def test_the_agent_cannot_mount_mandates_volumes_by_name(volume: str, key: str) -> None:
    """Review of issue 17: the injection adds these volumes, so a mount naming one made the
    pod valid and handed the agent the credentials, keys, token or sockets they hold."""
    pod = agent_pod()
    pod["metadata"]["annotations"][ANNOTATION_TXN_KEYS_SECRET] = "mandate-txn-keys"
    c = {
        "name": "sneaky",
        "image": "agent:1",
        "volumeMounts": [{"name": volume, "mountPath": "/x"}],
    }
    pod["spec"].setdefault(key, []).append(c)
    with pytest.raises(
        InjectError, match=rf"volumeMounts\[0\].name: '{volume}' is one of mandate's volumes"
    ):
        inject(pod, CONFIG)


def test_a_volume_name_of_mandates_credentials_is_reserved() -> None:
    pod = agent_pod(volumes=[{"name": "mandate-credential-0", "emptyDir": {}}])
    with pytest.raises(
        InjectError, match=r"spec.volumes\[0\].name: 'mandate-credential-0' is reserved"
    ):
        inject(pod, CONFIG)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"serviceAccountTokenSeconds": 3607}, "3607 is the one lifetime the API server extends"),
        ({"serviceAccountTokenSeconds": 599}, "expected 600 to 86400 seconds"),
        ({"serviceAccountTokenSeconds": "1h"}, "expected a number of seconds"),
        ({"serviceAccountTokenAudience": "a b"}, "expected an audience without spaces"),
        ({"credentialSecrets": "stripe-key"}, "credentialSecrets: expected a list"),
        ({"credentialSecrets": ["ok", "../x"]}, "credentialSecrets: '../x' looks like a path"),
        ({"credentialSecrets": ["a", "a"]}, "Secret 'a' is named twice"),
        ({"credentialSecrets": [7]}, "credentialSecrets[0]: expected a Secret name"),
        ({"txnTokenKeysSecret": "Keys"}, "txnTokenKeysSecret: 'Keys' is not a Secret name"),
        ({"adminTokenSecret": "a/b"}, "adminTokenSecret: 'a/b' looks like a path"),
    ],
)
def test_bad_injector_config_is_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        InjectConfig.from_mapping(data, source="injector.yaml")
    assert str(err.value).startswith("injector.yaml: ")
    assert message in str(err.value)


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_a_shared_process_namespace_is_refused(mode: str) -> None:
    """Review 19: it was a warning; the agent (as mandate's UID, which proxy mode does not
    refuse, or as root) read mandate's token and credentials through /proc/<pid>/root."""
    with pytest.raises(InjectError, match=r"spec.shareProcessNamespace: true: .*/proc"):
        inject(agent_pod(shareProcessNamespace=True), dataclasses.replace(CONFIG, mode=mode))
