"""The agent context API (gRPC `mandate.agent.v1.AgentContext`, protos/): the adapter between
what an agent asks over its local socket and the supervisor's :class:`AgentAPIBackend`.

- `ReportTask` binds a task id to one of the agent's purposes; `RequestElevation` asks for a
  temporary elevation (granted at once with `approval: auto`, else pending for an operator);
  `GetStatus` is the agent's own status; `Explain` answers "would this call be allowed, and
  why?" without side effects, rate-limited per agent (a token bucket). The calls that change
  state (`ReportTask`, `RequestElevation`) have a bucket of their own (10/s, burst 100): each
  takes the store's lock, writes the state file and publishes a table every worker reads.
- The caller's agent is never read from the request: each listener serves exactly one agent,
  fixed by mandate's configuration (:class:`AgentAPIServer`), and the messages have no
  field that names an agent. Metadata the agent sends (e.g. `x-mandate-agent`) is ignored.
- The agent can ask but never approve: the service has no approve method; approvals arrive
  only through the operator paths (admin API, AgentElevation objects) of the supervisor.
- Input is validated here, with messages that name the field (INVALID_ARGUMENT), before
  the backend sees it: every string has a length bound and every number must be finite,
  >= 0 and at most `MAX_TTL` (a compromised agent sends whatever it likes; issue 15,
  finding 3: an infinite TTL stored a binding, then failed to be audited). A
  :class:`~sidecar.errors.AgentStateError` from the backend becomes its gRPC status with its
  message; any other exception becomes INTERNAL with a generic message and is logged: a
  handler never raises into gRPC and the server keeps serving.
- The servers are grpc.aio servers on the caller's event loop (the supervisor's): handlers are
  coroutines, and the backend's calls (in memory, plus a durable file write for a change) run
  on that loop. Nothing here is on the Check path.
The service is bound from the compiled descriptor (`sidecar._proto.context_pb2`, generated
at build time from protos/mandate/agent/v1/context.proto). This module must not contain
decision logic or state of the agents' context: the backend owns both.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio

from sidecar._proto import context_pb2 as pb
from sidecar.agentapi.taskrules import rules_from_pb, rules_to_pb
from sidecar.core.agentstate import ElevationRequest, Grant, RiskState, TaskBinding
from sidecar.core.decide import Decision
from sidecar.core.mcp import tool_call_from_json
from sidecar.core.taskscope import MAX_DECLARED_RULES
from sidecar.errors import AgentStateError, ConfigError
from sidecar.headers import TASK_ID, TASK_ID_RULE
from sidecar.state.agentstate import MAX_JUSTIFICATION, MAX_TTL

__all__ = [
    "MAX_BODY",
    "MAX_HEADERS",
    "MAX_JUSTIFICATION",
    "MAX_TTL",
    "SERVICE_NAME",
    "AgentAPIBackend",
    "AgentAPIServer",
    "AgentContextServicer",
    "AgentStatus",
    "ExplainInput",
    "ExplainLimiter",
    "validate_explain",
]

log = logging.getLogger(__name__)

SERVICE_NAME = "mandate.agent.v1.AgentContext"
_SERVICE = pb.DESCRIPTOR.services_by_name["AgentContext"]

MAX_BODY = 64 * 1024  # bytes of an Explain body (Envoy's with_request_body limit is smaller)
MAX_HEADERS = 100  # headers of an Explain request
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024  # all names and values of one Explain request
MAX_URL = 8 * 1024
MAX_MESSAGE = 256 * 1024  # largest request message the listener accepts (gRPC's own check)
MAX_DETAILS = 1000  # characters of an error message sent back

_NAME = re.compile(r"[\x21-\x7e]{1,253}")  # purpose and elevation names
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: methods, header names
_HOSTPORT = re.compile(r"[^\s/?#@\\]+:[0-9]{1,5}")  # CONNECT's authority-form
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control chars but \t \n \r
_HEADER_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a header value is one line
_INTERNAL = "internal error in mandate's context API (details are in mandate's log)"


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """The agent's own status as `GetStatus` returns it (the backend builds it)."""

    agent: str
    owner: str
    namespace: str
    purposes: tuple[str, ...]
    default_purpose: str
    tasks: tuple[TaskBinding, ...]
    requests: tuple[ElevationRequest, ...]
    grants: tuple[Grant, ...]  # active grants
    revoked: bool
    revocation_reason: str
    risk: RiskState | None


