"""Simulating a profile change (pure): replay an audit trail's decision records against a
candidate profile snapshot and say which past calls would change (allow -> deny,
deny -> allow), grouped by agent, purpose and rule, so that a change can be reviewed before
rollout.

A record is rebuilt into the :class:`~sidecar.core.RequestView` the pure core saw: the
method, ``host:port``, the path as recorded (the canonical path, percent-encoded again so
the core decodes it back to itself), the agent as the sidecar's configured agent, the
namespace, ``x-mandate-purpose`` = the recorded purpose, ``x-mandate-task`` = the recorded
task and, for an MCP call, a JSON-RPC ``tools/call`` body naming each recorded tool (a batch
for several) with a ``content-length`` that shows it whole. It is decided with
:func:`~sidecar.core.decide` on the new snapshot, with no revocation and no agent state
(tasks, grants, risk), at the record's own time.

Only outcomes the profiles decided are compared. A record is *not replayable* (counted by
the key of :data:`NOT_REPLAYABLE`) when its outcome came from run-time state (a revocation,
the rate limit, the risk score, an elevation grant, the audit trail or a credential being
unavailable, an internal error), from what the record does not keep (the headers of a
`bad_request`, the identity claims of `unattributed`, the purpose an `unknown_purpose` call
named), or when the new profiles read something the record does not keep: the request of a
call refused before it was read, the body of a call whose record names no tool, the
arguments of a tool call. What the record does not keep is probed, never guessed: a body
that was not recorded is replayed as the strictest body (none) and as the most permissive
one (a JSON-RPC response, which every MCP allow rule passes and no deny rule matches); since
a decision only allows more when the body passes more, the call's own body would be decided
like both when they agree, and the record is not replayable when they do not. A tool call
is replayed without arguments (the strictest); a deny that an argument constraint of the
new purpose could have turned into an allow is not replayable. A record without
``arguments`` keeps the tools of a body, not its other messages: a batch is replayed as its
tool calls only. A rebuilt call the core does not see as recorded (another method, host,
port or path) is not replayable.

Two outcomes are known though the record cannot rebuild the call whole. A call that named a
task, replayed against a purpose that now has `requireTask`: whether the task was declared
is run-time state, but a declaration only narrows what the rules allow, so the call is
replayed with `requireTask` off too, and a deny there is the outcome (else ``task``). A
call whose recorded arguments cannot rebuild it (an MCP batch cut short at 128 messages,
a body the trail withheld): its recorded tool calls alone are replayed, and a deny (by a
deny rule, or by every allow rule refusing one of them, with no argument, query or body
constraint that the missing parts might have met) is the outcome (else
``unrebuildable``).

A record with ``arguments`` (`sidecar.audit.arguments`; the profile's `spec.audit`) keeps
the body's kind and messages, and the arguments' types: the body is rebuilt as it was, each
message of an MCP body with its method, and a JSON body, a tool call's arguments or the
query with their values where every value was recorded in clear; a body that was not JSON,
not a JSON object or not seen whole is rebuilt as such a body, which every rule reads alike.
Arguments recorded as hashes or types only are replayed as the strictest (a tool call
without arguments, an unreadable query, a body that is not JSON: every constraint refuses
them, and nothing else reads them), and a deny that a constraint on them in the new purpose
could have turned into an allow is not replayable (``mcp_arguments``, ``http_arguments``).

No I/O here: :mod:`sidecar.policy.cli` reads the trail and prints. This module must not
import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote, urlencode

from sidecar.core import Code, Decision, RequestView, Snapshot, decide
from sidecar.core.timefmt import parse_rfc3339
from sidecar.headers import PURPOSE_HEADER, TASK_HEADER

__all__ = [
    "ALLOW_TO_DENY",
    "DENY_TO_ALLOW",
    "NOT_REPLAYABLE",
    "Example",
    "Group",
    "Recorded",
    "Replay",
    "Report",
    "parse_record",
    "rebuild",
    "render_table",
    "replay",
    "report_json",
    "simulate",
]

ALLOW_TO_DENY = "allow_to_deny"
DENY_TO_ALLOW = "deny_to_allow"
_CHANGES = (ALLOW_TO_DENY, DENY_TO_ALLOW)

# Why a record is not replayed, by key: the recorded code for outcomes the profiles did not
# decide (a code not listed here is not replayed either, and counted under itself), and
# what the record lacks for the others. The keys are stable: they appear in --json output.
NOT_REPLAYABLE: Mapping[str, str] = {
    Code.REVOKED: "the agent was revoked (run-time state, not the profiles)",
    Code.REVOCATIONS_UNKNOWN: "the revocation table was not known yet (run-time state)",
    Code.REVOCATIONS_REFUSED: "the API server refused the revocations (run-time state)",
    Code.OUTSIDE_TASK: "decided by the task's declaration (run-time state, not the profiles)",
    Code.RATE: "over the purpose's rate limit: depends on the calls before it",
    Code.RISK: "the agent's behaviour risk score (run-time state)",
    Code.NOVEL_CALL: "the call's novelty against the agent's learned behaviour (run-time state)",
    Code.AUDIT_UNAVAILABLE: "the audit trail could not be written (run-time state)",
    Code.CREDENTIAL_UNAVAILABLE: "a credential could not be obtained (run-time state)",
    Code.INTERNAL_ERROR: "mandate failed and refused the call (fail closed)",
    Code.BAD_REQUEST: "refused for what the record does not keep (headers, method case, URL)",
    Code.BAD_TASK: "the task header was malformed or bound to another purpose (not recorded)",
    Code.UNATTRIBUTED: "decided on identity claims the record does not keep",
    Code.IDENTITY_CONFLICT: "decided on identity claims the record does not keep",
    Code.UNKNOWN_PURPOSE: "the purpose the call declared is not recorded (it named none known)",
    "elevation": "allowed by an elevation grant (run-time state)",
    "request_not_recorded": "refused before the request was read, and the new profiles "
    "would need it",
    "mcp_body": "the body is not recorded (it named no tool) and the new profiles read it",
    "mcp_arguments": "the tool call's arguments are not recorded in clear and the new "
    "purpose constrains them",
    "http_arguments": "the query or JSON body is not recorded in clear and the new purpose "
    "constrains it",
    "unrebuildable": "the record does not describe the call well enough to rebuild it",
    "task": "the new purpose requires a declared task, and the call named one: whether it "
    "had a declaration is run-time state (its rules alone would allow it)",
}

# Outcomes the profiles decide, given what the record keeps.
_FULL = frozenset({Code.ALLOWED, Code.DENIED_BY_RULE, Code.OUTSIDE_PURPOSE, Code.CREDENTIAL_TUNNEL})
# Refused before the request was read: the record has no host or path. Replayable while the
# new profiles also refuse the call before reading it.
_EARLY = frozenset({Code.UNKNOWN_AGENT, Code.NO_PURPOSE})
# The codes of a decision that ended before the request was read (phases 1-3 of decide).
_BEFORE_REQUEST = frozenset(
    {
        Code.UNATTRIBUTED,
        Code.IDENTITY_CONFLICT,
        Code.UNKNOWN_AGENT,
        Code.REVOKED,
        Code.REVOCATIONS_UNKNOWN,
        Code.REVOCATIONS_REFUSED,
        Code.NO_PURPOSE,
        Code.UNKNOWN_PURPOSE,
        Code.BAD_TASK,
    }
)
_CONNECT = "CONNECT"
# What an early record is replayed with in place of the request it does not keep: the
# decision ends before reading it, or the record is not replayable.
_NO_REQUEST = ("GET", "request.not-recorded.invalid:80", "/")
# The most permissive body: a JSON-RPC response passes every MCP allow rule (it calls no
# tool and no method) and matches no MCP deny rule.
_PERMISSIVE_BODY = b'{"id":0,"jsonrpc":"2.0","result":{}}'
# Everything but unreserved characters and "/" is percent-encoded: the core decodes the
# recorded (canonical, already decoded) path back to itself; a `?` or `#` in it stays path.
_PATH_SAFE = "/"


@dataclass(frozen=True, slots=True)
class Recorded:
    """What replay reads of one decision record (absent values are "" or 0)."""

    decision_id: str
    time: str  # as recorded (RFC 3339, milliseconds, UTC)
    allowed: bool
    code: str
    rule: str = ""
    reason: str = ""
    agent: str = ""
    namespace: str = ""
    method: str = ""
    host: str = ""
    port: int = 0
    path: str = ""
    tools: tuple[str, ...] = ()
    purpose: str = ""
    task: str = ""
    elevated: bool = False  # allowed through an elevation grant
    at: float = 0.0  # `time` in seconds since the epoch: the `now` of the replay
    owner: str = ""
    # what the record keeps of the call's arguments (`sidecar.audit.arguments`), if any
    arguments: Mapping[str, Any] | None = field(default=None, compare=False)


def _text(rec: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise ValueError(f"decision record without {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"decision record: {key!r} is {type(value).__name__}, not a string")
    return value


def _epoch(text: str) -> float:
    """A record's `time` (``2023-11-14T22:13:20.123Z``) in seconds since the epoch."""
    at = parse_rfc3339(text)
    if at is None:
        raise ValueError(f"decision record: 'time' {text[:40]!r} is not an RFC 3339 time")
    return at


