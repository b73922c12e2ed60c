"""Hostile MCP bodies (sidecar/core/mcp.py): shapes on which parsers disagree, or which
could crash a parser. Each must be refused as malformed — never pass an allow rule, always
match a deny rule — so that the upstream's parser can never read a tool or method other
than the one mandate decided on. The same shapes go through real Envoy in
tests/e2e/test_adversarial.py::test_hostile_mcp_bodies_never_reach_a_forbidden_tool."""

from __future__ import annotations

import gzip
import json

import pytest

from sidecar.core.mcp import McpMessage, mcp_allows, mcp_denies, parse_mcp_body

TOOLS = frozenset({"search_papers", "fetch_abstract"})
NO_METHODS: frozenset[str] = frozenset()


def call(name: object, method: str = "tools/call") -> str:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"name": name}})


SEARCH = call("search_papers")
# Hand-written JSON: json.dumps cannot write duplicate keys.
HEAD = '{"jsonrpc": "2.0", "id": 1, '

# (id, raw body, a word the refusal must contain)
HOSTILE: list[tuple[str, bytes, str]] = [
    # Duplicate keys: Python keeps the last value, many parsers the first.
    (
        "dup-name-forbidden-last",
        (
            HEAD + '"method": "tools/call", "params": '
            '{"name": "search_papers", "name": "delete_corpus"}}'
        ).encode(),
        "appears twice",
    ),
    (
        "dup-name-forbidden-first",
        (
            HEAD + '"method": "tools/call", "params": '
            '{"name": "delete_corpus", "name": "search_papers"}}'
        ).encode(),
        "appears twice",
    ),
    (
        "dup-method-session-last",
        (
            HEAD + '"method": "tools/call", "method": "ping", "params": {"name": "delete_corpus"}}'
        ).encode(),
        "appears twice",
    ),
    (
        "dup-method-session-first",
        (
            HEAD + '"method": "ping", "method": "tools/call", "params": {"name": "delete_corpus"}}'
        ).encode(),
        "appears twice",
    ),
    (
        "dup-params",
        (
            HEAD + '"method": "tools/call", "params": {"name": "delete_corpus"}, '
            '"params": {"name": "search_papers"}}'
        ).encode(),
        "appears twice",
    ),
    (
        "dup-jsonrpc",
        b'{"jsonrpc": "1.0", "jsonrpc": "2.0", "id": 1, "method": "tools/call", '
        b'"params": {"name": "search_papers"}}',
        "appears twice",
    ),
    (
        "dup-in-batch-element",
        (
            "[" + SEARCH + ", " + HEAD + '"method": "tools/call", "params": '
            '{"name": "delete_corpus", "name": "search_papers"}}]'
        ).encode(),
        "appears twice",
    ),
    (
        "dup-deep-in-arguments",
        (
            HEAD + '"method": "tools/call", "params": {"name": "search_papers", '
            '"arguments": {"q": 1, "q": 2}}}'
        ).encode(),
        "appears twice",
    ),
    # Nesting: RecursionError becomes a refusal, not an exception.
    ("deep-arrays-closed", b"[" * 2000 + b"]" * 2000, "nested too deeply"),
    ("deep-arrays-100k", b"[" * 100_000, "not JSON"),
    ("deep-objects", b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
    (
        "deep-in-arguments",
        (SEARCH[:-2] + ', "arguments": ' + "[" * 5000 + "]" * 5000 + "}}").encode(),
        "nested too deeply",
    ),
    # Encodings: strict UTF-8 only.
    (
        "invalid-utf8",
        SEARCH.replace("search_papers", "search_papers\udcff").encode("utf-8", "surrogateescape"),
        "not UTF-8",
    ),
    ("overlong-utf8", SEARCH.encode().replace(b"_", b"\xc1\x9f"), "not UTF-8"),
    ("utf8-surrogate", SEARCH.encode().replace(b"_", b"\xed\xa0\x80"), "not UTF-8"),
    ("bom", b"\xef\xbb\xbf" + SEARCH.encode(), "byte order mark"),
    # A lone surrogate escape is valid JSON text but no character: refused in the names
    # decided on (parsers read it differently; no UTF-8 audit record could carry it).
    (
        "lone-surrogate-tool",
        SEARCH.replace("search_papers", "search_papers\\udcff").encode(),
        "not valid Unicode",
    ),
    (
        "lone-high-surrogate-tool",
        SEARCH.replace("search_papers", "\\ud83dsearch_papers").encode(),
        "not valid Unicode",
    ),
    (
        "lone-surrogate-method",
        SEARCH.replace('"tools/call"', '"tools/call\\udcff"').encode(),
        "not valid Unicode",
    ),
    ("utf-16", SEARCH.encode("utf-16"), "not UTF-8"),
    ("utf-16-le-no-bom", SEARCH.encode("utf-16-le"), "not JSON"),
    ("utf-32", SEARCH.encode("utf-32"), "not UTF-8"),
    # Not JSON: NaN and Infinity (Python's json takes them), trailing messages.
    ("nan-id", SEARCH.replace('"id": 1', '"id": NaN').encode(), "NaN"),
    ("infinity-id", SEARCH.replace('"id": 1', '"id": Infinity').encode(), "Infinity"),
    ("minus-infinity", SEARCH.replace('"id": 1', '"id": -Infinity').encode(), "Infinity"),
    ("nan-in-arguments", (SEARCH[:-2] + ', "arguments": {"x": NaN}}}').encode(), "NaN"),
    ("second-message-after", (SEARCH + "\n" + call("delete_corpus")).encode(), "not JSON"),
    ("nul-byte", SEARCH.encode() + b"\x00", "not JSON"),
    ("gzip", gzip.compress(SEARCH.encode()), "not UTF-8"),
    # Batches.
    ("empty-batch", b"[]", "empty JSON-RPC batch"),
    ("batch-non-object", ("[" + SEARCH + ", 1]").encode(), "not a JSON-RPC 2.0"),
    ("batch-null", ("[" + SEARCH + ", null]").encode(), "not a JSON-RPC 2.0"),
    ("batch-in-batch", ("[[" + call("delete_corpus") + "]]").encode(), "not a JSON-RPC 2.0"),
    # Methods and names.
    ("method-other-case", call("delete_corpus", "Tools/Call").encode(), "another case"),
    ("method-upper-allowed-tool", call("search_papers", "TOOLS/CALL").encode(), "another case"),
    ("name-int", call(1).encode(), "without a tool name"),
    ("name-list", call(["delete_corpus"]).encode(), "without a tool name"),
    ("name-object", call({"delete_corpus": 1}).encode(), "without a tool name"),
    ("name-null", call(None).encode(), "without a tool name"),
    ("name-bool", call(True).encode(), "without a tool name"),
    # Ids (issue 15): a string, an integer within +-(2**53 - 1), or null; nothing else.
    ("id-infinite", SEARCH.replace('"id": 1', '"id": 1e999').encode(), "JSON-RPC id must be"),
    ("id-float", SEARCH.replace('"id": 1', '"id": 1.5').encode(), "JSON-RPC id must be"),
    ("id-true", SEARCH.replace('"id": 1', '"id": true').encode(), "JSON-RPC id must be"),
    ("id-object", SEARCH.replace('"id": 1', '"id": {"id": 1}').encode(), "JSON-RPC id must be"),
    ("id-array", SEARCH.replace('"id": 1', '"id": [1]').encode(), "JSON-RPC id must be"),
    ("id-huge", SEARCH.replace('"id": 1', f'"id": {10**30}').encode(), "JSON-RPC id must be"),
    (
        "id-bad-in-batch",
        ("[" + SEARCH + ", " + SEARCH.replace('"id": 1', '"id": 1e999') + "]").encode(),
        "JSON-RPC id must be",
    ),
]


@pytest.mark.parametrize(
    ("raw", "why"), [(r, w) for _, r, w in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_bodies_are_refused(raw: bytes, why: str) -> None:
    parsed = parse_mcp_body(raw, False)
    assert parsed.messages == ()
    assert parsed.error is not None and why in parsed.error, parsed.error
    refusal = mcp_allows(parsed, TOOLS, NO_METHODS)
    assert refusal is not None and why in refusal
    # A deny rule listing anything at all matches a body it cannot read.
    assert mcp_denies(parsed, frozenset({"unrelated"}), NO_METHODS)


def test_a_body_cut_at_the_limit_or_of_unknown_length_is_truncated() -> None:
    parsed = parse_mcp_body(SEARCH.encode(), True)
    assert parsed.error is not None and "truncated" in parsed.error
    assert "Content-Length" in parsed.error


@pytest.mark.parametrize(
    "raw",
    [
        SEARCH.encode(),
        b" \r\n\t" + SEARCH.encode() + b" \n",  # JSON whitespace around the value
        SEARCH.replace("search_papers", "search\\u005fpapers").encode(),  # escapes are JSON
        ("[" + SEARCH + "]").encode(),
        # The same key in two different objects is not a duplicate.
        (
            HEAD + '"method": "tools/call", "params": {"name": "search_papers", '
            '"arguments": {"name": "delete_corpus"}}}'
        ).encode(),
    ],
    ids=["plain", "whitespace", "escape", "batch", "same-key-other-object"],
)
def test_well_formed_bodies_still_parse(raw: bytes) -> None:
    parsed = parse_mcp_body(raw, False)
    assert parsed.error is None, parsed.error
    assert parsed.messages == (McpMessage("tools/call", "search_papers"),)
    assert mcp_allows(parsed, TOOLS, NO_METHODS) is None


@pytest.mark.parametrize("method", ["Resources/Read", "RESOURCES/READ", "resources/READ"])
def test_a_deny_rule_matches_a_method_in_any_case(method: str) -> None:
    raw = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode()
    parsed = parse_mcp_body(raw, False)
    assert parsed.error is None
    assert mcp_denies(parsed, frozenset(), frozenset({"resources/read"}))
    # An allow rule still lists methods exactly: another case is not listed.
    assert mcp_allows(parsed, TOOLS, frozenset({"resources/read"})) is not None


def test_parsing_never_raises_on_odd_bytes() -> None:
    for raw in [b"\xff" * 64, b"\x00", b"[" * 10 + b"\xc3", b'"\\ud800"', b"-", b"1" * 5000]:
        parsed = parse_mcp_body(raw, False)
        assert parsed.error is not None, raw
