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

Envoy runs the image's config (or the operator's, ``envoyConfigMap``) with what the
injector config changes in it: tracing (off unless ``otlpEndpoint``; then
``tracingSamplingPercent``, 1 % by default), its log level and access log
(`sidecar.injection.envoy`). mandate's audit records go to its stdout (``audit: stdout``,
the default), to files in a volume (``volume``) or nowhere (``off``); a pod's
``mandate.dev/audit`` may choose only where ``allowPodAuditOverride`` says so, and never off.

A selected pod is refused, with a message that names the field and says what to do, when
the injection could not work or the pod owner could get around it (the pod owner and the
agent are not trusted; the platform operator, who writes the injector config, is): it has
(or asks for) Istio's or Linkerd's sidecar; a container uses a port the sidecar listens on,
or a port name it uses; a container runs as the sidecar's UIDs or (iptables mode, the
injector's ``rootAgents: refuse``) may run as root or asks for allowPrivilegeEscalation (a
setuid-root program would make it root; unset, the injection sets it to false); it
references a Secret only mandate may
read, or mounts the injector's state or audit volume under another name; it asks for a mode
less strict than the injector's (``allowPodModeOverride``) or, in a namespace labelled for
injection, opts out (``allowPodOptOut``); it shares its process namespace; it has what Pod
Security's baseline forbids (the namespace is `privileged` for mandate-init); it chooses its
own nameservers (iptables mode: DNS leaves uncaptured); or it is malformed. What the
injection overrides (the pod's proxy variables, its token, its mandate.dev/audit, a
look-alike sidecar) is said in :func:`warnings_for`; whether its agent has a profile,
:func:`unknown_agent_problem` (the callers have the profiles).

The injection is authoritative and idempotent: a pod that carries the sidecar, or anything
named like it (:func:`looks_injected`), is stripped of all that is mandate's and injected
again, so a pod injected with the same config comes back unchanged and a look-alike gets the
real sidecar. This module must not do I/O or import aiohttp, Kubernetes clients or YAML:
dicts in, dicts out.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

from sidecar.errors import InjectError
from sidecar.injection.config import (
    ADMIN_PORT_NAME,
    AUDIT_MODES,
    CREDENTIALS_DIR,
    CUSTOM_ENVOY_DIR,
    CUSTOM_ENVOY_KEY,
    ENVOY,
    ENVOY_CONFIGS,
    INIT,
    MANDATE,
    MODE_STRICTNESS,
    MODES,
    SIDECAR_CONTAINERS,
    SIDECAR_PORT_NAMES,
    InjectConfig,
    _secret_name_problem,
    _secret_names,
)
from sidecar.injection.envoy import envoy_args

