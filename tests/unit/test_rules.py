"""Rule matching through the compiled RuleIndex (sidecar/core/rules.py).

Requests here are already canonical (lower-case host, port filled in, upper-case method,
canonical path), as `decide` hands them to the index.
"""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.core.mcp import McpBody
from sidecar.core.model import DenyRule, Rule
from sidecar.core.paths import canonical_path
from sidecar.core.rules import RuleIndex, compile_rules


def _index(rules: list[dict[str, Any]], prefix: str = "p.allow") -> RuleIndex:
    model = DenyRule if prefix.endswith("deny") else Rule
    return compile_rules([model.model_validate(r) for r in rules], prefix)


def _no_body() -> McpBody:
    raise AssertionError("a rule without MCP fields must not read the body")


def _first(
    rules: list[dict[str, Any]], request: str, *, deny: bool = False, prefix: str = "p.allow"
) -> str | None:
    """The id of the rule matching ``request`` ("METHOD host:port /path"), or None."""
    method, hostport, raw_path = request.split(" ")
    host, port = hostport.rsplit(":", 1)
    path = "" if method == "CONNECT" else canonical_path(raw_path)
    assert path is not None
    match = _index(rules, prefix).lookup(host, int(port), method, path, _no_body, deny=deny)
    return None if match.rule is None else match.rule.rule_id


LEDGER = "ledger.finance.svc.cluster.local"
RECONCILE_ALLOW: list[dict[str, Any]] = [
    {"hosts": [LEDGER], "methods": ["GET"], "paths": ["/v1/invoices/*", "/v1/ledger/**"]},
    {"hosts": ["*.stripe.com"], "methods": ["GET"], "paths": ["/v1/charges/**"]},
]
RECONCILE_DENY: list[dict[str, Any]] = [{"paths": ["/v1/ledger/admin/**"]}]


