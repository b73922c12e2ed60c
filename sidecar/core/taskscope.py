"""Task declarations (pure): the smallest set of calls a reported task says it needs.

An agent that reports a task (`ReportTask`) may declare, before it reads any untrusted data,
what the task will call: allow rules in exactly the profile's syntax (`hosts`, `methods`,
`paths`, `mcpTools`, `mcpMethods`, `mcpArguments`, `query`, `jsonBody`), e.g. "send_money
only to these two IBANs, at most 100". For the task's lifetime a call naming the task is
allowed only if its purpose (or an elevation grant) allows it AND one declared rule allows
it: the intersection. A declaration is a filter after the profile's decision, so it can
only narrow, never widen; a declared rule the purpose does not grant allows nothing.

Declarations are validated by the supervisor when the agent reports them
(:func:`validate_declaration`: the profile's own rule model, so the same fields and argument
subset, and errors naming `allow[i].field`), stored as plain JSON with the task, and
compiled by each reader (:func:`compile_declaration`, cached by content: a new generation
of the shared agent state does not recompile what it already had). A declaration a reader
cannot compile allows nothing.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from sidecar.core.model import Rule
from sidecar.core.rules import RuleIndex, compile_rules

__all__ = [
    "DENY_ALL",
    "MAX_DECLARATION_BYTES",
    "MAX_DECLARED_PATTERNS",
    "MAX_DECLARED_RULES",
    "Declaration",
    "DeclarationError",
    "compile_declaration",
    "declaration_key",
    "validate_declaration",
]

MAX_DECLARED_RULES = 32
MAX_DECLARATION_BYTES = 16 * 1024  # as canonical JSON: it lives in the shared table
# `pattern`s per declaration: each is compiled by the supervisor and by every worker (a
# bounded, linear-time regular expression, but not free to compile)
MAX_DECLARED_PATTERNS = 16
_RULE_FIELDS = sorted(f.alias or n for n, f in Rule.model_fields.items())

Declaration = tuple[Mapping[str, Any], ...]
"""A validated declaration: allow rules as JSON objects in the profile's (camelCase) syntax."""


class DeclarationError(ValueError):
    """A declaration that cannot be accepted; the message names `allow[i].field`."""


def declaration_key(allow: Sequence[Mapping[str, Any]]) -> str:
    """The canonical JSON of a declaration: equal declarations have equal keys. ASCII, as the
    shared table stores it, so its length is the room the declaration takes there."""
    return json.dumps(list(allow), sort_keys=True, separators=(",", ":"))


def validate_declaration(allow: Sequence[object]) -> Declaration:
    """The declaration as plain JSON objects, or DeclarationError naming the first problem.
    An empty declaration is not one (it would allow nothing): refused."""
    return _validated(allow)[0]


def _validated(allow: Sequence[object]) -> tuple[Declaration, list[Rule]]:
    """`validate_declaration`, with the rules the model made of it."""
    if not allow:
        raise DeclarationError("allow: a declaration lists at least one rule")
    if len(allow) > MAX_DECLARED_RULES:
        raise DeclarationError(
            f"allow: at most {MAX_DECLARED_RULES} rules per task, not {len(allow)}"
        )
    out: list[Mapping[str, Any]] = []
    for i, rule in enumerate(allow):
        if not isinstance(rule, Mapping):
            raise DeclarationError(f"allow[{i}]: expected an object (an allow rule)")
        try:
            out.append(json.loads(json.dumps(rule, allow_nan=False)))
        except (TypeError, ValueError, RecursionError):
            raise DeclarationError(f"allow[{i}]: not plain JSON") from None
    # The bounds first: what is too large is refused before anything is compiled.
    size = len(declaration_key(out).encode())
    if size > MAX_DECLARATION_BYTES:
        raise DeclarationError(
            f"allow: {size} bytes as JSON, more than the {MAX_DECLARATION_BYTES} a task may declare"
        )
    patterns = _patterns(out)
    if patterns > MAX_DECLARED_PATTERNS:
        raise DeclarationError(
            f"allow: at most {MAX_DECLARED_PATTERNS} patterns per task, not {patterns}"
        )
    rules = []
    for i, rule in enumerate(out):
        try:
            rules.append(Rule.model_validate(rule))
        except ValidationError as exc:
            raise DeclarationError(f"allow[{i}]{_problem(exc)}") from None
    return tuple(out), rules


def _patterns(value: object) -> int:
    """How many `pattern` keywords the JSON value holds, at any depth."""
    if isinstance(value, Mapping):
        own = 1 if isinstance(value.get("pattern"), str) else 0
        return own + sum(_patterns(v) for v in value.values())
    if isinstance(value, list):
        return sum(_patterns(v) for v in value)
    return 0


def _problem(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown field (allowed: {', '.join(_RULE_FIELDS)})"
    msg = str(err["msg"]).removeprefix("Value error, ")
    # The schema checks name the keyword's path inside the field ("a.format: ...", "query.
    # minimum: ..."): one dotted path, as the agent wrote it.
    head, sep, rest = msg.partition(": ")
    last = err["loc"][-1] if err["loc"] else None
    if sep and head and " " not in head and isinstance(last, str):
        if head == last or head.startswith(f"{last}."):
            return f"{where[: -len(last) - 1]}.{head}: {rest}"
        return f"{where}.{head}: {rest}"
    return f"{where}: {msg}"


DENY_ALL: RuleIndex = compile_rules((), "task")
"""What a declaration that cannot be compiled allows: nothing."""


def compile_declaration(task: str, allow: Declaration) -> RuleIndex:
    """The rule index of a task's declaration (rule ids `task[<id>].allow[i]`); DENY_ALL if
    it does not validate (a reader never widens on data it cannot read)."""
    try:
        return _compiled(task, declaration_key(allow))
    except (DeclarationError, TypeError, ValueError):
        return DENY_ALL


@functools.lru_cache(maxsize=4096)
def _compiled(task: str, key: str) -> RuleIndex:
    _, rules = _validated(json.loads(key))
    return compile_rules(rules, f"task[{task}].allow")
