"""The tasks agents report (`ReportTask`): a later call may carry only the task id and get
the purpose it was reported for, within the task's declaration if it made one
(`core.taskscope`). Bounded per agent: at `MAX_TASKS_PER_AGENT` tasks, or
`MAX_DECLARED_BYTES_PER_AGENT` of declarations, the agent's own expired tasks, then its own
oldest tasks without a declaration make room, never another agent's. An active task with a
declaration is never dropped or changed while it lasts (it must have a TTL): reporting it
again with the same purpose and declaration returns it unchanged (a retry), anything else is
refused, and a report that would need its room is refused (RESOURCE_EXHAUSTED).

In memory only: the store holds the lock, commits (persist, audit, publish) and undoes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, ValuesView
from typing import Any

from sidecar.core.agentstate import TaskBinding
from sidecar.core.snapshot import CompiledAgent
from sidecar.core.taskscope import DeclarationError, declaration_key, validate_declaration
from sidecar.core.timefmt import utc_seconds
from sidecar.errors import AgentStateError
from sidecar.headers import TASK_ID, TASK_ID_RULE
from sidecar.state.agentstate.limits import (
    MAX_DECLARED_BYTES_PER_AGENT,
    MAX_ENDED_PER_AGENT,
    MAX_TASKS_PER_AGENT,
    check_seconds,
)

__all__ = ["TaskKey", "Tasks", "new_task"]

TaskKey = tuple[str, str, str]  # (namespace, agent, task)


def new_task(
    compiled: CompiledAgent,
    agent: str,
    namespace: str,
    task: str,
    purpose: str,
    ttl: float | None,
    now: float,
    allow: Iterable[object] = (),
) -> tuple[TaskBinding, dict[str, Any]]:
    """The binding ``agent``'s `ReportTask` asks for (``allow``: its declaration, empty for
    none), and its audit record; AgentStateError if it cannot be. Built before anything is
    stored: a record that cannot be made stores nothing."""
    if not TASK_ID.fullmatch(task):
        raise AgentStateError(f"task_id must be {TASK_ID_RULE}")
    if purpose not in compiled.purposes:
        known = ", ".join(sorted(compiled.purposes))
        raise AgentStateError(
            f"unknown purpose {purpose[:64]!r} for agent {agent!r} (known: {known})",
            "NOT_FOUND",
        )
    ttl = check_seconds("ttl", ttl)
    rules = list(allow)
    if rules and ttl is None:
        raise AgentStateError(
            "a task with a declaration needs a ttl: it can be neither changed nor dropped "
            "while it lasts"
        )
    try:
        declared = validate_declaration(rules) if rules else ()
    except DeclarationError as exc:
        raise AgentStateError(str(exc), "INVALID_ARGUMENT") from None
    expires = None if ttl is None else now + ttl
    binding = TaskBinding(agent, namespace, task, purpose, now, expires, declared)
    event: dict[str, Any] = {
        "type": "task_reported", "agent": agent, "namespace": namespace, "task": task,
        "purpose": purpose,
        "expires": None if binding.expires_at is None else utc_seconds(binding.expires_at),
    }  # fmt: skip
    if declared:
        event["allow"] = [dict(r) for r in declared]  # what the task said it needs, for review
    return binding, event


def _declared_bytes(t: TaskBinding) -> int:
    return len(declaration_key(t.allow).encode()) if t.allow else 0


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

    def unchanged(self, binding: TaskBinding, now: float) -> TaskBinding | None:
        """The agent's active task of ``binding``'s id if reporting ``binding`` would not
        change it (a retry of a declared task); AgentStateError (FAILED_PRECONDITION) if it
        has a declaration that ``binding`` would change; None: report it."""
        old = self._by_key.get((binding.namespace, binding.agent, binding.task))
        if old is not None and old.active(now) and old.ended:
            raise AgentStateError(
                f"task {binding.task!r} has ended and had a declaration: its id stays unusable "
                "until it would have expired; report a new task id",
                "FAILED_PRECONDITION",
            )
        if old is None or not old.active(now) or not old.allow:
            return None
        if old.purpose == binding.purpose and declaration_key(old.allow) == declaration_key(
            binding.allow
        ):
            return old
        raise AgentStateError(
            f"task {binding.task!r} has a declaration and is active: it cannot be changed "
            "(a declaration only narrows); report a new task id",
            "FAILED_PRECONDITION",
        )

    def report(self, binding: TaskBinding, now: float) -> None:
        """Keep ``binding`` (replacing the agent's task of that id). At the bounds, the
        agent's own expired tasks go first, then its own oldest tasks without a declaration;
        an active declared task is never dropped: if there is no other room, AgentStateError
        (RESOURCE_EXHAUSTED) and nothing changes. Not thread-safe (the store's lock)."""
        namespace, agent, task = binding.namespace, binding.agent, binding.task
        mine = [
            k
            for k, t in self._by_key.items()
            if t.namespace == namespace and t.agent == agent and k[2] != task
        ]
        expired = [k for k in mine if not self._by_key[k].active(now)]
        live = sorted(
            (k for k in mine if self._by_key[k].active(now) and not self._by_key[k].ended),
            key=lambda k: (self._by_key[k].reported_at, k),
        )
        droppable = [k for k in live if not self._by_key[k].allow]  # oldest first
        count = len(live) + 1
        declared = _declared_bytes(binding) + sum(_declared_bytes(self._by_key[k]) for k in live)
        drop: list[TaskKey] = []
        for k in droppable:
            if count <= MAX_TASKS_PER_AGENT and declared <= MAX_DECLARED_BYTES_PER_AGENT:
                break
            drop.append(k)
            count -= 1
        if count > MAX_TASKS_PER_AGENT or declared > MAX_DECLARED_BYTES_PER_AGENT:
            raise AgentStateError(
                f"agent {agent!r} holds {count - 1} active tasks and {declared} bytes of "
                f"declarations (at most {MAX_TASKS_PER_AGENT} and "
                f"{MAX_DECLARED_BYTES_PER_AGENT}); a declared task is never dropped while it "
                "lasts: retry when one ends",
                "RESOURCE_EXHAUSTED",
            )
        for k in (*expired, *drop):
            del self._by_key[k]
        self._by_key[(namespace, agent, task)] = binding

    def end(self, key: TaskKey, now: float) -> tuple[TaskBinding | None, dict[str, Any]]:
        """End the agent's active task ``key`` early: one without a declaration is dropped
        (None), a declared one is kept as ended (it allows nothing) until it would have
        expired; and the audit record. AgentStateError NOT_FOUND, or RESOURCE_EXHAUSTED at
        MAX_ENDED_PER_AGENT ended tasks still in their TTL."""
        namespace, agent, task = key
        old = self._by_key.get(key)
        if old is None or not old.active(now) or old.ended:
            raise AgentStateError(f"no active task {task!r} for this agent", "NOT_FOUND")
        event = {"type": "task_ended", "agent": agent, "namespace": namespace, "task": task,
                 "purpose": old.purpose, "declared": bool(old.allow)}  # fmt: skip
        if not old.allow:
            del self._by_key[key]
            return None, event
        ended = sum(
            1
            for t in self._by_key.values()
            if t.namespace == namespace and t.agent == agent and t.ended and t.active(now)
        )
        if ended >= MAX_ENDED_PER_AGENT:
            raise AgentStateError(
                f"agent {agent!r} has {ended} ended declared tasks still within their TTL (at "
                f"most {MAX_ENDED_PER_AGENT}): give tasks shorter TTLs",
                "RESOURCE_EXHAUSTED",
            )
        gone = TaskBinding(agent, namespace, task, old.purpose, old.reported_at, old.expires_at,
                           (), ended=True)  # fmt: skip
        self._by_key[key] = gone
        return gone, event

    def discard(self, key: TaskKey) -> None:
        self._by_key.pop(key, None)

    def expire(self, now: float) -> int:
        """Drop the tasks that ran out; return how many."""
        old = [k for k, t in self._by_key.items() if not t.active(now)]
        for k in old:
            del self._by_key[k]
        return len(old)

    def trim(self, now: float) -> bool:
        """Hold every agent to MAX_TASKS_PER_AGENT as `report` does (a file written before
        the bound existed): its oldest undeclared active tasks go (expired ones are left to
        `expire`, which audits them); an active declared task and an ended one within its
        TTL are never dropped (a restart must not free their ids). True if any was dropped."""
        dropped = False
        by_agent: dict[tuple[str, str], list[TaskKey]] = {}
        for k, t in self._by_key.items():
            if not t.ended and t.active(now):
                by_agent.setdefault((t.namespace, t.agent), []).append(k)
        for keys in by_agent.values():
            excess = len(keys) - MAX_TASKS_PER_AGENT
            undeclared = sorted(
                (k for k in keys if not self._by_key[k].allow),
                key=lambda k: (self._by_key[k].reported_at, k),
            )
            for k in undeclared[: max(0, excess)]:
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
