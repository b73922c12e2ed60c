"""The supervisor's admin HTTP API: open probes that say only ready or not, and `/v1/*` and
readiness details behind a bearer token (revoke, list, restore, status), driven through
aiohttp's test server and client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.core.revocation import Revocation, make_key
from sidecar.run.admin import AdminServer, RevocationAPI, add_probe_routes, read_token
from sidecar.state.revocations import RevocationStore
from sidecar.state.shm import SharedTable

TOKEN = "s3cr3t-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NS = "agents"
NOW = 1_700_000_000.0
STATUS = {"revocations": {"complete": True}, "workers": []}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedTable]:
    table = SharedTable.create(tmp_path / "table", size=256 * 1024)
    yield table
    table.close()


@pytest.fixture
def store(shared: SharedTable, tmp_path: Path, clock: Clock) -> RevocationStore:
    s = RevocationStore(shared, tmp_path / "revocations.json", clock=clock)
    s.load_persisted()
    s.mark_complete()
    return s


def make_app(store: RevocationStore, token: str | None, clock: Clock) -> web.Application:
    app = web.Application()
    # Readiness details as the supervisor's hold them: every revocation, with its reason.
    add_probe_routes(
        app, lambda: (True, {"revocations": [r.as_dict() for r in store.entries()]}), token
    )
    RevocationAPI(store, NS, token, lambda: STATUS, clock=clock).add_routes(app)
    return app


@pytest.fixture
async def client(store: RevocationStore, clock: Clock) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(make_app(store, TOKEN, clock))) as c:
        yield c


@pytest.fixture
async def tokenless(store: RevocationStore, clock: Clock) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(make_app(store, None, clock))) as c:
        yield c


def k8s(agent: str, name: str = "", expires_at: float | None = None) -> Revocation:
    name = name or f"stop-{agent}".replace("*", "all")
    return Revocation(
        key=make_key("kubernetes", NS, name),
        agent=agent,
        namespace=NS,
        reason="by the cluster",
        source="kubernetes",
        name=name,
        expires_at=expires_at,
        created_at=NOW - 60,
        uid="uid-1",
    )


async def revoke(client: TestClient[Any, Any], body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    resp = await client.post("/v1/revocations", data=data, headers=AUTH)
    return resp.status, await resp.json()


async def restore(client: TestClient[Any, Any], agent: str) -> tuple[int, Any]:
    resp = await client.delete(f"/v1/revocations/{agent}", headers=AUTH)
    return resp.status, await resp.json()


# -- probes and authentication -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_need_no_token(client: TestClient[Any, Any], path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200


CANARY = "canary-7f3a9c-justification-and-reason"
DETAILS = {
    "revocations": {"entries": 1, "reasons": [f"revoked: {CANARY}"]},
    "elevations": {"requests": [{"justification": CANARY}]},
}


@pytest.mark.parametrize("ok", [True, False], ids=["ready", "not-ready"])
async def test_readyz_says_only_ready_and_details_need_the_token(ok: bool) -> None:
    """Issue 15, finding 7: the agent can reach this port; what it reads without the token
    is whether mandate is ready, nothing of anyone's reasons, justifications or grants."""
    app = web.Application()
    add_probe_routes(app, lambda: (ok, DETAILS), TOKEN)
    code = 200 if ok else 503
    async with TestClient(TestServer(app)) as c:
        resp = await c.get("/readyz")
        assert (resp.status, await resp.json()) == (code, {"ready": ok})
        for query in ("?verbose=1", "?verbose=true", "?verbose"):
            for auth in ({}, {"Authorization": "Bearer guess-guess-guess-guess"}):
                resp = await c.get("/readyz" + query, headers=auth)
                assert resp.status == 401, query
                assert CANARY not in await resp.text()
            resp = await c.get("/readyz" + query, headers=AUTH)
            assert (resp.status, await resp.json()) == (code, {"ready": ok, **DETAILS})
        resp = await c.get("/readyz?verbose=0", headers=AUTH)
        assert (resp.status, await resp.json()) == (code, {"ready": ok})
        for path in ("/healthz", "/metrics"):
            assert CANARY not in await (await c.get(path)).text()


