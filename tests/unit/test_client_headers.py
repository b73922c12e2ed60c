"""The client's context headers: `context_headers` builds them, `use_context` puts them on a
session's default headers (aiohttp's CIMultiDict, or any mutable `.headers` such as httpx's)
so that the session's context is exactly what was asked, and refuses what cannot be a
purpose or task id."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.agentapi.client import PURPOSE_HEADER, TASK_HEADER, context_headers, use_context
from sidecar.core.decide import PURPOSE_HEADER as CORE_PURPOSE
from sidecar.core.decide import TASK_HEADER as CORE_TASK


class Session:
    """Anything with a mutable `.headers` (httpx.Client has a case-insensitive one)."""

    def __init__(self, headers: Any) -> None:
        self.headers = headers


def test_header_names_are_the_ones_decide_reads() -> None:
    assert (PURPOSE_HEADER, TASK_HEADER) == (CORE_PURPOSE, CORE_TASK)


@pytest.mark.parametrize(
    ("purpose", "task", "expected"),
    [
        (None, None, {}),
        ("", "", {}),
        ("reconcile", None, {"x-mandate-purpose": "reconcile"}),
        (None, "INC-1234", {"x-mandate-task": "INC-1234"}),
        ("reconcile", "INC-1234", {"x-mandate-purpose": "reconcile", "x-mandate-task": "INC-1234"}),
        (None, "t" * 128, {"x-mandate-task": "t" * 128}),
    ],
)
def test_context_headers(purpose: str | None, task: str | None, expected: dict[str, str]) -> None:
    assert context_headers(purpose, task) == expected


@pytest.mark.parametrize(
    ("purpose", "task", "message"),
    [
        ("has space", None, "purpose"),
        ("p\n", None, "purpose"),
        ("p" * 254, None, "purpose"),
        ("é", None, "purpose"),
        (None, "t" * 129, "task"),
        (None, "a b", "task"),
        (None, "x\r\nInjected: 1", "task"),
    ],
)
def test_context_headers_refuse_what_cannot_be_sent(
    purpose: str | None, task: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        context_headers(purpose, task)


async def test_use_context_on_an_aiohttp_session() -> None:
    async with aiohttp.ClientSession(headers={"User-Agent": "agent/1"}) as session:
        assert use_context(session, purpose="reconcile") == {"x-mandate-purpose": "reconcile"}
        assert session.headers["X-Mandate-Purpose"] == "reconcile"
        # Switching to a task drops the stale purpose: the task's purpose applies.
        use_context(session, task="INC-1")
        assert "x-mandate-purpose" not in session.headers
        assert session.headers.getall("x-mandate-task") == ["INC-1"]
        use_context(session)
        assert dict(session.headers) == {"User-Agent": "agent/1"}


def test_use_context_replaces_every_value_of_a_multidict() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("X-Mandate-Task", "a")
    headers.add("x-mandate-task", "b")
    use_context(Session(headers), task="c")
    assert headers.getall("x-mandate-task") == ["c"]


def test_use_context_on_a_plain_mutable_mapping() -> None:
    session = Session({"accept": "*/*", "x-mandate-task": "old"})
    use_context(session, purpose="research")
    assert session.headers == {"accept": "*/*", "x-mandate-purpose": "research"}


def test_use_context_refuses_immutable_headers_and_says_what_to_do() -> None:
    with pytest.raises(TypeError, match=r"context_headers\(purpose, task\)"):
        use_context(Session(MappingProxyType({})), purpose="research")


def test_use_context_validates_before_touching_the_session() -> None:
    session = Session({"x-mandate-purpose": "keep"})
    with pytest.raises(ValueError):
        use_context(session, task="bad task")
    assert session.headers == {"x-mandate-purpose": "keep"}
