"""A stream's decision line (`decision_line` with ``chain``) is the line of the decision's
record with the stream's stamp (`stream_stamp`: the marker first, and the chain id), for any
decision: the fast path of the stdout sink writes exactly the record `logverify` checks."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from sidecar.audit import chained_line, decision_line, record_from_decision, record_hash
from sidecar.audit.arguments import ArgumentKey
from sidecar.audit.record import MARKER_PREFIX, stream_stamp
from sidecar.core import Decision

from .test_audit_line import _ARGUMENT_KEYS, _DECISIONS, _STR

_CHAINS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@given(
    d=_DECISIONS,
    pod=_STR,
    namespace=_STR,
    now=st.floats(min_value=0, max_value=4e9),
    seq=st.integers(min_value=0, max_value=2**53),
    prev=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    key=_ARGUMENT_KEYS,
    chain=_CHAINS,
)
def test_a_stream_decision_line_is_its_stamped_record(
    d: Decision,
    pod: str,
    namespace: str,
    now: float,
    seq: int,
    prev: str,
    key: ArgumentKey | None,
    chain: str,
) -> None:
    record = record_from_decision(d, pod=pod, namespace=namespace, now=now, key=key)
    expected = chained_line({**record, **stream_stamp(chain)}, seq=seq, prev=prev)
    line = decision_line(
        d, pod=pod, namespace=namespace, now=now, seq=seq, prev=prev, key=key, chain=chain
    )
    assert line == expected
    assert line[0].startswith(MARKER_PREFIX)
    parsed = json.loads(line[0])
    assert parsed["chain"] == chain and record_hash(parsed) == line[1]
