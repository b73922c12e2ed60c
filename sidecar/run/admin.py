"""The admin HTTP server (aiohttp): liveness, readiness, Prometheus metrics and, on the
supervisor, the revocation and elevation-approval APIs.

`/healthz`, `/readyz` and `/metrics` are open (kubelet probes and Prometheus call them), so
they say nothing an agent could use: `/readyz` answers only `{"ready": true|false}` (200 or
503), and `/metrics` has only bounded label values (no reasons, justifications or paths).
The details of readiness (`/readyz?verbose=1`) and everything under `/v1/` need
`Authorization: Bearer <token>`, the token read from a file that only the mandate container
mounts: the agent shares the pod's network namespace and can reach this port, so the port
is no protection. Must not contain decision logic.

An operator's action is answered with success only once it is durable: a revocation or
restore whose state file cannot be written is a 500 `state_not_durable` naming the file and
the OS error (see revocations.py for what is then in force).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from sidecar.core.agentstate import Approval
from sidecar.core.model import parse_duration
from sidecar.core.revocation import ALL_AGENTS, Revocation, make_key
from sidecar.core.timefmt import parse_rfc3339
from sidecar.errors import AgentStateError, StateWriteError
from sidecar.loopthread import LoopThread
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.revocations import RevocationStore
from sidecar.telemetry.metrics import REGISTRY

__all__ = ["AdminServer", "ElevationAPI", "RevocationAPI", "add_probe_routes", "read_token"]

Ready = Callable[[], tuple[bool, dict[str, Any]]]
_AGENT = re.compile(r"^(\*|[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?)\Z")  # \Z: no trailing \n


def add_probe_routes(
    app: web.Application,
    ready: Ready,
    token: str | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """/healthz, /readyz and /metrics (across worker processes when they share a
    PROMETHEUS_MULTIPROC_DIR). ``ready`` returns (is ready, details); the details are shown
    only to `/readyz?verbose=1` with the bearer ``token`` (none configured: never).
    ``alive``: False when the process can no longer do its job and only a restart helps
    (the liveness probe then fails and the kubelet restarts the container)."""

    async def healthz(_: web.Request) -> web.Response:
        if alive is not None and not alive():
            return web.json_response({"status": "dead"}, status=503)
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.StreamResponse:
        if _verbose(request):
            shown: web.StreamResponse = await verbose_readyz(request)
            return shown
        # Open to anyone on the port, the agent included: the details hold elevation
        # justifications, grants, risk explanations (issue 15, finding 7).
        ok, _ = ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def readyz_details(_: web.Request) -> web.Response:
        ok, details = ready()
        return web.json_response({"ready": ok, **details}, status=200 if ok else 503)

    verbose_readyz = _bearer(token, readyz_details)

    async def metrics(_: web.Request) -> web.Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            body = generate_latest(registry)
        else:
            body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


def _verbose(request: web.Request) -> bool:
    value = request.query.get("verbose")
    return value is not None and value.lower() not in ("0", "false", "no")


def read_token(path: Path) -> str:
    """The admin token in ``path`` (surrounding whitespace ignored); ValueError if empty."""
    token = path.read_text().strip()
    if len(token) < 16:
        raise ValueError(f"admin token in {path} is shorter than 16 characters")
    return token


def _parse_time(text: str) -> float:
    """An RFC 3339 date-time with a zone as seconds since the epoch; ValueError (the message
    is returned to the caller) for anything else."""
    ts = parse_rfc3339(text)
    if ts is None:
        if parse_rfc3339(text.strip() + "Z") is not None:
            raise ValueError("a time zone is required (e.g. 2026-12-01T00:00:00Z)")
        raise ValueError(
            "expected an RFC 3339 date-time with a time zone, such as 2026-12-01T00:00:00Z "
            "or 2026-12-01T01:00:00+01:00"
        )
    return ts


class RevocationAPI:
    """`/v1/revocations` (list, revoke, restore) and `/v1/status` on the supervisor."""

    def __init__(
        self,
        store: RevocationStore,
        namespace: str,
        token: str | None,
        status: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._namespace = namespace
        self._token = token
        self._status = status
        self._clock = clock

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/status", self._auth(self._get_status))
        app.router.add_get("/v1/revocations", self._auth(self._list))
        app.router.add_post("/v1/revocations", self._auth(self._revoke))
        app.router.add_delete("/v1/revocations/{agent}", self._auth(self._restore))

    def _auth(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        return _bearer(self._token, handler)

    async def _get_status(self, _: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def _list(self, _: web.Request) -> web.Response:
        now = self._clock()
        return web.json_response({"revocations": [_show(r, now) for r in self._store.entries()]})

    async def _revoke(self, request: web.Request) -> web.Response:
        body = await _json_object(request, {"agent", "reason", "expiresAt"})
        if isinstance(body, web.Response):
            return body
        agent, reason, expires = body.get("agent"), body.get("reason"), body.get("expiresAt")
        if not isinstance(agent, str) or not _AGENT.match(agent):
            return _error(400, "bad_request", "agent: expected a profile name or '*'")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 1024:
            return _error(400, "bad_request", "reason: expected 1-1024 characters")
        expires_at = None
        if expires is not None:
            try:
                if not isinstance(expires, str):
                    raise ValueError("expected an RFC 3339 string")
                expires_at = _parse_time(expires)
                if expires_at <= self._clock():
                    raise ValueError("is in the past")
            except ValueError as exc:
                return _error(400, "bad_request", f"expiresAt: {exc}")
        now = self._clock()
        rev = Revocation(
            key=make_key("admin", self._namespace, agent),
            agent=agent,
            namespace=self._namespace,
            reason=reason.strip(),
            source="admin",
            name=agent,
            expires_at=expires_at,
            created_at=now,
        )
        try:
            self._store.upsert(rev, durable=True)
        except StateWriteError as exc:
            # In force now (the store never undoes enforcement), but a restart would forget
            # it: not a success. Retrying after the volume is fixed makes it durable.
            return _not_durable(
                exc,
                f"revoked in memory and in force now, but NOT durable: {exc}; it will be "
                "forgotten at the next restart unless a later write succeeds (fix the volume, "
                "then revoke again)",
                revoked=_show(rev, now),
                durable=False,
                generation=self._store.generation,
                visible_at=self._store.visible_at,
            )
        written = {"generation": self._store.generation, "visible_at": self._store.visible_at}
        durable = self._store.persistent
        answer: dict[str, Any] = {"revoked": _show(rev, now), "durable": durable, **written}
        if not durable:
            # No state file at all (run without --state-dir): in force, but only until a
            # restart. Said plainly rather than called durable.
            answer["warning"] = (
                "mandate runs without a state file (--state-dir): this revocation is in "
                "memory only and ends at the next restart"
            )
        return web.json_response(answer, status=201)

    async def _restore(self, request: web.Request) -> web.Response:
        agent = request.match_info["agent"]
        if not _AGENT.match(agent):
            return _error(400, "bad_request", "agent: expected a profile name or '*'")

        def ends(r: Revocation) -> bool:
            # An operator's restore also ends an automatic (behaviour) revocation; one from
            # Kubernetes ends only when its object is deleted.
            return (
                r.source in ("admin", "behaviour")
                and r.agent == agent
                and r.namespace == self._namespace
            )

        try:
            removed = self._store.remove_matching(ends, durable=True)
        except StateWriteError as exc:
            # Not done at all: allowing the agent now while the file still revokes it would
            # flip back at the next restart, unseen. It stays revoked, now and after.
            now = self._clock()
            return _not_durable(
                exc,
                f"restore NOT done, {agent!r} stays revoked: {exc}; fix the volume, then "
                "restore again",
                restored=[],
                still_revoked_by=[_show(r, now) for r in self._store.entries() if ends(r)],
                generation=self._store.generation,
                visible_at=self._store.visible_at,
            )
        now = self._clock()
        remaining = [
            _show(r, now)
            for r in self._store.entries()
            if r.active(now)
            and r.namespace == self._namespace
            and (r.agent == agent or r.agent == ALL_AGENTS)
        ]
        body = {
            "restored": [_show(r, now) for r in removed],
            "still_revoked_by": remaining,
            "generation": self._store.generation,
            "visible_at": self._store.visible_at,
        }
        return web.json_response(body, status=409 if remaining else 200)


def _bearer(
    token: str | None, handler: Callable[[web.Request], Any]
) -> Callable[[web.Request], Any]:
    async def checked(request: web.Request) -> web.StreamResponse:
        if token is None:
            return _error(503, "no_token", "the admin API has no token configured")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = ""
        # surrogateescape: a header that is not UTF-8 is refused (401), not a 500
        if not hmac.compare_digest(given.encode(errors="surrogateescape"), token.encode()):
            return _error(401, "unauthorized", "a valid bearer token is required")
        result: web.StreamResponse = await handler(request)
        return result

    return checked


class ElevationAPI:
    """`/v1/elevations` (list requests and grants) and `/v1/elevations/{id}/approve`: the
    operator's side of temporary elevation, behind the same bearer token as revocations.
    The agent can reach this port but has no token: it can ask (context API), never
    approve."""

    def __init__(
        self,
        store: AgentStateStore,
        namespace: str,
        token: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._namespace = namespace
        self._token = token
        self._clock = clock

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/elevations", _bearer(self._token, self._list))
        app.router.add_post("/v1/elevations/{request}/approve", _bearer(self._token, self._approve))

    async def _list(self, _: web.Request) -> web.Response:
        return web.json_response(
            {
                "requests": [r.as_dict() for r in self._store.requests()],
                "grants": [g.as_dict() for g in self._store.grants()],
            }
        )

    async def _approve(self, request: web.Request) -> web.Response:
        rid = request.match_info["request"]
        body = await _json_object(request, {"approver", "duration", "reason"})
        if isinstance(body, web.Response):
            return body
        approver, duration, reason = body.get("approver"), body.get("duration"), body.get("reason")
        if not isinstance(approver, str) or not approver.strip() or len(approver) > 256:
            return _error(400, "bad_request", "approver: expected 1-256 characters")
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1024):
            return _error(400, "bad_request", "reason: expected at most 1024 characters")
        seconds = None
        if duration is not None:
            try:
                if not isinstance(duration, str):
                    raise ValueError("expected a duration like 10m")
                seconds = parse_duration(duration)
            except ValueError as exc:
                return _error(400, "bad_request", f"duration: {exc}")
        req = self._store.request(rid)
        if req is None:
            return _error(404, "not_found", f"no elevation request {rid!r}")
        approval = Approval(
            key=f"admin:{rid}",
            agent=req.agent,
            namespace=req.namespace,
            elevation=req.elevation,
            approver=approver.strip(),
            approved_at=self._clock(),
            request_id=rid,
            duration=seconds,
            reason=reason or "",
            source="admin",
            name=rid,
        )
        try:
            state, message, grant, expires = self._store.approve(approval)
        except StateWriteError as exc:  # nothing granted: the store undid it (issue 15)
            msg = f"approval NOT done, nothing granted: {exc}; fix the volume, then approve again"
            return _not_durable(exc, msg, state="NotDurable")
        except AgentStateError as exc:  # e.g. the shared context table has no room for it
            return _error(503, exc.code, f"approval NOT done, nothing granted: {exc}")
        body_out = {"state": state, "message": message, "grant": grant, "expires_at": expires}
        return web.json_response(body_out, status=200 if state == "Granted" else 409)


async def _json_object(request: web.Request, fields: set[str]) -> dict[str, Any] | web.Response:
    """The request's JSON object body with only ``fields``, or the 400 that says why not."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "bad_request", "the body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "bad_request", "the body must be a JSON object")
    unknown = set(body) - fields
    if unknown:
        return _error(400, "bad_request", f"unknown field(s): {', '.join(sorted(unknown))}")
    return body


