"""The audit trail a mandate process writes to: a directory (`writer`), stdout (`stream`), or
both (`Tee`), behind one face (`Trail`), and `open_trail`, which makes it from the options.

With both, each record goes to each sink on a chain of its own (a directory's chain is
continued across restarts, a stream's is not; and one sink failing must not leave a hole in
the other's chain): a call is denied (fail-closed) when either cannot take its record, and
readiness shows each sink's state.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from sidecar.audit.chainwriter import AuditStats, ChainWriter, FailureMode
from sidecar.audit.stream import StreamWriter, claim_stdout
from sidecar.audit.writer import AuditWriter, FsyncMode
from sidecar.core import Decision

__all__ = ["Tee", "Trail", "open_trail"]


class Trail(Protocol):
    """What the Check pipeline and the supervisor use of an audit trail."""

    @property
    def fail_closed(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    def write(self, record: Mapping[str, Any]) -> bool: ...

    def write_decision(
        self, decision: Decision, *, pod: str, namespace: str, now: float
    ) -> bool: ...

    def must_deny(self) -> bool: ...

    def health(self) -> dict[str, Any]: ...

    def stats(self) -> AuditStats: ...

    def flush(self, timeout: float = 5.0) -> bool: ...

    def close(self, timeout: float = 5.0) -> bool: ...


class Tee:
    """Several writers as one trail: every record to each (each on its own chain)."""

    def __init__(self, *writers: ChainWriter) -> None:
        self.writers = writers

    @property
    def fail_closed(self) -> bool:
        return any(w.fail_closed for w in self.writers)

    @property
    def healthy(self) -> bool:
        return all(w.healthy for w in self.writers)

    def write(self, record: Mapping[str, Any]) -> bool:
        """True if every writer queued it."""
        return all([w.write(record) for w in self.writers])

    def write_decision(self, decision: Decision, *, pod: str, namespace: str, now: float) -> bool:
        return all(
            [
                w.write_decision(decision, pod=pod, namespace=namespace, now=now)
                for w in self.writers
            ]
        )

    def must_deny(self) -> bool:
        return any(w.must_deny() for w in self.writers)

    def health(self) -> dict[str, Any]:
        """``state`` "failing" if a sink is; ``denying`` if one denies; each sink's health
        under ``sinks`` by its name."""
        sinks = {w.sink: w.health() for w in self.writers}
        return {
            "state": "failing" if any(h["state"] == "failing" for h in sinks.values()) else "ok",
            "denying": any(h["denying"] for h in sinks.values()),
            "on_failure": "fail-closed" if self.fail_closed else "continue",
            "sinks": sinks,
        }

    def stats(self) -> AuditStats:
        """Summed over the sinks: a record written to both counts twice."""
        each = [w.stats() for w in self.writers]
        return AuditStats(
            written=sum(s.written for s in each),
            failed=sum(s.failed for s in each),
            dropped=sum(s.dropped for s in each),
            backlog=sum(s.backlog for s in each),
            errors=sum(s.errors for s in each),
            healthy=all(s.healthy for s in each),
            next_seq=max(s.next_seq for s in each),
            file_index=max(s.file_index for s in each),
            low_space=any(s.low_space for s in each),
        )

    def flush(self, timeout: float = 5.0) -> bool:
        return all([w.flush(timeout) for w in self.writers])

    def close(self, timeout: float = 5.0) -> bool:
        return all([w.close(timeout) for w in self.writers])


def open_trail(
    *,
    directory: Path | None,
    stdout: bool,
    chain_id: str,
    writer: str,
    pod: str,
    fsync: FsyncMode,
    on_failure: FailureMode,
    reserve_bytes: int,
    shared_directory: Path | None,
    state_directory: Path | None,
) -> Trail | None:
    """The trail of one process of a mandate (None: neither sink is on).

    ``directory`` and ``chain_id``: the audit directory and this process's chain there.
    ``stdout``: also (or only) the stream on fd 1, as ``writer`` (``w0``, ``supervisor``)
    of ``pod``; its lock and health board go in ``shared_directory`` (the run directory),
    its head file in ``state_directory`` (kept across container restarts: an emptyDir) or
    else the run directory, and without an audit directory its argument key is the state
    directory's (else the run directory's: hashes then compare within one run)."""
    writers: list[ChainWriter] = []
    pod_name = pod or socket.gethostname()
    try:
        if directory is not None:
            writers.append(
                AuditWriter(
                    directory,
                    chain_id=chain_id or f"{pod_name}-{os.getpid()}",
                    fsync=fsync,
                    on_failure=on_failure,
                    reserve_bytes=reserve_bytes,
                )
            )
        if stdout:
            claim_stdout()
            writers.append(
                StreamWriter(
                    1,
                    writer=writer,
                    pod=pod_name,
                    on_failure=on_failure,
                    shared_directory=shared_directory,
                    head_directory=state_directory or shared_directory,
                    key_directory=directory or state_directory or shared_directory,
                )
            )
    except BaseException:
        for w in writers:
            w.close()
        raise
    if not writers:
        return None
    return writers[0] if len(writers) == 1 else Tee(*writers)
