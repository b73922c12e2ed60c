"""`mandate profile suggest` (issue 18, "Learn"): path templates, argument domains, the
commented YAML, the proposal from a recorded session, and the command line.

Sessions are decided by the real `decide` under a wide purpose and recorded with
`record_from_decision` (or the real AuditWriter for the command line); the proposal must
load as `mandate validate` loads it and change nothing when `mandate simulate` replays the
session against it. Times come from now (tests/clocks.py), never fixed dates."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.audit import AuditWriter, record_from_decision
from sidecar.audit.arguments import ArgumentKey
from sidecar.core import RequestView, Snapshot, decide, load_profiles
from sidecar.core.arguments import validate_schema
from sidecar.policy.cli import add_profile_parser, run_profile
from sidecar.policy.generalize import object_schema, path_templates, string_shape
from sidecar.policy.simulate import Recorded, parse_record, simulate
from sidecar.policy.suggest import suggest
from sidecar.policy.yamltext import Commented, plain, render

KEY = ArgumentKey.of(b"\x07" * 32)
MCP = "mcp.bank.svc.cluster.local"
LEDGER = "ledger.finance.svc.cluster.local"
IBANS = ["DE89370400440532013000", "GB29NWBK60161331926819"]
START = time.time() - 2 * 3600  # two hours ago (the --since test reads 3h)

WIDE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: bank-agent}
spec:
  owner: payments
  identities: [{serviceAccount: agents/bank-agent}]
  audit: {arguments: hashes, values: [to, amount, status]}
  defaultPurpose: learn
  purposes:
    learn:
      description: everything, to learn from
      allow:
        - {}
      deny:
        - hosts: [ledger.finance.svc.cluster.local]
          paths: ["/v1/admin/**"]
    other:
      allow:
        - hosts: [example.com]
"""


# -- path templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        (["/"], {"/": ["/"]}),
        (["/v1/invoices/7", "/v1/invoices/8"], {"/v1/invoices/*": ["/v1/invoices/7", "/v1/invoices/8"]}),
        # one id is still an id; a stable word stays
        (["/v1/invoices/7/lines", "/v1/invoices/9/lines"], {"/v1/invoices/*/lines": ["/v1/invoices/7/lines", "/v1/invoices/9/lines"]}),
        (["/users/me", "/users/42"], {"/users/*": ["/users/42"], "/users/me": ["/users/me"]}),
        (["/items/3fa85f64-5717-4562-b3fc-2c963f66afa6"], {"/items/*": ["/items/3fa85f64-5717-4562-b3fc-2c963f66afa6"]}),
        (["/t/ab12cd34ef56gh78"], {"/t/*": ["/t/ab12cd34ef56gh78"]}),  # a token
        (["/a b/x"], {"/*/x": ["/a b/x"]}),  # not writable literally
        # at most five literal words in one place, then `*`
        ([f"/docs/{w}" for w in "abcde"], {f"/docs/{w}": [f"/docs/{w}"] for w in "abcde"}),
        ([f"/docs/{w}" for w in "abcdef"], {"/docs/*": [f"/docs/{w}" for w in "abcdef"]}),
        # varying depth below a `*`: `**`
        (["/files/1", "/files/2/3", "/files/4/5/6"], {"/files/**": ["/files/1", "/files/2/3", "/files/4/5/6"]}),
        (["/f/a.txt", "/f/b", "/f/c", "/f/d", "/f/e", "/f/dir/x.txt", "/f/y/z/w.txt"],
         {"/f/**": ["/f/a.txt", "/f/b", "/f/c", "/f/d", "/f/e", "/f/dir/x.txt", "/f/y/z/w.txt"]}),
        # ... but a literal several paths share is stable
        (["/repos/1", "/repos/2/issues", "/repos/3/issues"],
         {"/repos/*": ["/repos/1"], "/repos/*/issues": ["/repos/2/issues", "/repos/3/issues"]}),
    ],
)  # fmt: skip
def test_path_templates(paths: list[str], expected: dict[str, list[str]]) -> None:
    got = path_templates(paths)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        (IBANS, "^[A-Za-z0-9]{22}$"),
        (["INV-2024-001", "INV-2025-117"], "^[A-Z]{3}-[0-9]{4}-[0-9]{3}$"),
        (["ab", "cde"], "^[a-z]{2,3}$"),
        (["hello world", "hi"], None),
        (["", "x"], None),
    ],
)
def test_string_shape(values: list[str], pattern: str | None) -> None:
    assert string_shape(values) == pattern


