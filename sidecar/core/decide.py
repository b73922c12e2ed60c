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
  7. task       - a call naming a task that declared what it needs (`ReportTask` `allow`)
                  must also be within that declaration: the intersection, never more; a
                  purpose with `requireTask` takes no call without such a task
  8. behaviour  - an allowed call is still denied while the agent's risk score is at or
                  above the profile's threshold (`enforce` mode), or when what is new in
                  the call itself (a tool, a sensitive value, a transition, an
                  exfiltration shape) brings the score to it (`core.callrisk`; with the
                  agents' baselines, ``scoring``, and what it counted of the agent's
                  latest calls, not yet published: `Decision.scored`, kept by the caller)
  9. credentials - an allowed call names the credentials of its host (the pipeline adds
                  them); a CONNECT tunnel to such a host is refused
Nothing matched → deny "outside purpose P" (default deny). Each phase is a function of its
own that returns None (go on) or the Decision that ends the call; `decide` reads them in
order. An allowed call is allowed "subject to rate key K" (`Decision.rate`): the Check
pipeline counts it against the purpose's rate limit and denies it with :func:`over_rate`
when the limit refuses it, so that only calls that would be allowed use the budget.

`decide` is pure: the same inputs and `now` give the same Decision (the decision id comes
in with the request view). This module must not import any transport, Kubernetes or
telemetry library, and must not raise for any request: the pipeline still wraps it and
fails closed if it does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from urllib.parse import unquote_plus

from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable, Grant, RiskState
from sidecar.core.arguments import check, query_arguments
from sidecar.core.behaviour import destination
from sidecar.core.callfacts import NO_FACTS, CallFacts, describe
from sidecar.core.callrisk import (
    CallScoring,
    Recent,
    call_novelty,
    current,
    effective,
    explain,
    held,
    noisy_or,
    project,
    reached,
    remember,
)
from sidecar.core.hosts import parse_authority
from sidecar.core.mcp import JsonRefusal, McpBody, parse_json_body, parse_mcp_body
from sidecar.core.paths import canonical_path, display_path
from sidecar.core.ratelimit import RateCharge
from sidecar.core.recording import CallArguments, call_arguments
from sidecar.core.revocation import EMPTY_TABLE, RevocationTable
from sidecar.core.rules import CONNECT, CompiledRule, RuleIndex
from sidecar.core.snapshot import CompiledAgent, CompiledPurpose, Snapshot
from sidecar.core.timefmt import utc_seconds
from sidecar.headers import PURPOSE_HEADER, TASK_HEADER, TASK_ID, TASK_ID_RULE

__all__ = [
    "OVERRIDE_HEADERS",
    "PURPOSE_HEADER",
    "TASK_HEADER",
    "Code",
    "Decision",
    "RequestView",
    "decide",
    "over_rate",
    "request_bytes",
]

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
    OUTSIDE_TASK = "outside_task"
    INTERNAL_ERROR = "internal_error"
    REVOKED = "revoked"
    REVOCATIONS_UNKNOWN = "revocations_unknown"
    REVOCATIONS_REFUSED = "revocations_refused"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    RATE = "rate"
    RISK = "risk"
    NOVEL_CALL = "novel_call"  # the call's own novelty brings the risk score to denyAtRisk
    CREDENTIAL_TUNNEL = "credential_tunnel"
    CREDENTIAL_UNAVAILABLE = "credential_unavailable"


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
    rate: RateCharge | None = None  # allowed subject to this rate limit (counted by the caller)
    credentials: tuple[str, ...] = ()  # what an allowed call carries (the profile's names)
    txn: str = ""  # the `txn` of the Transaction Token it carries, if any
    # The argument constraints that admitted the call ("<rule id> mcpArguments.<tool>",
    # "... query", "... jsonBody"; a task's declaration after "; "), or, for a deny, the
    # argument and the constraint it broke (never the value); "" when none took part.
    constraint: str = ""
    # What the audit trail may record of the call's arguments: references to its query,
    # body and the rules' parse of it, no copy (None: nothing to record). Material for the
    # record, not part of the decision: not compared, not shown.
    arguments: CallArguments | None = field(default=None, compare=False, repr=False)
    # The call's facts for behaviour analysis, when the decision described them (scored on
    # the Check path): the pipeline sends them on rather than describing the call again.
    facts: CallFacts | None = field(default=None, compare=False, repr=False)
    # In behaviour analysis's `monitor` mode, what `enforce` would have refused this allowed
    # call for ("risk" or "novel_call", then ": " and the reason); "" otherwise. Audited
    # (`would_deny`) and counted, so that an operator sees what enforcing would stop.
    would: str = ""
    # What the Check-path scoring counted of this call for its agent (None: not scored):
    # the caller keeps it (`CallScoring.recent`) so that the agent's next call is judged
    # with it before the access log has reported this one.
    scored: Recent | None = field(default=None, compare=False, repr=False)


