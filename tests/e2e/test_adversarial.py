"""A hostile agent's request shapes, sent as raw HTTP/1.1 bytes through real Envoy (both
transports): path confusion, Host vs absolute-form authority, duplicate and odd-case context
headers, request-smuggling shapes. For every shape the rule is the same: either Envoy refuses
it, or mandate denies it, or what reaches the upstream is exactly what mandate allowed — a
request under the denied prefix `/v1/ledger/admin/**` never arrives, and an allowed request
arrives at an allowed host."""

from __future__ import annotations

import socket
import time
from urllib.parse import unquote

import pytest

from .conftest import Stack

LEDGER_HOST = "ledger.finance.svc.cluster.local"
DENIED_PREFIX = "/v1/ledger/admin"
ALLOWED_HOSTS = {LEDGER_HOST, "api.stripe.com", "reports.finance.svc.cluster.local"}


def _raw(stack: Stack, agent: str, data: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Send bytes to the agent's Envoy listener; (status of the first response, raw reply)."""
    with socket.create_connection(("127.0.0.1", stack.port(agent)), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"connection: close" in b"".join(chunks).lower():
                break
    reply = b"".join(chunks)
    if not reply.startswith(b"HTTP/1.1 "):
        return 0, reply
    return int(reply[9:12]), reply


def _never_reached_denied_prefix(stack: Stack, since: int) -> None:
    for seen in stack.upstream.received[since:]:
        path = unquote(unquote(str(seen["path"]))).replace("\\", "/")
        assert not path.lower().startswith(DENIED_PREFIX), seen
        assert str(seen["host"]).split(":")[0] in ALLOWED_HOSTS | {"export.arxiv.org"}, seen


def _get(target: str, host: str = LEDGER_HOST, extra: str = "") -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n").encode()


PATHS = [
    "/v1/ledger/admin/x",
    "/v1/ledger/x/../admin/x",
    "/v1/ledger/x/%2e%2e/admin/x",
    "/v1/ledger/x/%2E%2E/admin/x",
    "/v1/ledger/admin%2Fx",
    "/v1/ledger%2Fadmin/x",
    "/v1/ledger/%61dmin/x",
    "/v1/ledger/admin%252Fx",
    "/v1/ledger//admin/x",
    "/v1//ledger/admin/x",
    "/v1/ledger/./admin/x",
    "/v1/ledger/admin;jsessionid=1/x",
    "/v1/ledger/admin/x;.css",
    "/v1/ledger\\admin\\x",
    "/v1/invoices/7/../../ledger/admin/x",
    "/v1/ledger/ADMIN/../admin/x",
    "/v1/ledger/admin/x?/v1/invoices/1",
    "/v1/ledger/admin/x#/v1/invoices/1",
    "/v1/ledger/admin/" + "a" * 70_000,
]


@pytest.mark.parametrize("path", PATHS, ids=range(len(PATHS)))
def test_path_confusion_never_reaches_the_denied_prefix(stack: Stack, path: str) -> None:
    since = len(stack.upstream.received)
    status, reply = _raw(stack, "billing-agent", _get(f"http://{LEDGER_HOST}{path}"))
    assert status != 200 or b"x-mandate-decision" in reply.lower(), reply[:300]
    _never_reached_denied_prefix(stack, since)


def test_host_header_cannot_redirect_an_absolute_form_request(stack: Stack) -> None:
    # The request line names a host billing-agent may not use; the Host header names one it
    # may. Whatever Envoy forwards, mandate decided on that same authority.
    since = len(stack.upstream.received)
    status, reply = _raw(
        stack, "billing-agent", _get("http://export.arxiv.org/v1/invoices/7", host=LEDGER_HOST)
    )
    for seen in stack.upstream.received[since:]:
        assert str(seen["host"]).split(":")[0] == LEDGER_HOST, seen
    if status == 200:
        assert stack.upstream.received[since:], reply[:300]
    # And the other way round: an allowed request line with a forbidden Host header.
    since = len(stack.upstream.received)
    _raw(stack, "billing-agent", _get(f"http://{LEDGER_HOST}/v1/ledger/admin/x", host="x.example"))
    _never_reached_denied_prefix(stack, since)


def test_duplicate_purpose_headers_select_nothing_new(stack: Stack) -> None:
    # Two x-mandate-purpose values: never treated as the one that grants the call.
    since = len(stack.upstream.received)
    extra = "x-mandate-purpose: reconcile\r\nX-Mandate-Purpose: report\r\n"
    status, reply = _raw(
        stack,
        "billing-agent",
        (
            f"PUT http://reports.finance.svc.cluster.local/v1/reports/m1 HTTP/1.1\r\n"
            f"Host: reports.finance.svc.cluster.local\r\n{extra}Content-Length: 0\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )
    if status == 200:  # only if Envoy kept exactly one value and it was `report`
        (seen,) = stack.upstream.received[since:]
        assert seen["mandate"]["x-mandate-purpose"] == "report", seen
    else:
        assert status == 403, reply[:300]


@pytest.mark.parametrize(
    "headers",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Transfer-Encoding: xchunked\r\n",
    ],
    ids=["cl-te", "te-te", "cl-cl", "te-obfuscated"],
)
def test_smuggling_shapes_do_not_carry_a_second_request(stack: Stack, headers: str) -> None:
    # A body that is itself a request to the denied prefix: if Envoy ever parsed it as a
    # second request it would go through mandate, and the denied prefix must not be reached.
    inner = (
        f"GET http://{LEDGER_HOST}/v1/ledger/admin/smuggled HTTP/1.1\r\nHost: {LEDGER_HOST}\r\n\r\n"
    )
    body = "0\r\n\r\n" + inner
    since = len(stack.upstream.received)
    data = (
        f"POST http://{LEDGER_HOST}/v1/invoices/7 HTTP/1.1\r\nHost: {LEDGER_HOST}\r\n"
        f"{headers}\r\n{body}"
    ).encode()
    _raw(stack, "billing-agent", data)
    _never_reached_denied_prefix(stack, since)
