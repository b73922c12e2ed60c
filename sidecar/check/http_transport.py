"""Envoy adapter, HTTP transport: Envoy's ext_authz filter in `http_service` mode, served
with aiohttp's low-level server (no router, no middlewares: this is the hot path). The wire
format below is `http_wire`'s, shared with the lean server (`http_lean`, httptools on uvloop).

For every call Envoy sends the call's own method, its path with the filter's `path_prefix`
in front, its Host and its headers (the configs in envoy/ allow them all), plus the body it
buffered (`with_request_body`). The prefix is the only thing here the agent cannot write,
so it carries what the gRPC transport gets from the route's `context_extensions`:

    /mandate[;agent=NAME][;connect]<the call's path>

`;agent=NAME` names the agent when one Envoy serves several (envoy/local-http.yaml, one
listener per agent); without it the agent comes from the worker's own configuration
(`--agent`, envoy/sidecar-http.yaml). Exactly one prefix is parsed: the call's path starts
with "/", so nothing the agent sends can add or change a parameter. `;connect` marks a
CONNECT check, which Envoy's HTTP client cannot send as a CONNECT request (it closes the
connection at the end of a body-less CONNECT); the configs send it from a Lua filter with
the tunnel's host:port as Host. Two headers are set by Envoy's config, overwriting any the
agent sent: `x-mandate-content-length` (`len=` and the call's own Content-Length: Envoy's
request carries the buffered body's) and `x-mandate-scheme` (the call's scheme). The `len=`
keeps the value non-empty when the call has no Content-Length (chunked): Envoy adds no
header for an empty value, and the agent's own `x-mandate-content-length` would arrive
instead. A value without `len=` (an older config, or the agent's header) or `len=` alone
gives no Content-Length, and a body is then decided as truncated (nothing shows it whole).

Answers, as the gRPC transport's:
- allow: 200 with `x-mandate-agent`, `-purpose`, `-task`, `-decision`, which Envoy sets on
  the upstream request (`allowed_upstream_headers` overwrites), and
  `x-envoy-auth-headers-to-remove` listing the other `x-mandate-*` headers the agent sent;
- deny: 403 with the JSON body and `x-mandate-decision` (`allowed_client_headers`);
- both: `x-mandate-outcome` (allow/deny), `x-mandate-decision`, `x-mandate-code` (the
  decision code), `x-mandate-log-agent` (the agent the call was attributed to, if any)
  and, for an agent under behaviour analysis, `x-mandate-call` (the call's facts,
  `sidecar.core.callfacts`) become dynamic metadata (`dynamic_metadata_from_headers`) for
  the access logs: Envoy's ALS entry carries them, allowed or denied, which attributes each
  call to its agent for behaviour analysis (`als`). The last three are in neither
  `allowed_upstream_headers` nor `allowed_client_headers`, so Envoy passes them to no one.
  The agent is named in a header of its own rather than `x-mandate-agent`: that one means
  "set this upstream", and a deny never carries it, so that no config passing it on could
  hand it to the client.
Nothing here raises into aiohttp: a malformed request or any error is a 403 deny (fail
closed; a 5xx would be Envoy's `status_on_error`). There is deliberately no health route:
any 200 on this port could pass as an allow. No decision logic here.

Envoy forwards the call's method as the check request's own, as the agent sent it: over
HTTP/2 that is any token (`get`, `FOO`), and aiohttp's C parser (llhttp) knows only a fixed
list of upper-case methods. Its 400 quoted the request line, the internal prefix with it,
and mandate never decided (issue 15). Such a message is parsed again by aiohttp's Python
parser (:class:`_AnyMethodParser`, keeping the method's case), so that mandate decides it
as the gRPC transport does; any other request aiohttp cannot parse is a `bad_request` deny
with its decision id and audit record, and no answer echoes what was sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import MAX_MSG_QUEUE_SIZE, RequestHandler, RequestPayloadError

from sidecar.check.http_wire import PREFIX, answer, http_view, parse_target
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity, request_parents
from sidecar.core import Decision, RequestView
from sidecar.credentials.broker import NOTHING, Injected
from sidecar.errors import BadRequestError
from sidecar.loopthread import LoopThread

__all__ = ["PREFIX", "HttpAuthzServer", "handler", "parse_target"]

log = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 128 * 1024
_MAX_HEADERS = 512


def _view(request: web.BaseRequest, body: bytes, identity: Identity, did: str) -> RequestView:
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        name = key.lower()
        # Repeated headers joined with "," as Envoy does in a gRPC CheckRequest.
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return http_view(did, identity, request.method, request.raw_path, headers, body)


def _response(
    d: Decision, headers: Mapping[str, str], injected: Injected = NOTHING, facts: str = ""
) -> web.Response:
    """The HTTP answer for a decision (`http_wire.answer`); ``headers`` are the request's
    headers, ``injected`` the credentials an allowed call carries, ``facts`` the call's facts
    for behaviour analysis ('' for none)."""
    status, out, body = answer(d, headers, injected, facts)
    return web.Response(status=status, body=body or None, headers=out)


def _fallback() -> web.Response:
    return web.Response(status=403)


def _no_parents(headers: Mapping[str, str]) -> Mapping[str, str]:
    return {}


def _unparsable(did: str) -> RequestView:
    # Never the parser's message: it quotes the request line, the internal prefix with it.
    raise BadRequestError("the ext_authz request could not be parsed")


class _ExactMethodParser(HttpRequestParserPy):
    """aiohttp's Python request parser, keeping the method as sent: it upper-cases it, and
    `get` must reach the decision as `get` (RFC 9110: methods are case-sensitive)."""

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        message = super().parse_message(lines)  # the method is a token: ASCII
        return message._replace(method=lines[0].split(b" ", 1)[0].decode("ascii"))


class _AnyMethodParser:
    """aiohttp's C request parser, and aiohttp's Python parser (any token as the method)
    for a connection once the C parser refused a message for its method.

    The switch is made only where the refused bytes begin a message: nothing of the next
    message was fed yet and the previous message's body is complete (Envoy sends one check
    at a time on a connection, each with a Content-Length). Elsewhere the error stands (and
    becomes a `bad_request` deny). Python parsing costs about 18 µs more per request, so
    such a connection is closed after its answer (:attr:`any_method`)."""

    def __init__(self, fast: Any, slow: Callable[[], Any]) -> None:
        self._parser = fast
        self._slow = slow
        self.any_method = False
        self._body: StreamReader | None = None  # the last message's body
        self._in_headers = False  # bytes of a message whose headers are not complete

    def _at_message_start(self) -> bool:
        return not self._in_headers and (self._body is None or self._body.is_eof())

    def feed_data(self, data: bytes) -> Any:
        if self.any_method:
            return self._parser.feed_data(data)
        at_start = self._at_message_start()
        try:
            result = self._parser.feed_data(data)
        except BadHttpMethod:
            if not at_start:
                raise
            self._parser, self.any_method = self._slow(), True
            return self._parser.feed_data(data)
        messages = result[0]
        if messages:
            self._body, self._in_headers = messages[-1][1], False
        elif at_start:
            self._in_headers = True
        return result

    def __getattr__(self, name: str) -> Any:  # feed_eof, pause_reading, message_consumed ...
        return getattr(self._parser, name)


class _CheckServer(web.Server):
    """aiohttp's low-level server, with :class:`_CheckProtocol` for each connection."""

    def __init__(self, pipeline: CheckPipeline, **kwargs: Any) -> None:
        super().__init__(handler(pipeline), **kwargs)
        self.pipeline = pipeline

    def __call__(self) -> RequestHandler:
        return _CheckProtocol(self, loop=self._loop, **self._kwargs)