class _Body:
    """The call's body and query for the rules, parsed on first use only: most calls never
    need them."""

    __slots__ = ("_json", "_parsed", "_view")

    def __init__(self, view: RequestView) -> None:
        self._view = view
        self._parsed: McpBody | None = None
        self._json: object = _UNPARSED

    def __call__(self) -> McpBody:
        if self._parsed is None:
            self._parsed = parse_mcp_body(self._view.body, self._view.body_truncated)
        return self._parsed

    def tools(self) -> tuple[str, ...]:
        if self._parsed is None:
            return ()
        return tuple(m.tool for m in self._parsed.messages if m.tool is not None)

    def refusal(self, rule: CompiledRule) -> str | None:
        """Why the call's query or JSON body breaks ``rule``'s constraints, or None."""
        if rule.query_check is not None:
            query = query_arguments(self._view.path)
            if isinstance(query, str):
                return f"query: {query}"
            why = check(rule.query_check, query, "", "query")
            if why is not None:
                return why
        if rule.body_check is not None:
            if self._json is _UNPARSED:
                self._json = parse_json_body(self._view.body, self._view.body_truncated)
            if isinstance(self._json, JsonRefusal):
                return f"JSON body: {self._json.why}"
            return check(rule.body_check, self._json, "", "JSON body")
        return None


_UNPARSED = object()


def _identity(snapshot: Snapshot, view: RequestView) -> tuple[str | None, str, str]:
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
        claims.append(("service-account", snapshot.agent_of_service_account(sa), sa))
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
    return _method_parameter(view)


_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"
# A part's name in a multipart/form-data body (RFC 7578: `Content-Disposition: form-data;
# name="..."`, also `name*=` and unquoted, as lenient parsers take them)
_PART_NAME = re.compile(
    rb'(?im)^content-disposition:[^\r\n]*?;[ \t]*name\*?[ \t]*=[ \t]*(?:"([^"\r\n]*)"|([^;\s]*))'
)
_PHP_FOLD = str.maketrans({".": "_", " ": "_", "[": "_"})


def _method_parameter(view: RequestView) -> str:
    """Why the call carries a method override in its parameters ('' if it does not): a
    `_method` parameter in the query or a form body, which Laravel and Symfony (query or
    form), Rails' Rack::MethodOverride, Spring and ASP.NET Core (form, urlencoded or
    multipart; Rack also takes a POST without a Content-Type for a form) read the method
    from, under the spellings PHP folds into `_method` (`.method`, `[method`, ...)."""
    why = (
        "a method override could make the upstream act on another method than the one "
        "decided; send the real one"
    )
    _, _, query = view.path.partition("?")
    if "method" in query.lower() and _names_method(query):
        return f"a `_method` parameter (query): {why}"
    ctype = view.headers.get("content-type", "").strip().lower()
    form, multipart = ctype.startswith(_FORM) or not ctype, ctype.startswith(_MULTIPART)
    if not (form or multipart):
        return ""
    body = view.body
    if body and b"method" in body.lower():
        if form and _names_method(body.decode("latin-1")):
            return f"a `_method` parameter (form body): {why}"
        if multipart and any(
            _is_method_name(_part_name(quoted or bare), decode=False)
            for quoted, bare in _PART_NAME.findall(body)
        ):
            return f"a `_method` parameter (multipart form body): {why}"
    if view.body_truncated and view.method == "POST":
        return (
            "a form body larger than mandate sees whole (Envoy buffers its start): a "
            f"`_method` field past it could not be refused, and {why}; send a file as the "
            "request body (not a form), or a smaller form"
        )
    return ""


