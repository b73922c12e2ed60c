"""What every result file records (the machine, the checkout, versions) and writing it."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.lib import ROOT
from devstack.local import envoy_binary


def package_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def first_line(cmd: list[str]) -> str:
    """The first line a command prints (stdout, else stderr), or '' if it cannot run."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return lines[0] if lines else ""


def envoy_version() -> str:
    text = first_line([envoy_binary(), "--version"])
    m = re.search(r"/(\d+\.\d+\.\d+)/", text)
    return m.group(1) if m else text


def machine_base() -> dict[str, Any]:
    """The machine and checkout every result file records; scripts add their own fields."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(ROOT), "status", "--porcelain"])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git_commit": commit + (" (dirty)" if dirty else ""),
        "pinning": "none",
        "loadavg_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def write_results(stem: Path, doc: Any, text: str) -> None:
    """STEM.json (``doc``, indented) and STEM.md (``text``), then ``text`` on stdout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
