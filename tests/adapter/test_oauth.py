"""OAuth client credentials and RFC 8693 token exchange against a real token endpoint: an
aiohttp server on 127.0.0.1 (its own event loop thread) that records every request's form and
headers and answers what the test says. Expiry and refresh run on an injected clock; real
waits are short and bounded."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

from sidecar.credentials.oauth import (
    ACCESS_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE_GRANT,
    ClientCredentials,
    TokenExchange,
    TokenSettings,
    TokenSource,
)
from sidecar.credentials.secrets import SecretFile
from sidecar.errors import ConfigError, CredentialUnavailable
from sidecar.loopthread import LoopThread
from tests.unit.test_credential_secrets import KubeletSecret

FAST = TokenSettings(timeout=2.0, backoff_initial=0.05, backoff_max=0.2)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Seen:
    """One request the token endpoint received."""

    method: str
    path: str
    headers: dict[str, str]
    form: list[tuple[str, str]]


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    delay: float = 0.0
    gate: threading.Event | None = None  # answer only once set


def token_reply(n: int, expires_in: Any = 3600, **extra: Any) -> Reply:
    doc = {"access_token": f"tok-{n}", "token_type": "Bearer", **extra}
    if expires_in is not None:
        doc["expires_in"] = expires_in
    return Reply(body=doc)


@dataclass
class TokenEndpoint:
    """A token endpoint on 127.0.0.1 (port 0 unless given), on its own loop thread."""

    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    respond: Callable[[int, Seen], Reply] = field(default=lambda n, seen: token_reply(n))
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._thread = LoopThread("token-endpoint")
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/oauth2/token"

    @property
    def hits(self) -> int:
        return len(self.seen)

    def wait_hits(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.hits < n:
            assert time.monotonic() < deadline, f"{self.hits} requests, expected {n}"
            time.sleep(0.005)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        seen = Seen(
            request.method,
            request.path_qs,
            dict(request.headers),
            parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw)),
        )
        self.seen.append(seen)
        reply = self.respond(len(self.seen), seen)
        if reply.gate is not None:
            await asyncio.to_thread(reply.gate.wait, 10)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        body = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
        return web.Response(status=reply.status, body=body, content_type="application/json")

    def start(self) -> TokenEndpoint:
        app = web.Application()
        app.router.add_post("/oauth2/token", self._handle)

        async def setup() -> None:
            self._runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
            await site.start()
            self.port = self._runner.addresses[0][1]

        self._thread.start(setup)
        return self

    def stop(self) -> None:
        async def cleanup() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        self._thread.stop(cleanup)


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    server = TokenEndpoint().start()
    yield server
    server.stop()


@pytest.fixture
def sources() -> Iterator[list[TokenSource]]:
    """Token sources a test made: closed at its end, whatever happened."""
    made: list[TokenSource] = []
    yield made
    for source in made:
        source.close()


def secret_file(path: Path, value: str) -> SecretFile:
    path.write_text(value + "\n")
    return SecretFile(path, recheck_every=0)


def client_credentials(
    sources: list[TokenSource], tmp_path: Path, url: str, **kwargs: Any
) -> ClientCredentials:
    kwargs.setdefault("client_id", secret_file(tmp_path / "client-id", "mandate-client"))
    kwargs.setdefault("client_secret", secret_file(tmp_path / "client-secret", "s3cret"))
    kwargs.setdefault("settings", FAST)
    source = ClientCredentials("billing/ledger", token_url=url, **kwargs)
    sources.append(source)
    return source


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


# --- the requests, exactly --------------------------------------------------------------


def test_client_credentials_basic_auth_form(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    source = client_credentials(
        sources,
        tmp_path,
        endpoint.url,
        client_id=secret_file(tmp_path / "id", "client:1"),
        client_secret=secret_file(tmp_path / "secret", "p@ss w/+rd"),
        scopes=["ledger.read", "ledger.write"],
        audience="https://ledger.example",
        resource="https://ledger.example/v1",
    )
    assert source.token(wait=5) == "tok-1"
    (seen,) = endpoint.seen
    assert seen.method == "POST"
    assert seen.path == "/oauth2/token"
    assert seen.form == [
        ("grant_type", "client_credentials"),
        ("scope", "ledger.read ledger.write"),
        ("audience", "https://ledger.example"),
        ("resource", "https://ledger.example/v1"),
    ]
    # RFC 6749 2.3.1: id and secret form-urlencoded, then Basic
    assert seen.headers["Authorization"] == basic("client%3A1", "p%40ss%20w%2F%2Brd")
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert seen.headers["Accept"] == "application/json"


def test_client_credentials_post_auth_form(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    source = client_credentials(sources, tmp_path, endpoint.url, auth="client_secret_post")
    assert source.token(wait=5) == "tok-1"
    (seen,) = endpoint.seen
    assert seen.form == [
        ("grant_type", "client_credentials"),
        ("client_id", "mandate-client"),
        ("client_secret", "s3cret"),
    ]
    assert "Authorization" not in seen.headers


def test_proxy_variables_are_ignored(
    endpoint: TokenEndpoint,
    sources: list[TokenSource],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The token endpoint is reached directly, never through the pod's egress proxy."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    source = client_credentials(sources, tmp_path, endpoint.url)
    assert source.token(wait=5) == "tok-1"


def test_token_exchange_form(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    endpoint.respond = lambda n, seen: token_reply(n, issued_token_type=ACCESS_TOKEN_TYPE)
    source = TokenExchange(
        "billing/stripe",
        token_url=endpoint.url,
        subject_token=secret_file(tmp_path / "sa-token", "eyJsubject.jwt.sig"),
        actor_token=secret_file(tmp_path / "svid", "eyJactor.jwt.sig"),
        actor_token_type=JWT_TOKEN_TYPE,
        audience="https://api.stripe.example",
        resource=["https://api.stripe.example/v1", "https://files.stripe.example"],
        scopes=["charges:read"],
        settings=FAST,
    )
    sources.append(source)
    assert source.token(wait=5) == "tok-1"
    (seen,) = endpoint.seen
    assert seen.form == [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", "eyJsubject.jwt.sig"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("actor_token", "eyJactor.jwt.sig"),
        ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
        ("audience", "https://api.stripe.example"),
        ("resource", "https://api.stripe.example/v1"),
        ("resource", "https://files.stripe.example"),
        ("scope", "charges:read"),
    ]
    assert "Authorization" not in seen.headers  # no client authentication asked for
    issued = source.issued()
    assert issued is not None
    assert (issued.token_type, issued.issued_token_type) == ("Bearer", ACCESS_TOKEN_TYPE)


def test_token_exchange_with_client_auth(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    subject = secret_file(tmp_path / "sa-token", "eyJsubject")
    confidential = TokenExchange(
        "a/confidential",
        token_url=endpoint.url,
        subject_token=subject,
        client_id=secret_file(tmp_path / "id", "sts-client"),
        client_secret=secret_file(tmp_path / "secret", "sts-secret"),
        requested_token_type=None,
        settings=FAST,
    )
    public = TokenExchange(
        "a/public",
        token_url=endpoint.url,
        subject_token=subject,
        client_id=secret_file(tmp_path / "id2", "public-client"),
        settings=FAST,
    )
    sources += [confidential, public]
    assert confidential.token(wait=5) == "tok-1"
    assert public.token(wait=5) == "tok-2"
    first, second = endpoint.seen
    assert first.headers["Authorization"] == basic("sts-client", "sts-secret")
    assert first.form == [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", "eyJsubject"),
        ("subject_token_type", JWT_TOKEN_TYPE),
    ]
    assert "Authorization" not in second.headers
    assert second.form[-1] == ("client_id", "public-client")


# --- caching and refresh ----------------------------------------------------------------


def test_first_token_is_fetched_once_and_cached(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    source = client_credentials(sources, tmp_path, endpoint.url)
    assert source.token(wait=5) == "tok-1"
    for _ in range(1000):
        assert source.token() == "tok-1"
    time.sleep(0.05)
    assert endpoint.hits == 1
    status = source.status()
    assert status.has_token and status.failures == 0 and status.last_error is None


def test_without_wait_the_first_call_fails_fast_and_starts_the_fetch(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    gate = threading.Event()
    endpoint.respond = lambda n, seen: Reply(body=token_reply(n).body, gate=gate)
    source = client_credentials(sources, tmp_path, endpoint.url)
    started = time.monotonic()
    with pytest.raises(CredentialUnavailable, match="no token yet"):
        source.token()
    with pytest.raises(CredentialUnavailable, match="no token yet"):
        source.token(wait=0.05)
    assert time.monotonic() - started < 1.0
    endpoint.wait_hits(1)
    gate.set()
    assert source.token(wait=5) == "tok-1"
    assert endpoint.hits == 1  # the waiting calls shared the one fetch


def test_prefetch_fills_the_cache_without_a_caller(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    source = client_credentials(sources, tmp_path, endpoint.url)
    source.prefetch()
    eventually(lambda: source.status().has_token)
    assert source.token() == "tok-1"
    assert endpoint.hits == 1


def test_refresh_before_expiry(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    clock = FakeClock()
    endpoint.respond = lambda n, seen: token_reply(n, expires_in=100)
    source = client_credentials(sources, tmp_path, endpoint.url, clock=clock)
    t0 = clock.now
    assert source.token(wait=5) == "tok-1"
    issued = source.issued()
    assert issued is not None
    # usable until 100 - min(30, 100/4) = 75 s; refreshed at 80 % of that
    assert (issued.obtained_at, issued.usable_until, issued.refresh_at) == (t0, t0 + 75, t0 + 60)
    clock.now = t0 + 59.9
    assert source.token() == "tok-1"
    time.sleep(0.05)
    assert endpoint.hits == 1
    clock.now = t0 + 60
    assert source.token() == "tok-1"  # still usable: served at once, refreshed behind it
    endpoint.wait_hits(2)
    eventually(lambda: source.token() == "tok-2")
    issued = source.issued()
    assert issued is not None and issued.usable_until == t0 + 60 + 75
    clock.now = t0 + 130
    assert source.token() == "tok-2"


def test_refresh_failure_serves_the_token_until_unusable(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    clock = FakeClock()
    endpoint.respond = lambda n, seen: (
        token_reply(n, expires_in=100)
        if n == 1
        else Reply(503, {"error": "temporarily_unavailable"})
    )
    source = client_credentials(sources, tmp_path, endpoint.url, clock=clock)
    t0 = clock.now
    assert source.token(wait=5) == "tok-1"
    clock.now = t0 + 61
    assert source.token() == "tok-1"
    eventually(lambda: source.status().failures == 1)
    assert source.token() == "tok-1"  # the refresh failed; the token is still usable
    clock.now = t0 + 75
    with pytest.raises(CredentialUnavailable) as err:
        source.token()
    assert "HTTP 503 (temporarily_unavailable)" in str(err.value)


@pytest.mark.parametrize(
    ("expires_in", "usable"),
    [
        (None, 60.0),  # no expires_in: the bounded default (agentgateway: 300 s)
        (3600, 3570.0),
        ("120", 90.0),  # a number in a string, as some servers send it
        (8, 6.0),  # short: the skew shrinks to a quarter of the lifetime
        (10**9, 3600.0),  # capped at max_ttl
    ],
)
def test_cache_lifetime(
    endpoint: TokenEndpoint,
    sources: list[TokenSource],
    tmp_path: Path,
    expires_in: Any,
    usable: float,
) -> None:
    clock = FakeClock()
    endpoint.respond = lambda n, seen: token_reply(n, expires_in=expires_in)
    source = client_credentials(sources, tmp_path, endpoint.url, clock=clock)
    t0 = clock.now
    assert source.token(wait=5) == "tok-1"
    issued = source.issued()
    assert issued is not None
    assert issued.usable_until - t0 == pytest.approx(usable)
    assert issued.refresh_at - t0 == pytest.approx(0.8 * usable)


def test_without_expires_in_the_token_is_not_served_past_the_default(
    sources: list[TokenSource], tmp_path: Path
) -> None:
    clock = FakeClock()
    server = TokenEndpoint(respond=lambda n, seen: token_reply(n, expires_in=None)).start()
    try:
        source = client_credentials(sources, tmp_path, server.url, clock=clock)
        t0 = clock.now
        assert source.token(wait=5) == "tok-1"
    finally:
        server.stop()  # no refresh can succeed now
    clock.now = t0 + 59.9
    assert source.token() == "tok-1"
    eventually(lambda: source.status().failures >= 1)
    clock.now = t0 + 60
    with pytest.raises(CredentialUnavailable, match="connection refused"):
        source.token()


# --- an endpoint that is down, slow or wrong --------------------------------------------


def test_endpoint_down_then_back(sources: list[TokenSource], tmp_path: Path) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/oauth2/token"
    source = client_credentials(sources, tmp_path, url)
    started = time.monotonic()
    with pytest.raises(CredentialUnavailable) as err:
        source.token(wait=5)
    assert time.monotonic() - started < 1.0
    assert str(err.value).startswith(
        "credential 'billing/ledger' (oauth2ClientCredentials): token endpoint "
        f"http://127.0.0.1:{port}/oauth2/token: connection refused; next attempt in "
    )
    with pytest.raises(CredentialUnavailable, match="next attempt in") as err:
        source.token(wait=5)  # backing off: at once, whatever the wait
    assert "connection refused" in str(err.value)
    server = TokenEndpoint(port=port).start()
    try:
        eventually(lambda: source.status().has_token)  # the background retry finds it
        assert source.token() == "tok-1"
        assert source.status().failures == 0
    finally:
        server.stop()


def test_slow_endpoint_times_out(sources: list[TokenSource], tmp_path: Path) -> None:
    server = TokenEndpoint(respond=lambda n, seen: Reply(body=token_reply(n).body, delay=3)).start()
    try:
        settings = TokenSettings(timeout=0.3, backoff_initial=5, backoff_max=5)
        source = client_credentials(sources, tmp_path, server.url, settings=settings)
        started = time.monotonic()
        with pytest.raises(CredentialUnavailable, match=r"timed out after 0\.3 s"):
            source.token(wait=2)
        assert time.monotonic() - started < 1.5
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        (
            Reply(400, {"error": "invalid_scope", "error_description": "no"}),
            "HTTP 400 (invalid_scope)",
        ),
        (Reply(401, {"error": "invalid_client"}), "HTTP 401 (invalid_client)"),
        (Reply(403, {"error": "bad code with spaces"}), "HTTP 403"),
        (Reply(400, {"error": "not_a_registered_code"}), "HTTP 400"),
        (Reply(500, b"<html>oops</html>"), "HTTP 500"),
        (Reply(302, b""), "HTTP 302"),
        (Reply(200, b"{not json"), "HTTP 200 with a body that is not a JSON object"),
        (Reply(200, ["tok"]), "HTTP 200 with a body that is not a JSON object"),
        (Reply(200, {"token_type": "Bearer"}), "HTTP 200 without an access_token"),
        (
            Reply(200, {"access_token": "", "token_type": "Bearer"}),
            "HTTP 200 without an access_token",
        ),
        (
            Reply(200, {"access_token": "a\r\nX-Evil: 1", "token_type": "Bearer"}),
            "not visible ASCII",
        ),
        (Reply(200, {"access_token": "t"}), "HTTP 200 without a token_type"),
        (Reply(200, {"access_token": "t", "token_type": "mac"}), "token_type that is not Bearer"),
        (
            Reply(200, {"access_token": "t", "token_type": "Bearer", "expires_in": "soon"}),
            "expires_in that is not a number",
        ),
        (
            Reply(200, {"access_token": "t", "token_type": "Bearer", "expires_in": -5}),
            "not a positive number",
        ),
        (
            Reply(200, {"access_token": "t", "token_type": "Bearer", "expires_in": True}),
            "not a number",
        ),
        (Reply(200, b"{" + b" " * 70_000 + b"}"), "HTTP 200 with a body larger than 65536 bytes"),
    ],
)
def test_bad_answers_are_unavailable(
    sources: list[TokenSource], tmp_path: Path, reply: Reply, what: str
) -> None:
    server = TokenEndpoint(respond=lambda n, seen: reply).start()
    try:
        source = client_credentials(sources, tmp_path, server.url)
        with pytest.raises(CredentialUnavailable) as err:
            source.token(wait=5)
        message = str(err.value)
        assert message.startswith(
            f"credential 'billing/ledger' (oauth2ClientCredentials): token endpoint {server.url}: "
        )
        assert what in message
        assert err.value.code == "credential_unavailable"
    finally:
        server.stop()


def test_exchange_refuses_another_issued_token_type(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    endpoint.respond = lambda n, seen: token_reply(n, issued_token_type=JWT_TOKEN_TYPE)
    source = TokenExchange(
        "a/x", token_url=endpoint.url, subject_token=secret_file(tmp_path / "t", "s"), settings=FAST
    )
    sources.append(source)
    with pytest.raises(
        CredentialUnavailable,
        match=f"issued_token_type {JWT_TOKEN_TYPE}, not the requested {ACCESS_TOKEN_TYPE}",
    ):
        source.token(wait=5)


def test_missing_secret_file_is_named_and_nothing_is_sent(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-secret"
    source = client_credentials(sources, tmp_path, endpoint.url, client_secret=SecretFile(missing))
    with pytest.raises(CredentialUnavailable) as err:
        source.token(wait=5)
    assert str(err.value).startswith(
        "credential 'billing/ledger' (oauth2ClientCredentials): client secret: "
        f"secret file {missing}: missing; next attempt in "
    )
    assert endpoint.hits == 0


# --- drop(): revocation -----------------------------------------------------------------


def test_drop_forgets_at_once_and_the_next_call_fetches_anew(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    source = client_credentials(sources, tmp_path, endpoint.url)
    assert source.token(wait=5) == "tok-1"
    source.drop()
    assert source.issued() is None
    assert not source.status().has_token
    with pytest.raises(CredentialUnavailable, match="no token yet"):
        source.token()
    assert source.token(wait=5) == "tok-2"
    assert endpoint.hits == 2


def test_dropped_source_stays_idle(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    clock = FakeClock()
    endpoint.respond = lambda n, seen: token_reply(n, expires_in=100)
    source = client_credentials(sources, tmp_path, endpoint.url, clock=clock)
    assert source.token(wait=5) == "tok-1"
    source.drop()
    clock.now += 1000  # long past any refresh
    time.sleep(0.1)
    assert endpoint.hits == 1  # a revoked agent's credential is not fetched again by itself


def test_fetch_in_flight_at_drop_is_aborted_and_discarded(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    gate = threading.Event()
    endpoint.respond = lambda n, seen: Reply(
        body=token_reply(n).body, gate=gate if n == 1 else None
    )
    source = client_credentials(sources, tmp_path, endpoint.url)
    with pytest.raises(CredentialUnavailable):
        source.token()
    endpoint.wait_hits(1)
    source.drop()
    gate.set()
    eventually(lambda: not source.status().fetching)
    assert source.issued() is None
    assert source.token(wait=5) == "tok-2"


def test_result_of_a_dropped_fetch_is_not_stored(
    endpoint: TokenEndpoint,
    sources: list[TokenSource],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Even when the response arrives in full (the abort came too late), it is discarded."""
    gate = threading.Event()
    endpoint.respond = lambda n, seen: Reply(
        body=token_reply(n).body, gate=gate if n == 1 else None
    )
    source = client_credentials(sources, tmp_path, endpoint.url)
    monkeypatch.setattr(source, "_abort_locked", lambda: None)
    with pytest.raises(CredentialUnavailable):
        source.token()
    endpoint.wait_hits(1)
    source.drop()
    gate.set()
    eventually(lambda: not source.status().fetching)
    assert source.issued() is None
    with pytest.raises(CredentialUnavailable):
        source.token()
    assert source.token(wait=5) == "tok-2"


