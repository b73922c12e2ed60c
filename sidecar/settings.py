"""The settings of `mandate run` and `mandate worker`: one typed tree, validated once.

The command line (`sidecar.cli`) builds a :class:`Settings` from its flags and their
``MANDATE_*`` environment variables; constructing it checks every value, and a wrong one
is a ConfigError that names the flag (``--threads 0: expected at least 1``). From then on
the tree is handed around whole and nobody checks it again: the supervisor reads it, and
gives each Check worker it starts the same tree (with that worker's own endpoint and port
file) inside a :class:`WorkerSettings`, as JSON in the ``MANDATE_WORKER_SETTINGS``
environment variable (`to_json`, `from_json`: an exact round trip). A worker run by hand
(`mandate worker`) builds the same types from its own flags.

Enumerations are ``Literal`` types; addresses stay text (``HOST:PORT``, ``unix:/path``),
checked here and split where they are used (`split_hostport`).

Holds no secret: the admin token is a file's path, read by the supervisor; the token itself
never enters the settings, a command line or the environment. Must not read flags, files or
the environment, and must not import the run wing or the command line (import-linter's
layers contract: this module sits below them and the packages they start).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from sidecar import DEFAULT_THREADS
from sidecar.audit import DEFAULT_RESERVE_BYTES, FailureMode, FsyncMode
from sidecar.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import TypeAdapter

__all__ = [
    "AUDIT_ALLOWS",
    "AUDIT_FAILURE_MODES",
    "AUDIT_FSYNC_MODES",
    "GRPC_SERVERS",
    "HTTP_SERVERS",
    "KUBERNETES_MODES",
    "LOG_LEVELS",
    "SINGLE_PROCESS",
    "TRACERS",
    "TRANSPORTS",
    "WORKER_SETTINGS_ENV",
    "AdminSettings",
    "AuditAllows",
    "AuditSettings",
    "BehaviourAnalysisSettings",
    "CheckSettings",
    "ContextListener",
    "GrpcServer",
    "HttpServer",
    "IdentitySettings",
    "KubernetesMode",
    "KubernetesSettings",
    "LogLevel",
    "ProfileSettings",
    "Settings",
    "SingleProcess",
    "StateSettings",
    "TableSource",
    "Tracer",
    "TracingSettings",
    "Transport",
    "WorkerSettings",
    "split_hostport",
]

# Set by `mandate run` for each worker it starts: that worker's WorkerSettings as JSON.
WORKER_SETTINGS_ENV = "MANDATE_WORKER_SETTINGS"

Transport = Literal["grpc", "http"]  # Envoy's ext_authz grpc_service or http_service
# The HTTP transport's server: aiohttp's, or the lean one (httptools on uvloop, http_lean).
HttpServer = Literal["aiohttp", "lean"]
# The gRPC transport's server: grpcio's thread-pool server, or grpc.aio on a loop of its own.
GrpcServer = Literal["threads", "aio"]
Tracer = Literal["lean", "sdk"]  # mandate's OTLP encoder, or the OpenTelemetry SDK
# Where `mandate run` serves Checks: in its own process (one worker), or in worker processes.
SingleProcess = Literal["auto", "on", "off"]
KubernetesMode = Literal["auto", "on", "off"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
AuditAllows = Literal["all", "none"]  # record allowed calls too, or denies only

# The choices in the order the flags' help and error messages list them.
TRANSPORTS: tuple[Transport, ...] = ("grpc", "http")
HTTP_SERVERS: tuple[HttpServer, ...] = ("aiohttp", "lean")
GRPC_SERVERS: tuple[GrpcServer, ...] = ("threads", "aio")
TRACERS: tuple[Tracer, ...] = ("lean", "sdk")
SINGLE_PROCESS: tuple[SingleProcess, ...] = ("auto", "on", "off")
KUBERNETES_MODES: tuple[KubernetesMode, ...] = ("auto", "on", "off")
LOG_LEVELS: tuple[LogLevel, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
AUDIT_ALLOWS: tuple[AuditAllows, ...] = ("all", "none")
AUDIT_FAILURE_MODES: tuple[FailureMode, ...] = ("fail-closed", "continue")
AUDIT_FSYNC_MODES: tuple[FsyncMode, ...] = ("interval", "always", "never")


# -- checks ------------------------------------------------------------------------------


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is 127.0.0.1) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT (port 0 picks a free one)")
    return host.strip("[]") or "127.0.0.1", int(port)


def _one_of(flag: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        expected = f"{', '.join(choices[:-1])} or {choices[-1]}"
        raise ConfigError(f"{flag} {value!r}: expected {expected}")


def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{flag} {value}: expected at least 1")


def _positive(flag: str, value: float, *, zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = "0 or more" if zero else "more than 0"
        raise ConfigError(f"{flag} {value}: expected {bound} seconds")


# -- the groups --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """The profile directory (--profiles) and its fallback poll (--poll-seconds)."""

    directory: Path
    poll_seconds: float = 2.0

    def __post_init__(self) -> None:
        _positive("--poll-seconds", self.poll_seconds)


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """Where and how Envoy's ext_authz filter asks (--listen, --transport, --threads,
    --workers, --single-process, --http-server, --grpc-server)."""

    # HOST:PORT: worker i of `mandate run` serves PORT+i (port 0: free ports are picked);
    # unix:PATH: worker 0 serves PATH, worker i PATH.i (what an injected pod uses: only
    # Envoy's and mandate's containers mount the socket's directory).
    listen: str = "127.0.0.1:9001"
    transport: Transport = "grpc"
    threads: int = DEFAULT_THREADS  # gRPC Check threads per worker (HTTP: one event loop)
    workers: int = 1  # Check worker processes of `mandate run`
    http_server: HttpServer = "lean"  # the HTTP server (bench/results/http_server.md)
    # auto: with one worker, the Checks are served in the supervisor's own process (one
    # interpreter, one copy of grpc and the protobufs); several workers are processes.
    single_process: SingleProcess = "auto"
    grpc_server: GrpcServer = "threads"  # the gRPC server (bench/results/grpc_shapes.md)

    def __post_init__(self) -> None:
        if not self.listen.startswith("unix:"):
            split_hostport(self.listen, "--listen")
        _one_of("--transport", self.transport, TRANSPORTS)
        _one_of("--http-server", self.http_server, HTTP_SERVERS)
        _one_of("--grpc-server", self.grpc_server, GRPC_SERVERS)
        _one_of("--single-process", self.single_process, SINGLE_PROCESS)
        if self.single_process == "on" and self.workers > 1:
            raise ConfigError(
                f"--single-process on with --workers {self.workers}: one process serves one "
                "worker; use --single-process auto or off"
            )
        _at_least_one("--threads", self.threads)
        _at_least_one("--workers", self.workers)

    @property
    def in_process(self) -> bool:
        """Whether `mandate run` serves the Checks in its own process (no worker process)."""
        return self.single_process == "on" or (self.single_process == "auto" and self.workers == 1)


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    """The pod mandate serves: its agent, service account, namespace and name."""

    agent: str | None = None  # --agent
    service_account: str | None = None  # --service-account NAMESPACE/NAME
    namespace: str = "default"  # revocations apply per namespace
    pod_name: str = ""  # for spans, audit records and Events ("": the host name)


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Decision spans (--otlp-endpoint, --tracer)."""

    otlp_endpoint: str | None = None  # OTLP/gRPC collector; None: tracing off
    tracer: Tracer = "lean"

    def __post_init__(self) -> None:
        _one_of("--tracer", self.tracer, TRACERS)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The hash-chained audit trail (--audit-*): to a directory, to stdout (the cluster's log
    pipeline), or both (each on chains of its own); neither: off."""

    directory: Path | None = None  # --audit-dir; None: no directory
    allows: AuditAllows = "all"
    on_failure: FailureMode = "fail-closed"
    fsync: FsyncMode = "interval"
    reserve_bytes: int = DEFAULT_RESERVE_BYTES  # fail closed under this much free space
    stdout: bool = False  # --audit-stdout: the records as JSON lines on stdout

    def __post_init__(self) -> None:
        _one_of("--audit-allows", self.allows, AUDIT_ALLOWS)
        _one_of("--audit-on-failure", self.on_failure, AUDIT_FAILURE_MODES)
        _one_of("--audit-fsync", self.fsync, AUDIT_FSYNC_MODES)
        if self.reserve_bytes < 0:
            raise ConfigError(f"--audit-reserve {self.reserve_bytes}: expected 0 or more bytes")

    @property
    def records_allows(self) -> bool:
        return self.allows == "all"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """The supervisor's admin server (--admin) and its bearer token's file."""

    listen: str = "127.0.0.1:9901"
    # --admin-token-file; None: STATE_DIR/admin.token (generated if missing), or no token
    # (the revocation API disabled) without a state directory.
    token_file: Path | None = None

    def __post_init__(self) -> None:
        split_hostport(self.listen, "--admin")


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where revocations and the agent state persist (--state-dir), and the shared
    revocation table's file (--table)."""

    directory: Path | None = None  # revocations.json (and a generated admin.token) live here
    # The revocation table's file (and the agent state table's: PATH.context), the caller's:
    # it stays after a SIGKILL. None: tables with no name (shm.SharedTable.create).
    table: Path | None = None


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """Watching AgentRevocation and AgentElevation objects (--kubernetes, --kubeconfig,
    --initial-sync-timeout)."""

    mode: KubernetesMode = "auto"  # auto: when in a cluster or a kubeconfig is given
    kubeconfig: Path | None = None
    initial_sync_timeout: float = 10.0

    def __post_init__(self) -> None:
        _one_of("--kubernetes", self.mode, KUBERNETES_MODES)
        _positive("--initial-sync-timeout", self.initial_sync_timeout, zero=True)


