"""How `decide()` scales with the size of a profile (issue 7, item 5).

Generates one AgentProfile whose purpose `work` holds N rules (10, 100, 1,000, 10,000),
writes it as YAML into a temporary directory and loads it with `load_profiles`, so that the
real loader, validator and compiler are measured. The rules are spread like a large real
profile (seeded, so every run builds the same profiles): about 83 % exact hosts (many distinct
hosts, some rules with two hosts or a port), 12 % `*.` wildcard hosts, 3 % host-less rules,
2 % deny rules (exact host, wildcard and host-less), with methods (one, several or absent) and
paths with `*` and `**`. The rules sit in one purpose: the one a Check consults.

For each N and each request kind it times single `decide()` calls with
`time.perf_counter_ns` (warm-up first, GC disabled while timing, the calls of a case split in
rounds interleaved across N so that a noisy moment hits every N alike) and reports p50, p99,
p99.9 and max in µs, and the growth from 10 to 10,000 rules. Each kind cycles over up to 64
different requests (different hosts and rules spread over the profile). Before timing, every
request's decision is checked (code and rule); the script aborts on a mismatch.

Issue 7's goals: p99 <= 10 µs at 1,000 rules; growth 10 -> 10,000 rules under 2x. When one is
missed, the worst kind is profiled with cProfile at 10 and 10,000 rules and the calls per
`decide()` of the functions that grow are written to the report.

Argument rules (issue 18): MCP `tools/call` Checks against a purpose whose rule lists tools
by name only, and with three constraints on `send_money`'s arguments (an enum, a numeric
range, a length), allowed and denied; the same call under a task whose declaration adds three
more; a plain HTTP JSON body with three constraints; and the load time of a profile of 1,000
MCP tool rules with three constraints each (distinct schemas, so compilation is not shared).
Issue 18's goal: p99 <= 15 µs for the three-constraint call.

Writes bench/results/decide_scaling.{json,md}.
Run: python -m bench decide_scaling [--calls 20000] [--rounds 4] [--sizes 10,100,...]
     python -m bench decide_scaling --arguments-only   # just the argument rule cases
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.lib import RESULTS
from bench.lib.report import machine_base, write_results
from sidecar.core.agentstate import EMPTY_AGENT_STATE, AgentStateTable, TaskBinding
from sidecar.core.decide import Code, RequestView, decide
from sidecar.core.loader import load_profiles
from sidecar.core.snapshot import Snapshot, compile_snapshot

AGENT = "bench-agent"
PURPOSE = "work"
NOW = 1_800_000_000.0
GOAL_P99_US_AT_1000 = 10.0
GOAL_GROWTH = 2.0
MAX_VIEWS = 64
TIMES = "\u00d7"  # the multiplication sign, for ratios in the Markdown

KINDS: dict[str, str] = {
    "allowed_exact": "allowed by an exact-host rule (rules spread over the profile)",
    "allowed_wildcard": "allowed by a `*.` wildcard rule",
    "outside_unknown_host": "denied outside purpose: host named by no rule",
    "outside_known_host": "denied outside purpose: known host, path no rule allows",
    "denied_by_rule": "denied by an exact-host deny rule (`/admin/**`)",
}

_METHODS: list[list[str] | None] = [["GET"], ["GET", "HEAD"], ["POST"], ["PUT", "PATCH"], None]


# ---------------------------------------------------------------- profiles


@dataclass
class Target:
    """A request built to hit one rule, and the decision it must get."""

    method: str
    authority: str
    path: str
    code: str
    rule: str = ""


@dataclass
class Generated:
    doc: dict[str, Any]
    targets: dict[str, list[Target]]
    counts: dict[str, int]


def _concrete(pattern: str) -> str:
    return "/" + "/".join(
        "42" if s == "*" else "a/b" if s == "**" else s for s in pattern[1:].split("/")
    )


def _spread(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def generate(n: int, seed: int = 7, *, fixed_hostless: bool = False) -> Generated:
    """A profile with ``n`` rules in purpose ``work`` and requests that exercise it.
    ``fixed_hostless``: one host-less allow and one host-less deny rule whatever ``n`` (the
    control variant); otherwise about 3 % of the allow and 10 % of the deny rules."""
    rng = random.Random(seed * 100_003 + n)
    n_deny = max(2, n // 50)
    n_allow = n - n_deny
    n_wild = max(1, round(n_allow * 0.12))
    n_hostless = 1 if fixed_hostless else max(1, round(n_allow * 0.03))
    kinds = ["wild"] * n_wild + ["hostless"] * n_hostless
    kinds += ["exact"] * (n_allow - len(kinds))
    rng.shuffle(kinds)

    allow: list[dict[str, Any]] = []
    exact_rules: list[tuple[int, dict[str, Any]]] = []
    wild_rules: list[tuple[int, dict[str, Any]]] = []
    for i, kind in enumerate(kinds):
        rule: dict[str, Any] = {}
        if kind == "exact":
            hosts = [f"svc{i}.team{i % 23}.svc.cluster.local"]
            if i % 7 == 3:
                hosts[0] += ":8443"
            if i % 5 == 1:
                hosts.append(f"svc{i}-canary.team{i % 23}.svc.cluster.local")
            rule["hosts"] = hosts
            methods = _METHODS[i % len(_METHODS)]
            if methods:
                rule["methods"] = methods
            shape = i % 4
            if shape == 0:
                rule["paths"] = [f"/v1/r{i}/*"]
            elif shape == 1:
                rule["paths"] = [f"/api/r{i}/**"]
            elif shape == 2:
                rule["paths"] = [f"/v{i % 3}/items/*/detail", f"/v{i % 3}/items/*/history/**"]
            else:
                rule["paths"] = [f"/r{i}/**", "/healthz"]
            exact_rules.append((i, rule))
        elif kind == "wild":
            rule["hosts"] = [f"*.zone{i}.example.com"]
            rule["methods"] = ["GET"]
            rule["paths"] = ["/v1/**"]
            wild_rules.append((i, rule))
        else:  # host-less: a path allowed on any host
            rule["methods"] = ["GET"]
            rule["paths"] = [f"/shared/{i}/*", f"/status/{i}"]
        allow.append(rule)

    deny: list[dict[str, Any]] = []
    denied_hosts: list[str] = []
    n_deny_hostless = 1 if fixed_hostless else max(1, n_deny // 10)
    for j in range(n_deny):
        if j < n_deny_hostless:
            deny.append({"paths": ["/**/.git/**"] if j == 0 else [f"/**/debug{j}"]})
        elif j == n_deny_hostless and n_deny >= 3:
            host = wild_rules[j % len(wild_rules)][1]["hosts"][0]
            deny.append({"hosts": [host], "paths": ["/v1/internal/**"]})
        else:
            _, r = exact_rules[(j * 7919) % len(exact_rules)]
            host = r["hosts"][0]
            denied_hosts.append(host)
            deny.append({"hosts": [host], "paths": ["/admin/**"]})

    targets: dict[str, list[Target]] = {k: [] for k in KINDS}
    for i, r in _spread(exact_rules, MAX_VIEWS):
        method = (r.get("methods") or ["GET"])[0]
        path = _concrete(r["paths"][0])
        rid = f"{PURPOSE}.allow[{i}]"
        targets["allowed_exact"].append(Target(method, r["hosts"][0], path, Code.ALLOWED, rid))
        targets["outside_known_host"].append(
            Target(method, r["hosts"][0], f"/nothing/here/{i}", Code.OUTSIDE_PURPOSE)
        )
    for i, r in _spread(wild_rules, MAX_VIEWS):
        host = "api" + r["hosts"][0][1:]
        rid = f"{PURPOSE}.allow[{i}]"
        targets["allowed_wildcard"].append(Target("GET", host, "/v1/a/b", Code.ALLOWED, rid))
    for j in range(MAX_VIEWS):
        targets["outside_unknown_host"].append(
            Target("GET", f"h{j}.unlisted.example.org", f"/v1/r{j}/x", Code.OUTSIDE_PURPOSE)
        )
    deny_ids = {r["hosts"][0]: k for k, r in enumerate(deny) if "hosts" in r}
    for host in _spread(denied_hosts, MAX_VIEWS):
        rid = f"{PURPOSE}.deny[{deny_ids[host]}]"
        targets["denied_by_rule"].append(
            Target("GET", host, "/admin/users/1", Code.DENIED_BY_RULE, rid)
        )

    doc = {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentProfile",
        "metadata": {"name": AGENT},
        "spec": {
            "owner": "bench",
            "identities": [{"serviceAccount": f"agents/{AGENT}"}],
            "defaultPurpose": PURPOSE,
            "purposes": {
                PURPOSE: {"description": f"{n} rules", "allow": allow, "deny": deny},
                "other": {
                    "allow": [{"hosts": ["reports.example.com"], "methods": ["POST"]}],
                },
            },
        },
    }
    counts = {
        "rules": len(allow) + len(deny),
        "allow": len(allow),
        "deny": len(deny),
        "allow_exact": len(exact_rules),
        "allow_wildcard": len(wild_rules),
        "allow_hostless": n_hostless,
        "deny_hostless": n_deny_hostless,
    }
    return Generated(doc, targets, counts)


def index_shape(snap: Snapshot) -> dict[str, int]:
    """Sizes of the compiled index buckets a lookup may walk."""
    p = snap.agents[AGENT].purposes[PURPOSE]
    return {
        "exact_hosts": len(p.allow.exact),
        "wildcard_parents": len(p.allow.wildcard),
        "largest_exact_bucket": max(
            (len(b["\x00all"].other) for b in p.allow.exact.values()), default=0
        ),
        "allow_any_host_GET": _largest(p.allow.any_host.get("GET")),
        "deny_any_host_GET": _largest(p.deny.any_host.get("GET", p.deny.any_host[""])),
    }


def _largest(candidates: Any) -> int:
    """The most entries a GET lookup walks in a bucket: the largest first-segment list."""
    if candidates is None:
        return 0
    lists = [candidates.other, *candidates.by_segment.values()]
    return max(len(x) for x in lists)


# ---------------------------------------------------------------- measuring


def views_for(targets: list[Target]) -> list[RequestView]:
    return [
        RequestView(
            decision_id="bench",
            method=t.method,
            authority=t.authority,
            path=t.path,
            headers={"x-mandate-purpose": PURPOSE},
            configured_agent=AGENT,
        )
        for t in targets
    ]


def check(snap: Snapshot, n: int, kind: str, targets: list[Target]) -> None:
    for t, v in zip(targets, views_for(targets), strict=True):
        d = decide(snap, v, NOW)
        if d.code != t.code or d.rule != t.rule:
            raise SystemExit(
                f"{n} rules, {kind}: {t.method} {t.authority}{t.path} gave {d.code} {d.rule!r}"
                f" ({d.reason}); expected {t.code} {t.rule!r}"
            )


def time_calls(
    snap: Snapshot,
    views: list[RequestView],
    calls: int,
    warmup: int,
    state: AgentStateTable = EMPTY_AGENT_STATE,
) -> list[int]:
    """Nanoseconds of each of ``calls`` decide() calls, cycling over ``views``."""
    k = len(views)
    for i in range(warmup):
        decide(snap, views[i % k], NOW, agent_state=state)
    out = [0] * calls
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(calls):
            v = views[i % k]
            t0 = clock()
            decide(snap, v, NOW, agent_state=state)
            out[i] = clock() - t0
    finally:
        gc.enable()
    return out


# ---------------------------------------------------------------- argument rules (issue 18)

GOAL_P99_US_ARGUMENTS = 15.0
IBANS = ["DE89370400440532013000", "FR1420041010050500013M02606"]
SEND_MONEY = {
    "type": "object",
    "properties": {
        "to": {"type": "string", "enum": IBANS},
        "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
        "note": {"type": "string", "maxLength": 140},
    },
    "required": ["to", "amount"],
}
ARGUMENT_KINDS: dict[str, str] = {
    "mcp_names_only": "tools/call of a tool its rule lists by name (no argument constraint)",
    "mcp_3_constraints": "tools/call of send_money within three constraints (allowed)",
    "mcp_3_constraints_denied": "tools/call of send_money to an IBAN outside the enum",
    "mcp_task_narrowed": "the allowed send_money under a task declaring three more",
    "http_json_body_3": "POST with a JSON body within three constraints (allowed)",
}


def _argument_profile() -> dict[str, Any]:
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentProfile",
        "metadata": {"name": AGENT},
        "spec": {
            "owner": "bench",
            "defaultPurpose": PURPOSE,
            "purposes": {
                PURPOSE: {
                    "allow": [
                        {
                            "hosts": ["mcp.bank.svc.cluster.local"],
                            "methods": ["POST"],
                            "paths": ["/mcp"],
                            "mcpTools": ["send_money", "get_balance"],
                            "mcpArguments": {"send_money": SEND_MONEY},
                        },
                        {
                            "hosts": ["ledger.bank.svc.cluster.local"],
                            "methods": ["POST"],
                            "paths": ["/v1/transfers"],
                            "jsonBody": SEND_MONEY,
                        },
                    ]
                }
            },
        },
    }


def _tool_view(tool: str, arguments: dict[str, Any], task: str = "") -> RequestView:
    body = json.dumps(
        {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
         "params": {"name": tool, "arguments": arguments}}
    ).encode()  # fmt: skip
    headers = {"content-length": str(len(body)), "content-type": "application/json"}
    if task:
        headers["x-mandate-task"] = task
    return RequestView(
        decision_id="bench", method="POST", authority="mcp.bank.svc.cluster.local",
        path="/mcp", headers=headers, body=body, configured_agent=AGENT,
    )  # fmt: skip


def argument_cases(
    tmp: Path,
) -> tuple[Snapshot, dict[str, tuple[list[RequestView], AgentStateTable, str]]]:
    d = tmp / "arguments"
    d.mkdir()
    (d / "agent.yaml").write_text(yaml.safe_dump(_argument_profile(), sort_keys=False))
    snap = load_profiles(d)
    ok = [{"to": IBANS[i % 2], "amount": 10 + i, "note": f"invoice {i}"} for i in range(8)]
    bad = [{**a, "to": f"GB33BUKB2020155555{i:04d}"} for i, a in enumerate(ok)]
    declared = (
        {
            "mcpTools": ["send_money"],
            "mcpArguments": {
                "send_money": {
                    "properties": {
                        "to": {"enum": IBANS},
                        "amount": {"maximum": 50},
                        "note": {"pattern": "^invoice"},
                    }
                }
            },
        },
    )
    task = TaskBinding(AGENT, "", "T-1", PURPOSE, 0.0, None, declared)
    with_task = AgentStateTable.build(1, tasks=[task])
    body_views = []
    for a in ok:
        body = json.dumps(a).encode()
        body_views.append(
            RequestView(
                decision_id="bench",
                method="POST",
                authority="ledger.bank.svc.cluster.local",
                path="/v1/transfers",
                body=body,
                configured_agent=AGENT,
                headers={"content-length": str(len(body)), "content-type": "application/json"},
            )
        )
    cases = {
        "mcp_names_only": (
            [_tool_view("get_balance", {"account": f"acct-{i}"}) for i in range(8)],
            EMPTY_AGENT_STATE, Code.ALLOWED,
        ),
        "mcp_3_constraints": ([_tool_view("send_money", a) for a in ok], EMPTY_AGENT_STATE,
                              Code.ALLOWED),
        "mcp_3_constraints_denied": ([_tool_view("send_money", a) for a in bad],
                                     EMPTY_AGENT_STATE, Code.OUTSIDE_PURPOSE),
        "mcp_task_narrowed": ([_tool_view("send_money", a, "T-1") for a in ok], with_task,
                              Code.ALLOWED),
        "http_json_body_3": (body_views, EMPTY_AGENT_STATE, Code.ALLOWED),
    }  # fmt: skip
    for kind, (views, state, code) in cases.items():
        for v in views:
            got = decide(snap, v, NOW, agent_state=state)
            if got.code != code:
                raise SystemExit(f"arguments, {kind}: got {got.code} ({got.reason}), not {code}")
    return snap, cases


def argument_load(tmp: Path, rules: int = 1000) -> dict[str, float]:
    """load_profiles of ``rules`` MCP tool rules with three constraints each (distinct)."""
    allow = []
    for i in range(rules):
        schema = json.loads(json.dumps(SEND_MONEY))
        schema["properties"]["to"]["enum"] = [f"DE{i:020d}", f"FR{i:020d}"]
        schema["properties"]["amount"]["maximum"] = 100 + i
        allow.append(
            {"hosts": [f"mcp{i}.svc.cluster.local"], "methods": ["POST"], "paths": ["/mcp"],
             "mcpTools": [f"tool_{i}"], "mcpArguments": {f"tool_{i}": schema}}
        )  # fmt: skip
    doc = _argument_profile()
    doc["spec"]["purposes"][PURPOSE]["allow"] = allow
    d = tmp / f"arguments-{rules}"
    d.mkdir()
    (d / "agent.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    t0 = time.perf_counter()
    load_profiles(d)  # the first load: every schema compiled (a process starting)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_profiles(d)  # a reload of the same profiles: compilations are cached by schema
    again = time.perf_counter() - t0
    return {"rules": rules, "first_load_ms": first * 1000, "reload_ms": again * 1000}


def run_arguments(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mandate-arguments-") as tmp:
        snap, cases = argument_cases(Path(tmp))
        load = argument_load(Path(tmp))
    samples: dict[str, list[int]] = {k: [] for k in ARGUMENT_KINDS}
    per_round = -(-args.calls // args.rounds)
    for r in range(args.rounds):
        calls = min(per_round, args.calls - r * per_round)
        for kind, (views, state, _) in cases.items():
            samples[kind] += time_calls(snap, views, calls, args.warmup, state)
    kinds = {k: stats(v) for k, v in samples.items()}
    for k, s in kinds.items():
        print(f"arguments {k}: p50 {s['p50_us']:.2f} p99 {s['p99_us']:.2f} µs", flush=True)
    p99 = kinds["mcp_3_constraints"]["p99_us"]
    result: dict[str, Any] = {
        "kinds": kinds,
        "load": load,
        "goal": {"p99_us": GOAL_P99_US_ARGUMENTS, "measured_p99_us": p99,
                 "met": p99 <= GOAL_P99_US_ARGUMENTS},
    }  # fmt: skip
    if not result["goal"]["met"]:
        views, state, _ = cases["mcp_3_constraints"]
        result["profile"] = profile_kind(snap, views, args.profile_calls)
    return result


def timer_overhead(samples: int = 20000) -> int:
    clock = time.perf_counter_ns
    out = []
    for _ in range(samples):
        t0 = clock()
        out.append(clock() - t0)
    out.sort()
    return out[len(out) // 2]


def pct(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile, in µs."""
    i = min(len(sorted_ns) - 1, max(0, int(-(-q * len(sorted_ns) // 100)) - 1))
    return sorted_ns[i] / 1000


def stats(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    return {
        "n": len(s),
        "mean_us": sum(s) / len(s) / 1000,
        "p50_us": pct(s, 50),
        "p90_us": pct(s, 90),
        "p99_us": pct(s, 99),
        "p99_9_us": pct(s, 99.9),
        "max_us": s[-1] / 1000,
        "min_us": s[0] / 1000,
    }


def load_timed(directory: Path, repeats: int) -> tuple[Snapshot, dict[str, float]]:
    best_load = best_compile = float("inf")
    snap: Snapshot | None = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        snap = load_profiles(directory)
        best_load = min(best_load, time.perf_counter() - t0)
        agent = snap.agents[AGENT]
        t0 = time.perf_counter()
        compile_snapshot([(agent.profile, agent.source)])
        best_compile = min(best_compile, time.perf_counter() - t0)
    assert snap is not None
    return snap, {"load_ms": best_load * 1000, "compile_ms": best_compile * 1000}


def profile_kind(snap: Snapshot, views: list[RequestView], calls: int) -> dict[str, Any]:
    """cProfile ``calls`` decide() calls: per function, calls and own time per decide()."""
    k = len(views)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(calls):
        decide(snap, views[i % k], NOW)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    total = 0.0
    for (file, line, name), (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        total += tt
        where = f"{Path(file).name}:{line}" if line else file
        rows.append({"function": f"{name} ({where})", "calls_per_decide": nc / calls, "tt": tt})
    rows.sort(key=lambda r: -r["tt"])
    for r in rows:
        r["own_share"] = r.pop("tt") / total if total else 0.0
    return {"calls": calls, "top": rows[:10]}


# ---------------------------------------------------------------- report


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **machine_base(),
        "pyyaml_cloader": hasattr(yaml, "CSafeLoader"),
        "calls_per_case": args.calls,
        "rounds": args.rounds,
        "warmup_per_round": args.warmup,
        "sizes": args.sizes,
        "timer": "time.perf_counter_ns around each call; GC disabled while timing",
    }


def _f(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def markdown(doc: dict[str, Any]) -> str:
    m, sizes = doc["machine"], doc["machine"]["sizes"]
    lines = [
        "# decide() scaling: 10 to 10,000 rules in one purpose",
        "",
        "Written by `python -m bench decide_scaling`; see bench/README.md for what each "
        "column means.",
        "",
        "| rules | request | p50 µs | p99 µs | p99.9 µs | max µs | mean µs |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        for kind in KINDS:
            s = doc["results"][str(n)]["kinds"][kind]
            lines.append(
                f"| {n:,} | {kind} | {_f(s['p50_us'])} | {_f(s['p99_us'])} "
                f"| {_f(s['p99_9_us'])} | {_f(s['max_us'])} | {_f(s['mean_us'])} |"
            )
    lo, hi = str(sizes[0]), str(sizes[-1])
    lines += [
        "",
        f"Growth {int(lo):,} → {int(hi):,} rules (ratio of the same statistic):",
        "",
        "| request | p50 | p99 | mean | control p50 | control p99 |",
        "|---|---|---|---|---|---|",
    ]
    for kind, g in doc["growth"].items():
        c = doc["control"]["growth"][kind]
        lines.append(
            f"| {kind} | {g['p50']:.2f}{TIMES} | {g['p99']:.2f}{TIMES} | {g['mean']:.2f}{TIMES} "
            f"| {c['p50']:.2f}{TIMES} | {c['p99']:.2f}{TIMES} |"
        )
    lines += [
        "",
        "Control: the same profiles but with one host-less allow and one host-less deny rule "
        "at every size (instead of ~3 % and ~10 %).",
    ]
    lines += [
        "",
        "| rules | load_profiles ms (YAML + validation + compile) | compile only ms | exact hosts "
        "| wildcard parents | host-less allow rules (GET) | host-less deny rules |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        r = doc["results"][str(n)]
        sh = r["index"]
        lines.append(
            f"| {n:,} | {_f(r['load']['load_ms'])} | {_f(r['load']['compile_ms'])} "
            f"| {sh['exact_hosts']:,} | {sh['wildcard_parents']:,} | {sh['allow_any_host_GET']} "
            f"| {sh['deny_any_host_GET']} |"
        )
    g = doc["goals"]
    lines += [
        "",
        f"Goals (issue 7): p99 ≤ {GOAL_P99_US_AT_1000:g} µs at 1,000 rules: worst kind "
        f"{g['worst_p99_at_1000_us']:.2f} µs ({'met' if g['p99_met'] else 'MISSED'}); growth "
        f"{int(lo):,} → {int(hi):,} under {GOAL_GROWTH:g}{TIMES} (p50): worst "
        f"{g['worst_growth_p50']:.2f}{TIMES} ({'met' if g['growth_met'] else 'MISSED'}), p99 worst "
        f"{g['worst_growth_p99']:.2f}{TIMES}.",
    ]
    if doc.get("arguments"):
        lines += ["", *arguments_markdown(doc["arguments"])]
    if doc.get("profiles"):
        lines += ["", "### cProfile of the worst kind (own time share, calls per decide())", ""]
        for key, prof in doc["profiles"].items():
            lines.append(f"**{key}** ({prof['calls']:,} calls)")
            lines.append("")
            lines.append("| function | calls / decide() | own time |")
            lines.append("|---|---|---|")
            for r in prof["top"]:
                lines.append(
                    f"| `{r['function']}` | {r['calls_per_decide']:.2f} | {r['own_share']:.0%} |"
                )
            lines.append("")
    lines += [
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; Python "
        f"{m['python']}; git {m['git_commit']}; {m['date']}; load average before: "
        f"{m['loadavg_before']}; pinning: none. {m['calls_per_case']:,} timed calls per case in "
        f"{m['rounds']} rounds interleaved across sizes ({m['warmup_per_round']:,} warm-up calls "
        f"before each), each kind cycling over up to {MAX_VIEWS} requests; timer overhead "
        f"(included in the figures) {doc['timer_overhead_ns']} ns.",
        "",
    ]
    return "\n".join(lines)


def _profile_table(prof: dict[str, Any]) -> list[str]:
    lines = ["| function | calls / decide() | own time |", "|---|---|---|"]
    for r in prof["top"]:
        lines.append(f"| `{r['function']}` | {r['calls_per_decide']:.2f} | {r['own_share']:.0%} |")
    return lines


def arguments_markdown(a: dict[str, Any]) -> list[str]:
    lines = [
        "## Argument rules (issue 18)",
        "",
        "| request | p50 µs | p99 µs | p99.9 µs | mean µs | what |",
        "|---|---|---|---|---|---|",
    ]
    for kind, what in ARGUMENT_KINDS.items():
        s = a["kinds"][kind]
        lines.append(
            f"| {kind} | {_f(s['p50_us'])} | {_f(s['p99_us'])} | {_f(s['p99_9_us'])} "
            f"| {_f(s['mean_us'])} | {what} |"
        )
    load, goal = a["load"], a["goal"]
    lines += [
        "",
        f"Profile load, {load['rules']:,} MCP tool rules with three constraints each "
        f"(distinct schemas): first load {load['first_load_ms']:,.0f} ms (YAML, validation, "
        f"one jsonschema-rs compilation per schema), reload {load['reload_ms']:,.0f} ms "
        "(compilations cached by schema).",
        "",
        f"Goal (issue 18): p99 ≤ {goal['p99_us']:g} µs for mcp_3_constraints: "
        f"{goal['measured_p99_us']:.2f} µs ({'met' if goal['met'] else 'MISSED'}).",
    ]
    if a.get("profile"):
        lines += [
            "",
            f"cProfile of mcp_3_constraints ({a['profile']['calls']:,} calls; own time share):",
            "",
            *_profile_table(a["profile"]),
        ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench decide_scaling",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--calls", type=int, default=20000, help="timed calls per (size, kind)")
    p.add_argument("--rounds", type=int, default=4, help="rounds the calls are split into")
    p.add_argument("--warmup", type=int, default=1000, help="warm-up calls before each round")
    p.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[10, 100, 1000, 10000],
        help="rule counts, comma-separated (the first and last give the growth)",
    )
    p.add_argument("--load-repeats", type=int, default=3, help="loads per size (best is kept)")
    p.add_argument("--profile-calls", type=int, default=20000, help="calls under cProfile")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument(
        "--arguments-only",
        action="store_true",
        help="only the argument rule cases (writes decide_arguments.{json,md})",
    )
    return p.parse_args(argv)


def prepare(
    tmp: Path, n: int, fixed_hostless: bool, repeats: int
) -> tuple[Snapshot, dict[str, list[RequestView]], dict[str, Any]]:
    gen = generate(n, fixed_hostless=fixed_hostless)
    d = tmp / f"n{n}{'-control' if fixed_hostless else ''}"
    d.mkdir()
    (d / "agent.yaml").write_text(yaml.safe_dump(gen.doc, sort_keys=False))
    snap, load = load_timed(d, repeats if n <= 1000 else 1)
    for kind, targets in gen.targets.items():
        check(snap, n, kind, targets)
    result = {
        "counts": gen.counts,
        "index": index_shape(snap),
        "load": load,
        "yaml_bytes": (d / "agent.yaml").stat().st_size,
        "requests_per_kind": {k: len(t) for k, t in gen.targets.items()},
    }
    return snap, {k: views_for(t) for k, t in gen.targets.items()}, result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info(args)
    if args.arguments_only:
        arguments = run_arguments(args)
        doc_a = {"machine": info, "timer_overhead_ns": timer_overhead(), "arguments": arguments}
        m = info
        text = "\n".join(
            [
                "# decide() with argument rules",
                "",
                "Written by `python -m bench decide_scaling --arguments-only`.",
                "",
                *arguments_markdown(arguments)[1:],
                "",
                f"Machine: {m['nproc']} CPUs, {m['cpu_model']}; Python {m['python']}; git "
                f"{m['git_commit']}; {m['date']}; load average before: {m['loadavg_before']}; "
                f"{m['calls_per_case']:,} timed calls per case in {m['rounds']} rounds.",
                "",
            ]
        )
        write_results(args.out / "decide_arguments", doc_a, text)
        return 0
    lo_n, hi_n = args.sizes[0], args.sizes[-1]
    # (variant, rules): "spread" is the benchmark; "control" keeps one host-less allow and
    # one host-less deny rule at every size, to tell the index's own growth from theirs.
    cases = [("spread", n) for n in args.sizes] + [("control", lo_n), ("control", hi_n)]
    snaps: dict[tuple[str, int], Snapshot] = {}
    views: dict[tuple[str, int], dict[str, list[RequestView]]] = {}
    res: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mandate-decide-") as tmp:
        for case in cases:
            variant, n = case
            snaps[case], views[case], res[case] = prepare(
                Path(tmp), n, variant == "control", args.load_repeats
            )
            load = res[case]["load"]
            print(
                f"{variant:>7} {n:>6} rules: load {load['load_ms']:.1f} ms, "
                f"compile {load['compile_ms']:.1f} ms",
                flush=True,
            )

    overhead = timer_overhead()
    samples: dict[tuple[str, int, str], list[int]] = {(*c, k): [] for c in cases for k in KINDS}
    per_round = -(-args.calls // args.rounds)
    for r in range(args.rounds):
        calls = min(per_round, args.calls - r * per_round)
        for case in cases:
            for kind in KINDS:
                samples[(*case, kind)] += time_calls(
                    snaps[case], views[case][kind], calls, args.warmup
                )
    for case in cases:
        res[case]["kinds"] = {k: stats(samples[(*case, k)]) for k in KINDS}
        row = "  ".join(f"{k} {res[case]['kinds'][k]['p99_us']:.2f}" for k in KINDS)
        print(f"{case[0]:>7} {case[1]:>6} rules p99 µs: {row}")

    def growth_of(variant: str) -> dict[str, dict[str, float]]:
        lo, hi = res[variant, lo_n]["kinds"], res[variant, hi_n]["kinds"]
        return {
            k: {s: hi[k][f"{s}_us"] / lo[k][f"{s}_us"] for s in ("p50", "p99", "mean")}
            for k in KINDS
        }

    growth = growth_of("spread")
    at_1000 = res.get(("spread", 1000))
    p99_1000 = max(at_1000["kinds"][k]["p99_us"] for k in KINDS) if at_1000 else float("nan")
    goals: dict[str, Any] = {
        "worst_p99_at_1000_us": p99_1000,
        "p99_met": p99_1000 <= GOAL_P99_US_AT_1000,
        "worst_growth_p50": max(g["p50"] for g in growth.values()),
        "worst_growth_p99": max(g["p99"] for g in growth.values()),
    }
    goals["growth_met"] = goals["worst_growth_p50"] < GOAL_GROWTH

    profiles: dict[str, Any] = {}
    if not (goals["p99_met"] and goals["growth_met"]):
        worst = max(KINDS, key=lambda k: growth[k]["p50"])
        for n in (lo_n, hi_n):
            case = ("spread", n)
            profiles[f"{worst}, {n:,} rules"] = profile_kind(
                snaps[case], views[case][worst], args.profile_calls
            )

    doc = {
        "machine": info,
        "timer_overhead_ns": overhead,
        "kinds": KINDS,
        "goals": goals,
        "growth": growth,
        "results": {str(n): res["spread", n] for n in args.sizes},
        "control": {
            "what": "one host-less allow and one host-less deny rule at every size",
            "growth": growth_of("control"),
            "results": {str(n): res["control", n] for n in (lo_n, hi_n)},
        },
        "profiles": profiles,
        "arguments": run_arguments(args),
    }
    write_results(args.out / "decide_scaling", doc, markdown(doc))
    return 0
