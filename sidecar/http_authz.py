"""Envoy adapter, HTTP transport: Envoy's ext_authz filter in `http_service` mode, served
with aiohttp's low-level server (no router, no middlewares: this is the hot path).

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
  decision code) and `x-mandate-log-agent` (the agent the call was attributed to, if any)
  become dynamic metadata (`dynamic_metadata_from_headers`) for the access logs: Envoy's
  ALS entry carries them, allowed or denied, which attributes each call to its agent for
  behaviour analysis (`als`). The last two are in neither `allowed_upstream_headers` nor
  `allowed_client_headers`, so Envoy passes them to no one. The agent is named in a
  header of its own rather than `x-mandate-agent`: that one means "set this upstream", and
  a deny never carries it, so that no config passing it on could hand it to the client.
Nothing here raises into aiohttp: a malformed request or any error is a 403 deny (fail
closed; a 5xx would be Envoy's `status_on_error`). There is deliberately no health route:
any 200 on this port could pass as an allow. No decision logic here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from .authz import DECISION_HEADER, Authorizer, make_view, request_parents, upstream_headers
from .authz import deny_body as _deny_body
from .core import Decision, RequestView
from .errors import BadRequestError
from .loopthread import LoopThread

__all__ = ["PREFIX", "HttpAuthzServer", "handler", "parse_target"]

log = logging.getLogger(__name__)

PREFIX = "/mandate"
_AGENT = ";agent="
_CONNECT = ";connect"
OUTCOME_HEADER = "x-mandate-outcome"
CODE_HEADER = "x-mandate-code"  # for Envoy's access logs only (dynamic metadata)
LOG_AGENT_HEADER = "x-mandate-log-agent"  # for Envoy's access logs only (dynamic metadata)
LENGTH_HEADER = "x-mandate-content-length"
LENGTH_PREFIX = "len="  # envoy/*-http.yaml: "len=%REQ(content-length)%", never empty
SCHEME_HEADER = "x-mandate-scheme"
_REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
_MAX_HEADER_BYTES = 128 * 1024
_MAX_HEADERS = 512


def parse_target(raw_path: str) -> tuple[str, bool, str]:
    """(agent named by the prefix or '', whether it is a CONNECT check, the call's path).
    Raises BadRequestError unless ``raw_path`` starts with a prefix of the envoy/ configs."""
    if not raw_path.startswith(PREFIX):
        raise BadRequestError(f"not an ext_authz request: the path lacks Envoy's {PREFIX} prefix")
    rest = raw_path[len(PREFIX) :]
    agent = ""
    if rest.startswith(_AGENT):
        end = len(rest)
        for sep in (";", "/"):
            at = rest.find(sep, len(_AGENT))
            if at != -1:
                end = min(end, at)
        agent, rest = rest[len(_AGENT) : end], rest[end:]
    if rest == _CONNECT:
        return agent, True, ""
    if not rest.startswith("/"):
        raise BadRequestError("malformed ext_authz path: expected the call's path after the prefix")
    return agent, False, rest


def _view(request: web.BaseRequest, body: bytes, authz: Authorizer, did: str) -> RequestView:
    agent, connect, path = parse_target(request.raw_path)
    headers: dict[str, str] = {}
    for key, value in request.headers.items():
        name = key.lower()
        # Repeated headers joined with "," as Envoy does in a gRPC CheckRequest.
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    # Envoy's Content-Length is the buffered body's; the call's own came in LENGTH_HEADER.
    headers.pop("content-length", None)
    length = headers.get(LENGTH_HEADER, "")
    if length.startswith(LENGTH_PREFIX) and len(length) > len(LENGTH_PREFIX):
        headers["content-length"] = length[len(LENGTH_PREFIX) :]
    return make_view(
        did,
        authz.identity,
        method="CONNECT" if connect else request.method,
        authority=headers.get("host", ""),
        path=path,
        scheme=headers.get(SCHEME_HEADER) or "http",
        headers=headers,
        body=body or None,
        context_extensions={"agent": agent} if agent else {},
    )


def _response(d: Decision, headers: Mapping[str, str]) -> web.Response:
    if d.allowed:
        to_set, to_remove = upstream_headers(d, headers)
        out = dict(to_set)
        out[OUTCOME_HEADER] = "allow"
        out[CODE_HEADER] = d.code
        if d.agent:
            out[LOG_AGENT_HEADER] = d.agent
        if to_remove:
            out[_REMOVE_HEADER] = ",".join(to_remove)
        return web.Response(status=200, headers=out)
    out = {
        "content-type": "application/json",
        DECISION_HEADER: d.decision_id,
        OUTCOME_HEADER: "deny",
        CODE_HEADER: d.code,
    }
    if d.agent:
        out[LOG_AGENT_HEADER] = d.agent
    return web.Response(status=403, body=_deny_body(d), headers=out)


def handler(authz: Authorizer) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The request handler of aiohttp's low-level server: one Check per request."""

    async def check(request: web.BaseRequest) -> web.StreamResponse:
        start = time.perf_counter()
        start_ns = time.time_ns() if authz.tracing is not None else 0
        error: Exception | None = None
        try:
            body = await request.read()
        except Exception as exc:  # the body is unreadable: decide on nothing, deny
            log.warning("reading the ext_authz request failed: %r", exc)
            body, error = b"", exc

        def view_of(did: str) -> RequestView:
            if error is not None:
                raise error
            return _view(request, body, authz, did)

        decision, headers = authz.decide(view_of)
        try:
            response = _response(decision, headers)
        except Exception:
            log.exception("building the ext_authz response failed; denying")
            response = web.Response(status=403)
        authz.observe(decision, start, start_ns, lambda: request_parents(headers))
        return response

    return check


class HttpAuthzServer:
    """The HTTP transport in a thread of its own (its event loop), on ``host:port`` or,
    with ``unix_path``, on a unix socket. start() returns the bound port (0 on a socket)."""

    def __init__(self, authz: Authorizer, host: str, port: int, unix_path: str = "") -> None:
        self._authz = authz
        self._host, self._port, self._unix = host, port, unix_path
        self._server: web.Server | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._thread = LoopThread("check-http")
        self.port = 0

    async def _start(self) -> None:
        # access_log=None: no per-request logging on the hot path. Limits above Envoy's own
        # (60 KiB of headers, 100 headers by default), so that mandate, not aiohttp, decides
        # on any request Envoy accepted; the body exactly as the agent sent it (no gzip
        # decoding), as over gRPC.
        self._server = web.Server(
            handler(self._authz),
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