def _part_name(raw: bytes) -> str:
    """A multipart part's name as a parser reads it (RFC 5987's `utf-8''%5Fmethod` too)."""
    name = raw.decode("latin-1")
    charset, quotes, encoded = name.partition("''")
    return unquote_plus(encoded) if quotes and "%" not in charset else name


def _names_method(form: str) -> bool:
    return any(_is_method_name(pair.partition("=")[0]) for pair in form.split("&"))


def _is_method_name(raw: str, decode: bool = True) -> bool:
    """Whether a parameter name is read as `_method`: percent-decoded (a form's), any case,
    spaces around it, and PHP's folding of `.`, spaces and an unmatched `[` into `_` (or
    `_method[...]`, an array under that name)."""
    name = (unquote_plus(raw) if decode else raw).strip().lower()
    return "_method" in (name.translate(_PHP_FOLD), name.split("[", 1)[0].translate(_PHP_FOLD))


def decide(
    snapshot: Snapshot,
    view: RequestView,
    now: float,
    revocations: RevocationTable = EMPTY_TABLE,
    agent_state: AgentStateTable = EMPTY_AGENT_STATE,
    scoring: CallScoring | None = None,
) -> Decision:
    """Decide one call. ``now`` (seconds since the epoch) is for expiry-based phases;
    ``revocations`` and ``agent_state`` are the shared tables' generations read for this
    Check; ``scoring`` the agents' behaviour baselines (None: the call's own novelty is not
    scored, only the published risk score counts). An allowed call whose purpose has a rate
    limit carries it in ``Decision.rate``: the caller counts it (:meth:`RateLimiter.charge`)
    and turns it into :func:`over_rate` when the limit refuses it; `explain` does not count."""
    call = _Call(view)
    return (
        _attribute(call, snapshot, view, agent_state)
        or _revocation(call, revocations, now)
        or _purpose(call, view, agent_state, now)
        or _request(call, view)
        or _rules(call)
        or _elevation(call, agent_state, now)
        or _task(call)
        or _behaviour(call, view, scoring, now)
        or _credentials(call)
        or call.end(True, Code.ALLOWED, call.why)
    )


def over_rate(decision: Decision) -> Decision:
    """The deny for an allowed call its purpose's rate limit refused."""
    rate = decision.rate
    limit = f" ({rate.requests} per {rate.per})" if rate is not None else ""
    why = f"rate: over the rate limit of purpose {decision.purpose!r}{limit}"
    return replace(decision, allowed=False, code=Code.RATE, reason=why, would="")


