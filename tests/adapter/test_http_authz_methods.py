"""The HTTP transport and methods llhttp (the C parser of aiohttp and httptools) does not know
(issue 15), with each server (`http_server`): asked the way Envoy asks, one check at a time
on a kept-alive connection, by raw bytes so that the split of a message into reads is the
test's. A method llhttp refuses (`get`, `FOO`) at the start of a message is decided by
mandate (aiohttp's server then closes the connection: its Python parser is slow; the lean
server keeps it). Bytes aiohttp refuses anywhere else, or anything it cannot parse, get a
`bad_request` deny that quotes nothing of the request; the lean server reads the method token
across reads itself. Also: the header names an allowed call removes upstream."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from sidecar.check.pipeline import CheckPipeline
from sidecar.check.request import Identity
from sidecar.check.response import upstream_headers
from sidecar.core import Code, Decision, Snapshot
from sidecar.settings import HttpServer

from .conftest import HTTP_SERVER_CLASSES

LEDGER = "ledger.finance.svc.cluster.local"


@pytest.fixture
def port(snapshot: Snapshot, http_server: HttpServer) -> Iterator[int]:
    server = HTTP_SERVER_CLASSES[http_server](
        CheckPipeline(lambda: snapshot, Identity(agent="billing-agent")), "127.0.0.1", 0
    )
    yield server.start()
    server.stop(0.2)


def _check(method: str, path: str = "/v1/invoices/42") -> bytes:
    return (
        f"{method} /mandate{path} HTTP/1.1\r\nHost: {LEDGER}\r\nContent-Length: 0\r\n"
        "x-mandate-content-length: len=0\r\n\r\n"
    ).encode()


def _answers(s: socket.socket, parts: list[bytes]) -> bytes:
    """Send ``parts`` with a pause between them (separate reads on the server); the reply."""
    for part in parts:
        s.sendall(part)
        time.sleep(0.1)
    s.settimeout(2)
    reply = b""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        reply += chunk
        head, sep, body = reply.partition(b"\r\n\r\n")
        length = [int(v) for k, _, v in (h.partition(b": ") for h in head.split(b"\r\n"))
                  if k.lower() == b"content-length"]  # fmt: skip
        if sep and length and len(body) >= length[0]:
            break
    return reply


def _status_and_body(reply: bytes) -> tuple[int, dict[str, object], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if status == 403 else {}, head.lower()


@pytest.mark.parametrize(
    ("method", "code"),
    [("get", Code.BAD_REQUEST), ("Get", Code.BAD_REQUEST), ("FOO", Code.OUTSIDE_PURPOSE)],
)
def test_a_method_llhttp_refuses_is_decided_after_allowed_checks(
    port: int, http_server: HttpServer, method: str, code: str
) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        status, _, _ = _status_and_body(_answers(s, [_check("GET")]))
        assert status == 200  # the C parser, on a kept-alive connection
        status, deny, head = _status_and_body(_answers(s, [_check(method)]))
        assert status == 403 and deny["error"] == code, deny
        if http_server == "aiohttp":
            assert b"connection: close" in head  # the Python parser serves no further check
        else:  # the lean server parses every message alike: the connection serves on
            assert b"connection: close" not in head
            status, _, _ = _status_and_body(_answers(s, [_check("GET")]))
            assert status == 200
    with socket.create_connection(("127.0.0.1", port)) as s:  # first on its connection
        status, deny, _ = _status_and_body(_answers(s, [_check(method)]))
        assert status == 403 and deny["error"] == code, deny


def test_refused_bytes_that_may_not_start_a_message_are_not_parsed_again(
    port: int, http_server: HttpServer
) -> None:
    """`GETX` split after `GE`: aiohttp's C parser refuses `TX /mandate...`, which is not
    where the message starts; parsed again it would be decided as method `TX`. The lean
    server holds `GE` until the method token is whole, and decides `GETX`."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        status, deny, _ = _status_and_body(_answers(s, [b"GE", _check("TX")]))
        assert status == 403, deny
        if http_server == "aiohttp":
            assert deny["error"] == Code.BAD_REQUEST, deny
            assert deny["reason"] == "the ext_authz request could not be parsed"
        else:
            assert deny["error"] == Code.OUTSIDE_PURPOSE, deny


@pytest.mark.parametrize("split", [1, 2, 3, 4, 12])
def test_a_request_split_anywhere_is_decided_whole(port: int, split: int) -> None:
    """`GET` arrives in pieces (the lean server holds the start of a message until its
    method is whole): decided as `GET`, never as the piece after the split."""
    data = _check("GET")
    with socket.create_connection(("127.0.0.1", port)) as s:
        status, deny, _ = _status_and_body(_answers(s, [data[:split], data[split:]]))
        assert status == 200, deny


def test_underscore_spellings_of_mandates_headers_are_removed_upstream() -> None:
    """Behind an Envoy that lets header names with "_" through, an allowed call still
    loses every agent-sent spelling a CGI/WSGI upstream folds into HTTP_X_MANDATE_*."""
    d = Decision("d1", True, Code.ALLOWED, "ok", agent="billing-agent", purpose="reconcile")
    sent = ["x_mandate_agent", "x-mandate_purpose", "x_mandate-task", "x-mandate-agent",
            "x_mandate_decision", "accept", "x_other"]  # fmt: skip
    to_set, to_remove = upstream_headers(d, sent)
    assert dict(to_set)["x-mandate-agent"] == "billing-agent"
    assert to_remove == [
        "x_mandate_agent", "x-mandate_purpose", "x_mandate-task", "x_mandate_decision",
    ]  # fmt: skip
