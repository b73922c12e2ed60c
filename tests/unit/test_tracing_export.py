"""The span queue and its export thread, with a transport that records, blocks or fails
on command (no network): drops are counted and never block, transient errors are
retried as the SDK exporter retries them, shutdown exports what is queued."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from sidecar.telemetry import otlp_wire
from sidecar.telemetry.otlp_export import BatchExporter, ExportStats

ENCODER = otlp_wire.SpanEncoder("mandate.authorize", otlp_wire.SPAN_KIND_SERVER)


def span(i: int) -> bytes:
    return ENCODER.encode(bytes(range(16)), i.to_bytes(8, "big"), b"", "", i, i, b"", False)


class Failure(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """What a failed unary call raises."""

    def __init__(self, code: grpc.StatusCode, retry_after: float | None = None) -> None:
        self._code = code
        self._trailing: tuple[tuple[str, bytes], ...] = ()
        if retry_after is not None:
            seconds, nanos = divmod(round(retry_after * 1e9), 10**9)
            info = RetryInfo(retry_delay=Duration(seconds=seconds, nanos=nanos))
            self._trailing = (("google.rpc.retryinfo-bin", info.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "injected"

    def trailing_metadata(self) -> Any:
        return self._trailing

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class FakeTransport:
    def __init__(self, failures: Sequence[Exception] = ()) -> None:
        self.failures = list(failures)
        self.requests: list[bytes] = []
        self.attempts = 0
        self.timeouts: list[float] = []
        self.reconnects = 0
        self.closed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def send(self, request: bytes, timeout: float) -> None:
        self.attempts += 1
        self.timeouts.append(timeout)
        self.entered.set()
        self.release.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.requests.append(request)

    def reconnect(self) -> None:
        self.reconnects += 1

    def close(self) -> None:
        self.closed = True

    def batch_sizes(self) -> list[int]:
        return [
            sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            for req in map(trace_service_pb2.ExportTraceServiceRequest.FromString, self.requests)
        ]

    def spans(self) -> list[int]:
        """The start times (= ids here) of the spans received, in order."""
        out = []
        for raw in self.requests:
            req = trace_service_pb2.ExportTraceServiceRequest.FromString(raw)
            (rs,) = req.resource_spans
            assert rs.resource.attributes[0].key == "service.name"
            (ss,) = rs.scope_spans
            assert ss.scope.name == "mandate"
            out += [s.start_time_unix_nano for s in ss.spans]
        return out


RESOURCE = otlp_wire.resource({"service.name": "mandate"})
SCOPE = otlp_wire.scope("mandate")


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[BatchExporter] = []

    def make(transport: FakeTransport, **kw: Any) -> BatchExporter:
        kw.setdefault("delay", 3600.0)  # export on a full batch, flush or shutdown only
        exporter = BatchExporter(transport, RESOURCE, SCOPE, retry_base=0.001, **kw)
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.shutdown(timeout=5)


def test_a_full_batch_is_exported_without_waiting_for_the_delay(make: Any) -> None:
    transport = FakeTransport()
    exporter = make(transport, max_queue=8, max_batch=4)
    for i in range(1, 5):
        assert exporter.submit(span(i))
    assert transport.entered.wait(5)  # woken by the 4th span, not by the hour's delay
    assert exporter.flush()
    assert transport.spans() == [1, 2, 3, 4]
    assert exporter.stats() == ExportStats(accepted=4, exported=4, dropped=0, failed=0, queued=0)


def test_spans_that_come_during_an_export_wait_for_a_full_batch_or_the_delay(
    make: Any,
) -> None:
    """Under load, what arrives while a batch is in flight is not sent at once as a small
    request of its own (that made hundreds of tiny requests a second)."""
    transport = FakeTransport()
    transport.release.clear()
    exporter = make(transport, max_queue=64, max_batch=8)
    for i in range(1, 9):
        exporter.submit(span(i))
    assert transport.entered.wait(5)  # the first full batch is in flight
    for i in range(9, 12):
        exporter.submit(span(i))  # three more meanwhile
    transport.entered.clear()
    transport.release.set()
    assert not transport.entered.wait(0.3)  # no second request for the three
    assert transport.batch_sizes() == [8]
    for i in range(12, 17):
        exporter.submit(span(i))  # the queue fills a batch: it goes without waiting
    assert transport.entered.wait(5)
    exporter.submit(span(17))
    assert exporter.flush()  # flush sends the partial rest
    assert transport.batch_sizes() == [8, 8, 1]
    assert transport.spans() == list(range(1, 18))


def test_a_partial_batch_goes_when_the_delay_has_passed(make: Any) -> None:
    transport = FakeTransport()
    exporter = make(transport, max_queue=64, max_batch=8, delay=0.05)
    for i in range(1, 4):
        exporter.submit(span(i))
    assert transport.entered.wait(5)
    assert exporter.flush()
    assert transport.batch_sizes() == [3]


def test_a_full_queue_drops_and_counts_without_blocking(make: Any) -> None:
    transport = FakeTransport()
    transport.release.clear()  # the receiver hangs
    exporter = make(transport, max_queue=8, max_batch=4)
    for i in range(1, 5):
        exporter.submit(span(i))
    assert transport.entered.wait(5)  # the first batch is in flight, stuck
    accepted = [exporter.submit(span(i)) for i in range(5, 5 + 8 + 5)]
    assert accepted == [True] * 8 + [False] * 5  # returned at once: the test would hang
    assert exporter.stats().dropped == 5
    assert exporter.stats().queued == 8
    transport.release.set()
    assert exporter.flush()
    assert transport.spans() == list(range(1, 13))
    stats = exporter.stats()
    assert (stats.exported, stats.dropped, stats.failed, stats.queued) == (12, 5, 0, 0)


def test_drops_counted_from_many_threads_are_all_counted(make: Any) -> None:
    transport = FakeTransport()
    transport.release.clear()
    exporter = make(transport, max_queue=1, max_batch=1)
    exporter.submit(span(0))
    assert transport.entered.wait(5)
    exporter.submit(span(1))  # fills the queue

    def hammer() -> None:
        for _ in range(5_000):
            exporter.submit(span(2))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert exporter.stats().dropped == 20_000
    transport.release.set()


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
def test_transient_errors_are_retried(make: Any, code: grpc.StatusCode) -> None:
    transport = FakeTransport([Failure(code), Failure(code)])
    exporter = make(transport)
    exporter.submit(span(1))
    assert exporter.flush()
    assert transport.attempts == 3 and transport.spans() == [1]
    # a fresh channel after the first UNAVAILABLE only, as the SDK exporter does
    assert transport.reconnects == (1 if code is grpc.StatusCode.UNAVAILABLE else 0)
    assert exporter.stats().exported == 1


def test_a_permanent_error_fails_the_batch_at_once(make: Any) -> None:
    transport = FakeTransport([Failure(grpc.StatusCode.INVALID_ARGUMENT)])
    exporter = make(transport)
    exporter.submit(span(1))
    exporter.submit(span(2))
    assert exporter.flush()
    assert transport.attempts == 1
    assert exporter.stats() == ExportStats(accepted=2, exported=0, dropped=0, failed=2, queued=0)


def test_retries_stop_after_six_attempts(make: Any) -> None:
    transport = FakeTransport([Failure(grpc.StatusCode.UNAVAILABLE)] * 10)
    exporter = make(transport)
    exporter.submit(span(1))
    assert exporter.flush()
    assert transport.attempts == 6 and exporter.stats().failed == 1


def test_retries_stop_when_the_backoff_would_pass_the_timeout(make: Any) -> None:
    transport = FakeTransport([Failure(grpc.StatusCode.UNAVAILABLE, retry_after=5.0)])
    exporter = make(transport, timeout=1.0)
    exporter.submit(span(1))
    assert exporter.flush()
    assert transport.attempts == 1 and exporter.stats().failed == 1


def test_the_receivers_retry_delay_is_honoured(make: Any) -> None:
    transport = FakeTransport([Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after=0.2)])
    exporter = make(transport, timeout=1.0)
    exporter.submit(span(1))
    assert exporter.flush()
    assert transport.attempts == 2 and transport.spans() == [1]
    # the second attempt had what was left of the 1 s timeout after waiting 0.2 s
    assert transport.timeouts[0] > 0.5 and transport.timeouts[1] < 0.81


def test_shutdown_exports_what_is_queued_and_closes(make: Any) -> None:
    transport = FakeTransport()
    exporter = make(transport, max_queue=2048, max_batch=512)
    for i in range(1, 1201):
        exporter.submit(span(i))
    exporter.shutdown(timeout=10)
    assert transport.spans() == list(range(1, 1201))
    assert transport.batch_sizes() == [512, 512, 176]
    assert transport.closed
    assert not exporter.submit(span(9999))  # after shutdown: dropped, counted
    assert exporter.stats().dropped == 1


def test_shutdown_does_not_wait_out_a_backoff(make: Any) -> None:
    transport = FakeTransport([Failure(grpc.StatusCode.UNAVAILABLE, retry_after=3600.0)] * 2)
    exporter = make(transport, timeout=7200.0)
    exporter.submit(span(1))
    assert exporter.flush(timeout=0.2) is False  # wakes the thread; it waits an hour
    assert transport.entered.wait(5)
    exporter.shutdown(timeout=10)  # would take an hour if the backoff were waited out
    assert exporter.stats().failed == 1


def test_a_bug_in_the_transport_fails_the_batch_not_the_thread(make: Any) -> None:
    transport = FakeTransport([RuntimeError("bug")])
    exporter = make(transport)
    exporter.submit(span(1))
    assert exporter.flush()
    exporter.submit(span(2))
    assert exporter.flush()
    assert transport.spans() == [2]
    assert (exporter.stats().failed, exporter.stats().exported) == (1, 1)


def test_spans_are_encoded_on_the_thread_and_a_bad_one_is_lost_alone(make: Any) -> None:
    transport = FakeTransport()
    caller = threading.get_ident()
    threads: set[int] = set()

    def encode(i: int) -> bytes:
        threads.add(threading.get_ident())
        if i == 2:
            raise ValueError("a bug")
        return span(i)

    exporter = make(transport, encode=encode)
    for i in (1, 2, 3):
        assert exporter.submit(i)
    assert exporter.flush()
    assert transport.spans() == [1, 3]
    assert caller not in threads and len(threads) == 1
    assert exporter.stats() == ExportStats(accepted=3, exported=2, dropped=0, failed=1, queued=0)


def test_flush_reports_a_timeout(make: Any) -> None:
    transport = FakeTransport()
    transport.release.clear()
    exporter = make(transport)
    exporter.submit(span(1))
    assert exporter.flush(timeout=0.2) is False
    transport.release.set()
    assert exporter.flush()


def test_batch_size_must_fit_the_queue() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatchExporter(FakeTransport(), RESOURCE, SCOPE, max_queue=4, max_batch=8)
