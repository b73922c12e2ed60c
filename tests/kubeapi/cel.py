"""A CRD's validation rules (`x-kubernetes-validations`), evaluated as kube-apiserver does,
with cel-python (`celpy`, pinned in the dev extra).

What is kept faithful (k8s.io/apiextensions-apiserver schema/cel, k8s.io/apiserver cel):
- a rule is compiled when the CRD is written: one that does not compile refuses the CRD;
- `self` is the value at the rule's node, typed from the schema: objects are maps, `format:
  date-time`/`date` strings are timestamps and `format: duration` strings durations (so
  `duration(self)` on a plain string and `self < timestamp(...)` on a date-time both work);
  at the root, `self.metadata` has only `name` and `generateName`;
- a rule that names `oldSelf` is a transition rule: checked on an update only, where the
  field exists in both the stored and the new object (through properties and the items of
  `x-kubernetes-list-type: map` lists, matched by their keys);
- on an update, a value equal to the stored one is not checked again (validation
  ratcheting, on by default since Kubernetes 1.30): an object stored under an older rule can
  still have its status written;
- the rule's result must be true; else the error is the rule's `messageExpression`, its
  `message` or "failed rule: ...", at the node plus `fieldPath`, as `reason` says
  (FieldValueInvalid: `Invalid value: "<type>": ...`, Forbidden, Required, Duplicate); an
  evaluation error (an unparsable duration, a missing key) refuses the object too, naming
  the rule;
- rules do not run when the object has type errors (the API server says so instead).

Not emulated: static type checking against the schema (a misspelt field is an evaluation
error here, a compile error there), the cost estimate (tests/deploy/test_crds.py checks that
every rule sees bounded values instead), the Kubernetes CEL libraries beyond the standard
functions (lists, strings, regex, url, quantity: a rule that calls one fails to evaluate,
so it is never silently skipped).
"""

from __future__ import annotations

import datetime
import functools
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

with warnings.catch_warnings():  # lark (celpy's parser) imports the deprecated sre_parse
    warnings.simplefilter("ignore", DeprecationWarning)
    import celpy
    from celpy import celtypes

__all__ = ["CelRule", "compile_errors", "evaluate"]

# celpy.Environment() raises the recursion limit for the whole process (to 2500); put it
# back, or tests that rely on the default (a 2,000-deep JSON body must be refused) would
# depend on whether a CEL test ran first in the same process.
_LIMIT = sys.getrecursionlimit()
_ENV = celpy.Environment()
sys.setrecursionlimit(_LIMIT)
_LOCK = threading.Lock()  # celpy's evaluator is not documented as thread-safe
_MISSING: Any = object()
_REASONS = ("FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate")


