"""Proposing a profile from what an agent did (pure): the decision records of an audit trail
in, the YAML of an AgentProfile out, with comments that give the counts it was made from.

Which calls. A proposal allows what the agent was allowed to do: the calls recorded as
``allowed`` by the purpose's own rules (an elevation grant's are left out: they are
temporary by design), and, with ``include_denied``, the calls denied only for being outside
the purpose (``outside_purpose`` with no rule matching it: what an agent run under a
purpose too narrow for it was refused; not a call a rule matched and refused for its body,
a tool it does not list or an argument constraint: learning it would undo that
constraint). It never learns from calls denied by a deny rule, a revocation, a malformed
request or any run-time state: those stay denied. Run the agent under a wide purpose (an
allow rule without `hosts`: everything) to learn what it needs, then narrow to this.

What it proposes, per recorded purpose (same name, so that `mandate simulate` replays the
recording against it as recorded):
- allow rules per host (``host:port`` with the port the calls used, 80 and 443 too: a
  host without a port matches any port), method and path template (of
  `sidecar.policy.generalize`: `*` where segments vary, `**` only for justified tails,
  stable literal segments kept; `paths` always listed). Each (host, method, template) is
  of the strictest kind its calls show (MCP, then JSON body, then other); a call the
  rule of that kind would refuse (no body or not JSON-RPC beside MCP calls, no JSON
  object beside JSON bodies) is left out and counted, never given a rule of its own that
  would allow any body. Rules without constraints are merged: per host, the templates
  seen with the same set of methods;
- for MCP calls, `mcpTools` (the tools called), `mcpMethods` (methods beyond the session's
  `initialize`, `ping`, `tools/list` and notifications) and per tool `mcpArguments`; for
  JSON bodies `jsonBody`; for queries `query`: `type: object`, `properties`, `required`
  (the names every call had), `additionalProperties: false`, and per argument the domain
  `generalize` makes of its recorded values (enum, range, maxLength, pattern; from hashes
  only the type, with a comment counting distinct values).

The record must have kept what a constraint needs: a tool called without arguments (or
whose record kept none: profiles with `audit.arguments: none`, older records) gets no
`mcpArguments`; a rule with an unreadable query gets no `query`. A record without
`arguments` is read as a call without body or query when other records of the agent in the
window have them (the trail records arguments: it omits the member when there is nothing).

Only what the profile model can hold is proposed, checked by its own rules: a call whose
method (`M-SEARCH`) or host a rule cannot name is left out; a tool or MCP method name it
cannot list (empty, `tools/call` without a tool, a lone surrogate) is not listed (the rule
refuses it); an argument whose name the record does not show (hashed) or a profile cannot
hold is not listed and leaves `additionalProperties` open; a value no constraint can hold
(an integer beyond a float) gives the type only. Each is said in a comment. An agent whose
proposal still fails is named in `Suggestion.failed`; the other agents get theirs.

Replayed before it is returned. The proposal is validated as `mandate validate` does, and
the agent's records are replayed against it as `mandate simulate` replays them. A
recorded deny that the proposal would allow (a template wider than what was denied) gets a
deny rule for its exact method and path, unless an allowed call shares them (then it is
named in a comment for review). The header says how the replay came out.

With the agent's current profile (``current``), its owner, identities, defaultPurpose,
audit choice, behavior, elevations and credentials (those whose hosts are still allowed) are
kept, each learned purpose keeps its description, deny rules, rateLimit and requireTask, and
purposes with nothing learned are kept as they are; without, placeholders that validate.
This module must not import any transport, Kubernetes or telemetry library, and does no I/O.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from sidecar.core import Code, Snapshot
from sidecar.core.mcp import SESSION_METHODS
from sidecar.core.model import API_VERSION, KIND, AgentProfile, Rule
from sidecar.core.paths import validate_path_pattern
from sidecar.core.snapshot import CompiledAgent, SourceRef, compile_snapshot
from sidecar.policy.generalize import (
    covers,
    expressible,
    object_schema,
    path_templates,
    segments,
)
from sidecar.policy.simulate import Recorded, replay
from sidecar.policy.yamltext import Commented, render

__all__ = ["Suggestion", "suggest"]

_CONNECT = "CONNECT"


# ---------------------------------------------------------------------------------------------
# Calls


@dataclass(slots=True)
class _Call:
    rec: Recorded
    host: str  # as a rule names it
    kind: str  # "mcp", "json", "connect" or "plain"
    messages: list[Mapping[str, Any]] = field(default_factory=list)
    # A record without `arguments` means "no body, no query" (rather than "not recorded")
    # when the agent's trail records arguments: some record of the window has them.
    bare: bool = False


def _host_text(rec: Recorded) -> str:
    """The host as a rule names it, with the port the call used: a host pattern without a
    port matches any port (`sidecar.core.hosts`), so even 80 and 443 are written."""
    if rec.port:
        return f"{rec.host}:{rec.port}"
    return rec.host


def _call(rec: Recorded, recording: bool) -> _Call:
    host = _host_text(rec)
    args = (
        rec.arguments
        if rec.arguments is not None and not ({"error", "omitted"} & rec.arguments.keys())
        else None
    )
    if rec.method == _CONNECT:
        return _Call(rec, host, "connect")
    if args is not None and isinstance(args.get("mcp"), list):
        messages = [m for m in args["mcp"] if isinstance(m, Mapping)]
        return _Call(rec, host, "mcp", messages)
    if args is None and rec.tools:
        return _Call(rec, host, "mcp", [{"method": "tools/call", "tool": t} for t in rec.tools])
    if args is not None and isinstance(args.get("json"), Mapping):
        return _Call(rec, host, "json")
    return _Call(rec, host, "plain", bare=recording and rec.arguments is None)


@functools.lru_cache(maxsize=4096)
def _nameable(field_name: str, value: str) -> bool:
    """Whether a rule's ``field_name`` (`methods`, `hosts`, `mcpTools`, `mcpMethods`) can
    hold ``value``: the profile model's own check, and a string UTF-8 can hold."""
    if not expressible(value):
        return False
    try:
        Rule.model_validate({field_name: [value]})
    except ValueError:
        return False
    return True


