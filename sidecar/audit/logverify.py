"""Verifying an audit stream read back from logs (`mandate audit verify --log`): each chain
found, on its own, and the links between the chains of one writer across restarts.

The lines come from `logs` (framings taken off, long lines joined); a line is a record only
if its text is, whole, the canonical JSON of a record that starts with the marker
(`record.MARKER_PREFIX`): a log line that merely contains one is not.

Per chain (its records in log order): each record's hash and canonical form (verify what
the runtime wrote: a pipeline that re-encodes lines breaks them), ``seq`` and ``prev`` from
one record to the next (a missing line is a ``seq_gap``, an edited one a ``hash_mismatch``,
lines out of order ``reordered``), a chain that starts in the log starts with its header
(seq 0, prev the chain's genesis), nothing after its ``end`` record. Across chains: a
header names the chain its writer wrote before (a restart: `stream`); that chain must reach
the named record (``missing_tail`` when the log stops short of it, ``link_mismatch`` when
the record there differs). An exact duplicate of a line (a log shipper's retry) is a note.

Whose lines: only the container named ``container`` (``mandate``) writes records. Where the
source names the container of a line (`logs`: ``kubectl logs --prefix``, the kubelet's CRI
paths), a marker line of another container is a problem (``foreign_container``: the agent
printing a chain of its own, which anyone can compute, unkeyed as it is), never a record.
Where it does not (`kubectl logs POD -c mandate`), the source is trusted to be mandate's
container, and the result says so (``trusted_sources``, a note).

Complete or a window. A log may start late: the kubelet rotated the file away (an agent can
flood cheap denied calls until it does), or `--since`/`--tail` cut it. A chain whose header
is not in the log (``missing_head``: it begins at seq N > 0) or whose header names a
previous chain the log does not hold (``missing_previous``: a restart whose predecessor is
not in the log) cannot be shown to be the whole story: the result is intact (no problem)
but incomplete (``complete`` false: `mandate audit verify --log` exits 3). With
``allow_partial`` (an operator who passes a window on purpose) both are notes, and each
chain says where it begins (``first_seq``, ``first_time``). A chain with neither an
``end`` record nor a successor in the log is a note (still running, killed, or its tail is
past the window or was cut: anchor heads elsewhere, as for a directory). Marker lines that
are not records (a writer killed mid-line) are problems, unless a ``recovered`` record says
a writer ended such a line (then notes).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.audit.logs import LogLine, log_lines
from sidecar.audit.record import (
    _CHAIN_ID,
    MARKER,
    MARKER_PREFIX,
    MARKER_VALUE,
    _is_int,
    canonical_json,
    genesis,
    record_hash,
)
from sidecar.audit.verify import Problem, _Bad, _int
from sidecar.errors import AuditInputError

__all__ = ["INCOMPLETE", "LogChainReport", "LogVerifyResult", "verify_lines", "verify_log"]

# The kinds of problem that say the log is a window (not that it was tampered with).
INCOMPLETE = frozenset({"missing_head", "missing_previous"})

# How many of a chain's latest (seq, hash) are kept, to check a successor's link and to
# tell a duplicated line from a forked one. A head file lags what was written by at most
# one batch (512 records).
_RECENT = 4096


@dataclass(frozen=True, slots=True)
class LogChainReport:
    """One chain of a log. ``records`` counts decision records; ``first_seq`` is where the
    chain begins in the log (0: its header is there) and ``first_time`` that record's time;
    ``previous`` what its header names (None: a new chain, or its header is not in the
    log); ``successor`` the chain that names it; ``notes``: what a valid chain admits to;
    ``problem``: the first bad record; ``incomplete``: why the log may not hold the whole
    chain and what came before it (a kind of `INCOMPLETE`), None when it does or when
    partial logs were allowed."""

    chain: str
    writer: str | None
    pod: str | None
    pid: int | None
    started: str | None  # its header's time
    records: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    lost: int
    ended: bool
    previous: dict[str, Any] | None
    successor: str | None
    notes: tuple[str, ...]
    problem: Problem | None
    first_time: str | None = None
    incomplete: Problem | None = None

    @property
    def ok(self) -> bool:
        """Intact and complete."""
        return self.problem is None and self.incomplete is None

    def to_json(self) -> dict[str, Any]:
        return {
            "chain": self.chain, "ok": self.ok, "writer": self.writer, "pod": self.pod,
            "pid": self.pid, "started": self.started, "records": self.records,
            "first_seq": self.first_seq, "first_time": self.first_time,
            "last_seq": self.last_seq, "last_hash": self.last_hash, "lost": self.lost,
            "ended": self.ended, "previous": self.previous, "successor": self.successor,
            "notes": list(self.notes), "problem": _problem_json(self.problem),
            "incomplete": _problem_json(self.incomplete),
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class LogVerifyResult:
    """``chains`` in order of first appearance; ``problems``: marker lines that are not
    records (``chain`` empty, ``seq`` -1), or that another container wrote
    (``foreign_container``, one per source and container); ``lines``/``record_lines``:
    what was read (``record_lines``: the marker lines on stdout, another container's too);
    ``container``: whose records were accepted; ``trusted_sources``: the sources whose
    framing does not name the container of their records (trusted to be ``container``)."""

    sources: tuple[str, ...]
    chains: tuple[LogChainReport, ...]
    problems: tuple[Problem, ...]
    notes: tuple[str, ...]
    lines: int
    record_lines: int
    container: str = "mandate"
    trusted_sources: tuple[str, ...] = ()

    @property
    def intact(self) -> bool:
        """No chain has a bad record, and every marker line is a record of ``container``."""
        return all(c.problem is None for c in self.chains) and not self.problems

    @property
    def complete(self) -> bool:
        """Every chain starts in the log, and so does the chain before each restart."""
        return all(c.incomplete is None for c in self.chains)

    @property
    def ok(self) -> bool:
        """Intact and complete (`mandate audit verify --log` exits 0)."""
        return self.intact and self.complete

    @property
    def problem(self) -> Problem | None:
        """The first problem: the chains' in order, then the stream's; when intact, the
        first reason it is incomplete."""
        found = next((c.problem for c in self.chains if c.problem is not None), None)
        found = found or next(iter(self.problems), None)
        return found or next((c.incomplete for c in self.chains if c.incomplete), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "intact": self.intact,
            "complete": self.complete,
            "sources": list(self.sources),
            "container": self.container,
            "trusted_sources": list(self.trusted_sources),
            "problem": _problem_json(self.problem),
            "problems": [_problem_json(p) for p in self.problems],
            "notes": list(self.notes),
            "lines": self.lines,
            "record_lines": self.record_lines,
            "chains": [c.to_json() for c in self.chains],
        }


def _problem_json(p: Problem | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {
        "chain": p.chain, "file": p.file, "line": p.line, "seq": p.seq, "kind": p.kind,
        "message": p.message,
    }  # fmt: skip


@dataclass
class _Chain:
    """A chain's state while its records are read."""

    chain: str
    allow_partial: bool = False
    sources: set[str] = field(default_factory=set)
    next_seq: int | None = None  # None: no record yet
    prev: str = ""
    first_seq: int | None = None
    first_time: str | None = None
    last: tuple[str, int] = ("", 0)  # source, line of its last good record
    recent: OrderedDict[int, str] = field(default_factory=OrderedDict)
    header: dict[str, Any] | None = None
    header_at: tuple[str, int] = ("", 0)
    records: int = 0
    lost: int = 0
    ended: bool = False
    notes: list[str] = field(default_factory=list)
    problem: Problem | None = None
    incomplete: Problem | None = None
    gap_from: int | None = None  # the seq a seq_gap problem expected (a reorder if it comes)
    successor: str | None = None

    def at(self, where: LogLine) -> str:
        return f"{where.source} line {where.line}"

    def add(self, where: LogLine, rec: dict[str, Any]) -> bool:
        """Check ``rec`` against the chain so far; True if it is taken into the chain."""
        seq: int = rec["seq"]
        if self.problem is not None:
            if self.gap_from is not None and seq == self.gap_from:
                p = self.problem
                why = f"out of order: seq {seq} comes after seq {p.seq} ({self.at(where)})"
                self.problem = Problem(p.chain, p.file, p.line, p.seq, "reordered", why)
                self.gap_from = None
            return False
        kind = rec.get("type")
        try:
            if record_hash(rec) != rec["hash"]:
                raise _Bad("hash_mismatch", "record edited: hash does not match content", seq)
            if self.next_seq is None:
                if seq == 0 and rec["prev"] != genesis(self.chain):
                    raise _Bad("prev_mismatch", "seq 0 whose prev is not the chain's genesis", seq)
                if (seq == 0) != (kind == "header"):
                    why = "seq 0 is not a header" if seq == 0 else "a header inside the chain"
                    raise _Bad("bad_header", why, seq)
                if seq > 0:
                    why = (
                        f"the log begins inside this chain, at seq {seq} (time "
                        f"{rec.get('time')}): its header and the {seq} record(s) before are "
                        "not in the log (rotated away, or cut by --since/--tail)"
                    )
                    head = Problem(self.chain, where.source, where.line, seq, "missing_head", why)
                    self.window(head)
            else:
                if seq < self.next_seq:
                    if self.recent.get(seq) == rec["hash"]:
                        self.notes.append(
                            f"{self.at(where)}: a duplicate of seq {seq} (a log shipper's "
                            "retry?): ignored"
                        )
                        return False
                    why = (
                        f"seq goes back: expected {self.next_seq}, found {seq} with other "
                        "content (a forged or reordered record)"
                    )
                    raise _Bad("reordered", why, seq)
                if seq > self.next_seq:
                    self.gap_from = self.next_seq
                    missing = seq - self.next_seq
                    why = (
                        f"seq gap: expected {self.next_seq}, found {seq}: {missing} record(s) "
                        "missing from the log (removed, or lost by the log pipeline)"
                    )
                    raise _Bad("seq_gap", why, seq)
                if rec["prev"] != self.prev:
                    raise _Bad(
                        "prev_mismatch",
                        "prev is not the hash of the record before it (that record was "
                        "edited and re-hashed, or records were removed or inserted)",
                        seq,
                    )
                if kind == "header":
                    raise _Bad("bad_header", "a header inside the chain", seq)
                if self.ended:
                    raise _Bad("bad_record", "a record after the chain's end record", seq)
        except _Bad as bad:
            at = seq if bad.seq is None else bad.seq
            self.problem = Problem(self.chain, where.source, where.line, at, bad.kind, bad.message)
            return False
        self._take(where, rec, seq, kind)
        return True

    def window(self, why: Problem) -> None:
        """The log may not hold the whole story of this chain: incomplete, or a note when
        partial logs are allowed."""
        if self.allow_partial:
            self.notes.append(f"{why.file} line {why.line}: {why.message}")
        elif self.incomplete is None:
            self.incomplete = why

    def _take(self, where: LogLine, rec: dict[str, Any], seq: int, kind: object) -> None:
        if self.first_seq is None:
            self.first_seq = seq
            self.first_time = _str(rec.get("time"))
        self.next_seq, self.prev = seq + 1, rec["hash"]
        self.last = (where.source, where.line)
        self.sources.add(where.source)
        self.recent[seq] = rec["hash"]
        if len(self.recent) > _RECENT:
            self.recent.popitem(last=False)
        if kind == "decision":
            self.records += 1
        elif kind == "header":
            self.header, self.header_at = rec, (where.source, where.line)
        elif kind == "end":
            self.ended = True
        elif kind == "loss":
            self.lost += _int(rec.get("failed")) + _int(rec.get("dropped"))
            self.notes.append(
                f"{self.at(where)} (seq {seq}): {rec.get('failed')} record(s) failed, "
                f"{rec.get('dropped')} dropped ({rec.get('error')})"
            )
        elif kind == "recovered":
            self.notes.append(
                f"{self.at(where)} (seq {seq}): ended a line left torn by {rec.get('torn_by')}"
            )

    def report(self) -> LogChainReport:
        header = self.header or {}
        previous = header.get("previous")
        pid = header.get("pid")
        return LogChainReport(
            chain=self.chain,
            writer=_str(header.get("writer")),
            pod=_str(header.get("pod")),
            pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            started=_str(header.get("time")),
            records=self.records,
            first_seq=self.first_seq,
            last_seq=None if self.next_seq is None else self.next_seq - 1,
            last_hash=self.prev or None,
            lost=self.lost,
            ended=self.ended,
            previous=previous if isinstance(previous, dict) else None,
            successor=self.successor,
            notes=tuple(self.notes),
            problem=self.problem,
            first_time=self.first_time,
            incomplete=self.incomplete,
        )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def verify_log(
    sources: Sequence[str],
    chain_id: str | None = None,
    *,
    container: str = "mandate",
    allow_partial: bool = False,
) -> LogVerifyResult:
    """Verify the audit stream in ``sources`` (files, CRI log directories, ``-``: see
    `logs`); with ``chain_id``, report that chain only (links to others still checked).
    Records are accepted from ``container`` only, where the source names containers;
    ``allow_partial``: a log that starts late is not incomplete (module docstring).
    AuditInputError for a source that cannot be read, or no record at all."""
    result = verify_lines(
        log_lines(sources), chain_id, container=container, allow_partial=allow_partial
    )
    if not result.record_lines:
        raise AuditInputError(
            f"{', '.join(sources)}: no audit records (lines starting with {MARKER_PREFIX.decode()})"
        )
    if chain_id is not None and not result.chains:
        raise AuditInputError(f"{', '.join(sources)}: no records of chain {chain_id!r}")
    return result


def verify_lines(
    lines: Iterable[LogLine],
    chain_id: str | None = None,
    *,
    container: str = "mandate",
    allow_partial: bool = False,
) -> LogVerifyResult:
    """`verify_log` on lines already read (pure: tested with plain data)."""
    chains: dict[str, _Chain] = {}
    torn: list[Problem] = []  # marker lines that are not records, not yet explained
    explained: list[str] = []
    problems: list[Problem] = []
    notes: list[str] = []
    sources: dict[str, None] = {}
    foreign: dict[tuple[str, str], list[int]] = {}  # (source, container): [first line, count]
    trusted: dict[str, None] = {}
    count = records = stderr_marked = 0
    for line in lines:
        count += 1
        sources.setdefault(line.source, None)
        if not line.text.startswith(MARKER_PREFIX):
            continue
        if line.stream == "stderr":
            stderr_marked += 1
            continue
        records += 1
        if line.container is None:
            trusted.setdefault(line.source, None)
        elif line.container != container:
            seen = foreign.setdefault((line.source, line.container), [line.line, 0])
            seen[1] += 1
            continue
        rec, bad = _record(line)
        if bad is not None:
            (torn if bad.kind == "torn_line" else problems).append(bad)
            continue
        assert rec is not None
        chain = chains.setdefault(rec["chain"], _Chain(rec["chain"], allow_partial))
        taken = chain.add(line, rec)
        if taken and rec.get("type") == "recovered" and rec.get("torn_line") is True and torn:
            p = torn.pop(0)
            explained.append(
                f"{p.file} line {p.line}: a torn line, ended by {rec['chain']} "
                f"(seq {rec['seq']}): its writer stopped mid-line"
            )
    _link(chains)
    for (source, other), (first, n) in foreign.items():
        why = (
            f"{n} line(s) of container {other!r} start like audit records: only container "
            f"{container!r} writes them (another container printing a chain of its own?); "
            "none is taken for a record (--container names mandate's container if renamed)"
        )
        problems.append(Problem("", source, first, -1, "foreign_container", why))
    for source in trusted:
        notes.append(
            f"{source}: its framing does not name the container of its records: they are "
            f"trusted to come from container {container!r} (as `kubectl logs POD -c "
            f"{container}` gives); `kubectl logs --prefix` or the node's CRI files let "
            "verify check it"
        )
    if stderr_marked:
        notes.append(
            f"{stderr_marked} line(s) on stderr start like records: ignored (only stdout "
            "carries records; mandate's own log lines are on stderr)"
        )
    notes.extend(explained)
    reports = [c.report() for c in chains.values()]
    if chain_id is not None:
        reports = [r for r in reports if r.chain == chain_id]
    return LogVerifyResult(
        tuple(sources), tuple(reports), tuple(torn + problems), tuple(notes), count, records,
        container, tuple(trusted),
    )  # fmt: skip


def _record(line: LogLine) -> tuple[dict[str, Any] | None, Problem | None]:
    """The record that ``line`` is, or the problem with it."""

    def bad(kind: str, why: str) -> tuple[None, Problem]:
        return None, Problem("", line.source, line.line, -1, kind, why)

    if not line.complete:
        return bad("torn_line", "a record line that never ended (torn, or still being written)")
    try:
        rec = json.loads(line.text)
    except ValueError:
        return bad("torn_line", "starts like a record but is not JSON (torn?)")
    if not isinstance(rec, dict):
        return bad("bad_record", "not a JSON object")
    if not _is_int(rec.get("seq")) or not all(
        isinstance(rec.get(k), str) for k in ("prev", "hash")
    ):
        return bad("bad_record", "no integer seq, or no prev or hash")
    chain = rec.get("chain")
    if rec.get(MARKER) != MARKER_VALUE or not isinstance(chain, str) or not _CHAIN_ID.match(chain):
        return bad("bad_record", "a marker line without a valid chain id")
    if canonical_json(rec) != line.text:
        # The line is not the record's one encoding: re-encoded, or something around it.
        return bad("not_canonical", f"chain {chain}: the line is not the record's canonical JSON")
    return rec, None


def _link(chains: dict[str, _Chain]) -> None:
    """Check each header's ``previous`` against the chain it names (module docstring)."""
    for c in chains.values():
        previous = (c.header or {}).get("previous")
        if c.header is None:
            continue
        if not isinstance(previous, dict):
            c.notes.append("a new chain: its writer knew of no chain before it")
            continue
        name, seq, digest = previous.get("chain"), previous.get("seq"), previous.get("hash")
        if not isinstance(name, str) or not isinstance(seq, int) or not isinstance(digest, str):
            c.notes.append(
                f"its header names a previous chain it cannot read: {json.dumps(previous)}"
            )
            continue
        p = chains.get(name)
        if p is None:
            src, line = c.header_at
            why = (
                f"a restart: its header says it follows chain {name} (up to seq {seq}), "
                "which is not in this log (the previous container's log, or rotated away: "
                "`kubectl logs --previous`, the node's CRI files)"
            )
            c.window(Problem(c.chain, src, line, 0, "missing_previous", why))
            continue
        if p.successor is not None:
            c.notes.append(f"chain {p.successor} also follows {name} (a restart before it wrote?)")
        else:
            p.successor = c.chain
        last = None if p.next_seq is None else p.next_seq - 1
        if p.problem is not None:
            c.notes.append(f"a restart: follows chain {name}, whose own problem stops the check")
        elif last is None or seq > last:
            have = "no record" if last is None else f"records only up to seq {last}"
            why = (
                f"its successor {c.chain} (a restart) says it wrote up to seq {seq}; the log "
                f"has {have}: the records after are missing (cut, or lost by the pipeline)"
            )
            src, line = p.last
            p.problem = Problem(name, src, line, seq, "missing_tail", why)
        elif seq in p.recent and p.recent[seq] != digest:
            src, line = c.header_at
            why = (
                f"its header (a restart) names seq {seq} of chain {name} with hash {digest}; "
                f"the log has {p.recent[seq]} there"
            )
            c.problem = c.problem or Problem(c.chain, src, line, 0, "link_mismatch", why)
        else:
            checked = "" if seq in p.recent else " (too far back to compare its hash)"
            c.notes.append(f"a restart: follows chain {name}, which reaches seq {seq}{checked}")
            if last > seq:
                p.notes.append(
                    f"{last - seq} record(s) after seq {seq}, the last its successor knew of "
                    "(written just before its process ended)"
                )
    for c in chains.values():
        if not c.ended and c.successor is None and c.problem is None:
            c.notes.append(
                "no end record and no successor in this log: still running, killed, or the "
                "log ends before its end"
            )
