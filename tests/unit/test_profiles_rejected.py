"""Profiles that must not load, and what the error says about each.

One case per kind of bad profile. Each writes small YAML files into a fresh directory and
checks that `load_profiles` raises ProfileErrors naming, for every problem, the file, the
1-based document, the exact field path and (as a message fragment) what was expected.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.core import load_profiles
from sidecar.errors import ProfileErrors

DELETE = object()  # an edit value: remove the field


def base(name: str = "billing-agent", sa: str | None = None) -> dict[str, Any]:
    """A valid profile using every part of the format."""
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentProfile",
        "metadata": {"name": name},
        "spec": {
            "owner": "finance-platform",
            "identities": [{"serviceAccount": sa or f"agents/{name}"}],
            "defaultPurpose": "reconcile",
            "purposes": {
                "reconcile": {
                    "description": "Match invoices against ledger entries",
                    "allow": [
                        {
                            "hosts": ["ledger.finance.svc"],
                            "methods": ["GET"],
                            "paths": ["/v1/invoices/*", "/v1/ledger/**"],
                        },
                        {
                            "hosts": ["mcp.tools.svc"],
                            "methods": ["POST"],
                            "paths": ["/mcp"],
                            "mcpTools": ["search"],
                            "mcpMethods": ["resources/read"],
                        },
                    ],
                    "deny": [{"paths": ["/v1/ledger/admin/**"]}],
                    "rateLimit": {"requests": 600, "per": "1m"},
                }
            },
            "elevations": {
                "refund": {
                    "approval": "operator",
                    "maxDuration": "10m",
                    "justificationRequired": True,
                    "allow": [{"hosts": ["api.stripe.com"], "methods": ["POST"]}],
                }
            },
            "behavior": {"mode": "enforce", "revokeAtRisk": 0.95},
            "credentials": {
                "ledger-key": {
                    "hosts": ["ledger.finance.svc"],
                    "secret": {"file": "/var/run/mandate/credentials/ledger/key"},
                },
                "stripe-oauth": {
                    "hosts": ["api.stripe.com"],
                    "oauth2ClientCredentials": {
                        "tokenUrl": "https://idp.example.com/token",
                        "clientIdFile": "/var/run/mandate/credentials/stripe/id",
                        "clientSecretFile": "/var/run/mandate/credentials/stripe/secret",
                        "scopes": ["refunds"],
                    },
                },
                "mcp-exchange": {
                    "hosts": ["mcp.tools.svc"],
                    "tokenExchange": {
                        "tokenUrl": "https://sts.example.com/token",
                        "subjectTokenFile": "/var/run/secrets/tokens/sts",
                        "audience": "mcp",
                    },
                },
                "ledger-txn": {"hosts": ["ledger.finance.svc"], "transactionToken": {"ttl": "30s"}},
            },
        },
    }


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def edit(doc: dict[str, Any], edits: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with each dotted field path (``a.b[0].c``) set, or deleted."""
    out = copy.deepcopy(doc)
    for path, value in edits.items():
        steps: list[str | int] = [key if key else int(index) for key, index in _STEP.findall(path)]
        node: Any = out
        for step in steps[:-1]:
            node = node[step]
        if value is DELETE:
            del node[steps[-1]]
        else:
            node[steps[-1]] = value
    return out


