"""Resource types of the emulated API server, and what it does with a CRD's schema.

A :class:`ResourceType` describes one served group/version/resource: the built-in ones the
tests and kubectl need (namespaces, events, customresourcedefinitions) and one per served
version of every stored CustomResourceDefinition. For custom resources this module does
what kube-apiserver does with `openAPIV3Schema`: reject non-structural schemas when the CRD
is created (and any validation rule that does not compile), find unknown fields (strict
field validation) and prune them, validate objects (jsonschema, with kube-openapi's
`date-time` rule, then the CRD's CEL validation rules as the API server evaluates them: see
`cel`) into Status causes that name the field, convert lists to `Table`s with the printer
columns, and describe the resource in OpenAPI v3.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from . import cel

__all__ = [
    "ALL_VERBS",
    "BUILTIN_TYPES",
    "Cause",
    "ResourceType",
    "format_rfc3339",
    "human_duration",
    "is_kube_datetime",
    "structural_errors",
    "types_from_crd",
]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Cause:
    """One entry of a Status's details.causes: what kubectl prints after the field name."""

    field: str
    reason: str  # FieldValueRequired | FieldValueInvalid | FieldValueNotSupported | ...
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    list_kind: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: frozenset[str] = frozenset()
    verbs: tuple[str, ...] = ALL_VERBS
    # Custom resources only: the version's openAPIV3Schema and additionalPrinterColumns.
    schema: Mapping[str, Any] | None = None
    columns: tuple[Mapping[str, Any], ...] = ()
    custom: bool = False
    crd_name: str = ""
    _validator: Any = field(default=None, compare=False, repr=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def store_key(self) -> tuple[str, str]:
        """Objects are stored per group and resource, whatever version they were written in."""
        return (self.group, self.plural)

    @property
    def qualified(self) -> str:
        """`agentrevocations.mandate.dev`, as in NotFound messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified_kind(self) -> str:
        """`AgentRevocation.mandate.dev`, as in Invalid messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base

    # -- discovery ------------------------------------------------------------------------

    def discovery(self) -> list[dict[str, Any]]:
        main = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        for sub in sorted(self.subresources):
            entries.append(
                {
                    "name": f"{self.plural}/{sub}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        return entries

    # -- custom resources: schema ---------------------------------------------------------

    def unknown_fields(self, obj: Mapping[str, Any]) -> list[str]:
        """Paths of fields the schema does not know (what strict decoding reports)."""
        if not self.custom or self.schema is None:
            return []
        return [p for p, _, _ in _unknown(obj, self.schema, "", root=True)]

    def prune(self, obj: dict[str, Any]) -> None:
        """Drop unknown fields in place, as the API server does before storing."""
        if not self.custom or self.schema is None:
            return
        for _, parent, key in list(_unknown(obj, self.schema, "", root=True)):
            parent.pop(key, None)

    def validate(self, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[Cause]:
        """What the API server refuses in ``obj``: metadata, the schema, then the CRD's
        validation rules (``old``: the stored object on an update, for transition rules and
        ratcheting; the status subresource is validated the same way)."""
        causes = list(_validate_metadata(obj, self))
        if not self.custom or self.schema is None:
            return causes
        validator = self._validator
        if validator is None:
            validator = jsonschema.Draft4Validator(
                _for_jsonschema(self.schema), format_checker=KUBE_FORMATS
            )
            object.__setattr__(self, "_validator", validator)
        body = {k: v for k, v in obj.items() if k != "metadata"}
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        for error in errors:
            causes.extend(_cause(error))
        if any(c.reason == "FieldValueTypeInvalid" for c in causes):
            # As kube-apiserver: rules would see values of the wrong type.
            causes.append(
                Cause(
                    "<nil>",
                    "FieldValueInvalid",
                    'Invalid value: "null": some validation rules were not checked because '
                    "the object was invalid; correct the existing errors to complete validation",
                )
            )
            return causes
        for path, reason, message in cel.evaluate(self.schema, obj, old):
            causes.append(Cause(path, reason, message))
        return causes

    # -- custom resources: printing -------------------------------------------------------

    def table(
        self, items: list[dict[str, Any]], list_meta: Mapping[str, Any], include: str, now: float
    ) -> dict[str, Any]:
        """A meta.k8s.io/v1 Table as kube-apiserver renders it for `kubectl get`."""
        columns: list[dict[str, Any]] = [
            {
                "name": "Name",
                "type": "string",
                "format": "name",
                "description": "Name must be unique within a namespace.",
                "priority": 0,
            }
        ]
        specs = list(self.columns) or [
            {
                "name": "Age",
                "type": "date",
                "jsonPath": ".metadata.creationTimestamp",
                "description": "CreationTimestamp is a timestamp representing the server time "
                "when this object was created.",
            }
        ]
        for spec in specs:
            col = {
                "name": spec["name"],
                "type": spec.get("type", "string"),
                "format": spec.get("format", ""),
                "description": spec.get("description", ""),
                "priority": spec.get("priority", 0),
            }
            columns.append(col)
        rows = []
        for item in items:
            cells: list[Any] = [item["metadata"]["name"]]
            for spec in specs:
                cells.append(
                    _cell(spec.get("type", "string"), _json_path(item, spec["jsonPath"]), now)
                )
            row: dict[str, Any] = {"cells": cells}
            if include == "Object":
                row["object"] = item
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": item["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": dict(list_meta),
            "columnDefinitions": columns,
            "rows": rows,
        }

    # -- OpenAPI v3 -----------------------------------------------------------------------

    @property
    def schema_name(self) -> str:
        """`dev.mandate.v1alpha1.AgentRevocation`: the group reversed, as kube-openapi names it."""
        if not self.group:
            return f"io.k8s.api.core.{self.version}.{self.kind}"
        reversed_group = ".".join(reversed(self.group.split(".")))
        return f"{reversed_group}.{self.version}.{self.kind}"

    def openapi_schemas(self) -> dict[str, Any]:
        gvk = [{"group": self.group, "version": self.version, "kind": self.kind}]
        body: dict[str, Any]
        if self.schema is not None:
            body = copy.deepcopy(dict(self.schema))
        else:
            body = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        props = body.setdefault("properties", {})
        props["apiVersion"] = {
            "type": "string",
            "description": "APIVersion defines the versioned schema of this representation "
            "of an object.",
        }
        props["kind"] = {
            "type": "string",
            "description": "Kind is a string value representing the REST resource this "
            "object represents.",
        }
        props["metadata"] = {
            "allOf": [
                {"$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
            ],
            "default": {},
            "description": "Standard object's metadata.",
        }
        body["x-kubernetes-group-version-kind"] = gvk
        list_kind = self.list_kind or f"{self.kind}List"
        return {
            self.schema_name: body,
            f"{self.schema_name}List": {
                "type": "object",
                "required": ["items"],
                "description": f"{list_kind} is a list of {self.kind}",
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "items": {
                        "type": "array",
                        "items": {"allOf": [{"$ref": f"#/components/schemas/{self.schema_name}"}]},
                    },
                    "metadata": {
                        "allOf": [
                            {
                                "$ref": "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"
                            }
                        ],
                        "default": {},
                    },
                },
                "x-kubernetes-group-version-kind": [
                    {"group": self.group, "version": self.version, "kind": list_kind}
                ],
            },
        }

    def openapi_paths(self) -> dict[str, Any]:
        """The operations kube-apiserver publishes; kubectl looks for the PATCH operation of a
        kind and its `fieldValidation` query parameter to decide on server-side validation."""
        gvk = {"group": self.group, "version": self.version, "kind": self.kind}
        ref = {"$ref": f"#/components/schemas/{self.schema_name}"}
        list_ref = {"$ref": f"#/components/schemas/{self.schema_name}List"}

        def op(
            action: str, verb: str, schema: Mapping[str, Any], params: list[str]
        ) -> dict[str, Any]:
            return {
                "tags": [self.group or "core"],
                "description": f"{verb} {self.kind}",
                "operationId": f"{verb}{self.kind}",
                "parameters": [_PARAMS[p] for p in params],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": schema}},
                    },
                    "401": {"description": "Unauthorized"},
                },
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
            }

        write = ["dryRun", "fieldManager", "fieldValidation"]
        patch = {
            **op("patch", "patch", ref, [*write, "force"]),
            "requestBody": {
                "content": {
                    t: {"schema": {"type": "object"}}
                    for t in (
                        "application/json-patch+json",
                        "application/merge-patch+json",
                        "application/apply-patch+yaml",
                    )
                },
                "required": True,
            },
        }
        item = {
            "get": op("get", "read", ref, []),
            "put": op("put", "replace", ref, write),
            "patch": patch,
            "delete": op("delete", "delete", {"type": "object"}, ["dryRun"]),
            "parameters": [_PARAMS["name"], *([_PARAMS["namespace"]] if self.namespaced else [])],
        }
        listing = [
            "fieldSelector",
            "labelSelector",
            "limit",
            "continue",
            "resourceVersion",
            "resourceVersionMatch",
            "timeoutSeconds",
            "watch",
            "allowWatchBookmarks",
        ]
        collection = {
            "get": op("list", "list", list_ref, listing),
            "post": op("post", "create", ref, write),
            "delete": op("deletecollection", "deletecollection", {"type": "object"}, []),
            "parameters": [_PARAMS["namespace"]] if self.namespaced else [],
        }
        ns = "/namespaces/{namespace}" if self.namespaced else ""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        paths: dict[str, Any] = {
            f"{base}{ns}/{self.plural}": collection,
            f"{base}{ns}/{self.plural}/{{name}}": item,
        }
        if self.namespaced:
            paths[f"{base}/{self.plural}"] = {"get": op("list", "list", list_ref, listing)}
        if "status" in self.subresources:
            paths[f"{base}{ns}/{self.plural}/{{name}}/status"] = {
                "get": op("get", "read", ref, []),
                "put": op("put", "replace", ref, write),
                "patch": {**patch, "operationId": f"patch{self.kind}Status"},
                "parameters": item["parameters"],
            }
        return paths


def _param(name: str, where: str, description: str, typ: str = "string") -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "description": description,
        "schema": {"type": typ, "uniqueItems": True},
    }


