"""The injector's configuration: one frozen value, validated once from the operator's file
(deploy/base/injector.yaml, camelCase keys) by :meth:`InjectConfig.from_mapping`.

Used by `sidecar.injection.pod` (what goes into a pod), `sidecar.injection.envoy` (Envoy's
command line) and the webhook and CLI, which read the file. Must not do I/O or import YAML,
aiohttp or Kubernetes clients: a mapping in, a value out; errors name the file and the key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from sidecar.errors import ConfigError

__all__ = [
    "ADMIN_PORT_NAME",
    "AUDIT_MODES",
    "DEFAULT_IMAGE",
    "ENVOY_CONFIGS",
    "ENVOY_LOG_LEVELS",
    "MODES",
    "MODE_STRICTNESS",
    "SIDECAR_CONTAINERS",
    "SIDECAR_PORT_NAMES",
    "InjectConfig",
    "otlp_target",
]

MODES = ("iptables", "proxy")
# How much of the agent's traffic a mode governs: iptables captures every connection, proxy
# only what the agent sends to HTTP_PROXY. A pod may ask for a mode at least as strict as the
# injector's (allowPodModeOverride: any).
MODE_STRICTNESS = {"proxy": 0, "iptables": 1}
INIT, MANDATE, ENVOY = "mandate-init", "mandate", "mandate-envoy"
SIDECAR_CONTAINERS = (INIT, MANDATE, ENVOY)
# The names of the sidecar's container ports: the PodMonitor scrapes the port named
# mandate-admin, so an agent's port of that name could stand in for mandate's metrics.
ADMIN_PORT_NAME = "mandate-admin"
SIDECAR_PORT_NAMES = (ADMIN_PORT_NAME,)
# Where the audit records of an injected pod go (issue 19): mandate's stdout, for the
# cluster's log pipeline (MANDATE_AUDIT_STDOUT); files in a volume (MANDATE_AUDIT_DIR); none.
AUDIT_MODES = ("stdout", "volume", "off")
# Envoy's --log-level values.
ENVOY_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")
# The image's default; deploy/ sets the image once, on the webhook's container, and hands it
# to the injector in MANDATE_SIDECAR_IMAGE (sidecar.injection.cli.load_config).
DEFAULT_IMAGE = "ghcr.io/mandate-dev/mandate:0.1.0"

# The image copies envoy/*.yaml here (Dockerfile); one config per mandate transport.
ENVOY_CONFIGS = {
    "grpc": "/etc/mandate/envoy/sidecar.yaml",
    "http": "/etc/mandate/envoy/sidecar-http.yaml",
}
# Where the operator's own Envoy config (envoyConfigMap, key envoy.yaml) is mounted.
CUSTOM_ENVOY_DIR = "/etc/mandate/envoy-custom"
CUSTOM_ENVOY_KEY = "envoy.yaml"
CREDENTIALS_DIR = "/var/run/mandate/credentials"

# The kubelet refuses shorter; the API server extends exactly 3607 s (the legacy default of
# the volume above) to a year when --service-account-extend-token-expiration is on (default).
MIN_TOKEN_SECONDS, MAX_TOKEN_SECONDS, EXTENDED_TOKEN_SECONDS = 600, 86400, 3607
# A Secret's or ConfigMap's name: a DNS-1123 subdomain (no "/", no "..", nothing path-like).
_SECRET_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


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

    image: str = DEFAULT_IMAGE  # mandate, Envoy and iptables in one
    image_pull_policy: str = "IfNotPresent"
    mode: str = "iptables"  # default when the pod has no mandate.dev/mode annotation
    # Whether a pod's mandate.dev/mode may be less strict than ``mode`` (proxy where the
    # operator said iptables: no capture, an agent that ignores HTTP_PROXY is not governed).
    # A stricter mode (iptables where the operator said proxy) is always allowed.
    allow_pod_mode_override: bool = False
    # Whether a pod labelled mandate.dev/inject: "false" in a namespace labelled for
    # injection may run without the sidecar (else it is refused: the pod owner would opt
    # out of governance and audit).
    allow_pod_opt_out: bool = False
    # iptables mode: a pod container that may run as root (no runAsNonRoot, no runAsUser > 0)
    # could switch to Envoy's UID and bypass the capture: refuse the pod, or warn.
    root_agents: str = "refuse"
    envoy_uid: int = 1337
    mandate_uid: int = 1338
    proxy_port: int = 15001  # Envoy's egress listener (envoy/sidecar.yaml)
    grpc_port: int = 9001  # mandate's first worker; Envoy's `mandate` cluster
    context_port: int = 9701  # the agent context API (sidecar/agentapi/client.py), for the agent
    admin_port: int = 9901  # mandate's /healthz /readyz /metrics /v1
    workers: int = 1  # Envoy's `mandate` cluster must list grpc_port .. grpc_port+workers-1
    # How Envoy asks mandate: http (default: a quarter of gRPC's CPU per Check, bench/
    # results/matrix.md) or grpc (mandate run --transport). In a pod the agent is fixed by
    # the sidecar's config: what only gRPC carries (context_extensions, peer certificates)
    # is not needed there.
    transport: str = "http"
    envoy_config: str = ""  # default: the image's envoy/ config for the transport
    # A ConfigMap of the pod's namespace whose key envoy.yaml is a whole Envoy config of the
    # operator's, used instead of the image's (it must keep the image's listener, clusters
    # and admin socket: see envoy/sidecar.yaml).
    envoy_config_map: str = ""
    envoy_concurrency: int = 2
    envoy_log_level: str = "warn"
    envoy_access_log: bool = True  # Envoy's JSON access log on its stdout (one line a call)
    # Merged into Envoy's bootstrap with --config-yaml after the injector's own overlay
    # (maps merge, lists append: Envoy's rules), e.g. more runtime layers or stats sinks.
    envoy_config_overlay: Mapping[str, Any] = field(default_factory=dict)
    # The OTLP/gRPC collector of Envoy's and mandate's spans; "": tracing off (Envoy has no
    # collector cluster at all and mandate no endpoint: nothing is exported anywhere).
    otlp_endpoint: str = ""
    # The share of calls traced when otlp_endpoint is set, in percent (Envoy's sampling;
    # mandate's decision spans follow Envoy's decision, the traceparent's sampled flag).
    tracing_sampling_percent: float = 1.0
    log_level: str = "INFO"
    profiles_config_map: str = "mandate-profiles"
    # A pod whose agent (mandate.dev/agent, else its service account) no profile names:
    # refused, or injected with a warning (it would deny every call `unknown_agent`).
    unknown_agent: str = "refuse"
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
    # The audit trail (issue 19): stdout, volume or off (AUDIT_MODES); with volume, the
    # records are files in auditVolume (None: a directory of the state volume).
    audit: str = "stdout"
    audit_volume: Mapping[str, Any] | None = None
    # Whether a pod's mandate.dev/audit annotation may choose another mode. Never "off"
    # unless the operator's own mode is off: a pod owner cannot switch the trail off.
    allow_pod_audit_override: bool = False
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    no_proxy: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=_default_resources)

    @property
    def envoy_config_path(self) -> str:
        if self.envoy_config_map:
            return f"{CUSTOM_ENVOY_DIR}/{CUSTOM_ENVOY_KEY}"
        if self.envoy_config:
            return self.envoy_config
        return ENVOY_CONFIGS[self.transport]

    def sidecar_ports(self) -> dict[int, str]:
        """Every port the sidecar listens on in the pod's network namespace, and what it is."""
        ports = {
            self.proxy_port: "Envoy's egress listener (proxyPort)",
            self.context_port: "mandate's agent context API (contextPort)",
            self.admin_port: "mandate's admin and probes (adminPort)",
        }
        for i in range(self.workers):
            ports.setdefault(self.grpc_port + i, "mandate's Check server (grpcPort, workers)")
        return ports

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
        if kwargs.get("envoy_config") and kwargs.get("envoy_config_map"):
            raise ConfigError(
                f"{source}: envoyConfig and envoyConfigMap both name Envoy's config; set one"
            )
        config = cls(**kwargs)
        ports: dict[int, str] = {}
        for port, what in [
            (config.proxy_port, "proxyPort"),
            (config.context_port, "contextPort"),
            (config.admin_port, "adminPort"),
            *[(config.grpc_port + i, "grpcPort (and workers)") for i in range(config.workers)],
        ]:
            if port in ports:
                raise ConfigError(f"{source}: {what} and {ports[port]} are both port {port}")
            ports[port] = what
        return config


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join("CIDRs" if p == "cidrs" else p.capitalize() for p in rest)


