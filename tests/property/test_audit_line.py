"""The one-encoding audit line (`chained_line`) is byte for byte the two-encoding definition
(`canonical_json(link(...))`): any record, including strings that spell `"hash":"` and
nested `hash` keys, gets the same line and the same hash, and `verify`'s own check accepts it.
Decision records take a template path of their own (`_decision_line`): same property, with
every field of a decision record drawn from any JSON value its type allows and more."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar.audit import _DECISION_KEYS, canonical_json, chained_line, link, record_hash

_TRICKY = st.sampled_from(
    ['"hash":"', '\\"hash\\":\\"', "0" * 64, "hash", "é", "\u2028", '{"hash":"x"}', ","]
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


_FIELD = st.one_of(
    st.none(),
    _TEXT,
    st.integers(min_value=-(2**63), max_value=2**64),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(_TEXT, max_size=3),
    st.dictionaries(_KEYS, _SCALARS, max_size=5),
)


@given(
    record=st.fixed_dictionaries({k: _FIELD for k in sorted(_DECISION_KEYS)}),
    seq=st.integers(min_value=0, max_value=2**53),
    prev=st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), _TEXT),
)
def test_a_decision_record_takes_the_template_and_gets_the_same_line(
    record: dict[str, Any], seq: int, prev: str
) -> None:
    assert record.keys() == _DECISION_KEYS  # the template path
    expected = link(record, seq=seq, prev=prev)
    line, digest = chained_line(record, seq=seq, prev=prev)
    assert line == canonical_json(expected) + b"\n"
    assert digest == expected["hash"]