def entries(*calls: dict[str, Any], key: str = "k1") -> list[tuple[dict[str, Any], str, bool]]:
    return [(c, key, False) for c in calls]


def test_argument_domains() -> None:
    v = lambda x: {"type": "string" if isinstance(x, str) else "integer", "value": x}  # noqa: E731
    h = lambda t, x: {"type": t, "hash": x}  # noqa: E731
    schema = object_schema(
        entries(
            {"to": v("a"), "amount": v(10), "memo": h("string", "h1"), "n": {"type": "null"}},
            {"to": v("b"), "amount": v(95), "memo": h("string", "h2")},
            {"to": v("a"), "amount": v(40), "memo": h("string", "h1")},
        )
    )
    out = plain(schema)
    assert out == {
        "type": "object",
        "properties": {
            "amount": {"type": "integer", "minimum": 10, "maximum": 95},
            "memo": {"type": "string"},
            "n": {"type": "null"},
            "to": {"type": "string", "enum": ["a", "b"]},
        },
        "required": ["amount", "memo", "to"],
        "additionalProperties": False,
    }
    comments = {k: c for k, _, c in schema.items[1][1].items}
    assert comments["to"] == "3 calls, 2 distinct values"
    assert comments["amount"] == "3 calls, 3 distinct values, 10 to 95"
    assert (
        comments["memo"] == "3 calls, 2 distinct values (hashed: record values to propose an enum)"
    )
    assert comments["n"] == "1 call, values not recorded (audit.arguments: types)"


def test_many_strings_get_a_length_and_a_shape_not_an_enum() -> None:
    ids = [f"INV-{i:04d}" for i in range(12)]
    out = plain(object_schema(entries(*({"id": {"type": "string", "value": i}} for i in ids))))
    assert out["properties"]["id"] == {
        "type": "string",
        "maxLength": 8,
        "pattern": "^[A-Z]{3}-[0-9]{4}$",
    }
    validate_schema(out)  # the profile's own check (patterns run in Rust's regex)
    odd = [f"a.b+c(d) [e]{{f}}|^${i}*?\\ #&~-" for i in range(12)]
    out = plain(object_schema(entries(*({"x": {"type": "string", "value": v}} for v in odd))))
    validate_schema(out)
    assert all(re.search(out["properties"]["x"]["pattern"], v) for v in odd)


def test_nested_shapes_and_keys_under_several_keys() -> None:
    schema = object_schema(
        [
            ({"meta": {"type": "object", "hash": "a", "keys": {"x": "integer"}}}, "k1", False),
            ({"meta": {"type": "object", "hash": "a", "keys": {"y": "string"}}}, "k2", True),
            ({"tags": {"type": "array", "value": ["a", "b"]}}, "k1", False),
        ]
    )
    out = plain(schema)
    assert out["properties"]["meta"] == {
        "type": "object",
        "properties": {"x": {"type": "integer"}, "y": {"type": "string"}},
    }
    assert out["properties"]["tags"] == {
        "type": "array",
        "items": {"type": "string", "enum": ["a", "b"]},
        "maxItems": 2,
    }
    assert "additionalProperties" not in out  # a call's arguments were cut short
    comments = {k: c for k, _, c in schema.items[1][1].items}
    assert "2 distinct values (hashed under 2 keys, not comparable" in comments["meta"]


# -- the YAML ---------------------------------------------------------------------------------


TRICKY = ["yes", "No", "null", "~", "1.0", "0x1F", "", "a: b", "- x", "#c", "é ✓", "\x7f\x85",
          "\u2028", "\udcff", "😀", "/mcp", "/files/**", "*", "&a", "!t", "@x", "`x", "%x", "tools/call"]  # fmt: skip


def test_yaml_reads_back_as_written() -> None:
    doc = Commented(["a header", "", "#not a key"])
    doc.add("strings", TRICKY, "a comment # with a hash")
    doc.add("numbers", [0, -5, 1.5, 1e-07, 1e20, 2.5e-300, 10**30, True, False, None])
    nested = Commented(["above a mapping"])
    nested.add("list", [{"a": 1}, Commented(["above an item"]), {"b": [1, {"c": "yes"}]}])
    nested.add("long", "x" * 200)
    doc.add("nested", nested)
    for s in TRICKY:
        doc.add(s or "empty", s)
    text = render(doc)
    assert yaml.safe_load(text) == plain(doc)
    assert text.startswith("# a header\n#\n# #not a key\n")
    assert "# with a hash" in text


