"""Querying a trail: the decision records of a directory's chains (`query`), or of an audit
stream read back from logs (`query_log`), that match a filter, in time order."""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sidecar.audit.files import _describe, trail_files
from sidecar.audit.logs import log_lines
from sidecar.core.timefmt import utc_millis

log = logging.getLogger(__name__)

__all__ = ["query", "query_log"]

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
    merged = heapq.merge(
        *(_records(c, files) for c, files in chains.items()),
        key=lambda r: str(r.get("time", "")),
    )
    return _matching(merged, agent, decision, since, until, trace_id)


def query_log(
    sources: Sequence[str],
    *,
    agent: str | None = None,
    decision: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    trace_id: str | None = None,
    container: str = "mandate",
) -> Iterator[dict[str, Any]]:
    """`query` on an audit stream read back from logs (`logs`: files, CRI log directories,
    ``-``): the decision records of every chain, in time order (a stream's chains
    interleave by batch), with their ``chain``. Lines that are not records are skipped,
    and so are the lines of another container than ``container`` where the source names
    it (logged once per source and container). Raises AuditInputError for a source that
    cannot be read."""
    found: list[dict[str, Any]] = []
    foreign: set[tuple[str, str]] = set()
    for line in log_lines(sources):
        if not line.candidate or not line.complete:
            continue
        if line.container is not None and line.container != container:
            if (line.source, line.container) not in foreign:
                foreign.add((line.source, line.container))
                log.warning(
                    "audit query: %s line %d: container %r is not %r: its record-like lines "
                    "are skipped",
                    line.source, line.line, line.container, container,
                )  # fmt: skip
            continue
        try:
            rec = json.loads(line.text)
        except ValueError:
            log.warning("audit query: %s line %d is not JSON; skipped", line.source, line.line)
            continue
        if isinstance(rec, dict) and rec.get("type") == "decision":
            found.append(rec)
    found.sort(key=lambda r: str(r.get("time", "")))
    return _matching(iter(found), agent, decision, since, until, trace_id)


def _matching(
    records: Iterator[dict[str, Any]],
    agent: str | None,
    decision: str | None,
    since: datetime | None,
    until: datetime | None,
    trace_id: str | None,
) -> Iterator[dict[str, Any]]:
    lo = _bound(since) if since is not None else None
    hi = _bound(until) if until is not None else None
    trace = trace_id.lower() if trace_id else None
    for rec in records:
        t = str(rec.get("time", ""))
        if (
            (agent is None or rec.get("agent") == agent)
            and (decision is None or rec.get("decision") == decision)
            and (lo is None or t >= lo)
            and (hi is None or t < hi)
            and (trace is None or rec.get("trace_id") == trace)
        ):
            yield rec
