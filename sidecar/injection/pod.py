"""Sidecar injection as pure functions: a pod (or pod template) in, the injected pod or the
JSON patch (RFC 6902) that makes it, out.

Used by the admission webhook (`sidecar.injection.webhook`) and by `mandate inject` (offline,
GitOps).
A selected pod gets, in ``spec.initContainers`` and in this order:

- ``mandate-init`` (mode ``iptables`` only): runs :data:`CAPTURE_SCRIPT` once, as root with
  NET_ADMIN and NET_RAW only, so that every outbound TCP connection of the pod goes to Envoy
  and nothing else leaves it, except the sidecar's own traffic (Envoy's and mandate's UIDs);
- ``mandate`` and ``mandate-envoy`` as native sidecars (``restartPolicy: Always``): they start
  before the pod's own init and app containers, their startup probes hold those back until
  mandate has its revocations and Envoy is ready, and they do not keep a Job's pod alive.

Every other container gets ``HTTP_PROXY``/``HTTPS_PROXY`` (and lower-case forms) pointing at
Envoy, ``NO_PROXY`` for loopback: in ``proxy`` mode that is all there is (for clusters that
forbid NET_ADMIN; an agent that ignores the variables is not governed), in ``iptables`` mode it
makes HTTPS work through CONNECT while the capture guarantees nothing bypasses Envoy.

The agent's containers hold no credential (issue 17): the pod's
``automountServiceAccountToken`` is set to false (whatever the pod said), the token the API
server's ServiceAccount admission already mounted into the pod's containers (the
``kube-api-access-*`` volume, which it adds before any webhook runs) is taken out of them,
and a projected, audience-bound token that lives ``serviceAccountTokenSeconds`` (default
3600; never 3607, which the API server extends to a year) is mounted at the standard path
into mandate's container only, with the cluster CA and the namespace, so that in-cluster
configuration works there unchanged. The annotation ``mandate.dev/service-account-token``
says so. The Kubernetes Secrets that mandate's credentials read (the injector's
``credentialSecrets`` and the pod's ``mandate.dev/credential-secrets``) and the
Transaction Token signing keys (``txnTokenKeysSecret``, ``mandate.dev/txn-token-keys-secret``)
are mounted read-only into mandate's container only, under :data:`CREDENTIALS_DIR` and at
:data:`TXN_KEYS_DIR`; a pod whose own containers reference one of them (env, envFrom, a
volume) is refused, since the agent would then hold the credential. A container of the pod
that mounts a service-account token by itself keeps it, with a warning: agents must not.

The injection is idempotent: a pod with the ``mandate.dev/injected`` annotation, or already
carrying the sidecar containers, is left as it is. This module must not do I/O or import
aiohttp, Kubernetes clients or YAML: dicts in, dicts out.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sidecar.errors import ConfigError, InjectError

__all__ = [
    "ANNOTATION_AGENT",
    "ANNOTATION_CREDENTIAL_SECRETS",
    "ANNOTATION_INJECTED",
    "ANNOTATION_MODE",
    "ANNOTATION_SERVICE_ACCOUNT_TOKEN",
    "ANNOTATION_TXN_KEYS_SECRET",
    "CAPTURE_SCRIPT",
    "CREDENTIALS_DIR",
    "ENVOY_ADMIN_SOCKET",
    "LABEL_INJECT",
    "MODES",
    "SA_DIR",
    "SIDECAR_CONTAINERS",
    "TXN_KEYS_DIR",
    "InjectConfig",
    "agent_of",
    "capture_env",
    "credential_secrets_of",
    "envoy_ready_probe",
    "inject",
    "is_injected",
    "mode_of",
    "patch_for",
    "selected",
    "txn_keys_secret_of",
    "warnings_for",
]

LABEL_INJECT = "mandate.dev/inject"  # "true" on a pod (or its namespace) selects it
ANNOTATION_AGENT = "mandate.dev/agent"  # the agent id; else the pod's service account name
ANNOTATION_MODE = "mandate.dev/mode"  # iptables | proxy; else the injector's default
ANNOTATION_INJECTED = "mandate.dev/injected"  # set by the injection, value: the mode
# Kubernetes Secrets mounted into mandate's container only, for the profile's credentials:
# "name,name" (added to the injector's credentialSecrets).
ANNOTATION_CREDENTIAL_SECRETS = "mandate.dev/credential-secrets"
# The Secret of the Transaction Token signing keys (else the injector's txnTokenKeysSecret).
ANNOTATION_TXN_KEYS_SECRET = "mandate.dev/txn-token-keys-secret"
# Set by the injection: who holds the pod's service-account token ("mandate-only", and what
# the injection overrode to make it so).
ANNOTATION_SERVICE_ACCOUNT_TOKEN = "mandate.dev/service-account-token"

MODES = ("iptables", "proxy")
INIT, MANDATE, ENVOY = "mandate-init", "mandate", "mandate-envoy"
SIDECAR_CONTAINERS = (INIT, MANDATE, ENVOY)
_VOLUMES = (
    "mandate-profiles",
    "mandate-state",
    "mandate-tmp",
    "mandate-run",
    "mandate-envoy-admin",
    "mandate-admin-token",
    "mandate-kube-api-access",
    "mandate-txn-keys",
)
# One volume per credential Secret: this prefix and its index (a volume name is a DNS label
# of at most 63 characters; a Secret name may be a 253-character subdomain).
_CREDENTIAL_VOLUME = "mandate-credential-"
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
# The AgentRevocation CRD's pattern for spec.agent (without "*").
_AGENT_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")

# The image copies envoy/*.yaml here (Dockerfile); one config per mandate transport.
ENVOY_CONFIGS = {
    "grpc": "/etc/mandate/envoy/sidecar.yaml",
    "http": "/etc/mandate/envoy/sidecar-http.yaml",
}
PROFILES_DIR = "/etc/mandate/profiles"
STATE_DIR = "/var/lib/mandate"
# Sockets shared by Envoy and mandate only.
RUN_DIR = "/run/mandate-io"
# Envoy's admin interface (envoy/sidecar*.yaml: admin.address.pipe), in a volume of its own
# mounted by Envoy's container alone: on TCP the agent, which shares the pod's network
# namespace, could stop Envoy (/quitquitquit), read its configuration (/config_dump) or
# change its logging. mandate does not need it either.
ENVOY_ADMIN_DIR = "/run/mandate-envoy"
ENVOY_ADMIN_SOCKET = f"{ENVOY_ADMIN_DIR}/admin.sock"
TOKEN_DIR = "/etc/mandate/admin"
# Where in-cluster clients (kubernetes_asyncio's load_incluster_config) look for the token,
# the CA and the namespace: in mandate's container only.
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The credential Secrets, one directory each (<name>/<key>), and the txn-token signing keys.
CREDENTIALS_DIR = "/var/run/mandate/credentials"
TXN_KEYS_DIR = "/var/run/mandate/txn-keys"
# The name the API server's ServiceAccount admission gives the token volume it adds to every
# container (a random 5-character suffix follows); it runs before any admission webhook.
_DEFAULT_TOKEN_VOLUME = "kube-api-access-"
# The kubelet refuses shorter; the API server extends exactly 3607 s (the legacy default of
# the volume above) to a year when --service-account-extend-token-expiration is on (default).
MIN_TOKEN_SECONDS, MAX_TOKEN_SECONDS, EXTENDED_TOKEN_SECONDS = 600, 86400, 3607
# A Secret's name: a DNS-1123 subdomain (no "/", no "..", nothing path-like).
_SECRET_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Run by the mandate-init container with `sh -c`, parameters in the environment (see
# capture_env). Istio's scheme: a nat chain REDIRECTs every new outbound TCP connection to
# Envoy's listener, except the sidecar's own (by UID: Envoy's upstream calls must not loop
# back into Envoy; mandate talks to the Kubernetes API and the trace collector) and
# connections that stay in the pod. Unlike Istio, a filter chain then lets nothing else out
# (UDP such as QUIC, other protocols, IPv6, which Envoy does not listen on) except DNS to the
# pod's resolvers. Safe to run twice: the chains are emptied and refilled.
CAPTURE_SCRIPT = r"""set -eu
v4() { iptables -w 10 "$@"; }
v6() { ip6tables -w 10 "$@"; }
chain() {  # chain IPT TABLE NAME: create or empty NAME, jump to it from OUTPUT once
  "$1" -t "$2" -N "$3" 2>/dev/null || "$1" -t "$2" -F "$3"
  "$1" -t "$2" -C OUTPUT -j "$3" 2>/dev/null || "$1" -t "$2" -A OUTPUT -j "$3"
}
family() { case "$1" in *:*) echo 6 ;; *) echo 4 ;; esac; }
NAMESERVERS=$(awk '$1 == "nameserver" { print $2 }' /etc/resolv.conf)

