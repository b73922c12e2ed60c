"""The emulation's CRD validation rules (tests/kubeapi/cel.py): evaluated as kube-apiserver
evaluates `x-kubernetes-validations`, on plain data (the kubectl tests drive them through
HTTP: tests/deploy/test_crds.py, test_kubectl_elevation.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kubeapi.cel import compile_errors, evaluate
from tests.kubeapi.schema import ResourceType, structural_errors
from tests.kubeapi.store import ApiError, Cluster


def obj(spec: Any, status: Any = None, name: str = "x") -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": "t.dev/v1", "kind": "T", "metadata": {"name": name}}
    out["spec"] = spec
    if status is not None:
        out["status"] = status
    return out


def schema(spec: dict[str, Any], status: dict[str, Any] | None = None, **root: Any) -> Any:
    props: dict[str, Any] = {"spec": spec, "metadata": {"type": "object"}}
    if status is not None:
        props["status"] = status
    return {"type": "object", "properties": props, **root}


def rule(text: str, **more: Any) -> list[dict[str, Any]]:
    return [{"rule": text, **more}]


STRING = {"type": "string", "maxLength": 64}


def test_a_rule_refuses_what_it_does_not_accept_with_its_message() -> None:
    s = schema({"type": "object", "properties": {"d": {**STRING, "x-kubernetes-validations": rule(
        "duration(self) > duration('0s')", message="must be more than 0s")}}})  # fmt: skip
    assert evaluate(s, obj({"d": "90s"}), None) == []
    assert evaluate(s, obj({"d": "0s"}), None) == [
        ("spec.d", "FieldValueInvalid", 'Invalid value: "string": must be more than 0s')
    ]


def test_without_a_message_the_rule_is_named() -> None:
    s = schema({"type": "object", "x-kubernetes-validations": rule("self.a != 'b'"),
                "properties": {"a": STRING}})  # fmt: skip
    [(path, _, message)] = evaluate(s, obj({"a": "b"}), None)
    assert (path, message) == ("spec", "Invalid value: \"object\": failed rule: self.a != 'b'")


@pytest.mark.parametrize(
    ("more", "expected"),
    [
        ({"reason": "FieldValueForbidden"}, ("spec", "Forbidden: no b")),
        ({"reason": "FieldValueRequired"}, ("spec", "Required value: no b")),
        ({"fieldPath": ".a"}, ("spec.a", 'Invalid value: "object": no b')),
        (
            {"messageExpression": "'a is ' + self.a"},
            ("spec", 'Invalid value: "object": a is b'),
        ),
    ],
)
def test_reason_field_path_and_message_expression(
    more: dict[str, Any], expected: tuple[str, str]
) -> None:
    s = schema({"type": "object", "properties": {"a": STRING},
                "x-kubernetes-validations": rule("self.a != 'b'", message="no b", **more)})  # fmt: skip
    [(path, _, message)] = evaluate(s, obj({"a": "b"}), None)
    assert (path, message) == expected


def test_an_evaluation_error_refuses_the_object() -> None:
    s = schema({**STRING, "x-kubernetes-validations": rule("duration(self) > duration('0s')")})
    [(path, reason, message)] = evaluate(s, obj("99999999999999999999h"), None)
    assert (path, reason) == ("spec", "FieldValueInvalid")
    assert "evaluating rule: duration(self) > duration('0s')" in message


def test_a_transition_rule_applies_to_updates_only() -> None:
    s = schema({**STRING, "x-kubernetes-validations": rule("self == oldSelf", message="fixed")})
    assert evaluate(s, obj("a"), None) == []
    assert evaluate(s, obj("a"), obj("a")) == []
    assert evaluate(s, obj("b"), obj("a")) == [
        ("spec", "FieldValueInvalid", 'Invalid value: "string": fixed')
    ]
    # A field added by the update has no old value: the rule does not apply.
    nested = schema({"type": "object", "properties": {"a": {**STRING,
                     "x-kubernetes-validations": rule("self == oldSelf")}}})  # fmt: skip
    assert evaluate(nested, obj({"a": "new"}), obj({})) == []


def test_an_unchanged_value_is_not_checked_again() -> None:
    """Ratcheting: an object stored before a rule existed can still have its status
    written; its spec is checked again only when it changes."""
    s = schema(
        {**STRING, "x-kubernetes-validations": rule("self != 'bad'")},
        {"type": "object", "properties": {"state": STRING}},
    )
    stored = obj("bad")
    assert evaluate(s, obj("bad", {"state": "Invalid"}), stored) == []
    assert len(evaluate(s, obj("bad", {"state": "Invalid"}), None)) == 1
    assert len(evaluate(s, obj("worse"), obj("fine"))) == 0
    assert len(evaluate(s, obj("bad"), obj("fine"))) == 1


def test_map_list_items_are_correlated_by_key_for_transition_rules() -> None:
    item = {"type": "object", "properties": {"type": STRING, "since": STRING},
            "x-kubernetes-validations": rule("self.since == oldSelf.since", message="kept")}  # fmt: skip
    listed = {"type": "array", "maxItems": 4, "items": item,
              "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}  # fmt: skip
    s = schema(listed)
    old = obj([{"type": "A", "since": "1"}, {"type": "B", "since": "1"}])
    new = obj(
        [{"type": "B", "since": "1"}, {"type": "A", "since": "2"}, {"type": "C", "since": "9"}]
    )
    assert evaluate(s, new, old) == [
        ("spec[1]", "FieldValueInvalid", 'Invalid value: "object": kept')
    ]
    atomic = schema({**listed, "x-kubernetes-list-type": "atomic"})
    assert evaluate(atomic, new, old) == []  # no correlation: the rule does not apply


def test_values_are_typed_as_the_api_server_types_them() -> None:
    """date-time strings are timestamps, duration-format strings durations; at the root only
    metadata.name and generateName are visible."""
    s = schema(
        {"type": "object", "properties": {
            "at": {"type": "string", "format": "date-time",
                   "x-kubernetes-validations": rule("self > timestamp('2000-01-01T00:00:00Z')")},
            "for": {"type": "string", "format": "duration",
                    "x-kubernetes-validations": rule("self < duration('1h')")},
        }},
        **{"x-kubernetes-validations": rule("self.metadata.name.startsWith('x') && "
                                            "!has(self.metadata.labels)")},
    )  # fmt: skip
    good = obj({"at": "2026-01-01T00:00:00+02:00", "for": "30m"})
    good["metadata"]["labels"] = {"a": "b"}
    assert evaluate(s, good, None) == []
    bad = obj({"at": "1999-12-31T23:59:59Z", "for": "2h"}, name="y")
    assert [p for p, _, _ in evaluate(s, bad, None)] == ["", "spec.at", "spec.for"]


def test_rules_that_do_not_compile_refuse_the_crd() -> None:
    node = {"type": "string", "x-kubernetes-validations": [
        {"rule": "self =="}, {"rule": "self == 'a'", "messageExpression": "'a' +"},
        {"rule": "true", "reason": "FieldValueWrong"}, {"message": "no rule"}]}  # fmt: skip
    errors = compile_errors(node, "here")
    assert [e.split(":")[0] for e in errors] == [
        "here.x-kubernetes-validations[0].rule",
        "here.x-kubernetes-validations[1].messageExpression",
        "here.x-kubernetes-validations[2].reason",
        "here.x-kubernetes-validations[3].rule",
    ]
    assert "compilation failed" in errors[0]
    assert structural_errors(schema(node)) != []


def test_type_errors_come_first_and_say_the_rules_were_not_checked() -> None:
    crd_schema = schema(
        {"type": "object", "properties": {"n": {"type": "integer"}, "s": STRING},
         "x-kubernetes-validations": rule("self.s != 'x'")}
    )  # fmt: skip
    rtype = ResourceType("t.dev", "v1", "ts", "T", True, schema=crd_schema, custom=True)
    causes = rtype.validate(obj({"n": "one", "s": "x"}))
    assert [c.field for c in causes] == ["spec.n", "<nil>"]
    assert "some validation rules were not checked" in causes[1].message
    assert [c.field for c in rtype.validate(obj({"n": 1, "s": "x"}))] == ["spec"]


def test_a_crd_with_a_broken_rule_is_not_stored() -> None:
    cluster = Cluster()
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "ts.t.dev"},
        "spec": {
            "group": "t.dev",
            "names": {"plural": "ts", "kind": "T"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                "openAPIV3Schema": schema({**STRING, "x-kubernetes-validations": rule("(")})}}],
        },
    }  # fmt: skip
    with pytest.raises(ApiError) as err:
        cluster.load([crd])
    assert err.value.code == 422 and "compilation failed" in err.value.message