_PARAMS = {
    "name": {**_param("name", "path", "name of the object"), "required": True},
    "namespace": {**_param("namespace", "path", "object name and auth scope"), "required": True},
    "dryRun": _param("dryRun", "query", "When present, modifications are not persisted."),
    "fieldManager": _param("fieldManager", "query", "Name of the actor making the change."),
    "fieldValidation": _param(
        "fieldValidation",
        "query",
        "How the server handles unknown or duplicate fields: Ignore, Warn or Strict.",
    ),
    "force": _param("force", "query", "Force is going to force Apply requests.", "boolean"),
    "fieldSelector": _param("fieldSelector", "query", "Select objects by their fields."),
    "labelSelector": _param("labelSelector", "query", "Select objects by their labels."),
    "limit": _param("limit", "query", "Maximum number of responses.", "integer"),
    "continue": _param("continue", "query", "The continue token of a previous list."),
    "resourceVersion": _param("resourceVersion", "query", "Where a list or watch starts."),
    "resourceVersionMatch": _param("resourceVersionMatch", "query", "How resourceVersion applies."),
    "timeoutSeconds": _param("timeoutSeconds", "query", "Timeout for the list/watch.", "integer"),
    "watch": _param("watch", "query", "Watch for changes.", "boolean"),
    "allowWatchBookmarks": _param(
        "allowWatchBookmarks", "query", "Request BOOKMARK events.", "boolean"
    ),
}


