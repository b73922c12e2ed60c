"""The Check wing: Envoy asks, mandate answers.

- `pipeline`: the transport-neutral half (request view, decide, audit, trace, response
  headers and deny bodies), shared by both transports;
- `grpc_transport`: `envoy.service.auth.v3.Authorization/Check` (grpcio, xds-protos);
- `http_transport`: Envoy's ext_authz `http_service` mode (aiohttp);
- `reload`: hot reload of the profile directory into whole immutable snapshots.

Imports the pure core, audit and telemetry; never the supervisor's state stores or
Kubernetes (the import contract in pyproject.toml)."""
