"""SharedTable: the memory-mapped revocation table (one writer, many readers, a seqlock).

A reader never sees a torn table: while the generation is odd, or when the payload cannot be
parsed, or when the writer overflowed, it reads an incomplete table (every Check denied).
"""

from __future__ import annotations

import fcntl
import gc
import json
import mmap
import multiprocessing
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.agentstate import AgentStateTable, RiskState
from sidecar.core.revocation import Revocation, make_key
from sidecar.errors import ConfigError
from sidecar.state.shm import MAGIC, RunDir, SharedAgentState, SharedTable

NOW = 1_700_000_000.0
HEADER = 24


def rev(i: int, agent: str = "", namespace: str = "agents") -> Revocation:
    agent = agent or f"agent-{i}"
    return Revocation(
        key=make_key("admin", namespace, f"{agent}-{i}"),
        agent=agent,
        namespace=namespace,
        reason=f"reason {i}",
        source="admin",
        name=f"{agent}-{i}",
        created_at=NOW,
    )


def payload_size(entries: list[Revocation]) -> int:
    return len(json.dumps([e.as_dict() for e in entries], separators=(",", ":")).encode())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "revocations"


@pytest.fixture
def writer(path: Path) -> Iterator[SharedTable]:
    table = SharedTable.create(path, size=64 * 1024)
    yield table
    table.close()


@pytest.fixture
def reader(writer: SharedTable, path: Path) -> Iterator[SharedTable]:
    table = SharedTable.attach(path)
    yield table
    table.close()


