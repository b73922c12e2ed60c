"""What the AgentDojo benchmark replays and the profiles it replays against (pure: no I/O, no
agentdojo, no mandate import; tested offline by tests/unit/test_bench_agentdojo.py).

The ground truth (bench/agentdojo/extract.py's JSON) becomes :class:`Suite` values. Profiles
and task declarations are written **from the user tasks only**; injection tasks are only
replayed, never read here to write a rule. Configurations (:data:`CONFIGS`):

- ``names-suite``: one purpose per suite, `mcpTools` = the union of the user tasks' tools;
- ``names-task``: one purpose per user task, `mcpTools` = that task's tools;
- ``arguments``: one purpose per user task, its tools and `mcpArguments` (:func:`tool_schema`);
- ``narrowing``: the ``names-suite`` purpose, and each session first declares (context API
  ReportTask `allow`) the ``arguments`` rule of its user task; its calls name the task;
- ``narrowing-prompt``: as ``narrowing``, but the declaration pins only the values the user
  task's prompt names (:func:`named_in`): what can be declared before any data is read.

Argument rules (:func:`tool_schema`), chosen to generalise beyond the ground truth's exact
wording, by what an argument *is*, never by what an injection does:

- every tool: `type: object`, only the parameters of the tool's signature
  (`additionalProperties: false`);
- **principals** (who receives data or access: :data:`PRINCIPALS`, e.g. `recipients`,
  `participants`, `email`): pinned on every tool to the values the task used (`enum`, for a
  list each item); a principal the task never passes may only be absent, null or empty;
- **free text** the agent composes (:data:`FREE_TEXT`, e.g. `subject`, `body`, `title`,
  `query`): the signature's type only, everywhere;
- everything else on a tool that **changes state** (:func:`is_write`: `send_`, `create_`,
  `delete_`, `reserve_`, ...): pinned to what the task used: strings by `enum`, dates and times
  by the day(s) only (`pattern: ^(2024-05-19)`, the hour is the agent's choice), numbers by
  `maximum`, lists item by item, objects property by property; a pinned parameter the task
  never passes may only be absent, null or empty;
- everything else on a tool that only reads: the signature's type.

A session is a user task's calls in order; a security case splices an injection task's calls
into it after the user task's first call (the injection arrives in a tool's result).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONFIGS",
    "FREE_TEXT",
    "MCP_PATH",
    "PRINCIPALS",
    "SUITE_PURPOSE",
    "WRITE_VERBS",
    "Call",
    "Config",
    "Session",
    "Step",
    "Suite",
    "Task",
    "agent_name",
    "argument_role",
    "declaration",
    "is_write",
    "mcp_host",
    "named_in",
    "pin",
    "profile",
    "purpose_name",
    "sessions",
    "signature_schema",
    "suite_from_json",
    "task_rule",
    "tool_schema",
]

MCP_PATH = "/mcp"
# Who receives data or access: pinned on every tool (the injected recipient is the attack).
PRINCIPALS = frozenset(
    {"recipients", "recipient", "to", "cc", "bcc", "participants", "attendees", "email",
     "emails", "user", "users", "member", "members"}
)  # fmt: skip
# Text the agent composes or searches with: its wording is the model's, never pinned.
FREE_TEXT = frozenset(
    {"subject", "body", "content", "text", "message", "title", "description", "location",
     "query", "note", "notes", "comment", "summary"}
)  # fmt: skip
# A tool whose name starts with one of these changes state (else it only reads).
WRITE_VERBS = (
    "send", "create", "delete", "remove", "cancel", "reschedule", "add", "append", "share",
    "reserve", "book", "update", "set", "write", "post", "pay", "transfer", "schedule",
    "invite", "move", "rename", "edit",
)  # fmt: skip
_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[ T]|$)")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


# -- the data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    tool: str
    args: Mapping[str, Any]  # JSON values

    def body(self, rpc_id: str) -> bytes:
        """The MCP `tools/call` JSON-RPC request of this call."""
        params = {"name": self.tool, "arguments": dict(self.args)}
        msg = {"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call", "params": params}
        return json.dumps(msg, sort_keys=True).encode()


@dataclass(frozen=True)
class Task:
    id: str
    calls: tuple[Call, ...]
    text: str = ""  # the prompt or goal, for the report only

    @property
    def tools(self) -> list[str]:
        """The task's tools, in order of first use."""
        return list(dict.fromkeys(c.tool for c in self.calls))


