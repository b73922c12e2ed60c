"""The real sidecar: grpcio server, gRPC health and the admin HTTP server, on 127.0.0.1:0.
The Check and health tests run on both gRPC server shapes (`--grpc-server threads|aio`);
the aio shape's fallback to the thread-pool server is tested at the end."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar import DEFAULT_THREADS
from sidecar.errors import ConfigError, ProfileErrors
from sidecar.run.worker import Sidecar
from sidecar.settings import (
    AdminSettings,
    CheckSettings,
    GrpcServer,
    IdentitySettings,
    ProfileSettings,
    Settings,
    WorkerSettings,
)

from .conftest import TRACE_ID, TRACEPARENT, CheckBuilder

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TOKEN = "grpc-server-test-admin-token-0123456789"


def config(
    profiles: Path,
    *,
    listen: str = "127.0.0.1:0",
    admin: str = "127.0.0.1:0",
    threads: int = DEFAULT_THREADS,
    port_file: Path | None = None,
    grpc_server: GrpcServer = "threads",
) -> WorkerSettings:
    """A single-process sidecar with its admin server (Sidecar(..., admin_token=TOKEN):
    readiness details, `/readyz?verbose=1`, need the token)."""
    return WorkerSettings(
        run=Settings(
            profiles=ProfileSettings(profiles, poll_seconds=0.2),
            check=CheckSettings(listen=listen, threads=threads, grpc_server=grpc_server),
            identity=IdentitySettings(agent="billing-agent", namespace=""),
            admin=AdminSettings(listen=admin),
            port_file=port_file,
        ),
        serve_admin=True,
    )


@pytest.fixture(params=["threads", "aio"])
def grpc_server(request: pytest.FixtureRequest) -> GrpcServer:
    """The gRPC server shape (`--grpc-server`): each test that takes a sidecar runs on both."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def sidecar(profiles_dir: Path, grpc_server: GrpcServer) -> Iterator[Sidecar]:
    s = Sidecar(config(profiles_dir, grpc_server=grpc_server), admin_token=TOKEN)
    s.start()
    try:
        yield s
    finally:
        s.stop(grace=0.2)


@pytest.fixture
def channel(sidecar: Sidecar) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(
        f"127.0.0.1:{sidecar.grpc_port}", options=[("grpc.enable_http_proxy", 0)]
    )
    try:
        grpc.channel_ready_future(ch).result(timeout=5)
        yield ch
    finally:
        ch.close()


def http_get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _NO_PROXY.open(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = http_get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def decisions(m: dict[tuple[str, frozenset[tuple[str, str]]], float], **labels: str) -> float:
    """mandate_decisions_total summed over the samples with these labels (and any others)."""
    want = set(labels.items())
    return sum(
        v for (name, have), v in m.items() if name == "mandate_decisions_total" and want <= have
    )


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} not reached within {timeout} s")


def test_check_over_grpc_allow_and_deny(channel: grpc.Channel, make_check: CheckBuilder) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    ok = stub.Check(make_check(headers={"x-mandate-foo": "x"}), timeout=5)
    assert ok.status.code == code_pb2.OK
    set_headers = {h.header.key: h.header.value for h in ok.ok_response.headers}
    assert set_headers["x-mandate-agent"] == "billing-agent"
    assert set_headers["x-mandate-decision"] == ok.dynamic_metadata["decision_id"]
    assert list(ok.ok_response.headers_to_remove) == ["x-mandate-foo"]

    req = make_check(path="/v1/ledger/admin/purge", headers={"traceparent": TRACEPARENT})
    denied = stub.Check(req, timeout=5)
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert denied.denied_response.status.code == 403
    body = json.loads(denied.denied_response.body)
    assert body["error"] == "denied_by_rule"
    assert body["trace_id"] == TRACE_ID

    # an empty request is answered (deny), not failed at the gRPC level
    empty = stub.Check(external_auth_pb2.CheckRequest(), timeout=5)
    assert empty.status.code == code_pb2.PERMISSION_DENIED


def test_concurrent_checks(channel: grpc.Channel, make_check: CheckBuilder) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    paths = [f"/v1/invoices/{i}" if i % 2 else f"/v1/ledger/admin/{i}" for i in range(64)]
    futures = [stub.Check.future(make_check(path=p), timeout=10) for p in paths]
    codes = [f.result().status.code for f in futures]
    assert codes == [code_pb2.OK if i % 2 else code_pb2.PERMISSION_DENIED for i in range(64)]
    ids = {f.result().dynamic_metadata["decision_id"] for f in futures}
    assert len(ids) == 64


