"""The HTTP transport's servers at the wire (`http_server`: aiohttp, lean), by raw bytes: HEAD,
pipelined checks, a peer that does not read its answers, bounds and malformed requests.
Whatever arrives, the only 200 is a decided allow; what a server cannot decide on gets a
deny (or, from aiohttp, nothing) and the connection is closed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sidecar.check.http_lean import MAX_BODY, HttpLeanServer, encode
from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.core import Snapshot
from sidecar.settings import HttpServer

from .conftest import HTTP_SERVER_CLASSES

LEDGER = b"ledger.finance.svc.cluster.local"
ALLOWED = b"/mandate/v1/invoices/42"
DENIED = b"/mandate/v1/ledger/admin/x"


@pytest.fixture
def port(snapshot: Snapshot, http_server: HttpServer) -> Iterator[int]:
    server = HTTP_SERVER_CLASSES[http_server](
        CheckPipeline(lambda: snapshot, Identity(agent="billing-agent")), "127.0.0.1", 0
    )
    yield server.start()
    server.stop(0.2)


def check(
    method: bytes = b"GET", path: bytes = ALLOWED, extra: bytes = b"", body: bytes = b""
) -> bytes:
    return (
        method + b" " + path + b" HTTP/1.1\r\nHost: " + LEDGER
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )  # fmt: skip


def exchange(
    port: int, data: bytes, wait: float = 1.0, *, bodies: bool = True
) -> tuple[list[tuple[int, bytes]], bool]:
    """Send ``data``; the answers (status, head) read until the server closes or ``wait``
    passes without a byte, and whether it closed (``bodies``: false for answers to HEAD)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        raw, closed = b"", False
        while True:
            try:
                chunk = s.recv(1 << 20)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
    return parse_answers(raw, bodies=bodies), closed


