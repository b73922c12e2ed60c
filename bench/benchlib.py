"""What every benchmark under bench/ reads from /proc and records about the machine.

Imported by the benchmark scripts (`python bench/<script>.py` puts bench/ on sys.path).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from sidecar.local import envoy_binary

__all__ = [
    "CLK_TCK",
    "cpu_seconds",
    "envoy_version",
    "first_line",
    "machine_base",
    "machine_ticks",
    "package_version",
    "process_tree",
    "rss_mb",
    "tree_cpu_seconds",
    "tree_rss_mb",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (mandate: the supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += rss_mb(p)
    return total


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


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


def unlimited_profiles(source: Path, work: Path) -> Path:
    """A copy of the profile directory ``source`` under ``work`` without `rateLimit:` lines.
    The benchmarks drive one agent far above any sane rate limit; with the limit in place most
    calls would be cheap `rate` denies instead of the allow path being measured."""
    target = work / "profiles"
    target.mkdir(parents=True, exist_ok=True)
    for f in source.glob("*.y*ml"):
        lines = f.read_text().splitlines(keepends=True)
        (target / f.name).write_text("".join(x for x in lines if "rateLimit:" not in x))
    return target
