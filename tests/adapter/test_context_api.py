"""The agent context API over real gRPC: `AgentAPIServer` (grpc.aio, on the test's event loop
as on the supervisor's) on 127.0.0.1 port 0 and on a unix socket, a fake backend (recording
what it is asked), and the real client (`sidecar.agentapi.client`).

Every RPC round-trips; the agent is always the listener's, whatever the caller sends; there
is no approve method; AgentStateError statuses become gRPC codes; bad input is refused before
the backend sees it; Explain is rate-limited per agent; a failing backend is INTERNAL and the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from sidecar._proto import context_pb2 as pb
from sidecar.agentapi.client import AgentContext, ElevationRefused
from sidecar.agentapi.server import SERVICE_NAME, AgentAPIServer, AgentStatus
from sidecar.agentapi.taskrules import rules_to_pb
from sidecar.core.agentstate import ElevationRequest, Grant, RiskState, TaskBinding
from sidecar.core.decide import Decision
from sidecar.errors import AgentStateError, ConfigError

AGENT = "billing-agent"
OTHER = "research-agent"
NS = "agents"
T0 = 1_700_000_000.0

MakeServer = Callable[..., Awaitable[tuple[AgentAPIServer, list[int]]]]


class FakeBackend:
    """Records every call as (method, args); answers from canned values. ``fail[method]``
    is raised instead of answering."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BaseException] = {}
        self.requests: dict[str, ElevationRequest] = {}
        self.status_calls = 0
        self.after_status: Callable[[FakeBackend], None] | None = None
        self.extra_status: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _record(self, method: str, *args: Any) -> None:
        with self._lock:
            self.calls.append((method, args))
        if method in self.fail:
            raise self.fail[method]

    def agents_seen(self) -> set[str]:
        return {args[0] for _, args in self.calls}

    def report_task(
        self,
        agent: str,
        task: str,
        purpose: str,
        ttl: float | None,
        allow: Sequence[Mapping[str, Any]] = (),
    ) -> TaskBinding:
        self._record("report_task", agent, task, purpose, ttl, *([list(allow)] if allow else []))
        expires = None if ttl is None else T0 + ttl
        return TaskBinding(agent, NS, task, purpose, T0, expires, tuple(allow))

    def request_elevation(
        self, agent: str, elevation: str, justification: str, duration: float | None
    ) -> ElevationRequest:
        self._record("request_elevation", agent, elevation, justification, duration)
        auto = elevation.startswith("auto-")
        rid = f"elev-{len(self.requests) + 1}"
        req = ElevationRequest(
            id=rid, agent=agent, namespace=NS, elevation=elevation,
            justification=justification, requested_at=T0,
            duration=600.0 if duration is None else duration,
            state="granted" if auto else "pending", approval="auto" if auto else "operator",
            grant_id=f"grant-{rid}" if auto else "", expires_at=T0 + 3600,
            approver="auto" if auto else "",
        )  # fmt: skip
        with self._lock:
            self.requests[rid] = req
        return req

    def agent_status(self, agent: str) -> AgentStatus:
        self._record("agent_status", agent)
        with self._lock:
            self.status_calls += 1
        if self.after_status is not None:
            self.after_status(self)
        grants = tuple(
            Grant(
                r.grant_id, agent, NS, r.elevation, T0, T0 + r.duration, r.approver, r.justification
            )
            for r in self.requests.values()
            if r.state == "granted"
        )
        fields: dict[str, Any] = {
            "agent": agent,
            "owner": "team-billing",
            "namespace": NS,
            "purposes": ("reconcile", "refunds"),
            "default_purpose": "reconcile",
            "tasks": (TaskBinding(agent, NS, "INC-1", "refunds", T0, T0 + 60),),
            "requests": tuple(self.requests.values()),
            "grants": grants,
            "revoked": False,
            "revocation_reason": "",
            "risk": RiskState(agent, NS, 0.25, "new hosts: 0.25", learning=True),
        }
        fields.update(self.extra_status)
        return AgentStatus(**fields)

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
        self._record("explain", agent, method, url, dict(headers), body, purpose, task)
        if "refund" in url:
            grant = Grant("grant-9", agent, NS, "refund", T0, T0 + 600, "alice@example.com")
            return Decision(
                "explain-1", True, "allowed", "allowed by elevation refund", agent=agent,
                purpose=purpose or "reconcile", task=task, rule="elevation refund allow[0]",
                grant=grant,
            )  # fmt: skip
        if body is not None and b"tools/call" in body:
            return Decision(
                "explain-3", True, "allowed", "allowed by rule reconcile.allow[0]", agent=agent,
                purpose="reconcile", constraint="reconcile.allow[0] mcpArguments.send_money",
            )  # fmt: skip
        return Decision(
            "explain-2", False, "outside_purpose", "outside purpose 'reconcile'", agent=agent,
            purpose="reconcile", task=task,
        )  # fmt: skip


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def make_server(backend: FakeBackend) -> AsyncIterator[MakeServer]:
    servers: list[AgentAPIServer] = []

    async def make(
        listeners: list[tuple[str, str]] | None = None, **kwargs: Any
    ) -> tuple[AgentAPIServer, list[int]]:
        server = AgentAPIServer(backend, listeners or [(AGENT, "127.0.0.1:0")], **kwargs)
        servers.append(server)
        return server, await server.start()

    yield make
    for s in servers:
        await s.stop(0)