# -- kube-openapi's formats ---------------------------------------------------------------

_RX_DATE = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})$")
# kube-openapi's DateTimePattern: the `.` before the fraction is unescaped there too.
_RX_TIME = re.compile(r"^([0-9]{2}):([0-9]{2}):([0-9]{2})(.[0-9]+)?(z|([+-][0-9]{2}:[0-9]{2}))$")


def is_kube_datetime(value: str) -> bool:
    """kube-openapi strfmt.IsDateTime, the rule the API server applies to `format: date-time`.
    It is looser than RFC 3339 (e.g. it accepts `2026-02-30T00:00:00Z` or `+25:00`), so
    clients must cope with values that pass it but do not parse."""
    if len(value) < 4:
        return False
    parts = value.lower().split("t")
    if len(parts) < 2:
        return False
    d = _RX_DATE.match(parts[0])
    if d is None or not ("01" <= d.group(2) <= "12" and "01" <= d.group(3) <= "31"):
        return False
    t = _RX_TIME.match(parts[1])
    return t is not None and t.group(1) <= "23" and t.group(2) <= "59" and t.group(3) <= "59"


def _is_kube_date(value: str) -> bool:
    d = _RX_DATE.match(value)
    return d is not None and "01" <= d.group(2) <= "12" and "01" <= d.group(3) <= "31"


KUBE_FORMATS = jsonschema.FormatChecker(formats=())
KUBE_FORMATS.checks("date-time")(lambda v: not isinstance(v, str) or is_kube_datetime(v))
KUBE_FORMATS.checks("date")(lambda v: not isinstance(v, str) or _is_kube_date(v))


# -- structural schema rules ------------------------------------------------------------


