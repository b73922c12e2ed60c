"""The supervisor's grpc.aio servers (access log service) for synchronous tests: started on
an event loop in a thread of its own (sidecar.loopthread), stopped on leaving the block."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sidecar.loopthread import LoopThread

__all__ = ["on_loop_thread"]

T = TypeVar("T")


@contextmanager
def on_loop_thread(
    name: str, start: Callable[[], Awaitable[T]], stop: Callable[[T], Awaitable[object]]
) -> Iterator[T]:
    """``await start()`` on a new loop thread (its error re-raised here); yield its result;
    at the end ``await stop(result)`` there and end the thread."""
    thread = LoopThread(name)
    started: list[T] = []

    async def setup() -> None:
        started.append(await start())

    thread.start(setup)
    assert started, f"{name} did not start in time"

    async def cleanup() -> None:
        await stop(started[0])

    try:
        yield started[0]
    finally:
        thread.stop(cleanup)