def otlp_target(endpoint: str, where: str = "otlpEndpoint") -> tuple[str, str, int]:
    """(scheme, host, port) of an OTLP/gRPC endpoint ``http[s]://HOST:PORT``; ConfigError
    otherwise (Envoy needs a host and a port for its collector cluster)."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        port, parts = None, urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ConfigError(
            f"{where}: expected http://HOST:PORT (or https://), got {endpoint!r}; "
            '"" turns tracing off'
        )
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"{where}: expected only a scheme, host and port, got {endpoint!r}")
    return parts.scheme, parts.hostname, port


def _volume_source(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(f"{where}: expected one volume source, e.g. {{emptyDir: {{}}}}")
    return dict(value)


def _choice(value: Any, choices: Sequence[str], where: str) -> str:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _convert(name: str, value: Any, where: str) -> Any:
    if name == "service_account_token_seconds":
        return _token_seconds(value, where)
    if name == "credential_secrets":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of Secret names")
        return _secret_names(value, where)
    if name in ("txn_token_keys_secret", "admin_token_secret", "envoy_config_map") and value:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        kind = "ConfigMap" if name == "envoy_config_map" else "Secret"
        problem = _secret_name_problem(value, kind)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        return value
    if name == "service_account_token_audience":
        if not isinstance(value, str) or any(c.isspace() for c in value):
            raise ConfigError(f"{where}: expected an audience without spaces, got {value!r}")
        return value
    if name in (
        "envoy_access_log",
        "allow_pod_audit_override",
        "allow_pod_mode_override",
        "allow_pod_opt_out",
    ):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if name == "tracing_sampling_percent":
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not 0 <= value <= 100
        ):
            raise ConfigError(f"{where}: expected a percentage from 0 to 100, got {value!r}")
        return float(value)
    if name == "otlp_endpoint":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        if value:
            otlp_target(value, where)
        return value
    if name == "envoy_config_overlay":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping (a part of Envoy's bootstrap)")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: not plain data ({exc}); quote dates and times") from None
        return dict(value)
    ints = {f.name for f in fields(InjectConfig) if f.type == "int"}
    if name in ints:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
            raise ConfigError(f"{where}: expected an integer 0-65535, got {value!r}")
        if name in ("workers", "envoy_concurrency") and value < 1:
            raise ConfigError(f"{where}: expected at least 1, got {value!r}")
        return value
    if name == "transport":
        return _choice(value, tuple(ENVOY_CONFIGS), where)
    if name == "mode":
        return _choice(value, MODES, where)
    if name == "audit":
        return _choice(value, AUDIT_MODES, where)
    if name in ("unknown_agent", "root_agents"):
        return _choice(value, ("refuse", "warn"), where)
    if name == "envoy_log_level":
        return _choice(value, ENVOY_LOG_LEVELS, where)
    if name == "state_volume":
        return _volume_source(value, where)
    if name == "audit_volume":
        return None if value is None else _volume_source(value, where)
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


def _secret_name_problem(name: str, kind: str = "Secret") -> str:
    """What is wrong with ``name`` as the name of a Secret (or ConfigMap) to mount; "" if
    nothing."""
    if not name:
        return f"an empty {kind} name"
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        where = f"it is mounted at {CREDENTIALS_DIR}/<name>/" if kind == "Secret" else ""
        return f"{name!r} looks like a path: name a {kind} in the pod's namespace" + (
            f"; {where}" if where else ""
        )
    if len(name) > 253 or not _SECRET_NAME_RE.match(name):
        return (
            f"{name!r} is not a {kind} name (a DNS-1123 subdomain: lower-case letters, digits, "
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