def parse_record(rec: Mapping[str, Any]) -> Recorded:
    """The fields replay reads of a decision record (``type`` "decision", as written by
    `sidecar.audit.record`); ValueError naming the field if one is missing or mistyped."""
    decision = rec.get("decision")
    if decision not in ("allow", "deny"):
        raise ValueError(f"decision record: 'decision' is {decision!r}, not 'allow' or 'deny'")
    port = rec.get("port")
    if port is not None and (type(port) is not int or not 0 < port < 65536):
        raise ValueError(f"decision record: 'port' is {port!r}, not a port number")
    tools = rec.get("mcp_tools")
    if tools is None:
        tools = []
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise ValueError("decision record: 'mcp_tools' is not a list of strings")
    arguments = rec.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        raise ValueError("decision record: 'arguments' is not an object")
    if arguments is not None and not isinstance(arguments.get("mcp", []), list):
        raise ValueError("decision record: 'arguments.mcp' is not a list")
    if not tools and arguments is not None:  # the rules did not read the body; the trail did
        tools = [m["tool"] for m in arguments.get("mcp", ()) if _is_tool_message(m)]
    time = _text(rec, "time", required=True)
    return Recorded(
        decision_id=_text(rec, "decision_id", required=True),
        time=time,
        allowed=decision == "allow",
        code=_text(rec, "code", required=True),
        rule=_text(rec, "rule"),
        reason=_text(rec, "reason"),
        agent=_text(rec, "agent"),
        namespace=_text(rec, "namespace"),
        method=_text(rec, "method"),
        host=_text(rec, "host"),
        port=port or 0,
        path=_text(rec, "path"),
        tools=tuple(tools),
        purpose=_text(rec, "purpose"),
        task=_text(rec, "task"),
        elevated=rec.get("elevation") is not None,
        at=_epoch(time),
        owner=_text(rec, "owner"),
        arguments=arguments,
    )