class _CheckProtocol(RequestHandler):
    """aiohttp's connection handler with :class:`_AnyMethodParser`, and a mandate deny
    (audited, echoing nothing) for a request aiohttp cannot parse at all."""

    def __init__(self, manager: _CheckServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._pipeline = manager.pipeline
        loop = kwargs["loop"]
        decompress = bool(kwargs.get("auto_decompress", True))

        def slow() -> Any:  # as RequestHandler builds its C parser
            return _ExactMethodParser(
                self, loop, kwargs.get("read_bufsize", 2**16), max_line_size=self.max_line_size,
                max_field_size=self.max_field_size, max_headers=self.max_headers,
                payload_exception=RequestPayloadError, auto_decompress=decompress,
                max_msg_queue_size=MAX_MSG_QUEUE_SIZE,
            )  # fmt: skip

        self.parser = _AnyMethodParser(self._parser, slow)
        self._parser = self.parser  # type: ignore[assignment]  # the same interface

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp's: too late for an answer
            raise ConnectionError("an answer was sent already")
        log.warning("an ext_authz request could not be parsed (%s); denying", type(exc).__name__)
        response = self._pipeline.check(_unparsable, _response, _fallback, _no_parents)
        response.force_close()
        return response


def handler(
    pipeline: CheckPipeline,
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The request handler of aiohttp's low-level server: one Check per request."""
    identity = pipeline.identity

    async def check(request: web.BaseRequest) -> web.StreamResponse:
        error: Exception | None = None
        try:
            body = await request.read()
        except Exception as exc:  # the body is unreadable: decide on nothing, deny
            log.warning("reading the ext_authz request failed: %r", exc)
            body, error = b"", exc

        def view_of(did: str) -> RequestView:
            if error is not None:
                raise error
            return _view(request, body, identity, did)

        response = pipeline.check(view_of, _response, _fallback, request_parents)
        parser = getattr(request.protocol, "parser", None)
        if isinstance(parser, _AnyMethodParser) and parser.any_method:
            response.force_close()  # the next check on a new connection, with the C parser
        return response

    return check


class HttpAuthzServer:
    """The HTTP transport in a thread of its own (its event loop), on ``host:port`` or,
    with ``unix_path``, on a unix socket. start() returns the bound port (0 on a socket)."""

    def __init__(self, pipeline: CheckPipeline, host: str, port: int, unix_path: str = "") -> None:
        self._pipeline = pipeline
        self._host, self._port, self._unix = host, port, unix_path
        self._server: _CheckServer | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._thread = LoopThread("check-http")
        self.port = 0

    async def _start(self) -> None:
        # access_log=None: no per-request logging on the hot path. Limits above Envoy's own
        # (60 KiB of headers, 100 headers by default), so that mandate, not aiohttp, decides
        # on any request Envoy accepted; the body exactly as the agent sent it (no gzip
        # decoding), as over gRPC.
        self._server = _CheckServer(
            self._pipeline,
            access_log=None,
            max_line_size=_MAX_HEADER_BYTES,
            max_field_size=_MAX_HEADER_BYTES,
            max_headers=_MAX_HEADERS,
            auto_decompress=False,
        )
        if self._unix:
            loop = asyncio.get_running_loop()
            self._listener = await loop.create_unix_server(self._server, self._unix)
        else:
            loop = asyncio.get_running_loop()
            self._listener = await loop.create_server(
                self._server, self._host, self._port, reuse_address=True
            )
            self.port = self._listener.sockets[0].getsockname()[1]

    @property
    def alive(self) -> bool:
        """Whether the server's loop runs (its thread has not ended)."""
        return self._thread.alive

    def start(self) -> int:
        """Start serving; return the bound port. Raises OSError if it cannot bind."""
        self._thread.start(self._start)
        return self.port

    def stop(self, grace: float = 1.0) -> None:
        async def _shutdown() -> None:
            if self._listener is not None:
                self._listener.close()
            if self._server is not None:
                await self._server.shutdown(grace)

        self._thread.stop(_shutdown, timeout=grace + 2)
