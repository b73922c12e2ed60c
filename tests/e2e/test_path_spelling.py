"""Issue 15, finding 8 and the MCP item, through real Envoy on both transports: path spellings
an upstream may read as a denied path, and JSON-RPC messages that are not what they claim.

A profile the demo does not have: billing-agent may call anything under `/v1/**` on the
ledger host, except `/v1/secrets/**` (a strict deny rule: the exact spelling) and
`/v1/vault/**` (`foldPaths: true`: every case, NFKC and trailing-dot/space spelling).
research-agent may call the MCP tools `search_papers` and `fetch_abstract`.

What Envoy does with these paths (envoy/*.yaml: `normalize_path`, `merge_slashes`,
`path_with_escaped_slashes_action: REJECT_REQUEST`): it rejects raw spaces, raw non-ASCII
bytes, `%00` and encoded slashes (400) and decodes unreserved escapes (`%73` is `s`), but it
forwards `%zz`, `%2`, `%u0073`, `%E2%80%8B` and percent-encoded full-width letters verbatim,
so mandate has to decide on them.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Stack, start_stack, stop_stack

LEDGER = "ledger.finance.svc.cluster.local"
MCP_HOST = "mcp.tools.svc.cluster.local"
FULL_WIDTH = {c: "".join(f"%{b:02X}" for b in chr(ord(c) + 0xFEE0).encode()) for c in "secrtvaul"}

PROFILES = f"""\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: billing-agent}}
spec:
  owner: spelling-tests
  defaultPurpose: ledger
  purposes:
    ledger:
      allow:
        - hosts: [{LEDGER}]
          methods: [GET]
          paths: ["/v1/**"]
      deny:
        - paths: ["/v1/secrets/**"]
        - paths: ["/v1/vault/**"]
          foldPaths: true
---
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: research-agent}}
spec:
  owner: spelling-tests
  defaultPurpose: tool-use
  purposes:
    tool-use:
      allow:
        - hosts: [{MCP_HOST}]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [search_papers, fetch_abstract]
---
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: tunnel-agent}}
spec:
  owner: spelling-tests
  defaultPurpose: none
  purposes:
    none: {{}}
