"""Verifying a trail: every chain of a directory against its hashes and the manifest.

What verification proves. Any edited, removed, inserted or reordered record, a torn line, a
deleted first, middle or announced tail file breaks the chain at a point `verify` names.
Someone able to rewrite the whole chain from the edit onwards can recompute every hash, and
cutting whole records off the very end of the newest file leaves a shorter valid chain: ship
the chain heads (``seq``/``hash``) elsewhere (logs, metrics) to anchor them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sidecar.audit.files import _chain_files, _read
from sidecar.audit.record import (
    _FILE,
    _MANIFEST_GENESIS,
    MANIFEST,
    _is_int,
    canonical_json,
    genesis,
    record_hash,
)
from sidecar.errors import AuditInputError

__all__ = ["ChainReport", "Problem", "VerifyResult", "verify"]

# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True, slots=True)
class Problem:
    """The first bad record of a chain. ``line`` is 1-based; ``seq`` is what the bad line
    holds, or the seq expected there when the line is unreadable (torn, not JSON) or the
    file is missing; ``kind`` is a stable code: missing_file, empty_file, torn_line,
    bad_record, hash_mismatch, not_canonical, seq_gap, reordered, prev_mismatch,
    bad_header, missing_tail_file; for the directory as a whole (see `verify`):
    missing_chain (listed in the manifest, no file left), unlisted_chain (files of a chain
    the manifest does not list), missing_manifest, bad_manifest (the manifest's own chain
    is broken: its ``chain`` is ``MANIFEST``). In a log (`logverify`): also missing_tail
    (a restarted writer's header names a record its previous chain does not reach in the
    log) and link_mismatch (the record there differs); a marker line that is no record
    (torn_line, bad_record, not_canonical) or that another container wrote
    (foreign_container) has ``chain`` "" and ``seq`` -1; and, saying the log is a window
    rather than tampered with, missing_head (a chain's header is not in the log) and
    missing_previous (a restart's previous chain is not)."""

    chain: str
    file: str
    line: int
    seq: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line} (seq {self.seq}): {self.kind}: {self.message}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """One chain's verification. ``records`` counts decision records; ``notes`` are what
    a valid chain admits to (recovered torn lines, recorded losses)."""

    chain: str
    files: int
    records: int
    last_seq: int | None
    last_hash: str | None
    lost: int
    notes: tuple[str, ...]
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """``chains``: the chains that have files; ``missing``: one missing_chain problem per
    chain the manifest lists and no file is left of; ``manifest``: what is wrong with the
    manifest itself (missing_manifest, bad_manifest, or a torn_line in it)."""

    directory: str
    chains: tuple[ChainReport, ...]
    missing: tuple[Problem, ...] = ()
    manifest: Problem | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains) and not self.missing and self.manifest is None

    @property
    def problem(self) -> Problem | None:
        """The first problem: chains in order of their ids, then missing chains, then the
        manifest's own."""
        found = next((c.problem for c in self.chains if c.problem is not None), None)
        if found is None and self.missing:
            found = self.missing[0]
        return found or self.manifest

    def to_json(self) -> dict[str, Any]:
        def problem(p: Problem | None) -> dict[str, Any] | None:
            if p is None:
                return None
            return {
                "chain": p.chain, "file": p.file, "line": p.line, "seq": p.seq,
                "kind": p.kind, "message": p.message,
            }  # fmt: skip

        return {
            "ok": self.ok,
            "directory": self.directory,
            "problem": problem(self.problem),
            "missing_chains": [problem(p) for p in self.missing],
            "manifest": problem(self.manifest),
            "chains": [
                {
                    "chain": c.chain,
                    "ok": c.ok,
                    "files": c.files,
                    "records": c.records,
                    "last_seq": c.last_seq,
                    "last_hash": c.last_hash,
                    "lost": c.lost,
                    "notes": list(c.notes),
                    "problem": problem(c.problem),
                }
                for c in self.chains
            ],
        }


