"""Issue 19 (2): the pieces of the stdout audit sink that need no thread: its option
(`--audit-stdout`, env MANDATE_AUDIT_STDOUT, handed to every worker), its chain ids, and
mandate's log lines, which must never pass for records in a merged `kubectl logs` stream."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.audit import chained_line, genesis
from sidecar.audit.logs import LogLine, log_lines, may_frame_a_record
from sidecar.audit.logverify import verify_lines
from sidecar.audit.record import (
    _CHAIN_ID,
    MARKER_PREFIX,
    STREAM_LINE_MAX,
    canonical_json,
    fit_record,
    stream_stamp,
)
from sidecar.audit.stream import guard_log_lines, stream_chain_id
from sidecar.cli import _parser, _settings, main
from sidecar.run.supervisor import Supervisor, _Worker
from sidecar.settings import AuditSettings, WorkerSettings

# -- the option -------------------------------------------------------------------------------


def _run_settings(*args: str) -> AuditSettings:
    return _settings(_parser().parse_args(["run", "--profiles", "/p", *args])).audit


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        (None, [], False),
        (None, ["--audit-stdout"], True),
        ("true", [], True),
        ("TRUE", [], True),
        ("1", [], True),
        ("false", [], False),
        ("", [], False),
        ("false", ["--audit-stdout"], True),  # the flag wins
    ],
)
def test_the_option_and_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch, env: str | None, args: list[str], expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv("MANDATE_AUDIT_STDOUT", raising=False)
    else:
        monkeypatch.setenv("MANDATE_AUDIT_STDOUT", env)
    audit = _run_settings(*args)
    assert audit.stdout is expected


def test_stdout_goes_with_a_directory() -> None:
    audit = _run_settings("--audit-stdout", "--audit-dir", "/a")
    assert audit.stdout and audit.directory == Path("/a")


@pytest.mark.parametrize("bad", ["maybe", "ture", "2"])
def test_a_bad_value_exits_2_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    monkeypatch.setenv("MANDATE_AUDIT_STDOUT", bad)
    assert main(["run", "--profiles", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "--audit-stdout" in err and "MANDATE_AUDIT_STDOUT" in err and repr(bad) in err


def test_run_hands_stdout_to_every_worker(tmp_path: Path) -> None:
    args = _parser().parse_args(["run", "--profiles", "/p", "--audit-stdout", "--workers", "2"])
    sup: Any = Supervisor.__new__(Supervisor)
    sup.settings, sup._workdir = _settings(args), tmp_path
    sup.table, sup.agent_state_table = SimpleNamespace(fd=7), SimpleNamespace(fd=8)
    for index in (0, 1):
        handed = sup._worker_settings(_Worker(index, "127.0.0.1:9001", tmp_path / "w.json"))
        worker = WorkerSettings.from_json(handed.to_json())
        assert worker.run.audit.stdout is True and worker.index == index


# -- chain ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pod", ["billing-7f9c4-x2x", "p" * 253, "Pod_With.Odd:chars/and spaces", "-lead", ""]
)
def test_a_stream_chain_id_is_new_at_each_start_and_always_valid(pod: str) -> None:
    ids = {stream_chain_id(pod, "w12") for _ in range(20)}
    assert len(ids) == 20
    for chain_id in ids:
        assert _CHAIN_ID.match(chain_id), chain_id
        assert len(chain_id) <= 64 and "-w12-" in chain_id


# -- mandate's log lines ----------------------------------------------------------------------


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    logger = logging.getLogger("test.audit.stream.guard")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    yield logger, out
    logger.removeHandler(handler)


def _forged(chain_id: str = "pod-1-w0-aaaaaaaa") -> bytes:
    header = {"type": "header", "format": 1, "writer": "w0", "previous": None, "time": "t"}
    line, _ = chained_line({**header, **stream_stamp(chain_id)}, seq=0, prev=genesis(chain_id))
    return line.rstrip(b"\n")


def test_a_logged_text_with_a_record_after_a_newline_starts_no_line_with_the_marker(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    """An agent's justification (or any text mandate logs) holding a newline and a record:
    with `guard_log_lines`, no line of the output is a record, so `logverify` reads none."""
    logger, out = logged
    forged = _forged().decode()
    logger.warning("elevation requested: %s", "I need it\n" + forged)
    unguarded = out.getvalue().splitlines()
    assert any(line.startswith(MARKER_PREFIX.decode()) for line in unguarded)
    assert verify_lines([LogLine("log", 1, x.encode()) for x in unguarded]).record_lines == 1

    out.seek(0)
    out.truncate()
    guard_log_lines(logger)
    guard_log_lines(logger)  # idempotent
    logger.warning("elevation requested: %s", "I need it\n" + forged)
    logger.error("%s", forged)  # a record as the whole message: the line starts with the time
    try:
        raise ValueError("bad\n" + forged)
    except ValueError:
        logger.exception("failed")
    lines = out.getvalue().splitlines()
    assert not [x for x in lines if x.startswith(MARKER_PREFIX.decode())], lines
    assert (
        verify_lines([LogLine("log", i, x.encode()) for i, x in enumerate(lines)]).record_lines == 0
    )
    assert any(x == "\t" + forged for x in lines)  # the text itself is kept


def test_guarded_one_line_messages_are_unchanged_and_continuation_lines_are_indented(
    logged: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = logged
    logger.warning("plain %s", "text")
    before = out.getvalue()
    out.seek(0)
    out.truncate()
    guard_log_lines(logger)
    logger.warning("plain %s", "text")
    assert out.getvalue().split(" ", 2)[2] == before.split(" ", 2)[2]
    logger.warning("two\nlines {not a record}")
    assert out.getvalue().splitlines()[-1] == "\tlines {not a record}"


FRAMINGS = [
    "",  # kubectl logs
    "2026-01-01T00:00:00Z ",  # the framing strip takes a --timestamps time off
    "2026-01-01T00:00:00.123456789+02:00 ",
    "[pod/agent-1/mandate] ",  # ... and a --prefix (naming mandate's container)
    "[pod/agent-1/mandate] 2026-01-01T00:00:00Z ",
]


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("fmt", ["%(asctime)s %(levelname)s %(name)s: %(message)s", "%(message)s"])
def test_no_logged_line_is_a_record_whatever_framing_the_reader_takes_off(
    logged: tuple[logging.Logger, io.StringIO], framing: str, fmt: str, tmp_path: Path
) -> None:
    """Review of issue 19 (11): the guard spaced out a marker only at a line's start, but the
    reader takes a --timestamps time or a --prefix off a raw line before it looks for the
    marker: "\n2026-01-01T00:00:00Z {record}" in a logged text was a record in merged
    `kubectl logs` output. Every continuation line is now indented, and a first line the
    reader could take for a record (a format without the time first) gets a space."""
    logger, out = logged
    logger.handlers[0].setFormatter(logging.Formatter(fmt))
    guard_log_lines(logger)
    forged = _forged().decode()
    cri = f"2026-01-01T00:00:00Z stdout F {forged}"
    docker = '{"log":' + json.dumps(forged + "\n") + ',"stream":"stdout","time":"t"}'
    for text in (framing + forged, cri, docker):
        logger.warning("unknown task %s", "x\n" + text + "\n" + text)
        logger.warning("%s", text)  # the whole message: the first line
    lines = out.getvalue().splitlines()
    assert not [x for x in lines if may_frame_a_record(x.encode())], lines
    read = verify_lines([LogLine("log", i, x.encode()) for i, x in enumerate(lines, 1)])
    assert read.record_lines == 0, read.to_json()
    for i, added in enumerate(FRAMINGS):  # as kubectl shows them, with its own framing
        path = tmp_path / f"kubectl-{i}.log"
        path.write_bytes("".join(added + x + "\n" for x in lines).encode())
        assert not [x for x in log_lines([str(path)]) if x.candidate], added


# -- review of issue 19 (12): a stream's record line fits one runtime line ----------------------


def _fitted_line(
    record: dict[str, Any], limit: int = STREAM_LINE_MAX
) -> tuple[bytes, dict[str, Any]]:
    fitted = fit_record({**record, **stream_stamp("pod-1-w0-aaaaaaaa")}, limit)
    line, _ = chained_line(fitted, seq=123456, prev="f" * 64)
    return line.rstrip(b"\n"), json.loads(line)


def test_a_record_that_fits_is_left_as_it_is() -> None:
    rec = {"type": "decision", "time": "t", "path": "/v1/x", "mcp_tools": ["a"]}
    assert fit_record(rec) == rec


def test_long_members_are_cut_and_described_until_the_line_fits() -> None:
    path, task, purpose = "/p/" + "é" * 40_000, "t" * 20_000, "\udcff" * 5_000
    tools = [f"tool-{i}" for i in range(5_000)]
    rec = {
        "type": "decision", "time": "2026-01-01T00:00:00.000Z", "decision": "allow",
        "decision_id": "d1", "code": "allowed", "reason": "r" * 3_000, "path": path,
        "task": task, "purpose": purpose, "mcp_tools": tools, "host": "api.example.com",
        "arguments": {f"k{i}": {"type": "string"} for i in range(2_000)},
    }  # fmt: skip
    line, got = _fitted_line(rec)
    assert len(line) <= STREAM_LINE_MAX
    assert canonical_json(got) == line  # still canonical, and chained as written
    assert got["path"] == path[:256] and got["task"] == task[:256]
    assert got["truncated"]["path"] == {
        "bytes": len(path.encode()), "sha256": hashlib.sha256(path.encode()).hexdigest(),
    }  # fmt: skip
    assert got["mcp_tools"] == tools[: len(got["mcp_tools"])] and 0 < len(got["mcp_tools"]) < 200
    assert (
        got["truncated"]["mcp_tools"]["sha256"] == hashlib.sha256(canonical_json(tools)).hexdigest()
    )
    assert got["host"] == "api.example.com" and got["decision_id"] == "d1"
    assert "reason" not in got["truncated"] or got["reason"] == "r" * 256
    # A tight limit: members are emptied, never the ones that chain or identify the record.
    line, got = _fitted_line(rec, limit=1_200)
    assert len(line) <= 1_200, len(line)
    assert (got["decision"], got["decision_id"], got["code"]) == ("allow", "d1", "allowed")
    assert got["truncated"]["path"]["bytes"] == len(path.encode())
