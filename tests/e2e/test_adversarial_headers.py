"""Issue 15, through real Envoy on both transports: what a compromised agent can put in a
request's method and header names to change what the upstream believes or does.

- Header names with "_": a CGI/WSGI upstream folds `x_mandate_agent` and mandate's own
  `x-mandate-agent` into one variable. envoy/ refuses such names (400, or a reset HTTP/2
  stream): nothing reaches the upstream.
- Method and URL override headers (`X-HTTP-Method-Override`, `X-Original-URL` ...): a GET
  mandate allowed could become a DELETE behind the decision. mandate denies the call
  (`bad_request`) with its deny body, decision id and audit record.
- An HTTP/2 method in lower case (`get`): Envoy passes `:method` as sent, and over the HTTP
  transport aiohttp answered 400 quoting `/mandate;agent=NAME`, with no decision. Methods
  are case-sensitive (RFC 9110): both transports deny it as `bad_request`, with the same
  body and audit record, and an upper-case method aiohttp's C parser does not know (`FOO`)
  is decided as any other.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Stack, start_stack, stop_stack
from .test_adversarial import _raw

LEDGER = "ledger.finance.svc.cluster.local"
ALLOWED_PATH = "/v1/invoices/7"  # billing-agent: GET /v1/invoices/* (purpose reconcile)


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Stack]:
    """A stack whose mandate writes the audit trail (every decision)."""
    tmp = tmp_path_factory.mktemp(f"headers-{transport}")
    stack = start_stack(tmp, transport=transport, extra=["--audit-dir", str(tmp / "audit")])
    yield stack
    stop_stack(stack)


def _traceparent(n: int) -> tuple[str, str]:
    trace = f"{n:032x}"
    return trace, f"00-{trace}-00f067aa0ba902b7-01"


def _arrived(stack: Stack, since: int) -> list[dict[str, Any]]:
    return list(stack.upstream.received[since:])


# --- a minimal HTTP/2 client (prior knowledge, one request per connection) ---------------


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out, value = [first | limit], value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def _hpack_literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v


# RFC 7541 Appendix B: the Huffman codes of the digits (enough for a `:status` value).
_HUFFMAN_DIGITS = {
    "00000": "0", "00001": "1", "00010": "2", "011001": "3", "011010": "4",
    "011011": "5", "011100": "6", "011101": "7", "011110": "8", "011111": "9",
}  # fmt: skip
_STATIC_STATUS = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}


def _status_of(block: bytes) -> int:
    """The `:status` of a response header block: its first field, as an HTTP/2 server
    encodes it (an indexed static entry, or a literal value with a static `:status` name)."""
    first = block[0]
    if first & 0x80:
        return _STATIC_STATUS[first & 0x7F]
    at = 1
    size, huffman = block[at] & 0x7F, bool(block[at] & 0x80)
    raw = block[at + 1 : at + 1 + size]
    if not huffman:
        return int(raw)
    bits, code, digits = "".join(f"{b:08b}" for b in raw), "", ""
    for bit in bits:
        code += bit
        if code in _HUFFMAN_DIGITS:
            digits, code = digits + _HUFFMAN_DIGITS[code], ""
    return int(digits)


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)
    return head + payload


def h2_request(
    port: int,
    method: str,
    authority: str,
    path: str,
    headers: dict[str, str] | None = None,
    scheme: str = "http",
) -> tuple[int, bytes]:
    """One HTTP/2 request (h2c, prior knowledge) to Envoy's listener: (status, body);
    status 0 if Envoy reset the stream or closed the connection without an answer."""
    fields = [(":method", method), (":scheme", scheme), (":authority", authority),
              (":path", path), *(headers or {}).items()]  # fmt: skip
    block = b"".join(_hpack_literal(k, v) for k, v in fields)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _frame(4, 0, 0)  # SETTINGS (defaults)
            + _frame(1, 0x5, 1, block)  # HEADERS, END_STREAM | END_HEADERS
        )
        status, body, buffer = 0, b"", b""
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                try:
                    chunk = s.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    return status, body
                if not chunk:
                    return status, body
                buffer += chunk
            size = int.from_bytes(buffer[:3], "big")
            kind, flags = buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload, buffer = buffer[9 : 9 + size], buffer[9 + size :]
            if kind == 4 and not flags & 0x1:  # the server's SETTINGS: acknowledge
                s.sendall(_frame(4, 0x1, 0))
            elif kind == 1 and stream == 1 and not status:  # HEADERS (no padding/priority)
                status = _status_of(payload)
            elif kind == 0 and stream == 1:  # DATA (Envoy sends no padding)
                body += payload
            elif kind == 3 and stream == 1:  # RST_STREAM
                return 0, body
            elif kind == 7:  # GOAWAY
                return status, body
            if kind in (0, 1) and stream == 1 and flags & 0x1:  # END_STREAM
                return status, body


def _http1(stack: Stack, extra: str, method: str = "GET", path: str = ALLOWED_PATH) -> bytes:
    return (
        f"{method} http://{LEDGER}{path} HTTP/1.1\r\nHost: {LEDGER}\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


def _deny_body(status: int, body: bytes) -> dict[str, Any]:
    """mandate's deny: 403 and the JSON body of DESIGN.md, never the internal prefix."""
    assert status == 403, (status, body[:300])
    assert b"/mandate" not in body, body
    deny: dict[str, Any] = json.loads(body)
    assert set(deny) == {"error", "reason", "decision", "trace_id"}, deny
    return deny


