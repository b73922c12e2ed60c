"""`mandate run`: the supervisor process and its Check workers.

The supervisor owns everything that is not a Check: the shared revocation table (the only
writer), its persistence, the Kubernetes watcher, the admin server (probes, metrics, the
revocation API) and N worker processes. Each worker (`mandate worker`, see worker.py)
serves Check on an endpoint of its own — with Envoy's gRPC client, SO_REUSEPORT alone sends
all traffic to one process — and reads the table from shared memory on every Check.

Start order makes "revoked before the first Check" hold: the persisted table is published
(marked incomplete) before any worker starts, so a worker denies everything until the first
Kubernetes list is merged (or, with Kubernetes unreachable, until `initial_sync_timeout`
has passed; the last known state is then enforced and readiness says so). A worker that
dies is restarted on the same endpoint; meanwhile Envoy's calls to it fail, and Envoy
denies them (failure_mode_allow: false). No decision logic here.

What the supervisor runs is a list of services (`Supervisor._service_list`, run/services.py),
started in order and stopped in reverse, all on its one event loop: the agent context API and
Envoy's access log service are grpc.aio servers on it (neither is on the Check path), beside
the admin API (aiohttp), the Kubernetes watchers and the loops. The only other threads are
the profile watcher's, the audit writer's and the behaviour baselines' periodic save.

Nothing a run makes outlives it, even when the supervisor is SIGKILLed (OOM, crash): the
shared tables have no name (shm: a memfd each) and reach the workers as inherited file
descriptors (`pass_fds`), so their memory goes with the last process that maps them; the run
directory (workers' port and version files, metrics) is removed by the last process of the
run to exit, or else by the next start (shm.RunDir). Only a `--table PATH` is left in place:
it is the caller's file.

Settings come validated and whole (sidecar.settings); each worker gets the same tree, with
its own endpoint, as JSON in its environment (settings.WORKER_SETTINGS_ENV), never as a
command line to parse again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.audit import Trail, event_record, open_trail
from sidecar.check.reload import SnapshotHolder
from sidecar.core.behaviour import Baseline
from sidecar.core.callrisk import NO_BASELINES
from sidecar.core.revocation import Revocation
from sidecar.errors import ConfigError, StateWriteError
from sidecar.run.admin import ElevationAPI, RevocationAPI, add_probe_routes, read_token
from sidecar.run.services import Hooks, Service, Services, Tasks
from sidecar.run.worker import RUN_DIR_ENV, RUN_LOCK_FD_ENV, SUPERVISOR_PID_ENV, WORKER_INDEX_ENV
from sidecar.settings import (
    WORKER_SETTINGS_ENV,
    Settings,
    TableSource,
    WorkerSettings,
    split_hostport,
)
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.revocations import RevocationStore
from sidecar.state.shm import RunDir, SharedAgentState, SharedTable
from sidecar.state.statefile import os_error_text
from sidecar.telemetry import metrics

__all__ = ["Supervisor", "run_supervisor"]

log = logging.getLogger(__name__)

CHECK_SERVER_POLL_S = 1.0  # how often the in-process Check server's liveness is looked at


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_addresses(listen: str, workers: int) -> tuple[list[str], list[int]]:
    """Each worker's Check address and TCP port: HOST:PORT serves PORT+i (port 0: free
    ports), unix:PATH serves PATH for worker 0 and PATH.i for worker i (port 0)."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:")
        addresses = [f"unix:{path}" if i == 0 else f"unix:{path}.{i}" for i in range(workers)]
        return addresses, [0] * workers
    host, base_port = split_hostport(listen, "--listen")
    ports = [base_port + i if base_port else _free_port(host) for i in range(workers)]
    return [f"{host}:{port}" for port in ports], ports


@dataclass
class _Worker:
    index: int
    listen: str
    port_file: Path
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ready: bool = False
    sidecar: Any = None  # the in-process worker (worker.Sidecar), when single-process