def test_a_waiting_call_fails_on_drop(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    gate = threading.Event()
    endpoint.respond = lambda n, seen: Reply(body=token_reply(n).body, gate=gate)
    source = client_credentials(sources, tmp_path, endpoint.url)
    outcome: list[BaseException | str] = []

    def call() -> None:
        try:
            outcome.append(source.token(wait=10))
        except CredentialUnavailable as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    endpoint.wait_hits(1)
    source.drop()
    caller.join(5)
    gate.set()
    (result,) = outcome
    assert isinstance(result, CredentialUnavailable)
    assert "dropped while waiting" in str(result)


def test_close_stops_the_thread(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    source = client_credentials(sources, tmp_path, endpoint.url)
    assert source.token(wait=5) == "tok-1"
    thread = source._thread
    source.close()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(CredentialUnavailable, match="closed"):
        source.token()


# --- rotation ---------------------------------------------------------------------------


def test_rotated_client_secret_is_used_on_the_next_fetch(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    clock = FakeClock()
    endpoint.respond = lambda n, seen: token_reply(n, expires_in=100)
    volume = KubeletSecret(tmp_path / "oauth", {"client-id": "cid", "client-secret": "old-secret"})
    source = client_credentials(
        sources,
        tmp_path,
        endpoint.url,
        client_id=SecretFile(
            volume.path("client-id")
        ),  # the default 1 s recheck: fetches look afresh
        client_secret=SecretFile(volume.path("client-secret")),
        clock=clock,
    )
    assert source.token(wait=5) == "tok-1"
    volume.update({"client-id": "cid", "client-secret": "new-secret"})
    clock.now += 60  # refresh due
    assert source.token() == "tok-1"
    endpoint.wait_hits(2)
    assert [s.headers["Authorization"] for s in endpoint.seen] == [
        basic("cid", "old-secret"),
        basic("cid", "new-secret"),
    ]


def test_rotated_subject_token_is_exchanged_after_drop(
    endpoint: TokenEndpoint, sources: list[TokenSource], tmp_path: Path
) -> None:
    volume = KubeletSecret(tmp_path / "token", {"token": "sa-token-1"})
    source = TokenExchange(
        "a/x", token_url=endpoint.url, subject_token=SecretFile(volume.path("token")), settings=FAST
    )
    sources.append(source)
    assert source.token(wait=5) == "tok-1"
    volume.update({"token": "sa-token-2"})
    source.drop()
    assert source.token(wait=5) == "tok-2"
    assert [dict(s.form)["subject_token"] for s in endpoint.seen] == ["sa-token-1", "sa-token-2"]


# --- hygiene ----------------------------------------------------------------------------

CANARY_SECRET = "canary-client-secret-4d1f"
CANARY_SUBJECT = "canary-subject-token-9a2e"
CANARY_ACTOR = "canary-actor-token-77c0"
CANARY_TOKEN = "canary-access-token-b3b8"
CANARIES = (CANARY_SECRET, CANARY_SUBJECT, CANARY_ACTOR, CANARY_TOKEN)


def test_no_secret_or_token_in_messages_logs_or_reprs(
    sources: list[TokenSource], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every failure an endpoint can cause, with an endpoint that echoes what it got into
    its error and its malformed answers: no canary in an exception, a log record or a repr."""
    caplog.set_level(logging.DEBUG)
    echo = f"{CANARY_SECRET} {CANARY_SUBJECT} {CANARY_ACTOR} {CANARY_TOKEN}"
    replies = [
        Reply(200, {"access_token": CANARY_TOKEN, "token_type": "Bearer", "expires_in": 60}),
        Reply(400, {"error": "invalid_grant", "error_description": echo}),
        Reply(401, {"error": echo}),
        Reply(401, {"error": CANARY_TOKEN}),  # shaped like an error code, but not one
        Reply(500, echo.encode()),
        Reply(200, f'{{"access_token": "{CANARY_TOKEN}", '.encode()),
        Reply(200, {"access_token": CANARY_TOKEN, "token_type": CANARY_TOKEN}),
        Reply(
            200, {"access_token": CANARY_TOKEN, "token_type": "Bearer", "expires_in": CANARY_TOKEN}
        ),
        Reply(
            200,
            {
                "access_token": CANARY_TOKEN,
                "token_type": "Bearer",
                "issued_token_type": CANARY_TOKEN,
            },
        ),
        Reply(200, {"access_token": CANARY_TOKEN + "\n", "token_type": "Bearer"}),
        Reply(200, {"access_token": CANARY_TOKEN, "token_type": "Bearer", "expires_in": 60}),
    ]
    server = TokenEndpoint(respond=lambda n, seen: replies[min(n, len(replies)) - 1]).start()
    messages: list[str] = []
    try:
        (tmp_path / "sa").write_text(CANARY_SUBJECT)
        (tmp_path / "actor").write_text(CANARY_ACTOR)
        (tmp_path / "secret").write_text(CANARY_SECRET)
        (tmp_path / "id").write_text("client")
        for auth in ("client_secret_basic", "client_secret_post"):
            source = TokenExchange(
                "a/canary",
                token_url=server.url,
                subject_token=SecretFile(tmp_path / "sa"),
                actor_token=SecretFile(tmp_path / "actor"),
                client_id=SecretFile(tmp_path / "id"),
                client_secret=SecretFile(tmp_path / "secret"),
                auth=auth,
                settings=FAST,
            )
            sources.append(source)
            for _ in range(len(replies)):
                try:
                    assert source.token(wait=5) == CANARY_TOKEN
                    messages += [repr(source), repr(source.issued()), repr(source.status())]
                except CredentialUnavailable as exc:
                    messages += ["".join(traceback.format_exception(exc)), repr(exc)]
                source.drop()  # each round a fresh fetch, no backoff
            source.close()
            with pytest.raises(CredentialUnavailable) as err:
                source.token()
            messages.append("".join(traceback.format_exception(err.value)))
    finally:
        server.stop()
    assert any("HTTP 400 (invalid_grant)" in m for m in messages)
    records = [r.getMessage() for r in caplog.records] + [caplog.text]
    for text in messages + records:
        for canary in CANARIES:
            assert canary not in text


def test_bad_configuration_is_refused_without_echoing_secrets(tmp_path: Path) -> None:
    secret = secret_file(tmp_path / "s", "x")

    def make(url: str, **kwargs: Any) -> ClientCredentials:
        return ClientCredentials(
            "a/bad", token_url=url, client_id=secret, client_secret=secret, **kwargs
        )

    with pytest.raises(ConfigError, match="must be https://"):
        make("http://idp.example/token")
    with pytest.raises(ConfigError, match="must be https://"):
        make("ftp://127.0.0.1/token")
    with pytest.raises(ConfigError, match="userinfo") as err:
        make(f"https://user:{CANARY_SECRET}@idp.example/token")
    assert CANARY_SECRET not in str(err.value)
    with pytest.raises(ConfigError, match="scope"):
        make("https://idp.example/token", scopes=["two words"])
    with pytest.raises(ConfigError, match="scopes must be a list"):
        make("https://idp.example/token", scopes="read")
    with pytest.raises(ConfigError, match="client auth"):
        make("https://idp.example/token", auth="private_key_jwt")
    with pytest.raises(ConfigError, match="timeout"):
        TokenSettings(timeout=0)
    # plain http on the loopback address is allowed, as the profile validator allows it
    for url in ("http://127.0.0.1:8080/t", "http://localhost/t", "http://[::1]:9/t"):
        assert make(url).endpoint == url


# --- TLS --------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_file: Path
    server_context: ssl.SSLContext


def make_pki(tmp_path: Path, *, san_ip: str | None, san_dns: str | None = None) -> Pki:
    """A test CA and a server certificate it signed, for the SANs given."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mandate test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[Any] = []
    if san_ip:
        names.append(x509.IPAddress(ipaddress.ip_address(san_ip)))
    if san_dns:
        names.append(x509.DNSName(san_dns))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token endpoint")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return Pki(ca_file, context)


def test_tls_with_the_configured_ca(sources: list[TokenSource], tmp_path: Path) -> None:
    pki = make_pki(tmp_path, san_ip="127.0.0.1")
    server = TokenEndpoint(ssl_context=pki.server_context).start()
    try:
        trusted = client_credentials(
            sources,
            tmp_path,
            server.url,
            settings=TokenSettings(ca_file=str(pki.ca_file), backoff_initial=0.05),
        )
        assert trusted.token(wait=5) == "tok-1"
        system = client_credentials(sources, tmp_path, server.url)  # system CAs only
        with pytest.raises(CredentialUnavailable, match="TLS certificate not accepted"):
            system.token(wait=5)
    finally:
        server.stop()
    assert server.hits == 1


def test_tls_name_mismatch_is_refused(sources: list[TokenSource], tmp_path: Path) -> None:
    pki = make_pki(tmp_path, san_ip=None, san_dns="idp.example")
    server = TokenEndpoint(ssl_context=pki.server_context).start()
    try:
        source = client_credentials(
            sources, tmp_path, server.url, settings=TokenSettings(ca_file=str(pki.ca_file))
        )
        with pytest.raises(CredentialUnavailable, match="TLS certificate not accepted") as err:
            source.token(wait=5)
        assert "127.0.0.1" in str(err.value)  # OpenSSL names the mismatch
    finally:
        server.stop()
    assert server.hits == 0


def test_missing_ca_file_is_named(sources: list[TokenSource], tmp_path: Path) -> None:
    missing = tmp_path / "no-ca.pem"
    source = client_credentials(
        sources,
        tmp_path,
        "https://127.0.0.1:1/token",
        settings=TokenSettings(ca_file=str(missing)),
    )
    with pytest.raises(CredentialUnavailable, match=f"CA file {missing}"):
        source.token(wait=5)