async def test_readyz_details_without_a_configured_token_are_never_shown() -> None:
    app = web.Application()
    add_probe_routes(app, lambda: (True, DETAILS))
    async with TestClient(TestServer(app)) as c:
        assert await (await c.get("/readyz")).json() == {"ready": True}
        resp = await c.get("/readyz?verbose=1", headers=AUTH)
        assert resp.status == 503 and CANARY not in await resp.text()


def test_single_process_admin_server_keeps_details_behind_its_token() -> None:
    import urllib.error
    import urllib.request

    server = AdminServer("127.0.0.1", 0, lambda: (True, DETAILS), TOKEN)
    port = server.start()
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert json.loads(resp.read()) == {"ready": True}
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "?verbose=1", timeout=5)
        assert err.value.code == 401
        req = urllib.request.Request(url + "?verbose=1", headers=AUTH)
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert json.loads(resp.read()) == {"ready": True, **DETAILS}
    finally:
        server.stop()


async def test_revocation_reason_never_reaches_the_open_pages(
    client: TestClient[Any, Any],
) -> None:
    status, _ = await revoke(client, {"agent": "billing-agent", "reason": CANARY})
    assert status == 201
    for path in ("/readyz", "/healthz", "/metrics", "/readyz?verbose=1"):
        assert CANARY not in await (await client.get(path)).text(), path


V1 = [
    ("GET", "/v1/status"),
    ("GET", "/v1/revocations"),
    ("POST", "/v1/revocations"),
    ("DELETE", "/v1/revocations/billing-agent"),
]


@pytest.mark.parametrize(("method", "path"), V1, ids=[f"{m}-{p}" for m, p in V1])
async def test_no_token_configured_is_503(
    tokenless: TestClient[Any, Any], store: RevocationStore, method: str, path: str
) -> None:
    body = json.dumps({"agent": "billing-agent", "reason": "x"})
    for headers in ({}, AUTH, {"Authorization": "Bearer "}):
        resp = await tokenless.request(method, path, data=body, headers=headers)
        assert resp.status == 503
        assert (await resp.json())["error"] == "no_token"
    assert store.entries() == []
    assert (await tokenless.get("/healthz")).status == 200


BAD_AUTH = {
    "missing": None,
    "empty": "",
    "no-scheme": TOKEN,
    "basic": f"Basic {TOKEN}",
    "wrong": "Bearer not-the-token-at-all-000000000",
    "prefix": f"Bearer {TOKEN[:-1]}",
    "short-prefix": f"Bearer {TOKEN[:4]}",
    "extended": f"Bearer {TOKEN}x",
    "double-space": f"Bearer  {TOKEN}",
    "scheme-only": "Bearer",
    "non-ascii": f"Bearer {TOKEN[:-1]}\u00e9",
    "very-long": f"Bearer {TOKEN * 200}",
}


@pytest.mark.parametrize("auth", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
async def test_bad_token_is_401_and_changes_nothing(
    client: TestClient[Any, Any], store: RevocationStore, auth: str | None
) -> None:
    store.upsert(
        Revocation(make_key("admin", NS, "research-agent"), "research-agent", NS, "r", "admin")
    )
    before, generation = store.entries(), store.generation
    headers = {} if auth is None else {"Authorization": auth}
    for method, path in V1:
        body = json.dumps({"agent": "billing-agent", "reason": "x"})
        resp = await client.request(method, path, data=body, headers=headers)
        assert resp.status == 401, (method, path)
        assert (await resp.json())["error"] == "unauthorized"
    resp = await client.delete("/v1/revocations/research-agent", headers=headers)
    assert resp.status == 401
    assert (store.entries(), store.generation) == (before, generation)


async def test_authorization_header_that_is_not_utf8_is_401(client: TestClient[Any, Any]) -> None:
    server = client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
            b"Connection: close\r\n\r\n"
        )
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    assert response.startswith(b"HTTP/1.1 401 "), response[:80]


