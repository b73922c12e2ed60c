"""AgentDojo's ground truth as plain JSON: for each suite asked for, the tools (name -> the
JSON Schema of their parameters), and the ground-truth tool calls of every user task and
every injection task, with their arguments as the suite's default environment gives them.

Run by `python -m bench agentdojo` in whichever interpreter has agentdojo (pinned in
bench/requirements-agentdojo.txt): in-process when mandate's venv has it, else as a script
with another venv's Python (by path, so that nothing of mandate or bench is imported there):

    .venv-agentdojo/bin/python bench/agentdojo/extract.py --out ground-truth.json

Imports only the standard library and agentdojo. The suites banking and slack are our held-out
check: refused unless --held-out says so explicitly (agentdojo's suite registry still imports
their modules when it loads; nothing here reads their tasks unless asked).

Conventions: a user task's calls are its `ground_truth(env)` on the default environment (the
injection vectors at their defaults) after the task's own `init_environment`; an injection
task's calls are its `ground_truth(env)` on the default environment. Arguments are converted
to JSON deterministically (datetime/date/time: ISO 8601; enums: their value; tuples: lists;
sets: sorted lists; pydantic models: `model_dump(mode="json")`); anything else is an error.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PINNED_VERSION = "0.1.35"
DEFAULT_BENCHMARK = "v1.2.2"  # agentdojo 0.1.35's default (`agentdojo.scripts.benchmark`)
SUITES = ("workspace", "travel")
HELD_OUT = ("banking", "slack")


def held_out_problem(suites: Sequence[str], held_out: bool) -> str | None:
    """Why ``suites`` may not be run (a held-out suite without ``held_out``, an unknown
    suite), or None."""
    unknown = [s for s in suites if s not in SUITES + HELD_OUT]
    if unknown:
        return f"unknown suite(s) {', '.join(unknown)} (known: {', '.join(SUITES + HELD_OUT)})"
    kept = [s for s in suites if s in HELD_OUT]
    if kept and not held_out:
        return (
            f"{', '.join(kept)}: held out (our own check, never run or tuned on); "
            "pass --held-out to run it explicitly"
        )
    return None


def to_json(value: Any, where: str = "") -> Any:
    """``value`` as JSON data, deterministically; TypeError naming ``where`` otherwise."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise TypeError(f"{where}: {value!r} has no JSON form")
        return value
    if isinstance(value, enum.Enum):
        return to_json(value.value, where)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        items = [to_json(v, where) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return to_json(dump(mode="json"), where)
    raise TypeError(f"{where}: {type(value).__name__} {value!r} has no JSON form")


def _number(task_id: str) -> int:
    m = re.search(r"(\d+)$", task_id)
    return int(m.group(1)) if m else -1


def _calls(calls: Sequence[Any], where: str) -> list[dict[str, Any]]:
    return [
        {"tool": str(c.function), "args": to_json(dict(c.args), f"{where}[{i}].{c.function}")}
        for i, c in enumerate(calls)
    ]


def extract(suites: Sequence[str], benchmark_version: str, *, held_out: bool) -> dict[str, Any]:
    problem = held_out_problem(suites, held_out)
    if problem:
        raise ValueError(problem)
    from importlib import metadata

    from agentdojo.task_suite.load_suites import get_suite  # type: ignore[import-not-found]

    out: dict[str, Any] = {
        "agentdojo": metadata.version("agentdojo"),
        "benchmark_version": benchmark_version,
        "suites": {},
    }
    for name in suites:
        suite = get_suite(benchmark_version, name)
        env = suite.load_and_inject_default_environment({})
        tools = {f.name: to_json(f.parameters.model_json_schema(), f.name) for f in suite.tools}
        users = []
        for task_id, task in sorted(suite.user_tasks.items(), key=lambda kv: _number(kv[0])):
            task_env = task.init_environment(env.model_copy(deep=True))
            calls = task.ground_truth(task_env)
            text = str(getattr(task, "PROMPT", ""))
            users.append({"id": task_id, "text": text, "calls": _calls(calls, task_id)})
        injections = []
        for task_id, task in sorted(suite.injection_tasks.items(), key=lambda kv: _number(kv[0])):
            calls = task.ground_truth(env.model_copy(deep=True))
            text = str(getattr(task, "GOAL", ""))
            injections.append({"id": task_id, "text": text, "calls": _calls(calls, task_id)})
        out["suites"][name] = {"tools": tools, "user_tasks": users, "injection_tasks": injections}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", default=",".join(SUITES), help="comma-separated suites")
    p.add_argument("--benchmark-version", default=DEFAULT_BENCHMARK)
    p.add_argument("--held-out", action="store_true", help="allow banking and slack")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    suites = [s for s in args.suites.split(",") if s]
    problem = held_out_problem(suites, args.held_out)
    if problem:
        print(f"extract: {problem}", file=sys.stderr)
        return 2
    try:
        doc = extract(suites, args.benchmark_version, held_out=args.held_out)
    except ImportError as exc:
        print(
            f"extract: agentdojo is not importable here ({exc}): "
            "pip install -r bench/requirements-agentdojo.txt",
            file=sys.stderr,
        )
        return 1
    args.out.write_text(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
