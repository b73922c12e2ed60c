"""The audit wing: one hash-chained JSON-lines record per decision, written off the hot path,
and its verification.

- `record`: the record format, canonical JSON (`canonical`) and the chain math (pure);
- `arguments`: what a decision record keeps of the call's arguments (pure), and `keyfile`,
  the directory's key for their hashes;
- `writer`: `AuditWriter`, the thread that appends records to size-rotated files, with the
  free-space reserve, the directory's health board and the chain manifest;
- `verify` and `query`: reading a trail back (`mandate audit verify`, `mandate audit query`);
- `files`: finding a directory's chains and their files;
- `cli`: the command line.

This wing must not decide anything, block a Check on disk I/O or raise into a Check. Its
public face is re-exported here."""

from sidecar.audit.query import query
from sidecar.audit.record import (
    FORMAT,
    MANIFEST,
    canonical_json,
    chained_line,
    decision_line,
    event_record,
    file_name,
    genesis,
    link,
    record_from_decision,
    record_hash,
)
from sidecar.audit.verify import ChainReport, Problem, VerifyResult, verify
from sidecar.audit.writer import (
    DEFAULT_RESERVE_BYTES,
    AuditStats,
    AuditWriter,
    FailureMode,
    FsyncMode,
)

__all__ = [
    "DEFAULT_RESERVE_BYTES",
    "FORMAT",
    "MANIFEST",
    "AuditStats",
    "AuditWriter",
    "ChainReport",
    "FailureMode",
    "FsyncMode",
    "Problem",
    "VerifyResult",
    "canonical_json",
    "chained_line",
    "decision_line",
    "event_record",
    "file_name",
    "genesis",
    "link",
    "query",
    "record_from_decision",
    "record_hash",
    "verify",
]