class _Call:
    """What the phases have learnt of one call so far. Each phase returns None to go on,
    or the Decision that ends the call, made by :meth:`end` from what is known by then."""

    __slots__ = (
        "agent", "body", "canonical", "constraint", "credentials", "declared", "did", "facts",
        "grant", "host",
        "method", "name",
        "ns", "owner", "path", "port", "purpose", "rate", "refusal", "risk", "risk_state",
        "rule", "scored", "source", "task", "trace", "why", "would",
    )  # fmt: skip

    def __init__(self, view: RequestView) -> None:
        self.did, self.trace, self.ns = view.decision_id, view.trace_id, view.namespace
        self.method = view.method.upper()
        self.agent: CompiledAgent | None = None
        self.name = self.owner = self.source = ""
        self.risk_state: RiskState | None = None
        self.risk = -1.0
        self.purpose: CompiledPurpose | None = None
        self.task = self.host = self.path = self.canonical = self.rule = self.why = ""
        self.refusal = ""
        self.port = 0
        self.body: _Body | None = None
        self.grant: Grant | None = None
        self.rate: RateCharge | None = None
        self.credentials: tuple[str, ...] = ()
        self.declared: RuleIndex | None = None  # the named task's declaration, if any
        self.constraint = ""
        self.facts: CallFacts | None = None
        self.would = ""  # monitor mode: what enforce would have refused the call for
        self.scored: Recent | None = None

    def end(self, allowed: bool, code: str, reason: str) -> Decision:
        purpose = self.purpose.name if self.purpose is not None else ""
        body = self.body
        tools = body.tools() if body is not None else ()
        arguments = None
        if body is not None and self.agent is not None:  # the request was read
            arguments = call_arguments(self.agent.recording, body._view)
        return Decision(
            self.did, allowed, code, reason, self.name, self.owner, purpose, self.task,
            self.rule, self.source, self.method, self.host, self.port, self.path, tools,
            self.trace, self.grant, self.risk, self.rate, self.credentials,
            constraint=self.constraint, arguments=arguments, facts=self.facts,
            would=self.would if allowed else "", scored=self.scored,
        )  # fmt: skip


# 1. attribute: which agent is calling, from sources the agent cannot forge
def _attribute(
    call: _Call, snapshot: Snapshot, view: RequestView, agent_state: AgentStateTable
) -> Decision | None:
    name, source, why = _identity(snapshot, view)
    if name is None:
        return call.end(False, source, why)
    call.name, call.source = name, source
    agent = call.agent = snapshot.agents.get(name)
    if agent is None:
        return call.end(False, Code.UNKNOWN_AGENT, f"no profile for agent {name!r}")
    call.owner = agent.owner
    call.risk_state = agent_state.risk(call.ns, name)
    call.risk = call.risk_state.score if call.risk_state is not None else -1.0
    return None


# 2. revocation: before anything the agent declares. An incomplete table (first sync not
# done, or an entry could not be stored) might be missing this agent's revocation.
def _revocation(call: _Call, revocations: RevocationTable, now: float) -> Decision | None:
    if not revocations.complete:
        if revocations.refused:
            why = f"revocations cannot be read: {revocations.refused}: failing closed"
            return call.end(False, Code.REVOCATIONS_REFUSED, why)
        why = "revocation state not known yet (starting, or the table is full): failing closed"
        return call.end(False, Code.REVOCATIONS_UNKNOWN, why)
    revoked = revocations.find(call.ns, call.name, now)
    if revoked is not None:
        call.rule = revoked.key
        return call.end(False, Code.REVOKED, f"revoked: {revoked.reason}")
    return None