@dataclass(frozen=True, slots=True)
class BehaviourAnalysisSettings:
    """Behaviour analysis (--access-log, --publish-behaviour-revocations)."""

    # Envoy's gRPC access log service (HOST:PORT or unix:/path): responses' status and sizes.
    # None: no behaviour analysis (no risk scores, no automatic revocations).
    access_log: str | None = None
    # Also create an AgentRevocation object when behaviour analysis revokes an agent (needs
    # `create` on agentrevocations: deploy/components/behaviour-revocations).
    publish_revocations: bool = False


MAX_CREDENTIAL_WAIT = 0.4


@dataclass(frozen=True, slots=True)
class CredentialSettings:
    """What the credentials profiles name need from the sidecar (issue 17)."""

    # Signing keys of Transaction Tokens: a directory (a Secret mounted only into mandate)
    txn_token_keys: Path | None = None
    txn_token_issuer: str = "https://mandate.local"  # their `iss`
    # How long a gRPC Check waits for a first token in flight: below Envoy's ext_authz
    # timeout (0.5 s in envoy/), or Envoy gives up first while the Check holds a thread.
    wait: float = 0.25

    def __post_init__(self) -> None:
        if not 0 <= self.wait <= MAX_CREDENTIAL_WAIT:
            raise ConfigError(
                f"--credential-wait {self.wait}: expected 0 to {MAX_CREDENTIAL_WAIT} seconds "
                "(below Envoy's ext_authz timeout)"
            )
        issuer = self.txn_token_issuer
        if not issuer.startswith(("https://", "http://")) or any(c.isspace() for c in issuer):
            raise ConfigError(f"--txn-token-issuer {issuer!r}: expected an https:// URL")


