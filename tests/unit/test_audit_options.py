"""`--audit-reserve` (issue 15, finding 5): the sizes it takes, and that `mandate run` hands
it to every worker with the other audit options."""

from __future__ import annotations

import argparse

import pytest

from sidecar.cli import _audit_args, _size


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


def test_run_hands_the_reserve_to_workers() -> None:
    args = argparse.Namespace(
        audit_dir="/a", audit_allows="all", audit_on_failure="fail-closed",
        audit_fsync="interval", audit_reserve=1 << 20,
    )  # fmt: skip
    out = _audit_args(args)
    assert out[out.index("--audit-reserve") + 1] == str(1 << 20)