def _is_tool_message(m: object) -> bool:
    return isinstance(m, dict) and isinstance(m.get("tool"), str)


def _tools_call(tools: tuple[str, ...]) -> bytes:
    """A JSON-RPC `tools/call` per tool, without arguments (the strictest: every argument
    constraint refuses it); a batch for several."""
    calls = [
        {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool}}
        for i, tool in enumerate(tools, 1)
    ]
    return json.dumps(calls[0] if len(calls) == 1 else calls, separators=(",", ":")).encode()


def _authority(host: str, port: int) -> str:
    return f"{host}:{port}" if port else host


def rebuild(
    rec: Recorded, body: bytes | None = None, *, query: str = "", truncated: bool = False
) -> RequestView:
    """The request view of a recorded call as the core saw it, with ``body`` (and a
    ``content-length`` that shows it whole, unless ``truncated``) and ``query`` (the query
    string, without its ``?``). A record refused before its request was read (no host) gets
    a placeholder request."""
    headers: dict[str, str] = {}
    if rec.purpose:
        headers[PURPOSE_HEADER] = rec.purpose
    if rec.task:
        headers[TASK_HEADER] = rec.task
    if body is not None and not truncated:
        headers["content-length"] = str(len(body))
    if not rec.host:
        method, authority, path = _NO_REQUEST
    elif rec.method == _CONNECT:
        method, authority, path = _CONNECT, _authority(rec.host, rec.port), ""
    else:
        method, authority = rec.method, _authority(rec.host, rec.port)
        path = quote(rec.path or "/", safe=_PATH_SAFE)
        if query:
            path += "?" + query
    return RequestView(
        decision_id=rec.decision_id,
        method=method,
        authority=authority,
        path=path,
        scheme="https" if method == _CONNECT or rec.port == 443 else "http",
        headers=headers,
        body=body,
        body_truncated=truncated,
        configured_agent=rec.agent or None,
        namespace=rec.namespace,
    )


