"""The supervisor's service list (sidecar.run.services): started in order, stopped in
reverse; a failed start stops that service and leaves the earlier ones to stop(); a failing
stop does not keep the others running; background tasks are cancelled and awaited."""

from __future__ import annotations

import asyncio
import logging

import pytest

from sidecar.run.services import Hooks, Services, Tasks


def recorder(
    log: list[str], name: str, *, fail_start: bool = False, fail_stop: bool = False
) -> Hooks:
    async def start() -> None:
        log.append(f"start {name}")
        if fail_start:
            raise RuntimeError(f"{name} cannot start")

    async def stop() -> None:
        log.append(f"stop {name}")
        if fail_stop:
            raise RuntimeError(f"{name} cannot stop")

    return Hooks(name, start, stop)


async def test_started_in_order_and_stopped_in_reverse() -> None:
    log: list[str] = []
    services = Services()
    for name in ("a", "b", "c"):
        await services.start(recorder(log, name))
    assert services.started == ["a", "b", "c"]
    await services.stop()
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]
    assert services.started == []
    await services.stop()  # stopping twice stops nothing twice
    assert len(log) == 6


async def test_a_failed_start_stops_that_service_and_leaves_the_others_to_stop() -> None:
    log: list[str] = []
    services = Services()
    await services.start(recorder(log, "a"))
    with pytest.raises(RuntimeError, match="b cannot start"):
        await services.start(recorder(log, "b", fail_start=True))
    assert services.started == ["a"]
    assert log == ["start a", "start b", "stop b"]  # b may have started part of itself
    await services.stop()
    assert log[-1] == "stop a"


async def test_a_failing_stop_is_logged_and_the_others_still_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    services = Services()
    for service in (recorder(log, "a"), recorder(log, "b", fail_stop=True), recorder(log, "c")):
        await services.start(service)
    with caplog.at_level(logging.ERROR, logger="sidecar.run.services"):
        await services.stop()
    assert log[3:] == ["stop c", "stop b", "stop a"]
    assert "stopping b failed" in caplog.text and "b cannot stop" in caplog.text


async def test_tasks_are_cancelled_and_awaited_on_stop() -> None:
    ticks = [0, 0]
    ended: list[int] = []

    async def loop(i: int) -> None:
        try:
            while True:
                ticks[i] += 1
                await asyncio.sleep(0.01)
        finally:
            ended.append(i)

    services = Services()
    await services.start(Tasks("loops", lambda: [loop(0), loop(1)]))
    async with asyncio.timeout(10):
        while min(ticks) < 3:
            await asyncio.sleep(0.01)
    await services.stop()
    assert sorted(ended) == [0, 1]  # both ended before stop() returned
