"""The adversarial catalogue, as data: what a compromised agent sends, and what must then hold.

Each Case names the agent (its own Envoy listener), the request (method, target, Host,
headers — names as sent, with repeats and `_` variants — and body; or raw bytes; or an
HTTP/2 request; or a direct call to mandate's Check or admin port) and the SECURE outcome:

- deny(code, reason): mandate's 403 with its JSON deny body (`error` == code, `reason`
  containing reason) and the decision id; nothing reaches the upstream;
- refuse(status): refused by Envoy itself (its 400, 431 or 501, or 0: the connection or
  HTTP/2 stream reset without an answer); nothing reaches the upstream;
- allow(path, purpose): exactly one request reaches the upstream, with that path, and with
  exactly the headers mandate sets (x-mandate-agent, -purpose, -decision, and -task when
  the call names one), once each, none of the agent's spoofed spellings;
- guard(host): refused as above, or allowed and then what arrives is what mandate decided
  (that host, mandate's headers only).

On top of each case's own outcome, test_catalogue.py checks for every case that nothing
forbidden arrived (see `leak` there): a path an upstream may read as /v1/secrets/** on the
HR host, /admin on the wiki, anything at the bank, a `delete_employee` tool call.

Profiles: tests/adversarial/profiles/agents.yaml. New findings go here first: add a Case
with the outcome that must hold once fixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

HR = "hr.payroll.internal"
FILINGS = "filings.tax.internal"
BANK = "bank.payroll.internal"
TOOLS = "tools.mcp.internal"
WIKI = "docs.wiki.internal"
RELAY = "relay.partner.example"
CDN = "cdn.partner.example"
ALLOWED_PATH = "/v1/reports/2026-11"  # payroll-bot, purpose payrun: GET /v1/**
ALLOWED_TOOL, OTHER_TOOL, FORBIDDEN_TOOL = "lookup_employee", "list_runs", "delete_employee"
SPOOF = "mcp-runner"  # another agent's name, as a spoofed identity


@dataclass(frozen=True)
class Expect:
    kind: str  # "deny" | "refuse" | "allow" | "guard" | "admin" | "direct"
    code: str = ""  # deny: the deny body's `error`
    reason: str = ""  # deny: part of its `reason`
    path: str = ""  # allow: the path the upstream receives
    host: str = ""  # allow / guard: the (canonical) host the upstream receives
    purpose: str = ""  # allow: x-mandate-purpose
    task: str = ""  # allow: x-mandate-task ("" : none)
    status: int = 0  # admin: the HTTP status; refuse: the status (0: reset; -1: any refusal)
    keys: tuple[str, ...] = ()  # admin: the JSON body's keys, exactly (() : not checked)


def deny(code: str, reason: str = "") -> Expect:
    return Expect("deny", code=code, reason=reason)


def refuse(status: int | None = None) -> Expect:
    """Refused before any upstream; with ``status``, exactly that (Envoy's own 400, 431 or
    501; 0: the connection or HTTP/2 stream reset without an answer)."""
    return Expect("refuse", status=-1 if status is None else status)


def allow(path: str, purpose: str = "payrun", host: str = HR, task: str = "") -> Expect:
    return Expect("allow", path=path, purpose=purpose, host=host, task=task)


def guard(host: str = HR) -> Expect:
    return Expect("guard", host=host)


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    agent: str
    expect: Expect
    method: str = "GET"
    target: str = ""  # h1: the request target as sent; h2: :path; admin: the path
    host: str | None = None  # Host (h2: :authority); None: the target's authority
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    raw: bytes | None = None  # h1: the whole request, sent as is
    proto: str = "h1"  # "h1" | "h2" | "direct" | "admin"
    note: str = ""  # why the outcome is what it is, where that is not obvious


def _url(host: str, path: str) -> str:
    return f"http://{host}{path}"


def get(
    cid: str, category: str, path: str, expect: Expect, *, host: str = HR,
    headers: tuple[tuple[str, str], ...] = (), agent: str = "payroll-bot", note: str = "",
) -> Case:  # fmt: skip
    """A GET in absolute form (as an HTTP proxy client sends it) with a matching Host."""
    return Case(
        cid,
        category,
        agent,
        expect,
        method="GET",
        target=_url(host, path),
        host=None,
        headers=headers,
        note=note,
    )


# --- path tricks (payroll-bot: GET /v1/** on HR, deny /v1/secrets/** folded, /v1/keys/** strict)

DENIED = deny("denied_by_rule")
PATHS: list[Case] = [
    get("path-control-allowed", "path", ALLOWED_PATH, allow(ALLOWED_PATH)),
    get(
        "path-control-other-segment", "path", "/v1/secrets-public/a", allow("/v1/secrets-public/a")
    ),
    get("path-plain-denied", "path", "/v1/secrets/db", DENIED),
    get("path-dotdot", "path", "/v1/x/../secrets/db", DENIED),
    get("path-dotdot-deep", "path", "/v1/a/b/c/../../../secrets/db", DENIED),
    get("path-dotdot-from-outside", "path", "/v2/../v1/secrets/db", DENIED),
    get("path-dotdot-back-in", "path", "/v1/secrets/../secrets/db", DENIED),
    get("path-dot", "path", "/v1/./secrets/./db", DENIED),
    get("path-enc-dotdot-lower", "path", "/v1/x/%2e%2e/secrets/db", DENIED),
    get("path-enc-dotdot-upper", "path", "/v1/x/%2E%2E/secrets/db", DENIED),
    get("path-enc-dotdot-half", "path", "/v1/x/.%2e/secrets/db", DENIED),
    get("path-enc-dotdot-other-half", "path", "/v1/x/%2e./secrets/db", DENIED),
    get("path-enc-dotdot-deep", "path", "/v1/a/b/c/%2e%2e/%2e%2e/%2E%2E/secrets/db", DENIED),
    get("path-enc-dotdot-escape-prefix", "path", "/v1/%2e%2e/v1/secrets/db", DENIED),
    get("path-enc-dotdot-mixed-case", "path", "/v1/x/%2e%2E/secrets/db", DENIED),
    get("path-dotdot-above-root", "path", "/../v1/secrets/db", DENIED),
    get("path-enc-dotdot-above-root", "path", "/%2e%2e/%2e%2e/v1/secrets/db", DENIED),
    get("path-enc-dot", "path", "/v1/%2e/secrets/db", DENIED),
    get("path-enc-unreserved", "path", "/v1/%73ecrets/db", DENIED),
    get("path-double-slash", "path", "/v1//secrets/db", DENIED),
    get("path-leading-double-slash", "path", "//v1/secrets/db", DENIED),
    get("path-many-slashes", "path", "/v1///secrets////db", DENIED),
    get("path-semicolon-param", "path", "/v1/secrets;jsessionid=1/db", deny("bad_request")),
    get("path-semicolon-param-before", "path", "/v1;x=1/secrets/db", deny("bad_request")),
    get("path-semicolon-suffix", "path", "/v1/secrets/db;.css", deny("bad_request")),
    get("path-encoded-slash", "path", "/v1/secrets%2Fdb", refuse(400)),
    get("path-encoded-slash-lower", "path", "/v1%2fsecrets/db", refuse(400)),
    get("path-encoded-backslash", "path", "/v1/secrets%5Cdb", refuse(400)),
    get("path-double-encoded-slash", "path", "/v1/secrets%252Fdb", deny("denied_by_rule")),
    get(
        "path-double-encoded-dotdot", "path", "/v1/x/%252e%252e/secrets/db", deny("denied_by_rule")
    ),
    get("path-backslash", "path", "/v1\\secrets\\db", deny("denied_by_rule")),
    get("path-backslash-dotdot", "path", "/v1/x\\..\\secrets/db", deny("denied_by_rule")),
    get("path-query-not-path", "path", "/v1/secrets/db?/v1/reports/1", DENIED),
    get(
        "path-query-holds-denied",
        "path",
        "/v1/reports?next=/v1/secrets/db",
        allow("/v1/reports?next=/v1/secrets/db"),
    ),
    get("path-fragment", "path", "/v1/secrets/db#/v1/reports", refuse(400)),
    get("path-huge", "path", "/v1/secrets/" + "a" * 70_000, refuse(431)),
    get("path-strict-deny", "path", "/v1/keys/signing", DENIED),
    get("path-strict-deny-dotdot", "path", "/v1/x/%2e%2e/keys/signing", DENIED),
    # The deliberate decision on a strict deny (foldPaths: false): other spellings are other
    # paths, forwarded as sent; a case-insensitive upstream needs `foldPaths: true`.
    get(
        "path-strict-deny-other-case-is-another-path",
        "path",
        "/v1/KEYS/signing",
        allow("/v1/KEYS/signing"),
    ),
    Case(
        "path-origin-form-dotdot",
        "path",
        "payroll-bot",
        DENIED,
        method="GET",
        target="/v1/x/%2e%2e/secrets/db",
        host=HR,
    ),
    Case(
        "path-asterisk-form", "path", "payroll-bot", refuse(400), method="GET", target="*", host=HR
    ),
    Case(
        "path-no-leading-slash",
        "path",
        "payroll-bot",
        refuse(400),
        method="GET",
        target="v1/secrets/db",
        host=HR,
    ),
]

# --- malformed percent-escapes, case and Unicode spellings of a denied segment

BAD = deny("bad_request")
FW_SECRETS = "".join("".join(f"%{b:02X}" for b in chr(ord(c) + 0xFEE0).encode()) for c in "secrets")
ESCAPES: list[Case] = [
    get("esc-not-hex", "escapes", "/v1/secrets%zz/db", BAD),
    get("esc-one-digit-at-end", "escapes", "/v1/secrets%2", BAD),
    get("esc-one-digit", "escapes", "/v1/secrets%2/db", BAD),
    get("esc-iis-u", "escapes", "/v1/%u0073ecrets/db", BAD),
    get("esc-iis-u-upper", "escapes", "/v1/%U0073ECRETS/db", BAD),
    get("esc-lone-percent", "escapes", "/v1/reports%", BAD),
    get("esc-percent-in-allowed", "escapes", "/v1/reports/%zz", BAD),
    get("esc-zero-width-space", "escapes", "/v1/secrets%E2%80%8B/db", BAD),
    get("esc-overlong-utf8-slash", "escapes", "/v1/secrets%C0%AFdb", BAD),
    get("esc-overlong-utf8-dot", "escapes", "/v1/x/%C0%AE%C0%AE/secrets/db", BAD),
    get("esc-nul", "escapes", "/v1/secrets%00/db", refuse(400)),
    get("fold-upper", "fold", "/v1/SECRETS/db", DENIED),
    get("fold-mixed", "fold", "/V1/Secrets/db", DENIED),
    get("fold-trailing-dot", "fold", "/v1/secrets./db", DENIED),
    get("fold-trailing-space", "fold", "/v1/secrets%20/db", DENIED),
    get("fold-trailing-dots-spaces", "fold", "/v1/secrets.%20./db", DENIED),
    get("fold-full-width", "fold", f"/v1/{FW_SECRETS}/db", DENIED),
    get("fold-full-width-partial", "fold", "/v1/%EF%BD%93ecrets/db", DENIED),
    get("fold-encoded-upper", "fold", "/v1/%53ECRETS/db", DENIED),
    get("fold-upper-dotdot", "fold", "/v1/X/../SECRETS/db", DENIED),
    get(
        "fold-kelvin-k",
        "fold",
        "/v1/%E2%84%AAeys/x",
        allow("/v1/%E2%84%AAeys/x"),
        note="strict /v1/keys/**: the Kelvin sign is another path (NFKC folds only on foldPaths)",
    ),
]

# --- host and port tricks

HOSTS: list[Case] = [
    get("host-upper", "host-port", ALLOWED_PATH, allow(ALLOWED_PATH), host=HR.upper()),
    get("host-trailing-dot", "host-port", ALLOWED_PATH, allow(ALLOWED_PATH), host=HR + "."),
    get("host-port-80", "host-port", ALLOWED_PATH, allow(ALLOWED_PATH), host=HR + ":80"),
    get("host-two-trailing-dots", "host-port", ALLOWED_PATH, deny("bad_request"), host=HR + ".."),
    get("host-leading-dot", "host-port", ALLOWED_PATH, deny("bad_request"), host="." + HR),
    get("host-port-zero", "host-port", ALLOWED_PATH, deny("bad_request"), host=HR + ":0"),
    get("host-port-too-big", "host-port", ALLOWED_PATH, refuse(400), host=HR + ":65536"),
    get("host-port-signed", "host-port", ALLOWED_PATH, refuse(400), host=HR + ":+80"),
    get("host-ip-literal", "host-port", ALLOWED_PATH, deny("outside_purpose"), host="127.0.0.1"),
    get("host-ipv6-literal", "host-port", ALLOWED_PATH, deny("outside_purpose"), host="[::1]"),
    get("host-zero-width", "host-port", ALLOWED_PATH, refuse(400), host=HR + "\u200b"),
    get("host-full-width", "host-port", ALLOWED_PATH, refuse(400), host="\uff48r.payroll.internal"),
    get("host-other-agent-host", "host-port", "/rpc", deny("outside_purpose"), host=TOOLS),
    get("host-bank", "host-port", "/v1/wires", deny("outside_purpose"), host=BANK),
    # filing: PUT filings.tax.internal:8443/returns/* (the rule names the port)
    Case(
        "port-rule-control",
        "host-port",
        "payroll-bot",
        allow("/returns/q4", "filing", FILINGS),
        method="PUT",
        target=_url(FILINGS + ":8443", "/returns/q4"),
        host=None,
        headers=(("x-mandate-purpose", "filing"),),
        body=b"{}",
    ),
    Case(
        "port-rule-no-port",
        "host-port",
        "payroll-bot",
        deny("outside_purpose"),
        method="PUT",
        target=_url(FILINGS, "/returns/q4"),
        host=None,
        headers=(("x-mandate-purpose", "filing"),),
        body=b"{}",
    ),
    Case(
        "port-rule-other-port",
        "host-port",
        "payroll-bot",
        deny("outside_purpose"),
        method="PUT",
        target=_url(FILINGS + ":8444", "/returns/q4"),
        host=None,
        headers=(("x-mandate-purpose", "filing"),),
        body=b"{}",
    ),
    Case(
        "port-rule-trailing-dot",
        "host-port",
        "payroll-bot",
        allow("/returns/q4", "filing", FILINGS),
        method="PUT",
        target=_url(FILINGS + ".:8443", "/returns/q4"),
        host=None,
        headers=(("x-mandate-purpose", "filing"),),
        body=b"{}",
    ),
    # `*.docs.tax.internal`: one leading label, never the bare domain nor two labels
    get(
        "wildcard-one-label",
        "host-port",
        "/forms/w2",
        allow("/forms/w2", "filing", "eu.docs.tax.internal"),
        host="eu.docs.tax.internal",
        headers=(("x-mandate-purpose", "filing"),),
    ),
    get(
        "wildcard-bare-domain",
        "host-port",
        "/forms/w2",
        deny("outside_purpose"),
        host="docs.tax.internal",
        headers=(("x-mandate-purpose", "filing"),),
    ),
    get(
        "wildcard-two-labels",
        "host-port",
        "/forms/w2",
        deny("outside_purpose"),
        host="a.eu.docs.tax.internal",
        headers=(("x-mandate-purpose", "filing"),),
    ),
    # Host vs :authority: the request line names one host, the Host header another
    Case(
        "authority-forbidden-host-header-allowed",
        "host-port",
        "payroll-bot",
        deny("outside_purpose"),
        method="GET",
        target=_url(BANK, ALLOWED_PATH),
        host=HR,
    ),
    Case(
        "authority-allowed-host-header-forbidden",
        "host-port",
        "payroll-bot",
        deny("denied_by_rule"),
        method="GET",
        target=_url(HR, "/v1/secrets/db"),
        host=BANK,
    ),
    Case(
        "authority-userinfo",
        "host-port",
        "payroll-bot",
        deny("outside_purpose"),
        method="GET",
        target=f"http://{HR}@{BANK}/v1/wires",
        host=BANK,
    ),
    Case(
        "host-header-twice",
        "host-port",
        "payroll-bot",
        deny("bad_request"),
        method="GET",
        target=ALLOWED_PATH,
        host=None,
        headers=(("Host", HR), ("Host", BANK)),
    ),
    Case(
        "host-header-list",
        "host-port",
        "payroll-bot",
        deny("bad_request"),
        method="GET",
        target=ALLOWED_PATH,
        host=f"{HR},{BANK}",
    ),
    Case(
        "host-header-missing",
        "host-port",
        "payroll-bot",
        refuse(400),
        method="GET",
        target=ALLOWED_PATH,
        host="",
    ),
]

# --- Envoy's and mandate's admin interfaces asked for through the egress listener (the
# pod's default Envoy admin port is 15000; mandate's admin is on localhost too)

ENVOY_ADMIN: list[Case] = [
    Case(
        "envoy-admin-quitquitquit-via-proxy",
        "envoy-admin",
        "payroll-bot",
        deny("outside_purpose"),
        method="POST",
        target="http://127.0.0.1:15000/quitquitquit",
        host=None,
        headers=(),
        body=b"",
    ),
    Case(
        "envoy-admin-config-dump-localhost",
        "envoy-admin",
        "payroll-bot",
        deny("outside_purpose"),
        method="GET",
        target="http://localhost:15000/config_dump",
    ),
    Case(
        "envoy-admin-logging-ipv6",
        "envoy-admin",
        "payroll-bot",
        deny("outside_purpose"),
        method="POST",
        target="http://[::1]:15000/logging?level=debug",
        host=None,
        headers=(),
        body=b"",
    ),
    Case(
        "envoy-admin-host-header-only",
        "envoy-admin",
        "payroll-bot",
        deny("outside_purpose"),
        method="GET",
        target="/config_dump",
        host="127.0.0.1:15000",
    ),
    Case(
        "mandate-admin-via-proxy",
        "envoy-admin",
        "payroll-bot",
        deny("outside_purpose"),
        method="GET",
        target="http://127.0.0.1:9090/v1/revocations",
    ),
]

# --- CONNECT (tunnel-bot may CONNECT relay.partner.example:443 only)

CONNECT: list[Case] = [
    Case(
        "connect-other-port",
        "connect",
        "tunnel-bot",
        deny("outside_purpose"),
        method="CONNECT",
        target=f"{RELAY}:22",
        host=f"{RELAY}:22",
    ),
    Case(
        "connect-no-port",
        "connect",
        "tunnel-bot",
        refuse(400),
        method="CONNECT",
        target=RELAY,
        host=RELAY,
    ),
    Case(
        "connect-ip",
        "connect",
        "tunnel-bot",
        deny("outside_purpose"),
        method="CONNECT",
        target="127.0.0.1:443",
        host="127.0.0.1:443",
    ),
    Case(
        "connect-other-host",
        "connect",
        "tunnel-bot",
        deny("outside_purpose"),
        method="CONNECT",
        target=f"{BANK}:443",
        host=f"{BANK}:443",
    ),
    Case(
        "connect-host-header-mismatch",
        "connect",
        "tunnel-bot",
        deny("outside_purpose"),
        method="CONNECT",
        target=f"{BANK}:443",
        host=f"{RELAY}:443",
    ),
    # payroll-bot's deny rule on /v1/secrets/** names no host: a tunnel to any host could carry
    # that path, so the deny rule (not only the missing CONNECT right) refuses it.
    Case(
        "connect-by-an-http-only-agent",
        "connect",
        "payroll-bot",
        deny("denied_by_rule"),
        method="CONNECT",
        target=f"{HR}:443",
        host=f"{HR}:443",
    ),
    Case(
        "connect-by-an-http-only-agent-other-host",
        "connect",
        "mcp-runner",
        deny("outside_purpose"),
        method="CONNECT",
        target=f"{TOOLS}:443",
        host=f"{TOOLS}:443",
    ),
    Case(
        "connect-absolute-form",
        "connect",
        "tunnel-bot",
        refuse(400),
        method="CONNECT",
        target=f"http://{BANK}:443/",
        host=f"{BANK}:443",
    ),
]

# --- request smuggling over HTTP/1.1 (raw bytes): a body that is a request to a denied path

_INNER = f"GET http://{HR}/v1/secrets/smuggled HTTP/1.1\r\nHost: {HR}\r\n\r\n"
_SMUGGLE_BODY = "0\r\n\r\n" + _INNER


def _smuggle(headers: str, body: str = _SMUGGLE_BODY) -> bytes:
    return (f"POST http://{HR}/v1/runs/7 HTTP/1.1\r\nHost: {HR}\r\n{headers}\r\n{body}").encode()


SMUGGLING: list[Case] = [
    Case(
        "smuggle-cl-te",
        "smuggling",
        "payroll-bot",
        refuse(400),
        raw=_smuggle(f"Content-Length: {len(_SMUGGLE_BODY)}\r\nTransfer-Encoding: chunked\r\n"),
    ),
    Case(
        "smuggle-te-cl",
        "smuggling",
        "payroll-bot",
        refuse(400),
        raw=_smuggle(f"Transfer-Encoding: chunked\r\nContent-Length: {len(_SMUGGLE_BODY)}\r\n"),
    ),
    Case(
        "smuggle-cl-cl",
        "smuggling",
        "payroll-bot",
        refuse(400),
        raw=_smuggle("Content-Length: 5\r\nContent-Length: 6\r\n"),
    ),
    Case(
        "smuggle-cl-list",
        "smuggling",
        "payroll-bot",
        refuse(400),
        raw=_smuggle("Content-Length: 5, 6\r\n"),
    ),
    Case(
        "smuggle-te-te",
        "smuggling",
        "payroll-bot",
        refuse(501),
        raw=_smuggle("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"),
    ),
    Case(
        "smuggle-te-obfuscated",
        "smuggling",
        "payroll-bot",
        refuse(501),
        raw=_smuggle("Transfer-Encoding: xchunked\r\n"),
    ),
    Case(
        "smuggle-te-space-before-colon",
        "smuggling",
        "payroll-bot",
        refuse(400),
        raw=_smuggle("Transfer-Encoding : chunked\r\n"),
    ),
    Case(
        "smuggle-obs-fold-purpose",
        "smuggling",
        "payroll-bot",
        deny("unknown_purpose"),
        raw=(
            f"GET http://{HR}{ALLOWED_PATH} HTTP/1.1\r\nHost: {HR}\r\nX-Mandate-Purpose: payrun\r\n"
            " filing\r\nConnection: close\r\n\r\n"
        ).encode(),
    ),
    # Folded into X-Foo's value, or refused: never a second x-mandate-agent.
    Case(
        "smuggle-obs-fold-agent",
        "smuggling",
        "payroll-bot",
        guard(HR),
        raw=(
            f"GET http://{HR}{ALLOWED_PATH} HTTP/1.1\r\nHost: {HR}\r\nX-Foo: a\r\n"
            f"\tx-mandate-agent: {SPOOF}\r\nConnection: close\r\n\r\n"
        ).encode(),
    ),
    Case(
        "smuggle-bare-lf",
        "smuggling",
        "payroll-bot",
        deny("denied_by_rule"),
        raw=(f"GET http://{HR}/v1/secrets/db HTTP/1.1\nHost: {HR}\n\n").encode(),
    ),
    Case(
        "smuggle-pipelined-second-request",
        "smuggling",
        "payroll-bot",
        deny("denied_by_rule"),
        raw=(
            f"GET http://{HR}/v1/secrets/db HTTP/1.1\r\nHost: {HR}\r\n\r\n"
            f"GET http://{HR}/v1/secrets/db2 HTTP/1.1\r\nHost: {HR}\r\nConnection: close\r\n\r\n"
        ).encode(),
        note="two denied requests on one connection: each decided, neither forwarded",
    ),
]

# --- identity and context spoofing (payroll-bot's allowed GET with headers it must not control)

A = allow(ALLOWED_PATH)
IDENTITY: list[Case] = [
    get("spoof-agent", "identity", ALLOWED_PATH, A, headers=(("x-mandate-agent", SPOOF),)),
    get(
        "spoof-agent-mixed-case", "identity", ALLOWED_PATH, A, headers=(("X-MaNdAtE-AgEnT", SPOOF),)
    ),
    get(
        "spoof-agent-twice",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("x-mandate-agent", SPOOF), ("X-Mandate-Agent", "tunnel-bot")),
    ),
    get(
        "spoof-decision",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("x-mandate-decision", "forged-decision-id"),),
    ),
    get(
        "spoof-unknown-mandate-header",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("x-mandate-grant", "grant-forged"), ("X-Mandate-Approver", "alice")),
    ),
    get(
        "spoof-agent-underscore",
        "identity",
        ALLOWED_PATH,
        refuse(400),
        headers=(("x_mandate_agent", SPOOF),),
    ),
    get(
        "spoof-purpose-underscore",
        "identity",
        ALLOWED_PATH,
        refuse(400),
        headers=(("x_mandate_purpose", "filing"),),
    ),
    get(
        "spoof-task-underscore-mixed",
        "identity",
        ALLOWED_PATH,
        refuse(400),
        headers=(("X_Mandate_Task", "t"),),
    ),
    get(
        "spoof-decision-half-underscore",
        "identity",
        ALLOWED_PATH,
        refuse(400),
        headers=(("x-mandate_decision", "d"),),
    ),
    get(
        "spoof-agent-other-half-underscore",
        "identity",
        ALLOWED_PATH,
        refuse(400),
        headers=(("x_mandate-agent", SPOOF),),
    ),
    get(
        "spoof-authorization-underscore",
        "identity",
        ALLOWED_PATH,
        refuse(400),
        headers=(("txn_token", "x"),),
    ),
    get(
        "spoof-purpose-of-another-agent",
        "identity",
        "/rpc",
        deny("unknown_purpose"),
        host=TOOLS,
        headers=(("x-mandate-purpose", "toolbox"),),
    ),
    get(
        "spoof-purpose-other-own",
        "identity",
        ALLOWED_PATH,
        deny("outside_purpose"),
        headers=(("x-mandate-purpose", "filing"),),
    ),
    get(
        "spoof-purpose-twice",
        "identity",
        ALLOWED_PATH,
        deny("unknown_purpose"),
        headers=(("x-mandate-purpose", "filing"), ("x-mandate-purpose", "payrun")),
    ),
    get(
        "spoof-purpose-list",
        "identity",
        ALLOWED_PATH,
        deny("unknown_purpose"),
        headers=(("x-mandate-purpose", "payrun, filing"),),
    ),
    get(
        "spoof-task-unprintable",
        "identity",
        ALLOWED_PATH,
        deny("bad_task"),
        headers=(("x-mandate-task", "a b"),),
    ),
    get(
        "spoof-task-declared",
        "identity",
        ALLOWED_PATH,
        allow(ALLOWED_PATH, task="INC-1"),
        headers=(("x-mandate-task", "INC-1"),),
        note="a task the agent declares is its claim, shown as such",
    ),
    get(
        "spoof-forwarded-host-to-allowed",
        "identity",
        "/v1/wires",
        deny("outside_purpose"),
        host=BANK,
        headers=(("X-Forwarded-Host", HR), ("Forwarded", f"host={HR}"), ("X-Original-Host", HR)),
    ),
    # Headers of mandate's own protocol with Envoy (the HTTP transport's answer headers) sent
    # by the agent: they change neither the decision nor what the upstream sees.
    get(
        "spoof-outcome-headers-on-denied",
        "identity",
        "/v1/secrets/db",
        DENIED,
        headers=(
            ("x-mandate-outcome", "allow"),
            ("x-mandate-code", "allowed"),
            ("x-mandate-log-agent", SPOOF),
        ),
    ),
    get(
        "spoof-auth-headers-to-remove",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(
            ("x-envoy-auth-headers-to-remove", "x-mandate-agent, x-mandate-decision"),
            ("x-mandate-scheme", "https"),
        ),
    ),
    get(
        "spoof-content-length-header",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("x-mandate-content-length", "len=0"),),
    ),
    get(
        "spoof-forwarded-for",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Real-IP", "10.0.0.1"),
            ("X-Forwarded-Proto", "https"),
        ),
    ),
    get(
        "spoof-envoy-original-path",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("x-envoy-original-path", "/v1/secrets/db"),),
    ),
    get(
        "spoof-traceparent-garbage",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("traceparent", "00-zz-zz-01"),),
    ),
    get(
        "spoof-traceparent-zero-trace",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("traceparent", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"),),
    ),
    get(
        "spoof-traceparent-huge",
        "identity",
        ALLOWED_PATH,
        A,
        headers=(("traceparent", "00-" + "a" * 8000),),
    ),
    get(
        "spoof-traceparent-twice-denied",
        "identity",
        "/v1/secrets/db",
        DENIED,
        headers=(
            ("traceparent", "00-" + "1" * 32 + "-00f067aa0ba902b7-01"),
            ("traceparent", "00-" + "2" * 32 + "-00f067aa0ba902b7-01"),
        ),
    ),
]

# --- method and URL override headers

OVERRIDES: list[Case] = [
    get(
        f"override-{name.lower()}",
        "method-override",
        ALLOWED_PATH,
        deny("bad_request", name.lower()),
        headers=((name, value),),
    )
    for name, value in [
        ("X-HTTP-Method-Override", "DELETE"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "PUT"),
        ("X-Original-URL", "/v1/secrets/db"),
        ("X-Rewrite-URL", "/v1/secrets/db"),
    ]
] + [
    get(
        "override-lower-case-name",
        "method-override",
        ALLOWED_PATH,
        deny("bad_request", "x-http-method-override"),
        headers=(("x-http-method-override", "delete"),),
    ),
    get(
        "override-underscore-name",
        "method-override",
        ALLOWED_PATH,
        refuse(400),
        headers=(("x_http_method_override", "DELETE"),),
    ),
    Case(
        "override-method-lower-case-h1",
        "method-override",
        "payroll-bot",
        refuse(400),
        method="get",
        target=_url(HR, ALLOWED_PATH),
    ),
    get(
        "override-method-query-parameter",
        "method-override",
        ALLOWED_PATH + "?_method=DELETE",
        deny("bad_request", "_method"),
    ),
    get(
        "override-method-query-parameter-encoded",
        "method-override",
        ALLOWED_PATH + "?x=1&%5Fmethod=DELETE",
        deny("bad_request", "_method"),
    ),
    get(
        "override-method-query-parameter-php-dot",
        "method-override",
        ALLOWED_PATH + "?.method=DELETE",
        deny("bad_request", "_method"),
        note="PHP folds '.' in a parameter name into '_': Laravel and Symfony read _method",
    ),
    Case(
        "override-method-multipart-field",
        "method-override",
        "payroll-bot",
        deny("bad_request", "_method"),
        target=_url(HR, ALLOWED_PATH),
        headers=(("content-type", "multipart/form-data; boundary=XyZ"),),
        body=b'--XyZ\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n'
        b"--XyZ--\r\n",
        note="Rack, PHP, Spring and ASP.NET Core read multipart fields too",
    ),
    Case(
        "override-method-form-without-content-type",
        "method-override",
        "payroll-bot",
        deny("bad_request", "_method"),
        target=_url(HR, ALLOWED_PATH),
        body=b"title=x&_method=DELETE",
        note="Rack takes a POST body without a Content-Type for a form",
    ),
    Case(
        "override-post-on-get-rule",
        "method-override",
        "payroll-bot",
        deny("outside_purpose"),
        method="DELETE",
        target=_url(HR, ALLOWED_PATH),
    ),
]

# --- HTTP/2 (h2c with prior knowledge; :authority as Host, target as :path)


def h2(cid: str, method: str, path: str, expect: Expect, headers: tuple[tuple[str, str], ...] = (),
       authority: str = HR, agent: str = "payroll-bot") -> Case:  # fmt: skip
    return Case(
        cid,
        "http2",
        agent,
        expect,
        method=method,
        target=path,
        host=authority,
        headers=headers,
        proto="h2",
    )


HTTP2: list[Case] = [
    h2("h2-control", "GET", ALLOWED_PATH, A),
    h2("h2-lower-case-get", "get", ALLOWED_PATH, deny("bad_request", "not in upper case")),
    h2("h2-mixed-case-get", "Get", ALLOWED_PATH, deny("bad_request", "not in upper case")),
    h2(
        "h2-lower-case-delete", "delete", "/v1/secrets/db", deny("bad_request", "not in upper case")
    ),
    h2("h2-unknown-method", "FOO", ALLOWED_PATH, deny("outside_purpose")),
    h2("h2-underscore-agent", "GET", ALLOWED_PATH, refuse(0), (("x_mandate_agent", SPOOF),)),
    h2(
        "h2-spoof-agent",
        "GET",
        ALLOWED_PATH,
        A,
        (("x-mandate-agent", SPOOF), ("x-mandate-decision", "forged")),
    ),
    h2("h2-enc-dotdot", "GET", "/v1/x/%2e%2e/secrets/db", DENIED),
    h2("h2-dotdot", "GET", "/v1/x/../secrets/db", DENIED),
    h2("h2-escape-not-hex", "GET", "/v1/secrets%zz/db", BAD),
    h2("h2-fold-upper", "GET", "/v1/SECRETS/db", DENIED),
    h2("h2-host-header-mismatch", "GET", ALLOWED_PATH, guard(HR), (("host", BANK),)),
    h2(
        "h2-authority-forbidden-host-allowed",
        "GET",
        "/v1/wires",
        deny("outside_purpose"),
        (("host", HR),),
        authority=BANK,
    ),
    h2(
        "h2-override-header",
        "GET",
        ALLOWED_PATH,
        deny("bad_request", "x-http-method-override"),
        (("x-http-method-override", "DELETE"),),
    ),
    h2("h2-upper-case-header-name", "GET", ALLOWED_PATH, refuse(0), (("X-Mandate-Agent", SPOOF),)),
    h2("h2-connection-header", "GET", ALLOWED_PATH, refuse(0), (("connection", "close"),)),
    h2("h2-te-not-trailers", "GET", ALLOWED_PATH, refuse(0), (("te", "chunked"),)),
]

# --- hostile MCP bodies (mcp-runner: POST tools.mcp.internal/rpc, tools lookup_employee, list_runs)


def _rpc(
    method: str = "tools/call", name: Any = ALLOWED_TOOL, id_: Any = 1, **extra: Any
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": id_,
        "method": method,
        "params": {"name": name, "arguments": {}},
    }
    msg.update(extra)
    return msg


def mcp(
    cid: str,
    body: bytes,
    expect: Expect,
    headers: tuple[tuple[str, str], ...] = (),
    method: str = "POST",
) -> Case:
    return Case(cid, "mcp", "mcp-runner", expect, method=method, target=_url(TOOLS, "/rpc"), host=None, headers=(("content-type", "application/json"), *headers), body=body)  # fmt: skip


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


MCP_DENY = deny("outside_purpose")
_HEAD = '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
MCP: list[Case] = [
    mcp("mcp-control", _j(_rpc()), allow("/rpc", "toolbox", TOOLS)),
    mcp(
        "mcp-control-batch",
        _j([_rpc(), _rpc(name=OTHER_TOOL, id_=2)]),
        allow("/rpc", "toolbox", TOOLS),
    ),
    mcp(
        "mcp-forbidden-tool", _j(_rpc(name=FORBIDDEN_TOOL)), deny("outside_purpose", FORBIDDEN_TOOL)
    ),
    mcp(
        "mcp-batch-mixed",
        _j([_rpc(), _rpc(name=FORBIDDEN_TOOL, id_=2)]),
        deny("outside_purpose", FORBIDDEN_TOOL),
    ),
    mcp("mcp-batch-mixed-forbidden-first", _j([_rpc(name=FORBIDDEN_TOOL), _rpc(id_=2)]), MCP_DENY),
    mcp(
        "mcp-batch-session-and-forbidden",
        _j([_rpc("ping"), _rpc(name=FORBIDDEN_TOOL, id_=2)]),
        MCP_DENY,
    ),
    mcp("mcp-empty-batch", b"[]", MCP_DENY),
    mcp(
        "mcp-dup-name-forbidden-last",
        (_HEAD + f'"params": {{"name": "{ALLOWED_TOOL}", "name": "{FORBIDDEN_TOOL}"}}}}').encode(),
        deny("outside_purpose", "appears twice"),
    ),
    mcp(
        "mcp-dup-name-forbidden-first",
        (_HEAD + f'"params": {{"name": "{FORBIDDEN_TOOL}", "name": "{ALLOWED_TOOL}"}}}}').encode(),
        deny("outside_purpose", "appears twice"),
    ),
    mcp(
        "mcp-dup-method",
        (
            _HEAD.replace('"method": "tools/call", ', '"method": "ping", "method": "tools/call", ')
            + f'"params": {{"name": "{FORBIDDEN_TOOL}"}}}}'
        ).encode(),
        deny("outside_purpose", "appears twice"),
    ),
    mcp(
        "mcp-notification-with-id",
        _j(_rpc("notifications/initialized", FORBIDDEN_TOOL)),
        deny("outside_purpose", "not allowed"),
    ),
    mcp(
        "mcp-notification-with-id-in-batch",
        _j([_rpc("ping"), _rpc("notifications/x", FORBIDDEN_TOOL, id_=2)]),
        deny("outside_purpose", "not allowed"),
    ),
    mcp(
        "mcp-id-1e999",
        (
            _HEAD.replace('"id": 1', '"id": 1e999') + f'"params": {{"name": "{ALLOWED_TOOL}"}}}}'
        ).encode(),
        deny("outside_purpose", "JSON-RPC id"),
    ),
    mcp("mcp-id-fraction", _j(_rpc(id_=1.5)), deny("outside_purpose", "JSON-RPC id")),
    mcp("mcp-id-object", _j(_rpc(id_={"a": 1})), deny("outside_purpose", "JSON-RPC id")),
    mcp("mcp-truncated", _j(_rpc())[:-5], MCP_DENY),
    mcp(
        "mcp-over-the-buffer",
        _j({**_rpc(), "params": {"name": ALLOWED_TOOL, "arguments": {"pad": "p" * 5000}}}),
        deny("outside_purpose", "truncated"),
    ),
    mcp("mcp-non-json", b"tools/call lookup_employee", deny("outside_purpose", "not JSON")),
    mcp("mcp-empty-body", b"", MCP_DENY),
    mcp(
        "mcp-not-jsonrpc", _j({"method": "tools/call", "params": {"name": ALLOWED_TOOL}}), MCP_DENY
    ),
    mcp("mcp-resources-read", _j(_rpc("resources/read")), deny("outside_purpose", "not allowed")),
    mcp("mcp-tool-name-case", _j(_rpc(name="Lookup_Employee")), MCP_DENY),
    mcp("mcp-tool-name-space", _j(_rpc(name=ALLOWED_TOOL + " ")), MCP_DENY),
    mcp("mcp-method-case", _j(_rpc("Tools/Call", FORBIDDEN_TOOL)), MCP_DENY),
    mcp("mcp-get", b"", MCP_DENY, method="GET"),
    mcp(
        "mcp-gzip-claimed", _j(_rpc(name=FORBIDDEN_TOOL)), MCP_DENY, (("content-encoding", "gzip"),)
    ),
]

# --- direct calls to mandate's Check port (the agent shares the network namespace)

DIRECT: list[Case] = [
    Case(
        "direct-forged-agent",
        "direct-check",
        SPOOF,
        Expect("direct"),
        target="/rpc",
        host=TOOLS,
        proto="direct",
        note="a CheckRequest naming another agent only answers a question: nothing is forwarded",
    ),
    Case(
        "direct-header-names-other-agent",
        "direct-check",
        "payroll-bot",
        deny("outside_purpose"),
        target="/rpc",
        host=TOOLS,
        headers=(("x-mandate-agent", SPOOF),),
        proto="direct",
    ),
    Case(
        "direct-unknown-agent",
        "direct-check",
        "ghost-agent",
        deny("unknown_agent"),
        target=ALLOWED_PATH,
        host=HR,
        proto="direct",
    ),
    Case(
        "direct-denied-path",
        "direct-check",
        "payroll-bot",
        DENIED,
        target="/v1/secrets/db",
        host=HR,
        proto="direct",
    ),
    Case(
        "direct-escape",
        "direct-check",
        "payroll-bot",
        BAD,
        target="/v1/secrets%zz/db",
        host=HR,
        proto="direct",
    ),
    Case(
        "direct-override-header",
        "direct-check",
        "payroll-bot",
        deny("bad_request"),
        target=ALLOWED_PATH,
        host=HR,
        headers=(("x-http-method-override", "DELETE"),),
        proto="direct",
    ),
]

# --- mandate's admin port without the token

TOKEN = "<token>"  # replaced with the stack's admin token


def admin(cid: str, method: str, path: str, status: int, keys: tuple[str, ...] = (),
          headers: tuple[tuple[str, str], ...] = (), body: bytes | None = None) -> Case:  # fmt: skip
    return Case(cid, "admin", "", Expect("admin", status=status, keys=keys), method=method, target=path, host=None, headers=headers, body=body, proto="admin")  # fmt: skip


_BAD_BEARER = (("Authorization", "Bearer not-the-token-0123456789"),)
_REVOKE = _j({"agent": "mcp-runner", "reason": "agent revoked by the agent"})
ADMIN: list[Case] = [
    admin("admin-readyz-says-only-ready", "GET", "/readyz", 200, ("ready",)),
    admin("admin-readyz-verbose-needs-token", "GET", "/readyz?verbose=1", 401),
    admin("admin-readyz-verbose-bad-token", "GET", "/readyz?verbose=1", 401, headers=_BAD_BEARER),
    admin(
        "admin-readyz-verbose-with-token",
        "GET",
        "/readyz?verbose=1",
        200,
        headers=(("Authorization", f"Bearer {TOKEN}"),),
    ),
    admin("admin-revocations-list-needs-token", "GET", "/v1/revocations", 401),
    admin("admin-revoke-needs-token", "POST", "/v1/revocations", 401, body=_REVOKE),
    admin(
        "admin-revoke-bad-token", "POST", "/v1/revocations", 401, headers=_BAD_BEARER, body=_REVOKE
    ),
    admin("admin-revoke-token-in-query", "POST", "/v1/revocations?token=x", 401, body=_REVOKE),
    admin("admin-restore-needs-token", "DELETE", "/v1/revocations/payroll-bot", 401),
    admin("admin-status-needs-token", "GET", "/v1/status", 401),
    admin("admin-elevations-need-token", "GET", "/v1/elevations", 401),
    admin(
        "admin-approve-needs-token",
        "POST",
        "/v1/elevations/elev-000000000000/approve",
        401,
        body=_j({"approver": "me"}),
    ),
    admin(
        "admin-revocations-basic-auth",
        "GET",
        "/v1/revocations",
        401,
        headers=(("Authorization", "Basic YWRtaW46YWRtaW4="),),
    ),
]

# --- everything but the context-API probes (test_catalogue.py has those)

CATALOGUE: list[Case] = [
    *PATHS, *ESCAPES, *HOSTS, *ENVOY_ADMIN, *CONNECT, *SMUGGLING, *IDENTITY, *OVERRIDES, *HTTP2, *MCP,
    *DIRECT, *ADMIN,
]  # fmt: skip
