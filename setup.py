"""Build hook: compile mandate's own protos (protos/) into `sidecar._proto` at build time.

Everything else about the package lives in pyproject.toml; this file only adds a `build_py`
step that runs grpcio-tools' protoc (a build requirement, pinned in pyproject.toml) before
the modules are collected. It runs for wheels, sdist builds and editable installs
(`pip install -e .`, as the Makefile does), writing the generated modules next to the
sources, where an editable install finds them. The generated files are not committed
(.gitignore); tests/unit/test_context_proto.py checks that they match the .proto.

Generated per proto `protos/mandate/agent/v1/<name>.proto`: `sidecar/_proto/<name>_pb2.py`
and its type stub `<name>_pb2.pyi`. The descriptor keeps its canonical name
(`mandate/agent/v1/<name>.proto`, package `mandate.agent.v1`), so clients in other languages
compiled from the same file interoperate. No `_pb2_grpc` module is generated: mandate's
server and client bind the service from its descriptor (typed, no untyped generated code).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ("mandate/agent/v1/context.proto",)
OUT = ROOT / "sidecar" / "_proto"


def compile_protos() -> list[Path]:
    """Run protoc on PROTOS; write the modules into sidecar/_proto; return their paths."""
    try:
        from grpc_tools import protoc  # build requirement (pyproject.toml [build-system])
    except ImportError as exc:
        raise SystemExit(
            "mandate's build compiles protos/ with grpcio-tools, which is not installed: "
            "build with build isolation (the default of pip and `python -m build`) or "
            "install grpcio-tools (pinned in pyproject.toml) first"
        ) from exc
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="mandate-protoc-") as tmp:
        for proto in PROTOS:
            if not (PROTO_ROOT / proto).is_file():
                raise SystemExit(f"missing {PROTO_ROOT / proto}")
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                proto,
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {PROTO_ROOT / proto}")
            stem = proto.removesuffix(".proto")
            generated_module = stem.replace("/", ".") + "_pb2"
            name = Path(stem).name
            for suffix in (".py", ".pyi"):
                src = Path(tmp) / f"{stem}_pb2{suffix}"
                text = src.read_text(encoding="utf-8")
                if suffix == ".py":
                    # The module's own name, used for the message classes' __module__.
                    quoted = f"'{generated_module}'"
                    if quoted not in text:
                        raise SystemExit(f"unexpected protoc output for {proto}: no {quoted}")
                    text = text.replace(quoted, f"'sidecar._proto.{name}_pb2'")
                dst = OUT / f"{name}_pb2{suffix}"
                OUT.mkdir(parents=True, exist_ok=True)
                dst.write_text(text, encoding="utf-8")
                written.append(dst)
    return written


class BuildPyWithProtos(build_py):
    """build_py that compiles protos/ first (also in editable mode, where build_py itself
    copies nothing: the generated files then sit next to the editable sources)."""

    def run(self) -> None:
        compile_protos()
        # Data files (the .pyi stubs) are computed lazily: drop any list made before now.
        self.__dict__.pop("data_files", None)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