def test_grpc_health_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in (AUTHZ_SERVICE, ""):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_admin_health_readiness_and_metrics(
    sidecar: Sidecar, channel: grpc.Channel, make_check: CheckBuilder
) -> None:
    status, body = http_get(sidecar.admin_port, "/healthz")
    assert status == 200
    assert json.loads(body) == {"status": "alive"}

    status, body = http_get(sidecar.admin_port, "/readyz", token=None)
    assert (status, json.loads(body)) == (200, {"ready": True})  # open: no details
    status, _ = http_get(sidecar.admin_port, "/readyz?verbose=1", token=None)
    assert status == 401
    status, body = http_get(sidecar.admin_port, "/readyz?verbose=1")
    assert status == 200
    ready = json.loads(body)
    assert ready["ready"] is True
    assert ready["profiles"]["ok"] is True
    assert ready["profiles"]["agents"] == 2
    assert sidecar.holder.current is not None
    assert ready["profiles"]["version"] == sidecar.holder.current.version != ""

    before = samples(sidecar.admin_port)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    for _ in range(3):
        assert stub.Check(make_check(), timeout=5).status.code == code_pb2.OK
    for _ in range(2):
        denied = stub.Check(make_check(path="/v1/ledger/admin/x"), timeout=5)
        assert denied.status.code == code_pb2.PERMISSION_DENIED
    after = samples(sidecar.admin_port)

    allow = {"agent": "billing-agent", "decision": "allow", "code": "allowed"}
    deny = {"agent": "billing-agent", "decision": "deny", "code": "denied_by_rule"}
    assert decisions(after, **allow) - decisions(before, **allow) == 3
    assert decisions(after, **deny) - decisions(before, **deny) == 2
    count = ("mandate_check_duration_seconds_count", frozenset())
    assert after[count] - before.get(count, 0.0) == 5
    assert ("mandate_check_duration_seconds_bucket", frozenset({("le", "+Inf")})) in after
    assert after[("mandate_profiles_stale", frozenset())] == 0
    assert after[("mandate_profile_agents", frozenset())] == 2

    status, _ = http_get(sidecar.admin_port, "/no-such-page")
    assert status == 404


def test_profile_edit_reaches_readiness_and_checks(
    sidecar: Sidecar, channel: grpc.Channel, make_check: CheckBuilder, profiles_dir: Path
) -> None:
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    req = make_check(path="/v1/ledger/admin/purge")
    assert stub.Check(req, timeout=5).status.code == code_pb2.PERMISSION_DENIED
    first = json.loads(http_get(sidecar.admin_port, "/readyz?verbose=1")[1])["profiles"]["version"]

    # lift the deny rule: the same call is allowed once the reload is in force
    agents = profiles_dir / "agents.yaml"
    text = agents.read_text()
    edited = text.replace('paths: ["/v1/ledger/admin/**"]', 'paths: ["/v1/nothing/**"]')
    assert edited != text
    agents.write_text(edited)
    wait_for(
        lambda: stub.Check(req, timeout=5).status.code == code_pb2.OK, what="reload of the edit"
    )
    ready = json.loads(http_get(sidecar.admin_port, "/readyz?verbose=1")[1])
    assert ready["profiles"]["version"] != first
    assert ready["profiles"]["ok"] is True

    # a broken edit: still ready and still enforcing the last good version, but not ok
    agents.write_text(edited.replace("defaultPurpose: reconcile", "defaultPurpose: [oops"))
    wait_for(
        lambda: (
            json.loads(http_get(sidecar.admin_port, "/readyz?verbose=1")[1])["profiles"]["ok"]
            is False
        ),
        what="failed reload visible in /readyz",
    )
    status, body = http_get(sidecar.admin_port, "/readyz?verbose=1")
    assert status == 200
    ready = json.loads(body)
    assert ready["ready"] is True
    assert "agents.yaml" in ready["profiles"]["last_error"]
    assert stub.Check(req, timeout=5).status.code == code_pb2.OK