@dataclass(frozen=True, slots=True)
class ContextListener:
    """One --context-api listener: ADDRESS (HOST:PORT or unix:/path) for the pod's agent
    (``agent`` None), or AGENT=ADDRESS."""

    address: str
    agent: str | None = None

    @classmethod
    def parse(cls, entry: str) -> ContextListener:
        agent, sep, address = entry.partition("=")
        return cls(address, agent) if sep else cls(entry)

    @property
    def spelling(self) -> str:
        """As given on the command line (for messages)."""
        return self.address if self.agent is None else f"{self.agent}={self.address}"


# -- the whole -----------------------------------------------------------------------------

_T = TypeVar("_T")
_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(cls: type[_T]) -> TypeAdapter[_T]:
    """The JSON codec of ``cls``, made on first use (pydantic: the profile model loads it)."""
    if cls not in _ADAPTERS:
        from pydantic import TypeAdapter

        _ADAPTERS[cls] = TypeAdapter(cls)
    return cast("TypeAdapter[_T]", _ADAPTERS[cls])


def _from_json(cls: type[_T], text: str | bytes) -> _T:
    from pydantic import ValidationError

    try:
        return _adapter(cls).validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{cls.__name__} (JSON): {exc}") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `mandate run` (and `mandate worker`) runs with."""

    profiles: ProfileSettings
    check: CheckSettings = field(default_factory=CheckSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    state: StateSettings = field(default_factory=StateSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    behaviour: BehaviourAnalysisSettings = field(default_factory=BehaviourAnalysisSettings)
    credentials: CredentialSettings = field(default_factory=CredentialSettings)
    # The agent context API's listeners (--context-api). Empty: not served.
    context_api: tuple[ContextListener, ...] = ()
    log_level: LogLevel = "INFO"
    port_file: Path | None = None  # where the bound ports are written as JSON

    def __post_init__(self) -> None:
        _one_of("--log-level", self.log_level, LOG_LEVELS)

    def to_json(self) -> str:
        return _adapter(Settings).dump_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Settings:
        return _from_json(cls, text)


@dataclass(frozen=True, slots=True)
class TableSource:
    """A shared table a worker attaches: by path, or as an inherited descriptor (`mandate
    run`'s tables have no name). Neither: none (nothing revoked, no agent state)."""

    path: Path | None = None
    fd: int | None = None

    def check(self, flag: str) -> None:
        """One of the two at most, a descriptor >= 0 (``flag``: the path's option)."""
        if self.path is not None and self.fd is not None:
            raise ConfigError(f"{flag} and {flag}-fd: give one, not both")
        if self.fd is not None and self.fd < 0:
            raise ConfigError(f"{flag}-fd {self.fd}: expected 0 or more")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """One Check worker: the run's settings whole (``run.check.listen`` and
    ``run.port_file`` are this worker's own), and what is this worker's alone."""

    run: Settings
    index: int = 0  # worker i of `mandate run`
    revocations: TableSource = field(default_factory=TableSource)  # --table / --table-fd
    agent_state: TableSource = field(default_factory=TableSource)  # --context-table[-fd]
    chain_id: str = ""  # this worker's audit chain ("": POD-PID)
    # Written (atomically) with the profile version this worker enforces, after each swap:
    # the supervisor reports a version as enforced only once every worker has it.
    version_file: Path | None = None
    rate_share: float = 1.0  # this worker's share of each rate limit (1 / workers)
    # Also serve the admin server on run.admin.listen (a single-process sidecar, in tests);
    # a worker of `mandate run` never does: its supervisor does.
    serve_admin: bool = False

    def __post_init__(self) -> None:
        self.revocations.check("--table")
        self.agent_state.check("--context-table")
        if self.index < 0:
            raise ConfigError(f"worker index {self.index}: expected 0 or more")
        if not 0 < self.rate_share <= 1:
            raise ConfigError(f"--rate-share {self.rate_share}: expected 0 < share <= 1")

    def to_json(self) -> str:
        return _adapter(WorkerSettings).dump_json(self).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerSettings:
        return _from_json(cls, text)
