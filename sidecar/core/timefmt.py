"""Instants as RFC 3339 text and back (pure): the one place mandate formats and parses times.

- `utc_seconds`: to the second, e.g. ``2023-11-14T22:13:20Z`` (decision reasons, the context
  table's grants and tasks, Kubernetes status fields and Events).
- `utc_millis`: with milliseconds, e.g. ``2023-11-14T22:13:20.123Z`` (audit records, and
  their query bounds): fixed width, so these strings sort by time.
- `parse_rfc3339`: RFC 3339 as the Kubernetes API server lets it through, to seconds since
  the epoch, or None (AgentRevocation/AgentElevation objects, the admin API's expiresAt).

Both formatters truncate, never round: a time is never shown later than it was, and the
same instant gives the same text everywhere. No I/O, no clock; this module must not import
any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

import datetime
import re
import time

__all__ = ["parse_rfc3339", "utc_millis", "utc_seconds"]

# RFC 3339 as the API server lets it through (kube-openapi's `date-time`: `t`/`z` in any case,
# optional fraction, `.` or `,` before it; ASCII digits only). Values that pass the server's
# check yet name no real instant (2026-02-30, an offset of +25:00, a leap second :60) fail in
# `parse_rfc3339`: a revocation is then enforced without an expiry (fail closed).
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:[.,](\d+))?([Zz]|[+-]\d{2}:\d{2})$",
    re.ASCII,
)


def utc_seconds(ts: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC to the second, the fraction dropped (floor):
    ``1700000000.9`` → ``2023-11-14T22:13:20Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def utc_millis(ts: float) -> str:
    """Seconds since the epoch as RFC 3339 UTC with milliseconds, truncated (``int(ts *
    1000)``, toward zero): ``1700000000.9999`` → ``2023-11-14T22:13:20.999Z``. Fixed width,
    so these strings sort by time. The audit trail's format: do not change it."""
    global _last_second
    ms = int(ts * 1000)
    sec, frac = divmod(ms, 1000)
    last = _last_second  # one read: another thread may replace it meanwhile
    if last[0] != sec:
        last = _last_second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{last[1]}.{frac:03d}Z"


# The last second `utc_millis` formatted and its text: one audit record per decision, most
# in the same second (strftime+gmtime is two thirds of the call).
_last_second: tuple[int, str] = (-(2**63), "")


def parse_rfc3339(value: object) -> float | None:
    """An RFC 3339 date-time with a zone (``Z``/``z`` or ``±hh:mm``, any fraction, surrounding
    whitespace ignored) as seconds since the epoch; None for anything else: not a string,
    another ISO 8601 form (no zone, no seconds, ``+0100``, a space for ``T``), or no real
    instant (2026-02-30, ``+25:00``, ``23:59:60``)."""
    if not isinstance(value, str):
        return None
    m = _RFC3339.match(value.strip())
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    try:
        if zone in ("Z", "z"):
            tz = datetime.UTC
        else:
            sign = -1 if zone[0] == "-" else 1
            offset = datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            tz = datetime.timezone(sign * offset)
        moment = datetime.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
        )
    except ValueError:
        return None
    return moment.timestamp() + (float(f"0.{frac}") if frac else 0.0)
