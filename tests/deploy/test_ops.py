"""Issue 19, item 8 (operations, upgrades), the deploy side: the webhook's certificates renew
without a TLS gap (cert-manager's CA pattern, and deploy/webhook-cert.sh run for real with
openssl against a stand-in kubectl), the dev Jaeger is v2 with its config file, and the Pod
Security and NetworkPolicy components say and do what each injection mode needs.

Everything is rendered with the real `kubectl kustomize` and validated, strict, against
Kubernetes 1.29 and the newest schema kubernetes-validate has. cert-manager's kinds are not
in those schemas: they are checked against the part of cert-manager.io/v1 used here.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.injection.pod import InjectConfig, inject
from sidecar.injection.webhook import WebhookServer
from tests.deploy import kubectl_shim

from .kustomize import find as _find
from .kustomize import render as _render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "webhook-cert.sh"
SERVICE = "mandate-webhook.mandate-system.svc"
K8S_VERSIONS = ("1.29.0", "1.37.0")  # the oldest supported (native sidecars), the newest known
CERT_MANAGER_KINDS = {"Certificate", "Issuer"}


# -- rendering and validation ---------------------------------------------------------------------


def _bin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed in the virtual environment"
    return found


def _kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_bin("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )


def _kustomization(where: Path, **fields: Any) -> Path:
    """A kustomization in ``where`` over parts of deploy/ (paths relative to deploy/)."""
    where.mkdir(parents=True, exist_ok=True)
    up = os.path.relpath(DEPLOY, where)
    body = {
        key: [v if v.endswith(".yaml") else f"{up}/{v}" for v in value]
        if key in ("resources", "components")
        else value
        for key, value in fields.items()
    }
    (where / "kustomization.yaml").write_text(yaml.safe_dump(body))
    return where


# Served from 1.30 on; for 1.29 the overlays take components/kubernetes-1.29 (v1beta1),
# whose own tests validate it.
NOT_IN_1_29 = {("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy"),
               ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding")}  # fmt: skip


def _validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """Every built-in object passes kubernetes-validate --strict for each version; the
    cert-manager objects pass their schema below."""
    for version in K8S_VERSIONS:
        built_in = [
            d
            for d in docs
            if d["kind"] not in CERT_MANAGER_KINDS
            and not (version == "1.29.0" and (d["apiVersion"], d["kind"]) in NOT_IN_1_29)
        ]
        path = tmp_path / f"validate-{version}.yaml"
        path.write_text(yaml.safe_dump_all(built_in, sort_keys=False))
        out = subprocess.run(
            [_bin("kubernetes-validate"), "--strict", "-k", version, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, f"{version}: {out.stdout}{out.stderr}"
        passed = [line for line in out.stdout.splitlines() if line.startswith("INFO")]
        assert len(passed) == len(built_in), f"{version}: {out.stdout}"
    for doc in docs:
        if doc["kind"] in CERT_MANAGER_KINDS:
            jsonschema.validate(doc, CERT_MANAGER_SCHEMAS[doc["kind"]])


# The fields of cert-manager.io/v1 Certificate and Issuer that deploy/ uses, with the values
# cert-manager's API reference allows; anything else (a typo, a misplaced field) is refused.
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime",
    "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
]  # fmt: skip


def _object(spec: dict[str, Any], kind: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
            },
            "spec": spec,
        },
    }


CERT_MANAGER_SCHEMAS = {
    "Certificate": _object(
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretName", "issuerRef"],
            "properties": {
                "secretName": {"type": "string"},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "items": {"type": "string"}},
                "isCA": {"type": "boolean"},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "usages": {"type": "array", "items": {"enum": _USAGES}},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "issuerRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                        "group": {"const": "cert-manager.io"},
                    },
                },
            },
        },
        "Certificate",
    ),
    "Issuer": _object(
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "selfSigned": {"type": "object", "additionalProperties": False},
                "ca": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["secretName"],
                    "properties": {"secretName": {"type": "string"}},
                },
            },
        },
        "Issuer",
    ),
}


def _hours(duration: str) -> float:
    """A Go duration ("2160h", "1h30m") in hours."""
    units = {"h": 1.0, "m": 1 / 60, "s": 1 / 3600, "ms": 1 / 3_600_000}
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# -- webhook certificates from cert-manager ------------------------------------------------------


@pytest.fixture(scope="module")
def prod() -> list[dict[str, Any]]:
    return _render(DEPLOY / "overlays" / "prod")


def test_prod_validates_for_every_version(prod: list[dict[str, Any]], tmp_path: Path) -> None:
    assert {d["kind"] for d in prod} >= CERT_MANAGER_KINDS
    _validate(prod, tmp_path)


def test_cert_manager_issues_the_webhook_a_leaf_from_a_ca_of_its_own(
    prod: list[dict[str, Any]],
) -> None:
    """A self-signed Issuer signs only the CA; a CA Issuer signs the webhook's leaf with the
    CA's key; the leaf is short-lived and renews, the CA lives years and keeps its key."""
    certs = {d["metadata"]["name"]: d for d in prod if d["kind"] == "Certificate"}
    issuers = {d["metadata"]["name"]: d for d in prod if d["kind"] == "Issuer"}
    assert {d["metadata"]["namespace"] for d in [*certs.values(), *issuers.values()]} == {
        "mandate-system"
    }
    leaf = certs["mandate-webhook"]["spec"]
    ca_issuer = issuers[leaf["issuerRef"]["name"]]["spec"]
    assert set(ca_issuer) == {"ca"}
    (ca,) = [c for c in certs.values() if c["spec"]["secretName"] == ca_issuer["ca"]["secretName"]]
    ca_spec = ca["spec"]
    assert issuers[ca_spec["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    assert ca_spec["isCA"] is True and not leaf.get("isCA")
    # The CA: years, its key kept at renewal (the leaf in use verifies against the renewed
    # CA), renewed earlier than a leaf lives (no leaf outlives its CA).
    assert ca_spec["privateKey"]["rotationPolicy"] == "Never"
    assert _hours(ca_spec["duration"]) >= 5 * 365 * 24
    assert _hours(ca_spec["renewBefore"]) > _hours(leaf["duration"])
    # The leaf: the webhook's Service, server auth, a fresh key at each renewal, renewed well
    # before it expires.
    assert set(leaf["dnsNames"]) == {SERVICE, f"{SERVICE}.cluster.local"}
    assert "server auth" in leaf["usages"]
    assert leaf["privateKey"]["rotationPolicy"] == "Always"
    assert _hours(leaf["duration"]) <= 90 * 24
    assert 7 * 24 <= _hours(leaf["renewBefore"]) <= _hours(leaf["duration"]) / 2
    webhook = _find(prod, "Deployment", "mandate-webhook")["spec"]["template"]["spec"]
    tls = next(v for v in webhook["volumes"] if v["name"] == "tls")
    assert tls["secret"]["secretName"] == leaf["secretName"]


def test_the_ca_injector_fills_the_cabundle_from_the_ca_not_the_leaf(
    prod: list[dict[str, Any]],
) -> None:
    mwc = _find(prod, "MutatingWebhookConfiguration", "mandate-injector")
    ref = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    ca = next(d for d in prod if d["kind"] == "Certificate" and d["spec"].get("isCA"))
    assert ref == f"{ca['metadata']['namespace']}/{ca['metadata']['name']}"
    assert all("caBundle" not in w["clientConfig"] for w in mwc["webhooks"])


def test_the_annotation_reaches_every_webhook_configuration_and_keeps_others(
    tmp_path: Path,
) -> None:
    """The component's patch is a strategic merge on every webhook configuration labelled
    app.kubernetes.io/name: mandate-webhook: a ValidatingWebhookConfiguration added later is
    covered too, and annotations already there stay."""
    (tmp_path / "vwc.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration",
                "metadata": {
                    "name": "mandate-validator",
                    "labels": {"app.kubernetes.io/name": "mandate-webhook"},
                    "annotations": {"team": "platform"},
                },
                "webhooks": [],
            }
        )
    )
    docs = _render(
        _kustomization(
            tmp_path, resources=["base", "vwc.yaml"], components=["components/cert-manager"]
        )
    )
    vwc = _find(docs, "ValidatingWebhookConfiguration", "mandate-validator")
    assert vwc["metadata"]["annotations"] == {
        "team": "platform",
        "cert-manager.io/inject-ca-from": "mandate-system/mandate-webhook-ca",
    }
    mwc = _find(docs, "MutatingWebhookConfiguration", "mandate-injector")
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        "mandate-system/mandate-webhook-ca"
    )


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("Certificate", lambda s: s["privateKey"].__setitem__("rotationPolicy", "never")),
        ("Certificate", lambda s: s.__setitem__("duration", "90d")),
        ("Certificate", lambda s: s.__setitem__("isCa", True)),
        ("Certificate", lambda s: s.__setitem__("usages", ["serverAuth"])),
        ("Issuer", lambda s: s.__setitem__("ca", {"secret": "x"})),
    ],
    ids=["rotation-policy", "duration-days", "isCa-typo", "usage-name", "ca-secret-field"],
)
def test_the_cert_manager_schema_catches_mistakes(
    prod: list[dict[str, Any]], kind: str, change: Any
) -> None:
    doc = json.loads(json.dumps(next(d for d in prod if d["kind"] == kind)))
    change(doc["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, CERT_MANAGER_SCHEMAS[kind])


# -- the dev Jaeger: v2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dev() -> list[dict[str, Any]]:
    return _render(DEPLOY / "overlays" / "dev")


def test_dev_validates_for_every_version(dev: list[dict[str, Any]], tmp_path: Path) -> None:
    _validate(dev, tmp_path)


def _jaeger(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Jaeger's pod spec and its parsed config.yaml, from the ConfigMap the pod mounts."""
    pod = _find(docs, "Deployment", "jaeger")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (arg,) = [a for a in container["args"] if a.startswith("--config=")]
    path = Path(arg.removeprefix("--config="))
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm = _find(docs, "ConfigMap", volume["configMap"]["name"])
    return pod, yaml.safe_load(cm["data"][path.name])


def _port(endpoint: str) -> int:
    host, _, port = endpoint.rpartition(":")
    assert host == "0.0.0.0", f"{endpoint}: a Service reaches only what listens on the pod IP"
    return int(port)


def test_jaeger_is_v2_configured_by_its_file(dev: list[dict[str, Any]]) -> None:
    pod, config = _jaeger(dev)
    (container,) = pod["containers"]
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", container["image"])
    assert "env" not in container  # v2 reads no COLLECTOR_*/SPAN_STORAGE_* variables
    # The pipeline: OTLP in, Jaeger's storage exporter out; every component it names is
    # configured, and every configured one is used (the Collector refuses otherwise).
    service = config["service"]
    (pipeline,) = service["pipelines"].values()
    for section in ("receivers", "processors", "exporters"):
        assert set(pipeline[section]) == set(config[section]), section
    assert set(service["extensions"]) == set(config["extensions"])
    assert pipeline["receivers"] == ["otlp"]
    extensions = config["extensions"]
    backends = extensions["jaeger_storage"]["backends"]
    (store,) = backends
    assert set(backends[store]) == {"memory"} and backends[store]["memory"]["max_traces"] > 0
    assert config["exporters"]["jaeger_storage_exporter"]["trace_storage"] == store
    assert extensions["jaeger_query"]["storage"]["traces"] == store
    # The ports the container declares are the ones the config listens on.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    protocols = config["receivers"]["otlp"]["protocols"]
    assert _port(protocols["grpc"]["endpoint"]) == ports["otlp-grpc"] == 4317
    assert _port(protocols["http"]["endpoint"]) == ports["otlp-http"] == 4318
    assert _port(extensions["jaeger_query"]["http"]["endpoint"]) == ports["query"] == 16686
    health = extensions["healthcheckv2"]
    assert health["use_v2"] is True
    assert _port(health["http"]["endpoint"]) == ports["health"]
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get == {"path": health["http"]["status"]["path"], "port": "health"}


def test_the_services_reach_jaeger_where_the_sidecars_send_spans(
    dev: list[dict[str, Any]],
) -> None:
    pod, _ = _jaeger(dev)
    names = {p["name"] for p in pod["containers"][0]["ports"]}
    collector = _find(dev, "Service", "jaeger-collector")
    assert collector["metadata"]["namespace"] == "mandate-system"
    ports = {p["name"]: p for p in collector["spec"]["ports"]}
    assert ports["otlp-grpc"]["port"] == 4317 and ports["otlp-grpc"]["targetPort"] in names
    query = _find(dev, "Service", "jaeger-query")
    assert [(p["port"], p["targetPort"]) for p in query["spec"]["ports"]] == [(16686, "query")]
    selector = collector["spec"]["selector"]
    labels = _find(dev, "Deployment", "jaeger")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    # The injector sends mandate's spans there; Envoy's config names the same address.
    cm = next(d for d in dev if d["metadata"]["name"].startswith("mandate-injector-"))
    injector = yaml.safe_load(cm["data"]["config.yaml"])
    assert injector["otlpEndpoint"] == (
        "http://jaeger-collector.mandate-system.svc.cluster.local:4317"
    )


# -- Pod Security -----------------------------------------------------------------------------------

# The Pod Security Standards' controls (kubernetes.io/docs/concepts/security/pod-security-standards)
# that a pod spec can break: baseline's, then restricted's on top.
_BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def pod_security_violations(spec: Mapping[str, Any], level: str) -> list[str]:
    """What the Pod Security Standards forbid at ``level`` in a pod spec, one line each."""
    out: list[str] = []
    if level == "privileged":
        return out
    containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    pod = spec.get("securityContext") or {}
    volumes = spec.get("volumes") or []
    out += [f"pod: {k}" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    out += [f"volume {v['name']}: hostPath" for v in volumes if "hostPath" in v]
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        added = set((sc.get("capabilities") or {}).get("add") or [])
        out += [f"{name}: privileged"] if sc.get("privileged") else []
        if added - _BASELINE_CAPABILITIES:
            out.append(f"{name}: adds {sorted(added - _BASELINE_CAPABILITIES)}")
        out += [f"{name}: hostPort" for p in c.get("ports") or [] if p.get("hostPort")]
        seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        out += [f"{name}: seccomp Unconfined"] if seccomp == "Unconfined" else []
        out += [f"{name}: procMount"] if sc.get("procMount", "Default") != "Default" else []
    if level == "baseline":
        return out
    assert level == "restricted", level
    for v in volumes:
        kinds = set(v) - {"name"}
        out += [f"volume {v['name']}: {sorted(kinds)}"] if not kinds <= _RESTRICTED_VOLUMES else []
    out += ["pod: runAsUser 0"] if pod.get("runAsUser") == 0 else []
    for c in containers:
        sc = c.get("securityContext") or {}
        name = c["name"]
        caps = sc.get("capabilities") or {}
        seccomp = (sc.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        checks = {
            "allowPrivilegeEscalation is not false": sc.get("allowPrivilegeEscalation")
            is not False,
            "runAsNonRoot is not true": sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True,
            "runAsUser 0": sc.get("runAsUser") == 0,
            "seccomp neither RuntimeDefault nor Localhost": seccomp
            not in ("RuntimeDefault", "Localhost"),
            "capabilities do not drop ALL": "ALL" not in (caps.get("drop") or []),
            "adds capabilities": bool(set(caps.get("add") or []) - {"NET_BIND_SERVICE"}),
        }
        out += [f"{name}: {what}" for what, broken in checks.items() if broken]
    return out


def _namespaces(tmp_path: Path, level: str) -> list[dict[str, Any]]:
    return _render(
        _kustomization(
            tmp_path / level,
            resources=["namespaces"],
            components=[f"components/pod-security/{level}"],
        )
    )


@pytest.mark.parametrize(
    ("level", "agents"),
    [("privileged", {"enforce": "privileged"}), ("restricted", dict.fromkeys(
        ("enforce", "warn", "audit"), "restricted"))],
)  # fmt: skip
def test_pod_security_labels_the_namespaces(
    level: str, agents: dict[str, str], tmp_path: Path
) -> None:
    docs = _namespaces(tmp_path, level)
    _validate(docs, tmp_path)
    labels = {d["metadata"]["name"]: d["metadata"].get("labels") or {} for d in docs}
    prefix = "pod-security.kubernetes.io/"
    pss = {ns: {k[len(prefix) :]: v for k, v in ls.items() if k.startswith(prefix)} for ns, ls in labels.items()}  # fmt: skip
    agent_namespaces = {ns for ns, ls in labels.items() if ls.get("mandate.dev/inject") == "true"}
    assert agent_namespaces == {"agents"}
    assert pss["agents"] == agents
    assert pss["mandate-system"] == dict.fromkeys(("enforce", "warn", "audit"), "restricted")


def test_a_namespace_of_your_own_gets_the_labels_by_its_inject_label(tmp_path: Path) -> None:
    (tmp_path / "ns.yaml").write_text(
        yaml.safe_dump_all(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels},
                }
                for name, labels in [
                    ("team-b", {"mandate.dev/inject": "true"}),
                    ("team-c", {"mandate.dev/inject": "false"}),
                    ("finance", {}),
                ]
            ]
        )
    )
    docs = _render(
        _kustomization(
            tmp_path, resources=["ns.yaml"], components=["components/pod-security/restricted"]
        )
    )
    enforce = {
        d["metadata"]["name"]: d["metadata"]["labels"].get("pod-security.kubernetes.io/enforce")
        for d in docs
    }
    assert enforce == {"team-b": "restricted", "team-c": None, "finance": None}


def test_mandate_system_pods_meet_restricted(dev: list[dict[str, Any]]) -> None:
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]
        for d in dev
        if d["kind"] == "Deployment" and d["metadata"]["namespace"] == "mandate-system"
    }
    assert set(pods) == {"mandate-webhook", "jaeger"}
    for name, spec in pods.items():
        assert pod_security_violations(spec, "restricted") == [], name
        assert spec["automountServiceAccountToken"] is False, name


