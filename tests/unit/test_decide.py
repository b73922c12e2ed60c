"""decide(): attribution, purpose, request checks, rules and the Decision it returns.

Profiles: tests/fixtures/profiles/agents.yaml (the example profiles of the contract) and
tests/fixtures/profiles/edge/ (no defaultPurpose, MCP deny rules, CONNECT, ports, IPv6).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.core import Code, Decision, RequestView, Snapshot, decide, load_profiles
from sidecar.core.ratelimit import RateCharge

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"
SNAPSHOTS: dict[str, Snapshot] = {
    "agents": load_profiles(FIXTURES),
    "edge": load_profiles(FIXTURES / "edge"),
}

LEDGER = "ledger.finance.svc.cluster.local"
REPORTS = "reports.finance.svc.cluster.local"
MCP = "mcp.tools.svc.cluster.local"
BILLING_SA = "agents/billing-agent"
BILLING_SPIFFE = "spiffe://cluster.local/ns/agents/sa/billing-agent"
RESEARCH_SPIFFE = "spiffe://cluster.local/ns/agents/sa/research-agent"
OPS_SPIFFE = "spiffe://cluster.local/ns/ops/sa/ops-agent"
NOW = 1_700_000_000.0


def view(**fields: Any) -> RequestView:
    """A GET of an invoice by billing-agent (attributed by sidecar config), with overrides."""
    base: dict[str, Any] = {
        "decision_id": "dec-1",
        "method": "GET",
        "authority": LEDGER,
        "path": "/v1/invoices/7",
        "configured_agent": "billing-agent",
    }
    base.update(fields)
    return RequestView(**base)


def unattributed(**fields: Any) -> RequestView:
    return view(configured_agent=None, **fields)


def research(**fields: Any) -> RequestView:
    return view(configured_agent="research-agent", **fields)


def purpose(name: str, **headers: str) -> dict[str, str]:
    return {"x-mandate-purpose": name, **headers}


def rpc(method: str, tool: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if tool is not None:
        msg["params"] = {"name": tool}
    return msg


def mcp_call(doc: Any, *, truncated: bool = False, raw: bytes | None = None) -> RequestView:
    return research(
        method="POST",
        authority=MCP,
        path="/mcp",
        headers={**purpose("tool-use"), "content-type": "application/json"},
        body=json.dumps(doc).encode() if raw is None else raw,
        body_truncated=truncated,
    )


def ops(purpose_name: str, **fields: Any) -> RequestView:
    return view(
        configured_agent=None, source_principal=OPS_SPIFFE, headers=purpose(purpose_name), **fields
    )


def ops_mcp(doc: Any = None, *, raw: bytes | None = None) -> RequestView:
    data = json.dumps(doc).encode() if raw is None else raw
    return ops("mcp", method="POST", authority="mcp.internal", path="/mcp", body=data)


def case(
    id_: str,
    request: RequestView,
    code: str,
    rule: str = "",
    purpose_: str = "",
    reason: str = "",
    *,
    fixture: str = "agents",
) -> Any:
    return pytest.param(fixture, request, code, rule, purpose_, reason, id=id_)


ALLOWED, DENIED_BY_RULE, OUTSIDE = Code.ALLOWED, Code.DENIED_BY_RULE, Code.OUTSIDE_PURPOSE

CASES = [
    # 1. attribution: only sources the agent cannot forge
    case("attr-sidecar-config", view(), ALLOWED, "reconcile.allow[0]", "reconcile"),
    case(
        "attr-route-context-extension",
        unattributed(context_extensions={"agent": "billing-agent"}),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
    ),
    case(
        "attr-service-account",
        unattributed(configured_service_account=BILLING_SA),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
    ),
    case(
        "attr-spiffe",
        unattributed(source_principal=BILLING_SPIFFE),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
    ),
    case(
        "attr-all-sources-agree",
        view(
            context_extensions={"agent": "billing-agent"},
            configured_service_account=BILLING_SA,
            source_principal=BILLING_SPIFFE,
        ),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
    ),
    case(
        "attr-config-vs-route-conflict",
        view(context_extensions={"agent": "research-agent"}),
        Code.IDENTITY_CONFLICT,
        reason="envoy-route 'research-agent' -> research-agent, sidecar-config",
    ),
    case(
        "attr-config-vs-spiffe-conflict",
        view(source_principal=RESEARCH_SPIFFE),
        Code.IDENTITY_CONFLICT,
        reason="identity sources disagree",
    ),
    case(
        "attr-unknown-spiffe",
        unattributed(source_principal="spiffe://cluster.local/ns/x/sa/nobody"),
        Code.UNATTRIBUTED,
        reason="identity matches no profile: spiffe 'spiffe://cluster.local/ns/x/sa/nobody'",
    ),
    case(
        "attr-unknown-service-account-beside-agent",
        view(configured_service_account="agents/nobody"),
        Code.IDENTITY_CONFLICT,
        reason="service-account 'agents/nobody' -> no profile",
    ),
    case("attr-no-source", unattributed(), Code.UNATTRIBUTED, reason="no identity"),
    case(
        "attr-empty-route-agent-is-no-source",
        unattributed(context_extensions={"agent": ""}),
        Code.UNATTRIBUTED,
        reason="no identity",
    ),
    case(
        "attr-header-never-attributes",
        unattributed(headers={"x-mandate-agent": "billing-agent"}),
        Code.UNATTRIBUTED,
        reason="no identity",
    ),
    case(
        "attr-header-never-grants-other-agent-rights",
        research(headers={"x-mandate-agent": "billing-agent"}),
        OUTSIDE,
        purpose_="literature-search",
        reason="outside purpose 'literature-search'",
    ),
    case(
        "attr-unknown-agent",
        view(configured_agent="ghost"),
        Code.UNKNOWN_AGENT,
        reason="no profile for agent 'ghost'",
    ),
    # 3. purpose and task: declared purpose, else defaultPurpose; they never add rights
    case(
        "purpose-declared",
        view(
            method="PUT", authority=REPORTS, path="/v1/reports/2024-01", headers=purpose("report")
        ),
        ALLOWED,
        "report.allow[0]",
        "report",
    ),
    case(
        "purpose-declared-stripped",
        view(method="POST", authority=REPORTS, path="/v1/reports/q1", headers=purpose(" report ")),
        ALLOWED,
        "report.allow[0]",
        "report",
    ),
    case(
        "purpose-declared-narrows-rights",
        view(headers=purpose("report")),
        OUTSIDE,
        purpose_="report",
        reason="outside purpose 'report'",
    ),
    case(
        "purpose-empty-header-uses-default",
        view(headers=purpose("")),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
    ),
    case(
        "purpose-unknown",
        view(headers=purpose("refund")),
        Code.UNKNOWN_PURPOSE,
        reason="unknown purpose 'refund' for agent 'billing-agent'",
    ),
    case(
        "purpose-of-another-agent",
        research(headers=purpose("reconcile")),
        Code.UNKNOWN_PURPOSE,
        reason="unknown purpose 'reconcile' for agent 'research-agent'",
    ),
    case(
        "purpose-none-and-no-default",
        ops("", authority="web.example.com", path="/"),
        Code.NO_PURPOSE,
        reason="no x-mandate-purpose declared and the profile has no defaultPurpose",
        fixture="edge",
    ),
    case(
        "task-declared",
        view(headers={"x-mandate-task": "INV-2024/07#3"}),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
    ),
    case("task-with-space", view(headers={"x-mandate-task": "two words"}), Code.BAD_TASK),
    case("task-too-long", view(headers={"x-mandate-task": "t" * 129}), Code.BAD_TASK),
    case("task-non-ascii", view(headers={"x-mandate-task": "t\u00e2che"}), Code.BAD_TASK),
    case("task-control-char", view(headers={"x-mandate-task": "a\x01b"}), Code.BAD_TASK),
    # 4. the request itself: malformed or ambiguous → deny
    case(
        "request-bad-path",
        view(path="/v1/invoices/%00"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="malformed or ambiguous path",
    ),
    case(
        "request-bad-utf8-path",
        view(path="/v1/invoices/%ff"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="path",
    ),
    case(
        "request-asterisk-path",
        view(method="OPTIONS", path="*"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="path",
    ),
    case(
        "request-bad-port",
        view(authority=f"{LEDGER}:99999"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="malformed or ambiguous authority",
    ),
    case(
        "request-unknown-scheme-without-port",
        view(scheme="gopher"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="scheme 'gopher': only 'http' and 'https' reach an upstream",
    ),
    # Envoy sends `wss` in clear, to port 80 without one in the authority: mandate must not
    # decide (and add a credential to) a call to 443 that reaches 80
    case(
        "request-wss-scheme",
        view(scheme="wss"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="scheme 'wss'",
    ),
    case(
        "request-wss-scheme-with-port",
        view(scheme="wss", authority=f"{LEDGER}:443"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="scheme 'wss'",
    ),
    case(
        "request-scheme-not-as-envoy-writes-it",
        view(scheme="HTTPS"),
        Code.BAD_REQUEST,
        purpose_="reconcile",
        reason="scheme 'HTTPS'",
    ),
    # 5. rules: deny wins over allow, first matching rule named, default deny
    case(
        "rule-deny-beats-allow",
        view(path="/v1/ledger/admin/users"),
        DENIED_BY_RULE,
        "reconcile.deny[0]",
        "reconcile",
        "denied by rule reconcile.deny[0] of purpose 'reconcile'",
    ),
    case(
        "rule-deny-after-dot-dot",
        view(path="/v1/ledger/x/../admin/y"),
        DENIED_BY_RULE,
        "reconcile.deny[0]",
        "reconcile",
    ),
    case(
        "rule-deny-after-encoded-dot-dot",
        view(path="/v1/ledger/x/%252e%252e/admin/y"),
        DENIED_BY_RULE,
        "reconcile.deny[0]",
        "reconcile",
    ),
    case(
        "rule-dot-dot-cannot-escape-prefix",
        view(path="/v1/ledger/%2e%2e/admin"),
        OUTSIDE,
        purpose_="reconcile",
        reason="outside purpose 'reconcile'",
    ),
    case(
        "rule-allow-ledger-subtree",
        view(path="/v1/ledger/2024/07?page=2"),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
        "allowed by rule reconcile.allow[0] of purpose 'reconcile'",
    ),
    # Rules match methods case-insensitively; a call's method is case-sensitive (RFC 9110):
    # `get` is not GET, so a method not in upper case is refused, never matched (issue 15).
    case("call-method-lower-case", view(method="get"), Code.BAD_REQUEST, "", "reconcile"),
    case("call-method-mixed-case", view(method="Get"), Code.BAD_REQUEST, "", "reconcile"),
    # Method and URL override headers: refused, whatever their value (issue 15).
    *[
        case(
            f"override-{name}",
            view(headers={name: value}),
            Code.BAD_REQUEST,
            "",
            "reconcile",
            f"header {name!r}: a method or URL override",
        )
        for name, value in [
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "GET"),
            ("x-original-url", "/v1/ledger/admin/x"),
            ("x-rewrite-url", "/v1/invoices/1"),
        ]
    ],
    # A `_method` parameter, in the query or a form body (Laravel, Symfony, Rails).
    *[
        case(
            f"method-parameter-{i}",
            view(path=path, headers=headers, body=body),
            Code.BAD_REQUEST,
            "",
            "reconcile",
            "a `_method` parameter",
        )
        for i, (path, headers, body) in enumerate(
            [
                ("/v1/ledger/2024?_method=DELETE", {}, None),
                ("/v1/ledger/2024?page=2&%5Fmethod=DELETE", {}, None),
                ("/v1/ledger/2024?_METHOD=put", {}, None),
                (
                    "/v1/ledger/2024",
                    {"content-type": "application/x-www-form-urlencoded; charset=utf-8"},
                    b"a=1&_method=DELETE",
                ),
                # the spellings PHP folds into `_method` (Laravel, Symfony)
                ("/v1/ledger/2024?.method=DELETE", {}, None),
                ("/v1/ledger/2024?%2Emethod=DELETE", {}, None),
                ("/v1/ledger/2024?[method=DELETE", {}, None),
                ("/v1/ledger/2024?_method[]=DELETE", {}, None),
                ("/v1/ledger/2024?+_method=DELETE", {}, None),
                # a form without a Content-Type (Rack takes a POST's body for one)
                ("/v1/ledger/2024", {}, b"title=x&_method=DELETE"),
                # multipart forms (Rack, PHP, Spring, ASP.NET Core read their fields)
                *[
                    (
                        "/v1/ledger/2024",
                        {"content-type": "multipart/form-data; boundary=XyZ"},
                        b"--XyZ\r\nContent-Disposition: form-data; "
                        + name
                        + b"\r\n\r\nDELETE\r\n--XyZ--\r\n",
                    )
                    for name in (
                        b'name="_method"',
                        b"name=_method",
                        b'NAME = "_Method"',
                        b"name*=utf-8''%5Fmethod",
                        b'name=".method"',
                    )
                ],
            ]
        )
    ],
    case(
        "method-override-in-a-form-mandate-does-not-see-whole",
        view(
            method="POST",
            path="/v1/ledger/2024",
            body=b"a=1&b=2",
            body_truncated=True,
            headers={"content-type": "multipart/form-data; boundary=XyZ"},
        ),
        Code.BAD_REQUEST,
        "",
        "reconcile",
        "a form body larger than mandate sees whole",
    ),
    *[
        case(
            f"form-without-override-{i}",
            view(path="/v1/ledger/2024", headers=headers, body=body),
            ALLOWED,
            "reconcile.allow[0]",
            "reconcile",
            "allowed by rule reconcile.allow[0]",
        )
        for i, (headers, body) in enumerate(
            [
                (
                    {"content-type": "multipart/form-data; boundary=XyZ"},
                    b'--XyZ\r\nContent-Disposition: form-data; name="payment_method"; '
                    b'filename="method.txt"\r\n\r\nmethod\r\n--XyZ--\r\n',
                ),
                ({}, b"payment_method=card&x_method=1"),
                ({"content-type": "application/json"}, b'{"_method": "DELETE"}'),
            ]
        )
    ],
    case(
        "method-word-elsewhere-is-fine",
        view(path="/v1/ledger/2024?sort=method&payment_method=card"),
        ALLOWED,
        "reconcile.allow[0]",
        "reconcile",
        "allowed by rule reconcile.allow[0]",
    ),
    case(
        "rule-second-rule-named",
        view(authority="API.Stripe.com", scheme="https", path="/v1/charges/ch_1"),
        ALLOWED,
        "reconcile.allow[1]",
        "reconcile",
    ),
    case(
        "rule-wildcard-not-parent",
        view(authority="stripe.com", scheme="https", path="/v1/charges/ch_1"),
        OUTSIDE,
        purpose_="reconcile",
    ),
    case(
        "rule-wrong-method",
        view(method="DELETE"),
        OUTSIDE,
        purpose_="reconcile",
        reason="outside purpose 'reconcile'",
    ),
    case(
        "rule-path-case-sensitive",
        view(path="/V1/invoices/7"),
        OUTSIDE,
        purpose_="reconcile",
    ),
    case(
        "rule-other-agent-profile",
        research(authority="export.arxiv.org", path="/api/query?search_query=x"),
        ALLOWED,
        "literature-search.allow[0]",
        "literature-search",
    ),
    # 5. MCP over streamable HTTP
    case(
        "mcp-listed-tool",
        mcp_call(rpc("tools/call", "search_papers")),
        ALLOWED,
        "tool-use.allow[0]",
        "tool-use",
    ),
    case(
        "mcp-unlisted-tool",
        mcp_call(rpc("tools/call", "delete_everything")),
        OUTSIDE,
        purpose_="tool-use",
        reason="outside purpose 'tool-use': MCP tool 'delete_everything' not allowed",
    ),
    case("mcp-initialize", mcp_call(rpc("initialize")), ALLOWED, "tool-use.allow[0]", "tool-use"),
    case(
        "mcp-resources-read",
        mcp_call(rpc("resources/read")),
        OUTSIDE,
        purpose_="tool-use",
        reason="MCP method 'resources/read' not allowed",
    ),
    case(
        "mcp-batch-all-pass",
        mcp_call([rpc("ping"), rpc("tools/call", "fetch_abstract")]),
        ALLOWED,
        "tool-use.allow[0]",
        "tool-use",
    ),
    case(
        "mcp-batch-one-fails",
        mcp_call([rpc("tools/call", "fetch_abstract"), rpc("prompts/get")]),
        OUTSIDE,
        purpose_="tool-use",
        reason="MCP method 'prompts/get' not allowed",
    ),
    case(
        "mcp-response",
        mcp_call({"jsonrpc": "2.0", "id": 3, "result": {}}),
        ALLOWED,
        "tool-use.allow[0]",
        "tool-use",
    ),
    case(
        "mcp-missing-body",
        mcp_call(None, raw=b""),
        OUTSIDE,
        purpose_="tool-use",
        reason="MCP body missing",
    ),
    case(
        "mcp-truncated-body",
        mcp_call(rpc("tools/call", "search_papers"), truncated=True),
        OUTSIDE,
        purpose_="tool-use",
        reason="truncated",
    ),
    case(
        "mcp-not-json",
        mcp_call(None, raw=b"tools/call search_papers"),
        OUTSIDE,
        purpose_="tool-use",
        reason="not JSON",
    ),
    case(
        "mcp-not-json-rpc",
        mcp_call({"method": "tools/call", "params": {"name": "search_papers"}}),
        OUTSIDE,
        purpose_="tool-use",
        reason="not a JSON-RPC 2.0 message",
    ),
    case(
        "mcp-deny-rule-tool",
        ops_mcp(rpc("tools/call", "delete_all")),
        DENIED_BY_RULE,
        "mcp.deny[0]",
        "mcp",
        fixture="edge",
    ),
    case(
        "mcp-deny-rule-method",
        ops_mcp([rpc("ping"), rpc("prompts/get")]),
        DENIED_BY_RULE,
        "mcp.deny[0]",
        "mcp",
        fixture="edge",
    ),
    case(
        "mcp-deny-rule-passes-other-tool",
        ops_mcp(rpc("tools/call", "search")),
        ALLOWED,
        "mcp.allow[0]",
        "mcp",
        fixture="edge",
    ),
    case(
        "mcp-deny-rule-catches-bad-body",
        ops_mcp(raw=b"{"),
        DENIED_BY_RULE,
        "mcp.deny[0]",
        "mcp",
        fixture="edge",
    ),
    case(
        "mcp-methods-listed",
        ops_mcp(rpc("resources/read")),
        ALLOWED,
        "mcp.allow[0]",
        "mcp",
        fixture="edge",
    ),
    # CONNECT tunnels: host:port only, conservatively
    case(
        "connect-whole-host-rule",
        ops("tunnel", method="CONNECT", authority="egress.example.com:443", path=""),
        ALLOWED,
        "tunnel.allow[0]",
        "tunnel",
        fixture="edge",
    ),
    case(
        "connect-wrong-port",
        ops("tunnel", method="CONNECT", authority="egress.example.com:8443", path=""),
        OUTSIDE,
        purpose_="tunnel",
        fixture="edge",
    ),
    case(
        "connect-listed-method",
        ops("tunnel", method="CONNECT", authority="db.internal:5432", path=""),
        ALLOWED,
        "tunnel.allow[1]",
        "tunnel",
        fixture="edge",
    ),
    case(
        "connect-lower-case",
        ops("tunnel", method="connect", authority="db.internal:5432", path=""),
        Code.BAD_REQUEST,
        "",
        "tunnel",
        fixture="edge",
    ),
    case(
        "connect-host-with-deny-rule",
        ops("tunnel", method="CONNECT", authority="web.example.com:443", path=""),
        DENIED_BY_RULE,
        "tunnel.deny[0]",
        "tunnel",
        fixture="edge",
    ),
    case(
        "connect-ignores-path-field",
        ops("tunnel", method="CONNECT", authority="db.internal:5432", path="%00"),
        ALLOWED,
        "tunnel.allow[1]",
        "tunnel",
        fixture="edge",
    ),
    case(
        "deny-rule-method",
        ops("tunnel", method="DELETE", authority="web.example.com", path="/a"),
        DENIED_BY_RULE,
        "tunnel.deny[0]",
        "tunnel",
        fixture="edge",
    ),
    # ports and IPv6 literals
    case(
        "port-listed",
        ops("ports", authority="svc.internal:8080", path="/x"),
        ALLOWED,
        "ports.allow[0]",
        "ports",
        fixture="edge",
    ),
    case(
        "port-default-80-not-listed",
        ops("ports", authority="svc.internal", path="/x"),
        OUTSIDE,
        purpose_="ports",
        fixture="edge",
    ),
    case(
        "ipv6-with-port",
        ops("ports", authority="[0:0::1]:9000", path="/health"),
        ALLOWED,
        "ports.allow[1]",
        "ports",
        fixture="edge",
    ),
    case(
        "ipv6-any-port",
        ops("ports", authority="[2001:DB8::1]", scheme="https", path="/v6/a"),
        ALLOWED,
        "ports.allow[2]",
        "ports",
        fixture="edge",
    ),
]


@pytest.mark.parametrize(("fixture", "request_", "code", "rule", "purpose_", "reason"), CASES)
def test_decide(
    fixture: str, request_: RequestView, code: str, rule: str, purpose_: str, reason: str
) -> None:
    d = decide(SNAPSHOTS[fixture], request_, NOW)
    assert (d.allowed, d.code, d.rule, d.purpose) == (code == Code.ALLOWED, code, rule, purpose_)
    assert reason in d.reason
    assert d.decision_id == request_.decision_id


@pytest.mark.parametrize(("fixture", "request_", "code", "rule", "purpose_", "reason"), CASES)
def test_decide_is_deterministic(
    fixture: str, request_: RequestView, code: str, rule: str, purpose_: str, reason: str
) -> None:
    reloaded = load_profiles(FIXTURES / "edge" if fixture == "edge" else FIXTURES)
    first = decide(SNAPSHOTS[fixture], request_, NOW)
    copy = dataclasses.replace(request_)
    assert decide(SNAPSHOTS[fixture], copy, NOW) == first
    assert decide(reloaded, request_, NOW) == first


def test_allowed_decision_carries_the_whole_context() -> None:
    request = view(
        decision_id="dec-42",
        method="GET",
        authority=f"{LEDGER.upper()}.",
        path="/v1/ledger//2024/./07?x=1",
        headers={"x-mandate-purpose": "reconcile", "x-mandate-task": "task-9"},
        context_extensions={"agent": "billing-agent"},
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )
    assert decide(SNAPSHOTS["agents"], request, NOW) == Decision(
        decision_id="dec-42",
        allowed=True,
        code=Code.ALLOWED,
        reason="allowed by rule reconcile.allow[0] of purpose 'reconcile'",
        agent="billing-agent",
        owner="finance-platform",
        purpose="reconcile",
        task="task-9",
        rule="reconcile.allow[0]",
        identity_source="envoy-route+sidecar-config",
        method="GET",
        host=LEDGER,
        port=80,
        path="/v1/ledger/2024/07",
        mcp_tools=(),
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        rate=RateCharge(("billing-agent", "reconcile"), 600, 60.0, "1m"),
    )


def test_denied_decision_carries_the_whole_context() -> None:
    request = view(
        decision_id="dec-43",
        path="/v1/ledger/admin/keys",
        headers={"x-mandate-task": "task-9"},
        source_principal=BILLING_SPIFFE,
        trace_id="abc",
    )
    assert decide(SNAPSHOTS["agents"], request, NOW) == Decision(
        decision_id="dec-43",
        allowed=False,
        code=Code.DENIED_BY_RULE,
        reason="denied by rule reconcile.deny[0] of purpose 'reconcile'",
        agent="billing-agent",
        owner="finance-platform",
        purpose="reconcile",
        task="task-9",
        rule="reconcile.deny[0]",
        identity_source="sidecar-config+spiffe",
        method="GET",
        host=LEDGER,
        port=80,
        path="/v1/ledger/admin/keys",
        trace_id="abc",
    )


def test_outside_purpose_decision_names_no_rule() -> None:
    d = decide(SNAPSHOTS["agents"], view(method="POST", trace_id="t1"), NOW)
    assert (d.allowed, d.code, d.reason, d.rule) == (
        False,
        Code.OUTSIDE_PURPOSE,
        "outside purpose 'reconcile'",
        "",
    )
    assert (d.agent, d.owner, d.host, d.port, d.path, d.trace_id) == (
        "billing-agent",
        "finance-platform",
        LEDGER,
        80,
        "/v1/invoices/7",
        "t1",
    )


def test_unattributed_decision_has_no_agent() -> None:
    d = decide(SNAPSHOTS["agents"], unattributed(method="post", trace_id="t2"), NOW)
    assert (d.allowed, d.code, d.agent, d.owner, d.method, d.trace_id) == (
        False,
        Code.UNATTRIBUTED,
        "",
        "",
        "POST",
        "t2",
    )


@pytest.mark.parametrize(
    ("fields", "source"),
    [
        pytest.param({}, "sidecar-config", id="config"),
        pytest.param(
            {"configured_agent": None, "context_extensions": {"agent": "billing-agent"}},
            "envoy-route",
            id="route",
        ),
        pytest.param(
            {"configured_agent": None, "configured_service_account": BILLING_SA},
            "service-account",
            id="service-account",
        ),
        pytest.param(
            {"configured_agent": None, "source_principal": BILLING_SPIFFE}, "spiffe", id="spiffe"
        ),
        pytest.param(
            {
                "context_extensions": {"agent": "billing-agent"},
                "configured_service_account": BILLING_SA,
                "source_principal": BILLING_SPIFFE,
            },
            "envoy-route+sidecar-config+service-account+spiffe",
            id="all",
        ),
    ],
)
def test_identity_source_recorded(fields: dict[str, Any], source: str) -> None:
    d = decide(SNAPSHOTS["agents"], view(**fields), NOW)
    assert (d.allowed, d.agent, d.identity_source) == (True, "billing-agent", source)


def test_unknown_agent_decision_names_the_claimed_agent() -> None:
    d = decide(SNAPSHOTS["agents"], view(configured_agent="ghost"), NOW)
    assert (d.agent, d.owner, d.identity_source) == ("ghost", "", "sidecar-config")


def test_mcp_tools_recorded() -> None:
    request = mcp_call([rpc("tools/call", "search_papers"), rpc("tools/call", "fetch_abstract")])
    d = decide(SNAPSHOTS["agents"], request, NOW)
    assert d.allowed
    assert d.mcp_tools == ("search_papers", "fetch_abstract")


def test_body_not_read_for_rules_without_mcp_fields() -> None:
    d = decide(SNAPSHOTS["agents"], view(body=b'{"jsonrpc": "2.0", "method": "tools/call"}'), NOW)
    assert d.allowed
    assert d.mcp_tools == ()


def test_task_length_limit_is_inclusive() -> None:
    d = decide(SNAPSHOTS["agents"], view(headers={"x-mandate-task": "t" * 128}), NOW)
    assert (d.allowed, d.task) == (True, "t" * 128)


def test_bad_task_is_reported_before_unknown_purpose() -> None:
    headers = {"x-mandate-purpose": "nope", "x-mandate-task": "bad task"}
    d = decide(SNAPSHOTS["agents"], view(headers=headers), NOW)
    assert (d.code, d.reason) == (
        Code.BAD_TASK,
        "x-mandate-task must be 1-128 visible ASCII characters, no comma",
    )


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        pytest.param({"method": ""}, Code.BAD_REQUEST, id="empty-method"),
        pytest.param({"authority": ""}, Code.BAD_REQUEST, id="empty-authority"),
        pytest.param({"authority": "\x00"}, Code.BAD_REQUEST, id="nul-authority"),
        pytest.param({"path": ""}, Code.BAD_REQUEST, id="empty-path"),
        pytest.param({"path": "/" + "%25" * 5000}, Code.BAD_REQUEST, id="huge-path"),
        pytest.param(
            {"headers": {"x-mandate-purpose": "\x00" * 1000}},
            Code.UNKNOWN_PURPOSE,
            id="garbage-purpose",
        ),
        pytest.param(
            {"method": "CONNECT", "authority": "[::1"}, Code.BAD_REQUEST, id="connect-bad-authority"
        ),
    ],
)
def test_odd_requests_are_denied_not_raised(fields: dict[str, Any], code: str) -> None:
    d = decide(SNAPSHOTS["agents"], view(**fields), NOW)
    assert (d.allowed, d.code) == (False, code)


def test_connect_target_must_name_its_port() -> None:
    """RFC 9110: a CONNECT target is host:port; no scheme default is assumed."""
    d = decide(
        SNAPSHOTS["edge"],
        ops("tunnel", method="CONNECT", authority="egress.example.com", path=""),
        NOW,
    )
    assert (d.allowed, d.code) == (False, Code.BAD_REQUEST)
    d = decide(
        SNAPSHOTS["edge"],
        ops("tunnel", method="CONNECT", authority="egress.example.com:443", path=""),
        NOW,
    )
    assert d.allowed


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_mcp_deny_rule_does_not_match_methods_that_carry_no_mcp_message(method: str) -> None:
    """A deny rule listing MCP tools/methods reads POST bodies only; a body-less GET to the
    same host is judged by the other rules, not refused as 'unreadable JSON-RPC'."""
    v = ops("mcp", method=method, authority="mcp.internal", path="/mcp")
    d = decide(SNAPSHOTS["edge"], v, NOW)
    assert d.code == Code.OUTSIDE_PURPOSE, d  # no allow rule for it, but no deny rule either
    d = decide(
        SNAPSHOTS["edge"], ops("mcp", method="POST", authority="mcp.internal", path="/mcp"), NOW
    )
    assert (d.code, d.rule) == (Code.DENIED_BY_RULE, "mcp.deny[0]")  # POST without a body


def test_a_service_account_named_alone_is_the_pods_namespace(tmp_path: Path) -> None:
    """Issue 19: a profile may name its service account without a namespace (that account
    in the namespace of the pod the sidecar serves), so a kustomize namespace overlay does
    not have to rewrite the profiles."""
    profile = (
        (FIXTURES / "agents.yaml")
        .read_text()
        .replace("serviceAccount: agents/billing-agent", "serviceAccount: billing-agent", 1)
    )
    assert "serviceAccount: billing-agent" in profile
    (tmp_path / "agents.yaml").write_text(profile)
    snap = load_profiles(tmp_path)
    for sa in ("team-b/billing-agent", "agents/billing-agent"):
        v = RequestView("d", "GET", "ledger.finance.svc.cluster.local", "/v1/invoices/7",
                        configured_service_account=sa)  # fmt: skip
        d = decide(snap, v, NOW)
        assert (d.agent, d.identity_source) == ("billing-agent", "service-account"), d.reason
    other = RequestView("d", "GET", "ledger.finance.svc.cluster.local", "/v1/invoices/7",
                        configured_service_account="team-b/billing-agent-2")  # fmt: skip
    assert decide(snap, other, NOW).code == Code.UNATTRIBUTED
