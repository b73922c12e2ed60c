"""The one-encoding audit line (`chained_line`) is byte for byte the two-encoding definition
(`canonical_json(link(...))`): any record, including strings that spell `"hash":"` and
nested `hash` keys, gets the same line and the same hash, and `verify`'s own check accepts it."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sidecar.audit import canonical_json, chained_line, link, record_hash

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