def _injected(mode: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "examples" / "agent.yaml").read_text()) if d]
    template = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    template["metadata"]["annotations"]["mandate.dev/mode"] = mode
    # The operator's mode: a pod may not pick a less strict one (allowPodModeOverride).
    data = yaml.safe_load((DEPLOY / "base" / "injector.yaml").read_text())
    config = InjectConfig.from_mapping({**data, "mode": mode}, source="injector")
    pod = inject(template, config)
    assert pod["metadata"]["annotations"]["mandate.dev/injected"] == mode
    spec: dict[str, Any] = pod["spec"]
    return spec


def test_iptables_mode_needs_privileged_and_proxy_mode_meets_restricted() -> None:
    """What the two components' levels are for: the capture's init container (root,
    NET_ADMIN, NET_RAW) is what `baseline` already refuses; everything else of the injected
    example pod, and all of it in proxy mode, meets `restricted`."""
    iptables = _injected("iptables")
    assert pod_security_violations(iptables, "privileged") == []
    baseline = pod_security_violations(iptables, "baseline")
    assert baseline == ["mandate-init: adds ['NET_ADMIN', 'NET_RAW']"]
    restricted = pod_security_violations(iptables, "restricted")
    assert restricted and all(v.startswith("mandate-init: ") for v in restricted)
    proxy = _injected("proxy")
    assert "mandate-init" not in {c["name"] for c in proxy["initContainers"]}
    assert pod_security_violations(proxy, "restricted") == []


