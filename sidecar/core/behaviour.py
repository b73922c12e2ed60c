"""Behaviour analysis (pure): per agent, cheap features of its recent calls compared with a
baseline learned in its first minutes, combined into a risk score in [0, 1] that explains
itself.

The supervisor feeds call events (:class:`CallEvent`, from Envoy's access log service,
`sidecar.behaviour.access_log`) to :meth:`BehaviourEngine.observe` and publishes the agents' scores
(:meth:`BehaviourEngine.score`); `decide` denies, and the supervisor revokes, on the
published score per the profile's `behavior` (:class:`BehaviourSettings`).

Learning. An agent's learning period starts at its first call and lasts
``learning_seconds``; its calls then build the baseline: the destinations it uses (host +
path template), its busiest window (calls and bytes), its method mix, its denied share and
its bytes per call. During learning the score is 0 (``learning=True``). Afterwards the
baseline stays FIXED: a slow drift cannot teach the engine that exfiltration is normal.
An agent whose legitimate behaviour changed (a new profile, a new tool) is relearned by
:meth:`BehaviourEngine.forget`; :meth:`export_state` / :meth:`import_state` keep
baselines across restarts (the recent window is not kept: it refills in one window).

Features, over the sliding window ending at ``now`` (``window_seconds``), each mapped to
f in [0, 1] with a dead zone, so that ordinary variation scores 0:
- ``new_destinations``: share of the window's calls to destinations never seen while
  learning (10% → 0, 50% or more → 1);
- ``denied_share``: the denied share above the learned one (probing: 10 points → 0,
  30 points → 1);
- ``rate``: calls in the window vs the busiest learned window (at least ``min_calls``):
  1.1x → 0, 3.1x → 1 (log scale);
- ``method_mix``: total-variation distance of the window's method mix from the learned
  one (0.15 → 0, 0.65 → 1);
- ``volume``: bytes (both ways) in the window vs the busiest learned window (at least
  64 KiB): 4x → 0, 64x → 1 (log scale).
The score is a noisy-or of the weighted features, 1 - Π(1 - wᵢ·fᵢ); a feature's
contribution is wᵢ·fᵢ. Weights: a single feature tops out at its weight (new destinations
0.6, a probing denied share 0.88, rate and volume 0.5, method mix 0.4), so new
destinations alone land mid-range and never reach the default deny threshold (0.8), while
new destinations with probing reach 0.95 (more at a higher rate). One odd call cannot
spike it: fewer than ``min_calls`` calls score 0; the new and denied shares are the low end of
their one-sided 95% confidence interval (Wilson), so 3 odd calls among 10 hardly count
while 10 among 20 do; the method mix is shrunk towards the learned one by 5 calls; and
after learning a single call adds at most max(16x the learned bytes per call, 64 KiB) to
the volume.

Memory is bounded: at most ``max_agents`` agents (the least recently seen is dropped),
``max_destinations`` learned destinations per agent (later ones count as new), and per
agent a ring of 13 time buckets, not events: `observe` is O(1), `score` sums 13 buckets.
The window's old edge is pro-rated within its bucket (events assumed spread evenly).
Events may arrive out of order; one older than the window is learned from (if in the
learning period) but not windowed. As the ring keeps only the latest window, `score`
expects a ``now`` no earlier than the calls observed (the supervisor's clock).

The engine is not thread-safe: its owner serialises calls (one lock). Same events, same
``now``, same scores. This module must not import any transport, Kubernetes or telemetry
library, and does no I/O and reads no clock.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

__all__ = [
    "FEATURES",
    "MODES",
    "BehaviourEngine",
    "BehaviourSettings",
    "CallEvent",
    "Risk",
    "destination",
    "path_template",
]

MODES = ("monitor", "enforce")
# Feature -> weight: the most one feature alone can add to the score (see the docstring).
FEATURES: Mapping[str, float] = MappingProxyType(
    {
        "new_destinations": 0.6,
        "denied_share": 0.88,
        "rate": 0.5,
        "method_mix": 0.4,
        "volume": 0.5,
    }
)
_W_NEW, _W_DENIED, _W_RATE, _W_MIX, _W_VOLUME = FEATURES.values()
_BUCKETS = 12  # buckets per window; the ring holds one more for the window's old edge
_RING = _BUCKETS + 1
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT")
_OTHER = len(_METHODS)  # any other method
_METHOD_NAMES = (*_METHODS, "OTHER")
_METHOD_INDEX = {m: i for i, m in enumerate(_METHODS)}
_MIX_PRIOR = 5.0  # calls of the learned mix added to the window's (smoothing)
_MIN_VOLUME = 65536.0  # bytes per window: the volume baseline's floor
_CLIP_FACTOR = 16.0  # after learning, one call counts at most this x the learned bytes/call
_STATE_VERSION = 1
_MAX_TEMPLATE = 256


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One finished call of an agent, as Envoy's access log reported it."""

    at: float  # seconds since the epoch, when observed
    agent: str
    namespace: str
    method: str  # upper case
    host: str  # lower case, no port
    path: str  # without the query string
    allowed: bool
    code: str  # mandate decision code ("allowed", "denied_by_rule", "outside_purpose", ...)
    status: int = 0  # HTTP response status Envoy sent the agent
    bytes_sent: int = 0  # response body bytes to the agent
    bytes_received: int = 0  # request body bytes from the agent
    decision_id: str = ""