@pytest.fixture
async def ctx(
    make_server: MakeServer,
) -> AsyncIterator[AgentContext]:
    _, ports = await make_server()
    async with AgentContext(f"127.0.0.1:{ports[0]}") as client:
        yield client


# -- round trips ---------------------------------------------------------------------------


async def test_report_task_round_trip(ctx: AgentContext, backend: FakeBackend) -> None:
    task = await ctx.report_task("INC-1234", "refunds", ttl=90)
    assert (task.task_id, task.purpose, task.reported_at, task.expires_at) == (
        "INC-1234", "refunds", T0, T0 + 90,
    )  # fmt: skip
    no_ttl = await ctx.report_task("INC-1235", "refunds")
    assert no_ttl.expires_at is None
    assert backend.calls == [
        ("report_task", (AGENT, "INC-1234", "refunds", 90.0)),
        ("report_task", (AGENT, "INC-1235", "refunds", None)),  # ttl 0 on the wire: none
    ]


async def test_report_task_with_a_declaration_round_trip(
    ctx: AgentContext, backend: FakeBackend
) -> None:
    """The declaration reaches the backend in the profile's rule syntax, as the agent wrote
    it (issue 18), and comes back with the task."""
    allow = [
        {
            "hosts": ["mcp.bank.example"],
            "methods": ["POST"],
            "paths": ["/mcp"],
            "mcpTools": ["send_money"],
            "mcpArguments": {"send_money": {"properties": {"to": {"enum": ["DE01", "DE02"]}}}},
        },
        {"hosts": ["api.example"], "query": {"properties": {"q": {"maxLength": 8}}}},
        {"jsonBody": {"required": ["to"]}, "mcpMethods": ["resources/read"]},
    ]
    task = await ctx.report_task("PAY-1", "refunds", ttl=60, allow=allow)
    assert backend.calls == [("report_task", (AGENT, "PAY-1", "refunds", 60.0, allow))]
    assert list(task.allow) == allow


