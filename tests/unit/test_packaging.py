"""The installed packages fit together (a fresh `make venv` is what CI runs)."""

from __future__ import annotations


def test_otlp_exporter_imports_despite_xds_protos_copy_of_opentelemetry_proto() -> None:
    """xds-protos installs an older copy of opentelemetry-proto's modules into the same
    files; the Makefile reinstalls opentelemetry-proto last. Without that, the exporter
    fails to import and every worker started with --otlp-endpoint exits."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    assert OTLPSpanExporter and InstrumentationScope


def test_envoy_protos_still_import_with_the_newer_opentelemetry_proto() -> None:
    from envoy.config.trace.v3 import opentelemetry_pb2
    from envoy.service.auth.v3 import external_auth_pb2

    assert opentelemetry_pb2.OpenTelemetryConfig and external_auth_pb2.CheckRequest