@dataclass(frozen=True, slots=True)
class BehaviourSettings:
    """A profile's `behavior`, as the engine and its users need it. Raises ValueError on
    values out of range."""

    mode: str = "monitor"  # monitor | enforce
    deny_at: float = 0.8  # enforce: calls denied while score >= deny_at
    revoke_at: float | None = None  # enforce: automatic revocation at this score
    learning_seconds: float = 600.0  # a new agent's learning period
    window_seconds: float = 60.0  # sliding window of the features
    min_calls: int = 10  # fewer calls in the window: score 0 (too little evidence)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"behaviour mode {self.mode!r}: expected one of {MODES}")
        if not 0 < self.deny_at <= 1:
            raise ValueError(f"deny_at {self.deny_at!r}: expected 0 < deny_at <= 1")
        if self.revoke_at is not None and not 0 < self.revoke_at <= 1:
            raise ValueError(f"revoke_at {self.revoke_at!r}: expected 0 < revoke_at <= 1")
        if not (math.isfinite(self.learning_seconds) and self.learning_seconds >= 0):
            raise ValueError(f"learning_seconds {self.learning_seconds!r}: expected >= 0")
        if not (math.isfinite(self.window_seconds) and self.window_seconds > 0):
            raise ValueError(f"window_seconds {self.window_seconds!r}: expected > 0")
        if self.min_calls < 1:
            raise ValueError(f"min_calls {self.min_calls!r}: expected >= 1")


@dataclass(frozen=True, slots=True)
class Risk:
    """An agent's risk at one moment. ``contributions``: feature -> wᵢ·fᵢ (only features
    that contribute); ``details``: feature -> what was measured; ``note``: why nothing
    was scored, if so."""

    score: float  # [0, 1]
    contributions: Mapping[str, float]
    learning: bool
    calls: int  # calls in the window
    details: Mapping[str, str] = field(default_factory=_empty)
    note: str = ""

    def explanation(self) -> str:
        """One line: the score and each contributing feature, largest first."""
        if self.learning:
            return f"risk not scored: learning ({self.calls} calls in the window)"
        if self.note:
            return f"risk {self.score:.2f}: {self.note}"
        parts = [
            f"{name.replace('_', ' ')} {value:.2f} ({self.details.get(name, '')})"
            for name, value in sorted(self.contributions.items(), key=lambda kv: -kv[1])
        ]
        if not parts:
            return f"risk {self.score:.2f}: nothing unusual ({self.calls} calls in the window)"
        return f"risk {self.score:.2f}: " + ", ".join(parts)


# -- destinations -------------------------------------------------------------------------

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]{12,}")
_TOKEN = re.compile(r"[A-Za-z0-9_.~=+-]{20,}")
_DIGIT = re.compile(r"\d")


def _is_id(segment: str) -> bool:
    """Whether a path segment looks like an identifier rather than a name: digits, a UUID,
    12+ hex digits, a 20+ character token (with a digit), a segment at least a third
    digits with 3 or more of them ("inv-420", "2026-01"), or anything over 64 characters."""
    if not segment:
        return False
    if len(segment) > 64 or (segment.isascii() and segment.isdigit()):
        return True
    digits = len(_DIGIT.findall(segment))
    if digits == 0:
        return False
    if digits >= 3 and 3 * digits >= len(segment):
        return True
    return bool(_UUID.fullmatch(segment) or _HEX.fullmatch(segment) or _TOKEN.fullmatch(segment))