# 3. purpose: declared, else the one the declared task was reported for, else the default
def _purpose(
    call: _Call, view: RequestView, agent_state: AgentStateTable, now: float
) -> Decision | None:
    assert call.agent is not None
    declared = view.headers.get(PURPOSE_HEADER, "").strip()
    task = view.headers.get(TASK_HEADER, "").strip()
    if task and not TASK_ID.fullmatch(task):
        # (also a header sent twice, which Envoy joins with ",")
        return call.end(False, Code.BAD_TASK, f"x-mandate-task must be {TASK_ID_RULE}")
    call.task = task
    if task and not agent_state.tasks_known(call.ns, call.name):
        why = (
            "the agent's tasks cannot be read now (the shared context table is full or "
            "unreadable): a call naming a task is refused rather than decided without its "
            "declaration"
        )
        return call.end(False, Code.OUTSIDE_TASK, why)
    bound = agent_state.task(call.ns, call.name, task, now) if task else None
    if bound is not None and bound.ended:
        why = f"task {task!r} has ended (EndTask): it allows nothing; report a new task id"
        return call.end(False, Code.OUTSIDE_TASK, why)
    if bound is not None and declared and declared != bound.purpose:
        why = (
            f"task {task!r} was reported for purpose {bound.purpose!r}, "
            f"the call declares {declared[:64]!r}"
        )
        return call.end(False, Code.BAD_TASK, why)
    name = declared or (bound.purpose if bound is not None else call.agent.default_purpose)
    if not name:
        why = "no x-mandate-purpose declared and the profile has no defaultPurpose"
        return call.end(False, Code.NO_PURPOSE, why)
    call.purpose = call.agent.purposes.get(name)
    if call.purpose is None:
        why = f"unknown purpose {name[:64]!r} for agent {call.name!r}"
        return call.end(False, Code.UNKNOWN_PURPOSE, why)
    if bound is not None:
        call.declared = agent_state.declared(bound)
    if call.purpose.require_task and call.declared is None:
        named = (
            f"task {task!r} is not an active task with a declaration"
            if task
            else ("the call names no task (x-mandate-task)")
        )
        why = (
            f"purpose {name!r} requires a declared task: {named}; report one "
            "(ReportTask with `allow`) and name it"
        )
        return call.end(False, Code.OUTSIDE_TASK, why)
    return None


# 4. the request itself: canonical host, port and path, and nothing that could make the
# upstream act on another method, path or port than the one decided
_SCHEMES = frozenset(("http", "https"))  # the schemes Envoy's routes know, as it writes them


def _request(call: _Call, view: RequestView) -> Decision | None:
    connect = call.method == CONNECT
    if not connect and view.scheme not in _SCHEMES:
        # Envoy routes a call to TLS for `https` (or an authority ending in :443) only and
        # sends any other scheme in clear, to port 80 when the authority names none: a
        # scheme mandate read otherwise (`wss`: 443) would decide, and credential, a call
        # to another port than the one it reaches (review of 2026-12-05).
        call.host = view.authority[:256]
        call.path = view.path[:256]
        why = f"scheme {view.scheme[:16]!r}: only 'http' and 'https' reach an upstream"
        return call.end(False, Code.BAD_REQUEST, why)
    # A CONNECT target must name its port (RFC 9110 9.3.6): no scheme default applies.
    hp = parse_authority(view.authority, "" if connect else view.scheme)
    path = "" if connect else canonical_path(view.path)
    if hp is None or path is None:
        why = f"malformed or ambiguous {'authority' if hp is None else 'path'}"
        return call.end(False, Code.BAD_REQUEST, why)
    call.host, call.port = hp
    call.canonical, call.path = path, "" if connect else display_path(path)
    why = _request_shape(view)
    if why:
        call.method = view.method[:32]  # as sent, not upper-cased
        return call.end(False, Code.BAD_REQUEST, why)
    call.body = _Body(view)
    return None


# 5. rules: the purpose's deny rules win, then its allow rules
def _rules(call: _Call) -> Decision | None:
    assert call.purpose is not None and call.body is not None
    body, purpose = call.body, call.purpose
    denied = purpose.deny.lookup(call.host, call.port, call.method, call.canonical, body, deny=True)
    if denied.rule is not None:
        call.rule = denied.rule.rule_id
        why = f"denied by rule {call.rule} of purpose {purpose.name!r}"
        return call.end(False, Code.DENIED_BY_RULE, why)
    allowed = purpose.allow.lookup(
        call.host, call.port, call.method, call.canonical, body, deny=False
    )
    if allowed.rule is not None:
        call.rule = allowed.rule.rule_id
        call.why = f"allowed by rule {call.rule} of purpose {purpose.name!r}"
        call.constraint = _constraints(allowed.rule, body)
    call.refusal = allowed.mcp_refusal or ""
    return None