class Supervisor:
    def __init__(self, settings: Settings, run_dir: RunDir | None = None) -> None:
        """``run_dir``: the run directory `mandate run` made (it removes it); None: make one
        here, removed by stop()."""
        self.settings = settings
        self._own_run_dir = run_dir is None
        self._run_dir = RunDir.create() if run_dir is None else run_dir
        self._workdir = self._run_dir.path
        self._workers: list[_Worker] = []
        self._services = Services()  # what start() started, stopped in reverse by stop()
        self._tasks: list[asyncio.Task[Any]] = []  # started on the way (publications)
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._watcher: Any = None
        self._elevation_watcher: Any = None
        self._sync_deadline: asyncio.Task[None] | None = None
        self._behaviour_task: asyncio.Task[None] | None = None
        self._kube_state = "off"
        self.admin_port = 0
        self.grpc_ports: list[int] = []
        self.table: SharedTable | None = None
        self.store: RevocationStore | None = None
        self.agent_state_table: SharedAgentState | None = None
        self.agent_state: AgentStateStore | None = None
        self._audit: Trail | None = None
        self._context_api: Any = None
        self.context_ports: list[int] = []
        self.behaviour: Any = None
        self._als: Any = None
        self.access_log_port = 0
        self.holder = SnapshotHolder(settings.profiles.directory)
        self._agent_said: str | None = None  # the last problem _check_agent logged
        self._agent_evented = True  # ... and whether its Event is queued

    # -- configuration ----------------------------------------------------------------

    def _token(self) -> str | None:
        state_dir = self.settings.state.directory
        path = self.settings.admin.token_file
        if path is None and state_dir is not None:
            path = state_dir / "admin.token"
            if not path.exists():
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(secrets.token_urlsafe(32) + "\n")
                except OSError as exc:
                    # Without it nobody could revoke through the admin API: refuse to start
                    # with a message that says why, not a traceback.
                    raise ConfigError(
                        f"--state-dir {state_dir}: cannot create the admin token {path} "
                        f"({os_error_text(exc)}); make the directory writable or give "
                        "--admin-token-file"
                    ) from None
                log.info("generated an admin token in %s", path)
        if path is None:
            log.warning("no admin token: the revocation API is disabled")
            return None
        try:
            return read_token(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--admin-token-file {path}: {exc}") from None

    def _use_kubernetes(self) -> bool:
        kube = self.settings.kubernetes
        if kube.mode == "auto":
            return kube.kubeconfig is not None or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return kube.mode == "on"

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.settings
        admin_host, admin_port = split_hostport(cfg.admin.listen, "--admin")
        state_dir = cfg.state.directory
        if state_dir is not None:
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--state-dir {state_dir}: {exc.strerror or exc}") from None
        token = self._token()
        self.holder.load_initial()  # refuse to start (ProfileErrors) before anything runs
        table_path = cfg.state.table
        self.table = SharedTable.create(table_path)
        self.agent_state_table = SharedAgentState.create(
            None if table_path is None else table_path.with_suffix(".context")
        )
        self._audit = self._audit_writer()
        self.agent_state = AgentStateStore(
            self.agent_state_table,
            state_dir / "context.json" if state_dir else None,
            self.holder.get,
            audit=self._record,
            audit_blocked=self._audit_blocked,
        )
        self.agent_state.load_persisted()
        state_file = state_dir / "revocations.json" if state_dir else None
        self.store = RevocationStore(self.table, state_file, on_persist=self._persisted)
        self.store.subscribe(self._count)
        # Published incomplete: workers deny until synced. Also the start-up check of the
        # state dir: this writes the file, and a state dir that cannot be written starts
        # degraded and visibly so (readiness details `persistence`, mandate_state_durable
        # 0, an ERROR line): every revocation is still enforced, and every operator action
        # is answered "not durable" until a write succeeds.
        self.store.load_persisted()
        kubernetes = self._use_kubernetes()
        if not kubernetes:
            self.store.mark_complete()
        if not cfg.check.in_process and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Workers write their metrics there; `mandate run` sets it before importing
            # prometheus_client so that the supervisor's own metrics go there too. In one
            # process, one registry in memory (admin /metrics serves it).
            metrics_dir = self._workdir / "metrics"
            metrics_dir.mkdir()
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        addresses, ports = _check_addresses(cfg.check.listen, cfg.check.workers)
        self._workers = [
            _Worker(i, address, self._workdir / f"worker-{i}.json")
            for i, address in enumerate(addresses)
        ]
        self.grpc_ports = ports
        for service in self._service_list(kubernetes, admin_host, admin_port, token):
            await self._services.start(service)
        info = {
            "grpc": self.grpc_ports,
            "check": [w.listen for w in self._workers],
            "admin": self.admin_port,
            "pid": os.getpid(),
            "table": self.table.name,
            "context_table": self.agent_state_table.name,
            "context": self.context_ports,
            "access_log": self.access_log_port,
        }
        log.info("mandate serving: %s", json.dumps(info))
        if cfg.port_file is not None:
            tmp = cfg.port_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(cfg.port_file)

    # -- services -----------------------------------------------------------------------

    def _service_list(
        self, kubernetes: bool, admin_host: str, admin_port: int, token: str | None
    ) -> list[Service]:
        """What the supervisor runs, in the order it starts them (stop() stops them in
        reverse): the Kubernetes watchers before the workers (a worker denies everything
        until the first list is merged), the workers, the admin API, profile reloads, the
        agent context API, behaviour analysis before the access log service that feeds it,
        and last the loops that restart workers and keep house."""
        cfg = self.settings
        services: list[Service] = []
        if kubernetes:
            services.append(Hooks("kubernetes", self._start_kubernetes, self._stop_kubernetes))
        services += [
            Hooks("workers", self._start_workers, self._stop_workers),
            Hooks(
                "admin API",
                partial(self._start_admin, admin_host, admin_port, token),
                self._stop_admin,
            ),
            Hooks("profile reload", self._start_reload, self._stop_reload),
        ]
        if cfg.context_api:
            services.append(Hooks("context API", self._start_context_api, self._stop_context_api))
        if cfg.behaviour.access_log:
            services += [
                Hooks("behaviour analysis", self._start_behaviour, self._stop_behaviour),
                Hooks("access log service", self._start_access_log, self._stop_access_log),
            ]
        services += [
            Tasks("worker monitors", lambda: [self._monitor(w) for w in self._workers]),
            Tasks("housekeeping", lambda: [self._prune()]),
        ]
        return services

    async def _start_workers(self) -> None:
        for w in self._workers:
            await self._spawn(w)
        await self._wait_workers(timeout=30)

    async def _stop_workers(self) -> None:
        for w in self._workers:
            if w.sidecar is not None:
                await asyncio.to_thread(w.sidecar.stop)
                w.sidecar = None
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self._workers:
            if w.proc is not None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 5)
                except TimeoutError:
                    w.proc.kill()
                    await w.proc.wait()

    async def _start_admin(self, host: str, port: int, token: str | None) -> None:
        assert self.store is not None and self.agent_state is not None
        cfg = self.settings
        app = web.Application()
        add_probe_routes(app, self._ready, token, alive=self._alive)
        RevocationAPI(self.store, cfg.identity.namespace, token, self.status).add_routes(app)
        ElevationAPI(self.agent_state, cfg.identity.namespace, token).add_routes(app)
        if cfg.credentials.txn_token_keys is not None:  # the public keys, for upstreams
            from sidecar.credentials.cli import add_jwks_route
            from sidecar.credentials.keys import SigningKeys

            add_jwks_route(app, SigningKeys(cfg.credentials.txn_token_keys, strict=False))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"--admin {cfg.admin.listen!r}: cannot bind ({exc})") from None
        self.admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _stop_admin(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _start_reload(self) -> None:
        self.holder.start(self.settings.profiles.poll_seconds)

    async def _stop_reload(self) -> None:
        self.holder.stop()

    def _context_listeners(self) -> list[tuple[str, str]]:
        """(agent, address) per `--context-api` entry; a bare address serves the pod's agent
        (--agent, or the profile whose identities name --service-account)."""
        pod = self.settings.identity
        snap = self.holder.get()
        agents = snap.agents if snap is not None else {}
        out: list[tuple[str, str]] = []
        for listener in self.settings.context_api:
            entry, agent, address = listener.spelling, listener.agent, listener.address
            if agent is None:
                agent = pod.agent or ""
                if not agent and pod.service_account and snap is not None:
                    agent = snap.agent_of_service_account(pod.service_account) or ""
                if not agent:
                    raise ConfigError(
                        f"--context-api {entry!r}: no agent to serve; give --agent, a "
                        "--service-account a profile names, or AGENT=ADDRESS"
                    )
            if agent not in agents:
                known = ", ".join(sorted(agents))
                raise ConfigError(
                    f"--context-api {entry!r}: no profile for agent {agent!r} (known: {known})"
                )
            out.append((agent, address))
        return out

    async def _start_context_api(self) -> None:
        from sidecar.agentapi.backend import SupervisorBackend
        from sidecar.agentapi.server import AgentAPIServer

        assert self.agent_state is not None and self.store is not None
        backend = SupervisorBackend(
            self.agent_state, self.store, self.holder.get, self.settings.identity.namespace
        )
        self._context_api = AgentAPIServer(backend, self._context_listeners())
        self.context_ports = await self._context_api.start()

    async def _stop_context_api(self) -> None:
        api, self._context_api = self._context_api, None
        if api is not None:
            await api.stop(0.5)

    async def _start_behaviour(self) -> None:
        """Behaviour analysis: the baselines loaded, scored every 100 ms."""
        from sidecar.behaviour.service import BehaviourService

        assert self.agent_state is not None and self.store is not None
        namespace, state_dir = self.settings.identity.namespace, self.settings.state.directory
        behaviour = BehaviourService(
            self.holder.get,
            self.agent_state,
            self.store,
            namespace,
            state_file=state_dir / "behaviour.json" if state_dir else None,
            audit=self._record,
            on_revoke=self._publish_revocation,
        )
        behaviour.load()
        if not self.single_process:
            log.warning(
                "behaviour analysis with %d Check worker processes: calls are decided on the "
                "published risk score only (after the access log reports them); a call's own "
                "novelty is scored on the Check path only when the Checks run in mandate's "
                "process (--workers 1)",
                len(self._workers),
            )
        self.behaviour = behaviour
        self._behaviour_task = asyncio.create_task(self._behaviour_loop())

    async def _stop_behaviour(self) -> None:
        """Stop scoring; save the baselines."""
        task, self._behaviour_task = self._behaviour_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.behaviour is not None:
            self.behaviour.save()

    async def _start_access_log(self) -> None:
        """Envoy's access log service, feeding behaviour analysis."""
        from sidecar.behaviour.access_log import AccessLogServicer, start_als_server

        assert self.behaviour is not None
        access_log = self.settings.behaviour.access_log
        assert access_log is not None
        namespace = self.settings.identity.namespace
        servicer = AccessLogServicer(self.behaviour.observe, namespace=namespace)
        self._als, self.access_log_port = await start_als_server(access_log, servicer)

    async def _stop_access_log(self) -> None:
        als, self._als = self._als, None
        if als is not None:
            await als.stop(0.5)

    def _publish_revocation(self, rev: Revocation) -> None:
        """Called on the event loop when behaviour analysis revoked an agent: in force
        already here; with --publish-behaviour-revocations also as an AgentRevocation."""
        cfg = self.settings
        if not cfg.behaviour.publish_revocations or not self._use_kubernetes():
            return
        namespace, kubeconfig = cfg.identity.namespace, cfg.kubernetes.kubeconfig

        async def publish() -> None:
            import sidecar.kube as kube

            try:
                name = await kube.publish_revocation(
                    rev, namespace=namespace, kubeconfig=kubeconfig, pod_name=self._pod_name()
                )
                self._record({"type": "revocation_published", "agent": rev.agent, "object": name})
            except Exception as exc:  # still enforced here; the object is for everyone else
                log.error("could not create the AgentRevocation for %s: %s", rev.agent, exc)

        self._tasks.append(asyncio.get_running_loop().create_task(publish()))

    async def _behaviour_loop(self) -> None:
        """Score every 100 ms (Envoy flushes its access log every 100 ms); save baselines
        every 10 s."""
        saved = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(0.1)
            try:
                self.behaviour.tick()
                if time.monotonic() - saved > 10:
                    saved = time.monotonic()
                    await asyncio.to_thread(self.behaviour.save)
            except Exception:  # analysis must never stop the supervisor
                log.exception("behaviour analysis tick failed")

    async def _start_kubernetes(self) -> None:
        import sidecar.kube as kube  # only when used: kubernetes_asyncio is heavy

        assert self.store is not None
        cfg = self.settings
        namespace, kubeconfig = cfg.identity.namespace, cfg.kubernetes.kubeconfig
        timeout = cfg.kubernetes.initial_sync_timeout
        self._watcher = await kube.start_watcher(
            self.store, namespace=namespace, kubeconfig=kubeconfig, pod_name=self._pod_name()
        )
        self._kube_state = "syncing"
        assert self.agent_state is not None
        self._elevation_watcher = await kube.start_elevation_watcher(
            self.agent_state, namespace=namespace, kubeconfig=kubeconfig, pod_name=self._pod_name()
        )

        async def initial_sync_deadline() -> None:
            assert self.store is not None
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self.store.complete:
                await asyncio.sleep(0.05)
            if not self.store.complete and not self.store.refused:
                log.error(
                    "no Kubernetes sync within %.0fs: enforcing the last known revocations",
                    timeout,
                )
                self._kube_state = "unsynced"
                self.store.mark_complete(fallback=True)

        self._sync_deadline = asyncio.create_task(initial_sync_deadline())

    async def _stop_kubernetes(self) -> None:
        task, self._sync_deadline = self._sync_deadline, None
        if task is not None:
            task.cancel()
        for watcher in (self._watcher, self._elevation_watcher):
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    @property
    def single_process(self) -> bool:
        """Whether the Checks are served in this process (one worker, no worker process)."""
        return self.settings.check.in_process

    def _start_in_process(self, w: _Worker) -> None:
        """The one worker, in this process: its gRPC (threads) or HTTP (a loop thread of
        its own) server, its profile holder and table readers, as `mandate worker` would
        run them; no second interpreter, grpc or protobufs (issue 20)."""
        from sidecar.run.worker import Sidecar, tune_gc

        assert self.table is not None and self.table.fd is not None
        assert self.agent_state_table is not None and self.agent_state_table.fd is not None
        config = self._worker_settings(w)
        # The readers take their descriptor over and close it: give them copies.
        config = replace(
            config,
            revocations=TableSource(fd=os.dup(self.table.fd)),
            agent_state=TableSource(fd=os.dup(self.agent_state_table.fd)),
        )
        tune_gc()
        # One snapshot, one watcher; the behaviour baselines of this process (it scores a
        # call's own novelty on the Check path).
        w.sidecar = Sidecar(config, holder=self.holder, behaviour=self._baselines)
        w.sidecar.start()

    def _baselines(self) -> Mapping[tuple[str, str], Baseline]:
        """The behaviour baselines for the in-process Check path (none without analysis)."""
        behaviour = self.behaviour
        return NO_BASELINES if behaviour is None else behaviour.baselines()

    async def _spawn(self, w: _Worker) -> None:
        if self.single_process:
            # On this loop, not in the thread below: the environment is the process's.
            os.environ[RUN_DIR_ENV] = str(self._run_dir.path)
            w.port_file.unlink(missing_ok=True)
            await asyncio.to_thread(self._start_in_process, w)
            return
        assert self.table is not None and self.table.fd is not None
        assert self.agent_state_table is not None and self.agent_state_table.fd is not None
        w.port_file.unlink(missing_ok=True)
        w.ready = False
        # The tables go by descriptor (they have no name, and a restarted worker must get the
        # very table this process writes); so does the run directory's lock, which keeps the
        # directory from being swept as dead while any worker lives.
        fds = (self.table.fd, self.agent_state_table.fd, self._run_dir.lock_fd)
        # The settings go whole, as JSON in the environment (no secret in them: the admin
        # token is a path, and the worker never reads it). The command line only names the
        # worker's endpoint, for process listings (bench/soak.py finds workers by it).
        args = [sys.executable, "-m", "sidecar", "worker", "--listen", w.listen]
        env = {**os.environ, WORKER_INDEX_ENV: str(w.index)}
        env[WORKER_SETTINGS_ENV] = self._worker_settings(w).to_json()
        # The worker stops if this process dies (worker._stop_with_supervisor): serving a
        # table nothing updates would ignore every revocation made after the crash.
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        env[RUN_DIR_ENV] = str(self._run_dir.path)
        env[RUN_LOCK_FD_ENV] = str(self._run_dir.lock_fd)
        w.proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, env=env, pass_fds=fds
        )

    def _worker_settings(self, w: _Worker) -> WorkerSettings:
        """The run's settings, whole, with ``w``'s own endpoint and port file; its tables as
        the descriptors it inherits."""
        cfg = self.settings
        assert self.table is not None and self.agent_state_table is not None
        return WorkerSettings(
            run=replace(cfg, check=replace(cfg.check, listen=w.listen), port_file=w.port_file),
            index=w.index,
            revocations=TableSource(fd=self.table.fd),
            agent_state=TableSource(fd=self.agent_state_table.fd),
            chain_id=f"{self._pod_name()}-w{w.index}" if cfg.audit.directory else "",
            version_file=self._version_file(w),
            rate_share=1.0 / cfg.check.workers,
        )

    def _pod_name(self) -> str:
        return self.settings.identity.pod_name or socket.gethostname()

    def _version_file(self, w: _Worker) -> Path:
        return self._workdir / f"worker-{w.index}.version"

    def _profiles_status(self) -> dict[str, Any]:
        """The supervisor's reload status, with ``version`` the one every worker enforces
        (each reloads on its own; a caller who sees version V knows every Check is decided
        under V). While they differ: ``converged`` false and ``version`` empty."""
        status = self.holder.status().as_dict()
        versions: list[str] = []
        for w in self._workers:
            try:
                versions.append(str(json.loads(self._version_file(w).read_text())["version"]))
            except (OSError, ValueError, KeyError, TypeError):
                versions.append("")
        converged = bool(versions) and len(set(versions)) == 1 and versions[0] != ""
        status["supervisor_version"] = status["version"]
        status["worker_versions"] = versions
        status["converged"] = converged
        status["version"] = versions[0] if converged else ""
        return status

    async def _wait_workers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for w in self._workers:
            while not w.port_file.exists():
                if w.proc is not None and w.proc.returncode is not None:
                    raise ConfigError(f"worker {w.index} exited with code {w.proc.returncode}")
                if time.monotonic() > deadline:
                    raise ConfigError(f"worker {w.index} not serving after {timeout}s")
                await asyncio.sleep(0.02)
            w.ready = True

    def _alive(self) -> bool:
        """False when the Check server in this process has ended (liveness: only a restart
        of the container helps; a worker process is restarted by `_monitor` instead)."""
        return all(w.sidecar.serving() for w in self._workers if w.sidecar is not None)

    async def _monitor(self, w: _Worker) -> None:
        if w.sidecar is not None:  # in this process: watch that it still serves
            while not self._stopping and w.sidecar is not None:
                if not w.sidecar.serving():
                    w.ready = False
                    log.error(
                        "the Check server in this process has stopped: every call is refused "
                        "(Envoy fails closed); /healthz now fails so that the container restarts"
                    )
                    return
                await asyncio.sleep(CHECK_SERVER_POLL_S)
            return
        backoff = 0.1
        while not self._stopping:
            assert w.proc is not None
            code = await w.proc.wait()
            w.ready = False
            if self._stopping:
                return
            with contextlib.suppress(Exception):
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(w.proc.pid)  # type: ignore[no-untyped-call]
            log.error("worker %d exited with code %s; restarting in %.1fs", w.index, code, backoff)
            metrics.WORKER_RESTARTS.inc()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            w.restarts += 1
            await self._spawn(w)
            started = time.monotonic()
            while not w.port_file.exists() and time.monotonic() - started < 30:
                if w.proc is not None and w.proc.returncode is not None:
                    break
                await asyncio.sleep(0.02)
            if w.port_file.exists():
                w.ready = True
                backoff = 0.1

    def _persisted(self, failure: StateWriteError | None) -> None:
        metrics.STATE_DURABLE.labels("revocations").set(0 if failure else 1)
        if failure is not None:
            metrics.STATE_WRITE_FAILURES.labels("revocations").inc()

    def _count(self, _: object) -> None:
        assert self.store is not None
        metrics.REVOCATION_WRITES.inc()
        metrics.observe_revocations(self.store.entries(), time.time())

    def _audit_writer(self) -> Trail | None:
        """The supervisor's own audit chain (elevations, tasks, automatic revocations),
        beside the workers' decision chains, with the same options (and sinks)."""
        audit = self.settings.audit
        return open_trail(
            directory=audit.directory,
            stdout=audit.stdout,
            chain_id=f"{self._pod_name()}-supervisor",
            writer="supervisor",
            pod=self.settings.identity.pod_name,
            fsync=audit.fsync,
            on_failure=audit.on_failure,
            reserve_bytes=audit.reserve_bytes,
            shared_directory=self._run_dir.path,
            state_directory=self.settings.state.directory,
        )

    def _record(self, event: dict[str, Any]) -> bool:
        """Audit one supervisor event; without an audit trail, log it. False when a
        fail-closed trail dropped it (the context store then undoes the change it records)."""
        kind = str(event.get("type", "event"))
        metrics.observe_elevation_event(kind)
        fields = {k: v for k, v in event.items() if k != "type"}
        log.info("%s: %s", kind, json.dumps(fields, sort_keys=True))
        if self._audit is None:
            return True
        written = self._audit.write(
            event_record(
                kind, now=time.time(), pod=self.settings.identity.pod_name or None, **fields
            )
        )
        return written or not self._audit.fail_closed

    def _audit_blocked(self) -> bool:
        """A fail-closed trail that cannot take records now: no agent change is made."""
        return self._audit is not None and self._audit.must_deny()

    async def _prune(self) -> None:
        assert self.store is not None
        flushed = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(0.25)
            try:
                if time.monotonic() - flushed > 5:
                    flushed = time.monotonic()
                    self._housekeeping(flush=True)
                else:
                    self._housekeeping(flush=False)
            except Exception:
                # One failing pass must not end housekeeping for good: nothing would end
                # expired revocations, retry a failed state write or update the metrics.
                metrics.HOUSEKEEPING_ERRORS.inc()
                log.exception("housekeeping failed; trying again in 0.25 s")

    def _housekeeping(self, *, flush: bool) -> None:
        assert self.store is not None
        self.store.prune_expired()
        if flush:
            # After a failed write, retry: a revocation in force only in memory becomes
            # durable (and readiness says so) once the volume is writable again.
            self.store.flush()
        if self.agent_state is not None:
            self.agent_state.prune()
        if self._watcher is not None:
            connected = bool(self._watcher.status().get("connected"))
            metrics.KUBERNETES_CONNECTED.set(1 if connected else 0)
            metrics.observe_watch("agentrevocations", self._watcher.status())
        if self._elevation_watcher is not None:
            metrics.observe_watch("agentelevations", self._elevation_watcher.status())
        if self.agent_state is not None:
            snap = self.holder.get()
            metrics.observe_elevations(
                self.agent_state.grants(),
                self.agent_state.requests(),
                time.time(),
                agents=snap.agents if snap is not None else (),
            )
        metrics.observe_audit_state(self._audit_health()["state"])
        self._check_agent()

    def _agent_problem(self) -> str | None:
        """Why no profile serves this pod's agent (--agent, or the profile naming
        --service-account), or None: such a pod would deny every call `unknown_agent`."""
        pod = self.settings.identity
        snap = self.holder.get()
        if snap is None:
            return None
        if pod.agent:
            if pod.agent in snap.agents:
                return None
            known = ", ".join(sorted(snap.agents)) or "none"
            return (
                f"no profile for agent {pod.agent!r} (--agent / the pod's mandate.dev/agent "
                f"or service account; profiles: {known}): every call is denied unknown_agent"
            )
        sa = pod.service_account
        if sa and snap.agent_of_service_account(sa) is None:
            return (
                f"no profile names service account {sa!r} (--service-account): every call "
                "is denied unknown_agent"
            )
        return None

    def _check_agent(self) -> None:
        """Say once (log, and a Warning Event `UnknownAgent` on the pod) when the pod's agent
        has no profile, and again when that changes; readiness says it on every probe."""
        problem = self._agent_problem()
        if problem != self._agent_said:
            self._agent_said, self._agent_evented = problem, problem is None
            if problem is None:
                log.info("the pod's agent has a profile again")
            else:
                log.error("not ready: %s", problem)
        if not self._agent_evented and problem is not None and self._watcher is not None:
            self._agent_evented = self._watcher.reporter.warn_pod("UnknownAgent", problem)

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.store is not None
        state = self.agent_state
        kube: dict[str, Any] = {"state": self._kube_state}
        if self._watcher is not None:
            kube.update(self._watcher.status())
            # Issue 8 (tests/e2e/test_faults.py): the state said "syncing" (or "unsynced")
            # forever, even once the watcher had listed. After its first list it is "synced";
            # `connected` and `last_error` say whether the watch is still up.
            if kube.get("lists"):
                kube["state"] = "synced"
            if self.store.refused:  # a configuration error: every Check is denied
                kube["state"] = "refused"
        if self._elevation_watcher is not None:
            kube["elevations"] = self._elevation_watcher.status()
        return {
            "revocations": {
                "complete": self.store.complete,
                "refused": self.store.refused or None,
                "entries": len(self.store.entries()),
                "generation": self.store.generation,
            },
            # Is what is in force also on disk? One entry per state file this supervisor
            # writes; `durable: false` names the file and the OS error (issue 15, finding 6).
            "persistence": {"revocations": self.store.persistence()},
            "workers": [
                {"index": w.index, "listen": w.listen, "ready": w.ready, "restarts": w.restarts}
                for w in self._workers
            ],
            "kubernetes": kube,
            "profiles": self._profiles_status(),
            "behaviour": {
                "analysing": self.behaviour is not None,
                "risks": [r.as_dict() for r in state.risks()] if state else [],
            },
            "elevations": {
                "requests": [r.as_dict() for r in state.requests()] if state else [],
                "grants": [g.as_dict() for g in state.grants()] if state else [],
            },
        }

    def _audit_health(self) -> dict[str, Any]:
        """ok / failing / off: the supervisor's writer reads the directory's health board,
        so "failing" covers every worker's chain too (issue 15, finding 5)."""
        return {"state": "off"} if self._audit is None else self._audit.health()

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        status = self.status()
        ok = status["revocations"]["complete"] and all(w.ready for w in self._workers)
        ok = ok and self._alive()  # the in-process Check server, when there is one
        # Not ready while every allow is being denied because the audit trail cannot be
        # written (fail-closed): the pod cannot do its job, and an operator should see it.
        status["audit"] = audit = self._audit_health()
        ok = ok and not audit.get("denying", False)
        # A pod whose agent has no profile denies every call: not ready, and it says why.
        problem = self._agent_problem()
        status["agent"] = {"problem": problem}
        ok = ok and problem is None
        # A detail, not a reason to be unready: a full context table (one agent withheld)
        # or an unwritable context.json must not stop the other agents (issue 15, 2-3).
        status["context"] = self.agent_state.health() if self.agent_state is not None else None
        return ok, status

    async def stop(self) -> None:
        """Stop the services start() started, in reverse order; then close the tables and
        the audit trail (and remove the run directory if it is this object's)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await self._services.stop()
        if self.table is not None:
            self.table.close()  # a --table file stays: the caller's
        if self.agent_state_table is not None:
            self.agent_state_table.close()
            if self.agent_state_table.path is not None:
                self.agent_state_table.path.unlink(missing_ok=True)
        if self._audit is not None:
            self._audit.close()
        if self._own_run_dir:
            self._run_dir.remove()


async def _serve(settings: Settings, run_dir: RunDir | None) -> None:
    sup = Supervisor(settings, run_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sup.start()
        await stop.wait()
        log.info("mandate stopping")
    finally:
        await sup.stop()


def run_supervisor(settings: Settings, run_dir: RunDir | None = None) -> None:
    """Run until SIGTERM or SIGINT. ``run_dir``: see Supervisor."""
    asyncio.run(_serve(settings, run_dir))
