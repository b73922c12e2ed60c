"""`mandate audit verify` and `mandate audit query`: the command line of the audit trail.

Translates arguments into calls on :mod:`sidecar.audit` and results into output and exit
codes: verify exits 0 when every chain is intact, 1 when one is not (naming its first bad
record) or a chain the manifest lists is gone (naming each), 2 on bad input (no such
directory, no audit files, a bad time), and, with ``--log`` only, 3 when every chain is
intact but the log does not reach back to where a chain starts (``missing_head``,
``missing_previous``: a window, e.g. the kubelet rotated the file away) unless
``--allow-partial``. Both read a directory (DIR) or, with ``--log``, the audit stream a
mandate with ``--audit-stdout`` wrote, as the logs kept it (`kubectl logs`, the kubelet's
CRI log files: `sidecar.audit.logs`), taking records only from the container
``--container`` names where the source names containers. Must not contain chain logic:
that lives in `verify`, `logverify` and `query`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from sidecar.audit import query, query_log, verify, verify_log
from sidecar.core.model import parse_duration
from sidecar.errors import AuditError

__all__ = ["add_audit_parser", "parse_when", "run_audit"]

EXIT_OK, EXIT_TAMPERED, EXIT_BAD_INPUT, EXIT_INCOMPLETE = 0, 1, 2, 3


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
            "manifest (audit-manifest.jsonl) for chains deleted whole or not listed; or, "
            "with --log, every chain of the --audit-stdout records in logs (one per start "
            "of each writer) and the links of a restarted writer's chain to the one before. "
            "Exit 0 if all are intact (and, with --log, complete), 1 naming the first bad "
            "record (file, line, seq, what is wrong) or each missing chain, 2 on bad input; "
            "with --log, 1 also when another container than --container wrote record lines "
            "(foreign_container), and 3 when all is intact but the log starts after a "
            "chain's header (missing_head) or after the chain a restart follows "
            "(missing_previous): the kubelet rotated the file away, or --since/--tail cut "
            "it; give the earlier logs too (kubectl logs --previous, the node's CRI "
            "directory with its rotated files), or --allow-partial for a window on purpose."
        ),
    )
    ver.add_argument("directory", metavar="DIR", nargs="?")
    _log_option(ver, "verify")
    ver.add_argument("--chain", help="verify only this chain id")
    ver.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --log: a log that begins inside a chain, or after the chain a restart "
        "follows, is intact if what it holds is (exit 0, with notes saying where each chain "
        "begins) instead of incomplete (exit 3)",
    )
    ver.add_argument("--json", action="store_true", help="print the result as JSON")
    q = sub.add_parser(
        "query",
        help="print matching decision records as JSON lines",
        description=(
            "Print the decision records of DIR (or of the logs given with --log) matching "
            "every filter, merged by time, one "
            "JSON object per line. Times are RFC 3339 (2025-01-31T12:00:00Z) or a duration "
            "meaning that long ago (15m, 2h). --since is inclusive, --until exclusive. "
            "Does not verify the chains."
        ),
    )
    q.add_argument("directory", metavar="DIR", nargs="?")
    _log_option(q, "query")
    q.add_argument("--agent", help="the agent's profile name")
    q.add_argument("--decision", choices=["allow", "deny"])
    q.add_argument("--since", metavar="T", help="RFC 3339 time or duration ago (15m)")
    q.add_argument("--until", metavar="T", help="RFC 3339 time or duration ago (15m)")
    q.add_argument("--trace-id", help="32 hex digits")
    return audit


def _log_option(cmd: argparse.ArgumentParser, what: str) -> None:
    cmd.add_argument(
        "--log",
        action="append",
        metavar="SOURCE",
        help=f"{what} the audit stream of --audit-stdout in logs instead of DIR: a file "
        "(kubectl logs output, a CRI log file, plain or .gz), a directory of a container's "
        "CRI log files (/var/log/pods/NS_POD_UID/mandate/), or - for standard input; "
        "repeatable, read in the order given",
    )
    cmd.add_argument(
        "--container",
        default="mandate",
        metavar="NAME",
        help="with --log: the container that writes the records (default: mandate). Where "
        "the log names each line's container (kubectl logs --prefix, the kubelet's CRI "
        "paths) only its lines are records; elsewhere (kubectl logs POD -c mandate) the "
        "source is trusted to be that container",
    )


def _source(args: argparse.Namespace) -> str | None:
    """Why DIR and --log do not go together as given (None: they do)."""
    if (args.directory is None) == (args.log is None):
        return "give an audit directory DIR or --log SOURCE (one of them)"
    return None


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
    wrong = _source(args)
    if wrong is not None:
        return _bad(wrong)
    if args.log is not None:
        return _verify_log(args)
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


def _verify_log(args: argparse.Namespace) -> int:
    try:
        result = verify_log(
            args.log, args.chain, container=args.container, allow_partial=args.allow_partial
        )
    except AuditError as exc:
        return _bad(str(exc))
    if args.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        for c in result.chains:
            span = f"seq {c.first_seq}-{c.last_seq}" if c.last_seq is not None else "no record"
            who = f"writer {c.writer}, pid {c.pid}, " if c.writer else ""
            if c.problem is not None:
                print(f"TAMPERED: chain {c.chain}: {c.problem}")
            elif c.incomplete is not None:
                print(f"INCOMPLETE: chain {c.chain}: {who}{span}: {c.incomplete}")
            else:
                print(
                    f"ok: chain {c.chain}: {who}{c.records} decision record(s), {span}, "
                    f"{'ended' if c.ended else 'not ended'}, head {c.last_hash}"
                )
            for note in c.notes:
                print(f"  note: {note}")
        for p in result.problems:
            print(f"{'FOREIGN' if p.kind == 'foreign_container' else 'BAD LINE'}: {p}")
        for note in result.notes:
            print(f"note: {note}")
    problem = result.problem
    if problem is None:
        return EXIT_OK
    where = f"chain {problem.chain}" if problem.chain else "the stream"
    if not result.intact:
        print(f"mandate audit: {where}: first bad record: {problem}", file=sys.stderr)
        return EXIT_TAMPERED
    print(
        f"mandate audit: intact, but incomplete: {where}: {problem} (give the earlier logs "
        "too, or --allow-partial if the log is a window on purpose)",
        file=sys.stderr,
    )
    return EXIT_INCOMPLETE


def _query(args: argparse.Namespace) -> int:
    wrong = _source(args)
    if wrong is not None:
        return _bad(wrong)
    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as exc:
        return _bad(f"--since/--until {exc}")
    try:
        filters: dict[str, Any] = {
            "agent": args.agent, "decision": args.decision, "since": since, "until": until,
            "trace_id": args.trace_id,
        }  # fmt: skip
        found = (
            query(args.directory, **filters)
            if args.log is None
            else query_log(args.log, container=args.container, **filters)
        )
        for rec in found:
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