# -- a recorded session ------------------------------------------------------------------------


def rpc(tool: str, arguments: object, *, method: str = "tools/call") -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if method == "tools/call":
        msg["params"] = {"name": tool, "arguments": arguments}
    return json.dumps(msg).encode()


def view(i: int, method: str, host: str, path: str, body: bytes | None = None,
         purpose: str = "") -> RequestView:  # fmt: skip
    headers = {"content-length": str(len(body))} if body is not None else {}
    if purpose:
        headers["x-mandate-purpose"] = purpose
    return RequestView(
        decision_id=f"d{i:03d}", method=method, authority=host, path=path, headers=headers,
        body=body, configured_agent="bank-agent", namespace="agents",
    )  # fmt: skip


def session() -> list[RequestView]:
    calls: list[tuple[str, str, str, bytes | None]] = []
    for i, (to, amount) in enumerate([(IBANS[0], 40), (IBANS[1], 95), (IBANS[0], 12)]):
        calls.append(
            (
                "POST",
                MCP,
                "/mcp",
                rpc("send_money", {"to": to, "amount": amount, "memo": f"rent {i}"}),
            )
        )
    calls.append(("POST", MCP, "/mcp", rpc("", None, method="initialize")))
    calls.append(("POST", MCP, "/mcp", rpc("get_balance", {"account": "main"})))
    calls += [("GET", LEDGER, f"/v1/invoices/{1000 + n}", None) for n in range(6)]
    calls.append(("GET", LEDGER, "/v1/invoices?status=open&page=2", None))
    calls.append(("GET", LEDGER, "/v1/invoices?status=paid", None))
    body = json.dumps({"to": IBANS[0], "amount": 10, "note": "x"}).encode()
    calls.append(("POST", LEDGER, "/v1/transfers", body))
    calls.append(("GET", LEDGER, "/v1/admin/users", None))  # denied by rule: never learned
    calls.append(("CONNECT", "tunnel.example.com:443", "", None))
    return [view(i, *c) for i, c in enumerate(calls)]  # fmt: skip


def write_profiles(d: Path, text: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "p.yaml").write_text(text)
    return d


def records(snap: Snapshot, views: Sequence[RequestView]) -> list[Recorded]:
    out = []
    for i, v in enumerate(views):
        d = decide(snap, v, START + i)
        out.append(
            parse_record(
                record_from_decision(d, pod="p", namespace="agents", now=START + i, key=KEY)
            )
        )
    return out  # fmt: skip


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Recorded]]:
    profiles = write_profiles(tmp_path_factory.mktemp("wide") / "profiles", WIDE)
    return profiles, records(load_profiles(profiles), session())


def loaded(tmp_path: Path, text: str) -> Snapshot:
    return load_profiles(write_profiles(tmp_path / "suggested", text))


