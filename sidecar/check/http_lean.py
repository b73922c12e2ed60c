"""Envoy adapter, HTTP transport, lean server (`--http-server lean`): the contract of
`http_transport` (the path prefix naming the agent, the headers, the answers, fail closed,
no health route) without aiohttp. An asyncio Protocol on a uvloop loop parses with httptools
(llhttp, the C parser aiohttp's server uses too) and answers each check synchronously in the
read that completes it: no task, no request or response object, no stream; one write per
answer. The wire format (prefix, view, answer) is `http_wire`'s, shared with aiohttp's server.

Envoy's ext_authz HTTP client sends one check at a time on a kept-alive HTTP/1.1 connection.
What else may arrive, and what it gets:
- Bounded: a message's head (request line and headers) at most 256 KiB and 512 headers, its
  body at most 1 MiB (aiohttp's `client_max_size`; Envoy buffers 64 KiB by default), all its
  bytes (chunked framing and trailers, which are ignored, included) at most 2.25 MiB, a method
  at most 128 bytes. Beyond a bound: a `bad_request` deny, and the connection is closed at
  once (nothing more is read or buffered).
- Malformed (llhttp refuses it: bad framing, Content-Length with Transfer-Encoding, a bad
  token, HTTP/2's preface) or an Upgrade/CONNECT request (a tunnel is not a check): a
  `bad_request` deny that quotes nothing of the request, then the connection is closed.
- Pipelined checks are answered in order, each as soon as it is complete; a peer that stops
  reading its answers stops being read (pause_reading at the transport's high-water mark).
- The method as sent, in any case (RFC 9110: methods are case-sensitive; over HTTP/2 an agent
  sends any token): llhttp knows a fixed list of upper-case methods, so where a read begins a
  message (where Envoy's checks begin) the method token is read here and llhttp is handed
  `GET` in its place (the framing of a request does not depend on its method, but for
  CONNECT's, refused above). A message that begins inside a read (pipelining) is llhttp's
  to parse: a method it does not know there is a `bad_request` deny.
- A connection idle for 3630 s is closed (aiohttp's keep-alive timeout: just over Envoy's
  one-hour idle timeout, so that Envoy closes first and never sends on a closing connection).
Every answer but a decided allow is a 403 (a credential that cannot be had now: 503); any
error in here is a 403 and a closed connection, never an allow.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping
from typing import cast

import httptools
import uvloop

from sidecar.check.http_wire import answer, http_view
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import request_parents
from sidecar.core import Decision, RequestView
from sidecar.credentials.broker import Injected
from sidecar.errors import BadRequestError
from sidecar.loopthread import LoopThread

__all__ = ["HttpLeanServer", "encode"]

log = logging.getLogger(__name__)
Headers = Mapping[str, str]

MAX_HEAD = 256 * 1024  # request line and headers of one message
MAX_HEADERS = 512
MAX_BODY = 1024 * 1024
MAX_METHOD = 128
MAX_MESSAGE = MAX_HEAD + 2 * MAX_BODY  # all of one message's bytes: chunked framing, trailers
IDLE_SECONDS = 3630.0
_SWEEP_SECONDS = 30.0

# Methods llhttp parses as any other (CONNECT it does not: an upgrade), handed on unchanged.
_PLAIN = {
    m: m.decode() for m in (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS")
}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_STATUS = {
    200: "HTTP/1.1 200 OK",
    403: "HTTP/1.1 403 Forbidden",
    503: "HTTP/1.1 503 Service Unavailable",
}
_UNPARSABLE = "the ext_authz request could not be parsed"
_TOO_LARGE = (
    f"the ext_authz request is over mandate's bounds (head {MAX_HEAD} bytes, "
    f"{MAX_HEADERS} headers, body {MAX_BODY} bytes)"
)
_FALLBACK = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class _Refused(Exception):
    """A request mandate does not decide on; the message is the deny's reason (it never
    quotes the request)."""


def encode(
    status: int, headers: Mapping[str, str], body: bytes, *, head: bool, close: bool
) -> bytes:
    """An HTTP/1.1 response. Raises ValueError if a header holds CR, LF or NUL (it would
    split the response): the pipeline then answers its fallback deny."""
    lines = [_STATUS.get(status) or f"HTTP/1.1 {status} Unknown"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {len(body)}")
    if close:
        lines.append("connection: close")
    text = "\r\n".join(lines)
    breaks = len(lines) - 1
    if text.count("\n") != breaks or text.count("\r") != breaks or "\0" in text:
        raise ValueError("a response header holds CR, LF or NUL")
    data = text.encode() + b"\r\n\r\n"
    return data if head or not body else data + body


def _responder(*, head: bool, close: bool) -> Callable[[Decision, Headers, Injected, str], bytes]:
    """The pipeline's ``respond`` for one message: ``head`` for a HEAD request (no body),
    ``close`` if the connection closes after the answer."""

    def respond(d: Decision, request: Headers, injected: Injected, facts: str) -> bytes:
        status, headers, body = answer(d, request, injected, facts)
        return encode(status, headers, body, head=head, close=close)

    return respond


_CLOSING = _responder(head=False, close=True)


def _fallback() -> bytes:
    return _FALLBACK


def _no_parents(headers: Mapping[str, str]) -> Mapping[str, str]:
    return {}


class _CheckProtocol(asyncio.Protocol):
    """One connection from Envoy: httptools' callbacks build a message, and the message's
    completion answers it."""

    def __init__(self, server: HttpLeanServer) -> None:
        self._server = server
        self._pipeline = server.pipeline
        self._identity = server.pipeline.identity
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self.idle = 0  # sweeps since the last read
        self._fresh = True  # the next byte read begins a message
        self._held = b""  # the start of a message, until its method token is whole
        self._peeked: str | None = None  # the method read at the start of a read
        # The message being read.
        self._method: str | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._count = 0
        self._in_head = False
        self._head = 0
        self._pending = 0
        self._body: list[bytes] = []
        self._size = 0

    # -- asyncio ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)

    def pause_writing(self) -> None:  # answers pile up: the peer does not read them
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self.idle = 0
        try:
            if self._fresh:
                start = self._start(data)
                if start is None:
                    return
                data = start
            self._parser.feed_data(data)
            if not self._fresh:  # a message in progress: what httptools holds of it is bounded
                self._pending += len(data)
                if self._pending > (MAX_HEAD if self._in_head else MAX_MESSAGE):
                    raise _Refused(_TOO_LARGE)
        except Exception as exc:
            if self._closed:  # bytes after an answer that closed the connection: not read
                return
            if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__:
                exc = exc.__context__  # type: ignore[assignment]  # raised in a callback
            self._refuse(exc)

    def close(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()  # after what was written is sent

    # -- httptools' callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._closed:  # pipelined after `Connection: close`: never answered, not decided
            raise _Refused(_UNPARSABLE)
        self._fresh = False
        self._method, self._peeked = self._peeked, None
        self._url = b""
        self._headers = {}
        self._count = 0
        self._in_head = True
        self._head = 0  # the request target's and headers' bytes
        self._pending = 0  # the bytes of the reads since the message began
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head += len(url)
        if self._head > MAX_HEAD:
            raise _Refused(_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:  # a chunked body's trailer: not the call's (aiohttp drops them too)
            return
        self._count += 1
        self._head += len(name) + len(value)
        if self._count > MAX_HEADERS or self._head > MAX_HEAD:
            raise _Refused(_TOO_LARGE)
        key = name.decode("latin-1").lower()  # a token (llhttp): ASCII
        text = value.decode("utf-8", "surrogateescape")  # as aiohttp decodes it
        headers = self._headers
        # Repeated headers joined with "," as Envoy does in a gRPC CheckRequest.
        headers[key] = f"{headers[key]},{text}" if key in headers else text

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._method is None:  # a message that began inside a read: llhttp's method
            self._method = self._parser.get_method().decode("ascii")
        if self._parser.should_upgrade():  # CONNECT, or Upgrade: a tunnel is not a check
            raise _Refused(_UNPARSABLE)

    def on_body(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MAX_BODY:
            raise _Refused(_TOO_LARGE)
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        self._fresh = True
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._answer(
            self._method or "",
            self._url.decode("utf-8", "surrogateescape"),
            self._headers,
            body,
            close=not self._parser.should_keep_alive(),
        )

    # -- answers ----------------------------------------------------------------------

    def _start(self, data: bytes) -> bytes | None:
        """The bytes to hand llhttp for a read that begins a message (None: wait for
        more): the method token as sent is kept for the decision, llhttp gets GET for one
        it does not parse plainly. Raises _Refused if there is no token."""
        if self._held:
            data, self._held = self._held + data, b""
        if data[:1] in (b"\r", b"\n"):  # empty lines before a request line are ignored
            data = data.lstrip(b"\r\n")  # (RFC 9112, 2.2), as llhttp does
            if not data:
                return None
        end = data.find(b" ", 0, MAX_METHOD + 1)
        if end == -1:
            if len(data) > MAX_METHOD:
                raise _Refused(_UNPARSABLE)
            self._held = data
            return None
        token = data[:end]
        plain = _PLAIN.get(token)
        if plain is not None:
            self._peeked = plain
            return data
        if token == b"CONNECT" or _TOKEN.fullmatch(token) is None:  # a tunnel is not a check
            raise _Refused(_UNPARSABLE)
        self._peeked = token.decode("ascii")
        return b"GET" + data[end:]

    def _answer(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes, *, close: bool
    ) -> None:
        identity = self._identity

        def view_of(did: str) -> RequestView:
            return http_view(did, identity, method, raw_path, headers, body)

        respond = _responder(head=method == "HEAD", close=close)
        data = self._pipeline.check(view_of, respond, _fallback, request_parents)
        self._write(data, close or data is _FALLBACK)

    def _refuse(self, exc: BaseException) -> None:
        """A deny (audited, quoting nothing of the request) for what cannot be decided,
        then the connection is closed."""
        reason = str(exc) if isinstance(exc, _Refused) else _UNPARSABLE
        log.warning("an ext_authz request could not be decided (%s); denying", type(exc).__name__)

        def view_of(did: str) -> RequestView:
            raise BadRequestError(reason)

        try:
            data = self._pipeline.check(view_of, _CLOSING, _fallback, _no_parents)
        except Exception:  # the pipeline never raises; if it did, still no allow
            log.exception("denying an unparsable ext_authz request failed")
            data = _FALLBACK
        self._write(data, True)

    def _write(self, data: bytes, close: bool) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        transport.write(data)
        if close:
            self.close()


class HttpLeanServer:
    """The lean HTTP transport in a thread of its own (a uvloop event loop), on
    ``host:port`` or, with ``unix_path``, on a unix socket. start() returns the bound port
    (0 on a socket). The interface of `http_transport.HttpAuthzServer`."""

    def __init__(self, pipeline: CheckPipeline, host: str, port: int, unix_path: str = "") -> None:
        self.pipeline = pipeline
        self._host, self._port, self._unix = host, port, unix_path
        self.connections: set[_CheckProtocol] = set()
        self._listener: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._thread = LoopThread("check-http", uvloop.new_event_loop)
        self.port = 0

    def _protocol(self) -> _CheckProtocol:
        return _CheckProtocol(self)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._unix:
            self._listener = await loop.create_unix_server(self._protocol, self._unix)
        else:
            self._listener = await loop.create_server(
                self._protocol, self._host, self._port, reuse_address=True
            )
            sockets = self._listener.sockets
            self.port = sockets[0].getsockname()[1] if sockets else 0
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self, period: float = _SWEEP_SECONDS, idle: float = IDLE_SECONDS) -> None:
        """Close connections idle for ``idle`` seconds (one counter store per read on the
        Check path, rather than a timer per answer)."""
        while True:
            await asyncio.sleep(period)
            for conn in list(self.connections):
                conn.idle += 1
                if conn.idle * period >= idle:
                    conn.close()

    @property
    def alive(self) -> bool:
        """Whether the server's loop runs (its thread has not ended)."""
        return self._thread.alive

    def start(self) -> int:
        """Start serving; return the bound port. Raises OSError if it cannot bind."""
        self._thread.start(self._start)
        return self.port

    def stop(self, grace: float = 1.0) -> None:
        """Stop listening and close every connection: nothing is in flight between reads
        (each check is answered in the read that completes it)."""

        async def _shutdown() -> None:
            if self._listener is not None:
                self._listener.close()
            if self._sweeper is not None:
                self._sweeper.cancel()
            for conn in list(self.connections):
                conn.close()
            await asyncio.sleep(0)  # let the transports send what they hold

        self._thread.stop(_shutdown, timeout=grace + 2)