def _constraints(rule: CompiledRule, body: _Body) -> str:
    """The argument constraints of ``rule`` the call was checked against, or "" (labels
    made when the rule was compiled)."""
    labels = rule.argument_labels
    if labels is None:
        return rule.http_label
    parsed = body._parsed
    if parsed is None:
        return rule.http_label
    found = [x for m in parsed.messages if m.tool is not None and (x := labels.get(m.tool))]
    if rule.http_label:
        found.append(rule.http_label)
    if len(found) <= 1:
        return found[0] if found else ""
    return "; ".join(dict.fromkeys(found))


# 6. elevation: the rules of the agent's active grants, after the purpose's own rules;
# nothing matched at all: deny (default deny)
def _elevation(call: _Call, agent_state: AgentStateTable, now: float) -> Decision | None:
    assert call.agent is not None and call.purpose is not None and call.body is not None
    if not call.rule and call.agent.elevations:
        body = call.body
        for g in agent_state.active_grants(call.ns, call.name, now):
            elevation = call.agent.elevations.get(g.elevation)
            if elevation is None:  # the profile no longer has it: the grant gives nothing
                continue
            m = elevation.allow.lookup(
                call.host, call.port, call.method, call.canonical, body, deny=False
            )
            if m.rule is not None:
                call.grant, call.rule = g, m.rule.rule_id
                call.constraint = _constraints(m.rule, body)
                call.why = (
                    f"allowed by rule {call.rule} of elevation {g.elevation!r} "
                    f"(grant {g.id}, approved by {g.approver}, until {utc_seconds(g.expires_at)})"
                )
                break
    if call.rule:
        return None
    reason = f"outside purpose {call.purpose.name!r}"
    if call.refusal:
        reason += f": {call.refusal}"
        call.constraint = call.refusal
    return call.end(False, Code.OUTSIDE_PURPOSE, reason)


# 7. task: a call naming a task with a declaration is allowed only within it as well (the
# intersection: the declaration is a filter after the purpose's and elevations' rules, so
# it can narrow what they allow, never add to it)
def _task(call: _Call) -> Decision | None:
    declared = call.declared
    if declared is None:
        return None
    assert call.body is not None
    m = declared.lookup(call.host, call.port, call.method, call.canonical, call.body, deny=False)
    if m.rule is not None:
        call.why += f", within {m.rule.rule_id}"
        own = _constraints(m.rule, call.body)
        call.constraint = "; ".join(c for c in (call.constraint, own) if c)
        return None
    why = f"outside task {call.task!r}: no rule the task declared allows the call"
    call.constraint = m.mcp_refusal or ""
    if m.mcp_refusal:
        why += f" ({m.mcp_refusal})"
    call.rule = ""
    return call.end(False, Code.OUTSIDE_TASK, why)


# 8. behaviour: a call that would be allowed is still denied while the agent's risk is at
# or above the profile's threshold (`enforce` mode), or when the call's own novelty brings
# it there (in `monitor` mode it is allowed, and the decision says what enforce would have
# refused it for); else it is allowed, subject to its purpose's rate limit (counted by the
# caller)
def _behaviour(
    call: _Call, view: RequestView, scoring: CallScoring | None, now: float
) -> Decision | None:
    assert call.agent is not None and call.purpose is not None
    settings, risk = call.agent.behavior, call.risk_state
    if settings is not None:
        refusal: tuple[str, str] | None = None
        if risk is not None and not risk.learning and risk.score >= settings.deny_at:
            why = f"behaviour risk {risk.score:.2f} >= {settings.deny_at:.2f}: {risk.explanation}"
            refusal = (Code.RISK, why)
        elif scoring is not None and scoring.baselines:
            refusal = _novel_call(call, view, scoring, now)
        if refusal is not None:
            if settings.mode == "enforce":
                return call.end(False, *refusal)
            call.would = f"{refusal[0]}: {refusal[1]}"  # monitor: allowed, and said so
    call.rate = call.purpose.rate
    return None


