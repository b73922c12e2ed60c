"""Request-path canonicalisation and path patterns (sidecar/core/paths.py)."""

from __future__ import annotations

import re

import pytest

from sidecar.core.paths import (
    MAX_PATH_LENGTH,
    canonical_path,
    compile_path_patterns,
    display_path,
    validate_path_pattern,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("/", "", id="root"),
        pytest.param("/v1/invoices/42", "/v1/invoices/42", id="plain"),
        pytest.param("/v1/invoices/", "/v1/invoices", id="trailing-slash-dropped"),
        pytest.param("/a//b///c", "/a/b/c", id="double-slash-merged"),
        pytest.param("//a", "/a", id="leading-double-slash"),
        pytest.param("\\a\\b", "/a/b", id="backslash-is-slash"),
        pytest.param("/a\\..\\b", "/b", id="backslash-dot-dot"),
        pytest.param("/a/./b/.", "/a/b", id="dot-segments-dropped"),
        pytest.param("/v1/ledger/../admin", "/v1/admin", id="dot-dot-resolved"),
        pytest.param("/v1/ledger/%2e%2e/admin", "/v1/admin", id="encoded-dot-dot"),
        pytest.param("/v1/ledger/.%2E/admin", "/v1/admin", id="half-encoded-dot-dot"),
        pytest.param("/v1/ledger/%252e%252e/admin", "/v1/admin", id="double-encoded-dot-dot"),
        pytest.param("/v1/ledger%2f..%2fadmin", "/v1/admin", id="encoded-slash-and-dot-dot"),
        pytest.param("/a%5c..%5cb", "/b", id="encoded-backslash"),
        pytest.param("/..", "", id="dot-dot-at-root-stays-at-root"),
        pytest.param("/../../x", "/x", id="never-above-root"),
        pytest.param("/a?x=/../b", "/a", id="query-ignored"),
        pytest.param("/a#/../b", "/a", id="fragment-ignored"),
        pytest.param("/a/b?q#f", "/a/b", id="query-and-fragment"),
        pytest.param("/a%3Fb", "/a?b", id="encoded-question-mark-is-not-a-query"),
        pytest.param("/caf%C3%A9", "/caf\u00e9", id="utf8-decoded"),
        pytest.param("/A/B", "/A/B", id="case-kept"),
        pytest.param("/100%", "/100%", id="lone-percent-kept"),
        pytest.param("/a%zz", "/a%zz", id="invalid-escape-kept"),
        pytest.param("/%25252e", "", id="triple-encoded-dot"),
    ],
)
def test_canonical_path(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("", id="empty"),
        pytest.param("*", id="asterisk-form"),
        pytest.param("v1/a", id="relative"),
        pytest.param("http://host/a", id="absolute-form"),
        pytest.param("?q", id="query-only"),
        pytest.param("/a\x00b", id="nul"),
        pytest.param("/a%00b", id="encoded-nul"),
        pytest.param("/a\tb", id="tab"),
        pytest.param("/a%0d%0ab", id="encoded-crlf"),
        pytest.param("/a\x7f", id="del"),
        pytest.param("/a\x85", id="c1-control"),
        pytest.param("/a%ff", id="bad-utf8"),
        pytest.param("/a%c0%af", id="overlong-utf8-slash"),
        pytest.param("/a%2525252e", id="encoded-too-deep"),
        pytest.param("/" + "a" * MAX_PATH_LENGTH, id="too-long"),
    ],
)
def test_canonical_path_refuses(raw: str) -> None:
    assert canonical_path(raw) is None


def test_canonical_path_length_limit_is_inclusive() -> None:
    raw = "/" + "a" * (MAX_PATH_LENGTH - 1)
    assert canonical_path(raw) == raw


@pytest.mark.parametrize(
    ("canonical", "shown"),
    [pytest.param("", "/", id="root"), pytest.param("/a/b", "/a/b", id="path")],
)
def test_display_path(canonical: str, shown: str) -> None:
    assert display_path(canonical) == shown


