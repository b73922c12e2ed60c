"""The Check wing: Envoy asks, mandate answers.

- `request`: what Envoy sent as the pure request view (a BadRequestError is the typed bad
  request);
- `pipeline`: `CheckPipeline.check`, the one path of every Check: view, decide, rate,
  audit, answer (with its fallback), metrics and span;
- `response`: the headers an allowed call carries upstream and a deny's body;
- `grpc_transport`: `envoy.service.auth.v3.Authorization/Check` (grpcio, xds-protos);
- `http_transport`: Envoy's ext_authz `http_service` mode (aiohttp);
- `http_lean`: the same mode on httptools and uvloop (`--http-server lean`);
- `http_wire`: what the two HTTP servers share (the path prefix, the view, the answer);
- `reload`: hot reload of the profile directory into whole immutable snapshots.

Imports the pure core, audit and telemetry; never the supervisor's state stores or
Kubernetes (the import contract in pyproject.toml)."""
