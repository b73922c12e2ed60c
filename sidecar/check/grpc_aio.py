"""The gRPC Check server as a grpc.aio server on an event loop of its own (`--grpc-server
aio`, opt-in; the default is grpcio's thread-pool server). Kept as a measured alternative
and for re-measuring on newer grpcio (`python -m bench grpc_shapes`): on grpcio 1.85 it
costs more CPU per Check than the thread-pool server, unloaded and under load
(bench/results/grpc_shapes.md).

The handler runs on the loop thread that awaits the call, but the call still crosses
threads: grpcio's C core reads and writes the socket on its `event_engine` thread, and
grpc.aio drains its completion queue on one poller thread per process, which wakes the
loops through a socketpair that every loop using grpc.aio in the process watches. The
loop is never the supervisor's (in the one-process default the supervisor's loop runs the
admin API and the watchers; a Check must not wait behind them), yet when the supervisor
also serves grpc.aio (the access log, the context API), its loop can be the one that drains
a Check's event and hands it on (`call_soon_threadsafe`).

A Check on the loop must never block: the credential broker is built with no wait for a
token in flight (as for the HTTP transport). The handler is the sync one
(`grpc_transport.AuthorizationServicer`): the pipeline is synchronous. On a grpcio that
cannot run this shape, `start_aio` says so and the worker serves with the thread-pool
server. Must not contain decision logic.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.check.grpc_transport import AuthorizationServicer
from sidecar.check.pipeline import CheckPipeline
from sidecar.loopthread import LoopThread

__all__ = ["GrpcAioServer", "aio_unavailable"]

log = logging.getLogger(__name__)
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
_SERVING = health_pb2.HealthCheckResponse.SERVING
LOOP_THREAD = "check-aio"  # the loop thread's name


def aio_unavailable() -> str | None:
    """Why this grpcio cannot run the aio shape (None: it can): grpc.aio or grpc_health's
    aio servicer missing. The caller then serves with the thread-pool server."""
    try:
        import grpc.aio  # grpcio >= 1.32
        from grpc_health.v1.health import aio  # noqa: F401  (grpcio-health-checking >= 1.46)
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    if not hasattr(grpc.aio, "server"):
        return "grpc.aio has no server()"
    return None


class _AioAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Check as a coroutine: the sync handler, called on the loop (it never awaits)."""

    def __init__(self, pipeline: CheckPipeline) -> None:
        self._sync = AuthorizationServicer(pipeline)

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        return self._sync.Check(request, context)


class GrpcAioServer:
    """Check and gRPC health on ``listen`` (HOST:PORT or unix:PATH), served by grpc.aio on a
    loop in a daemon thread of its own. start() returns the bound port (RuntimeError if it
    cannot bind, as grpc.server's add_insecure_port); stop() drains for ``grace`` s."""

    def __init__(self, pipeline: CheckPipeline, listen: str) -> None:
        self._pipeline, self._listen = pipeline, listen
        self._thread = LoopThread(LOOP_THREAD)
        self._server: Any = None  # grpc.aio.Server, made on the loop
        self._health: Any = None  # grpc_health.v1.health.aio.HealthServicer
        self.port = 0

    async def _start(self) -> None:
        import grpc.aio
        from grpc_health.v1.health import aio as health_aio

        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._health = health_aio.HealthServicer()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            _AioAuthorization(self._pipeline), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.port = server.add_insecure_port(self._listen)  # RuntimeError: cannot bind
        await server.start()
        self._server = server
        await self._health.set(AUTHZ_SERVICE, _SERVING)
        await self._health.set("", _SERVING)

    def start(self) -> int:
        self._thread.start(self._start)
        return self.port

    @property
    def alive(self) -> bool:
        """Whether the server's loop runs (its thread has not ended)."""
        return self._thread.alive

    def stop(self, grace: float = 1.0) -> None:
        async def _shutdown() -> None:
            if self._health is not None:
                await self._health.enter_graceful_shutdown()
            if self._server is not None:
                await self._server.stop(grace)

        self._thread.stop(_shutdown, timeout=grace + 2)


def start_aio(pipeline: CheckPipeline, listen: str) -> GrpcAioServer | None:
    """The aio server started on ``listen``; None, with a warning, when this grpcio cannot
    run it (the caller serves with the thread-pool server instead). Raises RuntimeError
    when ``listen`` cannot be bound: that is the address's fault, not the shape's."""
    why = aio_unavailable()
    if why is None:
        server = GrpcAioServer(pipeline, listen)
        try:
            server.start()
            log.info("serving Checks with grpc.aio on the loop thread %s", LOOP_THREAD)
            return server
        except RuntimeError as exc:
            if "bind" in str(exc).lower():
                raise
            why = f"{type(exc).__name__}: {exc}"
            server.stop(0)
        except (AttributeError, TypeError, ImportError, grpc.RpcError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            server.stop(0)
    log.warning(
        "--grpc-server aio cannot run on grpcio %s (%s): serving Checks with the thread-pool "
        "server instead",
        getattr(grpc, "__version__", "?"),
        why,
    )
    return None
