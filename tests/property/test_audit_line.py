"""The one-encoding audit line (`chained_line`) is byte for byte the two-encoding definition
(`canonical_json(link(...))`): any record, including strings that spell `"hash":"` and
nested `hash` keys, gets the same line and the same hash, and `verify`'s own check accepts it.
Decision records take a template of their own, straight from the Decision
(`decision_line`): its line is the line of the Decision's record, for any field values."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.audit import (
    canonical_json,
    chained_line,
    decision_line,
    link,
    record_from_decision,
    record_hash,
)
from sidecar.core import Code, Decision
from sidecar.core.agentstate import Grant

_TRICKY = st.sampled_from(
    [
        '"hash":"',
        '\\"hash\\":\\"',
        "0" * 64,
        "hash",
        "é",
        "\u2028",
        '{"hash":"x"}',
        ",",
        "\udcff",
        "a\ud83d",
        "\\udcff",
    ]  # lone surrogates, and the text of their escape
)
_TEXT = st.one_of(st.text(max_size=30), _TRICKY)
_KEYS = st.one_of(st.sampled_from(["hash", "seq", "prev", "agent", "a", "zz", "é"]), _TEXT)
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), _TEXT
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)


@given(
    record=st.dictionaries(_KEYS, _VALUES, max_size=10),
    seq=st.integers(min_value=0, max_value=2**53),
    prev=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
def test_chained_line_is_the_canonical_linked_record(
    record: dict[str, Any], seq: int, prev: str
) -> None:
    expected = link(record, seq=seq, prev=prev)
    line, digest = chained_line(record, seq=seq, prev=prev)
    assert line == canonical_json(expected) + b"\n"
    assert digest == expected["hash"]
    parsed = json.loads(line)
    assert record_hash(parsed) == parsed["hash"] == digest


_STR = st.one_of(st.just(""), _TEXT)
_GRANTS = st.one_of(
    st.none(),
    st.builds(
        Grant,
        id=_TEXT,
        agent=_TEXT,
        namespace=_TEXT,
        elevation=_TEXT,
        starts_at=st.floats(min_value=0, max_value=4e9),
        expires_at=st.floats(min_value=0, max_value=4e9),
        approver=_TEXT,
        justification=_STR,
    ),
)
_DECISIONS = st.builds(
    Decision,
    decision_id=_STR,
    allowed=st.booleans(),
    code=st.sampled_from([Code.ALLOWED, Code.REVOKED, Code.OUTSIDE_PURPOSE, "", "x"]),
    reason=_STR,
    agent=_STR,
    owner=_STR,
    purpose=_STR,
    task=_STR,
    rule=_STR,
    identity_source=_STR,
    method=_STR,
    host=_STR,
    port=st.integers(min_value=0, max_value=65_535),
    path=_STR,
    mcp_tools=st.lists(_TEXT, max_size=3).map(tuple),
    trace_id=_STR,
    grant=_GRANTS,
    risk=st.one_of(st.just(-1.0), st.floats(min_value=-1, max_value=1)),
    credentials=st.lists(_TEXT, max_size=3).map(tuple),
    txn=_STR,
)


@given(
    d=_DECISIONS,
    pod=_STR,
    namespace=_STR,
    now=st.floats(min_value=0, max_value=4e9),
    seq=st.integers(min_value=0, max_value=2**53),
    prev=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
@example(Decision("d", False, Code.REVOKED, "revoked", rule=""), "", "", 0.0, 0, "0" * 64)
@example(Decision("d", False, Code.REVOKED, "revoked", rule="ns/rev"), "p", "n", 1.5, 1, "0" * 64)
@example(Decision("", True, "", "", port=0, risk=0.0), "", "", 0.0, 0, "0" * 64)
@example(
    Decision(
        "d", True, Code.ALLOWED, "ok", agent="a", port=443, mcp_tools=("read", '"hash":"'),
        grant=Grant("g", "a", "n", "e", 1.0, 2.0, "bob"), risk=0.123456,
    ),
    "p", "n", 1_764_000_000.999, 7, "f" * 64,
)  # fmt: skip
@example(
    Decision(
        "d", True, Code.ALLOWED, "ok", agent="a", credentials=("stripe", "ledger-txn"), txn="d",
    ),
    "p", "n", 1.0, 2, "0" * 64,
)  # fmt: skip
def test_the_line_of_a_decision_is_the_line_of_its_record(
    d: Decision, pod: str, namespace: str, now: float, seq: int, prev: str
) -> None:
    record = record_from_decision(d, pod=pod, namespace=namespace, now=now)
    assert decision_line(d, pod=pod, namespace=namespace, now=now, seq=seq, prev=prev) == (
        chained_line(record, seq=seq, prev=prev)
    )
