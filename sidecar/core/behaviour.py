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
f in [0, 1]. The first five are rates and shares, with a dead zone so that ordinary
variation scores 0, and count only with at least ``min_calls`` calls in the window:
- ``new_destinations``: share of the window's calls to destinations never seen while
  learning (10% → 0, 50% or more → 1);
- ``denied_share``: the denied share above the learned one (probing: 10 points → 0,
  30 points → 1); a call denied for the risk score itself or a revocation is not counted
  (else a score at the deny threshold would feed itself up to revocation);
- ``rate``: calls in the window vs the busiest learned window (at least ``min_calls``):
  1.1x → 0, 3.1x → 1 (log scale);
- ``method_mix``: total-variation distance of the window's method mix from the learned
  one (0.15 → 0, 0.65 → 1);
- ``volume``: bytes (both ways) in the window vs the busiest learned window (at least
  64 KiB): 4x → 0, 64x → 1 (log scale).
The other four read what the call is (:class:`~sidecar.core.callfacts.CallFacts`: the MCP
tools it calls, fingerprints of its sensitive arguments) and count calls, not shares: a
tool is a fact, not a statistic, so they count from the first call after learning, whatever
``min_calls``. Each call that has the novelty adds ``_STEP`` (0.8) to f, so one call gives
0.8 of the weight and a second the whole of it:
- ``new_tools``: calls of an MCP tool never called while learning;
- ``new_values``: calls carrying a value never seen while learning in any argument the
  profile marks sensitive (`sensitiveArguments`: a recipient, an account, a URL);
- ``new_transitions``: calls of a tool right after another (within the window), both
  called while learning, but never one after the other ("read the inbox → send money"); a
  call with a new tool counts for that alone (its transitions are the new tool's), so no
  call is new in all four ways. "After" is the order the calls were decided in when the
  facts say which tool the Check path decided before the call (`CallFacts.previous`: one
  Check process sees them all, also parallel ones), else the order the access log reports
  them in;
- ``exfiltration``: a large write (a request body of at least 16 KiB and 8x the learned
  mean) to a new destination (a host and path, a tool or a sensitive value never seen while
  learning) after the window's calls brought the agent data (1 KiB or more of responses).
The score is a noisy-or of the weighted features, 1 - Π(1 - wᵢ·fᵢ); a feature's
contribution is wᵢ·fᵢ. Weights: a single feature tops out at its weight (new destinations
0.6, a probing denied share 0.88, rate and volume 0.5, method mix 0.4, new tools and new
values 0.7, new transitions 0.7, exfiltration 0.6), so new destinations alone land
mid-range and never reach the default deny threshold (0.8), while new destinations with
probing reach 0.95 (more at a higher rate). One odd call cannot revoke: fewer than
``min_calls`` calls score 0 on the first five; the new and denied shares are the low end of
their one-sided 95% confidence interval (Wilson), so 3 odd calls among 10 hardly count
while 10 among 20 do; the method mix is shrunk towards the learned one by 5 calls; after
learning a single call adds at most max(16x the learned bytes per call, 64 KiB) to the
volume; and one call that is new in every way the last four see scores at most 0.90, under
any `revokeAtRisk` of 0.95 or more: it reaches the default deny threshold, 0.8, when two
novelties meet in it (a new tool or a new transition, with a new sensitive value), and a
single novelty in one call (0.56) or in any number of calls (at most its weight) never
does. The details of the last four name what was new (the tool and its argument shape, the
argument, the transition, the write; the first 3, from the agent's last 16 novelties).

Facts are learned from the agent's first call (the destinations' learning period) unless
its baseline was imported from a state without them (version 1): their learning period
then starts at its first call after the import. Fingerprints compare only under one key:
the values of calls under another key than the learned values' (the audit directory's key
was replaced) are not compared, so `new_values` stays silent until the agent is relearned
(:meth:`BehaviourEngine.forget`).

Memory is bounded: at most ``max_agents`` agents (the least recently seen is dropped),
per agent ``max_destinations`` learned destinations, ``max_tools`` tools,
``max_transitions`` transitions and ``max_values`` fingerprints (later ones count as new),
the last 16 novelties, and a ring of 13 time buckets, not events: `observe` is O(1) (plus
the tools of a batch), `score` sums 13 buckets.
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
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from sidecar.core.callfacts import NO_FACTS, CallFacts

