"""`mandate audit verify` and `mandate audit query`: the command line of the audit trail.

Translates arguments into calls on :mod:`sidecar.audit` and results into output and exit
codes: verify exits 0 when every chain is intact, 1 when one is not (naming its first bad
record) or a chain the manifest lists is gone (naming each), 2 on bad input (no such
directory, no audit files, a bad time). Must not contain chain logic: that lives in
`sidecar.audit.trail`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from sidecar.audit import query, verify
from sidecar.core.model import parse_duration
from sidecar.errors import AuditError

__all__ = ["add_audit_parser", "parse_when", "run_audit"]

EXIT_OK, EXIT_TAMPERED, EXIT_BAD_INPUT = 0, 1, 2


def add_audit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `audit verify` and `audit query` to the `mandate` subcommands."""
    audit: argparse.ArgumentParser = subparsers.add_parser(
        "audit",
        help="verify or query the audit trail",
        description="Verify the hash chains of an audit directory, or query its records.",
    )
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="{verify,query}")
    ver = sub.add_parser(
        "verify",
        help="check every chain for edited, removed, reordered or truncated records",
        description=(
            "Walk every chain (one per worker) of DIR in file order, and check DIR's "
            "manifest (audit-manifest.jsonl) for chains deleted whole or not listed. Exit 0 "
            "if all are intact, 1 naming the first bad record (file, line, seq, what is "
            "wrong) or each missing chain, 2 on bad input."
        ),
    )
    ver.add_argument("directory", metavar="DIR")
    ver.add_argument("--chain", help="verify only this chain id")
    ver.add_argument("--json", action="store_true", help="print the result as JSON")
    q = sub.add_parser(
        "query",
        help="print matching decision records as JSON lines",
        description=(
            "Print the decision records of DIR matching every filter, merged by time, one "
            "JSON object per line. Times are RFC 3339 (2025-01-31T12:00:00Z) or a duration "
            "meaning that long ago (15m, 2h). --since is inclusive, --until exclusive. "
            "Does not verify the chains."
        ),
    )
    q.add_argument("directory", metavar="DIR")
    q.add_argument("--agent", help="the agent's profile name")
    q.add_argument("--decision", choices=["allow", "deny"])
    q.add_argument("--since", metavar="T", help="RFC 3339 time or duration ago (15m)")
    q.add_argument("--until", metavar="T", help="RFC 3339 time or duration ago (15m)")
    q.add_argument("--trace-id", help="32 hex digits")
    return audit


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time (naive means UTC) or a duration meaning that long before ``now``.
    ValueError if it is neither."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r}: expected an RFC 3339 time (2025-01-31T12:00:00Z) or a duration (15m)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _bad(message: str) -> int:
    print(json.dumps({"error": "bad_input", "message": message}))
    print(f"mandate audit: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _verify(args: argparse.Namespace) -> int:
    try:
        result = verify(args.directory, args.chain)
    except AuditError as exc:
        return _bad(str(exc))
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        for c in result.chains:
            if c.problem is None:
                print(
                    f"ok: chain {c.chain}: {c.files} file(s), {c.records} decision record(s), "
                    f"last seq {c.last_seq}, head {c.last_hash}"
                )
            else:
                print(f"TAMPERED: chain {c.chain}: {c.problem}")
            for note in c.notes:
                print(f"  note: {note}")
        for p in result.missing:
            print(f"MISSING: chain {p.chain}: {p}")
        if result.manifest is not None:
            print(f"TAMPERED: manifest: {result.manifest}")
    problem = result.problem
    if problem is not None:
        print(f"mandate audit: chain {problem.chain}: first bad record: {problem}", file=sys.stderr)
        return EXIT_TAMPERED
    return EXIT_OK


def _query(args: argparse.Namespace) -> int:
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as exc:
        return _bad(f"--since/--until {exc}")
    try:
        for rec in query(
            args.directory,
            agent=args.agent,
            decision=args.decision,
            since=since,
            until=until,
            trace_id=args.trace_id,
        ):
            line = json.dumps(rec, ensure_ascii=False, sort_keys=True)
            # a lone surrogate (made up by an agent) as its JSON escape, as in the file
            sys.stdout.write(line.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")
    except AuditError as exc:
        return _bad(str(exc))
    except BrokenPipeError:  # `| head`: stop quietly
        return EXIT_OK
    return EXIT_OK


def run_audit(args: argparse.Namespace) -> int:
    """Run `mandate audit verify|query` from parsed arguments; returns the exit code."""
    if args.audit_command == "verify":
        return _verify(args)
    return _query(args)
