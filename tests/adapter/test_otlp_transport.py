"""GrpcTransport, the span exporter's connection, against real grpcio TraceService servers
on 127.0.0.1 (port 0) or a unix socket, over TLS with a client certificate, and against
peers that misbehave: what arrives is the request sent, a failure is a grpc.RpcError with
a status the exporter's retry policy knows, and no call outlives its deadline."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from sidecar.errors import ConfigError
from sidecar.telemetry import otlp_wire
from sidecar.telemetry.otlp_export import ExportSettings, GrpcTransport, _describe


def transport(target: str, env: dict[str, str] | None = None) -> GrpcTransport:
    return GrpcTransport(ExportSettings.from_env(target, env or {}))


def request(n_spans: int, pad: int = 0) -> bytes:
    enc = otlp_wire.SpanEncoder("mandate.authorize", otlp_wire.SPAN_KIND_SERVER)
    attrs = [otlp_wire.span_attribute("pad", "x" * pad)] if pad else []
    spans = [
        enc.encode(bytes(range(1, 17)), i.to_bytes(8, "big"), b"", "", i, i, b"".join(attrs), False)
        for i in range(1, n_spans + 1)
    ]
    return otlp_wire.export_request(
        otlp_wire.resource({"service.name": "mandate"}), otlp_wire.scope("mandate"), spans
    )


class Service(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """Keeps what it receives; `behave` may sleep or abort instead."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.metadata: list[dict[str, Any]] = []
        self.behave: Any = None

    def Export(self, req: Any, context: Any) -> Any:
        if self.behave is not None:
            self.behave(context)
        self.received.append(req.SerializeToString())
        self.metadata.append(dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


def start(
    address: str,
    credentials: grpc.ServerCredentials | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> tuple[Service, grpc.Server, int]:
    service = Service()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=options or [])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    return service, server, port


@pytest.fixture
def receiver() -> Iterator[tuple[Service, int]]:
    service, server, port = start("127.0.0.1:0")
    yield service, port
    server.stop(0).wait(5)


def test_a_request_larger_than_the_flow_control_windows_arrives_whole(
    receiver: tuple[Service, int],
) -> None:
    service, port = receiver
    big = request(3_000, pad=300)  # ~1.2 MB: many windows of 64 KiB
    assert len(big) > 1_000_000
    t = transport(f"http://127.0.0.1:{port}", {"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=finance"})
    t.send(big, 10)
    t.send(request(2), 10)  # the same connection serves the next call
    t.close()
    assert service.received == [big, request(2)]
    assert service.metadata[0]["x-tenant"] == "finance"
    assert service.metadata[0]["user-agent"].startswith("mandate/")


def test_gzip_requests_are_decompressed_by_the_receiver(receiver: tuple[Service, int]) -> None:
    service, port = receiver
    t = transport(f"http://127.0.0.1:{port}", {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    t.send(request(50), 10)
    t.close()
    assert service.received == [request(50)]


def test_a_connection_the_receiver_closed_while_idle_is_replaced_without_a_failure() -> None:
    service, server, port = start("127.0.0.1:0", options=[("grpc.max_connection_idle_ms", 200)])
    try:
        t = transport(f"http://127.0.0.1:{port}")
        t.send(request(1), 5)
        time.sleep(1.0)  # the server sends GOAWAY and closes the idle connection
        t.send(request(2), 5)  # no ExportFailed: a fresh connection
        t.close()
        assert service.received == [request(1), request(2)]
    finally:
        server.stop(0).wait(5)


def test_the_receivers_status_message_and_retry_delay_come_back(
    receiver: tuple[Service, int],
) -> None:
    service, port = receiver
    info = RetryInfo(retry_delay=Duration(seconds=2, nanos=500_000_000))

    def refuse(context: Any) -> None:
        context.set_trailing_metadata((("google.rpc.retryinfo-bin", info.SerializeToString()),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down: 100% füll")

    service.behave = refuse
    t = transport(f"http://127.0.0.1:{port}")
    with pytest.raises(grpc.RpcError) as failed:
        t.send(request(1), 5)
    assert failed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failed.value.details() == "slow down: 100% füll"
    assert _describe(failed.value, 0, 1.0)[2] == 2.5  # the exporter waits what was asked
    service.behave = None
    t.send(request(1), 5)  # and the next call goes through
    t.close()


def test_a_slow_receiver_fails_the_call_at_its_deadline(receiver: tuple[Service, int]) -> None:
    service, port = receiver
    release = threading.Event()
    service.behave = lambda context: release.wait(5)
    t = transport(f"http://127.0.0.1:{port}")
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as failed:
        t.send(request(1), 0.3)
    took = time.monotonic() - began
    release.set()
    # the receiver's own deadline (grpc-timeout) or ours, whichever noticed first
    assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 2.0
    service.behave = None
    t.send(request(2), 5)
    t.close()


def test_nothing_listening_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        t = transport(f"http://127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError) as failed:
            t.send(request(1), 2)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", grpc.StatusCode.UNAVAILABLE),
        (b"", grpc.StatusCode.UNAVAILABLE),  # closes at once
        (None, grpc.StatusCode.DEADLINE_EXCEEDED),  # accepts, reads, never answers
    ],
    ids=["http1", "closes", "silent"],
)
def test_a_peer_that_is_not_a_grpc_server_fails_the_call_within_its_deadline(
    answer: bytes | None, code: grpc.StatusCode
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        held.append(conn)
        conn.recv(65_536)
        if answer is not None:
            conn.sendall(answer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        t = transport(f"http://127.0.0.1:{listener.getsockname()[1]}")
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            t.send(request(1), 0.5)
        assert time.monotonic() - began < 2.0
        assert failed.value.code() is code
        t.close()
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_a_unix_socket_target(tmp_path: Path) -> None:
    path = tmp_path / "otlp.sock"
    service, server, _ = start(f"unix:{path}")
    try:
        t = transport(f"unix://{path}")
        t.send(request(3), 5)
        t.close()
        assert service.received == [request(3)]
    finally:
        server.stop(0).wait(5)


def _self_signed(out: Path, name: str) -> tuple[Path, Path]:
    key, cert = out / f"{name}.key", out / f"{name}.crt"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make the test certificates")
    out = tmp_path_factory.mktemp("pki")
    server_key, server_cert = _self_signed(out, "receiver")
    client_key, client_cert = _self_signed(out, "mandate")
    _, other_cert = _self_signed(out, "stranger")
    return {
        "server_key": server_key, "server_cert": server_cert,
        "client_key": client_key, "client_cert": client_cert,
        "other_cert": other_cert,
    }  # fmt: skip


def test_tls_with_the_configured_ca_and_a_client_certificate(pki: dict[str, Path]) -> None:
    credentials = grpc.ssl_server_credentials(
        [(pki["server_key"].read_bytes(), pki["server_cert"].read_bytes())],
        root_certificates=pki["client_cert"].read_bytes(),
        require_client_auth=True,
    )
    service, server, port = start("127.0.0.1:0", credentials)
    env = {
        "OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki["server_cert"]),
        "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(pki["client_key"]),
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": str(pki["client_cert"]),
    }
    settings = ExportSettings.from_env(f"https://localhost:{port}", env)
    assert settings.secure and settings.root_certificates == pki["server_cert"].read_bytes()
    assert settings.private_key == pki["client_key"].read_bytes()
    assert settings.certificate_chain == pki["client_cert"].read_bytes()
    try:
        for host in ("127.0.0.1", "localhost"):
            t = GrpcTransport(ExportSettings.from_env(f"https://{host}:{port}", env))
            t.send(request(2), 5)
            t.close()
        assert service.received == [request(2)] * 2
        # a receiver whose certificate the CA did not sign is refused
        wrong = dict(env, OTEL_EXPORTER_OTLP_CERTIFICATE=str(pki["other_cert"]))
        t = GrpcTransport(ExportSettings.from_env(f"https://127.0.0.1:{port}", wrong))
        with pytest.raises(grpc.RpcError) as failed:
            t.send(request(1), 5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert failed.value.details()
        # and without the client certificate, the receiver refuses us
        no_client = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(pki["server_cert"])}
        t = GrpcTransport(ExportSettings.from_env(f"https://127.0.0.1:{port}", no_client))
        with pytest.raises(grpc.RpcError) as failed:
            t.send(request(1), 5)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert len(service.received) == 2
    finally:
        server.stop(0).wait(5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_EXPORTER_OTLP_CERTIFICATE": "junk"},
            "OTEL_EXPORTER_OTLP_CERTIFICATE=.*junk.pem.*not a PEM certificate",
        ),
        ({"OTEL_EXPORTER_OTLP_CLIENT_KEY": "client_key"}, "go together"),
        ({"OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "client_cert"}, "go together"),
        (
            {
                "OTEL_EXPORTER_OTLP_CLIENT_KEY": "client_key",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "other_cert",
            },
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE=.*stranger.crt.*OTEL_EXPORTER_OTLP_CLIENT_KEY",
        ),
    ],
    ids=["junk-ca", "key-alone", "cert-alone", "key-of-another-cert"],
)
def test_tls_files_that_do_not_load_are_config_errors_naming_the_variable(
    pki: dict[str, Path], tmp_path: Path, env: dict[str, str], message: str
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    files = {**pki, "junk": junk}
    with pytest.raises(ConfigError, match=message):
        ExportSettings.from_env("https://c:4317", {k: str(files[v]) for k, v in env.items()})
    # plaintext ignores the TLS variables, as the SDK exporter does
    ExportSettings.from_env("http://c:4317", {k: str(files[v]) for k, v in env.items()})