def test_a_proposal_from_a_session(wide: tuple[Path, list[Recorded]], tmp_path: Path) -> None:
    _, recs = wide
    result = suggest(recs, source="/audit")
    assert result.agents == ("bank-agent",) and (result.records, result.used) == (16, 15)
    snap = loaded(tmp_path, result.text)  # passes `mandate validate`
    doc = yaml.safe_load(result.text)
    spec = doc["spec"]
    assert (spec["owner"], spec["identities"], spec["defaultPurpose"]) == ("payments", [], "learn")
    assert spec["audit"] == {"arguments": "hashes", "values": ["amount", "status", "to"]}
    allow = spec["purposes"]["learn"]["allow"]
    assert {"hosts": ["tunnel.example.com:443"], "methods": ["CONNECT"]} in allow
    mcp = next(r for r in allow if "mcpTools" in r)
    assert (mcp["hosts"], mcp["methods"], mcp["paths"], mcp["mcpTools"]) == (
        [f"{MCP}:80"], ["POST"], ["/mcp"], ["get_balance", "send_money"],
    )  # fmt: skip
    send = mcp["mcpArguments"]["send_money"]
    assert send["properties"]["to"] == {"type": "string", "enum": IBANS}
    assert send["properties"]["amount"] == {"type": "integer", "minimum": 12, "maximum": 95}
    assert send["properties"]["memo"] == {"type": "string"}
    assert send["required"] == ["amount", "memo", "to"]
    # one rule per host, method and template where constraints differ
    invoices = next(r for r in allow if r.get("paths") == ["/v1/invoices"])
    assert invoices["query"]["properties"]["status"] == {"type": "string", "enum": ["open", "paid"]}
    assert invoices["query"]["required"] == ["status"]
    assert {"hosts": [f"{LEDGER}:80"], "methods": ["GET"], "paths": ["/v1/invoices/*"]} in allow
    transfers = next(r for r in allow if "jsonBody" in r)
    assert transfers["jsonBody"]["properties"]["to"] == {"type": "string", "enum": [IBANS[0]]}
    assert not any("/v1/admin" in p for r in allow for p in r.get("paths", []))
    # comments with counts
    text = result.text
    assert (
        "# 16 decision records from" in text.replace("16 decision records", "# 16 decision records")
        or "16 decision records" in text
    )
    assert "Not learned from: 1 denied_by_rule" in text
    assert "# 5 MCP calls, 1 distinct path" in text
    assert "# 6 calls, 6 distinct paths" in text and "# 2 calls, 1 distinct path" in text
    assert "get_balance: 1, send_money: 3" in text
    assert "# 3 calls, 3 distinct values (hashed: record values to propose an enum)" in text
    assert "0 would change" in text
    # the round trip: replayed over its own recording, nothing changes
    report = simulate(snap, recs)
    assert not report.changed and report.replayed > 0
    assert "other" not in spec["purposes"]  # nothing recorded under it


def test_hashed_only_arguments_give_types(tmp_path: Path) -> None:
    profiles = write_profiles(
        tmp_path / "p", WIDE.replace("values: [to, amount, status]", "values: []")
    )
    recs = records(load_profiles(profiles), session())
    result = suggest(recs)
    spec = yaml.safe_load(result.text)["spec"]
    mcp = next(r for r in spec["purposes"]["learn"]["allow"] if "mcpTools" in r)
    assert mcp["mcpArguments"]["send_money"]["properties"] == {
        "amount": {"type": "integer"}, "memo": {"type": "string"}, "to": {"type": "string"},
    }  # fmt: skip
    assert "3 calls, 2 distinct values (hashed: record values to propose an enum)" in result.text
    assert "values" not in spec["audit"]
    assert not simulate(loaded(tmp_path, result.text), recs).changed


def test_with_the_current_profile(wide: tuple[Path, list[Recorded]], tmp_path: Path) -> None:
    profiles, recs = wide
    current = load_profiles(profiles)
    text = suggest(recs, current=current).text
    spec = yaml.safe_load(text)["spec"]
    assert spec["identities"] == [{"serviceAccount": "agents/bank-agent"}]
    assert spec["audit"] == {"values": ["to", "amount", "status"]}
    learn = spec["purposes"]["learn"]
    assert learn["description"] == "everything, to learn from"
    assert learn["deny"] == [{"hosts": [LEDGER], "paths": ["/v1/admin/**"]}]
    assert spec["purposes"]["other"] == {"allow": [{"hosts": ["example.com"]}]}
    assert "kept from the current profile: no recorded call of purpose 'other'" in text
    assert not simulate(loaded(tmp_path, text), recs).changed


def test_a_recorded_deny_a_template_would_allow_gets_a_deny_rule(tmp_path: Path) -> None:
    narrow = WIDE.replace(
        "        - {}\n",
        f'        - hosts: [{LEDGER}]\n          paths: ["/v1/items/*"]\n',
    ).replace('paths: ["/v1/admin/**"]', 'paths: ["/v1/items/secret"]')
    snap = load_profiles(write_profiles(tmp_path / "p", narrow))
    views = [view(i, "GET", LEDGER, f"/v1/items/{i}") for i in range(3)]
    views.append(view(3, "GET", LEDGER, "/v1/items/secret"))
    recs = records(snap, views)
    assert [r.code for r in recs] == ["allowed"] * 3 + ["denied_by_rule"]
    text = suggest(recs).text
    learn = yaml.safe_load(text)["spec"]["purposes"]["learn"]
    assert learn["allow"][0]["paths"] == ["/v1/items/*"]
    assert learn["deny"] == [
        {"hosts": [f"{LEDGER}:80"], "methods": ["GET"], "paths": ["/v1/items/secret"]}
    ]
    assert "1 deny rule added for recorded denies a template would allow" in text
    assert not simulate(loaded(tmp_path, text), recs).changed