@dataclass(frozen=True, slots=True)
class Replay:
    """One record replayed: the new decision, or the :data:`NOT_REPLAYABLE` key saying why
    there is none."""

    record: Recorded
    decision: Decision | None
    skipped: str = ""

    @property
    def change(self) -> str:
        """ALLOW_TO_DENY, DENY_TO_ALLOW, or "" (unchanged or not replayed)."""
        d = self.decision
        if d is None or d.allowed == self.record.allowed:
            return ""
        return DENY_TO_ALLOW if d.allowed else ALLOW_TO_DENY


def _unknown_constrained(
    snapshot: Snapshot,
    d: Decision,
    tools: Iterable[str],
    query: bool = False,
    json_body: bool = False,
) -> str:
    """The :data:`NOT_REPLAYABLE` key if an allow rule of the decision's purpose constrains
    what the record does not keep: the arguments of one of ``tools``, the query
    (``query``), the JSON body (``json_body``); then the call's own might have passed it.
    "" if none does."""
    agent = snapshot.agents.get(d.agent)
    purpose = agent.profile.spec.purposes.get(d.purpose) if agent is not None else None
    if purpose is None:
        return ""
    tools = frozenset(tools)
    for rule in purpose.allow:
        if rule.mcp_arguments is not None and not rule.mcp_arguments.keys().isdisjoint(tools):
            return "mcp_arguments"
        if (query and rule.query is not None) or (json_body and rule.json_body is not None):
            return "http_arguments"
    return ""


# Stand-ins for what a record keeps only the kind of. Every rule reads each like the
# original: a body that is not strict JSON (and so neither JSON-RPC nor a JSON object), a
# JSON value that is not an object (nor JSON-RPC: `[]` is an empty batch), a query that
# cannot be read as name=value pairs (a pair without `=`).
_NOT_JSON = b"\xff"
_NOT_AN_OBJECT = b"[]"
_UNREADABLE_QUERY = "x"


@dataclass(frozen=True, slots=True)
class _Material:
    """A call's body and query rebuilt from its record's ``arguments``, and which of its
    parts stand in for values the record does not keep (replayed as the strictest)."""

    body: bytes | None = None
    truncated: bool = False
    query: str = ""
    tools: frozenset[str] = frozenset()  # tools whose arguments are not known
    query_unknown: bool = False
    json_unknown: bool = False


def _values(entries: object) -> dict[str, Any] | None:
    """The values of recorded arguments, or None unless every one was kept in clear."""
    if not isinstance(entries, dict):
        return None
    out = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "value" not in entry:
            return None
        out[name] = entry["value"]
    return out


def _material(args: Mapping[str, Any]) -> _Material | None:
    """The call rebuilt from its recorded ``arguments``; None if they cannot rebuild it (a
    batch cut short, an entry of another shape)."""
    body: bytes | None = None
    truncated = query_unknown = json_unknown = False
    unknown: set[str] = set()
    kind = args.get("body")
    if "mcp" in args:
        if "mcp_omitted" in args or not args["mcp"]:
            return None
        messages = []
        for i, m in enumerate(args["mcp"], 1):
            if not isinstance(m, dict):
                return None
            if m.get("response") is True:
                messages.append({"jsonrpc": "2.0", "id": i, "result": {}})
                continue
            method = m.get("method")
            if not isinstance(method, str):
                return None
            msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
            if m.get("notification") is not True:
                msg["id"] = i
            tool = m.get("tool")
            if tool is not None:
                if not isinstance(tool, str):
                    return None
                params: dict[str, Any] = {"name": tool}
                values = _values(m.get("args")) if "args_omitted" not in m else None
                if values is not None:
                    params["arguments"] = values
                elif "args" in m:
                    unknown.add(tool)
                # arguments that were no object, or none: refused by every constraint, as
                # the call's own were; replayed without
                msg["params"] = params
            messages.append(msg)
        doc: object = messages[0] if len(messages) == 1 else messages
        body = json.dumps(doc).encode("ascii")
    elif "json" in args:
        values = _values(args["json"]) if "json_omitted" not in args else None
        if values is not None:
            body = json.dumps(values).encode("ascii")
        else:
            body, json_unknown = _NOT_JSON, True
    elif kind == "truncated":
        body, truncated = b"{", True
    elif kind == "not_json":
        body = _NOT_JSON
    elif kind == "json_value":
        body = _NOT_AN_OBJECT
    elif kind is not None:
        return None
    query = ""
    if args.get("query_unreadable") is True:
        query = _UNREADABLE_QUERY
    elif "query" in args:
        values = _values(args["query"]) if "query_omitted" not in args else None
        if values is not None and all(_query_value(v) for v in values.values()):
            query = urlencode(list(_pairs(values)), quote_via=quote, safe="")
        else:
            query, query_unknown = _UNREADABLE_QUERY, True
    return _Material(body, truncated, query, frozenset(unknown), query_unknown, json_unknown)


