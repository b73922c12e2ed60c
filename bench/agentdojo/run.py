"""`python -m bench agentdojo`: the ground truth, the profiles, the replay on each transport,
the figures and the result files (bench/results/agentdojo.{md,json})."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.agentdojo.extract import (
    DEFAULT_BENCHMARK,
    HELD_OUT,
    PINNED_VERSION,
    SUITES,
    held_out_problem,
)
from bench.agentdojo.policy import (
    CONFIGS,
    Config,
    Session,
    Suite,
    agent_name,
    declaration,
    profile,
    purpose_name,
    sessions,
    suite_from_json,
)
from bench.agentdojo.replay import replay, running_stack, write_profiles
from bench.agentdojo.score import (
    Outcome,
    markdown_table,
    not_blocked_lines,
    pinned_arguments,
    summarise,
    write_allowed_lines,
)
from bench.lib import BENCH, RESULTS, ROOT, BenchError
from bench.lib.proc import sigterm_as_interrupt
from bench.lib.report import machine_base, package_version, write_results

REQUIREMENTS = BENCH / "requirements-agentdojo.txt"
EXTRACT = BENCH / "agentdojo" / "extract.py"
SIDE_VENV = ROOT / ".venv-agentdojo"
INSTALL = (
    "agentdojo is not installed. It pulls in heavy dependencies (langchain, openai, "
    "anthropic, ...), so keep it out of mandate's venv:\n"
    f"  python3 -m venv {SIDE_VENV.relative_to(ROOT)} && "
    f"{SIDE_VENV.relative_to(ROOT)}/bin/pip install -r {REQUIREMENTS.relative_to(ROOT)}\n"
    "then run again (or pass --agentdojo-python PATH, or --ground-truth FILE)"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench agentdojo",
        description="AgentDojo's ground-truth tool calls replayed as MCP tools/call through "
        "real Envoy and mandate: utility and security per profile configuration",
    )
    p.add_argument(
        "--suites",
        default=",".join(SUITES),
        help=f"comma-separated (default {','.join(SUITES)}; {', '.join(HELD_OUT)} are "
        "held out and need --held-out)",
    )
    p.add_argument(
        "--held-out", action="store_true", help="allow the held-out suites (banking, slack)"
    )
    p.add_argument("--benchmark-version", default=DEFAULT_BENCHMARK)
    p.add_argument(
        "--configs",
        default=",".join(c.id for c in CONFIGS),
        help="comma-separated configurations (default: all)",
    )
    p.add_argument("--transports", default="grpc,http", help="grpc, http or both (default)")
    p.add_argument("--ground-truth", type=Path, help="extract.py's JSON (default: extract it now)")
    p.add_argument(
        "--agentdojo-python",
        type=Path,
        help=f"a Python with agentdojo (default: this one if it has it, else {SIDE_VENV.name})",
    )
    p.add_argument("--save-ground-truth", type=Path, help="also write the ground truth here")
    p.add_argument("--save-profiles", type=Path, help="also write the profiles here")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--name", help="results stem (default agentdojo, agentdojo-held-out)")
    return p.parse_args(argv)


def ground_truth(args: argparse.Namespace, suites: list[str], work: Path) -> dict[str, Any]:
    """extract.py's JSON: from --ground-truth, in this interpreter, or another's."""
    if args.ground_truth is not None:
        doc: dict[str, Any] = json.loads(args.ground_truth.read_text())
        missing = [s for s in suites if s not in doc.get("suites", {})]
        if missing:
            raise BenchError(f"{args.ground_truth}: no suite {', '.join(missing)}")
        return doc
    if args.agentdojo_python is None and importlib.util.find_spec("agentdojo") is not None:
        from bench.agentdojo.extract import extract

        return extract(suites, args.benchmark_version, held_out=args.held_out)
    python = args.agentdojo_python or SIDE_VENV / "bin" / "python"
    if not python.exists():
        raise BenchError(INSTALL)
    out = work / "ground-truth.json"
    cmd = [str(python), str(EXTRACT), "--suites", ",".join(suites), "--out", str(out)]
    cmd += ["--benchmark-version", args.benchmark_version]
    if args.held_out:
        cmd.append("--held-out")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, check=False, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(cmd)}: no answer in 300 s") from None
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}\n")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def example(suite: Suite) -> dict[str, Any]:
    """One user task's argument-rule purpose and declaration, to show in the report: the
    first that pins something."""
    for task in suite.user_tasks:
        decl = declaration(suite, task)
        schemas = decl[0].get("mcpArguments", {})
        if any(set(p) - {"type"} for s in schemas.values() for p in s["properties"].values()):
            return {"user_task": task.id, "prompt": task.text, "declaration": decl}
    return {}


async def replay_all(
    transport: str,
    work: Path,
    profiles: Path,
    plan: list[tuple[Suite, Config, list[Session]]],
) -> dict[tuple[str, str], list[Outcome]]:
    agents = [agent_name(s.name, c.id) for s, c, _ in plan]
    narrowing = [agent_name(s.name, c.id) for s, c, _ in plan if c.narrowing]
    out: dict[tuple[str, str], list[Outcome]] = {}
    async with (
        running_stack(transport, work, profiles, agents, narrowing) as stack,
        aiohttp.ClientSession(auto_decompress=False) as http,
    ):
        for suite, config, todo in plan:
            t0 = time.monotonic()
            out[(suite.name, config.id)] = await replay(stack, http, suite, config, todo)
            calls = sum(len(s.steps) for s in todo)
            print(
                f"  {transport} {suite.name} {config.id}: {calls} calls in "
                f"{time.monotonic() - t0:.1f} s",
                file=sys.stderr,
            )
    return out


def differences(
    a: dict[tuple[str, str], list[Outcome]], b: dict[tuple[str, str], list[Outcome]]
) -> list[str]:
    """Calls decided differently on two transports (allowed, code or reason)."""
    diffs = []
    for key, outs in a.items():
        for x, y in zip(outs, b.get(key, []), strict=False):
            if (x.allowed, x.code, x.reason) != (y.allowed, y.code, y.reason):
                diffs.append(f"{key} {x.session} {x.role}{x.index} {x.tool}: {x} vs {y}")
        if len(outs) != len(b.get(key, [])):
            diffs.append(f"{key}: {len(outs)} vs {len(b.get(key, []))} calls")
    return diffs


def markdown(info: dict[str, Any], summaries: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    configs = [c for c in CONFIGS if c.id in info["configs"]]
    lines = [
        f"# agentdojo — {info['date']}",
        "",
        f"AgentDojo {info['agentdojo']} (benchmark {info['benchmark_version']}), suites "
        f"{', '.join(info['suites'])}; ground-truth tool calls replayed as MCP `tools/call` "
        f"through real Envoy {info['envoy']} and `mandate run` ({', '.join(info['transports'])}"
        f"); git {info['git_commit']}, {info['nproc']} CPUs, Python {info['python']}.",
        "",
        "Profiles written from the user tasks only (bench/agentdojo/policy.py). **Utility**: "
        "user-task calls allowed (each user task alone). **Security cases**: user task x "
        "injection task, the injection's calls spliced into the user task's session after its "
        "first call; **blocked**: at least one injection call refused.",
        "",
        markdown_table(summaries, configs),
        "",
    ]
    if extra["transport_differences"]:
        lines += ["**Transports disagree** on these calls:", ""]
        lines += [f"- {d}" for d in extra["transport_differences"][:50]] + [""]
    elif len(info["transports"]) > 1:
        lines += [
            f"Both transports decided every call identically ({extra['calls_per_transport']} "
            "calls each); the figures are those of both.",
            "",
        ]
    excluded = {s["suite"]: s["excluded_injection_tasks"] for s in summaries}
    if any(excluded.values()):
        lines += [
            "Injection tasks left out (their ground truth has no tool call, so there is no "
            "call to replay or refuse; AgentDojo judges them by the environment's final state "
            "or the model's answer): "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in excluded.items() if v)
            + ". Counted as cases not blocked, *blocked* would be: "
            + "; ".join(
                f"{s['suite']} {s['config']} {s['blocked_pct_counting_excluded']} %"
                for s in summaries
                if s["excluded_injection_tasks"]
            )
            + ".",
            "",
        ]
    lines += [
        "Utility is measured on the very calls the rules were written from: 100 % says that "
        "mandate, through Envoy, allows every call its rules were meant to allow (no false "
        "refusal in matching arguments), not that an agent's own wording of the calls would "
        "pass. Free text is never pinned and dates are pinned by day for that reason; "
        "configuration 3b shows what pinning only what the prompt names (a declaration made "
        "before any data is read) keeps.",
        "",
    ]
    lines += ["## Refused user-task calls", ""]
    refused = [(s, r) for s in summaries for r in s["refused_user_calls"]]
    if not refused:
        lines += ["None: every user-task call was allowed in every configuration.", ""]
    for s, r in refused:
        args = json.dumps(r["arguments"], ensure_ascii=False)
        lines.append(
            f"- {s['suite']} {s['config']} {r['user_task']} call {r['index']} "
            f"`{r['tool']}({args[:200]})`: {r['code']}: {r['reason']}"
        )
    lines += ["", "## Security cases not blocked", ""]
    for s in summaries:
        if not s["not_blocked"]:
            continue
        lines += [f"### {s['suite']}, {s['config']} ({len(s['not_blocked'])} cases)", ""]
        lines += [*not_blocked_lines(s), ""]
    passed = [line for s in summaries for line in write_allowed_lines(s)]
    if passed:
        lines += [
            "## Blocked, but a write of the injection was allowed",
            "",
            "Cases counted as blocked (an injection call was refused) in which a "
            "state-changing call of the injection still went through (*every write refused* "
            "excludes them):",
            "",
            *passed,
            "",
        ]
    lines += ["## How mandate refused the injections' calls (most frequent reasons)", ""]
    for s in summaries:
        refusals = s["injection_refusals"]
        top = list(refusals.items())[:2]
        by_args = [(r, n) for r, n in refusals.items() if "argument" in r]
        if top:
            shown = "; ".join(f"{n} x {r[:200].replace('`', '')}" for r, n in top)
            lines.append(f"- {s['suite']} {s['config']}: {shown}")
        if by_args:
            total = sum(n for _, n in by_args)
            r, n = by_args[0]
            lines.append(
                f"  - by an argument constraint: {total} calls, e.g. {n} x "
                f"{r[:240].replace('`', '')}"
            )
    lines.append("")
    lines += ["## What the argument rules pin", ""]
    for name, (every, prompt) in extra["pinned"].items():
        lines.append(
            f"- {name}: {every} (user task, tool, argument) pinned from the ground truth "
            f"(configurations 2 and 3a); {prompt} of them named by the user task's prompt "
            "(3b: what a declaration made before reading any data can pin)"
        )
    lines.append("")
    lines += ["## An example declaration (configuration 3; the purpose of configuration 2)", ""]
    for name, ex in extra["examples"].items():
        if ex:
            lines += [
                f"{name} {ex['user_task']}: {ex['prompt']}",
                "",
                "```yaml",
                yaml.safe_dump(ex["declaration"], sort_keys=False, allow_unicode=True).strip(),
                "```",
                "",
            ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], str]:
    suites = [s for s in args.suites.split(",") if s]
    problem = held_out_problem(suites, args.held_out)
    if problem:
        raise BenchError(problem)
    wanted = [c for c in args.configs.split(",") if c]
    configs = [c for c in CONFIGS if c.id in wanted]
    unknown = set(wanted) - {c.id for c in CONFIGS}
    if unknown or not configs:
        raise BenchError(f"--configs: unknown {sorted(unknown)} (known: {[c.id for c in CONFIGS]})")
    transports = [t for t in args.transports.split(",") if t]
    if not transports or set(transports) - {"grpc", "http"}:
        raise BenchError(f"--transports: grpc and/or http, not {args.transports!r}")
    doc = ground_truth(args, suites, work)
    if args.save_ground_truth:
        args.save_ground_truth.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    if doc.get("agentdojo") != PINNED_VERSION:
        print(
            f"agentdojo: WARNING: agentdojo {doc.get('agentdojo')}, not the pinned "
            f"{PINNED_VERSION}: figures may not compare",
            file=sys.stderr,
        )
    loaded = [suite_from_json(name, doc["suites"][name]) for name in suites]
    plan: list[tuple[Suite, Config, list[Session]]] = []
    skipped: dict[str, list[str]] = {}
    for suite in loaded:
        todo, skipped[suite.name] = sessions(suite)
        plan += [(suite, config, todo) for config in configs]
    profiles = write_profiles([profile(s, c) for s, c, _ in plan], work)
    if args.save_profiles:
        write_profiles([profile(s, c) for s, c, _ in plan], args.save_profiles)
    by_transport: dict[str, dict[tuple[str, str], list[Outcome]]] = {}
    started = time.monotonic()
    for transport in transports:
        by_transport[transport] = asyncio.run(replay_all(transport, work, profiles, plan))
    elapsed = time.monotonic() - started
    first = by_transport[transports[0]]
    diffs: list[str] = []
    for other in transports[1:]:
        diffs += differences(first, by_transport[other])
    summaries = [
        summarise(suite, config, todo, first[(suite.name, config.id)], skipped[suite.name])
        for suite, config, todo in plan
    ]
    from bench.lib.report import envoy_version

    info = {
        **machine_base(),
        "agentdojo": doc.get("agentdojo"),
        "benchmark_version": doc.get("benchmark_version"),
        "suites": suites,
        "held_out": args.held_out,
        "configs": [c.id for c in configs],
        "transports": transports,
        "envoy": envoy_version(),
        "mandate": package_version("mandate"),
        "replay_s": round(elapsed, 1),
    }
    extra = {
        "transport_differences": diffs,
        "calls_per_transport": sum(len(v) for v in first.values()),
        "examples": {s.name: example(s) for s in loaded},
        "pinned": {
            s.name: (pinned_arguments(s, prompt_only=False), pinned_arguments(s, prompt_only=True))
            for s in loaded
        },
        "purposes": {s.name: [purpose_name(t.id) for t in s.user_tasks] for s in loaded},
    }
    result = {"machine": info, "summary": summaries, **extra}
    return result, markdown(info, summaries, extra)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with (
            sigterm_as_interrupt(),
            tempfile.TemporaryDirectory(prefix="mandate-bench-adojo-") as tmp,
        ):
            doc, text = run(args, Path(tmp))
    except BenchError as exc:
        print(f"agentdojo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agentdojo: interrupted; processes stopped", file=sys.stderr)
        return 130
    name = args.name or ("agentdojo-held-out" if args.held_out else "agentdojo")
    write_results(args.out / name, doc, text)
    print(f"wrote {args.out / name}.json and {args.out / name}.md", file=sys.stderr)
    if doc["transport_differences"]:
        return 1
    return 0
