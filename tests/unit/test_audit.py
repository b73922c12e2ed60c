"""The pure part of the audit trail: canonical JSON, the chain math, audit records, times."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest

from sidecar.audit import (
    canonical_json,
    file_name,
    genesis,
    link,
    record_from_decision,
    record_hash,
)
from sidecar.audit.cli import parse_when
from sidecar.core import Code, Decision

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 1, "a": [1, 2], "c": None}, b'{"a":[1,2],"b":1,"c":null}'),
        ({"z": {"y": True, "x": False}}, b'{"z":{"x":false,"y":true}}'),
        ({"agent": "café-agent ✓"}, '{"agent":"café-agent ✓"}'.encode()),
        ({"q": 'say "hi"\n'}, b'{"q":"say \\"hi\\"\\n"}'),
        ([], b"[]"),
    ],
)
def test_canonical_json(value: object, expected: bytes) -> None:
    assert canonical_json(value) == expected


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_canonical_json_is_stable_across_key_order() -> None:
    assert canonical_json({"a": 1, "b": 2}) == canonical_json({"b": 2, "a": 1})


def test_genesis_is_derived_from_the_chain_id() -> None:
    assert genesis("w0") == hashlib.sha256(b"mandate-audit-genesis:w0").hexdigest()
    assert genesis("w0") != genesis("w1")
    assert len(genesis("w0")) == 64


def test_record_hash_excludes_the_hash_field() -> None:
    rec = {"type": "decision", "seq": 3, "prev": "ab"}
    expected = hashlib.sha256(b'{"prev":"ab","seq":3,"type":"decision"}').hexdigest()
    assert record_hash(rec) == expected
    assert record_hash({**rec, "hash": "anything"}) == expected


def test_link_sets_seq_prev_hash_and_copies() -> None:
    rec = {"type": "decision", "agent": "a"}
    linked = link(rec, seq=7, prev="p" * 64)
    assert rec == {"type": "decision", "agent": "a"}  # not mutated
    assert linked["seq"] == 7 and linked["prev"] == "p" * 64
    assert linked["hash"] == record_hash(linked)
    relinked = link(linked, seq=7, prev="p" * 64)  # an existing hash is recomputed
    assert relinked == linked


def test_chain_of_three_links_each_to_the_previous() -> None:
    prev = genesis("c")
    chain = []
    for i in range(3):
        rec = link({"type": "decision", "n": i}, seq=i, prev=prev)
        chain.append(rec)
        prev = rec["hash"]
    assert chain[0]["prev"] == genesis("c")
    assert chain[1]["prev"] == chain[0]["hash"]
    assert chain[2]["prev"] == chain[1]["hash"]
    edited = {**chain[1], "n": 99}
    assert record_hash(edited) != edited["hash"]


def test_file_name() -> None:
    assert file_name("pod-a.w0", 12) == "audit-pod-a.w0-000012.jsonl"


ALLOW = Decision(
    "d1", True, Code.ALLOWED, "allowed by rule r1 of purpose 'billing'", "billing-agent",
    "finance", "billing", "INV-1", "r1", "sidecar-config", "POST", "api.stripe.com", 443,
    "/v1/charges", ("create_charge",), "4bf92f3577b34da6a3ce929d0e0e4736",
)  # fmt: skip


def test_record_from_an_allow() -> None:
    rec = record_from_decision(ALLOW, pod="billing-7f9", namespace="agents", now=NOW + 0.5)
    assert rec == {
        "type": "decision",
        "time": "2023-11-14T22:13:20.500Z",
        "decision_id": "d1",
        "decision": "allow",
        "code": "allowed",
        "reason": "allowed by rule r1 of purpose 'billing'",
        "agent": "billing-agent",
        "owner": "finance",
        "pod": "billing-7f9",
        "namespace": "agents",
        "identity_source": "sidecar-config",
        "method": "POST",
        "host": "api.stripe.com",
        "port": 443,
        "path": "/v1/charges",
        "mcp_tools": ["create_charge"],
        "purpose": "billing",
        "task": "INV-1",
        "rule": "r1",
        "elevation": None,
        "risk": None,
        "revocation": None,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    json.loads(canonical_json(rec))  # serializable


def test_record_from_a_revocation_names_the_revocation() -> None:
    d = Decision(
        "d2", False, Code.REVOKED, "revoked: leaked key", agent="billing-agent",
        owner="finance", rule="agents/billing-agent", identity_source="sidecar-config",
        method="GET",
    )  # fmt: skip
    rec = record_from_decision(d, pod="p", namespace="agents", now=NOW)
    assert rec["decision"] == "deny"
    assert rec["code"] == "revoked"
    assert rec["rule"] == rec["revocation"] == "agents/billing-agent"
    assert rec["reason"] == "revoked: leaked key"


def test_record_from_an_unattributed_deny_uses_nulls() -> None:
    d = Decision("d3", False, Code.UNATTRIBUTED, "no identity", method="GET")
    rec = record_from_decision(d, pod="", namespace="", now=NOW)
    for key in ("agent", "owner", "pod", "namespace", "host", "port", "path", "purpose"):
        assert rec[key] is None, key
    assert rec["mcp_tools"] == []
    assert rec["trace_id"] is None
    assert rec["revocation"] is None


REF = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", datetime(2025, 1, 31, 11, 45, tzinfo=UTC)),
        ("1h30m", datetime(2025, 1, 31, 10, 30, tzinfo=UTC)),
        ("2025-01-30T08:00:00Z", datetime(2025, 1, 30, 8, 0, tzinfo=UTC)),
        ("2025-01-30T08:00:00.250Z", datetime(2025, 1, 30, 8, 0, 0, 250000, tzinfo=UTC)),
        ("2025-01-30T09:00:00+01:00", datetime(2025, 1, 30, 8, 0, tzinfo=UTC)),
        ("2025-01-30T08:00:00", datetime(2025, 1, 30, 8, 0, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    assert parse_when(text, REF) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "15", "-5m", "2025-13-01T00:00:00Z"])
def test_parse_when_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_when(text, REF)
