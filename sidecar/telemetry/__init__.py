"""The telemetry wing: decision spans (`tracing`, `tracecontext`, the OTLP wire format and
exporter `otlp_wire`, `otlp_export`; `tracing_sdk`, the OpenTelemetry SDK reference behind
`--tracer sdk`) and Prometheus metrics (`metrics`). Imports only the pure core and errors."""
