"""The agent context API's generated module matches the checked-in .proto.

The build (setup.py) compiles protos/mandate/agent/v1/context.proto into
`sidecar._proto.context_pb2`; the generated files are not committed. These tests compile the
.proto again with grpcio-tools and compare descriptors, so a stale or missing generated
module fails here with the command that fixes it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO = "mandate/agent/v1/context.proto"
REBUILD = "run `.venv/bin/pip install --no-deps -e .` (or `make venv`) to regenerate it"


def _generated() -> object:
    try:
        return importlib.import_module("sidecar._proto.context_pb2")
    except ImportError as exc:  # pragma: no cover - the message is the point
        pytest.fail(f"sidecar._proto.context_pb2 is missing ({exc}): {REBUILD}")


def _strip_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    # protoc's descriptor sets carry json_name; the generated module's copy does not.
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _strip_json_names(message.nested_type)


def test_generated_module_matches_the_checked_in_proto(tmp_path: Path) -> None:
    from grpc_tools import protoc

    out = tmp_path / "context.pb"
    assert (
        protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"--descriptor_set_out={out}", PROTO]) == 0
    )
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _strip_json_names(fresh.message_type)
    built = descriptor_pb2.FileDescriptorProto()
    _generated().DESCRIPTOR.CopyToProto(built)  # type: ignore[attr-defined]
    assert built == fresh, f"sidecar._proto.context_pb2 is stale: {REBUILD}"


def test_service_and_package() -> None:
    pb = _generated()
    file = pb.DESCRIPTOR  # type: ignore[attr-defined]
    assert (file.name, file.package) == (PROTO, "mandate.agent.v1")
    service = file.services_by_name["AgentContext"]
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {
        "ReportTask": ("ReportTaskRequest", "Task"),
        "EndTask": ("EndTaskRequest", "Task"),
        "RequestElevation": ("RequestElevationRequest", "ElevationRequest"),
        "GetStatus": ("GetStatusRequest", "Status"),
        "Explain": ("ExplainRequest", "ExplainResponse"),
    }
    assert pb.Status.__module__ == "sidecar._proto.context_pb2"  # type: ignore[attr-defined]


def test_generated_stub_ships_for_type_checkers() -> None:
    assert (ROOT / "sidecar" / "_proto" / "context_pb2.pyi").is_file(), REBUILD
