"""Authorities, host patterns and host matching (sidecar/core/hosts.py, through RuleIndex)."""

from __future__ import annotations

import re

import pytest

from sidecar.core.hosts import HostPattern, parse_authority, parse_host_pattern
from sidecar.core.mcp import McpBody
from sidecar.core.model import Rule
from sidecar.core.rules import compile_rules


@pytest.mark.parametrize(
    ("authority", "scheme", "expected"),
    [
        pytest.param("api.stripe.com", "https", ("api.stripe.com", 443), id="https-default-443"),
        pytest.param("api.stripe.com", "http", ("api.stripe.com", 80), id="http-default-80"),
        pytest.param("api.stripe.com", "HTTPS", ("api.stripe.com", 443), id="scheme-any-case"),
        pytest.param("echo.local", "wss", None, id="wss-no-default"),
        pytest.param("echo.local", "ws", None, id="ws-no-default"),
        pytest.param("api.stripe.com:8443", "https", ("api.stripe.com", 8443), id="explicit-port"),
        pytest.param("API.Stripe.COM", "https", ("api.stripe.com", 443), id="lower-cased"),
        pytest.param("api.stripe.com.", "https", ("api.stripe.com", 443), id="trailing-dot"),
        pytest.param("api.stripe.com.:443", "http", ("api.stripe.com", 443), id="dot-and-port"),
        pytest.param(" api.stripe.com ", "http", ("api.stripe.com", 80), id="surrounding-space"),
        pytest.param("10.0.0.1:8080", "http", ("10.0.0.1", 8080), id="ipv4"),
        pytest.param("[::1]:8080", "http", ("[::1]", 8080), id="ipv6-port"),
        pytest.param("[::1]", "https", ("[::1]", 443), id="ipv6-default-port"),
        pytest.param("[0:0:0:0:0:0:0:1]", "http", ("[::1]", 80), id="ipv6-compressed"),
        pytest.param("[2001:DB8::1]", "http", ("[2001:db8::1]", 80), id="ipv6-lower-cased"),
        pytest.param("svc_name.local", "http", ("svc_name.local", 80), id="underscore-label"),
    ],
)
def test_parse_authority(authority: str, scheme: str, expected: tuple[str, int]) -> None:
    assert parse_authority(authority, scheme) == expected


