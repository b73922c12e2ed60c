"""Request-path canonicalisation and path patterns (sidecar/core/paths.py)."""

from __future__ import annotations

import re

import pytest

from sidecar.core.paths import (
    MAX_PATH_LENGTH,
    canonical_path,
    compile_path_patterns,
    display_path,
    fold_path,
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
        pytest.param("/%25252e", "", id="triple-encoded-dot"),
        pytest.param("/a%2541", "/aA", id="double-encoded-letter"),
        # Issue 15, finding 8: spellings kept as they are (a deny rule may fold them).
        pytest.param("/v1/SECRETS/db", "/v1/SECRETS/db", id="upper-case-kept"),
        pytest.param("/v1/secrets./db", "/v1/secrets./db", id="trailing-dot-kept"),
        pytest.param("/v1/secrets%20/db", "/v1/secrets /db", id="trailing-space-kept"),
        pytest.param("/v1/a.b.", "/v1/a.b.", id="trailing-dot-last-segment-kept"),
        pytest.param("/v1/a%20b", "/v1/a b", id="inner-space"),
        pytest.param(
            "/v1/%EF%BD%93%EF%BD%85%EF%BD%83%EF%BD%92%EF%BD%85%EF%BD%94%EF%BD%93/db",
            "/v1/\uff53\uff45\uff43\uff52\uff45\uff54\uff53/db",
            id="full-width-letters-kept",
        ),
        pytest.param("/v1/wait%E2%80%A6", "/v1/wait\u2026", id="ellipsis-in-a-word-kept"),
        pytest.param("/wiki/%E6%97%A5%E6%9C%AC", "/wiki/\u65e5\u672c", id="cjk"),
        pytest.param("/v1/e%CC%81", "/v1/e\u0301", id="combining-accent-kept"),
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
        # Issue 15, finding 8: a `%` that starts no two-hex-digit escape, as sent or after
        # decoding (upstreams read these each their own way; IIS reads %u0073 as `s`).
        pytest.param("/v1/secrets%zz/db", id="escape-not-hex"),
        pytest.param("/v1/secrets%2", id="escape-one-digit-at-end"),
        pytest.param("/v1/secrets%2/db", id="escape-one-digit"),
        pytest.param("/v1/%u0073ecrets/db", id="escape-iis-u"),
        pytest.param("/v1/secrets%u002fdb", id="escape-iis-u-slash"),
        pytest.param("/100%", id="lone-percent"),
        pytest.param("/a%zz", id="invalid-escape"),
        pytest.param("/a%%41", id="percent-percent"),
        pytest.param("/100%25", id="encoded-percent-is-lone-after-decoding"),
        pytest.param("/a%25zz", id="encoded-bad-escape"),
        pytest.param("/a%25u0073", id="encoded-iis-u"),
        pytest.param("/a%252", id="encoded-one-digit"),
        pytest.param("/a%zz?q=1", id="bad-escape-before-query"),
        # Invisible code points: the segment looks like (and to some upstreams is) another.
        pytest.param("/v1/secrets%E2%80%8B/db", id="zero-width-space"),
        pytest.param("/v1/sec%E2%80%8Crets/db", id="zero-width-non-joiner"),
        pytest.param("/v1/secrets%E2%80%8D", id="zero-width-joiner"),
        pytest.param("/v1/secrets%E2%81%A0", id="word-joiner"),
        pytest.param("/v1/%EF%BB%BFsecrets", id="bom"),
        pytest.param("/v1/secrets%C2%AD", id="soft-hyphen"),
        pytest.param("/v1/secrets%E2%80%AE", id="bidi-override"),
        pytest.param("/v1/secrets%E2%81%A6", id="bidi-isolate"),
        pytest.param("/v1/secrets%EF%B8%8F", id="variation-selector"),
        pytest.param("/v1/secrets%CD%8F", id="combining-grapheme-joiner"),
        pytest.param("/v1/secrets%F3%A0%80%81", id="tag-character"),
        pytest.param("/v1/secrets%E2%80%A8", id="line-separator"),
        pytest.param("/v1/secrets%E3%85%A4", id="hangul-filler"),
        pytest.param("/v1/secrets%EF%BF%BF", id="noncharacter"),
        # Segments an upstream reads as `.` or `..`, or as other segments.
        pytest.param("/v1/...", id="three-dots"),
        pytest.param("/v1/x/..%20/secrets", id="dot-dot-space"),
        pytest.param("/v1/x/.%20/secrets", id="dot-space"),
        pytest.param("/v1/%20/x", id="space-segment"),
        pytest.param("/v1/x/%EF%BC%8E%EF%BC%8E/secrets", id="full-width-dot-dot"),
        pytest.param("/v1/x/%EF%B9%92/secrets", id="small-full-stop"),
        pytest.param("/v1/%E2%80%A6", id="ellipsis-alone-is-three-dots"),
        pytest.param("/v1/a%EF%BC%8Fb", id="full-width-slash"),
        pytest.param("/v1/a%EF%BC%BCb", id="full-width-backslash"),
        pytest.param("/v1/a%EF%B9%A8b", id="small-reverse-solidus"),
        pytest.param("/v1/a%EF%BC%9Bx", id="full-width-semicolon"),
        pytest.param("/v1/a%CD%BEx", id="greek-question-mark-is-a-semicolon"),
        pytest.param("/v1/a%EF%BC%85zz", id="full-width-percent"),
        pytest.param("/v1/a%E2%88%95b", id="division-slash"),
        pytest.param("/v1/a%E2%81%84b", id="fraction-slash"),
        pytest.param("/v1/c%E2%84%85o", id="care-of-has-a-slash-in-nfkc"),
    ],
)
def test_canonical_path_refuses(raw: str) -> None:
    assert canonical_path(raw) is None


