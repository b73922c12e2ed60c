"""Per-purpose rate limits (`rateLimit: {requests: N, per: 1m}`): an exact sliding window.

One :class:`RateLimiter` per Check process. For each key (namespace, agent, purpose) it
keeps the times of the calls it allowed within the last `per` seconds, at most `limit` of
them, so a key costs at most `limit` floats and a check is O(1) amortised. Only allowed
calls count: a call denied for any reason (the rate included) uses none of the budget.
Time comes from a monotonic clock (a wall-clock jump neither frees nor blocks the budget).

With `mandate run --workers N`, each worker enforces ``ceil(limit / N)``: Envoy spreads the
calls over the workers' endpoints, so the sum is the profile's limit (see README: with one
worker, the default in a pod, the limit is exact).
This module keeps state in memory only; it must not import any transport, Kubernetes or
telemetry library.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateCharge", "RateLimiter"]


@dataclass(frozen=True, slots=True)
class RateCharge:
    """An allowed call is subject to a purpose's rate limit: count it under ``key`` (agent,
    purpose), at most ``requests`` per ``per_seconds`` (``per`` as the profile spells it,
    for the deny reason). Compiled once per purpose with the profiles; a limiter belongs to
    one worker process, which serves one namespace."""

    key: tuple[str, str]
    requests: int
    per_seconds: float
    per: str


class RateLimiter:
    def __init__(
        self,
        *,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share {share}: expected 0 < share <= 1")
        self._share = share
        self._clock = clock
        self._max_keys = max_keys
        self._calls: dict[tuple[str, ...], deque[float]] = {}
        self._per: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def limit_for(self, limit: int) -> int:
        """This process's part of a profile's limit."""
        return max(1, math.ceil(limit * self._share))

    def charge(self, rate: RateCharge) -> bool:
        """Count one call subject to ``rate``; return whether the limit allowed it."""
        return self.allow(rate.key, rate.requests, rate.per_seconds)

    def allow(self, key: tuple[str, ...], limit: int, per: float) -> bool:
        """Count one call under ``key`` if fewer than the limit happened in the last ``per``
        seconds; return whether it was counted (allowed)."""
        limit = self.limit_for(limit)
        now = self._clock()
        with self._lock:
            calls = self._calls.get(key)
            if calls is None:
                if len(self._calls) >= self._max_keys:
                    self._evict(now)
                calls = self._calls[key] = deque()
            self._per[key] = per
            horizon = now - per
            while calls and calls[0] <= horizon:
                calls.popleft()
            if len(calls) >= limit:
                return False
            calls.append(now)
            return True

    def _evict(self, now: float) -> None:
        # Keys with no call in their window hold no budget: drop them; if every key is busy,
        # drop the oldest one (a bounded table beats unbounded memory under key churn).
        idle = [k for k, q in self._calls.items() if not q or q[-1] <= now - self._per[k]]
        for k in idle:
            del self._calls[k], self._per[k]
        if len(self._calls) >= self._max_keys:
            oldest = next(iter(self._calls))
            del self._calls[oldest], self._per[oldest]
