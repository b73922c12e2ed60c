"""The `mandate` command line: run, worker, validate, explain, schema, revoke, restore,
status, approve, elevations, audit, simulate, profile (suggest), inject, webhook, jwks.

Translates arguments into calls on the core and the server, and errors into exit codes:
0 success (explain: allow), 1 explain: deny (admin commands: refused with 409), 2 bad input
(the message names the file, document and field, or the argument), 3 the sidecar failed to
carry out an admin command (a 5xx: e.g. a revocation in force but not durable, a restore not
done; the message says which file and why). Must not contain decision logic.

`run` and `worker` turn their options into the one settings model (sidecar.settings) once,
here; a worker that `mandate run` starts takes its settings whole from its environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from sidecar import DEFAULT_THREADS
from sidecar.audit.cli import add_audit_parser, run_audit
from sidecar.core import RequestView, decide, load_profiles
from sidecar.core.model import json_schema, parse_duration
from sidecar.core.timefmt import parse_rfc3339, utc_seconds
from sidecar.errors import BadRequestError, ConfigError, ProfileErrors
from sidecar.headers import PURPOSE_HEADER, TASK_HEADER
from sidecar.injection.cli import add_inject_parser, run_inject
from sidecar.policy.cli import add_profile_parser, add_simulate_parser, run_profile, run_simulate
from sidecar.settings import (
    AUDIT_ALLOWS,
    AUDIT_FAILURE_MODES,
    AUDIT_FSYNC_MODES,
    GRPC_SERVERS,
    HTTP_SERVERS,
    KUBERNETES_MODES,
    LOG_LEVELS,
    SINGLE_PROCESS,
    TRACERS,
    TRANSPORTS,
    WORKER_SETTINGS_ENV,
    AdminSettings,
    AuditSettings,
    BehaviourAnalysisSettings,
    CheckSettings,
    ContextListener,
    CredentialSettings,
    IdentitySettings,
    KubernetesSettings,
    ProfileSettings,
    Settings,
    StateSettings,
    TableSource,
    TracingSettings,
    WorkerSettings,
)

__all__ = ["main"]

EXIT_OK, EXIT_DENY, EXIT_BAD_INPUT, EXIT_FAILED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default exit code is 2 as well
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _serve_options(cmd: argparse.ArgumentParser, *, admin: bool, spawned: bool = False) -> None:
    """The options `mandate run` and `mandate worker` share, in the order --help lists them.
    ``spawned``: a worker `mandate run` started, whose settings come whole from
    MANDATE_WORKER_SETTINGS (no option is required)."""
    _endpoint_options(cmd, admin=admin, spawned=spawned)
    _identity_options(cmd)
    _runtime_options(cmd)
    _audit_options(cmd)
    _credential_options(cmd)
    cmd.add_argument("--port-file", type=Path, help="write the bound ports as JSON to this file")
    cmd.add_argument(
        "--log-level",
        default=_env("MANDATE_LOG_LEVEL", "INFO"),
        choices=LOG_LEVELS,
    )


def _endpoint_options(cmd: argparse.ArgumentParser, *, admin: bool, spawned: bool) -> None:
    cmd.add_argument(
        "--profiles",
        default=_env("MANDATE_PROFILES"),
        required=not (_env("MANDATE_PROFILES") or spawned),
        help="profile directory (env MANDATE_PROFILES)",
    )
    cmd.add_argument(
        "--listen",
        default=_env("MANDATE_LISTEN", "127.0.0.1:9001"),
        help="Check address HOST:PORT (worker i: PORT+i) or unix:PATH (worker i: PATH.i) "
        "(env MANDATE_LISTEN; default %(default)s)",
    )
    cmd.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=_env("MANDATE_TRANSPORT", "grpc"),
        help="how Envoy's ext_authz filter asks: grpc_service or http_service (use the "
        "matching config of envoy/; env MANDATE_TRANSPORT; default %(default)s)",
    )
    cmd.add_argument(
        "--http-server",
        choices=HTTP_SERVERS,
        default=_env("MANDATE_HTTP_SERVER", "lean"),
        help="the HTTP transport's server: aiohttp's, or lean (httptools on uvloop) "
        "(env MANDATE_HTTP_SERVER; default %(default)s)",
    )
    cmd.add_argument(
        "--grpc-server",
        choices=GRPC_SERVERS,
        default=_env("MANDATE_GRPC_SERVER", "threads"),
        help="the gRPC transport's server: grpcio's thread-pool server (--threads), or aio "
        "(grpc.aio on an event loop of its own, measured slower: bench/results/grpc_shapes.md; "
        "where this grpcio cannot run it, the thread-pool server) (env MANDATE_GRPC_SERVER; "
        "default %(default)s)",
    )
    if admin:
        cmd.add_argument(
            "--admin",
            default=_env("MANDATE_ADMIN", "127.0.0.1:9901"),
            help="admin HTTP address HOST:PORT (env MANDATE_ADMIN; default %(default)s)",
        )


def _identity_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--agent",
        default=_env("MANDATE_AGENT"),
        help="the agent this sidecar serves (env MANDATE_AGENT)",
    )
    cmd.add_argument(
        "--service-account",
        default=_env("MANDATE_SERVICE_ACCOUNT"),
        help="the pod's service account NAMESPACE/NAME (env MANDATE_SERVICE_ACCOUNT)",
    )
    cmd.add_argument(
        "--namespace",
        default=_env("MANDATE_NAMESPACE", "default"),
        help="the pod's namespace: revocations apply per namespace (env MANDATE_NAMESPACE; "
        "default %(default)s)",
    )


def _runtime_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--threads",
        type=int,
        default=int(_env("MANDATE_THREADS", str(DEFAULT_THREADS)) or DEFAULT_THREADS),
        help="gRPC Check threads per worker (env MANDATE_THREADS; default %(default)s: "
        "the fastest measured on 2 CPUs, bench/telemetry_cost.py --threads)",
    )
    cmd.add_argument(
        "--poll-seconds",
        type=float,
        default=2.0,
        help="fallback poll interval of the profile directory (default %(default)s)",
    )
    cmd.add_argument(
        "--otlp-endpoint",
        default=_env("MANDATE_OTLP_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        help="OTLP/gRPC collector for decision spans, e.g. http://jaeger:4317 (env "
        "MANDATE_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; default: tracing off)",
    )
    cmd.add_argument(
        "--tracer",
        choices=TRACERS,
        default=_env("MANDATE_TRACER", "lean"),
        help="how decision spans are recorded: lean (mandate's OTLP encoder, ~6 us CPU per "
        "span) or sdk (the OpenTelemetry SDK and its OTLP exporter, ~85 us; see "
        "bench/span_cost.py); env MANDATE_TRACER, default %(default)s",
    )
    cmd.add_argument(
        "--pod-name",
        default=_env("MANDATE_POD_NAME", ""),
        help="this pod's name, for spans, audit records and Events (env MANDATE_POD_NAME)",
    )


def _credential_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--txn-token-keys",
        type=Path,
        default=_env("MANDATE_TXN_TOKEN_KEYS") or None,
        help="directory of the Transaction Token signing keys (a Secret mounted only into "
        "mandate; env MANDATE_TXN_TOKEN_KEYS); needed by `transactionToken` credentials",
    )
    cmd.add_argument(
        "--txn-token-issuer",
        default=_env("MANDATE_TXN_TOKEN_ISSUER", "https://mandate.local"),
        help="the `iss` of minted Transaction Tokens (env MANDATE_TXN_TOKEN_ISSUER; "
        "default %(default)s)",
    )
    cmd.add_argument(
        "--credential-wait",
        type=float,
        default=0.25,
        help="seconds a gRPC Check waits for a first OAuth token in flight before refusing "
        "the call (credential_unavailable; at most 0.4, below Envoy's ext_authz timeout; the "
        "HTTP transport never waits; default %(default)s)",
    )


def _audit_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--audit-dir",
        type=Path,
        default=_env("MANDATE_AUDIT_DIR"),
        help="write the hash-chained audit trail here (env MANDATE_AUDIT_DIR; default: off)",
    )
    cmd.add_argument(
        "--audit-stdout",
        action="store_const",
        const="true",
        default=_env("MANDATE_AUDIT_STDOUT"),
        help="write the audit records as JSON lines to stdout, for the cluster's log pipeline "
        "(kubectl logs; verify with `mandate audit verify --log`); alone or with --audit-dir "
        "(env MANDATE_AUDIT_STDOUT=true; default: off)",
    )
    cmd.add_argument(
        "--audit-allows",
        choices=AUDIT_ALLOWS,
        default=_env("MANDATE_AUDIT_ALLOWS", "all"),
        help="record allowed calls too (denies are always recorded; default %(default)s)",
    )
    cmd.add_argument(
        "--audit-on-failure",
        choices=AUDIT_FAILURE_MODES,
        default=_env("MANDATE_AUDIT_ON_FAILURE", "fail-closed"),
        help="when the audit trail cannot be written: deny every call, or count and go on "
        "(default %(default)s)",
    )
    cmd.add_argument(
        "--audit-fsync",
        choices=AUDIT_FSYNC_MODES,
        default=_env("MANDATE_AUDIT_FSYNC", "interval"),
        help="fsync policy of the audit files (default %(default)s: at most once a second)",
    )
    cmd.add_argument(
        "--audit-reserve",
        type=_size,
        default=_env("MANDATE_AUDIT_RESERVE", "8M"),
        metavar="SIZE",
        help="fail closed while the audit filesystem has less than this free, before it is "
        "full, so that calls already allowed still get their records (bytes, or with K/M/G; "
        "0: off; env MANDATE_AUDIT_RESERVE; default %(default)s)",
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mandate",
        description="Runtime identity and purpose-bound authorization for AI agents "
        "(an Envoy ext_authz server).",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _run_parser(sub)
    _worker_parser(sub)
    _admin_parsers(sub)
    _validate_parser(sub)
    _explain_parser(sub)
    sch = sub.add_parser("schema", help="print the JSON Schema of the profile format")
    sch.add_argument("--indent", type=int, default=2)
    add_audit_parser(sub)
    add_simulate_parser(sub)
    add_profile_parser(sub)
    add_inject_parser(sub)
    _jwks_parser(sub)
    return p


def _jwks_parser(sub: Any) -> None:
    """`mandate jwks` (sidecar.credentials.cli; imported only when run: cryptography)."""
    cmd = sub.add_parser(
        "jwks",
        help="print or serve the JWKS of the Transaction Token signing keys, or make a key",
    )
    cmd.add_argument("--keys", type=Path, help="the signing-key directory (--txn-token-keys)")
    cmd.add_argument("--listen", help="serve the JWKS on HOST:PORT at /.well-known/jwks.json")
    cmd.add_argument("--new-key", type=Path, help="write a new private key to DIR/KID.pem")
    cmd.add_argument(
        "--alg", default="ES256", choices=("ES256", "ES384", "EdDSA", "RS256"), help="new key"
    )


def _run_parser(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="serve Envoy's ext_authz Check (supervisor and workers)",
        description=(
            "Serve envoy.service.auth.v3.Authorization/Check from N worker processes, each on "
            "an endpoint of its own (PORT, PORT+1, ...), and the admin server (/healthz, "
            "/readyz, /metrics, /v1/revocations). Profiles hot-reload on change; revocations "
            "come from AgentRevocation objects (Kubernetes), the admin API and `mandate revoke`."
        ),
    )
    _serve_options(run, admin=True)
    run.add_argument(
        "--workers",
        type=int,
        default=int(_env("MANDATE_WORKERS", "1") or 1),
        help="Check worker processes (env MANDATE_WORKERS; default %(default)s)",
    )
    run.add_argument(
        "--single-process",
        choices=SINGLE_PROCESS,
        default=_env("MANDATE_SINGLE_PROCESS", "auto"),
        help="serve the Checks in this process: auto (with one worker), on, off (a worker "
        "process; env MANDATE_SINGLE_PROCESS; default %(default)s)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        default=_env("MANDATE_STATE_DIR"),
        help="where revocations persist across restarts, on a volume (env MANDATE_STATE_DIR)",
    )
    run.add_argument(
        "--table",
        type=Path,
        help="the shared-memory revocation table file, and PATH.context beside it (default: "
        "tables with no name, freed with the last process even after a SIGKILL; a file given "
        "here is yours: it stays when mandate is killed, and is reused on the next start)",
    )
    run.add_argument(
        "--admin-token-file",
        type=Path,
        default=_env("MANDATE_ADMIN_TOKEN_FILE"),
        help="bearer token for /v1/* (env MANDATE_ADMIN_TOKEN_FILE; default: "
        "STATE_DIR/admin.token, generated if missing)",
    )
    _run_cluster_options(run)


def _run_cluster_options(run: argparse.ArgumentParser) -> None:
    """Kubernetes, behaviour analysis and the agent context API (`mandate run` only)."""
    run.add_argument(
        "--kubernetes",
        choices=KUBERNETES_MODES,
        default=_env("MANDATE_KUBERNETES", "auto"),
        help="watch AgentRevocation objects (auto: when in a cluster or --kubeconfig is given)",
    )
    run.add_argument("--kubeconfig", type=Path, default=_env("KUBECONFIG"), help="kubeconfig file")
    run.add_argument(
        "--access-log",
        default=_env("MANDATE_ACCESS_LOG"),
        metavar="ADDRESS",
        help="receive Envoy's gRPC access log on HOST:PORT or unix:/path for behaviour "
        "analysis (env MANDATE_ACCESS_LOG; default: off)",
    )
    run.add_argument(
        "--publish-behaviour-revocations",
        action="store_true",
        default=_env("MANDATE_PUBLISH_BEHAVIOUR_REVOCATIONS") == "true",
        help="when behaviour analysis revokes an agent, also create an AgentRevocation object "
        "(needs create on agentrevocations; env MANDATE_PUBLISH_BEHAVIOUR_REVOCATIONS=true)",
    )
    run.add_argument(
        "--context-api",
        action="append",
        default=[x for x in (_env("MANDATE_CONTEXT_API") or "").split(",") if x],
        metavar="[AGENT=]ADDRESS",
        help="serve the agent context API (report task, request elevation, status, explain) "
        "on HOST:PORT or unix:/path, for the pod's agent or AGENT; repeatable "
        "(env MANDATE_CONTEXT_API, comma-separated)",
    )
    run.add_argument(
        "--initial-sync-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the first Kubernetes list before enforcing the last known "
        "revocations (default %(default)s)",
    )


def _worker_parser(sub: Any) -> None:
    worker = sub.add_parser(
        "worker",
        help="one Check worker (started by `mandate run`)",
        description="Serve Check on one endpoint, reading revocations from the shared table.",
    )
    # Started by `mandate run`: the settings come whole in the environment (_cmd_worker).
    spawned = bool(os.environ.get(WORKER_SETTINGS_ENV))
    _serve_options(worker, admin=False, spawned=spawned)
    table = worker.add_mutually_exclusive_group(required=not spawned)
    table.add_argument("--table", type=Path, help="the shared revocation table")
    table.add_argument(
        "--table-fd",
        type=int,
        metavar="FD",
        help="the shared revocation table, open as this inherited descriptor (`mandate run`)",
    )
    worker.add_argument("--chain-id", default="", help="this worker's audit chain id")
    context = worker.add_mutually_exclusive_group()
    context.add_argument(
        "--context-table", type=Path, help="the shared context table (grants, tasks, risk)"
    )
    context.add_argument(
        "--context-table-fd",
        type=int,
        metavar="FD",
        help="the shared context table, open as this inherited descriptor (`mandate run`)",
    )
    worker.add_argument(
        "--version-file", type=Path, help="where to report the profile version enforced"
    )
    worker.add_argument(
        "--rate-share",
        type=float,
        default=1.0,
        help="this worker's share of each purpose's rate limit (1/workers; default 1)",
    )


def _admin_parsers(sub: Any) -> None:
    """The commands that call a running sidecar's admin API."""
    for name, helptext in (
        ("revoke", "revoke an agent through the sidecar's admin API"),
        ("restore", "remove the admin API's revocation of an agent"),
        ("status", "show the sidecar's readiness, workers, revocations and elevations"),
        ("approve", "approve an agent's pending elevation request (operator only)"),
        ("elevations", "list elevation requests and active grants"),
    ):
        cmd = sub.add_parser(name, help=helptext, description=helptext)
        if name in ("revoke", "restore"):
            cmd.add_argument("agent", help="the agent's profile name, or '*' for every agent")
        if name == "approve":
            cmd.add_argument("request", help="the request id (elev-...), from `mandate elevations`")
            cmd.add_argument(
                "--approver",
                default=_env("USER") or None,
                required=not _env("USER"),
                help="who approves, for the audit trail (default: $USER)",
            )
            cmd.add_argument("--duration", help="grant length, at most maxDuration (e.g. 5m)")
            cmd.add_argument("--reason", help="why it is approved (ticket, ...)")
        if name == "revoke":
            cmd.add_argument("--reason", required=True, help="why; shown in every denied call")
            cmd.add_argument("--expires", help="duration (e.g. 30m) or RFC 3339 time")
        cmd.add_argument(
            "--admin",
            default=_env("MANDATE_ADMIN", "127.0.0.1:9901"),
            help="the sidecar's admin address (env MANDATE_ADMIN; default %(default)s)",
        )
        cmd.add_argument(
            "--token-file",
            type=Path,
            default=_env("MANDATE_ADMIN_TOKEN_FILE"),
            required=not _env("MANDATE_ADMIN_TOKEN_FILE"),
            help="the admin bearer token file (env MANDATE_ADMIN_TOKEN_FILE)",
        )


