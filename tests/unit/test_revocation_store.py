"""RevocationStore: the single writer of the shared table. Every change publishes a new
generation, persists the whole set (JSON, version 1) and then tells the listeners."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.revocation import Revocation, make_key
from sidecar.errors import ConfigError, StateWriteError
from sidecar.state.revocations import STATE_VERSION, Change, RevocationStore
from sidecar.state.shm import SharedTable

NOW = 1_700_000_000.0
NS = "agents"


def rev(
    agent: str = "billing-agent",
    *,
    source: str = "admin",
    name: str = "",
    reason: str = "",
    expires_at: float | None = None,
    namespace: str = NS,
) -> Revocation:
    name = name or agent
    return Revocation(
        key=make_key(source, namespace, name),
        agent=agent,
        namespace=namespace,
        reason=reason or f"stop {agent}",
        source=source,
        name=name,
        expires_at=expires_at,
        created_at=NOW - 10,
        uid="uid-1" if source == "kubernetes" else "",
    )


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table_path(tmp_path: Path) -> Path:
    return tmp_path / "table"


@pytest.fixture
def table(table_path: Path) -> Iterator[SharedTable]:
    t = SharedTable.create(table_path, size=256 * 1024)
    yield t
    t.close()


@pytest.fixture
def reader(table: SharedTable, table_path: Path) -> Iterator[SharedTable]:
    t = SharedTable.attach(table_path)
    yield t
    t.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    return directory / "revocations.json"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(table: SharedTable, state: Path, clock: Clock) -> RevocationStore:
    return RevocationStore(table, state, clock=clock)


@pytest.fixture
def changes(store: RevocationStore) -> list[Change]:
    seen: list[Change] = []
    store.subscribe(seen.append)
    return seen


def persisted(state: Path) -> list[Revocation]:
    doc = json.loads(state.read_text())
    assert doc["version"] == STATE_VERSION == 1
    return [Revocation.from_dict(d) for d in doc["revocations"]]


def keys(entries: list[Revocation]) -> list[str]:
    return [r.key for r in entries]


# -- persistence -------------------------------------------------------------------------------


def test_each_change_is_persisted(store: RevocationStore, state: Path) -> None:
    store.load_persisted()
    assert persisted(state) == []
    store.upsert(rev("a"))
    assert persisted(state) == [rev("a")]
    store.upsert(rev("b", source="kubernetes"))
    assert persisted(state) == [rev("a"), rev("b", source="kubernetes")]
    store.remove(rev("a").key)
    assert persisted(state) == [rev("b", source="kubernetes")]
    store.replace_source("kubernetes", [])
    assert persisted(state) == []
    assert not list(state.parent.glob(".*.tmp")), "temporary file left behind"


def test_load_persisted_restores_exactly_and_stays_incomplete(
    store: RevocationStore, state: Path, tmp_path: Path, reader: SharedTable
) -> None:
    entries = [
        rev("a", expires_at=NOW + 60),
        rev("*", name="all", source="kubernetes"),
        rev("c", source="behaviour", reason="r\u00e9ason \u2603"),
    ]
    for r in entries:
        store.upsert(r)
    store.mark_complete()

    table2 = SharedTable.create(tmp_path / "table2", size=256 * 1024)
    try:
        restarted = RevocationStore(table2, state)
        assert restarted.load_persisted() == 3
        assert restarted.entries() == store.entries()
        assert not restarted.complete
        shared = table2.read()
        assert set(shared.entries) == set(entries)
        assert not shared.complete  # workers deny until the first sync
        assert not restarted.table().complete
        restarted.mark_complete()
        assert table2.read().complete
    finally:
        table2.close()


def test_load_persisted_without_a_state_file(
    table: SharedTable, tmp_path: Path, reader: SharedTable
) -> None:
    for state_file in (None, tmp_path / "never-written.json"):
        store = RevocationStore(table, state_file)
        assert store.load_persisted() == 0
        shared = reader.read()
        assert (len(shared), shared.complete) == (0, False)
        assert shared.generation > 0


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe\x00",
        b"[]",
        b'{"revocations": []}',
        b'{"version": 2, "revocations": []}',
        b'{"version": "1", "revocations": []}',
        b'{"version": 1}',
        b'{"version": 1, "revocations": 5}',
        b'{"version": 1, "revocations": ["a string"]}',
        b'{"version": 1, "revocations": [{"key": "k"}]}',
        b'{"version": 1, "revocations": [{"key": "k", "agent": "a", "namespace": "n",'
        b' "reason": "r", "source": "admin", "expires_at": "soon"}]}',
    ],
    ids=[
        "empty",
        "not-json",
        "not-utf8",
        "a-list",
        "no-version",
        "version-2",
        "version-string",
        "no-revocations",
        "revocations-not-a-list",
        "entry-a-string",
        "entry-missing-fields",
        "entry-bad-expiry",
    ],
)
def test_bad_state_file_is_an_error_naming_it_and_left_untouched(
    store: RevocationStore, state: Path, reader: SharedTable, content: bytes
) -> None:
    state.write_bytes(content)
    before = reader.read().generation
    with pytest.raises(ConfigError) as err:
        store.load_persisted()
    assert str(state) in str(err.value)
    assert state.read_bytes() == content
    assert reader.read().generation == before  # nothing published


def test_state_file_that_is_a_directory(table: SharedTable, tmp_path: Path) -> None:
    state = tmp_path / "dir.json"
    state.mkdir()
    with pytest.raises(ConfigError, match=str(state)):
        RevocationStore(table, state).load_persisted()


def test_no_state_file_persists_nothing(table: SharedTable, tmp_path: Path) -> None:
    store = RevocationStore(table, None)
    store.upsert(rev())
    assert table.read().find(NS, "billing-agent", NOW) == rev()
    assert list(tmp_path.iterdir()) == [tmp_path / "table"]


def test_fsync_failure_keeps_enforcement_and_does_not_raise(
    store: RevocationStore,
    state: Path,
    reader: SharedTable,
    changes: list[Change],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.upsert(rev("a"))

    def fail(_: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with caplog.at_level(logging.ERROR, logger="sidecar.state.revocations"):
        assert store.upsert(rev("b"))
    assert reader.read().find(NS, "b", NOW) == rev("b")
    assert keys(store.entries()) == keys([rev("a"), rev("b")])
    assert len(changes) == 2  # listeners are still told
    assert persisted(state) == [rev("a")]  # the last good state is still there
    assert "could not persist revocations" in caplog.text
    monkeypatch.undo()
    store.upsert(rev("c"))
    assert persisted(state) == [rev("a"), rev("b"), rev("c")]


def test_unwritable_state_directory_keeps_enforcement(
    table: SharedTable, tmp_path: Path, reader: SharedTable, caplog: pytest.LogCaptureFixture
) -> None:
    # The directory is gone (a root test process ignores read-only permissions).
    store = RevocationStore(table, tmp_path / "gone" / "revocations.json")
    with caplog.at_level(logging.ERROR, logger="sidecar.state.revocations"):
        store.load_persisted()
        store.upsert(rev())
        store.mark_complete()
    shared = reader.read()
    assert shared.complete
    assert shared.find(NS, "billing-agent", NOW) == rev()
    assert "could not persist revocations" in caplog.text


# -- changes -----------------------------------------------------------------------------------


def test_upsert_and_generations(
    store: RevocationStore, reader: SharedTable, changes: list[Change]
) -> None:
    assert store.upsert(rev())
    gen = store.generation
    assert reader.read().generation == gen
    assert not store.upsert(rev())  # equal: no-op
    assert store.generation == gen
    assert len(changes) == 1
    changed = rev(reason="another reason")
    assert store.upsert(changed)
    assert store.generation > gen
    added, removed, _, _ = changes[-1]
    assert (added, removed) == ([changed], [rev()])
    assert store.entries() == [changed]


def test_remove(store: RevocationStore, reader: SharedTable, changes: list[Change]) -> None:
    store.upsert(rev("a"))
    gen = store.generation
    assert store.remove("admin:agents/missing") is None
    assert store.generation == gen
    assert store.remove(rev("a").key) == rev("a")
    assert changes[-1][:2] == ([], [rev("a")])
    assert reader.read().find(NS, "a", NOW) is None


def test_remove_matching(store: RevocationStore, changes: list[Change]) -> None:
    for r in (rev("a"), rev("b"), rev("a", source="kubernetes")):
        store.upsert(r)
    gen = store.generation
    assert store.remove_matching(lambda r: r.agent == "zzz") == []
    assert store.generation == gen
    gone = store.remove_matching(lambda r: r.agent == "a")
    assert sorted(keys(gone)) == ["admin:agents/a", "kubernetes:agents/a"]
    assert keys(store.entries()) == ["admin:agents/b"]
    assert store.generation == gen + 2  # one publication for the lot


def test_entries_by_source(store: RevocationStore) -> None:
    store.upsert(rev("b"))
    store.upsert(rev("a", source="kubernetes"))
    store.upsert(rev("a"))
    assert keys(store.entries()) == ["admin:agents/a", "admin:agents/b", "kubernetes:agents/a"]
    assert keys(store.entries("kubernetes")) == ["kubernetes:agents/a"]
    assert store.entries("behaviour") == []


K = "kubernetes"


@pytest.mark.parametrize(
    ("before", "relist", "counts", "after"),
    [
        pytest.param([], [rev("a", source=K)], (1, 0), ["a"], id="add"),
        pytest.param([rev("a", source=K)], [], (0, 1), [], id="remove"),
        pytest.param([rev("a", source=K)], [rev("a", source=K)], (0, 0), ["a"], id="unchanged"),
        pytest.param(
            [rev("a", source=K)],
            [rev("a", source=K, reason="new")],
            (1, 1),
            ["a"],
            id="modified-counts-as-replaced",
        ),
        pytest.param(
            [rev("a", source=K), rev("b", source=K)],
            [rev("b", source=K), rev("c", source=K)],
            (1, 1),
            ["b", "c"],
            id="add-and-remove",
        ),
    ],
)
def test_replace_source(
    store: RevocationStore,
    reader: SharedTable,
    before: list[Revocation],
    relist: list[Revocation],
    counts: tuple[int, int],
    after: list[str],
) -> None:
    others = [rev("x"), rev("y", source="behaviour")]
    for r in before + others:
        store.upsert(r)
    gen = store.generation
    assert store.replace_source(K, relist) == counts
    assert [r.agent for r in store.entries(K)] == after
    assert store.entries("admin") == [others[0]]
    assert store.entries("behaviour") == [others[1]]
    assert (store.generation == gen) == (counts == (0, 0))
    assert set(reader.read().entries) == set(store.entries())


def test_replace_source_rejects_another_sources_entries(store: RevocationStore) -> None:
    store.upsert(rev("a", source=K))
    gen = store.generation
    with pytest.raises(ValueError, match="another source"):
        store.replace_source(K, [rev("b", source=K), rev("c", source="admin")])
    assert keys(store.entries()) == [rev("a", source=K).key]
    assert store.generation == gen


def test_mark_complete_publishes_once(store: RevocationStore, reader: SharedTable) -> None:
    store.load_persisted()
    assert not reader.read().complete
    store.mark_complete()
    gen = store.generation
    assert store.complete and reader.read().complete
    store.mark_complete()
    assert store.generation == gen


def test_prune_expired_keeps_kubernetes_entries(store: RevocationStore, clock: Clock) -> None:
    entries = [
        rev("a", expires_at=NOW + 10),
        rev("b", source="behaviour", expires_at=NOW + 10),
        rev("c", source=K, expires_at=NOW + 10),
        rev("d", expires_at=None),
        rev("e", expires_at=NOW + 100),
    ]
    for r in entries:
        store.upsert(r)
    assert store.prune_expired() == 0
    clock.now = NOW + 10  # exactly at expiry: no longer in force
    assert store.prune_expired() == 2
    assert sorted(r.agent for r in store.entries()) == ["c", "d", "e"]
    assert store.prune_expired(sources=(K,)) == 1
    assert sorted(r.agent for r in store.entries()) == ["d", "e"]


# -- listeners ---------------------------------------------------------------------------------


def test_listener_runs_after_the_shared_table_shows_the_change(
    store: RevocationStore, table_path: Path, clock: Clock
) -> None:
    seen: list[tuple[Change, Any]] = []

    def listener(change: Change) -> None:
        worker = SharedTable.attach(table_path)  # a fresh worker's view
        try:
            seen.append((change, worker.read()))
        finally:
            worker.close()

    store.subscribe(listener)
    clock.now = NOW + 5
    store.upsert(rev("a"))
    clock.now = NOW + 6
    store.remove(rev("a").key)

    (first, t1), (second, t2) = seen
    assert first == ([rev("a")], [], t1.generation, NOW + 5)
    assert t1.find(NS, "a", NOW) == rev("a")
    assert second == ([], [rev("a")], t2.generation, NOW + 6)
    assert t2.find(NS, "a", NOW) is None
    assert t2.generation > t1.generation


def test_failing_listener_does_not_break_the_store(
    store: RevocationStore,
    reader: SharedTable,
    state: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    after: list[Change] = []

    def broken(_: Change) -> None:
        raise RuntimeError("listener bug")

    store.subscribe(broken)
    store.subscribe(after.append)
    with caplog.at_level(logging.ERROR, logger="sidecar.state.revocations"):
        assert store.upsert(rev())
    assert len(after) == 1
    assert reader.read().find(NS, "billing-agent", NOW) == rev()
    assert persisted(state) == [rev()]
    assert "revocation listener failed" in caplog.text


def test_listener_may_read_the_store(store: RevocationStore) -> None:
    # listeners run under the store's (re-entrant) lock, like the supervisor's counter
    counts: list[int] = []
    store.subscribe(lambda _: counts.append(len(store.entries())))
    store.upsert(rev("a"))
    store.upsert(rev("b"))
    assert counts == [1, 2]


# -- durability (issue 15, finding 6) ------------------------------------------------------------
# A root test process ignores read-only permissions: the write is made to fail by putting a
# directory where the store's temporary file goes (open() then fails with EISDIR for anyone).


def _block(state: Path) -> Path:
    blocker = state.with_name(f".{state.name}.tmp")
    blocker.mkdir()
    return blocker


def test_operator_revoke_that_cannot_be_persisted_raises_but_stays_enforced(
    store: RevocationStore, state: Path, reader: SharedTable, clock: Clock
) -> None:
    store.upsert(rev("a"))
    blocker = _block(state)
    with pytest.raises(StateWriteError) as err:
        store.upsert(rev("b"), durable=True)
    assert err.value.code == "state_not_durable"
    assert err.value.file == str(state) and "EISDIR" in err.value.os_error
    assert str(state) in str(err.value)
    assert reader.read().find(NS, "b", NOW) == rev("b")  # fail closed: in force all the same
    assert persisted(state) == [rev("a")]
    assert store.persistence() == {
        "durable": False,
        "file": str(state),
        "error": err.value.os_error,
        "since": NOW,
        "failures": 1,
    }
    # The operator retries the same revocation: still not durable, still an error.
    with pytest.raises(StateWriteError):
        store.upsert(rev("b"), durable=True)
    assert store.persistence()["failures"] == 2
    # The volume is fixed: the retry (nothing new to publish) writes it and says durable.
    blocker.rmdir()
    assert store.upsert(rev("b"), durable=True) is False
    assert persisted(state) == [rev("a"), rev("b")]
    assert store.persistence() == {"durable": True, "file": str(state), "error": None}


def test_operator_restore_that_cannot_be_persisted_changes_nothing(
    store: RevocationStore, state: Path, reader: SharedTable, changes: list[Change]
) -> None:
    store.upsert(rev("a"))
    generation, seen = store.generation, len(changes)
    blocker = _block(state)
    with pytest.raises(StateWriteError):
        store.remove_matching(lambda r: r.agent == "a", durable=True)
    # Revoked now and after a restart alike: never "allowed now, revoked again later".
    assert keys(store.entries()) == keys([rev("a")])
    assert reader.read().find(NS, "a", NOW) == rev("a")
    assert persisted(state) == [rev("a")]
    assert (store.generation, len(changes)) == (generation, seen)
    assert store.persistence()["durable"] is False
    blocker.rmdir()
    assert store.remove_matching(lambda r: r.agent == "a", durable=True) == [rev("a")]
    assert reader.read().find(NS, "a", NOW) is None
    assert persisted(state) == []
    assert store.persistence()["durable"] is True


def test_watcher_writes_go_on_and_the_failure_is_kept_until_a_write_succeeds(
    store: RevocationStore, state: Path, reader: SharedTable
) -> None:
    told: list[StateWriteError | None] = []
    store._on_persist = told.append
    blocker = _block(state)
    kube = rev("k", source="kubernetes")
    assert store.replace_source("kubernetes", [kube]) == (1, 0)  # no exception: the watcher
    assert reader.read().find(NS, "k", NOW) == kube
    assert store.persistence()["durable"] is False
    assert isinstance(told[-1], StateWriteError)
    assert store.flush() is not None  # still blocked
    blocker.rmdir()
    assert store.flush() is None
    assert persisted(state) == [kube]
    assert store.persistence()["durable"] is True and told[-1] is None
    assert store.flush() is None  # nothing to do once durable


def test_unwritable_state_at_start_is_visible(table: SharedTable, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    store = RevocationStore(table, not_a_dir / "revocations.json")
    store.load_persisted()
    status = store.persistence()
    assert status["durable"] is False and "ENOTDIR" in status["error"]