def _show(r: Revocation, now: float) -> dict[str, Any]:
    return {**r.as_dict(), "active": r.active(now)}


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def _not_durable(exc: StateWriteError, message: str, **extra: Any) -> web.Response:
    """500 `state_not_durable`: the file and the OS error, for the operator (this is behind
    the token), and what is in force now."""
    body = {"error": exc.code, "message": message, "file": exc.file, "os_error": exc.os_error}
    return web.json_response({**body, **extra}, status=500)


class AdminServer:
    """Probes in a thread of their own, for a single-process sidecar (tests, `Sidecar`).
    ``ready`` returns (is ready, details) for /readyz."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], tuple[bool, dict[str, Any]]],
        token: str | None = None,
    ) -> None:
        """``token``: the bearer token for `/readyz?verbose=1` (None: details never shown)."""
        self._host, self._port = host, port
        self._ready = ready
        self._token = token
        self._runner: web.AppRunner | None = None
        self._thread = LoopThread("admin")
        self.port = 0

    def _app(self) -> web.Application:
        app = web.Application()
        add_probe_routes(app, self._ready, self._token)
        return app

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        assert server is not None and isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    def start(self) -> int:
        """Start serving; return the bound port. Raises if the port cannot be bound."""
        self._thread.start(self._start)
        return self.port

    def stop(self) -> None:
        async def _cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        self._thread.stop(_cleanup)
