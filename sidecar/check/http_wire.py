"""The wire format of the HTTP transport (Envoy's ext_authz `http_service`), shared by its two
servers (`http_transport`: aiohttp; `http_lean`: httptools): the path prefix that names the
agent, the request's headers as the call's view, and a Decision as status, headers and body.

The prefix, `x-mandate-content-length` and `x-mandate-scheme` are explained in
`http_transport`; so are the answers. Pure: no aiohttp, no sockets, no decision logic, so that
the lean server imports nothing of aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.check.request import Identity, make_view
from sidecar.check.response import deny_body, deny_status, upstream_headers
from sidecar.core import Decision, RequestView
from sidecar.credentials.broker import NOTHING, Injected
from sidecar.errors import BadRequestError
from sidecar.headers import (
    CALL_HEADER,
    CODE_HEADER,
    DECISION_HEADER,
    LENGTH_HEADER,
    LOG_AGENT_HEADER,
    OUTCOME_HEADER,
    SCHEME_HEADER,
)

__all__ = ["LENGTH_PREFIX", "PREFIX", "REMOVE_HEADER", "answer", "http_view", "parse_target"]

PREFIX = "/mandate"
_AGENT = ";agent="
_CONNECT = ";connect"
LENGTH_PREFIX = "len="  # envoy/*-http.yaml: "len=%REQ(content-length)%", never empty
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"


def parse_target(raw_path: str) -> tuple[str, bool, str]:
    """(agent named by the prefix or '', whether it is a CONNECT check, the call's path).
    Raises BadRequestError unless ``raw_path`` starts with a prefix of the envoy/ configs."""
    if not raw_path.startswith(PREFIX):
        raise BadRequestError(f"not an ext_authz request: the path lacks Envoy's {PREFIX} prefix")
    rest = raw_path[len(PREFIX) :]
    agent = ""
    if rest.startswith(_AGENT):
        end = len(rest)
        for sep in (";", "/"):
            at = rest.find(sep, len(_AGENT))
            if at != -1:
                end = min(end, at)
        agent, rest = rest[len(_AGENT) : end], rest[end:]
    if rest == _CONNECT:
        return agent, True, ""
    if not rest.startswith("/"):
        raise BadRequestError("malformed ext_authz path: expected the call's path after the prefix")
    return agent, False, rest


def http_view(
    did: str,
    identity: Identity,
    method: str,
    raw_path: str,
    headers: dict[str, str],
    body: bytes,
) -> RequestView:
    """The view of the call an HTTP check request describes. ``headers`` have lower-case
    names, a repeated header's values joined with "," (as Envoy does in a gRPC
    CheckRequest); they are changed here (Envoy's Content-Length swapped for the call's)."""
    agent, connect, path = parse_target(raw_path)
    # Envoy's Content-Length is the buffered body's; the call's own came in LENGTH_HEADER.
    headers.pop("content-length", None)
    length = headers.get(LENGTH_HEADER, "")
    if length.startswith(LENGTH_PREFIX) and len(length) > len(LENGTH_PREFIX):
        headers["content-length"] = length[len(LENGTH_PREFIX) :]
    return make_view(
        did,
        identity,
        method="CONNECT" if connect else method,
        authority=headers.get("host", ""),
        path=path,
        scheme=headers.get(SCHEME_HEADER) or "http",
        headers=headers,
        body=body or None,
        context_extensions={"agent": agent} if agent else {},
    )


def answer(
    d: Decision, headers: Mapping[str, str], injected: Injected = NOTHING, facts: str = ""
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the answer to a decision; ``headers`` are the request's,
    ``injected`` the credentials an allowed call carries, ``facts`` the call's facts for
    behaviour analysis ('' for none). Only an allow is a 200; a deny's body is its JSON."""
    if d.allowed:
        to_set, to_remove = upstream_headers(d, headers, injected)
        out = dict(to_set)
        out[OUTCOME_HEADER] = "allow"
        out[CODE_HEADER] = d.code
        if d.agent:
            out[LOG_AGENT_HEADER] = d.agent
        if facts:
            out[CALL_HEADER] = facts
        if to_remove:
            out[REMOVE_HEADER] = ",".join(to_remove)
        return 200, out, b""
    out = {
        "content-type": "application/json",
        DECISION_HEADER: d.decision_id,
        OUTCOME_HEADER: "deny",
        CODE_HEADER: d.code,
    }
    if d.agent:
        out[LOG_AGENT_HEADER] = d.agent
    if facts:
        out[CALL_HEADER] = facts
    return deny_status(d), out, deny_body(d)