def structural_errors(schema: Mapping[str, Any], path: str = "") -> list[str]:
    """The rules of a structural schema that the API server checks when a CRD is written:
    a type everywhere (unless x-kubernetes-int-or-string / preserve-unknown-fields),
    `properties` and `additionalProperties` never side by side, and validation rules that
    compile."""
    errors: list[str] = []
    here = path or "spec.versions[].schema.openAPIV3Schema"
    if not isinstance(schema, Mapping):
        return [f"{here}: Invalid value: not an object"]
    if "properties" in schema and "additionalProperties" in schema:
        errors.append(
            f"{here}.additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"
        )
    errors.extend(cel.compile_errors(schema, here))
    if (
        "type" not in schema
        and not schema.get("x-kubernetes-int-or-string")
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        errors.append(f"{here}.type: Required value: must not be empty for specified object fields")
    for name, sub in (schema.get("properties") or {}).items():
        if path == "" and name == "metadata":
            continue
        errors.extend(structural_errors(sub, f"{here}.properties[{name}]"))
    if isinstance(schema.get("items"), Mapping):
        errors.extend(structural_errors(schema["items"], f"{here}.items"))
    if isinstance(schema.get("additionalProperties"), Mapping):
        errors.extend(
            structural_errors(schema["additionalProperties"], f"{here}.additionalProperties")
        )
    return errors


def types_from_crd(crd: Mapping[str, Any]) -> list[ResourceType]:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = []
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = frozenset((version.get("subresources") or {}).keys())
        out.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular", names["kind"].lower()),
                list_kind=names.get("listKind", f"{names['kind']}List"),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                subresources=frozenset(s for s in subresources if s in ("status", "scale")),
                schema=((version.get("schema") or {}).get("openAPIV3Schema") or None),
                columns=tuple(version.get("additionalPrinterColumns") or ()),
                custom=True,
                crd_name=crd["metadata"]["name"],
            )
        )
    return out


