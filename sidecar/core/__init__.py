"""The decision core: profile model, loader, compiled snapshots, matchers and `decide`.

Pure: nothing in this package imports grpc, aiohttp, kubernetes, opentelemetry or
prometheus, and nothing here does I/O except `loader`, which reads profile files.
Import-linter enforces this (see pyproject.toml).
"""

from sidecar.core.decide import Code, Decision, RequestView, decide
from sidecar.core.loader import fingerprint, load_profiles
from sidecar.core.snapshot import Snapshot

__all__ = ["Code", "Decision", "RequestView", "Snapshot", "decide", "fingerprint", "load_profiles"]
