"""The `mandate` command line: run, validate, explain, schema.

Translates arguments into calls on the core and the server, and errors into exit codes:
0 success (explain: allow), 1 explain: deny, 2 bad input (the message names the file,
document and field, or the argument). Must not contain decision logic.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from .core import RequestView, decide, load_profiles
from .core.model import json_schema
from .errors import BadRequestError, ConfigError, ProfileErrors

__all__ = ["main"]

EXIT_OK, EXIT_DENY, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default exit code is 2 as well
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mandate",
        description="Runtime identity and purpose-bound authorization for AI agents "
        "(an Envoy ext_authz server).",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="serve Envoy's ext_authz Check",
        description=(
            "Serve envoy.service.auth.v3.Authorization/Check, gRPC health, and the admin "
            "server (/healthz, /readyz, /metrics). Profiles hot-reload on change."
        ),
    )
    run.add_argument(
        "--profiles",
        default=_env("MANDATE_PROFILES"),
        required=not _env("MANDATE_PROFILES"),
        help="profile directory (env MANDATE_PROFILES)",
    )
    run.add_argument(
        "--listen",
        default=_env("MANDATE_LISTEN", "127.0.0.1:9001"),
        help="gRPC address HOST:PORT or unix:PATH (env MANDATE_LISTEN; default %(default)s)",
    )
    run.add_argument(
        "--admin",
        default=_env("MANDATE_ADMIN", "127.0.0.1:9901"),
        help="admin HTTP address HOST:PORT (env MANDATE_ADMIN; default %(default)s)",
    )
    run.add_argument(
        "--agent",
        default=_env("MANDATE_AGENT"),
        help="the agent this sidecar serves (env MANDATE_AGENT)",
    )
    run.add_argument(
        "--service-account",
        default=_env("MANDATE_SERVICE_ACCOUNT"),
        help="the pod's service account NAMESPACE/NAME (env MANDATE_SERVICE_ACCOUNT)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=int(_env("MANDATE_THREADS", "4") or 4),
        help="Check threads (default %(default)s)",
    )
    run.add_argument(
        "--poll-seconds",
        type=float,
        default=2.0,
        help="fallback poll interval of the profile directory (default %(default)s)",
    )
    run.add_argument("--port-file", type=Path, help="write the bound ports as JSON to this file")
    run.add_argument(
        "--log-level",
        default=_env("MANDATE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )

    val = sub.add_parser(
        "validate",
        help="check a profile directory",
        description=(
            "Load every *.yaml/*.yml in DIR. Exit 0 if valid; otherwise print every problem "
            "(file, document, field: what was expected) and exit 2."
        ),
    )
    val.add_argument("directory")
    val.add_argument("--json", action="store_true", help="print the result as JSON")

    ex = sub.add_parser(
        "explain",
        help="decide one call offline and say why",
        description=(
            "Decide METHOD URL for an agent against a profile directory, exactly as the "
            "sidecar would. Prints one JSON object; exit 0 allow, 1 deny, 2 bad input."
        ),
    )
    ex.add_argument("--profiles", required=True, help="profile directory")
    ex.add_argument("--agent", help="the agent (as the sidecar is configured for it)")
    ex.add_argument("--service-account", help="the pod's service account NAMESPACE/NAME")
    ex.add_argument("--spiffe", help="the SPIFFE id Envoy verified for the caller")
    ex.add_argument("--purpose", help="declared purpose (x-mandate-purpose)")
    ex.add_argument("--task", help="declared task (x-mandate-task)")
    ex.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="a request header; repeatable"
    )
    ex.add_argument("--body", help="request body; @FILE reads a file")
    ex.add_argument("method", help="HTTP method, or CONNECT")
    ex.add_argument(
        "url", help="absolute URL (http://host[:port]/path?query), or host:port for CONNECT"
    )

    sch = sub.add_parser("schema", help="print the JSON Schema of the profile format")
    sch.add_argument("--indent", type=int, default=2)
    return p


def _bad(message: str, **extra: Any) -> int:
    print(json.dumps({"error": "bad_input", "message": message, **extra}))
    print(f"mandate: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        snap = load_profiles(args.directory)
    except ProfileErrors as exc:
        if args.json:
            print(json.dumps({"valid": False, "problems": [str(p) for p in exc.problems]}))
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {args.directory}", file=sys.stderr)
        return EXIT_BAD_INPUT
    agents = sorted(snap.agents)
    if args.json:
        print(json.dumps({"valid": True, "agents": agents, "files": list(snap.files)}))
    else:
        print(f"ok: {len(agents)} agent(s) in {len(snap.files)} file(s): {', '.join(agents)}")
    return EXIT_OK


def _view(args: argparse.Namespace) -> RequestView:
    method = args.method.upper()
    headers: dict[str, str] = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadRequestError(f"--header {item!r}: expected NAME=VALUE")
        headers[key.strip().lower()] = value
    if args.purpose is not None:
        headers["x-mandate-purpose"] = args.purpose
    if args.task is not None:
        headers["x-mandate-task"] = args.task
    body: bytes | None = None
    if args.body is not None:
        if args.body.startswith("@"):
            try:
                body = Path(args.body[1:]).read_bytes()
            except OSError as exc:
                raise BadRequestError(f"--body {args.body!r}: {exc.strerror or exc}") from None
        else:
            body = args.body.encode()
    if method == "CONNECT":
        authority, path, scheme = args.url.removeprefix("//"), "", "https"
        if "/" in authority or ":" not in authority:
            raise BadRequestError(f"CONNECT target {args.url!r}: expected HOST:PORT")
    else:
        parts = urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadRequestError(f"URL {args.url!r}: expected an absolute http:// or https:// URL")
        authority, scheme = parts.netloc, parts.scheme
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not (args.agent or args.service_account or args.spiffe):
        raise BadRequestError("give --agent, --service-account or --spiffe: who is calling?")
    return RequestView(
        decision_id="explain",
        method=method,
        authority=authority,
        path=path,
        scheme=scheme,
        headers=headers,
        body=body,
        source_principal=args.spiffe or "",
        configured_agent=args.agent,
        configured_service_account=args.service_account,
    )


def _cmd_explain(args: argparse.Namespace) -> int:
    import time

    try:
        snap = load_profiles(args.profiles)
    except ProfileErrors as exc:
        return _bad(
            f"profiles in {args.profiles} are invalid", problems=[str(p) for p in exc.problems]
        )
    try:
        view = _view(args)
    except BadRequestError as exc:
        return _bad(str(exc))
    if args.agent and args.agent not in snap.agents:
        known = ", ".join(sorted(snap.agents))
        return _bad(f"--agent {args.agent!r}: no such profile (known: {known})")
    d = decide(snap, view, time.time())
    out = {
        "decision": "allow" if d.allowed else "deny",
        "reason": d.reason,
        "code": d.code,
        "rule": d.rule or None,
        "agent": d.agent or None,
        "owner": d.owner or None,
        "purpose": d.purpose or None,
        "task": d.task or None,
        "identity_source": d.identity_source or None,
        "method": d.method,
        "host": d.host or None,
        "port": d.port or None,
        "path": d.path or None,
        "mcp_tools": list(d.mcp_tools),
        "profiles_version": snap.version,
    }
    print(json.dumps(out, indent=2))
    return EXIT_OK if d.allowed else EXIT_DENY


def _cmd_run(args: argparse.Namespace) -> int:
    from .server import ServeConfig, serve

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServeConfig(
        profiles=Path(args.profiles),
        listen=args.listen,
        admin=args.admin,
        agent=args.agent,
        service_account=args.service_account,
        threads=args.threads,
        poll_seconds=args.poll_seconds,
        port_file=args.port_file,
    )
    try:
        serve(config)
    except ProfileErrors as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("mandate: refusing to start with invalid profiles", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        print(f"mandate: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _cmd_validate(args)
    if args.command == "explain":
        return _cmd_explain(args)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=args.indent, sort_keys=True))
        return EXIT_OK
    return _cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
