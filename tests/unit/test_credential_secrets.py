"""SecretFile: a Secret mounted the way the kubelet mounts it (``name -> ..data/name``,
``..data -> ..<timestamp>``), re-read when the kubelet swaps ``..data``, never served once the
file is gone, and never quoted in an error."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from sidecar.credentials.secrets import MAX_SECRET_BYTES, SecretFile
from sidecar.errors import CredentialUnavailable

CANARY = "canary-7f3e9b1c-secret"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class KubeletSecret:
    """A Secret volume as the kubelet's atomic writer lays it out: each update writes a new
    ``..<timestamp>`` directory, points a temporary symlink at it, renames that over ``..data``
    (atomic) and removes the old directory; each key is a symlink ``key -> ..data/key``."""

    _serial = itertools.count(1)

    def __init__(self, root: Path, values: Mapping[str, str | bytes]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._current: Path | None = None
        self.update(values)

    def path(self, key: str) -> Path:
        return self.root / key

    def update(self, values: Mapping[str, str | bytes]) -> None:
        stamp = self.root / f"..2026_01_01_00_00_{next(self._serial):02d}.000000001"
        stamp.mkdir()
        for key, value in values.items():
            data = value.encode() if isinstance(value, str) else value
            (stamp / key).write_bytes(data)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.rename(tmp, self.root / "..data")
        for key in values:
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(Path("..data") / key)
        # keys no longer in the Secret: the kubelet removes their symlinks
        for link in self.root.iterdir():
            if link.is_symlink() and not link.name.startswith("..") and link.name not in values:
                link.unlink()
        if self._current is not None:
            for f in self._current.iterdir():
                f.unlink()
            self._current.rmdir()
        self._current = stamp


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"abc", "abc"),
        (b"abc\n", "abc"),
        (b"abc\r\n", "abc"),
        (b"abc\n\n", "abc\n"),
        (b" spaced value \n", " spaced value "),
        ("sécret\n".encode(), "sécret"),
    ],
)
def test_content_with_one_trailing_newline_stripped(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    f = tmp_path / "s"
    f.write_bytes(content)
    assert SecretFile(f).value() == expected


def test_kubelet_swap_is_picked_up_after_the_recheck_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    secret = KubeletSecret(tmp_path / "vol", {"token": "one"})
    source = SecretFile(secret.path("token"), recheck_every=1.0, clock=clock)
    assert source.value() == "one"
    secret.update({"token": "two"})
    clock.now += 0.5
    assert source.value() == "one"  # within the interval: the cached value, no stat
    clock.now += 0.6
    assert source.value() == "two"


def test_fresh_looks_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    secret = KubeletSecret(tmp_path / "vol", {"token": "one"})
    source = SecretFile(secret.path("token"), recheck_every=60.0, clock=clock)
    assert source.value() == "one"
    secret.update({"token": "two"})
    assert source.value() == "one"
    assert source.value(fresh=True) == "two"
    assert source.value() == "two"


def test_same_size_swap_is_seen(tmp_path: Path) -> None:
    """A rotated value of the same length still comes from a new inode."""
    secret = KubeletSecret(tmp_path / "vol", {"token": "aaaa"})
    source = SecretFile(secret.path("token"), recheck_every=0)
    assert source.value() == "aaaa"
    secret.update({"token": "bbbb"})
    assert source.value() == "bbbb"


def test_in_place_rewrite_is_seen(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text("first")
    source = SecretFile(f, recheck_every=0)
    assert source.value() == "first"
    f.write_text("second!")
    assert source.value() == "second!"


def test_within_the_interval_no_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    f = tmp_path / "s"
    f.write_text("v")
    source = SecretFile(f, recheck_every=1.0, clock=clock)
    source.value()
    calls: list[object] = []
    real_stat = os.stat

    def counting_stat(path: object) -> os.stat_result:
        calls.append(path)
        return real_stat(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    for _ in range(1000):
        source.value()
    assert calls == []
    clock.now += 1.0
    source.value()
    assert len(calls) == 1


def test_unchanged_file_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "s"
    f.write_text("v")
    source = SecretFile(f, recheck_every=0)
    source.value()
    opened: list[object] = []
    real_open = open

    def counting_open(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        return real_open(*args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    for _ in range(10):
        assert source.value() == "v"
    assert opened == []


def test_missing_file_is_unavailable_and_named(tmp_path: Path) -> None:
    f = tmp_path / "nope"
    with pytest.raises(CredentialUnavailable) as err:
        SecretFile(f).value()
    assert str(err.value) == f"secret file {f}: missing"
    assert err.value.code == "credential_unavailable"


def test_removed_key_is_unavailable_not_stale(tmp_path: Path) -> None:
    """A key removed from the Secret (its symlink gone) means revoked: the last value is not
    served."""
    secret = KubeletSecret(tmp_path / "vol", {"token": CANARY, "other": "x"})
    source = SecretFile(secret.path("token"), recheck_every=0)
    assert source.value() == CANARY
    secret.update({"other": "x"})
    with pytest.raises(CredentialUnavailable, match="missing") as err:
        source.value()
    assert CANARY not in str(err.value)


def test_deleted_file_is_unavailable_then_recovers(tmp_path: Path) -> None:
    clock = FakeClock()
    f = tmp_path / "s"
    f.write_text("v1")
    source = SecretFile(f, recheck_every=1.0, clock=clock)
    assert source.value() == "v1"
    f.unlink()
    clock.now += 1
    with pytest.raises(CredentialUnavailable, match="missing"):
        source.value()
    f.write_text("v2")
    with pytest.raises(CredentialUnavailable):  # the failure is remembered for the interval
        source.value()
    clock.now += 1
    assert source.value() == "v2"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (b"\xff\xfe" + CANARY.encode(), "not UTF-8 text"),
        (
            CANARY.encode() * (MAX_SECRET_BYTES // len(CANARY) + 1),
            f"larger than {MAX_SECRET_BYTES} bytes",
        ),
    ],
)
def test_bad_content_is_unavailable(tmp_path: Path, content: bytes, reason: str) -> None:
    f = tmp_path / "s"
    f.write_bytes(content)
    with pytest.raises(CredentialUnavailable) as err:
        SecretFile(f).value()
    assert str(err.value) == f"secret file {f}: {reason}"
    assert CANARY not in str(err.value)
    assert "\\xff" not in str(err.value)


def test_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(CredentialUnavailable, match=r"unreadable|not a regular file"):
        SecretFile(tmp_path).value()


def test_unreadable_file_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "s"
    f.write_text(CANARY)
    f.chmod(0)
    if os.geteuid() == 0:  # root reads whatever the mode: refuse the open as the kernel would

        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied", str(f))

        monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(CredentialUnavailable) as err:
        SecretFile(f).value()
    assert str(err.value) == f"secret file {f}: unreadable: Permission denied"


def test_repr_names_the_file_not_the_value(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_text(CANARY)
    source = SecretFile(f)
    source.value()
    assert CANARY not in repr(source)
    assert str(f) in repr(source)


def test_negative_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recheck_every"):
        SecretFile(tmp_path / "s", recheck_every=-1)
