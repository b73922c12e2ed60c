"""W3C Trace Context: the parent a decision span hangs under, from `traceparent` and
`tracestate` (https://www.w3.org/TR/trace-context/).

Pure functions of strings; they accept and reject exactly what OpenTelemetry's
`TraceContextTextMapPropagator` (opentelemetry-api 1.45) does, so that the lean tracer in
`tracing.py` picks the same parent as the SDK did: lower-case hex only, version `ff`,
all-zero ids and anything malformed mean "no parent"; version `00` has exactly four
fields; a later version may carry more (forward compatibility, as the specification
asks). A tracestate that breaks its grammar, repeats a key or has more than 32 members is
dropped whole. No I/O, no OpenTelemetry imports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Parent", "normalize_tracestate", "parent_of", "parse_traceparent"]

# The propagator's own expression, including the optional blanks around the value.
_TRACEPARENT = re.compile(
    r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:(-.*)|[ \t]*)$"
)
_MAX_TRACEPARENT = 512
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_KEY = (
    r"[a-z][_0-9a-z\-\*\/]{0,255}|"
    r"[a-z0-9][_0-9a-z\-\*\/]{0,240}@[a-z][_0-9a-z\-\*\/]{0,13}"
)
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(f"({_KEY})=({_VALUE})")
_MAX_TRACESTATE = 8192
_MAX_MEMBERS = 32


class Parent(NamedTuple):  # a tuple: built on every Check, it should cost little
    """A remote parent span: ids as bytes (what OTLP carries), the sampled flag, and the
    normalised tracestate ('' if none)."""

    trace_id: bytes
    span_id: bytes
    sampled: bool
    tracestate: str = ""


def parse_traceparent(value: str) -> tuple[bytes, bytes, bool] | None:
    """(trace id, parent span id, sampled) of a `traceparent` value, or None if it does not
    name a parent."""
    if len(value) > _MAX_TRACEPARENT:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or version == "ff":
        return None
    if version == "00" and rest:
        return None
    return bytes.fromhex(trace_id), bytes.fromhex(span_id), bool(int(flags, 16) & 1)


def normalize_tracestate(value: str) -> str:
    """The tracestate a child span carries: the members of ``value`` without optional
    blanks and empty members, comma-joined in order; '' if ``value`` is not valid."""
    if len(value) > _MAX_TRACESTATE:
        return ""
    members: dict[str, str] = {}
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        m = _MEMBER.fullmatch(member)
        if m is None or m.group(1) in members:
            return ""
        members[m.group(1)] = m.group(2)
    if len(members) > _MAX_MEMBERS:
        return ""
    return ",".join(f"{k}={v}" for k, v in members.items())


def parent_of(carrier: Mapping[str, str]) -> Parent | None:
    """The parent named by ``carrier``'s `traceparent` (with its `tracestate`), or None."""
    header = carrier.get("traceparent")
    if not header:
        return None
    parsed = parse_traceparent(header)
    if parsed is None:
        return None
    state = carrier.get("tracestate")
    return Parent(*parsed, normalize_tracestate(state) if state else "")