@pytest.mark.parametrize(
    ("authority", "scheme"),
    [
        pytest.param("", "http", id="empty"),
        pytest.param("api.stripe.com", "ftp", id="no-default-port-for-scheme"),
        pytest.param("api.stripe.com", "", id="no-scheme"),
        pytest.param("api.stripe.com:", "http", id="empty-port"),
        pytest.param("api.stripe.com:0", "http", id="port-zero"),
        pytest.param("api.stripe.com:65536", "http", id="port-too-big"),
        pytest.param("api.stripe.com:+80", "http", id="signed-port"),
        pytest.param("api.stripe.com:\u0664\u0664\u0663", "http", id="non-ascii-digits"),
        pytest.param("api.stripe.com:80:80", "http", id="two-colons"),
        pytest.param("::1", "http", id="ipv6-without-brackets"),
        pytest.param("[::1", "http", id="unterminated-bracket"),
        pytest.param("[::1]x", "http", id="text-after-bracket"),
        pytest.param("[zz::1]", "http", id="bad-ipv6"),
        pytest.param("user@api.stripe.com", "http", id="userinfo"),
        pytest.param("api stripe.com", "http", id="space-inside"),
        pytest.param("api..stripe.com", "http", id="empty-label"),
        pytest.param("-api.stripe.com", "http", id="label-leading-hyphen"),
        pytest.param("a%2ecom", "http", id="percent"),
        pytest.param("*.stripe.com", "http", id="wildcard-is-not-an-authority"),
        pytest.param("a" * 64 + ".com", "http", id="label-too-long"),
    ],
)
def test_parse_authority_malformed(authority: str, scheme: str) -> None:
    assert parse_authority(authority, scheme) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("api.stripe.com", HostPattern("api.stripe.com", False, None), id="exact"),
        pytest.param("*.stripe.com", HostPattern("stripe.com", True, None), id="wildcard"),
        pytest.param("*.stripe.com:443", HostPattern("stripe.com", True, 443), id="wildcard-port"),
        pytest.param(
            "API.Example.COM.", HostPattern("api.example.com", False, None), id="case-dot"
        ),
        pytest.param("svc.local:8080", HostPattern("svc.local", False, 8080), id="port"),
        pytest.param("[::1]:9000", HostPattern("[::1]", False, 9000), id="ipv6-port"),
        pytest.param("[0::1]", HostPattern("[::1]", False, None), id="ipv6"),
        pytest.param("localhost", HostPattern("localhost", False, None), id="single-label"),
    ],
)
def test_parse_host_pattern(text: str, expected: HostPattern) -> None:
    assert parse_host_pattern(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "non-empty string", id="empty"),
        pytest.param("*", "only one leading '*.' label", id="bare-star"),
        pytest.param("a.*.com", "only one leading '*.' label", id="inner-star"),
        pytest.param("*.*.com", "only one leading '*.' label", id="two-stars"),
        pytest.param("*stripe.com", "only one leading '*.' label", id="star-in-label"),
        pytest.param("api.stripe.com:99999", "from 1 to 65535", id="port-too-big"),
        pytest.param("api.stripe.com:https", "from 1 to 65535", id="port-not-number"),
        pytest.param("api.stripe.com:\u0668\u0660", "from 1 to 65535", id="port-non-ascii"),
        pytest.param("api_stripe com", "not a valid host name", id="space"),
        pytest.param("https://api.stripe.com", "from 1 to 65535", id="url"),
        pytest.param("::1", "must be written in brackets", id="ipv6-without-brackets"),
        pytest.param("[::g]", "not an IPv6 address", id="bad-ipv6"),
        pytest.param("*.[::1]", "brackets", id="wildcard-ipv6"),
    ],
)
def test_invalid_host_pattern(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_host_pattern(text)


def _no_body() -> McpBody:
    raise AssertionError("a rule without mcpTools must not read the body")


def _host_matches(pattern: str, authority: str, scheme: str = "https") -> bool:
    index = compile_rules([Rule.model_validate({"hosts": [pattern]})], "p.allow")
    parsed = parse_authority(authority, scheme)
    assert parsed is not None, authority
    host, port = parsed
    return index.lookup(host, port, "GET", "/x", _no_body, deny=False).rule is not None


@pytest.mark.parametrize(
    ("pattern", "authority", "scheme", "matches"),
    [
        pytest.param("*.stripe.com", "api.stripe.com", "https", True, id="wildcard-one-label"),
        pytest.param("*.stripe.com", "stripe.com", "https", False, id="wildcard-not-parent"),
        pytest.param("*.stripe.com", "a.b.stripe.com", "https", False, id="wildcard-not-two"),
        pytest.param("*.stripe.com", "evilstripe.com", "https", False, id="wildcard-not-suffix"),
        pytest.param("*.stripe.com", "api.stripe.com.evil", "https", False, id="not-prefix"),
        pytest.param("*.stripe.com", "API.STRIPE.COM", "https", True, id="wildcard-any-case"),
        pytest.param("*.Stripe.COM", "api.stripe.com", "https", True, id="pattern-any-case"),
        pytest.param("*.stripe.com", "api.stripe.com.", "https", True, id="wildcard-trailing-dot"),
        pytest.param("api.stripe.com.", "api.stripe.com", "https", True, id="pattern-trailing-dot"),
        pytest.param("api.stripe.com", "api.stripe.com:8443", "https", True, id="no-port-any"),
        pytest.param("api.stripe.com", "api.stripe.com", "http", True, id="no-port-any-scheme"),
        pytest.param("api.stripe.com:443", "api.stripe.com", "https", True, id="default-443"),
        pytest.param("api.stripe.com:443", "api.stripe.com", "http", False, id="default-80"),
        pytest.param("api.stripe.com:80", "api.stripe.com", "http", True, id="default-80-ok"),
        pytest.param("api.stripe.com:443", "api.stripe.com:8443", "https", False, id="other-port"),
        pytest.param("*.stripe.com:8443", "api.stripe.com:8443", "http", True, id="wild-port-ok"),
        pytest.param("*.stripe.com:8443", "api.stripe.com", "https", False, id="wild-port-no"),
        pytest.param("api.stripe.com", "stripe.com", "https", False, id="exact-not-parent"),
        pytest.param("stripe.com", "api.stripe.com", "https", False, id="exact-not-child"),
        pytest.param("[::1]:9000", "[0:0::1]:9000", "http", True, id="ipv6-normalised"),
        pytest.param("[::1]:9000", "[::1]:9001", "http", False, id="ipv6-other-port"),
        pytest.param("[::1]", "[::2]", "http", False, id="ipv6-other-address"),
        pytest.param("10.0.0.1", "10.0.0.1:8080", "http", True, id="ipv4-any-port"),
    ],
)
def test_host_matching(pattern: str, authority: str, scheme: str, matches: bool) -> None:
    assert _host_matches(pattern, authority, scheme) is matches