@pytest.mark.parametrize(
    ("rules", "request_", "expected"),
    [
        # the example profile's reconcile purpose
        pytest.param(RECONCILE_ALLOW, f"GET {LEDGER}:80 /v1/invoices/7", "p.allow[0]", id="inv"),
        pytest.param(RECONCILE_ALLOW, f"GET {LEDGER}:443 /v1/ledger", "p.allow[0]", id="ledger"),
        pytest.param(RECONCILE_ALLOW, f"POST {LEDGER}:80 /v1/invoices/7", None, id="method"),
        pytest.param(RECONCILE_ALLOW, f"GET {LEDGER}:80 /v1/invoices/7/x", None, id="one-seg"),
        pytest.param(RECONCILE_ALLOW, f"GET {LEDGER}:80 /v1/ledger/../admin", None, id="escape"),
        pytest.param(RECONCILE_ALLOW, "GET api.stripe.com:443 /v1/charges/c", "p.allow[1]", id="w"),
        pytest.param(RECONCILE_ALLOW, "GET stripe.com:443 /v1/charges/c", None, id="w-parent"),
        pytest.param(RECONCILE_ALLOW, "GET a.b.stripe.com:443 /v1/charges", None, id="w-deep"),
        pytest.param(RECONCILE_ALLOW, "GET api.stripe.com:443 /v1/ledger/x", None, id="w-path"),
        pytest.param(RECONCILE_ALLOW, "GET other.svc:80 /v1/invoices/7", None, id="other-host"),
        # absent fields match anything
        pytest.param([{}], "DELETE any.host:1 /x/y", "p.allow[0]", id="empty-rule-any"),
        pytest.param(
            [{"paths": ["/x/**"]}], "PATCH h.example:8 /x/y", "p.allow[0]", id="path-only"
        ),
        pytest.param(
            [{"methods": ["GET"]}], "GET h.example:8 /any", "p.allow[0]", id="method-only"
        ),
        pytest.param([{"methods": ["GET"]}], "PUT h.example:8 /any", None, id="method-only-no"),
        pytest.param(
            [{"hosts": ["h.example"]}], "PUT h.example:9 /a", "p.allow[0]", id="host-only"
        ),
        # methods: rules store upper case whatever the profile wrote
        pytest.param([{"methods": ["get", "Post"]}], "POST h.x:80 /", "p.allow[0]", id="m-case"),
        # the first matching rule in profile order wins, whichever index bucket holds it
        pytest.param(
            [{"paths": ["/a"]}, {"hosts": ["h.example"], "paths": ["/a"]}],
            "GET h.example:80 /a",
            "p.allow[0]",
            id="order-any-host-before-exact",
        ),
        pytest.param(
            [{"hosts": ["*.example"]}, {"hosts": ["h.example"]}],
            "GET h.example:80 /a",
            "p.allow[0]",
            id="order-wildcard-before-exact",
        ),
        pytest.param(
            [{"hosts": ["h.example"]}, {"hosts": ["*.example"]}, {}],
            "GET h.example:80 /a",
            "p.allow[0]",
            id="order-exact-first",
        ),
        pytest.param(
            [{"hosts": ["h.example"], "paths": ["/b"]}, {"hosts": ["*.example"]}, {}],
            "GET h.example:80 /a",
            "p.allow[1]",
            id="order-skips-non-matching",
        ),
        pytest.param(
            [{"methods": ["POST"]}, {"methods": ["GET"]}, {"paths": ["/a"]}, {}],
            "GET h.example:80 /a",
            "p.allow[1]",
            id="order-by-method-bucket",
        ),
        pytest.param(
            [{"methods": ["GET"]}, {"paths": ["/a"]}],
            "DELETE h.example:80 /a",
            "p.allow[1]",
            id="unnamed-method-uses-rules-without-methods",
        ),
        pytest.param(
            [{"hosts": ["h.example:8080", "h.example:9090"]}],
            "GET h.example:9090 /",
            "p.allow[0]",
            id="second-port-of-rule",
        ),
        pytest.param(
            [{"hosts": ["h.example:8080"]}, {"hosts": ["h.example"], "methods": ["PUT"]}],
            "GET h.example:80 /",
            None,
            id="port-and-method-both-miss",
        ),
        # CONNECT is authorised by host:port alone, conservatively
        pytest.param(
            [{"hosts": ["db.internal"]}], "CONNECT db.internal:5432 -", "p.allow[0]", id="c"
        ),
        pytest.param(
            [{"hosts": ["db.internal:5432"]}],
            "CONNECT db.internal:5433 -",
            None,
            id="connect-port-mismatch",
        ),
        pytest.param(
            [{"hosts": ["db.internal"], "methods": ["CONNECT"]}],
            "CONNECT db.internal:5432 -",
            "p.allow[0]",
            id="connect-listed",
        ),
        pytest.param(
            [{"hosts": ["db.internal"], "methods": ["connect"], "paths": ["/x"]}],
            "CONNECT db.internal:5432 -",
            "p.allow[0]",
            id="connect-listed-with-paths",
        ),
        pytest.param(
            [{"hosts": ["db.internal"], "methods": ["GET"]}],
            "CONNECT db.internal:5432 -",
            None,
            id="connect-other-methods",
        ),
        pytest.param(
            [{"hosts": ["db.internal"], "paths": ["/**"]}],
            "CONNECT db.internal:5432 -",
            None,
            id="connect-path-restricted",
        ),
        pytest.param(
            [{"hosts": ["db.internal"], "mcpTools": ["x"]}],
            "CONNECT db.internal:5432 -",
            None,
            id="connect-mcp-rule",
        ),
        pytest.param(
            [{"hosts": ["db.internal"], "paths": ["/**"]}, {"hosts": ["*.internal"]}],
            "CONNECT db.internal:5432 -",
            "p.allow[1]",
            id="connect-next-whole-host-rule",
        ),
        pytest.param([{}], "CONNECT db.internal:5432 -", "p.allow[0]", id="connect-empty-rule"),
        pytest.param(
            [{"hosts": ["db.internal"], "methods": ["CONNECT"]}],
            "GET db.internal:80 /",
            None,
            id="connect-rule-not-get",
        ),
    ],
)
def test_allow_lookup(rules: list[dict[str, Any]], request_: str, expected: str | None) -> None:
    assert _first(rules, request_) == expected