def _query_value(v: object) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _pairs(values: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    for name, v in values.items():
        for one in v if isinstance(v, list) else [v]:
            yield name, one


def replay(snapshot: Snapshot, rec: Recorded) -> Replay:
    """Decide one recorded call again on ``snapshot``, or say why it cannot be."""
    r = _replay(snapshot, rec)
    if r.skipped != "task":
        return r
    # The new purpose requires a declared task and the call named one: whether it was
    # declared is run-time state, but a declaration only narrows what the rules allow, so
    # a call the rules alone deny is denied whatever it declared.
    untasked = _replay(_without_required_task(snapshot, rec), rec)
    if untasked.decision is not None and not untasked.decision.allowed:
        return untasked
    return r


def _without_required_task(snapshot: Snapshot, rec: Recorded) -> Snapshot:
    """``snapshot`` with `requireTask` off for the purposes of ``rec``'s agent (no
    recompiling: the compiled rules are shared)."""
    agent = snapshot.agents[rec.agent]
    purposes = {n: replace(p, require_task=False) for n, p in agent.purposes.items()}
    agents = {**snapshot.agents, rec.agent: replace(agent, purposes=purposes)}
    return replace(snapshot, agents=agents)


def _replay(snapshot: Snapshot, rec: Recorded) -> Replay:
    if rec.code not in _FULL and rec.code not in _EARLY:
        return Replay(rec, None, rec.code)
    if rec.elevated:
        return Replay(rec, None, "elevation")
    early = rec.code in _EARLY
    if not rec.agent or (not early and not (rec.method and rec.host and rec.port)):
        return Replay(rec, None, "unrebuildable")
    now = rec.at
    if early:
        d = decide(snapshot, rebuild(rec), now)
        if d.code not in _BEFORE_REQUEST:
            return Replay(rec, None, "request_not_recorded")
        return Replay(rec, d)
    if rec.arguments is not None and not ({"error", "omitted"} & rec.arguments.keys()):
        m = _material(rec.arguments)
        if m is None:
            return _recorded_tools_deny(snapshot, rec)
        view = rebuild(rec, m.body, query=m.query, truncated=m.truncated)
        d = decide(snapshot, view, now)
        if d.code == Code.OUTSIDE_PURPOSE:
            why = _unknown_constrained(snapshot, d, m.tools, m.query_unknown, m.json_unknown)
            if why:
                return Replay(rec, None, why)
    elif rec.tools:
        d = decide(snapshot, rebuild(rec, _tools_call(rec.tools)), now)
        if d.code == Code.OUTSIDE_PURPOSE and _unknown_constrained(snapshot, d, rec.tools):
            return Replay(rec, None, "mcp_arguments")
    else:
        d = decide(snapshot, rebuild(rec), now)
        if rec.method != _CONNECT:
            loose = decide(snapshot, rebuild(rec, _PERMISSIVE_BODY), now)
            if loose.allowed != d.allowed:
                return Replay(rec, None, "mcp_body")
    return _checked(rec, d)


def _checked(rec: Recorded, d: Decision) -> Replay:
    """The replay of ``rec`` decided ``d``, unless ``d`` rests on what replay cannot know."""
    if d.code == Code.OUTSIDE_TASK:  # the new purpose has requireTask
        if rec.task:  # was the task it named declared? run-time state
            return Replay(rec, None, "task")
        return Replay(rec, d)  # a call naming no task: refused by the new profiles
    if d.code not in _BEFORE_REQUEST and (
        d.code == Code.BAD_REQUEST
        or (d.method, d.host, d.port, d.path) != (rec.method, rec.host, rec.port, rec.path)
    ):
        return Replay(rec, None, "unrebuildable")  # the core did not see the recorded call
    return Replay(rec, d)


def _recorded_tools_deny(snapshot: Snapshot, rec: Recorded) -> Replay:
    """A call whose recorded arguments cannot rebuild it (an MCP batch cut short at 128
    messages, a body the trail withheld), replayed as its recorded tool calls alone: a
    batch passes only if every message does, and a deny rule matches any message that
    names its tool, so when these alone are denied, with no argument, query or body
    constraint of the purpose in play that the missing parts could have satisfied, the
    whole call is denied too. Anything else (an allow) stays unrebuildable."""
    unrebuildable = Replay(rec, None, "unrebuildable")
    if not rec.tools:
        return unrebuildable
    d = decide(snapshot, rebuild(rec, _tools_call(rec.tools)), rec.at)
    if d.allowed or d.code not in (Code.DENIED_BY_RULE, Code.OUTSIDE_PURPOSE, Code.OUTSIDE_TASK):
        return unrebuildable
    if d.code == Code.OUTSIDE_PURPOSE and _unknown_constrained(
        snapshot, d, rec.tools, query=True, json_body=True
    ):
        return unrebuildable
    r = _checked(rec, d)
    return r if r.decision is not None or r.skipped == "task" else unrebuildable


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True, slots=True)
class Example:
    """One past call that would change: what it was and what the new profiles say."""

    decision_id: str
    time: str
    method: str
    host: str
    port: int
    path: str
    tools: tuple[str, ...]
    reason: str  # the new decision's reason

    def to_json(self) -> dict[str, Any]:
        return {
            "decision_id": self.decision_id,
            "time": self.time,
            "method": self.method,
            "host": self.host,
            "port": self.port or None,
            "path": self.path or None,
            "tools": list(self.tools),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Group:
    """The past calls of one agent and purpose whose decision would change the same way:
    from (old code, old rule) to (new code, new rule)."""

    change: str  # ALLOW_TO_DENY or DENY_TO_ALLOW
    agent: str
    purpose: str  # as recorded
    new_purpose: str  # as the new profiles decided it ("" if it ended before a purpose)
    old_code: str
    old_rule: str
    new_code: str
    new_rule: str
    count: int
    examples: tuple[Example, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "agent": self.agent,
            "purpose": self.purpose or None,
            "old": {"code": self.old_code, "rule": self.old_rule or None},
            "new": {
                "code": self.new_code,
                "rule": self.new_rule or None,
                "purpose": self.new_purpose or None,
            },
            "count": self.count,
            "examples": [e.to_json() for e in self.examples],
        }


@dataclass(frozen=True, slots=True)
class Report:
    """What a simulation found. ``records``: the decision records read; ``unchanged``
    includes ``other_rule`` (same allow or deny, another rule or code)."""

    records: int = 0
    replayed: int = 0
    unchanged: int = 0
    other_rule: int = 0
    allow_to_deny: int = 0
    deny_to_allow: int = 0
    not_replayable: Mapping[str, int] = field(default_factory=dict)
    groups: tuple[Group, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.allow_to_deny or self.deny_to_allow)


_GroupKey = tuple[str, str, str, str, str, str, str, str]


def _example(rec: Recorded, d: Decision) -> Example:
    return Example(
        rec.decision_id, rec.time, rec.method, rec.host, rec.port, rec.path, rec.tools, d.reason
    )


def simulate(snapshot: Snapshot, records: Iterable[Recorded], *, limit: int = 5) -> Report:
    """Replay ``records`` (in the order given: the examples of a group are its first
    ``limit`` calls) against ``snapshot``. Streams: memory grows with the groups, not the
    records."""
    n = replayed = unchanged = other_rule = 0
    skipped: Counter[str] = Counter()
    counts: Counter[_GroupKey] = Counter()
    examples: dict[_GroupKey, list[Example]] = {}
    for rec in records:
        n += 1
        r = replay(snapshot, rec)
        d = r.decision
        if d is None:
            skipped[r.skipped] += 1
            continue
        replayed += 1
        change = r.change
        if not change:
            unchanged += 1
            other_rule += (d.code, d.rule) != (rec.code, rec.rule)
            continue
        key = (change, rec.agent, rec.purpose, d.purpose, rec.code, rec.rule, d.code, d.rule)
        counts[key] += 1
        shown = examples.setdefault(key, [])
        if len(shown) < limit:
            shown.append(_example(rec, d))
    order = {c: i for i, c in enumerate(_CHANGES)}
    keys = sorted(counts, key=lambda k: (order[k[0]], -counts[k], k))
    groups = tuple(Group(*k, counts[k], tuple(examples[k])) for k in keys)
    return Report(
        records=n,
        replayed=replayed,
        unchanged=unchanged,
        other_rule=other_rule,
        allow_to_deny=sum(g.count for g in groups if g.change == ALLOW_TO_DENY),
        deny_to_allow=sum(g.count for g in groups if g.change == DENY_TO_ALLOW),
        not_replayable=dict(sorted(skipped.items())),
        groups=groups,
    )


def report_json(report: Report) -> dict[str, Any]:
    """The report as one JSON document (stable keys; groups in the table's order)."""
    return {
        "changed": report.changed,
        "totals": {
            "records": report.records,
            "replayed": report.replayed,
            "unchanged": report.unchanged,
            "unchanged_other_rule": report.other_rule,
            ALLOW_TO_DENY: report.allow_to_deny,
            DENY_TO_ALLOW: report.deny_to_allow,
            "not_replayable": sum(report.not_replayable.values()),
        },
        "not_replayable": dict(report.not_replayable),
        "changes": [g.to_json() for g in report.groups],
    }


_TITLES = {ALLOW_TO_DENY: "allow -> deny", DENY_TO_ALLOW: "deny -> allow"}


def _outcome(code: str, rule: str) -> str:
    return f"{code} {rule}" if rule else code


def _call(e: Example) -> str:
    if e.method == _CONNECT:
        what = f"CONNECT {_authority(e.host, e.port)}"
    else:
        what = f"{e.method} {_authority(e.host, e.port)} {e.path or '/'}".rstrip()
    if e.tools:
        what += f" [tool {', '.join(e.tools)}]"
    return f"{e.time}  {e.decision_id}  {what}"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render_table(report: Report) -> str:
    """The report as text for people: totals, then each kind of change as a table of groups
    (agent, purpose, was, now, calls) with its example calls, then what was not replayed."""
    skipped = sum(report.not_replayable.values())
    lines = [
        f"{report.records} decision record(s): {report.replayed} replayed, "
        f"{report.unchanged} unchanged ({report.other_rule} by another rule or code), "
        f"{report.allow_to_deny} allow -> deny, {report.deny_to_allow} deny -> allow, "
        f"{skipped} not replayable"
    ]
    if not report.changed:
        lines.append("No replayed call would change.")
    for change in _CHANGES:
        groups = [g for g in report.groups if g.change == change]
        if not groups:
            continue
        total = sum(g.count for g in groups)
        lines += ["", f"{_TITLES[change]}: {total} call(s)"]
        rows: list[tuple[str, ...]] = [("AGENT", "PURPOSE", "WAS", "NOW", "CALLS")]
        for g in groups:
            purpose = g.purpose or "-"
            if g.new_purpose and g.new_purpose != g.purpose:
                purpose += f" -> {g.new_purpose}"
            was, now = _outcome(g.old_code, g.old_rule), _outcome(g.new_code, g.new_rule)
            rows.append((g.agent or "-", purpose, was, now, str(g.count)))
        header, *body = _columns(rows)
        lines.append("  " + header)
        for g, row in zip(groups, body, strict=True):
            lines.append("  " + row)
            lines += [f"      {_call(e)}" for e in g.examples]
            if g.count > len(g.examples) and g.examples:
                lines.append(f"      ... and {g.count - len(g.examples)} more")
    if report.not_replayable:
        lines += ["", f"not replayable: {skipped} record(s)"]
        rows = [
            (key, str(count), NOT_REPLAYABLE.get(key, "an outcome simulate does not know"))
            for key, count in report.not_replayable.items()
        ]
        lines += ["  " + row for row in _columns(rows)]
    return "\n".join(lines) + "\n"
