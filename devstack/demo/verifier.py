"""The internal upstream of the demo's "Credentials" part: a service that accepts a call only
with a Transaction Token it verified itself.

The local Envoy configs send every host to one upstream port, so the demo upstream
(devstack/demo/upstream.py) gets a middleware: a request whose Host is one of ``hosts``
(``audit.finance.svc.cluster.local`` in the demo) is the internal service. It takes the
``Txn-Token`` header, fetches mandate's JWKS (``/.well-known/jwks.json`` on mandate's admin
port, cached for its ``max-age`` and fetched again for an unknown ``kid``) and verifies the
token with PyJWT: the signature with the JWKS key the ``kid`` names (and that key's
algorithm, never the token's), ``typ: txntoken+jwt``, ``iss``, ``aud`` = the service's own
host name, ``exp``, and that ``sub``, ``iat``, ``txn`` and ``scope`` are present. A call
without a token, or with one that does not verify, gets 401 and never reaches the service
(nor the recording in ``app[RECEIVED]``); a verified one is answered by the demo upstream,
with the claims the service verified under ``"verified"``.

For the demo and its test only; a real upstream uses its own framework's JWT middleware.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Collection
from typing import Any, Final

import aiohttp
import jwt
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from devstack.demo.upstream import make_app

__all__ = ["TXN_TOKEN_TYP", "TxnTokenVerifier", "start_verifying_upstream"]

TXN_TOKEN_TYP: Final = "txntoken+jwt"
# Asymmetric algorithms only: a JWKS publishes public keys, and an "HS256" token checked
# against a public key would be the classic algorithm-confusion forgery.
ALGORITHMS: Final = ("ES256", "ES384", "EdDSA", "RS256")
REQUIRED_CLAIMS: Final = ["iss", "sub", "aud", "iat", "exp", "txn", "scope"]
_MAX_AGE = re.compile(r"max-age=(\d+)")
_REFETCH_AFTER = 1.0  # an unknown kid fetches the JWKS again, at most once a second


class TxnTokenVerifier:
    """Verifies Transaction Tokens against the JWKS at ``jwks_url``, for ``issuer``."""

    def __init__(self, jwks_url: str, issuer: str) -> None:
        self.jwks_url, self.issuer = jwks_url, issuer
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fresh_until = 0.0
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def _fetch(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.jwks_url) as resp,
        ):
            resp.raise_for_status()
            document = await resp.json()
            age = _MAX_AGE.search(resp.headers.get("Cache-Control", ""))
        keys: dict[str, jwt.PyJWK] = {}
        for data in document.get("keys", []):
            kid, alg = data.get("kid"), data.get("alg")
            if isinstance(kid, str) and alg in ALGORITHMS:
                try:
                    keys[kid] = jwt.PyJWK(data, alg)
                except jwt.PyJWKError:
                    continue  # a key this library cannot use verifies nothing
        now = time.monotonic()
        self._keys, self._fetched_at = keys, now
        self._fresh_until = now + (int(age.group(1)) if age else 0)

    async def key(self, kid: str) -> jwt.PyJWK:
        """The JWKS key ``kid``: from the cached JWKS while fresh, else fetched again."""
        async with self._lock:
            now = time.monotonic()
            stale = now >= self._fresh_until
            unknown = kid not in self._keys and now - self._fetched_at >= _REFETCH_AFTER
            if stale or unknown:
                await self._fetch()
        found = self._keys.get(kid)
        if found is None:
            raise jwt.InvalidTokenError(f"kid {kid!r} is not in the JWKS")
        return found

    async def verify(self, token: str, audience: str) -> dict[str, Any]:
        """``token`` verified for the upstream ``audience``: ``{"header": ..., "payload":
        the claims}``, or ``jwt.InvalidTokenError`` saying what failed."""
        kid = jwt.get_unverified_header(token).get("kid")
        if not isinstance(kid, str):
            raise jwt.InvalidTokenError("no kid in the token header")
        key = await self.key(kid)
        decoded = jwt.api_jwt.decode_complete(
            token,
            key,
            algorithms=[key.algorithm_name],
            audience=audience,
            issuer=self.issuer,
            options={"require": REQUIRED_CLAIMS},
        )
        if decoded["header"].get("typ") != TXN_TOKEN_TYP:
            raise jwt.InvalidTokenError(f"typ is not {TXN_TOKEN_TYP!r}")
        return decoded


def _middleware(verifier: TxnTokenVerifier, hosts: Collection[str]) -> Middleware:
    own = {h.lower() for h in hosts}

    @web.middleware
    async def verify_txn_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = (request.host or "").rsplit(":", 1)[0].lower()
        if host not in own:
            return await handler(request)
        token = request.headers.get("Txn-Token")
        if not token:
            return _refuse("no Txn-Token")
        try:
            decoded = await verifier.verify(token, audience=host)
        except jwt.InvalidTokenError as exc:
            return _refuse(str(exc))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return web.json_response(
                {"error": "jwks_unavailable", "reason": f"{verifier.jwks_url}: {exc}"}, status=503
            )
        resp = await handler(request)  # the demo upstream's answer (and its recording)
        assert isinstance(resp, web.Response) and resp.body is not None
        answer = json.loads(bytes(resp.body))  # type: ignore[arg-type]
        header, claims = decoded["header"], decoded["payload"]
        answer["verified"] = {
            **{k: header[k] for k in ("typ", "alg", "kid")},
            **{k: claims[k] for k in ("iss", "aud", "sub", "scope", "txn", "tctx", "iat", "exp")
               if k in claims},
        }  # fmt: skip
        return web.json_response(answer, status=resp.status)

    return verify_txn_token


def _refuse(reason: str) -> web.Response:
    return web.json_response(
        {"error": "invalid_txn_token", "reason": reason},
        status=401,
        headers={"WWW-Authenticate": 'Txn-Token error="invalid_token"'},
    )


async def start_verifying_upstream(
    verifier: TxnTokenVerifier, hosts: Collection[str], host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """The demo upstream (``make_app()``) with the internal service ``hosts`` verifying
    Transaction Tokens; returns its runner (call ``cleanup()`` to stop) and bound port. The
    app is ``runner.app`` (its ``RECEIVED`` list holds every request that got through)."""
    app = make_app()
    app.middlewares.append(_middleware(verifier, hosts))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp has no public accessor for the bound port
    sockets = getattr(server, "sockets", None)
    assert sockets
    return runner, int(sockets[0].getsockname()[1])