class AgentAPIBackend(Protocol):
    """What the API asks of the supervisor. ``agent`` is always the listener's agent.
    Raise :class:`~sidecar.errors.AgentStateError` (message, gRPC status name) to refuse."""

    def report_task(
        self,
        agent: str,
        task: str,
        purpose: str,
        ttl: float | None,
        allow: Sequence[Mapping[str, Any]] = (),
    ) -> TaskBinding:
        """Bind ``task`` to ``purpose`` (one of the agent's); ``ttl`` None: no expiry;
        ``allow`` (profile rule syntax, not yet validated): the task's declaration."""
        ...

    def end_task(self, agent: str, task: str) -> TaskBinding | None:
        """End the agent's active task ``task``; the ended task kept, or None (dropped)."""
        ...

    def request_elevation(
        self, agent: str, elevation: str, justification: str, duration: float | None
    ) -> ElevationRequest:
        """Record a request; ``duration`` None: the elevation's maxDuration."""
        ...

    def agent_status(self, agent: str) -> AgentStatus: ...

    def explain(
        self,
        agent: str,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        purpose: str,
        task: str,
    ) -> Decision:
        """The decision the call would get now, with no side effects. ``headers`` have
        lower-case names; ``purpose`` / ``task`` "" when not given."""
        ...


# -- validation (pure) ---------------------------------------------------------------------


def _bad(message: str) -> AgentStateError:
    return AgentStateError(message, "INVALID_ARGUMENT")


def _seconds(field: str, value: float) -> float | None:
    """A duration field: finite, >= 0 and at most MAX_TTL; 0 means "not given" (None)."""
    if not math.isfinite(value) or value < 0 or value > MAX_TTL:
        raise _bad(
            f"{field}: must be a finite number of seconds from 0 (none) to {MAX_TTL:.0f}, "
            f"not {value}"
        )
    return None if value == 0 else float(value)


def _task(field: str, value: str) -> str:
    if not TASK_ID.fullmatch(value):
        raise _bad(f"{field}: must be {TASK_ID_RULE} (no spaces)")
    return value


