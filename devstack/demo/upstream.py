"""A demo upstream (aiohttp) that stands in for every host the agents call.

It answers every request with what it received, in particular the `x-mandate-*` headers
mandate set, so the demo and the end-to-end tests can show what reached the upstream.
`POST /mcp` answers as a minimal MCP server (JSON-RPC 2.0). Every request is also kept in
`app[RECEIVED]` so tests can assert that a denied call never arrived, with the credential
headers that arrived (the answer shows only their length and fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from sidecar.headers import CREDENTIAL_HEADERS

__all__ = ["RECEIVED", "make_app", "start_upstream"]

RECEIVED: web.AppKey[list[dict[str, Any]]] = web.AppKey("received", list)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    seen = {
        "method": request.method,
        "host": request.host,
        "path": request.path_qs,
        # Repeated headers joined with ", ", so that a value appended next to the agent's
        # (rather than replacing it) shows.
        "mandate": {
            k.lower(): ", ".join(request.headers.getall(k))
            for k in request.headers
            if k.lower().startswith("x-mandate-")
        },
        "traceparent": request.headers.get("traceparent"),
        "body": body.decode("utf-8", "replace"),
    }
    # Credentials mandate added (issue 17): the answer shows that one arrived, and its
    # fingerprint, never the value (the agent reads this answer; it must not learn a key).
    # Tests read the values from app[RECEIVED]["credentials"].
    creds = {k: request.headers[k] for k in CREDENTIAL_HEADERS if k in request.headers}
    shown = dict(seen)
    shown["credentials"] = {k: _fingerprint(v) for k, v in creds.items()}
    request.app[RECEIVED].append({**seen, "credentials": creds})
    if request.path == "/mcp" and request.method == "POST":
        return _mcp(body, shown)
    return web.json_response(shown)


def _fingerprint(value: str) -> str:
    return f"{len(value)} characters, sha256 {hashlib.sha256(value.encode()).hexdigest()[:12]}"


def _mcp(body: bytes, seen: dict[str, Any]) -> web.Response:
    try:
        msg = json.loads(body)
    except ValueError:
        return web.json_response({"error": "not JSON"}, status=400)
    messages = msg if isinstance(msg, list) else [msg]
    out = []
    for m in messages:
        if not isinstance(m, dict) or "id" not in m:
            continue
        method = m.get("method")
        if method == "tools/list":
            result: Any = {"tools": [{"name": "search_papers"}, {"name": "fetch_abstract"}]}
        elif method == "tools/call":
            name = (m.get("params") or {}).get("name")
            result = {"content": [{"type": "text", "text": f"{name}: 3 results"}]}
        else:
            result = {}
        out.append({"jsonrpc": "2.0", "id": m["id"], "result": result})
    reply: Any = out if isinstance(msg, list) else (out[0] if out else {})
    return web.json_response({"mcp": reply, "seen": seen})


def make_app() -> web.Application:
    app = web.Application()
    app[RECEIVED] = []
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def start_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Start the upstream; return its runner (call `cleanup()` to stop) and bound port."""
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp has no public accessor for the bound port
    assert server is not None
    sockets = getattr(server, "sockets", None)
    assert sockets
    return runner, int(sockets[0].getsockname()[1])
