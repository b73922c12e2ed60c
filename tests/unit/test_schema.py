"""The shipped JSON Schema (sidecar/schema/agentprofile.schema.json) is the model's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.core import model

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "sidecar" / "schema" / "agentprofile.schema.json"
EXAMPLE = ROOT / "tests" / "fixtures" / "profiles" / "agents.yaml"


def _example_documents() -> list[Any]:
    return [d for d in yaml.safe_load_all(EXAMPLE.read_text(encoding="utf-8")) if d is not None]


def test_shipped_schema_is_generated_from_the_model() -> None:
    expected = json.dumps(model.json_schema(), indent=2, sort_keys=True) + "\n"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == expected


def test_schema_identifies_itself() -> None:
    schema = model.json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://mandate.dev/schemas/agentprofile.v1alpha1.json"
    assert schema["title"] == "AgentProfile"
    assert sorted(schema["required"]) == ["apiVersion", "kind", "metadata", "spec"]
    assert schema["properties"]["kind"]["const"] == model.KIND
    assert schema["properties"]["apiVersion"]["const"] == model.API_VERSION


def test_schema_forbids_unknown_fields_except_in_metadata() -> None:
    schema = model.json_schema()
    objects = {"AgentProfile": schema, **schema["$defs"]}
    closed = {name for name, d in objects.items() if d.get("additionalProperties") is False}
    assert set(objects) - closed == {"Metadata"}


def test_schema_uses_the_profile_field_names() -> None:
    defs = model.json_schema()["$defs"]
    assert set(defs["Rule"]["properties"]) == {
        "hosts",
        "methods",
        "paths",
        "mcpTools",
        "mcpMethods",
        "mcpArguments",
        "query",
        "jsonBody",
    }
    assert set(defs["ProfileSpec"]["properties"]) == {
        "owner",
        "identities",
        "defaultPurpose",
        "purposes",
        "elevations",
        "behavior",
        "audit",
        "credentials",
    }
    assert set(defs["AuditSpec"]["properties"]) == {"arguments", "values"}
    assert set(defs["Purpose"]["properties"]) == {
        "description",
        "allow",
        "deny",
        "rateLimit",
        "requireTask",
    }
    assert set(defs["Credential"]["properties"]) == {
        "hosts",
        "connect",
        "secret",
        "oauth2ClientCredentials",
        "tokenExchange",
        "transactionToken",
    }


def test_example_documents_validate_against_the_model() -> None:
    docs = _example_documents()
    assert len(docs) == 2
    for doc in docs:
        model.AgentProfile.model_validate(doc)


def test_example_documents_validate_against_the_shipped_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    for doc in _example_documents():
        assert list(validator.iter_errors(doc)) == []
    bad = _example_documents()[0]
    bad["spec"]["purposes"]["reconcile"]["allow"][0]["pathz"] = ["/x"]
    assert list(validator.iter_errors(bad)) != []