__all__ = [
    "FEATURES",
    "MODES",
    "Baseline",
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
        "new_tools": 0.7,
        "new_values": 0.7,
        "new_transitions": 0.7,
        "exfiltration": 0.6,
    }
)
_WEIGHTS = tuple(FEATURES.values())
_W_NEW, _W_DENIED, _W_RATE, _W_MIX, _W_VOLUME = _WEIGHTS[:5]
_STEP = 0.8  # what one call with a novelty adds to its feature's f (two calls: all of it)
_BUCKETS = 12  # buckets per window; the ring holds one more for the window's old edge
_RING = _BUCKETS + 1
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT")
_OTHER = len(_METHODS)  # any other method
_METHOD_NAMES = (*_METHODS, "OTHER")
_METHOD_INDEX = {m: i for i, m in enumerate(_METHODS)}
_MIX_PRIOR = 5.0  # calls of the learned mix added to the window's (smoothing)
_MIN_VOLUME = 65536.0  # bytes per window: the volume baseline's floor
_CLIP_FACTOR = 16.0  # after learning, one call counts at most this x the learned bytes/call
_STATE_VERSION = 2
_STATE_VERSIONS = (1, 2)  # what import_state reads: 1 has no facts (tools, values, ...)
_MAX_TEMPLATE = 256
_EXFIL_MIN = 16384  # bytes of one request: the least a "large write" is
_EXFIL_FACTOR = 8.0  # ... and at least this x the learned mean request
_READ_MIN = 1024  # bytes of responses in the window before it: the agent read something
# Decision codes of calls denied because of the score, the call's own novelty or a revocation
# (`Code.RISK`, `Code.NOVEL_CALL`, `Code.REVOKED`): not the agent probing.
_CONSEQUENCES = frozenset({"risk", "novel_call", "revoked"})
_RECENT = 16  # novelties kept per agent, to name them in the details
_LABEL = 120  # characters of one (a new tool and its argument shape)
_NAMED = 3  # novelties named per feature in the details (the explanation stays short)


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
    facts: CallFacts = NO_FACTS  # the MCP tools, argument shapes and fingerprints it carried


@dataclass(frozen=True, slots=True)
class BehaviourSettings:
    """A profile's `behavior`, as the engine and its users need it. Raises ValueError on
    values out of range."""

    mode: str = "monitor"  # monitor | enforce
    deny_at: float = 0.8  # enforce: calls denied while score >= deny_at
    revoke_at: float | None = None  # enforce: automatic revocation at this score
    learning_seconds: float = 600.0  # a new agent's learning period
    window_seconds: float = 60.0  # sliding window of the features
    min_calls: int = 10  # fewer calls in the window: rates and shares score 0
    # argument names whose values are fingerprinted (the Check path reads this, not the engine)
    sensitive: frozenset[str] = frozenset()

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


@dataclass(frozen=True, slots=True)
class Baseline:
    """What the Check path needs of one agent, after its learning period, to judge a call
    before it is made (`sidecar.core.callrisk`): the learned facts, which are fixed once
    learned (the engine's own sets, shared, read only), the agent's last tool call, and
    the responses of its window (the exfiltration shape's "after reading"). Made by
    :meth:`BehaviourEngine.baseline`."""

    tools: AbstractSet[str]
    transitions: AbstractSet[tuple[str, str]]
    values: AbstractSet[str]
    value_key: str  # the key the learned values were fingerprinted under ('' none yet)
    destinations: AbstractSet[str]
    out_mean: float  # learned mean request body, bytes
    last_tool: str  # the tool of the agent's last tool call observed, and when
    last_at: float
    window_seconds: float
    width: float  # seconds per bucket of the window
    reads: tuple[tuple[int, float], ...] = ()  # (bucket, response bytes) of the window
    # The window's epoch: bumped when it is cleared (a behaviour revocation ended), which
    # ends what the Check path holds of the agent's calls before (`callrisk.Recent`)
    epoch: int = 0

    def previous(self, now: float) -> str:
        """The tool a call at ``now`` follows ('' if none within the window), as the engine
        reads it."""
        return self.last_tool if abs(now - self.last_at) <= self.window_seconds else ""

    def read(self, now: float) -> float:
        """Response bytes of the window ending at ``now`` (the engine's pro-rating)."""
        pos = now / self.width
        cur = math.floor(pos)
        oldest = cur - _BUCKETS
        total = 0.0
        for idx, read in self.reads:
            if oldest < idx <= cur:
                total += read
            elif idx == oldest:
                total += (1.0 - (pos - cur)) * read
        return total


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


