"""The audit record format: canonical JSON, the chain math and the records themselves.

Pure (tested with plain data): no file, no thread, no clock of its own.

Files. ``audit-<chain_id>-<index:06d>.jsonl`` in one directory; one chain per writer
(process), several chains per directory, each verified on its own. Every line is one record
in canonical JSON (keys sorted, compact separators, UTF-8, no ASCII escaping). Every record
carries ``seq`` (0, 1, 2, ... over the whole chain), ``prev`` (the ``hash`` of the record
before it; for the first record :func:`genesis` of the chain id) and ``hash`` (hex SHA-256 of
the canonical JSON of the record without ``hash``). A file starts with a chained ``header``
record (chain, file_index) and, when rotated, ends with a chained ``footer`` record that
announces the next file index, so the chain runs unbroken across files and a deleted tail
file is detected. Other record types: ``decision`` (which may carry ``arguments``:
`sidecar.audit.arguments`, what the profile chose to keep of the call's arguments);
``loss`` (written when the log becomes writable again: how many records failed or were
dropped, when, and their decision ids); ``recovered`` (see below).

Streams (`stream`: stdout, for the cluster's log pipeline). The same records and chain math,
one chain per start of a writer process, many chains interleaved on one stream: every
record also carries the marker ``"@mandate":"audit"`` (its first member) and its ``chain``
(`stream_stamp`); a chain starts with a ``header`` (``previous``: the chain its writer wrote
before a restart) and a clean stop ends it with an ``end`` record. A stream's record line is
at most `STREAM_LINE_MAX` bytes (`fit_record`): a record that would be longer has its
longest members cut and says so in ``truncated``, one entry per member cut,
``{"<member>": {"bytes": N, "sha256": "<hex>"}}``: the length and SHA-256 of the member's
whole value (a string's UTF-8; any other value's canonical JSON); the record keeps a
string's first `CUT_CHARS` characters, or a list's or an object's first items that fit in
`CUT_BYTES`. The record is chained and hashed as written, cut.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from json.encoder import encode_basestring as _encode_str
from typing import Any

from sidecar.audit.arguments import ArgumentKey, recorded_arguments
from sidecar.audit.canonical import canonical_json
from sidecar.core import Code, Decision
from sidecar.core.agentstate import Grant
from sidecar.core.timefmt import utc_millis

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MARKER",
    "MARKER_PREFIX",
    "MARKER_VALUE",
    "STREAM_LINE_MAX",
    "canonical_json",
    "chained_line",
    "decision_line",
    "event_record",
    "file_name",
    "fit_record",
    "genesis",
    "link",
    "record_from_decision",
    "record_hash",
    "stream_stamp",
]

FORMAT = 1
_CHAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILE = re.compile(r"^audit-(?P<chain>[A-Za-z0-9][A-Za-z0-9_.-]*)-(?P<index>\d{6,})\.jsonl$")
MANIFEST = "audit-manifest.jsonl"
_MANIFEST_GENESIS = hashlib.sha256(b"mandate-audit-manifest").hexdigest()
# A record on a stream (`stream`) is recognised by its first member, ``"@mandate":"audit"``
# ("@" sorts before every other key, so canonical JSON puts it first): a line of a log is a
# record only if it starts with MARKER_PREFIX and is, whole, the record's canonical JSON.
MARKER = "@mandate"
MARKER_VALUE = "audit"
MARKER_PREFIX = b'{"@mandate":"audit",'
# A stream's record line, without its newline, is at most this long (`fit_record`): below
# the 16 KiB at which containerd and Docker split a line into parts (stream module docstring).
STREAM_LINE_MAX = 15 * 1024
CUT_CHARS = 256
CUT_BYTES = 1024
# Never cut: what chains, identifies and classifies a record.
_UNCUT = frozenset(
    {MARKER, "chain", "type", "time", "seq", "prev", "hash", "decision", "decision_id", "code",
     "truncated"}
)  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Pure: canonical JSON, chain math, records


def genesis(chain_id: str) -> str:
    """The ``prev`` of a chain's first record: derived from the chain id, so that the first
    file of one chain cannot pass for another's."""
    return hashlib.sha256(f"mandate-audit-genesis:{chain_id}".encode()).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the record's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def link(record: Mapping[str, Any], *, seq: int, prev: str) -> dict[str, Any]:
    """A new record: ``record`` with ``seq``, ``prev`` and its ``hash`` set."""
    out = {k: v for k, v in record.items() if k != "hash"}
    out["seq"] = seq
    out["prev"] = prev
    out["hash"] = record_hash(out)
    return out