def test_which_calls_are_learned(wide: tuple[Path, list[Recorded]]) -> None:
    _, recs = wide
    outside = replace(
        recs[6],
        decision_id="x1",
        allowed=False,
        code="outside_purpose",
        reason="outside purpose 'learn'",  # no rule matched it
        path="/v2/new",
        tools=(),
        arguments=None,
    )
    granted = replace(recs[7], decision_id="x2", elevated=True, path="/v3/granted", arguments=None)
    revoked = replace(
        recs[8], decision_id="x3", allowed=False, code="revoked", path="/v4/x", arguments=None
    )
    more = [*recs, outside, granted, revoked]
    text = suggest(more).text
    assert "/v2/new" not in text and "/v3/granted" not in text and "/v4/x" not in text
    assert "1 elevation" in text and "1 outside_purpose" in text and "1 revoked" in text
    learned = suggest(more, include_denied=True)
    assert "/v2/new" in learned.text and "/v3/granted" not in learned.text
    assert learned.changes == 1 and "Would change (review): x1 GET" in learned.text
    # one purpose only; nothing usable: no proposal
    assert suggest(more, purpose="other").agents == ()
    assert suggest([revoked]).agents == ()  # fmt: skip


# -- the command line -------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mandate")
    add_profile_parser(parser.add_subparsers(dest="command", required=True))
    code = run_profile(parser.parse_args(["profile", "suggest", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trail(wide: tuple[Path, list[Recorded]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    profiles, _ = wide
    snap = load_profiles(profiles)
    audit = tmp_path_factory.mktemp("trail") / "audit"
    with AuditWriter(audit, chain_id="w0", fsync="never") as w:
        for i, v in enumerate(session()):
            assert w.write_decision(
                decide(snap, v, START + i), pod="p", namespace="agents", now=START + i
            )
    return audit  # fmt: skip


def test_cli_prints_or_writes_the_proposal(
    trail: Path,
    wide: tuple[Path, list[Recorded]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    code, out, err = run(capsys, "--audit", str(trail), "--agent", "bank-agent")
    assert code == 0 and "kind: AgentProfile" in out
    assert "1 profile(s) from 15 call(s) of 16 record(s)" in err and "0 would change" in err
    out_file = tmp_path / "suggested.yaml"
    profiles, _ = wide
    code, out, _ = run(capsys, "--audit", str(trail), "--profiles", str(profiles),
                       "--out", str(out_file), "--since", "3h", "--purpose", "learn")  # fmt: skip
    assert code == 0 and out == ""
    assert "agents/bank-agent" in out_file.read_text()
    load_profiles(write_profiles(tmp_path / "v", out_file.read_text()))


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--agent", "nobody"], "nothing to learn for agent 'nobody'"),
        (["--since", "1m"], "nothing to learn for any agent"),
        (["--purpose", "other"], "(purpose other)"),
    ],
)
def test_cli_nothing_recorded(trail: Path, capsys: pytest.CaptureFixture[str],
                              argv: list[str], fragment: str) -> None:  # fmt: skip
    code, out, err = run(capsys, "--audit", str(trail), *argv)
    assert (code, out) == (1, "") and fragment in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--audit", "{tmp}/missing"], "missing: no such directory"),
        (["--audit", "{tmp}"], "no audit files"),
        (["--audit", "{trail}", "--since", "yesterday"], "--since/--until 'yesterday'"),
        (["--audit", "{trail}", "--purpose", "Not A Name"], "--purpose 'Not A Name': not a purpose name"),
        (["--audit", "{trail}", "--profiles", "{tmp}/bad"], "--profiles {tmp}/bad: the profiles are invalid"),
        (["--audit", "{trail}", "--profiles", "{tmp}/good", "--agent", "other-agent"], "no profile for agent 'other-agent'"),
        (["--audit", "{trail}", "--out", "{tmp}/no/such/dir/x.yaml"], "--out {tmp}/no/such/dir/x.yaml: No such file"),
        (["--audit", "{broken}"], "line 2: not JSON"),
    ],
)  # fmt: skip
def test_cli_bad_input(trail: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                       argv: list[str], fragment: str) -> None:  # fmt: skip
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "p.yaml").write_text("kind: AgentProfile\n")
    write_profiles(tmp_path / "good", WIDE)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "audit-w0-000000.jsonl").write_text('{"type": "header"}\n{oops\n')
    subst = {"{tmp}": str(tmp_path), "{trail}": str(trail), "{broken}": str(broken)}
    args = []
    for a in argv:
        for k, v in subst.items():
            a = a.replace(k, v)
        args.append(a)
    code, out, err = run(capsys, *args)
    expected = fragment.replace("{tmp}", str(tmp_path))
    assert (code, out) == (2, "") and expected in err, err


def test_credentials_for_hosts_no_longer_allowed_are_left_out(
    wide: tuple[Path, list[Recorded]], tmp_path: Path
) -> None:
    _, recs = wide
    with_creds = WIDE + (
        "  credentials:\n"
        "    ledger-key:\n"
        f'      hosts: ["{LEDGER}:80"]\n'
        "      secret: {file: /var/run/mandate/credentials/ledger/key}\n"
        "    stripe-key:\n"
        "      hosts: [api.stripe.com]\n"
        "      secret: {file: /var/run/mandate/credentials/stripe/key}\n"
    )
    current = load_profiles(write_profiles(tmp_path / "p", with_creds))
    text = suggest(recs, current=current).text
    creds = yaml.safe_load(text)["spec"]["credentials"]
    assert list(creds) == ["ledger-key"]
    assert "Credentials left out (no proposed rule allows their hosts): stripe-key" in text
    loaded(tmp_path, text)


def test_strings_a_profile_cannot_hold_are_left_out(tmp_path: Path) -> None:
    # JSON lets a lone surrogate through (`"\udcff"`); no profile (UTF-8) can hold one
    snap = load_profiles(write_profiles(tmp_path / "p", WIDE))
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "t", '
    body += b'"arguments": {"to": "\\udcff", "k\\udcff": 1, "amount": 3}}}'
    recs = records(snap, [view(0, "POST", MCP, "/mcp", body)])
    text = suggest(recs).text
    schema = yaml.safe_load(text)["spec"]["purposes"]["learn"]["allow"][0]["mcpArguments"]["t"]
    assert schema["properties"] == {"amount": {"type": "integer", "minimum": 3, "maximum": 3},
                                    "to": {"type": "string"}}  # fmt: skip
    assert "additionalProperties" not in schema  # the unnamed argument stays allowed
    assert "a lone surrogate" in text
    assert not simulate(loaded(tmp_path, text), recs).changed


# -- review of issue 18: never wider than observed, never a crash -------------------------------


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        # the first segment names the API: an id there stays literal, never `/**`
        (["/1", "/1/2"], {"/1": ["/1"], "/1/*": ["/1/2"]}),
        (["/1", "/2/3", "/4/5/6"], {"/1": ["/1"], "/2/*": ["/2/3"], "/4/*/*": ["/4/5/6"]}),
        # two paths do not justify a tail of any depth: templates by depth
        (["/v1/12345/a", "/v1/67890/b/c"], {"/v1/*/a": ["/v1/12345/a"], "/v1/*/b/c": ["/v1/67890/b/c"]}),
        (["/files/1", "/files/2/3"], {"/files/*": ["/files/1"], "/files/*/*": ["/files/2/3"]}),
        # no `**` below a first segment a pattern cannot write (`/*/**` is every path but `/`)
        (["/a b/1", "/a b/2/3", "/a b/4/5/6"],
         {"/*/*": ["/a b/1"], "/*/*/*": ["/a b/2/3"], "/*/*/*/*": ["/a b/4/5/6"]}),
        # thousands of segments: no recursion
        (["/a" * 2000], {"/a" * 2000: ["/a" * 2000]}),
    ],
)  # fmt: skip
def test_path_templates_are_no_wider_than_observed(
    paths: list[str], expected: dict[str, list[str]]
) -> None:
    got = path_templates(paths)
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}


