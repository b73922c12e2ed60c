"""The path and host matchers never allow what a small reference implementation denies.

The references below are written for obviousness, not speed: a path pattern is a list of
segments (`*` = exactly one non-empty segment, `**` = zero or more) matched recursively
against the segments of the canonical path; a host pattern is an exact ASCII name or one
leading `*.` label, with an optional port. Inputs include what an agent uses to confuse a
matcher: `..`, `.`, `//`, `%2e`, `%2f`, `%25`, backslashes, `;`, look-alike Unicode.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import unicodedata
from functools import cache
from urllib.parse import unquote

from hypothesis import assume, example, given
from hypothesis import strategies as st

from sidecar.core.hosts import parse_authority, parse_host_pattern
from sidecar.core.mcp import parse_mcp_body
from sidecar.core.model import Rule
from sidecar.core.paths import MAX_PATH_LENGTH, canonical_path, compile_path_patterns, fold_path
from sidecar.core.rules import compile_rules

# --- reference: paths ------------------------------------------------------------------------


def ref_segments(canonical: str) -> tuple[str, ...]:
    """Segments of a canonical path ("" is the root, otherwise "/a/b")."""
    return tuple(canonical[1:].split("/")) if canonical else ()


def ref_pattern_segments(pattern: str) -> tuple[str, ...]:
    return () if pattern == "/" else tuple(pattern[1:].split("/"))


def ref_match(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    """Whether a pattern (segments) matches a path (segments)."""

    @cache
    def go(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(path)
        p = pattern[i]
        if p == "**":  # zero or more segments
            return any(go(i + 1, k) for k in range(j, len(path) + 1))
        if j == len(path):
            return False
        if p == "*":
            return path[j] != "" and go(i + 1, j + 1)
        return p == path[j] and go(i + 1, j + 1)

    return go(0, 0)


def ref_matches_any(patterns: list[str], canonical: str) -> bool:
    segs = ref_segments(canonical)
    return any(ref_match(ref_pattern_segments(p), segs) for p in patterns)


# Invisible code points: format characters, line/paragraph separators, variation selectors
# and the rest of Unicode's Default_Ignorable_Code_Point set, and the noncharacters
# U+FFFE/U+FFFF (issue 15, finding 8).
REF_IGNORABLE = (
    {0x34F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2065, 0x3164}
    | {0xFFA0, 0xFFFE, 0xFFFF}
    | set(range(0xFFF0, 0xFFF9))
    | set(range(0x13430, 0x13440))
    | set(range(0xE0000, 0xE1000))
)
REF_SLASH_LIKE = "\u2044\u2215\u2216\u29f5\u29f8\u29f9"  # best-fit slashes NFKC keeps


def ref_invisible(c: str) -> bool:
    return (
        unicodedata.category(c) in ("Cf", "Zl", "Zp")
        or "VARIATION SELECTOR" in unicodedata.name(c, "")
        or ord(c) in REF_IGNORABLE
    )


def ref_ambiguous_segment(seg: str) -> bool:
    """Only dots and spaces, or an NFKC form that is, or that has `/`, `\\`, `%` or `;`."""
    nfkc = unicodedata.normalize("NFKC", seg)
    return (
        seg.strip(". ") == ""
        or nfkc.strip(". ") == ""
        or any(c in nfkc for c in "/\\%;")
        or any(c in REF_SLASH_LIKE for c in seg)
    )


def ref_canonical(raw: str) -> str | None:
    """Drop query and fragment, percent-decode until stable (at most 3 rounds, strict UTF-8),
    refuse a `%` that starts no two-hex-digit escape (as sent or after a round), control
    characters, invisible code points, path parameters (`;`) and anything still encoded,
    read `\\` as `/`, resolve `.` and `..` (never above the root), drop empty segments, refuse
    a segment some upstream reads as structure (`ref_ambiguous_segment`)."""
    if len(raw) > MAX_PATH_LENGTH:
        return None
    path = re.split(r"[?#]", raw, maxsplit=1)[0]
    for _ in range(3):
        if re.search(r"%(?![0-9A-Fa-f]{2})", path):
            return None
        try:
            decoded = unquote(path, encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            return None
        if decoded == path:
            break
        path = decoded
    if "%" in path:
        return None
    if any(ref_invisible(c) for c in path):
        return None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path):
        return None
    if ";" in path:  # path parameters: upstreams disagree on them, refused
        return None
    if not path.startswith(("/", "\\")):
        return None
    stack: list[str] = []
    for seg in path.replace("\\", "/").split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if stack:
                stack.pop()
        elif ref_ambiguous_segment(seg):
            return None
        else:
            stack.append(seg)
    return "".join("/" + s for s in stack)


def test_every_code_point_is_refused_or_kept_as_the_reference_says() -> None:
    """Each code point (and each between two letters) once: invisible ones, the ones NFKC or
    a best-fit code page turns into path structure, and dot look-alikes are refused; the
    rest are kept as sent. Exhaustive, not sampled: every assigned plane but the private-use
    ones (planes 4-13 hold no character yet)."""
    assert sys.maxunicode == 0x10FFFF
    for i in (*range(0x80, 0xD800), *range(0xE000, 0x32400), *range(0xE0000, 0xE1000)):
        c = chr(i)
        for raw in (f"/v1/{c}", f"/v1/a{c}b"):
            assert canonical_path(raw) == ref_canonical(raw), (hex(i), raw)


# --- strategies: paths -----------------------------------------------------------------------

LITERALS = ["a", "b", "v1", "A", "é", "admin", "a;b"]
pattern_segment = st.sampled_from(["*", "**", *LITERALS])
path_pattern = st.lists(pattern_segment, max_size=5).map(lambda segs: "/" + "/".join(segs))

TRICKY = [
    "", ".", "..", "...", "%2e", "%2E", "%2e%2e", ".%2e", "%2e.", "%2E%2e", "%252e%252e",
    "%25252e%25252e", "%2525252e", "%2f", "%2F", "a%2fb", "a%2F..", "%252f", "%25", "%2525",
    "%5c", "%5C..", "\\", "..\\", "%c3%a9", "%C3%A9", "%e9", "%ff", "%", "%2", "%zz", ";",
    "..;", ";..", ".;", "\u212a", "\uff41", "\u2024\u2024", "\uff0e\uff0e", "e\u0301", "%00",
    "%0a", "\t", " ", "%20", "?", "#", "*", "**", "%u0073", "%25zz", "%E2%80%8B", "\u200b",
    "a.", "a ", "a%20", ". ", "..%20", "\uff53", "%EF%BC%8F", "\u2215", "\u00a0",
]  # fmt: skip
path_segment = st.one_of(
    st.sampled_from(LITERALS),
    st.sampled_from(TRICKY),
    st.text(alphabet=st.sampled_from("ab./\\%25eEfF;é\u212a"), max_size=6),
    st.text(max_size=4),
)
raw_path = st.builds(
    lambda lead, segs, seps, tail: (
        lead + "".join(s + seps[i % len(seps)] for i, s in enumerate(segs)).rstrip("/") + tail
    ),
    st.sampled_from(["/", "/", "/", "\\", "//", "%2f", "", "/./", "/../"]),
    st.lists(path_segment, max_size=8),
    st.lists(st.sampled_from(["/", "/", "\\", "//", "/./", "%2f", "%5c"]), min_size=1, max_size=3),
    st.sampled_from(["", "", "?", "?x=/../admin", "#/../admin", "?a#b", "/"]),
)


@given(st.lists(path_pattern, min_size=1, max_size=3), raw_path)
@example(["/a/**"], "/a/../admin")
@example(["/a/**"], "/a/%2e%2e/admin")
@example(["/a/**"], "/a/%252e%252e/admin")
@example(["/a/*"], "/a//")
@example(["/**"], "")
@example(["/a/b"], "/a%2fb")
@example(["/a/**"], "\\a\\..\\admin")
def test_path_matcher_agrees_with_the_reference(patterns: list[str], raw: str) -> None:
    canonical = canonical_path(raw)
    reference = ref_canonical(raw)
    # The canonical form is the reference's; None (deny) only where the reference refuses too.
    assert canonical == reference, (raw, canonical, reference)
    if canonical is None:
        return  # decide() denies a path it cannot canonicalise
    assert canonical == "" or (canonical.startswith("/") and "//" not in canonical)
    assert not canonical.endswith("/")
    assert all(seg not in (".", "..") for seg in ref_segments(canonical))
    compiled = compile_path_patterns(patterns)
    assert (compiled.match(canonical) is not None) == ref_matches_any(patterns, canonical)


ESCAPES = ["..", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "%25252e%25252e", "..\\.."]


@given(
    st.lists(st.sampled_from(LITERALS), min_size=1, max_size=3),
    st.sampled_from(["**", "*"]),
    st.lists(st.one_of(st.sampled_from(ESCAPES), path_segment), min_size=1, max_size=6),
    st.lists(st.sampled_from(LITERALS), max_size=3),
    st.sampled_from(["/", "\\", "//", "/./", "%2f", "%252f"]),
)
def test_a_dot_segment_escape_never_matches_the_prefix_it_left(
    prefix: list[str], wildcard: str, middle: list[str], after: list[str], sep: str
) -> None:
    """`/p/q/<..-ish>/rest` against `/p/q/**`: a match only if the canonical path really is
    under `/p/q`."""
    pattern = "/" + "/".join([*prefix, wildcard])
    raw = "/" + sep.join([*prefix, *middle, *after])
    canonical = canonical_path(raw)
    if canonical is None:
        return
    matched = compile_path_patterns([pattern]).match(canonical) is not None
    segs = ref_segments(canonical)
    inside = segs[: len(prefix)] == tuple(prefix)
    if matched:
        assert inside, (raw, canonical, pattern)
    # and the reference, applied to the reference's own canonical form, says the same
    ref = ref_canonical(raw)
    assert ref is not None
    assert matched == ref_matches_any([pattern], ref)


def ref_fold_segment(seg: str) -> str:
    nfkc = unicodedata.normalize("NFKC", seg)
    return unicodedata.normalize("NFKC", nfkc.casefold()).rstrip(". ")


@given(st.lists(path_pattern, min_size=1, max_size=3), raw_path)
@example(["/v1/**"], "/V1/SECRETS./x")
@example(["/A/**"], "/a/%EF%BD%81")
def test_a_folding_deny_rule_matches_whatever_the_strict_one_does_and_every_spelling(
    patterns: list[str], raw: str
) -> None:
    """Folding only adds matches (a deny rule never denies less for `foldPaths: true`), and
    a folded match is a reference match of the folded segments."""
    canonical = canonical_path(raw)
    if canonical is None:
        return
    folded = fold_path(canonical)
    assert folded == "".join("/" + f for f in map(ref_fold_segment, ref_segments(canonical)) if f)
    strict = compile_path_patterns(patterns).match(canonical) is not None
    fold = compile_path_patterns(patterns, fold=True).match(folded) is not None
    if strict:
        assert fold, (patterns, raw, canonical, folded)
    pattern_segs = [tuple(map(ref_fold_segment, ref_pattern_segments(p))) for p in patterns]
    expected = any(ref_match(segs, ref_segments(folded)) for segs in pattern_segs)
    assert fold == expected, (patterns, raw, folded)


# --- reference: hosts ------------------------------------------------------------------------

# Only the schemes Envoy's routes know have a default port (a `wss` call is no call to 443:
# Envoy sends it in clear to 80, so it is refused)
DEFAULT_PORTS = {"http": 80, "https": 443}


def ref_split(text: str) -> tuple[str, str | None] | None:
    if text.startswith("["):
        host, close, rest = text.partition("]")
        if not close:
            return None
        if rest == "":
            return host + "]", None
        return (host + "]", rest[1:]) if rest.startswith(":") else None
    parts = text.split(":")
    if len(parts) == 1:
        return text, None
    return (parts[0], parts[1]) if len(parts) == 2 else None


def ref_port(text: str) -> int | None:
    if not text or any(c not in "0123456789" for c in text):
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def ref_label_ok(label: str) -> bool:
    ok = "abcdefghijklmnopqrstuvwxyz0123456789_-"
    return (
        0 < len(label) <= 63
        and all(c in ok for c in label)
        and not label.startswith("-")
        and not label.endswith("-")
    )


def ref_host(text: str) -> str | None:
    """An ASCII host name (lower-cased, one trailing dot dropped) or a bracketed IPv6."""
    if not text.isascii():
        return None  # a host name is ASCII; look-alikes must not fold into one
    text = text.lower()
    if text.startswith("["):
        try:
            return "[" + str(ipaddress.IPv6Address(text[1:-1])) + "]"
        except ValueError:
            return None
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 253 or not all(ref_label_ok(x) for x in text.split(".")):
        return None
    return text


def ref_authority(authority: str, scheme: str) -> tuple[str, int] | None:
    split = ref_split(authority.strip())
    if split is None:
        return None
    host = ref_host(split[0])
    if host is None:
        return None
    if split[1] is None:
        default = DEFAULT_PORTS.get(scheme.lower())
        return None if default is None else (host, default)
    port = ref_port(split[1])
    return None if port is None else (host, port)


def ref_host_pattern(text: str) -> tuple[str, bool, int | None] | None:
    split = ref_split(text)
    if split is None:
        return None
    name, port_text = split
    port = None if port_text is None else ref_port(port_text)
    if port_text is not None and port is None:
        return None
    wildcard = name.startswith("*.")
    host = ref_host(name[2:] if wildcard else name)
    if host is None or (wildcard and host.startswith("[")):
        return None
    return host, wildcard, port


def ref_host_matches(pattern: tuple[str, bool, int | None], host: str, port: int) -> bool:
    phost, wildcard, pport = pattern
    if pport is not None and pport != port:
        return False
    if not wildcard:
        return host == phost
    label, dot, parent = host.partition(".")
    return bool(label) and bool(dot) and parent == phost


# --- strategies: hosts -----------------------------------------------------------------------

LABELS = [
    "api", "stripe", "com", "a", "b", "API", "Stripe", "x-y", "-x", "x-", "_dmarc", "xn--bcher-kva",
    "\u212aey", "k\u0435y", "str\u0131pe", "\uff41pi", "ap\u0131", "", "1", "10", "0",
]  # fmt: skip
hostname = st.builds(
    lambda labels, dot, upper: (
        ("".join(x + "." for x in labels)[:-1] + dot).upper()
        if upper
        else "".join(x + "." for x in labels)[:-1] + dot
    ),
    st.lists(st.sampled_from(LABELS), min_size=1, max_size=4),
    st.sampled_from(["", "", "."]),
    st.booleans(),
)
ip_literal = st.sampled_from(
    ["[::1]", "[0:0::1]", "[2001:DB8::1]", "[::ffff:1.2.3.4]", "[::1", "::1"]
)
port_suffix = st.sampled_from(
    ["", "", ":80", ":443", ":8080", ":0", ":65536", ":", ":+1", ":٤٤٣", ":80:80"]
)
authority = st.one_of(
    st.builds(lambda h, p: h + p, st.one_of(hostname, ip_literal), port_suffix),
    st.text(max_size=12),
    st.builds(lambda ws, h: ws + h + ws, st.sampled_from([" ", "\t", "\u00a0"]), hostname),
)
host_pattern = st.builds(
    lambda star, h, p: star + h + p,
    st.sampled_from(["", "", "*.", "*", "**.", "a*."]),
    st.one_of(hostname, ip_literal),
    port_suffix,
)


@given(authority, st.sampled_from(["http", "https", "HTTPS", "ws", "wss", "", "ftp"]))
@example("\u212aey.com", "http")
@example("API.Stripe.COM.", "https")
def test_parse_authority_agrees_with_the_reference(text: str, scheme: str) -> None:
    assert parse_authority(text, scheme) == ref_authority(text, scheme)


@given(host_pattern)
def test_parse_host_pattern_accepts_only_what_the_reference_accepts(text: str) -> None:
    try:
        hp = parse_host_pattern(text)
    except ValueError:
        return
    assert ref_host_pattern(text) == (hp.host, hp.wildcard, hp.port)


def _no_body() -> object:
    return parse_mcp_body(None, False)


@given(
    st.lists(host_pattern, min_size=1, max_size=4),
    authority,
    st.sampled_from(["GET", "CONNECT"]),
    st.sampled_from(["http", "https"]),
    st.booleans(),
)
@example(["*.stripe.com"], "api.stripe.com", "GET", "https", False)
@example(["*.stripe.com"], "a.b.stripe.com", "GET", "https", False)
@example(["*.stripe.com"], "stripe.com", "GET", "https", False)
@example(["*.stripe.com:443"], "API.STRIPE.COM.:443", "CONNECT", "https", True)
def test_host_rules_match_only_what_the_reference_matches(
    patterns: list[str], text: str, method: str, scheme: str, deny: bool
) -> None:
    parsed = [ref_host_pattern(p) for p in patterns]
    valid = []
    for p in patterns:
        try:
            parse_host_pattern(p)
        except ValueError:
            continue
        valid.append(p)
    assume(valid)
    parsed = [ref_host_pattern(p) for p in valid]
    assert None not in parsed, valid  # the validator accepted what the reference refuses
    index = compile_rules([Rule.model_validate({"hosts": valid})], "p.allow")
    hp = parse_authority(text, "" if method == "CONNECT" else scheme)
    if hp is None:
        assert ref_authority(text, "" if method == "CONNECT" else scheme) is None
        return  # decide() denies a malformed authority
    host, port = hp
    match = index.lookup(host, port, method, "/x", _no_body, deny=deny)  # type: ignore[arg-type]
    ref = ref_authority(text, "" if method == "CONNECT" else scheme)
    assert ref is not None
    expected = any(ref_host_matches(p, *ref) for p in parsed if p is not None)
    assert (match.rule is not None) == expected, (valid, text, hp)