def _novel_call(
    call: _Call, view: RequestView, scoring: CallScoring, now: float
) -> tuple[str, str] | None:
    """(code, reason) refusing a call whose own novelty brings the agent's score to
    `denyAtRisk` (`core.callrisk`), or a call of an agent whose calls just scored are there
    already, not yet published; or None. Not scored while the agent learns (no baseline,
    or a published score still learning). What was counted is kept in ``call.scored``."""
    assert call.agent is not None and call.agent.behavior is not None
    settings, risk = call.agent.behavior, call.risk_state
    key = (call.ns, call.name)
    base = scoring.baselines.get(key)
    if base is None or (risk is not None and risk.learning):
        return None
    facts = NO_FACTS
    if view.body:
        facts = describe(
            view.body, view.body_truncated, settings.sensitive, scoring.fingerprint,
            scoring.key_id,
        )  # fmt: skip
        call.facts = facts
    # what was held before the agent's window was cleared (a behaviour revocation ended) no
    # longer counts
    recent = current(scoring.recent.get(key), base.epoch)
    window = base.window_seconds
    published = risk.contributions if risk is not None else {}
    judged = effective(published, recent, now, window)
    size = request_bytes(view)
    novelty = call_novelty(base, facts, destination(call.host, view.path), size, now, recent)
    tool = facts.tools[-1] if facts.tools else ""
    if not novelty:
        if tool or recent is not None:
            call.scored = remember(recent, now, window, tool, {}, base.epoch)
        if judged is published:
            return None
        score = noisy_or(judged)
        if score < settings.deny_at:
            return None
        call.risk = score
        why = (
            f"behaviour risk {score:.2f} >= {settings.deny_at:.2f} with the calls just made "
            f"(not yet published): {held(_unpublished(judged, published))}"
        )
        return Code.RISK, why
    score, added = project(novelty, judged)
    call.scored = remember(recent, now, window, tool, reached(novelty, judged, added), base.epoch)
    if score < settings.deny_at:
        return None
    before = risk.explanation if risk is not None and risk.explanation else "risk 0.00"
    if judged is not published:
        unpublished = held(_unpublished(judged, published))
        before += f"; with the calls just made (not yet published): {unpublished}"
    why = (
        f"novel call: behaviour risk {score:.2f} with this call >= {settings.deny_at:.2f}: "
        f"{explain(novelty, added)}; before it: {before}"
    )
    call.risk = score
    return Code.NOVEL_CALL, why


def _unpublished(judged: Mapping[str, float], published: Mapping[str, float]) -> dict[str, float]:
    """The contributions ``judged`` holds above the ``published`` ones."""
    return {n: c for n, c in judged.items() if c > published.get(n, 0.0)}


def request_bytes(view: RequestView) -> int:
    """The request body's size: what mandate saw of it, or its Content-Length if more
    (a body Envoy cut at its `with_request_body` limit)."""
    size = len(view.body) if view.body else 0
    if view.body_truncated or not view.body:
        declared = view.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and len(declared) < 16:
            size = max(size, int(declared))
    return size


# 9. credentials: an allowed call to a host that has a credential will carry it (the
# pipeline adds it); a CONNECT tunnel there is refused, since mandate could not add it
def _credentials(call: _Call) -> Decision | None:
    assert call.agent is not None
    if not call.agent.credentials:
        return None
    host, port = call.host, call.port
    if call.method == CONNECT:
        refused = [
            c.name for c in call.agent.credentials if c.refuse_connect and c.matches(host, port)
        ]
        if refused:
            why = (
                f"CONNECT to {host}:{port}, a host with credential {refused[0]!r}: a tunnel is "
                f"opaque, so mandate could not add it; call http://{host}:{port}/ instead "
                "(the sidecar originates TLS)"
            )
            return call.end(False, Code.CREDENTIAL_TUNNEL, why)
        return None  # nothing is added to a tunnel
    call.credentials = tuple(c.name for c in call.agent.credentials if c.matches(host, port))
    return None
