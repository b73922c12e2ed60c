"""The agents' behaviour risk scores, as behaviour analysis last computed them.

Only a change that matters is kept (a score that moved by 0.01 or more, or the end of the
learning period), so the table is not republished for noise. Explanations are cut to
`MAX_RISK_EXPLANATION` characters: they name hosts the agent chose, and a risk score must
always fit in the shared table (risk scores are never withheld, see `layout`). Not
persisted: analysis recomputes them. In memory only; the store holds the lock.
"""

from __future__ import annotations

from collections.abc import Iterable, ValuesView
from dataclasses import replace

from sidecar.core.agentstate import RiskState
from sidecar.state.agentstate.limits import MAX_RISK_EXPLANATION

__all__ = ["Risks"]


class Risks:
    """Risk scores by (namespace, agent). Not thread-safe: the store's lock."""

    def __init__(self) -> None:
        self._by_agent: dict[tuple[str, str], RiskState] = {}

    def get(self, namespace: str, agent: str) -> RiskState | None:
        return self._by_agent.get((namespace, agent))

    def values(self) -> ValuesView[RiskState]:
        return self._by_agent.values()

    def ordered(self) -> list[RiskState]:
        return sorted(self._by_agent.values(), key=lambda r: (r.namespace, r.agent))

    def update(self, risks: Iterable[RiskState]) -> bool:
        """Keep the scores that changed enough; True if any did (publish them)."""
        changed = False
        for r in risks:
            if len(r.explanation) > MAX_RISK_EXPLANATION:
                r = replace(r, explanation=r.explanation[: MAX_RISK_EXPLANATION - 3] + "...")
            old = self._by_agent.get((r.namespace, r.agent))
            if old is None or abs(old.score - r.score) >= 0.01 or old.learning != r.learning:
                self._by_agent[(r.namespace, r.agent)] = r
                changed = True
        return changed
