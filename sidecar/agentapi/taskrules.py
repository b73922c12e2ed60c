"""A task declaration between its two forms: the `TaskRule` messages of `ReportTask` and the
profile's allow-rule syntax (`{"mcpTools": [...], "mcpArguments": {tool: schema}}`) that
`core.taskscope` validates. The client writes rules as a profile does; the server reads them
back into that form, so one model validates both (and its errors name `allow[i].field`).

An empty repeated field and an empty schema string mean "not given", as an absent field in
YAML. The server bounds what it parses (the message size is bounded by gRPC already).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from sidecar._proto import context_pb2 as pb

__all__ = ["rule_to_pb", "rules_from_pb", "rules_to_pb"]

_LISTS = (
    ("hosts", "hosts"),
    ("methods", "methods"),
    ("paths", "paths"),
    ("mcp_tools", "mcpTools"),
    ("mcp_methods", "mcpMethods"),
)
_SCHEMAS = (("query", "query"), ("json_body", "jsonBody"))
_KNOWN = {yaml for _, yaml in _LISTS} | {yaml for _, yaml in _SCHEMAS} | {"mcpArguments"}


def _schema_text(where: str, schema: object) -> str:
    if not isinstance(schema, Mapping):
        raise ValueError(f"{where}: expected a JSON Schema object")
    try:
        return json.dumps(schema, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None


def rule_to_pb(rule: Mapping[str, Any], where: str = "allow[0]") -> pb.TaskRule:
    """One rule in the profile's syntax as a TaskRule; ValueError names an unknown field."""
    if not isinstance(rule, Mapping):
        raise ValueError(f"{where}: expected an object (an allow rule)")
    unknown = sorted(set(rule) - _KNOWN)
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: unknown field (allowed: {', '.join(sorted(_KNOWN))})"
        )
    m = pb.TaskRule()
    for attr, key in _LISTS:
        value = rule.get(key)
        if value is None:
            continue
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ValueError(f"{where}.{key}: expected a list of strings")
        getattr(m, attr).extend(value)
    for attr, key in _SCHEMAS:
        if rule.get(key) is not None:
            setattr(m, attr, _schema_text(f"{where}.{key}", rule[key]))
    arguments = rule.get("mcpArguments")
    if arguments is not None:
        if not isinstance(arguments, Mapping):
            raise ValueError(f"{where}.mcpArguments: expected an object of tool -> schema")
        for tool, schema in arguments.items():
            m.mcp_arguments[str(tool)] = _schema_text(f"{where}.mcpArguments.{tool}", schema)
    return m


def rules_to_pb(rules: Iterable[Mapping[str, Any]]) -> list[pb.TaskRule]:
    return [rule_to_pb(r, f"allow[{i}]") for i, r in enumerate(rules)]


def _schema(where: str, text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{where}: not JSON") from None


def rules_from_pb(messages: Iterable[pb.TaskRule]) -> list[dict[str, Any]]:
    """The TaskRules in the profile's syntax (not validated: `core.taskscope` does that);
    ValueError names a schema that is not JSON."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"allow[{i}]"
        rule: dict[str, Any] = {}
        for attr, key in _LISTS:
            values = list(getattr(m, attr))
            if values:
                rule[key] = values
        for attr, key in _SCHEMAS:
            text = getattr(m, attr)
            if text:
                rule[key] = _schema(f"{where}.{key}", text)
        if m.mcp_arguments:
            rule["mcpArguments"] = {
                tool: _schema(f"{where}.mcpArguments.{tool}", text)
                for tool, text in sorted(m.mcp_arguments.items())
            }
        out.append(rule)
    return out