@dataclass(frozen=True)
class Suite:
    name: str
    tools: Mapping[str, Mapping[str, Any]]  # tool -> the JSON Schema of its parameters
    user_tasks: tuple[Task, ...]
    injection_tasks: tuple[Task, ...]

    def user_tools(self) -> list[str]:
        """The union of the user tasks' tools, in order of first use."""
        return list(dict.fromkeys(t for task in self.user_tasks for t in task.tools))


def _task(doc: Mapping[str, Any]) -> Task:
    calls = tuple(Call(str(c["tool"]), dict(c["args"])) for c in doc["calls"])
    return Task(str(doc["id"]), calls, str(doc.get("text", "")))


def suite_from_json(name: str, doc: Mapping[str, Any]) -> Suite:
    """A suite of extract.py's JSON (``doc`` = ``json["suites"][name]``)."""
    return Suite(
        name,
        {str(k): dict(v) for k, v in doc["tools"].items()},
        tuple(_task(t) for t in doc["user_tasks"]),
        tuple(_task(t) for t in doc["injection_tasks"]),
    )


# -- configurations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    id: str
    title: str  # for the table
    per_task: bool  # one purpose per user task (else one per suite)
    arguments: bool  # argument rules (in the purpose, or in the declaration)
    narrowing: bool  # sessions declare their task through the context API
    prompt_only: bool = False  # pin only values the user task's prompt names


CONFIGS = (
    Config("names-suite", "1a names, one purpose per suite", False, False, False),
    Config("names-task", "1b names, one purpose per user task", True, False, False),
    Config("arguments", "2 argument rules, one purpose per user task", True, True, False),
    Config("narrowing", "3a task narrowing: suite purpose + declared task", False, True, True),
    Config(
        "narrowing-prompt",
        "3b task narrowing, declaring only values the prompt names",
        False,
        True,
        True,
        prompt_only=True,
    ),
)


def agent_name(suite: str, config: str) -> str:
    name = f"{suite}-{config}".lower()
    if not _NAME.match(name):
        raise ValueError(f"{name!r} cannot be an agent name")
    return name


def mcp_host(suite: str) -> str:
    return f"{suite}.mcp.agentdojo.test"


