"""The decision: one pure function from (snapshot, request view, now) to a Decision.

`decide` is a pipeline of phases, each of which may end the decision with a deny:
  1. attribute  - which agent is calling, from sources the agent cannot forge
  2. revocation - the shared revocation table: the agent (or `*`) in its namespace
  3. purpose    - declared `x-mandate-purpose`, else the purpose the declared task was
                  reported for (`ReportTask`), else the profile's defaultPurpose
  4. request    - canonical host, port and path; a method not in upper case, or a
                  method/URL override header; malformed → deny
  5. rules      - the purpose's deny rules win, then its allow rules
  6. elevation  - then the rules of the agent's active elevation grants
  7. behaviour  - an allowed call is still denied while the agent's risk score is at or
                  above the profile's threshold (`enforce` mode), or over the purpose's rate
Nothing matched → deny "outside purpose P" (default deny).

Same inputs, `now` and rate-limiter state give the same Decision: the decision id comes in
with the request view; the limiter is the one piece of state, and only allowed calls touch
it. This module must not import any transport, Kubernetes or telemetry library, and must
not raise for any request: the adapter still wraps it and fails closed if it does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import unquote_plus

from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable, Grant
from sidecar.core.hosts import parse_authority
from sidecar.core.mcp import McpBody, parse_mcp_body
from sidecar.core.paths import canonical_path, display_path
from sidecar.core.ratelimit import RateLimiter
from sidecar.core.revocation import EMPTY_TABLE, RevocationTable
from sidecar.core.rules import CONNECT
from sidecar.core.snapshot import CompiledAgent, Snapshot
from sidecar.core.timefmt import utc_seconds
from sidecar.headers import PURPOSE_HEADER, TASK_HEADER

__all__ = [
    "OVERRIDE_HEADERS",
    "PURPOSE_HEADER",
    "TASK_HEADER",
    "Code",
    "Decision",
    "RequestView",
    "decide",
]

_TASK = re.compile(r"^[\x21-\x7e]{1,128}$")
# Headers with which frameworks let a request say "treat me as another method or path"
# (Express's method-override, Symfony, Rails' Rack::MethodOverride, IIS URL Rewrite ...):
# a GET mandate allowed could become a DELETE, or another path, behind the decision. A call
# carrying one is refused (bad_request) rather than stripped: mandate decides on the method
# and path the upstream acts on, and the agent learns why instead of getting another call.
OVERRIDE_HEADERS = (
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
)
_EMPTY: Mapping[str, str] = MappingProxyType({})


def _empty() -> Mapping[str, str]:
    return _EMPTY


class Code:
    """Stable decision codes: the `error` field of a deny body and a metric label."""

    ALLOWED = "allowed"
    UNATTRIBUTED = "unattributed"
    IDENTITY_CONFLICT = "identity_conflict"
    UNKNOWN_AGENT = "unknown_agent"
    NO_PURPOSE = "no_purpose"
    UNKNOWN_PURPOSE = "unknown_purpose"
    BAD_TASK = "bad_task"
    BAD_REQUEST = "bad_request"
    DENIED_BY_RULE = "denied_by_rule"
    OUTSIDE_PURPOSE = "outside_purpose"
    INTERNAL_ERROR = "internal_error"
    REVOKED = "revoked"
    REVOCATIONS_UNKNOWN = "revocations_unknown"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    RATE = "rate"
    RISK = "risk"


@dataclass(frozen=True, slots=True)
class RequestView:
    """What the decision may know of one call. Headers have lower-case names.

    ``configured_agent`` / ``configured_service_account`` come from the sidecar's own
    configuration (the pod it serves), ``context_extensions`` from Envoy's route
    configuration and ``source_principal`` from the peer certificate Envoy verified: the
    agent can forge none of them through Envoy. Headers and body are the agent's.
    """

    decision_id: str
    method: str
    authority: str
    path: str
    scheme: str = "http"
    headers: Mapping[str, str] = field(default_factory=_empty)
    body: bytes | None = None
    body_truncated: bool = False
    context_extensions: Mapping[str, str] = field(default_factory=_empty)
    source_principal: str = ""
    configured_agent: str | None = None
    configured_service_account: str | None = None
    trace_id: str = ""
    namespace: str = (
        ""  # the pod's namespace (sidecar configuration): revocations are per namespace
    )


@dataclass(frozen=True, slots=True)
class Decision:
    decision_id: str
    allowed: bool
    code: str
    reason: str
    agent: str = ""
    owner: str = ""
    purpose: str = ""
    task: str = ""
    rule: str = ""
    identity_source: str = ""
    method: str = ""
    host: str = ""
    port: int = 0
    path: str = ""
    mcp_tools: tuple[str, ...] = ()
    trace_id: str = ""
    grant: Grant | None = None  # the elevation grant that allowed the call
    risk: float = -1.0  # the agent's behaviour risk score when decided; -1: not scored


class _Body:
    """Parses the MCP body on first use only; most calls never need it."""

    __slots__ = ("_parsed", "_view")

    def __init__(self, view: RequestView) -> None:
        self._view = view
        self._parsed: McpBody | None = None

    def __call__(self) -> McpBody:
        if self._parsed is None:
            self._parsed = parse_mcp_body(self._view.body, self._view.body_truncated)
        return self._parsed

    def tools(self) -> tuple[str, ...]:
        if self._parsed is None:
            return ()
        return tuple(m.tool for m in self._parsed.messages if m.tool is not None)


def _attribute(snapshot: Snapshot, view: RequestView) -> tuple[str | None, str, str]:
    """(agent, identity source, "") or (None, code, reason). Every identity claim present
    must name the same agent; a header never counts as one."""
    claims: list[tuple[str, str | None, str]] = []  # (source, agent or None, what was claimed)
    ext = view.context_extensions.get("agent")
    if ext:
        claims.append(("envoy-route", ext, ext))
    if view.configured_agent:
        claims.append(("sidecar-config", view.configured_agent, view.configured_agent))
    if view.configured_service_account:
        sa = view.configured_service_account
        claims.append(("service-account", snapshot.by_service_account.get(sa), sa))
    if view.source_principal:
        p = view.source_principal
        claims.append(("spiffe", snapshot.by_spiffe.get(p), p))
    if not claims:
        why = "no identity: the sidecar has no configured agent and Envoy sent none"
        return None, Code.UNATTRIBUTED, why
    agents = {agent for _, agent, _ in claims}
    if len(agents) == 1 and None not in agents:
        return claims[0][1], "+".join(src for src, _, _ in claims), ""
    detail = ", ".join(
        f"{src} {what[:128]!r} -> {agent or 'no profile'}" for src, agent, what in claims
    )
    if agents == {None}:
        return None, Code.UNATTRIBUTED, f"identity matches no profile: {detail}"
    return None, Code.IDENTITY_CONFLICT, f"identity sources disagree: {detail}"


def _request_shape(view: RequestView) -> str:
    """Why the call's method or headers make it one mandate must not decide, or ''.

    Methods are case-sensitive (RFC 9110 9.1): `get` is not GET, and an upstream may take
    it for either. Rules match methods case-insensitively, so mandate could not tell them
    apart: a method not in upper case (Envoy passes HTTP/2's `:method` as sent) is refused."""
    if not view.method or view.method != view.method.upper():
        return (
            f"method {view.method[:32]!r} is not in upper case: methods are case-sensitive "
            "(RFC 9110), so mandate refuses one it could confuse with another"
        )
    for name in OVERRIDE_HEADERS:
        if name in view.headers:
            return (
                f"header {name!r}: a method or URL override could make the upstream act on "
                "another method or path than the one decided; send the real one"
            )
    if _has_method_parameter(view):
        return (
            "a `_method` parameter (query or form body): a method override could make the "
            "upstream act on another method than the one decided; send the real one"
        )
    return ""


_FORM = "application/x-www-form-urlencoded"


def _has_method_parameter(view: RequestView) -> bool:
    """A `_method` parameter in the query, or in a form body mandate sees: Laravel and
    Symfony (query or form) and Rails' Rack::MethodOverride (form) read the method from it."""
    _, _, query = view.path.partition("?")
    if "method" in query.lower() and _names_method(query):
        return True
    body = view.body
    if body and view.headers.get("content-type", "").lower().startswith(_FORM):
        return b"method" in body.lower() and _names_method(body.decode("latin-1"))
    return False


def _names_method(form: str) -> bool:
    for pair in form.split("&"):
        name = unquote_plus(pair.partition("=")[0]).strip().lower()
        if name == "_method":
            return True
    return False


def decide(
    snapshot: Snapshot,
    view: RequestView,
    now: float,
    revocations: RevocationTable = EMPTY_TABLE,
    agent_state: AgentStateTable = EMPTY_AGENT_STATE,
    limiter: RateLimiter | None = None,
) -> Decision:
    """Decide one call. ``now`` (seconds since the epoch) is for expiry-based phases;
    ``revocations`` and ``agent_state`` are the shared tables' generations read for this Check;
    ``limiter`` counts allowed calls against the purposes' rate limits (None: not enforced,
    e.g. `explain`)."""
    did, trace = view.decision_id, view.trace_id
    method = view.method.upper()

    # 1. attribute
    agent_name, source, why = _attribute(snapshot, view)
    if agent_name is None:
        return Decision(did, False, source, why, method=method, trace_id=trace)
    agent: CompiledAgent | None = snapshot.agents.get(agent_name)
    if agent is None:
        return Decision(
            did, False, Code.UNKNOWN_AGENT, f"no profile for agent {agent_name!r}",
            agent=agent_name, identity_source=source, method=method, trace_id=trace,
        )  # fmt: skip

    ns = view.namespace
    risk_state = agent_state.risk(ns, agent.name)
    risk = risk_state.score if risk_state is not None else -1.0

    def done(
        allowed: bool,
        code: str,
        reason: str,
        *,
        purpose: str = "",
        task: str = "",
        rule: str = "",
        host: str = "",
        port: int = 0,
        path: str = "",
        tools: tuple[str, ...] = (),
        grant: Grant | None = None,
    ) -> Decision:
        return Decision(
            did, allowed, code, reason, agent.name, agent.owner, purpose, task, rule,
            source, method, host, port, path, tools, trace, grant, risk,
        )  # fmt: skip

    # 2. revocation: before anything the agent declares. An incomplete table (first sync not
    # done, or an entry could not be stored) might be missing this agent's revocation.
    if not revocations.complete:
        why = "revocation state not known yet (starting, or the table is full): failing closed"
        return done(False, Code.REVOCATIONS_UNKNOWN, why)
    revoked = revocations.find(ns, agent.name, now)
    if revoked is not None:
        return done(False, Code.REVOKED, f"revoked: {revoked.reason}", rule=revoked.key)

    # 3. purpose and task
    declared = view.headers.get(PURPOSE_HEADER, "").strip()
    task = view.headers.get(TASK_HEADER, "").strip()
    if task and not _TASK.match(task):
        return done(False, Code.BAD_TASK, "x-mandate-task must be 1-128 visible ASCII characters")
    bound = agent_state.task(ns, agent.name, task, now) if task else None
    if bound is not None and declared and declared != bound.purpose:
        why = (
            f"task {task!r} was reported for purpose {bound.purpose!r}, "
            f"the call declares {declared[:64]!r}"
        )
        return done(False, Code.BAD_TASK, why, task=task)
    purpose_name = declared or (bound.purpose if bound is not None else agent.default_purpose)
    if not purpose_name:
        why = "no x-mandate-purpose declared and the profile has no defaultPurpose"
        return done(False, Code.NO_PURPOSE, why, task=task)
    purpose = agent.purposes.get(purpose_name)
    if purpose is None:
        why = f"unknown purpose {purpose_name[:64]!r} for agent {agent.name!r}"
        return done(False, Code.UNKNOWN_PURPOSE, why, task=task)

    # 4. the request itself
    # A CONNECT target must name its port (RFC 9110 9.3.6): no scheme default applies.
    hp = parse_authority(view.authority, "" if method == CONNECT else view.scheme)
    path = "" if method == CONNECT else canonical_path(view.path)
    if hp is None or path is None:
        why = f"malformed or ambiguous {'authority' if hp is None else 'path'}"
        return done(False, Code.BAD_REQUEST, why, purpose=purpose.name, task=task)
    host, port = hp
    shown = "" if method == CONNECT else display_path(path)
    why = _request_shape(view)
    if why:
        denied_shape = done(
            False, Code.BAD_REQUEST, why, purpose=purpose.name, task=task, host=host,
            port=port, path=shown,
        )  # fmt: skip
        return replace(denied_shape, method=view.method[:32])  # as sent, not upper-cased
    body = _Body(view)

    # 5. rules: deny wins, then allow
    denied = purpose.deny.lookup(host, port, method, path, body, deny=True)
    if denied.rule is not None:
        rule = denied.rule.rule_id
        return done(
            False, Code.DENIED_BY_RULE, f"denied by rule {rule} of purpose {purpose.name!r}",
            purpose=purpose.name, task=task, rule=rule, host=host, port=port, path=shown,
            tools=body.tools(),
        )  # fmt: skip
    allowed = purpose.allow.lookup(host, port, method, path, body, deny=False)
    rule = allowed.rule.rule_id if allowed.rule is not None else ""
    why = f"allowed by rule {rule} of purpose {purpose.name!r}"
    grant: Grant | None = None

    # 6. elevation: the rules of each active grant, after the purpose's own rules
    if not rule and agent.elevations:
        for g in agent_state.active_grants(ns, agent.name, now):
            elevation = agent.elevations.get(g.elevation)
            if elevation is None:  # the profile no longer has it: the grant gives nothing
                continue
            m = elevation.allow.lookup(host, port, method, path, body, deny=False)
            if m.rule is not None:
                grant, rule = g, m.rule.rule_id
                why = (
                    f"allowed by rule {rule} of elevation {g.elevation!r} "
                    f"(grant {g.id}, approved by {g.approver}, until {utc_seconds(g.expires_at)})"
                )
                break

    if rule:
        # 7. behaviour, then rate: only a call that would be allowed is counted.
        settings = agent.behavior
        if (
            risk_state is not None
            and settings is not None
            and settings.mode == "enforce"
            and not risk_state.learning
            and risk_state.score >= settings.deny_at
        ):
            why = (
                f"behaviour risk {risk_state.score:.2f} >= {settings.deny_at:.2f}: "
                f"{risk_state.explanation}"
            )
            return done(
                False, Code.RISK, why, purpose=purpose.name, task=task, rule=rule,
                host=host, port=port, path=shown, tools=body.tools(), grant=grant,
            )  # fmt: skip
        limit = purpose.rate_limit
        if (
            limit is not None
            and limiter is not None
            and purpose.rate_per_seconds is not None
            and not limiter.allow(
                (ns, agent.name, purpose.name), limit.requests, purpose.rate_per_seconds
            )
        ):
            why = (
                f"rate: over the rate limit of purpose {purpose.name!r} "
                f"({limit.requests} per {limit.per})"
            )
            return done(
                False, Code.RATE, why, purpose=purpose.name, task=task, rule=rule,
                host=host, port=port, path=shown, tools=body.tools(), grant=grant,
            )  # fmt: skip
        return done(
            True, Code.ALLOWED, why, purpose=purpose.name, task=task, rule=rule, host=host,
            port=port, path=shown, tools=body.tools(), grant=grant,
        )  # fmt: skip

    reason = f"outside purpose {purpose.name!r}"
    if allowed.mcp_refusal:
        reason += f": {allowed.mcp_refusal}"
    return done(
        False, Code.OUTSIDE_PURPOSE, reason, purpose=purpose.name, task=task, host=host,
        port=port, path=shown, tools=body.tools(),
    )  # fmt: skip