def path_template(path: str) -> str:
    """The path without query or fragment, identifier-like segments replaced by `{}`:
    "/v1/invoices/42?x=1" -> "/v1/invoices/{}". At most 256 characters."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut != -1:
            path = path[:cut]
    return _template(path) if len(path) <= _CACHED_PATH else _template.__wrapped__(path)


_CACHED_PATH = 512  # the longest path (without query) whose template is cached


@lru_cache(maxsize=4096)
def _template(path: str) -> str:
    """`path_template` of a path without query or fragment. Cached on that path, and only
    a short one: a cache keyed on the query, or on long paths, would hold what the agent
    puts there (thousands of them, each up to 8 KiB) and evict the real destinations."""
    template = "/".join("{}" if _is_id(s) else s for s in path.split("/"))
    return template[:_MAX_TEMPLATE]


def destination(host: str, path: str) -> str:
    """What "the same destination" means: the host (lower case, no port) and the path
    template."""
    return host.lower() + path_template(path)


# -- the engine ---------------------------------------------------------------------------


# A bucket's counters, one flat list per bucket (summed column-wise, in C, by `window`).
_CALLS, _NEW, _DENIED, _BYTES, _TOOL, _VALUE, _TRANS, _EXFIL, _READ, _M0 = range(10)
_COUNTERS = _M0 + len(_METHOD_NAMES)
# The novelty features (their counters and FEATURES names, in order).
_NOVELTIES = ((_TOOL, "new_tools"), (_VALUE, "new_values"), (_TRANS, "new_transitions"),
              (_EXFIL, "exfiltration"))  # fmt: skip


class _Bucket:
    __slots__ = ("counts", "idx")

    def __init__(self) -> None:
        self.idx = -1  # which bucket of time (at // width) this slot holds; -1: none yet
        self.counts = [0] * _COUNTERS


class _Agent:
    """One agent's baseline (learned, then fixed) and its ring of recent buckets."""

    __slots__ = (
        "baseline",
        "destinations",
        "epoch",
        "facts_started",
        "last_at",
        "last_tool",
        "learned_bytes",
        "learned_calls",
        "learned_denied",
        "learned_methods",
        "learned_out",
        "peak_bytes",
        "peak_calls",
        "peak_window",
        "recent",
        "ring",
        "started",
        "tools",
        "transitions",
        "value_key",
        "values",
        "version",
        "width",
    )

    def __init__(self, started: float, window: float) -> None:
        self.started = started
        self.learned_calls = self.learned_denied = self.learned_bytes = 0
        self.learned_out = 0  # request bytes while learning (the mean "large" is measured by)
        self.learned_methods = [0] * len(_METHOD_NAMES)
        self.destinations: set[str] = set()
        self.peak_calls = self.peak_bytes = 0.0
        self.peak_window = window  # the window the peaks were measured over
        self.width = window / _BUCKETS
        self.ring = [_Bucket() for _ in range(_RING)]
        # Facts: learned from ``facts_started`` (None: at the next call; an old state's agent)
        self.facts_started: float | None = started
        self.tools: set[str] = set()
        self.transitions: set[tuple[str, str]] = set()
        self.values: set[str] = set()
        self.value_key = ""  # the key the learned values were fingerprinted under
        self.last_tool = ""  # the tool of the agent's last tool call, and when
        self.last_at = -math.inf
        # (at, counter, what was new): the latest novelties, to name them in the details
        self.recent: deque[tuple[float, int, str]] = deque(maxlen=_RECENT)
        # Bumped by every change the Check path's Baseline shows (its last one is cached)
        self.version = 0
        self.baseline: tuple[int, Baseline] | None = None
        self.epoch = 0  # bumped when the window is cleared (what the Check path holds ends)

    def rewindow(self, window: float) -> None:
        """The window changed: the ring no longer fits (dropped), peaks are rescaled."""
        scale = window / self.peak_window
        self.peak_calls *= scale
        self.peak_bytes *= scale
        self.peak_window = window
        self.width = window / _BUCKETS
        self.ring = [_Bucket() for _ in range(_RING)]
        self.version += 1

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