__all__ = [
    "ANNOTATION_AGENT",
    "ANNOTATION_AUDIT",
    "ANNOTATION_CREDENTIAL_SECRETS",
    "ANNOTATION_INJECTED",
    "ANNOTATION_MODE",
    "ANNOTATION_SERVICE_ACCOUNT_TOKEN",
    "ANNOTATION_TXN_KEYS_SECRET",
    "BASELINE_CAPABILITIES",
    "CAPTURE_SCRIPT",
    "CREDENTIALS_DIR",
    "ENVOY_ADMIN_SOCKET",
    "ENVOY_CONFIGS",
    "LABEL_INJECT",
    "MODES",
    "SA_DIR",
    "SIDECAR_CONTAINERS",
    "TXN_KEYS_DIR",
    "InjectConfig",
    "agent_name",
    "agent_of",
    "audit_of",
    "capture_env",
    "credential_secrets_of",
    "envoy_ready_probe",
    "inject",
    "is_injected",
    "looks_injected",
    "mode_of",
    "opt_out_problem",
    "patch_for",
    "selected",
    "txn_keys_secret_of",
    "unknown_agent_problem",
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
# Where the pod's audit records go (stdout | volume | off): honoured only where the injector
# allows it (allowPodAuditOverride), and never "off" unless the injector's own mode is off.
ANNOTATION_AUDIT = "mandate.dev/audit"

_VOLUMES = (
    "mandate-profiles",
    "mandate-state",
    "mandate-tmp",
    "mandate-run",
    "mandate-envoy-admin",
    "mandate-admin-token",
    "mandate-kube-api-access",
    "mandate-txn-keys",
    "mandate-audit",
    "mandate-envoy-config",
)
# One volume per credential Secret: this prefix and its index (a volume name is a DNS label
# of at most 63 characters; a Secret name may be a 253-character subdomain).
_CREDENTIAL_VOLUME = "mandate-credential-"
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
# The AgentRevocation CRD's pattern for spec.agent (without "*").
_AGENT_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")

PROFILES_DIR = "/etc/mandate/profiles"
STATE_DIR = "/var/lib/mandate"
# Sockets shared by Envoy and mandate only.
RUN_DIR = "/run/mandate-io"
# mandate's Check server (envoy/sidecar*.yaml: the `mandate` cluster's pipe): on a unix
# socket in RUN_DIR, so that the agent, which shares the pod's network namespace, cannot ask
# it for an allowed call's answer and its credentials, in proxy mode too (on TCP only the
# iptables capture kept it away).
CHECK_SOCKET = f"{RUN_DIR}/check.sock"
# Envoy's admin interface (envoy/sidecar*.yaml: admin.address.pipe), in a volume of its own
# mounted by Envoy's container alone: on TCP the agent, which shares the pod's network
# namespace, could stop Envoy (/quitquitquit), read its configuration (/config_dump) or
# change its logging. mandate does not need it either.
ENVOY_ADMIN_DIR = "/run/mandate-envoy"
ENVOY_ADMIN_SOCKET = f"{ENVOY_ADMIN_DIR}/admin.sock"
TOKEN_DIR = "/etc/mandate/admin"
# The audit trail's directory when the records go to a volume (MANDATE_AUDIT_DIR): in the
# state volume, or the injector's auditVolume mounted here.
AUDIT_DIR = f"{STATE_DIR}/audit"
# Where in-cluster clients (kubernetes_asyncio's load_incluster_config) look for the token,
# the CA and the namespace: in mandate's container only.
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# The credential Secrets, one directory each (<name>/<key>), and the txn-token signing keys.
TXN_KEYS_DIR = "/var/run/mandate/txn-keys"
# The name the API server's ServiceAccount admission gives the token volume it adds to every
# container (a random 5-character suffix follows); it runs before any admission webhook.
_DEFAULT_TOKEN_VOLUME = "kube-api-access-"

# Pod Security Standards, level baseline
# (https://kubernetes.io/docs/concepts/security/pod-security-standards/). An agent namespace
# in iptables mode is labelled `privileged` (components/pod-security), for mandate-init's
# NET_ADMIN; the injection then refuses itself, for the pod's own containers, what baseline
# forbids: the agent would reach the node, other pods' sidecars, or the capture's rules.
BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
_SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
_SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
_APPARMOR_TYPES = (None, "RuntimeDefault", "Localhost")
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"

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
    """mandate's and Envoy's containers are there, by name. A name is a claim, not proof:
    `inject` does not trust it, and injects such a pod again (see `looks_injected`)."""
    if not isinstance(pod, Mapping):
        return False
    return {MANDATE, ENVOY} <= _container_names(pod, "initContainers")


def looks_injected(pod: Mapping[str, Any]) -> bool:
    """The pod carries something only the injection puts there: an init container with one of
    the sidecar's names, or the ``mandate.dev/injected`` annotation. `inject` strips all
    that is mandate's from such a pod and injects it again: the webhook, not the pod, says
    what the sidecar is (a look-alike named mandate running busybox gets replaced)."""
    if not isinstance(pod, Mapping):
        return False
    return bool(_container_names(pod, "initContainers")) or ANNOTATION_INJECTED in _annotations(pod)


def _is_our_volume(name: Any) -> bool:
    return isinstance(name, str) and (name in _VOLUMES or name.startswith(_CREDENTIAL_VOLUME))


def _strip(pod: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``pod`` without what an injection puts into it: the sidecar's init containers
    (by name), its volumes (by name), the annotations it sets and the proxy variables it
    gives the pod's containers. What is malformed stays, for `_check` to name."""
    out: dict[str, Any] = copy.deepcopy(dict(pod))
    meta = out.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("annotations"), dict):
        for key in (ANNOTATION_INJECTED, ANNOTATION_SERVICE_ACCOUNT_TOKEN):
            meta["annotations"].pop(key, None)
    spec = out.get("spec")
    if not isinstance(spec, dict):
        return out
    if isinstance(spec.get("initContainers"), list):
        spec["initContainers"] = [
            c
            for c in spec["initContainers"]
            if not (isinstance(c, Mapping) and c.get("name") in SIDECAR_CONTAINERS)
        ]
    if isinstance(spec.get("volumes"), list):
        spec["volumes"] = [
            v
            for v in spec["volumes"]
            if not (isinstance(v, Mapping) and _is_our_volume(v.get("name")))
        ]
    for key in ("initContainers", "containers"):
        containers = spec.get(key)
        for c in containers if isinstance(containers, list) else []:
            if isinstance(c, dict) and isinstance(c.get("env"), list):
                c["env"] = [
                    e
                    for e in c["env"]
                    if not (isinstance(e, Mapping) and e.get("name") in _PROXY_VARS)
                ]
    return out


def mode_of(pod: Mapping[str, Any], config: InjectConfig) -> str:
    """The pod's capture mode: its ``mandate.dev/mode``, else the injector's. InjectError for
    a value that is not a mode, or a mode less strict than the injector's (proxy where it
    says iptables) unless ``allowPodModeOverride``: the pod owner would switch the capture
    off, and with it the governance of an agent that ignores HTTP_PROXY."""
    mode = _annotations(pod).get(ANNOTATION_MODE, config.mode)
    where = f"pod {_name(pod)}: metadata.annotations[{ANNOTATION_MODE}]"
    if mode not in MODES:
        raise InjectError(f"{where}: expected one of {', '.join(MODES)}, got {mode!r}")
    if MODE_STRICTNESS[mode] < MODE_STRICTNESS[config.mode] and not config.allow_pod_mode_override:
        raise InjectError(
            f"{where}: {mode} is less strict than the injector's mode ({config.mode}): without "
            "the capture, an agent that ignores HTTP_PROXY is not governed, and the injector "
            "does not let a pod choose that (allowPodModeOverride: false). Remove the "
            "annotation, or ask the platform operator for proxy mode (the injector's mode: "
            "proxy, or allowPodModeOverride: true)"
        )
    return str(mode)


def opt_out_problem(
    pod: Mapping[str, Any], config: InjectConfig, *, namespace_selected: bool = False
) -> str:
    """Why the pod may not run without the sidecar although it is labelled
    ``mandate.dev/inject: "false"``: in a namespace labelled for injection, unless the
    injector's ``allowPodOptOut``, the pod owner would opt its agent out of governance and
    audit. "" when that is not so."""
    if not namespace_selected or config.allow_pod_opt_out or not isinstance(pod, Mapping):
        return ""
    if _labels(pod).get(LABEL_INJECT) != "false":
        return ""
    return (
        f'pod {_name(pod)}: metadata.labels[{LABEL_INJECT}]: "false" opts the pod out of '
        f'mandate in a namespace labelled {LABEL_INJECT}: "true", and the injector does not '
        "allow that (allowPodOptOut: false): its calls would be neither governed nor audited. "
        "Remove the label, or run the pod in a namespace not labelled for injection"
    )


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
    if spec.get("shareProcessNamespace") is True:
        raise InjectError(
            f"{where}spec.shareProcessNamespace: true: the agent would see mandate's and "
            "Envoy's processes and, through /proc/<pid>/root (as mandate's UID, as root, or "
            "with CAP_SYS_PTRACE), read mandate's token, credentials and signing keys: agents "
            "run without it"
        )
    pod_sc = _map(spec, "securityContext", f"{where}spec.")
    reserved = {config.envoy_uid, config.mandate_uid}
    # Before the UIDs: Istio's proxy runs as 1337, Envoy's UID here, and "reserved UID" is
    # not what the user needs to hear (issue 19, finding 8).
    _check_mesh(pod, spec, mode, where)
    sidecar_ports = config.sidecar_ports()
    for key in ("containers", "initContainers"):
        for i, c in enumerate(_list(spec, key, f"{where}spec.")):
            at = f"{where}spec.{key}[{i}]"
            if not isinstance(c, Mapping) or not isinstance(c.get("name"), str):
                raise InjectError(f"{at}: expected a container with a name")
            if c["name"] in SIDECAR_CONTAINERS:
                raise InjectError(f"{at}.name: {c['name']!r} is reserved for mandate's sidecar")
            _check_ports(c, at, sidecar_ports)
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
    _check_pod_security(pod, spec, where)
    _check_shared_volumes(spec, config, where)
    if mode == "iptables":
        _check_dns(spec, where)
        if config.root_agents == "refuse":
            root = ", ".join(f"{at} ({name})" for at, name in _root_containers(spec))
            if root:
                raise InjectError(
                    f"{where}{root}: may run as root (neither runAsNonRoot: true nor "
                    "a runAsUser above 0, in the container's or the pod's securityContext): "
                    f"root could switch to Envoy's UID {config.envoy_uid} and bypass the "
                    "capture. Set runAsNonRoot: true and a runAsUser (the injector's rootAgents "
                    "is refuse)"
                )
            escalating = ", ".join(f"{at} ({name})" for at, name in _escalating_containers(spec))
            if escalating:
                raise InjectError(
                    f"{where}{escalating}: allowPrivilegeEscalation: true: a setuid-root "
                    "program in the image would make the agent root, which could switch to "
                    f"Envoy's UID {config.envoy_uid} and bypass the capture. Remove it (the "
                    "injection sets it to false where it is unset; the injector's rootAgents "
                    "is refuse)"
                )


def _security_context_problems(sc: Mapping[str, Any], at: str, *, container: bool) -> Iterator[str]:
    """What Pod Security's baseline forbids in a pod's or a container's securityContext."""
    seccomp = sc.get("seccompProfile")
    if isinstance(seccomp, Mapping) and seccomp.get("type") == "Unconfined":
        yield f"{at}.seccompProfile.type: Unconfined"
    apparmor = sc.get("appArmorProfile")
    if isinstance(apparmor, Mapping) and apparmor.get("type") not in _APPARMOR_TYPES:
        yield f"{at}.appArmorProfile.type: {apparmor.get('type')}"
    selinux = sc.get("seLinuxOptions")
    if isinstance(selinux, Mapping):
        if selinux.get("type") not in (None, *_SELINUX_TYPES):
            yield f"{at}.seLinuxOptions.type: {selinux.get('type')}"
        for key in ("user", "role"):
            if selinux.get(key):
                yield f"{at}.seLinuxOptions.{key}: {selinux.get(key)}"
    windows = sc.get("windowsOptions")
    if isinstance(windows, Mapping) and windows.get("hostProcess") is True:
        yield f"{at}.windowsOptions.hostProcess: true"
    if not container:
        for i, sysctl in enumerate(sc.get("sysctls") or []):
            name = sysctl.get("name") if isinstance(sysctl, Mapping) else sysctl
            if name not in _SAFE_SYSCTLS:
                yield f"{at}.sysctls[{i}].name: {name}"
        return
    if sc.get("privileged") is True:
        yield f"{at}.privileged: true"
    caps = sc.get("capabilities")
    added = caps.get("add") if isinstance(caps, Mapping) else None
    extra = sorted(str(c) for c in added or [] if c not in BASELINE_CAPABILITIES)
    if extra:
        yield f"{at}.capabilities.add: {', '.join(extra)}"
    if sc.get("procMount") not in (None, "Default"):
        yield f"{at}.procMount: {sc.get('procMount')}"


def _check_pod_security(pod: Mapping[str, Any], spec: Mapping[str, Any], where: str) -> None:
    """Refuse what Pod Security's baseline level forbids, in the pod and in each of its own
    containers (mandate's are not in it yet): the namespace's `privileged` label, there for
    mandate-init, lets all of it through. Every offending field is named."""
    problems = [f"spec.{key}: true" for key in ("hostPID", "hostIPC") if spec.get(key) is True]
    pod_sc = spec.get("securityContext")
    if isinstance(pod_sc, Mapping):
        problems += _security_context_problems(pod_sc, "spec.securityContext", container=False)
    for key, value in _annotations(pod).items():
        if str(key).startswith(_APPARMOR_ANNOTATION) and not (
            value == "runtime/default" or str(value).startswith("localhost/")
        ):
            problems.append(f"metadata.annotations[{key}]: {value}")
    for i, v in enumerate(spec.get("volumes") or []):
        if "hostPath" in v:
            problems.append(f"spec.volumes[{i}] ({v['name']}).hostPath")
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for i, c in enumerate(_list(spec, key, f"{where}spec.")):
            if not isinstance(c, Mapping):
                continue
            at = f"spec.{key}[{i}] ({c.get('name')})"
            for j, port in enumerate(c.get("ports") or []):
                if isinstance(port, Mapping) and port.get("hostPort") not in (None, 0):
                    problems.append(f"{at}.ports[{j}].hostPort: {port['hostPort']}")
            sc = _map(c, "securityContext", f"{where}{at}.")
            problems += _security_context_problems(sc, f"{at}.securityContext", container=True)
    if problems:
        raise InjectError(
            f"{where}{'; '.join(problems)}: Pod Security's baseline level forbids this (its "
            "namespace may be labelled privileged for mandate-init, so the injection refuses "
            "it itself): it would give the agent the node's namespaces or files, other pods' "
            "sidecars, or the power to undo the capture. Remove it"
        )


def _volume_identity(kind: str, source: Any) -> tuple[str, str] | None:
    """What a volume source names outside the pod, comparable between two volumes (a claim
    by its name, any other source by its fields but readOnly); None for one that is the
    pod's own (emptyDir, ephemeral)."""
    if kind in ("emptyDir", "ephemeral") or not isinstance(source, Mapping):
        return None
    if kind == "persistentVolumeClaim":
        return kind, str(source.get("claimName"))
    fields = {k: v for k, v in source.items() if k != "readOnly"}
    return kind, json.dumps(fields, sort_keys=True, default=str)


def _check_shared_volumes(spec: Mapping[str, Any], config: InjectConfig, where: str) -> None:
    """Refuse a pod volume that is the injector's stateVolume or auditVolume under another
    name (e.g. the same persistentVolumeClaim): the agent would read, rewrite or delete the
    state and audit records of every pod sharing it."""
    protected: dict[tuple[str, str], str] = {}
    for key, source in (("stateVolume", config.state_volume), ("auditVolume", config.audit_volume)):
        for kind, value in (source or {}).items():
            identity = _volume_identity(kind, value)
            if identity is not None:
                protected.setdefault(identity, key)
    if not protected:
        return
    for i, v in enumerate(spec.get("volumes") or []):
        for kind, value in v.items():
            what = protected.get(_volume_identity(kind, value) or ("", ""))
            if what:
                raise InjectError(
                    f"{where}spec.volumes[{i}] ({v['name']}).{kind}: the injector's {what}, "
                    "where mandate keeps the state and audit records of every pod that shares "
                    "it: the agent could read, rewrite or delete them. Use a volume of its own"
                )


def _check_dns(spec: Mapping[str, Any], where: str) -> None:
    """iptables mode: the capture lets TCP and UDP port 53 out, uncaptured, to each nameserver
    of the pod's /etc/resolv.conf. Refuse a pod that writes that list itself (dnsPolicy
    None, dnsConfig.nameservers): any host on port 53 would be a way out past Envoy. (In
    proxy mode there is no capture to get around: nothing to refuse.)"""
    dns = spec.get("dnsConfig")
    nameservers = dns.get("nameservers") if isinstance(dns, Mapping) else None
    fields = (["spec.dnsPolicy: None"] if spec.get("dnsPolicy") == "None" else []) + (
        [f"spec.dnsConfig.nameservers: {', '.join(map(str, nameservers))}"] if nameservers else []
    )
    if fields:
        raise InjectError(
            f"{where}{'; '.join(fields)}: the capture lets DNS (TCP and UDP port 53) out "
            "directly to the pod's nameservers, so nameservers of the pod's choosing would be a "
            "way out past Envoy. Use the cluster's DNS (dnsPolicy ClusterFirst, no "
            "dnsConfig.nameservers; searches and options are fine)"
        )


def _own_containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(field, container) of the pod's own init containers and containers, in that order:
    not mandate's sidecar."""
    for key in ("initContainers", "containers"):
        containers = spec.get(key)
        for i, c in enumerate(containers if isinstance(containers, list) else []):
            if isinstance(c, Mapping) and c.get("name") not in SIDECAR_CONTAINERS:
                yield f"spec.{key}[{i}]", c


def _security_context(c: Mapping[str, Any]) -> Mapping[str, Any]:
    sc = c.get("securityContext")
    return sc if isinstance(sc, Mapping) else {}


def _root_containers(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, name) of the pod's own containers that may run as root: neither runAsNonRoot:
    true nor a runAsUser above 0, in the container's securityContext or the pod's."""
    pod_sc = _security_context(spec)
    out = []
    for at, c in _own_containers(spec):
        sc = _security_context(c)
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if non_root is not True and not (isinstance(uid, int) and uid > 0):
            out.append((at, str(c.get("name"))))
    return out


def _escalating_containers(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, name) of the pod's own containers that ask for allowPrivilegeEscalation:
    true (a setuid-root program would then give a non-root agent root)."""
    return [
        (at, str(c.get("name")))
        for at, c in _own_containers(spec)
        if _security_context(c).get("allowPrivilegeEscalation") is True
    ]


def _without_escalation(container: dict[str, Any]) -> dict[str, Any]:
    """``container`` with allowPrivilegeEscalation: false where it is unset (iptables mode):
    with it (no_new_privs), a setuid-root program in the agent's image cannot make it root,
    and root could switch to Envoy's UID and bypass the capture. An explicit true was
    refused or warned about (`_check`, `warnings_for`)."""
    sc = dict(_security_context(container))
    if sc.get("allowPrivilegeEscalation") is None:
        sc["allowPrivilegeEscalation"] = False
        container = {**container, "securityContext": sc}
    return container


# The other service meshes' sidecars: their containers (a sidecar, its init, a native
# sidecar in initContainers), the annotations their injectors set, and what asks for them.
_MESHES: dict[str, dict[str, Any]] = {
    "Istio": {
        "containers": {"istio-proxy", "istio-init", "istio-validation"},
        "annotations": {"sidecar.istio.io/status": None},
        "requests": {"sidecar.istio.io/inject": "true"},
        "how": (
            'label the pod sidecar.istio.io/inject: "false" to keep it out of the mesh (the '
            "mesh's mTLS then does not cover it)"
        ),
        "why": (
            "both capture the pod's outbound traffic with iptables, and both use port 15001 "
            "and UID 1337 (Istio's proxy would run as mandate's Envoy UID and bypass "
            "mandate's capture)"
        ),
    },
    # Ambient mode has no sidecar, but ztunnel listens on 15001, 15006 and 15008 inside the
    # pod's network namespace and istio-cni's capture is in place before mandate-init runs:
    # the agent's connections would meet ztunnel's redirect first. The webhook sees the
    # pod's label only; a namespace labelled ambient needs the same opt-out (README).
    "Istio ambient": {
        "containers": set(),
        "annotations": {},
        "requests": {"istio.io/dataplane-mode": "ambient"},
        "how": (
            'label the pod (and its namespace) istio.io/dataplane-mode: "none" to keep it '
            "out of the ambient mesh"
        ),
        "why": (
            "ztunnel captures the pod's outbound traffic before mandate-init's rules and "
            "listens on 15001, Envoy's port"
        ),
    },
    "Linkerd": {
        "containers": {"linkerd-proxy", "linkerd-init", "linkerd-network-validator"},
        "annotations": {"linkerd.io/proxy-version": None},
        "requests": {"linkerd.io/inject": "enabled"},
        "how": (
            "annotate the pod mandate.dev/mode: proxy where the injector allows it (its mode "
            "proxy, or allowPodModeOverride: true; the agent reaches mandate's Envoy through "
            "HTTP_PROXY, and Envoy's calls then leave through Linkerd's proxy; an agent that "
            "ignores HTTP_PROXY is governed only with a NetworkPolicy, see deploy/README.md), "
            "or annotate it linkerd.io/inject: disabled"
        ),
        "why": (
            "both capture the pod's outbound traffic with iptables, and which capture the "
            "agent's connections meet first is not defined"
        ),
    },
}


def _mesh_of(pod: Mapping[str, Any], spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """(mesh, what shows it) for a pod with, or asking for, another mesh's sidecar."""
    names: set[Any] = set()
    for key in ("containers", "initContainers"):
        containers = spec.get(key)
        if isinstance(containers, list):
            names |= {c.get("name") for c in containers if isinstance(c, Mapping)}
    tags = {**_labels(pod), **_annotations(pod)}
    for mesh, signs in _MESHES.items():
        found = sorted(str(n) for n in names & signs["containers"])
        if found:
            return mesh, f"container {', '.join(found)}"
        for key, value in {**signs["annotations"], **signs["requests"]}.items():
            if key in tags and (value is None or tags[key] == value):
                return mesh, f"{key}: {tags[key]!r}"
    return None


def _check_mesh(pod: Mapping[str, Any], spec: Mapping[str, Any], mode: str, where: str) -> None:
    found = _mesh_of(pod, spec)
    if found is None:
        return
    mesh, sign = found
    signs = _MESHES[mesh]
    if mesh == "Linkerd" and mode == "proxy":
        return  # proxy mode has no capture of its own; Envoy's calls go through Linkerd's
    raise InjectError(
        f"{where}the pod has {mesh}'s capture ({sign}), which cannot share a pod with "
        f"mandate's in {mode} mode: {signs['why']}. To go on: {signs['how']}"
    )


def _check_ports(container: Mapping[str, Any], at: str, sidecar_ports: Mapping[int, str]) -> None:
    """Refuse a container port the sidecar listens on: one of the two would fail to bind,
    or the agent would answer in mandate's place (a probe, Envoy's listener); and a port
    named like the sidecar's (Prometheus scrapes mandate-admin as mandate's metrics)."""
    for j, port in enumerate(_list(container, "ports", f"{at}.")):
        name = port.get("name") if isinstance(port, Mapping) else None
        if name in SIDECAR_PORT_NAMES:
            raise InjectError(
                f"{at}.ports[{j}].name: container {container['name']!r} names a port {name!r}, "
                "the name of the sidecar's port: Prometheus scrapes the port of that name as "
                "mandate's metrics (deploy/components/monitoring), which the agent could fake. "
                "Rename the port"
            )
        number = port.get("containerPort") if isinstance(port, Mapping) else None
        if isinstance(number, int) and number in sidecar_ports:
            raise InjectError(
                f"{at}.ports[{j}].containerPort: container {container['name']!r} uses port "
                f"{number}, which the sidecar uses for {sidecar_ports[number]}: move the "
                "container to another port, or change the injector's port for the sidecar"
            )


def agent_name(pod: Mapping[str, Any]) -> str:
    """The agent the sidecar will serve: ``mandate.dev/agent``, else the pod's service
    account (``spec.serviceAccountName``, "default" when unset), as mandate resolves it."""
    agent = agent_of(pod)
    if agent is not None:
        return agent
    spec = pod.get("spec")
    account = spec.get("serviceAccountName") if isinstance(spec, Mapping) else None
    return account if isinstance(account, str) and account else "default"


def unknown_agent_problem(pod: Mapping[str, Any], agents: Collection[str], source: str) -> str:
    """Why the pod's agent has no profile among ``agents`` (the profiles of ``source``), or
    "": such a pod would start, and deny every call `unknown_agent`."""
    agent = agent_name(pod)
    if agent in agents:
        return ""
    how = (
        f"annotation {ANNOTATION_AGENT}"
        if agent_of(pod) is not None
        else f"service account {agent!r} (no {ANNOTATION_AGENT} annotation)"
    )
    known = ", ".join(sorted(agents)[:20]) or "none"
    return (
        f"pod {_name(pod)}: agent {agent!r} (from the {how}) has no profile in {source} "
        f"(agents: {known}): its sidecar would deny every call (unknown_agent). Add the "
        f"agent's profile, or set {ANNOTATION_AGENT} to an agent that has one"
    )


def audit_of(pod: Mapping[str, Any], config: InjectConfig) -> tuple[str, str]:
    """Where the pod's audit records go (one of AUDIT_MODES), and a warning ("" if none)
    when the pod's ``mandate.dev/audit`` asked for something else. The operator's mode
    wins unless ``allowPodAuditOverride``; a pod never turns off an audit the operator set.
    InjectError for a value that is not a mode."""
    asked = _annotations(pod).get(ANNOTATION_AUDIT)
    if asked is None or asked == config.audit:
        return config.audit, ""
    if asked not in AUDIT_MODES:
        raise InjectError(
            f"pod {_name(pod)}: metadata.annotations[{ANNOTATION_AUDIT}]: expected one of "
            f"{', '.join(AUDIT_MODES)}, got {asked!r}"
        )
    if asked == "off":
        return config.audit, (
            f"mandate: pod {_name(pod)} asks {ANNOTATION_AUDIT}: off, but the injector records "
            f"every pod's decisions (audit: {config.audit}); a pod cannot turn its audit off"
        )
    if not config.allow_pod_audit_override:
        return config.audit, (
            f"mandate: pod {_name(pod)} asks {ANNOTATION_AUDIT}: {asked}, but the injector "
            f"decides where audit records go (audit: {config.audit}; allowPodAuditOverride "
            "is false): ignored"
        )
    return str(asked), ""


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
    config: InjectConfig, agent: str | None, secrets: Sequence[str], keys: str, audit: str
) -> dict[str, Any]:
    admin = {"port": config.admin_port, "scheme": "HTTP"}
    env: list[dict[str, Any]] = [
        {"name": "MANDATE_PROFILES", "value": PROFILES_DIR},
        {"name": "MANDATE_LISTEN", "value": f"unix:{CHECK_SOCKET}"},
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
    # The audit trail (issue 19). stdout: JSON lines, hash-chained, for the cluster's log
    # pipeline (what every cluster has, and what outlives the pod); volume: files in
    # AUDIT_DIR, verifiable with `mandate audit verify` where the volume is read.
    if audit == "stdout":
        env.append({"name": "MANDATE_AUDIT_STDOUT", "value": "true"})
    elif audit == "volume":
        env.append({"name": "MANDATE_AUDIT_DIR", "value": AUDIT_DIR})
        if config.audit_volume is not None:
            mount = {"name": "mandate-audit", "mountPath": AUDIT_DIR}
            if "emptyDir" not in config.audit_volume:
                mount["subPathExpr"] = "$(MANDATE_POD_NAME)"  # one directory per pod
            mounts.append(mount)
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
        "ports": [{"name": ADMIN_PORT_NAME, "containerPort": config.admin_port}],
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
    mounts: list[dict[str, Any]] = [
        {"name": "mandate-run", "mountPath": RUN_DIR},
        {"name": "mandate-envoy-admin", "mountPath": ENVOY_ADMIN_DIR},
    ]
    if config.envoy_config_map:
        mounts.append(
            {"name": "mandate-envoy-config", "mountPath": CUSTOM_ENVOY_DIR, "readOnly": True}
        )
    return {
        "name": ENVOY,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["envoy"],
        # The image's config and the operator's changes to it (sidecar.injection.envoy).
        "args": envoy_args(config),
        "volumeMounts": mounts,
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


def _volumes(
    config: InjectConfig, secrets: Sequence[str], keys: str, audit: str
) -> list[dict[str, Any]]:
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
    if audit == "volume" and config.audit_volume is not None:
        volumes.append({"name": "mandate-audit", **copy.deepcopy(dict(config.audit_volume))})
    if config.envoy_config_map:
        # The operator's Envoy config; not optional: a missing ConfigMap holds the pod at
        # ContainerCreating with an Event naming it.
        volumes.append(
            {
                "name": "mandate-envoy-config",
                "configMap": {
                    "name": config.envoy_config_map,
                    "items": [{"key": CUSTOM_ENVOY_KEY, "path": CUSTOM_ENVOY_KEY}],
                },
            }
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
    unchanged copy if it is not selected. InjectError if it is selected and cannot be
    injected, or opts out where it may not (`opt_out_problem`).

    A pod that carries mandate's sidecar already, or something that looks like it
    (`looks_injected`: the container names, the annotation), is stripped of all that is
    mandate's and injected again: what the injector makes, never what the pod says, is the
    sidecar. So ``inject(inject(p)) == inject(p)``: an injected pod comes back the same."""
    if not isinstance(pod, Mapping):
        raise InjectError("pod: expected an object")
    if not selected(pod, namespace_selected=namespace_selected):
        problem = opt_out_problem(pod, config, namespace_selected=namespace_selected)
        if problem:
            raise InjectError(problem)
        return copy.deepcopy(dict(pod))
    again = looks_injected(pod)
    out = _strip(pod) if again else copy.deepcopy(dict(pod))
    mode = mode_of(out, config)
    agent = agent_of(out)
    audit, _ = audit_of(out, config)
    _check(out, config, mode)
    secrets, keys = credential_secrets_of(out, config), txn_keys_secret_of(out, config)
    meta = out.setdefault("metadata", {})
    if meta.get("annotations") is None:
        meta["annotations"] = {}
    meta["annotations"][ANNOTATION_INJECTED] = mode
    spec = out["spec"]
    # The pod's token goes to mandate alone: no automount (also if the ServiceAccount
    # admission runs again), and the token it already mounted taken out of every container.
    removed = {v["name"] for v in spec.get("volumes") or [] if _is_default_token_volume(v)}
    note = _token_note(spec, removed)
    earlier = _annotations(pod).get(ANNOTATION_SERVICE_ACCOUNT_TOKEN)
    if again and note == "mandate-only" and str(earlier).startswith("mandate-only"):
        note = str(earlier)  # overriding nothing now: what the first injection overrode
    meta["annotations"][ANNOTATION_SERVICE_ACCOUNT_TOKEN] = note
    spec["automountServiceAccountToken"] = False
    ours = [_mandate_container(config, agent, secrets, keys, audit), _envoy_container(config)]
    if mode == "iptables":
        ours.insert(0, _init_container(config))
    own = _without_escalation if mode == "iptables" else dict
    spec["initContainers"] = ours + [
        own(_with_proxy_env(_without_mounts(c, removed), config))
        for c in spec.get("initContainers") or []
    ]
    spec["containers"] = [
        own(_with_proxy_env(_without_mounts(c, removed), config)) for c in spec["containers"]
    ]
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] not in removed]
    spec["volumes"] += _volumes(config, secrets, keys, audit)
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
        if key not in spec or spec[key] != new_spec[key]:
            put(["spec"], spec, key, new_spec[key])
    for i, (old, updated) in enumerate(
        zip(spec["containers"], new_spec["containers"], strict=True)
    ):
        for key in ("env", "volumeMounts", "securityContext"):
            if key in updated and old.get(key) != updated[key]:
                put(["spec", "containers", i], old, key, updated[key])
    return ops


def _proxy_env_warnings(pod: Mapping[str, Any], config: InjectConfig) -> list[str]:
    """One warning per container whose own HTTP_PROXY/NO_PROXY (any spelling) the injection
    replaces; the values are not repeated (a proxy URL may hold a password)."""
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return []
    out: list[str] = []
    ours = {
        name: ",".join(config.no_proxy)
        if name.lower() == "no_proxy"
        else f"http://127.0.0.1:{config.proxy_port}"
        for name in _PROXY_VARS
    }
    for _, c in _own_containers(spec):
        env = c.get("env")
        replaced = sorted(
            {
                str(e["name"])
                for e in (env if isinstance(env, list) else [])
                if isinstance(e, Mapping)
                and e.get("name") in _PROXY_VARS
                and ("valueFrom" in e or e.get("value") != ours[e["name"]])
            }
        )
        if replaced:
            out.append(
                f"mandate: container {c.get('name')}: the injection replaces its "
                f"{', '.join(replaced)}: every call goes through mandate's Envoy "
                f"(http://127.0.0.1:{config.proxy_port}), and NO_PROXY is the injector's "
                f"noProxy ({','.join(config.no_proxy)}); a corporate proxy belongs "
                "behind Envoy, hosts to reach directly in the injector's noProxy"
            )
    return out


def warnings_for(
    pod: Mapping[str, Any], config: InjectConfig, original: Mapping[str, Any] | None = None
) -> list[str]:
    """What an operator should know about an injected pod (AdmissionReview warnings);
    with ``original``, the pod as it was before the injection, also what the injection
    overrode in it (its proxy variables, its mandate.dev/audit)."""
    if not isinstance(pod, Mapping) or not isinstance(pod.get("spec"), Mapping):
        return []
    spec = pod["spec"]
    out: list[str] = []
    if isinstance(original, Mapping):
        out += _proxy_env_warnings(original, config)
        audit_warning = audit_of(original, config)[1]
        if audit_warning:
            out.append(audit_warning)
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
    if _annotations(pod).get(ANNOTATION_INJECTED) == "iptables" and config.root_agents == "warn":
        # rootAgents: refuse (the default) refused such a pod before it got here.
        for _, name in _root_containers(spec):
            out.append(
                f"mandate: container {name} may run as root, "
                f"which could switch to Envoy's UID {config.envoy_uid} and bypass the "
                "capture; set runAsNonRoot"
            )
        for _, name in _escalating_containers(spec):
            out.append(
                f"mandate: container {name} sets allowPrivilegeEscalation: true: a "
                f"setuid-root program could make it root, which could switch to Envoy's UID "
                f"{config.envoy_uid} and bypass the capture; remove it"
            )
    if isinstance(original, Mapping):
        out += _replaced_sidecar_warnings(original, pod)
    return out


def _replaced_sidecar_warnings(
    original: Mapping[str, Any], injected: Mapping[str, Any]
) -> list[str]:
    """A warning when the pod came with init containers named like the sidecar's that were
    not what the injector makes (another image, command or arguments): they were replaced."""

    def made(p: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
        spec = p.get("spec")
        containers = spec.get("initContainers") if isinstance(spec, Mapping) else None
        return {
            str(c["name"]): (c.get("image"), c.get("command"), c.get("args"))
            for c in (containers if isinstance(containers, list) else [])
            if isinstance(c, Mapping) and c.get("name") in SIDECAR_CONTAINERS
        }

    before, after = made(original), made(injected)
    replaced = sorted(name for name, what in before.items() if after.get(name) != what)
    if not replaced:
        return []
    return [
        f"mandate: the pod came with init containers named like mandate's sidecar "
        f"({', '.join(replaced)}) that are not what this injector makes (image, command or "
        "arguments): replaced by the injector's sidecar (the names are mandate's)"
    ]
