"""The supervisor's housekeeping loop survives a failing pass: before, one exception ended
the task silently, and from then on nothing ended expired revocations, retried a failed
state write or pruned the context table."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from sidecar.run.supervisor import Supervisor


class _Store:
    def __init__(self) -> None:
        self.passes = 0

    def prune_expired(self) -> None:
        self.passes += 1
        if self.passes == 1:
            raise RuntimeError("boom")

    def flush(self) -> None:
        pass


async def test_a_failing_pass_is_logged_and_housekeeping_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup: Any = Supervisor.__new__(Supervisor)
    store = _Store()
    sup.store, sup.agent_state, sup._watcher, sup._stopping = store, None, None, False
    sup._audit_health = lambda: {"state": "off"}
    with caplog.at_level(logging.ERROR, logger="sidecar.run.supervisor"):
        task = asyncio.create_task(sup._prune())
        async with asyncio.timeout(10):
            while store.passes < 3:
                await asyncio.sleep(0.05)
        sup._stopping = True
        await task
    assert store.passes >= 3
    assert any("housekeeping failed" in r.getMessage() for r in caplog.records)
