"""The audit writer, `verify`, `query` and `mandate audit` on real files in tmp_path: rotation,
tampering (each case names the first bad record), resuming, disk-full in both failure modes,
a full queue and the fsync policies. Faults are injected through `sidecar.audit.writer._write_fd` and
`_fsync_fd` (tests run as root, so permission bits would not stop a write)."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import (
    AuditWriter,
    canonical_json,
    chainwriter,
    link,
    query,
    record_from_decision,
    verify,
)
from sidecar.audit import writer as audit
from sidecar.audit.cli import add_audit_parser, run_audit
from sidecar.core import Code, Decision
from sidecar.core.timefmt import utc_millis
from sidecar.errors import AuditBusyError, AuditInputError, AuditResumeError, ConfigError

NOW = 1_700_000_000.0
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"

Make = Callable[..., AuditWriter]


def dec(i: int, *, agent: str = "billing-agent", allowed: bool = True, trace: str = "") -> Decision:
    return Decision(
        f"d{i:04d}", allowed, Code.ALLOWED if allowed else Code.OUTSIDE_PURPOSE, "because",
        agent, "finance", "billing", "", "r1" if allowed else "", "sidecar-config", "GET",
        "api.example.com", 443, f"/v1/items/{i}", (), trace,
    )  # fmt: skip


def rec(i: int, *, agent: str = "billing-agent", allowed: bool = True, trace: str = "",
        now: float = NOW) -> dict[str, Any]:  # fmt: skip
    d = dec(i, agent=agent, allowed=allowed, trace=trace)
    return record_from_decision(d, pod="pod-1", namespace="agents", now=now + i)


def write_via(w: AuditWriter, via: str, i: int) -> bool:
    """Record ``rec(i)``: as a record (`write`) or as its decision (`write_decision`)."""
    if via == "write":
        return w.write(rec(i))
    return w.write_decision(dec(i), pod="pod-1", namespace="agents", now=NOW + i)


def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def chain_files(d: Path, chain: str = "w0") -> list[Path]:
    return sorted(d.glob(f"audit-{chain}-*.jsonl"))


def lines_of(p: Path) -> list[bytes]:
    return p.read_bytes().splitlines(keepends=True)


def seq_at(p: Path, line: int) -> int:
    seq: int = json.loads(lines_of(p)[line - 1])["seq"]
    return seq


def all_records(d: Path, chain: str = "w0") -> list[dict[str, Any]]:
    return [json.loads(x) for p in chain_files(d, chain) for x in lines_of(p)]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[AuditWriter] = []

    def _make(directory: Path | None = None, **kw: Any) -> AuditWriter:
        kw.setdefault("chain_id", "w0")
        kw.setdefault("fsync", "never")
        w = AuditWriter(directory or tmp_path / "audit", **kw)
        made.append(w)
        return w

    yield _make
    for w in made:
        assert w.close(timeout=5)


def build(make: Make, d: Path, n: int = 20, chain: str = "w0", **kw: Any) -> list[Path]:
    kw.setdefault("max_bytes", 2048)
    w = make(d, chain_id=chain, **kw)
    for i in range(n):
        assert w.write(rec(i))
    assert w.close(timeout=5)
    return chain_files(d, chain)


# -- writing and rotation -----------------------------------------------------------------------


def test_rotation_keeps_one_chain_that_verifies(make: Make, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    files = build(make, d, n=30)
    assert len(files) >= 5
    records = all_records(d)
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert sum(r["type"] == "decision" for r in records) == 30
    for index, p in enumerate(files):
        head = json.loads(lines_of(p)[0])
        assert head["type"] == "header" and head["file_index"] == index and head["chain"] == "w0"
        assert p.name == f"audit-w0-{index:06d}.jsonl"
        assert p.stat().st_size <= 2048 + 256  # the footer (about 230 bytes) may pass the limit
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
        if index < len(files) - 1:
            assert json.loads(lines_of(p)[-1])["type"] == "footer"
    for x in (ln for p in files for ln in lines_of(p)):  # canonical JSON, one per line
        assert canonical_json(json.loads(x)) + b"\n" == x
    result = verify(d)
    assert result.ok and result.problem is None
    (report,) = result.chains
    assert (report.chain, report.files, report.records) == ("w0", len(files), 30)
    assert report.last_seq == records[-1]["seq"] and report.last_hash == records[-1]["hash"]


def test_written_record_is_the_given_record_chained(make: Make, tmp_path: Path) -> None:
    w = make()
    given = rec(1, trace=TRACE)
    w.write(given)
    assert w.flush(2)
    header, stored = all_records(tmp_path / "audit")
    assert stored == link(given, seq=1, prev=header["hash"])
    assert w.stats().written == 1 and w.healthy and not w.must_deny()


def test_a_backlog_is_written_without_waiting_out_the_linger(
    make: Make, faults: Faults, via: str = "write_decision"
) -> None:
    """The writer lingers between batches only while less than a batch waits: a backlog of
    many batches is written at once. (Waiting after every batch capped the writer at one
    batch per linger, 5,120 records/s at 100 ms: at 9,000 calls/s the queue filled and
    fail-closed denied every call.)"""
    w = make(linger=30.0)
    faults.gate.clear()
    faults.entered.clear()
    write_via(w, via, 0)
    assert faults.entered.wait(2)  # the writer is in write(2) with record 0; it lingers next
    n = 4 * chainwriter._BATCH + 7
    for i in range(1, n + 1):
        assert write_via(w, via, i)
    faults.gate.set()
    assert wait_for(lambda: w.stats().written == n + 1, timeout=10)  # not 30 s per batch
    assert w.stats().backlog == 0


def test_a_decision_queued_as_such_is_written_as_its_record(make: Make, tmp_path: Path) -> None:
    """`write_decision` builds the record on the writer thread: the chain is byte for byte
    the one `write(record_from_decision(...))` makes."""
    files = {}
    for via in ("write", "write_decision"):
        d = tmp_path / via
        w = make(d, clock=lambda: NOW)
        for i in range(30):
            assert write_via(w, via, i)
        assert w.close(5)
        files[via] = [p.read_bytes() for p in chain_files(d)]
    assert files["write"] == files["write_decision"] and len(files["write"]) == 1
    assert len(files["write"][0].splitlines()) == 31  # the header and 30 decisions


# -- tampering: verify names the first bad record ------------------------------------------------

Expect = tuple[str, int, int, str]  # file name, line, seq, kind


def _rewrite(p: Path, lines: list[bytes]) -> None:
    p.write_bytes(b"".join(lines))


def t_edit(files: list[Path]) -> Expect:
    p = files[1]
    lines = lines_of(p)
    r = json.loads(lines[1])
    r["agent"] = "someone-else"
    lines[1] = canonical_json(r) + b"\n"
    _rewrite(p, lines)
    return p.name, 2, r["seq"], "hash_mismatch"


def t_edit_and_rehash(files: list[Path]) -> Expect:
    p = files[1]
    lines = lines_of(p)
    r = json.loads(lines[1])
    r["decision"] = "allow" if r["decision"] == "deny" else "deny"
    lines[1] = canonical_json(link(r, seq=r["seq"], prev=r["prev"])) + b"\n"
    _rewrite(p, lines)
    return p.name, 3, json.loads(lines[2])["seq"], "prev_mismatch"


def t_reencode(files: list[Path]) -> Expect:
    p = files[2]
    lines = lines_of(p)
    r = json.loads(lines[2])
    lines[2] = json.dumps(r).encode() + b"\n"  # same content, not canonical
    _rewrite(p, lines)
    return p.name, 3, r["seq"], "not_canonical"


def t_delete(files: list[Path]) -> Expect:
    p = files[1]
    lines = lines_of(p)
    gone = lines.pop(2)
    _rewrite(p, lines)
    return p.name, 3, json.loads(gone)["seq"] + 1, "seq_gap"


def t_delete_footer(files: list[Path]) -> Expect:
    p = files[1]
    lines = lines_of(p)
    lines.pop()
    _rewrite(p, lines)
    return files[2].name, 1, seq_at(files[2], 1), "seq_gap"


def t_swap(files: list[Path]) -> Expect:
    p = files[1]
    lines = lines_of(p)
    lines[1], lines[2] = lines[2], lines[1]
    _rewrite(p, lines)
    return p.name, 2, json.loads(lines[1])["seq"], "reordered"


def t_duplicate(files: list[Path]) -> Expect:
    p = files[1]
    lines = lines_of(p)
    lines.insert(2, lines[1])
    _rewrite(p, lines)
    return p.name, 3, json.loads(lines[1])["seq"], "reordered"


def t_truncate_last_line(files: list[Path]) -> Expect:
    p = files[-1]
    data = p.read_bytes()
    expected_seq = json.loads(data.splitlines()[-1])["seq"]
    p.write_bytes(data[:-10])
    return p.name, len(data.splitlines()), expected_seq, "torn_line"


def t_truncate_middle_file(files: list[Path]) -> Expect:
    p = files[2]
    data = p.read_bytes()
    p.write_bytes(data[:-7])
    return p.name, len(data.splitlines()), json.loads(data.splitlines()[-1])["seq"], "torn_line"


def t_delete_middle_file(files: list[Path]) -> Expect:
    files[2].unlink()
    return files[3].name, 1, seq_at(files[3], 1), "missing_file"


def t_delete_first_file(files: list[Path]) -> Expect:
    files[0].unlink()
    return files[1].name, 1, seq_at(files[1], 1), "missing_file"


def t_delete_tail_file(files: list[Path]) -> Expect:
    files[-1].unlink()
    last = lines_of(files[-2])
    return files[-2].name, len(last), json.loads(last[-1])["seq"], "missing_tail_file"


def t_empty_file(files: list[Path]) -> Expect:
    files[1].write_bytes(b"")
    return files[1].name, 1, seq_at(files[0], len(lines_of(files[0]))) + 1, "empty_file"


def t_rename_file(files: list[Path]) -> Expect:
    # Files 3 and 4 swap names: the chain breaks at the first line of the new "file 3".
    a, b = files[3], files[4]
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    return a.name, 1, seq_at(a, 1), "seq_gap"


TAMPERS = [
    t_edit, t_edit_and_rehash, t_reencode, t_delete, t_delete_footer, t_swap, t_duplicate,
    t_truncate_last_line, t_truncate_middle_file, t_delete_middle_file, t_delete_first_file,
    t_delete_tail_file, t_empty_file, t_rename_file,
]  # fmt: skip


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda f: f.__name__[2:])
def test_verify_names_the_first_bad_record(
    tamper: Callable[[list[Path]], Expect], make: Make, tmp_path: Path
) -> None:
    d = tmp_path / "audit"
    files = build(make, d, n=24)
    assert len(files) >= 6
    assert verify(d).ok
    file, line, seq, kind = tamper(files)
    result = verify(d)
    assert not result.ok
    p = result.problem
    assert p is not None
    assert (p.chain, p.file, p.line, p.seq, p.kind) == ("w0", file, line, seq, kind), str(p)
    assert f"{file} line {line} (seq {seq})" in str(p)


def test_chains_are_verified_independently(make: Make, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    build(make, d, n=10, chain="w0")
    w1 = build(make, d, n=10, chain="w1")
    assert [c.chain for c in verify(d).chains] == ["w0", "w1"]
    assert verify(d).ok
    t_edit(w1)
    result = verify(d)
    assert [c.ok for c in result.chains] == [True, False]
    assert result.problem is not None and result.problem.chain == "w1"
    assert verify(d, "w0").ok
    with pytest.raises(AuditInputError):
        verify(d, "w9")


def test_a_chain_cannot_pass_for_another(make: Make, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    for f in build(make, d, n=3, chain="w0"):
        f.rename(f.with_name(f.name.replace("-w0-", "-w7-")))
    p = verify(d).problem
    assert p is not None and (p.chain, p.line, p.kind) == ("w7", 1, "prev_mismatch")


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_verify_bad_input(tmp_path: Path, what: str) -> None:
    target = tmp_path / "x"
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("hi")
    with pytest.raises(AuditInputError):
        verify(target)


# -- resuming ------------------------------------------------------------------------------------


def test_restart_continues_the_chain(make: Make, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    build(make, d, n=7)
    before = all_records(d)
    w = make(d, max_bytes=2048)
    for i in range(7, 14):
        w.write(rec(i))
    assert w.close(5)
    after = all_records(d)
    assert after[: len(before)] == before
    assert [r["seq"] for r in after] == list(range(len(after)))
    assert sum(r["type"] == "decision" for r in after) == 14
    assert sum(r["type"] == "header" for r in after) == len(chain_files(d))
    assert verify(d).ok


def test_restart_after_a_crash_cuts_the_torn_line_and_records_it(
    make: Make, tmp_path: Path
) -> None:
    d = tmp_path / "audit"
    files = build(make, d, n=5)
    torn = b'{"agent":"billing-agent","code":"allo'
    with files[-1].open("ab") as f:
        f.write(torn)
    assert verify(d).problem.kind == "torn_line"  # type: ignore[union-attr]
    w = make(d, max_bytes=2048)
    w.write(rec(5))
    assert w.close(5)
    result = verify(d)
    assert result.ok
    (report,) = result.chains
    assert report.records == 6
    assert any(f"recovered a torn line of {len(torn)} bytes" in n for n in report.notes)
    recovered = [r for r in all_records(d) if r["type"] == "recovered"]
    assert len(recovered) == 1
    assert recovered[0]["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert recovered[0]["torn_text"] == torn.decode()
    assert recovered[0]["file"] == files[-1].name
    assert torn not in files[-1].read_bytes().split(b"\n")


@pytest.mark.parametrize("content", [b"", b'{"type":"head'])
def test_restart_reuses_a_file_that_crashed_before_its_header(
    make: Make, tmp_path: Path, content: bytes
) -> None:
    d = tmp_path / "audit"
    files = build(make, d, n=5)
    # a crash right after creating the next file, before (or while) writing its header
    last = files[-1]
    with last.open("ab") as f:  # close the file the way rotation would: with a footer
        r = json.loads(lines_of(last)[-1])
        footer = {"type": "footer", "next_file_index": len(files) - 1 + 1, "time": utc_millis(NOW)}
        f.write(canonical_json(link(footer, seq=r["seq"] + 1, prev=r["hash"])) + b"\n")
    (d / f"audit-w0-{len(files):06d}.jsonl").write_bytes(content)
    w = make(d, max_bytes=2048)
    w.write(rec(5))
    assert w.close(5)
    result = verify(d)
    assert result.ok, result.problem
    assert len(chain_files(d)) == len(files) + 1
    assert bool(result.chains[0].notes) == bool(content)


def test_restart_refuses_an_edited_last_record(make: Make, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    files = build(make, d, n=5)
    lines = lines_of(files[-1])
    lines[-1] = lines[-1].replace(b"billing-agent", b"billing-agenT")
    _rewrite(files[-1], lines)
    with pytest.raises(AuditResumeError, match=r"line \d+: the record is damaged"):
        make(d)
    # the refused writer released its lock: once the file is moved aside, a new chain starts
    for p in files:
        p.rename(p.with_suffix(".bad"))
    w = make(d)
    assert w.flush(2) and w.healthy


def test_one_writer_per_chain(make: Make, tmp_path: Path) -> None:
    make()
    with pytest.raises(AuditBusyError):
        make()
    make(chain_id="w1")  # another chain in the same directory is fine


@pytest.mark.parametrize(
    "kw",
    [
        {"chain_id": "../x"},
        {"chain_id": ""},
        {"fsync": "sometimes"},
        {"on_failure": "ignore"},
        {"max_bytes": 10},
        {"queue_max": 0},
    ],
)
def test_bad_configuration(make: Make, kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        make(**kw)


# -- failures: disk full, a full queue, fsync ---------------------------------------------------


class Faults:
    """Stands in for os.write / os.fsync: ENOSPC while `full`; one short write if `short`;
    blocks (bounded) while `gate` is clear."""

    def __init__(self) -> None:
        self.full = False
        self.short = False
        self.fsync_error = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.file_fsyncs = 0

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self.entered.set()
        assert self.gate.wait(5)
        if self.short:
            self.short = False
            return os.write(fd, bytes(data[: len(data) // 2]))
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            self.file_fsyncs += 1
            if self.fsync_error:
                raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    f = Faults()
    monkeypatch.setattr(audit, "_write_fd", f.write)
    monkeypatch.setattr(audit, "_fsync_fd", f.fsync)
    return f


def losses(d: Path) -> list[dict[str, Any]]:
    return [r for r in all_records(d) if r["type"] == "loss"]


def test_disk_full_fail_closed_denies_until_a_write_succeeds(
    make: Make, faults: Faults, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "audit"
    w = make(d, retry_interval=60)  # no background retry: recovery comes with the next record
    w.write(rec(0))
    assert w.flush(2) and w.healthy and not w.must_deny()
    faults.full = True
    for i in (1, 2, 3):
        w.write(rec(i))
    assert w.flush(2)
    assert not w.healthy and w.must_deny()
    s = w.stats()
    assert (s.written, s.failed, s.dropped) == (1, 3, 0)
    assert s.errors >= 1  # a batch of records goes out in one write(2): one error or more
    assert "ENOSPC" in caplog.text
    faults.full = False
    w.write(rec(4))
    assert w.flush(2)
    assert w.healthy and not w.must_deny()
    assert (w.stats().written, w.stats().failed) == (2, 3)
    assert w.close(5)
    assert verify(d).ok
    (loss,) = losses(d)
    assert (loss["failed"], loss["dropped"]) == (3, 0)
    assert loss["decision_ids"] == ["d0001", "d0002", "d0003"]
    assert loss["error"].startswith("ENOSPC")
    kinds = [r.get("decision_id") or r["type"] for r in all_records(d)]
    assert kinds == ["header", "d0000", "loss", "d0004"]  # the loss is chained before d0004
    assert verify(d).chains[0].lost == 3


def test_disk_full_recovers_without_traffic(make: Make, faults: Faults, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    w = make(d, retry_interval=0.02)
    faults.full = True
    w.write(rec(0))
    assert w.flush(2)
    assert w.must_deny()
    time.sleep(0.1)  # retries keep failing while the disk is full
    assert w.must_deny() and w.stats().errors >= 2
    faults.full = False
    assert wait_for(lambda: w.healthy)
    assert not w.must_deny()
    assert w.close(5)
    assert verify(d).ok
    assert [x["failed"] for x in losses(d)] == [1]


def test_a_short_write_leaves_no_torn_line(make: Make, faults: Faults, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    w = make(d, retry_interval=60)
    faults.full = faults.short = True
    w.write(rec(0))
    assert w.flush(2)
    assert w.stats().failed == 1 and not w.healthy
    faults.full = False
    w.write(rec(1))
    assert w.close(5)
    assert verify(d).ok
    assert [r.get("decision_id") or r["type"] for r in all_records(d)] == [
        "header", "loss", "d0001",
    ]  # fmt: skip


def test_a_batch_fails_as_a_whole_and_leaves_no_torn_line(
    make: Make, faults: Faults, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records of one drained batch go out in one write(2): a short write of that batch
    followed by ENOSPC fails every record in it, cuts the partial bytes back and rewinds the
    chain, so the next record follows the last written one and `verify` passes."""
    d = tmp_path / "audit"
    w = make(d, retry_interval=60)
    w.write(rec(0))
    assert w.flush(2)
    sizes: list[int] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        sizes.append(len(data))
        if bytes(data).count(b"\n") > 1 and len(sizes) == 1:
            return os.write(fd, bytes(data[: len(data) // 2]))  # short: half the batch
        if len(sizes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    faults.entered.clear()
    faults.gate.clear()  # hold the writer so that records 1-5 are drained as one batch
    w.write(rec(99))  # ... behind this one, which the writer takes first
    assert faults.entered.wait(2)
    for i in range(1, 6):
        w.write(rec(i))
    monkeypatch.setattr(audit, "_write_fd", write)
    faults.gate.set()
    assert w.flush(2)
    assert sizes[0] > 4 * sizes[-1] and w.stats().failed == 5  # one write(2) for 5 records
    w.write(rec(6))
    assert w.close(5)
    assert verify(d).ok
    (loss,) = losses(d)
    assert loss["decision_ids"] == [f"d{i:04d}" for i in range(1, 6)]
    kinds = [r.get("decision_id") or r["type"] for r in all_records(d)]
    assert kinds == ["header", "d0000", "d0099", "loss", "d0006"]


def test_disk_full_continue_counts_but_never_denies(
    make: Make, faults: Faults, tmp_path: Path
) -> None:
    d = tmp_path / "audit"
    w = make(d, on_failure="continue", retry_interval=60)
    faults.full = True
    for i in range(3):
        w.write(rec(i))
    assert w.flush(2)
    assert not w.healthy and not w.must_deny()
    assert w.stats().failed == 3
    faults.full = False
    w.write(rec(3))
    assert w.flush(2) and w.healthy
    assert w.close(5)
    assert verify(d).ok and [x["failed"] for x in losses(d)] == [3]


def test_unwritable_directory_at_start_fails_closed(
    make: Make, faults: Faults, tmp_path: Path
) -> None:
    faults.full = True  # the header cannot be written
    w = make(retry_interval=0.02)
    assert not w.healthy and w.must_deny()
    faults.full = False
    assert wait_for(lambda: w.healthy)
    assert w.close(5)
    assert verify(tmp_path / "audit").ok


@pytest.mark.parametrize("via", ["write", "write_decision"])
@pytest.mark.parametrize("mode", ["fail-closed", "continue"])
def test_full_queue(make: Make, faults: Faults, tmp_path: Path, mode: str, via: str) -> None:
    d = tmp_path / "audit"
    w = make(d, on_failure=mode, queue_max=3)
    faults.gate.clear()
    faults.entered.clear()
    write_via(w, via, 0)
    assert faults.entered.wait(2)  # the writer thread is stuck in write(2) with record 0
    accepted = [write_via(w, via, i) for i in range(1, 8)]
    assert accepted == [True] * 3 + [False] * 4
    s = w.stats()
    assert (s.dropped, s.backlog) == (4, 3)
    assert w.must_deny() is (mode == "fail-closed")
    faults.gate.set()
    assert w.flush(2)
    assert not w.must_deny()
    assert w.close(5)
    assert verify(d).ok
    (loss,) = losses(d)
    assert (loss["failed"], loss["dropped"]) == (0, 4)
    assert loss["decision_ids"] == ["d0004", "d0005", "d0006", "d0007"]
    assert sum(r["type"] == "decision" for r in all_records(d)) == 4


@pytest.mark.parametrize("via", ["write", "write_decision"])
def test_write_after_close_is_counted_and_denied(make: Make, via: str) -> None:
    w = make()
    assert w.close(5)
    assert not write_via(w, via, 0)
    assert w.stats().dropped == 1 and w.must_deny()
    assert not w.flush(1)


def test_fsync_failure_is_reported_in_the_chain(make: Make, faults: Faults, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    w = make(d, fsync="always", retry_interval=60)
    faults.fsync_error = True
    w.write(rec(0))
    assert wait_for(lambda: not w.healthy)
    assert w.must_deny()
    faults.fsync_error = False
    w.write(rec(1))
    assert w.flush(2) and w.healthy
    assert w.close(5)
    assert verify(d).ok
    (loss,) = losses(d)
    assert loss["unsynced"] >= 1 and loss["error"].startswith("EIO")


@pytest.mark.parametrize(
    ("mode", "interval", "synced"),
    [
        ("always", 1.0, True),
        ("interval", 0.02, True),
        ("interval", 60.0, False),
        ("never", 1.0, False),
    ],
)
def test_fsync_policy(make: Make, faults: Faults, mode: str, interval: float, synced: bool) -> None:
    w = make(fsync=mode, fsync_interval=interval)
    for i in range(5):
        w.write(rec(i))
    assert wait_for(lambda: w.stats().written == 5)
    assert wait_for(lambda: faults.file_fsyncs > 0, timeout=0.3) is synced
    assert w.close(5)
    assert faults.file_fsyncs >= 1  # close always fsyncs


# -- query ---------------------------------------------------------------------------------------


@pytest.fixture
def trail(make: Make, tmp_path: Path) -> Path:
    d = tmp_path / "audit"
    w0 = make(d, chain_id="w0", max_bytes=2048)
    w1 = make(d, chain_id="w1", max_bytes=2048)
    for i in range(20):
        w = w0 if i % 2 else w1
        w.write(rec(i, agent="billing-agent" if i % 3 else "research-agent",
                    allowed=i % 4 != 0, trace=TRACE if i == 7 else ""))  # fmt: skip
    assert w0.close(5) and w1.close(5)
    return d


def ids(records: Iterator[dict[str, Any]]) -> list[int]:
    return [int(r["decision_id"][1:]) for r in records]


def test_query_merges_chains_by_time(trail: Path) -> None:
    assert ids(query(trail)) == list(range(20))


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"agent": "research-agent"}, [0, 3, 6, 9, 12, 15, 18]),
        ({"decision": "deny"}, [0, 4, 8, 12, 16]),
        ({"agent": "billing-agent", "decision": "deny"}, [4, 8, 16]),
        ({"trace_id": TRACE.upper()}, [7]),
        ({"since": datetime.fromtimestamp(NOW + 17, UTC)}, [17, 18, 19]),
        ({"until": datetime.fromtimestamp(NOW + 2, UTC)}, [0, 1]),
        ({"since": datetime.fromtimestamp(NOW + 5, UTC).replace(tzinfo=None),
          "until": datetime.fromtimestamp(NOW + 7.5, UTC)}, [5, 6, 7]),
        ({"agent": "nobody"}, []),
    ],
)  # fmt: skip
def test_query_filters(trail: Path, kw: dict[str, Any], expected: list[int]) -> None:
    assert ids(query(trail, **kw)) == expected


def test_query_bad_input(tmp_path: Path) -> None:
    with pytest.raises(AuditInputError):
        list(query(tmp_path / "nope"))


# -- the command line ----------------------------------------------------------------------------


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mandate")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    code = run_audit(parser.parse_args(["audit", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_verify(make: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "audit"
    files = build(make, d, n=12)
    code, out, _ = cli(["verify", str(d)], capsys)
    assert code == 0 and out.startswith("ok: chain w0:")
    code, out, _ = cli(["verify", str(d), "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"] is True
    name, line, seq, _ = t_delete(files)
    code, out, err = cli(["verify", str(d)], capsys)
    assert code == 1
    assert f"{name} line {line} (seq {seq}): seq_gap" in out
    assert f"first bad record: {name} line {line}" in err
    code, out, _ = cli(["verify", str(d), "--json"], capsys)
    problem = json.loads(out)["problem"]
    assert code == 1
    assert (problem["file"], problem["line"], problem["seq"], problem["kind"]) == (
        name, line, seq, "seq_gap",
    )  # fmt: skip


@pytest.mark.parametrize("argv", [["verify", "{d}/nope"], ["verify", "{d}"], ["query", "{d}/nope"]])
def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = cli([a.format(d=tmp_path) for a in argv], capsys)
    assert code == 2 and json.loads(out)["error"] == "bad_input"


def test_cli_query(make: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "audit"
    w = make(d)
    now = time.time()
    w.write(rec(0, now=now - 3600))  # an hour ago
    w.write(rec(1, now=now - 120, allowed=False))
    w.write(rec(2, now=now - 60, trace=TRACE))
    assert w.close(5)
    code, out, _ = cli(["query", str(d), "--since", "15m"], capsys)
    assert code == 0
    assert [json.loads(x)["decision_id"] for x in out.splitlines()] == ["d0001", "d0002"]
    code, out, _ = cli(["query", str(d), "--decision", "deny"], capsys)
    assert [json.loads(x)["decision_id"] for x in out.splitlines()] == ["d0001"]
    code, out, _ = cli(["query", str(d), "--trace-id", TRACE, "--agent", "billing-agent"], capsys)
    assert [json.loads(x)["decision_id"] for x in out.splitlines()] == ["d0002"]
    until = utc_millis(now - 90)
    code, out, _ = cli(["query", str(d), "--until", until], capsys)
    assert [json.loads(x)["decision_id"] for x in out.splitlines()] == ["d0000", "d0001"]
    code, out, _ = cli(["query", str(d), "--since", "yesterday"], capsys)
    assert code == 2


def test_strings_no_utf8_can_carry_are_written_and_verify(
    make: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lone surrogate (an agent can make one up: a JSON `\\udcff` escape in a header or
    a body) goes into the record as its JSON escape instead of failing the record: the
    attempt stays on the trail, the chain verifies, and query prints it."""
    d = tmp_path / "audit"
    w = make(d)
    odd = Decision(
        "d-odd", False, Code.OUTSIDE_PURPOSE, "no \udcff", agent="a\ud83d", path="/x\udcff",
        mcp_tools=("tool\udcff", "\\udcff"), task="t\udcff",
    )  # fmt: skip
    assert w.write_decision(odd, pod="p", namespace="n", now=NOW)
    assert w.write(rec(1, agent="b\udcff"))
    assert w.flush(2)
    s = w.stats()
    assert (s.written, s.failed) == (2, 0) and w.healthy
    assert w.close(5)
    raw = chain_files(d)[0].read_bytes()
    raw.decode("utf-8")  # the file is UTF-8 throughout
    assert b'"tool\\udcff","\\\\udcff"' in raw  # the surrogate escaped; the text of one, not
    assert verify(d).ok
    got = {r["decision_id"]: r for r in query(d)}
    assert got["d-odd"]["mcp_tools"] == ["tool\udcff", "\\udcff"]
    assert got["d-odd"]["agent"] == "a\ud83d" and got["d0001"]["agent"] == "b\udcff"
    code, out, _ = cli(["query", str(d), "--agent", "a\ud83d"], capsys)
    assert code == 0 and json.loads(out)["decision_id"] == "d-odd"


# -- issue 15, finding 5: the fail-closed window -------------------------------------------------


class Space:
    """Stands in for statvfs: the audit filesystem has `free` bytes free."""

    def __init__(self) -> None:
        self.free = 1 << 40

    def __call__(self, path: Path) -> int:
        return self.free


@pytest.fixture
def space(monkeypatch: pytest.MonkeyPatch) -> Space:
    s = Space()
    monkeypatch.setattr(audit, "_free_bytes", s)
    return s


def decision_ids(d: Path, chain: str = "w0") -> list[str]:
    return [r["decision_id"] for r in all_records(d, chain) if r["type"] == "decision"]


def test_under_the_reserve_it_fails_closed_before_the_disk_is_full(
    make: Make, space: Space, tmp_path: Path
) -> None:
    """Issue 15 (5): the writer used to deny only after a write had failed, so the calls of
    one linger were allowed with no record on disk. Now it denies once free space is under
    the reserve, and every record (the allows before, the denies after) is still written:
    nothing is lost, no `loss` record."""
    d = tmp_path / "audit"
    mib = 1 << 20
    w = make(d, reserve_bytes=mib, retry_interval=60)
    w.write(rec(0))
    assert w.flush(2) and not w.must_deny() and w.health()["state"] == "ok"
    space.free = mib - 1  # filling, not full
    w.write(rec(1))  # allowed before the writer looked: its record goes into the reserve
    assert w.flush(2)
    assert w.must_deny() and w.stats().low_space
    h = w.health()
    assert (h["state"], h["denying"], h["low_space"], h["writing"]) == (
        "failing", True, True, True,
    )  # fmt: skip
    for i in (2, 3):  # what the caller records while denying
        w.write(rec(i))
    assert w.flush(2) and w.must_deny()
    space.free = mib + 1  # over the reserve, not by a quarter: still failing (no flapping)
    w.write(rec(4))
    assert w.flush(2) and w.must_deny()
    space.free = 2 * mib
    w.write(rec(5))
    assert w.flush(2) and not w.must_deny() and w.health()["state"] == "ok"
    s = w.stats()
    assert (s.written, s.failed, s.dropped) == (6, 0, 0)
    assert w.close(5)
    assert verify(d).ok
    assert decision_ids(d) == [f"d{i:04d}" for i in range(6)]
    assert losses(d) == []


def test_a_writer_started_under_the_reserve_denies_at_once(
    make: Make, space: Space, tmp_path: Path
) -> None:
    space.free = 1000
    w = make(reserve_bytes=4096)
    assert w.must_deny() and w.health()["state"] == "failing"


def test_an_idle_writer_notices_the_disk_filling(make: Make, space: Space, tmp_path: Path) -> None:
    """Another process fills the filesystem while no call comes: the first call after it is
    already denied (the writer looks every `space_interval` when idle)."""
    w = make(reserve_bytes=4096, space_interval=0.02)
    assert not w.must_deny()
    space.free = 100
    assert wait_for(w.must_deny, timeout=2)


def test_reserve_zero_is_off(make: Make, space: Space) -> None:
    space.free = 0
    w = make(reserve_bytes=0)
    w.write(rec(0))
    assert w.flush(2) and not w.must_deny()


def test_one_failing_writer_makes_every_writer_of_the_directory_deny(
    make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15 (5): with two workers, the other worker allowed calls after the first one
    denied, until its own writer failed. The health board makes the other deny at its next
    Check, without writing anything itself; both allow again when the first recovers."""
    d = tmp_path / "audit"
    w0 = make(d, chain_id="w0", retry_interval=60)
    w1 = make(d, chain_id="w1", retry_interval=60)
    cont = make(d, chain_id="w2", on_failure="continue")
    real = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        if fd == w0._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(audit, "_write_fd", write)
    w0.write(rec(0))
    assert w0.flush(2) and w0.must_deny()
    assert w1.must_deny()  # w1 has written nothing since: it sees w0 on the board
    h = w1.health()
    assert (h["state"], h["denying"], h["writing"], h["other_writers_failing"]) == (
        "failing", True, True, 1,
    )  # fmt: skip
    assert not cont.must_deny()  # "continue" never denies
    monkeypatch.setattr(audit, "_write_fd", real)
    w0.write(rec(1))
    assert w0.flush(2)
    assert not w0.must_deny() and not w1.must_deny()
    assert w1.health()["state"] == "ok"


def test_a_dead_writers_flag_is_cleared(make: Make, tmp_path: Path) -> None:
    """A worker killed while its writer was failing leaves its byte set; its slot's lock went
    with its process, so a live writer clears the byte (no deny forever)."""
    d = tmp_path / "audit"
    w = make(d, chain_id="w0", space_interval=60)  # does not sweep during the test
    with (d / ".audit-health").open("r+b") as f:
        f.seek(100)
        f.write(b"\x01")
    assert w.must_deny()
    make(d, chain_id="w1", space_interval=0.02)  # sweeps
    assert wait_for(lambda: not w.must_deny())


def test_a_closed_writer_clears_its_flag(make: Make, faults: Faults, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    w0 = make(d, chain_id="w0", retry_interval=60)
    w1 = make(d, chain_id="w1", retry_interval=60)
    faults.full = True
    w0.write(rec(0))
    assert w0.flush(2) and w1.must_deny()
    faults.full = False
    assert w0.close(5)
    assert not w1.must_deny()


# -- issue 15, finding 9: a chain deleted whole --------------------------------------------------


def manifest_lines(d: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (d / "audit-manifest.jsonl").read_bytes().splitlines()]


def test_every_chain_is_listed_once_in_the_manifest(make: Make, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    build(make, d, n=3, chain="w0")
    build(make, d, n=3, chain="w0")  # a restart continues the chain: not listed again
    build(make, d, n=3, chain="w1")
    m = manifest_lines(d)
    assert [(x["type"], x.get("chain")) for x in m] == [
        ("manifest", None), ("chain", "w0"), ("chain", "w1"),
    ]  # fmt: skip
    assert [x["seq"] for x in m] == [0, 1, 2]
    assert verify(d).ok


def test_verify_names_a_chain_deleted_whole(
    make: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 15 (9): deleting every file of one worker's chain gave exit 0."""
    d = tmp_path / "audit"
    build(make, d, n=5, chain="w0")
    build(make, d, n=5, chain="w1")
    for f in chain_files(d, "w1"):
        f.unlink()
    result = verify(d)
    assert not result.ok
    assert [(p.chain, p.kind, p.line) for p in result.missing] == [("w1", "missing_chain", 3)]
    assert result.problem is not None and result.problem.kind == "missing_chain"
    assert not verify(d, "w1").ok
    code, out, err = cli(["verify", str(d)], capsys)
    assert code == 1
    assert "ok: chain w0" in out and "MISSING: chain w1" in out and "chain w1" in err
    code, out, _ = cli(["verify", str(d), "--json"], capsys)
    assert code == 1 and json.loads(out)["missing_chains"][0]["chain"] == "w1"


def test_verify_names_every_chain_when_all_are_deleted(
    make: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "audit"
    build(make, d, n=2, chain="w0")
    build(make, d, n=2, chain="w1")
    for f in chain_files(d, "*"):
        f.unlink()
    assert [p.chain for p in verify(d).missing] == ["w0", "w1"]
    code, out, _ = cli(["verify", str(d)], capsys)
    assert code == 1 and "MISSING: chain w0" in out and "MISSING: chain w1" in out


def test_verify_reports_a_deleted_manifest(
    make: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "audit"
    build(make, d, n=2, chain="w0")
    (d / "audit-manifest.jsonl").unlink()
    result = verify(d)
    assert result.manifest is not None and result.manifest.kind == "missing_manifest"
    assert not result.ok
    code, out, _ = cli(["verify", str(d)], capsys)
    assert code == 1 and "TAMPERED: manifest" in out and "missing_manifest" in out


def test_verify_reports_a_chain_the_manifest_does_not_list(make: Make, tmp_path: Path) -> None:
    """Files of a chain no writer of this directory started (planted, or copied in)."""
    d = tmp_path / "audit"
    build(make, d, n=2, chain="w0")
    for f in build(make, tmp_path / "elsewhere", n=2, chain="w5"):
        f.rename(d / f.name)
    result = verify(d)
    (w0, w5) = result.chains
    assert w0.ok and w5.problem is not None and w5.problem.kind == "unlisted_chain"
    assert not result.ok


@pytest.mark.parametrize("how", ["edit", "drop_entry", "torn"])
def test_verify_reports_a_tampered_manifest(make: Make, tmp_path: Path, how: str) -> None:
    d = tmp_path / "audit"
    build(make, d, n=2, chain="w0")
    build(make, d, n=2, chain="w1")
    build(make, d, n=2, chain="w2")
    path = d / "audit-manifest.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    if how == "edit":
        lines[2] = lines[2].replace(b'"w1"', b'"w9"')
    elif how == "drop_entry":  # hide w1 ...
        del lines[2]
    else:
        lines[-1] = lines[-1][:-5]
    path.write_bytes(b"".join(lines))
    if how == "drop_entry":  # ... and then delete it
        for f in chain_files(d, "w1"):
            f.unlink()
    m = verify(d).manifest
    assert m is not None and m.file == "audit-manifest.jsonl"
    assert m.kind == ("torn_line" if how == "torn" else "bad_manifest")
    assert m.line == (4 if how == "torn" else 3)
    assert not verify(d).ok


def test_a_writer_cuts_a_torn_manifest_line_before_listing(make: Make, tmp_path: Path) -> None:
    d = tmp_path / "audit"
    build(make, d, n=2, chain="w0")
    with (d / "audit-manifest.jsonl").open("ab") as f:
        f.write(b'{"chain":"w1","ha')  # a crash mid-append
    build(make, d, n=2, chain="w1")
    assert [x.get("chain") for x in manifest_lines(d)] == [None, "w0", "w1"]
    assert verify(d).ok
