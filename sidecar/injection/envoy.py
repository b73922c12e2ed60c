"""Envoy's command line in an injected pod: the image's config, and what the operator's
injector config changes in it, passed with ``--config-yaml``.

Envoy merges ``--config-yaml`` into the bootstrap read with ``-c`` (protobuf merge: maps
merge, repeated fields append), so an overlay can add clusters and runtime layers but not
change a listener. The image's configs (envoy/sidecar*.yaml) are written for that:

- Tracing: the listener's HTTP connection manager has the OpenTelemetry tracer, sampling
  0 %, and its gRPC service names the cluster :data:`OTEL_CLUSTER`, which the image does
  not define: by default Envoy has no collector and exports nothing, anywhere (a call the
  agent marks sampled still has nowhere to go). With ``otlpEndpoint`` set, the overlay adds
  that cluster and a runtime layer setting ``tracing.random_sampling`` (Envoy's key for the
  connection manager's ``random_sampling``) to ``tracingSamplingPercent``.
- The JSON access log on Envoy's stdout has a runtime filter (:data:`ACCESS_LOG_KEY`):
  ``envoyAccessLog: false`` sets it to 0 %. The access log to mandate (behaviour analysis)
  has none: it is never turned off.
- ``envoyConfigOverlay`` is merged last, by the same rules.

Pure: a config in, a list of arguments out; no I/O.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from sidecar.injection.config import InjectConfig, otlp_target

__all__ = [
    "ACCESS_LOG_KEY",
    "OTEL_CLUSTER",
    "RUNTIME_LAYER",
    "SAMPLING_KEY",
    "bootstrap_overlay",
    "envoy_args",
    "merge",
]

OTEL_CLUSTER = "mandate_otel_collector"  # named in envoy/sidecar*.yaml, defined by the overlay
SAMPLING_KEY = "tracing.random_sampling"  # Envoy's runtime key for HCM random_sampling
ACCESS_LOG_KEY = "mandate.access_log.stdout"  # envoy/sidecar*.yaml: the stdout log's filter
RUNTIME_LAYER = "mandate-injector"
# The system CA bundle of mandate's image (Debian's ca-certificates), for https:// collectors.
_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _collector_cluster(endpoint: str) -> dict[str, Any]:
    scheme, host, port = otlp_target(endpoint)
    cluster: dict[str, Any] = {
        "name": OTEL_CLUSTER,
        # A Service name resolves to its ClusterIP (or a headless Service's pods).
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": OTEL_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if scheme == "https":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "validation_context": {
                        "trusted_ca": {"filename": _CA_BUNDLE},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": host}}
                        ],
                    },
                },
            },
        }
    return cluster


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base`` as Envoy merges ``--config-yaml``: maps member by
    member, lists appended, anything else replaced. Neither argument is changed."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def bootstrap_overlay(config: InjectConfig) -> dict[str, Any]:
    """What the injector merges into Envoy's bootstrap for ``config``; {} for the image's
    config unchanged (tracing off, access log on, no overlay of the operator's)."""
    overlay: dict[str, Any] = {}
    layer: dict[str, Any] = {}
    if config.otlp_endpoint:
        overlay["static_resources"] = {"clusters": [_collector_cluster(config.otlp_endpoint)]}
        # A fraction of a million: 1 % is 10000, 0.01 % is 100.
        layer[SAMPLING_KEY] = {
            "numerator": round(config.tracing_sampling_percent * 10_000),
            "denominator": "MILLION",
        }
    if not config.envoy_access_log:
        layer[ACCESS_LOG_KEY] = 0  # percent of calls logged
    if layer:
        overlay["layered_runtime"] = {"layers": [{"name": RUNTIME_LAYER, "static_layer": layer}]}
    return merge(overlay, config.envoy_config_overlay)


def envoy_args(config: InjectConfig) -> list[str]:
    """The arguments of ``envoy`` in the injected mandate-envoy container."""
    args = [
        "-c",
        config.envoy_config_path,
        "--disable-hot-restart",
        "--concurrency",
        str(config.envoy_concurrency),
        "--log-level",
        config.envoy_log_level,
    ]
    overlay = bootstrap_overlay(config)
    if overlay:
        # JSON is YAML: one compact line in the pod spec, keys sorted so that the same
        # config always gives the same pod (idempotent injection, stable diffs).
        args += ["--config-yaml", json.dumps(overlay, sort_keys=True, separators=(",", ":"))]
    return args
