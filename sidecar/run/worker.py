"""One Check worker of `mandate run` (`mandate worker`): wires the profile snapshot, the
Check server (gRPC, or Envoy's HTTP ext_authz mode with `transport="http"`), gRPC health
and, for a single-process sidecar, the admin server together, and stops them cleanly on
SIGTERM/SIGINT.

It runs with a settings.WorkerSettings, validated where it was built (the command line, or
the supervisor, which hands it over as JSON in settings.WORKER_SETTINGS_ENV): nothing here
checks a setting again.

The gRPC server is grpcio's synchronous server with a small thread pool: measured before
any code, it costs about half the CPU per Check of grpc.aio (see bench/), and again against
grpc.aio on a loop of its own (`--grpc-server aio`, `check.grpc_aio`), unloaded and under
load (bench/results/grpc_shapes.md). The HTTP server
is aiohttp's low-level server on one event loop (`http_authz`). Must not contain decision
logic.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.audit import Trail, open_trail
from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.keyfile import load_argument_key
from sidecar.check.pipeline import Audit, CheckPipeline
from sidecar.check.reload import SnapshotHolder
from sidecar.check.request import Identity
from sidecar.core import Snapshot
from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable
from sidecar.core.ratelimit import RateLimiter
from sidecar.core.revocation import EMPTY_TABLE, RevocationTable
from sidecar.credentials.broker import CredentialBroker
from sidecar.errors import AuditInputError, ConfigError
from sidecar.settings import WorkerSettings, split_hostport
from sidecar.state.shm import RunDir, SharedAgentState, SharedTable
from sidecar.telemetry import metrics

if TYPE_CHECKING:
    import grpc
    from grpc_health.v1 import health

    from sidecar.check.grpc_aio import GrpcAioServer
    from sidecar.check.http_lean import HttpLeanServer
    from sidecar.check.http_transport import HttpAuthzServer
    from sidecar.core.behaviour import Baseline
    from sidecar.run.admin import AdminServer
    from sidecar.telemetry.tracing import Tracing

__all__ = [
    "RUN_DIR_ENV",
    "RUN_LOCK_FD_ENV",
    "SUPERVISOR_PID_ENV",
    "WORKER_INDEX_ENV",
    "Sidecar",
    "serve",
]

log = logging.getLogger(__name__)
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
# Set by `mandate run` for each worker it starts: the supervisor's pid (see _stop_with_supervisor).
SUPERVISOR_PID_ENV = "MANDATE_SUPERVISOR_PID"
# Also set by `mandate run`: its run directory and the inherited descriptor of its lock
# (shm.RunDir); the last process of the run to exit removes the directory.
RUN_DIR_ENV = "MANDATE_RUN_DIR"
RUN_LOCK_FD_ENV = "MANDATE_RUN_LOCK_FD"
# And the worker's index (also in its settings; here for whoever looks at its environment).
WORKER_INDEX_ENV = "MANDATE_WORKER_INDEX"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Sidecar:
    """The running sidecar: start(), then stop(). Used by `mandate run` and by tests.

    ``admin_token``: the bearer token `/readyz?verbose=1` needs when ``config.serve_admin``
    (the admin server's other pages are open and say no more than ready or not); None: the
    details are never shown. A value, never a setting: settings hold no secret."""

    def __init__(
        self,
        config: WorkerSettings,
        *,
        admin_token: str | None = None,
        holder: SnapshotHolder | None = None,
        behaviour: Callable[[], Mapping[tuple[str, str], Baseline]] | None = None,
    ) -> None:
        """``holder``: the profiles, loaded and watched by the caller (the supervisor, when
        this worker runs in its process): one compiled snapshot and one watcher, not two.
        ``behaviour``: the supervisor's behaviour baselines, in its process (the Check path
        scores a call's own novelty against them)."""
        self._behaviour = behaviour
        self.config = config
        self._admin_token = admin_token
        self._owns_holder = holder is None
        if holder is None:
            holder = SnapshotHolder(config.run.profiles.directory)
        holder.subscribe(self._report_version)
        self.holder = holder
        self.grpc_port = 0
        self.http_port = 0
        self.admin_port = 0
        self._server: grpc.Server | None = None
        self._aio: GrpcAioServer | None = None  # --grpc-server aio, when it runs
        self._http: HttpAuthzServer | HttpLeanServer | None = None
        self._health: health.HealthServicer | None = None  # gRPC health, with a gRPC server
        self._admin: AdminServer | None = None
        self._tracing: Tracing | None = None
        self._audit_writer: Trail | None = None
        self._broker: CredentialBroker | None = None
        self._stopped = threading.Event()

    def _report_version(self, snap: Snapshot) -> None:
        path = self.config.version_file
        if path is None:
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": snap.version, "pid": os.getpid()}))
        tmp.replace(path)

    def serving(self) -> bool:
        """Whether the Check server still runs: an HTTP server's or the grpc.aio server's
        loop thread can end (the synchronous gRPC server's threads are grpc's own); False
        once stopped."""
        if self._stopped.is_set():
            return False
        return (self._http is None or self._http.alive) and (self._aio is None or self._aio.alive)

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        status = self.holder.status()
        writer = self._audit_writer
        audit = {"state": "off"} if writer is None else writer.health()
        ready = self.holder.current is not None and not audit.get("denying", False)
        return ready, {"profiles": status.as_dict(), "audit": audit}

    def start(self) -> None:
        cfg, run = self.config, self.config.run
        pod = run.identity
        admin = split_hostport(run.admin.listen, "--admin") if cfg.serve_admin else None
        revocations: Callable[[], RevocationTable] = lambda: EMPTY_TABLE  # noqa: E731
        if cfg.revocations.fd is not None:
            revocations = SharedTable.attach_fd(cfg.revocations.fd).read
        elif cfg.revocations.path is not None:
            revocations = SharedTable.attach(cfg.revocations.path).read
        agent_state: Callable[[], AgentStateTable] = lambda: EMPTY_AGENT_STATE  # noqa: E731
        if cfg.agent_state.fd is not None:
            agent_state = SharedAgentState.attach_fd(cfg.agent_state.fd).read
        elif cfg.agent_state.path is not None:
            agent_state = SharedAgentState.attach(cfg.agent_state.path).read
        limiter = RateLimiter(share=cfg.rate_share)
        if self._owns_holder or self.holder.current is None:
            self.holder.load_initial()  # raises ProfileErrors: refuse to start on bad profiles
        else:
            self._report_version(self.holder.current)  # loaded by the caller, before us
        identity = Identity(
            agent=pod.agent, service_account=pod.service_account, namespace=pod.namespace
        )
        if run.tracing.otlp_endpoint:
            # Imported only when on. The lean tracer is the default: ~6 us CPU per span against
            # the SDK's ~85 us (bench/span_cost.py); the SDK stays selectable and is the
            # reference the lean encoding is tested against (tests/unit/test_tracing.py).
            if run.tracing.tracer == "sdk":
                from sidecar.telemetry.tracing_sdk import SdkTracing

                self._tracing = SdkTracing(  # type: ignore[assignment]
                    run.tracing.otlp_endpoint, pod=pod.pod_name, namespace=pod.namespace
                )
            else:
                from sidecar.telemetry.tracing import Tracing

                self._tracing = Tracing(
                    run.tracing.otlp_endpoint, pod=pod.pod_name, namespace=pod.namespace
                )
        audit = None
        run_dir = os.environ.get(RUN_DIR_ENV)  # `mandate run`'s: the stdout writers' lock
        self._audit_writer = open_trail(
            directory=run.audit.directory,
            stdout=run.audit.stdout,
            chain_id=cfg.chain_id,
            writer=f"w{cfg.index}",
            pod=pod.pod_name,
            fsync=run.audit.fsync,
            on_failure=run.audit.on_failure,
            reserve_bytes=run.audit.reserve_bytes,
            shared_directory=Path(run_dir) if run_dir else None,
            state_directory=run.state.directory,
        )
        if self._audit_writer is not None:
            audit = Audit(self._audit_writer, pod.pod_name, pod.namespace, run.audit.records_allows)
            threading.Thread(target=self._meter_audit, name="audit-metrics", daemon=True).start()
        else:
            metrics.observe_audit_state("off")
        creds = run.credentials
        # The HTTP transport runs Checks on its event loop: a Check there must never wait
        # for a token endpoint (OAuth tokens are fetched when the profiles load).
        # So does grpc.aio (--grpc-server aio).
        on_loop = run.check.transport == "http" or run.check.grpc_server == "aio"
        wait = 0.0 if on_loop else creds.wait
        self._broker = CredentialBroker(
            namespace=pod.namespace, pod=pod.pod_name, txn_keys=creds.txn_token_keys,
            issuer=creds.txn_token_issuer, wait=wait,
        )  # fmt: skip
        self._broker.prepare(self.holder.get())
        # Behaviour analysis fingerprints sensitive arguments with the audit trail's key
        # (the directory the trail takes it from): a fingerprint is the trail's hash.
        key_dir = run.audit.directory or run.state.directory or (Path(run_dir) if run_dir else None)
        pipeline = CheckPipeline(
            self.holder.get, identity, revocations=revocations, tracing=self._tracing,
            audit=audit, agent_state=agent_state, limiter=limiter, broker=self._broker,
            facts_key=_facts_key(key_dir), behaviour=self._behaviour,
        )  # fmt: skip
        if run.check.transport == "http":
            self._start_http(pipeline)
        else:
            self._start_grpc(pipeline)
        if admin is not None:
            from sidecar.run.admin import AdminServer  # aiohttp: only where an admin server runs

            self._admin = AdminServer(admin[0], admin[1], self._ready, self._admin_token)
            try:
                self.admin_port = self._admin.start()
            except OSError as exc:
                self.stop()
                raise ConfigError(f"--admin {run.admin.listen!r}: cannot bind ({exc})") from None
        if self._owns_holder:
            self.holder.start(run.profiles.poll_seconds)
        port = self.http_port if self._http else self.grpc_port
        ports = {run.check.transport: port, "admin": self.admin_port, "pid": os.getpid()}
        log.info("mandate serving: %s", json.dumps(ports))
        if run.port_file is not None:
            tmp = run.port_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ports))
            tmp.replace(run.port_file)

    def _start_grpc(self, pipeline: CheckPipeline) -> None:
        # grpc and the Envoy protobufs only where a gRPC server runs (issue 20: ~23 MB).
        import grpc
        from envoy.service.auth.v3 import external_auth_pb2_grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from sidecar.check.grpc_transport import AuthorizationServicer

        check = self.config.run.check
        self._health = health.HealthServicer()
        try:
            if check.grpc_server == "aio":
                from sidecar.check.grpc_aio import start_aio

                self._aio = start_aio(pipeline, check.listen)  # None: this grpcio cannot
                if self._aio is not None:
                    self.grpc_port = self._aio.port
                    _open_socket(check.listen)
                    return
            server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=check.threads, thread_name_prefix="check"),
                options=[("grpc.so_reuseport", 0)],
            )
            external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
                AuthorizationServicer(pipeline), server
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
            self.grpc_port = server.add_insecure_port(check.listen)
        except RuntimeError as exc:
            raise ConfigError(f"--listen {check.listen!r}: cannot bind ({exc})") from None
        server.start()
        self._server = server
        _open_socket(check.listen)
        self._health.set(AUTHZ_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)

    def _start_http(self, pipeline: CheckPipeline) -> None:
        listen = self.config.run.check.listen
        unix = listen.startswith("unix:")
        host, port = ("", 0) if unix else split_hostport(listen, "--listen")
        server: type[HttpAuthzServer | HttpLeanServer]
        if self.config.run.check.http_server == "lean":
            from sidecar.check.http_lean import HttpLeanServer as server  # httptools, uvloop
        else:
            from sidecar.check.http_transport import HttpAuthzServer as server  # aiohttp

        self._http = server(pipeline, host, port, listen[5:] if unix else "")
        try:
            self.http_port = self._http.start()
        except OSError as exc:
            raise ConfigError(f"--listen {listen!r}: cannot bind ({exc})") from None
        _open_socket(listen)

    def _meter_audit(self) -> None:
        meter = metrics.AuditMeter()
        writer = self._audit_writer
        while writer is not None and not self._stopped.wait(1.0):
            st = writer.stats()
            meter.update(st.written, st.failed, st.dropped, st.backlog, st.healthy)
            metrics.observe_audit_state(writer.health()["state"])

    def stop(self, grace: float = 1.0) -> None:
        self._stopped.set()
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._owns_holder:
            self.holder.stop()
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
        if self._aio is not None:
            self._aio.stop(grace)
        if self._http is not None:
            self._http.stop(grace)
        if self._admin is not None:
            self._admin.stop()
        if self._tracing is not None:
            self._tracing.shutdown()
        if self._broker is not None:
            self._broker.close()
        if self._audit_writer is not None:
            self._audit_writer.close()


