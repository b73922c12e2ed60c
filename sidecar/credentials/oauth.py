"""OAuth 2.0 access tokens that mandate obtains for an agent, which never holds them: client
credentials (RFC 6749 §4.4) and token exchange (RFC 8693).

A token source keeps one token in memory and one background thread that fetches and
refreshes it; the Check path only reads the cache (:meth:`TokenSource.token`) and never does
network I/O unless it explicitly asks to wait. The numbers (see :class:`TokenSettings`):

- a token with ``expires_in`` = L is used until ``L - min(skew, L/4)`` after the request that
  got it was sent (skew 30 s: 3600 s -> 3570 s, 300 s -> 270 s, 60 s -> 45 s) and at most
  ``max_ttl`` (3600 s); without ``expires_in`` for ``default_ttl`` (60 s; agentgateway uses
  300 s). It is refreshed in the background when 80 % of that usable life has passed
  (3600 s -> at 2856 s, 60 s -> at 36 s, none -> at 48 s), so a Check does not wait for it.
- after a failed fetch the next attempt waits ``backoff_initial * 2**(n-1)`` capped at
  ``backoff_max`` (1 s, 2 s, ... 30 s), times a random factor in [0.5, 1); meanwhile
  ``token()`` answers at once: the still usable cached token, else CredentialUnavailable.
- one request: ``timeout`` (5 s) for connect, TLS, request and response together (a watchdog
  aborts the connection), a response body of at most ``max_response_bytes`` (64 KiB), no
  redirect followed, no proxy (``HTTP(S)_PROXY`` is ignored: the token endpoint is reached
  directly), ``https://`` only (plain ``http://`` only on the loopback address: a local STS,
  tests; the profile validator has the same rule), TLS verified against the system CAs or,
  with ``ca_file``, against that file only.
- the client secret, subject and actor tokens are files (:class:`SecretFile`) read afresh
  for every request, so a rotated Kubernetes Secret or projected token is used at once.

`drop()` forgets the token at once and discards (and aborts) a request in flight: called when
the agent is revoked, so no token is handed out after it returns. What drop() cannot take
back is a token already sent upstream: the upstream may accept it until its own expiry.

Never logs, raises or ``repr``s a token, client secret, subject or actor token: messages name
the credential, the endpoint (without userinfo or query) and what failed (HTTP status and the
OAuth ``error`` code, timeout, refused, malformed response). Does not know agents, profiles or
headers (the broker does). Token sources are per process: build them in the process that uses
them (a Check worker), not before a fork.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import math
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import SplitResult, quote, urlencode, urlsplit

from sidecar.core.model import token_url_problem
from sidecar.credentials.secrets import SecretFile
from sidecar.errors import ConfigError, CredentialUnavailable

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "DEFAULT_SETTINGS",
    "ID_TOKEN_TYPE",
    "JWT_TOKEN_TYPE",
    "TOKEN_EXCHANGE_GRANT",
    "ClientAuth",
    "ClientCredentials",
    "IssuedToken",
    "TokenExchange",
    "TokenSettings",
    "TokenSource",
    "TokenSourceStatus",
]

log = logging.getLogger(__name__)

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"

ClientAuth = Literal["client_secret_basic", "client_secret_post"]

# RFC 6749 §3.3 scope-token; RFC 6750 §2.1 b64token is narrower than what servers issue, so a
# token is accepted if it is visible ASCII without spaces: safe in an HTTP header.
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
# The only words of the server a message repeats: registered OAuth error codes (RFC 6749
# §5.2, RFC 6750 §3.1, RFC 8693 §2.2.2, RFC 8707 §2, RFC 8628 §3.5, RFC 9449 §5). Anything
# else the server says might echo what it was sent (a subject token, a client secret).
_ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "invalid_token",
        "insufficient_scope",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        "slow_down",
        "invalid_dpop_proof",
        "use_dpop_nonce",
    }
)
# RFC 8693 §3: the registered token type URIs, which a message may repeat
_KNOWN_TOKEN_TYPES = frozenset(
    f"urn:ietf:params:oauth:token-type:{t}"
    for t in ("access_token", "refresh_token", "id_token", "saml1", "saml2", "jwt")
)
_DIGITS = re.compile(r"[0-9]{1,10}")
_TOKEN_TYPE = re.compile(r"[\x21-\x7e]{1,256}")  # RFC 8693 §3: a URI
_READ_CHUNK = 16384


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """How a token source talks to its endpoint and caches what it gets (seconds)."""

    timeout: float = 5.0
    skew: float = 30.0
    default_ttl: float = 60.0
    max_ttl: float = 3600.0
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    ca_file: str | None = None
    max_response_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("timeout", "default_ttl", "max_ttl", "backoff_initial", "backoff_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"token settings: {name} must be a positive number, got {value}")
        if not (math.isfinite(self.skew) and self.skew >= 0):
            raise ConfigError(f"token settings: skew must be >= 0, got {self.skew}")
        if self.default_ttl > self.max_ttl:
            raise ConfigError("token settings: default_ttl must not exceed max_ttl")
        if self.backoff_initial > self.backoff_max:
            raise ConfigError("token settings: backoff_initial must not exceed backoff_max")
        if self.max_response_bytes < 1024:
            raise ConfigError("token settings: max_response_bytes must be at least 1024")


DEFAULT_SETTINGS = TokenSettings()


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token the endpoint issued. Times are the source's clock: `obtained_at` is when the
    request was sent; the token is served until `usable_until` and refreshed from
    `refresh_at`. `access_token` is left out of the ``repr``."""

    access_token: str = field(repr=False)
    token_type: str
    issued_token_type: str | None
    expires_in: float | None
    obtained_at: float
    usable_until: float
    refresh_at: float