def _transfer(amount: int, to: str) -> bytes:
    return json.dumps({"amount": amount, "to": to}).encode()


def test_a_proposal_allows_no_path_body_or_port_it_did_not_see(tmp_path: Path) -> None:
    snap = load_profiles(write_profiles(tmp_path / "p", WIDE))
    views = [
        view(0, "GET", LEDGER, "/1"),
        view(1, "GET", LEDGER, "/1/2"),
        view(2, "POST", MCP, "/mcp", rpc("get_balance", {"account": "main"})),
        view(3, "POST", MCP, "/mcp", None),  # no body: no rule of its own beside the MCP one
        view(4, "POST", MCP, "/mcp", b"hello"),  # not JSON: likewise
        view(5, "POST", LEDGER, "/v1/transfers", _transfer(10, IBANS[0])),
        view(6, "POST", LEDGER, "/v1/transfers", None),  # no body beside a jsonBody rule
        view(7, "POST", LEDGER, "/v1/transfers?x=1", None),  # a query only
    ]
    recs = records(snap, views)
    assert {r.code for r in recs} == {"allowed"}
    result = suggest(recs)
    allow = yaml.safe_load(result.text)["spec"]["purposes"]["learn"]["allow"]
    assert all("paths" in r for r in allow)  # never "any path"
    assert {h for r in allow for h in r["hosts"]} == {f"{LEDGER}:80", f"{MCP}:80"}
    (mcp,) = [r for r in allow if r["paths"] == ["/mcp"]]
    assert mcp["mcpTools"] == ["get_balance"]
    (transfers,) = [r for r in allow if r["paths"] == ["/v1/transfers"]]
    assert "jsonBody" in transfers
    assert "Left out: 4 calls" in result.text and result.used == 4
    assert "2 calls without a JSON object body (none, or not JSON) not learned" in result.text
    new = loaded(tmp_path, result.text)
    for v in (views[0], views[1], views[2], views[5]):
        assert decide(new, v, time.time()).allowed, v.path
    probes = [
        ("GET", LEDGER, "/admin/delete-everything", None),
        ("GET", LEDGER, "/", None),
        ("POST", MCP, "/mcp", rpc("delete_everything", {"all": True})),
        ("POST", LEDGER, "/v1/transfers", _transfer(10**9, "EVIL")),
        ("POST", LEDGER, "/v1/transfers?x=1", _transfer(10**9, "EVIL")),
        ("GET", f"{LEDGER}:8080", "/1", None),  # another port
    ]
    for i, (method, host, path, body) in enumerate(probes):
        d = decide(new, view(100 + i, method, host, path, body), time.time())
        assert not d.allowed, (method, host, path)