_HASH_KEY = b'"hash":"'
_PLACEHOLDER = "0" * 64


def _json(value: Any) -> str:
    """One value as canonical JSON text: strings, None and ints inline, the rest by
    `canonical_json` (the same escaping: json's C `encode_basestring`)."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return int.__repr__(value)
    return canonical_json(value).decode("utf-8")


def chained_line(record: Mapping[str, Any], *, seq: int, prev: str) -> tuple[bytes, str]:
    """``canonical_json(link(record, seq=seq, prev=prev)) + b"\\n"`` and that record's hash,
    with one JSON encoding instead of two (decision records take `decision_line`).

    The record is encoded once with a placeholder hash; the bytes hashed are that encoding
    without the ``"hash":"..."`` member, which is exactly the canonical JSON of the record
    without ``hash`` (keys sorted, so removing one member leaves the rest in order). The
    splice is safe only where ``"hash":"`` occurs once: inside JSON strings every quote is
    escaped, so the one occurrence is our top-level key; a nested ``hash`` key takes the
    two-encoding path."""
    out = {k: v for k, v in record.items() if k != "hash"}
    out["seq"] = seq
    out["prev"] = prev
    out["hash"] = _PLACEHOLDER
    full = canonical_json(out)
    at = full.find(_HASH_KEY)
    if at < 0 or full.find(_HASH_KEY, at + 1) >= 0:
        del out["hash"]
        digest = record_hash(out)
        out["hash"] = digest
        return canonical_json(out) + b"\n", digest
    value = at + len(_HASH_KEY)
    end = value + len(_PLACEHOLDER) + 1  # past the closing quote
    # Drop the member with one of its separating commas (it is never the only member).
    body = full[: at - 1] + full[end:] if full[at - 1 : at] == b"," else full[:at] + full[end + 1 :]
    digest = hashlib.sha256(body).hexdigest()
    return full[:value] + digest.encode("ascii") + full[value + len(_PLACEHOLDER) :] + b"\n", digest


_ALLOW_DENY = ('"deny"', '"allow"')
_MARKER_MEMBER = f"{_encode_str(MARKER)}:{_encode_str(MARKER_VALUE)},"


def decision_line(
    d: Decision,
    *,
    pod: str,
    namespace: str,
    now: float,
    seq: int,
    prev: str,
    key: ArgumentKey | None = None,
    chain: str | None = None,
) -> tuple[bytes, str]:
    """``chained_line(record_from_decision(d, ...), seq=seq, prev=prev)`` straight from the
    Decision, without the record dict (half the cost: this runs once per audited
    decision). Byte-identical to that definition (tests/property/test_audit_line.py).
    With ``chain``, the record of a stream: ``{**record, **stream_stamp(chain)}``."""
    e = _encode_str
    # A stream's records start with the marker and carry their chain (`stream_stamp`): both
    # keys sort where they are put here ("@" before any letter; "chain" before "code").
    lead, chain_member = ("", "") if chain is None else (_MARKER_MEMBER, ',"chain":' + e(chain))
    head = (
        f'{{{lead}"agent":{e(d.agent) if d.agent else "null"}{_arguments(d, key)}'
        f'{chain_member},"code":{e(d.code)}'
        f"{_credentials(d)}"
        f',"decision":{_ALLOW_DENY[d.allowed]},"decision_id":{e(d.decision_id)}'
        f',"elevation":{"null" if d.grant is None else _json(_elevation(d.grant))}'
    )
    rest = (
        f',"host":{e(d.host) if d.host else "null"}'
        f',"identity_source":{e(d.identity_source) if d.identity_source else "null"}'
        f',"mcp_tools":{_json(list(d.mcp_tools)) if d.mcp_tools else "[]"}'
        f',"method":{e(d.method) if d.method else "null"}'
        f',"namespace":{e(namespace) if namespace else "null"}'
        f',"owner":{e(d.owner) if d.owner else "null"},"path":{e(d.path) if d.path else "null"}'
        f',"pod":{e(pod) if pod else "null"}'
        f',"port":{_json(d.port) if d.port else "null"},"prev":{e(prev)}'
        f',"purpose":{e(d.purpose) if d.purpose else "null"},"reason":{e(d.reason)}'
        f',"revocation":{e(d.rule) if d.rule and d.code == Code.REVOKED else "null"}'
        f',"risk":{_json(round(d.risk, 4)) if d.risk >= 0 else "null"}'
        f',"rule":{e(d.rule) if d.rule else "null"}'
        f',"seq":{int.__repr__(seq)},"task":{e(d.task) if d.task else "null"}'
        f',"time":"{utc_millis(now)}"'
        f',"trace_id":{e(d.trace_id) if d.trace_id else "null"}'
        f'{_txn(d)},"type":"decision"{_would(d)}}}'
    )
    digest = hashlib.sha256((head + rest).encode("utf-8", "backslashreplace")).hexdigest()
    return f'{head},"hash":"{digest}"{rest}\n'.encode("utf-8", "backslashreplace"), digest


def _arguments(d: Decision, key: ArgumentKey | None) -> str:
    args = recorded_arguments(d.arguments, key) if d.arguments is not None else None
    return ',"arguments":' + canonical_json(args).decode("utf-8") if args else ""


def _credentials(d: Decision) -> str:
    return ',"credentials":' + _json(list(d.credentials)) if d.credentials else ""


def _txn(d: Decision) -> str:
    return ',"txn":' + _encode_str(d.txn) if d.txn else ""


def _would_deny(d: Decision) -> dict[str, str]:
    code, _, reason = d.would.partition(": ")
    return {"code": code, "reason": reason}


def _would(d: Decision) -> str:
    return ',"would_deny":' + _json(_would_deny(d)) if d.would and d.allowed else ""


def stream_stamp(chain_id: str) -> dict[str, str]:
    """The members every record of a stream's chain carries: the marker and its chain id
    (a stream holds the chains of several writers, a file only one)."""
    return {MARKER: MARKER_VALUE, "chain": chain_id}


def file_name(chain_id: str, index: int) -> str:
    return f"audit-{chain_id}-{index:06d}.jsonl"


def record_from_decision(
    decision: Decision, *, pod: str, namespace: str, now: float, key: ArgumentKey | None = None
) -> dict[str, Any]:
    """The audit record of one decision (not yet chained). Absent values are null.

    who: agent, owner, pod, namespace, identity_source; what: method, host, port, path,
    mcp_tools; why: purpose, task, rule, code, reason, elevation, revocation (for a revoked
    agent the revocation key, which is also the decision's rule); and decision_id, trace_id,
    time, decision ("allow"/"deny"). An allowed call that carried credentials also has
    `credentials` (their names in the profile, never a value) and, with a Transaction
    Token, `txn` (the token's `txn` claim). A call with a body or a query whose profile
    records arguments has `arguments` (`sidecar.audit.arguments`: types, and hashes under
    ``key`` or values in clear, as the profile chose). An allowed call of an agent whose
    behaviour analysis is in `monitor` mode has `would_deny` ({code, reason}) when `enforce`
    would have refused it."""
    d = decision
    record: dict[str, Any] = {
        "type": "decision",
        "time": utc_millis(now),
        "decision_id": d.decision_id,
        "decision": "allow" if d.allowed else "deny",
        "code": d.code,
        "reason": d.reason,
        "agent": d.agent or None,
        "owner": d.owner or None,
        "pod": pod or None,
        "namespace": namespace or None,
        "identity_source": d.identity_source or None,
        "method": d.method or None,
        "host": d.host or None,
        "port": d.port or None,
        "path": d.path or None,
        "mcp_tools": list(d.mcp_tools),
        "purpose": d.purpose or None,
        "task": d.task or None,
        "rule": d.rule or None,
        "elevation": _elevation(d.grant),
        "risk": round(d.risk, 4) if d.risk >= 0 else None,
        "revocation": (d.rule or None) if d.code == Code.REVOKED else None,
        "trace_id": d.trace_id or None,
    }
    if d.arguments is not None:
        arguments = recorded_arguments(d.arguments, key)
        if arguments:
            record["arguments"] = arguments
    if d.credentials:
        record["credentials"] = list(d.credentials)
    if d.txn:
        record["txn"] = d.txn
    if d.would and d.allowed:  # only an allowed call was let through "in monitor mode"
        record["would_deny"] = _would_deny(d)
    return record


def _elevation(g: Grant | None) -> dict[str, Any] | None:
    if g is None:
        return None
    return {
        "name": g.elevation,
        "grant": g.id,
        "approver": g.approver,
        "justification": g.justification or None,
        "expires": utc_millis(g.expires_at),
    }


def event_record(event: str, *, now: float, **fields: Any) -> dict[str, Any]:
    """The audit record of a supervisor event (not yet chained): an elevation requested,
    granted, expired, refused; a task reported; an automatic revocation."""
    return {"type": event, "time": utc_millis(now), **fields}


def fit_record(record: Mapping[str, Any], limit: int = STREAM_LINE_MAX) -> dict[str, Any]:
    """``record`` (not yet chained) with its longest members cut until its chained line
    (`chained_line`, with any seq) is at most ``limit`` bytes without its newline, and each
    cut member described in ``truncated`` (module docstring). Members named in `_UNCUT`
    stay whole; a record that still does not fit comes back as far as it could be cut
    (never refused: a long line beats a lost record)."""
    out = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}
    truncated: dict[str, Any] = dict(out.get("truncated") or {})
    # seq, prev and hash at their longest: what chaining adds to the line
    chained = len(canonical_json({"seq": 2**63, "prev": _PLACEHOLDER, "hash": _PLACEHOLDER}))
    budget = limit - chained + 1  # (the two braces counted twice, less one comma)

    def size() -> int:
        body = {**out, "truncated": truncated} if truncated else out
        return len(canonical_json(body))

    for short in (True, False):  # cut to a prefix first; to nothing if that is not enough
        if size() <= budget:
            break
        members = sorted(
            (k for k, v in out.items() if k not in _UNCUT and isinstance(v, str | list | dict)),
            key=lambda k: len(canonical_json(out[k])),
            reverse=True,
        )
        for key in members:
            value = out[key]
            whole = record[key]
            cut = _cut(value) if short else _empty(value)
            if cut == value:
                continue
            if key not in truncated:
                raw = (
                    whole.encode("utf-8", "backslashreplace")
                    if isinstance(whole, str)
                    else canonical_json(whole)
                )
                truncated[key] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
            out[key] = cut
            if size() <= budget:
                break
    if truncated:
        out["truncated"] = truncated
    return out


def _cut(value: str | list[Any] | dict[str, Any]) -> str | list[Any] | dict[str, Any]:
    if isinstance(value, str):
        return value[:CUT_CHARS]
    items = list(value.items()) if isinstance(value, dict) else list(value)
    kept, used = [], 2
    for item in items:
        used += len(canonical_json(item)) + 1
        if used > CUT_BYTES:
            break
        kept.append(item)
    return dict(kept) if isinstance(value, dict) else kept


def _empty(value: str | list[Any] | dict[str, Any]) -> str | list[Any] | dict[str, Any]:
    return type(value)()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