@pytest.mark.parametrize(
    ("rules", "request_", "expected"),
    [
        pytest.param(RECONCILE_DENY, f"GET {LEDGER}:80 /v1/ledger/admin/x", "p.deny[0]", id="d"),
        pytest.param(RECONCILE_DENY, f"GET {LEDGER}:80 /v1/ledger/admin", "p.deny[0]", id="top"),
        pytest.param(
            RECONCILE_DENY, f"GET {LEDGER}:80 /v1/ledger/x/../admin/y", "p.deny[0]", id="dot-dot"
        ),
        pytest.param(
            RECONCILE_DENY,
            f"GET {LEDGER}:80 /v1/ledger/x/%2e%2e/admin/y",
            "p.deny[0]",
            id="encoded-dot-dot",
        ),
        pytest.param(
            RECONCILE_DENY, f"GET {LEDGER}:80 /v1/ledger//admin/y", "p.deny[0]", id="double-slash"
        ),
        pytest.param(
            RECONCILE_DENY, f"GET {LEDGER}:80 /v1/ledger/Admin/y", None, id="path-case-sensitive"
        ),
        pytest.param(RECONCILE_DENY, f"GET {LEDGER}:80 /v1/ledger/x", None, id="not-denied"),
        # CONNECT: a deny rule whose host matches refuses the tunnel whatever else it restricts
        pytest.param(
            [{"hosts": ["h.example"], "methods": ["DELETE"], "paths": ["/admin"]}],
            "CONNECT h.example:443 -",
            "p.deny[0]",
            id="connect-host-deny",
        ),
        pytest.param(RECONCILE_DENY, "CONNECT h.example:443 -", "p.deny[0]", id="connect-any-host"),
        pytest.param(
            [{"hosts": ["h.example:8443"]}], "CONNECT h.example:443 -", None, id="connect-port"
        ),
        pytest.param(
            [{"hosts": ["other.example"]}], "CONNECT h.example:443 -", None, id="connect-other"
        ),
    ],
)
def test_deny_lookup(rules: list[dict[str, Any]], request_: str, expected: str | None) -> None:
    assert _first(rules, request_, deny=True, prefix="p.deny") == expected


# Issue 15, finding 8: `foldPaths: true` deny rules, for upstreams that ignore case, Unicode
# compatibility forms and trailing dots and spaces. Strict deny rules keep the spelling.
FOLD_DENY: list[dict[str, Any]] = [
    {"hosts": [LEDGER], "paths": ["/v1/public/**"], "methods": ["DELETE"]},
    {"paths": ["/v1/secrets/**"], "foldPaths": True},
]
FULL_WIDTH_SECRETS = "%EF%BD%93%EF%BD%85%EF%BD%83%EF%BD%92%EF%BD%85%EF%BD%94%EF%BD%93"


@pytest.mark.parametrize(
    ("raw", "strict", "folded"),
    [
        pytest.param("/v1/secrets/db", "p.deny[0]", "p.deny[1]", id="plain"),
        pytest.param("/v1/SECRETS/db", None, "p.deny[1]", id="upper-case"),
        pytest.param("/V1/secrets/db", None, "p.deny[1]", id="upper-case-first-segment"),
        pytest.param("/v1/Secrets", None, "p.deny[1]", id="mixed-case-top"),
        pytest.param("/v1/secrets./db", None, "p.deny[1]", id="trailing-dot"),
        pytest.param("/v1/secrets%20/db", None, "p.deny[1]", id="trailing-space"),
        pytest.param("/v1/secrets.%20./db", None, "p.deny[1]", id="trailing-dots-and-spaces"),
        pytest.param(f"/v1/{FULL_WIDTH_SECRETS}/db", None, "p.deny[1]", id="full-width"),
        pytest.param("/v1/secrets%C2%A0/db", None, "p.deny[1]", id="trailing-nbsp"),
        pytest.param("/v1/public/../SECRETS", None, "p.deny[1]", id="dot-dot-then-case"),
        pytest.param("/v1/secretsx/db", None, None, id="other-segment"),
        pytest.param("/v1/public/secrets", None, None, id="not-under-the-prefix"),
    ],
)
def test_a_folding_deny_rule_matches_every_spelling_of_its_paths(
    raw: str, strict: str | None, folded: str | None
) -> None:
    request = f"GET {LEDGER}:80 {raw}"
    assert _first([{"paths": ["/v1/secrets/**"]}], request, deny=True, prefix="p.deny") == (
        None if strict is None else "p.deny[0]"
    )
    assert _first(FOLD_DENY, request, deny=True, prefix="p.deny") == folded


