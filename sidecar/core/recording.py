"""What a decision hands the audit trail of a call's arguments (pure): the profile's choice
(`spec.audit`), compiled, and references to the call's query, body and the body parse the
rules already made.

`decide` attaches a :class:`CallArguments` to a Decision only when the agent's profile
records arguments and the call has a body or a query; it copies nothing and parses
nothing. The audit wing (`sidecar.audit.arguments`) reads it on its writer thread, off the
Check path, and only for a decision it records: the body is parsed there, unless the rules
parsed it already (``mcp``). This module must not import any transport, Kubernetes or
telemetry library, and must not read the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from sidecar.core.mcp import McpBody
from sidecar.core.model import AuditSpec

if TYPE_CHECKING:
    from sidecar.core.decide import RequestView

__all__ = ["DEFAULT_RECORDING", "ArgumentRecording", "CallArguments", "call_arguments"]


@dataclass(frozen=True, slots=True)
class ArgumentRecording:
    """A profile's `spec.audit`: ``mode`` "hashes", "types" or "none"; ``values``: the
    argument names recorded in clear."""

    mode: str = "hashes"
    values: frozenset[str] = frozenset()

    @classmethod
    def compile(cls, spec: AuditSpec | None) -> ArgumentRecording:
        if spec is None:
            return DEFAULT_RECORDING
        return cls(spec.arguments, frozenset(spec.values))


DEFAULT_RECORDING = ArgumentRecording()


class CallArguments(NamedTuple):
    """One call's material for the audit trail, by reference: the request target (path and
    query as sent), the body and whether Envoy cut it, and the rules' parse of the body as
    MCP if they made one (None: not parsed). A NamedTuple, not a frozen dataclass: it is
    made on the Check path for every call with a body or query, and is built three times
    faster (0.2 µs)."""

    recording: ArgumentRecording
    target: str
    body: bytes | None
    truncated: bool
    mcp: McpBody | None = None
    # the body was let go before the trail read it (the audit queue held too many bodies)
    withheld: bool = False


def call_arguments(
    recording: ArgumentRecording, view: RequestView, mcp: McpBody | None = None
) -> CallArguments | None:
    """What the trail may record of ``view``'s arguments, or None when there is nothing to
    record (the profile records none, or the call has neither body nor query).

    ``mcp`` (the rules' parse) is not kept by the Check path (`decide` passes None): a
    parse holds many times the body's bytes, and the audit queue bounds what it holds by
    the bodies' size; the writer parses again, off the Check path."""
    if recording.mode == "none" or (not view.body and "?" not in view.path):
        return None
    return CallArguments(recording, view.path, view.body or None, view.body_truncated, mcp)
