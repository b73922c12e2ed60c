"""`mandate simulate` (sidecar.policy): replaying an audit trail against candidate profiles.

The trail is real: decisions made by `decide()` on a profile set, written by the real
AuditWriter. The replay logic is tested with plain data (`Recorded`, a snapshot); the
command line in-process through `sidecar.policy.cli` (table, JSON, exit codes, bad input).
Times are computed from now, never fixed dates (the --since filter is relative).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import AuditWriter
from sidecar.core import Code, Decision, RequestView, Snapshot, decide, load_profiles
from sidecar.core.revocation import Revocation, RevocationTable, make_key
from sidecar.policy.cli import add_simulate_parser, read_records, run_simulate
from sidecar.policy.simulate import (
    ALLOW_TO_DENY,
    DENY_TO_ALLOW,
    NOT_REPLAYABLE,
    Recorded,
    Report,
    parse_record,
    rebuild,
    render_table,
    replay,
    report_json,
    simulate,
)

LEDGER = "ledger.finance.svc.cluster.local"
MCP = "mcp.tools.svc.cluster.local"
NS = "agents"
NOW = time.time()
OLD = NOW - 2 * 3600  # the first calls: two hours ago
RECENT = NOW - 600  # the later ones: ten minutes ago

BILLING = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: billing-agent}
spec:
  owner: finance
  defaultPurpose: reconcile
  purposes:
    reconcile:
      allow:
        - hosts: [ledger.finance.svc.cluster.local]
          methods: [GET]
          paths: ["/v1/invoices/*"]
        - hosts: [ledger.finance.svc.cluster.local]
          methods: [GET]
          paths: ["/v1/ledger/**"]
      deny:
        - paths: ["/v1/ledger/admin/**"]
"""
RESEARCH = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: research-agent}
spec:
  owner: data-science
  defaultPurpose: literature-search
  purposes:
    literature-search:
      allow:
        - hosts: [api.semanticscholar.org]
          methods: [GET]
          paths: ["/**"]
    tool-use:
      allow:
        - hosts: [mcp.tools.svc.cluster.local]
          methods: [POST]
          paths: ["/mcp"]
          mcpTools: [search_papers, fetch_abstract]
