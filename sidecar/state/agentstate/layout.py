"""What of the agents' state the workers see: one publication of the shared context table.

A table too small for everything never empties it for all agents: the agents with the
largest share have their grants and tasks withheld (fail closed for them alone: fewer
rights), one at a time, until the rest fits. Risk scores are never withheld, so risk-based
denial keeps working for every agent, the withheld ones included. Only if the risk scores
alone do not fit is the table published as overflowed: readers then see no grant, no task
and the maximum risk for every agent (fail closed). The store refuses a change that would
leave its own agent withheld, rather than store it unseen, and the change of an agent over
its fair share of a full table (the capacity over the agents in it:
:meth:`Layout.over_fair_share`) that would withhold another agent: an agent cannot grow
until a larger one, at work, loses its context. An agent within its share is never
withheld (but for the table's own overhead).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.core.agentstate import AgentStateTable, Grant, RiskState, TaskBinding
from sidecar.state.shm import SharedAgentState
from sidecar.telemetry import metrics

__all__ = ["Layout", "TableWriter"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Layout:
    """What one publication holds: the table, the agents withheld from it (namespace,
    agent), and whether even the risk scores alone did not fit (published as overflowed)."""

    table: AgentStateTable
    withheld: frozenset[tuple[str, str]]
    overflow: bool
    size: int  # bytes of the table's JSON
    # When everything did not fit: each agent's grants and tasks, in bytes of the table
    shares: Mapping[tuple[str, str], int] = field(default_factory=dict)
    capacity: int = 0  # the table's, in bytes

    def over_fair_share(self, agent: tuple[str, str]) -> bool:
        """Whether ``agent`` holds more of a table that is full than its fair share (the
        capacity over the agents with grants or tasks in it)."""
        if not self.shares:
            return False
        return self.shares.get(agent, 0) > self.capacity // len(self.shares)


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


class TableWriter:
    """The shared agent-state table as its one writer sees it: lays the state out to fit, writes
    it, and remembers who is withheld (logs and metrics when that changes). Not thread-safe:
    the store's lock."""

    def __init__(self, table: SharedAgentState) -> None:
        self._table = table
        self.withheld: frozenset[tuple[str, str]] = frozenset()
        self.overflow = False
        self.size = 0

    def lay_out(
        self,
        grants: Collection[Grant],
        tasks: Collection[TaskBinding],
        risks: Collection[RiskState],
    ) -> Layout:
        """The table to publish. If everything does not fit, withhold the grants and tasks
        of the agent with the largest share, then the next, until the rest fits: one agent
        that fills the table loses its own context, never another agent's."""
        table = AgentStateTable.build(0, grants, tasks, risks)
        capacity = self._table.capacity
        size = len(self._table.encode(table))
        if size <= capacity:
            return Layout(table, frozenset(), False, size)
        share: dict[tuple[str, str], int] = {}
        entries: list[Grant | TaskBinding] = [*grants, *tasks]
        for entry in entries:
            key = (entry.namespace, entry.agent)
            share[key] = share.get(key, 0) + len(_compact(entry.as_dict())) + 1
        withheld: set[tuple[str, str]] = set()
        for key in sorted(share, key=lambda k: (-share[k], k)):
            withheld.add(key)
            size -= share[key]
            if size > capacity:
                continue
            table = AgentStateTable.build(
                0,
                (g for g in grants if (g.namespace, g.agent) not in withheld),
                (t for t in tasks if (t.namespace, t.agent) not in withheld),
                risks,
                withheld,
            )
            size = len(self._table.encode(table))
            if size <= capacity:
                return Layout(table, frozenset(withheld), False, size, share, capacity)
        # Every agent withheld, and said so in the table (a reader that could read it must
        # not take it for one where nobody is withheld).
        table = AgentStateTable.build(0, (), (), risks, share)
        size = len(self._table.encode(table))
        return Layout(table, frozenset(share), True, size, share, capacity)

    def write(self, layout: Layout) -> int:
        """Publish ``layout`` to shared memory; return its generation."""
        generation = None if layout.overflow else self._table.try_write(layout.table)
        if generation is None:  # only the risk scores, and even they do not fit
            generation = self._table.write(layout.table)
        if layout.withheld != self.withheld or layout.overflow != self.overflow:
            for ns, agent in layout.withheld - self.withheld:
                log.error(
                    "the context table is full: the grants and tasks of agent %s/%s are "
                    "withheld from the workers (its calls get none of them)", ns, agent,
                )  # fmt: skip
                metrics.CONTEXT_WITHHELD.labels(agent).set(1)
            for _, agent in self.withheld - layout.withheld:
                log.warning("the context table has room again for agent %s", agent)
                metrics.CONTEXT_WITHHELD.labels(agent).set(0)
            if layout.overflow:
                log.error("the context table cannot hold even the risk scores: failing closed")
            metrics.CONTEXT_TABLE_OVERFLOW.set(1 if layout.overflow else 0)
        self.withheld, self.overflow = layout.withheld, layout.overflow
        self.size = layout.size
        return generation

    def health(self) -> dict[str, Any]:
        return {
            "bytes": self.size,
            "capacity": self._table.capacity,
            "withheld": [f"{ns}/{agent}" for ns, agent in sorted(self.withheld)],
            "overflow": self.overflow,
        }