def _validate_parser(sub: Any) -> None:
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


def _explain_parser(sub: Any) -> None:
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
    ex.add_argument(
        "--tool",
        help="explain the MCP tools/call of this tool (the body is built from it and "
        "--arguments; METHOD must be POST)",
    )
    ex.add_argument("--arguments", help="the tool's arguments, a JSON object; @FILE reads a file")
    ex.add_argument(
        "--declare",
        metavar="FILE",
        help="decide as if --task had been reported with this declaration: a YAML or JSON "
        "list of allow rules in the profile's syntax (ReportTask `allow`)",
    )
    ex.add_argument("method", help="HTTP method, or CONNECT")
    ex.add_argument(
        "url", help="absolute URL (http://host[:port]/path?query), or host:port for CONNECT"
    )


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
        headers[PURPOSE_HEADER] = args.purpose
    if args.task is not None:
        headers[TASK_HEADER] = args.task
    body = _argument_bytes("--body", args.body)
    if args.tool is not None:
        body = _tool_call(args, method, body)
        headers.setdefault("content-type", "application/json")
    elif args.arguments is not None:
        raise BadRequestError("--arguments: only with --tool (the MCP tool they are for)")
    if not (args.agent or args.service_account or args.spiffe):
        raise BadRequestError("give --agent, --service-account or --spiffe: who is calling?")
    # Imported here: authz imports prometheus_client, which `mandate run` must configure first.
    from sidecar.check.request import view_from_url

    return view_from_url(
        method,
        args.url,
        headers,
        body,
        decision_id="explain",
        agent=args.agent,
        service_account=args.service_account,
        spiffe=args.spiffe,
    )


