"""Transaction Tokens minted by mandate (draft-ietf-oauth-transaction-tokens-10).

One token per allowed call, for one upstream: a JWS compact JWT with the header ``typ:
"txntoken+jwt"``, ``alg`` and ``kid`` (the signing key of ``keys.SigningKeys``), and the
claims ``iss`` (mandate's issuer URL), ``sub`` (the agent), ``aud`` (the one upstream),
``iat``, ``exp`` (at most 60 s later), ``txn`` (the decision id), ``scope`` (the purpose),
``tctx`` (what was decided: task, decision, method, path or MCP tool, elevation grant) and,
if known, ``req_wl`` (the requesting workload, e.g. the pod). Upstreams verify it against the
JWKS that ``SigningKeys.jwks()`` gives; the caller sends it in ``Txn-Token``.

The hot path signs with the key object loaded once (PyJWT's algorithm object over
``cryptography``) and a header pre-encoded per signing key: one JSON encoding of the claims,
one signature, three base64url pieces.

Must not: log or put a token or key material in an exception; cache a token (each call
gets its own ``txn``); import a transport, the state stores or Kubernetes.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from sidecar.credentials.keys import SigningKey, SigningKeys
from sidecar.errors import ConfigError

__all__ = ["MAX_TTL_SECONDS", "TXN_TOKEN_TYP", "TxnTokenMinter"]

TXN_TOKEN_TYP: Final = "txntoken+jwt"
MAX_TTL_SECONDS: Final = 60  # the bound on what an upstream could still accept

_dumps = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _header(key: SigningKey) -> bytes:
    """The encoded protected header of ``key``'s tokens and the dot after it."""
    header = {"alg": key.alg, "kid": key.kid, "typ": TXN_TOKEN_TYP}
    return _b64(_dumps(header).encode()) + b"."


class TxnTokenMinter:
    """Mints Transaction Tokens signed by the current signing key of ``keys``.

    ``issuer`` is the ``iss`` of every token: an http(s) URL (ConfigError otherwise).
    ``clock`` gives the time in seconds since the epoch (``iat``, ``exp``)."""

    def __init__(
        self, keys: SigningKeys, issuer: str, clock: Callable[[], float] = time.time
    ) -> None:
        parts = urlsplit(issuer) if isinstance(issuer, str) else None
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(
                f"Transaction Token issuer {issuer!r}: an http(s) URL is needed "
                "(e.g. https://mandate.agents.svc)"
            )
        self._keys = keys
        self._issuer = issuer
        self._clock = clock
        # (the key, its encoded header): swapped as one tuple when the signing key changes.
        self._last: tuple[SigningKey | None, bytes] = (None, b"")

    @property
    def issuer(self) -> str:
        return self._issuer

    def mint(
        self,
        *,
        sub: str,
        aud: str,
        scope: str,
        tctx: Mapping[str, Any],
        txn: str,
        ttl: float,
        req_wl: str | None = None,
    ) -> str:
        """A signed Transaction Token for one call. ``ttl`` is in seconds, 1 to 60
        (ValueError otherwise); ``exp`` is ``iat + ttl`` rounded down. ``tctx`` must be
        JSON-serialisable. Raises CredentialUnavailable when no key can sign."""
        if not 1 <= ttl <= MAX_TTL_SECONDS or isinstance(ttl, bool):
            raise ValueError(f"Transaction Token ttl {ttl!r} s: between 1 and {MAX_TTL_SECONDS} s")
        for name, value in (("sub", sub), ("aud", aud), ("scope", scope), ("txn", txn)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"Transaction Token {name}: a non-empty string is needed")
        key = self._keys.signer()  # CredentialUnavailable if none
        last_key, header = self._last
        if key is not last_key:
            header = _header(key)
            self._last = (key, header)
        now = self._clock()
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": sub,
            "aud": aud,
            "iat": int(now),
            "exp": int(now + ttl),
            "txn": txn,
            "scope": scope,
            "tctx": dict(tctx),
        }
        if req_wl:
            claims["req_wl"] = req_wl
        signing_input = header + _b64(_dumps(claims).encode())
        return (signing_input + b"." + _b64(key.sign(signing_input))).decode("ascii")
