"""`mandate simulate` and `mandate profile suggest`: replay an audit trail against
candidate profiles, and propose a profile from one, from the command line.

Reads the profile directory and the trail's decision records (every chain of the directory,
merged by time, as `mandate audit query` reads them, but strictly: a line that is not a JSON
object, or a decision record without the fields replay needs, is refused naming its file and
line), hands them to the pure :mod:`sidecar.policy.simulate`, and prints its report as a
table or one JSON document. Exit 0 when no replayed call would change, 1 when one would, 2 on
bad input (no such directory, no audit files, an unreadable line, invalid profiles, a bad
time). Verifies nothing: `mandate audit verify` does that. Must not contain replay logic.

`mandate profile suggest` reads the same records (and, with --profiles, the agents' current
profiles), hands them to the pure :mod:`sidecar.policy.suggest` and prints (or writes to
--out) the proposal: exit 0 with a proposal, 1 when nothing usable was recorded for the
agent, 2 on bad input (as simulate's, and a bad --purpose, an agent --profiles lacks, an
--out that cannot be written). Must not contain the proposing logic.

Imports only argparse at module level: `mandate` builds every subcommand's parser on each
run, and the profile model and decision core are imported when `simulate` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.policy.simulate import Recorded

__all__ = [
    "DEFAULT_LIMIT",
    "add_profile_parser",
    "add_simulate_parser",
    "read_records",
    "run_profile",
    "run_simulate",
]

EXIT_UNCHANGED, EXIT_CHANGED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SUGGESTED, EXIT_NOTHING = 0, 1
DEFAULT_LIMIT = 5


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return value


def add_simulate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `simulate` to the `mandate` subcommands."""
    cmd: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="replay recorded calls against candidate profiles: what would change?",
        description=(
            "Replay the decision records of an audit directory against a candidate profile "
            "directory and report which past calls would change (allow -> deny, deny -> "
            "allow), grouped by agent, purpose and rule, with example calls. Outcomes of "
            "run-time state (revocations, rate limits, risk, elevation grants, ...) are "
            "counted as not replayable. Times are RFC 3339 (2025-01-31T12:00:00Z) or a "
            "duration meaning that long ago (15m, 2h); --since is inclusive, --until "
            "exclusive. Does not verify the chains. Exit 0 if nothing would change, 1 if "
            "something would, 2 on bad input."
        ),
    )
    cmd.add_argument("--profiles", required=True, metavar="DIR", help="the candidate profiles")
    cmd.add_argument("--audit", required=True, metavar="DIR", help="the audit directory")
    cmd.add_argument("--agent", help="replay only this agent's calls (its profile name)")
    cmd.add_argument("--since", metavar="T", help="RFC 3339 time or duration ago (15m)")
    cmd.add_argument("--until", metavar="T", help="RFC 3339 time or duration ago (15m)")
    cmd.add_argument("--json", action="store_true", help="print one JSON document")
    cmd.add_argument(
        "--limit",
        type=_count,
        default=DEFAULT_LIMIT,
        metavar="N",
        help="example calls shown per group (default %(default)s)",
    )
    return cmd


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `profile suggest` to the `mandate` subcommands."""
    profile: argparse.ArgumentParser = subparsers.add_parser(
        "profile",
        help="work on profiles from the audit trail (suggest)",
        description="Propose a profile from what an agent did.",
    )
    sub = profile.add_subparsers(dest="profile_command", required=True, metavar="{suggest}")
    cmd = sub.add_parser(
        "suggest",
        help="propose a profile from an agent's recorded calls",
        description=(
            "Propose an AgentProfile (YAML, with comments giving counts) from the decision "
            "records of an audit directory: per recorded purpose, the hosts, methods and "
            "path templates (* and ** where segments vary) of the calls allowed by the "
            "purpose's own rules, MCP tools, and argument domains (enum, ranges, maxLength, "
            "pattern from values recorded in clear; the type from hashes). Run the agent "
            "under a wide purpose first; review the proposal, `mandate simulate` it, then "
            "enforce it. Calls denied by a deny rule, revoked or malformed are never "
            "learned; --include-denied also learns calls denied outside_purpose where no "
            "rule matched (not those a rule's argument or tool constraint refused). An "
            "agent whose proposal fails is reported on stderr; the others still get theirs. "
            "Exit 0 with a proposal, 1 when nothing usable was recorded (or no proposal "
            "could be made), 2 on bad input."
        ),
    )
    cmd.add_argument("--audit", required=True, metavar="DIR", help="the audit directory")
    cmd.add_argument("--agent", help="this agent only (default: one document per agent)")
    cmd.add_argument("--since", metavar="T", help="RFC 3339 time or duration ago (15m)")
    cmd.add_argument("--until", metavar="T", help="RFC 3339 time or duration ago (15m)")
    cmd.add_argument("--purpose", metavar="NAME", help="learn only this recorded purpose")
    cmd.add_argument(
        "--profiles",
        metavar="DIR",
        help="the current profiles: keep the agent's owner, identities, audit choice, deny "
        "rules, elevations and the purposes not learned (default: placeholders)",
    )
    cmd.add_argument("--out", metavar="FILE", help="write the proposal here (default: stdout)")
    cmd.add_argument(
        "--include-denied",
        action="store_true",
        help="also learn calls denied outside_purpose that no rule matched (simulate then "
        "shows them deny -> allow)",
    )
    return profile


# ---------------------------------------------------------------------------------------------
# Reading the trail


def _bound(when: datetime | None) -> str | None:
    from sidecar.core.timefmt import utc_millis

    return None if when is None else utc_millis(when.timestamp())


def _decision(path: Path, lineno: int, raw: bytes) -> Recorded | None:
    """The decision record on one line, None for another record type; AuditInputError
    naming the file and line if the line cannot be read."""
    from sidecar.errors import AuditInputError
    from sidecar.policy.simulate import parse_record

    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        why = "not JSON"
        if not raw.endswith(b"\n"):
            why += (
                " (the last line, without its newline: a write was cut short; a restarted "
                "writer recovers it)"
            )
        raise AuditInputError(f"{path} line {lineno}: {why}") from None
    if not isinstance(obj, dict):
        raise AuditInputError(f"{path} line {lineno}: not a JSON object")
    if obj.get("type") != "decision":
        return None
    try:
        return parse_record(obj)
    except ValueError as exc:
        raise AuditInputError(f"{path} line {lineno}: {exc}") from None


def _chain(
    files: list[Path], agent: str | None, lo: str | None, hi: str | None
) -> Iterator[Recorded]:
    from sidecar.errors import AuditInputError

    for path in files:
        try:
            handle = path.open("rb")
        except OSError as exc:
            raise AuditInputError(f"{path}: {exc.strerror or exc}") from None
        with handle:
            for lineno, raw in enumerate(handle, 1):
                rec = _decision(path, lineno, raw)
                if (
                    rec is not None
                    and (agent is None or rec.agent == agent)
                    and (lo is None or rec.time >= lo)
                    and (hi is None or rec.time < hi)
                ):
                    yield rec


def read_records(
    directory: str | Path,
    *,
    agent: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[Recorded]:
    """The decision records of every chain of ``directory`` matching the filters, merged by
    time (``since`` inclusive, ``until`` exclusive; naive datetimes are UTC). Raises
    AuditInputError for a missing directory, no audit files, or an unreadable line."""
    import heapq

    from sidecar.audit.files import trail_files  # as `mandate audit query` finds them

    chains = trail_files(directory, None)
    lo, hi = _bound(since), _bound(until)
    return heapq.merge(
        *(_chain(files, agent, lo, hi) for files in chains.values()), key=lambda r: r.time
    )


# ---------------------------------------------------------------------------------------------
# Running


def _write(text: str) -> None:
    # a lone surrogate (made up by an agent) as its JSON escape, as in the audit file
    sys.stdout.write(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _bad(message: str, **extra: Any) -> int:
    _write(json.dumps({"error": "bad_input", "message": message, **extra}) + "\n")
    print(f"mandate simulate: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _bad_suggest(message: str) -> int:
    print(f"mandate profile suggest: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _when(when: str | None) -> datetime | None:
    from sidecar.audit.cli import parse_when

    return parse_when(when) if when else None


def run_simulate(args: argparse.Namespace) -> int:
    """Run `mandate simulate` from parsed arguments; returns the exit code."""
    from sidecar.core import load_profiles
    from sidecar.errors import AuditError, ProfileErrors
    from sidecar.policy.simulate import render_table, report_json, simulate

    try:
        since, until = _when(args.since), _when(args.until)
    except ValueError as exc:
        return _bad(f"--since/--until {exc}")
    try:
        snapshot = load_profiles(args.profiles)
    except ProfileErrors as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return _bad(
            f"profiles in {args.profiles} are invalid", problems=[str(p) for p in exc.problems]
        )
    try:
        records = read_records(args.audit, agent=args.agent, since=since, until=until)
        report = simulate(snapshot, records, limit=args.limit)
    except AuditError as exc:
        return _bad(str(exc))
    filters = {"agent": args.agent, "since": _bound(since), "until": _bound(until)}
    try:
        if args.json:
            doc = {"profiles": str(args.profiles), "audit": str(args.audit), "filters": filters}
            doc.update(report_json(report))
            _write(json.dumps(doc, ensure_ascii=False) + "\n")
        else:
            scope = ", ".join(f"{k} {v}" for k, v in filters.items() if v is not None)
            _write(
                f"Replaying {args.audit} against the profiles in {args.profiles}"
                f"{f' ({scope})' if scope else ''}\n" + render_table(report)
            )
    except BrokenPipeError:  # `| head`: stop quietly
        pass
    return EXIT_CHANGED if report.changed else EXIT_UNCHANGED


def run_profile(args: argparse.Namespace) -> int:
    """Run `mandate profile suggest` from parsed arguments; returns the exit code."""
    import re

    from sidecar.core import load_profiles
    from sidecar.errors import AuditError, ProfileErrors
    from sidecar.policy.suggest import suggest

    try:
        since, until = _when(args.since), _when(args.until)
    except ValueError as exc:
        return _bad_suggest(f"--since/--until {exc}")
    if args.purpose is not None and not re.match(
        r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$", args.purpose
    ):
        return _bad_suggest(
            f"--purpose {args.purpose[:64]!r}: not a purpose name (lower-case letters, digits, "
            "'-', '_', '.'; 1-63 characters)"
        )
    current = None
    if args.profiles is not None:
        try:
            current = load_profiles(args.profiles)
        except ProfileErrors as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            return _bad_suggest(f"--profiles {args.profiles}: the profiles are invalid")
        if args.agent is not None and args.agent not in current.agents:
            return _bad_suggest(f"--profiles {args.profiles}: no profile for agent {args.agent!r}")
    try:
        records = read_records(args.audit, agent=args.agent, since=since, until=until)
        result = suggest(
            records,
            current=current,
            purpose=args.purpose,
            include_denied=args.include_denied,
            source=str(args.audit),
        )
    except AuditError as exc:
        return _bad_suggest(str(exc))
    for agent, why in result.failed:  # the others still get their proposal
        print(
            f"mandate profile suggest: agent {agent!r}: no proposal could be made: {why}",
            file=sys.stderr,
        )
    if not result.agents and result.failed:
        return EXIT_NOTHING
    if not result.agents:
        who = f"agent {args.agent!r}" if args.agent else "any agent"
        scope = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("purpose", args.purpose),
                ("since", _bound(since)),
                ("until", _bound(until)),
            )
            if v is not None
        )
        print(
            f"mandate profile suggest: nothing to learn for {who} in {args.audit}"
            f"{f' ({scope})' if scope else ''}: {result.records} decision record(s), none "
            "allowed by a purpose's own rules",
            file=sys.stderr,
        )
        return EXIT_NOTHING
    if args.out is None:
        with contextlib.suppress(BrokenPipeError):  # `| head`: stop quietly
            _write(result.text)
    else:
        try:
            _write_file(Path(args.out), result.text)
        except OSError as exc:
            return _bad_suggest(f"--out {args.out}: {exc.strerror or exc}")
    print(
        f"mandate profile suggest: {len(result.agents)} profile(s) from {result.used} call(s) "
        f"of {result.records} record(s); replayed over their own records, "
        f"{result.changes} would change",
        file=sys.stderr,
    )
    return EXIT_SUGGESTED


def _write_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a file of its own, then renamed)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