def purpose_name(task_id: str) -> str:
    """A user task's purpose (user_task_13 -> user_task_13): a profile name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", task_id.lower()).strip("-._")[:63]
    if not _NAME.match(name):
        raise ValueError(f"{task_id!r} cannot be a purpose name")
    return name


SUITE_PURPOSE = "suite"


# -- argument rules ------------------------------------------------------------------------

_MONTHS = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december",
)  # fmt: skip


def _day_named(iso: str, text: str) -> bool:
    """Whether ``text`` names the day ``iso`` (YYYY-MM-DD): as is, or as "May 19(th)" or
    "19(th) (of) May" (full or three-letter month; the year is not required)."""
    if iso in text:
        return True
    month, day = int(iso[5:7]), int(iso[8:10])
    if not 1 <= month <= 12:
        return False
    name = _MONTHS[month - 1]
    mon = f"(?:{name}|{name[:3]})"
    d = rf"0?{day}(?:st|nd|rd|th)?"
    pattern = rf"(?<!\w){mon}\.? {d}(?!\d)|(?<!\d){d} (?:of )?{mon}(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def named_in(value: Any, text: str) -> bool:
    """Whether a user task's prompt ``text`` names ``value`` (what a declaration made before
    reading any data could pin): every string in it appears as a word (a date: its day, see
    :func:`_day_named`), every number as a word; null and booleans need no naming."""
    if isinstance(value, list):
        return all(named_in(v, text) for v in value)
    if isinstance(value, dict):
        return all(named_in(v, text) for v in value.values())
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, str):
        m = _DATE.match(value)
        if m:
            return _day_named(m.group(1), text)
        word = rf"(?<!\w){re.escape(value)}(?!\w)"
        return re.search(word, text, re.IGNORECASE) is not None
    return re.search(rf"(?<![\w.]){re.escape(str(value))}(?![\w.])", text) is not None


def is_write(tool: str) -> bool:
    """Whether ``tool`` changes state, from its verb (``send_email``: yes; ``get_*``,
    ``search_*``, ``list_*``, ``check_*``: no)."""
    verb = tool.lower().split("_", 1)[0]
    return verb in WRITE_VERBS


def argument_role(tool: str, name: str) -> str:
    """ "principal", "text" (free text) or "value" (pinned on a write, typed on a read)."""
    low = name.lower()
    if low in PRINCIPALS:
        return "principal"
    if low in FREE_TEXT:
        return "text"
    return "value" if is_write(tool) else "typed"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"{type(value).__name__} is not JSON")


def _types(types: Iterable[str]) -> str | list[str]:
    order = ["string", "integer", "number", "boolean", "array", "object", "null"]
    got = sorted(set(types), key=order.index)
    if "integer" in got and "number" in got:
        got.remove("integer")
    return got[0] if len(got) == 1 else got


def pin(values: Sequence[Any]) -> dict[str, Any]:
    """A schema allowing exactly the kind of values seen, as narrowly as generalises: strings
    by `enum` (dates and times by their day: `pattern`), numbers up to the largest seen,
    booleans by `enum`, lists item by item (no item seen: empty only), objects property by
    property (nothing else), null if null was seen. ``values`` must not be empty."""
    if not values:
        raise ValueError("pin: no value to pin")
    kinds = {_json_type(v) for v in values}
    present = [v for v in values if v is not None]
    schema: dict[str, Any] = {"type": _types(kinds)}
    if not present:
        return schema
    kind = {_json_type(v) for v in present}
    if len(kind) > 1 and kind != {"integer", "number"}:
        # mixed kinds: the values themselves (rare; nothing in the suites)
        return {"enum": _unique(values)}
    first = _json_type(present[0])
    if first == "string":
        days = [_DATE.match(v) for v in present]
        if all(days):
            wanted = sorted({m.group(1) for m in days if m})
            schema["pattern"] = "^(" + "|".join(wanted) + ")([ T]|$)"  # digits and -
        else:
            schema["enum"] = _unique(values)
    elif first in ("integer", "number"):
        schema["maximum"] = max(present)
    elif first == "boolean":
        schema["enum"] = _unique(values)
    elif first == "array":
        items = [x for v in present for x in v]
        if items:
            schema["items"] = pin(items)
        else:
            schema["maxItems"] = 0
    elif first == "object":
        keys = sorted({k for v in present for k in v})
        schema["properties"] = {k: pin([v[k] for v in present if k in v]) for k in keys}
        schema["additionalProperties"] = False
    return schema


def _unique(values: Iterable[Any]) -> list[Any]:
    out: dict[str, Any] = {}
    for v in values:
        out.setdefault(json.dumps(v, sort_keys=True), v)
    return [out[k] for k in sorted(out)]


def signature_schema(param: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON type(s) of one parameter of a tool's signature (pydantic's JSON Schema:
    `type`, or `anyOf` of types); {} when it says none we can read (e.g. a `$ref`)."""
    types: list[str] = []
    options = param.get("anyOf") if "anyOf" in param else [param]
    for option in options or []:
        t = option.get("type") if isinstance(option, Mapping) else None
        if isinstance(t, str):
            types.append(t)
        elif isinstance(t, list):
            types.extend(str(x) for x in t)
        else:
            return {}
    if not types:
        return {}
    return {"type": _types(types)}


