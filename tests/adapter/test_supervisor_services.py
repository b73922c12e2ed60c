"""The supervisor's services, with the real classes: `Supervisor.start` starts its list in
order (Kubernetes off: workers, admin API, profile reload, agent context API, behaviour
analysis, access log service, worker monitors, housekeeping), the context API and the access
log service answer on the supervisor's own event loop (grpc.aio), and `stop` stops them in
reverse, leaving neither socket served."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from sidecar.agentapi.client import AgentContext
from sidecar.errors import AgentStateError
from sidecar.run.supervisor import Supervisor
from sidecar.settings import (
    AdminSettings,
    BehaviourAnalysisSettings,
    CheckSettings,
    ContextListener,
    IdentitySettings,
    KubernetesSettings,
    ProfileSettings,
    Settings,
    StateSettings,
)

AGENT = "billing-agent"
NS = "agents"
# Kubernetes off: no watchers.
STARTED = [
    "workers",
    "admin API",
    "profile reload",
    "context API",
    "behaviour analysis",
    "access log service",
    "worker monitors",
    "housekeeping",
]


@pytest.mark.parametrize("single_process", ["on", "off"])
async def test_services_start_in_order_serve_on_the_loop_and_stop_in_reverse(
    single_process: str,
    tmp_path: Path,
    profiles_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The workers' metrics go here (else start() would set it in this process's environment).
    (tmp_path / "metrics").mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    context_sock, als_sock = tmp_path / "context.sock", tmp_path / "als.sock"
    sup = Supervisor(
        Settings(
            profiles=ProfileSettings(profiles_dir, poll_seconds=0.5),
            check=CheckSettings(listen="127.0.0.1:0", single_process=single_process),  # type: ignore[arg-type]
            identity=IdentitySettings(namespace=NS),
            admin=AdminSettings(listen="127.0.0.1:0"),
            state=StateSettings(directory=tmp_path / "state"),
            kubernetes=KubernetesSettings(mode="off"),
            behaviour=BehaviourAnalysisSettings(access_log=f"unix:{als_sock}"),
            context_api=(ContextListener.parse(f"{AGENT}=unix:{context_sock}"),),
        )
    )
    with caplog.at_level(logging.DEBUG, logger="sidecar.run.services"):
        try:
            await sup.start()
            assert sup._services.started == STARTED
            assert sup.context_ports == [0] and sup.access_log_port == 0
            async with AgentContext(f"unix:{context_sock}") as client:
                assert (await client.status()).agent == AGENT
                assert (await client.report_task("T-1", "reconcile")).task_id == "T-1"
            assert [t.task for t in sup.agent_state.tasks(NS, AGENT)] == ["T-1"]  # type: ignore[union-attr]
            message = als_pb2.StreamAccessLogsMessage()
            entry = message.http_logs.log_entry.add()
            meta = entry.common_properties.metadata.filter_metadata["envoy.filters.http.ext_authz"]
            meta.update({"agent": AGENT, "code": "allowed", "decision": "allow"})
            entry.request.authority = "ledger.finance.svc.cluster.local"
            before = sup.behaviour.observed + sup.behaviour.ignored
            async with grpc.aio.insecure_channel(f"unix:{als_sock}") as channel:
                stub = als_pb2_grpc.AccessLogServiceStub(channel)
                await stub.StreamAccessLogs(iter([message]), timeout=5)
            assert sup.behaviour.observed + sup.behaviour.ignored == before + 1
            if single_process == "on":  # one snapshot, loaded and watched once (issue 20)
                [worker] = sup._workers
                assert worker.sidecar is not None and worker.sidecar.holder is sup.holder
                watchers = [t for t in threading.enumerate() if t.name == "profile-watch"]
                assert len(watchers) == 1
                assert sup._profiles_status()["converged"]
                # The Check path gets the behaviour baselines of this process (issue 21).
                assert worker.sidecar._behaviour == sup._baselines
        finally:
            await sup.stop()
    # Worker processes cannot get them: said once, at start.
    degraded = [r for r in caplog.records if "published risk score only" in r.getMessage()]
    assert len(degraded) == (single_process == "off")
    starting = [r.args[0] for r in caplog.records if r.msg == "starting %s"]
    stopping = [r.args[0] for r in caplog.records if r.msg == "stopping %s"]
    assert starting == STARTED and stopping == starting[::-1]
    assert sup._services.started == []
    async with AgentContext(f"unix:{context_sock}", timeout=2) as client:
        with pytest.raises(AgentStateError) as err:
            await client.status()
    assert err.value.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    if single_process == "off":
        assert all(w.proc is not None and w.proc.returncode is not None for w in sup._workers)
    else:  # the Check server ran in this process, and is gone with it
        assert all(w.proc is None and w.sidecar is None for w in sup._workers)
        for w in sup._workers:
            host, port = w.listen.rsplit(":", 1)
            with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
                pass


async def test_a_check_server_that_stops_in_this_process_fails_liveness(
    tmp_path: Path, profiles_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process (the default): nothing restarts a Check server that ended inside it, so
    the supervisor says so where the kubelet looks: not ready, and /healthz fails, so that
    the container is restarted (Envoy meanwhile refuses every call: fail closed)."""
    import aiohttp

    import sidecar.run.supervisor as supervisor

    monkeypatch.setattr(supervisor, "CHECK_SERVER_POLL_S", 0.05)
    (tmp_path / "metrics").mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    sup = Supervisor(
        Settings(
            profiles=ProfileSettings(profiles_dir, poll_seconds=0.5),
            check=CheckSettings(listen="127.0.0.1:0", transport="http", single_process="on"),
            identity=IdentitySettings(namespace=NS, agent=AGENT),
            admin=AdminSettings(listen="127.0.0.1:0"),
            kubernetes=KubernetesSettings(mode="off"),
        )
    )
    await sup.start()
    try:
        base = f"http://127.0.0.1:{sup.admin_port}"
        async with aiohttp.ClientSession() as http:

            async def probe(path: str) -> int:
                async with http.get(base + path) as resp:
                    return resp.status

            assert (await probe("/healthz"), await probe("/readyz")) == (200, 200)
            [worker] = sup._workers
            assert worker.sidecar is not None and worker.sidecar.serving()
            server = worker.sidecar._http
            assert server is not None
            loop = server._thread.loop
            loop.call_soon_threadsafe(loop.stop)  # the Check server's loop ends, unasked
            for _ in range(200):
                if await probe("/healthz") == 503:
                    break
                await asyncio.sleep(0.02)
            assert await probe("/healthz") == 503
            assert await probe("/readyz") == 503
            assert not worker.sidecar.serving()
            for _ in range(200):  # the monitor marks it (and logs) at its next look
                if not worker.ready:
                    break
                await asyncio.sleep(0.02)
            assert not worker.ready
    finally:
        await sup.stop()


def test_a_bare_context_api_address_serves_the_agent_a_bare_account_name_names(
    tmp_path: Path, profiles_dir: Path
) -> None:
    """A profile may name its service account without the namespace (the pod's own): the
    context API finds the pod's agent by it as decide does (Snapshot.agent_of_service_account)."""
    agents = profiles_dir / "agents.yaml"
    text = agents.read_text()
    assert "serviceAccount: agents/billing-agent" in text
    agents.write_text(
        text.replace("serviceAccount: agents/billing-agent", "serviceAccount: billing-agent")
    )
    sup = Supervisor(
        Settings(
            profiles=ProfileSettings(profiles_dir),
            identity=IdentitySettings(namespace=NS, service_account=f"{NS}/billing-agent"),
            kubernetes=KubernetesSettings(mode="off"),
            context_api=(ContextListener.parse("127.0.0.1:0"),),
        )
    )
    sup.holder.load_initial()
    assert sup._context_listeners() == [(AGENT, "127.0.0.1:0")]
