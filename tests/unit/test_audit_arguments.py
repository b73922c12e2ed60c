"""What a decision record keeps of a call's arguments (issue 18, "Learn"): the profile's
`spec.audit` choice (hashes by default, types, none, values in clear by name), the keyed
hash and its key file, and that a raw value never reaches a trail recorded with hashes.

Decisions are made by the real `decide` on real profiles; records by `record_from_decision`
(pure) and, for the key and the file, by the real AuditWriter in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import AuditWriter, record_from_decision
from sidecar.audit.arguments import (
    ENTRIES_MAX,
    VALUE_MAX_BYTES,
    ArgumentKey,
    recorded_arguments,
)
from sidecar.audit.keyfile import KEY_FILE, load_argument_key
from sidecar.core import Decision, RequestView, decide, load_profiles
from sidecar.core.mcp import parse_mcp_body
from sidecar.core.recording import ArgumentRecording, CallArguments
from sidecar.errors import AuditInputError

NOW = 1_700_000_000.0
KEY = ArgumentKey.of(b"\x01" * 32)
CARD = "4111111111111111"
MCP_HOST = "mcp.bank.svc.cluster.local"


def profile(audit: str = "", rules: str = "        - {}\n") -> str:
    return (
        "apiVersion: mandate.dev/v1alpha1\nkind: AgentProfile\nmetadata: {name: bank-agent}\n"
        f"spec:\n  owner: payments\n{audit}  defaultPurpose: pay\n  purposes:\n    pay:\n"
        f"      allow:\n{rules}"
    )


def decide_with(tmp_path: Path, text: str, view: RequestView) -> Decision:
    d = tmp_path / f"profiles-{abs(hash(text))}"
    d.mkdir(exist_ok=True)
    (d / "p.yaml").write_text(text)
    return decide(load_profiles(d), view, NOW)


def rpc(*calls: tuple[str, object]) -> bytes:
    msgs = [
        {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": t, "arguments": a}}
        for i, (t, a) in enumerate(calls, 1)
    ]
    return json.dumps(msgs[0] if len(msgs) == 1 else msgs).encode()


def call(path: str = "/mcp", body: bytes | None = None, method: str = "POST") -> RequestView:
    headers = {"content-length": str(len(body))} if body is not None else {}
    return RequestView(
        decision_id="d1", method=method, authority=MCP_HOST, path=path, headers=headers,
        body=body, configured_agent="bank-agent",
    )  # fmt: skip


def recorded(args: CallArguments, key: ArgumentKey | None = KEY) -> dict[str, Any] | None:
    return recorded_arguments(args, key)


def material(
    body: bytes | None = None,
    target: str = "/x",
    mode: str = "hashes",
    values: frozenset[str] = frozenset(),
    truncated: bool = False,
) -> CallArguments:
    return CallArguments(ArgumentRecording(mode, values), target, body, truncated)


def hmac_of(value: object, key: ArgumentKey = KEY) -> str:
    import hmac

    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.digest(key.secret, text.encode(), "sha256")[:8].hex()


# -- the three modes and values in clear ------------------------------------------------------


def test_default_is_hashes_and_types_never_the_value(tmp_path: Path) -> None:
    body = rpc(("send_money", {"to": CARD, "amount": 100, "meta": {"a": 1}, "tags": ["x", 2]}))
    d = decide_with(tmp_path, profile(), call(body=body))
    assert d.allowed and d.arguments is not None and d.arguments.body is body  # no copy
    rec = record_from_decision(d, pod="p", namespace="n", now=NOW, key=KEY)
    assert rec["arguments"] == {
        "key": KEY.id,
        "mcp": [
            {
                "method": "tools/call",
                "tool": "send_money",
                "args": {
                    "to": {"type": "string", "hash": hmac_of(CARD)},
                    "amount": {"type": "integer", "hash": hmac_of(100)},
                    "meta": {"type": "object", "hash": hmac_of({"a": 1}), "keys": {"a": "integer"}},
                    "tags": {"type": "array", "hash": hmac_of(["x", 2]), "items": ["integer", "string"]},
                },
            }
        ],
    }  # fmt: skip
    assert CARD not in json.dumps(rec)
    # keyed: an unkeyed hash of the value (what a dictionary attack tries) is not what is kept
    assert hashlib.sha256(json.dumps(CARD).encode()).hexdigest()[:16] not in json.dumps(rec)


def test_types_keeps_the_type_only_and_none_keeps_nothing(tmp_path: Path) -> None:
    body = rpc(("send_money", {"to": CARD, "amount": 100}))
    d = decide_with(tmp_path, profile("  audit: {arguments: types}\n"), call("/mcp?x=1", body))
    rec = record_from_decision(d, pod="p", namespace="n", now=NOW, key=KEY)
    assert rec["arguments"] == {
        "mcp": [{"method": "tools/call", "tool": "send_money",
                 "args": {"to": {"type": "string"}, "amount": {"type": "integer"}}}],
        "query": {"x": {"type": "string"}},
    }  # fmt: skip
    d = decide_with(tmp_path, profile("  audit: {arguments: none}\n"), call("/mcp?x=1", body))
    assert d.arguments is None  # the body is not even handed to the trail
    assert "arguments" not in record_from_decision(d, pod="p", namespace="n", now=NOW, key=KEY)


def test_values_are_kept_in_clear_only_for_the_names_listed(tmp_path: Path) -> None:
    audit = "  audit: {arguments: hashes, values: [amount, to]}\n"
    long = "x" * VALUE_MAX_BYTES
    body = rpc(("send_money", {"to": "DE89", "amount": 12.5, "memo": "rent"}), ("t", {"to": long}))
    d = decide_with(tmp_path, profile(audit), call(body=body))
    rec = record_from_decision(d, pod="p", namespace="n", now=NOW, key=KEY)
    first, second = rec["arguments"]["mcp"]
    assert first["args"] == {
        "to": {"type": "string", "value": "DE89"},
        "amount": {"type": "number", "value": 12.5},
        "memo": {"type": "string", "hash": hmac_of("rent")},
    }
    # over 1 KiB of JSON: recorded like the others, and marked
    assert second["args"] == {"to": {"type": "string", "long": True, "hash": hmac_of(long)}}


def test_a_call_without_body_or_query_records_nothing(tmp_path: Path) -> None:
    d = decide_with(tmp_path, profile(), call("/v1/x", None, "GET"))
    assert d.arguments is None
    rec = record_from_decision(d, pod="p", namespace="n", now=NOW, key=KEY)
    assert "arguments" not in rec  # records (and their hashes) as before


def test_the_check_path_keeps_no_parse_of_the_body(tmp_path: Path) -> None:
    """A review found the rules' parse riding along to the audit queue held ~25x the body's
    bytes, past the queue's bound on bodies: the decision keeps the body only, and the
    writer parses it again (the same record either way)."""
    rules = "        - hosts: [mcp.bank.svc.cluster.local]\n          mcpTools: [send_money]\n"
    body = rpc(("send_money", {"to": "a"}))
    d = decide_with(tmp_path, profile(rules=rules), call(body=body))
    assert d.allowed and d.arguments is not None and d.arguments.mcp is None
    assert d.arguments.body == body
    recorded = recorded_arguments(d.arguments, None)
    assert recorded is not None and recorded["mcp"][0]["tool"] == "send_money"


# -- what each kind of body and query becomes --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "truncated", "expected"),
    [
        (b'{"to": "a", "n": null}', False,
         {"json": {"to": {"type": "string", "hash": hmac_of("a")}, "n": {"type": "null", "hash": hmac_of(None)}}}),
        (b"[1, 2]", False, {"body": "json_value"}),
        (b'{"a": 1, "a": 2}', False, {"body": "not_json"}),  # a key twice: not strict JSON
        (b"\xff", False, {"body": "not_json"}),
        (b'{"to": "a"', True, {"body": "truncated"}),
        (b'[{"jsonrpc": "2.0", "id": 1, "method": "initialize"},'
         b' {"jsonrpc": "2.0", "method": "notifications/initialized"},'
         b' {"jsonrpc": "2.0", "id": 2, "result": {}},'
         b' {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "t", "arguments": "x"}},'
         b' {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "u"}}]', False,
         {"mcp": [{"method": "initialize"},
                  {"method": "notifications/initialized", "notification": True},
                  {"response": True},
                  {"method": "tools/call", "tool": "t", "args_type": "string"},
                  {"method": "tools/call", "tool": "u"}]}),
    ],
    ids=["json-object", "json-value", "duplicate-key", "not-utf8", "truncated", "mcp-batch"],
)  # fmt: skip
def test_bodies(body: bytes, truncated: bool, expected: dict[str, Any]) -> None:
    out = recorded(material(body, truncated=truncated))
    assert out is not None
    out.pop("key", None)
    assert out == expected


def test_queries() -> None:
    out = recorded(material(target="/x?to=a&to=b&n=1", values=frozenset({"to"})))
    assert out == {
        "query": {
            "to": {"type": "array", "value": ["a", "b"]},  # given twice: a list, as rules read it
            "n": {"type": "string", "hash": hmac_of("1")},
        },
        "key": KEY.id,
    }
    assert recorded(material(target="/x?novalue")) == {"query_unreadable": True}
    assert recorded(material(target="/x?")) is None


def test_many_arguments_are_counted_not_kept() -> None:
    many = {f"a{i:03d}": i for i in range(ENTRIES_MAX + 5)}
    out = recorded(material(json.dumps(many).encode(), mode="types"))
    assert out is not None and len(out["json"]) == ENTRIES_MAX and out["json_omitted"] == 5


def test_the_hash_is_keyed_and_stable_within_a_key() -> None:
    other = ArgumentKey.of(b"\x02" * 32)
    body = b'{"to": "DE89"}'
    a, b = recorded(material(body)), recorded(material(body))
    c = recorded(material(body), other)
    assert a == b and a is not None and c is not None
    assert a["json"]["to"]["hash"] != c["json"]["to"]["hash"]
    assert a["key"] == KEY.id != c["key"] == other.id
    assert "secret" not in repr(KEY) and KEY.secret.hex() not in repr(KEY)


def test_without_a_key_no_hash_is_written_and_the_record_says_so() -> None:
    assert recorded(material(b'{"to": "DE89"}'), None) == {
        "json": {"to": {"type": "string"}},
        "key": "unavailable",
    }


def test_an_unexpected_failure_costs_the_arguments_not_the_record() -> None:
    bad = CallArguments(ArgumentRecording(), "/x", b"{}", False, parse_mcp_body(b"{}", False))
    bad = bad._replace(target=None)  # a bug somewhere upstream
    assert recorded(bad) == {"error": "the arguments could not be recorded (TypeError)"}


# -- the key file and a real trail --------------------------------------------------------------


def write(
    tmp_path: Path, directory: Path, text: str, view: RequestView, chain: str = "w0"
) -> bytes:
    d = decide_with(tmp_path, text, view)
    with AuditWriter(directory, chain_id=chain, fsync="never") as w:
        assert w.write_decision(d, pod="p", namespace="n", now=NOW)
    return b"".join(p.read_bytes() for p in sorted(directory.glob("audit-*.jsonl")))


def decisions(data: bytes) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, data.splitlines()) if r["type"] == "decision"]


def test_the_key_is_created_private_on_first_use_and_kept(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    body = rpc(("pay", {"card": CARD}))
    data = write(tmp_path, audit, profile(), call(body=body))
    assert CARD.encode() not in data  # grep the trail for the secret-looking value
    key_file = audit / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secret = key_file.read_text().strip()
    assert len(secret) == 64 and secret not in data.decode()
    first = decisions(data)[0]["arguments"]
    # a second writer (another worker, or a restart) uses the same key: hashes compare
    data = write(tmp_path, audit, profile(), call(body=body), chain="w1")
    second = [r for r in decisions(data) if r["arguments"] != first]
    assert second == [] and load_argument_key(audit).id == first["key"]


def test_no_key_file_without_hashes(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    write(tmp_path, audit, profile("  audit: {arguments: types}\n"), call(body=rpc(("t", {}))))
    assert not (audit / KEY_FILE).exists()


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_an_unreadable_key_loses_no_record(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    if damage == "garbage":
        (audit / KEY_FILE).write_text("not a key\n")
    else:
        (audit / KEY_FILE).mkdir()  # unreadable as a file, whoever runs the test
    with caplog.at_level(logging.ERROR):
        data = write(tmp_path, audit, profile(), call(body=rpc(("pay", {"card": CARD}))))
    (rec,) = decisions(data)
    assert rec["arguments"]["key"] == "unavailable"
    assert rec["arguments"]["mcp"][0]["args"] == {"card": {"type": "string"}}
    assert CARD.encode() not in data
    assert KEY_FILE in caplog.text and "without hashes" in caplog.text
    if damage == "garbage":  # never replaced: that would split the trail's hashes
        assert (audit / KEY_FILE).read_text() == "not a key\n"
        with pytest.raises(AuditInputError, match="not an argument key"):
            load_argument_key(audit)


def test_writers_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    keys = {load_argument_key(audit).id for _ in range(5)}
    assert len(keys) == 1
    assert [p.name for p in audit.iterdir()] == [KEY_FILE]  # no temporary file left
    os.chmod(audit / KEY_FILE, 0o644)
    assert load_argument_key(audit).id in keys  # readable by others: a warning, still used


def test_a_full_queue_of_bodies_lets_a_body_go_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.audit import chainwriter
    from sidecar.policy.simulate import parse_record, replay
    from sidecar.policy.suggest import suggest

    text = profile()
    small = decide_with(tmp_path, text, call("/mcp?x=1", rpc(("pay", {"card": CARD}))))
    monkeypatch.setattr(chainwriter, "_BODY_BYTES_MAX", 16)  # less than one body
    audit = tmp_path / "audit"
    with AuditWriter(audit, chain_id="w0", fsync="never") as w:
        assert w.write_decision(small, pod="p", namespace="n", now=NOW)
        assert w.flush()
        assert w._body_bytes == 0
    (rec,) = decisions(b"".join(p.read_bytes() for p in audit.glob("audit-*.jsonl")))
    assert rec["arguments"] == {
        "body": "withheld",
        "query": {"x": {"type": "string", "hash": rec["arguments"]["query"]["x"]["hash"]}},
        "key": rec["arguments"]["key"],
    }
    recorded_call = parse_record(rec)
    snap = load_profiles(next(tmp_path.glob("profiles-*")))
    assert replay(snap, recorded_call).skipped == "unrebuildable"
    assert suggest([recorded_call]).agents == ()  # nothing learned from an unknown body


def test_a_key_made_anew_beside_old_trail_files_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review finding: a deleted key was re-created silently, splitting the trail's hashes
    into two sets that no longer compare."""
    from sidecar.audit.keyfile import KEY_FILE, load_argument_key

    first = load_argument_key(tmp_path)
    (tmp_path / "audit-pod-w0-000001.jsonl").write_text("{}\n")
    (tmp_path / KEY_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        second = load_argument_key(tmp_path)
    assert second.id != first.id
    assert "already holds audit files" in caplog.text and second.id in caplog.text


def test_names_that_are_no_identifiers_are_never_recorded_in_clear() -> None:
    """Review finding: object keys, JSON field and query names are the call's data too."""
    from sidecar.audit.arguments import ArgumentKey, recorded_arguments
    from sidecar.core.recording import ArgumentRecording, CallArguments

    body = json.dumps(
        {"balances": {"alice@example.com": 120, "4111111111111111": 1}, "to": "x",
         "bob@example.com": 1}
    ).encode()  # fmt: skip
    for mode, key in (("hashes", ArgumentKey.of(b"k" * 32)), ("types", None), ("hashes", None)):
        a = CallArguments(ArgumentRecording(mode), "/t?carol%40example.com=1&status=a", body, False)
        text = json.dumps(recorded_arguments(a, key))
        for secret in ("alice@example.com", "4111111111111111", "bob@example.com", "carol@"):
            assert secret not in text, (mode, text)
        assert '"to"' in text and '"status"' in text and '"balances"' in text


def test_a_record_too_large_is_summarised() -> None:
    from sidecar.audit.arguments import RECORD_MAX_BYTES, recorded_arguments
    from sidecar.core.recording import ArgumentRecording, CallArguments

    msgs = [
        {"jsonrpc": "2.0", "id": i, "method": "tools/call",
         "params": {"name": "t", "arguments": {f"a{j}": j for j in range(40)}}}
        for i in range(128)
    ]  # fmt: skip
    a = CallArguments(ArgumentRecording("types"), "/mcp", json.dumps(msgs).encode(), False)
    out = recorded_arguments(a, None)
    assert out is not None and out["omitted"] == "too large" and out["bytes"] > RECORD_MAX_BYTES


def test_a_chained_record_waiting_for_its_write_holds_no_call_body(tmp_path: Path) -> None:
    """Review finding: a batch's records waited for their write(2) holding their bodies
    (and parses), outside the queue's 16 MiB bound. Once its line is made, a record keeps
    only what its loss accounting needs."""
    from sidecar.audit.chainwriter import _DecisionItem, _light

    rules = "        - hosts: [mcp.bank.svc.cluster.local]\n          mcpTools: [send_money]\n"
    d = decide_with(tmp_path, profile(rules=rules), call(body=rpc(("send_money", {"to": "a"}))))
    assert d.arguments is not None
    item = _DecisionItem(d, "pod", "ns", 1.0)
    light = _light(item)
    assert isinstance(light, _DecisionItem) and light.decision.arguments is None
    assert light.decision.decision_id == d.decision_id
