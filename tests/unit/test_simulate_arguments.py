"""`mandate simulate` with recorded arguments (issue 18): a record that kept argument values
in clear is replayed with them, so argument constraints are checked; one that kept hashes or
types is replayed with the strictest arguments and says it cannot tell when a constraint of
the new purpose could have changed the outcome. Trails are written by the real `decide` and
AuditWriter; records read back as `mandate simulate` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.audit import AuditWriter
from sidecar.core import RequestView, Snapshot, decide, load_profiles
from sidecar.policy.cli import read_records
from sidecar.policy.simulate import ALLOW_TO_DENY, DENY_TO_ALLOW, Recorded, replay, simulate

NOW = 1_700_000_000.0
MCP = "mcp.bank.svc.cluster.local"
LEDGER = "ledger.finance.svc.cluster.local"
IBAN, OTHER = "DE89370400440532013000", "GB29NWBK60161331926819"


def profile(audit: str, send_money: str, transfers: str, query: str) -> str:
    return f"""\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {{name: bank-agent}}
spec:
  owner: payments
  audit: {audit}
  defaultPurpose: pay
  purposes:
    pay:
      allow:
        - hosts: [{MCP}]
          paths: ["/mcp"]
          mcpTools: [send_money]
          mcpArguments:
            send_money: {send_money}
        - hosts: [{LEDGER}]
          methods: [POST]
          paths: ["/v1/transfers"]
          jsonBody: {transfers}
        - hosts: [{LEDGER}]
          methods: [GET]
          paths: ["/v1/invoices"]
          query: {query}
"""


ENUM = f"{{properties: {{to: {{enum: [{IBAN}]}}}}, required: [to]}}"
ENUM_OTHER = f"{{properties: {{to: {{enum: [{OTHER}]}}}}, required: [to]}}"
ANY = "{type: object}"


def load(tmp_path: Path, name: str, text: str) -> Snapshot:
    d = tmp_path / name
    d.mkdir()
    (d / "p.yaml").write_text(text)
    return load_profiles(d)


def rpc(method: str, **params: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()


CALLS = [
    ("POST", MCP, "/mcp", rpc("tools/call", name="send_money", arguments={"to": IBAN})),
    ("POST", MCP, "/mcp", rpc("tools/call", name="send_money", arguments={"to": OTHER})),
    ("POST", MCP, "/mcp", rpc("initialize")),
    ("POST", LEDGER, "/v1/transfers", json.dumps({"to": IBAN}).encode()),
    ("GET", LEDGER, "/v1/invoices?to=" + IBAN, None),
]


def record(tmp_path: Path, audit: str) -> list[Recorded]:
    """The session recorded under the constrained profile with ``audit``."""
    snap = load(tmp_path, f"rec-{abs(hash(audit))}", profile(audit, ENUM, ENUM, ENUM))
    directory = tmp_path / f"audit-{abs(hash(audit))}"
    with AuditWriter(directory, chain_id="w0", fsync="never") as w:
        for i, (method, host, path, body) in enumerate(CALLS):
            headers = {"content-length": str(len(body))} if body else {}
            view = RequestView(
                decision_id=f"d{i}", method=method, authority=host, path=path,
                headers=headers, body=body, configured_agent="bank-agent",
            )  # fmt: skip
            assert w.write_decision(decide(snap, view, NOW + i), pod="p", namespace="", now=NOW + i)
    return list(read_records(directory))


@pytest.fixture(scope="module")
def clear(tmp_path_factory: pytest.TempPathFactory) -> list[Recorded]:
    return record(tmp_path_factory.mktemp("clear"), "{values: [to]}")


@pytest.fixture(scope="module")
def hashed(tmp_path_factory: pytest.TempPathFactory) -> list[Recorded]:
    return record(tmp_path_factory.mktemp("hashed"), "{arguments: hashes}")


def test_the_session(clear: list[Recorded]) -> None:
    assert [(r.allowed, r.code) for r in clear] == [
        (True, "allowed"),
        (False, "outside_purpose"),  # to another IBAN
        (True, "allowed"),
        (True, "allowed"),
        (True, "allowed"),
    ]
    assert clear[0].arguments is not None
    assert clear[0].arguments["mcp"][0]["args"] == {"to": {"type": "string", "value": IBAN}}


def test_values_in_clear_replay_against_the_recording_profiles(
    clear: list[Recorded], tmp_path: Path
) -> None:
    snap = load(tmp_path, "same", profile("{values: [to]}", ENUM, ENUM, ENUM))
    report = simulate(snap, clear)
    assert (report.records, report.replayed, report.unchanged) == (5, 5, 5)
    assert not report.changed and report.not_replayable == {}


def test_values_in_clear_show_what_a_new_constraint_changes(
    clear: list[Recorded], tmp_path: Path
) -> None:
    snap = load(tmp_path, "other", profile("{}", ENUM_OTHER, ENUM_OTHER, ENUM_OTHER))
    changes = [(c.decision_id, replay(snap, c).change) for c in clear]
    assert changes == [
        ("d0", ALLOW_TO_DENY),
        ("d1", DENY_TO_ALLOW),
        ("d2", ""),
        ("d3", ALLOW_TO_DENY),
        ("d4", ALLOW_TO_DENY),
    ]
    r = replay(snap, clear[0])
    assert r.decision is not None and "argument to breaks enum" in r.decision.reason


def test_hashes_cannot_tell(hashed: list[Recorded], tmp_path: Path) -> None:
    snap = load(tmp_path, "same", profile("{}", ENUM, ENUM, ENUM))
    report = simulate(snap, hashed)
    # the MCP calls, the JSON body and the query are constrained and their values unknown;
    # `initialize` (no arguments) is replayed as it was
    assert report.not_replayable == {"http_arguments": 2, "mcp_arguments": 2}
    assert (report.replayed, report.unchanged, report.changed) == (1, 1, False)
    # a purpose that does not constrain them decides the calls without their values
    snap = load(tmp_path, "loose", profile("{}", ANY, ANY, ANY))
    report = simulate(snap, hashed)
    # `type: object` refuses the strictest stand-ins (no arguments, unreadable body/query):
    # still not replayable; the allowed ones cannot be told apart from the denied one
    assert report.not_replayable == {"http_arguments": 2, "mcp_arguments": 2}


def test_a_rule_without_constraints_decides_hashed_calls(
    hashed: list[Recorded], tmp_path: Path
) -> None:
    text = profile("{}", ANY, ANY, ANY)
    text = text.replace("          mcpArguments:\n            send_money: {type: object}\n", "")
    text = text.replace("          jsonBody: {type: object}\n", "")
    text = text.replace("          query: {type: object}\n", "")
    report = simulate(load(tmp_path, "names", text), hashed)
    assert report.not_replayable == {}
    assert (report.replayed, report.deny_to_allow, report.allow_to_deny) == (5, 1, 0)


def test_a_malformed_arguments_member_is_named() -> None:
    from sidecar.policy.simulate import parse_record

    good = {
        "type": "decision", "decision_id": "x", "time": "2025-01-31T12:00:00.123Z",
        "decision": "allow", "code": "allowed", "agent": "a",
    }  # fmt: skip
    with pytest.raises(ValueError, match="'arguments' is not an object"):
        parse_record({**good, "arguments": []})
    with pytest.raises(ValueError, match=r"'arguments\.mcp' is not a list"):
        parse_record({**good, "arguments": {"mcp": {}}})
    rec = parse_record({**good, "arguments": {"mcp": [{"method": "tools/call", "tool": "t"}]}})
    assert rec.tools == ("t",)  # the tools the trail kept, when the rules read no body
