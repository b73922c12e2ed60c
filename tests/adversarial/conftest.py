"""The adversarial catalogue's stack: real Envoy and `mandate run` on 127.0.0.1 ports picked
at start, once per transport (grpc, http), with this directory's own profiles
(tests/adversarial/profiles: payroll-bot, mcp-runner, tunnel-bot), the agent context API of
two agents on unix sockets, an audit directory, and an upstream that records every header it received.

The stack is tests/e2e/conftest.py's `start_stack`; only the agent list, the profiles and
the header-recording upstream differ.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from devstack.demo.upstream import RECEIVED

from ..e2e.conftest import TRANSPORTS, Stack, Upstream, start_stack

PROFILES = Path(__file__).parent / "profiles"
AGENTS = ("payroll-bot", "mcp-runner", "tunnel-bot")
# The agents whose context API the stack serves (a unix socket each).
CONTEXT_AGENTS = ("payroll-bot", "mcp-runner")


@web.middleware
async def _record_every_header(request: web.Request, handler: Any) -> web.StreamResponse:
    """Add the raw header list (names as sent, repeats kept) to the upstream's record of this
    request. The demo upstream appends its record and returns without awaiting anything
    else, so the last record is this request's when the handler returns."""
    response: web.StreamResponse = await handler(request)
    received = request.app[RECEIVED]
    if received:
        received[-1]["raw_headers"] = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers
        ]
    return response


class RecordingUpstream(Upstream):
    """The demo upstream (tests/e2e) that also keeps every header name as it arrived, so
    that a spoofed `x_mandate_agent` or a second `X-Mandate-Agent` shows."""

    def _run(self) -> None:
        self.app.middlewares.append(_record_every_header)
        super()._run()


class AdversarialStack(Stack):
    """A Stack with the context API sockets of CONTEXT_AGENTS, an audit directory
    (`tmp/audit`), and the (case id, decision id) of every deny the catalogue saw."""

    context: dict[str, str]
    denials: list[tuple[str, str]]


def start_adversarial_stack(tmp: Path, transport: str) -> AdversarialStack:
    profiles = tmp / "profiles"
    shutil.copytree(PROFILES, profiles)
    sockets = tmp / "ctx"
    sockets.mkdir()
    context = {agent: f"unix:{sockets / agent}.sock" for agent in CONTEXT_AGENTS}
    extra = [
        arg for agent, target in context.items() for arg in ("--context-api", f"{agent}={target}")
    ]
    extra += ["--audit-dir", str(tmp / "audit")]
    base = start_stack(
        tmp, profiles, extra=extra, transport=transport, agents=AGENTS,
        upstream=RecordingUpstream(),
    )  # fmt: skip
    stack = AdversarialStack(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    stack.context = context
    stack.denials = []
    return stack


@pytest.fixture(scope="module", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def adversarial(
    tmp_path_factory: pytest.TempPathFactory, transport: str
) -> Iterator[AdversarialStack]:
    """One stack per transport for the whole catalogue (cases that change state, such as the
    context API flood, use agents and paths no other case depends on)."""
    stack = start_adversarial_stack(tmp_path_factory.mktemp(f"adv-{transport}"), transport)
    yield stack
    stack.envoy.stop()
    stack.mandate.stop()
    stack.upstream.stop()