def _unnameable(c: _Call) -> str:
    """Why a rule cannot name the call's method or host ("" if it can)."""
    if c.rec.method != _CONNECT and not _nameable("methods", c.rec.method):
        return "a method a profile cannot name"
    if not _nameable("hosts", c.host):
        return "a host a profile cannot name"
    return ""


def _key_id(rec: Recorded) -> str:
    args = rec.arguments or {}
    key = args.get("key")
    return key if isinstance(key, str) else ""


# ---------------------------------------------------------------------------------------------
# Rules


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


_KIND_NEEDS = {
    "mcp": "without an MCP body (none, not JSON-RPC, or not recorded) not learned: this "
    "rule refuses them; a rule without mcpTools would allow any tool",
    "json": "without a JSON object body (none, or not JSON) not learned: this rule refuses "
    "them; a rule without jsonBody would allow any body",
}

_Cell = tuple[str, str, str]  # (host, path template, method)


def _cells(
    calls: Sequence[_Call],
) -> tuple[dict[_Cell, list[_Call]], list[tuple[_Call, str]]]:
    """The calls by host, path template and method, each cell of one kind: the strictest
    its calls show (MCP, then a JSON body, then anything). A call the cell's rule would not
    admit (a body-less call beside MCP ones) is left out (second value), never given a
    rule of its own: that rule would allow any body, and so shadow the constrained one.
    Each call left out comes with the kind of the cell that refused it."""
    pending = list(calls)
    left: list[tuple[_Call, str]] = []
    while True:
        cells: dict[_Cell, list[_Call]] = {}
        by_host: dict[str, list[_Call]] = {}
        for c in pending:
            by_host.setdefault(c.host, []).append(c)
        for host, group in by_host.items():
            templates = path_templates(c.rec.path or "/" for c in group)
            template_of = {p: t for t, paths in templates.items() for p in paths}
            for c in group:
                key = (host, template_of[c.rec.path or "/"], c.rec.method)
                cells.setdefault(key, []).append(c)
        dropped: list[tuple[_Call, str]] = []
        for key, cell in cells.items():
            kinds = {c.kind for c in cell}
            kind = next((k for k in ("mcp", "json") if k in kinds), "plain")
            dropped += [(c, kind) for c in cell if c.kind != kind]
            cells[key] = [c for c in cell if c.kind == kind]
        if not dropped:  # templates made without the calls left out: stable
            return cells, left
        left += dropped
        dropped_ids = {id(c) for c, _ in dropped}
        pending = [c for c in pending if id(c) not in dropped_ids]