def dump(*docs: dict[str, Any]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def bad(id_: str, edits: dict[str, Any], field: str, fragment: str) -> Any:
    """One document with ``edits`` applied; one problem expected at ``field``."""
    return pytest.param(
        {"a.yaml": dump(edit(base(), edits))}, [("a.yaml", 1, field, fragment)], id=id_
    )


VALID = dump(base())
RULE = "spec.purposes.reconcile.allow[0]"
MCP_RULE = "spec.purposes.reconcile.allow[1]"

CRED = "spec.credentials"
CASES = [
    # what the audit trail keeps of arguments (issue 18, learn): spec.audit
    bad(
        "audit-arguments-unknown-mode",
        {"spec.audit": {"arguments": "clear"}},
        "spec.audit.arguments",
        "Input should be 'hashes', 'types' or 'none'",
    ),
    bad(
        "audit-values-not-a-list",
        {"spec.audit": {"values": "amount"}},
        "spec.audit.values",
        "Input should be a valid list",
    ),
    bad(
        "audit-values-empty-name",
        {"spec.audit": {"values": ["amount", ""]}},
        "spec.audit.values[1]",
        "at least 1 character",
    ),
    bad(
        "audit-values-twice",
        {"spec.audit": {"values": ["amount", "to", "amount"]}},
        "spec.audit.values",
        "'amount' is listed twice",
    ),
    bad(
        "audit-values-with-none",
        {"spec.audit": {"arguments": "none", "values": ["amount"]}},
        "spec.audit.values",
        "arguments: none records no argument",
    ),
    bad(
        "audit-unknown-field",
        {"spec.audit": {"arguments": "hashes", "key": "s3cret"}},
        "spec.audit.key",
        "unknown field 'key'",
    ),
    bad(
        "audit-not-a-mapping",
        {"spec.audit": "hashes"},
        "spec.audit",
        "valid dictionary",
    ),
    # task narrowing (issue 18): requireTask is a boolean of a purpose, not of an elevation
    bad(
        "require-task-not-a-boolean",
        {"spec.purposes.reconcile.requireTask": "yes"},
        "spec.purposes.reconcile.requireTask",
        "Input should be a valid boolean",
    ),
    bad(
        "require-task-on-an-elevation",
        {"spec.elevations.refund.requireTask": True},
        "spec.elevations.refund.requireTask",
        "unknown field 'requireTask'",
    ),
    # argument rules (issue 18): every keyword's bad value, and keywords outside the subset
    bad(
        "arguments-unknown-keyword",
        {
            f"{MCP_RULE}.mcpArguments": {
                "search": {"properties": {"q": {"type": "string", "format": "email"}}}
            }
        },
        f"{MCP_RULE}.mcpArguments",
        "search.properties.q.format: keyword 'format' is not supported",
    ),
    bad(
        "arguments-ref",
        {f"{MCP_RULE}.mcpArguments": {"search": {"$ref": "#/x"}}},
        f"{MCP_RULE}.mcpArguments",
        "search.$ref: keyword '$ref' is not supported",
    ),
    bad(
        "arguments-bad-type",
        {f"{MCP_RULE}.mcpArguments": {"search": {"type": "text"}}},
        f"{MCP_RULE}.mcpArguments",
        "search.type: expected one of array, boolean, integer",
    ),
    bad(
        "arguments-empty-enum",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"q": {"enum": []}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.q.enum: expected a non-empty list of values",
    ),
    bad(
        "arguments-minimum-not-a-number",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"n": {"minimum": "1"}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.n.minimum: expected a number",
    ),
    bad(
        "arguments-maximum-bool",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"n": {"maximum": True}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.n.maximum: expected a number",
    ),
    bad(
        "arguments-exclusive-minimum-not-a-number",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"n": {"exclusiveMinimum": "0"}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.n.exclusiveMinimum: expected a number",
    ),
    bad(
        "arguments-exclusive-maximum-not-a-number",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"n": {"exclusiveMaximum": None}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.n.exclusiveMaximum: expected a number",
    ),
    bad(
        "arguments-max-length-negative",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"q": {"maxLength": -1}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.q.maxLength: expected a whole number >= 0",
    ),
    bad(
        "arguments-min-length-float",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"q": {"minLength": 1.5}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.q.minLength: expected a whole number >= 0",
    ),
    bad(
        "arguments-max-items-negative",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"l": {"maxItems": -2}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.l.maxItems: expected a whole number >= 0",
    ),
    bad(
        "arguments-min-items-string",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"l": {"minItems": "2"}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.l.minItems: expected a whole number >= 0",
    ),
    bad(
        "arguments-pattern-not-a-string",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"q": {"pattern": 5}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.q.pattern: expected a regular expression",
    ),
    bad(
        "arguments-pattern-invalid",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"q": {"pattern": "("}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.q.pattern: not a regular expression (missing ), unterminated",
    ),
    bad(
        "arguments-required-not-a-list",
        {f"{MCP_RULE}.mcpArguments": {"search": {"required": "q"}}},
        f"{MCP_RULE}.mcpArguments",
        "search.required: expected a list of property names",
    ),
    bad(
        "arguments-properties-not-an-object",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": ["q"]}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties: expected an object of property schemas",
    ),
    bad(
        "arguments-items-not-a-schema",
        {f"{MCP_RULE}.mcpArguments": {"search": {"properties": {"l": {"items": 3}}}}},
        f"{MCP_RULE}.mcpArguments",
        "search.properties.l.items: expected a JSON Schema object",
    ),
    bad(
        "arguments-additional-properties-bad",
        {f"{MCP_RULE}.mcpArguments": {"search": {"additionalProperties": "no"}}},
        f"{MCP_RULE}.mcpArguments",
        "search.additionalProperties: expected a JSON Schema object",
    ),
    bad(
        "arguments-const-any-value-ok-but-nested-unknown",
        {
            f"{MCP_RULE}.mcpArguments": {
                "search": {"properties": {"q": {"const": "x", "default": "y"}}}
            }
        },
        f"{MCP_RULE}.mcpArguments",
        "search.properties.q.default: keyword 'default' is not supported",
    ),
    bad(
        "arguments-schema-not-an-object",
        {f"{MCP_RULE}.mcpArguments": {"search": "string"}},
        f"{MCP_RULE}.mcpArguments.search",
        "valid dictionary",
    ),
    bad(
        "arguments-for-a-tool-the-rule-does-not-list",
        {f"{MCP_RULE}.mcpArguments": {"delete_all": {"type": "object"}}},
        f"{MCP_RULE}.mcpArguments",
        "'delete_all': constrain only a tool this rule lists in mcpTools",
    ),
    bad(
        "query-unknown-keyword",
        {f"{RULE}.query": {"properties": {"q": {"format": "date"}}}},
        f"{RULE}.query",
        "query.properties.q.format: keyword 'format' is not supported",
    ),
    bad(
        "json-body-bad-maximum",
        {f"{RULE}.jsonBody": {"properties": {"amount": {"maximum": "100"}}}},
        f"{RULE}.jsonBody",
        "jsonBody.properties.amount.maximum: expected a number",
    ),
    bad(
        "query-on-a-deny-rule",
        {"spec.purposes.reconcile.deny[0].query": {"type": "object"}},
        "spec.purposes.reconcile.deny[0]",
        "query: only an allow rule may constrain arguments",
    ),
    bad(
        "arguments-on-a-deny-rule",
        {
            "spec.purposes.reconcile.deny[0].mcpTools": ["search"],
            "spec.purposes.reconcile.deny[0].mcpArguments": {"search": {"type": "object"}},
        },
        "spec.purposes.reconcile.deny[0]",
        "mcpArguments: only an allow rule may constrain arguments",
    ),
    # credentials (issue 17)
    bad(
        "credential-host-not-allowed",
        {f"{CRED}.ledger-key.hosts": ["ledger.finance.svc", "evil.example.com"]},
        CRED,
        "credentials.ledger-key.hosts[1] 'evil.example.com': no purpose or elevation of this "
        "agent allows this host",
    ),
    bad(
        "credential-two-kinds",
        {f"{CRED}.ledger-key.transactionToken": {}},
        f"{CRED}.ledger-key",
        "give exactly one of secret, oauth2ClientCredentials, tokenExchange, transactionToken "
        "(got 2)",
    ),
    bad(
        "credential-no-kind",
        {f"{CRED}.ledger-key.secret": DELETE},
        f"{CRED}.ledger-key",
        "give exactly one of secret, oauth2ClientCredentials",
    ),
    bad(
        "credential-no-hosts",
        {f"{CRED}.ledger-key.hosts": []},
        f"{CRED}.ledger-key.hosts",
        "at least 1 item",
    ),
    bad(
        "credential-bad-host",
        {f"{CRED}.ledger-key.hosts": ["*.*.svc"]},
        f"{CRED}.ledger-key.hosts[0]",
        "only one leading '*.' label",
    ),
    bad(
        "credential-relative-file",
        {f"{CRED}.ledger-key.secret.file": "ledger/key"},
        f"{CRED}.ledger-key.secret.file",
        "expected an absolute path",
    ),
    bad(
        "credential-header-not-a-credential-header",
        {f"{CRED}.ledger-key.secret.header": "cookie"},
        f"{CRED}.ledger-key.secret.header",
        "header 'cookie': a credential goes in one of authorization, x-api-key",
    ),
    bad(
        "credential-header-txn-token-reserved",
        {f"{CRED}.ledger-key.secret.header": "txn-token"},
        f"{CRED}.ledger-key.secret.header",
        "header 'txn-token': a credential goes in one of",
    ),
    bad(
        "credential-format-without-placeholder",
        {f"{CRED}.ledger-key.secret.format": "Bearer"},
        f"{CRED}.ledger-key.secret.format",
        "expected one '{}' where the value goes",
    ),
    bad(
        "credential-format-with-line-break",
        {f"{CRED}.ledger-key.secret.format": "Bearer {}\r\nx-evil: 1"},
        f"{CRED}.ledger-key.secret.format",
        "expected one '{}' where the value goes",
    ),
    bad(
        "credential-basic-and-format",
        {f"{CRED}.ledger-key.secret.format": "{}", f"{CRED}.ledger-key.secret.basicUsername": "u"},
        f"{CRED}.ledger-key.secret",
        "give format or basicUsername, not both",
    ),
    bad(
        "credential-basic-username-colon",
        {f"{CRED}.ledger-key.secret.basicUsername": "a:b"},
        f"{CRED}.ledger-key.secret",
        "basicUsername must not contain ':'",
    ),
    bad(
        "credential-token-url-plain-http",
        {f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl": "http://idp.example.com/t"},
        f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl",
        "a token endpoint must be https://",
    ),
    bad(
        "credential-token-url-not-a-url",
        {f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl": "idp.example.com"},
        f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl",
        "expected an https:// URL",
    ),
    bad(
        "credential-token-url-userinfo-trick",
        {f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl": "http://evil.com#@localhost/t"},
        f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl",
        "a token endpoint must be https://",
    ),
    bad(
        "credential-token-url-userinfo",
        {f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl": "https://u:p@idp.example.com/t"},
        f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl",
        "no user name or password in a token URL",
    ),
    bad(
        "credential-token-url-fragment",
        {f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl": "https://idp.example.com/t#x"},
        f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl",
        "no fragment (#...) in a token URL",
    ),
    bad(
        "credential-client-auth-unknown",
        {f"{CRED}.stripe-oauth.oauth2ClientCredentials.clientAuth": "jwt"},
        f"{CRED}.stripe-oauth.oauth2ClientCredentials.clientAuth",
        "'basic' or 'post'",
    ),
    bad(
        "credential-exchange-actor-without-type",
        {f"{CRED}.mcp-exchange.tokenExchange.actorTokenFile": "/var/run/actor"},
        f"{CRED}.mcp-exchange.tokenExchange",
        "actorTokenFile and actorTokenType go together",
    ),
    bad(
        "elevation-longer-than-the-crd-allows",
        {"spec.elevations.refund.maxDuration": "721h"},
        "spec.elevations.refund.maxDuration",
        "an elevation lasts at most 720h",
    ),
    bad(
        "credential-txn-ttl-over-60s",
        {f"{CRED}.ledger-txn.transactionToken.ttl": "2m"},
        f"{CRED}.ledger-txn.transactionToken.ttl",
        "a transaction token lives at most 60s",
    ),
    bad(
        "credential-connect-unknown",
        {f"{CRED}.ledger-key.connect": "sometimes"},
        f"{CRED}.ledger-key.connect",
        "'refuse' or 'allow'",
    ),
    bad(
        "credential-header-clash",
        {f"{CRED}.ledger-key-2": {"hosts": ["ledger.finance.svc"], "secret": {"file": "/k2"}}},
        CRED,
        "credentials 'ledger-key' and 'ledger-key-2' both set 'authorization' for a host",
    ),
    bad(
        "credential-unknown-field",
        {f"{CRED}.ledger-key.secret.value": "sk_live_123"},
        f"{CRED}.ledger-key.secret.value",
        "unknown field 'value'",
    ),
    # unknown fields, at several depths (and the snake_case spelling of a known one)
    bad(
        "unknown-top-level",
        {"status": {}},
        "status",
        "unknown field 'status'; allowed here: apiVersion, kind, metadata, spec",
    ),
    bad(
        "unknown-in-spec",
        {"spec.ownr": "x"},
        "spec.ownr",
        "unknown field 'ownr'; allowed here: audit, behavior, credentials, defaultPurpose, elevations, identities, owner, purposes",
    ),
    bad(
        "unknown-snake-case",
        {"spec.default_purpose": "reconcile"},
        "spec.default_purpose",
        "unknown field 'default_purpose'",
    ),
    bad(
        "unknown-in-purpose",
        {"spec.purposes.reconcile.rate": 5},
        "spec.purposes.reconcile.rate",
        "allowed here: allow, deny, description, rateLimit",
    ),
    # foldPaths (issue 15, finding 8): deny rules only, a boolean, and only with paths
    bad(
        "fold-paths-on-an-allow-rule",
        {f"{RULE}.foldPaths": True},
        f"{RULE}.foldPaths",
        "unknown field 'foldPaths'; allowed here: hosts, jsonBody, mcpArguments, mcpMethods, mcpTools, methods, paths, query "
        "(foldPaths is for deny rules only",
    ),
    bad(
        "fold-paths-on-an-elevation-rule",
        {"spec.elevations.refund.allow[0].foldPaths": True},
        "spec.elevations.refund.allow[0].foldPaths",
        "foldPaths is for deny rules only",
    ),
    bad(
        "fold-paths-not-a-boolean",
        {"spec.purposes.reconcile.deny[0].foldPaths": "yes"},
        "spec.purposes.reconcile.deny[0].foldPaths",
        "Input should be a valid boolean, got 'yes'",
    ),
    bad(
        "fold-paths-null",
        {"spec.purposes.reconcile.deny[0].foldPaths": None},
        "spec.purposes.reconcile.deny[0].foldPaths",
        "Input should be a valid boolean",
    ),
    bad(
        "fold-paths-without-paths",
        {"spec.purposes.reconcile.deny[0]": {"hosts": ["x.example"], "foldPaths": True}},
        "spec.purposes.reconcile.deny[0].foldPaths",
        "foldPaths: true needs paths to fold",
    ),
    bad(
        "unknown-in-deny-rule",
        {"spec.purposes.reconcile.deny[0].foldpaths": True},
        "spec.purposes.reconcile.deny[0].foldpaths",
        "unknown field 'foldpaths'; allowed here: foldPaths, hosts, jsonBody, mcpArguments, mcpMethods, mcpTools, methods, paths, query",
    ),
    bad(
        "unknown-in-rule",
        {f"{RULE}.path": ["/x"]},
        f"{RULE}.path",
        "unknown field 'path'; allowed here: hosts, jsonBody, mcpArguments, mcpMethods, mcpTools, methods, paths, query",
    ),
    bad(
        "unknown-in-rate-limit",
        {"spec.purposes.reconcile.rateLimit.burst": 5},
        "spec.purposes.reconcile.rateLimit.burst",
        "allowed here: per, requests",
    ),
    bad(
        "unknown-in-elevation-rule",
        {"spec.elevations.refund.allow[0].tools": []},
        "spec.elevations.refund.allow[0].tools",
        "unknown field 'tools'",
    ),
    bad(
        "unknown-in-identity",
        {"spec.identities[0].name": "x"},
        "spec.identities[0].name",
        "allowed here: serviceAccount, spiffe",
    ),
    bad(
        "unknown-in-behavior",
        {"spec.behavior.threshold": 1},
        "spec.behavior.threshold",
        "allowed here: denyAtRisk, learningPeriod, minCalls, mode, revokeAtRisk, sensitiveArguments, window",
    ),
    # required fields and empty collections
    bad("missing-owner", {"spec.owner": DELETE}, "spec.owner", "required field is missing"),
    bad(
        "missing-purposes",
        {"spec.purposes": DELETE, "spec.defaultPurpose": DELETE},
        "spec.purposes",
        "required field is missing",
    ),
    bad(
        "empty-purposes",
        {"spec.purposes": {}, "spec.defaultPurpose": DELETE},
        "spec.purposes",
        "should have at least 1 item",
    ),
    bad("missing-spec", {"spec": DELETE}, "spec", "required field is missing"),
    bad(
        "missing-name",
        {"metadata": {"namespace": "agents"}},
        "metadata.name",
        "required field is missing",
    ),
    bad(
        "missing-approval",
        {"spec.elevations.refund.approval": DELETE},
        "spec.elevations.refund.approval",
        "required field is missing",
    ),
    bad(
        "missing-rate-per",
        {"spec.purposes.reconcile.rateLimit.per": DELETE},
        "spec.purposes.reconcile.rateLimit.per",
        "required field is missing",
    ),
    bad(
        "elevation-without-rules",
        {"spec.elevations.refund.allow": []},
        "spec.elevations.refund.allow",
        "should have at least 1 item",
    ),
    # names and references
    bad(
        "bad-agent-name",
        {"metadata.name": "Billing_Agent"},
        "metadata.name",
        "expected Lower-case letters, digits",
    ),
    bad(
        "bad-purpose-name",
        {"spec.purposes": {"Re Concile": {}}, "spec.defaultPurpose": DELETE},
        "spec.purposes.Re Concile (name)",
        "should match pattern",
    ),
    bad(
        "default-purpose-not-a-purpose",
        {"spec.defaultPurpose": "refund"},
        "spec.defaultPurpose",
        "defaultPurpose 'refund' is not one of the purposes (reconcile)",
    ),
    # host patterns
    bad(
        "host-inner-wildcard",
        {f"{RULE}.hosts": ["ok.example", "a.*.com"]},
        f"{RULE}.hosts[1]",
        "only one leading '*.' label",
    ),
    bad(
        "host-bare-star",
        {f"{RULE}.hosts": ["*"]},
        f"{RULE}.hosts[0]",
        "only one leading '*.' label",
    ),
    bad(
        "host-port-too-big",
        {f"{RULE}.hosts": ["ledger.svc:70000"]},
        f"{RULE}.hosts[0]",
        "port '70000' is not a number from 1 to 65535",
    ),
    bad(
        "host-port-not-number",
        {f"{RULE}.hosts": ["ledger.svc:http"]},
        f"{RULE}.hosts[0]",
        "is not a number from 1 to 65535",
    ),
    bad(
        "host-not-a-name",
        {f"{RULE}.hosts": ["ledger svc"]},
        f"{RULE}.hosts[0]",
        "is not a valid host name",
    ),
    bad(
        "host-in-elevation",
        {"spec.elevations.refund.allow[0].hosts": ["a.*.com"]},
        "spec.elevations.refund.allow[0].hosts[0]",
        "only one leading '*.' label",
    ),
    bad("hosts-empty", {f"{RULE}.hosts": []}, f"{RULE}.hosts", "should have at least 1 item"),
    # path patterns
    bad(
        "path-no-leading-slash",
        {f"{RULE}.paths": ["/v1/invoices/*", "v1/ledger"]},
        f"{RULE}.paths[1]",
        "must start with '/'",
    ),
    bad(
        "path-trailing-slash",
        {f"{RULE}.paths": ["/v1/ledger/"]},
        f"{RULE}.paths[0]",
        "must not end with '/'",
    ),
    bad(
        "path-star-inside-segment",
        {f"{RULE}.paths": ["/v1/a*b"]},
        f"{RULE}.paths[0]",
        "'*' and '**' must be whole segments",
    ),
    bad(
        "path-double-slash",
        {f"{RULE}.paths": ["/v1//ledger"]},
        f"{RULE}.paths[0]",
        "empty segment ('//')",
    ),
    bad(
        "path-dot-dot",
        {f"{RULE}.paths": ["/v1/../admin"]},
        f"{RULE}.paths[0]",
        "has a '..' segment",
    ),
    bad("path-with-query", {f"{RULE}.paths": ["/v1/x?y=1"]}, f"{RULE}.paths[0]", "without a query"),
    bad(
        "path-in-deny-rule",
        {"spec.purposes.reconcile.deny[0].paths": ["admin/**"]},
        "spec.purposes.reconcile.deny[0].paths[0]",
        "must start with '/'",
    ),
    # methods
    bad(
        "methods-not-a-list",
        {f"{RULE}.methods": "GET"},
        f"{RULE}.methods",
        "Input should be a valid list, got 'GET'",
    ),
    bad("methods-empty", {f"{RULE}.methods": []}, f"{RULE}.methods", "should have at least 1 item"),
    bad(
        "method-bad-name",
        {f"{RULE}.methods": ["GET", "GE T"]},
        f"{RULE}.methods[1]",
        "'GE T' is not an HTTP method name",
    ),
    bad("method-not-string", {f"{RULE}.methods": [1]}, f"{RULE}.methods[0]", "valid string"),
    # MCP fields
    bad(
        "mcp-methods-tools-call",
        {f"{MCP_RULE}.mcpMethods": ["tools/call"]},
        f"{MCP_RULE}.mcpMethods[0]",
        "list tools in mcpTools",
    ),
    bad(
        "mcp-tools-empty-name",
        {f"{MCP_RULE}.mcpTools": [""]},
        f"{MCP_RULE}.mcpTools[0]",
        "at least 1 character",
    ),
    bad("mcp-tools-empty", {f"{MCP_RULE}.mcpTools": []}, f"{MCP_RULE}.mcpTools", "at least 1 item"),
    # identities
    bad(
        "identity-both",
        {"spec.identities[0].spiffe": "spiffe://cluster.local/ns/a/sa/b"},
        "spec.identities[0]",
        "give exactly one of serviceAccount or spiffe",
    ),
    bad(
        "identity-neither",
        {"spec.identities": [{}]},
        "spec.identities[0]",
        "give exactly one of serviceAccount or spiffe",
    ),
    bad(
        "service-account-two-slashes",
        {"spec.identities[0].serviceAccount": "agents/billing/agent"},
        "spec.identities[0].serviceAccount",
        "expected namespace/name of the pod's service account, or its name alone",
    ),
    bad(
        "service-account-upper-case",
        {"spec.identities[0].serviceAccount": "Agents/Billing"},
        "spec.identities[0].serviceAccount",
        "expected namespace/name",
    ),
    bad(
        "spiffe-not-a-spiffe-id",
        {"spec.identities": [{"spiffe": "https://x/y"}]},
        "spec.identities[0].spiffe",
        "should match pattern '^spiffe://",
    ),
    # kind and apiVersion
    bad(
        "wrong-kind",
        {"kind": "AgentRevocation"},
        "kind",
        "expected apiVersion 'mandate.dev/v1alpha1' and kind 'AgentProfile', got 'mandate.dev/v1alpha1' and 'AgentRevocation'",
    ),
    bad(
        "missing-kind",
        {"kind": DELETE},
        "kind",
        "kind 'AgentProfile', got 'mandate.dev/v1alpha1' and None",
    ),
    bad(
        "wrong-api-version",
        {"apiVersion": "mandate.dev/v1"},
        "apiVersion",
        "got 'mandate.dev/v1' and 'AgentProfile'",
    ),
    # durations
    bad(
        "rate-per-bad-unit",
        {"spec.purposes.reconcile.rateLimit.per": "1x"},
        "spec.purposes.reconcile.rateLimit.per",
        "'1x' is not a duration like '30s', '10m', '1h30m' or '250ms'",
    ),
    bad(
        "rate-per-zero",
        {"spec.purposes.reconcile.rateLimit.per": "0s"},
        "spec.purposes.reconcile.rateLimit.per",
        "must be greater than zero",
    ),
    bad(
        "rate-per-number",
        {"spec.purposes.reconcile.rateLimit.per": 60},
        "spec.purposes.reconcile.rateLimit.per",
        "Input should be a valid string, got 60",
    ),
    bad(
        "max-duration-bad",
        {"spec.elevations.refund.maxDuration": "10 minutes"},
        "spec.elevations.refund.maxDuration",
        "is not a duration like",
    ),
    # strict types: no coercion of strings to numbers or booleans
    bad(
        "requests-string",
        {"spec.purposes.reconcile.rateLimit.requests": "600"},
        "spec.purposes.reconcile.rateLimit.requests",
        "Input should be a valid integer, got '600'",
    ),
    bad(
        "requests-float",
        {"spec.purposes.reconcile.rateLimit.requests": 1.5},
        "spec.purposes.reconcile.rateLimit.requests",
        "valid integer, got 1.5",
    ),
    bad(
        "requests-zero",
        {"spec.purposes.reconcile.rateLimit.requests": 0},
        "spec.purposes.reconcile.rateLimit.requests",
        "greater than 0",
    ),
    bad(
        "bool-string",
        {"spec.elevations.refund.justificationRequired": "yes"},
        "spec.elevations.refund.justificationRequired",
        "valid boolean, got 'yes'",
    ),
    bad("owner-number", {"spec.owner": 42}, "spec.owner", "valid string, got 42"),
    bad("owner-empty", {"spec.owner": ""}, "spec.owner", "at least 1 character"),
    bad(
        "purposes-a-list",
        {"spec.purposes": ["reconcile"], "spec.defaultPurpose": DELETE},
        "spec.purposes",
        "valid dictionary",
    ),
    bad(
        "rule-a-string",
        {"spec.purposes.reconcile.allow": ["ledger.finance.svc"]},
        "spec.purposes.reconcile.allow[0]",
        "valid dictionary",
    ),
    # enums and ranges
    bad(
        "approval-unknown",
        {"spec.elevations.refund.approval": "manual"},
        "spec.elevations.refund.approval",
        "Input should be 'auto' or 'operator', got 'manual'",
    ),
    bad(
        "mode-unknown",
        {"spec.behavior.mode": "strict"},
        "spec.behavior.mode",
        "'enforce' or 'monitor'",
    ),
    bad(
        "revoke-at-risk-above-one",
        {"spec.behavior.revokeAtRisk": 1.5},
        "spec.behavior.revokeAtRisk",
        "less than or equal to 1, got 1.5",
    ),
    bad(
        "revoke-at-risk-zero",
        {"spec.behavior.revokeAtRisk": 0},
        "spec.behavior.revokeAtRisk",
        "greater than 0, got 0",
    ),
    bad(
        "revoke-at-risk-string",
        {"spec.behavior.revokeAtRisk": "high"},
        "spec.behavior.revokeAtRisk",
        "valid number, got 'high'",
    ),
    # the YAML itself
    pytest.param(
        {"a.yaml": VALID.replace("  owner: finance-platform\n", "  owner: a\n  owner: b\n")},
        [("a.yaml", 1, "", "duplicate key 'owner'")],
        id="duplicate-yaml-key",
    ),
    pytest.param(
        {
            "a.yaml": dump(base("one"), base("two")).replace(
                "  name: two\n", "  name: two\n  name: 2\n"
            )
        },
        [("a.yaml", 2, "", "duplicate key 'name'")],
        id="duplicate-yaml-key-document-2",
    ),
    pytest.param(
        {"a.yaml": dump(base("one"), base("two")) + "---\nspec: [unclosed\n"},
        [("a.yaml", 3, "", "invalid YAML at line")],
        id="invalid-yaml-document-3",
    ),
    pytest.param(
        {"a.yaml": dump(base("one"), base("two")) + "---\nspec:\n\towner: x\n"},
        [("a.yaml", 3, "", "invalid YAML at line")],
        id="tab-indent-document-3",
    ),
    pytest.param(
        {"a.yaml": "- apiVersion: mandate.dev/v1alpha1\n- kind: AgentProfile\n"},
        [("a.yaml", 1, "", "expected a mapping (an AgentProfile object)")],
        id="document-is-a-list",
    ),
    pytest.param(
        {"a.yaml": VALID + "---\nhello\n"},
        [("a.yaml", 2, "", "expected a mapping")],
        id="document-is-a-string",
    ),
    pytest.param(
        {"a.yaml": VALID.encode().replace(b"finance-platform", b"finance-\xe9quipe")},
        [("a.yaml", None, "", "not UTF-8 text (byte ")],
        id="not-utf8",
    ),
    # across documents and files
    pytest.param(
        {"a.yaml": VALID, "b.yaml": VALID.replace("agents/billing-agent", "other/billing")},
        [
            (
                "b.yaml",
                1,
                "metadata.name",
                "agent 'billing-agent' is already defined in {dir}/a.yaml, document 1",
            )
        ],
        id="duplicate-agent-across-files",
    ),
    pytest.param(
        {"a.yaml": dump(base("one"), base("one", sa="x/one"))},
        [
            (
                "a.yaml",
                2,
                "metadata.name",
                "agent 'one' is already defined in {dir}/a.yaml, document 1",
            )
        ],
        id="duplicate-agent-in-one-file",
    ),
    pytest.param(
        {
            "a.yaml": dump(base("one", sa="agents/shared")),
            "b.yml": dump(base("two", sa="agents/shared")),
        },
        [
            (
                "b.yml",
                1,
                "spec.identities[0]",
                "identity 'agents/shared' already belongs to agent 'one' ({dir}/a.yaml, document 1)",
            )
        ],
        id="identity-claimed-by-two-agents",
    ),
    pytest.param(
        {
            "a.yaml": dump(base("one", sa="agents/shared")),
            "b.yml": dump(base("two", sa="shared")),
        },
        [
            (
                "b.yml",
                1,
                "spec.identities[0]",
                "service account 'shared' may be the same as 'agents/shared' of agent 'one'",
            )
        ],
        id="a-name-alone-clashing-with-a-namespaced-account",
    ),
    # the directory
    pytest.param({}, [("", None, "", "no *.yaml or *.yml files found")], id="empty-directory"),
    pytest.param(
        {"a.yaml": "---\n# nothing here\n---\n", "b.txt": VALID},
        [("", None, "", "no AgentProfile documents found")],
        id="only-empty-documents",
    ),
    pytest.param(None, [("", None, "", "cannot list directory")], id="directory-does-not-exist"),
]


def _write(directory: Path, files: dict[str, str | bytes]) -> None:
    directory.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (directory / name).write_bytes(content)
        else:
            (directory / name).write_text(content, encoding="utf-8")


def _assert_problems(
    directory: Path, exc: ProfileErrors, expected: list[tuple[str, int | None, str, str]]
) -> None:
    got = [(p.file, p.document, p.field) for p in exc.problems]
    want = [
        (str(directory / f) if f else str(directory), doc, field) for f, doc, field, _ in expected
    ]
    assert got == want
    for problem, (*_, fragment) in zip(exc.problems, expected, strict=True):
        assert fragment.replace("{dir}", str(directory)) in problem.message


@pytest.mark.parametrize(("files", "expected"), CASES)
def test_rejected(
    tmp_path: Path,
    files: dict[str, str | bytes] | None,
    expected: list[tuple[str, int | None, str, str]],
) -> None:
    directory = tmp_path / "profiles"
    if files is not None:
        _write(directory, files)
    with pytest.raises(ProfileErrors) as exc:
        load_profiles(directory)
    _assert_problems(directory, exc.value, expected)


def test_base_profile_is_valid(tmp_path: Path) -> None:
    """The cases above each break one thing in a profile that loads."""
    _write(tmp_path / "profiles", {"a.yaml": VALID})
    assert list(load_profiles(tmp_path / "profiles").agents) == ["billing-agent"]


def test_an_elevation_of_exactly_720h_loads(tmp_path: Path) -> None:
    """The limit of `elevation-longer-than-the-crd-allows` is the CRD's own, inclusive."""
    _write(
        tmp_path / "profiles",
        {"a.yaml": dump(edit(base(), {"spec.elevations.refund.maxDuration": "719h60m"}))},
    )
    snap = load_profiles(tmp_path / "profiles")
    assert snap.agents["billing-agent"].elevations["refund"].max_seconds == 720 * 3600


def test_directory_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "agents.yaml"
    path.write_text(VALID)
    with pytest.raises(ProfileErrors) as exc:
        load_profiles(path)
    _assert_problems(path, exc.value, [("", None, "", "cannot list directory")])


def test_every_problem_is_reported(tmp_path: Path) -> None:
    directory = tmp_path / "profiles"
    two_problems = edit(base("one"), {"spec.owner": DELETE, f"{RULE}.hosts": ["a.*.com"]})
    _write(
        directory,
        {
            "a.yaml": dump(two_problems, edit(base("two"), {"kind": "Agent"}), base("three")),
            "b.yaml": "apiVersion: [\n",
            "c.yml": b"\xff\xfe",
            "d.yaml": dump(base("four")),
            "e.yaml": dump(base("four", sa="x/four"), edit(base("five"), {"spec.extra": 1})),
            ".hidden.yaml": "not: [valid",
        },
    )
    with pytest.raises(ProfileErrors) as exc:
        load_profiles(directory)
    _assert_problems(
        directory,
        exc.value,
        [
            ("a.yaml", 1, "spec.owner", "required field is missing"),
            ("a.yaml", 1, f"{RULE}.hosts[0]", "only one leading '*.' label"),
            ("a.yaml", 2, "kind", "expected apiVersion"),
            ("b.yaml", 1, "", "invalid YAML"),
            ("c.yml", None, "", "not UTF-8 text (byte 0)"),
            ("e.yaml", 1, "metadata.name", "agent 'four' is already defined in {dir}/d.yaml"),
            ("e.yaml", 2, "spec.extra", "unknown field 'extra'"),
        ],
    )


def test_a_token_url_with_a_password_is_refused_without_echoing_it(tmp_path: Path) -> None:
    doc = edit(
        base(),
        {f"{CRED}.stripe-oauth.oauth2ClientCredentials.tokenUrl": "https://u:hunter2@idp.x/t"},
    )
    _write(tmp_path / "p", {"a.yaml": dump(doc)})
    with pytest.raises(ProfileErrors) as err:
        load_profiles(tmp_path / "p")
    assert "no user name or password in a token URL" in str(err.value)
    assert "hunter2" not in str(err.value)
