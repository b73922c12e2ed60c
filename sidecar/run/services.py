"""The supervisor's services: each thing it runs (workers, admin API, agent API, access-log
service, watchers, background tasks) is a :class:`Service` with a name, ``start`` and
``stop``, all on the supervisor's one event loop. :class:`Services` starts them in order and
stops the started ones in reverse, so that what depends on another stops before it.

- A service whose ``start`` fails is stopped at once (it may have started part of itself;
  its ``stop`` must cope with that) and the error goes on to the caller; the services
  started before it stay up until :meth:`Services.stop`.
- ``stop`` is best effort: a service that fails to stop is logged and the others are still
  stopped (the process is going away).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Hooks", "Service", "Services", "Tasks"]

log = logging.getLogger(__name__)


class Service(Protocol):
    """Something the supervisor runs. ``start`` returns once it is serving; ``stop``
    returns once it has stopped, and copes with a partial or failed start."""

    @property
    def name(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Hooks:
    """A service made of two callables (often methods of the supervisor)."""

    name: str
    on_start: Callable[[], Awaitable[None]]
    on_stop: Callable[[], Awaitable[None]]

    async def start(self) -> None:
        await self.on_start()

    async def stop(self) -> None:
        await self.on_stop()


@dataclass(slots=True)
class Tasks:
    """Background coroutines (loops) run as tasks: ``make()`` gives the coroutines at start;
    stop cancels them and waits for them to end."""

    name: str
    make: Callable[[], list[Coroutine[Any, Any, None]]]
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(c) for c in self.make()]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for t, result in zip(tasks, results, strict=True):
            if isinstance(result, Exception):
                log.error("%s: task %s had failed: %r", self.name, t.get_name(), result)


class Services:
    """Start services in order; stop the started ones in reverse order."""

    def __init__(self) -> None:
        self._started: list[Service] = []

    @property
    def started(self) -> list[str]:
        """The names of the services running now, in the order they were started."""
        return [s.name for s in self._started]

    async def start(self, service: Service) -> None:
        log.debug("starting %s", service.name)
        try:
            await service.start()
        except BaseException:
            await self._stop_one(service)
            raise
        self._started.append(service)

    async def stop(self) -> None:
        while self._started:
            await self._stop_one(self._started.pop())

    async def _stop_one(self, service: Service) -> None:
        log.debug("stopping %s", service.name)
        try:
            await service.stop()
        except Exception:
            log.exception("stopping %s failed", service.name)