def _rules(calls: Sequence[_Call]) -> tuple[list[Commented], list[tuple[_Call, str]]]:
    """The allow rules for one purpose's calls, and the calls left out of them (why)."""
    left: list[tuple[_Call, str]] = []
    usable: list[_Call] = []
    for c in calls:
        why = _unnameable(c)
        if why:
            left.append((c, why))
        else:
            usable.append(c)
    rules: list[tuple[tuple[str, str, str], Commented]] = []
    connect: dict[str, list[_Call]] = {}
    for c in usable:
        if c.kind == "connect":
            connect.setdefault(c.host, []).append(c)
    for host, group in connect.items():
        rule = Commented([f"{_plural(len(group), 'tunnel')} (CONNECT)"])
        rule.add("hosts", [host])
        rule.add("methods", [_CONNECT])
        rules.append(((host, "", _CONNECT), rule))
    cells, mismatched = _cells([c for c in usable if c.kind != "connect"])
    left_in: dict[_Cell, int] = {}
    for c, kind in mismatched:
        left.append((c, f"no body {'an MCP' if kind == 'mcp' else 'a JSON body'} rule admits"))
        for key, cell in cells.items():
            if (
                key[0] == c.host
                and key[2] == c.rec.method
                and cell
                and cell[0].kind == kind
                and covers(key[1], c.rec.path or "/")
            ):
                left_in[key] = left_in.get(key, 0) + 1
                break
    # cells without constraints are exact together: their templates by the set of methods
    # seen on them, one rule per host and set (a constrained cell is a rule of its own)
    free: dict[tuple[str, str], list[_Call]] = {}
    for key, cell in sorted(cells.items()):
        if not cell:
            continue
        host, template, method = key
        rule = _rule(host, [method], {template: cell}, left_in.get(key, 0))
        if len(rule.items) == 3:  # hosts, methods, paths: nothing else
            free.setdefault((host, template), []).extend(cell)
        else:
            rules.append(((host, template, method), rule))
    by_methods: dict[tuple[str, tuple[str, ...]], dict[str, list[_Call]]] = {}
    for (host, template), cell in free.items():
        methods = tuple(sorted({c.rec.method for c in cell}))
        by_methods.setdefault((host, methods), {})[template] = cell
    for (host, methods), per_template in by_methods.items():
        rule = _rule(host, list(methods), per_template, 0)
        rules.append(((host, min(per_template), methods[0]), rule))
    return [r for _, r in sorted(rules, key=lambda x: x[0])], left


def _rule(
    host: str, methods: list[str], per_template: Mapping[str, list[_Call]], left_out: int
) -> Commented:
    paths = sorted(per_template)
    paths = [p for p in paths if not any(o != p and covers(o, p) for o in paths)]
    calls = [c for t in sorted(per_template) for c in per_template[t]]
    kind = calls[0].kind
    distinct = len({c.rec.path or "/" for c in calls})
    what = {"mcp": "MCP call", "json": "call"}.get(kind, "call")
    above = f"{_plural(len(calls), what)}{' with a JSON body' if kind == 'json' else ''}, "
    above += _plural(distinct, "distinct path")
    rule = Commented([above])
    if left_out:
        rule.above.append(f"{_plural(left_out, 'call')} {_KIND_NEEDS[kind]}")
    rule.add("hosts", [host])
    rule.add("methods", methods)
    rule.add("paths", paths)
    if kind == "mcp":
        _mcp(rule, calls)
    elif kind == "json":
        entries = [
            (c.rec.arguments["json"], _key_id(c.rec), "json_omitted" in c.rec.arguments)
            for c in calls
            if c.rec.arguments is not None
        ]
        rule.add("jsonBody", object_schema(entries))
    _query(rule, calls)
    return rule


def _session(m: Mapping[str, Any]) -> bool:
    method = m.get("method")
    if m.get("response") is True or not isinstance(method, str):
        return True
    notification = m.get("notification") is True
    return method in SESSION_METHODS or (notification and method.startswith("notifications/"))