def test_names_a_profile_cannot_hold_are_left_out_not_a_crash(tmp_path: Path) -> None:
    snap = load_profiles(write_profiles(tmp_path / "p", WIDE))
    long = "x" * 1100  # over YAML's 1024-character simple keys
    views = [
        view(0, "POST", MCP, "/mcp", rpc("get\x01x", {"amount": 1})),
        view(1, "POST", MCP, "/mcp", rpc("get\x7f\ufffe", {"amount": 1})),
        view(2, "POST", MCP, "/mcp", rpc(long, {"amount": 1})),
        view(3, "POST", MCP, "/mcp", rpc("", {"amount": 1})),  # an empty tool name
        view(4, "POST", MCP, "/mcp", rpc("", None, method="")),  # an empty method
        view(5, "M-SEARCH", LEDGER, "/t"),
        view(6, "FOO_BAR", LEDGER, "/t"),
        view(7, "X1", LEDGER, "/t"),
        view(8, "GET", LEDGER, "/t"),
        view(9, "POST", LEDGER, "/n", b'{"amount": -' + b"9" * 400 + b"}"),
        view(10, "POST", LEDGER, "/n", b'{"amount": 1}'),
        view(11, "GET", LEDGER, "/a" * 2000),
    ]
    recs = records(snap, views)
    assert {r.code for r in recs} == {"allowed"}
    result = suggest(recs)
    assert result.agents == ("bank-agent",) and not result.failed
    loaded(tmp_path, result.text)  # passes `mandate validate`
    allow = yaml.safe_load(result.text)["spec"]["purposes"]["learn"]["allow"]
    (mcp,) = [r for r in allow if r["paths"] == ["/mcp"]]
    assert mcp["mcpTools"] == sorted(["get\x01x", "get\x7f\ufffe", long])
    assert "mcpMethods" not in mcp  # "" is not listed: refused
    assert "1 message naming a tool a profile cannot list" in result.text
    assert "1 message naming a method a profile cannot list" in result.text
    assert [r["methods"] for r in allow if "/t" in r["paths"]] == [["GET"]]
    assert "3 with a method a profile cannot name" in result.text
    (n,) = [r for r in allow if r["paths"] == ["/n"]]
    assert n["jsonBody"]["properties"]["amount"] == {"type": "integer"}
    assert "type only: the values give no constraint a profile can hold" in result.text
    assert any("/a" * 2000 in r["paths"] for r in allow)
    assert "\x01" not in result.text and "\x7f" not in result.text  # escaped in comments too