def _argument_bytes(flag: str, value: str | None) -> bytes | None:
    if value is None:
        return None
    if not value.startswith("@"):
        return value.encode()
    try:
        return Path(value[1:]).read_bytes()
    except OSError as exc:
        raise BadRequestError(f"{flag} {value!r}: {exc.strerror or exc}") from None


def _tool_call(args: argparse.Namespace, method: str, body: bytes | None) -> bytes:
    from sidecar.core.mcp import tool_call_from_json

    if body is not None:
        raise BadRequestError("give either --body or --tool, not both")
    if method != "POST":
        raise BadRequestError(f"--tool: an MCP tool call is a POST, not {method}")
    raw = _argument_bytes("--arguments", args.arguments)
    try:
        if raw == b"":  # given, and empty: not JSON (absent is "no arguments")
            raise ValueError("not JSON")
        return tool_call_from_json(args.tool, raw)
    except ValueError as exc:
        raise BadRequestError(f"--arguments: {exc}") from None


def _declared_state(args: argparse.Namespace, snap: Any, view: RequestView) -> Any:
    """The agent state in which --task was reported with the declaration in --declare."""
    import yaml

    from sidecar.core.agentstate import AgentStateTable, TaskBinding
    from sidecar.core.taskscope import DeclarationError, validate_declaration

    if not args.task:
        raise BadRequestError("--declare: give --task too (the task that declared it)")
    try:
        rules = yaml.safe_load(Path(args.declare).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadRequestError(f"--declare {args.declare}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"--declare {args.declare}: not YAML ({exc})") from None
    if isinstance(rules, dict) and set(rules) == {"allow"}:
        rules = rules["allow"]
    if not isinstance(rules, list):
        raise BadRequestError(f"--declare {args.declare}: expected a list of allow rules")
    try:
        declared = validate_declaration(rules)
    except DeclarationError as exc:
        raise BadRequestError(f"--declare {args.declare}: {exc}") from None
    agent = snap.agents.get(view.configured_agent or "")
    purpose = args.purpose or (agent.default_purpose if agent is not None else "") or ""
    if not purpose:
        raise BadRequestError("--declare: give --purpose (the task's purpose)")
    binding = TaskBinding(
        view.configured_agent or "", view.namespace, args.task, purpose, 0.0, None, declared
    )
    return AgentStateTable.build(1, tasks=[binding])


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
    if args.declare is not None:
        if not args.agent:
            return _bad("--declare: give --agent (the agent that reported the task)")
        try:
            state = _declared_state(args, snap, view)
        except BadRequestError as exc:
            return _bad(str(exc))
        d = decide(snap, view, time.time(), agent_state=state)
    else:
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
        "constraint": d.constraint or None,
        "profiles_version": snap.version,
    }
    print(json.dumps(out, indent=2))
    return EXIT_OK if d.allowed else EXIT_DENY


def _starting(log_level: str, start: Callable[[], None]) -> int:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        start()
    except ProfileErrors as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("mandate: refusing to start with invalid profiles", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as exc:
        return _config_error(exc)
    return EXIT_OK


def _config_error(exc: ConfigError) -> int:
    print(f"mandate: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _settings(args: argparse.Namespace) -> Settings:
    """The settings of `mandate run` or of a `mandate worker` run by hand, from its options
    (a worker has none of the supervisor's: those keep their defaults). Raises ConfigError
    naming the option."""
    run = args.command == "run"
    settings = Settings(
        profiles=ProfileSettings(directory=Path(args.profiles), poll_seconds=args.poll_seconds),
        check=CheckSettings(
            listen=args.listen,
            transport=args.transport,
            threads=args.threads,
            workers=args.workers if run else 1,
            single_process=args.single_process if run else "auto",
            http_server=args.http_server,
            grpc_server=args.grpc_server,
        ),
        identity=IdentitySettings(
            agent=args.agent,
            service_account=args.service_account,
            namespace=args.namespace,
            pod_name=args.pod_name,
        ),
        tracing=TracingSettings(otlp_endpoint=args.otlp_endpoint, tracer=args.tracer),
        audit=AuditSettings(
            directory=args.audit_dir,
            stdout=_switch("--audit-stdout", "MANDATE_AUDIT_STDOUT", args.audit_stdout),
            allows=args.audit_allows,
            on_failure=args.audit_on_failure,
            fsync=args.audit_fsync,
            reserve_bytes=args.audit_reserve,
        ),
        credentials=CredentialSettings(
            txn_token_keys=args.txn_token_keys,
            txn_token_issuer=args.txn_token_issuer,
            wait=args.credential_wait,
        ),
        log_level=args.log_level,
        port_file=args.port_file,
    )
    return _with_supervisor_options(settings, args) if run else settings


def _with_supervisor_options(settings: Settings, args: argparse.Namespace) -> Settings:
    """The groups only `mandate run` has options for."""
    return replace(
        settings,
        admin=AdminSettings(listen=args.admin, token_file=args.admin_token_file),
        state=StateSettings(directory=args.state_dir, table=args.table),
        kubernetes=KubernetesSettings(
            mode=args.kubernetes,
            kubeconfig=args.kubeconfig,
            initial_sync_timeout=args.initial_sync_timeout,
        ),
        behaviour=BehaviourAnalysisSettings(
            access_log=args.access_log, publish_revocations=args.publish_behaviour_revocations
        ),
        context_api=tuple(ContextListener.parse(entry) for entry in args.context_api),
    )


def _worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """A worker's settings: whole from `mandate run` (WORKER_SETTINGS_ENV, where its command
    line only names its endpoint), or from the options of a worker run by hand."""
    handed = os.environ.get(WORKER_SETTINGS_ENV)
    if handed:
        config = WorkerSettings.from_json(handed)
        if args.listen != config.run.check.listen:
            raise ConfigError(
                f"--listen {args.listen!r}: this worker's settings ({WORKER_SETTINGS_ENV}) "
                f"say {config.run.check.listen!r}"
            )
        return config
    return WorkerSettings(
        run=_settings(args),
        revocations=TableSource(path=args.table, fd=args.table_fd),
        agent_state=TableSource(path=args.context_table, fd=args.context_table_fd),
        chain_id=args.chain_id,
        version_file=args.version_file,
        rate_share=args.rate_share,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)  # every check of the options, once, before anything runs
    except ConfigError as exc:
        return _config_error(exc)
    from sidecar.state.shm import RunDir

    # The run's directory (workers' port and version files, metrics): removed on exit, and
    # after a SIGKILL by the last worker to go or else by the next start (shm.RunDir).
    run_dir = RunDir.create()
    if not settings.check.in_process and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Before prometheus_client is imported: the supervisor's and the workers' metrics
        # then share one directory and /metrics reports them together. In one process, one
        # registry in memory: no file per metric to map and write (15 % of a lean Check).
        metrics_dir = run_dir.path / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from sidecar.run.supervisor import run_supervisor

    try:
        return _starting(settings.log_level, lambda: run_supervisor(settings, run_dir))
    finally:
        run_dir.remove()


def _cmd_worker(args: argparse.Namespace) -> int:
    try:
        config = _worker_settings(args)
    except ConfigError as exc:
        return _config_error(exc)
    from sidecar.run.worker import serve

    return _starting(config.run.log_level, lambda: serve(config))


_SWITCH = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False,
           "no": False, "off": False, "": False}  # fmt: skip


def _switch(flag: str, env: str, text: str | None) -> bool:
    """An on/off option given as a flag or by its environment variable (true/false, also
    1/0, yes/no, on/off). ConfigError naming both for anything else."""
    value = _SWITCH.get((text or "").strip().lower())
    if value is None:
        raise ConfigError(f"{flag} ({env}={text!r}): expected true or false")
    return value


def _size(text: str) -> int:
    """A size in bytes: a whole number, optionally with K, M or G (binary: 1K = 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not digits.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 8M, 512K or 0")
    return int(digits) * scale


def _admin_call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> int:
    """Call the sidecar's admin API; print its JSON answer; 0 on 2xx, 1 on 409, 3 on 5xx
    (the sidecar's message on stderr: an operator must not read "done" into it), else 2."""
    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        return _bad(f"--token-file {args.token_file}: {exc.strerror or exc}")
    url = f"http://{args.admin}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        return _bad(f"cannot reach the admin API at {url}: {getattr(exc, 'reason', exc)}")
    print(text)
    if 200 <= status < 300:
        return EXIT_OK
    message = ""
    with contextlib.suppress(ValueError, AttributeError):
        message = str(json.loads(text).get("message") or "")
    line = f"mandate: {method} {path}: HTTP {status}"
    print(f"{line}: {message}" if message else line, file=sys.stderr)
    if status >= 500:
        return EXIT_FAILED
    return EXIT_DENY if status == 409 else EXIT_BAD_INPUT


def _expires(text: str) -> str:
    """RFC 3339 as given, or a duration from now converted to RFC 3339 (UTC)."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        if parse_rfc3339(text) is None:
            raise ValueError(text) from None
        return text.strip()
    return utc_seconds(time.time() + seconds)


def _cmd_admin(args: argparse.Namespace) -> int:
    if args.command == "status":
        return _admin_call(args, "GET", "/v1/status")
    if args.command == "elevations":
        return _admin_call(args, "GET", "/v1/elevations")
    if args.command == "approve":
        approval: dict[str, Any] = {"approver": args.approver}
        if args.duration:
            approval["duration"] = args.duration
        if args.reason:
            approval["reason"] = args.reason
        rid = urllib.parse.quote(args.request, safe="")
        return _admin_call(args, "POST", f"/v1/elevations/{rid}/approve", approval)
    if args.command == "restore":
        return _admin_call(args, "DELETE", f"/v1/revocations/{urllib.parse.quote(args.agent)}")
    body: dict[str, Any] = {"agent": args.agent, "reason": args.reason}
    if args.expires:
        try:
            body["expiresAt"] = _expires(args.expires)
        except ValueError:
            return _bad(
                f"--expires {args.expires!r}: expected a duration (30m) or an RFC 3339 time "
                "with a time zone (2026-12-01T00:00:00Z)"
            )
    return _admin_call(args, "POST", "/v1/revocations", body)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _cmd_validate(args)
    if args.command == "explain":
        return _cmd_explain(args)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=args.indent, sort_keys=True))
        return EXIT_OK
    if args.command == "worker":
        return _cmd_worker(args)
    if args.command == "audit":
        return run_audit(args)
    if args.command == "simulate":
        return run_simulate(args)
    if args.command == "profile":
        return run_profile(args)
    if args.command in ("inject", "webhook"):
        return run_inject(args)
    if args.command == "jwks":
        from sidecar.credentials.cli import run_jwks  # aiohttp and cryptography: only here

        return run_jwks(args)
    if args.command in ("revoke", "restore", "status", "approve", "elevations"):
        return _cmd_admin(args)
    return _cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
