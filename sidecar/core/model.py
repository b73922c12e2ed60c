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

from sidecar.core.hosts import parse_host_pattern
from sidecar.core.paths import validate_path_pattern

__all__ = [
    "API_VERSION",
    "KIND",
    "AgentProfile",
    "Behavior",
    "DenyRule",
    "Elevation",
    "Identity",
    "Metadata",
    "ProfileSpec",
    "Purpose",
    "RateLimit",
    "Rule",
    "json_schema",
    "parse_duration",
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


class DenyRule(Rule):
    """A deny rule: an allow rule's fields, and `foldPaths` (deny rules only: on an allow rule
    folding would widen what it allows)."""

    fold_paths: bool = Field(
        False,
        description="match paths as an upstream that ignores case, Unicode compatibility "
        "forms (NFKC: full-width letters) and trailing dots and spaces reads them "
        "(`/v1/SECRETS.` is denied by `/v1/secrets/**`); for case-insensitive upstreams",
    )

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


class Elevation(_Model):
    description: str = ""
    approval: Literal["auto", "operator"]
    max_duration: Duration
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
        10, ge=1, le=100_000, description="fewer calls than this in the window: score 0"
    )


class Identity(_Model):
    """Exactly one of ``serviceAccount`` (namespace/name) or ``spiffe``."""

    service_account: (
        Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]*/[a-z0-9][a-z0-9.-]*$")]
        | None
    ) = Field(None, description="namespace/name of the pod's service account")
    spiffe: Annotated[str, StringConstraints(pattern=r"^spiffe://[^/\s]+(/\S*)?$")] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Identity:
        if (self.service_account is None) == (self.spiffe is None):
            raise ValueError("give exactly one of serviceAccount or spiffe")
        return self


class ProfileSpec(_Model):
    owner: Text
    identities: list[Identity] = Field(default_factory=list)
    # purposes before defaultPurpose: its validator checks against them, and a field
    # validator (unlike a model validator) reports the problem at `spec.defaultPurpose`.
    purposes: dict[Name, Purpose] = Field(min_length=1)
    default_purpose: Name | None = None
    elevations: dict[Name, Elevation] = Field(default_factory=dict)
    behavior: Behavior | None = None

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