def _mcp(rule: Commented, calls: Sequence[_Call]) -> None:
    tools: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    session: Counter[str] = Counter()
    arguments: dict[str, list[tuple[Mapping[str, Any], str, bool] | None]] = {}
    unnamed: Counter[str] = Counter()  # messages naming what a profile cannot hold
    for c in calls:
        for m in c.messages:
            tool = m.get("tool")
            method = m.get("method")
            if isinstance(tool, str):
                if not _nameable("mcpTools", tool):
                    unnamed["tool"] += 1
                    continue
                tools[tool] += 1
                args = m.get("args")
                seen = arguments.setdefault(tool, [])
                if isinstance(args, Mapping):
                    seen.append((args, _key_id(c.rec), "args_omitted" in m))
                else:
                    seen.append(None)
            elif not isinstance(method, str) or m.get("response") is True:
                continue  # a response: nothing a rule lists
            elif not _nameable("mcpMethods", method):
                unnamed["method"] += 1
            elif _session(m):
                session[method] += 1
            else:
                methods[method] += 1
    for what, n in sorted(unnamed.items()):
        rule.above.append(
            f"{_plural(n, 'message')} naming a {what} a profile cannot list (empty, "
            f"{'tools/call without a tool, ' if what == 'method' else ''}a lone surrogate): "
            "left out, so this rule refuses them"
        )
    counts = ", ".join(f"{t}: {n}" for t, n in sorted(tools.items()))
    if tools:
        rule.add("mcpTools", sorted(tools), counts)
    if methods or not tools:
        listed = methods or session or Counter({"ping": 0})
        rule.add(
            "mcpMethods",
            sorted(listed),
            ", ".join(f"{m}: {n}" for m, n in sorted(listed.items()) if n),
        )
    constrained = Commented()
    for tool in sorted(arguments):
        seen = arguments[tool]
        if all(s is not None for s in seen):
            constrained.add(tool, object_schema([s for s in seen if s is not None]))
        else:
            rule.above.append(
                f"{tool}: {sum(s is None for s in seen)} of {len(seen)} calls without "
                "recorded arguments: no mcpArguments"
            )
    if constrained.items:
        rule.add("mcpArguments", constrained)


def _query(rule: Commented, calls: Sequence[_Call]) -> None:
    """A `query` constraint when every call's record says what its query was (and no
    query was unreadable or cut short), and some call had one."""
    entries: list[tuple[Mapping[str, Any], str, bool]] = []
    for c in calls:
        args = c.rec.arguments if not c.bare else {}
        if args is None or "error" in args or "omitted" in args or args.get("query_unreadable"):
            return
        query = args.get("query")
        if query is not None and not isinstance(query, Mapping):
            return
        entries.append((query or {}, _key_id(c.rec), "query_omitted" in args))
    if any(e for e, _, _ in entries):
        rule.add("query", object_schema(entries))


# ---------------------------------------------------------------------------------------------
# The proposal


@dataclass(frozen=True, slots=True)
class Suggestion:
    """The proposal (YAML, one document per agent) and what it was made from."""

    text: str
    agents: tuple[str, ...]
    records: int  # decision records read (of the agents and purposes asked for)
    used: int  # calls the rules were made from
    changes: int  # recorded calls the proposal would decide otherwise (see the header)
    failed: tuple[tuple[str, str], ...] = ()  # (agent, why) whose proposal could not be made


def _withheld(rec: Recorded) -> bool:
    """The trail let the call's body go unread (`sidecar.audit.writer`): what it held is
    unknown, so no rule is learned from it (one without an MCP or body constraint would
    allow any body)."""
    return rec.arguments is not None and rec.arguments.get("body") == "withheld"


def _refused_by_rule(rec: Recorded) -> bool:
    """An `outside_purpose` deny where a rule matched the call's host, method and path but
    refused its body: a tool it does not list, an argument constraint (`breaks maximum`,
    `lacks one of required`), a missing body. The record keeps no separate field for it;
    the reason does: `decide` appends the refusal (`outside purpose 'p': ...`) and says
    exactly `outside purpose 'p'` when no rule matched at all. Learning such a call would
    widen, or undo, the very constraint that refused it."""
    return rec.code == Code.OUTSIDE_PURPOSE and rec.reason != f"outside purpose {rec.purpose!r}"


def _usable(rec: Recorded, include_denied: bool) -> bool:
    if _withheld(rec):
        return False
    if rec.code == Code.ALLOWED:
        return not rec.elevated
    return include_denied and rec.code == Code.OUTSIDE_PURPOSE and not _refused_by_rule(rec)


def _dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True, mode="json")