class _Bad(Exception):
    def __init__(self, kind: str, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.seq = kind, message, seq


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(raw)
    except ValueError:
        raise _Bad("bad_record", "not a JSON record") from None
    if not isinstance(rec, dict):
        raise _Bad("bad_record", "not a JSON object")
    seq = rec.get("seq")
    if not _is_int(seq) or not isinstance(rec.get("prev"), str):
        raise _Bad("bad_record", "no integer seq or no prev")
    if not isinstance(rec.get("hash"), str):
        raise _Bad("bad_record", "no hash", seq)
    return rec


def _verify_chain(chain: str, files: list[Path]) -> ChainReport:
    seq, prev = 0, genesis(chain)
    records = lost = 0
    notes: list[str] = []
    last_hash: str | None = None
    last: tuple[str, int, dict[str, Any]] | None = None  # file, line, record

    def report(problem: Problem | None) -> ChainReport:
        return ChainReport(
            chain, len(files), records, seq - 1 if seq else None, last_hash, lost,
            tuple(notes), problem,
        )  # fmt: skip

    for expect_index, path in enumerate(files):
        name = path.name
        m = _FILE.match(name)
        assert m is not None
        index = int(m["index"])
        if index != expect_index:
            missing = (
                f"file {expect_index}" if index == expect_index + 1
                else f"files {expect_index}-{index - 1}"
            )  # fmt: skip
            why = f"{missing} of chain {chain!r} missing (deleted): this file has index {index}"
            try:
                at = _parse(_read(path).split(b"\n", 1)[0])["seq"]
            except _Bad:
                at = seq
            return report(Problem(chain, name, 1, at, "missing_file", why))
        data = _read(path)
        if not data:
            return report(Problem(chain, name, 1, seq, "empty_file", "empty file: no header"))
        lines = data.split(b"\n")
        torn = lines.pop() != b""  # the text after the last newline
        if torn:
            lines.append(data[data.rfind(b"\n") + 1 :])
        footer_at = 0
        for lineno, raw in enumerate(lines, 1):
            try:
                if torn and lineno == len(lines):
                    raise _Bad(
                        "torn_line",
                        "torn last line (no newline): the file was truncated or a write "
                        "interrupted (a restarted writer recovers a crash's torn line)",
                    )
                rec = _parse(raw)
                rseq: int = rec["seq"]
                if record_hash(rec) != rec["hash"]:
                    raise _Bad("hash_mismatch", "record edited: hash does not match content", rseq)
                if canonical_json(rec) != raw:
                    raise _Bad("not_canonical", "record re-encoded: not canonical JSON", rseq)
                if rseq != seq:
                    raise _seq_problem(seq, rseq, lines, lineno)
                if rec["prev"] != prev:
                    raise _Bad(
                        "prev_mismatch",
                        "prev is not the hash of the record before it (that record was "
                        "edited and re-hashed, or records were removed or inserted)",
                        rseq,
                    )
                kind = rec.get("type")
                if lineno == 1:
                    if kind != "header" or rec.get("chain") != chain:
                        raise _Bad("bad_header", f"not a header of chain {chain!r}", rseq)
                    if rec.get("file_index") != index:
                        why = f"header says file_index {rec.get('file_index')}, name says {index}"
                        raise _Bad("bad_header", why, rseq)
                elif kind == "header":
                    raise _Bad("bad_header", "a header inside a file", rseq)
                if footer_at:
                    why = f"a record after the file's footer (line {footer_at})"
                    raise _Bad("bad_record", why, rseq)
                if kind == "footer":
                    footer_at = lineno
                    if rec.get("next_file_index") != index + 1:
                        raise _Bad("bad_record", "footer announces a wrong next file", rseq)
            except _Bad as bad:
                at = seq if bad.seq is None else bad.seq
                return report(Problem(chain, name, lineno, at, bad.kind, bad.message))
            seq, prev, last_hash = seq + 1, rec["hash"], rec["hash"]
            last = (name, lineno, rec)
            if kind == "decision":
                records += 1
            elif kind == "recovered":
                notes.append(
                    f"{name} line {lineno} (seq {rseq}): recovered a torn line of "
                    f"{rec.get('torn_bytes')} bytes cut from {rec.get('file')}"
                )
            elif kind == "loss":
                n = _int(rec.get("failed")) + _int(rec.get("dropped"))
                lost += n
                notes.append(
                    f"{name} line {lineno} (seq {rseq}): {rec.get('failed')} record(s) failed, "
                    f"{rec.get('dropped')} dropped, {rec.get('unsynced')} unsynced "
                    f"({rec.get('error')})"
                )
    if last is not None and last[2].get("type") == "footer":
        name, lineno, rec = last
        why = (
            f"the chain ends with a footer announcing file {rec.get('next_file_index')}, "
            "which is missing (deleted)"
        )
        return report(Problem(chain, name, lineno, rec["seq"], "missing_tail_file", why))
    return report(None)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _seq_problem(expected: int, found: int, lines: list[bytes], lineno: int) -> _Bad:
    for later, raw in enumerate(lines[lineno:], lineno + 1):
        try:
            if _parse(raw)["seq"] == expected:
                why = f"out of order: expected seq {expected} here; it is at line {later}"
                return _Bad("reordered", why, found)
        except _Bad:
            continue
    if found > expected:
        why = f"seq gap: expected {expected}, found {found}: {found - expected} record(s) removed"
        return _Bad("seq_gap", why, found)
    why = f"seq goes back: expected {expected}, found {found} (duplicated or reordered)"
    return _Bad("reordered", why, found)


def _read_manifest(directory: Path) -> tuple[dict[str, int] | None, Problem | None]:
    """The chains the manifest lists (chain id -> line), None without a manifest; and the
    manifest's first problem. Chains listed after a broken line are not read."""
    path = directory / MANIFEST
    if not path.exists():
        return None, None
    data = _read(path)
    listed: dict[str, int] = {}
    lines = data.split(b"\n")
    torn = lines.pop() != b""
    if torn:
        lines.append(data[data.rfind(b"\n") + 1 :])
    seq, prev = 0, _MANIFEST_GENESIS
    for lineno, raw in enumerate(lines, 1):
        try:
            if torn and lineno == len(lines):
                raise _Bad("torn_line", "torn last line (no newline): the manifest was truncated")
            rec = _parse(raw)
            if record_hash(rec) != rec["hash"]:
                raise _Bad("bad_manifest", "entry edited: hash does not match", rec["seq"])
            if canonical_json(rec) != raw:
                raise _Bad("bad_manifest", "entry re-encoded: not canonical JSON", rec["seq"])
            if rec["seq"] != seq or rec["prev"] != prev:
                why = "entries removed, inserted or reordered: seq or prev does not follow"
                raise _Bad("bad_manifest", why, rec["seq"])
            kind, chain = rec.get("type"), rec.get("chain")
            if (lineno == 1) != (kind == "manifest"):
                raise _Bad("bad_manifest", "the first entry (only) is the manifest's header", seq)
            if lineno > 1 and (kind != "chain" or not isinstance(chain, str)):
                raise _Bad("bad_manifest", "not a chain entry", seq)
        except _Bad as bad:
            at = seq if bad.seq is None else bad.seq
            kind_ = "torn_line" if bad.kind == "torn_line" else "bad_manifest"
            return listed, Problem(MANIFEST, MANIFEST, lineno, at, kind_, bad.message)
        if isinstance(chain, str):
            listed.setdefault(chain, lineno)
        seq, prev = seq + 1, rec["hash"]
    return listed, None


def _missing_why(chain: str, line: int) -> str:
    return (
        f"chain {chain!r} is listed in the manifest (line {line}) but no file of it is left "
        "(deleted)"
    )


def verify(directory: str | os.PathLike[str], chain_id: str | None = None) -> VerifyResult:
    """Verify every chain in ``directory`` (or only ``chain_id``), each on its own, against
    the directory's manifest (``audit-manifest.jsonl``: every writer lists its chain there
    before the chain's first file): a listed chain with no file left is a missing_chain, a
    chain with files that is not listed an unlisted_chain, no manifest beside chain files a
    missing_manifest.

    Raises :class:`~sidecar.errors.AuditInputError` for a missing directory, or neither
    audit files nor a manifest. A chain's report names its first bad record; later ones
    are not examined."""
    d = Path(directory)
    if not d.is_dir():
        raise AuditInputError(f"{d}: no such directory")
    listed, manifest = _read_manifest(d)
    found = _chain_files(d)
    if listed is None and not found:
        raise AuditInputError(f"{d}: no audit files (audit-<chain>-<index>.jsonl)")
    expected = dict(listed or {})
    if chain_id is not None:
        if chain_id not in found and chain_id not in expected:
            raise AuditInputError(f"{d}: no audit files of chain {chain_id!r}")
        found = {c: f for c, f in found.items() if c == chain_id}
        expected = {c: n for c, n in expected.items() if c == chain_id}
    reports = []
    for c, files in sorted(found.items()):
        report = _verify_chain(c, [p for _, p in files])
        if report.ok and listed is not None and manifest is None and c not in expected:
            why = (
                f"chain {c!r} is not listed in {MANIFEST} (every writer lists its chain "
                "before its first file): files planted, or the manifest rewritten"
            )
            first = files[0][1].name
            report = replace(report, problem=Problem(c, first, 1, 0, "unlisted_chain", why))
        reports.append(report)
    missing = tuple(
        Problem(c, MANIFEST, line, 0, "missing_chain", _missing_why(c, line))
        for c, line in sorted(expected.items())
        if c not in found
    )
    if listed is None:
        manifest = Problem(
            MANIFEST, MANIFEST, 0, 0, "missing_manifest",
            f"no {MANIFEST} beside the chains: deleted (so deleted chains cannot be named), "
            "or the trail was written before mandate kept a manifest",
        )  # fmt: skip
    return VerifyResult(str(directory), tuple(reports), missing, manifest)