def _facts_key(directory: Path | None) -> ArgumentKey | None:
    """The argument key of ``directory`` for behaviour analysis' fingerprints; None (the
    calls are described without them) without a directory or when it cannot be read."""
    if directory is None:
        return None
    try:
        return load_argument_key(directory)
    except AuditInputError as exc:
        log.warning("behaviour analysis: sensitive arguments not fingerprinted: %s", exc)
        return None


def _open_socket(listen: str) -> None:
    """A Check server on a unix socket lets Envoy (another user) connect: who may is decided
    by who mounts the socket's directory (in a pod, the `mandate-run` volume of Envoy's and
    mandate's containers alone, never the agent's), so the agent cannot ask for a Check's
    answer, which carries an allowed call's credentials."""
    if listen.startswith("unix:"):
        os.chmod(listen.removeprefix("unix:").removeprefix("//"), 0o666)


def serve(config: WorkerSettings) -> None:
    """Run until SIGTERM or SIGINT (or, for a worker of `mandate run`, its supervisor's end)."""
    sidecar = Sidecar(config)
    stop = threading.Event()
    signalled = _on_stop_signals()
    _stop_with_supervisor(stop)
    try:
        sidecar.start()
        tune_gc()
        while not stop.wait(STOP_POLL) and not signalled():
            pass
        log.info("mandate stopping")
        sidecar.stop()
    finally:
        _release_run_dir()


