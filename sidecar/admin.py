"""The admin HTTP server (aiohttp): liveness, readiness and Prometheus metrics.

Runs its own event loop in a daemon thread beside the gRPC server. Read-only for now;
state-changing endpoints (revocations) come with their own authentication. Binds to
127.0.0.1 by default. Must not contain decision logic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import REGISTRY

__all__ = ["AdminServer"]


class AdminServer:
    """``ready`` returns (is ready, details) for /readyz."""

    def __init__(
        self, host: str, port: int, ready: Callable[[], tuple[bool, dict[str, Any]]]
    ) -> None:
        self._host, self._port = host, port
        self._ready = ready
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, details = self._ready()
        return web.json_response({"ready": ok, **details}, status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._loop.close()
            self._started.set()
            return
        self._loop.call_soon(self._started.set)  # so that stop() finds the loop running
        self._loop.run_forever()
        self._loop.close()  # after stop(): release the selector and its file descriptors

    def start(self) -> int:
        """Start serving; return the bound port. Raises if the port cannot be bound."""
        self._thread = threading.Thread(target=self._run, name="admin", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self) -> None:
        async def _cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        if self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(_cleanup(), self._loop)
            fut.result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
