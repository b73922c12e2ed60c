"""The audit wing: one hash-chained JSON-lines record per decision, written off the hot path,
and its verification.

- `record`: the record format, canonical JSON (`canonical`) and the chain math (pure);
- `arguments`: what a decision record keeps of the call's arguments (pure), and `keyfile`,
  the key for their hashes;
- `chainwriter`: `ChainWriter`, what every writer shares (the queue, the thread, failure
  modes, the health board); its sinks: `writer` (`AuditWriter`: size-rotated files in a
  directory, with the free-space reserve and the chain manifest) and `stream`
  (`StreamWriter`: stdout, for the cluster's log pipeline); `trail`: the one a process
  writes to (`open_trail`: a directory, stdout or both);
- `verify` and `query`: reading a directory back (`mandate audit verify`, `mandate audit
  query`); `logs` and `logverify`: reading a stream back from logs (``--log``);
- `files`: finding a directory's chains and their files;
- `cli`: the command line.

This wing must not decide anything, block a Check on I/O or raise into a Check. Its
public face is re-exported here."""

from sidecar.audit.chainwriter import AuditStats, ChainWriter, FailureMode
from sidecar.audit.logverify import LogChainReport, LogVerifyResult, verify_log
from sidecar.audit.query import query, query_log
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
from sidecar.audit.stream import StreamWriter
from sidecar.audit.trail import Tee, Trail, open_trail
from sidecar.audit.verify import ChainReport, Problem, VerifyResult, verify
from sidecar.audit.writer import DEFAULT_RESERVE_BYTES, AuditWriter, FsyncMode

__all__ = [
    "DEFAULT_RESERVE_BYTES",
    "FORMAT",
    "MANIFEST",
    "AuditStats",
    "AuditWriter",
    "ChainReport",
    "ChainWriter",
    "FailureMode",
    "FsyncMode",
    "LogChainReport",
    "LogVerifyResult",
    "Problem",
    "StreamWriter",
    "Tee",
    "Trail",
    "VerifyResult",
    "canonical_json",
    "chained_line",
    "decision_line",
    "event_record",
    "file_name",
    "genesis",
    "link",
    "open_trail",
    "query",
    "query_log",
    "record_from_decision",
    "record_hash",
    "verify",
    "verify_log",
]
