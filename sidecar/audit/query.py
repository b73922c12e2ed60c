"""Querying a trail: the records of a directory's chains that match a filter, in time order."""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.audit.files import _describe, trail_files
from sidecar.core.timefmt import utc_millis

log = logging.getLogger(__name__)

__all__ = ["query"]

# ---------------------------------------------------------------------------------------------
# Query


def _bound(when: datetime) -> str:
    """A query bound in the records' own `time` format (naive datetimes are UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return utc_millis(when.timestamp())


def _records(chain: str, files: list[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        try:
            handle = path.open("rb")
        except OSError as exc:
            log.warning("audit query: skipping %s: %s", path, _describe(exc))
            continue
        with handle:
            for lineno, raw in enumerate(handle, 1):
                try:
                    rec = json.loads(raw)
                except ValueError:
                    log.warning("audit query: %s line %d is not JSON; skipped", path, lineno)
                    continue
                if isinstance(rec, dict) and rec.get("type") == "decision":
                    yield rec


def query(
    directory: str | os.PathLike[str],
    *,
    agent: str | None = None,
    decision: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    trace_id: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Decision records matching every filter given, all chains merged by time.

    ``since`` is inclusive, ``until`` exclusive (naive datetimes are UTC); ``decision`` is
    "allow" or "deny". Raises AuditInputError for a missing directory or no audit files.
    This does not verify: run `verify` for that."""
    chains = trail_files(directory, None)
    lo = _bound(since) if since is not None else None
    hi = _bound(until) if until is not None else None
    trace = trace_id.lower() if trace_id else None
    merged = heapq.merge(
        *(_records(c, files) for c, files in chains.items()),
        key=lambda r: str(r.get("time", "")),
    )
    for rec in merged:
        t = str(rec.get("time", ""))
        if (
            (agent is None or rec.get("agent") == agent)
            and (decision is None or rec.get("decision") == decision)
            and (lo is None or t >= lo)
            and (hi is None or t < hi)
            and (trace is None or rec.get("trace_id") == trace)
        ):
            yield rec
