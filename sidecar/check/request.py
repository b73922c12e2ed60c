"""The request half of a Check (both transports): what Envoy sent, as the pure
:class:`~sidecar.core.RequestView` the decision reads.

A transport decodes its wire format (a gRPC CheckRequest, an HTTP check request) and calls
:func:`make_view`; `mandate explain` and the agent API's Explain describe a call by URL
(:func:`view_from_url`). A view that cannot be built raises BadRequestError (the typed bad
request the pipeline turns into a `bad_request` deny). No protobuf, no aiohttp, no decision
logic.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from sidecar.core import RequestView
from sidecar.errors import BadRequestError

__all__ = [
    "TRACE_KEYS",
    "Identity",
    "body_truncated",
    "make_view",
    "new_decision_id",
    "request_parents",
    "trace_id_of",
    "view_from_url",
]

# Decision ids need uniqueness, not secrecy; `random` is re-seeded in forked children.
_random_bits = random.getrandbits

_PARTIAL_BODY = "x-envoy-auth-partial-body"
TRACE_KEYS = ("traceparent", "tracestate")
# version-traceid-parentid-flags[-more]; a character class, not int(x, 16), which also
# takes a sign, "_" and whitespace.
_TRACEPARENT = re.compile(
    r"[0-9a-fA-F]{2}-([0-9a-fA-F]{32})-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}(?:-|\Z)"
)
_NO_TRACE = "0" * 32


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the sidecar serves, from its own configuration (the pod), not from requests."""

    agent: str | None = None
    service_account: str | None = None
    namespace: str = ""


def new_decision_id() -> str:
    """A 32-hex-digit, time-ordered id: 48 bits of Unix milliseconds, then 80 random bits.

    Hex rather than base32: Python's base32 is pure Python and cost a tenth of a Check."""
    return f"{(time.time_ns() // 1_000_000) << 80 | _random_bits(80):032x}"


def trace_id_of(traceparent: str) -> str:
    """The trace id of a W3C traceparent header, or '' if it is not well formed."""
    m = _TRACEPARENT.match(traceparent)
    if m is None or m.group(1) == _NO_TRACE:
        return ""
    return m.group(1).lower()


def body_truncated(headers: Mapping[str, str], size: int) -> bool:
    """Whether the body Envoy buffered (``size`` bytes) may be less than the request's:
    Envoy says so in `x-envoy-auth-partial-body`; a `content-length` that differs says so;
    and without a `content-length` (chunked, or HTTP/2 without one) nothing can show it
    whole. Envoy sends the check as soon as it has buffered max_request_bytes and then says
    `x-envoy-auth-partial-body: false` although more may follow (seen with Envoy 1.40 on
    both transports): a body cut there was allowed before this rule, and the rest of it
    reached the upstream (tests/e2e/test_adversarial.py)."""
    if headers.get(_PARTIAL_BODY, "false").lower() != "false":
        return True
    length = headers.get("content-length")
    if length is None:
        return True
    try:
        return int(length) != size
    except ValueError:
        return True


def make_view(
    decision_id: str,
    identity: Identity,
    *,
    method: str,
    authority: str,
    path: str,
    scheme: str,
    headers: dict[str, str],
    body: bytes | None,
    context_extensions: Mapping[str, str],
    source_principal: str = "",
) -> RequestView:
    """The request view of one call as Envoy reported it; ``headers`` have lower-case names
    and hold the request's own `content-length` (if it had one)."""
    return RequestView(
        decision_id=decision_id,
        method=method,
        authority=authority,
        path=path,
        scheme=scheme,
        headers=headers,
        body=body,
        body_truncated=body is not None and body_truncated(headers, len(body)),
        context_extensions=context_extensions,
        source_principal=source_principal,
        configured_agent=identity.agent,
        configured_service_account=identity.service_account,
        namespace=identity.namespace,
        trace_id=trace_id_of(headers.get("traceparent", "")),
    )


def request_parents(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's own `traceparent`/`tracestate`, to parent a decision span on."""
    return {k: headers[k] for k in TRACE_KEYS if k in headers}


def view_from_url(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    *,
    decision_id: str,
    agent: str | None = None,
    service_account: str | None = None,
    spiffe: str | None = None,
    namespace: str = "",
) -> RequestView:
    """The view of a call described by METHOD and an absolute URL (or HOST:PORT for
    CONNECT), as `mandate explain` and the context API's Explain describe it. Headers are
    lower-cased here. Raises BadRequestError naming what is wrong."""
    method = method.upper()
    if method == "CONNECT":
        authority, path, scheme = url.removeprefix("//"), "", "https"
        if "/" in authority or ":" not in authority:
            raise BadRequestError(f"CONNECT target {url!r}: expected HOST:PORT")
    else:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadRequestError(f"URL {url!r}: expected an absolute http:// or https:// URL")
        authority, scheme = parts.netloc, parts.scheme
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return RequestView(
        decision_id=decision_id,
        method=method,
        authority=authority,
        path=path,
        scheme=scheme,
        headers={k.lower(): v for k, v in headers.items()},
        body=body,
        source_principal=spiffe or "",
        configured_agent=agent,
        configured_service_account=service_account,
        namespace=namespace,
    )
