"""`--audit-reserve` (issue 15, finding 5): the sizes it takes, and that `mandate run` hands
it to every worker with the other audit options."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.cli import _parser, _settings, _size
from sidecar.run.supervisor import Supervisor, _Worker
from sidecar.settings import WorkerSettings


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("1048576", 1 << 20), ("512K", 512 << 10), ("8M", 8 << 20), ("8MiB", 8 << 20),
     ("1g", 1 << 30), (" 2M ", 2 << 20)],
)  # fmt: skip
def test_sizes(text: str, size: int) -> None:
    assert _size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1", "1.5M", "8T", "lots"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _size(text)


def test_run_hands_the_reserve_to_workers(tmp_path: Path) -> None:
    args = _parser().parse_args(
        ["run", "--profiles", "/p", "--audit-dir", "/a", "--audit-reserve", "1M"]
    )
    sup: Any = Supervisor.__new__(Supervisor)
    sup.settings, sup._workdir = _settings(args), tmp_path
    sup.table, sup.agent_state_table = SimpleNamespace(fd=7), SimpleNamespace(fd=8)
    handed = sup._worker_settings(_Worker(0, "127.0.0.1:9001", tmp_path / "w.json"))
    worker = WorkerSettings.from_json(handed.to_json())
    assert worker.run.audit.reserve_bytes == 1 << 20
    assert worker.run.audit == sup.settings.audit