def _audit_block(records: Sequence[Recorded]) -> dict[str, Any] | None:
    """`spec.audit` as the records show it was chosen: values kept in clear, hashes."""
    values: set[str] = set()
    hashed = typed = False

    def visit(entries: object) -> None:
        nonlocal hashed, typed
        if not isinstance(entries, Mapping):
            return
        for name, e in entries.items():
            if isinstance(e, Mapping):
                if "value" in e:
                    if name and expressible(name) and not name.startswith("#"):
                        values.add(name)  # (a name `spec.audit.values` can list)
                elif "hash" in e or "unhashable" in e:
                    hashed = True
                else:
                    typed = True

    for rec in records:
        args = rec.arguments
        if not args:
            continue
        hashed |= args.get("key") is not None
        visit(args.get("json"))
        visit(args.get("query"))
        for m in args.get("mcp") or ():
            if isinstance(m, Mapping):
                visit(m.get("args"))
    if not (values or hashed or typed):
        return None
    block: dict[str, Any] = {"arguments": "hashes" if hashed or not typed else "types"}
    if values:
        block["values"] = sorted(values)
    return block


def _profile(
    agent: str,
    records: Sequence[Recorded],
    used: Sequence[Recorded],
    current: CompiledAgent | None,
    extra_deny: Mapping[str, list[dict[str, Any]]],
) -> tuple[Commented, list[tuple[_Call, str]]]:
    """The proposal, and the usable calls it could not learn from (why)."""
    spec = Commented()
    left: list[tuple[_Call, str]] = []
    by_purpose: dict[str, list[_Call]] = {}
    recording = any(r.arguments for r in records)
    for rec in used:
        by_purpose.setdefault(rec.purpose, []).append(_call(rec, recording))
    profile = current.profile if current is not None else None
    if profile is not None:
        spec.add("owner", profile.spec.owner)
        spec.add("identities", [_dump(i) for i in profile.spec.identities])
    else:
        owners = Counter(r.owner for r in records if r.owner)
        owner = owners.most_common(1)[0][0] if owners else "unknown"
        spec.add("owner", owner, "as recorded" if owners else "placeholder: the owning team")
        spec.add(
            "identities",
            [],
            "placeholder: add the agent's serviceAccount (namespace/name) or spiffe id",
        )
    purposes = Commented()
    kept = dict(profile.spec.purposes) if profile is not None else {}
    for name in sorted(set(by_purpose) | set(kept)):
        calls = by_purpose.get(name)
        old = kept.get(name)
        rules: list[Commented] = []
        if calls:
            rules, out = _rules(calls)
            left += out
            out_ids = {id(c) for c, _ in out}
            calls = [c for c in calls if id(c) not in out_ids]
        if not rules:
            if old is None:
                continue  # nothing it did can be written as a rule
            why = "can be written as a rule" if calls is not None else ""
            p = Commented(
                [f"kept from the current profile: no recorded call of purpose {name!r} {why}"]
            )
            for k, v in _dump(old).items():
                p.add(k, v)
            purposes.add(name, p)
            continue
        assert calls
        hosts = {c.host for c in calls}
        p = Commented()
        if old is not None and old.description:
            p.add("description", old.description)
        p.add("allow", rules, f"{_plural(len(calls), 'call')}, {_plural(len(hosts), 'host')}")
        deny = [_dump(d) for d in old.deny] if old is not None else []
        deny += extra_deny.get(name, [])
        if deny:
            p.add("deny", deny)
        if old is not None and old.rate_limit is not None:
            p.add("rateLimit", _dump(old.rate_limit))
        if old is not None and old.require_task:
            p.add("requireTask", True)
        purposes.add(name, p)
    names = [k for k, _, _ in purposes.items]
    if not names:
        raise ValueError(
            "none of its calls can be written as a rule: "
            + "; ".join(sorted({why for _, why in left}))
        )
    default = profile.spec.default_purpose if profile is not None else None
    if default not in names:
        counts = Counter(r.purpose for r in used)
        default = max(names, key=lambda n: (counts[n], n == default)) if names else None
    if default:
        spec.add("defaultPurpose", default)
    audit = _dump(profile.spec.audit) if profile is not None and profile.spec.audit else None
    if profile is None:
        audit = _audit_block(records)
    if audit:
        spec.add("audit", audit, "" if profile is not None else "as the trail was recorded")
    spec.add("purposes", purposes)
    if profile is not None:
        if profile.spec.elevations:
            spec.add("elevations", {k: _dump(v) for k, v in profile.spec.elevations.items()})
        if profile.spec.behavior is not None:
            spec.add("behavior", _dump(profile.spec.behavior))
        if profile.spec.credentials:
            spec.add("credentials", {k: _dump(v) for k, v in profile.spec.credentials.items()})
    metadata: dict[str, Any] = {"name": agent}
    if profile is not None and profile.metadata.namespace:
        metadata["namespace"] = profile.metadata.namespace
    doc = Commented()
    doc.add("apiVersion", API_VERSION)
    doc.add("kind", KIND)
    doc.add("metadata", metadata)
    doc.add("spec", spec)
    return doc, left