@lru_cache(maxsize=4096)
def path_template(path: str) -> str:
    """The path without query or fragment, identifier-like segments replaced by `{}`:
    "/v1/invoices/42?x=1" -> "/v1/invoices/{}". At most 256 characters."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut != -1:
            path = path[:cut]
    template = "/".join("{}" if _is_id(s) else s for s in path.split("/"))
    return template[:_MAX_TEMPLATE]


def destination(host: str, path: str) -> str:
    """What "the same destination" means: the host (lower case, no port) and the path
    template."""
    return host.lower() + path_template(path)


# -- the engine ---------------------------------------------------------------------------


# A bucket's counters, one flat list per bucket (summed column-wise, in C, by `window`).
_CALLS, _NEW, _DENIED, _BYTES, _M0 = 0, 1, 2, 3, 4
_COUNTERS = _M0 + len(_METHOD_NAMES)


class _Bucket:
    __slots__ = ("counts", "idx")

    def __init__(self) -> None:
        self.idx = -1  # which bucket of time (at // width) this slot holds; -1: none yet
        self.counts = [0] * _COUNTERS


class _Agent:
    """One agent's baseline (learned, then fixed) and its ring of recent buckets."""

    __slots__ = (
        "destinations",
        "learned_bytes",
        "learned_calls",
        "learned_denied",
        "learned_methods",
        "peak_bytes",
        "peak_calls",
        "peak_window",
        "ring",
        "started",
        "width",
    )

    def __init__(self, started: float, window: float) -> None:
        self.started = started
        self.learned_calls = self.learned_denied = self.learned_bytes = 0
        self.learned_methods = [0] * len(_METHOD_NAMES)
        self.destinations: set[str] = set()
        self.peak_calls = self.peak_bytes = 0.0
        self.peak_window = window  # the window the peaks were measured over
        self.width = window / _BUCKETS
        self.ring = [_Bucket() for _ in range(_RING)]

    def rewindow(self, window: float) -> None:
        """The window changed: the ring no longer fits (dropped), peaks are rescaled."""
        scale = window / self.peak_window
        self.peak_calls *= scale
        self.peak_bytes *= scale
        self.peak_window = window
        self.width = window / _BUCKETS
        self.ring = [_Bucket() for _ in range(_RING)]

    def window(self, now: float) -> list[float]:
        """The counters (`_CALLS`, `_NEW`, ...) summed over the window ending at ``now``;
        the oldest bucket counts for the share of it still in the window."""
        pos = now / self.width
        cur = math.floor(pos)
        oldest = cur - _BUCKETS
        full = [b.counts for b in self.ring if oldest < b.idx <= cur]
        sums: list[float] = [sum(column) for column in zip(*full, strict=True)] or [0.0] * _COUNTERS
        edge = self.ring[oldest % _RING]
        if edge.idx == oldest:
            share = 1.0 - (pos - cur)
            sums = [s + share * c for s, c in zip(sums, edge.counts, strict=True)]
        return sums


def _clamp(x: float) -> float:
    return 0.0 if x <= 0.0 else 1.0 if x >= 1.0 else x


_Z = 1.645  # one-sided 95%
_Z2 = _Z * _Z


def _low(k: float, n: float) -> float:
    """The Wilson score interval's lower end for k successes in n trials (n > 0)."""
    p = k / n
    centre = p + _Z2 / (2 * n)
    spread = _Z * math.sqrt(max(p * (1 - p), 0.0) / n + _Z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + _Z2 / n))