# 1. nat: every new outbound TCP connection goes to Envoy, except ...
chain v4 nat MANDATE_OUTPUT
for uid in $ENVOY_UID $MANDATE_UID; do  # ... the sidecar's own
  v4 -t nat -A MANDATE_OUTPUT -m owner --uid-owner "$uid" -j RETURN
done
v4 -t nat -A MANDATE_OUTPUT -o lo -j RETURN  # ... connections within the pod
for ns in $NAMESERVERS; do  # ... DNS over TCP to the pod's resolvers
  [ "$(family "$ns")" = 6 ] || v4 -t nat -A MANDATE_OUTPUT -p tcp -d "$ns" --dport 53 -j RETURN
done
for port in $EXCLUDE_PORTS; do  # ... and what the platform excluded
  v4 -t nat -A MANDATE_OUTPUT -p tcp --dport "$port" -j RETURN
done
for cidr in $EXCLUDE_CIDRS; do
  [ "$(family "$cidr")" = 6 ] || v4 -t nat -A MANDATE_OUTPUT -d "$cidr" -j RETURN
done
v4 -t nat -A MANDATE_OUTPUT -p tcp -j REDIRECT --to-ports "$PROXY_PORT"

# 2. filter: nothing else leaves the pod
egress() {  # egress IPT FAMILY
  chain "$1" filter MANDATE_EGRESS
  "$1" -A MANDATE_EGRESS -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
  "$1" -A MANDATE_EGRESS -o lo -j RETURN
  if [ "$2" = 4 ]; then  # REDIRECTed to Envoy (-o still names the original interface)
    "$1" -A MANDATE_EGRESS -p tcp -d 127.0.0.1 --dport "$PROXY_PORT" -j RETURN
  fi
  for uid in $ENVOY_UID $MANDATE_UID; do
    "$1" -A MANDATE_EGRESS -m owner --uid-owner "$uid" -j RETURN
  done
  for ns in $NAMESERVERS; do
    if [ "$(family "$ns")" = "$2" ]; then
      "$1" -A MANDATE_EGRESS -p udp -d "$ns" --dport 53 -j RETURN
      "$1" -A MANDATE_EGRESS -p tcp -d "$ns" --dport 53 -j RETURN
    fi
  done
  if [ "$2" = 4 ]; then
    for port in $EXCLUDE_PORTS; do "$1" -A MANDATE_EGRESS -p tcp --dport "$port" -j RETURN; done
  fi
  for cidr in $EXCLUDE_CIDRS; do
    if [ "$(family "$cidr")" = "$2" ]; then "$1" -A MANDATE_EGRESS -d "$cidr" -j RETURN; fi
  done
  "$1" -A MANDATE_EGRESS -j REJECT
}
egress v4 4
# 3. IPv6: Envoy listens on IPv4 only, so the agent gets no IPv6 way out (fail if unsure)
if [ -e /proc/net/if_inet6 ]; then egress v6 6; fi

# 4. mandate's Check ports: only Envoy (and mandate) may ask. An allowed Check's answer
#    carries the call's credentials, which the agent must never read (issue 17 review).
chain v4 filter MANDATE_CHECK
for port in $CHECK_PORTS; do
  for uid in $ENVOY_UID $MANDATE_UID; do
    v4 -A MANDATE_CHECK -p tcp --dport "$port" -m owner --uid-owner "$uid" -j RETURN
  done
  v4 -A MANDATE_CHECK -o lo -p tcp --dport "$port" -j REJECT --reject-with tcp-reset
done