@dataclass(frozen=True, slots=True)
class TokenSourceStatus:
    """What a readiness probe or `mandate status` may show of a source: never the token."""

    name: str
    endpoint: str
    has_token: bool
    usable_for: float | None
    fetching: bool
    failures: int
    last_error: str | None


class _Failed(Exception):
    """A fetch failed; the message says what, without any secret."""


def _endpoint(url: str, credential: str) -> SplitResult:
    # the profile validator's check, again here: a secret never crosses the network in clear
    problem = token_url_problem(url)
    if problem is not None:
        raise ConfigError(f"credential {credential!r}: token URL: {problem}")
    return urlsplit(url)


def _values(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _describe(exc: BaseException, host: str) -> str:
    """What went wrong with a connection, in words that carry no request or response data."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "connection closed without a response"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "connection reset"
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP response ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


class TokenSource:
    """One cached OAuth token and the background thread that keeps it fresh.

    Thread-safe. The thread starts on the first `token()` or `prefetch()` and keeps the
    token refreshed until `drop()` or `close()`; a source that was dropped stays idle until
    asked again. Subclasses say what to send (`_request_form`) and what to accept
    (`_accept_types`).
    """

    kind = "token"

    def __init__(
        self,
        name: str,
        *,
        token_url: str,
        settings: TokenSettings = DEFAULT_SETTINGS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings
        self._url = _endpoint(token_url, name)
        # for messages: no userinfo (refused above), no query (it might carry anything)
        self.endpoint = f"{self._url.scheme}://{self._url.netloc}{self._url.path}"
        self._clock = clock
        self._rng = random.Random()
        self._cond = threading.Condition(threading.Lock())
        self._issued: IssuedToken | None = None
        self._gen = 0  # bumped by drop() and close(): a fetch of an older generation is void
        self._active = False  # asked for a token since the last drop(): keep it fresh
        self._wanted = False  # a fetch is asked for (it starts once any backoff has passed)
        self._in_flight = False
        self._conn: http.client.HTTPConnection | None = None
        self._failures = 0
        self._retry_at = -math.inf
        self._last_error: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.endpoint})"

    # --- the Check path ----------------------------------------------------------------

    def token(self, wait: float = 0.0) -> str:
        """The cached access token while it is usable; no I/O, no lock (~0.3 µs).

        Without a usable token: raises CredentialUnavailable at once when the source is
        closed or backing off after a failed fetch (the message carries that failure);
        otherwise makes sure a fetch is in flight and waits up to `wait` seconds (blocking
        the calling thread: keep it 0 on an event loop) for its token, raising when the fetch
        fails, the wait runs out or `drop()` is called meanwhile. A due refresh is started
        in the background and does not delay the answer."""
        issued = self._issued
        if issued is not None:
            now = self._clock()
            if now < issued.usable_until:
                if now >= issued.refresh_at and not (self._wanted or self._in_flight):
                    self._ask()
                return issued.access_token
        return self._wait_for_token(wait)

    def prefetch(self) -> None:
        """Start fetching now (e.g. when the profile that names this credential loads), so
        the first Check finds a token; returns at once."""
        self._ask()

    # --- control -------------------------------------------------------------------------

    def drop(self) -> None:
        """Forget the token at once and void the fetch in flight (its connection is aborted
        and whatever it returns is not stored). The source stays idle until asked again; the
        next `token()` fetches anew, without backoff."""
        with self._cond:
            self._gen += 1
            self._issued = None
            self._active = self._wanted = False
            self._failures = 0
            self._retry_at = -math.inf
            self._last_error = None
            self._abort_locked()
            self._cond.notify_all()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the background thread (aborting a fetch in flight); `token()` raises after."""
        with self._cond:
            self._closed = True
            self._gen += 1
            self._issued = None
            self._abort_locked()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def status(self) -> TokenSourceStatus:
        with self._cond:
            issued, now = self._issued, self._clock()
            usable = issued is not None and now < issued.usable_until
            return TokenSourceStatus(
                name=self.name,
                endpoint=self.endpoint,
                has_token=usable,
                usable_for=issued.usable_until - now if issued is not None and usable else None,
                fetching=self._in_flight,
                failures=self._failures,
                last_error=self._last_error,
            )

    def issued(self) -> IssuedToken | None:
        """The token held now (usable or not), with its times; None when there is none."""
        return self._issued

    # --- what subclasses say -------------------------------------------------------------

    def _request_form(self) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """The form fields and extra headers of one token request, secrets read afresh.
        Raises _Failed naming the secret that could not be read."""
        raise NotImplementedError

    def _accept_types(self, token_type: str, issued_token_type: str | None) -> None:
        """Raise _Failed if the response's token types are not what was asked for."""
        if token_type.lower() != "bearer":  # not quoted: the server's words (see _ERROR_CODES)
            raise _Failed("HTTP 200 with a token_type that is not Bearer")

    # --- internals -----------------------------------------------------------------------

    def _unavailable(self, what: str) -> CredentialUnavailable:
        return CredentialUnavailable(f"credential {self.name!r} ({self.kind}): {what}")

    def _ask(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._active = True
            issued = self._issued
            due = issued is None or self._clock() >= issued.refresh_at
            if due and not self._in_flight:
                self._wanted = True
            self._start_locked()
            self._cond.notify_all()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"oauth-{self.name}", daemon=True
            )
            self._thread.start()

    def _wait_for_token(self, wait: float) -> str:
        deadline = time.monotonic() + max(wait, 0.0)  # a real wait, whatever the clock
        with self._cond:
            gen = self._gen
            while True:
                if self._closed:
                    raise self._unavailable("closed")
                if self._gen != gen:
                    raise self._unavailable("dropped while waiting for a token")
                now = self._clock()
                issued = self._issued
                if issued is not None and now < issued.usable_until:
                    return issued.access_token
                if not self._in_flight and now < self._retry_at:
                    raise self._unavailable(
                        f"{self._last_error}; next attempt in {self._retry_at - now:.1f} s"
                    )
                self._active = True
                if not self._in_flight:
                    self._wanted = True
                self._start_locked()
                self._cond.notify_all()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._unavailable(
                        f"no token yet: waiting for {self.endpoint}"
                        + (f" (last attempt: {self._last_error})" if self._last_error else "")
                    )
                self._cond.wait(remaining)

    def _due_locked(self) -> float | None:
        """When the thread should fetch next (the source's clock), None for never."""
        if not self._active:
            return None
        issued = self._issued
        if issued is None or self._wanted:
            return self._retry_at
        return max(issued.refresh_at, self._retry_at)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = self._clock()
                    due = self._due_locked()
                    if due is not None and now >= due:
                        break
                    # real seconds for clock seconds; a test's clock that jumps calls token()
                    self._cond.wait(None if due is None else due - now)
                self._wanted = False
                self._in_flight = True
                gen = self._gen
            started = self._clock()
            try:
                issued: IssuedToken | None = self._fetch(gen, started)
                error = None
            except _Failed as exc:
                issued, error = None, str(exc)
            except Exception as exc:  # the thread must survive anything; say what, not why
                issued, error = None, f"unexpected {type(exc).__name__}"
                log.debug("credential %r: unexpected %s", self.name, type(exc).__name__)
            with self._cond:
                self._in_flight = False
                if gen != self._gen or self._closed:
                    log.debug("credential %r: result of a dropped fetch discarded", self.name)
                elif issued is not None:
                    self._issued = issued
                    self._failures = 0
                    self._retry_at = -math.inf
                    self._last_error = None
                    log.info(
                        "credential %r: token from %s, usable for %.0f s",
                        self.name,
                        self.endpoint,
                        issued.usable_until - issued.obtained_at,
                    )
                else:
                    self._failures += 1
                    step = self.settings.backoff_initial * 2 ** min(self._failures - 1, 30)
                    delay = min(self.settings.backoff_max, step) * (0.5 + 0.5 * self._rng.random())
                    self._retry_at = self._clock() + delay
                    self._last_error = error
                    log.warning(
                        "credential %r: token request failed: %s; next attempt in %.1f s",
                        self.name,
                        self._last_error,
                        delay,
                    )
                self._cond.notify_all()

    def _fetch(self, gen: int, started: float) -> IssuedToken:
        form, headers = self._request_form()  # its failures name the secret file
        try:
            status, body = self._post(gen, urlencode(form).encode("ascii"), headers)
            return self._parse(status, body, started)
        except _Failed as exc:
            raise _Failed(f"token endpoint {self.endpoint}: {exc}") from None

    def _abort_locked(self) -> None:
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            # the plain socket's shutdown, also for TLS: wakes the reader at once
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _tls_context(self) -> ssl.SSLContext:
        # built per request (a few per token lifetime), so a rotated CA file is read afresh
        ca_file = self.settings.ca_file
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise _Failed(f"CA file {ca_file}: {_describe(exc, '')}") from None

    def _post(self, gen: int, body: bytes, extra: dict[str, str]) -> tuple[int, bytes]:
        url, timeout = self._url, self.settings.timeout
        host = url.hostname or ""
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, url.port, timeout=timeout, context=self._tls_context()
            )
        else:
            conn = http.client.HTTPConnection(host, url.port, timeout=timeout)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            "User-Agent": "mandate",
            **extra,
        }
        timed_out = threading.Event()

        def watchdog() -> None:  # bounds the whole exchange, not each socket operation
            timed_out.set()
            with self._cond:
                if self._conn is conn:
                    self._abort_locked()

        with self._cond:
            if gen != self._gen:
                raise _Failed("dropped")
            self._conn = conn
        timer = threading.Timer(timeout, watchdog)
        timer.daemon = True
        timer.start()
        try:
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
            limit = self.settings.max_response_bytes
            data = bytearray()
            while len(data) <= limit:
                chunk = response.read1(min(_READ_CHUNK, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
            if timed_out.is_set():
                raise TimeoutError
            if len(data) > limit:
                raise _Failed(f"HTTP {response.status} with a body larger than {limit} bytes")
            return response.status, bytes(data)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if timed_out.is_set() or isinstance(exc, TimeoutError):
                raise _Failed(f"timed out after {timeout:g} s") from None
            raise _Failed(_describe(exc, host)) from None
        finally:
            timer.cancel()
            with self._cond:
                if self._conn is conn:
                    self._conn = None
            conn.close()

    def _parse(self, status: int, body: bytes, started: float) -> IssuedToken:
        doc: object
        try:
            doc = json.loads(body)
        except ValueError:  # JSONDecodeError keeps the body: never chain it
            doc = None
        if status != 200:
            code = doc.get("error") if isinstance(doc, dict) else None
            raise _Failed(f"HTTP {status}" + (f" ({code})" if code in _ERROR_CODES else ""))
        if not isinstance(doc, dict):
            raise _Failed("HTTP 200 with a body that is not a JSON object")
        access_token = doc.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise _Failed("HTTP 200 without an access_token")
        if not _HEADER_SAFE.fullmatch(access_token):
            raise _Failed("HTTP 200 with an access_token that is not visible ASCII")
        token_type = doc.get("token_type")
        if not isinstance(token_type, str) or not token_type:
            raise _Failed("HTTP 200 without a token_type")
        issued_type = doc.get("issued_token_type")
        if issued_type is not None and not isinstance(issued_type, str):
            raise _Failed("HTTP 200 with an issued_token_type that is not a string")
        self._accept_types(token_type, issued_type)
        expires_in = self._expires_in(doc.get("expires_in"))
        s = self.settings
        if expires_in is None:
            usable = s.default_ttl
        else:
            usable = min(expires_in - min(s.skew, expires_in / 4), s.max_ttl)
        return IssuedToken(
            access_token=access_token,
            token_type=token_type,
            issued_token_type=issued_type,
            expires_in=expires_in,
            obtained_at=started,
            usable_until=started + usable,
            refresh_at=started + 0.8 * usable,
        )

    @staticmethod
    def _expires_in(raw: object) -> float | None:
        if raw is None:
            return None
        if isinstance(raw, str) and _DIGITS.fullmatch(raw):  # some servers send "3599"
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _Failed("HTTP 200 with an expires_in that is not a number")
        if not math.isfinite(raw) or raw <= 0:
            raise _Failed("HTTP 200 with an expires_in that is not a positive number")
        return float(raw)


def _client_auth(
    form: list[tuple[str, str]],
    headers: dict[str, str],
    client_id: SecretFile | None,
    client_secret: SecretFile | None,
    auth: ClientAuth,
) -> None:
    """RFC 6749 §2.3.1: HTTP Basic with the form-urlencoded id and secret, or both in the
    form; a client id without a secret (a public client) goes in the form."""
    if client_id is None:
        return
    cid = _secret(client_id, "client id")
    if client_secret is None:
        form.append(("client_id", cid))
        return
    secret = _secret(client_secret, "client secret")
    if auth == "client_secret_basic":
        pair = f"{quote(cid, safe='')}:{quote(secret, safe='')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    else:
        form += [("client_id", cid), ("client_secret", secret)]


def _secret(source: SecretFile, what: str) -> str:
    try:
        return source.value(fresh=True)
    except CredentialUnavailable as exc:
        raise _Failed(f"{what}: {exc}") from None


def _check_scopes(name: str, scopes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(scopes, str):
        raise ConfigError(f"credential {name!r}: scopes must be a list of scope names")
    for scope in scopes:
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise ConfigError(f"credential {name!r}: scope {scope!r} is not an OAuth scope token")
    return tuple(scopes)


def _check_auth(name: str, auth: str) -> ClientAuth:
    if auth in ("client_secret_basic", "client_secret_post"):
        return cast(ClientAuth, auth)
    raise ConfigError(
        f"credential {name!r}: client auth {auth!r} is not client_secret_basic or"
        " client_secret_post"
    )


class ClientCredentials(TokenSource):
    """OAuth 2.0 client credentials grant (RFC 6749 §4.4): mandate authenticates as the
    client whose id and secret are in `client_id` and `client_secret` and asks for `scopes`,
    and, if given, `audience` (Auth0 and others) and `resource` (RFC 8707) values."""

    kind = "oauth2ClientCredentials"

    def __init__(
        self,
        name: str,
        *,
        token_url: str,
        client_id: SecretFile,
        client_secret: SecretFile,
        scopes: Sequence[str] = (),
        audience: str | Sequence[str] | None = None,
        resource: str | Sequence[str] | None = None,
        auth: ClientAuth = "client_secret_basic",
        settings: TokenSettings = DEFAULT_SETTINGS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, token_url=token_url, settings=settings, clock=clock)
        self.client_id = client_id
        self.client_secret = client_secret
        self.scopes = _check_scopes(name, scopes)
        self.audience = _values(audience)
        self.resource = _values(resource)
        self.auth = _check_auth(name, auth)

    def _request_form(self) -> tuple[list[tuple[str, str]], dict[str, str]]:
        form = [("grant_type", "client_credentials")]
        if self.scopes:
            form.append(("scope", " ".join(self.scopes)))
        form += [("audience", a) for a in self.audience]
        form += [("resource", r) for r in self.resource]
        headers: dict[str, str] = {}
        _client_auth(form, headers, self.client_id, self.client_secret, self.auth)
        return form, headers


class TokenExchange(TokenSource):
    """OAuth 2.0 token exchange (RFC 8693): mandate trades the `subject_token` (the pod's
    projected, audience-bound service-account token or a SPIFFE JWT-SVID, re-read on every
    request) and optionally an `actor_token` for a token for `audience`/`resource` and
    `scopes`. Client authentication is optional: with `client_id` and `client_secret` as in
    RFC 6749 §2.3.1, with `client_id` alone as a public client, else none (the STS trusts
    the subject token). One source per agent, audience and scope set (the broker keys them).

    `issued_token_type`, when the STS sends it, must equal `requested_token_type`; the
    `token_type` must be Bearer, or N_A when the requested type is not an access token."""

    kind = "tokenExchange"

    def __init__(
        self,
        name: str,
        *,
        token_url: str,
        subject_token: SecretFile,
        subject_token_type: str = JWT_TOKEN_TYPE,
        actor_token: SecretFile | None = None,
        actor_token_type: str | None = JWT_TOKEN_TYPE,
        audience: str | Sequence[str] | None = None,
        resource: str | Sequence[str] | None = None,
        scopes: Sequence[str] = (),
        requested_token_type: str | None = ACCESS_TOKEN_TYPE,
        client_id: SecretFile | None = None,
        client_secret: SecretFile | None = None,
        auth: ClientAuth = "client_secret_basic",
        settings: TokenSettings = DEFAULT_SETTINGS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, token_url=token_url, settings=settings, clock=clock)
        actor_token_type = actor_token_type or JWT_TOKEN_TYPE
        types = [("subject_token_type", subject_token_type), ("actor_token_type", actor_token_type)]
        if requested_token_type is not None:
            types.append(("requested_token_type", requested_token_type))
        for what, value in types:
            if not _TOKEN_TYPE.fullmatch(value):
                raise ConfigError(f"credential {name!r}: {what} {value!r} is not a token type URI")
        if client_secret is not None and client_id is None:
            raise ConfigError(f"credential {name!r}: a client secret needs a client id")
        self.subject_token = subject_token
        self.subject_token_type = subject_token_type
        self.actor_token = actor_token
        self.actor_token_type = actor_token_type
        self.audience = _values(audience)
        self.resource = _values(resource)
        self.scopes = _check_scopes(name, scopes)
        self.requested_token_type = requested_token_type
        self.client_id = client_id
        self.client_secret = client_secret
        self.auth = _check_auth(name, auth)

    def _request_form(self) -> tuple[list[tuple[str, str]], dict[str, str]]:
        form = [
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("subject_token", _secret(self.subject_token, "subject token")),
            ("subject_token_type", self.subject_token_type),
        ]
        if self.actor_token is not None:
            form += [
                ("actor_token", _secret(self.actor_token, "actor token")),
                ("actor_token_type", self.actor_token_type),
            ]
        if self.requested_token_type is not None:
            form.append(("requested_token_type", self.requested_token_type))
        form += [("audience", a) for a in self.audience]
        form += [("resource", r) for r in self.resource]
        if self.scopes:
            form.append(("scope", " ".join(self.scopes)))
        headers: dict[str, str] = {}
        _client_auth(form, headers, self.client_id, self.client_secret, self.auth)
        return form, headers

    def _accept_types(self, token_type: str, issued_token_type: str | None) -> None:
        wanted = self.requested_token_type
        if issued_token_type is not None and wanted is not None and issued_token_type != wanted:
            shown = issued_token_type if issued_token_type in _KNOWN_TOKEN_TYPES else "another"
            raise _Failed(f"HTTP 200 with issued_token_type {shown}, not the requested {wanted}")
        if token_type.upper() == "N_A" and (issued_token_type or wanted) != ACCESS_TOKEN_TYPE:
            return
        super()._accept_types(token_type, issued_token_type)