def _name(field: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise _bad(f"{field}: must be 1-253 visible ASCII characters (no spaces)")
    return value


def _justification(value: str) -> str:
    if len(value) > MAX_JUSTIFICATION:
        raise _bad(f"justification: at most {MAX_JUSTIFICATION} characters, not {len(value)}")
    if _CONTROL.search(value):
        raise _bad("justification: control characters (other than tab and newline) not allowed")
    return value


def _url(method: str, url: str) -> str:
    if not url:
        raise _bad("url: required")
    if len(url) > MAX_URL:
        raise _bad(f"url: at most {MAX_URL} characters")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise _bad("url: spaces and control characters not allowed (percent-encode them)")
    if method == "CONNECT":
        if not _HOSTPORT.fullmatch(url):
            raise _bad(f"url: CONNECT takes host:port, not {url[:128]!r}")
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as exc:
        raise _bad(f"url: {exc}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _bad(
            f"url: must be an absolute http:// or https:// URL (or host:port with CONNECT), "
            f"not {url[:128]!r}"
        )
    return url


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    if len(headers) > MAX_HEADERS:
        raise _bad(f"headers: at most {MAX_HEADERS}, not {len(headers)}")
    out: dict[str, str] = {}
    total = 0
    for name, value in headers.items():
        if len(name) > MAX_HEADER_NAME or not _TOKEN.fullmatch(name):
            raise _bad(
                f"headers: {name[:64]!r} is not a header name (1-{MAX_HEADER_NAME} token "
                "characters; give the method and authority in method and url)"
            )
        if len(value) > MAX_HEADER_VALUE:
            raise _bad(f"headers: value of {name!r} longer than {MAX_HEADER_VALUE} characters")
        if _HEADER_VALUE_BAD.search(value):
            raise _bad(f"headers: value of {name!r} contains a line break or control character")
        key = name.lower()
        if key in out:
            raise _bad(f"headers: {key!r} given twice (header names are case-insensitive)")
        out[key] = value
        total += len(name) + len(value)
    if total > MAX_HEADER_BYTES:
        raise _bad(f"headers: at most {MAX_HEADER_BYTES} characters in all")
    return out


@dataclass(frozen=True, slots=True)
class ExplainInput:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None
    purpose: str
    task: str


def validate_explain(req: pb.ExplainRequest) -> ExplainInput:
    """Check an ExplainRequest; raise AgentStateError (INVALID_ARGUMENT) naming the field."""
    method = req.method.upper()
    if not method or len(method) > 32 or not _TOKEN.fullmatch(method):
        raise _bad(f"method: must be an HTTP method (e.g. GET), not {req.method[:32]!r}")
    url = _url(method, req.url)
    headers = _headers(req.headers)
    if len(req.body) > MAX_BODY:
        raise _bad(f"body: at most {MAX_BODY} bytes, not {len(req.body)}")
    purpose = _name("purpose", req.purpose) if req.purpose else ""
    task = _task("task", req.task) if req.task else ""
    body = req.body or None
    if req.tool:
        body = _tool_call(method, req.tool, req.arguments, req.body)
        headers = {**headers, "content-type": "application/json"}
    elif req.arguments:
        raise _bad("arguments: only with tool (the MCP tool they are for)")
    return ExplainInput(method, url, headers, body, purpose, task)


def _tool_call(method: str, tool: str, arguments: str, body: bytes) -> bytes:
    if body:
        raise _bad("body: give either a body or a tool, not both")
    if method != "POST":
        raise _bad(f"method: an MCP tool call is a POST, not {method}")
    if len(tool) > 256:
        raise _bad("tool: at most 256 characters")
    if len(arguments) > MAX_BODY:
        raise _bad(f"arguments: at most {MAX_BODY} bytes")
    try:
        return tool_call_from_json(tool, arguments)
    except ValueError as exc:
        raise _bad(f"arguments: {exc}") from None


# -- proto translation ---------------------------------------------------------------------


def _task_pb(t: TaskBinding) -> pb.Task:
    return pb.Task(
        task_id=t.task,
        purpose=t.purpose,
        reported_at=t.reported_at,
        expires_at=t.expires_at or 0.0,
        allow=rules_to_pb(t.allow),
        ended=t.ended,
    )


def _declaration(messages: Sequence[pb.TaskRule]) -> list[dict[str, Any]]:
    if len(messages) > MAX_DECLARED_RULES:
        raise _bad(f"allow: at most {MAX_DECLARED_RULES} rules per task, not {len(messages)}")
    try:
        return rules_from_pb(messages)
    except ValueError as exc:
        raise _bad(str(exc)) from None


def _request_pb(r: ElevationRequest) -> pb.ElevationRequest:
    return pb.ElevationRequest(
        id=r.id,
        elevation=r.elevation,
        state=r.state,
        approval=r.approval,
        grant_id=r.grant_id,
        expires_at=r.expires_at or 0.0,
        approver=r.approver,
        message=r.message,
        requested_at=r.requested_at,
        duration_seconds=r.duration,
    )


def _grant_pb(g: Grant) -> pb.Grant:
    return pb.Grant(
        id=g.id,
        elevation=g.elevation,
        starts_at=g.starts_at,
        expires_at=g.expires_at,
        approver=g.approver,
        justification=g.justification,
    )


def _status_pb(agent: str, s: AgentStatus) -> pb.Status:
    # Defence in depth: whatever the backend returns, only this agent's entries leave.
    return pb.Status(
        agent=agent,
        owner=s.owner,
        namespace=s.namespace,
        purposes=list(s.purposes),
        default_purpose=s.default_purpose,
        tasks=[_task_pb(t) for t in s.tasks if t.agent == agent],
        requests=[_request_pb(r) for r in s.requests if r.agent == agent],
        grants=[_grant_pb(g) for g in s.grants if g.agent == agent],
        revoked=s.revoked,
        revocation_reason=s.revocation_reason,
        risk=s.risk.score if s.risk is not None else -1.0,
        risk_explanation=s.risk.explanation if s.risk is not None else "",
        risk_learning=s.risk.learning if s.risk is not None else False,
    )


def _explain_pb(d: Decision) -> pb.ExplainResponse:
    return pb.ExplainResponse(
        decision="allow" if d.allowed else "deny",
        code=d.code,
        reason=d.reason,
        rule=d.rule,
        purpose=d.purpose,
        task=d.task,
        elevation=d.grant.elevation if d.grant is not None else "",
        grant_id=d.grant.id if d.grant is not None else "",
        constraint=d.constraint,
    )


def _status_code(name: str) -> grpc.StatusCode:
    code = grpc.StatusCode.__members__.get(name.upper())
    if code is None or code is grpc.StatusCode.OK:
        log.warning("context API: AgentStateError with unknown status %r, answering UNKNOWN", name)
        return grpc.StatusCode.UNKNOWN
    return code


# -- the servicer --------------------------------------------------------------------------


class ExplainLimiter:
    """Per-agent token buckets: ``rate`` tokens a second, at most ``burst`` saved. One for
    `Explain`, one for the calls that change state (`ReportTask`, `RequestElevation`: each
    takes the store's lock, writes the state file and publishes a table generation that
    every worker reads). The listeners share one, on one event loop (not thread-safe)."""

    def __init__(
        self, rate: float = 20.0, burst: int = 40, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise ValueError(f"explain rate {rate}/s, burst {burst}: both must be positive")
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # agent -> (tokens, when)

    def take(self, agent: str) -> bool:
        now = self._clock()
        tokens, then = self._buckets.get(agent, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - then) * self.rate)
        if tokens < 1.0:
            self._buckets[agent] = (tokens, now)
            return False
        self._buckets[agent] = (tokens - 1.0, now)
        return True


_R = TypeVar("_R")
_Context = grpc.aio.ServicerContext[Any, Any]


class AgentContextServicer:
    """`mandate.agent.v1.AgentContext` for one agent (the listener's), over ``backend``."""

    def __init__(
        self,
        backend: AgentAPIBackend,
        agent: str,
        limiter: ExplainLimiter,
        writes: ExplainLimiter | None = None,
    ) -> None:
        if not agent:
            raise ValueError("the context API needs the agent its listener serves")
        self.backend = backend
        self.agent = agent
        self._limiter = limiter
        self._writes = writes

    def _take_write(self, rpc: str) -> None:
        """Spend one of the agent's state-changing calls (after validation: a refused call
        changes nothing and costs the store nothing)."""
        if self._writes is not None and not self._writes.take(self.agent):
            raise AgentStateError(
                f"{rpc} is limited to {self._writes.rate:g} calls a second "
                f"(burst {self._writes.burst}) per agent: retry later",
                "RESOURCE_EXHAUSTED",
            )

    async def _answer(
        self, rpc: str, context: _Context, fn: Callable[[], _R | Awaitable[_R]]
    ) -> _R:
        """Run ``fn``; turn a AgentStateError into its status, anything else into INTERNAL."""
        try:
            result = fn()
            if inspect.isawaitable(result):
                return await result
            return result
        except AgentStateError as exc:
            code, details = _status_code(exc.status), str(exc)
            log.debug("context API %s (agent %s): %s %s", rpc, self.agent, code.name, details)
        except Exception:
            log.exception("context API %s (agent %s) failed", rpc, self.agent)
            code, details = grpc.StatusCode.INTERNAL, _INTERNAL
        if len(details) > MAX_DETAILS:
            details = details[: MAX_DETAILS - 3] + "..."
        await context.abort(code, details)

    async def ReportTask(self, request: pb.ReportTaskRequest, context: _Context) -> pb.Task:
        async def run() -> pb.Task:
            task = _task("task_id", request.task_id)
            purpose = _name("purpose", request.purpose)
            ttl = _seconds("ttl_seconds", request.ttl_seconds)
            allow = _declaration(request.allow)
            self._take_write("ReportTask")
            # Off the event loop: a declaration is validated and compiled (bounded, but not
            # free), and the loop also serves revocations and operators.
            report = self.backend.report_task
            return _task_pb(await asyncio.to_thread(report, self.agent, task, purpose, ttl, allow))

        return await self._answer("ReportTask", context, run)

    async def EndTask(self, request: pb.EndTaskRequest, context: _Context) -> pb.Task:
        async def run() -> pb.Task:
            task = _task("task_id", request.task_id)
            self._take_write("EndTask")
            # Off the event loop, as every change: a commit lays out and writes the table
            # under the store's lock, which a full table makes slow.
            kept = await asyncio.to_thread(self.backend.end_task, self.agent, task)
            return _task_pb(kept) if kept is not None else pb.Task(task_id=task)

        return await self._answer("EndTask", context, run)

    async def RequestElevation(
        self, request: pb.RequestElevationRequest, context: _Context
    ) -> pb.ElevationRequest:
        async def run() -> pb.ElevationRequest:
            elevation = _name("elevation", request.elevation)
            justification = _justification(request.justification)
            duration = _seconds("duration_seconds", request.duration_seconds)
            self._take_write("RequestElevation")
            ask = self.backend.request_elevation
            return _request_pb(
                await asyncio.to_thread(ask, self.agent, elevation, justification, duration)
            )

        return await self._answer("RequestElevation", context, run)

    async def GetStatus(self, request: pb.GetStatusRequest, context: _Context) -> pb.Status:
        async def run() -> pb.Status:  # in a thread: it waits for the store's lock
            return _status_pb(
                self.agent, await asyncio.to_thread(self.backend.agent_status, self.agent)
            )

        return await self._answer("GetStatus", context, run)

    async def Explain(self, request: pb.ExplainRequest, context: _Context) -> pb.ExplainResponse:
        async def run() -> pb.ExplainResponse:
            if not self._limiter.take(self.agent):
                raise AgentStateError(
                    f"Explain is limited to {self._limiter.rate:g} calls a second "
                    f"(burst {self._limiter.burst}) per agent: retry later",
                    "RESOURCE_EXHAUSTED",
                )
            x = validate_explain(request)
            decision = await asyncio.to_thread(  # off the event loop, as ReportTask
                self.backend.explain,
                self.agent, x.method, x.url, x.headers, x.body, x.purpose, x.task,
            )  # fmt: skip
            return _explain_pb(decision)

        return await self._answer("Explain", context, run)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, bound from the compiled descriptor."""
        methods: dict[str, tuple[Callable[[Any, _Context], Any], Any, Any]] = {
            "ReportTask": (self.ReportTask, pb.ReportTaskRequest, pb.Task),
            "EndTask": (self.EndTask, pb.EndTaskRequest, pb.Task),
            "RequestElevation": (
                self.RequestElevation,
                pb.RequestElevationRequest,
                pb.ElevationRequest,
            ),
            "GetStatus": (self.GetStatus, pb.GetStatusRequest, pb.Status),
            "Explain": (self.Explain, pb.ExplainRequest, pb.ExplainResponse),
        }
        declared = {m.name: m for m in _SERVICE.methods}
        if set(declared) != set(methods):  # the .proto and this module disagree: fail loudly
            raise RuntimeError(f"{SERVICE_NAME}: proto declares {sorted(declared)}")
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for name, (behaviour, req_cls, resp_cls) in methods.items():
            m = declared[name]
            assert m.input_type.full_name == req_cls.DESCRIPTOR.full_name
            assert m.output_type.full_name == resp_cls.DESCRIPTOR.full_name
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=req_cls.FromString,
                response_serializer=resp_cls.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# -- the server ----------------------------------------------------------------------------


def _unix_path(address: str) -> str | None:
    if not address.startswith("unix:"):
        return None
    path = address[len("unix:") :]
    return "/" + path.lstrip("/") if path.startswith("//") else path


class AgentAPIServer:
    """One gRPC server (grpc.aio, on the event loop that starts it) per listener; each listener
    serves the one agent it is configured for. ``listeners``: (agent, address) pairs, address
    "HOST:PORT" (port 0: a free port) or "unix:/path". ``threads`` sizes the calls a listener
    takes at once (``threads * 4``; more are refused with RESOURCE_EXHAUSTED). A unix socket
    is made connectable by any user (``socket_mode``, default 0o666): the agent's container
    runs as another user, and the directory holding the socket (a volume only the pod mounts)
    is what restricts access."""

    def __init__(
        self,
        backend: AgentAPIBackend,
        listeners: Sequence[tuple[str, str]],
        *,
        explain_rate: float = 20.0,
        explain_burst: int = 40,
        write_rate: float = 10.0,
        write_burst: int = 100,
        threads: int = 4,
        socket_mode: int | None = 0o666,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not listeners:
            raise ConfigError("context API: no listener configured")
        addresses = [address for _, address in listeners]
        for agent, address in listeners:
            if not agent or not address:
                raise ConfigError(f"context API listener {(agent, address)!r}: agent and address")
        if len(set(addresses)) != len(addresses):
            raise ConfigError(f"context API: an address is listed twice in {addresses}")
        self.backend = backend
        self.listeners = tuple(listeners)
        self.limiter = ExplainLimiter(explain_rate, explain_burst, clock)
        self.writes = ExplainLimiter(write_rate, write_burst, clock)
        self._threads = threads
        self._socket_mode = socket_mode
        self._servers: list[grpc.aio.Server] = []

    async def start(self) -> list[int]:
        """Bind and start every listener on the running event loop; return the bound ports
        (0 for a unix socket). ConfigError when an address cannot be bound (nothing is left
        running)."""
        ports: list[int] = []
        for agent, address in self.listeners:
            servicer = AgentContextServicer(self.backend, agent, self.limiter, self.writes)
            server = grpc.aio.server(
                handlers=[servicer.handler()],
                options=[
                    ("grpc.so_reuseport", 0),
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                ],
                maximum_concurrent_rpcs=self._threads * 4,
            )
            try:
                port = server.add_insecure_port(address)
            except RuntimeError as exc:
                await self.stop(None)
                raise ConfigError(
                    f"context API for {agent!r}: cannot bind {address!r} ({exc})"
                ) from None
            path = _unix_path(address)
            await server.start()
            self._servers.append(server)
            if path is not None:
                if self._socket_mode is not None:
                    os.chmod(path, self._socket_mode)
                port = 0
            ports.append(port)
            log.info("context API for agent %s on %s", agent, address)
        return ports

    async def stop(self, grace: float | None = None) -> None:
        """Stop every listener (``grace`` seconds for calls in flight) and wait."""
        servers, self._servers = self._servers, []
        await asyncio.gather(*(s.stop(grace) for s in servers))
