"""GenerationPublisher: the one "publish a generation, persist it" mechanism of the two
single writers (revocations, agent state). A generation is recorded as the segment assigns
it; a write of the state file that fails is reported (returned, kept in health, told to the
metrics), never pretended, until a retry succeeds; the stores publish and persist in the
order of rights: what takes rights away is published first, what gives rights persisted
first."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.core import load_profiles
from sidecar.core.revocation import Revocation, make_key
from sidecar.errors import AgentStateError, ConfigError, StateWriteError
from sidecar.state import publisher as publisher_module
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.publisher import GenerationPublisher, durability_metrics
from sidecar.state.revocations import RevocationStore
from sidecar.state.shm import SharedAgentState, SharedTable
from sidecar.telemetry import metrics

T0 = 1_700_000_000.0
NS = "agents"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "profiles"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def wall() -> Clock:
    return Clock(T0)


@pytest.fixture
def mono() -> Clock:
    return Clock(100.0)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    return tmp_path / "state" / "x.json"


@pytest.fixture
def told() -> list[StateWriteError | None]:
    return []


@pytest.fixture
def pub(
    state: Path, wall: Clock, mono: Clock, told: list[StateWriteError | None]
) -> GenerationPublisher:
    return GenerationPublisher(
        state,
        describe="the test state",
        version=3,
        clock=wall,
        monotonic=mono,
        retry_every=5.0,
        on_persist=told.append,
    )


def block(state: Path) -> Path:
    """The temporary file's name taken by a directory: the write fails (EISDIR)."""
    blocker = state.with_name(f".{state.name}.tmp")
    blocker.mkdir()
    return blocker


# -- the generation ----------------------------------------------------------------------------


def test_publish_records_each_generation_and_when_it_became_visible(
    tmp_path: Path, wall: Clock
) -> None:
    table = SharedTable.create(tmp_path / "table")
    reader = SharedTable.attach(tmp_path / "table")
    pub = GenerationPublisher(None, describe="revocations", clock=wall)
    assert (pub.generation, pub.visible_at) == (0, 0.0)
    first = pub.publish(lambda: table.write([], True))
    assert pub.generation == first == reader.read().generation
    assert pub.visible_at == T0
    wall.t += 1
    second = pub.publish(lambda: table.write([], True))
    assert second == first + 2  # the seqlock: odd while writing, even when done
    assert (pub.generation, pub.visible_at) == (second, T0 + 1)
    assert reader.read().generation == second


# -- persisting --------------------------------------------------------------------------------


def test_persist_writes_the_versioned_document_durably(
    pub: GenerationPublisher, state: Path, told: list[StateWriteError | None]
) -> None:
    assert pub.persist(lambda: {"items": [1, 2]}) is None
    assert json.loads(state.read_text()) == {"version": 3, "items": [1, 2]}
    assert list(json.loads(state.read_text())) == ["version", "items"]  # version first
    assert pub.durable and not pub.failing and told == [None]
    assert pub.health() == {"durable": True, "file": str(state), "error": None}
    assert pub.encoded_size({"items": [1, 2]}) == len('{"version":3,"items":[1,2]}')


def test_without_a_file_nothing_is_written_and_nothing_is_durable(
    tmp_path: Path, told: list[StateWriteError | None]
) -> None:
    pub = GenerationPublisher(None, describe="x", on_persist=told.append)

    def body() -> dict[str, Any]:
        raise AssertionError("not built: there is no file")

    assert pub.persist(body) is None and pub.retry(body) is None
    assert not pub.persistent and not pub.durable and not pub.failing and told == []
    assert pub.health() == {"durable": False, "file": None, "error": None}
    assert pub.load(lambda d: d, what="x state") is None


