"""A hostile agent's request shapes, sent as raw HTTP/1.1 bytes through real Envoy (both
transports): path confusion, Host vs absolute-form authority, duplicate and odd-case context
headers, request-smuggling shapes. For every shape the rule is the same: either Envoy refuses
it, or mandate denies it, or what reaches the upstream is exactly what mandate allowed — a
request under the denied prefix `/v1/ledger/admin/**` never arrives, and an allowed request
arrives at an allowed host."""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
from urllib.parse import unquote

import pytest

from .conftest import MAX_BODY, Stack

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


# --- MCP bodies a hostile agent writes ----------------------------------------------------
# research-agent's `tool-use` purpose allows POST http://mcp.tools.svc.cluster.local/mcp
# with the tools search_papers and fetch_abstract (devstack/demo/profiles/agents.yaml).

MCP_HOST = "mcp.tools.svc.cluster.local"
ALLOWED_TOOL, FORBIDDEN_TOOL = "search_papers", "delete_corpus"
_RPC_HEAD = '{"jsonrpc": "2.0", "id": 1, '


def _tool_call(name: object, method: str = "tools/call") -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"name": name}})


def _mcp_head(extra: str = "") -> str:
    return (
        f"POST http://{MCP_HOST}/mcp HTTP/1.1\r\nHost: {MCP_HOST}\r\n"
        f"x-mandate-purpose: tool-use\r\ncontent-type: application/json\r\n{extra}"
        "Connection: close\r\n"
    )