@pytest.mark.parametrize(
    ("canonical", "folded"),
    [
        pytest.param("", "", id="root"),
        pytest.param("/v1/secrets/db", "/v1/secrets/db", id="plain"),
        pytest.param("/v1/SECRETS/db", "/v1/secrets/db", id="upper-case"),
        pytest.param("/V1/Secrets", "/v1/secrets", id="mixed-case"),
        pytest.param("/v1/secrets./db", "/v1/secrets/db", id="trailing-dot"),
        pytest.param("/v1/secrets..", "/v1/secrets", id="trailing-dots-last"),
        pytest.param("/v1/secrets /db", "/v1/secrets/db", id="trailing-space"),
        pytest.param("/v1/secrets . /db", "/v1/secrets/db", id="trailing-dots-and-spaces"),
        pytest.param("/v1/a.b", "/v1/a.b", id="inner-dot-kept"),
        pytest.param("/v1/ a", "/v1/ a", id="leading-space-kept"),
        pytest.param(
            "/v1/\uff53\uff45\uff43\uff52\uff45\uff54\uff53/db",
            "/v1/secrets/db",
            id="full-width",
        ),
        pytest.param("/v1/\uff33\uff25\uff23RETS", "/v1/secrets", id="full-width-upper"),
        pytest.param("/v1/secrets\u00a0/db", "/v1/secrets/db", id="trailing-nbsp"),
        pytest.param("/v1/secrets\u3000", "/v1/secrets", id="trailing-ideographic-space"),
        pytest.param("/v1/STRASSE", "/v1/strasse", id="ascii"),
        pytest.param("/v1/stra\u00dfe", "/v1/strasse", id="sharp-s-casefolds"),
        pytest.param("/v1/\u212aey", "/v1/key", id="kelvin-sign"),
        pytest.param("/v1/\ufb01le", "/v1/file", id="ligature"),
        pytest.param("/v1/caf\u00e9", "/v1/caf\u00e9", id="composed"),
        pytest.param("/v1/cafe\u0301", "/v1/caf\u00e9", id="decomposed-composes"),
    ],
)
def test_fold_path(canonical: str, folded: str) -> None:
    assert fold_path(canonical) == folded


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
        pytest.param(["/v1/**"], "/v1/secrets%zz/db", False, id="bad-escape-never-matches"),
        pytest.param(["/v1/**"], "/v1/%u0073ecrets/db", False, id="iis-escape-never-matches"),
        pytest.param(["/v1/**"], "/v1/x%E2%80%8B", False, id="zero-width-never-matches"),
        pytest.param(["/v1/secrets/**"], "/v1/SECRETS/db", False, id="strict-case"),
        pytest.param(["/v1/secrets/**"], "/v1/secrets./db", False, id="strict-trailing-dot"),
    ],
)
def test_path_pattern_matching(patterns: list[str], raw: str, matches: bool) -> None:
    regex = compile_path_patterns([validate_path_pattern(p) for p in patterns])
    path = canonical_path(raw)
    assert (path is not None and regex.match(path) is not None) is matches


@pytest.mark.parametrize(
    ("patterns", "raw", "matches"),
    [
        pytest.param(["/v1/secrets/**"], "/v1/secrets/db", True, id="plain"),
        pytest.param(["/v1/secrets/**"], "/v1/SECRETS/db", True, id="upper-case"),
        pytest.param(["/v1/secrets/**"], "/V1/Secrets", True, id="mixed-case-prefix"),
        pytest.param(["/v1/secrets/**"], "/v1/secrets./db", True, id="trailing-dot"),
        pytest.param(["/v1/secrets/**"], "/v1/secrets%20/db", True, id="trailing-space"),
        pytest.param(["/v1/secrets/**"], "/v1/secrets%2e%2e%2e", True, id="trailing-dots"),
        pytest.param(
            ["/v1/secrets/**"],
            "/v1/%EF%BD%93%EF%BD%85%EF%BD%83%EF%BD%92%EF%BD%85%EF%BD%94%EF%BD%93/db",
            True,
            id="full-width",
        ),
        pytest.param(["/v1/secrets/**"], "/v1/secrets%C2%A0/db", True, id="trailing-nbsp"),
        pytest.param(["/v1/SECRETS/**"], "/v1/secrets/db", True, id="pattern-folded-too"),
        pytest.param(["/v1/secrets./*"], "/v1/secrets/db", True, id="pattern-trailing-dot"),
        pytest.param(["/v1/secrets/**"], "/v1/secretsx/db", False, id="other-segment"),
        pytest.param(["/v1/secrets/**"], "/v1/se.crets/db", False, id="inner-dot-kept"),
        pytest.param(["/v1/secrets/**"], "/v1/public/db", False, id="other-path"),
        pytest.param(["/v1/*/db"], "/V1/anything/DB", True, id="star"),
    ],
)
def test_folded_path_pattern_matching(patterns: list[str], raw: str, matches: bool) -> None:
    regex = compile_path_patterns([validate_path_pattern(p) for p in patterns], fold=True)
    path = canonical_path(raw)
    assert path is not None
    assert (regex.match(fold_path(path)) is not None) is matches