# --- 1. header names with "_" --------------------------------------------------------------

UNDERSCORED = ["x_mandate_agent", "x_mandate_purpose", "X_Mandate_Task", "x-mandate_decision",
               "x_mandate-agent", "txn_token", "authorization_"]  # fmt: skip


@pytest.mark.parametrize("name", UNDERSCORED)
def test_underscore_header_names_never_reach_the_upstream(stack: Stack, name: str) -> None:
    """Before: `x_mandate_agent: other-agent` arrived next to mandate's x-mandate-agent,
    and a WSGI upstream read HTTP_X_MANDATE_AGENT='other-agent,billing-agent'."""
    since = len(stack.upstream.received)
    status, reply = _raw(stack, "billing-agent", _http1(stack, f"{name}: other-agent\r\n"))
    assert status == 400, reply[:300]  # Envoy refuses the request (no ambiguity forwarded)
    assert b"/mandate" not in reply
    port = stack.port("billing-agent")
    h2_status, body = h2_request(port, "GET", LEDGER, ALLOWED_PATH, {name.lower(): "other-agent"})
    assert h2_status != 200, body[:300]  # HTTP/2: the stream is reset (or a 400)
    assert _arrived(stack, since) == []
    # The same call without the header is allowed: the refusal is the header's doing.
    status, reply = _raw(stack, "billing-agent", _http1(stack, ""))
    assert status == 200, reply[:300]


# --- 2. method and URL override headers ----------------------------------------------------

OVERRIDES = [
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-HTTP-Method", "DELETE"),
    ("X-Method-Override", "PUT"),
    ("X-Original-URL", "/v1/ledger/admin/x"),
    ("X-Rewrite-URL", "/v1/ledger/admin/x"),
]