def test_a_folding_deny_rule_keeps_profile_order() -> None:
    rules: list[dict[str, Any]] = [
        {"paths": ["/v1/SECRETS/**"], "foldPaths": True},
        {"paths": ["/v1/secrets/**"]},
    ]
    request = f"GET {LEDGER}:80 /v1/secrets/db"
    assert _first(rules, request, deny=True, prefix="p.deny") == "p.deny[0]"
    index = _index(rules, "p.deny")
    rule = index.lookup(LEDGER, 80, "GET", "/v1/secrets", _no_body, deny=True).rule
    assert rule is not None and rule.fold_paths and rule.first_segments is None
    strict = _index(RECONCILE_DENY, "p.deny").lookup(
        LEDGER, 80, "GET", "/v1/ledger/admin", _no_body, deny=True
    )
    assert strict.rule is not None and not strict.rule.fold_paths


def test_an_allow_rule_cannot_fold() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="foldPaths"):
        Rule.model_validate({"paths": ["/v1/**"], "foldPaths": True})


def test_empty_index_matches_nothing() -> None:
    index = _index([])
    assert index.size == 0
    assert index.lookup("h.example", 80, "GET", "", _no_body, deny=False).rule is None
    assert index.lookup("h.example", 80, "CONNECT", "", _no_body, deny=True).rule is None


def test_compiled_rule_fields() -> None:
    index = _index(
        [{"hosts": ["h.example"], "methods": ["get"], "paths": ["/a"]}, {"hosts": ["h.example"]}],
        "reconcile.allow",
    )
    assert index.size == 2
    first = index.lookup("h.example", 80, "GET", "/a", _no_body, deny=False).rule
    second = index.lookup("h.example", 80, "PUT", "/b", _no_body, deny=False).rule
    assert first is not None and second is not None
    assert (first.rule_id, first.order, first.methods) == ("reconcile.allow[0]", 0, {"GET"})
    assert not first.whole_host and not first.admits_connect()
    assert (second.rule_id, second.methods, second.path_re) == ("reconcile.allow[1]", None, None)
    assert second.whole_host and second.admits_connect()


@pytest.mark.parametrize("listed", ["resources/read", "Resources/Read", "RESOURCES/READ"])
@pytest.mark.parametrize("sent", ["resources/read", "Resources/READ"])
def test_an_mcp_deny_rule_matches_its_methods_in_any_case(listed: str, sent: str) -> None:
    """The rule's methods are folded once, at compile time; the body's on each match."""
    from sidecar.core.mcp import parse_mcp_body

    raw = f'{{"jsonrpc": "2.0", "id": 1, "method": "{sent}"}}'.encode()
    index = _index([{"hosts": ["mcp.example"], "mcpMethods": [listed]}], "p.deny")
    match = index.lookup(
        "mcp.example", 443, "POST", "/mcp", lambda: parse_mcp_body(raw, False), deny=True
    )
    assert match.rule is not None and match.rule.rule_id == "p.deny[0]"
    other = b'{"jsonrpc": "2.0", "id": 1, "method": "prompts/get"}'
    miss = index.lookup(
        "mcp.example", 443, "POST", "/mcp", lambda: parse_mcp_body(other, False), deny=True
    )
    assert miss.rule is None