def test_port_file(profiles_dir: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    s = Sidecar(config(profiles_dir, port_file=port_file), admin_token=TOKEN)
    try:
        s.start()
        ports = json.loads(port_file.read_text())
        assert ports["grpc"] == s.grpc_port > 0
        assert ports["admin"] == s.admin_port > 0
    finally:
        s.stop(grace=0.2)


def test_invalid_profiles_refuse_to_start(profiles_dir: Path) -> None:
    agents = profiles_dir / "agents.yaml"
    agents.write_text(agents.read_text().replace("owner: data-science", "owner: [1, 2]"))
    s = Sidecar(config(profiles_dir), admin_token=TOKEN)
    try:
        with pytest.raises(ProfileErrors) as err:
            s.start()
        assert "agents.yaml, document 2, spec.owner" in str(err.value)
        assert s.grpc_port == 0 and s.admin_port == 0
    finally:
        s.stop(grace=0.2)


@pytest.mark.parametrize(
    "kw",
    [
        {"listen": "nonsense"},
        {"listen": "127.0.0.1:99999"},
        {"listen": "127.0.0.1:"},
        {"admin": "127.0.0.1"},
        {"admin": "127.0.0.1:http"},
        {"threads": 0},
    ],
    ids=lambda kw: f"{next(iter(kw))}={next(iter(kw.values()))}",
)
def test_bad_config_raises_config_error(profiles_dir: Path, kw: dict[str, Any]) -> None:
    """Refused when the settings are built, before anything starts."""
    with pytest.raises(ConfigError, match=f"--{next(iter(kw))}"):
        config(profiles_dir, **kw)


@pytest.mark.parametrize("grpc_server", ["threads", "aio"])
@pytest.mark.parametrize("which", ["listen", "admin"])
def test_port_in_use_raises_config_error(
    profiles_dir: Path, which: str, grpc_server: GrpcServer
) -> None:
    """A Check address in use is the address's fault: refused on both shapes (the aio
    shape does not fall back to the thread-pool server over it)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(profiles_dir, grpc_server=grpc_server, **{which: f"127.0.0.1:{port}"})
        s = Sidecar(cfg, admin_token=TOKEN)
        try:
            with pytest.raises(ConfigError, match=f"--{which}"):
                s.start()
        finally:
            s.stop(grace=0.2)


def _served_by(s: Sidecar) -> str:
    return "aio" if s._aio is not None else "threads" if s._server is not None else "none"


def _answers(port: int, make_check: CheckBuilder) -> None:
    """One allowed and one denied Check, and gRPC health, on ``port``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        assert stub.Check(make_check(), timeout=5).status.code == code_pb2.OK
        denied = stub.Check(make_check(path="/v1/ledger/admin/purge"), timeout=5)
        assert denied.status.code == code_pb2.PERMISSION_DENIED
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_aio_shape_serves_on_its_own_loop(profiles_dir: Path, make_check: CheckBuilder) -> None:
    """--grpc-server aio: Checks answered on the `check-aio` loop thread, no thread pool."""
    s = Sidecar(config(profiles_dir, grpc_server="aio"), admin_token=TOKEN)
    s.start()
    try:
        assert _served_by(s) == "aio"
        _answers(s.grpc_port, make_check)
        assert s._aio is not None and s.serving()
        loop = s._aio._thread.loop
        loop.call_soon_threadsafe(loop.stop)  # the loop ends, unasked: liveness must see it
        deadline = time.monotonic() + 5
        while s.serving() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not s.serving()
    finally:
        s.stop(grace=0.2)


@pytest.mark.parametrize(
    "breakage",
    ["no grpc.aio", "start fails"],
)
def test_aio_shape_falls_back_to_thread_pool(
    profiles_dir: Path,
    make_check: CheckBuilder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    breakage: str,
) -> None:
    """A grpcio that cannot run the aio shape (grpc.aio or grpc_health's aio servicer
    missing, or the aio server failing to start for another reason than the address) serves
    with the thread-pool server, and says so once in the log."""
    from sidecar.check import grpc_aio

    if breakage == "no grpc.aio":
        monkeypatch.setattr(grpc_aio, "aio_unavailable", lambda: "ImportError: no grpc.aio")
    else:

        async def broken(self: grpc_aio.GrpcAioServer) -> None:
            raise RuntimeError("grpc.aio: cannot initialise (an older grpcio)")

        monkeypatch.setattr(grpc_aio.GrpcAioServer, "_start", broken)
    caplog.set_level(logging.WARNING, logger="sidecar.check.grpc_aio")
    s = Sidecar(config(profiles_dir, grpc_server="aio"), admin_token=TOKEN)
    s.start()
    try:
        assert _served_by(s) == "threads"
        _answers(s.grpc_port, make_check)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "--grpc-server aio cannot run on grpcio" in warnings[0]
        assert "thread-pool server" in warnings[0]
    finally:
        s.stop(grace=0.2)


def test_aio_unavailable_on_this_grpcio() -> None:
    """The pinned grpcio runs the aio shape (else the fallback would hide a broken pin)."""
    from sidecar.check.grpc_aio import aio_unavailable

    assert aio_unavailable() is None
