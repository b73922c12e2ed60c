"""Through real Envoy: its gRPC access log (envoy/local*.yaml, `mandate_als`) reaches
mandate's Access Log Service, and every call, allowed or denied, arrives attributed to its
agent with mandate's code and decision id, the status Envoy answered and the bytes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack.local import ENVOY_DIR, render_envoy_config
from sidecar.behaviour.access_log import AccessLogServicer, start_als_server
from sidecar.core.behaviour import BehaviourEngine, BehaviourSettings, CallEvent
from tests.aio import on_loop_thread

from .conftest import (
    NAMESPACE,
    TEMPLATES,
    Stack,
    start_stack,
    stop_stack,
    validate_envoy_config,
)

LEDGER = "ledger.finance.svc.cluster.local"
REPORTS = "reports.finance.svc.cluster.local"
LOG_ONLY = ("x-mandate-code", "x-mandate-log-agent")


class Collector:
    """The ALS sink: every event, and a bounded wait for the ones a test expects."""

    def __init__(self) -> None:
        self.events: list[CallEvent] = []
        self._cond = threading.Condition()

    def __call__(self, events: list[CallEvent]) -> None:
        with self._cond:
            self.events.extend(events)
            self._cond.notify_all()

    def wait_for(self, match: Callable[[CallEvent], bool], timeout: float = 5.0) -> CallEvent:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if match(e)]
                if found:
                    assert len(found) == 1, found
                    return found[0]
                left = deadline - time.monotonic()
                assert left > 0, f"no such access log event after {timeout}s: {self.events}"
                self._cond.wait(left)


@pytest.fixture(scope="module")
def als() -> Iterator[tuple[Collector, AccessLogServicer, int]]:
    collector = Collector()
    servicer = AccessLogServicer(collector, namespace=NAMESPACE)
    with on_loop_thread(
        "als", lambda: start_als_server("127.0.0.1:0", servicer), lambda s: s[0].stop(None)
    ) as (_, port):
        yield collector, servicer, port


@pytest.fixture(scope="module")
def logged(
    tmp_path_factory: pytest.TempPathFactory,
    transport: str,
    als: tuple[Collector, AccessLogServicer, int],
) -> Iterator[tuple[Stack, Collector, AccessLogServicer]]:
    collector, servicer, port = als
    stack = start_stack(
        tmp_path_factory.mktemp(f"als-{transport}"),
        envoy_values={"ALS_PORT": port},
        transport=transport,
    )
    yield stack, collector, servicer
    stop_stack(stack)


def _path(tag: str, transport: str) -> str:
    return f"/v1/invoices/als-{tag}-{transport}"


def test_an_allowed_call_is_logged_with_its_agent_code_and_sizes(
    logged: tuple[Stack, Collector, AccessLogServicer], transport: str
) -> None:
    stack, collector, _ = logged
    path = _path("allowed", transport)
    resp = stack.call(
        "billing-agent",
        "GET",
        f"http://{LEDGER}:80{path}?expand=lines",
        headers={"x-mandate-code": "forged", "x-mandate-log-agent": "research-agent"},
    )
    assert resp.status == 200, resp.body
    seen = resp.json()
    # The log-only headers reach neither the upstream (the agent's own were removed) nor
    # the agent.
    for name in LOG_ONLY:
        assert name not in seen["mandate"], seen
        assert name not in resp.headers
    event = collector.wait_for(lambda e: e.path == path)
    assert (event.agent, event.namespace, event.code, event.allowed) == (
        "billing-agent",
        NAMESPACE,
        "allowed",
        True,
    )
    assert (event.method, event.host, event.status) == ("GET", LEDGER, 200)
    assert event.decision_id == seen["mandate"]["x-mandate-decision"]
    assert event.bytes_sent == len(resp.body) and event.bytes_received == 0
    assert abs(event.at - time.time()) < 10


def test_a_denied_call_is_logged_with_its_agent_and_code(
    logged: tuple[Stack, Collector, AccessLogServicer], transport: str
) -> None:
    stack, collector, _ = logged
    path = f"/v1/ledger/admin/als-denied-{transport}"
    resp = stack.call("billing-agent", "GET", f"http://{LEDGER}{path}")
    assert resp.status == 403, resp.body
    for name in (*LOG_ONLY, "x-mandate-agent"):
        assert name not in resp.headers
    body = resp.json()
    event = collector.wait_for(lambda e: e.path == path)
    assert (event.agent, event.code, event.allowed, event.status) == (
        "billing-agent",
        "denied_by_rule",
        False,
        403,
    )
    assert event.decision_id == body["decision"]
    assert event.bytes_sent == len(resp.body)


def test_request_body_bytes_are_counted(
    logged: tuple[Stack, Collector, AccessLogServicer], transport: str
) -> None:
    stack, collector, _ = logged
    path = f"/v1/reports/als-{transport}"
    body = b'{"month": "2026-01", "lines": ' + b"[1, 2, 3]" * 20 + b"}"
    resp = stack.call(
        "billing-agent",
        "POST",
        f"http://{REPORTS}{path}",
        headers={"x-mandate-purpose": "report", "content-type": "application/json"},
        body=body,
    )
    assert resp.status == 200, resp.body
    event = collector.wait_for(lambda e: e.path == path)
    assert (event.method, event.code, event.bytes_received) == ("POST", "allowed", len(body))


def test_a_denied_tunnel_is_logged(
    logged: tuple[Stack, Collector, AccessLogServicer], transport: str
) -> None:
    """CONNECT: over gRPC ext_authz asks; over HTTP the Lua filter does, and copies the
    same answer headers into the metadata."""
    stack, collector, _ = logged
    target = f"als-{transport}.example.com:443"
    with socket.create_connection(("127.0.0.1", stack.port("tunnel-agent")), timeout=5) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = sock.recv(4096)
    assert head.split(b" ", 2)[1] == b"403", head
    event = collector.wait_for(lambda e: e.host == f"als-{transport}.example.com")
    assert (event.agent, event.method, event.code, event.allowed, event.status) == (
        "tunnel-agent",
        "CONNECT",
        "outside_purpose",
        False,
        403,
    )
    assert len(event.decision_id) == 32


def test_calls_envoy_refuses_before_mandate_are_skipped(
    logged: tuple[Stack, Collector, AccessLogServicer], transport: str
) -> None:
    """An escaped slash is refused by Envoy itself (400): mandate never decided, so
    the entry names no agent and is skipped, not attributed."""
    stack, collector, servicer = logged
    before = servicer.stats()["skipped"]
    resp = stack.call("billing-agent", "GET", f"http://{LEDGER}/v1/invoices/a%2Fb-{transport}")
    assert resp.status == 400
    deadline = time.monotonic() + 5
    while servicer.stats()["skipped"] == before:
        assert time.monotonic() < deadline, servicer.stats()
        time.sleep(0.05)
    assert not [e for e in collector.events if "a%2Fb" in e.path]


def test_the_events_feed_the_behaviour_engine(
    logged: tuple[Stack, Collector, AccessLogServicer], transport: str
) -> None:
    stack, collector, _ = logged
    path = _path("engine", transport)
    for _ in range(3):
        assert stack.call("research-agent", "GET", f"http://export.arxiv.org{path}").status == 200
    deadline = time.monotonic() + 5
    while len([e for e in collector.events if e.path == path]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    engine = BehaviourEngine()
    settings = BehaviourSettings(learning_seconds=0.0, min_calls=1)
    for event in [e for e in collector.events if e.path == path]:
        engine.observe(event, settings)
    assert engine.agents() == [(NAMESPACE, "research-agent")]
    risk = engine.score(NAMESPACE, "research-agent", time.time(), settings)
    assert risk.calls == 3 and not risk.learning


@pytest.mark.parametrize("name", list(TEMPLATES.values()))
def test_local_configs_with_the_als_validate(tmp_path: Path, name: str) -> None:
    config = render_envoy_config(
        ENVOY_DIR / name,
        {"ADMIN_PORT": 0, "LISTEN_PORT": 0, "MANDATE_PORT": 9001, "UPSTREAM_PORT": 8080,
         "ACCESS_LOG": "/dev/null"},
        agents=["billing-agent"],
        als_port=9003,
    )  # fmt: skip
    assert "mandate_als" in config
    validate_envoy_config(config, tmp_path)


def test_without_an_als_port_nothing_of_it_is_rendered() -> None:
    for name in TEMPLATES.values():
        config = render_envoy_config(
            ENVOY_DIR / name,
            {"ADMIN_PORT": 0, "LISTEN_PORT": 0, "MANDATE_PORT": 9001, "UPSTREAM_PORT": 8080,
             "ACCESS_LOG": "/dev/null"},
        )  # fmt: skip
        assert "mandate_als" not in config and "http_grpc" not in config
        assert "envoy.access_loggers.file" in config
