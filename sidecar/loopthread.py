"""One asyncio event loop in a daemon thread of its own, for the servers that run beside
the synchronous gRPC server in a worker (the admin probes, the HTTP Check transport).

`loop_factory` makes the loop (asyncio's; the lean HTTP transport's is uvloop's).
`start(setup)` runs the coroutine `setup()` in the loop and returns when it has finished,
re-raising its error (e.g. a port that cannot be bound); `stop(cleanup)` runs `cleanup()`
in the loop, stops it, joins the thread and closes the loop (releasing its selector).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["LoopThread"]

log = logging.getLogger(__name__)


class LoopThread:
    def __init__(
        self,
        name: str,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.name = name
        self.loop = loop_factory()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _run(self, setup: Callable[[], Coroutine[Any, Any, None]]) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(setup())
        except BaseException as exc:
            self._error = exc
            self.loop.close()
            self._started.set()
            return
        self.loop.call_soon(self._started.set)  # so that stop() finds the loop running
        self.loop.run_forever()
        self.loop.close()  # after stop(): release the selector and its file descriptors

    @property
    def alive(self) -> bool:
        """Whether the loop is running in its thread (False before start and after stop, or
        when something stopped it unasked)."""
        return self._thread is not None and self._thread.is_alive() and self.loop.is_running()

    def start(self, setup: Callable[[], Coroutine[Any, Any, None]], timeout: float = 10.0) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(setup,), name=self.name, daemon=True
        )
        self._thread.start()
        self._started.wait(timeout)
        if self._error is not None:
            raise self._error

    def stop(self, cleanup: Callable[[], Coroutine[Any, Any, None]], timeout: float = 5.0) -> None:
        if self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(cleanup(), self.loop)
            try:
                fut.result(timeout=timeout)
            except Exception:  # stopping is best effort: the process is going away
                log.exception("stopping %s", self.name)
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