async def test_status(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v1/status", headers=AUTH)
    assert (resp.status, await resp.json()) == (200, STATUS)


def test_read_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token(path) == TOKEN
    path.write_text("short\n")
    with pytest.raises(ValueError, match="shorter than 16"):
        read_token(path)


# -- revoke ------------------------------------------------------------------------------------


async def test_revoke(
    client: TestClient[Any, Any], store: RevocationStore, shared: SharedTable, clock: Clock
) -> None:
    status, body = await revoke(
        client,
        {"agent": "billing-agent", "reason": "  leaked key  ", "expiresAt": "2030-01-01T00:00:00Z"},
    )
    assert status == 201
    expected = Revocation(
        key="admin:agents/billing-agent",
        agent="billing-agent",
        namespace=NS,
        reason="leaked key",
        source="admin",
        name="billing-agent",
        expires_at=1893456000.0,
        created_at=NOW,
    )
    assert store.entries() == [expected]
    assert body["revoked"] == {**expected.as_dict(), "active": True}
    assert (body["generation"], body["visible_at"]) == (store.generation, NOW)
    assert shared.read().find(NS, "billing-agent", NOW) == expected


@pytest.mark.parametrize(
    ("body", "agent", "expires_at"),
    [
        ({"agent": "*", "reason": "everyone"}, "*", None),
        ({"agent": "a", "reason": "x"}, "a", None),
        ({"agent": "a" * 63, "reason": "x"}, "a" * 63, None),
        ({"agent": "my.agent_1-x", "reason": "x"}, "my.agent_1-x", None),
        ({"agent": "a", "reason": "x" * 1024}, "a", None),
        ({"agent": "a", "reason": "x", "expiresAt": None}, "a", None),
        (
            {"agent": "a", "reason": "x", "expiresAt": "2030-01-01T01:00:00+01:00"},
            "a",
            1893456000.0,
        ),
        ({"agent": "a", "reason": "x", "expiresAt": "2030-01-01T00:00:00.5Z"}, "a", 1893456000.5),
    ],
    ids=[
        "star",
        "one-char",
        "63-chars",
        "dots-underscores",
        "reason-1024",
        "expires-null",
        "offset",
        "fraction",
    ],
)
async def test_revoke_accepts(
    client: TestClient[Any, Any],
    store: RevocationStore,
    body: dict[str, Any],
    agent: str,
    expires_at: float | None,
) -> None:
    status, _ = await revoke(client, body)
    assert status == 201
    (entry,) = store.entries()
    assert (entry.agent, entry.expires_at, entry.key) == (agent, expires_at, f"admin:{NS}/{agent}")


BAD_BODIES = [
    pytest.param(b"not json", "the body must be JSON", id="not-json"),
    pytest.param(b"", "the body must be JSON", id="empty-body"),
    pytest.param(b"\xff\xfe", "the body must be JSON", id="not-utf8"),
    pytest.param([{"agent": "a", "reason": "x"}], "the body must be a JSON object", id="a-list"),
    pytest.param("billing-agent", "the body must be a JSON object", id="a-string"),
    pytest.param(None, "the body must be a JSON object", id="null"),
    pytest.param(
        {"agent": "a", "reason": "x", "namespace": "ops"},
        "unknown field(s): namespace",
        id="unknown-field",
    ),
    pytest.param(
        {"agent": "a", "reason": "x", "expires_at": 1},
        "unknown field(s): expires_at",
        id="snake-case-field",
    ),
    pytest.param({"reason": "x"}, "agent:", id="no-agent"),
    pytest.param({"agent": "", "reason": "x"}, "agent:", id="empty-agent"),
    pytest.param({"agent": "Bad!", "reason": "x"}, "agent:", id="bad-agent"),
    pytest.param({"agent": "Billing-agent", "reason": "x"}, "agent:", id="upper-case-agent"),
    pytest.param({"agent": "billing-agent\n", "reason": "x"}, "agent:", id="trailing-newline"),
    pytest.param({"agent": "-agent", "reason": "x"}, "agent:", id="leading-dash"),
    pytest.param({"agent": "agent-", "reason": "x"}, "agent:", id="trailing-dash"),
    pytest.param({"agent": "a" * 64, "reason": "x"}, "agent:", id="64-chars"),
    pytest.param({"agent": "**", "reason": "x"}, "agent:", id="double-star"),
    pytest.param({"agent": ["a"], "reason": "x"}, "agent:", id="agent-a-list"),
    pytest.param({"agent": 7, "reason": "x"}, "agent:", id="agent-a-number"),
    pytest.param({"agent": "a"}, "reason:", id="no-reason"),
    pytest.param({"agent": "a", "reason": ""}, "reason:", id="empty-reason"),
    pytest.param({"agent": "a", "reason": " \n\t "}, "reason:", id="blank-reason"),
    pytest.param({"agent": "a", "reason": "x" * 1025}, "reason:", id="reason-1025"),
    pytest.param({"agent": "a", "reason": 5}, "reason:", id="reason-a-number"),
    pytest.param(
        {"agent": "a", "reason": "x", "expiresAt": "2030-01-01T00:00:00"},
        "expiresAt: a time zone is required",
        id="no-timezone",
    ),
    pytest.param(
        {"agent": "a", "reason": "x", "expiresAt": 1893456000},
        "expiresAt: expected an RFC 3339 string",
        id="expires-a-number",
    ),
    pytest.param(
        {"agent": "a", "reason": "x", "expiresAt": "tomorrow"}, "expiresAt:", id="expires-garbage"
    ),
    pytest.param(
        {"agent": "a", "reason": "x", "expiresAt": "2030-13-01T00:00:00Z"},
        "expiresAt:",
        id="expires-bad-month",
    ),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
async def test_revoke_rejects_bad_bodies(
    client: TestClient[Any, Any], store: RevocationStore, body: Any, message: str
) -> None:
    generation = store.generation
    status, reply = await revoke(client, body if isinstance(body, bytes) else json.dumps(body))
    assert status == 400
    assert reply["error"] == "bad_request"
    assert message in reply["message"]
    assert (store.entries(), store.generation) == ([], generation)


async def test_revoke_again_replaces_the_admin_entry(
    client: TestClient[Any, Any], store: RevocationStore
) -> None:
    await revoke(client, {"agent": "a", "reason": "first"})
    await revoke(client, {"agent": "a", "reason": "second"})
    assert [r.reason for r in store.entries()] == ["second"]


# -- list --------------------------------------------------------------------------------------


async def test_list_shows_active(
    client: TestClient[Any, Any], store: RevocationStore, clock: Clock
) -> None:
    await revoke(client, {"agent": "a", "reason": "x", "expiresAt": "2023-11-14T22:13:30Z"})
    store.upsert(k8s("b"))
    resp = await client.get("/v1/revocations", headers=AUTH)
    assert resp.status == 200
    shown = {r["agent"]: r for r in (await resp.json())["revocations"]}
    assert (shown["a"]["active"], shown["b"]["active"]) == (True, True)
    assert shown["b"]["source"] == "kubernetes"
    clock.now = NOW + 10  # past a's expiry (NOW + 10 exactly): no longer in force
    resp = await client.get("/v1/revocations", headers=AUTH)
    shown = {r["agent"]: r for r in (await resp.json())["revocations"]}
    assert (shown["a"]["active"], shown["b"]["active"]) == (False, True)


async def test_list_empty(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/v1/revocations", headers=AUTH)
    assert (resp.status, await resp.json()) == (200, {"revocations": []})


# -- restore -----------------------------------------------------------------------------------


async def test_restore_removes_admin_entries(
    client: TestClient[Any, Any], store: RevocationStore, shared: SharedTable
) -> None:
    await revoke(client, {"agent": "billing-agent", "reason": "x"})
    await revoke(client, {"agent": "research-agent", "reason": "y"})
    assert shared.read().find(NS, "billing-agent", NOW) is not None
    status, body = await restore(client, "billing-agent")
    assert status == 200
    assert [r["key"] for r in body["restored"]] == ["admin:agents/billing-agent"]
    assert body["still_revoked_by"] == []
    assert body["generation"] == store.generation
    assert [r.agent for r in store.entries()] == ["research-agent"]
    assert shared.read().find(NS, "billing-agent", NOW) is None


async def test_restore_nothing_is_200(client: TestClient[Any, Any], store: RevocationStore) -> None:
    generation = store.generation
    status, body = await restore(client, "billing-agent")
    assert (status, body["restored"], body["still_revoked_by"]) == (200, [], [])
    assert store.generation == generation


async def test_restore_leaves_other_namespaces(
    client: TestClient[Any, Any], store: RevocationStore
) -> None:
    other = Revocation(
        make_key("admin", "ops", "billing-agent"), "billing-agent", "ops", "r", "admin"
    )
    store.upsert(other)
    status, body = await restore(client, "billing-agent")
    assert (status, body["restored"]) == (200, [])
    assert store.entries() == [other]


@pytest.mark.parametrize(
    ("kube", "agent"),
    [
        pytest.param(k8s("billing-agent"), "billing-agent", id="own-kubernetes-entry"),
        pytest.param(k8s("*"), "billing-agent", id="kubernetes-star"),
        pytest.param(k8s("*"), "*", id="restore-star-kubernetes-star"),
    ],
)
async def test_restore_blocked_by_kubernetes_is_409(
    client: TestClient[Any, Any],
    store: RevocationStore,
    shared: SharedTable,
    kube: Revocation,
    agent: str,
) -> None:
    await revoke(client, {"agent": agent, "reason": "x"})
    store.upsert(kube)
    status, body = await restore(client, agent)
    assert status == 409
    assert [r["key"] for r in body["restored"]] == [f"admin:agents/{agent}"]
    assert [r["key"] for r in body["still_revoked_by"]] == [kube.key]
    assert body["still_revoked_by"][0]["active"] is True
    assert store.entries() == [kube]
    assert store.entries("admin") == []
    assert shared.read().find(NS, kube.agent, NOW) == kube


async def test_restore_not_blocked_by_an_expired_kubernetes_entry(
    client: TestClient[Any, Any], store: RevocationStore
) -> None:
    store.upsert(k8s("billing-agent", expires_at=NOW))
    await revoke(client, {"agent": "billing-agent", "reason": "x"})
    status, body = await restore(client, "billing-agent")
    assert (status, body["still_revoked_by"]) == (200, [])
    assert [r.source for r in store.entries()] == ["kubernetes"]


async def test_restore_not_blocked_by_another_agent(
    client: TestClient[Any, Any], store: RevocationStore
) -> None:
    store.upsert(k8s("research-agent"))
    await revoke(client, {"agent": "billing-agent", "reason": "x"})
    status, _ = await restore(client, "billing-agent")
    assert status == 200


@pytest.mark.parametrize(
    "agent",
    ["Bad!", "UPPER", "-x", "a%0A", "a" * 64],
    ids=["bang", "upper", "dash", "newline", "64"],
)
async def test_restore_rejects_bad_agent(
    client: TestClient[Any, Any], store: RevocationStore, agent: str
) -> None:
    await revoke(client, {"agent": "billing-agent", "reason": "x"})
    generation = store.generation
    status, body = await restore(client, agent)
    assert status == 400
    assert "agent:" in body["message"]
    assert store.generation == generation


async def test_auth_scheme_is_case_insensitive(client: TestClient[Any, Any]) -> None:
    """RFC 9110 11.1: the scheme name is case-insensitive; the token itself is not."""
    resp = await client.get("/v1/revocations", headers={"Authorization": f"bearer {TOKEN}"})
    assert resp.status == 200
    resp = await client.get("/v1/revocations", headers={"Authorization": f"Bearer {TOKEN.upper()}"})
    assert resp.status == 401


async def test_restoring_star_is_not_blocked_by_one_agents_kubernetes_revocation(
    client: TestClient[Any, Any], store: RevocationStore
) -> None:
    await revoke(client, {"agent": "*", "reason": "lockdown"})
    kube = k8s("research-agent")
    store.upsert(kube)
    status, body = await restore(client, "*")
    assert status == 200 and body["still_revoked_by"] == []
    assert kube in store.entries()  # the agent's own AgentRevocation still stands


async def test_expiry_in_the_past_is_refused(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/v1/revocations",
        json={"agent": "a", "reason": "r", "expiresAt": "2000-01-01T00:00:00Z"},
        headers=AUTH,
    )
    assert resp.status == 400
    assert "expiresAt" in (await resp.json())["message"]


# -- durability (issue 15, finding 6) ------------------------------------------------------------
# The state file's write is made to fail by a directory where the store puts its temporary
# file: open() fails with EISDIR even for root (who ignores read-only permissions).


def _block(store_file: Path) -> Path:
    blocker = store_file.with_name(f".{store_file.name}.tmp")
    blocker.mkdir()
    return blocker


async def test_revoke_that_cannot_be_persisted_is_500_and_still_enforced(
    client: TestClient[Any, Any], store: RevocationStore, shared: SharedTable, tmp_path: Path
) -> None:
    state = tmp_path / "revocations.json"
    blocker = _block(state)
    status, body = await revoke(client, {"agent": "billing-agent", "reason": "leaked key"})
    assert status == 500
    assert body["error"] == "state_not_durable"
    assert body["durable"] is False
    assert body["file"] == str(state) and "EISDIR" in body["os_error"]
    assert str(state) in body["message"] and "NOT durable" in body["message"]
    assert body["revoked"]["agent"] == "billing-agent"
    # Fail closed: the disk failed, enforcement did not.
    found = shared.read().find(NS, "billing-agent", NOW)
    assert found is not None and found.reason == "leaked key"
    assert json.loads(state.read_text())["revocations"] == []
    # Visible in readiness (`/v1/status` and `/readyz?verbose=1` take it from here).
    assert store.persistence()["durable"] is False
    # Fixed volume: the same revoke again is durable and says so.
    blocker.rmdir()
    status, body = await revoke(client, {"agent": "billing-agent", "reason": "leaked key"})
    assert (status, body["durable"]) == (201, True)
    assert [r["agent"] for r in json.loads(state.read_text())["revocations"]] == ["billing-agent"]
    assert store.persistence()["durable"] is True


async def test_restore_that_cannot_be_persisted_is_500_and_leaves_the_agent_revoked(
    client: TestClient[Any, Any], store: RevocationStore, shared: SharedTable, tmp_path: Path
) -> None:
    state = tmp_path / "revocations.json"
    assert (await revoke(client, {"agent": "billing-agent", "reason": "x"}))[0] == 201
    blocker = _block(state)
    status, body = await restore(client, "billing-agent")
    assert status == 500
    assert body["error"] == "state_not_durable" and body["file"] == str(state)
    assert "restore NOT done" in body["message"] and str(state) in body["message"]
    assert body["restored"] == []
    assert [r["key"] for r in body["still_revoked_by"]] == ["admin:agents/billing-agent"]
    # Revoked now, and the file (what a restart loads) says the same.
    assert shared.read().find(NS, "billing-agent", NOW) is not None
    assert [r["agent"] for r in json.loads(state.read_text())["revocations"]] == ["billing-agent"]
    blocker.rmdir()
    status, body = await restore(client, "billing-agent")
    assert status == 200 and [r["agent"] for r in body["restored"]] == ["billing-agent"]
    assert shared.read().find(NS, "billing-agent", NOW) is None
    assert json.loads(state.read_text())["revocations"] == []


async def test_a_revocation_without_a_state_file_is_not_called_durable(
    shared: SharedTable, clock: Clock
) -> None:
    memory_only = RevocationStore(shared, None, clock=clock)
    memory_only.mark_complete()
    async with TestClient(TestServer(make_app(memory_only, TOKEN, clock))) as c:
        status, body = await revoke(c, {"agent": "billing-agent", "reason": "x"})
    assert status == 201 and body["durable"] is False
    assert "ends at the next restart" in body["warning"]
    assert shared.read().find(NS, "billing-agent", NOW) is not None  # in force all the same
