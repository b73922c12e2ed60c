"""Times relative to now, for tests that need "a time in the future" or "in the past".

No test may depend on today's date (a fixed expiry in an example broke main on 2026-12-01):
a fixture that needs an instant on one side of now computes it here, and the whole suite
passes with the clock moved years either way (`faketime`, see README). Fixed dates stay
only where the test pins the clock itself (parsers, formatters)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

__all__ = ["DAY", "YEAR", "from_now", "rfc3339"]

DAY = 86_400.0
YEAR = 365 * DAY


def rfc3339(ts: float, *, offset_minutes: int = 0, millis: bool = False) -> str:
    """`ts` as RFC 3339: `Z` for UTC, else `+hh:mm`/`-hh:mm`; with milliseconds if asked."""
    zone = UTC if offset_minutes == 0 else timezone(timedelta(minutes=offset_minutes))
    moment = datetime.fromtimestamp(ts, zone)
    text = moment.isoformat(timespec="milliseconds" if millis else "seconds")
    return text.replace("+00:00", "Z")


def from_now(seconds: float, *, offset_minutes: int = 0, millis: bool = False) -> str:
    """RFC 3339 for now plus `seconds` (negative: in the past)."""
    return rfc3339(time.time() + seconds, offset_minutes=offset_minutes, millis=millis)