def _validated(doc: Commented) -> tuple[str, AgentProfile]:
    """The document's YAML and the profile it reads back as (ValueError if it is not valid:
    a bug here, not bad input)."""
    text = render(doc)
    loaded = yaml.safe_load(text)
    return text, AgentProfile.model_validate(loaded)


def _drop_uncovered_credentials(doc: Commented) -> list[str]:
    """Credentials whose hosts no purpose or elevation allows any more fail validation:
    drop them, and say which."""
    spec = next(v for k, v, _ in doc.items if k == "spec")
    at = next((i for i, (k, _, _) in enumerate(spec.items) if k == "credentials"), None)
    if at is None:
        return []
    creds = dict(spec.items[at][1])
    dropped = []
    for name in sorted(creds):
        spec.items[at] = ("credentials", {name: creds[name]}, "")
        try:
            _validated(doc)
        except ValueError:
            dropped.append(name)
    kept = {k: v for k, v in creds.items() if k not in dropped}
    if kept:
        spec.items[at] = ("credentials", kept, "")
    else:
        del spec.items[at]
    return dropped


def _header(
    agent: str,
    source: str,
    records: Sequence[Recorded],
    used: Sequence[Recorded],
    include_denied: bool,
    left: Sequence[tuple[_Call, str]],
) -> list[str]:
    first, last = (records[0].time, records[-1].time) if records else ("", "")
    learned = {id(r) for r in used} | {id(c.rec) for c, _ in left}
    not_used = Counter(
        "body_withheld"
        if _withheld(r)
        else "elevation"
        if r.elevated
        else "outside_purpose refused by a rule's constraint"
        if include_denied and _refused_by_rule(r)
        else r.code
        for r in records
        if id(r) not in learned
    )
    lines = [
        f"Suggested by `mandate profile suggest` for agent {agent} from {source}: "
        f"{_plural(len(records), 'decision record')} from {first} to {last}.",
        f"Made from {_plural(len(used), 'call')}: allowed"
        + (" or denied outside_purpose (--include-denied)" if include_denied else "")
        + " by the purpose's own rules.",
    ]
    if not_used:
        lines.append(
            "Not learned from: "
            + ", ".join(f"{n} {code}" for code, n in sorted(not_used.items()))
            + " (they stay denied, or were allowed only by a grant)."
        )
    if left:
        whys = Counter(why for _, why in left)
        lines.append(
            f"Left out: {_plural(len(left), 'call')} no rule can allow without allowing more "
            "than it did ("
            + ", ".join(f"{n} with {why}" for why, n in sorted(whys.items()))
            + "): the proposal refuses them (see `Would change`)."
        )
    lines.append("Review every rule: it allows what the agent did in this window, no more.")
    return lines


