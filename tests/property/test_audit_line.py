"""The one-encoding audit line (`chained_line`) is byte for byte the two-encoding definition
(`canonical_json(link(...))`): any record, including strings that spell `"hash":"` and
nested `hash` keys, gets the same line and the same hash, and `verify`'s own check accepts it.
Decision records take a template of their own, straight from the Decision
(`decision_line`): its line is the line of the Decision's record, for any field values,
recorded arguments (any body, query, recording choice, with or without a key) included."""

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
from sidecar.audit.arguments import ArgumentKey
from sidecar.core import Code, Decision
from sidecar.core.agentstate import Grant
from sidecar.core.mcp import parse_mcp_body
from sidecar.core.recording import ArgumentRecording, CallArguments

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
_OBJECTS = st.dictionaries(_KEYS, _VALUES, max_size=5)


def _rpc(tool: str, arguments: object) -> bytes:
    params = {"name": tool, "arguments": arguments}
    return json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    ).encode()


_BODIES = st.one_of(
    st.none(),
    _OBJECTS.map(lambda o: json.dumps(o).encode()),
    st.builds(_rpc, _TEXT, st.one_of(_OBJECTS, _VALUES)),
    st.lists(st.builds(_rpc, _TEXT, _OBJECTS), max_size=3).map(
        lambda b: b"[" + b",".join(b) + b"]"
    ),
    st.binary(max_size=24),
)


@st.composite
def _call_arguments(draw: st.DrawFn) -> CallArguments:
    body = draw(_BODIES)
    truncated = draw(st.booleans()) and body is not None
    query = draw(st.one_of(st.just(""), st.text(max_size=24).map(lambda q: "?" + q)))
    recording = ArgumentRecording(
        draw(st.sampled_from(["hashes", "types"])), draw(st.frozensets(_KEYS, max_size=3))
    )
    parsed = parse_mcp_body(body, truncated) if draw(st.booleans()) else None
    return CallArguments(recording, "/p" + query, body or None, truncated, parsed)


_ARGUMENT_KEYS = st.one_of(st.none(), st.binary(min_size=32, max_size=32).map(ArgumentKey.of))

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
    arguments=st.one_of(st.none(), _call_arguments()),
    would=st.one_of(_STR, st.builds(lambda c, r: f"{c}: {r}", _TEXT, _TEXT)),
)


@given(
    d=_DECISIONS,
    pod=_STR,
    namespace=_STR,
    now=st.floats(min_value=0, max_value=4e9),
    seq=st.integers(min_value=0, max_value=2**53),
    prev=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    key=_ARGUMENT_KEYS,
)
@example(Decision("d", False, Code.REVOKED, "revoked", rule=""), "", "", 0.0, 0, "0" * 64, None)
@example(
    Decision("d", False, Code.REVOKED, "revoked", rule="ns/rev"), "p", "n", 1.5, 1, "0" * 64, None
)
@example(Decision("", True, "", "", port=0, risk=0.0), "", "", 0.0, 0, "0" * 64, None)
@example(
    Decision(
        "d", True, Code.ALLOWED, "ok", agent="a", port=443, mcp_tools=("read", '"hash":"'),
        grant=Grant("g", "a", "n", "e", 1.0, 2.0, "bob"), risk=0.123456,
    ),
    "p", "n", 1_764_000_000.999, 7, "f" * 64, None,
)  # fmt: skip
@example(
    Decision(
        "d", True, Code.ALLOWED, "ok", agent="a", credentials=("stripe", "ledger-txn"), txn="d",
    ),
    "p", "n", 1.0, 2, "0" * 64, None,
)  # fmt: skip
@example(
    Decision(
        "d", True, Code.ALLOWED, "ok", agent="a",
        arguments=CallArguments(
            ArgumentRecording("hashes", frozenset({"amount"})), "/mcp?to=a&to=b",
            _rpc("send_money", {"to": "DE89", "amount": 100, "hash": '"hash":"'}), False,
        ),
    ),
    "p", "n", 1.0, 3, "0" * 64, ArgumentKey.of(b"k" * 32),
)  # fmt: skip
def test_the_line_of_a_decision_is_the_line_of_its_record(
    d: Decision,
    pod: str,
    namespace: str,
    now: float,
    seq: int,
    prev: str,
    key: ArgumentKey | None,
) -> None:
    record = record_from_decision(d, pod=pod, namespace=namespace, now=now, key=key)
    line = decision_line(d, pod=pod, namespace=namespace, now=now, seq=seq, prev=prev, key=key)
    assert line == chained_line(record, seq=seq, prev=prev)
    assert record_hash(json.loads(line[0])) == line[1]
