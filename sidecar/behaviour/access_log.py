"""Envoy adapter: the Access Log Service (`envoy.service.accesslog.v3.AccessLogService`).

Envoy's `envoy.access_loggers.http_grpc` logger (envoy/*.yaml, log_name "mandate") streams
one HTTPAccessLogEntry per finished call. ext_authz only sees requests; this sees the
outcome: the status Envoy answered the agent with and the bytes either way. Each entry
becomes a :class:`~sidecar.core.behaviour.CallEvent` for the behaviour engine:
- agent, code, allow/deny and decision id: the dynamic metadata mandate's answer put under
  `envoy.filters.http.ext_authz`. Envoy keeps it on allowed and on denied calls. The gRPC
  transport sets `agent`, `code`, `decision`, `decision_id` (`ext_authz.response_for`);
  the HTTP transport's answer headers become metadata under their own names
  (`x-mandate-log-agent`, `x-mandate-code`, `x-mandate-outcome`, `x-mandate-decision`:
  `http_authz`, `dynamic_metadata_from_headers`);
- what the call was (its MCP tools, their argument shapes, the fingerprints of its
  sensitive arguments: :class:`~sidecar.core.callfacts.CallFacts`): the same metadata's
  `call` (gRPC) or `x-mandate-call` (HTTP), which mandate's answer sets for an agent under
  behaviour analysis;
- method, host (lower case, no port) and path (no query) from the request;
- status from `response.response_code`, bytes from `response.response_body_bytes` (to the
  agent) and `request.request_body_bytes` (from the agent);
- `at`: the call's start (Envoy's `start_time`) when it fits this process's clock (not
  later than the entry's arrival, nor earlier than the call's duration plus a minute
  before it); else the arrival time.

An entry without an agent (Envoy answered before mandate was asked, or mandate could not
attribute the call) is skipped and counted. A bad entry never ends the stream and the
sink's errors are logged, never raised into gRPC: Envoy would only drop the stream and
reconnect. The attribution is the metadata mandate itself wrote: nothing the agent sends
reaches it. The server is a grpc.aio server on the supervisor's event loop (not the Check
path): each stream is a coroutine, and the sink is called on that loop. No decision logic
and no behaviour logic here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from sidecar.core.behaviour import CallEvent
from sidecar.core.callfacts import decode
from sidecar.errors import ConfigError
from sidecar.headers import (
    CALL_HEADER,
    CODE_HEADER,
    DECISION_HEADER,
    LOG_AGENT_HEADER,
    OUTCOME_HEADER,
)

__all__ = ["AUTHZ_NAMESPACE", "AccessLogServicer", "event_from_entry", "start_als_server"]

log = logging.getLogger(__name__)

AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
# Metadata keys: (gRPC transport, HTTP transport).
_AGENT = ("agent", LOG_AGENT_HEADER)
_CODE = ("code", CODE_HEADER)
_DECISION = ("decision", OUTCOME_HEADER)
_DECISION_ID = ("decision_id", DECISION_HEADER)
_CALL = ("call", CALL_HEADER)
_METHODS = {
    value.number: value.name
    for value in accesslog_pb2.HTTPAccessLogEntry.DESCRIPTOR.fields_by_name["request"]
    .message_type.fields_by_name["request_method"]
    .enum_type.values
    if value.number != 0
}


# How much later than its call's end an entry may arrive: Envoy flushes its access log
# stream within a second; more than this, and Envoy's start_time is on another clock.
_START_SLACK = 60.0


def _string(fields: Any, keys: tuple[str, str]) -> str:
    for key in keys:
        if key in fields:
            value = fields[key]
            if value.WhichOneof("kind") == "string_value":
                return str(value.string_value)
    return ""


def _host(authority: str) -> str:
    """The authority's host, lower case, without its port ("[::1]:80" -> "[::1]")."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1].lower() if end != -1 else authority.lower()
    return authority.rsplit(":", 1)[0].lower() if ":" in authority else authority.lower()


