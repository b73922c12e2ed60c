"""Behaviour analysis on the Check path (pure): what is new in the call being decided, and
the agent's risk score with that call counted, so that `decide` refuses, in `enforce` mode,
the very call whose novelty brings the score to `denyAtRisk` (code `novel_call`) rather than
only the calls after it.

The score the supervisor publishes (`RiskState`, from Envoy's access log) counts a call only
after it completed: an injected agent's first `send_money` would always go through. Here the
call is judged before it is made, against the agent's learned state, which comes in as data:
its :class:`~sidecar.core.behaviour.Baseline` (the engine's learned tools, transitions,
fingerprints and destinations, its last tool call and its window's responses; published by
the supervisor's behaviour analysis every scoring tick) and its window's contributions as
last published.

:func:`call_novelty` says what of the four call features the call has, as the engine will
say when the access log reports it (`BehaviourEngine._facts` and `_exfiltration`: the same
sets, the same rules):
- ``new_tools``: a tool never called while learning (named with its argument shape);
- ``new_values``: a value never seen while learning of an argument the profile marks
  sensitive (compared only under the key the learned values were fingerprinted with);
- ``new_transitions``: a tool right after the agent's previous one (within the window), both
  known, never in that order while learning; not counted for a call with a new tool;
- ``exfiltration``: a request body of at least 16 KiB and 8x the learned mean, to a new
  destination (host and path template, tool or sensitive value never seen while learning),
  after the window's responses brought the agent 1 KiB or more.

:func:`project` adds the call to the window: each feature the call has gains one call's
step (its weight x 0.8), never beyond its weight; the other features keep their published
contribution; the noisy-or is taken again. So the score keeps its properties: one novelty in
a call adds at most 0.56 and never denies on a calm window; two meeting in one call (a new
tool or transition with a new sensitive value) reach 0.81 and deny it at the default
`denyAtRisk` (0.8); one call never reaches more than 0.90 on a calm window. The Check path
never revokes: the refused call is still reported by the access log, counted by the engine,
and persistent novelty then reaches `revokeAtRisk` as before. Only the four call features
are projected: the rate, volume, method-mix and denied-share features of this call are
counted after it, as before (they are shares and rates of the window, not facts of a call).

What the Check path scored is held for the agent too (:class:`Recent`, kept by the Check
pipeline, one per agent; :func:`remember`): the contribution each call feature reached with
the call counted, and the call's last tool. The published score and baseline lag the calls
by the access log's flush, the scoring tick and the call's own duration (its entry is
written when it completes): without this, an agent that makes its calls in a burst, or in
parallel, would have each judged as if it were its first since the last publication, and
no two novelties would ever meet. The next call is judged on each feature's larger
contribution, published or held (:func:`effective`: never both, so nothing is counted
twice), and follows the last tool decided (:func:`previous`, which the call's facts tell
the engine too); a call with nothing new is refused (`risk`) when the held contributions
alone are at `denyAtRisk`. A held contribution lasts one window from the last call that had
the feature (as that call's does in the engine), so it may overstate a feature whose older
calls left the window meanwhile, never understate one. A call the Check path did not judge
is kept as the engine will count it (:func:`unjudged`).

This module must not import any transport, Kubernetes or telemetry library, and does no
I/O and reads no clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from sidecar.core.behaviour import _EXFIL_FACTOR as EXFIL_FACTOR
from sidecar.core.behaviour import _EXFIL_MIN as EXFIL_MIN
from sidecar.core.behaviour import _LABEL as LABEL
from sidecar.core.behaviour import _READ_MIN as READ_MIN
from sidecar.core.behaviour import _STEP as STEP
from sidecar.core.behaviour import FEATURES, Baseline
from sidecar.core.callfacts import CallFacts, Fingerprint

__all__ = [
    "NOTHING_HELD",
    "NO_BASELINES",
    "NO_RECENT",
    "CallNovelty",
    "CallScoring",
    "Recent",
    "call_novelty",
    "counted",
    "current",
    "effective",
    "explain",
    "held",
    "noisy_or",
    "previous",
    "project",
    "reached",
    "remember",
    "told",
    "unjudged",
]

NO_BASELINES: Mapping[tuple[str, str], Baseline] = MappingProxyType({})
_CALL_FEATURES = ("new_tools", "new_values", "new_transitions", "exfiltration")


_NONE_HELD: Mapping[str, tuple[float, float]] = MappingProxyType({})


class Recent(NamedTuple):
    """What the Check path counted of one agent's latest calls (see the module docstring):
    per call feature, the contribution it brought that feature to and when (``held``), and
    the last tool called and when. (A named tuple: one is made per Check.)"""

    held: Mapping[str, tuple[float, float]] = _NONE_HELD
    tool: str = ""
    tool_at: float = 0.0
    epoch: int = 0  # the agent's window epoch (`Baseline.epoch`) it was counted in


NOTHING_HELD = Recent()
NO_RECENT: Mapping[tuple[str, str], Recent] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CallScoring:
    """What `decide` needs to score a call on the Check path: the agents' baselines by
    (namespace, agent) (one generation, read only), how the call's sensitive values are
    fingerprinted (the key the access log's facts use; None: no fingerprints, so no
    ``new_values``) and what the Check path last scored per agent (``recent``, read only
    here: its owner writes a decision's `Decision.scored` back)."""

    baselines: Mapping[tuple[str, str], Baseline]
    fingerprint: Fingerprint | None = None
    key_id: str = ""
    recent: Mapping[tuple[str, str], Recent] = field(default_factory=lambda: NO_RECENT)


@dataclass(frozen=True, slots=True)
class CallNovelty:
    """What is new in one call (empty: nothing). Each member names what was new."""

    tools: tuple[str, ...] = ()  # "send_money(amount:n,to:s)"
    values: tuple[str, ...] = ()  # the sensitive arguments with a new value
    transitions: tuple[str, ...] = ()  # "read_inbox -> send_money"
    exfiltration: str = ""  # "20 KiB to send_email after reading 3 KiB"

    def __bool__(self) -> bool:
        return bool(self.tools or self.values or self.transitions or self.exfiltration)

    def features(self) -> dict[str, str]:
        """Feature -> what was new, for the features the call has."""
        out: dict[str, str] = {}
        if self.tools:
            out["new_tools"] = ", ".join(self.tools)
        if self.values:
            out["new_values"] = ", ".join(self.values)
        if self.transitions:
            out["new_transitions"] = ", ".join(self.transitions)
        if self.exfiltration:
            out["exfiltration"] = self.exfiltration
        return out


NOTHING_NEW = CallNovelty()


def call_novelty(
    base: Baseline,
    facts: CallFacts,
    destination: str,
    request_bytes: int,
    now: float,
    recent: Recent | None = None,
) -> CallNovelty:
    """What of the call (its ``facts``, its ``destination`` as `behaviour.destination` makes
    it, its request body's size) is new against ``base`` at ``now``. It follows the tool
    decided before it (:func:`previous`)."""
    tools: list[str] = []
    steps: list[str] = []
    known = base.tools
    prev = previous(base, recent, now)
    for i, tool in enumerate(facts.tools):
        if tool not in known:
            shape = facts.shapes[i] if i < len(facts.shapes) else ""
            tools.append(f"{tool}({shape})"[:LABEL])
        elif prev in known and (prev, tool) not in base.transitions:
            steps.append(f"{prev} -> {tool}")
        prev = tool
    values: list[str] = []
    if facts.values and (facts.key_id == base.value_key or not base.value_key):
        for arg, fp in facts.values:
            if fp not in base.values:
                values.append(arg)
                break  # the engine counts the call once, naming its first new value
    transitions = tuple(steps) if steps and not tools else ()
    exfiltration = ""
    if request_bytes >= EXFIL_MIN and request_bytes >= EXFIL_FACTOR * base.out_mean:
        novel = bool(tools or values) or destination not in base.destinations
        read = base.read(now) if novel else 0.0
        if read >= READ_MIN:
            what = facts.tools[-1] if facts.tools else destination
            exfiltration = (
                f"{request_bytes // 1024} KiB to {what} after reading {int(read) // 1024} KiB"
            )
    if not (tools or values or transitions or exfiltration):
        return NOTHING_NEW
    return CallNovelty(tuple(tools), tuple(values), transitions, exfiltration)


def previous(base: Baseline, recent: Recent | None, now: float) -> str:
    """The tool a call at ``now`` follows: the last one the Check path decided (``recent``,
    within the window; '' when it is older), as the facts tell the engine
    (`CallFacts.previous`); without ``recent`` (nothing decided since mandate started),
    the last one the access log reported (`Baseline.previous`)."""
    if recent is None or not recent.tool:
        return base.previous(now)
    return recent.tool if abs(now - recent.tool_at) <= base.window_seconds else ""


def effective(
    published: Mapping[str, float], recent: Recent | None, now: float, window: float
) -> Mapping[str, float]:
    """Each feature's contribution a call at ``now`` is judged on: the larger of the
    ``published`` one and the one ``recent`` holds, while the call that brought it there is
    within the ``window``. ``published`` itself when nothing held counts."""
    if recent is None or not recent.held:
        return published
    out: dict[str, float] | None = None
    for name, (c, at) in recent.held.items():
        if abs(now - at) <= window and c > published.get(name, 0.0):
            if out is None:
                out = dict(published)
            out[name] = c
    return published if out is None else out


def remember(
    recent: Recent | None,
    now: float,
    window: float,
    tool: str,
    reached: Mapping[str, float],
    epoch: int = 0,
) -> Recent:
    """``recent`` with a call at ``now`` counted: each feature the call has at the
    contribution it ``reached`` with it (held from ``now``: the call keeps it in the
    engine's window that long, even when it added nothing, the feature at its weight), and
    its last ``tool`` ('' none: the previous one stays); what left the ``window`` is
    dropped, and what was held in a former ``epoch`` (not the last tool: the engine keeps
    following it too) (:data:`NOTHING_HELD` when nothing is left)."""
    if not reached and (recent is None or not recent.held):  # the usual call: a tool
        if tool:
            return Recent(_NONE_HELD, tool, now, epoch)
        if recent is None or abs(now - recent.tool_at) > window:
            return NOTHING_HELD
        return Recent(_NONE_HELD, recent.tool, recent.tool_at, epoch)
    recent = current(recent, epoch)
    held: dict[str, tuple[float, float]] = {}
    last, last_at = (tool, now) if tool else ("", 0.0)
    if recent is not None:
        held = {n: v for n, v in recent.held.items() if abs(now - v[1]) <= window}
        if not tool and abs(now - recent.tool_at) <= window:
            last, last_at = recent.tool, recent.tool_at
    for name, c in reached.items():
        held[name] = (c, now)
    if not held and not last:
        return NOTHING_HELD
    return Recent(MappingProxyType(held), last, last_at, epoch)


def current(recent: Recent | None, epoch: int) -> Recent | None:
    """``recent`` as it stands in the agent's window ``epoch``: what it held in a former
    one is dropped (the window was cleared: a behaviour revocation ended), its last tool
    kept."""
    if recent is None or recent.epoch == epoch:
        return recent
    return Recent(_NONE_HELD, recent.tool, recent.tool_at, epoch)


def counted(
    base: Baseline,
    recent: Recent | None,
    published: Mapping[str, float],
    facts: CallFacts,
    destination: str,
    request_bytes: int,
    now: float,
) -> Recent:
    """``recent`` with a call the Check path did not judge counted as the engine will
    count it (the rules refused it, or the published score did: its novelty still scores
    once the access log reports it)."""
    judged = effective(published, recent, now, base.window_seconds)
    novelty = call_novelty(base, facts, destination, request_bytes, now, recent)
    got: dict[str, float] = {}
    if novelty:
        got = reached(novelty, judged, project(novelty, judged)[1])
    tool = facts.tools[-1] if facts.tools else ""
    return remember(recent, now, base.window_seconds, tool, got, base.epoch)


def unjudged(
    base: Baseline | None,
    recent: Recent | None,
    learning: bool,
    published: Mapping[str, float],
    facts: CallFacts,
    destination: str,
    request_bytes: int,
    now: float,
    window: float,
    epoch: int,
) -> Recent | None:
    """What to keep of a call the Check path did not judge (None: nothing changes): what
    the engine will count of it (:func:`counted`; the rules or the published score refused
    it), or, while the agent learns (no ``base``, or a published score still ``learning``),
    its last tool."""
    if base is not None and not learning:
        return counted(base, recent, published, facts, destination, request_bytes, now)
    if facts.tools:
        return remember(recent, now, window, facts.tools[-1], {}, epoch)
    return None


def told(base: Baseline | None, recent: Recent | None, now: float, window: float) -> str | None:
    """The tool a call's facts say it follows (`CallFacts.previous`): :func:`previous`
    with a baseline; while the agent learns, the last tool decided within the ``window``;
    None (not known: the engine follows the access log's order) with neither."""
    if base is not None:
        return previous(base, recent, now)
    if recent is not None and recent.tool:
        return recent.tool if abs(now - recent.tool_at) <= window else ""
    return None


def reached(
    novelty: CallNovelty, judged: Mapping[str, float], added: Mapping[str, float]
) -> dict[str, float]:
    """Each feature the call has at the contribution it reached with the call counted:
    the one it was ``judged`` on plus what it ``added`` (`project`)."""
    return {n: round(judged.get(n, 0.0) + added.get(n, 0.0), 4) for n in novelty.features()}


def noisy_or(contributions: Mapping[str, float]) -> float:
    """The score of ``contributions`` (feature -> contribution), as the engine combines
    them."""
    keep = 1.0
    for name in FEATURES:
        keep *= 1.0 - contributions.get(name, 0.0)
    return round(1.0 - keep, 4)


def project(novelty: CallNovelty, published: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """The score with the call counted: ``published`` (feature -> contribution, as the
    supervisor last published the window's) with one call's step added to each feature
    the call has, at most its weight. Returns (score, the contributions that changed)."""
    added: dict[str, float] = {}
    has = novelty.features()
    keep = 1.0
    for name, weight in FEATURES.items():
        c = published.get(name, 0.0)
        if name in has:
            new = min(weight, c + weight * STEP)
            if new > c:
                added[name] = round(new - c, 4)
            c = new
        keep *= 1.0 - c
    return round(1.0 - keep, 4), added


def held(contributions: Mapping[str, float]) -> str:
    """The nonzero ``contributions``, named ("new tools 0.56, new values 0.56")."""
    return ", ".join(
        f"{name.replace('_', ' ')} {contributions[name]:.2f}"
        for name in FEATURES
        if contributions.get(name, 0.0) > 0
    )


def explain(novelty: CallNovelty, added: Mapping[str, float]) -> str:
    """The call's features, each with what it added and what was new ("new tools +0.56
    (send_money(amount:n,to:s)), new values +0.56 (to)")."""
    what = novelty.features()
    return ", ".join(
        f"{name.replace('_', ' ')} +{added.get(name, 0.0):.2f} ({what[name]})"
        for name in _CALL_FEATURES
        if name in what
    )