def _empty_only(param: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter the task never passes, pinned: absent, null, or empty."""
    sig = signature_schema(param).get("type")
    types = [sig] if isinstance(sig, str) else list(sig or [])
    if "array" in types:
        return {"type": ["array", "null"], "maxItems": 0}
    return {"type": "null"}


def tool_schema(
    tool: str, calls: Sequence[Call], signature: Mapping[str, Any] | None, prompt: str | None = None
) -> dict[str, Any]:
    """The `mcpArguments` schema of ``tool`` for a task whose calls of that tool are
    ``calls`` (at least one); ``signature`` is the tool's parameters' JSON Schema (None:
    unknown, then only the parameters the calls pass are allowed). With ``prompt``, an
    argument is pinned only if the prompt names every value it takes (:func:`named_in`);
    otherwise it gets the signature's type, as free text does."""
    if not calls:
        raise ValueError(f"{tool}: no call to write a rule from")
    params: Mapping[str, Any] = (signature or {}).get("properties") or {}
    names = list(params) or sorted({k for c in calls for k in c.args})
    for c in calls:  # a call passing what the signature lacks: keep it (utility first)
        names += [k for k in c.args if k not in names]
    properties: dict[str, Any] = {}
    for name in names:
        role = argument_role(tool, name)
        param = params.get(name, {})
        seen = [c.args[name] for c in calls if name in c.args]
        unnamed = prompt is not None and not all(named_in(v, prompt) for v in seen)
        if unnamed and role not in ("text", "typed"):
            role = "typed"
        if role in ("text", "typed"):
            sig = signature_schema(param) if param else {}
            properties[name] = sig or (
                {"type": _types(_json_type(v) for v in seen)} if seen else {}
            )
        elif seen:
            properties[name] = pin(seen)
        else:
            properties[name] = _empty_only(param)
    return {"type": "object", "properties": properties, "additionalProperties": False}


def task_rule(
    suite: Suite, task: Task, *, arguments: bool, prompt_only: bool = False
) -> dict[str, Any]:
    """The rule of a user task in the profile's syntax (no host: the purpose's rule adds it,
    a declaration inherits the purpose's): its tools, and with ``arguments`` their
    argument rules (``prompt_only``: pinning only what the task's prompt names)."""
    rule: dict[str, Any] = {"mcpTools": task.tools}
    if arguments:
        prompt = task.text if prompt_only else None
        rule["mcpArguments"] = {
            tool: tool_schema(
                tool, [c for c in task.calls if c.tool == tool], suite.tools.get(tool), prompt
            )
            for tool in task.tools
        }
    return rule


def declaration(suite: Suite, task: Task, *, prompt_only: bool = False) -> list[dict[str, Any]]:
    """What a narrowing session reports (ReportTask `allow`) before its first call."""
    return [task_rule(suite, task, arguments=True, prompt_only=prompt_only)]


def _purpose_rule(suite: Suite, rule: Mapping[str, Any]) -> dict[str, Any]:
    return {"hosts": [mcp_host(suite.name)], "methods": ["POST"], "paths": [MCP_PATH], **rule}


def profile(suite: Suite, config: Config) -> dict[str, Any]:
    """The AgentProfile of ``config``'s agent for ``suite`` (from the user tasks only)."""
    purposes: dict[str, Any] = {}
    if config.per_task:
        for task in suite.user_tasks:
            rule = task_rule(
                suite, task, arguments=config.arguments, prompt_only=config.prompt_only
            )
            purposes[purpose_name(task.id)] = {
                "description": f"AgentDojo {suite.name} {task.id}",
                "allow": [_purpose_rule(suite, rule)],
            }
        default = purpose_name(suite.user_tasks[0].id)
    else:
        purposes[SUITE_PURPOSE] = {
            "description": f"AgentDojo {suite.name}: every tool of its user tasks",
            "allow": [_purpose_rule(suite, {"mcpTools": suite.user_tools()})],
        }
        default = SUITE_PURPOSE
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentProfile",
        "metadata": {"name": agent_name(suite.name, config.id)},
        "spec": {
            "owner": "bench-agentdojo",
            "defaultPurpose": default,
            "purposes": purposes,
        },
    }


# -- sessions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    role: str  # "user" | "injection"
    index: int  # the call's index in its task
    call: Call


@dataclass(frozen=True)
class Session:
    user_task: str
    injection_task: str | None  # None: the user task alone (utility)
    steps: tuple[Step, ...]

    @property
    def key(self) -> str:
        return self.user_task + (f"+{self.injection_task}" if self.injection_task else "")


def sessions(suite: Suite) -> tuple[list[Session], list[str]]:
    """The sessions to replay: each user task alone, then each security case (user task x
    injection task with at least one call: its calls after the user task's first call);
    and the injection tasks left out because their ground truth has no call."""
    out: list[Session] = []
    for user in suite.user_tasks:
        steps = tuple(Step("user", i, c) for i, c in enumerate(user.calls))
        out.append(Session(user.id, None, steps))
    skipped = [inj.id for inj in suite.injection_tasks if not inj.calls]
    for user in suite.user_tasks:
        mine = [Step("user", i, c) for i, c in enumerate(user.calls)]
        for inj in suite.injection_tasks:
            if not inj.calls:
                continue
            theirs = [Step("injection", i, c) for i, c in enumerate(inj.calls)]
            out.append(Session(user.id, inj.id, tuple(mine[:1] + theirs + mine[1:])))
    return out, skipped