"""


def write_profiles(d: Path, billing: str = BILLING, research: str = RESEARCH) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "billing.yaml").write_text(billing)
    (d / "research.yaml").write_text(research)
    return d


def tools_call(*tools: str) -> bytes:
    msgs = [
        {
            "jsonrpc": "2.0",
            "id": i,
            "method": "tools/call",
            "params": {"name": t, "arguments": {"q": "x"}},
        }
        for i, t in enumerate(tools, 1)
    ]
    return json.dumps(msgs[0] if len(msgs) == 1 else msgs).encode()


def view(did: str, agent: str, method: str, authority: str, path: str, *,
         purpose: str = "", body: bytes | None = None) -> RequestView:  # fmt: skip
    headers = {"x-mandate-purpose": purpose} if purpose else {}
    if body is not None:
        headers["content-length"] = str(len(body))
    return RequestView(
        decision_id=did, method=method, authority=authority, path=path, headers=headers,
        body=body, configured_agent=agent, namespace=NS,
    )  # fmt: skip


REVOKED = RevocationTable.build(
    1,
    [
        Revocation(
            make_key("admin", NS, "billing-agent"), "billing-agent", NS, "incident 7", "admin"
        )
    ],
)

# (chain, time, view, revocations): the recorded session
CALLS: list[tuple[str, float, RequestView, RevocationTable | None]] = [
    ("w0", OLD + 1, view("d01", "billing-agent", "GET", LEDGER, "/v1/invoices/7"), None),
    ("w0", OLD + 2, view("d02", "billing-agent", "GET", LEDGER, "/v1/ledger/admin/users"), None),
    ("w0", OLD + 3, view("d03", "billing-agent", "GET", LEDGER, "/v1/payments/1"), None),
    ("w1", OLD + 4, view("d04", "research-agent", "POST", MCP, "/mcp", purpose="tool-use", body=tools_call("search_papers")), None),
    ("w1", RECENT + 1, view("d05", "research-agent", "POST", MCP, "/mcp", purpose="tool-use", body=tools_call("delete_corpus")), None),
    ("w0", RECENT + 2, view("d06", "billing-agent", "GET", LEDGER, "/v1/invoices/8"), REVOKED),
    ("w1", RECENT + 3, view("d07", "billing-agent", "GET", LEDGER, "/v1/invoices/9?x=1"), None),
    ("w0", RECENT + 4, view("d08", "research-agent", "GET", "api.semanticscholar.org", "/graph/v1/paper/search"), None),
]  # fmt: skip


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Decision]]:
    """(profiles, audit directory, the decisions recorded) of one session on two chains."""
    base = tmp_path_factory.mktemp("sim")
    profiles = write_profiles(base / "profiles")
    snap = load_profiles(profiles)
    audit = base / "audit"
    writers = {c: AuditWriter(audit, chain_id=c, fsync="never") for c in ("w0", "w1")}
    decisions = []
    for chain, at, v, revocations in CALLS:
        d = decide(snap, v, at) if revocations is None else decide(snap, v, at, revocations)
        decisions.append(d)
        assert writers[chain].write_decision(d, pod="pod-1", namespace=NS, now=at)
    for w in writers.values():
        assert w.close(timeout=5)
    return profiles, audit, decisions


def test_the_recorded_session_is_what_the_tests_expect(
    trail: tuple[Path, Path, list[Decision]],
) -> None:
    _, _, ds = trail
    assert [(d.code, d.rule) for d in ds] == [
        (Code.ALLOWED, "reconcile.allow[0]"),
        (Code.DENIED_BY_RULE, "reconcile.deny[0]"),
        (Code.OUTSIDE_PURPOSE, ""),
        (Code.ALLOWED, "tool-use.allow[0]"),
        (Code.OUTSIDE_PURPOSE, ""),
        (Code.REVOKED, "admin:agents/billing-agent"),
        (Code.ALLOWED, "reconcile.allow[0]"),
        (Code.ALLOWED, "literature-search.allow[0]"),
    ]
    assert ds[3].mcp_tools == ("search_papers",)


# -- the command line, in-process -------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mandate")
    add_simulate_parser(parser.add_subparsers(dest="command", required=True))
    code = run_simulate(parser.parse_args(["simulate", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    doc: dict[str, Any] = json.loads(out)
    return code, doc


def candidate(tmp_path: Path, old: str, new: str, *, research: str = RESEARCH) -> Path:
    assert old in BILLING
    return write_profiles(tmp_path / "candidate", BILLING.replace(old, new), research)


def test_same_profiles_change_nothing(trail: tuple[Path, Path, list[Decision]],
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    profiles, audit, _ = trail
    code, doc = run_json(capsys, "--profiles", str(profiles), "--audit", str(audit))
    assert code == 0
    assert doc["changed"] is False
    assert doc["totals"] == {
        "records": 8, "replayed": 7, "unchanged": 7, "unchanged_other_rule": 0,
        "allow_to_deny": 0, "deny_to_allow": 0, "not_replayable": 1,
    }  # fmt: skip
    assert doc["not_replayable"] == {"revoked": 1}
    assert doc["changes"] == []
    assert doc["filters"] == {"agent": None, "since": None, "until": None}
    assert list(doc) == [
        "profiles",
        "audit",
        "filters",
        "changed",
        "totals",
        "not_replayable",
        "changes",
    ]

    code, out, _ = run(capsys, "--profiles", str(profiles), "--audit", str(audit))
    assert code == 0
    assert "8 decision record(s): 7 replayed, 7 unchanged" in out
    assert "No replayed call would change." in out
    assert "revoked  1  the agent was revoked" in out


def test_removing_an_allow_rule_turns_its_calls_into_denies(
    trail: tuple[Path, Path, list[Decision]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, audit, _ = trail
    # remove reconcile.allow[0] (invoices): the ledger rule becomes allow[0]
    new = candidate(tmp_path, '        - hosts: [ledger.finance.svc.cluster.local]\n'
                              '          methods: [GET]\n          paths: ["/v1/invoices/*"]\n', "")  # fmt: skip
    code, doc = run_json(capsys, "--profiles", str(new), "--audit", str(audit))
    assert code == 1
    assert doc["changed"] is True
    assert doc["totals"]["allow_to_deny"] == 2 and doc["totals"]["deny_to_allow"] == 0
    assert doc["totals"]["unchanged"] == 5
    [group] = doc["changes"]
    assert group == {
        "change": "allow_to_deny",
        "agent": "billing-agent",
        "purpose": "reconcile",
        "old": {"code": "allowed", "rule": "reconcile.allow[0]"},
        "new": {"code": "outside_purpose", "rule": None, "purpose": "reconcile"},
        "count": 2,
        "examples": [
            {"decision_id": "d01", "time": group["examples"][0]["time"], "method": "GET",
             "host": LEDGER, "port": 80, "path": "/v1/invoices/7", "tools": [],
             "reason": "outside purpose 'reconcile'"},
            {"decision_id": "d07", "time": group["examples"][1]["time"], "method": "GET",
             "host": LEDGER, "port": 80, "path": "/v1/invoices/9", "tools": [],
             "reason": "outside purpose 'reconcile'"},
        ],
    }  # fmt: skip
    assert group["examples"][0]["time"] < group["examples"][1]["time"]

    code, out, _ = run(capsys, "--profiles", str(new), "--audit", str(audit))
    assert code == 1
    lines = out.splitlines()
    at = lines.index("allow -> deny: 2 call(s)")
    assert lines[at + 1].split() == ["AGENT", "PURPOSE", "WAS", "NOW", "CALLS"]
    assert lines[at + 2].split() == [
        "billing-agent",
        "reconcile",
        "allowed",
        "reconcile.allow[0]",
        "outside_purpose",
        "2",
    ]
    assert lines[at + 3].split()[1:] == ["d01", "GET", f"{LEDGER}:80", "/v1/invoices/7"]
    assert lines[at + 4].split()[1:] == ["d07", "GET", f"{LEDGER}:80", "/v1/invoices/9"]
    assert "deny -> allow:" not in out

    # --limit bounds the examples, not the count
    code, doc = run_json(capsys, "--profiles", str(new), "--audit", str(audit), "--limit", "1")
    assert code == 1
    assert doc["changes"][0]["count"] == 2 and len(doc["changes"][0]["examples"]) == 1
    code, out, _ = run(capsys, "--profiles", str(new), "--audit", str(audit), "--limit", "1")
    assert "... and 1 more" in out


def test_adding_allows_turns_denies_into_allows(
    trail: tuple[Path, Path, list[Decision]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _, audit, _ = trail
    payments = '          paths: ["/v1/ledger/**"]\n'
    new = candidate(
        tmp_path, payments, payments + "        - hosts: [ledger.finance.svc.cluster.local]\n"
        '          paths: ["/v1/payments/*"]\n',
        research=RESEARCH.replace("[search_papers, fetch_abstract]", "[search_papers, fetch_abstract, delete_corpus]"),
    )  # fmt: skip
    code, doc = run_json(capsys, "--profiles", str(new), "--audit", str(audit))
    assert code == 1
    assert doc["totals"]["deny_to_allow"] == 2 and doc["totals"]["allow_to_deny"] == 0
    groups = {(g["agent"], g["purpose"]): g for g in doc["changes"]}
    billing, research = groups["billing-agent", "reconcile"], groups["research-agent", "tool-use"]
    assert billing["change"] == research["change"] == DENY_TO_ALLOW
    assert billing["old"] == {"code": "outside_purpose", "rule": None}
    assert billing["new"] == {
        "code": "allowed",
        "rule": "reconcile.allow[2]",
        "purpose": "reconcile",
    }
    assert [e["decision_id"] for e in billing["examples"]] == ["d03"]
    assert research["new"]["rule"] == "tool-use.allow[0]"
    assert research["examples"][0]["tools"] == ["delete_corpus"]
    assert (
        research["examples"][0]["reason"]
        == "allowed by rule tool-use.allow[0] of purpose 'tool-use'"
    )
    # the denied-by-rule call stays denied: deny wins
    assert doc["totals"]["unchanged"] == 5

    code, out, _ = run(capsys, "--profiles", str(new), "--audit", str(audit))
    assert "deny -> allow: 2 call(s)" in out
    assert f"POST {MCP}:80 /mcp [tool delete_corpus]" in out


def test_a_revoked_call_is_not_replayable(trail: tuple[Path, Path, list[Decision]],
                                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # fmt: skip
    # even when the new profiles no longer allow it: its outcome was the revocation's
    _, audit, _ = trail
    new = candidate(tmp_path, '"/v1/invoices/*"', '"/v1/receipts/*"')
    code, doc = run_json(capsys, "--profiles", str(new), "--audit", str(audit))
    assert code == 1
    assert doc["not_replayable"] == {"revoked": 1}
    examples = [e["decision_id"] for g in doc["changes"] for e in g["examples"]]
    assert "d06" not in examples and sorted(examples) == ["d01", "d07"]


def test_agent_and_time_filters(trail: tuple[Path, Path, list[Decision]],
                                capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # fmt: skip
    profiles, audit, _ = trail
    base = ("--profiles", str(profiles), "--audit", str(audit))
    _, doc = run_json(capsys, *base, "--agent", "research-agent")
    assert doc["totals"]["records"] == 3 and doc["filters"]["agent"] == "research-agent"
    _, doc = run_json(capsys, *base, "--since", "1h")
    assert doc["totals"]["records"] == 4  # d05..d08
    assert doc["filters"]["since"] is not None
    _, doc = run_json(capsys, *base, "--until", "1h")
    assert doc["totals"]["records"] == 4  # d01..d04
    _, doc = run_json(capsys, *base, "--agent", "billing-agent", "--since", "1h")
    assert doc["totals"]["records"] == 2 and doc["not_replayable"] == {"revoked": 1}  # d06, d07
    _, doc = run_json(capsys, *base, "--agent", "nobody")
    assert doc["totals"]["records"] == 0 and doc["changed"] is False

    # an RFC 3339 bound: the removed invoice rule matters only for d07 after it
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(RECENT))
    new = candidate(tmp_path, '"/v1/invoices/*"', '"/v1/receipts/*"')
    code, doc = run_json(capsys, "--profiles", str(new), "--audit", str(audit), "--since", since)
    assert code == 1
    assert [e["decision_id"] for e in doc["changes"][0]["examples"]] == ["d07"]
    code, out, _ = run(
        capsys,
        "--profiles",
        str(new),
        "--audit",
        str(audit),
        "--since",
        since,
        "--agent",
        "billing-agent",
    )
    assert out.splitlines()[0].startswith(
        f"Replaying {audit} against the profiles in {new} (agent billing-agent, since "
    )


def test_read_records_merges_chains_by_time(trail: tuple[Path, Path, list[Decision]]) -> None:
    _, audit, _ = trail
    recs = list(read_records(audit))
    assert [r.decision_id for r in recs] == [f"d{i:02d}" for i in range(1, 9)]
    assert recs[6].path == "/v1/invoices/9"  # as recorded: the query is not kept


# -- bad input: exit 2 naming what is wrong ---------------------------------------------------


def copy_trail(audit: Path, tmp_path: Path) -> Path:
    out = tmp_path / "audit"
    out.mkdir()
    for p in audit.iterdir():
        if p.is_file():
            (out / p.name).write_bytes(p.read_bytes())
    return out


def test_a_missing_audit_directory(trail: tuple[Path, Path, list[Decision]],
                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # fmt: skip
    profiles, _, _ = trail
    code, out, err = run(capsys, "--profiles", str(profiles), "--audit", str(tmp_path / "nope"))
    assert code == 2
    assert json.loads(out) == {
        "error": "bad_input",
        "message": f"{tmp_path / 'nope'}: no such directory",
    }
    assert f"mandate simulate: {tmp_path / 'nope'}: no such directory" in err
    (tmp_path / "empty").mkdir()
    code, out, _ = run(capsys, "--profiles", str(profiles), "--audit", str(tmp_path / "empty"))
    assert code == 2 and "no audit files" in json.loads(out)["message"]


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda line: b"{not json\n", "not JSON"),
        (lambda line: b"[1, 2]\n", "not a JSON object"),
        (
            lambda line: line.replace(b'"code":"outside_purpose",', b""),
            "decision record without 'code'",
        ),
        (
            lambda line: line.replace(b'"decision":"deny"', b'"decision":"maybe"'),
            "'decision' is 'maybe'",
        ),
        (
            lambda line: line.replace(b'"port":80', b'"port":"80"'),
            "'port' is '80', not a port number",
        ),
        (lambda line: line.replace(b'"time":"', b'"time":"yesterday'), "'time' 'yesterday"),
        (lambda line: line.rstrip(b"\n")[:40], "the last line, without its newline"),
    ],
)
def test_an_unreadable_line_is_named_with_file_and_line(
    trail: tuple[Path, Path, list[Decision]], capsys: pytest.CaptureFixture[str], tmp_path: Path,
    damage: Any, why: str,
) -> None:  # fmt: skip
    profiles, audit, _ = trail
    bad = copy_trail(audit, tmp_path)
    [path] = sorted(bad.glob("audit-w0-*.jsonl"))
    lines = path.read_bytes().splitlines(keepends=True)
    at = next(i for i, x in enumerate(lines) if b'"decision_id":"d03"' in x)
    if why.startswith("the last line"):
        lines = [*lines[:at], damage(lines[at])]
    else:
        lines[at] = damage(lines[at])
    path.write_bytes(b"".join(lines))
    code, out, err = run(capsys, "--profiles", str(profiles), "--audit", str(bad))
    assert code == 2
    message = json.loads(out)["message"]
    assert message.startswith(f"{path} line {at + 1}: ")
    assert why in message
    assert f"mandate simulate: {path} line {at + 1}" in err


def test_bad_profiles(trail: tuple[Path, Path, list[Decision]],
                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # fmt: skip
    _, audit, _ = trail
    new = candidate(tmp_path, 'methods: [GET]\n          paths: ["/v1/invoices/*"]', "verbs: [GET]")
    code, out, err = run(capsys, "--profiles", str(new), "--audit", str(audit))
    assert code == 2
    doc = json.loads(out)
    assert doc["message"] == f"profiles in {new} are invalid"
    assert any("spec.purposes.reconcile.allow[0].verbs" in p for p in doc["problems"])
    assert "billing.yaml, document 1, spec.purposes.reconcile.allow[0].verbs" in err

    code, out, _ = run(capsys, "--profiles", str(tmp_path / "nope"), "--audit", str(audit))
    assert code == 2 and "cannot list directory" in json.loads(out)["problems"][0]
    (tmp_path / "none").mkdir()
    code, out, _ = run(capsys, "--profiles", str(tmp_path / "none"), "--audit", str(audit))
    assert code == 2 and "no *.yaml or *.yml files found" in json.loads(out)["problems"][0]
    (tmp_path / "none" / "empty.yaml").write_text("---\n")
    code, out, _ = run(capsys, "--profiles", str(tmp_path / "none"), "--audit", str(audit))
    assert code == 2 and "no AgentProfile documents found" in json.loads(out)["problems"][0]


def test_bad_times_and_limits(trail: tuple[Path, Path, list[Decision]],
                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    profiles, audit, _ = trail
    code, out, _ = run(
        capsys, "--profiles", str(profiles), "--audit", str(audit), "--since", "last week"
    )
    assert code == 2 and "--since/--until 'last week'" in json.loads(out)["message"]
    with pytest.raises(SystemExit) as exc:
        run(capsys, "--profiles", str(profiles), "--audit", str(audit), "--limit", "-1")
    assert exc.value.code == 2


# -- the replay, with plain data ---------------------------------------------------------------


@pytest.fixture(scope="module")
def snap(trail: tuple[Path, Path, list[Decision]]) -> Snapshot:
    return load_profiles(trail[0])


def rec(**fields: Any) -> Recorded:
    """An allowed GET of an invoice by billing-agent, with overrides."""
    base: dict[str, Any] = {
        "decision_id": "r1", "time": "2025-01-31T12:00:00.000Z", "allowed": True,
        "code": Code.ALLOWED, "rule": "reconcile.allow[0]", "agent": "billing-agent",
        "namespace": NS, "method": "GET", "host": LEDGER, "port": 80, "path": "/v1/invoices/7",
        "purpose": "reconcile",
    }  # fmt: skip
    base.update(fields)
    return Recorded(**base)


@pytest.mark.parametrize(
    "code",
    [Code.REVOKED, Code.REVOCATIONS_UNKNOWN, Code.RATE, Code.RISK, Code.NOVEL_CALL, Code.AUDIT_UNAVAILABLE,
     Code.CREDENTIAL_UNAVAILABLE, Code.INTERNAL_ERROR, Code.BAD_REQUEST, Code.BAD_TASK,
     Code.UNATTRIBUTED, Code.IDENTITY_CONFLICT, Code.UNKNOWN_PURPOSE,
     Code.REVOCATIONS_REFUSED, Code.OUTSIDE_TASK],
)  # fmt: skip
def test_outcomes_of_run_time_state_are_not_replayable(snap: Snapshot, code: str) -> None:
    r = replay(snap, rec(allowed=False, code=code, rule=""))
    assert r.decision is None and r.skipped == code and code in NOT_REPLAYABLE
    assert r.change == ""


def test_a_new_require_task_is_a_change_for_calls_naming_no_task(tmp_path: Path) -> None:
    """Issue 18: `requireTask` on a purpose refuses its calls that name no task (a real
    change to review); for a call that named one, whether it was declared is run-time
    state, so it is not replayed."""
    billing = BILLING.replace("    reconcile:\n", "    reconcile:\n      requireTask: true\n", 1)
    assert billing != BILLING
    new = load_profiles(write_profiles(tmp_path / "p", billing=billing))
    r = replay(new, rec())
    assert r.decision is not None and r.decision.code == Code.OUTSIDE_TASK
    assert r.change == "allow_to_deny"
    assert replay(new, rec(task="t-1")).skipped == "task"


def test_an_unknown_code_and_an_elevation_are_not_replayed(snap: Snapshot) -> None:
    assert replay(snap, rec(allowed=False, code="made_up")).skipped == "made_up"
    assert replay(snap, rec(elevated=True, rule="elevation:refund.allow[0]")).skipped == "elevation"
    assert replay(snap, rec(host="")).skipped == "unrebuildable"
    assert replay(snap, rec(agent="")).skipped == "unrebuildable"


def test_a_replayed_call_is_the_recorded_call(snap: Snapshot) -> None:
    r = replay(snap, rec())
    assert r.decision is not None and r.change == ""
    d = r.decision
    assert (d.code, d.rule, d.purpose, d.agent, d.method, d.host, d.port, d.path) == (
        Code.ALLOWED, "reconcile.allow[0]", "reconcile", "billing-agent", "GET", LEDGER, 80, "/v1/invoices/7",
    )  # fmt: skip
    assert d.decision_id == "r1"
    assert replay(snap, rec(purpose="report")).decision.code == Code.UNKNOWN_PURPOSE  # type: ignore[union-attr]
    assert replay(snap, rec(task="t-1")).decision.task == "t-1"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "path",
    ["/v1/invoices/a b", "/v1/invoices/a?b", "/v1/invoices/a#b", "/v1/invoices/\u00e9t\u00e9",
     "/v1/invoices/a+b", "/v1/invoices/a=b&c", "/v1/invoices/~x", "/"],
)  # fmt: skip
def test_a_recorded_path_is_rebuilt_to_itself(snap: Snapshot, path: str) -> None:
    # the recorded path is the canonical (decoded) one: rebuilt, it decodes back to itself
    r = replay(snap, rec(path=path))
    assert r.decision is not None, r.skipped
    assert r.decision.path == path
    assert r.change == ("" if path.startswith("/v1/invoices/") else ALLOW_TO_DENY)


def test_connect_and_ipv6(snap: Snapshot) -> None:
    v = rebuild(rec(method="CONNECT", path="", port=443))
    assert (v.method, v.authority, v.path, v.scheme) == ("CONNECT", f"{LEDGER}:443", "", "https")
    # a deny rule without hosts refuses every tunnel
    r = replay(
        snap,
        rec(
            method="CONNECT",
            path="",
            port=443,
            allowed=False,
            code=Code.DENIED_BY_RULE,
            rule="reconcile.deny[0]",
        ),
    )
    assert r.decision is not None and r.decision.rule == "reconcile.deny[0]" and r.change == ""
    r = replay(
        snap, rec(host="[::1]", port=8080, allowed=False, code=Code.OUTSIDE_PURPOSE, rule="")
    )
    assert r.decision is not None and (r.decision.host, r.decision.port) == ("[::1]", 8080)


def test_a_call_refused_before_its_request_was_read(snap: Snapshot) -> None:
    # unknown_agent and no_purpose records have no host or path
    early = rec(
        allowed=False, code=Code.UNKNOWN_AGENT, rule="", host="", port=0, path="", purpose=""
    )
    r = replay(snap, replace(early, agent="ghost-agent"))
    assert r.decision is not None and r.decision.code == Code.UNKNOWN_AGENT and r.change == ""
    # the agent now has a profile: its request would decide, and it was not recorded
    assert replay(snap, early).skipped == "request_not_recorded"
    no_purpose = replace(early, code=Code.NO_PURPOSE)
    assert replay(snap, no_purpose).skipped == "request_not_recorded"  # a default purpose now


def test_mcp_calls(snap: Snapshot) -> None:
    mcp = rec(agent="research-agent", method="POST", host=MCP, path="/mcp", purpose="tool-use",
              rule="tool-use.allow[0]", tools=("search_papers",))  # fmt: skip
    r = replay(snap, mcp)
    assert r.decision is not None and r.change == "" and r.decision.mcp_tools == ("search_papers",)
    body = rebuild(mcp, b"{}")
    assert body.headers["content-length"] == "2" and not body.body_truncated
    # a batch: every tool must pass
    r = replay(snap, replace(mcp, tools=("search_papers", "fetch_abstract")))
    assert r.decision is not None and r.decision.mcp_tools == ("search_papers", "fetch_abstract")
    r = replay(snap, replace(mcp, tools=("search_papers", "drop_table")))
    assert r.change == ALLOW_TO_DENY
    assert r.decision is not None and "MCP tool 'drop_table' not allowed" in r.decision.reason
    # no tool recorded (initialize, tools/list, ...): the MCP rule reads a body we lack
    assert replay(snap, replace(mcp, tools=())).skipped == "mcp_body"
    # ... while a rule that reads no body decides without it, whatever it was
    r = replay(snap, rec(agent="research-agent", host="api.semanticscholar.org", path="/x",
                         purpose="literature-search", rule="literature-search.allow[0]"))  # fmt: skip
    assert r.decision is not None and r.change == ""


def test_argument_constraints_the_record_cannot_show(tmp_path: Path) -> None:
    constrained = RESEARCH.replace(
        "mcpTools: [search_papers, fetch_abstract]\n",
        "mcpTools: [search_papers, fetch_abstract]\n"
        "          mcpArguments:\n"
        "            search_papers: {required: [q], properties: {q: {maxLength: 100}}}\n",
    )
    snap = load_profiles(write_profiles(tmp_path / "p", research=constrained))
    mcp = rec(agent="research-agent", method="POST", host=MCP, path="/mcp", purpose="tool-use",
              rule="tool-use.allow[0]", tools=("search_papers",))  # fmt: skip
    assert replay(snap, mcp).skipped == "mcp_arguments"
    # an unconstrained tool of the same rule is decided as before
    r = replay(snap, replace(mcp, tools=("fetch_abstract",)))
    assert r.decision is not None and r.change == ""


def test_parse_record_refuses_what_replay_cannot_read() -> None:
    good: dict[str, Any] = {
        "type": "decision", "decision_id": "x", "time": "2025-01-31T12:00:00.123Z",
        "decision": "deny", "code": "outside_purpose", "agent": "a", "port": None,
        "mcp_tools": [], "elevation": None,
    }  # fmt: skip
    r = parse_record(good)
    assert (r.allowed, r.code, r.port, r.tools, r.elevated) == (
        False,
        "outside_purpose",
        0,
        (),
        False,
    )
    assert r.at == pytest.approx(1738324800.123)
    for broken, why in [
        ({"code": None}, "without 'code'"),
        ({"decision_id": 7}, "'decision_id' is int"),
        ({"decision": None}, "'decision' is None"),
        ({"port": 0}, "'port' is 0"),
        ({"port": True}, "'port' is True"),
        ({"mcp_tools": "x"}, "'mcp_tools' is not a list"),
        ({"time": "2025-01-31"}, "'time' '2025-01-31' is not an RFC 3339 time"),
    ]:
        with pytest.raises(ValueError, match=why.replace("(", r"\(")):
            parse_record({**good, **broken})
    assert parse_record({**good, "elevation": {"name": "refund"}}).elevated


def test_simulate_groups_counts_and_orders(snap: Snapshot) -> None:
    gone = rec(path="/v1/receipts/1")  # was allowed; now outside the purpose
    calls: Iterator[Recorded] = iter([
        gone, replace(gone, decision_id="r2"), replace(gone, decision_id="r3"),
        rec(decision_id="r4", allowed=False, code=Code.OUTSIDE_PURPOSE, rule=""),  # now allowed
        rec(decision_id="r5", code=Code.RATE, allowed=False, rule=""),
        rec(decision_id="r6", rule="reconcile.allow[7]"),  # same outcome, another rule
    ])  # fmt: skip
    report = simulate(snap, calls, limit=2)
    assert (report.records, report.replayed, report.unchanged, report.other_rule) == (6, 5, 1, 1)
    assert (report.allow_to_deny, report.deny_to_allow, report.changed) == (3, 1, True)
    assert report.not_replayable == {"rate": 1}
    a2d, d2a = report.groups
    assert (a2d.change, a2d.count, [e.decision_id for e in a2d.examples]) == (
        ALLOW_TO_DENY,
        3,
        ["r1", "r2"],
    )
    assert (d2a.change, d2a.old_code, d2a.new_code, d2a.new_rule) == (
        DENY_TO_ALLOW, Code.OUTSIDE_PURPOSE, Code.ALLOWED, "reconcile.allow[0]",
    )  # fmt: skip
    doc = report_json(report)
    assert doc["totals"]["not_replayable"] == 1 and doc["changes"][0]["count"] == 3
    json.dumps(doc)  # serialisable as it is
    text = render_table(report)
    assert "allow -> deny: 3 call(s)" in text and "deny -> allow: 1 call(s)" in text
    assert text.index("allow -> deny") < text.index("deny -> allow") < text.index("not replayable:")
    assert "rate  1  over the purpose's rate limit" in text

    empty = simulate(snap, [])
    assert empty == Report() and not empty.changed
    assert render_table(empty).startswith("0 decision record(s): 0 replayed")


def test_a_changed_purpose_shows_in_the_group(snap: Snapshot) -> None:
    # the agent is gone from the new profiles: its calls end before a purpose is chosen
    report = simulate(snap, [rec(agent="ghost-agent")])
    [g] = report.groups
    assert (g.agent, g.purpose, g.new_purpose, g.new_code) == (
        "ghost-agent",
        "reconcile",
        "",
        Code.UNKNOWN_AGENT,
    )
    assert report_json(report)["changes"][0]["new"] == {
        "code": "unknown_agent",
        "rule": None,
        "purpose": None,
    }


# -- outcomes known though the record cannot rebuild the call whole (review of issue 18) ------


def test_a_call_naming_a_task_that_the_new_rules_deny_anyway_is_a_deny(tmp_path: Path) -> None:
    """A declaration only narrows what the rules allow: a call naming a task, replayed
    against a purpose that now has requireTask and whose rules deny it, is denied whatever
    it declared; one the rules allow stays `task` (not replayable)."""
    billing = BILLING.replace("    reconcile:\n", "    reconcile:\n      requireTask: true\n", 1)
    new = load_profiles(write_profiles(tmp_path / "p", billing=billing))
    r = replay(new, rec(task="t-1", path="/v1/payments/1"))  # no rule allows it
    assert r.decision is not None and r.decision.code == Code.OUTSIDE_PURPOSE
    assert r.change == ALLOW_TO_DENY
    r = replay(new, rec(task="t-1", path="/v1/ledger/admin/x"))  # a deny rule
    assert r.decision is not None and r.decision.code == Code.DENIED_BY_RULE
    assert replay(new, rec(task="t-1")).skipped == "task"  # the rules allow it: unknown


def _drop_db(n: int) -> tuple[str, ...]:
    return ("drop_db",) * n


@pytest.mark.parametrize(
    "arguments",
    [
        {"body": "withheld"},  # the writer's queue was full: the body went unread
        {"mcp": [{"method": "tools/call", "tool": "drop_db"}] * 128, "mcp_omitted": 1},
    ],
)
def test_recorded_tools_that_alone_are_denied_are_a_deny(
    snap: Snapshot, arguments: dict[str, Any]
) -> None:
    """A record whose arguments cannot rebuild the call (a batch over 128 messages, a
    withheld body) still names its tools: when those alone are refused, so is the call."""
    r = replay(snap, rec(
        method="POST", host=MCP, path="/mcp", agent="research-agent", purpose="tool-use",
        rule="tool-use.allow[0]", tools=_drop_db(128 if "mcp" in arguments else 1),
        arguments=arguments,
    ))  # fmt: skip
    assert r.decision is not None and r.change == ALLOW_TO_DENY
    assert "MCP tool 'drop_db' not allowed" in r.decision.reason
    # tools the new rules allow: the rest of the call is unknown, still unrebuildable
    r = replay(snap, rec(
        method="POST", host=MCP, path="/mcp", agent="research-agent", purpose="tool-use",
        rule="tool-use.allow[0]", tools=("search_papers",), arguments=arguments,
    ))  # fmt: skip
    assert r.decision is None and r.skipped == "unrebuildable"
