"""Issue 19 (2): the stdout audit sink (`StreamWriter`) on real pipes and files, its failure
semantics, several writers on one stream, a writer killed mid-line (a real process), both
sinks at once (`Tee`), and `mandate audit verify|query --log` on what it wrote.

Faults a real pipe cannot make on demand (a write that stops half-way, a stall) are
injected through `sidecar.audit.stream._write_fd`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import AuditWriter, StreamWriter, Tee, verify
from sidecar.audit import stream as stream_mod
from sidecar.audit.cli import add_audit_parser, run_audit
from sidecar.audit.keyfile import load_argument_key
from sidecar.audit.logs import LogLine
from sidecar.audit.logverify import LogVerifyResult, verify_lines, verify_log
from sidecar.audit.record import MARKER_PREFIX
from sidecar.check.pipeline import Audit
from sidecar.core import Code, Decision
from sidecar.core.recording import ArgumentRecording, CallArguments

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_000_000.0


def dec(i: int, *, path: str = "", allowed: bool = True, arguments: Any = None) -> Decision:
    return Decision(
        f"d{i:05d}", allowed, Code.ALLOWED if allowed else Code.OUTSIDE_PURPOSE, "because",
        "billing-agent", "finance", "billing", "", "r1" if allowed else "", "sidecar-config",
        "GET", "api.example.com", 443, path or f"/v1/items/{i}", (), "", arguments=arguments,
    )  # fmt: skip


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


class Reader:
    """Drains the read end of a pipe in a thread (``chunk`` bytes at a time, ``pause``
    seconds between reads: a slow log pipeline)."""

    def __init__(self, fd: int, chunk: int = 65536, pause: float = 0.0) -> None:
        self.fd, self.chunk, self.pause = fd, chunk, pause
        self.data = bytearray()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        _READERS.append(self)
        self.thread.start()

    def _run(self) -> None:
        # Stopped by the pipe fixture: once the test's pipe is closed its descriptor number
        # may be the next test's pipe, whose output this thread would otherwise steal.
        while not self.stopped:
            got = os.read(self.fd, self.chunk)
            if not got:
                return
            self.data += got
            if self.pause:
                time.sleep(self.pause)

    def lines(self) -> list[bytes]:
        return bytes(self.data).splitlines()

    def join(self) -> bytes:
        self.thread.join(10)
        assert not self.thread.is_alive()
        return bytes(self.data)


_READERS: list[Reader] = []


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    with contextlib.suppress(OSError):
        os.close(w)  # EOF for a reader still reading
    for reader in _READERS:
        reader.stopped = True
        reader.thread.join(5)
    _READERS.clear()
    with contextlib.suppress(OSError):
        os.close(r)


@pytest.fixture
def made() -> Iterator[list[StreamWriter]]:
    writers: list[StreamWriter] = []
    yield writers
    for w in writers:
        w.close(2)


def check(data: bytes) -> LogVerifyResult:
    return verify_lines([LogLine("stdout", i, x) for i, x in enumerate(data.splitlines(), 1)])


def test_records_on_a_pipe_verify_and_a_restart_names_the_chain_before(
    tmp_path: Path, pipe: tuple[int, int]
) -> None:
    r, w = pipe
    reader = Reader(r)
    first = StreamWriter(
        w, writer="w0", pod="pod-1", shared_directory=tmp_path, head_directory=tmp_path
    )
    for i in range(30):
        assert first.write_decision(
            dec(i, allowed=i % 4 != 0), pod="pod-1", namespace="ns", now=NOW + i
        )
    assert first.write({"type": "task_reported", "time": "t", "agent": "billing-agent"})
    assert first.close(5)
    second = StreamWriter(
        w, writer="w0", pod="pod-1", shared_directory=tmp_path, head_directory=tmp_path
    )
    assert second.previous is not None and second.previous["chain"] == first.chain_id
    assert second.write_decision(dec(99), pod="pod-1", namespace="ns", now=NOW)
    assert second.close(5)
    os.close(w)
    data = reader.join()
    assert all(line.startswith(MARKER_PREFIX) for line in data.splitlines())
    result = check(data)
    assert result.ok, result.to_json()
    a, b = result.chains
    assert (a.chain, a.records, a.ended, a.successor) == (first.chain_id, 30, True, b.chain)
    assert b.previous == {"chain": a.chain, "seq": a.last_seq, "hash": a.last_hash}
    assert b.writer == "w0" and b.pid == os.getpid()


def test_writers_of_one_stream_never_interleave_lines(
    tmp_path: Path, pipe: tuple[int, int], made: list[StreamWriter]
) -> None:
    """Three writers (a mandate's supervisor and workers share stdout), lines far longer
    than PIPE_BUF and batches longer than the pipe, a slow reader: every line whole."""
    r, w = pipe
    reader = Reader(r, chunk=4000, pause=0.0005)
    writers = [
        StreamWriter(w, writer=f"w{k}", pod="pod-1", shared_directory=tmp_path) for k in range(3)
    ]
    made.extend(writers)
    long = "/v1/" + "z" * 20_000

    def burst(k: int) -> None:
        for i in range(40):
            writers[k].write_decision(dec(i, path=long + str(k)), pod="p", namespace="n", now=NOW)

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for writer in writers:
        assert writer.close(20)
    os.close(w)
    result = check(reader.join())
    assert result.ok, result.to_json()
    assert sorted(c.records for c in result.chains) == [40, 40, 40]
    assert not result.problems


def test_a_closed_pipe_fails_closed(
    tmp_path: Path, pipe: tuple[int, int], made: list[StreamWriter]
) -> None:
    """Nobody reads stdout any more (EPIPE): fail-closed denies at once and readiness says
    failing; with continue, calls go on and the failures are counted."""
    r, w = pipe
    os.close(r)
    closed = StreamWriter(w, writer="w0", shared_directory=tmp_path)
    made.append(closed)
    assert not closed.healthy and closed.must_deny()
    health = closed.health()
    assert (health["state"], health["sink"], health["denying"]) == ("failing", "stdout", True)
    assert closed.write_decision(dec(1), pod="p", namespace="n", now=NOW)
    assert wait_for(lambda: closed.stats().failed == 1)
    going_on = StreamWriter(w, writer="w1", on_failure="continue")
    made.append(going_on)
    assert not going_on.healthy and not going_on.must_deny()
    assert going_on.health()["state"] == "failing"


class Faults:
    """Stands in for os.write: EPIPE while ``broken``; the next write stops a little past
    half-way (then EPIPE) if ``half``; blocks while ``gate`` is clear."""

    def __init__(self) -> None:
        self.broken = False
        self.half = False
        self.gate = threading.Event()
        self.gate.set()

    def write(self, fd: int, data: bytes | memoryview) -> int:
        assert self.gate.wait(10)
        if self.half:  # half, and a bit into the next line
            self.half = False
            self.broken = True
            return os.write(fd, bytes(data[: len(data) // 2 + 40]))
        if self.broken:
            raise OSError(errno.EPIPE, "Broken pipe")
        return os.write(fd, data)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    f = Faults()
    monkeypatch.setattr(stream_mod, "_write_fd", f.write)
    return f


def test_a_failure_is_recorded_in_the_chain_once_writable_again(
    pipe: tuple[int, int], faults: Faults, made: list[StreamWriter]
) -> None:
    r, w = pipe
    reader = Reader(r)
    writer = StreamWriter(w, writer="w0", retry_interval=0.05)
    made.append(writer)
    assert writer.write_decision(dec(0), pod="p", namespace="n", now=NOW) and writer.flush()
    faults.broken = True
    for i in range(1, 4):
        writer.write_decision(dec(i), pod="p", namespace="n", now=NOW)
    assert wait_for(writer.must_deny)
    assert writer.health()["state"] == "failing"
    faults.broken = False
    assert wait_for(lambda: writer.healthy and not writer.must_deny())
    writer.write_decision(dec(4), pod="p", namespace="n", now=NOW)
    assert writer.close(5)
    os.close(w)
    result = check(reader.join())
    assert result.ok, result.to_json()
    (chain,) = result.chains
    assert (chain.records, chain.lost) == (2, 3)
    loss = [json.loads(x) for x in reader.lines() if b'"type":"loss"' in x]
    assert loss[0]["decision_ids"] == ["d00001", "d00002", "d00003"]


def test_a_write_that_stops_half_way_leaves_a_line_the_next_write_ends(
    pipe: tuple[int, int], faults: Faults, made: list[StreamWriter]
) -> None:
    """The lines that went out whole stay in the chain; the torn one and the rest are
    failed (a `loss` record); the next write ends the torn line first and says so (a
    `recovered` record), and the trail verifies with a note."""
    r, w = pipe
    reader = Reader(r)
    writer = StreamWriter(w, writer="w0", retry_interval=0.05, linger=0.5)
    made.append(writer)
    assert writer.flush()  # the header is out
    faults.half = True
    for i in range(6):
        writer.write_decision(dec(i), pod="p", namespace="n", now=NOW)
    assert wait_for(lambda: writer.stats().failed > 0)
    faults.broken = False
    assert wait_for(lambda: writer.healthy)
    assert writer.close(5)
    os.close(w)
    data = reader.join()
    result = check(data)
    assert result.ok, result.to_json()
    (chain,) = result.chains
    assert chain.records + chain.lost == 6 and chain.records == 3, chain
    assert any("a torn line, ended by" in n for n in result.notes), result.notes
    assert b'"type":"recovered"' in data


CHILD = """
import os, sys, time
from pathlib import Path
from sidecar.audit import StreamWriter
from sidecar.core import Code, Decision
w = StreamWriter(int(sys.argv[1]), writer="w0", shared_directory=Path(sys.argv[2]), linger=1)
assert w.flush()
for i in range(40):  # one batch, one write(2), far longer than the pipe holds
    path = "/" + "x" * (9_000 + i)
    d = Decision(f"d-big{i}", True, Code.ALLOWED, "because", "billing-agent", path=path)
    w.write_decision(d, pod="p", namespace="n", now=1.0)
w.flush(30)
"""


def test_a_writer_killed_mid_line_is_repaired_by_the_next(
    tmp_path: Path, pipe: tuple[int, int]
) -> None:
    """A worker SIGKILLed while its write waits for the pipe (the log pipeline is slow):
    the stream is left mid-line. The next writer of the stream ends that line before its
    own records, and its `recovered` record names the writer that tore it."""
    r, w = pipe
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(w), str(tmp_path)], pass_fds=(w,), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        lock = tmp_path / ".audit-stdout.lock"
        # Mid-write: the flag is set and the pipe is full (nobody reads yet).
        assert wait_for(lambda: lock.exists() and lock.read_bytes()[:1] == b"\x01", 20)
        time.sleep(0.3)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(10)
    reader = Reader(r)
    writer = StreamWriter(w, writer="w1", shared_directory=tmp_path)
    writer.write_decision(dec(1), pod="p", namespace="n", now=NOW)
    assert writer.close(5)
    os.close(w)
    data = reader.join()
    result = check(data)
    assert result.ok, result.to_json()
    dead, alive = result.chains
    assert dead.records < 40 and not dead.ended
    assert alive.records == 1 and alive.ended
    assert any(f"ended by {alive.chain}" in n for n in result.notes), result.notes
    recovered = [json.loads(x) for x in data.splitlines() if b'"type":"recovered"' in x]
    assert recovered[0]["torn_by"] == dead.chain


def test_a_stalled_stream_counts_as_failing(
    pipe: tuple[int, int], faults: Faults, made: list[StreamWriter]
) -> None:
    """The log pipeline stopped reading: the write blocks. The Check path never waits for
    it, and past `stall_after` the trail says failing and fail-closed denies."""
    r, w = pipe
    reader = Reader(r)
    writer = StreamWriter(w, writer="w0", stall_after=0.2, linger=0.0)
    made.append(writer)
    assert writer.flush()
    faults.gate.clear()
    started = time.monotonic()
    assert writer.write_decision(dec(1), pod="p", namespace="n", now=NOW)
    assert time.monotonic() - started < 0.1  # queued, not written
    assert wait_for(writer.must_deny, 3)
    health = writer.health()
    assert health["state"] == "failing" and health["stalled"] and health["blocked_seconds"] > 0.2
    faults.gate.set()
    assert wait_for(lambda: not writer.must_deny())
    assert writer.close(5)
    os.close(w)
    assert check(reader.join()).ok


def test_argument_hashes_use_the_key_directory(
    tmp_path: Path, pipe: tuple[int, int], made: list[StreamWriter]
) -> None:
    r, w = pipe
    reader = Reader(r)
    args = CallArguments(
        ArgumentRecording("hashes", frozenset()), "/v1/x?to=DE89", None, False, None
    )
    keyed = StreamWriter(w, writer="w0", key_directory=tmp_path)
    made.append(keyed)
    keyed.write_decision(dec(1, arguments=args), pod="p", namespace="n", now=NOW)
    assert keyed.close(5)
    keyless = StreamWriter(w, writer="w1")
    keyless.write_decision(dec(2, arguments=args), pod="p", namespace="n", now=NOW)
    assert keyless.close(5)
    os.close(w)
    data = reader.join()
    records = [json.loads(x) for x in data.splitlines() if b'"type":"decision"' in x]
    assert records[0]["arguments"]["key"] == load_argument_key(tmp_path).id
    assert "hash" in records[0]["arguments"]["query"]["to"]
    assert records[1]["arguments"]["key"] == "unavailable"
    assert "hash" not in records[1]["arguments"]["query"]["to"]
    assert check(data).ok


def test_both_sinks_each_on_its_own_chain(tmp_path: Path, pipe: tuple[int, int]) -> None:
    r, w = pipe
    reader = Reader(r)
    tee = Tee(
        AuditWriter(tmp_path / "audit", chain_id="pod-1-w0", fsync="never"),
        StreamWriter(w, writer="w0", pod="pod-1", retry_interval=0.05),
    )
    for i in range(5):
        assert tee.write_decision(dec(i), pod="pod-1", namespace="ns", now=NOW + i)
    assert tee.flush()
    health = tee.health()
    assert health["state"] == "ok" and set(health["sinks"]) == {"directory", "stdout"}
    assert tee.stats().written == 10
    assert tee.close(5)
    os.close(w)
    assert verify(tmp_path / "audit").ok
    result = check(reader.join())
    assert result.ok and result.chains[0].records == 5


def test_a_failing_stdout_makes_both_sinks_deny(
    tmp_path: Path, pipe: tuple[int, int], faults: Faults
) -> None:
    r, w = pipe
    Reader(r)
    tee = Tee(
        AuditWriter(tmp_path / "audit", chain_id="pod-1-w0", fsync="never"),
        StreamWriter(w, writer="w0", retry_interval=0.05),
    )
    try:
        faults.broken = True
        tee.write_decision(dec(1), pod="p", namespace="n", now=NOW)
        assert wait_for(tee.must_deny)
        health = tee.health()
        assert (health["state"], health["denying"]) == ("failing", True)
        assert health["sinks"]["stdout"]["state"] == "failing"
        assert health["sinks"]["directory"]["state"] == "ok"
    finally:
        faults.broken = False
        assert tee.close(5)


# -- review of issue 19 -----------------------------------------------------------------------


def kubelet_merged(cri_file: bytes) -> bytes:
    """What `kubectl logs` prints from a CRI log file: each line's text, and a newline
    after an ``F`` line only (a ``P`` part runs on into whatever line of either stream comes
    next in the file)."""
    out = []
    for line in cri_file.splitlines():
        _, _, tag, text = line.split(b" ", 3)
        out.append(text + (b"\n" if tag == b"F" else b""))
    return b"".join(out)


def containerd(lines: list[bytes], limit: int = 16 * 1024) -> bytes:
    """``lines`` (stdout: records; stderr: the rest) as containerd writes them: longer than
    ``limit``, in ``P`` parts; mandate's stderr line between the first two parts."""
    log = b"2026-12-05 06:00:00,000 INFO sidecar.context: task reported"
    out = []
    for text in lines:
        stream = b"stdout" if text.startswith(MARKER_PREFIX) else b"stderr"
        parts = [text[i : i + limit] for i in range(0, len(text), limit)] or [b""]
        for j, part in enumerate(parts):
            tag = b"F" if j == len(parts) - 1 else b"P"
            out.append(b"2026-12-05T06:00:00.000000000Z " + stream + b" " + tag + b" " + part)
            if j == 0 and tag == b"P":
                out.append(b"2026-12-05T06:00:00.000000000Z stderr F " + log)
    return b"".join(x + b"\n" for x in out)


def test_a_long_record_is_cut_to_fit_one_runtime_line_and_verifies_in_kubectl_logs(
    tmp_path: Path, pipe: tuple[int, int]
) -> None:
    """Review of issue 19 (12): the agent controls a record's length (a path up to Envoy's
    60 KiB header limit); containerd writes a line longer than 16 KiB in parts, and `kubectl
    logs` glues a part to the stderr line that came between: a torn record and a seq gap,
    tamper evidence the agent could make. The writer keeps every line under
    `STREAM_LINE_MAX`, cutting the longest members and saying what they were."""
    from sidecar.audit.record import STREAM_LINE_MAX

    r, w = pipe
    reader = Reader(r)
    writer = StreamWriter(w, writer="w0", pod="pod-1")
    long_path = "/upload/" + "a" * 60_000
    task = "t" * 30_000
    writer.write_decision(dec(0), pod="pod-1", namespace="ns", now=NOW)
    d = dataclasses.replace(dec(1, path=long_path), task=task)
    writer.write_decision(d, pod="pod-1", namespace="ns", now=NOW + 1)
    writer.write({"type": "task_reported", "time": "t", "task": task, "agent": "billing-agent"})
    writer.write_decision(dec(2), pod="pod-1", namespace="ns", now=NOW + 2)
    assert writer.close(5)
    os.close(w)
    data = reader.join()
    lines = data.splitlines()
    assert max(len(x) for x in lines) <= STREAM_LINE_MAX
    # Found by what was cut, not by position: a slow reader on a loaded machine may add a
    # record (a stall, a loss) before it.
    (cut,) = [r for r in map(json.loads, lines) if "path" in r.get("truncated", {})]
    assert cut["path"] == long_path[:256] and cut["task"] == task[:256]
    assert cut["truncated"]["path"] == {
        "bytes": len(long_path), "sha256": hashlib.sha256(long_path.encode()).hexdigest(),
    }  # fmt: skip
    assert cut["truncated"]["task"]["bytes"] == len(task)
    assert cut["host"] == "api.example.com" and cut["decision_id"] == "d00001"
    (event,) = [r for r in map(json.loads, lines) if r.get("type") == "task_reported"]
    assert event["task"] == task[:256] and event["truncated"]["task"]["bytes"] == len(task)
    # As the node keeps it, and as `kubectl logs` prints it with a stderr line around.
    node = tmp_path / "0.log"
    node.write_bytes(containerd(lines))
    kubectl = tmp_path / "kubectl.log"
    kubectl.write_bytes(kubelet_merged(node.read_bytes()))
    for source in (node, kubectl):
        result = verify_log([str(source)])
        assert result.ok, result.to_json()
        assert result.chains[0].records == 3


def _taken(writer: StreamWriter) -> bool:
    return writer.stats().backlog == 0


def test_a_record_that_cannot_be_queued_denies_its_call_when_failing_closed(
    pipe: tuple[int, int], faults: Faults, made: list[StreamWriter]
) -> None:
    """Review of issue 19: `Audit.record` asked `must_deny`, then ignored whether
    `write_decision` queued the record. Between the two, other Checks (grpcio's threads)
    can fill the queue: the allowed call went out with no record, only a loss note."""
    r, w = pipe
    Reader(r)  # drains the pipe
    writer = StreamWriter(w, writer="w0", queue_max=1, linger=0.0, stall_after=30)
    going_on = StreamWriter(w, writer="w1", queue_max=1, linger=0.0, on_failure="continue")
    made.extend([writer, going_on])
    assert writer.flush() and going_on.flush()  # the headers are out
    faults.gate.clear()  # the log pipeline stalls: the writer threads' next writes wait
    for each in (writer, going_on):
        assert each.write_decision(dec(0), pod="p", namespace="n", now=NOW)
        assert wait_for(functools.partial(_taken, each))  # and waiting to be written

    class Racing:
        """The trail as another Check thread leaves it between `must_deny` and the write."""

        def __getattr__(self, name: str) -> Any:
            return getattr(writer, name)

        def must_deny(self) -> bool:
            answer = writer.must_deny()
            writer.write_decision(dec(50), pod="p", namespace="n", now=NOW)  # fills the queue
            return answer

    audit = Audit(Racing(), "p", "n")
    decided = audit.record(dec(1))
    assert not decided.allowed and decided.code == Code.AUDIT_UNAVAILABLE, decided
    assert writer.stats().dropped >= 1
    # continue: the call goes on, and the loss is counted.
    assert going_on.write_decision(dec(51), pod="p", namespace="n", now=NOW)  # queue full
    assert Audit(going_on, "p", "n").record(dec(2)).allowed
    assert going_on.stats().dropped == 1
    faults.gate.set()
    assert writer.close(5) and going_on.close(5)


def test_cli_verify_log_exit_codes_for_a_window_and_a_foreign_container(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 3 (intact, incomplete) for a log that starts inside the chain, 0 with
    --allow-partial; 1 for a record line of another container; --container renames."""
    path, lines = written_log(tmp_path)
    window = tmp_path / "window.log"
    window.write_bytes(b"".join(lines[3:]))  # the header and the first record rotated away
    code, out, err = cli(["verify", "--log", str(window)], capsys)
    assert code == 3 and out.startswith("INCOMPLETE: chain pod-1-w0-"), out
    assert "missing_head" in out and "--allow-partial" in err
    code, out, _ = cli(["verify", "--log", str(window), "--json"], capsys)
    doc = json.loads(out)
    assert code == 3 and (doc["ok"], doc["intact"], doc["complete"]) == (False, True, False)
    assert doc["chains"][0]["first_seq"] == 2 and doc["chains"][0]["first_time"]
    code, out, _ = cli(["verify", "--log", str(window), "--allow-partial"], capsys)
    assert code == 0 and out.startswith("ok: chain pod-1-w0-") and "begins inside" in out
    # kubectl logs POD --all-containers --prefix: the agent printed mandate's lines back.
    prefixed = tmp_path / "all.log"
    prefixed.write_bytes(
        b"".join(b"[pod/pod-1/mandate] " + x for x in lines)
        + b"".join(b"[pod/pod-1/agent] " + x for x in lines)
    )
    code, out, err = cli(["verify", "--log", str(prefixed)], capsys)
    assert code == 1 and "FOREIGN" in out and "foreign_container" in err
    code, out, err = cli(["verify", "--log", str(prefixed), "--container", "agent"], capsys)
    assert code == 1 and "container 'mandate'" in out
    code, out, _ = cli(["verify", "--log", str(path)], capsys)
    assert code == 0 and "trusted to come from container 'mandate'" in out
    code, out, _ = cli(["query", "--log", str(prefixed)], capsys)
    assert code == 0 and len(out.splitlines()) == 6  # mandate's records only
    code, out, _ = cli(["query", "--log", str(prefixed), "--container", "agent"], capsys)
    assert code == 0 and len(out.splitlines()) == 6


# -- the command line -------------------------------------------------------------------------


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="mandate")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    code = run_audit(parser.parse_args(["audit", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


def written_log(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """A log as `kubectl logs` shows it: a worker's records and mandate's log lines."""
    path = tmp_path / "mandate.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"2023-11-14 22:13:20,000 INFO sidecar.run.worker: mandate serving\n")
        writer = StreamWriter(fd, writer="w0", pod="pod-1")
        for i in range(6):
            writer.write_decision(dec(i, allowed=i != 3), pod="pod-1", namespace="ns", now=NOW + i)
        assert writer.close(5)
        os.write(fd, b"2023-11-14 22:13:21,000 INFO sidecar.run.worker: mandate stopping\n")
    finally:
        os.close(fd)
    return path, path.read_bytes().splitlines(keepends=True)


def test_cli_verify_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, lines = written_log(tmp_path)
    code, out, _ = cli(["verify", "--log", str(path)], capsys)
    assert code == 0 and out.startswith("ok: chain pod-1-w0-"), out
    code, out, _ = cli(["verify", "--log", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out)["chains"][0]["records"] == 6
    cut = tmp_path / "cut.log"
    cut.write_bytes(b"".join(lines[:3] + lines[4:]))
    code, out, err = cli(["verify", "--log", str(cut)], capsys)
    assert code == 1 and "TAMPERED" in out and "seq_gap" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["verify"], "give an audit directory DIR or --log SOURCE"),
        (["verify", "DIR", "--log", "x"], "give an audit directory DIR or --log SOURCE"),
        (["verify", "--log", "missing.log"], "no such file"),
        (["query"], "give an audit directory DIR or --log SOURCE"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(argv, capsys)
    assert code == 2 and message in err


def test_cli_query_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = written_log(tmp_path)
    code, out, _ = cli(["query", "--log", str(path), "--decision", "deny"], capsys)
    assert code == 0
    (rec,) = [json.loads(x) for x in out.splitlines()]
    assert rec["decision_id"] == "d00003" and rec["chain"].startswith("pod-1-w0-")


def test_cli_verify_log_from_standard_input(tmp_path: Path) -> None:
    path, _ = written_log(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "audit", "verify", "--log", "-"],
        input=path.read_bytes(), capture_output=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(b"ok: chain pod-1-w0-")