async def test_a_declared_schema_that_is_not_json_is_refused_naming_it(
    make_server: MakeServer, backend: FakeBackend
) -> None:
    _, ports = await make_server()
    rule = pb.TaskRule(mcp_tools=["send_money"], mcp_arguments={"send_money": "{not json"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
        call = channel.unary_unary(
            "/mandate.agent.v1.AgentContext/ReportTask",
            request_serializer=pb.ReportTaskRequest.SerializeToString,
            response_deserializer=pb.Task.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(pb.ReportTaskRequest(task_id="T", purpose="refunds", allow=[rule]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "allow[0].mcpArguments.send_money: not JSON" in (err.value.details() or "")
    assert backend.calls == []


def test_the_client_refuses_a_rule_it_cannot_send() -> None:
    with pytest.raises(ValueError, match=r"allow\[1\]\.mcpTool: unknown field"):
        rules_to_pb([{"mcpTools": ["a"]}, {"mcpTool": ["a"]}])
    with pytest.raises(ValueError, match=r"allow\[0\]\.hosts: expected a list"):
        rules_to_pb([{"hosts": "a.example"}])


async def test_explain_an_mcp_tool_call(ctx: AgentContext, backend: FakeBackend) -> None:
    """Explain takes a tool and its arguments (issue 18): the backend decides the JSON-RPC
    tools/call mandate builds from them, and the constraint that decided comes back."""
    why = await ctx.explain(
        "POST", "http://mcp.example/mcp", tool="send_money", arguments={"to": "DE01"}
    )
    ((_, args),) = backend.calls
    assert args[1:3] == ("POST", "http://mcp.example/mcp")
    assert args[3]["content-type"] == "application/json"
    body = json.loads(args[4])
    assert body["method"] == "tools/call"
    assert body["params"] == {"name": "send_money", "arguments": {"to": "DE01"}}
    assert why.constraint == "reconcile.allow[0] mcpArguments.send_money"


async def test_request_elevation_auto_and_operator(ctx: AgentContext, backend: FakeBackend) -> None:
    auto = await ctx.request_elevation("auto-read", "read the audit log", 120)
    assert auto.granted and auto.approval == "auto" and auto.grant_id == "grant-elev-1"
    assert (auto.duration, auto.expires_at, auto.requested_at) == (120.0, T0 + 3600, T0)
    pending = await ctx.request_elevation("refund", "customer 42 double-charged")
    assert (pending.state, pending.approval, pending.grant_id) == ("pending", "operator", "")
    assert backend.calls[1] == (
        "request_elevation", (AGENT, "refund", "customer 42 double-charged", None),
    )  # fmt: skip


async def test_get_status_round_trip(ctx: AgentContext, backend: FakeBackend) -> None:
    await ctx.request_elevation("auto-read", "why not")
    status = await ctx.status()
    assert (status.agent, status.owner, status.namespace) == (AGENT, "team-billing", NS)
    assert status.purposes == ("reconcile", "refunds")
    assert status.default_purpose == "reconcile"
    assert [(t.task_id, t.purpose, t.expires_at) for t in status.tasks] == [
        ("INC-1", "refunds", T0 + 60)
    ]
    assert [(r.id, r.state) for r in status.requests] == [("elev-1", "granted")]
    assert [(g.id, g.elevation, g.approver) for g in status.grants] == [
        ("grant-elev-1", "auto-read", "auto")
    ]
    assert status.grants[0].justification == "why not"
    assert (status.revoked, status.revocation_reason) == (False, "")
    assert (status.risk, status.risk_explanation, status.risk_learning) == (
        0.25,
        "new hosts: 0.25",
        True,
    )
    assert status.request("elev-1") is status.requests[0]


async def test_status_revoked_and_unscored(ctx: AgentContext, backend: FakeBackend) -> None:
    backend.extra_status = {"revoked": True, "revocation_reason": "incident 7", "risk": None}
    status = await ctx.status()
    assert (status.revoked, status.revocation_reason, status.risk) == (True, "incident 7", None)


async def test_status_never_carries_another_agents_entries(
    ctx: AgentContext, backend: FakeBackend
) -> None:
    """Defence in depth: even a backend that mixes agents up leaks nothing of another."""
    theirs = TaskBinding(OTHER, NS, "THEIRS", "research", T0)
    backend.extra_status = {
        "tasks": (TaskBinding(AGENT, NS, "MINE", "refunds", T0), theirs),
        "grants": (Grant("g-other", OTHER, NS, "refund", T0, T0 + 60, "bob"),),
    }
    status = await ctx.status()
    assert [t.task_id for t in status.tasks] == ["MINE"]
    assert status.grants == ()


async def test_explain_round_trip(ctx: AgentContext, backend: FakeBackend) -> None:
    allow = await ctx.explain(
        "post", "https://payments.example.com/v1/refund/42",
        headers={"Content-Type": "application/json", "X-Mandate-Purpose": "ignored-by-fake"},
        body=b'{"amount": 5}', purpose="refunds", task="INC-1",
    )  # fmt: skip
    assert allow.allowed and allow.decision == "allow" and allow.code == "allowed"
    assert (allow.elevation, allow.grant_id, allow.rule) == (
        "refund",
        "grant-9",
        "elevation refund allow[0]",
    )
    assert (allow.purpose, allow.task) == ("refunds", "INC-1")
    deny = await ctx.explain("GET", "http://ledger.finance.svc.cluster.local/v1/x")
    assert not deny.allowed and deny.decision == "deny" and deny.code == "outside_purpose"
    assert deny.reason == "outside purpose 'reconcile'" and deny.elevation == ""
    connect = await ctx.explain("CONNECT", "payments.example.com:443")
    assert connect.decision == "deny"
    assert backend.calls == [
        ("explain", (
            AGENT, "POST", "https://payments.example.com/v1/refund/42",
            {"content-type": "application/json", "x-mandate-purpose": "ignored-by-fake"},
            b'{"amount": 5}', "refunds", "INC-1",
        )),
        ("explain", (AGENT, "GET", "http://ledger.finance.svc.cluster.local/v1/x", {}, None, "", "")),
        ("explain", (AGENT, "CONNECT", "payments.example.com:443", {}, None, "", "")),
    ]  # fmt: skip


async def test_unix_socket_listener(
    tmp_path: Path,
    make_server: MakeServer,
    backend: FakeBackend,
) -> None:
    sock = tmp_path / "context.sock"
    _, ports = await make_server([(AGENT, f"unix:{sock}")])
    assert ports == [0]
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666  # the agent runs as another user
    async with AgentContext(f"unix:{sock}") as client:
        assert (await client.status()).agent == AGENT
        assert (await client.report_task("T-1", "refunds")).task_id == "T-1"
    assert backend.agents_seen() == {AGENT}


# -- identity: the listener's, never the caller's ------------------------------------------


async def test_each_listener_serves_its_own_agent(
    tmp_path: Path,
    make_server: MakeServer,
    backend: FakeBackend,
) -> None:
    sock = tmp_path / "research.sock"
    _, ports = await make_server([(AGENT, "127.0.0.1:0"), (OTHER, f"unix:{sock}")])
    assert ports[0] > 0 and ports[1] == 0
    async with AgentContext(f"127.0.0.1:{ports[0]}") as a, AgentContext(f"unix:{sock}") as b:
        assert (await a.status()).agent == AGENT
        assert (await b.status()).agent == OTHER
        await b.report_task("R-1", "research")
    assert [args[0] for _, args in backend.calls] == [AGENT, OTHER, OTHER]


async def test_caller_metadata_cannot_name_another_agent(
    make_server: MakeServer, backend: FakeBackend
) -> None:
    _, ports = await make_server()
    forged = (("x-mandate-agent", OTHER), ("x-agent", OTHER), ("agent", OTHER))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
        status = channel.unary_unary(
            f"/{SERVICE_NAME}/GetStatus",
            request_serializer=pb.GetStatusRequest.SerializeToString,
            response_deserializer=pb.Status.FromString,
        )
        reply = await status(pb.GetStatusRequest(), metadata=forged, timeout=5)
        assert reply.agent == AGENT
        report = channel.unary_unary(
            f"/{SERVICE_NAME}/ReportTask",
            request_serializer=pb.ReportTaskRequest.SerializeToString,
            response_deserializer=pb.Task.FromString,
        )
        await report(
            pb.ReportTaskRequest(task_id="T", purpose="refunds"), metadata=forged, timeout=5
        )
    assert backend.agents_seen() == {AGENT}


def test_no_request_message_has_a_field_naming_an_agent() -> None:
    for method in pb.DESCRIPTOR.services_by_name["AgentContext"].methods:
        names = {f.name for f in method.input_type.fields}
        assert not {n for n in names if "agent" in n or "namespace" in n}, method.name


def test_the_service_has_no_approve_method() -> None:
    service = pb.DESCRIPTOR.services_by_name["AgentContext"]
    assert service.full_name == SERVICE_NAME
    assert {m.name for m in service.methods} == {
        "ReportTask",
        "EndTask",
        "RequestElevation",
        "GetStatus",
        "Explain",
    }
    assert not [
        m for m in service.methods if "approv" in m.name.lower() or "grant" in m.name.lower()
    ]


async def test_an_approve_call_is_unimplemented(ctx: AgentContext, backend: FakeBackend) -> None:
    await ctx.status()  # opens the channel
    assert ctx._channel is not None
    approve = ctx._channel.unary_unary(
        f"/{SERVICE_NAME}/ApproveElevation",
        request_serializer=pb.RequestElevationRequest.SerializeToString,
        response_deserializer=pb.ElevationRequest.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await approve(pb.RequestElevationRequest(elevation="refund"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert [m for m, _ in backend.calls] == ["agent_status"]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "PERMISSION_DENIED",
    ],
)
async def test_context_error_status_becomes_the_grpc_code(
    ctx: AgentContext, backend: FakeBackend, status: str
) -> None:
    backend.fail["request_elevation"] = AgentStateError(f"refused because {status.lower()}", status)
    with pytest.raises(AgentStateError) as err:
        await ctx.request_elevation("refund", "please")
    assert err.value.status == status
    assert f"refused because {status.lower()}" in str(err.value)


async def test_context_error_with_an_unknown_status_is_unknown(
    ctx: AgentContext, backend: FakeBackend
) -> None:
    backend.fail["report_task"] = AgentStateError("odd", "NOT_A_STATUS")
    with pytest.raises(AgentStateError) as err:
        await ctx.report_task("T", "refunds")
    assert err.value.status == "UNKNOWN" and "odd" in str(err.value)


@pytest.mark.parametrize("method", ["report_task", "request_elevation", "agent_status", "explain"])
async def test_backend_exception_is_internal_and_the_server_keeps_serving(
    ctx: AgentContext, backend: FakeBackend, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend.fail[method] = RuntimeError("secret detail: /var/lib/mandate/state.json")
    calls = {
        "report_task": lambda: ctx.report_task("T", "refunds"),
        "request_elevation": lambda: ctx.request_elevation("refund", "x"),
        "agent_status": ctx.status,
        "explain": lambda: ctx.explain("GET", "http://a.example/"),
    }
    with pytest.raises(AgentStateError) as err:
        await calls[method]()
    assert err.value.status == "INTERNAL"
    assert "secret" not in str(err.value) and "mandate's log" in str(err.value)
    assert "secret detail" in caplog.text  # logged, with the traceback
    del backend.fail[method]
    await calls[method]()  # the same server answers the next call
    assert (await ctx.status()).agent == AGENT


INVALID = [
    ("report_task", ("", "refunds"), "task_id"),
    ("report_task", ("has space", "refunds"), "task_id"),
    ("report_task", ("t" * 129, "refunds"), "task_id"),
    ("report_task", ("T", ""), "purpose"),
    ("report_task", ("T", "refunds", -1.0), "ttl_seconds"),
    ("report_task", ("T", "refunds", float("inf")), "ttl_seconds"),
    ("report_task", ("T", "refunds", float("nan")), "ttl_seconds"),
    # Issue 15, finding 3: a TTL that cannot become a time was stored, then failed in audit.
    ("report_task", ("T", "refunds", 1e300), "ttl_seconds"),
    ("report_task", ("T", "refunds", 30 * 86400 + 1.0), "ttl_seconds"),
    ("request_elevation", ("refund", "why", 1e300), "duration_seconds"),
    ("request_elevation", ("refund", "why", 30 * 86400 + 1.0), "duration_seconds"),
    ("request_elevation", ("", "why"), "elevation"),
    ("request_elevation", ("refund", "x" * 1025), "justification"),
    ("request_elevation", ("refund", "bad\x00byte"), "justification"),
    ("request_elevation", ("refund", "why", -5.0), "duration_seconds"),
    ("request_elevation", ("refund", "why", float("inf")), "duration_seconds"),
    ("explain", ("", "http://a.example/"), "method"),
    ("explain", ("GE T", "http://a.example/"), "method"),
    ("explain", ("GET", ""), "url"),
    ("explain", ("GET", "/relative/path"), "url"),
    ("explain", ("GET", "ftp://a.example/"), "url"),
    ("explain", ("GET", "http:///no-host"), "url"),
    ("explain", ("GET", "http://a.example:99999/"), "url"),
    ("explain", ("GET", "http://a.example/a b"), "url"),
    ("explain", ("CONNECT", "a.example"), "url"),
    ("explain", ("GET", "http://a.example/", {f"h{i}": "v" for i in range(101)}), "headers"),
    ("explain", ("GET", "http://a.example/", {":authority": "b.example"}), "headers"),
    ("explain", ("GET", "http://a.example/", {"bad name": "v"}), "headers"),
    ("explain", ("GET", "http://a.example/", {"x": "v\r\nx-mandate-agent: other"}), "headers"),
    ("explain", ("GET", "http://a.example/", {"x": "v" * 8193}), "headers"),
    ("explain", ("GET", "http://a.example/", {"X-A": "1", "x-a": "2"}), "headers"),
    ("explain", ("POST", "http://a.example/", None, b"x" * (64 * 1024 + 1)), "body"),
    ("explain", ("GET", "http://a.example/", None, None, "has space"), "purpose"),
    ("explain", ("GET", "http://a.example/", None, None, "", "t" * 129), "task"),
    # an MCP tool call to explain (issue 18): POST only, not with a body, arguments an object
    ("explain", ("GET", "http://a.example/mcp", None, None, "", "", "send_money"), "method"),
    ("explain", ("POST", "http://a.example/mcp", None, b"{}", "", "", "send_money"), "body"),
    ("explain", ("POST", "http://a.example/mcp", None, None, "", "", "t", [1]), "arguments"),
    ("explain", ("POST", "http://a.example/mcp", None, None, "", "", "", {"a": 1}), "arguments"),
    ("explain", ("POST", "http://a.example/mcp", None, None, "", "", "t" * 257), "tool"),
    # a declaration of more rules than a task may declare (the store validates the rest)
    ("report_task", ("T", "refunds", None, [{"mcpTools": ["a"]}] * 33), "allow"),
]


@pytest.mark.parametrize(("method", "args", "field"), INVALID)
async def test_invalid_input_is_refused_before_the_backend(
    ctx: AgentContext, backend: FakeBackend, method: str, args: tuple[Any, ...], field: str
) -> None:
    with pytest.raises(AgentStateError) as err:
        await getattr(ctx, method)(*args)
    assert err.value.status == "INVALID_ARGUMENT"
    assert field in str(err.value)
    assert backend.calls == []


async def test_limits_are_inclusive(ctx: AgentContext, backend: FakeBackend) -> None:
    await ctx.report_task("t" * 128, "refunds")
    await ctx.request_elevation("refund", "x" * 1024)
    await ctx.report_task("T", "refunds", 30 * 86400.0)
    await ctx.request_elevation("refund", "line one\n\tline two")
    headers = {f"h{i}": "v" for i in range(100)}
    await ctx.explain("POST", "http://a.example/", headers, b"x" * (64 * 1024))
    assert len(backend.calls) == 5


async def test_a_message_too_large_for_the_listener_is_refused(
    ctx: AgentContext, backend: FakeBackend
) -> None:
    with pytest.raises(AgentStateError) as err:
        await ctx.explain("POST", "http://a.example/", None, b"x" * (1024 * 1024))
    assert err.value.status == "RESOURCE_EXHAUSTED"
    assert backend.calls == []


# -- Explain's rate limit ------------------------------------------------------------------


async def test_explain_is_rate_limited_per_agent(
    tmp_path: Path,
    make_server: MakeServer,
    backend: FakeBackend,
) -> None:
    sock = tmp_path / "other.sock"
    _, ports = await make_server(
        [(AGENT, "127.0.0.1:0"), (OTHER, f"unix:{sock}")], explain_rate=0.001, explain_burst=3
    )
    async with AgentContext(f"127.0.0.1:{ports[0]}") as a, AgentContext(f"unix:{sock}") as b:
        for _ in range(3):
            await a.explain("GET", "http://a.example/")
        with pytest.raises(AgentStateError) as err:
            await a.explain("GET", "http://a.example/")
        assert err.value.status == "RESOURCE_EXHAUSTED" and "Explain" in str(err.value)
        # Invalid requests spend the budget too (a flood is a flood).
        with pytest.raises(AgentStateError) as err:
            await a.explain("GET", "not a url")
        assert err.value.status == "RESOURCE_EXHAUSTED"
        # Another agent has its own bucket; the limited agent's other methods still work.
        assert (await b.explain("GET", "http://a.example/")).decision == "deny"
        assert (await a.status()).agent == AGENT
    explained = [args[0] for m, args in backend.calls if m == "explain"]
    assert explained == [AGENT] * 3 + [OTHER]


async def test_explain_bucket_refills(
    make_server: MakeServer,
) -> None:
    now = [100.0]
    _, ports = await make_server(explain_rate=2.0, explain_burst=2, clock=lambda: now[0])
    async with AgentContext(f"127.0.0.1:{ports[0]}") as a:
        await a.explain("GET", "http://a.example/")
        await a.explain("GET", "http://a.example/")
        with pytest.raises(AgentStateError):
            await a.explain("GET", "http://a.example/")
        now[0] += 0.5  # one token at 2/s
        await a.explain("GET", "http://a.example/")
        with pytest.raises(AgentStateError):
            await a.explain("GET", "http://a.example/")


# -- wait_for_grant ------------------------------------------------------------------------


async def test_wait_for_grant_returns_when_an_operator_approves(
    ctx: AgentContext, backend: FakeBackend
) -> None:
    req = await ctx.request_elevation("refund", "customer 42")

    def approve_on_third_poll(b: FakeBackend) -> None:
        if b.status_calls == 3:
            r = b.requests[req.id]
            b.requests[req.id] = replace(
                r, state="granted", grant_id="g-1", approver="alice@example.com"
            )

    backend.after_status = approve_on_third_poll
    granted = await ctx.wait_for_grant(req, timeout=10, poll=0.01)
    assert (granted.id, granted.state, granted.grant_id, granted.approver) == (
        req.id,
        "granted",
        "g-1",
        "alice@example.com",
    )
    assert backend.status_calls == 3


@pytest.mark.parametrize("state", ["refused", "expired"])
async def test_wait_for_grant_raises_when_refused_or_expired(
    ctx: AgentContext, backend: FakeBackend, state: str
) -> None:
    req = await ctx.request_elevation("refund", "customer 42")
    backend.requests[req.id] = replace(backend.requests[req.id], state=state, message="not today")
    with pytest.raises(ElevationRefused) as err:
        await ctx.wait_for_grant(req.id, timeout=10, poll=0.01)
    assert err.value.request.state == state
    assert state in str(err.value) and "not today" in str(err.value)
    assert isinstance(err.value, AgentStateError)


async def test_wait_for_grant_times_out_while_pending(ctx: AgentContext) -> None:
    req = await ctx.request_elevation("refund", "customer 42")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError, match="still pending"):
        await ctx.wait_for_grant(req.id, timeout=0.3, poll=0.05)
    assert 0.25 < loop.time() - start < 3


async def test_wait_for_an_unknown_request(ctx: AgentContext) -> None:
    with pytest.raises(AgentStateError) as err:
        await ctx.wait_for_grant("elev-nope", timeout=1)
    assert err.value.status == "NOT_FOUND"


# -- the server's life cycle ---------------------------------------------------------------


async def test_client_reports_an_unreachable_api_as_unavailable(tmp_path: Path) -> None:
    async with AgentContext(f"unix:{tmp_path / 'nobody.sock'}", timeout=2) as client:
        with pytest.raises(AgentStateError) as err:
            await client.status()
    assert err.value.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def test_an_address_in_use_is_a_config_error(
    make_server: MakeServer, backend: FakeBackend
) -> None:
    _, ports = await make_server()
    with pytest.raises(ConfigError, match="cannot bind"):
        await make_server([(AGENT, f"127.0.0.1:{ports[0]}")])


async def test_a_listener_that_cannot_bind_leaves_nothing_running(
    tmp_path: Path, make_server: MakeServer, backend: FakeBackend
) -> None:
    _, ports = await make_server()
    sock = tmp_path / "first.sock"
    server = AgentAPIServer(backend, [(OTHER, f"unix:{sock}"), (AGENT, f"127.0.0.1:{ports[0]}")])
    with pytest.raises(ConfigError, match="cannot bind"):
        await server.start()
    async with AgentContext(f"unix:{sock}", timeout=2) as client:
        with pytest.raises(AgentStateError) as err:
            await client.status()  # the first listener, started, was stopped again
    assert err.value.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert backend.agents_seen() == set()


@pytest.mark.parametrize(
    "listeners",
    [
        [],
        [("", "127.0.0.1:0")],
        [(AGENT, "")],
        [(AGENT, "127.0.0.1:7000"), (OTHER, "127.0.0.1:7000")],
    ],
)
def test_bad_listener_configuration(backend: FakeBackend, listeners: list[tuple[str, str]]) -> None:
    with pytest.raises(ConfigError):
        AgentAPIServer(backend, listeners)


async def test_stop_then_restart_on_the_same_unix_socket(
    tmp_path: Path, backend: FakeBackend
) -> None:
    sock = tmp_path / "context.sock"
    first = AgentAPIServer(backend, [(AGENT, f"unix:{sock}")])
    await first.start()
    await first.stop(0)
    second = AgentAPIServer(backend, [(AGENT, f"unix:{sock}")])
    await second.start()  # a stale socket file does not block the next start
    try:
        async with AgentContext(f"unix:{sock}") as client:
            assert (await client.status()).agent == AGENT
    finally:
        await second.stop(0)


async def test_state_changing_calls_are_rate_limited_per_agent_after_validation(
    tmp_path: Path,
    make_server: MakeServer,
    backend: FakeBackend,
) -> None:
    sock = tmp_path / "other.sock"
    now = [100.0]
    _, ports = await make_server(
        [(AGENT, "127.0.0.1:0"), (OTHER, f"unix:{sock}")],
        write_rate=1.0,
        write_burst=2,
        clock=lambda: now[0],
    )
    async with AgentContext(f"127.0.0.1:{ports[0]}") as a, AgentContext(f"unix:{sock}") as b:
        # Refused at the boundary: no token spent.
        with pytest.raises(AgentStateError) as err:
            await a.report_task("T-1", "report", ttl=1e300)
        assert err.value.status == "INVALID_ARGUMENT"
        await a.report_task("T-1", "report")
        await a.request_elevation("refund", "INV-7")
        with pytest.raises(AgentStateError) as err:
            await a.report_task("T-2", "report")
        assert err.value.status == "RESOURCE_EXHAUSTED" and "ReportTask" in str(err.value)
        with pytest.raises(AgentStateError) as err:
            await a.request_elevation("refund", "INV-8")
        assert err.value.status == "RESOURCE_EXHAUSTED"
        # The other agent has its own bucket; reading never spends one.
        await b.report_task("T-9", "report")
        assert (await a.status()).agent == AGENT
        now[0] += 1.0  # one token at 1/s
        await a.report_task("T-2", "report")
    writes = [
        (m, args[0]) for m, args in backend.calls if m in ("report_task", "request_elevation")
    ]
    assert writes == [
        ("report_task", AGENT),
        ("request_elevation", AGENT),
        ("report_task", OTHER),
        ("report_task", AGENT),
    ]
