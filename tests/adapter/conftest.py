"""Fixtures of the adapter tests: a fresh copy of the demo profiles per test, a builder of
CheckRequests shaped the way Envoy's ext_authz filter sends them, and the HTTP transport's
servers, one per run of a test."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

from sidecar.check.http_lean import HttpLeanServer
from sidecar.check.http_transport import HttpAuthzServer
from sidecar.core import Snapshot, load_profiles
from sidecar.settings import HTTP_SERVERS, HttpServer

DEMO_PROFILES = Path(__file__).resolve().parents[2] / "devstack" / "demo" / "profiles"

BILLING_SPIFFE = "spiffe://cluster.local/ns/agents/sa/billing-agent"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

CheckBuilder = Callable[..., external_auth_pb2.CheckRequest]


@pytest.fixture
def profiles_dir(tmp_path: Path) -> Path:
    """A directory holding a private copy of the demo profiles (billing-agent, research-agent)."""
    directory = tmp_path / "profiles"
    directory.mkdir()
    shutil.copy(DEMO_PROFILES / "agents.yaml", directory / "agents.yaml")
    return directory


@pytest.fixture
def snapshot(profiles_dir: Path) -> Snapshot:
    return load_profiles(profiles_dir)


def build_check(
    method: str = "GET",
    url_host: str = "ledger.finance.svc.cluster.local",
    path: str = "/v1/invoices/42?expand=lines",
    *,
    scheme: str = "http",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    partial_body: bool = False,
    content_length: int | None = None,
    agent: str | None = None,
    principal: str = "",
    extra: Mapping[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest as Envoy sends it: pseudo-headers in the map, lower-case names,
    `x-envoy-auth-partial-body` when a body is buffered, `raw_body` for bytes
    (``with_request_body.pack_as_bytes``), the route's context_extensions."""
    all_headers: dict[str, str] = {
        ":authority": url_host,
        ":path": path,
        ":method": method,
        ":scheme": scheme,
        "user-agent": "python-httpx/0.28.1",
        "accept": "*/*",
        "x-forwarded-proto": scheme,
        "x-request-id": "6a4a1f9e-6c1b-4e0e-9c47-2a6f1d1f7b11",
    }
    if body is not None:
        all_headers["content-type"] = "application/json"
        all_headers["content-length"] = str(len(body) if content_length is None else content_length)
        all_headers["x-envoy-auth-partial-body"] = "true" if partial_body else "false"
    all_headers.update({k.lower(): v for k, v in (headers or {}).items()})
    http: dict[str, Any] = {
        "id": "13579024680",
        "method": method,
        "headers": all_headers,
        "path": path,
        "host": url_host,
        "scheme": scheme,
        "protocol": "HTTP/1.1",
    }
    if body is not None:
        http["raw_body"] = body
        http["size"] = len(body) if content_length is None else content_length
    extensions = dict(extra or {})
    if agent is not None:
        extensions["agent"] = agent
    ctx = attribute_context_pb2.AttributeContext(
        source=attribute_context_pb2.AttributeContext.Peer(principal=principal),
        request=attribute_context_pb2.AttributeContext.Request(
            http=attribute_context_pb2.AttributeContext.HttpRequest(**http)
        ),
        context_extensions=extensions,
    )
    ctx.source.address.socket_address.address = "10.0.3.7"
    ctx.source.address.socket_address.port_value = 48312
    ctx.destination.address.socket_address.address = "127.0.0.1"
    ctx.destination.address.socket_address.port_value = 15001
    return external_auth_pb2.CheckRequest(attributes=ctx)


@pytest.fixture
def make_check() -> CheckBuilder:
    return build_check


# The HTTP transport's two servers (--http-server): each HTTP transport test runs once per
# server (ids aiohttp, lean), so that the contract is shown for both.
HTTP_SERVER_CLASSES: dict[HttpServer, type[HttpAuthzServer | HttpLeanServer]] = {
    "aiohttp": HttpAuthzServer,
    "lean": HttpLeanServer,
}


@pytest.fixture(params=HTTP_SERVERS)
def http_server(request: pytest.FixtureRequest) -> HttpServer:
    return cast("HttpServer", request.param)