v4 -t nat -S MANDATE_OUTPUT
v4 -S MANDATE_EGRESS
v4 -S MANDATE_CHECK
if [ -e /proc/net/if_inet6 ]; then v6 -S MANDATE_EGRESS; fi
"""


def _default_resources() -> dict[str, dict[str, Any]]:
    return {
        MANDATE: {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "1", "memory": "512Mi"},
        },
        ENVOY: {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
        INIT: {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
    }


@dataclass(frozen=True)
class InjectConfig:
    """What the injector puts into a pod; `from_mapping` reads the injector's config file
    (camelCase keys, see deploy/base/injector.yaml)."""

    image: str = "ghcr.io/mandate-dev/mandate:0.1.0"  # mandate, Envoy and iptables in one
    image_pull_policy: str = "IfNotPresent"
    mode: str = "iptables"  # default when the pod has no mandate.dev/mode annotation
    envoy_uid: int = 1337
    mandate_uid: int = 1338
    proxy_port: int = 15001  # Envoy's egress listener (envoy/sidecar.yaml)
    grpc_port: int = 9001  # mandate's first worker; Envoy's `mandate` cluster
    context_port: int = 9701  # the agent context API (sidecar/agentapi/client.py), for the agent
    admin_port: int = 9901  # mandate's /healthz /readyz /metrics /v1
    workers: int = 1  # Envoy's `mandate` cluster must list grpc_port .. grpc_port+workers-1
    transport: str = "grpc"  # how Envoy asks mandate: grpc or http (mandate run --transport)
    envoy_config: str = ""  # default: the image's envoy/ config for the transport
    envoy_concurrency: int = 2
    otlp_endpoint: str = ""
    log_level: str = "INFO"
    profiles_config_map: str = "mandate-profiles"
    admin_token_secret: str = "mandate-admin-token"  # "": mandate generates one in its state
    # mandate's own service-account token: its audience ("" = the API server's own, which is
    # what the in-cluster client needs) and lifetime (the kubelet renews it at 80 %).
    service_account_token_audience: str = ""
    service_account_token_seconds: int = 3600
    # Secrets mounted into mandate's container of every injected pod (CREDENTIALS_DIR/<name>);
    # a pod's mandate.dev/credential-secrets adds more.
    credential_secrets: tuple[str, ...] = ()
    txn_token_keys_secret: str = ""  # the signing keys' Secret ("": none, unless annotated)
    state_volume: Mapping[str, Any] = field(default_factory=lambda: {"emptyDir": {}})
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    no_proxy: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=_default_resources)

    @property
    def envoy_config_path(self) -> str:
        if self.envoy_config:
            return self.envoy_config
        return ENVOY_CONFIGS[self.transport]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, source: str = "config") -> InjectConfig:
        """Validate and convert; ConfigError names the file (``source``) and the key."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of settings")
        by_key = {_camel(f.name): f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = by_key.get(str(key))
            if name is None:
                known = ", ".join(sorted(by_key))
                raise ConfigError(f"{source}: unknown key {key!r} (expected one of {known})")
            kwargs[name] = _convert(name, value, f"{source}: {key}")
        if "resources" in kwargs:
            merged = _default_resources()
            for container, res in kwargs["resources"].items():
                merged[container] = dict(res)
            kwargs["resources"] = merged
        return cls(**kwargs)


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join("CIDRs" if p == "cidrs" else p.capitalize() for p in rest)


def _convert(name: str, value: Any, where: str) -> Any:
    if name == "service_account_token_seconds":
        return _token_seconds(value, where)
    if name == "credential_secrets":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of Secret names")
        return _secret_names(value, where)
    if name in ("txn_token_keys_secret", "admin_token_secret") and value:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        problem = _secret_name_problem(value)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        return value
    if name == "service_account_token_audience":
        if not isinstance(value, str) or any(c.isspace() for c in value):
            raise ConfigError(f"{where}: expected an audience without spaces, got {value!r}")
        return value
    ints = {f.name for f in fields(InjectConfig) if f.type == "int"}
    if name in ints:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise ConfigError(f"{where}: expected an integer 0-65535, got {value!r}")
        if name in ("workers", "envoy_concurrency") and value < 1:
            raise ConfigError(f"{where}: expected at least 1, got {value!r}")
        return value
    if name == "transport":
        if value not in ENVOY_CONFIGS:
            raise ConfigError(f"{where}: expected one of grpc, http, got {value!r}")
        return value
    if name == "mode":
        if value not in MODES:
            raise ConfigError(f"{where}: expected one of {', '.join(MODES)}, got {value!r}")
        return value
    if name == "state_volume":
        if not isinstance(value, Mapping) or len(value) != 1:
            raise ConfigError(f"{where}: expected one volume source, e.g. {{emptyDir: {{}}}}")
        return dict(value)
    if name == "resources":
        if not isinstance(value, Mapping) or not set(value) <= set(SIDECAR_CONTAINERS):
            raise ConfigError(f"{where}: expected a mapping with keys {SIDECAR_CONTAINERS}")
        for res in value.values():
            if not isinstance(res, Mapping) or not set(res) <= {"requests", "limits"}:
                raise ConfigError(f"{where}: expected {{requests: ..., limits: ...}}")
        return dict(value)
    if name == "exclude_outbound_ports":
        if not isinstance(value, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value
        ):
            raise ConfigError(f"{where}: expected a list of port numbers")
        return tuple(value)
    if name in ("exclude_outbound_cidrs", "no_proxy"):
        if not isinstance(value, list) or not all(
            isinstance(v, str) and v and re.fullmatch(r"[0-9A-Za-z.:/*_-]+", v) for v in value
        ):
            raise ConfigError(f"{where}: expected a list of addresses")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if name == "image" and not value:
        raise ConfigError(f"{where}: must not be empty")
    return value


def _token_seconds(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number of seconds, got {value!r}")
    if not MIN_TOKEN_SECONDS <= value <= MAX_TOKEN_SECONDS:
        raise ConfigError(
            f"{where}: expected {MIN_TOKEN_SECONDS} to {MAX_TOKEN_SECONDS} seconds (the kubelet "
            f"refuses less than {MIN_TOKEN_SECONDS}), got {value}"
        )
    if value == EXTENDED_TOKEN_SECONDS:
        raise ConfigError(
            f"{where}: {EXTENDED_TOKEN_SECONDS} is the one lifetime the API server extends to a "
            "year (--service-account-extend-token-expiration); use e.g. 3600"
        )
    return value


def _secret_name_problem(name: str) -> str:
    """What is wrong with ``name`` as the name of a Secret to mount; "" if nothing."""
    if not name:
        return "an empty Secret name"
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        return (
            f"{name!r} looks like a path: name a Secret in the pod's namespace; it is mounted "
            f"at {CREDENTIALS_DIR}/<name>/"
        )
    if len(name) > 253 or not _SECRET_NAME_RE.match(name):
        return (
            f"{name!r} is not a Secret name (a DNS-1123 subdomain: lower-case letters, digits, "
            "'-' and '.', starting and ending with a letter or digit, at most 253 characters)"
        )
    return ""


def _secret_names(
    names: Sequence[Any], where: str, error: type[Exception] = ConfigError
) -> tuple[str, ...]:
    """The Secret names of a list, checked: each a Secret name, none twice."""
    out: list[str] = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise error(f"{where}[{i}]: expected a Secret name, got {name!r}")
        problem = _secret_name_problem(name)
        if problem:
            raise error(f"{where}: {problem}")
        if name in out:
            raise error(f"{where}: Secret {name!r} is named twice")
        out.append(name)
    return tuple(out)


# -- reading a pod ----------------------------------------------------------------------------


def _map(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InjectError(f"{where}{key}: expected an object, got {type(value).__name__}")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectError(f"{where}{key}: expected a list, got {type(value).__name__}")
    return value


def _name(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata")
    if isinstance(meta, Mapping):
        if isinstance(meta.get("name"), str) and meta["name"]:
            return str(meta["name"])
        if isinstance(meta.get("generateName"), str) and meta["generateName"]:
            return f"{meta['generateName']}*"
    return "(unnamed)"


def _labels(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    if not isinstance(meta, Mapping):
        return {}
    labels = meta.get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    if not isinstance(meta, Mapping):
        return {}
    annotations = meta.get("annotations")
    return annotations if isinstance(annotations, Mapping) else {}


def selected(pod: Mapping[str, Any], *, namespace_selected: bool = False) -> bool:
    """Whether the pod asks for the sidecar: labelled ``mandate.dev/inject: "true"``, or in a
    namespace so labelled (``namespace_selected``) and not labelled ``"false"``."""
    if not isinstance(pod, Mapping):
        return False
    value = _labels(pod).get(LABEL_INJECT)
    if value == "true":
        return True
    return namespace_selected and value != "false"


def _container_names(pod: Mapping[str, Any], key: str) -> set[str]:
    spec = pod.get("spec")
    if not isinstance(spec, Mapping) or not isinstance(spec.get(key), list):
        return set()
    names = {c.get("name") for c in spec[key] if isinstance(c, Mapping)}
    return {n for n in names if n in SIDECAR_CONTAINERS}


def is_injected(pod: Mapping[str, Any]) -> bool:
    """Injected before: mandate's and Envoy's containers are there (the annotation alone
    is a claim, not an injection: see `inject`)."""
    if not isinstance(pod, Mapping):
        return False
    return {MANDATE, ENVOY} <= _container_names(pod, "initContainers")


def mode_of(pod: Mapping[str, Any], config: InjectConfig) -> str:
    mode = _annotations(pod).get(ANNOTATION_MODE, config.mode)
    if mode not in MODES:
        raise InjectError(
            f"pod {_name(pod)}: metadata.annotations[{ANNOTATION_MODE}]: expected one of "
            f"{', '.join(MODES)}, got {mode!r}"
        )
    return str(mode)


def agent_of(pod: Mapping[str, Any]) -> str | None:
    """The agent id from the ``mandate.dev/agent`` annotation; None means "the pod's service
    account name" (resolved by the downward API when the pod runs)."""
    agent = _annotations(pod).get(ANNOTATION_AGENT)
    if agent is None:
        return None
    if not isinstance(agent, str) or not _AGENT_RE.match(agent):
        raise InjectError(
            f"pod {_name(pod)}: metadata.annotations[{ANNOTATION_AGENT}]: expected an agent id "
            f"(lower-case letters, digits, '.', '_', '-', at most 63), got {agent!r}"
        )
    return agent


def credential_secrets_of(pod: Mapping[str, Any], config: InjectConfig) -> tuple[str, ...]:
    """The Secrets to mount into mandate's container for the profile's credentials: the
    injector's ``credentialSecrets``, then the pod's ``mandate.dev/credential-secrets``
    ("a,b", spaces allowed around names; a name the injector lists already is mounted once).
    InjectError names the annotation and the bad entry: not a Secret name, path-like, empty,
    twice, or the Secret of the txn-token keys or of the admin token."""
    where = f"pod {_name(pod)}: metadata.annotations[{ANNOTATION_CREDENTIAL_SECRETS}]"
    raw = _annotations(pod).get(ANNOTATION_CREDENTIAL_SECRETS)
    names = list(config.credential_secrets)
    if raw is not None:
        if not isinstance(raw, str):
            raise InjectError(f"{where}: expected a comma-separated list of Secret names")
        entries = [e.strip() for e in raw.split(",")] if raw.strip() else []
        for i, entry in enumerate(entries):
            if not entry:
                raise InjectError(f'{where}: entry {i + 1} is empty (expected "name,name")')
        own = _secret_names(entries, where, InjectError)
        names += [n for n in own if n not in names]
    keys = txn_keys_secret_of(pod, config)
    reserved = {keys: "the txn-token keys Secret", config.admin_token_secret: "the admin token"}
    for name in names:
        if name and name in reserved:
            raise InjectError(f"{where}: Secret {name!r} is {reserved[name]}; mount it once")
    return tuple(names)


def txn_keys_secret_of(pod: Mapping[str, Any], config: InjectConfig) -> str:
    """The Secret of the Transaction Token signing keys: the pod's
    ``mandate.dev/txn-token-keys-secret``, else the injector's ``txnTokenKeysSecret``; ""
    for none."""
    raw = _annotations(pod).get(ANNOTATION_TXN_KEYS_SECRET)
    if raw is None:
        return config.txn_token_keys_secret
    where = f"pod {_name(pod)}: metadata.annotations[{ANNOTATION_TXN_KEYS_SECRET}]"
    if not isinstance(raw, str):
        raise InjectError(f"{where}: expected a Secret name")
    problem = _secret_name_problem(raw.strip())
    if problem:
        raise InjectError(f"{where}: {problem}")
    if raw.strip() == config.admin_token_secret:
        raise InjectError(f"{where}: Secret {raw.strip()!r} is the admin token")
    return raw.strip()


def _volume_secrets(volume: Mapping[str, Any]) -> list[str]:
    """The Secrets a pod volume shows (a secret volume, or secret sources of a projected one)."""
    out: list[str] = []
    secret = volume.get("secret")
    if isinstance(secret, Mapping) and isinstance(secret.get("secretName"), str):
        out.append(secret["secretName"])
    projected = volume.get("projected")
    if isinstance(projected, Mapping):
        for source in projected.get("sources") or []:
            if isinstance(source, Mapping) and isinstance(source.get("secret"), Mapping):
                name = source["secret"].get("name")
                if isinstance(name, str):
                    out.append(name)
    return out


def _container_secret_refs(container: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, Secret) for each Secret a container's environment takes values from."""
    out: list[tuple[str, str]] = []
    for j, e in enumerate(container.get("env") or []):
        value_from = e.get("valueFrom") if isinstance(e, Mapping) else None
        ref = value_from.get("secretKeyRef") if isinstance(value_from, Mapping) else None
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
            out.append((f"env[{j}].valueFrom.secretKeyRef", ref["name"]))
    for j, e in enumerate(container.get("envFrom") or []):
        ref = e.get("secretRef") if isinstance(e, Mapping) else None
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
            out.append((f"envFrom[{j}].secretRef", ref["name"]))
    return out


def _check_secrets_stay_with_mandate(
    pod: Mapping[str, Any], config: InjectConfig, where: str
) -> None:
    """Refuse a pod whose own containers would hold a Secret that only mandate may read."""
    protected = {n: "a credential Secret" for n in credential_secrets_of(pod, config)}
    keys = txn_keys_secret_of(pod, config)
    if keys:
        protected[keys] = "the txn-token keys Secret"
    if config.admin_token_secret:
        protected.setdefault(config.admin_token_secret, "mandate's admin token Secret")
    spec: Mapping[str, Any] = pod["spec"]
    mounted_by: dict[str, list[str]] = {}
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for i, c in enumerate(_list(spec, key, f"{where}spec.")):
            if not isinstance(c, Mapping):
                continue
            at = f"{where}spec.{key}[{i}] ({c.get('name')})"
            for fieldname, secret in _container_secret_refs(c):
                if secret in protected:
                    raise InjectError(
                        f"{at}.{fieldname}: Secret {secret!r} is {protected[secret]}, mounted "
                        "into mandate's container only: the agent must not hold it (mandate "
                        "adds the credential to the calls its profile allows); remove the "
                        "reference"
                    )
            for m in c.get("volumeMounts") or []:
                if isinstance(m, Mapping) and isinstance(m.get("name"), str):
                    mounted_by.setdefault(m["name"], []).append(str(c.get("name")))
    for i, v in enumerate(spec.get("volumes") or []):
        for secret in _volume_secrets(v):
            if secret in protected:
                users = ", ".join(mounted_by.get(v["name"], [])) or "no container yet"
                raise InjectError(
                    f"{where}spec.volumes[{i}] ({v['name']}, mounted by {users}): Secret "
                    f"{secret!r} is {protected[secret]}, mounted into mandate's container "
                    "only: the agent must not hold it; remove the volume"
                )


def _check(pod: Mapping[str, Any], config: InjectConfig, mode: str) -> None:
    """Everything the injection touches or relies on, so that a malformed pod gets one clear
    error instead of a half-made patch."""
    name = _name(pod)
    where = f"pod {name}: "
    if not isinstance(pod.get("metadata", {}), Mapping):
        raise InjectError(f"{where}metadata: expected an object")
    meta = _map(pod, "metadata", where)
    for key in ("labels", "annotations"):
        for k, v in _map(meta, key, f"{where}metadata.").items():
            if not isinstance(v, str):
                raise InjectError(f"{where}metadata.{key}[{k}]: expected a string, got {v!r}")
    if not isinstance(pod.get("spec"), Mapping):
        raise InjectError(f"{where}spec: missing or not an object")
    spec: Mapping[str, Any] = pod["spec"]
    if spec.get("hostNetwork") is True:
        raise InjectError(
            f"{where}spec.hostNetwork: true: the sidecar would capture and serve the node's "
            "network; agents must run in their own network namespace"
        )
    containers = _list(spec, "containers", f"{where}spec.")
    if not containers:
        raise InjectError(f"{where}spec.containers: expected at least one container")
    pod_sc = _map(spec, "securityContext", f"{where}spec.")
    reserved = {config.envoy_uid, config.mandate_uid}
    for key in ("containers", "initContainers"):
        for i, c in enumerate(_list(spec, key, f"{where}spec.")):
            at = f"{where}spec.{key}[{i}]"
            if not isinstance(c, Mapping) or not isinstance(c.get("name"), str):
                raise InjectError(f"{at}: expected a container with a name")
            if c["name"] in SIDECAR_CONTAINERS:
                raise InjectError(f"{at}.name: {c['name']!r} is reserved for mandate's sidecar")
            for j, e in enumerate(_list(c, "env", f"{at}.")):
                if not isinstance(e, Mapping) or not isinstance(e.get("name"), str):
                    raise InjectError(f"{at}.env[{j}]: expected {{name: ..., value: ...}}")
            sc = _map(c, "securityContext", f"{at}.")
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if mode == "iptables" and uid in reserved:
                raise InjectError(
                    f"{at}: runs as UID {uid}, reserved for the sidecar (Envoy {config.envoy_uid}, "
                    f"mandate {config.mandate_uid}): its traffic would bypass the capture"
                )
    for i, v in enumerate(_list(spec, "volumes", f"{where}spec.")):
        if not isinstance(v, Mapping) or not isinstance(v.get("name"), str):
            raise InjectError(f"{where}spec.volumes[{i}]: expected a volume with a name")
        if v["name"] in _VOLUMES or v["name"].startswith(_CREDENTIAL_VOLUME):
            raise InjectError(f"{where}spec.volumes[{i}].name: {v['name']!r} is reserved")
    for key in ("containers", "initContainers", "ephemeralContainers"):
        for i, c in enumerate(_list(spec, key, f"{where}spec.")):
            for j, m in enumerate(_list(c, "volumeMounts", f"{where}spec.{key}[{i}].")):
                at = f"{where}spec.{key}[{i}].volumeMounts[{j}]"
                if not isinstance(m, Mapping) or not isinstance(m.get("name"), str):
                    raise InjectError(f"{at}: expected a mount with a name")
                # The injection adds these volumes: a mount of one by name would hand the
                # agent the credentials, signing keys, token or sockets they hold.
                if m["name"] in _VOLUMES or m["name"].startswith(_CREDENTIAL_VOLUME):
                    raise InjectError(
                        f"{at}.name: {m['name']!r} is one of mandate's volumes (credentials, "
                        "keys, token, sockets): only mandate's and Envoy's containers mount it"
                    )
    _check_secrets_stay_with_mandate(pod, config, where)


# -- the sidecar --------------------------------------------------------------------------------


def _hardened(uid: int) -> dict[str, Any]:
    return {
        "runAsUser": uid,
        "runAsGroup": uid,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _field(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def capture_env(config: InjectConfig) -> dict[str, str]:
    """The environment of :data:`CAPTURE_SCRIPT` for this configuration."""
    return {
        "ENVOY_UID": str(config.envoy_uid),
        "MANDATE_UID": str(config.mandate_uid),
        "PROXY_PORT": str(config.proxy_port),
        "EXCLUDE_PORTS": " ".join(str(p) for p in config.exclude_outbound_ports),
        "EXCLUDE_CIDRS": " ".join(config.exclude_outbound_cidrs),
        "CHECK_PORTS": " ".join(str(config.grpc_port + i) for i in range(config.workers)),
        # iptables-legacy takes a lock file; the root filesystem is read-only.
        "XTABLES_LOCKFILE": "/dev/shm/xtables.lock",
    }


def _init_container(config: InjectConfig) -> dict[str, Any]:
    return {
        "name": INIT,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["sh", "-c", CAPTURE_SCRIPT],
        "env": [{"name": k, "value": v} for k, v in capture_env(config).items()],
        "securityContext": {
            # iptables needs root with NET_ADMIN (and NET_RAW); nothing else.
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": copy.deepcopy(dict(config.resources[INIT])),
    }


def _mandate_container(
    config: InjectConfig, agent: str | None, secrets: Sequence[str], keys: str
) -> dict[str, Any]:
    admin = {"port": config.admin_port, "scheme": "HTTP"}
    env: list[dict[str, Any]] = [
        {"name": "MANDATE_PROFILES", "value": PROFILES_DIR},
        {"name": "MANDATE_LISTEN", "value": f"127.0.0.1:{config.grpc_port}"},
        # On the pod IP: the kubelet's probes and Prometheus reach it; /v1/* needs the token.
        {"name": "MANDATE_ADMIN", "value": f"0.0.0.0:{config.admin_port}"},
        {"name": "MANDATE_WORKERS", "value": str(config.workers)},
        {"name": "MANDATE_TRANSPORT", "value": config.transport},
        {"name": "MANDATE_NAMESPACE", **_field("metadata.namespace")},
        {"name": "MANDATE_POD_NAME", **_field("metadata.name")},
        (
            {"name": "MANDATE_AGENT", "value": agent}
            if agent
            else {"name": "MANDATE_AGENT", **_field("spec.serviceAccountName")}
        ),
        {"name": "MANDATE_STATE_DIR", "value": STATE_DIR},
        {"name": "MANDATE_KUBERNETES", "value": "on"},
        {"name": "MANDATE_LOG_LEVEL", "value": config.log_level},
        # Envoy's access log for behaviour analysis: a socket only Envoy and mandate mount.
        {"name": "MANDATE_ACCESS_LOG", "value": f"unix:{RUN_DIR}/als.sock"},
        # The agent context API is for the agent: on localhost, which the agent shares.
        {"name": "MANDATE_CONTEXT_API", "value": f"127.0.0.1:{config.context_port}"},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "mandate-profiles", "mountPath": PROFILES_DIR, "readOnly": True},
        {"name": "mandate-state", "mountPath": STATE_DIR},
        {"name": "mandate-tmp", "mountPath": "/tmp"},
        {"name": "mandate-kube-api-access", "mountPath": SA_DIR, "readOnly": True},
        {"name": "mandate-run", "mountPath": RUN_DIR},
    ]
    if "emptyDir" not in config.state_volume:
        # A shared volume (e.g. a ReadWriteMany claim): one directory per pod.
        mounts[1]["subPathExpr"] = "$(MANDATE_POD_NAME)"
    if config.admin_token_secret:
        env.append({"name": "MANDATE_ADMIN_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"})
        mounts.append({"name": "mandate-admin-token", "mountPath": TOKEN_DIR, "readOnly": True})
    if config.otlp_endpoint:
        env.append({"name": "MANDATE_OTLP_ENDPOINT", "value": config.otlp_endpoint})
    # The credentials' Secrets: here only (profiles name CREDENTIALS_DIR/<secret>/<key>).
    for i, secret in enumerate(secrets):
        mounts.append(
            {
                "name": f"{_CREDENTIAL_VOLUME}{i}",
                "mountPath": f"{CREDENTIALS_DIR}/{secret}",
                "readOnly": True,
            }
        )
    if keys:
        env.append({"name": "MANDATE_TXN_TOKEN_KEYS", "value": TXN_KEYS_DIR})
        mounts.append({"name": "mandate-txn-keys", "mountPath": TXN_KEYS_DIR, "readOnly": True})
    return {
        "name": MANDATE,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",  # a native sidecar
        "command": ["mandate"],
        # No --table: the shared tables are memfds with no name, which no other container
        # (nor another process in this one) can open by a path, freed with the last process.
        "args": ["run"],
        "env": env,
        "ports": [{"name": "mandate-admin", "containerPort": config.admin_port}],
        # Startup holds the agent back until revocations are synced (or the last known
        # ones are enforced after --initial-sync-timeout) and every worker serves.
        "startupProbe": {
            "httpGet": {"path": "/readyz", **admin},
            "periodSeconds": 1,
            "timeoutSeconds": 2,
            "failureThreshold": 120,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", **admin},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", **admin},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "securityContext": _hardened(config.mandate_uid),
        "resources": copy.deepcopy(dict(config.resources[MANDATE])),
        "volumeMounts": mounts,
    }


def envoy_ready_probe(socket_path: str = ENVOY_ADMIN_SOCKET) -> str:
    """Python (for ``python -c``) that exits 0 if Envoy's admin on the unix socket
    ``socket_path`` answers ``GET /ready`` with 200 (Envoy is LIVE), else non-zero. The
    kubelet cannot reach a socket inside the pod, and urllib speaks no unix sockets: one
    HTTP/1.1 request by hand, with the image's Python."""
    return (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(2); "
        f"s.connect({socket_path!r}); "
        r"s.sendall(b'GET /ready HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n'); "
        "sys.exit(0 if s.makefile('rb').readline().split()[1:2] == [b'200'] else 1)"
    )


def _envoy_container(config: InjectConfig) -> dict[str, Any]:
    return {
        "name": ENVOY,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["envoy"],
        "args": [
            "-c",
            config.envoy_config_path,
            "--disable-hot-restart",
            "--concurrency",
            str(config.envoy_concurrency),
            "--log-level",
            "warn",
        ],
        "volumeMounts": [
            {"name": "mandate-run", "mountPath": RUN_DIR},
            {"name": "mandate-envoy-admin", "mountPath": ENVOY_ADMIN_DIR},
        ],
        # Envoy's admin is on a unix socket (no TCP port the kubelet could probe either):
        # probe from inside, with the image's Python.
        "startupProbe": {
            "exec": {"command": ["python", "-c", envoy_ready_probe()]},
            "periodSeconds": 1,
            "timeoutSeconds": 3,
            "failureThreshold": 60,
        },
        "securityContext": _hardened(config.envoy_uid),
        "resources": copy.deepcopy(dict(config.resources[ENVOY])),
    }


def _token_projection(config: InjectConfig) -> dict[str, Any]:
    token: dict[str, Any] = {
        "path": "token",
        "expirationSeconds": config.service_account_token_seconds,
    }
    if config.service_account_token_audience:
        token["audience"] = config.service_account_token_audience
    return {"serviceAccountToken": token}


def _volumes(config: InjectConfig, secrets: Sequence[str], keys: str) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "mandate-profiles", "configMap": {"name": config.profiles_config_map}},
        {"name": "mandate-state", **copy.deepcopy(dict(config.state_volume))},
        {"name": "mandate-tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        # Sockets between Envoy and mandate (the access log): mounted in those two containers
        # only, so the agent cannot connect to them.
        {"name": "mandate-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        # Envoy's admin socket: mounted in Envoy's container only (not the agent's, not
        # mandate's), so nothing else in the pod can stop or reconfigure Envoy.
        {"name": "mandate-envoy-admin", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        # mandate's own API credential (the pod's automountServiceAccountToken is false):
        # audience-bound, short-lived, renewed by the kubelet, mounted into mandate's
        # container alone. Files are root's: 0444 lets mandate's UID read them, and no other
        # container mounts the volume.
        {
            "name": "mandate-kube-api-access",
            "projected": {
                "defaultMode": 0o444,
                "sources": [
                    _token_projection(config),
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
                                    "fieldRef": {"fieldPath": "metadata.namespace"},
                                }
                            ]
                        }
                    },
                ],
            },
        },
    ]
    if config.admin_token_secret:
        volumes.append(
            {
                "name": "mandate-admin-token",
                # Readable by mandate's UID; mounted into no other container.
                "secret": {"secretName": config.admin_token_secret, "defaultMode": 0o444},
            }
        )
    # Not optional: a missing Secret holds the pod at ContainerCreating with an Event naming
    # it, rather than starting an agent whose credentials cannot work. 0444 as above: the
    # kubelet makes the files root's, and mandate's container is the only one mounting them.
    for i, secret in enumerate(secrets):
        volumes.append(
            {
                "name": f"{_CREDENTIAL_VOLUME}{i}",
                "secret": {"secretName": secret, "defaultMode": 0o444},
            }
        )
    if keys:
        volumes.append(
            {"name": "mandate-txn-keys", "secret": {"secretName": keys, "defaultMode": 0o444}}
        )
    return volumes


def _with_proxy_env(container: Mapping[str, Any], config: InjectConfig) -> dict[str, Any]:
    out = dict(container)
    proxy = f"http://127.0.0.1:{config.proxy_port}"
    no_proxy = ",".join(config.no_proxy)
    env = [e for e in container.get("env") or [] if e.get("name") not in _PROXY_VARS]
    for name in _PROXY_VARS:
        env.append({"name": name, "value": no_proxy if name.lower() == "no_proxy" else proxy})
    out["env"] = env
    return out


def _is_default_token_volume(volume: Any) -> bool:
    """The token volume the API server's ServiceAccount admission adds (``kube-api-access-``
    and a suffix, a projected service-account token): it runs before admission webhooks, so
    a pod that did not turn automount off arrives with it in every container."""
    if not isinstance(volume, Mapping):
        return False
    name, projected = volume.get("name"), volume.get("projected")
    if not isinstance(name, str) or not name.startswith(_DEFAULT_TOKEN_VOLUME):
        return False
    if not isinstance(projected, Mapping) or not isinstance(projected.get("sources"), list):
        return False
    return any(isinstance(s, Mapping) and "serviceAccountToken" in s for s in projected["sources"])


def _is_api_token_volume(volume: Any, config: InjectConfig) -> bool:
    """A volume with a service-account token the API server accepts: one without an
    audience (the API server's own) or with the audience the injector gives mandate's. A
    token for another audience (a cloud's workload identity, Vault) is no API credential."""
    projected = volume.get("projected") if isinstance(volume, Mapping) else None
    sources = projected.get("sources") if isinstance(projected, Mapping) else None
    api = {None, "", config.service_account_token_audience}
    return isinstance(sources, list) and any(
        isinstance(s, Mapping)
        and isinstance(s.get("serviceAccountToken"), Mapping)
        and s["serviceAccountToken"].get("audience") in api
        for s in sources
    )


def _without_mounts(container: Mapping[str, Any], volumes: set[str]) -> dict[str, Any]:
    out = dict(container)
    if "volumeMounts" in container:
        out["volumeMounts"] = [
            m for m in container["volumeMounts"] or [] if m.get("name") not in volumes
        ]
    return out


def _token_note(spec: Mapping[str, Any], removed: set[str]) -> str:
    """The value of ANNOTATION_SERVICE_ACCOUNT_TOKEN: "mandate-only", and what was overridden."""
    said = spec.get("automountServiceAccountToken")
    notes = []
    if said is not False:
        was = "unset" if said is None else _json_bool(said)
        notes.append(f"automountServiceAccountToken was {was}, set to false")
    if removed:
        takers = sorted(
            {
                str(c.get("name"))
                for key in ("containers", "initContainers")
                for c in spec.get(key) or []
                if any(m.get("name") in removed for m in c.get("volumeMounts") or [])
            }
        )
        notes.append(
            f"removed the API server's token ({', '.join(sorted(removed))}) from "
            f"{', '.join(takers) or 'no container'}"
        )
    return "mandate-only" + (f" ({'; '.join(notes)})" if notes else "")


def _json_bool(value: Any) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


# -- the injection ------------------------------------------------------------------------------


def inject(
    pod: Mapping[str, Any], config: InjectConfig, *, namespace_selected: bool = False
) -> dict[str, Any]:
    """The pod (a Pod or a pod template: ``metadata`` and ``spec``) with the sidecar; an
    unchanged copy if it is not selected or already injected. InjectError if it is selected
    and malformed."""
    if not isinstance(pod, Mapping):
        raise InjectError("pod: expected an object")
    out: dict[str, Any] = copy.deepcopy(dict(pod))
    if not selected(pod, namespace_selected=namespace_selected) or is_injected(pod):
        return out
    if ANNOTATION_INJECTED in _annotations(pod):
        # A pod may not opt out by claiming it was injected (issue 19, finding 5).
        raise InjectError(
            f"pod {_name(pod)}: metadata.annotations[{ANNOTATION_INJECTED}] says the sidecar "
            f"was injected, but the pod has no {MANDATE} and {ENVOY} init containers: remove "
            "the annotation (the injection sets it), or label the pod "
            'mandate.dev/inject: "false" if it must run without the sidecar'
        )
    mode = mode_of(pod, config)
    agent = agent_of(pod)
    _check(pod, config, mode)
    secrets, keys = credential_secrets_of(pod, config), txn_keys_secret_of(pod, config)
    meta = out.setdefault("metadata", {})
    if meta.get("annotations") is None:
        meta["annotations"] = {}
    meta["annotations"][ANNOTATION_INJECTED] = mode
    spec = out["spec"]
    # The pod's token goes to mandate alone: no automount (also if the ServiceAccount
    # admission runs again), and the token it already mounted taken out of every container.
    removed = {v["name"] for v in spec.get("volumes") or [] if _is_default_token_volume(v)}
    meta["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN] = _token_note(spec, removed)
    spec["automountServiceAccountToken"] = False
    ours = [_mandate_container(config, agent, secrets, keys), _envoy_container(config)]
    if mode == "iptables":
        ours.insert(0, _init_container(config))
    spec["initContainers"] = ours + [
        _with_proxy_env(_without_mounts(c, removed), config)
        for c in spec.get("initContainers") or []
    ]
    spec["containers"] = [
        _with_proxy_env(_without_mounts(c, removed), config) for c in spec["containers"]
    ]
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] not in removed]
    spec["volumes"] += _volumes(config, secrets, keys)
    return out


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def patch_for(
    pod: Mapping[str, Any], config: InjectConfig, *, namespace_selected: bool = False
) -> list[dict[str, Any]]:
    """The JSON patch (RFC 6902) that turns ``pod`` into ``inject(pod, config)``; empty when
    nothing changes."""
    new = inject(pod, config, namespace_selected=namespace_selected)
    if new == pod:
        return []
    ops: list[dict[str, Any]] = []

    def put(parts: Sequence[str | int], parent: Mapping[str, Any], key: str, value: Any) -> None:
        op = "replace" if key in parent else "add"
        ops.append({"op": op, "path": _pointer(*parts, key), "value": value})

    meta = pod.get("metadata")
    if not isinstance(meta, Mapping):
        put([], pod, "metadata", new["metadata"])
    elif not isinstance(meta.get("annotations"), Mapping):
        put(["metadata"], meta, "annotations", new["metadata"]["annotations"])
    else:
        for key, value in new["metadata"]["annotations"].items():
            if meta["annotations"].get(key) != value:  # "add" replaces a member that exists
                ops.append(
                    {"op": "add", "path": _pointer("metadata", "annotations", key), "value": value}
                )
    spec, new_spec = pod["spec"], new["spec"]
    for key in ("initContainers", "volumes", "automountServiceAccountToken"):
        put(["spec"], spec, key, new_spec[key])
    for i, (old, updated) in enumerate(
        zip(spec["containers"], new_spec["containers"], strict=True)
    ):
        for key in ("env", "volumeMounts"):
            if key in updated and old.get(key) != updated[key]:
                put(["spec", "containers", i], old, key, updated[key])
    return ops


def warnings_for(pod: Mapping[str, Any], config: InjectConfig) -> list[str]:
    """What an operator should know about an injected pod (AdmissionReview warnings)."""
    if not isinstance(pod, Mapping) or not isinstance(pod.get("spec"), Mapping):
        return []
    spec = pod["spec"]
    out: list[str] = []
    note = _annotations(pod).get(ANNOTATION_SERVICE_ACCOUNT_TOKEN)
    # Said only when the pod asked for the token explicitly: without the field (most pods)
    # the annotation records it, and deploy/README.md explains it.
    if isinstance(note, str) and "automountServiceAccountToken was true" in note:
        out.append(
            f"mandate: the pod's service-account token is mounted into the mandate container "
            f"only: {note[len('mandate-only (') : -1]}"
        )
    # A container that mounts a token by itself keeps it (it asked for it), but it can then
    # act as the pod's service account, whose RoleBinding is the sidecar's.
    tokens = {
        v.get("name")
        for v in spec.get("volumes") or []
        if _is_api_token_volume(v, config) and v.get("name") != "mandate-kube-api-access"
    }
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            if c.get("name") in SIDECAR_CONTAINERS:
                continue
            held = sorted(
                str(m.get("name")) for m in c.get("volumeMounts") or [] if m.get("name") in tokens
            )
            if held:
                out.append(
                    f"mandate: container {c.get('name')} mounts a service-account token "
                    f"(volume {', '.join(held)}): it can use the pod's service account, which "
                    "the sidecar's RoleBinding also grants (AgentRevocation/AgentElevation "
                    "status, Events); agents must not hold a token"
                )
    if spec.get("shareProcessNamespace") is True:
        out.append(
            "mandate: shareProcessNamespace: true shows mandate's processes to the agent; as "
            "mandate's UID or with CAP_SYS_PTRACE it could read mandate's token and "
            "credentials through /proc; leave it off for agents"
        )
    if _annotations(pod).get(ANNOTATION_INJECTED) == "iptables":
        pod_sc = spec.get("securityContext") or {}
        for c in spec.get("containers") or []:
            sc = c.get("securityContext") or {}
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            if not non_root and not (isinstance(uid, int) and uid > 0):
                out.append(
                    f"mandate: container {c.get('name')} may run as root, which could switch "
                    f"to Envoy's UID {config.envoy_uid} and bypass the capture; set runAsNonRoot"
                )
    return out