def _mcp_post(body: bytes, extra: str = "") -> bytes:
    return (_mcp_head(extra) + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _deny_reason(status: int, reply: bytes) -> str:
    """The reason of mandate's deny (a 403 with its JSON body and decision id)."""
    assert status == 403, reply[:400]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"x-mandate-decision:" in head.lower(), reply[:400]
    deny = json.loads(body)
    assert deny["error"] == "outside_purpose", deny
    return str(deny["reason"])


def _no_mcp_call_arrived(stack: Stack, since: int) -> None:
    arrived = [r for r in stack.upstream.received[since:] if r["host"].startswith(MCP_HOST)]
    assert not arrived, arrived


def _allowed_call_still_works(stack: Stack) -> None:
    """mandate survived whatever came before: a plain allowed tool call goes through."""
    status, reply = _raw(stack, "research-agent", _mcp_post(_tool_call(ALLOWED_TOOL).encode()))
    assert status == 200, reply[:400]
    assert f"{ALLOWED_TOOL}: 3 results".encode() in reply


# (id, body, extra request headers, a word the deny reason must contain)
HOSTILE_MCP: list[tuple[str, bytes, str, str]] = [
    # Python's json keeps the last of duplicate keys; many upstream parsers keep the first.
    (
        "dup-name-forbidden-last",
        (
            _RPC_HEAD + '"method": "tools/call", "params": '
            f'{{"name": "{ALLOWED_TOOL}", "name": "{FORBIDDEN_TOOL}"}}}}'
        ).encode(),
        "",
        "appears twice",
    ),
    (
        "dup-name-forbidden-first",
        (
            _RPC_HEAD + '"method": "tools/call", "params": '
            f'{{"name": "{FORBIDDEN_TOOL}", "name": "{ALLOWED_TOOL}"}}}}'
        ).encode(),
        "",
        "appears twice",
    ),
    (
        "dup-method-session-last",
        (
            _RPC_HEAD + '"method": "tools/call", "method": "ping", '
            f'"params": {{"name": "{FORBIDDEN_TOOL}"}}}}'
        ).encode(),
        "",
        "appears twice",
    ),
    (
        "dup-method-session-first",
        (
            _RPC_HEAD + '"method": "ping", "method": "tools/call", '
            f'"params": {{"name": "{FORBIDDEN_TOOL}"}}}}'
        ).encode(),
        "",
        "appears twice",
    ),
    (
        "dup-params",
        (
            _RPC_HEAD + f'"method": "tools/call", "params": {{"name": "{FORBIDDEN_TOOL}"}}, '
            f'"params": {{"name": "{ALLOWED_TOOL}"}}}}'
        ).encode(),
        "",
        "appears twice",
    ),
    # 2000 nested arrays fit in Envoy's 4 KiB buffer and exceed the parser's recursion limit;
    # 100k are cut at the limit.
    ("deep-nesting", b"[" * 2000 + b"]" * 2000, "", "nested too deeply"),
    ("deep-nesting-100k", b"[" * 100_000, "", "truncated"),
    (
        "invalid-utf8",
        _tool_call(ALLOWED_TOOL).encode().replace(b"_papers", b"_papers\xff"),
        "",
        "not UTF-8",
    ),
    ("bom", b"\xef\xbb\xbf" + _tool_call(ALLOWED_TOOL).encode(), "", "byte order mark"),
    ("utf-16", _tool_call(ALLOWED_TOOL).encode("utf-16"), "", "not UTF-8"),
    ("nan", _tool_call(ALLOWED_TOOL).replace('"id": 1', '"id": NaN').encode(), "", "NaN"),
    (
        "infinity",
        _tool_call(ALLOWED_TOOL).replace('"id": 1', '"id": Infinity').encode(),
        "",
        "Infinity",
    ),
    ("empty-batch", b"[]", "", "empty JSON-RPC batch"),
    ("batch-non-object", f"[{_tool_call(ALLOWED_TOOL)}, 1]".encode(), "", "not a JSON-RPC"),
    ("batch-in-batch", f"[[{_tool_call(FORBIDDEN_TOOL)}]]".encode(), "", "not a JSON-RPC"),
    ("method-case", _tool_call(FORBIDDEN_TOOL, "Tools/Call").encode(), "", "another case"),
    ("method-case-allowed-tool", _tool_call(ALLOWED_TOOL, "TOOLS/CALL").encode(), "", "case"),
    ("name-int", _tool_call(1).encode(), "", "without a tool name"),
    ("name-list", _tool_call([FORBIDDEN_TOOL]).encode(), "", "without a tool name"),
    (
        "second-message-after",
        f"{_tool_call(ALLOWED_TOOL)}\n{_tool_call(FORBIDDEN_TOOL)}".encode(),
        "",
        "not JSON",
    ),
    # A lone surrogate escape: JSON lets it through, but it names no character.
    ("lone-surrogate-tool", _tool_call(ALLOWED_TOOL + "\udcff").encode(), "", "not valid Unicode"),
    # mandate decides on the bytes as sent: compressed, they are not JSON-RPC.
    (
        "gzip",
        gzip.compress(_tool_call(ALLOWED_TOOL).encode()),
        "Content-Encoding: gzip\r\n",
        "not UTF-8",
    ),
    (
        "gzip-forbidden",
        gzip.compress(_tool_call(FORBIDDEN_TOOL).encode()),
        "Content-Encoding: gzip\r\n",
        "not UTF-8",
    ),
]


@pytest.mark.parametrize(
    ("body", "extra", "why"),
    [(b, e, w) for _, b, e, w in HOSTILE_MCP],
    ids=[i for i, _, _, _ in HOSTILE_MCP],
)
def test_hostile_mcp_bodies_never_reach_a_forbidden_tool(
    stack: Stack, body: bytes, extra: str, why: str
) -> None:
    """Bodies on which JSON parsers disagree (or break): mandate refuses each as malformed
    with its own 403 (never a 5xx: it did not crash), nothing reaches the MCP server, and
    the next well-formed call is still decided."""
    since = len(stack.upstream.received)
    status, reply = _raw(stack, "research-agent", _mcp_post(body, extra))
    assert why in _deny_reason(status, reply)
    _no_mcp_call_arrived(stack, since)
    _allowed_call_still_works(stack)


def _raw_in_parts(
    stack: Stack, agent: str, parts: list[bytes], pause: float = 0.3
) -> tuple[int, bytes]:
    """Send ``parts`` with a pause after each, so that Envoy asks mandate on the first one;
    stop sending once an answer arrives (a deny comes before the rest of the body)."""
    with socket.create_connection(("127.0.0.1", stack.port(agent)), timeout=5) as s:
        reply = b""
        for part in parts:
            try:
                s.sendall(part)
            except OSError:
                break
            s.settimeout(pause)
            try:
                reply = s.recv(65536)
            except TimeoutError:
                continue
            break
        s.settimeout(5)
        deadline = time.monotonic() + 5
        while reply and time.monotonic() < deadline:
            head, sep, body = reply.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            reply += chunk
    if not reply.startswith(b"HTTP/1.1 "):
        return 0, reply
    return int(reply[9:12]), reply


# A complete, allowed tool call padded to exactly Envoy's buffer (MAX_BODY): Envoy asks
# mandate as soon as it has that much, and says `x-envoy-auth-partial-body: false` even
# though more is on its way. The rest is a second message, a forbidden tool call, which an
# upstream reading a stream of JSON values would run.
_AT_LIMIT = _tool_call(ALLOWED_TOOL).encode().ljust(MAX_BODY)
_REST = b"\n" + _tool_call(FORBIDDEN_TOOL).encode()
_TE = "Transfer-Encoding: chunked\r\n"
_FORGED = f"x-mandate-content-length: {MAX_BODY}\r\n"

CHUNKED: list[tuple[str, list[bytes]]] = [
    # Without the call's Content-Length nothing shows mandate the whole body: a chunked
    # MCP body is decided as truncated even when it happens to be complete.
    (
        "complete-allowed-tool",
        [
            (_mcp_head(_TE) + "\r\n").encode()
            + _chunk(_tool_call(ALLOWED_TOOL).encode()[:20])
            + _chunk(_tool_call(ALLOWED_TOOL).encode()[20:])
            + b"0\r\n\r\n"
        ],
    ),
    (
        "complete-forbidden-tool",
        [
            (_mcp_head(_TE) + "\r\n").encode()
            + _chunk(_tool_call(FORBIDDEN_TOOL).encode())
            + b"0\r\n\r\n"
        ],
    ),
    (
        "cut-at-the-limit",
        [(_mcp_head(_TE) + "\r\n").encode() + _chunk(_AT_LIMIT), _chunk(_REST) + b"0\r\n\r\n"],
    ),
    # With a Content-Length the body Envoy buffered is shorter than it: truncated, also
    # when the agent sends its own x-mandate-content-length (Envoy's config overwrites it).
    (
        "content-length-cut-at-the-limit",
        [
            (_mcp_head(_FORGED) + f"Content-Length: {len(_AT_LIMIT + _REST)}\r\n\r\n").encode()
            + _AT_LIMIT,
            _REST,
        ],
    ),
]


@pytest.mark.parametrize("parts", [p for _, p in CHUNKED], ids=[i for i, _ in CHUNKED])
def test_an_mcp_body_mandate_cannot_see_whole_is_denied(stack: Stack, parts: list[bytes]) -> None:
    since = len(stack.upstream.received)
    status, reply = _raw_in_parts(stack, "research-agent", parts)
    assert "truncated" in _deny_reason(status, reply)
    _no_mcp_call_arrived(stack, since)


def test_a_chunked_body_cut_at_the_limit_with_a_forged_length_is_denied(stack: Stack) -> None:
    """As `cut-at-the-limit`, plus the agent's own `x-mandate-content-length` equal to
    what Envoy buffered. Over gRPC mandate reads the call's Content-Length, which the agent
    cannot forge. Over HTTP, Envoy's config sets that header to `len=` and the call's
    Content-Length, overwriting the agent's: with no Content-Length, `len=` alone (before
    this was found, the config set nothing for a chunked call and the forged header got
    through)."""
    since = len(stack.upstream.received)
    head = (_mcp_head(_TE + _FORGED) + "\r\n").encode()
    status, reply = _raw_in_parts(
        stack, "research-agent", [head + _chunk(_AT_LIMIT), _chunk(_REST) + b"0\r\n\r\n"]
    )
    assert "truncated" in _deny_reason(status, reply)
    _no_mcp_call_arrived(stack, since)


# --- Odd and Unicode host names ---------------------------------------------------------
# billing-agent may GET http://ledger.finance.svc.cluster.local/v1/invoices/* on any port
# (the rule names no port). Host names match case-insensitively, without one trailing dot
# (DESIGN.md, decision semantics 5); a name that is not ASCII is no host name at all, so a
# look-alike that str.lower() folds into ASCII (the Kelvin sign U+212A becomes "k") never
# matches. Envoy refuses most of these itself (400); mandate refuses the rest (403).

_L = LEDGER_HOST
# (id, Host, "allow": must be decided as the allowed host / "refuse": must not be allowed /
# "either": refused, or allowed and then what reaches the upstream names the allowed host)
HOSTS: list[tuple[str, str, str]] = [
    ("plain", _L, "allow"),
    ("upper-case", _L.upper(), "allow"),
    ("mixed-case", "Ledger.Finance.SVC.cluster.Local", "allow"),
    ("trailing-dot", _L + ".", "allow"),
    ("other-port", _L + ":8080", "allow"),
    ("trailing-dot-port", _L + ".:80", "allow"),
    ("upper-dot-port", _L.upper() + ".:8080", "allow"),
    ("port-leading-zero", _L + ":080", "allow"),
    ("kelvin-sign", "\u212a" + _L, "refuse"),
    ("kelvin-in-name", _L.replace("cluster", "\u212aluster"), "refuse"),
    ("full-width-l", _L.replace("l", "\uff4c", 1), "refuse"),
    ("full-width-all", "\uff4c\uff45\uff44\uff47\uff45\uff52" + _L[6:], "refuse"),
    ("cyrillic-e", _L.replace("e", "\u0435", 1), "refuse"),
    ("greek-iota-for-l", _L.replace("l", "\u0399"), "refuse"),
    ("dotless-i", "\u0131" + _L, "refuse"),
    ("ideographic-dots", _L.replace(".", "\u3002"), "refuse"),
    ("zero-width-space", _L + "\u200b", "refuse"),
    ("full-width-port", _L + ":\uff18\uff10", "refuse"),
    ("punycode-cyrillic-e", "xn--ldger-zwe" + _L[6:], "refuse"),  # IDNA of the "cyrillic-e" one
    ("punycode-prefix", "xn--" + _L, "refuse"),
    ("two-trailing-dots", _L + "..", "refuse"),
    ("leading-dot", "." + _L, "refuse"),
    ("port-zero", _L + ":0", "refuse"),
    ("port-too-big", _L + ":99999", "refuse"),
    ("port-signed", _L + ":+80", "refuse"),
    ("port-empty", _L + ":", "refuse"),
    ("percent-dot", _L.replace(".", "%2e", 1), "refuse"),
    ("userinfo-after", _L + "@evil.example", "refuse"),
    ("comma-list", _L + ",evil.example", "refuse"),
    ("space-inside", _L + " .evil.example", "refuse"),
    ("nul", _L + "\x00", "refuse"),
    ("ip-literal", "127.0.0.1", "refuse"),
    ("ipv6-literal", "[::1]", "refuse"),
    # In absolute form the userinfo is not part of the host: the host is the allowed one.
    ("userinfo-before", "evil.example@" + _L, "either"),
    ("leading-space", " " + _L, "either"),
    ("trailing-tab", _L + "\t", "either"),
]


def _canonical_host(host: str) -> str:
    host = host.strip().lower()
    name, _, port = host.rpartition(":")
    if name and port.isdigit():
        host = name
    return host.removesuffix(".")


@pytest.mark.parametrize("form", ["origin", "absolute"])
@pytest.mark.parametrize(
    ("host", "expect"), [(h, e) for _, h, e in HOSTS], ids=[i for i, _, _ in HOSTS]
)
def test_odd_hosts_are_allowed_only_as_the_allowed_host(
    stack: Stack, host: str, expect: str, form: str
) -> None:
    target = "/v1/invoices/7" if form == "origin" else f"http://{host}/v1/invoices/7"
    data = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    since = len(stack.upstream.received)
    status, reply = _raw(stack, "billing-agent", data)
    assert 0 < status < 500, reply[:300]  # an answer, and never mandate failing (5xx)
    arrived = stack.upstream.received[since:]
    if status == 200:
        assert expect != "refuse", reply[:300]
        (seen,) = arrived
        assert _canonical_host(str(seen["host"])) == LEDGER_HOST, seen
    else:
        assert expect != "allow", reply[:300]
        assert not arrived, arrived
        if status == 403:  # mandate's deny, not Envoy's own answer
            assert b"x-mandate-decision:" in reply.lower(), reply[:300]
