"""The AgentProfile format as a validated model (pure).

This is the single definition of the profile format (`shared/spec/profiles.example.yaml`):
the loader validates documents against it and the shipped JSON Schema
(`sidecar/schema/agentprofile.schema.json`) is generated from it. Unknown fields are
errors everywhere. The model only validates; `snapshot.py` compiles it for matching.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from sidecar.core.arguments import validate_schema
from sidecar.core.hosts import HostPattern, overlaps, parse_host_pattern
from sidecar.core.paths import validate_path_pattern
from sidecar.headers import CREDENTIAL_HEADERS, TXN_TOKEN_HEADER

__all__ = [
    "API_VERSION",
    "DEFAULT_CREDENTIAL_PORT",
    "KIND",
    "AgentProfile",
    "AuditSpec",
    "Behavior",
    "ClientCredentials",
    "Credential",
    "DenyRule",
    "Elevation",
    "Identity",
    "Metadata",
    "ProfileSpec",
    "Purpose",
    "RateLimit",
    "Rule",
    "SecretValue",
    "TokenExchange",
    "TransactionToken",
    "credential_host",
    "json_schema",
    "parse_duration",
    "token_url_problem",
]

API_VERSION = "mandate.dev/v1alpha1"
KIND = "AgentProfile"

_DURATION = re.compile(r"^(?:([0-9]+)h)?(?:([0-9]+)m(?!s))?(?:([0-9]+)s)?(?:([0-9]+)ms)?$")
_METHOD = re.compile(r"^[A-Za-z]+$")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``10m``, ``1h30m``, ``250ms``; ValueError if not."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not text or m is None or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration like '30s', '10m', '1h30m' or '250ms'")
    h, mi, s, ms = (int(g) if g else 0 for g in m.groups())
    seconds = h * 3600 + mi * 60 + s + ms / 1000
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    return seconds


def _duration(text: str) -> str:
    parse_duration(text)
    return text


MAX_GRANT_SECONDS = 720 * 3600  # the longest elevation: the AgentElevation CRD's 720h


def _host(text: str) -> str:
    parse_host_pattern(text)
    return text


def _method(text: str) -> str:
    if not _METHOD.match(text):
        raise ValueError(f"{text!r} is not an HTTP method name such as GET or POST")
    return text


def _mcp_method(text: str) -> str:
    if text == "tools/call":
        raise ValueError(
            "list tools in mcpTools; 'tools/call' in mcpMethods would allow every tool"
        )
    return text


Name = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"),
    Field(description="Lower-case letters, digits, '-', '_', '.'; 1-63 characters"),
]
Duration = Annotated[
    str,
    AfterValidator(_duration),
    Field(
        pattern=r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$", description="e.g. 30s, 10m, 1h30m"
    ),
]
HostPatternText = Annotated[
    str,
    AfterValidator(_host),
    Field(description="exact host or one leading '*.' label, optional ':port'"),
]
PathPatternText = Annotated[
    str,
    AfterValidator(validate_path_pattern),
    Field(description="'/'-rooted; '*' = one segment, '**' = any number of segments"),
]
Method = Annotated[str, AfterValidator(_method), Field(description="HTTP method, any case")]
McpMethod = Annotated[str, StringConstraints(min_length=1), AfterValidator(_mcp_method)]
Text = Annotated[str, StringConstraints(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        strict=True,
        alias_generator=to_camel,
        populate_by_name=False,
    )


class Rule(_Model):
    """One allow or deny rule. An absent field matches anything; a listed one must match."""

    hosts: list[HostPatternText] | None = Field(None, min_length=1)
    methods: list[Method] | None = Field(None, min_length=1)
    paths: list[PathPatternText] | None = Field(None, min_length=1)
    mcp_tools: list[Text] | None = Field(
        None, min_length=1, description="MCP tools a JSON-RPC tools/call may name"
    )
    mcp_methods: list[McpMethod] | None = Field(
        None, min_length=1, description="extra MCP methods allowed (e.g. resources/read)"
    )
    mcp_arguments: dict[Text, dict[str, Any]] | None = Field(
        None,
        description="per tool in mcpTools: a JSON Schema (type, enum, const, pattern, "
        "minimum, maximum, exclusiveMinimum, exclusiveMaximum, minLength, maxLength, items, "
        "minItems, maxItems, properties, required, additionalProperties) its tools/call "
        "arguments must satisfy",
    )

    query: dict[str, Any] | None = Field(
        None,
        description="a JSON Schema (the mcpArguments subset) the query parameters must "
        "satisfy, as an object: a name given once is a string, again a list",
    )
    json_body: dict[str, Any] | None = Field(
        None, description="a JSON Schema (the mcpArguments subset) the JSON body must satisfy"
    )

    @field_validator("query", "json_body")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is not None:
            validate_schema(value, to_camel(str(info.field_name)))
        return value

    @field_validator("mcp_arguments")
    @classmethod
    def _arguments(
        cls, value: dict[str, dict[str, Any]] | None, info: ValidationInfo
    ) -> dict[str, dict[str, Any]] | None:
        if value is None:
            return None
        tools = info.data.get("mcp_tools") or []
        for tool, schema in value.items():
            if tool not in tools:
                raise ValueError(f"{tool!r}: constrain only a tool this rule lists in mcpTools")
            validate_schema(schema, tool)
        return value


class DenyRule(Rule):
    """A deny rule: an allow rule's fields, and `foldPaths` (deny rules only: on an allow rule
    folding would widen what it allows)."""

    fold_paths: bool = Field(
        False,
        description="match paths as an upstream that ignores case, Unicode compatibility "
        "forms (NFKC: full-width letters) and trailing dots and spaces reads them "
        "(`/v1/SECRETS.` is denied by `/v1/secrets/**`); for case-insensitive upstreams",
    )

    @model_validator(mode="after")
    def _no_arguments(self) -> DenyRule:
        for name, value in (
            ("mcpArguments", self.mcp_arguments),
            ("query", self.query),
            ("jsonBody", self.json_body),
        ):
            if value is not None:
                raise ValueError(
                    f"{name}: only an allow rule may constrain arguments (it narrows what it "
                    "allows); deny the call, or allow it with the constraint"
                )
        return self

    @field_validator("fold_paths")
    @classmethod
    def _fold_needs_paths(cls, value: bool, info: ValidationInfo) -> bool:
        # (paths is missing from info.data when it was invalid: that error is reported)
        if value and "paths" in info.data and info.data["paths"] is None:
            raise ValueError("foldPaths: true needs paths to fold (this rule lists none)")
        return value


class RateLimit(_Model):
    requests: int = Field(gt=0)
    per: Duration


class Purpose(_Model):
    description: str = ""
    allow: list[Rule] = Field(default_factory=list)
    deny: list[DenyRule] = Field(default_factory=list)
    rate_limit: RateLimit | None = None
    require_task: bool = Field(
        False,
        description="every call under this purpose must name (x-mandate-task) an active task "
        "the agent reported with a declaration (ReportTask `allow`); any other call is "
        "denied outside_task, so a lost or expired declaration never falls back to the "
        "purpose's whole rights",
    )


def _max_grant(text: str) -> str:
    if parse_duration(text) > MAX_GRANT_SECONDS:
        raise ValueError(
            f"maxDuration {text!r}: an elevation lasts at most 720h (30 days; the "
            "AgentElevation CRD's limit on spec.duration)"
        )
    return text


class Elevation(_Model):
    description: str = ""
    approval: Literal["auto", "operator"]
    max_duration: Annotated[Duration, AfterValidator(_max_grant)]
    justification_required: bool = False
    allow: list[Rule] = Field(min_length=1)


class Behavior(_Model):
    """Continuous behaviour analysis: a risk score in [0, 1] from the agent's live conduct.
    `monitor` only reports it; `enforce` denies calls while the score is at or above
    ``denyAtRisk`` and revokes the agent at ``revokeAtRisk``."""

    mode: Literal["enforce", "monitor"] = "monitor"
    revoke_at_risk: float | None = Field(
        None, gt=0, le=1, description="enforce: revoke the agent when the score reaches this"
    )
    deny_at_risk: float | None = Field(
        None,
        gt=0,
        le=1,
        description="enforce: deny calls while the score is at or above this "
        "(default 0.8, or revokeAtRisk if lower)",
    )
    learning_period: Duration = Field(
        "10m", description="a new agent's learning period: its baseline, never denied"
    )
    window: Duration = Field("1m", description="sliding window the features are computed on")
    min_calls: int = Field(
        10,
        ge=1,
        le=100_000,
        description="fewer calls than this in the window: the rate and share features "
        "score 0 (new tools, values and transitions count from the first call)",
    )
    sensitive_arguments: list[Text] = Field(
        default_factory=list,
        max_length=64,
        description="argument names (top-level, of any MCP tool or JSON body) whose values "
        "are fingerprinted (a keyed hash, never the value) so that a value never seen while "
        "learning raises the score: who receives data or money, e.g. recipients, to, iban, "
        "account, url, email",
    )

    @field_validator("sensitive_arguments")
    @classmethod
    def _distinct_names(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        for name in value:
            if name in seen:
                raise ValueError(f"{name!r} is listed twice")
            seen.add(name)
        return value


class AuditSpec(_Model):
    """What the audit trail keeps of each call's arguments (MCP tool arguments, the
    top-level fields of a JSON body, query parameters). Arguments can hold personal data,
    so values are kept in clear only for the names listed in ``values``."""

    arguments: Literal["hashes", "types", "none"] = Field(
        "hashes",
        description="hashes (default): each argument's JSON type and a keyed hash of its "
        "value (HMAC-SHA256 with a key kept in the audit directory, never in a record: "
        "equal values can be counted within a trail, a value cannot be looked up); "
        "types: the type only; none: nothing (the body is not read for the trail)",
    )
    values: list[Text] = Field(
        default_factory=list,
        description="top-level argument names (of any tool, JSON body or query) whose "
        "values are recorded in clear, e.g. for `mandate profile suggest` to propose "
        "enums and ranges; a value over 1 KiB of JSON is recorded as the others are",
    )

    @field_validator("values")
    @classmethod
    def _distinct(cls, value: list[str], info: ValidationInfo) -> list[str]:
        seen: set[str] = set()
        for name in value:
            if name in seen:
                raise ValueError(f"{name!r} is listed twice")
            seen.add(name)
        if value and info.data.get("arguments") == "none":
            raise ValueError(
                "arguments: none records no argument; to record only these values, use "
                "arguments: types (the others then keep only their type)"
            )
        return value


class Identity(_Model):
    """Exactly one of ``serviceAccount`` (namespace/name, or a name: in the namespace of the
    pod the sidecar serves) or ``spiffe``."""

    service_account: (
        Annotated[str, StringConstraints(pattern=r"^([a-z0-9][a-z0-9.-]*/)?[a-z0-9][a-z0-9.-]*$")]
        | None
    ) = Field(
        None,
        description="namespace/name of the pod's service account, or its name alone: that "
        "service account in the sidecar's own namespace (profiles that a namespace overlay "
        "moves keep working)",
    )
    spiffe: Annotated[str, StringConstraints(pattern=r"^spiffe://[^/\s]+(/\S*)?$")] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Identity:
        if (self.service_account is None) == (self.spiffe is None):
            raise ValueError("give exactly one of serviceAccount or spiffe")
        return self


def _file(text: str) -> str:
    if not text.startswith("/") or "\x00" in text or "/../" in f"{text}/":
        raise ValueError(f"{text!r}: expected an absolute path (a file mounted into mandate)")
    return text


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def token_url_problem(text: str) -> str | None:
    """Why ``text`` is no token endpoint URL, read as the token client reads it (urlsplit),
    or None. The one check of both the profile validator and the client: https:// (plain
    http only on the loopback address, for local tests), no user name or password, no
    fragment. The problem never quotes the URL (its userinfo could be a secret)."""
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        return "expected an https:// URL"
    try:
        parts = urlsplit(text)
        hostname = parts.hostname
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return "expected an https:// URL"
    if not hostname:
        return "expected an https:// URL"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "no user name or password in a token URL (userinfo; give files)"
    if parts.scheme != "https" and not (parts.scheme == "http" and hostname in _LOOPBACK):
        return (
            "a token endpoint must be https:// (plain http only on the loopback address, for "
            "local tests): a client secret or subject token must not cross the network in clear"
        )
    if parts.fragment:
        return "no fragment (#...) in a token URL"
    return None


def _token_url(text: str) -> str:
    problem = token_url_problem(text)
    if problem is not None:
        shown = "the URL" if "@" in text else repr(text)  # userinfo could be a secret
        raise ValueError(f"{shown}: {problem}")
    return text


def _credential_header(text: str) -> str:
    if text not in CREDENTIAL_HEADERS or text == TXN_TOKEN_HEADER:
        known = ", ".join(h for h in CREDENTIAL_HEADERS if h != TXN_TOKEN_HEADER)
        raise ValueError(
            f"header {text!r}: a credential goes in one of {known} (lower case; the Envoy "
            "configs pass exactly these from mandate to the upstream)"
        )
    return text


def _format(text: str) -> str:
    if text.count("{}") != 1 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(
            f"format {text!r}: expected one '{{}}' where the value goes, e.g. 'Bearer {{}}'"
        )
    return text


FilePath = Annotated[
    str, AfterValidator(_file), Field(description="absolute path of a file mounted into mandate")
]
TokenUrl = Annotated[
    str, AfterValidator(_token_url), Field(description="the token endpoint, https://")
]
CredentialHeader = Annotated[
    str,
    AfterValidator(_credential_header),
    Field(description="authorization, x-api-key, api-key or x-auth-token"),
]
HeaderFormat = Annotated[
    str, AfterValidator(_format), Field(description="the header value, '{}' = the credential")
]


class SecretValue(_Model):
    """A static secret read from a file (a Kubernetes Secret mounted only into mandate's
    container; re-read when the kubelet updates it). Sent as ``format`` in ``header``, or,
    with ``basicUsername``, as HTTP Basic (`Authorization: Basic base64(user:secret)`)."""

    file: FilePath
    header: CredentialHeader = "authorization"
    format: HeaderFormat | None = Field(None, description="default 'Bearer {}'; '{}' = raw")
    basic_username: Text | None = Field(
        None, description="send as HTTP Basic with this user name and the file as password"
    )

    @model_validator(mode="after")
    def _basic(self) -> SecretValue:
        if self.basic_username is not None:
            if self.format is not None:
                raise ValueError("give format or basicUsername, not both")
            if self.header != "authorization":
                raise ValueError("basicUsername: HTTP Basic goes in the authorization header")
            if ":" in self.basic_username:
                raise ValueError("basicUsername must not contain ':' (RFC 7617)")
        return self


class ClientCredentials(_Model):
    """OAuth 2.0 client credentials (RFC 6749 4.4): mandate asks ``tokenUrl`` for an access
    token and sends it; cached until it expires (minus a skew), refreshed before."""

    token_url: TokenUrl
    client_id_file: FilePath
    client_secret_file: FilePath
    client_auth: Literal["basic", "post"] = Field(
        "basic", description="client_secret_basic (default) or client_secret_post"
    )
    scopes: list[Text] = Field(default_factory=list)
    audience: Text | None = None
    resource: Text | None = Field(None, description="RFC 8707 resource indicator")
    ca_file: FilePath | None = Field(
        None,
        description="CA bundle of the token endpoint's certificate (default: the system's)",
    )
    header: CredentialHeader = "authorization"
    format: HeaderFormat = "Bearer {}"


class TokenExchange(_Model):
    """OAuth 2.0 token exchange (RFC 8693): the pod's projected, audience-bound
    service-account token (or a SPIFFE JWT-SVID file) is exchanged at ``tokenUrl`` for a
    token for this upstream; cached per agent, audience and scope."""

    token_url: TokenUrl
    subject_token_file: FilePath
    subject_token_type: Text = "urn:ietf:params:oauth:token-type:jwt"
    actor_token_file: FilePath | None = None
    actor_token_type: Text | None = None
    client_id_file: FilePath | None = None
    client_secret_file: FilePath | None = None
    audience: Text | None = None
    resource: Text | None = None
    scopes: list[Text] = Field(default_factory=list)
    requested_token_type: Text = "urn:ietf:params:oauth:token-type:access_token"
    ca_file: FilePath | None = Field(
        None,
        description="CA bundle of the token endpoint's certificate (default: the system's)",
    )
    header: CredentialHeader = "authorization"
    format: HeaderFormat = "Bearer {}"

    @model_validator(mode="after")
    def _pairs(self) -> TokenExchange:
        if (self.actor_token_file is None) != (self.actor_token_type is None):
            raise ValueError("actorTokenFile and actorTokenType go together")
        if (self.client_id_file is None) != (self.client_secret_file is None):
            raise ValueError("clientIdFile and clientSecretFile go together")
        return self


def _txn_ttl(text: str) -> str:
    if parse_duration(text) > 60:
        raise ValueError(f"ttl {text!r}: a transaction token lives at most 60s")
    return text


class TransactionToken(_Model):
    """A Transaction Token minted by mandate for each allowed call (`Txn-Token` header,
    `typ: txntoken+jwt`): `scope` = the purpose, `tctx` = task, decision, method, path or
    tool and the grant, `aud` = the one upstream, `exp` <= 60 s."""

    audience: Text | None = Field(None, description="default: the call's host")
    ttl: Annotated[Duration, AfterValidator(_txn_ttl)] = "30s"


class Credential(_Model):
    """One credential the agent does not hold: mandate adds it to allowed calls to ``hosts``
    only. Exactly one of ``secret``, ``oauth2ClientCredentials``, ``tokenExchange``,
    ``transactionToken``."""

    hosts: list[HostPatternText] = Field(
        min_length=1,
        description="where it may be sent; a host without a port means :443 (over TLS only)",
    )
    connect: Literal["refuse", "allow"] = Field(
        "refuse",
        description="a CONNECT tunnel to these hosts is opaque, so mandate could not add the "
        "credential: refuse it (default), so that the agent calls http://host:443 instead",
    )
    secret: SecretValue | None = None
    oauth2_client_credentials: ClientCredentials | None = None
    token_exchange: TokenExchange | None = None
    transaction_token: TransactionToken | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Credential:
        kinds = [k for k in _KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of secret, oauth2ClientCredentials, tokenExchange, "
                "transactionToken" + (f" (got {len(kinds)})" if kinds else "")
            )
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def header(self) -> str:
        """The header this credential is sent in."""
        if self.transaction_token is not None:
            return TXN_TOKEN_HEADER
        spec = self.secret or self.oauth2_client_credentials or self.token_exchange
        assert spec is not None
        return spec.header


_KINDS = ("secret", "oauth2_client_credentials", "token_exchange", "transaction_token")


DEFAULT_CREDENTIAL_PORT = 443


def credential_host(text: str) -> HostPattern:
    """A credential's host pattern: without a port it means port 443, where the sidecar
    originates TLS, so that a credential never leaves in clear unless its profile names a
    plain-text port (e.g. an in-cluster service's :80)."""
    p = parse_host_pattern(text)
    return p if p.port is not None else HostPattern(p.host, p.wildcard, DEFAULT_CREDENTIAL_PORT)


def _allowed_hosts(
    purposes: dict[str, Purpose] | None, elevations: dict[str, Elevation] | None
) -> list[HostPattern | None]:
    """Every host pattern an allow rule names (None: a rule without hosts allows any)."""
    out: list[HostPattern | None] = []
    rules = [r for p in (purposes or {}).values() for r in p.allow]
    rules += [r for e in (elevations or {}).values() for r in e.allow]
    for rule in rules:
        if rule.hosts is None:
            out.append(None)
        else:
            out.extend(parse_host_pattern(h) for h in rule.hosts)
    return out


class ProfileSpec(_Model):
    owner: Text
    identities: list[Identity] = Field(default_factory=list)
    # purposes before defaultPurpose: its validator checks against them, and a field
    # validator (unlike a model validator) reports the problem at `spec.defaultPurpose`.
    purposes: dict[Name, Purpose] = Field(min_length=1)
    default_purpose: Name | None = None
    elevations: dict[Name, Elevation] = Field(default_factory=dict)
    behavior: Behavior | None = None
    audit: AuditSpec | None = Field(
        None, description="what the audit trail keeps of call arguments (default: hashes)"
    )
    # after purposes and elevations: its validator checks its hosts against their rules
    credentials: dict[Name, Credential] = Field(default_factory=dict)

    @field_validator("credentials")
    @classmethod
    def _credential_hosts_are_allowed(
        cls, value: dict[str, Credential], info: ValidationInfo
    ) -> dict[str, Credential]:
        if "purposes" not in info.data or "elevations" not in info.data:
            return value  # they are invalid: that is what gets reported
        allowed = _allowed_hosts(info.data["purposes"], info.data["elevations"])
        problems = []
        for name, cred in value.items():
            for i, text in enumerate(cred.hosts):
                host = credential_host(text)
                if not any(a is None or overlaps(a, host) for a in allowed):
                    problems.append(
                        f"credentials.{name}.hosts[{i}] {text!r}: no purpose or elevation of "
                        "this agent allows this host and port (no port: 443), so the credential "
                        "could never be sent"
                    )
        names = sorted(value)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                ca, cb = value[a], value[b]
                if ca.header == cb.header and any(
                    overlaps(credential_host(x), credential_host(y))
                    for x in ca.hosts
                    for y in cb.hosts
                ):
                    problems.append(
                        f"credentials {a!r} and {b!r} both set {ca.header!r} for a host they "
                        "share: a call could carry only one of them"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("default_purpose")
    @classmethod
    def _default_purpose_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        purposes = info.data.get("purposes")
        if value is not None and purposes is not None and value not in purposes:
            known = ", ".join(sorted(purposes))
            raise ValueError(f"defaultPurpose {value!r} is not one of the purposes ({known})")
        return value


class Metadata(BaseModel):
    # Kubernetes metadata: labels, annotations and the like are allowed and ignored.
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    name: Name  # the agent's id
    namespace: str | None = None


class AgentProfile(_Model):
    api_version: Literal["mandate.dev/v1alpha1"]
    kind: Literal["AgentProfile"]
    metadata: Metadata
    spec: ProfileSpec


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one AgentProfile document, as shipped for editors and the CRD."""
    schema = AgentProfile.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://mandate.dev/schemas/agentprofile.v1alpha1.json"
    schema["title"] = "AgentProfile"
    return schema