def _novelties(a: _Agent, counter: int, count: float, since: float) -> str:
    """What a novelty feature counted: its calls and, from the agent's latest novelties,
    what was new ("1 call: send_money")."""
    n = max(1, round(count))
    seen = list(dict.fromkeys(what for at, c, what in a.recent if c == counter and at > since))
    names = ", ".join(seen[:_NAMED]) if seen else "not kept"
    if len(seen) > _NAMED:
        names += f" and {len(seen) - _NAMED} more"
    return f"{n} call{'s' if n > 1 else ''}: {names}"


class BehaviourEngine:
    """Per-agent windows and baselines; see the module docstring for what is scored."""

    def __init__(
        self,
        *,
        max_agents: int = 10_000,
        max_destinations: int = 5_000,
        max_tools: int = 1_000,
        max_transitions: int = 5_000,
        max_values: int = 5_000,
    ) -> None:
        if max_agents < 1 or min(max_destinations, max_tools, max_transitions, max_values) < 0:
            raise ValueError("max_agents must be >= 1 and the other maxima >= 0")
        self._max_agents = max_agents
        self._max_destinations = max_destinations
        self._max_tools = max_tools
        self._max_transitions = max_transitions
        self._max_values = max_values
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
        a.version += 1
        m = _METHOD_INDEX.get(event.method, _OTHER)
        # A call refused for the agent's risk (or its revocation) is not probing: counted
        # as denied, the score would feed itself and one odd call would end in revocation.
        denied = not event.allowed and event.code not in _CONSEQUENCES
        size = event.bytes_sent + event.bytes_received
        dest = destination(event.host, event.path)
        learning = event.at < a.started + settings.learning_seconds
        if learning:
            a.learned_calls += 1
            a.learned_denied += denied
            a.learned_bytes += size
            a.learned_out += event.bytes_received
            a.learned_methods[m] += 1
            if len(a.destinations) < self._max_destinations:
                a.destinations.add(dest)
            new = False
        else:
            new = dest not in a.destinations
            per_call = a.learned_bytes / a.learned_calls if a.learned_calls else 0.0
            size = min(size, int(max(_CLIP_FACTOR * per_call, _MIN_VOLUME)))
        if a.facts_started is None:  # an agent of an old state: its facts' learning starts now
            a.facts_started = event.at
        novel: tuple[bool, bool, bool] | None = None
        if event.facts.tools or event.facts.values:
            novel = self._facts(a, event, a.facts_started, settings)
        idx = math.floor(event.at / a.width)
        b = a.ring[idx % _RING]
        if b.idx != idx:
            if b.idx > idx:
                return  # older than the window: its slot already holds newer calls
            b.idx = idx
            b.counts = [0] * _COUNTERS
        if event.bytes_received >= _EXFIL_MIN and not learning:
            novel_call = new or (novel is not None and (novel[0] or novel[1]))
            if novel_call and self._exfiltration(a, event, dest):
                b.counts[_EXFIL] += 1
        counts = b.counts
        counts[_CALLS] += 1
        counts[_NEW] += new
        counts[_DENIED] += denied
        counts[_BYTES] += size
        counts[_READ] += event.bytes_sent
        counts[_M0 + m] += 1
        if novel is not None:
            counts[_TOOL] += novel[0]
            counts[_VALUE] += novel[1]
            counts[_TRANS] += novel[2]
        if learning:
            sums = a.window(event.at)
            if sums[_CALLS] > a.peak_calls:
                a.peak_calls = sums[_CALLS]
            if sums[_BYTES] > a.peak_bytes:
                a.peak_bytes = sums[_BYTES]

    def _facts(
        self, a: _Agent, event: CallEvent, started: float, settings: BehaviourSettings
    ) -> tuple[bool, bool, bool]:
        """Learn the call's facts (in their learning period, from ``started``) or say what
        was new in them: (a new tool, a new sensitive value, a new transition)."""
        facts, at = event.facts, event.at
        learning = at < started + settings.learning_seconds
        prev = facts.previous  # the tool the Check path decided before it, when it says
        if prev is None:
            prev = a.last_tool if abs(at - a.last_at) <= settings.window_seconds else ""
        if facts.tools:
            a.last_tool, a.last_at = facts.tools[-1], at
        if learning:
            for tool in facts.tools:
                if len(a.tools) < self._max_tools:
                    a.tools.add(tool)
                if prev and len(a.transitions) < self._max_transitions:
                    a.transitions.add((prev, tool))
                prev = tool
            if facts.values and (not a.value_key or a.value_key == facts.key_id):
                a.value_key = facts.key_id
                for _, fp in facts.values:
                    if len(a.values) < self._max_values:
                        a.values.add(fp)
            return False, False, False
        new_tool = new_value = False
        steps: list[str] = []
        recent = a.recent
        for i, tool in enumerate(facts.tools):
            if tool not in a.tools:
                new_tool = True
                shape = facts.shapes[i] if i < len(facts.shapes) else ""
                recent.append((at, _TOOL, f"{tool}({shape})"[:_LABEL]))
            elif prev in a.tools and (prev, tool) not in a.transitions:
                steps.append(f"{prev} -> {tool}")
            prev = tool
        # A call's transitions count only if all its tools are known: a new tool's are its
        # own (and so one call is never new in all four ways).
        new_step = bool(steps) and not new_tool
        if new_step:
            recent.extend((at, _TRANS, step) for step in steps)
        if facts.values and (facts.key_id == a.value_key or not a.value_key):
            for arg, fp in facts.values:
                if fp not in a.values:
                    new_value = True
                    recent.append((at, _VALUE, arg))
                    break
        return new_tool, new_value, new_step

    def _exfiltration(self, a: _Agent, event: CallEvent, dest: str) -> bool:
        """Whether a large write to a new destination is the exfiltration shape: larger
        than 8x the learned mean request, after the window's calls brought the agent data."""
        out = event.bytes_received
        mean = a.learned_out / a.learned_calls if a.learned_calls else 0.0
        if out < _EXFIL_FACTOR * mean:
            return False
        read = a.window(event.at)[_READ]
        if read < _READ_MIN:
            return False
        what = event.facts.tools[-1] if event.facts.tools else dest
        a.recent.append(
            (event.at, _EXFIL, f"{out // 1024} KiB to {what} after reading {int(read) // 1024} KiB")
        )
        return True

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
        values = [0.0] * len(FEATURES)
        learned = a.learned_calls
        base_denied = (a.learned_denied + 0.5) / (learned + 10.0)
        ratio = volume = tv = 0.0
        evidence = calls >= settings.min_calls
        if evidence:
            ratio = calls / max(a.peak_calls, float(settings.min_calls))
            volume = size / max(a.peak_bytes, _MIN_VOLUME)
            if learned:
                for count, learned_count in zip(sums[_M0:], a.learned_methods, strict=True):
                    q = learned_count / learned
                    tv += abs((count + _MIX_PRIOR * q) / (calls + _MIX_PRIOR) - q)
                tv /= 2.0
            values[0] = _W_NEW * _clamp((_low(new, calls) - 0.1) / 0.4)
            values[1] = _W_DENIED * _clamp((_low(denied, calls) - base_denied - 0.1) / 0.2)
            values[2] = _W_RATE * _clamp(math.log2(ratio / 1.1) / 1.5) if ratio > 1.1 else 0.0
            values[3] = _W_MIX * _clamp((tv - 0.15) / 0.5)
            values[4] = _W_VOLUME * _clamp((math.log2(volume) - 2.0) / 4.0) if volume > 4.0 else 0.0
        for i, (counter, _) in enumerate(_NOVELTIES, start=5):
            if sums[counter] > 0.0:
                values[i] = _WEIGHTS[i] * _clamp(_STEP * sums[counter])
        keep = 1.0
        for c in values:
            keep *= 1.0 - c
        if keep == 1.0:  # the usual case: nothing to explain
            if not evidence:
                note = (
                    f"too little evidence ({n} calls in the window, fewer than "
                    f"{settings.min_calls})"
                )
                return Risk(0.0, _empty(), False, n, note=note)
            return Risk(0.0, _empty(), False, n)
        # What was measured, formatted only for the features that contribute.
        measured: tuple[Callable[[], str], ...] = (
            lambda: f"{round(new)} of {n} calls",
            lambda: f"{round(denied)} of {n}, learned {base_denied:.0%}",
            lambda: f"{ratio:.1f}x baseline",
            lambda: f"distance {tv:.2f} from the learned mix",
            lambda: f"{volume:.1f}x baseline",
            *(
                (
                    lambda c=counter: _novelties(
                        a, c, sums[c], now - settings.window_seconds - a.width
                    )
                )
                for counter, _ in _NOVELTIES
            ),
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
            a.version += 1
            a.epoch += 1

    def baseline(
        self, namespace: str, agent: str, now: float, settings: BehaviourSettings
    ) -> Baseline | None:
        """What the Check path judges the agent's next call against (:class:`Baseline`),
        or None while it learns (its destinations' or its facts' learning period) or is
        unknown. The learned sets are the engine's own, not copies: fixed after learning
        (an event that arrives late from within the learning period may still add to them,
        as it does to what the engine scores against). Cached until the agent's next event."""
        a = self._agents.get((namespace, agent))
        if a is None or a.facts_started is None:
            return None
        if now < max(a.started, a.facts_started) + settings.learning_seconds:
            return None
        if a.peak_window != settings.window_seconds:
            a.rewindow(settings.window_seconds)
        cached = a.baseline
        if cached is not None and cached[0] == a.version:
            return cached[1]
        reads = tuple((b.idx, float(b.counts[_READ])) for b in a.ring if b.counts[_READ])
        base = Baseline(
            tools=a.tools,
            transitions=a.transitions,
            values=a.values,
            value_key=a.value_key,
            destinations=a.destinations,
            out_mean=a.learned_out / a.learned_calls if a.learned_calls else 0.0,
            last_tool=a.last_tool,
            last_at=a.last_at,
            window_seconds=settings.window_seconds,
            width=a.width,
            reads=reads,
            epoch=a.epoch,
        )
        a.baseline = (a.version, base)
        return base

    # -- persistence ----------------------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """The agents' baselines as JSON-serialisable data (not their recent windows):
        version 2, with the learned facts (``facts_started`` null: not learning them yet)."""
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
                    "learned_out": a.learned_out,
                    "facts_started": a.facts_started,
                    "tools": sorted(a.tools),
                    "transitions": sorted([p, t] for p, t in a.transitions),
                    "value_key": a.value_key,
                    "values": sorted(a.values),
                }
                for (ns, name), a in self._agents.items()
            ],
        }

    def import_state(self, data: Mapping[str, Any]) -> None:
        """Restore baselines from :meth:`export_state`'s data, of this version or version
        1 (no facts: an agent's facts are then learned from its next call, for a learning
        period). An imported agent replaces one of the same name; others are kept. Raises
        ValueError naming the first bad field; nothing is imported then."""
        if not isinstance(data, Mapping):
            raise ValueError("behaviour state: expected an object")
        version = data.get("version")
        if version not in _STATE_VERSIONS or isinstance(version, bool):
            raise ValueError(
                f"behaviour state: version {version!r}, expected one of "
                f"{', '.join(map(str, _STATE_VERSIONS))}"
            )
        items = data.get("agents")
        if not isinstance(items, list):
            raise ValueError("behaviour state: 'agents' must be a list")
        parsed: dict[tuple[str, str], _Agent] = {}
        for i, item in enumerate(items):
            where = f"behaviour state: agents[{i}]"
            key, agent = self._parse_agent(item, where)
            if version == 1:
                agent.facts_started = None
            else:
                self._parse_facts(item, agent, where)
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

    def _parse_facts(self, item: Mapping[str, Any], a: _Agent, where: str) -> None:
        """A version 2 agent's facts into ``a``."""
        a.learned_out = _count(item.get("learned_out"), f"{where}.learned_out")
        started = item.get("facts_started")
        if started is not None:
            if isinstance(started, bool) or not isinstance(started, int | float):
                raise ValueError(f"{where}.facts_started: expected a number or null")
            if not math.isfinite(started):
                raise ValueError(f"{where}.facts_started: expected a finite number")
        a.facts_started = None if started is None else float(started)
        a.tools = set(_strings(item.get("tools"), f"{where}.tools", self._max_tools))
        pairs = item.get("transitions")
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p)
            for p in pairs
        ):
            raise ValueError(f"{where}.transitions: expected a list of [tool, tool] pairs")
        if len(pairs) > self._max_transitions:
            raise ValueError(
                f"{where}.transitions: {len(pairs)}, more than {self._max_transitions}"
            )
        a.transitions = {(p, t) for p, t in pairs}
        key = item.get("value_key")
        if not isinstance(key, str):
            raise ValueError(f"{where}.value_key: expected a string")
        a.value_key = key
        a.values = set(_strings(item.get("values"), f"{where}.values", self._max_values))


def _strings(value: Any, where: str, most: int) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of strings")
    if len(value) > most:
        raise ValueError(f"{where}: {len(value)}, more than {most}")
    return value


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: expected a non-negative integer, got {value!r}")
    return value