@pytest.fixture
def raw(writer: SharedTable, path: Path) -> Iterator[mmap.mmap]:
    """A second writable mapping of the same file: a stuck or misbehaving writer."""
    with path.open("r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    yield mm
    mm.close()


def set_generation(mm: mmap.mmap, gen: int) -> None:
    struct.pack_into("<Q", mm, 8, gen)


def generation(mm: mmap.mmap) -> int:
    return int(struct.unpack_from("<Q", mm, 8)[0])


# -- create, attach, write, read --------------------------------------------------------------


def test_fresh_table_is_empty_and_incomplete(
    writer: SharedTable, reader: SharedTable, raw: mmap.mmap
) -> None:
    start = generation(raw)
    assert start % 2 == 0  # even: no write in progress
    for table in (reader.read(), writer.read()):
        assert (table.generation, len(table), table.complete) == (start, 0, False)


def test_write_then_read(writer: SharedTable, reader: SharedTable, raw: mmap.mmap) -> None:
    entries = [rev(1), rev(2, "*")]
    start = generation(raw)
    gen = writer.write(entries, complete=True)
    assert gen == start + 2
    table = reader.read()
    assert (table.generation, table.complete) == (start + 2, True)
    assert set(table.entries) == set(entries)
    assert table.find("agents", "agent-1", NOW) == rev(1)
    assert table.find("agents", "someone", NOW) == rev(2, "*")


def test_write_incomplete_is_read_incomplete(writer: SharedTable, reader: SharedTable) -> None:
    writer.write([rev(1)], complete=False)
    table = reader.read()
    assert (len(table), table.complete) == (1, False)


def test_a_refused_table_is_read_refused_with_its_reason(
    writer: SharedTable, reader: SharedTable
) -> None:
    """Issue 19: the reason a writer was refused the revocations reaches every reader, and a
    refused table is never complete, whatever the caller says; the entries stay."""
    writer.write([rev(1)], complete=True, refused="HTTP 403 Forbidden: needs list")
    table = reader.read()
    assert (len(table), table.complete, table.refused) == (
        1,
        False,
        "HTTP 403 Forbidden: needs list",
    )
    writer.write([rev(1)], complete=True)
    assert (reader.read().complete, reader.read().refused) == (True, "")


def test_generations_increase_by_two(writer: SharedTable, raw: mmap.mmap) -> None:
    start = generation(raw)
    assert [writer.write([], complete=True) for _ in range(3)] == [start + 2, start + 4, start + 6]


def test_read_returns_the_cached_table_while_generation_unchanged(
    writer: SharedTable, reader: SharedTable
) -> None:
    writer.write([rev(1)], complete=True)
    first = reader.read()
    assert reader.read() is first
    assert reader.read() is first
    writer.write([rev(1)], complete=True)  # same content, new generation
    second = reader.read()
    assert second is not first
    assert second.entries == first.entries
    assert second.generation == first.generation + 2
    assert reader.read() is second


def test_reader_attached_before_writes_sees_later_writes(
    writer: SharedTable, reader: SharedTable
) -> None:
    assert not reader.read().complete
    for n in (1, 5, 0, 3):
        entries = [rev(i) for i in range(n)]
        writer.write(entries, complete=True)
        table = reader.read()
        assert set(table.entries) == set(entries)
        assert table.complete


def test_two_readers_see_the_same_table(writer: SharedTable, path: Path) -> None:
    a, b = SharedTable.attach(path), SharedTable.attach(path)
    try:
        writer.write([rev(1), rev(2)], complete=True)
        assert a.read() == b.read()
    finally:
        a.close()
        b.close()


def test_attached_table_cannot_write(reader: SharedTable) -> None:
    with pytest.raises(AssertionError):
        reader.write([], complete=True)


def test_create_truncates_an_existing_table(writer: SharedTable, path: Path) -> None:
    old = writer.write([rev(1)], complete=True)
    again = SharedTable.create(path, size=4096)
    try:
        fresh = again.read()
        assert len(fresh) == 0 and not fresh.complete
        assert fresh.generation != old  # a reader's cache can never match the new table
        assert path.stat().st_size == 4096
    finally:
        again.close()


def test_create_rejects_a_tiny_size(path: Path) -> None:
    with pytest.raises(ConfigError, match="too small"):
        SharedTable.create(path, size=HEADER + 1)


# -- a stuck or misbehaving writer: incomplete, never partial --------------------------------


def test_writer_stuck_mid_write_reads_incomplete(
    writer: SharedTable, reader: SharedTable, raw: mmap.mmap
) -> None:
    good = [rev(i) for i in range(5)]
    writer.write(good, complete=True)
    assert len(reader.read()) == 5
    # a second write starts (odd generation, half a payload) and never finishes
    set_generation(raw, generation(raw) + 1)
    raw[HEADER : HEADER + 10] = b'[{"key":"x'
    start = time.monotonic()
    stuck = reader.read()
    assert time.monotonic() - start < 2.0
    assert (stuck.complete, len(stuck), stuck.find("agents", "agent-1", NOW)) == (False, 0, None)
    # the writer (or its successor) finishes a write: readers recover
    writer.write(good, complete=True)
    recovered = reader.read()
    assert recovered.complete and set(recovered.entries) == set(good)


def test_writer_stuck_before_any_write_reads_incomplete(
    reader: SharedTable, raw: mmap.mmap
) -> None:
    set_generation(raw, generation(raw) + 1)
    assert not reader.read().complete


@pytest.mark.parametrize(
    "payload",
    [b"[{not json", b'[{"key": "k"}]', b'["a string"]', b"[1, 2]", b"null", b"\xff\xfe"],
    ids=["not-json", "missing-fields", "string-entry", "number-entries", "null", "not-utf8"],
)
def test_unparsable_payload_reads_incomplete(
    writer: SharedTable, reader: SharedTable, raw: mmap.mmap, payload: bytes
) -> None:
    writer.write([rev(1)], complete=True)
    assert reader.read().complete
    raw[HEADER : HEADER + len(payload)] = payload
    struct.pack_into("<II", raw, 16, len(payload), 1)
    set_generation(raw, generation(raw) + 2)
    table = reader.read()
    assert (table.complete, len(table)) == (False, 0)


def test_length_beyond_the_map_reads_incomplete(
    writer: SharedTable, reader: SharedTable, raw: mmap.mmap
) -> None:
    writer.write([rev(1)], complete=True)
    struct.pack_into("<II", raw, 16, len(raw), 1)
    set_generation(raw, generation(raw) + 2)
    start = time.monotonic()
    assert not reader.read().complete
    assert time.monotonic() - start < 2.0


# -- overflow ----------------------------------------------------------------------------------


def test_overflow_reads_incomplete_then_recovers(path: Path) -> None:
    one = [rev(0)]
    writer = SharedTable.create(path, size=HEADER + payload_size(one))  # one entry, exactly
    reader = SharedTable.attach(path)
    try:
        writer.write(one, complete=True)
        assert reader.read().complete
        assert len(reader.read()) == 1
        writer.write([rev(i) for i in range(50)], complete=True)
        table = reader.read()
        assert (table.complete, len(table)) == (False, 0)  # published empty, never truncated
        writer.write([rev(0)], complete=True)
        table = reader.read()
        assert (table.complete, len(table)) == (True, 1)
    finally:
        reader.close()
        writer.close()


def test_one_byte_over_overflows(path: Path) -> None:
    one = [rev(0)]
    writer = SharedTable.create(path, size=HEADER + payload_size(one) - 1)
    try:
        writer.write(one, complete=True)
        assert not writer.read().complete
        writer.write([], complete=True)
        assert writer.read().complete
    finally:
        writer.close()


# -- attach errors -----------------------------------------------------------------------------


def test_attach_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"revocation table {missing}: No such file"):
        SharedTable.attach(missing)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "too small"),
        (MAGIC + b"\0" * 10, "too small"),
        (b"NOTMAGIC" + b"\0" * 100, "not a mandate revocation table"),
        (b"MNDTREV2" + b"\0" * 100, "not a mandate revocation table"),
    ],
    ids=["empty", "short-header", "wrong-magic", "other-version"],
)
def test_attach_bad_file(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        SharedTable.attach(bad)
    assert str(bad) in str(err.value)


def test_attach_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        SharedTable.attach(tmp_path)
    assert str(tmp_path) in str(err.value)


# -- concurrency: a reader never sees a torn table ---------------------------------------------

SMALL = [rev(0, "solo")]
LARGE = [rev(i) for i in range(50)]


def _writer_loop(path: str, seconds: float, stop: Any = None) -> None:
    """Alternate the two tables for ``seconds``, or until ``stop`` (an Event) is set."""
    writer = _open_writer(path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        writer.write(SMALL, complete=True)
        writer.write(LARGE, complete=True)


def _open_writer(path: str) -> SharedTable:
    """A second writer on an existing table (a test-only view: not a public API)."""
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    table = SharedTable(Path(path), mm, writer=True)
    table._generation = generation(mm)
    return table


def _check_reads(
    reader: SharedTable, done: threading.Event | None, until: float, enough: int = 0
) -> dict[str, int]:
    """Read until ``until``, ``done`` or (``enough`` > 0) that many of each table were seen,
    asserting that no read is torn."""
    small, large = frozenset(SMALL), frozenset(LARGE)
    seen = {"small": 0, "large": 0, "incomplete": 0, "reads": 0}
    while time.monotonic() < until and not (done is not None and done.is_set()):
        if enough and seen["small"] >= enough and seen["large"] >= enough and seen["reads"] > 1000:
            break
        table = reader.read()
        seen["reads"] += 1
        if not table.complete:
            assert len(table) == 0, "an incomplete table must be empty"
            seen["incomplete"] += 1
            continue
        assert table.generation % 2 == 0
        got = frozenset(table.entries)
        assert got in (small, large), f"torn table: {len(got)} entries"
        seen["small" if got == small else "large"] += 1
    return seen


def test_concurrent_writer_thread_never_tears_a_read(path: Path) -> None:
    writer = SharedTable.create(path, size=256 * 1024)
    writer.write(SMALL, complete=True)
    reader = SharedTable.attach(path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        # Until the reader has seen both tables often enough: a writer starved on a loaded
        # machine gets the time it needs (bounded at 10 s), not a fixed 0.6 s.
        try:
            deadline = time.monotonic() + 10.0
            while not stop.is_set() and time.monotonic() < deadline:
                writer.write(SMALL, complete=True)
                writer.write(LARGE, complete=True)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: interleave reads and writes
    thread = threading.Thread(target=write, daemon=True)
    try:
        thread.start()
        seen = _check_reads(reader, None, time.monotonic() + 10.0, enough=50)
    finally:
        stop.set()
        thread.join(timeout=5.0)
        sys.setswitchinterval(interval)
        reader.close()
    assert not thread.is_alive()
    assert not errors
    assert seen["small"] >= 50 and seen["large"] >= 50, seen
    writer.close()


def test_concurrent_writer_process_never_tears_a_read(path: Path) -> None:
    writer = SharedTable.create(path, size=256 * 1024)
    writer.write(SMALL, complete=True)
    writer.close()
    reader = SharedTable.attach(path)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    # The writer runs until told to stop (at most 20 s): on a loaded machine a fixed short
    # run could end before the reader saw both tables (this test flaked that way once).
    proc = ctx.Process(target=_writer_loop, args=(str(path), 20.0, stop), daemon=True)
    proc.start()
    try:
        # wait for the writer to start, then read until both tables were seen often
        deadline = time.monotonic() + 10.0
        start = reader.read().generation
        while reader.read().generation <= start + 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        seen = _check_reads(reader, None, time.monotonic() + 10.0, enough=50)
        stop.set()
        proc.join(timeout=5.0)
    finally:
        if proc.is_alive():  # pragma: no cover
            proc.kill()
            proc.join(timeout=5.0)
        reader.close()
    assert proc.exitcode == 0
    assert seen["small"] > 0 and seen["large"] > 0, seen


# -- a table with no name, handed over as a descriptor (`mandate run`) ------------------------


def _fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def anonymous() -> Iterator[SharedTable]:
    table = SharedTable.create(None, size=64 * 1024)
    yield table
    table.close()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd_create here")
def test_a_table_with_no_name_is_a_memfd(anonymous: SharedTable) -> None:
    assert anonymous.path is None and anonymous.fd is not None
    assert _fd_target(anonymous.fd) == "/memfd:mandate-revocations (deleted)"
    assert anonymous.name == f"/proc/{os.getpid()}/fd/{anonymous.fd}"
    # Its size is sealed: nobody holding the descriptor can shrink it under a reader's mapping.
    with pytest.raises(PermissionError):
        os.ftruncate(anonymous.fd, 4096)
    assert os.fstat(anonymous.fd).st_size == 64 * 1024


def test_without_memfd_the_table_is_an_unlinked_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_memfd(*_: object) -> int:
        raise OSError(38, "Function not implemented")  # e.g. a seccomp profile without it

    monkeypatch.setattr(os, "memfd_create", no_memfd, raising=False)
    table = SharedTable.create(None, size=4096)
    try:
        assert table.fd is not None
        assert _fd_target(table.fd).endswith("(deleted)")  # no name, from the first moment on
        reader = SharedTable.attach_fd(os.dup(table.fd))
        table.write([rev(1)], complete=True)
        assert reader.read().find("agents", "agent-1", NOW) == rev(1)
        reader.close()
    finally:
        table.close()


def test_attach_fd_reads_the_writers_table_and_takes_the_descriptor(
    anonymous: SharedTable,
) -> None:
    assert anonymous.fd is not None
    fd = os.dup(anonymous.fd)
    reader = SharedTable.attach_fd(fd)
    try:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed: the read-only mapping is all the reader keeps
        anonymous.write([rev(1), rev(2, "*")], complete=True)
        table = reader.read()
        assert table.complete and set(table.entries) == {rev(1), rev(2, "*")}
        with pytest.raises(AssertionError):
            reader.write([], complete=True)
    finally:
        reader.close()


def test_attach_fd_errors(tmp_path: Path, anonymous: SharedTable) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    with pytest.raises(ConfigError, match=f"revocation table \\(descriptor {fd}\\)"):
        SharedTable.attach_fd(fd)
    with pytest.raises(ConfigError, match="Bad file descriptor"):
        SharedTable.attach_fd(fd)  # closed above
    assert anonymous.fd is not None
    with pytest.raises(ConfigError, match="not a mandate context table"):
        SharedAgentState.attach_fd(os.dup(anonymous.fd))


def test_the_context_table_goes_by_descriptor_too() -> None:
    writer = SharedAgentState.create(None, size=64 * 1024)
    try:
        assert writer.fd is not None
        reader = SharedAgentState.attach_fd(os.dup(writer.fd))
        risk = RiskState(namespace="agents", agent="billing-agent", score=0.5, updated_at=NOW)
        generation = writer.write(AgentStateTable.build(0, risks=[risk]))
        got = reader.read()
        assert got.generation == generation and got.risks == (risk,)
        reader.close()
    finally:
        writer.close()


def test_close_closes_the_writers_descriptor(anonymous: SharedTable) -> None:
    fd = anonymous.fd
    assert fd is not None
    anonymous.close()
    assert anonymous.fd is None
    with pytest.raises(OSError):
        os.fstat(fd)


def test_a_table_dropped_without_close_closes_its_descriptor() -> None:
    table = SharedTable.create(None, size=4096)
    fd = table.fd
    assert fd is not None
    del table
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


_WORKER = """
import sys, time
from sidecar.state.shm import SharedTable
table = SharedTable.attach_fd(int(sys.argv[1]))
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    agents = sorted(e.agent for e in table.read().entries)
    if sys.argv[2] in agents:
        print(" ".join(agents), flush=True)
        sys.exit(0)
    time.sleep(0.005)
sys.exit(1)
"""


def _worker(fd: int, waits_for: str) -> subprocess.Popen[str]:
    """A process that attaches the table by inherited descriptor, as `mandate worker
    --table-fd` does, and prints the agents once ``waits_for`` is revoked."""
    return subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(fd), waits_for],
        stdout=subprocess.PIPE,
        text=True,
        pass_fds=(fd,),
        cwd=Path(__file__).resolve().parents[2],
    )


def test_a_restarted_worker_gets_the_same_table_and_sees_later_writes(
    anonymous: SharedTable,
) -> None:
    """The supervisor keeps its descriptor for its lifetime: a worker started after a crash
    inherits the very table the supervisor writes, and sees what is written after it
    started; a worker attached before a write sees it too."""
    fd = anonymous.fd
    assert fd is not None
    anonymous.write([rev(1, "first")], complete=True)
    crashed = _worker(fd, "never")
    try:
        time.sleep(0.2)
        crashed.kill()
        crashed.wait(5)
        anonymous.write([rev(1, "first"), rev(2, "second")], complete=True)
        restarted = _worker(fd, "third")
        try:
            time.sleep(0.2)  # the restarted worker is reading by now
            anonymous.write([rev(1, "first"), rev(2, "second"), rev(3, "third")], complete=True)
            out, _ = restarted.communicate(timeout=15)
        finally:
            if restarted.poll() is None:  # pragma: no cover
                restarted.kill()
                restarted.wait(5)
        assert restarted.returncode == 0
        assert out.split() == ["first", "second", "third"]
    finally:
        if crashed.poll() is None:  # pragma: no cover
            crashed.kill()
            crashed.wait(5)


# -- the run directory: gone once every process of the run is ---------------------------------


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    d = tmp_path / "tmp"
    d.mkdir()
    return d


def _locked(path: Path) -> bool:
    fd = os.open(path / RunDir.LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_run_directory_is_locked_while_its_supervisor_lives(tmp: Path) -> None:
    run = RunDir.create(tmp)
    assert run.path.parent == tmp and run.path.name.startswith(RunDir.PREFIX)
    assert sorted(os.listdir(run.path)) == [RunDir.LOCK]
    assert _locked(run.path)
    assert RunDir.sweep(tmp) == [] and run.path.is_dir()  # a second `mandate run` here
    run.remove()
    assert list(tmp.iterdir()) == []
    assert run.lock_fd == -1


def test_the_next_start_sweeps_a_run_whose_processes_were_all_killed(tmp: Path) -> None:
    dead = RunDir.create(tmp)
    (dead.path / "metrics").mkdir()
    (dead.path / "metrics" / "counter_1.db").write_bytes(b"x" * 100)
    os.close(dead.lock_fd)  # SIGKILL: the kernel drops the lock
    live = RunDir.create(tmp)
    try:
        assert not dead.path.exists()
        assert list(tmp.iterdir()) == [live.path]
    finally:
        live.remove()


def test_the_last_worker_to_exit_removes_the_run_directory(tmp: Path) -> None:
    run = RunDir.create(tmp)
    # Workers inherit the lock's descriptor: the same open file, so the same lock.
    workers = [os.dup(run.lock_fd), os.dup(run.lock_fd)]
    assert not RunDir.release(run.path, workers[0])  # the supervisor still holds it
    os.close(run.lock_fd)  # the supervisor is SIGKILLed
    assert _locked(run.path)  # the second worker still holds it
    assert RunDir.sweep(tmp) == []  # so a new run keeps its hands off
    assert RunDir.release(run.path, workers[1])
    assert list(tmp.iterdir()) == []


def test_a_sweep_leaves_other_directories_alone(tmp: Path) -> None:
    other = tmp / f"{RunDir.PREFIX}not-ours"
    other.mkdir()
    (other / "data").write_text("x")  # no lock: not a run directory (or not ours)
    os.utime(other, (0, 0))
    demo = tmp / "mandate-demo-x"
    demo.mkdir()
    unfinished = tmp / f"{RunDir.PREFIX}unfinished"  # its maker died before the lock
    unfinished.mkdir()
    (unfinished / f"{RunDir.LOCK}.new").touch()
    recent = tmp / f"{RunDir.PREFIX}recent"  # being made right now
    recent.mkdir()
    now = time.time()  # by the clock the sweep reads (the file system's may differ)
    os.utime(recent, (now, now))
    os.utime(unfinished, (0, 0))
    assert RunDir.sweep(tmp) == [unfinished]
    assert sorted(p.name for p in tmp.iterdir()) == sorted([other.name, demo.name, recent.name])


def test_a_writer_thread_of_the_readers_own_process_never_makes_it_fail_closed(
    path: Path,
) -> None:
    # One process (issue 20): the Check thread reads what the supervisor's loop thread
    # writes. With the default switch interval, a writer preempted mid-write must still
    # finish (the reader yields the interpreter lock) before the reader gives up on it.
    writer = SharedTable.create(path, size=256 * 1024)
    writer.write(SMALL, complete=True)
    reader = SharedTable.attach(path)
    stop = threading.Event()

    def write() -> None:
        deadline = time.monotonic() + 10.0
        while not stop.is_set() and time.monotonic() < deadline:
            writer.write(LARGE, complete=True)
            writer.write(SMALL, complete=True)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    incomplete = reads = 0
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            reads += 1
            incomplete += not reader.read().complete
    finally:
        stop.set()
        thread.join(timeout=5.0)
        reader.close()
        writer.close()
    assert reads > 100 and incomplete == 0, (reads, incomplete)