BUILTIN_TYPES = (
    ResourceType(
        group="",
        version="v1",
        plural="namespaces",
        kind="Namespace",
        namespaced=False,
        singular="namespace",
        list_kind="NamespaceList",
        short_names=("ns",),
        subresources=frozenset({"status"}),
        verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
        columns=(
            {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ),
    ),
    ResourceType(
        group="",
        version="v1",
        plural="events",
        kind="Event",
        namespaced=True,
        singular="event",
        list_kind="EventList",
        short_names=("ev",),
        columns=(
            {"name": "Last Seen", "type": "date", "jsonPath": ".lastTimestamp"},
            {"name": "Type", "type": "string", "jsonPath": ".type"},
            {"name": "Reason", "type": "string", "jsonPath": ".reason"},
            {
                "name": "Object",
                "type": "string",
                "jsonPath": ".involvedObject.kind,.involvedObject.name",
            },
            {"name": "Message", "type": "string", "jsonPath": ".message"},
        ),
    ),
    ResourceType(
        group="apiextensions.k8s.io",
        version="v1",
        plural="customresourcedefinitions",
        kind="CustomResourceDefinition",
        namespaced=False,
        singular="customresourcedefinition",
        list_kind="CustomResourceDefinitionList",
        short_names=("crd", "crds"),
        categories=("api-extensions",),
        subresources=frozenset({"status"}),
        columns=(
            {
                "name": "Created At",
                "type": "string",
                "format": "date-time",
                "jsonPath": ".metadata.creationTimestamp",
            },
        ),
    ),
)


# -- helpers ------------------------------------------------------------------------------


def _unknown(
    obj: Any, schema: Mapping[str, Any], path: str, *, root: bool = False
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(path, parent, key) of every field the schema does not know."""
    if not isinstance(schema, Mapping) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(obj):
            sub_path = f"{path}.{key}" if path else key
            if root and key in ("apiVersion", "kind"):
                continue
            if root and key == "metadata":
                if isinstance(obj[key], dict):
                    for mkey in list(obj[key]):
                        if mkey not in OBJECT_META_FIELDS:
                            yield f"metadata.{mkey}", obj[key], mkey
                continue
            if isinstance(props, Mapping) and key in props:
                yield from _unknown(obj[key], props[key], sub_path)
            elif isinstance(extra, Mapping):
                yield from _unknown(obj[key], extra, sub_path)
            elif extra is True:
                continue
            elif props is not None or schema.get("type") == "object":
                yield sub_path, obj, key
    elif isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(obj):
            yield from _unknown(item, schema["items"], f"{path}[{i}]")


def _for_jsonschema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The CRD schema as jsonschema needs it: metadata is checked separately (ObjectMeta),
    `nullable: true` widens the type."""
    out = copy.deepcopy(dict(schema))
    props = out.get("properties")
    if isinstance(props, dict):
        props.pop("metadata", None)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("nullable") and isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


def _kube_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _go_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def _json_type(value: Any) -> str:
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
    if value is None:
        return "null"
    return "object"


def _cause(error: jsonschema.ValidationError) -> Iterator[Cause]:
    path = _kube_path(error.absolute_path)
    value = error.instance
    v = error.validator
    if v == "required":
        present = value if isinstance(value, dict) else {}
        for name in error.validator_value:
            if name not in present:
                yield Cause(
                    f"{path}.{name}" if path else name, "FieldValueRequired", "Required value"
                )
        return
    if v == "type":
        expected = error.validator_value
        expected = expected[0] if isinstance(expected, list) else expected
        actual = _json_type(value)
        msg = f'{path} in body must be of type {expected}: "{actual}"'
        yield Cause(path, "FieldValueTypeInvalid", f'Invalid value: "{actual}": {msg}')
        return
    if v == "enum":
        allowed = ", ".join(_go_value(x) for x in error.validator_value)
        yield Cause(
            path,
            "FieldValueNotSupported",
            f"Unsupported value: {_go_value(value)}: supported values: {allowed}",
        )
        return
    detail = {
        "format": f"{path} in body must be of type {error.validator_value}: {_go_value(value)}",
        "pattern": f"{path} in body should match '{error.validator_value}'",
        "minLength": f"{path} in body should be at least {error.validator_value} chars long",
        "maxLength": f"{path} in body should be at most {error.validator_value} chars long",
        "minimum": f"{path} in body should be greater than or equal to {error.validator_value}",
        "maximum": f"{path} in body should be less than or equal to {error.validator_value}",
        "minItems": f"{path} in body should have at least {error.validator_value} items",
        "maxItems": f"{path} in body should have at most {error.validator_value} items",
    }.get(str(v), f"{path} in body {error.message}")
    shown = _go_value(value) if not isinstance(value, (dict, list)) else f'"{_json_type(value)}"'
    yield Cause(path, "FieldValueInvalid", f"Invalid value: {shown}: {detail}")


def _validate_metadata(obj: Mapping[str, Any], rtype: ResourceType) -> Iterator[Cause]:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        yield Cause("metadata", "FieldValueRequired", "Required value")
        return
    name = meta.get("name")
    if not name:
        yield Cause(
            "metadata.name",
            "FieldValueRequired",
            "Required value: name or generateName is required",
        )
        return
    rule = DNS1123_LABEL if rtype.plural == "namespaces" else DNS1123_SUBDOMAIN
    if not isinstance(name, str) or len(name) > 253 or not rule.match(name):
        yield Cause(
            "metadata.name",
            "FieldValueInvalid",
            f"Invalid value: {_go_value(name)}: a lowercase RFC 1123 subdomain must consist of "
            "lower case alphanumeric characters, '-' or '.', and must start and end with an "
            "alphanumeric character (e.g. 'example.com', regex used for validation is "
            "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
        )
    for key in ("labels", "annotations"):
        value = meta.get(key)
        if value is not None and (
            not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values())
        ):
            yield Cause(
                f"metadata.{key}", "FieldValueInvalid", "Invalid value: must be a map of strings"
            )


def _json_path(obj: Mapping[str, Any], path: str) -> Any:
    """The simple JSONPath of printer columns: `.spec.agent`, `.status.x`. (Built-in tables
    use `.a,.b` for a `a/b` cell, e.g. an event's object `Kind/name`.)"""
    if "," in path:
        values = [_json_path(obj, p) for p in path.split(",")]
        return None if any(v is None for v in values) else "/".join(str(v) for v in values)
    node: Any = obj
    for part in path.strip().lstrip(".").split("."):
        if not part:
            continue
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _cell(typ: str, value: Any, now: float) -> Any:
    if value is None:
        return None
    if typ == "date":
        if not isinstance(value, str):
            return None
        parsed = _parse_time(value)
        return "<invalid>" if parsed is None else human_duration(now - parsed)
    if typ == "string":
        return value if isinstance(value, str) else json.dumps(value)
    if typ == "integer":
        return (
            int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        )
    if typ == "number":
        return (
            float(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            else None
        )
    if typ == "boolean":
        return value if isinstance(value, bool) else None
    return value


def _parse_time(value: str) -> float | None:
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_rfc3339(ts: float) -> str:
    """metav1.Time's wire form: seconds precision, UTC, `Z`."""
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration (what the AGE column shows)."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"
