"""Issue 15: an operator's approval through the admin API (`POST /v1/elevations/ID/approve`,
what `mandate approve` calls) is answered with success only when the grant is durable. With
a state file that cannot be written the answer is 500 `state_not_durable` (the CLI exits
non-zero on it), nothing is granted, and the store's health says so; once the volume is
fixed the same approval succeeds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.core import load_profiles
from sidecar.run.admin import ElevationAPI
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.shm import SharedAgentState

PROFILES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
NS = "agents"
TOKEN = "s3cret-token"
T0 = 1_700_000_000.0


@pytest.fixture
def blocked_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.write_text("a file where the state directory should be")  # ENOTDIR, even as root
    return path


@pytest.fixture
def store(tmp_path: Path, blocked_dir: Path) -> AgentStateStore:
    snapshot = load_profiles(PROFILES)
    table = SharedAgentState.create(tmp_path / "ctx")
    return AgentStateStore(table, blocked_dir / "context.json", lambda: snapshot, clock=lambda: T0)


@pytest.fixture
async def client(store: AgentStateStore) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    ElevationAPI(store, NS, TOKEN, clock=lambda: T0).add_routes(app)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_an_approval_that_cannot_be_persisted_is_an_error_and_grants_nothing(
    client: TestClient[Any, Any], store: AgentStateStore, blocked_dir: Path
) -> None:
    store._published.path = None  # the agent's request is made while the volume still works
    req = store.request_elevation("billing-agent", NS, "refund", "INV-7 owed", None)
    store._published.path = blocked_dir / "context.json"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = f"/v1/elevations/{req.id}/approve"
    resp = await client.post(url, json={"approver": "alice"}, headers=auth)
    body = await resp.json()
    assert resp.status == 500, body
    assert body["error"] == "state_not_durable" and "NOT done" in body["message"]
    assert body["file"].endswith("context.json")
    assert store.grants() == [] and store.request(req.id).state == "pending"  # type: ignore[union-attr]
    assert store.health()["persistence"]["durable"] is False
    blocked_dir.unlink()
    blocked_dir.mkdir()
    resp = await client.post(url, json={"approver": "alice"}, headers=auth)
    assert resp.status == 200, await resp.text()
    assert [g.request_id for g in store.grants()] == [req.id]
    assert store.health()["persistence"]["durable"] is True