@pytest.mark.parametrize(
    "pattern",
    ["/", "/**", "/*", "/v1/invoices/*", "/v1/ledger/**", "/v1/*/x/**", "/a.b/c-d_e~f", "/mcp"],
)
def test_valid_path_pattern(pattern: str) -> None:
    assert validate_path_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        pytest.param("v1", "must start with '/'", id="no-leading-slash"),
        pytest.param("", "must start with '/'", id="empty"),
        pytest.param("/v1/", "must not end with '/'", id="trailing-slash"),
        pytest.param("/v1//a", "empty segment", id="double-slash"),
        pytest.param("/v1/../a", "'..' segment", id="dot-dot"),
        pytest.param("/v1/./a", "'.' segment", id="dot"),
        pytest.param("/v1/a*b", "must be whole segments", id="star-inside-segment"),
        pytest.param("/v1/***", "must be whole segments", id="triple-star"),
        pytest.param("/v1/a?b", "may not contain", id="question-mark"),
        pytest.param("/v1/a%2e", "may not contain", id="percent"),
        pytest.param("/v1/a b", "may not contain", id="space"),
        pytest.param("/v1/a\\b", "may not contain", id="backslash"),
    ],
)
def test_invalid_path_pattern(pattern: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        validate_path_pattern(pattern)


@pytest.mark.parametrize(
    ("patterns", "raw", "matches"),
    [
        pytest.param(["/v1/invoices/*"], "/v1/invoices/42", True, id="star-one-segment"),
        pytest.param(["/v1/invoices/*"], "/v1/invoices", False, id="star-not-zero-segments"),
        pytest.param(["/v1/invoices/*"], "/v1/invoices/", False, id="star-not-empty-segment"),
        pytest.param(["/v1/invoices/*"], "/v1/invoices/4/2", False, id="star-not-two-segments"),
        pytest.param(["/v1/*/items"], "/v1/x/items", True, id="star-in-middle"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger", True, id="double-star-zero"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger/", True, id="double-star-trailing-slash"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger/a/b/c", True, id="double-star-many"),
        pytest.param(["/v1/ledger/**"], "/v1/ledgers", False, id="double-star-not-prefix-string"),
        pytest.param(["/v1/**/x"], "/v1/x", True, id="double-star-middle-zero"),
        pytest.param(["/v1/**/x"], "/v1/a/b/x", True, id="double-star-middle-many"),
        pytest.param(["/**"], "/", True, id="everything-root"),
        pytest.param(["/**"], "/a/b", True, id="everything-deep"),
        pytest.param(["/"], "/", True, id="root-pattern-root"),
        pytest.param(["/"], "/a", False, id="root-pattern-not-child"),
        pytest.param(["/mcp"], "/mcp?session=1", True, id="query-ignored"),
        pytest.param(["/mcp"], "/mcp/", True, id="trailing-slash-ignored"),
        pytest.param(["/mcp"], "/MCP", False, id="case-sensitive"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger/../admin", False, id="dot-dot-escape"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger/%2e%2e/admin", False, id="encoded-escape"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger/.%2E/admin", False, id="mixed-escape"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger/%252e%252e/x", False, id="double-encoded"),
        pytest.param(["/v1/ledger/**"], "/v1/ledger/a/../b", True, id="dot-dot-inside-prefix"),
        pytest.param(["/v1/ledger/**"], "//v1//ledger//a", True, id="double-slashes"),
        pytest.param(["/v1/ledger/**"], "\\v1\\ledger\\a", True, id="backslashes"),
        pytest.param(["/v1/a.b"], "/v1/aXb", False, id="dot-is-literal"),
        pytest.param(["/a", "/b/*"], "/b/c", True, id="second-pattern"),
        pytest.param(["/a", "/b/*"], "/c", False, id="no-pattern"),
        pytest.param(["/v1/*"], "/v1/a%0ab", False, id="control-char-never-matches"),
    ],
)
def test_path_pattern_matching(patterns: list[str], raw: str, matches: bool) -> None:
    regex = compile_path_patterns([validate_path_pattern(p) for p in patterns])
    path = canonical_path(raw)
    assert (path is not None and regex.match(path) is not None) is matches