def test_a_failed_write_is_reported_kept_and_made_durable_by_a_later_retry(
    pub: GenerationPublisher,
    state: Path,
    wall: Clock,
    mono: Clock,
    told: list[StateWriteError | None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert pub.persist(lambda: {"n": 1}) is None
    blocker = block(state)
    with caplog.at_level(logging.WARNING, logger=publisher_module.__name__):
        err = pub.persist(lambda: {"n": 2})
        # Reported, not pretended: the error names the file and the OS error...
        assert isinstance(err, StateWriteError)
        assert err.file == str(state) and "EISDIR" in err.os_error
        # ...and is kept for readiness and told to the metrics.
        assert not pub.durable and pub.failing and told[-1] is err
        assert pub.health() == {
            "durable": False,
            "file": str(state),
            "error": err.os_error,
            "since": T0,
            "failures": 1,
        }
        assert json.loads(state.read_text())["n"] == 1  # the last good file stays
        wall.t += 7
        mono.t += 7
        again = pub.persist(lambda: {"n": 3})
        assert again is not None
        assert pub.health()["failures"] == 2 and pub.health()["since"] == T0  # since the first
        # A retry that is not due yet writes nothing and answers the kept failure.
        mono.t += 1
        not_due = pub.retry(lambda: {"n": 4})
        assert not_due is not None and not_due.os_error == err.os_error
        assert pub.health()["failures"] == 2
        blocker.rmdir()
        assert pub.retry(lambda: {"n": 5}) is not None  # still not due: nothing written
        assert json.loads(state.read_text())["n"] == 1
        mono.t += 5
        assert pub.retry(lambda: {"n": 6}) is None
    assert json.loads(state.read_text()) == {"version": 3, "n": 6}
    assert pub.durable and told[-1] is None
    assert pub.health() == {"durable": True, "file": str(state), "error": None}
    assert pub.retry(lambda: {"n": 7}) is None  # durable: nothing to retry, nothing written
    assert json.loads(state.read_text())["n"] == 6
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "could not persist the test state" in errors[0].getMessage()
    assert "the test state persisted to" in caplog.text and "again: durable" in caplog.text


def test_a_failing_listener_does_not_hide_the_write(
    state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(_: StateWriteError | None) -> None:
        raise RuntimeError("metrics down")

    pub = GenerationPublisher(state, describe="x", on_persist=broken)
    with caplog.at_level(logging.ERROR, logger=publisher_module.__name__):
        assert pub.persist(lambda: {}) is None
    assert state.exists() and "persistence listener failed" in caplog.text


def test_durability_metrics(state: Path) -> None:
    pub = GenerationPublisher(state, describe="x", on_persist=durability_metrics("test-publisher"))

    def sample(name: str) -> float | None:
        return metrics.REGISTRY.get_sample_value(name, {"file": "test-publisher"})

    before = sample("mandate_state_write_failures_total") or 0.0
    blocker = block(state)
    pub.persist(lambda: {})
    assert sample("mandate_state_durable") == 0.0
    assert sample("mandate_state_write_failures_total") == before + 1
    blocker.rmdir()
    pub.persist(lambda: {})
    assert sample("mandate_state_durable") == 1.0


# -- loading -----------------------------------------------------------------------------------


def test_load_parses_the_file_of_this_version(pub: GenerationPublisher, state: Path) -> None:
    assert pub.load(lambda d: d["items"], what="test state") is None  # no file yet
    state.write_text(json.dumps({"version": 3, "items": ["a"]}))
    assert pub.load(lambda d: d["items"], what="test state") == ["a"]


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", json.dumps({"version": 1, "items": []}), json.dumps({"version": 3})],
)
def test_a_file_that_cannot_be_read_is_a_config_error_naming_it(
    pub: GenerationPublisher, state: Path, content: str
) -> None:
    state.write_text(content)
    with pytest.raises(ConfigError) as exc:
        pub.load(lambda d: d["items"], what="test state", hint="; move it aside")
    message = str(exc.value)
    assert message.startswith(f"test state {state}: cannot be read (")
    assert message.endswith("; move it aside")


# -- the order of rights, in both stores -------------------------------------------------------


@pytest.fixture
def order(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records "persist" (a write of a state file) and "publish" (a table generation)."""
    seen: list[str] = []
    write = publisher_module.write_json_durably

    def persisting(path: Path, doc: Any, *, indent: int | None = None) -> None:
        seen.append("persist")
        write(path, doc, indent=indent)

    real_publish = GenerationPublisher.publish

    def publishing(self: GenerationPublisher, w: Any) -> int:
        seen.append("publish")
        return real_publish(self, w)

    monkeypatch.setattr(publisher_module, "write_json_durably", persisting)
    monkeypatch.setattr(GenerationPublisher, "publish", publishing)
    yield seen


def revocation(agent: str) -> Revocation:
    return Revocation(
        key=make_key("admin", NS, agent), agent=agent, namespace=NS, reason="stop",
        source="admin", name=agent, created_at=T0,
    )  # fmt: skip


def test_revocations_are_published_first_restores_persisted_first(
    tmp_path: Path, state: Path, order: list[str]
) -> None:
    store = RevocationStore(SharedTable.create(tmp_path / "table"), state, clock=lambda: T0)
    store.upsert(revocation("a"), durable=True)  # takes rights away: in force at once
    assert order == ["publish", "persist"]
    order.clear()
    store.remove_matching(lambda r: r.agent == "a", durable=True)  # gives them back
    assert order == ["persist", "publish"]


def test_agent_state_gives_rights_only_once_persisted_and_takes_them_away_at_once(
    tmp_path: Path, state: Path, order: list[str]
) -> None:
    snapshot = load_profiles(FIXTURES)
    wall = Clock(T0)
    audited: list[str] = []

    def audit(event: dict[str, Any]) -> None:
        audited.append(event["type"])
        order.append("audit")

    store = AgentStateStore(
        SharedAgentState.create(tmp_path / "ctx"), state, lambda: snapshot, clock=wall,
        audit=audit,
    )  # fmt: skip
    store.report_task("billing-agent", NS, "T-1", "report", 10)
    assert order == ["persist", "audit", "publish"]
    order.clear()
    wall.t += 11
    assert store.prune() == 1  # the task ran out
    assert order == ["publish", "persist"]
    # A write that fails gives nothing: not published, not audited.
    order.clear()
    generation = store.generation
    block(state)
    with pytest.raises(AgentStateError, match="cannot store this change durably") as exc:
        store.report_task("billing-agent", NS, "T-2", "report", 10)
    assert exc.value.status == "UNAVAILABLE"
    assert order == ["persist"] and store.generation == generation
    assert audited == ["task_reported"] and store.health()["persistence"]["durable"] is False