def parse_answers(raw: bytes, *, bodies: bool = True) -> list[tuple[int, bytes]]:
    answers = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, raw[:200]
        lines = head.split(b"\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
        length = int(fields.get(b"content-length", b"0")) if bodies else 0
        answers.append((int(lines[0].split(b" ")[1]), head.lower()))
        raw = rest[length:]
    return answers


def test_head_is_answered_without_a_body(port: int) -> None:
    """A HEAD call (Envoy forwards the call's method) gets its answer's headers, the deny's
    Content-Length among them, and no body; the connection serves on."""
    data = check(b"HEAD", DENIED) + check(b"HEAD")
    answers, closed = exchange(port, data, wait=0.5, bodies=False)
    assert [status for status, _ in answers] == [403, 403]  # no rule allows HEAD
    assert b"x-mandate-code: denied_by_rule" in answers[0][1]
    assert b"content-length: 0" not in answers[0][1]
    assert not closed


def test_pipelined_checks_are_answered_in_order(port: int) -> None:
    data = check() + check(path=DENIED) + check(b"POST", body=b"{}") + check()
    answers, closed = exchange(port, data, wait=0.5)
    assert [status for status, _ in answers] == [200, 403, 403, 200]
    assert not closed


def test_nothing_after_connection_close_is_answered(port: int, http_server: HttpServer) -> None:
    """(aiohttp's parser refuses the read whole: the first check gets a deny.)"""
    answers, closed = exchange(port, check(extra=b"Connection: close\r\n") + check(path=DENIED))
    assert [status for status, _ in answers] == [200 if http_server == "lean" else 403]
    assert closed


def test_a_chunked_bodys_trailers_are_not_headers_of_the_call(port: int) -> None:
    """A trailer `x-mandate-purpose` would select an unknown purpose (a deny) if it counted."""
    data = check(extra=b"Transfer-Encoding: chunked\r\n").replace(b"Content-Length: 0\r\n", b"")
    answers, _ = exchange(port, data + b"0\r\nx-mandate-purpose: nope\r\n\r\n", wait=0.5)
    assert [status for status, _ in answers] == [200]


def test_a_peer_that_does_not_read_is_not_read_either(port: int) -> None:
    """Thousands of pipelined checks sent without reading the answers: every one is answered,
    in order (the server stops reading while its answers cannot be sent)."""
    n = 3000
    data = b"".join(check(path=ALLOWED if i % 2 else DENIED) for i in range(n))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        time.sleep(0.5)  # the server's socket buffers fill up first
        raw = b""
        while raw.count(b"HTTP/1.1 ") < n:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {raw.count(b'HTTP/1.1 ')} answers"
            raw += chunk
        sender.join(10)
    statuses = [status for status, _ in parse_answers(raw)]
    assert statuses == [200 if i % 2 else 403 for i in range(n)]


MALFORMED = {
    "content-length-and-chunked": check(extra=b"Transfer-Encoding: chunked\r\n", body=b"0\r\n\r\n"),
    "two-content-lengths": check(extra=b"Content-Length: 5\r\n"),
    "not-http": b"\x00\x01\x02 hello\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "obs-fold": check(extra=b"X-A: 1\r\n 2\r\n"),
    "bare-lf": b"GET " + ALLOWED + b" HTTP/1.1\nHost: " + LEDGER + b"\nContent-Length: 0\n\n",
    "space-in-name": check(extra=b"X A: 1\r\n"),
    "control-in-value": check(extra=b"X-A: a\x01b\r\n"),
    "nul-in-value": check(extra=b"X-A: a\x00b\r\n"),
    "cr-in-target": b"GET " + ALLOWED + b"\rX HTTP/1.1\r\nHost: " + LEDGER + b"\r\n\r\n",
    "http-0.9": b"GET " + ALLOWED + b"\r\n\r\n",
    "600-headers": check(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(600))),
    "300-KiB-header": check(extra=b"X-Big: " + b"a" * 300_000 + b"\r\n"),
    "bad-chunk-size": check(
        b"POST", extra=b"Transfer-Encoding: chunked\r\n", body=b"zz\r\n"
    ).replace(b"Content-Length: 0\r\n", b""),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_request_is_never_allowed_and_closes_the_connection(
    port: int, http_server: HttpServer, data: bytes
) -> None:
    answers, closed = exchange(port, data)
    assert closed
    assert all(status in (400, 403) for status, _ in answers), answers
    if http_server == "lean":  # a deny of mandate's, audited
        assert [status for status, _ in answers] == [403]
        assert b"x-mandate-code: bad_request" in answers[0][1]
        assert b"connection: close" in answers[0][1]


def test_a_malformed_request_after_a_good_one(port: int, http_server: HttpServer) -> None:
    """In one read: the lean server answers the first and denies the second; aiohttp's
    parser refuses the read whole (the first gets the deny)."""
    answers, closed = exchange(port, check() + MALFORMED["two-content-lengths"])
    statuses = [status for status, _ in answers]
    assert statuses == ([200, 403] if http_server == "lean" else [403])
    assert closed


def test_a_body_over_the_bound_is_denied(port: int, http_server: HttpServer) -> None:
    answers, _ = exchange(port, check(b"POST", body=b"x" * (MAX_BODY + 1)))
    assert [status for status, _ in answers] == [403]
    code = b"bad_request" if http_server == "lean" else b"internal_error"
    assert b"x-mandate-code: " + code in answers[0][1]


def test_the_bounds_leave_room_for_what_envoy_sends(port: int) -> None:
    """Envoy's own limits (60 KiB of headers, 100 headers; 64 KiB of body in envoy/) pass."""
    extra = b"X-Big: " + b"a" * 60_000 + b"\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    answers, _ = exchange(port, check(extra=extra) + check(b"POST", body=b"{" * 65536), wait=0.5)
    assert [status for status, _ in answers] == [200, 403]


# -- the lean server alone -------------------------------------------------------------


@pytest.mark.parametrize("http_server", ["lean"])
@pytest.mark.parametrize(
    "extra",
    [b"Connection: Upgrade\r\nUpgrade: websocket\r\n", b"Connection: upgrade\r\nUpgrade: h2c\r\n"],
)
def test_the_lean_server_decides_no_upgrade(port: int, extra: bytes) -> None:
    """llhttp hands what follows an Upgrade request's head on as the upgraded stream, its
    body included: a tunnel is not a check (aiohttp's server decides it, body unread)."""
    answers, closed = exchange(port, check(extra=extra))
    assert [status for status, _ in answers] == [403] and closed
    assert b"x-mandate-code: bad_request" in answers[0][1]


@pytest.mark.parametrize("http_server", ["lean"])
@pytest.mark.parametrize(
    ("method", "target"),
    [(b"CONNECT", b"ledger:443"), (b"CONNECT", ALLOWED), (b"X" * 129, ALLOWED)],
)
def test_the_lean_server_refuses_a_connect_or_a_long_method(
    port: int, method: bytes, target: bytes
) -> None:
    """Envoy asks about a tunnel with `;connect` in the path, never with a CONNECT request."""
    for data in (check(method, target), check() + check(method, target)):  # read start, inside
        answers, closed = exchange(port, data)
        assert [status for status, _ in answers][-1:] == [403] and closed
        assert b"x-mandate-code: bad_request" in answers[-1][1]


@pytest.mark.parametrize("value", ["a\r\nb", "a\nb", "a\rb", "a\0b"])
def test_a_header_that_would_split_the_answer_is_refused(value: str) -> None:
    """The pipeline answers its fallback deny when encoding raises."""
    with pytest.raises(ValueError):
        encode(200, {"x-mandate-agent": value}, b"", head=False, close=False)
    with pytest.raises(ValueError):
        encode(200, {f"x-{value}": "v"}, b"", head=False, close=False)
    assert encode(200, {"x-mandate-agent": "a"}, b"", head=False, close=True) == (
        b"HTTP/1.1 200 OK\r\nx-mandate-agent: a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )


def test_the_lean_server_closes_idle_connections(snapshot: Snapshot) -> None:
    server = HttpLeanServer(
        CheckPipeline(lambda: snapshot, Identity(agent="billing-agent")), "127.0.0.1", 0
    )
    port = server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(check())
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            asyncio.run_coroutine_threadsafe(server._sweep(0.05, 0.2), server._thread.loop)
            started = time.monotonic()
            assert s.recv(65536) == b""  # closed by the sweep
            assert 0.1 < time.monotonic() - started < 3
    finally:
        server.stop(0.2)