class CelRule:
    """One rule of a schema node, compiled."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.rule = str(spec.get("rule", ""))
        self.message = str(spec.get("message") or "").strip()
        self.message_expression = str(spec.get("messageExpression") or "")
        self.reason = str(spec.get("reason") or "FieldValueInvalid")
        self.field_path = str(spec.get("fieldPath") or "")
        self.transition = "oldSelf" in self.rule
        self.program = _program(self.rule)
        self.message_program = (
            _program(self.message_expression) if self.message_expression else None
        )

    @property
    def shown(self) -> str:
        """ruleErrorString: the message, else the rule."""
        return self.message or self.rule.strip()


@functools.lru_cache(maxsize=256)
def _program(text: str) -> Any:
    return _ENV.program(_ENV.compile(text))


def compile_errors(schema: Mapping[str, Any], here: str) -> list[str]:
    """What the API server says of the rules of one schema node when the CRD is written."""
    errors = []
    for i, spec in enumerate(schema.get("x-kubernetes-validations") or []):
        where = f"{here}.x-kubernetes-validations[{i}]"
        if not isinstance(spec, Mapping) or not isinstance(spec.get("rule"), str):
            errors.append(f"{where}.rule: Required value")
            continue
        if spec.get("reason") is not None and spec["reason"] not in _REASONS:
            errors.append(
                f'{where}.reason: Unsupported value: "{spec["reason"]}": supported values: '
                + ", ".join(f'"{r}"' for r in _REASONS)
            )
        for key in ("rule", "messageExpression"):
            text = spec.get(key)
            if not isinstance(text, str) or not text:
                continue
            try:
                _program(text)
            except celpy.CELParseError as exc:
                first = str(exc).strip().splitlines()[0]
                errors.append(
                    f'{where}.{key}: Invalid value: "{text}": compilation failed: {first}'
                )
    return errors


# -- evaluation ---------------------------------------------------------------------------


def evaluate(
    schema: Mapping[str, Any], new: Mapping[str, Any], old: Mapping[str, Any] | None
) -> list[tuple[str, str, str]]:
    """(field path, reason, message) of every rule the object ``new`` breaks; ``old``: the
    stored object on an update (None on a create)."""
    return list(_walk(schema, new, _MISSING if old is None else old, "", root=True))


def _walk(
    schema: Mapping[str, Any], value: Any, old: Any, path: str, *, root: bool = False
) -> Iterator[tuple[str, str, str]]:
    if not isinstance(schema, Mapping) or value is _MISSING:
        return
    if old is not _MISSING and old == value:
        return  # ratcheting: unchanged, not checked again
    specs = schema.get("x-kubernetes-validations") or []
    if specs:
        yield from _check(schema, value, old, path, specs, root)
    if isinstance(value, Mapping):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if root and key == "metadata":
                continue
            sub = props.get(key) if key in props else extra if isinstance(extra, Mapping) else None
            if sub is None:
                continue
            before = old.get(key, _MISSING) if isinstance(old, Mapping) else _MISSING
            yield from _walk(sub, item, before, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            before = _correlated(schema, item, old)
            yield from _walk(schema["items"], item, before, f"{path}[{i}]")


def _correlated(schema: Mapping[str, Any], item: Any, old: Any) -> Any:
    """The stored element a new list element corresponds to: only in map lists, by keys."""
    keys = schema.get("x-kubernetes-list-map-keys")
    if schema.get("x-kubernetes-list-type") != "map" or not keys or not isinstance(old, list):
        return _MISSING
    if not isinstance(item, Mapping):
        return _MISSING
    for candidate in old:
        if isinstance(candidate, Mapping) and all(candidate.get(k) == item.get(k) for k in keys):
            return candidate
    return _MISSING


def _check(
    schema: Mapping[str, Any],
    value: Any,
    old: Any,
    path: str,
    specs: list[Any],
    root: bool,
) -> Iterator[tuple[str, str, str]]:
    type_name = str(schema.get("type") or "object")
    for spec in specs:
        rule = CelRule(spec)
        if rule.transition and old is _MISSING:
            continue
        activation = {"self": to_cel(value, schema, root=root)}
        if rule.transition:
            activation["oldSelf"] = to_cel(old, schema, root=root)
        at = path
        if rule.field_path:  # a JSONPath relative to the node: `.agent`, `['a.b']`
            at = path + rule.field_path if path else rule.field_path.lstrip(".")
        try:
            with _LOCK:
                result = rule.program.evaluate(activation)
        except celpy.CELEvalError as exc:
            result = exc
        if isinstance(result, celpy.CELEvalError):
            detail = str(result.args[0]) if result.args else str(result)
            yield (
                path,
                "FieldValueInvalid",
                f'Invalid value: "{type_name}": {detail} evaluating rule: {rule.shown}',
            )
            continue
        if result is True or (isinstance(result, celtypes.BoolType) and bool(result)):
            continue
        message = rule.message or f"failed rule: {rule.rule.strip()}"
        if rule.message_program is not None:
            try:
                with _LOCK:
                    shown = rule.message_program.evaluate(activation)
                if isinstance(shown, str) and shown.strip():
                    message = str(shown)
            except celpy.CELEvalError:
                pass
        yield at, rule.reason, _detail(rule.reason, type_name, message)


def _detail(reason: str, type_name: str, message: str) -> str:
    """apimachinery's field.Error text after the path, as fieldErrorForReason builds it."""
    if reason == "FieldValueForbidden":
        return f"Forbidden: {message}"
    if reason == "FieldValueRequired":
        return f"Required value: {message}"
    if reason == "FieldValueDuplicate":
        return f'Duplicate value: "{type_name}"'
    return f'Invalid value: "{type_name}": {message}'


# -- values -------------------------------------------------------------------------------


def to_cel(value: Any, schema: Mapping[str, Any] | None, *, root: bool = False) -> Any:
    """A JSON value as CEL sees it under ``schema`` (k8s.io/apiserver/pkg/cel/common)."""
    schema = schema if isinstance(schema, Mapping) else {}
    if isinstance(value, Mapping):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if root and key == "metadata" and isinstance(item, Mapping):
                # Only these are visible to rules (WithTypeAndObjectMeta).
                meta = {k: item[k] for k in ("name", "generateName") if k in item}
                out[celtypes.StringType(key)] = to_cel(meta, None)
                continue
            sub = props.get(key) if key in props else extra if isinstance(extra, Mapping) else None
            out[celtypes.StringType(key)] = to_cel(item, sub)
        return celtypes.MapType(out)
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items")) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        fmt = schema.get("format")
        try:
            if fmt in ("date-time", "date"):
                parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=datetime.UTC)
                return celtypes.TimestampType(parsed)
            if fmt == "duration":
                return celtypes.DurationType(value)
        except ValueError:
            pass  # the schema's format check reports it
        return celtypes.StringType(value)
    return value