# How often the main thread looks at the stop signals (the stop latency on SIGTERM).
STOP_POLL = 0.2


def _on_stop_signals() -> Callable[[], bool]:
    """SIGTERM and SIGINT only set a flag; the main thread looks at it. A handler runs in
    the main thread between two bytecodes, even inside `Event.set`/`Event.wait` holding the
    Event's (non-reentrant) lock: a handler calling `stop.set()` then deadlocked the worker
    for good when a second SIGTERM came during the first one's `set` (seen: a worker whose
    supervisor was killed got PDEATHSIG and a stop, and hung, orphaned, still serving Checks
    from a table nothing updated)."""
    state = {"signalled": False}

    def handler(signum: int, frame: object) -> None:
        state["signalled"] = True  # nothing else: no lock may be taken here

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return lambda: state["signalled"]


# Young objects per generation-0 collection (CPython's default: 700). See `tune_gc`.
GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """After start-up: move everything alive now (modules, protobuf descriptors, the
    profile snapshot, gRPC's objects) out of the collector's reach (`gc.freeze`), and
    collect the young generation every 10,000 allocations instead of 700.

    Why: with the audit trail on, each Check's record lives on until the writer thread
    takes it (up to its 100 ms linger), long enough to survive young collections; the older
    generations then fill and are scanned far more often, each scan walking every object
    start-up made. Measured (gRPC, 1 worker, 2 CPUs, interleaved rounds, wrk -c16 through
    Envoy): audit on cost 2,598 vs 3,106 req/s and +64 µs of CPU per Check; with this,
    2,912 vs 3,222 req/s and +37 µs. Cyclic garbage is still collected (the thresholds of
    the older generations are CPython's); objects made before the freeze that later become
    cyclic garbage are not (the first snapshot after a reload: bounded, once)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _release_run_dir() -> None:
    """A worker of `mandate run` lets go of the run directory's lock; the last process of
    the run to go (here: after a SIGKILLed supervisor, the last worker) removes it."""
    path, fd = os.environ.get(RUN_DIR_ENV, ""), os.environ.get(RUN_LOCK_FD_ENV, "")
    if path and fd.isdigit() and RunDir.release(path, int(fd)):
        log.info(
            "removed the run directory %s: the supervisor and the other workers are gone", path
        )


def _stop_with_supervisor(stop: threading.Event, poll: float = 0.1) -> None:
    """A worker of `mandate run` (SUPERVISOR_PID_ENV set) stops when its supervisor is gone.

    Issue 8 fault test (tests/e2e/test_faults.py): a SIGKILLed supervisor used to leave its
    workers serving forever as orphans, from a table nothing writes any more, so a revocation
    applied after the crash (kubectl, admin API, behaviour analysis: all go through the
    supervisor) was never enforced. Stopping instead makes Envoy fail closed (503), as for
    any mandate outage. On Linux the kernel sends SIGTERM the moment the parent dies
    (PR_SET_PDEATHSIG; the supervisor forks workers from its main thread, which lives as
    long as it does); polling the parent pid covers other systems and a supervisor that
    died before prctl ran."""
    raw = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not raw.isdigit():
        return  # started by hand: nobody to follow
    supervisor = int(raw)
    if sys.platform.startswith("linux"):
        # No prctl (an odd libc): the poll below still notices.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    def follow() -> None:
        while os.getppid() == supervisor:
            if stop.wait(poll):
                return
        log.error("supervisor (pid %d) is gone: stopping; Envoy now fails closed", supervisor)
        stop.set()

    threading.Thread(target=follow, name="follow-supervisor", daemon=True).start()
