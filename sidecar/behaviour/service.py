"""Behaviour analysis on the supervisor: feeds Envoy's access-log events to the engine
(core/behaviour.py), publishes each agent's risk score to the shared context table (workers
deny on it in `enforce` mode), exports it as a metric, and revokes an agent whose score
reaches its profile's `revokeAtRisk` — through the same revocation store an operator's
revocation goes through (source `behaviour`, the explanation as reason), audited.

Each tick also publishes, for the agents past their learning period, the engine's
:class:`~sidecar.core.behaviour.Baseline` (:meth:`BehaviourService.baselines`, one
immutable generation per tick): a Check served in this process scores the call's own
novelty against it before the call is made (`sidecar.core.callrisk`): refused in `enforce`
mode, allowed and marked (what enforce would have refused) in `monitor` mode. Check workers in
other processes do not get it (the learned sets are too large for the shared context
table's whole-table publications): they decide on the published score only.

Only agents whose profile has a `behavior:` section are analysed. A behaviour revocation
ends like an admin one (`mandate restore`, the admin API) or when an operator deletes the
AgentRevocation object it created; the agent's recent window is then cleared so that the
calls that caused it do not revoke it again at once (its learned baseline is kept).
Baselines persist to STATE_DIR/behaviour.json so they survive restarts.
No decision logic here (that is core/behaviour.py and decide()); no network I/O.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sidecar.core.agentstate import RiskState
from sidecar.core.behaviour import Baseline, BehaviourEngine, BehaviourSettings, CallEvent, Risk
from sidecar.core.callrisk import NO_BASELINES
from sidecar.core.revocation import Revocation, make_key
from sidecar.core.snapshot import Snapshot
from sidecar.errors import ConfigError
from sidecar.state.agentstate import AgentStateStore
from sidecar.state.revocations import Change, RevocationStore
from sidecar.state.statefile import write_json_durably
from sidecar.telemetry import metrics

__all__ = ["BehaviourService"]

log = logging.getLogger(__name__)
SOURCE = "behaviour"


class BehaviourService:
    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        context: AgentStateStore,
        revocations: RevocationStore,
        namespace: str,
        *,
        state_file: Path | None = None,
        audit: Callable[[dict[str, Any]], object] = lambda _: None,
        on_revoke: Callable[[Revocation], None] = lambda _: None,
        clock: Callable[[], float] = time.time,
        engine: BehaviourEngine | None = None,
    ) -> None:
        self.engine = engine or BehaviourEngine()
        self._snapshot = snapshot
        self._context = context
        self._revocations = revocations
        self._namespace = namespace
        self._state_file = state_file
        self._audit = audit
        self._on_revoke = on_revoke
        self._clock = clock
        self._lock = threading.Lock()  # save() runs in a thread of its own (to_thread)
        self._settings: dict[str, BehaviourSettings] = {}
        self._settings_of: Snapshot | None = None
        self.observed = 0
        self.ignored = 0
        self._baselines: Mapping[tuple[str, str], Baseline] = NO_BASELINES
        revocations.subscribe(self._on_revocations)

    # -- input (the access log service, on the supervisor's loop) ------------------------

    def observe(self, events: Sequence[CallEvent]) -> None:
        with self._lock:
            settings = self._current_settings()
            for e in events:
                s = settings.get(e.agent)
                if s is None or e.namespace != self._namespace:
                    self.ignored += 1
                    continue
                self.engine.observe(e, s)
                self.observed += 1

    def _current_settings(self) -> dict[str, BehaviourSettings]:
        snap = self._snapshot()
        if snap is not self._settings_of:
            self._settings_of = snap
            self._settings = {}
            for name, agent in (snap.agents if snap is not None else {}).items():
                if agent.behavior is not None:
                    self._settings[name] = agent.behavior
        return self._settings

    # -- scoring (the supervisor's loop) --------------------------------------------------

    def baselines(self) -> Mapping[tuple[str, str], Baseline]:
        """The baselines of the agents past learning, by (namespace, agent), as of the last
        tick: read only, replaced whole by each tick (no lock)."""
        return self._baselines

    def tick(self) -> list[RiskState]:
        """Score every analysed agent; publish the scores (and the baselines of the agents
        past learning); revoke where the profile says so."""
        now = self._clock()
        states: list[RiskState] = []
        to_revoke: list[tuple[str, Risk, BehaviourSettings]] = []
        baselines: dict[tuple[str, str], Baseline] = {}
        with self._lock:
            settings = self._current_settings()
            for ns, agent in self.engine.agents():
                s = settings.get(agent)
                if s is None or ns != self._namespace:
                    continue
                risk = self.engine.score(ns, agent, now, s)
                state = RiskState(
                    agent=agent,
                    namespace=ns,
                    score=round(risk.score, 4),
                    explanation=risk.explanation(),
                    contributions=dict(risk.contributions),
                    learning=risk.learning,
                    updated_at=now,
                )
                states.append(state)
                metrics.RISK.labels(agent).set(risk.score)
                if not risk.learning:  # enforce refuses on it, monitor says it would
                    base = self.engine.baseline(ns, agent, now, s)
                    if base is not None:
                        baselines[(ns, agent)] = base
                if (
                    s.mode == "enforce"
                    and s.revoke_at is not None
                    and not risk.learning
                    and risk.score >= s.revoke_at
                ):
                    to_revoke.append((agent, risk, s))
        self._context.set_risks(states)
        # After the scores: a Check never pairs a new baseline (its last tool) with a score
        # that does not count that tool's call yet.
        self._baselines = MappingProxyType(baselines) if baselines else NO_BASELINES
        for agent, risk, s in to_revoke:
            self._revoke(agent, risk, s, now)
        return states

    def _revoke(self, agent: str, risk: Risk, s: BehaviourSettings, now: float) -> None:
        key = make_key(SOURCE, self._namespace, agent)
        if any(r.key == key for r in self._revocations.entries(SOURCE)):
            return
        rev = Revocation(
            key=key,
            agent=agent,
            namespace=self._namespace,
            reason=f"behaviour: {risk.explanation()} (revokeAtRisk {s.revoke_at:.2f})",
            source=SOURCE,
            name=agent,
            created_at=now,
        )
        self._revocations.upsert(rev)
        metrics.AUTO_REVOCATIONS.inc()
        log.warning("revoked %s automatically: %s", agent, rev.reason)
        self._audit(
            {
                "type": "revocation_automatic",
                "agent": agent,
                "namespace": self._namespace,
                "reason": rev.reason,
                "risk": round(risk.score, 4),
                "contributions": {k: round(v, 4) for k, v in risk.contributions.items()},
                "revocation": key,
            }
        )
        try:
            self._on_revoke(rev)
        except Exception:  # publishing elsewhere (Kubernetes) never undoes the revocation
            log.exception("reporting the automatic revocation of %s failed", agent)

    def _on_revocations(self, change: Change) -> None:
        _, removed, _, _ = change
        for r in removed:
            if r.source == SOURCE:
                with self._lock:
                    self.engine.clear_window(r.namespace, r.agent)
                log.info("behaviour revocation of %s ended; its window was cleared", r.agent)

    # -- persistence ----------------------------------------------------------------------

    def load(self) -> int:
        path = self._state_file
        if path is None or not path.exists():
            return 0
        try:
            data = json.loads(path.read_text())
            with self._lock:
                self.engine.import_state(data)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"behaviour state {path}: cannot be read ({exc})") from None
        return len(self.engine.agents())

    def save(self) -> None:
        path = self._state_file
        if path is None:
            return
        with self._lock:
            data = self.engine.export_state()
        try:
            write_json_durably(path, data)
        except OSError:
            log.exception("saving the behaviour baselines to %s failed", path)