def test_one_agent_failing_does_not_cost_the_others(
    wide: tuple[Path, list[Recorded]],
    monkeypatch: pytest.MonkeyPatch,
    trail: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sidecar.policy.suggest as module

    _, recs = wide
    other = [replace(r, agent="other-agent", decision_id=f"o{r.decision_id}") for r in recs]
    real = module._profile

    def broken(agent: str, *args: Any) -> Any:
        if agent == "other-agent":
            raise RuntimeError("boom\x01")
        return real(agent, *args)

    monkeypatch.setattr(module, "_profile", broken)
    result = suggest([*recs, *other])
    assert result.agents == ("bank-agent",)
    assert result.failed == (("other-agent", "RuntimeError: boom\\x01"),)
    monkeypatch.setattr(module, "_profile", lambda *a: broken("other-agent"))
    code, out, err = run(capsys, "--audit", str(trail))
    assert (code, out) == (1, "")
    assert "agent 'bank-agent': no proposal could be made: RuntimeError: boom" in err


def test_comments_escape_what_yaml_cannot_hold_and_long_keys_are_explicit() -> None:
    long = "k" * 2000
    doc = Commented(["a \x01 header \ufffe\x85end"])
    doc.add("tools", ["a\x01", "b\x7f"], "a\x01: 1, b\x7f\ufffe: 2")
    doc.add(long, {long: [1]}, "a comment \x00")
    doc.add("list", [{long: 1, "b": 2}, Commented()])
    nested = Commented()
    nested.add(long, "v", "c")
    doc.add("nested", nested)
    text = render(doc)
    assert yaml.safe_load(text) == plain(doc)
    assert "# a \\u0001 header \\ufffe end" in text and "a\\u0001: 1, b\\u007f\\ufffe: 2" in text


def test_a_number_beyond_a_float_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^properties\.amount\.minimum: expected a number"):
        validate_schema({"properties": {"amount": {"type": "integer", "minimum": -(10**400)}}})


CONSTRAINED = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: bank-agent}
spec:
  owner: payments
  identities: [{serviceAccount: agents/bank-agent}]
  audit: {arguments: hashes, values: [amount]}
  defaultPurpose: learn
  purposes:
    learn:
      allow:
        - hosts: [mcp.bank.svc.cluster.local]
          methods: [POST]
          paths: [/mcp]
          mcpTools: [send_money]
          mcpArguments:
            send_money: {type: object, properties: {amount: {type: integer, maximum: 100}}}
"""


def test_include_denied_never_learns_what_a_constraint_refused(tmp_path: Path) -> None:
    snap = load_profiles(write_profiles(tmp_path / "p", CONSTRAINED))
    views = [
        view(0, "POST", MCP, "/mcp", rpc("send_money", {"amount": 50})),
        view(1, "POST", MCP, "/mcp", rpc("send_money", {"amount": 1_000_000})),  # breaks max
        view(2, "POST", MCP, "/mcp", rpc("delete_all", {})),  # a tool the rule does not list
        view(3, "GET", LEDGER, "/v2/new"),  # no rule matched: the purpose was too narrow
    ]
    recs = records(snap, views)
    assert [r.code for r in recs] == ["allowed"] + ["outside_purpose"] * 3
    result = suggest(recs, current=snap, include_denied=True)
    allow = yaml.safe_load(result.text)["spec"]["purposes"]["learn"]["allow"]
    (mcp,) = [r for r in allow if r["paths"] == ["/mcp"]]
    assert mcp["mcpTools"] == ["send_money"]
    amount = mcp["mcpArguments"]["send_money"]["properties"]["amount"]
    assert (amount["minimum"], amount["maximum"]) == (50, 50)
    assert any(r["paths"] == ["/v2/new"] for r in allow)
    assert "2 outside_purpose refused by a rule's constraint" in result.text