"""


@pytest.fixture(scope="module")
def spelling_stack(tmp_path_factory: pytest.TempPathFactory, transport: str) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"spelling-{transport}")
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "agents.yaml").write_text(PROFILES, encoding="utf-8")
    s = start_stack(tmp, profiles=Path(profiles), transport=transport)
    yield s
    stop_stack(s)


def _send(stack: Stack, agent: str, data: bytes, timeout: float = 5.0) -> tuple[int, bytes, bytes]:
    """Raw bytes to the agent's Envoy listener: (status, head, body) of the response."""
    with socket.create_connection(("127.0.0.1", stack.port(agent)), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, head, body


def _get(stack: Stack, path: str) -> tuple[int, bytes, bytes]:
    request = f"GET http://{LEDGER}{path} HTTP/1.1\r\nHost: {LEDGER}\r\nConnection: close\r\n\r\n"
    return _send(stack, "billing-agent", request.encode())


def _mandate_denied(status: int, head: bytes, body: bytes) -> dict[str, str]:
    assert status == 403, (status, head, body[:300])
    assert b"x-mandate-decision:" in head.lower(), head
    deny: dict[str, str] = json.loads(body)
    return deny


# A `%` that starts no two-hex-digit escape, an invisible code point, or a character some
# upstream reads as `/`, `..` or `.`: each is `bad_request`, whatever the rules say.
BAD_PATHS = [
    pytest.param("/v1/secrets%zz/db", id="escape-not-hex"),
    pytest.param("/v1/secrets%2", id="escape-one-digit-at-end"),
    pytest.param("/v1/secrets%2/db", id="escape-one-digit"),
    pytest.param("/v1/%u0073ecrets/db", id="escape-iis-u"),
    pytest.param("/v1/secrets%u002fdb", id="escape-iis-u-slash"),
    pytest.param("/v1/report%", id="lone-percent"),
    pytest.param("/v1/100%25", id="encoded-percent"),
    pytest.param("/v1/%25u0073ecrets/db", id="encoded-iis-u"),
    pytest.param("/v1/secrets%E2%80%8B/db", id="zero-width-space"),
    pytest.param("/v1/sec%E2%80%8Drets/db", id="zero-width-joiner"),
    pytest.param("/v1/%EF%BB%BFsecrets/db", id="bom"),
    pytest.param("/v1/secrets%E2%80%AE/db", id="bidi-override"),
    pytest.param("/v1/secrets%C2%AD/db", id="soft-hyphen"),
    pytest.param("/v1/x/..%20/secrets/db", id="dot-dot-space"),
    pytest.param("/v1/x/.../secrets/db", id="three-dots"),
    pytest.param("/v1/x/%EF%BC%8E%EF%BC%8E/secrets/db", id="full-width-dot-dot"),
    pytest.param("/v1/secrets%EF%BC%8Fdb", id="full-width-slash"),
    pytest.param("/v1/secrets%E2%88%95db", id="division-slash"),
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_an_ambiguous_path_is_a_bad_request_and_never_forwarded(
    spelling_stack: Stack, path: str
) -> None:
    since = len(spelling_stack.upstream.received)
    deny = _mandate_denied(*_get(spelling_stack, path))
    assert deny["error"] == "bad_request", deny
    assert spelling_stack.upstream.received[since:] == []


VAULT_FW = "".join(FULL_WIDTH[c] for c in "vault")
SECRETS_FW = "".join(FULL_WIDTH[c] for c in "secrets")

# (path, what the upstream receives, or None: denied by a rule and never forwarded)
SPELLINGS = [
    # foldPaths: true on /v1/vault/**: every spelling an upstream may read as /v1/vault
    pytest.param("/v1/vault/db", None, id="fold-plain"),
    pytest.param("/v1/VAULT/db", None, id="fold-upper-case"),
    pytest.param("/V1/Vault", None, id="fold-mixed-case-prefix"),
    pytest.param("/v1/vault./db", None, id="fold-trailing-dot"),
    pytest.param("/v1/vault%20/db", None, id="fold-trailing-space"),
    pytest.param("/v1/vault%C2%A0/db", None, id="fold-trailing-nbsp"),
    pytest.param(f"/v1/{VAULT_FW}/db", None, id="fold-full-width"),
    pytest.param("/v1/vaults/db", "/v1/vaults/db", id="fold-other-segment-allowed"),
    # a strict deny rule (no foldPaths) matches the spelling it names, as RFC 3986 reads
    # paths: the other spellings are other paths, allowed by /v1/**, forwarded as sent
    pytest.param("/v1/secrets/db", None, id="strict-plain"),
    pytest.param("/v1/%73ecrets/db", None, id="strict-unreserved-escape"),
    pytest.param("/v1/SECRETS/db", "/v1/SECRETS/db", id="strict-upper-case-forwarded"),
    pytest.param("/v1/secrets./db", "/v1/secrets./db", id="strict-trailing-dot-forwarded"),
    pytest.param("/v1/secrets%20/db", "/v1/secrets%20/db", id="strict-trailing-space-forwarded"),
    pytest.param(f"/v1/{SECRETS_FW}/db", f"/v1/{SECRETS_FW}/db", id="strict-full-width-forwarded"),
]


@pytest.mark.parametrize(("path", "forwarded"), SPELLINGS)
def test_spellings_of_a_denied_segment(
    spelling_stack: Stack, path: str, forwarded: str | None
) -> None:
    since = len(spelling_stack.upstream.received)
    status, head, body = _get(spelling_stack, path)
    arrived = spelling_stack.upstream.received[since:]
    if forwarded is None:
        deny = _mandate_denied(status, head, body)
        assert deny["error"] == "denied_by_rule", deny
        assert arrived == []
    else:
        assert status == 200, (status, head, body[:300])
        assert [a["path"].upper() for a in arrived] == [forwarded.upper()]


# --- MCP: a notification with an id, and ids that are no JSON-RPC id ---------------------


def _mcp(stack: Stack, body: str) -> tuple[int, bytes, bytes]:
    data = body.encode()
    head = (
        f"POST http://{MCP_HOST}/mcp HTTP/1.1\r\nHost: {MCP_HOST}\r\n"
        f"content-type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return _send(stack, "research-agent", head.encode() + data)


def _rpc(id_text: str | None, method: str, name: str | None = None) -> str:
    parts = ['"jsonrpc": "2.0"']
    if id_text is not None:
        parts.append(f'"id": {id_text}')
    parts.append(f'"method": "{method}"')
    if name is not None:
        parts.append(f'"params": {{"name": "{name}", "arguments": {{}}}}')
    return "{" + ", ".join(parts) + "}"


HOSTILE_RPC = [
    # A notification has no id; with one it is a request for an unknown method.
    pytest.param(
        _rpc("1", "notifications/initialized", "delete_corpus"),
        "MCP method 'notifications/initialized' not allowed",
        id="notification-with-id-and-name",
    ),
    pytest.param(
        _rpc('"a"', "notifications/tools/call", "delete_corpus"),
        "MCP method 'notifications/tools/call' not allowed",
        id="notification-with-string-id",
    ),
    pytest.param(
        _rpc("null", "notifications/cancelled"),
        "MCP method 'notifications/cancelled' not allowed",
        id="notification-with-null-id",
    ),
    pytest.param(
        f"[{_rpc('1', 'ping')}, {_rpc('2', 'notifications/x', 'delete_corpus')}]",
        "MCP method 'notifications/x' not allowed",
        id="notification-with-id-in-a-batch",
    ),
    # Ids: a string, an integer within +-(2**53 - 1), or null.
    pytest.param(_rpc("1e999", "tools/call", "search_papers"), "JSON-RPC id", id="id-1e999"),
    pytest.param(_rpc("-1e999", "tools/call", "search_papers"), "JSON-RPC id", id="id-minus-inf"),
    pytest.param(_rpc("1.5", "tools/call", "search_papers"), "JSON-RPC id", id="id-fraction"),
    pytest.param(_rpc("true", "tools/call", "search_papers"), "JSON-RPC id", id="id-true"),
    pytest.param(_rpc("{}", "tools/call", "search_papers"), "JSON-RPC id", id="id-object"),
    pytest.param(_rpc("[1]", "tools/call", "search_papers"), "JSON-RPC id", id="id-array"),
    pytest.param(
        _rpc(str(2**53 + 1), "tools/call", "search_papers"), "JSON-RPC id", id="id-past-2-53"
    ),
    pytest.param(_rpc("9" * 400, "tools/call", "search_papers"), "JSON-RPC id", id="id-400-digits"),
]


@pytest.mark.parametrize(("body", "why"), HOSTILE_RPC)
def test_an_mcp_message_that_is_not_what_it_claims_is_denied(
    spelling_stack: Stack, body: str, why: str
) -> None:
    since = len(spelling_stack.upstream.received)
    deny = _mandate_denied(*_mcp(spelling_stack, body))
    assert deny["error"] == "outside_purpose", deny
    assert why in deny["reason"], deny
    assert spelling_stack.upstream.received[since:] == []


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_rpc(None, "notifications/initialized"), id="notification"),
        pytest.param(_rpc("7", "tools/call", "search_papers"), id="int-id"),
        pytest.param(_rpc('"req-1"', "tools/call", "search_papers"), id="string-id"),
        pytest.param(_rpc(str(2**53 - 1), "tools/call", "search_papers"), id="max-safe-id"),
    ],
)
def test_well_formed_mcp_messages_still_pass(spelling_stack: Stack, body: str) -> None:
    since = len(spelling_stack.upstream.received)
    status, head, reply = _mcp(spelling_stack, body)
    assert status == 200, (status, head, reply[:300])
    assert [r["body"] for r in spelling_stack.upstream.received[since:]] == [body]
