"""The behaviour wing, on the supervisor: Envoy's access-log stream in (`access_log`: the
Access Log Service), the engine's risk scores out (`service`: scores published to the
context table, automatic revocations). The scoring itself is pure (`sidecar.core.behaviour`)."""