@pytest.mark.parametrize(
    ("change", "violation"),
    [
        (lambda s: s["containers"][0]["securityContext"].__setitem__("privileged", True), "privileged"),
        (lambda s: s.__setitem__("hostNetwork", True), "hostNetwork"),
        (lambda s: s["securityContext"].__setitem__("runAsNonRoot", False), "runAsNonRoot"),
        (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    ],
    ids=["privileged", "hostNetwork", "root", "hostPath"],
)  # fmt: skip
def test_the_pod_security_check_sees_what_restricted_refuses(change: Any, violation: str) -> None:
    spec = _injected("proxy")
    change(spec)
    assert any(violation in v for v in pod_security_violations(spec, "restricted"))


# -- NetworkPolicy: what leaves an agent pod ---------------------------------------------------------


def _network_policy_kit(where: Path, *, namespace: str | None = None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEPLOY / "components" / "network-policy" / "example.yaml", where / "example.yaml")
    fields: dict[str, Any] = {
        "resources": ["agents", "example.yaml"],
        "components": ["components/network-policy"],
    }
    if namespace:
        fields["namespace"] = namespace
    return _kustomization(where, **fields)


def test_network_policy_needs_the_api_servers_address(tmp_path: Path) -> None:
    """Without the ConfigMap that gives the API server's address the build fails, naming it:
    never a policy that silently cuts mandate off from AgentRevocations."""
    out = _kustomize(
        _kustomization(tmp_path, resources=["agents"], components=["components/network-policy"])
    )
    assert out.returncode != 0
    assert "mandate-network-policy" in out.stderr


@dataclass(frozen=True)
class Peer:
    """Where a connection goes: a pod (with its namespace's and its own labels) or an address
    outside the cluster (labels None)."""

    ip: str
    namespace: Mapping[str, str] | None = None
    pod: Mapping[str, str] | None = None


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(to: Mapping[str, Any], peer: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in to:
        ip = ipaddress.ip_address(peer.ip)
        block = to["ipBlock"]
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except") or []
        )
    if peer.pod is None or peer.namespace is None:
        return False
    if "namespaceSelector" in to:
        if not _selects(to["namespaceSelector"], peer.namespace):
            return False
    elif peer.namespace.get("kubernetes.io/metadata.name") != policy_namespace:
        return False
    return _selects(to.get("podSelector") or {}, peer.pod)


def egress_allowed(
    policies: Iterable[Mapping[str, Any]],
    namespace: str,
    pod_labels: Mapping[str, str],
    peer: Peer,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Whether NetworkPolicy semantics let a pod open this connection: allowed if no
    egress policy selects the pod, else if any rule of any selecting policy allows it."""
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == namespace
        and "Egress" in p["spec"].get("policyTypes", [])
        and _selects(p["spec"]["podSelector"], pod_labels)
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("egress") or []:
            ports = rule.get("ports") or [{}]
            port_ok = any(
                p.get("protocol", "TCP") == protocol
                and (
                    "port" not in p
                    or p["port"] == port
                    or (isinstance(p["port"], int) and p["port"] <= port <= p.get("endPort", 0))
                )
                for p in ports
            )
            tos = rule.get("to") or [{"podSelector": {}, "namespaceSelector": {}}]
            if port_ok and any(_peer_matches(to, peer, namespace) for to in tos):
                return True
    return False


def _ns(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


KUBE_DNS = Peer("10.244.0.5", _ns("kube-system"), {"k8s-app": "kube-dns"})
LEDGER = Peer("10.244.1.7", _ns("finance"), {"app.kubernetes.io/name": "ledger"})
REPORTS = Peer("10.244.1.8", _ns("finance"), {"app.kubernetes.io/name": "reports"})
JAEGER = Peer("10.244.2.3", _ns("mandate-system"), {"app.kubernetes.io/name": "jaeger"})
NEIGHBOUR = Peer("10.244.3.4", _ns("agents"), {"app.kubernetes.io/name": "research-agent"})
API_SERVER = Peer("10.0.0.1")  # example.yaml's address
PUBLIC_API = Peer("203.0.113.7")  # in example.yaml's range
ELSEWHERE = Peer("198.51.100.20")
METADATA = Peer("169.254.169.254")  # the cloud's instance metadata (node credentials)


@pytest.mark.parametrize(
    ("peer", "port", "protocol", "allowed"),
    [
        (KUBE_DNS, 53, "UDP", True),
        (KUBE_DNS, 53, "TCP", True),
        (KUBE_DNS, 8080, "TCP", False),
        (API_SERVER, 443, "TCP", True),
        (API_SERVER, 6443, "TCP", True),
        (API_SERVER, 22, "TCP", False),
        (LEDGER, 8080, "TCP", True),
        (LEDGER, 9090, "TCP", False),
        (REPORTS, 8080, "TCP", False),
        (PUBLIC_API, 443, "TCP", True),
        (PUBLIC_API, 80, "TCP", False),
        (ELSEWHERE, 443, "TCP", False),
        (ELSEWHERE, 443, "UDP", False),  # QUIC
        (METADATA, 80, "TCP", False),
        (JAEGER, 4317, "TCP", False),
        (NEIGHBOUR, 9901, "TCP", False),
    ],
    ids=lambda v: f"{v.ip}" if isinstance(v, Peer) else str(v),
)
def test_what_an_agent_pod_can_reach_with_the_network_policy(
    peer: Peer, port: int, protocol: str, allowed: bool, tmp_path: Path
) -> None:
    """With the component and example.yaml: DNS, the API server and the upstreams the
    example profiles name, and nothing else, for every container of the pod alike (Envoy's
    calls and, in proxy mode, the agent's direct ones)."""
    policies = [d for d in _render(_network_policy_kit(tmp_path)) if d["kind"] == "NetworkPolicy"]
    pod = {"app.kubernetes.io/name": "billing-agent", "mandate.dev/inject": "true"}
    assert egress_allowed(policies, "agents", pod, peer, port, protocol) is allowed
    # Other namespaces are untouched.
    assert egress_allowed(policies, "finance", {}, ELSEWHERE, 443)


def test_network_policy_kit_validates_and_moves_with_the_namespace(tmp_path: Path) -> None:
    docs = _render(_network_policy_kit(tmp_path / "a"))
    _validate(docs, tmp_path)
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {
        "mandate-egress-default-deny",
        "mandate-egress-dns",
        "mandate-egress-kube-apiserver",
        "mandate-egress-upstreams",
    }
    deny = policies["mandate-egress-default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Egress"]}
    api = policies["mandate-egress-kube-apiserver"]["spec"]["egress"][0]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    # The parameters stay out of the cluster (local-config).
    assert not [d for d in docs if d["metadata"]["name"] == "mandate-network-policy"]
    moved = _render(_network_policy_kit(tmp_path / "b", namespace="team-b"))
    spaces = {d["metadata"].get("namespace") for d in moved if d["kind"] == "NetworkPolicy"}
    assert spaces == {"team-b"}


# -- deploy/webhook-cert.sh, run for real --------------------------------------------------------------


@dataclass
class Sandbox:
    """A directory where `kubectl` is kubectl_shim (objects as files) and openssl is real."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    def run(
        self, *args: str, check: bool = True, forbid: str = ""
    ) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "KUBECTL_SHIM_FORBID": forbid,
            "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "KUBECTL_SHIM_STATE": str(self.state),
            "KUBECTL_SHIM_REAL": _bin("kubectl"),
        }
        out = subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env
        )
        if check:
            assert out.returncode == 0, out.stdout + out.stderr
        return out

    def secret(self, name: str) -> tuple[bytes, bytes]:
        """tls.crt and tls.key of a Secret in mandate-system; (b"", b"") if there is none."""
        obj = kubectl_shim.load(self.state, "Secret", "mandate-system", name)
        if obj is None:
            return b"", b""
        return base64.b64decode(obj["data"]["tls.crt"]), base64.b64decode(obj["data"]["tls.key"])

    def put_secret(self, name: str, crt: bytes, key: bytes) -> None:
        data = {k: base64.b64encode(v).decode() for k, v in (("tls.crt", crt), ("tls.key", key))}
        obj = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "data": data}
        obj["metadata"] = {"name": name, "namespace": "mandate-system"}
        kubectl_shim.store(self.state, obj)

    @property
    def mwc(self) -> dict[str, Any]:
        obj = kubectl_shim.load(
            self.state, "MutatingWebhookConfiguration", None, "mandate-injector"
        )
        assert obj is not None
        return obj

    def bundles(self) -> list[bytes]:
        return [
            base64.b64decode(w["clientConfig"].get("caBundle", "")) for w in self.mwc["webhooks"]
        ]

    def writes(self) -> list[list[str]]:
        return [c for c in kubectl_shim.calls(self.state) if c[0] in ("apply", "patch", "create")]


@pytest.fixture(scope="module")
def base_mwc() -> dict[str, Any]:
    return _find(_render(DEPLOY / "base"), "MutatingWebhookConfiguration", "mandate-injector")


@pytest.fixture
def sandbox(tmp_path: Path, base_mwc: dict[str, Any]) -> Sandbox:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to run deploy/webhook-cert.sh")
    box = Sandbox(tmp_path / "sandbox")
    (box.root / "bin").mkdir(parents=True)
    shim = box.root / "bin" / "kubectl"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(kubectl_shim.__file__)}" "$@"\n')
    shim.chmod(0o755)
    kubectl_shim.store(box.state, json.loads(json.dumps(base_mwc)))
    return box


def _certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def _check_leaf(leaf: x509.Certificate, ca: x509.Certificate) -> None:
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [SERVICE, f"{SERVICE}.cluster.local"]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_first_run_creates_the_ca_the_leaf_and_the_cabundle(sandbox: Sandbox) -> None:
    out = sandbox.run()
    ca_pem, ca_key = sandbox.secret("mandate-webhook-ca")
    leaf_pem, leaf_key = sandbox.secret("mandate-webhook-tls")
    (ca,) = _certs(ca_pem)
    (leaf,) = _certs(leaf_pem)
    _check_leaf(leaf, ca)
    assert b"PRIVATE KEY" in ca_key and b"PRIVATE KEY" in leaf_key
    # Both webhooks trust the CA, and only it.
    assert sandbox.bundles() == [ca_pem, ca_pem]
    assert len(sandbox.mwc["webhooks"]) == 2
    # It says what it did and when to renew; the webhook is not restarted (it reloads).
    assert "CA:                  created; expires" in out.stdout
    assert "serving certificate: issued; expires" in out.stdout
    assert "--renew" in out.stdout
    assert not [c for c in kubectl_shim.calls(sandbox.state) if c[0] == "rollout"]


def test_a_second_run_changes_nothing(sandbox: Sandbox) -> None:
    sandbox.run()
    before = (sandbox.secret("mandate-webhook-ca"), sandbox.secret("mandate-webhook-tls"))
    bundles = sandbox.bundles()
    writes = len(sandbox.writes())
    out = sandbox.run()
    assert (sandbox.secret("mandate-webhook-ca"), sandbox.secret("mandate-webhook-tls")) == before
    assert sandbox.bundles() == bundles
    assert len(sandbox.writes()) == writes  # no apply, no patch
    assert "kept" in out.stdout and "caBundle:            unchanged" in out.stdout


async def _served_serial(port: int, trust: bytes) -> int:
    """The serial of the certificate the server presents to a client that trusts ``trust``
    and checks the Service's name, as the API server does."""
    context = ssl.create_default_context(cadata=trust.decode())
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=SERVICE
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_renew_replaces_the_leaf_and_the_webhook_serves_it_under_the_same_cabundle(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """No TLS gap: after --renew the caBundle the API server holds is byte for byte the
    same, the webhook reloads the new files by itself, and a client holding the old caBundle
    verifies the new certificate."""
    sandbox.run()
    bundle = sandbox.bundles()[0]
    ca_before = sandbox.secret("mandate-webhook-ca")
    old_crt, old_key = sandbox.secret("mandate-webhook-tls")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(old_crt)
    key.write_bytes(old_key)
    config = InjectConfig.from_mapping(
        yaml.safe_load((DEPLOY / "base" / "injector.yaml").read_text()), source="injector"
    )
    server = WebhookServer(config, cert, key, "127.0.0.1", 0)
    await server.start()
    try:
        assert await _served_serial(server.port, bundle) == _certs(old_crt)[0].serial_number
        patches = len([c for c in kubectl_shim.calls(sandbox.state) if c[0] == "patch"])
        out = await asyncio.to_thread(sandbox.run, "--renew")
        assert (
            "serving certificate: issued" in out.stdout
            and "CA:                  kept" in out.stdout
        )
        assert sandbox.secret("mandate-webhook-ca") == ca_before
        assert sandbox.bundles() == [bundle, bundle]
        assert len([c for c in kubectl_shim.calls(sandbox.state) if c[0] == "patch"]) == patches
        new_crt, new_key = sandbox.secret("mandate-webhook-tls")
        assert new_crt != old_crt and new_key != old_key
        (leaf,) = _certs(new_crt)
        _check_leaf(leaf, _certs(bundle)[0])
        # What the kubelet does to the Secret volume, then the webhook's periodic check.
        cert.write_bytes(new_crt)
        key.write_bytes(new_key)
        assert server.reload_tls()
        assert await _served_serial(server.port, bundle) == leaf.serial_number
    finally:
        await server.stop()


def test_renew_without_a_ca_refuses_and_writes_nothing(sandbox: Sandbox) -> None:
    out = sandbox.run("--renew", check=False)
    assert out.returncode == 1
    assert "--renew keeps the CA, and there is none (Secret mandate-system/mandate-webhook-ca)" in (
        out.stderr
    )
    assert sandbox.writes() == []


@pytest.mark.parametrize("forbidden", ["mandate-webhook-ca", "mandate-webhook-tls"])
def test_an_unreadable_secret_is_not_taken_for_a_missing_one(
    sandbox: Sandbox, forbidden: str
) -> None:
    """A Secret the user may not read (RBAC) stops the script: it never makes a new CA or
    leaf in place of one it could not see."""
    sandbox.run()
    before = (sandbox.secret("mandate-webhook-ca"), sandbox.secret("mandate-webhook-tls"))
    writes = len(sandbox.writes())
    out = sandbox.run(check=False, forbid=f"get secret {forbidden}")
    assert out.returncode == 1
    assert f"cannot read Secret mandate-system/{forbidden}" in out.stderr
    assert len(sandbox.writes()) == writes
    after = (sandbox.secret("mandate-webhook-ca"), sandbox.secret("mandate-webhook-tls"))
    assert after == before


def test_a_due_leaf_is_reissued_by_a_plain_run_and_check_says_so(sandbox: Sandbox) -> None:
    sandbox.run("--days", "10")  # 10 days left; a 10-day certificate is renewed at 3
    assert sandbox.run("--check", "--days", "10").returncode == 0
    ca = sandbox.secret("mandate-webhook-ca")
    bundles = sandbox.bundles()
    old = sandbox.secret("mandate-webhook-tls")
    # With 90-day certificates (renewed 30 days before the end) the 10-day one is due.
    check = sandbox.run("--check", "--days", "90", check=False)
    assert check.returncode == 1
    assert "run deploy/webhook-cert.sh --renew" in check.stdout
    out = sandbox.run("--days", "90")
    assert "serving certificate: issued" in out.stdout
    assert sandbox.secret("mandate-webhook-tls") != old
    assert sandbox.secret("mandate-webhook-ca") == ca and sandbox.bundles() == bundles
    assert sandbox.run("--check", "--days", "90").returncode == 0


def test_upgrading_from_a_ca_that_was_never_kept_trusts_both_meanwhile(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """The script's earlier version threw its CA away: the caBundle holds a CA with no
    Secret, and the webhook serves a leaf it signed. The first run creates a CA and a leaf,
    and the caBundle trusts both CAs, so that the webhook's old leaf still verifies until it
    reloads the new one."""
    old = tmp_path / "old"
    sandbox.run("--out", str(old))
    old_ca = (old / "ca.crt").read_bytes()
    sandbox.put_secret(
        "mandate-webhook-tls", (old / "tls.crt").read_bytes(), (old / "tls.key").read_bytes()
    )
    mwc = sandbox.mwc
    for hook in mwc["webhooks"]:
        hook["clientConfig"]["caBundle"] = base64.b64encode(old_ca).decode()
    kubectl_shim.store(sandbox.state, mwc)
    out = sandbox.run()
    assert "CA:                  created" in out.stdout
    ca_pem, _ = sandbox.secret("mandate-webhook-ca")
    leaf_pem, _ = sandbox.secret("mandate-webhook-tls")
    _check_leaf(_certs(leaf_pem)[0], _certs(ca_pem)[0])
    for bundle in sandbox.bundles():
        trusted = _certs(bundle)
        assert [c.fingerprint(SHA256()) for c in trusted] == [
            c.fingerprint(SHA256()) for c in _certs(ca_pem) + _certs(old_ca)
        ]
    _check_leaf(_certs((old / "tls.crt").read_bytes())[0], _certs(sandbox.bundles()[0])[1])
    # Settled: the next run keeps it all.
    bundles = sandbox.bundles()
    sandbox.run()
    assert sandbox.bundles() == bundles


def test_it_refuses_a_webhook_configuration_that_cert_manager_injects(sandbox: Sandbox) -> None:
    mwc = sandbox.mwc
    mwc["metadata"]["annotations"] = {"cert-manager.io/inject-ca-from": "mandate-system/x"}
    kubectl_shim.store(sandbox.state, mwc)
    out = sandbox.run(check=False)
    assert out.returncode == 1 and "cert-manager's CA injector owns its caBundle" in out.stderr
    assert sandbox.writes() == []


def test_it_refuses_before_the_manifests_are_applied(sandbox: Sandbox) -> None:
    (sandbox.state / "objects" / "MutatingWebhookConfiguration.-.mandate-injector.json").unlink()
    out = sandbox.run(check=False)
    assert out.returncode == 1 and "apply the manifests first" in out.stderr
    assert sandbox.writes() == []


def test_out_mode_keeps_the_ca_and_renews_the_leaf(sandbox: Sandbox, tmp_path: Path) -> None:
    out = tmp_path / "certs"
    sandbox.run("--out", str(out))
    names = ("ca.crt", "ca.key", "tls.crt", "tls.key")
    first = {n: (out / n).read_bytes() for n in names}
    assert all((out / n).stat().st_mode & 0o077 == 0 for n in ("ca.key", "tls.key"))
    _check_leaf(_certs(first["tls.crt"])[0], _certs(first["ca.crt"])[0])
    sandbox.run("--out", str(out))
    assert {n: (out / n).read_bytes() for n in names} == first
    sandbox.run("--out", str(out), "--renew")
    assert (out / "ca.crt").read_bytes() == first["ca.crt"]
    assert (out / "tls.crt").read_bytes() != first["tls.crt"]
    _check_leaf(_certs((out / "tls.crt").read_bytes())[0], _certs(first["ca.crt"])[0])
    assert sandbox.run("--out", str(out), "--check").returncode == 0
    assert kubectl_shim.calls(sandbox.state) == []  # no cluster in --out mode


@pytest.mark.parametrize(
    "args",
    [["--days", "ten"], ["--days", "0"], ["--frobnicate"], ["--days", "400", "--ca-days", "300"]],
)
def test_bad_options_exit_2(sandbox: Sandbox, args: list[str]) -> None:
    out = sandbox.run(*args, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("webhook-cert.sh: ")
    assert sandbox.writes() == []


@pytest.mark.parametrize("where", ["namespaces", "overlays/dev/namespaces"])
def test_the_shipped_namespaces_carry_the_pod_security_level_iptables_mode_needs(
    where: str,
) -> None:
    """Without the label a cluster-wide baseline/restricted default refuses every injected
    pod (mandate-init needs NET_ADMIN); mandate-system meets restricted."""
    docs = _render(DEPLOY / where)
    enforce = {
        d["metadata"]["name"]: d["metadata"]["labels"].get("pod-security.kubernetes.io/enforce")
        for d in docs
        if d["kind"] == "Namespace"
    }
    assert enforce["agents"] == "privileged"
    assert enforce["mandate-system"] == "restricted"
    if where.startswith("overlays"):
        assert enforce["finance"] is None  # not an agent namespace: the cluster's default