@pytest.mark.parametrize(("name", "value"), OVERRIDES, ids=[n for n, _ in OVERRIDES])
def test_method_and_url_override_headers_are_denied(audited: Stack, name: str, value: str) -> None:
    """Before: they reached the upstream with an allowed GET; a framework that honours them
    would have run a DELETE, or another path, that mandate never decided."""
    stack = audited
    trace, parent = _traceparent(0x15_0000 + OVERRIDES.index((name, value)))
    since = len(stack.upstream.received)
    status, reply = _raw(
        stack, "billing-agent", _http1(stack, f"{name}: {value}\r\ntraceparent: {parent}\r\n")
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    deny = _deny_body(status, body)
    assert deny["error"] == "bad_request" and name.lower() in deny["reason"], deny
    assert f"x-mandate-decision: {deny['decision']}".encode() in head.lower()
    assert _arrived(stack, since) == []
    record = stack.audit_record(trace)
    assert (record["decision"], record["code"], record["decision_id"]) == (
        "deny", "bad_request", deny["decision"],
    )  # fmt: skip
    assert (record["agent"], record["method"], record["host"], record["path"]) == (
        "billing-agent", "GET", LEDGER, ALLOWED_PATH,
    )  # fmt: skip


REPORTS = "reports.finance.svc.cluster.local"  # billing-agent: POST /v1/reports/* (report)
FORMS = [
    ("multipart", "Content-Type: multipart/form-data; boundary=XyZ\r\n",
     b'--XyZ\r\nContent-Disposition: form-data; name="title"\r\n\r\nx\r\n'
     b'--XyZ\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--XyZ--\r\n'),
    ("no-content-type", "", b"title=x&_method=DELETE"),
    ("php-folded-query", "Content-Type: application/json\r\n", b"{}"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "header", "body"), FORMS, ids=[k for k, _, _ in FORMS])
def test_a_method_override_in_any_form_is_denied(
    audited: Stack, kind: str, header: str, body: bytes
) -> None:
    """Before: an allowed POST whose multipart form, or Content-Type-less body (Rack reads
    it as a form), or PHP-folded query name (`.method`) said `_method=DELETE` reached the
    upstream, which runs it as a DELETE (Rack, Laravel, Symfony, Spring, ASP.NET Core)."""
    stack = audited
    since = len(stack.upstream.received)
    path = "/v1/reports/2026-11" + ("?.method=DELETE" if kind == "php-folded-query" else "")

    def post(data: bytes, target: str) -> tuple[int, bytes]:
        request = (
            f"POST http://{REPORTS}{target} HTTP/1.1\r\nHost: {REPORTS}\r\n"
            f"x-mandate-purpose: report\r\n{header}Content-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + data
        return _raw(stack, "billing-agent", request)

    status, reply = post(body, path)
    _, _, deny_body = reply.partition(b"\r\n\r\n")
    deny = _deny_body(status, deny_body)
    assert deny["error"] == "bad_request" and "_method" in deny["reason"], deny
    assert _arrived(stack, since) == []
    # The same POST without the override is allowed: the refusal is the override's doing.
    clean = body.replace(b"_method", b"comment")
    status, reply = post(clean, "/v1/reports/2026-11")
    assert status == 200, reply[:300]


# --- 3. HTTP/2 methods ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["get", "Get", "delete"])
def test_an_http2_method_not_in_upper_case_is_denied_alike_on_both_transports(
    audited: Stack, method: str
) -> None:
    """Before, over HTTP: aiohttp's 400 quoting `/mandate;agent=billing-agent`, no decision
    id, no audit record; over gRPC: allowed as GET and forwarded as `get`."""
    stack = audited
    trace, parent = _traceparent(0x25_0000_0000_0000 + int.from_bytes(method.encode(), "big"))
    since = len(stack.upstream.received)
    status, body = h2_request(
        stack.port("billing-agent"), method, LEDGER, ALLOWED_PATH, {"traceparent": parent}
    )
    deny = _deny_body(status, body)
    assert deny["error"] == "bad_request", deny
    assert deny["reason"].startswith(f"method {method!r} is not in upper case"), deny
    assert deny["trace_id"] == trace
    assert _arrived(stack, since) == []
    record = stack.audit_record(trace)
    assert (record["decision"], record["code"], record["decision_id"]) == (
        "deny", "bad_request", deny["decision"],
    )  # fmt: skip
    assert (record["agent"], record["purpose"], record["method"]) == (
        "billing-agent", "reconcile", method,
    )  # fmt: skip
    assert (record["host"], record["path"]) == (LEDGER, ALLOWED_PATH)


@pytest.mark.parametrize("scheme", ["wss", "WSS", "ws", "gopher"])
def test_an_http2_scheme_envoy_would_send_elsewhere_than_decided_is_denied(
    audited: Stack, scheme: str
) -> None:
    """Before: `:scheme: wss` with no port in the authority was decided (and given the
    host's credential) as a call to port 443, while Envoy's routes, which send only
    `https` to TLS, sent it in clear to port 80."""
    stack = audited
    trace, parent = _traceparent(0x45_0000 + int.from_bytes(scheme.encode(), "big"))
    since = len(stack.upstream.received)
    status, body = h2_request(
        stack.port("billing-agent"), "GET", LEDGER, ALLOWED_PATH, {"traceparent": parent}, scheme
    )
    assert _arrived(stack, since) == []
    deny = _deny_body(status, body)  # Envoy lower-cases it (`WSS` too) and asks mandate
    assert deny["error"] == "bad_request", deny
    assert deny["reason"] == f"scheme {scheme.lower()!r}: only 'http' and 'https' reach an upstream"
    record = stack.audit_record(trace)
    assert (record["decision"], record["code"]) == ("deny", "bad_request")
    # The same call as `http` is allowed: the refusal is the scheme's doing.
    status, body = h2_request(stack.port("billing-agent"), "GET", LEDGER, ALLOWED_PATH)
    assert status == 200, body[:300]


def test_an_http2_method_aiohttp_does_not_know_is_decided_like_any_other(audited: Stack) -> None:
    """`FOO` is a method (a token) no rule of billing-agent names: outside its purpose on
    both transports. Before, over HTTP: aiohttp's 400 with the internal prefix."""
    stack = audited
    trace, parent = _traceparent(0x35_0000)
    port = stack.port("billing-agent")
    status, body = h2_request(port, "FOO", LEDGER, ALLOWED_PATH, {"traceparent": parent})
    deny = _deny_body(status, body)
    assert (deny["error"], deny["reason"]) == ("outside_purpose", "outside purpose 'reconcile'")
    record = stack.audit_record(trace)
    assert (record["method"], record["code"]) == ("FOO", "outside_purpose")
    # And the next call on the same Envoy is decided as usual (allowed, over HTTP/2 too).
    status, body = h2_request(port, "GET", LEDGER, ALLOWED_PATH)
    assert status == 200 and json.loads(body)["method"] == "GET", body[:300]


def test_a_request_mandates_http_port_cannot_parse_gets_a_deny_that_echoes_nothing(
    audited: Stack,
) -> None:
    """The agent can reach mandate's HTTP port itself (same network namespace): whatever
    aiohttp cannot parse is a `bad_request` deny with a decision id, never aiohttp's 400
    quoting the request line. (The gRPC transport's port speaks only HTTP/2: it answers
    such bytes with nothing that echoes them.)"""
    stack = audited
    shapes = [
        b"GET /mandate;agent=billing-agent/v1/\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /mandate;agent=billing-agent/v1 HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /mandate;agent=billing-agent/v1 HTTP/1.1\r\nBad Header\r\n\r\n",
    ]
    for data in shapes:
        with socket.create_connection(("127.0.0.1", stack.mandate.grpc_port), timeout=5) as s:
            s.sendall(data)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        if stack.transport == "grpc":
            assert b"mandate" not in reply and b"HTTP/1" not in reply, reply[:300]
            continue
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"403", reply[:300]
        assert b"mandate" not in body.replace(b'"decision"', b""), reply
        deny = json.loads(body)
        assert deny["error"] == "bad_request" and deny["decision"], deny
        assert f"x-mandate-decision: {deny['decision']}".encode() in head.lower()
