"""The tasks agents report (`ReportTask`): a later call may carry only the task id and get
the purpose it was reported for. Bounded per agent: at `MAX_TASKS_PER_AGENT`, the agent's
own oldest task makes room, never another agent's.

In memory only: the store holds the lock, commits (persist, audit, publish) and undoes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, ValuesView
from typing import Any

from sidecar.core.agentstate import TaskBinding
from sidecar.core.snapshot import CompiledAgent
from sidecar.core.timefmt import utc_seconds
from sidecar.errors import AgentStateError
from sidecar.state.agentstate.limits import MAX_TASKS_PER_AGENT, check_seconds

__all__ = ["TaskKey", "Tasks", "new_task"]

TaskKey = tuple[str, str, str]  # (namespace, agent, task)
_TASK = re.compile(r"^[\x21-\x7e]{1,128}$")


def new_task(
    compiled: CompiledAgent,
    agent: str,
    namespace: str,
    task: str,
    purpose: str,
    ttl: float | None,
    now: float,
) -> tuple[TaskBinding, dict[str, Any]]:
    """The binding ``agent``'s `ReportTask` asks for, and its audit record; AgentStateError
    if it cannot be. Built before anything is stored: a record that cannot be made stores
    nothing."""
    if not _TASK.match(task):
        raise AgentStateError("task_id must be 1-128 visible ASCII characters")
    if purpose not in compiled.purposes:
        known = ", ".join(sorted(compiled.purposes))
        raise AgentStateError(
            f"unknown purpose {purpose[:64]!r} for agent {agent!r} (known: {known})",
            "NOT_FOUND",
        )
    ttl = check_seconds("ttl", ttl)
    binding = TaskBinding(agent, namespace, task, purpose, now, None if ttl is None else now + ttl)
    event = {
        "type": "task_reported", "agent": agent, "namespace": namespace, "task": task,
        "purpose": purpose,
        "expires": None if binding.expires_at is None else utc_seconds(binding.expires_at),
    }  # fmt: skip
    return binding, event


class Tasks(Mapping[TaskKey, TaskBinding]):
    """The reported tasks by (namespace, agent, task). Not thread-safe: the store's lock."""

    def __init__(self) -> None:
        self._by_key: dict[TaskKey, TaskBinding] = {}

    def __getitem__(self, key: TaskKey) -> TaskBinding:
        return self._by_key[key]

    def __iter__(self) -> Iterator[TaskKey]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def values(self) -> ValuesView[TaskBinding]:
        return self._by_key.values()  # the dict's own view: no lookup per task

    def of(self, namespace: str, agent: str) -> list[TaskBinding]:
        """The agent's tasks, oldest first."""
        return sorted(
            (t for t in self._by_key.values() if t.namespace == namespace and t.agent == agent),
            key=lambda t: t.reported_at,
        )

    # -- changes ---------------------------------------------------------------------------

    def report(self, binding: TaskBinding, now: float) -> None:
        """Keep ``binding`` (replacing the agent's task of that id). At the bound, the
        agent's own expired tasks go first, then its own oldest."""
        namespace, agent, task = binding.namespace, binding.agent, binding.task
        mine = [
            k
            for k, t in self._by_key.items()
            if t.namespace == namespace and t.agent == agent and k[2] != task
        ]
        for k in [k for k in mine if not self._by_key[k].active(now)]:
            del self._by_key[k]  # its own expired tasks first
            mine.remove(k)
        mine.sort(key=lambda k: (self._by_key[k].reported_at, k))
        for k in mine[: max(0, len(mine) - MAX_TASKS_PER_AGENT + 1)]:
            del self._by_key[k]
        self._by_key[(namespace, agent, task)] = binding

    def discard(self, key: TaskKey) -> None:
        self._by_key.pop(key, None)

    def expire(self, now: float) -> int:
        """Drop the tasks that ran out; return how many."""
        old = [k for k, t in self._by_key.items() if not t.active(now)]
        for k in old:
            del self._by_key[k]
        return len(old)

    def trim(self) -> bool:
        """Hold every agent to MAX_TASKS_PER_AGENT, keeping its newest (a file written before
        the bound existed); True if any was dropped."""
        dropped = False
        by_agent: dict[tuple[str, str], list[TaskKey]] = {}
        for k, t in self._by_key.items():
            by_agent.setdefault((t.namespace, t.agent), []).append(k)
        for keys in by_agent.values():
            keys.sort(key=lambda k: (self._by_key[k].reported_at, k))
            for k in keys[: max(0, len(keys) - MAX_TASKS_PER_AGENT)]:
                del self._by_key[k]
                dropped = True
        return dropped

    # -- undo and persistence --------------------------------------------------------------

    def saved(self) -> dict[TaskKey, TaskBinding]:
        return dict(self._by_key)

    def restore(self, saved: Mapping[TaskKey, TaskBinding]) -> None:
        self._by_key = dict(saved)

    def load(self, tasks: Iterable[TaskBinding]) -> None:
        self._by_key = {(t.namespace, t.agent, t.task): t for t in tasks}

    def as_list(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self._by_key.values()]