def suggest(
    records: Iterable[Recorded],
    *,
    current: Snapshot | None = None,
    purpose: str | None = None,
    include_denied: bool = False,
    source: str = "the audit trail",
) -> Suggestion:
    """Propose a profile per agent of ``records`` (one YAML document each, in agent order);
    ``purpose``: learn only that purpose. An agent with no usable call is left out; no
    agent at all: a Suggestion with no agents (and no text). An agent whose proposal fails
    (a bug, or a call nothing here foresaw) is named in ``failed`` with why; the others
    still get theirs."""
    by_agent: dict[str, list[Recorded]] = {}
    for rec in records:
        if rec.agent and (purpose is None or rec.purpose == purpose):
            by_agent.setdefault(rec.agent, []).append(rec)
    texts, agents = [], []
    failed: list[tuple[str, str]] = []
    total = used_total = changes_total = 0
    for agent in sorted(by_agent):
        recs = sorted(by_agent[agent], key=lambda r: r.time)
        used = [r for r in recs if _usable(r, include_denied)]
        total += len(recs)
        if not used:
            continue
        compiled = current.agents.get(agent) if current is not None else None
        try:
            text, learned, changes = _suggest_agent(
                agent, recs, used, compiled, include_denied, source
            )
        except Exception as exc:  # one agent's calls must not cost the others their proposal
            failed.append((agent, f"{type(exc).__name__}: {_one_line(str(exc))}"))
            continue
        texts.append(text)
        agents.append(agent)
        used_total += learned
        changes_total += changes
    return Suggestion(
        "---\n".join(texts), tuple(agents), total, used_total, changes_total, tuple(failed)
    )


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line of printable ASCII (what a terminal shows as it is)."""
    flat = "".join(
        c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
        for c in " ".join(text.split())
    )
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _suggest_agent(
    agent: str,
    recs: Sequence[Recorded],
    used: Sequence[Recorded],
    current: CompiledAgent | None,
    include_denied: bool,
    source: str,
) -> tuple[str, int, int]:
    """The proposal's YAML, the calls it was made from, and how many recorded calls it
    would decide otherwise."""
    extra_deny: dict[str, list[dict[str, Any]]] = {}
    learned = {r.purpose for r in used}
    replayed = [r for r in recs if r.purpose in learned]
    allowed_calls = {(r.host, r.port, r.method, r.path) for r in used}
    used_ids = {id(r) for r in used}
    unresolved: list[str] = []
    for attempt in range(2):
        doc, left = _profile(agent, recs, used, current, extra_deny)
        dropped = _drop_uncovered_credentials(doc)
        text, profile = _validated(doc)
        snap = compile_snapshot([(profile, SourceRef("suggested", 1))])
        outcome: Counter[str] = Counter()
        changed = []
        for rec in replayed:
            r = replay(snap, rec)
            if r.decision is None:
                outcome["not replayable"] += 1
            elif r.change:
                changed.append((rec, r.change))
            else:
                outcome["unchanged"] += 1
        fixable = [
            rec
            for rec, change in changed
            if attempt == 0
            and change == "deny_to_allow"
            and id(rec) not in used_ids
            and not rec.tools
            and rec.method != _CONNECT
            and _nameable("methods", rec.method)
            and _nameable("hosts", _host_text(rec))
            and (rec.host, rec.port, rec.method, rec.path) not in allowed_calls
            and _literal_path(rec.path)
        ]
        if fixable:
            for rec in fixable:
                rule = {"hosts": [_host_text(rec)], "methods": [rec.method], "paths": [rec.path]}
                if rule not in extra_deny.setdefault(rec.purpose, []):
                    extra_deny[rec.purpose].append(rule)
            continue
        unresolved = [
            f"{rec.decision_id} {rec.method} {_host_text(rec)}{rec.path} "
            f"({change.replace('_', ' ')})"
            for rec, change in changed
        ]
        break
    summary = (
        f"Replayed over the {_plural(len(replayed), 'record')} of its purposes (as "
        f"`mandate simulate` does): {outcome['unchanged']} unchanged, "
        f"{outcome['not replayable']} not replayable, {len(changed)} would change."
    )
    notes = [summary]
    if any(extra_deny.values()):
        n = sum(len(v) for v in extra_deny.values())
        notes.append(f"{_plural(n, 'deny rule')} added for recorded denies a template would allow.")
    if unresolved:
        notes.append("Would change (review): " + "; ".join(unresolved[:5]))
        if len(unresolved) > 5:
            notes.append(f"... and {len(unresolved) - 5} more.")
    if dropped:
        notes.append(
            "Credentials left out (no proposed rule allows their hosts): " + ", ".join(dropped)
        )
    left_ids = {id(c.rec) for c, _ in left}
    learned_from = [r for r in used if id(r) not in left_ids]
    header = _header(agent, source, recs, learned_from, include_denied, left)
    doc.above = header[:-1] + notes + header[-1:]
    text, _ = _validated(doc)
    return text, len(learned_from), len(changed)


def _literal_path(path: str) -> bool:
    try:
        validate_path_pattern(path or "/")
    except ValueError:
        return False
    return not any(seg in ("*", "**") for seg in segments(path))
