"""A small asyncio client of mandate's agent context API, for agent authors.

mandate serves the API on a local port or unix socket of the agent's pod (ask your
operator for the address, e.g. ``127.0.0.1:15080`` or ``unix:/var/run/mandate/context.sock``).
The API knows which agent is calling from the listener: there is nothing to authenticate
and no way to act as another agent. An agent can report its tasks, ask for elevations and
explain calls; it can never approve its own elevation::

    from sidecar.agentapi.client import AgentContext, use_context

    async with AgentContext("127.0.0.1:15080") as ctx:
        await ctx.report_task("INC-1234", purpose="incident-response", ttl=3600)
        # or, before reading untrusted data, declare the least the task needs (rules in the
        # profile's syntax); calls naming the task are then held to it as well:
        await ctx.report_task("PAY-77", purpose="payments", ttl=600, allow=[
            {"mcpTools": ["send_money"], "mcpArguments": {"send_money": {
                "properties": {"to": {"enum": ["DE89370400440532013000"]},
                               "amount": {"type": "number", "maximum": 100}},
                "required": ["to", "amount"]}}},
        ])
        use_context(http_session, task="INC-1234")  # later calls carry x-mandate-task
        req = await ctx.request_elevation("prod-write", "restart the stuck job", 900)
        req = await ctx.wait_for_grant(req.id, timeout=600)  # an operator approves
        why = await ctx.explain("POST", "https://api.example.com/v1/jobs/7/restart")
        print(why.allowed, why.reason)

Every method returns plain frozen dataclasses of this module (no protobuf). Errors the API
answers are raised as :class:`~sidecar.errors.AgentStateError` with the gRPC status name in
``status`` (e.g. "NOT_FOUND" for an unknown purpose, "UNAVAILABLE" when mandate is not
reachable); :meth:`AgentContext.wait_for_grant` raises :class:`ElevationRefused` or
:class:`TimeoutError`. This module must not import anything of mandate's server side.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from sidecar._proto import context_pb2 as pb
from sidecar.agentapi.taskrules import rules_from_pb, rules_to_pb
from sidecar.errors import AgentStateError
from sidecar.headers import PURPOSE_HEADER, TASK_HEADER, TASK_ID, TASK_ID_RULE

__all__ = [
    "PURPOSE_HEADER",
    "TASK_HEADER",
    "AgentContext",
    "ElevationRefused",
    "ElevationRequest",
    "Explanation",
    "Grant",
    "Status",
    "Task",
    "context_headers",
    "use_context",
]

_SERVICE = "/mandate.agent.v1.AgentContext/"
_PURPOSE = re.compile(r"[\x21-\x7e]{1,253}")


# -- values --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    """A reported task: calls carrying ``x-mandate-task: <task_id>`` get ``purpose``, held
    to ``allow`` as well when the task declared rules (the profile's syntax)."""

    task_id: str
    purpose: str
    reported_at: float
    expires_at: float | None  # None: no expiry
    allow: tuple[dict[str, Any], ...] = ()
    ended: bool = False  # ended early with a declaration: allows nothing until its TTL


@dataclass(frozen=True, slots=True)
class ElevationRequest:
    """An elevation request. ``state``: "pending", "granted", "expired" or "refused"."""

    id: str
    elevation: str
    state: str
    approval: str  # "auto" | "operator"
    grant_id: str
    expires_at: float | None  # pending: when it lapses; granted: when the grant ends
    approver: str
    message: str
    requested_at: float
    duration: float  # seconds

    @property
    def granted(self) -> bool:
        return self.state == "granted"


@dataclass(frozen=True, slots=True)
class Grant:
    """An active elevation grant."""

    id: str
    elevation: str
    starts_at: float
    expires_at: float
    approver: str
    justification: str


@dataclass(frozen=True, slots=True)
class Status:
    """The calling agent's own status."""

    agent: str
    owner: str
    namespace: str
    purposes: tuple[str, ...]
    default_purpose: str
    tasks: tuple[Task, ...]
    requests: tuple[ElevationRequest, ...]
    grants: tuple[Grant, ...]
    revoked: bool
    revocation_reason: str
    risk: float | None  # behaviour risk score in [0, 1]; None: not scored
    risk_explanation: str
    risk_learning: bool

    def request(self, request_id: str) -> ElevationRequest | None:
        return next((r for r in self.requests if r.id == request_id), None)


@dataclass(frozen=True, slots=True)
class Explanation:
    """What mandate would decide for a call now, and why."""

    decision: str  # "allow" | "deny"
    code: str  # stable code, e.g. "allowed", "outside_purpose", "revoked", "rate"
    reason: str
    rule: str
    purpose: str
    task: str
    elevation: str  # the elevation whose grant allows the call, if any
    grant_id: str
    constraint: str = ""  # the argument constraint or task declaration that decided, if any

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"


class ElevationRefused(AgentStateError):
    """An elevation request ended without a grant: refused, or expired before an operator
    approved it. ``request`` is its last state (``message`` says why)."""

    code = "elevation_refused"

    def __init__(self, request: ElevationRequest) -> None:
        why = f": {request.message}" if request.message else ""
        super().__init__(
            f"elevation request {request.id} ({request.elevation}) {request.state}{why}",
            "FAILED_PRECONDITION",
        )
        self.request = request


def _opt(t: float) -> float | None:
    return t if t else None


def _task(m: pb.Task) -> Task:
    allow = tuple(rules_from_pb(m.allow))
    return Task(m.task_id, m.purpose, m.reported_at, _opt(m.expires_at), allow, m.ended)


def _request(m: pb.ElevationRequest) -> ElevationRequest:
    return ElevationRequest(
        id=m.id,
        elevation=m.elevation,
        state=m.state,
        approval=m.approval,
        grant_id=m.grant_id,
        expires_at=_opt(m.expires_at),
        approver=m.approver,
        message=m.message,
        requested_at=m.requested_at,
        duration=m.duration_seconds,
    )


def _grant(m: pb.Grant) -> Grant:
    return Grant(m.id, m.elevation, m.starts_at, m.expires_at, m.approver, m.justification)


def _status(m: pb.Status) -> Status:
    return Status(
        agent=m.agent,
        owner=m.owner,
        namespace=m.namespace,
        purposes=tuple(m.purposes),
        default_purpose=m.default_purpose,
        tasks=tuple(_task(t) for t in m.tasks),
        requests=tuple(_request(r) for r in m.requests),
        grants=tuple(_grant(g) for g in m.grants),
        revoked=m.revoked,
        revocation_reason=m.revocation_reason,
        risk=m.risk if m.risk >= 0 else None,
        risk_explanation=m.risk_explanation,
        risk_learning=m.risk_learning,
    )


def _explanation(m: pb.ExplainResponse) -> Explanation:
    return Explanation(
        m.decision,
        m.code,
        m.reason,
        m.rule,
        m.purpose,
        m.task,
        m.elevation,
        m.grant_id,
        m.constraint,
    )


# -- the client ----------------------------------------------------------------------------

_Resp = TypeVar("_Resp", bound=Message)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class AgentContext:
    """The agent context API at ``target`` ("HOST:PORT" or "unix:/path").

    ``timeout``: seconds each call may take. The channel is opened on first use, in the
    running event loop; close it with :meth:`close` or ``async with``."""

    def __init__(self, target: str, *, timeout: float = 5.0) -> None:
        if not target:
            raise ValueError("target: the context API's address, e.g. 127.0.0.1:15080")
        self.target = target
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> AgentContext:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def _call(self, method: str, request: Message, response: type[_Resp]) -> _Resp:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target)
        call = self._channel.unary_unary(
            _SERVICE + method,
            request_serializer=_serialize,
            response_deserializer=response.FromString,
        )
        try:
            result: _Resp = await call(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            details = exc.details() or code.name
            raise AgentStateError(f"{method}: {details}", code.name) from None
        return result

    async def report_task(
        self,
        task_id: str,
        purpose: str,
        ttl: float | None = None,
        allow: Sequence[Mapping[str, Any]] | None = None,
    ) -> Task:
        """Bind ``task_id`` to ``purpose`` (one of the agent's) for ``ttl`` seconds (None:
        no expiry). Reporting the same task id again rebinds it.

        ``allow``: the task's declaration, allow rules in the profile's syntax (`hosts`,
        `methods`, `paths`, `mcpTools`, `mcpMethods`, `mcpArguments`, `query`, `jsonBody`).
        Calls naming the task are then allowed only within both the purpose and one of these
        rules, for the task's lifetime; such a task cannot be changed while it is active
        (the same request again returns it; another is refused "FAILED_PRECONDITION").
        Declare before the agent reads untrusted data. ValueError: a rule that cannot be
        sent (mandate validates the rest: "INVALID_ARGUMENT" names `allow[i].field`)."""
        req = pb.ReportTaskRequest(
            task_id=task_id,
            purpose=purpose,
            ttl_seconds=ttl or 0.0,
            allow=rules_to_pb(allow or ()),
        )
        return _task(await self._call("ReportTask", req, pb.Task))

    async def end_task(self, task_id: str) -> Task:
        """End an active task before its TTL. One without a declaration is dropped; one with
        a declaration is kept, ended (`Task.ended`), until its TTL: calls naming it are
        denied and the id cannot be reported again until then. "NOT_FOUND": no such task."""
        return _task(await self._call("EndTask", pb.EndTaskRequest(task_id=task_id), pb.Task))

    async def request_elevation(
        self, name: str, justification: str, duration: float | None = None
    ) -> ElevationRequest:
        """Ask for the elevation ``name`` of the agent's profile for ``duration`` seconds
        (None: its maxDuration). The answer is granted already (`approval: auto`) or
        pending: :meth:`wait_for_grant` waits for an operator."""
        req = pb.RequestElevationRequest(
            elevation=name, justification=justification, duration_seconds=duration or 0.0
        )
        return _request(await self._call("RequestElevation", req, pb.ElevationRequest))

    async def status(self) -> Status:
        """The agent's own status (purposes, tasks, requests, grants, revocation, risk)."""
        return _status(await self._call("GetStatus", pb.GetStatusRequest(), pb.Status))

    async def wait_for_grant(
        self, request_id: str | ElevationRequest, timeout: float, poll: float = 0.2
    ) -> ElevationRequest:
        """Poll the status until the request is granted and return it. Raises
        :class:`ElevationRefused` when it is refused or expires, :class:`TimeoutError` when
        it is still pending after ``timeout`` seconds, AgentStateError("NOT_FOUND") when
        mandate does not know the request."""
        rid = request_id.id if isinstance(request_id, ElevationRequest) else request_id
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            req = (await self.status()).request(rid)
            if req is None:
                raise AgentStateError(f"no elevation request {rid!r} for this agent", "NOT_FOUND")
            if req.state == "granted":
                return req
            if req.state != "pending":
                raise ElevationRefused(req)
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"elevation request {rid} ({req.elevation}) still pending after {timeout}s: "
                    "an operator has not approved it"
                )
            await asyncio.sleep(min(poll, left))

    async def explain(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        purpose: str = "",
        task: str = "",
        tool: str = "",
        arguments: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """Would this call be allowed now, and why? No side effects; rate-limited
        (AgentStateError "RESOURCE_EXHAUSTED" when asked too often). ``tool`` (and
        ``arguments``): explain the MCP `tools/call` of that tool instead of ``body``;
        `Explanation.constraint` names the argument constraint that decided."""
        req = pb.ExplainRequest(
            method=method,
            url=url,
            headers=dict(headers or {}),
            body=body or b"",
            purpose=purpose,
            task=task,
            tool=tool,
            arguments=json.dumps(arguments) if arguments is not None else "",
        )
        return _explanation(await self._call("Explain", req, pb.ExplainResponse))


# -- declaring the context on HTTP calls ---------------------------------------------------


def context_headers(purpose: str | None = None, task: str | None = None) -> dict[str, str]:
    """The headers that declare a call's purpose and/or task (None or "": leave it out).
    They select among rights the agent already has; they never add rights. ValueError
    when a value could not be a purpose or task id."""
    headers: dict[str, str] = {}
    if purpose:
        if not _PURPOSE.fullmatch(purpose):
            raise ValueError(f"purpose {purpose[:64]!r}: 1-253 visible ASCII characters")
        headers[PURPOSE_HEADER] = purpose
    if task:
        if not TASK_ID.fullmatch(task):
            raise ValueError(f"task {task[:64]!r}: {TASK_ID_RULE}")
        headers[TASK_HEADER] = task
    return headers


class _HasHeaders(Protocol):
    @property
    def headers(self) -> Any: ...


def use_context(
    session: _HasHeaders, purpose: str | None = None, task: str | None = None
) -> dict[str, str]:
    """Make every later request of ``session`` declare this purpose and task: sets the
    session's default headers (an ``aiohttp.ClientSession``, whose ``headers`` is its own
    mutable CIMultiDict, or an ``httpx.Client``/``AsyncClient``). The session's context
    becomes exactly (purpose, task): a header not given now is removed, so a stale purpose
    cannot outlive a switch to a task. Returns the headers set; to declare a context for
    one request only, pass ``context_headers(...)`` to that request instead."""
    wanted = context_headers(purpose, task)
    headers = session.headers
    if not isinstance(headers, MutableMapping) and not all(
        hasattr(headers, m) for m in ("__setitem__", "__delitem__", "__contains__")
    ):
        raise TypeError(
            f"{type(session).__name__}.headers is not mutable: pass "
            "context_headers(purpose, task) to each request instead"
        )
    for name in (PURPOSE_HEADER, TASK_HEADER):
        if name in headers:
            del headers[name]  # removes every value (multidicts keep several)
        if name in wanted:
            headers[name] = wanted[name]
    return wanted