def event_from_entry(
    entry: accesslog_pb2.HTTPAccessLogEntry, namespace: str, now: float
) -> CallEvent | None:
    """The call one ALS entry describes, or None if no agent is named in its metadata.
    ``now`` is when it arrived: the event's time is the call's start if that fits ``now``
    and the call's duration, else ``now``."""
    common = entry.common_properties
    meta = common.metadata.filter_metadata
    if AUTHZ_NAMESPACE not in meta:
        return None
    fields = meta[AUTHZ_NAMESPACE].fields
    agent = _string(fields, _AGENT)
    if not agent:
        return None
    code = _string(fields, _CODE)
    decision = _string(fields, _DECISION)
    allowed = decision == "allow" if decision else code == "allowed"
    at = now
    if common.HasField("start_time"):
        start = common.start_time.seconds + common.start_time.nanos / 1e9
        took = common.time_to_last_downstream_tx_byte
        earliest = now - (took.seconds + took.nanos / 1e9) - _START_SLACK
        if earliest <= start <= now:
            at = start
        # Else Envoy's clock disagrees with this process's (a step of the wall clock between
        # the call and its entry): the arrival time is the better guess, and an event is
        # never pushed out of the behaviour windows (or ahead of them) by a clock step.
    request, response = entry.request, entry.response
    return CallEvent(
        at=at,
        agent=agent,
        namespace=namespace,
        method=_METHODS.get(request.request_method, ""),
        host=_host(request.authority),
        path=request.path.split("?", 1)[0],
        allowed=allowed,
        code=code,
        status=response.response_code.value,
        bytes_sent=response.response_body_bytes,
        bytes_received=request.request_body_bytes,
        decision_id=_string(fields, _DECISION_ID),
        facts=decode(_string(fields, _CALL)),
    )


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """StreamAccessLogs: every message's HTTP entries, converted, go to ``sink`` as one
    list (called on the server's event loop: it must be quick). ``namespace`` is the pod's
    (the sidecar's configuration), as for revocations. The counters are written on that
    loop only."""

    def __init__(
        self,
        sink: Callable[[list[CallEvent]], None],
        *,
        namespace: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sink = sink
        self._namespace = namespace
        self._clock = clock
        self._received = self._converted = self._skipped = 0

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any] | None,
    ) -> als_pb2.StreamAccessLogsResponse:
        try:
            async for message in request_iterator:
                self._handle(message)
        except Exception as exc:  # the stream broke (Envoy went away): nothing to answer
            log.debug("access log stream ended: %r", exc)
        return als_pb2.StreamAccessLogsResponse()

    def _handle(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        events: list[CallEvent] = []
        skipped = 0
        entries = message.http_logs.log_entry
        now = self._clock()
        for entry in entries:
            try:
                event = event_from_entry(entry, self._namespace, now)
            except Exception:  # one bad entry costs itself, not the stream
                log.exception("skipping an access log entry that could not be read")
                event = None
            if event is None:
                skipped += 1
            else:
                events.append(event)
        self._received += len(entries)
        self._converted += len(events)
        self._skipped += skipped
        if events:
            try:
                self._sink(events)
            except Exception:  # behaviour analysis must never break the log stream
                log.exception("the access log sink failed on %d events", len(events))

    def stats(self) -> dict[str, int]:
        """HTTP entries received, converted to events and skipped (no agent, unreadable)."""
        return {
            "received": self._received,
            "converted": self._converted,
            "skipped": self._skipped,
        }


async def start_als_server(
    listen: str,
    servicer: AccessLogServicer,
    *,
    max_streams: int = 16,
    socket_mode: int | None = 0o666,
) -> tuple[grpc.aio.Server, int]:
    """Serve the ALS on ``listen`` ("HOST:PORT", port 0 picks one, or "unix:/path") on the
    running event loop; return the started server and its port (0 on a unix socket). Each
    Envoy worker thread holds one stream open: beyond ``max_streams`` a stream is refused
    rather than left waiting, and Envoy drops those entries. Raises ConfigError if it cannot
    bind (nothing is left running).
    A unix socket is made writable for every user (``socket_mode``): Envoy runs as another
    user; who may connect is decided by who mounts the socket's directory (in a pod, only
    Envoy's and mandate's containers, never the agent's).
    """
    server = grpc.aio.server(maximum_concurrent_rpcs=max_streams)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ConfigError(f"--access-log {listen!r}: cannot bind ({exc})") from None
    await server.start()
    if listen.startswith("unix:") and socket_mode is not None:
        try:
            os.chmod(listen.removeprefix("unix:").removeprefix("//"), socket_mode)
        except OSError:
            await server.stop(None)
            raise
    return server, 0 if listen.startswith("unix:") else port
