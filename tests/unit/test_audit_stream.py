"""Issue 19 (2): the pieces of the stdout audit sink that need no thread: its option
(`--audit-stdout`, env MANDATE_AUDIT_STDOUT, handed to every worker), its chain ids, and
mandate's log lines, which must never pass for records in a merged `kubectl logs` stream."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.audit import chained_line, genesis
from sidecar.audit.logs import LogLine
from sidecar.audit.logverify import verify_lines
from sidecar.audit.record import _CHAIN_ID, MARKER_PREFIX, stream_stamp
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
    assert any(x == " " + forged for x in lines)  # the text itself is kept


def test_guarded_log_lines_without_a_marker_are_unchanged(
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
    assert out.getvalue().splitlines()[-1] == "lines {not a record}"