class BehaviourEngine:
    """Per-agent windows and baselines; see the module docstring for what is scored."""

    def __init__(self, *, max_agents: int = 10_000, max_destinations: int = 5_000) -> None:
        if max_agents < 1 or max_destinations < 0:
            raise ValueError("max_agents must be >= 1 and max_destinations >= 0")
        self._max_agents = max_agents
        self._max_destinations = max_destinations
        self._agents: OrderedDict[tuple[str, str], _Agent] = OrderedDict()

    # -- events ---------------------------------------------------------------------------

    def observe(self, event: CallEvent, settings: BehaviourSettings) -> None:
        """Add one call to its agent's window (and, in its learning period, baseline)."""
        key = (event.namespace, event.agent)
        agents = self._agents
        a = agents.get(key)
        if a is None:
            if len(agents) >= self._max_agents:
                agents.popitem(last=False)  # the least recently seen agent
            a = agents[key] = _Agent(event.at, settings.window_seconds)
        else:
            agents.move_to_end(key)
        if a.peak_window != settings.window_seconds:
            a.rewindow(settings.window_seconds)
        m = _METHOD_INDEX.get(event.method, _OTHER)
        size = event.bytes_sent + event.bytes_received
        dest = destination(event.host, event.path)
        learning = event.at < a.started + settings.learning_seconds
        if learning:
            a.learned_calls += 1
            a.learned_denied += not event.allowed
            a.learned_bytes += size
            a.learned_methods[m] += 1
            if len(a.destinations) < self._max_destinations:
                a.destinations.add(dest)
            new = False
        else:
            new = dest not in a.destinations
            per_call = a.learned_bytes / a.learned_calls if a.learned_calls else 0.0
            size = min(size, int(max(_CLIP_FACTOR * per_call, _MIN_VOLUME)))
        idx = math.floor(event.at / a.width)
        b = a.ring[idx % _RING]
        if b.idx != idx:
            if b.idx > idx:
                return  # older than the window: its slot already holds newer calls
            b.idx = idx
            b.counts = [0] * _COUNTERS
        counts = b.counts
        counts[_CALLS] += 1
        counts[_NEW] += new
        counts[_DENIED] += not event.allowed
        counts[_BYTES] += size
        counts[_M0 + m] += 1
        if learning:
            sums = a.window(event.at)
            if sums[_CALLS] > a.peak_calls:
                a.peak_calls = sums[_CALLS]
            if sums[_BYTES] > a.peak_bytes:
                a.peak_bytes = sums[_BYTES]

    # -- scores ---------------------------------------------------------------------------

    def score(self, namespace: str, agent: str, now: float, settings: BehaviourSettings) -> Risk:
        """The agent's risk over the window ending at ``now``."""
        a = self._agents.get((namespace, agent))
        if a is None:
            return Risk(0.0, _empty(), True, 0)
        if a.peak_window != settings.window_seconds:
            a.rewindow(settings.window_seconds)
        sums = a.window(now)
        calls, new, denied, size = sums[_CALLS], sums[_NEW], sums[_DENIED], sums[_BYTES]
        n = round(calls)
        if now < a.started + settings.learning_seconds:
            return Risk(0.0, _empty(), True, n)
        if calls < settings.min_calls:
            note = f"too little evidence ({n} calls in the window, fewer than {settings.min_calls})"
            return Risk(0.0, _empty(), False, n, note=note)

        learned = a.learned_calls
        base_denied = (a.learned_denied + 0.5) / (learned + 10.0)
        ratio = calls / max(a.peak_calls, float(settings.min_calls))
        volume = size / max(a.peak_bytes, _MIN_VOLUME)
        tv = 0.0
        if learned:
            for count, learned_count in zip(sums[_M0:], a.learned_methods, strict=True):
                q = learned_count / learned
                tv += abs((count + _MIX_PRIOR * q) / (calls + _MIX_PRIOR) - q)
            tv /= 2.0
        values = (
            _W_NEW * _clamp((_low(new, calls) - 0.1) / 0.4),
            _W_DENIED * _clamp((_low(denied, calls) - base_denied - 0.1) / 0.2),
            _W_RATE * _clamp(math.log2(ratio / 1.1) / 1.5) if ratio > 1.1 else 0.0,
            _W_MIX * _clamp((tv - 0.15) / 0.5),
            _W_VOLUME * _clamp((math.log2(volume) - 2.0) / 4.0) if volume > 4.0 else 0.0,
        )
        keep = 1.0
        for c in values:
            keep *= 1.0 - c
        if keep == 1.0:  # the usual case: nothing to explain
            return Risk(0.0, _empty(), False, n)
        # What was measured, formatted only for the features that contribute.
        measured: tuple[Callable[[], str], ...] = (
            lambda: f"{round(new)} of {n} calls",
            lambda: f"{round(denied)} of {n}, learned {base_denied:.0%}",
            lambda: f"{ratio:.1f}x baseline",
            lambda: f"distance {tv:.2f} from the learned mix",
            lambda: f"{volume:.1f}x baseline",
        )
        contributions: dict[str, float] = {}
        details: dict[str, str] = {}
        for name, value, detail in zip(FEATURES, values, measured, strict=True):
            if value > 0.0:
                contributions[name] = round(value, 4)
                details[name] = detail()
        return Risk(
            score=round(1.0 - keep, 4),
            contributions=MappingProxyType(contributions),
            learning=False,
            calls=n,
            details=MappingProxyType(details),
        )

    # -- agents ---------------------------------------------------------------------------

    def agents(self) -> list[tuple[str, str]]:
        """(namespace, agent) of every agent known, least recently seen first."""
        return list(self._agents)

    def forget(self, namespace: str, agent: str) -> None:
        """Drop the agent: its next call starts a new learning period."""
        self._agents.pop((namespace, agent), None)

    def clear_window(self, namespace: str, agent: str) -> None:
        """Forget the agent's recent calls, keep its baseline (e.g. when an automatic
        revocation ends, so that the calls that caused it do not score again)."""
        a = self._agents.get((namespace, agent))
        if a is not None:
            a.ring = [_Bucket() for _ in range(_RING)]

    # -- persistence ----------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The agents' baselines as JSON-serialisable data (not their recent windows)."""
        return {
            "version": _STATE_VERSION,
            "agents": [
                {
                    "namespace": ns,
                    "agent": name,
                    "started": a.started,
                    "learned_calls": a.learned_calls,
                    "learned_denied": a.learned_denied,
                    "learned_bytes": a.learned_bytes,
                    "learned_methods": {
                        m: n for m, n in zip(_METHOD_NAMES, a.learned_methods, strict=True) if n
                    },
                    "peak_calls": a.peak_calls,
                    "peak_bytes": a.peak_bytes,
                    "peak_window": a.peak_window,
                    "destinations": sorted(a.destinations),
                }
                for (ns, name), a in self._agents.items()
            ],
        }

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Restore baselines from :meth:`export_state`'s data. An imported agent replaces
        one of the same name; others are kept. Raises ValueError naming the first bad
        field; nothing is imported then."""
        if not isinstance(data, Mapping):
            raise ValueError("behaviour state: expected an object")
        if data.get("version") != _STATE_VERSION:
            raise ValueError(
                f"behaviour state: version {data.get('version')!r}, expected {_STATE_VERSION}"
            )
        items = data.get("agents")
        if not isinstance(items, list):
            raise ValueError("behaviour state: 'agents' must be a list")
        parsed: dict[tuple[str, str], _Agent] = {}
        for i, item in enumerate(items):
            where = f"behaviour state: agents[{i}]"
            key, agent = self._parse_agent(item, where)
            if key in parsed:
                raise ValueError(f"{where}: agent {key[0]}/{key[1]} appears twice")
            parsed[key] = agent
        total = len(set(self._agents) | set(parsed))
        if total > self._max_agents:
            raise ValueError(
                f"behaviour state: {total} agents with those known, more than {self._max_agents}"
            )
        for key, agent in parsed.items():
            self._agents.pop(key, None)
            self._agents[key] = agent

    def _parse_agent(self, item: Any, where: str) -> tuple[tuple[str, str], _Agent]:
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected an object")

        def text(name: str) -> str:
            value = item.get(name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{where}.{name}: expected a non-empty string, got {value!r}")
            return value

        def count(name: str) -> int:
            return _count(item.get(name), f"{where}.{name}")

        def number(name: str, positive: bool = False) -> float:
            value = item.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{where}.{name}: expected a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ValueError(f"{where}.{name}: expected a finite number >= 0, got {value!r}")
            return value

        key = (text("namespace"), text("agent"))
        a = _Agent(number("started"), number("peak_window", positive=True))
        a.learned_calls = count("learned_calls")
        a.learned_denied = count("learned_denied")
        if a.learned_denied > a.learned_calls:
            raise ValueError(f"{where}.learned_denied: more than learned_calls")
        a.learned_bytes = count("learned_bytes")
        methods = item.get("learned_methods")
        if not isinstance(methods, Mapping):
            raise ValueError(f"{where}.learned_methods: expected an object")
        for name, n in methods.items():
            if name not in _METHOD_NAMES:
                raise ValueError(
                    f"{where}.learned_methods: unknown method {name!r} "
                    f"(expected one of {', '.join(_METHOD_NAMES)})"
                )
            a.learned_methods[_METHOD_NAMES.index(name)] = _count(
                n, f"{where}.learned_methods.{name}"
            )
        if sum(a.learned_methods) != a.learned_calls:
            raise ValueError(f"{where}.learned_methods: the counts do not add up to learned_calls")
        a.peak_calls = number("peak_calls")
        a.peak_bytes = number("peak_bytes")
        dests = item.get("destinations")
        if not isinstance(dests, list) or not all(isinstance(d, str) for d in dests):
            raise ValueError(f"{where}.destinations: expected a list of strings")
        if len(dests) > self._max_destinations:
            raise ValueError(
                f"{where}.destinations: {len(dests)}, more than {self._max_destinations}"
            )
        a.destinations = set(dests)
        return key, a


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: expected a non-negative integer, got {value!r}")
    return value
