"""Exports encoded spans over OTLP/gRPC from one background thread, off the Check path.

:class:`BatchExporter` is the lean tracer's batch processor: `submit` appends the bytes of
one span to a bounded queue and returns (a full queue drops the span and counts it; a
Check never waits for telemetry); the thread sends full batches of `max_batch` spans as
soon as they are waiting, a partial one only once `delay` seconds have passed without a
full one (or on `flush`), and everything still queued on `shutdown`.
Retries follow the OpenTelemetry SDK's OTLP exporter (opentelemetry-exporter-otlp-proto-grpc
1.45): up to 6 attempts within `timeout`, on the transient gRPC codes only, backing off
1, 2, 4... s (±20 %) unless the receiver's `google.rpc.RetryInfo` names a delay, with a
fresh channel after the first UNAVAILABLE; no retry once shutdown has begun.

:class:`ExportSettings` reads the endpoint and the `OTEL_EXPORTER_OTLP_[TRACES_]*`
variables the SDK exporter read for mandate (headers, timeout in seconds, gzip
compression, CA and client certificate files); :class:`GrpcTransport` sends the request
bytes (no message objects: see `otlp_wire`). Nothing here knows about decisions.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import grpc

from sidecar import __version__
from sidecar.errors import ConfigError
from sidecar.telemetry.otlp_wire import EXPORT_METHOD, export_request

__all__ = ["BatchExporter", "ExportSettings", "ExportStats", "GrpcTransport", "Transport"]

log = logging.getLogger(__name__)

_MAX_ATTEMPTS = 6
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_RETRY_INFO_KEY = "google.rpc.retryinfo-bin"
_DROP_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class ExportSettings:
    """Where and how to export, validated once."""

    target: str  # gRPC target: host:port, or a unix: address
    secure: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 10.0  # seconds, for one batch, retries included
    gzip: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    @classmethod
    def from_env(cls, endpoint: str, environ: Mapping[str, str]) -> ExportSettings:
        """``endpoint`` as `--otlp-endpoint` gives it (http://host:port: plaintext,
        https://: TLS, anything else: a gRPC target, plaintext) and the OTLP variables of
        ``environ``, the traces-specific one first. Raises ConfigError naming the
        variable."""

        def env(name: str) -> tuple[str, str] | None:
            for var in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
                if environ.get(var):
                    return var, environ[var]
            return None

        parts = urlsplit(endpoint)
        secure = parts.scheme == "https"
        target = parts.netloc if parts.scheme in ("http", "https") else endpoint
        if not target:
            raise ConfigError(f"--otlp-endpoint {endpoint!r}: expected http://HOST:PORT")
        timeout = 10.0
        if (found := env("TIMEOUT")) is not None:
            try:
                timeout = float(found[1])
            except ValueError:
                raise ConfigError(f"{found[0]}={found[1]!r}: expected seconds") from None
            if not timeout > 0:
                raise ConfigError(f"{found[0]}={found[1]!r}: expected seconds > 0")
        gzip = False
        if (found := env("COMPRESSION")) is not None:
            value = found[1].strip().lower()
            if value not in ("gzip", "none"):
                raise ConfigError(f"{found[0]}={found[1]!r}: expected gzip or none")
            gzip = value == "gzip"
        headers = parse_headers(found[1]) if (found := env("HEADERS")) else ()
        files: list[bytes | None] = []
        for name in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
            found = env(name) if secure else None
            if found is None:
                files.append(None)
                continue
            try:
                files.append(Path(found[1]).read_bytes())
            except OSError as exc:
                raise ConfigError(f"{found[0]}={found[1]!r}: {exc.strerror}") from None
        if secure:
            _check_tls(env("CERTIFICATE"), env("CLIENT_KEY"), env("CLIENT_CERTIFICATE"))
        return cls(target, secure, headers, timeout, gzip, *files)


def _check_tls(
    ca: tuple[str, str] | None, key: tuple[str, str] | None, cert: tuple[str, str] | None
) -> None:
    """Load the TLS files as a client would, so that a wrong one is a ConfigError naming its
    variable at start-up (grpcio would only fail each export, UNAVAILABLE, later)."""
    if (key is None) != (cert is None):
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_CLIENT_KEY and OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE go "
            "together (mutual TLS): set both or neither"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=ca[1])
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{ca[0]}={ca[1]!r}: not a PEM certificate ({exc})") from None
    if key is not None and cert is not None:
        try:
            ctx.load_cert_chain(cert[1], key[1])
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{cert[0]}={cert[1]!r} with {key[0]}={key[1]!r}: "
                f"not a PEM certificate and its key ({exc})"
            ) from None


def parse_headers(value: str) -> tuple[tuple[str, str], ...]:
    """`OTEL_EXPORTER_OTLP_HEADERS`: comma-separated, URL-encoded `name=value` pairs;
    names lower-cased (gRPC metadata), malformed entries skipped with a warning."""
    headers: dict[str, str] = {}
    for item in value.split(","):
        name, eq, val = item.partition("=")
        name = unquote(name).strip().lower()
        if not eq or not name:
            if item.strip():
                log.warning("ignoring OTLP header %r: expected name=value", item.strip())
            continue
        headers[name] = unquote(val).strip()
    return tuple(headers.items())


class Transport(Protocol):
    """Sends one encoded ExportTraceServiceRequest; raises grpc.RpcError."""

    def send(self, request: bytes, timeout: float) -> None: ...
    def reconnect(self) -> None: ...
    def close(self) -> None: ...


class GrpcTransport:
    """TraceService/Export over one gRPC channel. The request is already serialized, so
    the call is made on the channel with the method's path rather than through the
    generated stub, whose serializer would want a message object."""

    def __init__(self, settings: ExportSettings) -> None:
        self._settings = settings
        self._metadata = settings.headers or None
        self._channel: grpc.Channel | None = None
        self._call: grpc.UnaryUnaryMultiCallable[bytes, bytes] | None = None
        self.reconnect()

    def reconnect(self) -> None:
        """A fresh channel: a failed one may wait out its reconnection backoff first."""
        s = self._settings
        options = [("grpc.primary_user_agent", f"mandate/{__version__}")]
        compression = grpc.Compression.Gzip if s.gzip else grpc.Compression.NoCompression
        if s.secure:
            creds = grpc.ssl_channel_credentials(
                s.root_certificates, s.private_key, s.certificate_chain
            )
            channel = grpc.secure_channel(s.target, creds, options, compression)
        else:
            channel = grpc.insecure_channel(s.target, options, compression)
        old, self._channel = self._channel, channel
        self._call = channel.unary_unary(EXPORT_METHOD)  # bytes in, bytes out
        if old is not None:
            old.close()

    def send(self, request: bytes, timeout: float) -> None:
        assert self._call is not None
        self._call(request, timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


@dataclass(frozen=True)
class ExportStats:
    """Spans since start: accepted into the queue, exported, dropped because the queue was
    full, failed (their batch could not be exported); `queued` are waiting now."""

    accepted: int
    exported: int
    dropped: int
    failed: int
    queued: int


class BatchExporter:
    """A bounded queue of spans and the thread that exports it. ``resource`` and ``scope``
    are the `Resource` and `InstrumentationScope` messages every request carries.
    ``encode``, if given, makes a span's `ScopeSpans.spans` bytes of what `submit` queued,
    on the thread, just before its batch is sent (else `submit` takes the bytes).
    ``on_cycle`` is called from the thread with the stats after each wake-up."""

    def __init__(
        self,
        transport: Transport,
        resource: bytes,
        scope: bytes,
        *,
        max_queue: int = 2048,
        max_batch: int = 512,
        delay: float = 0.2,
        timeout: float = 10.0,
        retry_base: float = 1.0,
        on_cycle: Callable[[ExportStats], None] | None = None,
        encode: Callable[[Any], bytes] | None = None,
    ) -> None:
        if not 0 < max_batch <= max_queue:
            raise ValueError(f"expected 0 < max_batch ({max_batch}) <= max_queue ({max_queue})")
        self._transport = transport
        self._resource = resource
        self._scope = scope
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._delay = delay
        self._timeout = timeout
        self._retry_base = retry_base
        self._on_cycle = on_cycle
        self._encode = encode
        self._queue: deque[Any] = deque()
        self._wake = threading.Event()
        self._drain = threading.Event()  # set by flush: export what is queued, full or not
        self._closing = threading.Event()  # set by shutdown: final drain, no more retries
        self._idle = threading.Condition()
        self._busy = False
        self._drop_lock = threading.Lock()
        self._exported = self._dropped = self._failed = self._inflight = 0
        self._drops_logged = 0
        self._drops_logged_at = 0.0
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def submit(self, span: Any) -> bool:
        """Queue one span (its bytes, or what ``encode`` makes them of on the export
        thread); False if the queue was full (the span is dropped and counted). Never
        blocks: this runs on the Check path."""
        queue = self._queue
        if len(queue) >= self._max_queue or self._closing.is_set():
            with self._drop_lock:  # `+=` from several Check threads could lose counts
                self._dropped += 1
            return False
        queue.append(span)
        if len(queue) == self._max_batch:
            self._wake.set()
        return True

    def stats(self) -> ExportStats:
        queued, inflight = len(self._queue), self._inflight
        exported, failed, dropped = self._exported, self._failed, self._dropped
        # accepted is derived so that the Check path counts nothing but drops
        return ExportStats(exported + failed + inflight + queued, exported, dropped, failed, queued)

    def flush(self, timeout: float = 10.0) -> bool:
        """Export what is queued now; True once done, False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue or self._busy:
                self._drain.set()  # again each round: spans may have come after a wake-up
                self._wake.set()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    def shutdown(self, timeout: float = 10.0) -> None:
        """Export what is queued (one attempt per batch, no backoff), stop the thread and
        close the transport. Waits at most ``timeout`` s for the thread."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "OTLP export still running after %.0f s; %d spans left", timeout, len(self._queue)
            )
        self._transport.close()

    def _run(self) -> None:
        while True:
            # Full batches go at once; a partial one only when the delay has passed, on flush
            # or on shutdown. Draining whatever came during the previous export instead sent
            # a request of a few spans every couple of milliseconds under load (measured:
            # ~500 requests/s of 5-13 spans at 2,800 spans/s), each costing as much as a full
            # one: most of what tracing cost a Check (bench/README.md, telemetry section).
            timed_out = False
            if not self._closing.is_set():
                timed_out = not self._wake.wait(self._delay)
            self._wake.clear()
            drain_all = timed_out or self._closing.is_set()
            if self._drain.is_set():
                self._drain.clear()
                drain_all = True
            with self._idle:
                self._busy = bool(self._queue)
            try:
                while len(self._queue) >= self._max_batch or (drain_all and self._queue):
                    n = min(len(self._queue), self._max_batch)
                    batch = [self._queue.popleft() for _ in range(n)]
                    self._inflight = n
                    self._export(batch)
                    self._inflight = 0
            except Exception:  # the thread must outlive any bug: spans are best effort
                log.exception("OTLP export failed unexpectedly")
                self._failed += self._inflight
                self._inflight = 0
            with self._idle:
                self._busy = False
                self._idle.notify_all()
            self._log_drops()
            if self._on_cycle is not None:
                try:
                    self._on_cycle(self.stats())
                except Exception:
                    log.exception("OTLP export stats callback failed")
            if self._closing.is_set() and not self._queue:
                return

    def _export(self, items: list[Any]) -> None:
        spans: list[bytes] = items
        if self._encode is not None:
            spans = []
            for item in items:
                try:
                    spans.append(self._encode(item))
                except Exception:  # a bug: lose this span, not the batch
                    log.exception("encoding a span failed")
                    self._failed += 1
            if not spans:
                return
        try:
            request = export_request(self._resource, self._scope, spans)
        except Exception:
            log.exception("encoding an OTLP request of %d spans failed", len(spans))
            self._failed += len(spans)
            return
        deadline = time.monotonic() + self._timeout
        for attempt in range(_MAX_ATTEMPTS):
            try:
                self._transport.send(request, max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as exc:
                code, details, delay = _describe(exc, attempt, self._retry_base)
                if code is grpc.StatusCode.UNAVAILABLE and attempt == 0:
                    self._transport.reconnect()
                if (
                    code not in _RETRYABLE
                    or attempt + 1 == _MAX_ATTEMPTS
                    or delay > deadline - time.monotonic()
                    or self._closing.is_set()
                ):
                    log.warning(
                        "exporting %d spans failed: %s %s",
                        len(spans), code.name if code else "?", details,
                    )  # fmt: skip
                    break
                log.info(
                    "exporting spans: %s, retrying in %.2f s", code.name if code else "?", delay
                )
                if self._closing.wait(delay):
                    break
            except Exception:
                log.exception("exporting %d spans failed", len(spans))
                break
            else:
                self._exported += len(spans)
                return
        self._failed += len(spans)

    def _log_drops(self) -> None:
        dropped = self._dropped
        now = time.monotonic()
        if dropped > self._drops_logged and (
            self._drops_logged == 0 or now - self._drops_logged_at >= _DROP_LOG_SECONDS
        ):
            log.warning("span queue full (%d): %d spans dropped so far", self._max_queue, dropped)
            self._drops_logged, self._drops_logged_at = dropped, now


def _describe(
    exc: grpc.RpcError, attempt: int, base: float
) -> tuple[grpc.StatusCode | None, str, float]:
    """(code, details, seconds to wait before the next attempt) of a failed call."""
    delay = base * 2**attempt * random.uniform(0.8, 1.2)
    if not isinstance(exc, grpc.Call):
        return None, str(exc), delay
    for key, value in exc.trailing_metadata() or ():
        if key == _RETRY_INFO_KEY and isinstance(value, bytes):
            from google.rpc import error_details_pb2  # only when a receiver asks to wait

            info = error_details_pb2.RetryInfo.FromString(value)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return exc.code(), exc.details() or "", delay
