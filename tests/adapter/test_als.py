"""The Access Log Service: a real grpc.aio server on 127.0.0.1:0 (or a unix socket), on an
event loop of its own (as on the supervisor's), and a real client streaming
StreamAccessLogsMessages shaped as Envoy's http_grpc logger sends them (metadata as each
transport's answer leaves it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

import sidecar.behaviour.access_log
from sidecar.behaviour.access_log import AccessLogServicer, event_from_entry, start_als_server
from sidecar.core.behaviour import CallEvent
from tests.aio import on_loop_thread

NOW = 1_800_000_000.0
NS = "agents"
DID = "0" * 31 + "1"
GRPC_META = {
    "decision_id": DID,
    "decision": "allow",
    "agent": "billing-agent",
    "code": "allowed",
    "purpose": "reconcile",
}
HTTP_META = {
    "x-mandate-decision": DID,
    "x-mandate-outcome": "deny",
    "x-mandate-log-agent": "research-agent",
    "x-mandate-code": "outside_purpose",
}


def entry(
    meta: Mapping[str, Any] | None = None,
    *,
    method: int = base_pb2.GET,
    authority: str = "Ledger.Finance.svc.cluster.local:8443",
    path: str = "/v1/invoices/42?expand=lines",
    status: int = 200,
    sent: int = 512,
    received: int = 0,
    start: float | None = NOW - 2.5,
    took: float = 0.0,
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.time_to_last_downstream_tx_byte.FromNanoseconds(int(took * 1e9))
    if meta is not None:
        e.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"].update(meta)
    if start is not None:
        e.common_properties.start_time.FromNanoseconds(int(start * 1e9))
    e.request.request_method = method
    e.request.authority = authority
    e.request.path = path
    e.request.request_body_bytes = received
    e.response.response_code.value = status
    e.response.response_body_bytes = sent
    return e


def message(*entries: accesslog_pb2.HTTPAccessLogEntry) -> als_pb2.StreamAccessLogsMessage:
    m = als_pb2.StreamAccessLogsMessage()
    m.identifier.log_name = "mandate"
    m.http_logs.log_entry.extend(entries)
    return m


# -- conversion (no server) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("e", "expected"),
    [
        pytest.param(
            entry(GRPC_META),
            CallEvent(NOW - 2.5, "billing-agent", NS, "GET", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", True, "allowed", 200, 512, 0, DID),
            id="grpc-transport-metadata",
        ),
        pytest.param(
            entry(HTTP_META, method=base_pb2.POST, status=403, sent=90, received=7),
            CallEvent(NOW - 2.5, "research-agent", NS, "POST", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", False, "outside_purpose", 403, 90, 7, DID),
            id="http-transport-metadata",
        ),
        pytest.param(
            entry(GRPC_META, method=base_pb2.CONNECT, authority="files.example.com:443", path=""),
            CallEvent(NOW - 2.5, "billing-agent", NS, "CONNECT", "files.example.com", "",
                      True, "allowed", 200, 512, 0, DID),
            id="connect",
        ),
        pytest.param(
            entry(GRPC_META, authority="[::1]:9000", path="/x?a=1?b"),
            CallEvent(NOW - 2.5, "billing-agent", NS, "GET", "[::1]", "/x", True, "allowed",
                      200, 512, 0, DID),
            id="ipv6-host-and-query",
        ),
        pytest.param(
            entry(GRPC_META, start=None),
            CallEvent(NOW, "billing-agent", NS, "GET", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", True, "allowed", 200, 512, 0, DID),
            id="no-start-time-is-now",
        ),
        pytest.param(
            entry(GRPC_META, start=NOW + 60),
            CallEvent(NOW, "billing-agent", NS, "GET", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", True, "allowed", 200, 512, 0, DID),
            id="a-start-in-the-future-is-now",
        ),
        pytest.param(
            entry(GRPC_META, start=NOW - 3 * 365 * 86400),
            CallEvent(NOW, "billing-agent", NS, "GET", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", True, "allowed", 200, 512, 0, DID),
            id="a-start-on-another-clock-is-now",
        ),
        pytest.param(
            entry(GRPC_META, start=NOW - 61),
            CallEvent(NOW, "billing-agent", NS, "GET", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", True, "allowed", 200, 512, 0, DID),
            id="a-short-call-that-started-long-ago-is-now",
        ),
        pytest.param(
            entry(GRPC_META, start=NOW - 290, took=280),
            CallEvent(NOW - 290, "billing-agent", NS, "GET", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", True, "allowed", 200, 512, 0, DID),
            id="a-long-call-keeps-its-start",
        ),
        pytest.param(
            entry({"agent": "a", "code": "denied_by_rule"}, method=base_pb2.METHOD_UNSPECIFIED),
            CallEvent(NOW - 2.5, "a", NS, "", "ledger.finance.svc.cluster.local",
                      "/v1/invoices/42", False, "denied_by_rule", 200, 512, 0, ""),
            id="no-decision-falls-back-on-the-code",
        ),
        pytest.param(entry(None), None, id="no-ext-authz-metadata"),
        pytest.param(entry({"decision": "deny", "code": "unattributed"}), None, id="no-agent"),
        pytest.param(entry({"agent": ""}), None, id="empty-agent"),
        pytest.param(entry({"agent": 42}), None, id="agent-not-a-string"),
    ],
)  # fmt: skip
def test_entry_to_event(e: accesslog_pb2.HTTPAccessLogEntry, expected: CallEvent | None) -> None:
    assert event_from_entry(e, NS, NOW) == expected


# -- the server ---------------------------------------------------------------------------


class Sink:
    def __init__(self, fail_on: str = "") -> None:
        self.events: list[CallEvent] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, events: list[CallEvent]) -> None:
        if any(e.path == self.fail_on for e in events):
            raise RuntimeError("sink broke")
        with self.lock:
            self.events.extend(events)


@pytest.fixture
def sink() -> Sink:
    return Sink(fail_on="/sink-fails")


@pytest.fixture
def served(sink: Sink) -> Iterator[tuple[AccessLogServicer, grpc.Channel]]:
    servicer = AccessLogServicer(sink, namespace=NS, clock=lambda: NOW)
    with on_loop_thread(
        "als", lambda: start_als_server("127.0.0.1:0", servicer), lambda s: s[0].stop(None)
    ) as (_, port):
        assert port > 0
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]
        )
        try:
            yield servicer, channel
        finally:
            channel.close()


def stream(channel: grpc.Channel, *messages: als_pb2.StreamAccessLogsMessage) -> Any:
    stub = als_pb2_grpc.AccessLogServiceStub(channel)
    return stub.StreamAccessLogs(iter(messages), timeout=5)


def test_a_stream_of_messages_becomes_events(
    served: tuple[AccessLogServicer, grpc.Channel], sink: Sink
) -> None:
    servicer, channel = served
    response = stream(
        channel,
        message(entry(GRPC_META, path="/a"), entry(HTTP_META, path="/b")),
        message(entry(None, path="/c")),  # Envoy answered before mandate was asked
        message(entry(GRPC_META, path="/d")),
    )
    assert isinstance(response, als_pb2.StreamAccessLogsResponse)
    assert [(e.agent, e.path) for e in sink.events] == [
        ("billing-agent", "/a"),
        ("research-agent", "/b"),
        ("billing-agent", "/d"),
    ]
    assert servicer.stats() == {"received": 4, "converted": 3, "skipped": 1}


def test_a_failing_sink_or_a_bad_entry_never_ends_the_stream(
    served: tuple[AccessLogServicer, grpc.Channel], sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, channel = served
    real = sidecar.behaviour.access_log.event_from_entry

    def flaky(e: accesslog_pb2.HTTPAccessLogEntry, namespace: str, now: float) -> Any:
        if e.request.path == "/unreadable":
            raise ValueError("unreadable entry")
        return real(e, namespace, now)

    monkeypatch.setattr(sidecar.behaviour.access_log, "event_from_entry", flaky)
    stream(
        channel,
        message(entry(GRPC_META, path="/sink-fails")),
        message(entry(GRPC_META, path="/unreadable"), entry(GRPC_META, path="/after")),
        message(entry(GRPC_META, path="/last")),
    )
    assert [e.path for e in sink.events] == ["/after", "/last"]
    assert servicer.stats() == {"received": 4, "converted": 3, "skipped": 1}


def test_other_messages_are_ignored(served: tuple[AccessLogServicer, grpc.Channel]) -> None:
    servicer, channel = served
    tcp = als_pb2.StreamAccessLogsMessage()
    tcp.tcp_logs.log_entry.add()
    stream(channel, als_pb2.StreamAccessLogsMessage(), tcp)
    assert servicer.stats() == {"received": 0, "converted": 0, "skipped": 0}


def test_concurrent_streams_and_a_dropped_one(
    served: tuple[AccessLogServicer, grpc.Channel], sink: Sink
) -> None:
    """Envoy holds one stream per worker thread; one going away leaves the others."""
    servicer, channel = served
    stub = als_pb2_grpc.AccessLogServiceStub(channel)
    gate = threading.Event()

    def held() -> Iterator[als_pb2.StreamAccessLogsMessage]:
        yield message(entry(GRPC_META, path="/held"))
        gate.wait(5)

    dropped = stub.StreamAccessLogs.future(held(), timeout=5)
    results = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(
                stream(channel, *(message(entry(GRPC_META, path=f"/s{i}/{n}")) for n in range(20)))
            )
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 4
    dropped.cancel()
    gate.set()
    stream(channel, message(entry(GRPC_META, path="/after-drop")))
    paths = {e.path for e in sink.events}
    assert {f"/s{i}/{n}" for i in range(4) for n in range(20)} <= paths
    assert "/after-drop" in paths
    assert servicer.stats()["converted"] == len(sink.events)


def test_unix_socket(tmp_path: Path, sink: Sink) -> None:
    path = tmp_path / "als.sock"
    servicer = AccessLogServicer(sink, namespace=NS, clock=lambda: NOW)
    with on_loop_thread(
        "als", lambda: start_als_server(f"unix:{path}", servicer), lambda s: s[0].stop(None)
    ) as (_, port):
        assert port == 0 and path.exists()
        with grpc.insecure_channel(f"unix:{path}") as channel:
            stream(channel, message(entry(GRPC_META, path="/over-unix")))
        assert [e.path for e in sink.events] == ["/over-unix"]
