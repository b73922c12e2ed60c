"""The one settings model (sidecar.settings): built once from the command line, handed to
each worker whole as JSON (an exact round trip), invalid values refused once, naming the
flag."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sidecar.cli import _parser, _settings, _worker_settings, main
from sidecar.errors import ConfigError
from sidecar.run.supervisor import Supervisor, _Worker
from sidecar.settings import (
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

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "devstack" / "demo" / "profiles"

# Every field differs from its default (test_every_field_is_set_non_default keeps it so).
EVERYTHING = WorkerSettings(
    run=Settings(
        profiles=ProfileSettings(Path("/etc/mandate/profiles"), poll_seconds=0.25),
        check=CheckSettings(
            listen="[::1]:9101",
            transport="http",
            threads=3,
            workers=4,
            http_server="aiohttp",
            single_process="off",
            grpc_server="aio",
        ),
        identity=IdentitySettings(
            agent="billing-agent",
            service_account="agents/billing",
            namespace="agents",
            pod_name="billing-7d9f",
        ),
        tracing=TracingSettings(otlp_endpoint="http://jaeger:4317", tracer="sdk"),
        audit=AuditSettings(
            directory=Path("/var/log/mandate"),
            allows="none",
            on_failure="continue",
            fsync="always",
            reserve_bytes=512 << 10,
            stdout=True,
        ),
        admin=AdminSettings(listen="0.0.0.0:9902", token_file=Path("/etc/mandate/admin/token")),
        state=StateSettings(directory=Path("/var/lib/mandate"), table=Path("/dev/shm/t")),
        kubernetes=KubernetesSettings(
            mode="on", kubeconfig=Path("/root/.kube/config"), initial_sync_timeout=2.5
        ),
        behaviour=BehaviourAnalysisSettings(
            access_log="unix:/run/mandate-io/als.sock", publish_revocations=True
        ),
        credentials=CredentialSettings(
            txn_token_keys=Path("/var/run/mandate/txn-keys"),
            txn_token_issuer="https://mandate.agents.svc",
            wait=0.1,
        ),
        context_api=(
            ContextListener("127.0.0.1:9701"),
            ContextListener("unix:/run/ctx.sock", agent="research-agent"),
        ),
        log_level="DEBUG",
        port_file=Path("/tmp/ports.json"),
    ),
    index=3,
    revocations=TableSource(fd=7),
    agent_state=TableSource(path=Path("/dev/shm/t.context")),
    chain_id="billing-7d9f-w3",
    version_file=Path("/run/mandate/worker-3.version"),
    rate_share=1 / 3,
    serve_admin=True,
)


def _defaults_kept(obj: Any, where: str = "") -> list[str]:
    """Dotted names of the fields of ``obj`` (recursively) that hold their default."""
    same: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            same += _defaults_kept(value, f"{where}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue  # required: nothing to compare with
        if value == default:
            same.append(where + f.name)
    return same


def test_every_field_is_set_non_default() -> None:
    # A table source is a path or a descriptor (both is refused): each sets one of them.
    assert _defaults_kept(EVERYTHING) == ["revocations.path", "agent_state.fd"]


def test_json_round_trip_is_exact() -> None:
    text = EVERYTHING.to_json()
    back = WorkerSettings.from_json(text)
    assert back == EVERYTHING
    assert back.to_json() == text
    assert Settings.from_json(EVERYTHING.run.to_json()) == EVERYTHING.run
    assert isinstance(back.run.profiles.directory, Path)
    assert isinstance(back.run.context_api, tuple)


def test_defaults_round_trip() -> None:
    plain = WorkerSettings(run=Settings(profiles=ProfileSettings(Path("p"))))
    assert WorkerSettings.from_json(plain.to_json()) == plain


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{}",
        '{"run": {"profiles": {"directory": "/p"}, "check": {"transport": "h2"}}}',
        '{"run": {"profiles": {"directory": "/p"}, "check": {"threads": 0}}}',
        '{"run": {"profiles": {"directory": "/p"}}, "rate_share": 2}',
    ],
)
def test_bad_json_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        WorkerSettings.from_json(text)


def _worker(**kw: Any) -> WorkerSettings:
    return WorkerSettings(Settings(ProfileSettings(Path("p"))), **kw)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: CheckSettings(listen="nonsense"), "--listen 'nonsense': expected HOST:PORT"),
        (lambda: CheckSettings(listen="127.0.0.1:99999"), "--listen"),
        (lambda: CheckSettings(transport="h2"), "--transport 'h2': expected grpc or http"),  # type: ignore[arg-type]
        (lambda: CheckSettings(threads=0), "--threads 0: expected at least 1"),
        (lambda: CheckSettings(workers=0), "--workers 0: expected at least 1"),
        (lambda: CheckSettings(http_server="granian"), "--http-server 'granian': expected aiohttp or lean"),  # type: ignore[arg-type]
        (lambda: CheckSettings(grpc_server="callback"), "--grpc-server 'callback': expected threads or aio"),  # type: ignore[arg-type]
        (lambda: CheckSettings(single_process="yes"), "--single-process 'yes': expected auto, on or off"),  # type: ignore[arg-type]
        (lambda: CheckSettings(workers=2, single_process="on"), "--single-process on with --workers 2: one process"),
        (lambda: AdminSettings(listen="127.0.0.1:http"), "--admin '127.0.0.1:http'"),
        (lambda: TracingSettings(tracer="full"), "--tracer 'full': expected lean or sdk"),  # type: ignore[arg-type]
        (lambda: KubernetesSettings(mode="yes"), "--kubernetes 'yes': expected auto, on or off"),  # type: ignore[arg-type]
        (lambda: KubernetesSettings(initial_sync_timeout=-1), "--initial-sync-timeout -1"),
        (lambda: AuditSettings(fsync="sometimes"), "--audit-fsync 'sometimes'"),  # type: ignore[arg-type]
        (lambda: AuditSettings(on_failure="ignore"), "--audit-on-failure 'ignore'"),  # type: ignore[arg-type]
        (lambda: AuditSettings(allows="some"), "--audit-allows 'some'"),  # type: ignore[arg-type]
        (lambda: AuditSettings(reserve_bytes=-1), "--audit-reserve -1"),
        (lambda: ProfileSettings(Path("p"), poll_seconds=0), "--poll-seconds 0"),
        (lambda: Settings(ProfileSettings(Path("p")), log_level="TRACE"), "--log-level 'TRACE'"),  # type: ignore[arg-type]
        (lambda: _worker(revocations=TableSource(Path("t"), 3)), "--table and --table-fd: give one, not both"),
        (lambda: _worker(agent_state=TableSource(fd=-1)), "--context-table-fd -1"),
        (lambda: _worker(rate_share=0), "--rate-share 0: expected 0 < share <= 1"),
        (lambda: _worker(rate_share=float("nan")), "--rate-share nan"),
        (lambda: CredentialSettings(wait=-1), "--credential-wait -1: expected 0 to 0.4 seconds"),
        (lambda: CredentialSettings(wait=1), "--credential-wait 1: expected 0 to 0.4 seconds (below Envoy's ext_authz timeout)"),
        (lambda: CredentialSettings(txn_token_issuer="mandate"), "--txn-token-issuer 'mandate': expected an https:// URL"),
        (lambda: CredentialSettings(txn_token_issuer="https://a b"), "--txn-token-issuer 'https://a b'"),
    ],
)  # fmt: skip
def test_invalid_values_are_refused_naming_the_flag(build: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(fragment)):
        build()


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["--workers", "0"], {}, "--workers 0: expected at least 1"),
        (["--poll-seconds", "0"], {}, "--poll-seconds 0.0: expected more than 0 seconds"),
        # argparse checks `choices` on the command line only: a default from the
        # environment is checked by the settings.
        ([], {"MANDATE_TRANSPORT": "h2"}, "--transport 'h2': expected grpc or http"),
        (
            [],
            {"MANDATE_KUBERNETES": "sometimes"},
            "--kubernetes 'sometimes': expected auto, on or off",
        ),
        ([], {"MANDATE_TRACER": "full"}, "--tracer 'full': expected lean or sdk"),
        ([], {"MANDATE_HTTP_SERVER": "fast"}, "--http-server 'fast': expected aiohttp or lean"),
        ([], {"MANDATE_AUDIT_FSYNC": "weekly"}, "--audit-fsync 'weekly'"),
        ([], {"MANDATE_LOG_LEVEL": "debug"}, "--log-level 'debug'"),
        ([], {"MANDATE_TXN_TOKEN_ISSUER": "urn:x"}, "--txn-token-issuer 'urn:x'"),
    ],
)
def test_run_refuses_invalid_settings_before_starting(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    fragment: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["run", "--profiles", str(PROFILES), "--admin", "127.0.0.1:0", *argv])
    assert code == 2
    assert f"mandate: {fragment}" in capsys.readouterr().err


def test_run_options_build_the_settings() -> None:
    args = _parser().parse_args(
        ["run", "--profiles", "/p", "--listen", "127.0.0.1:9100", "--workers", "2",
         "--transport", "http", "--http-server", "lean", "--agent", "a", "--namespace", "ns",
         "--kubernetes", "off",
         "--context-api", "127.0.0.1:9701", "--context-api", "b=unix:/s",
         "--audit-dir", "/a", "--audit-allows", "none", "--audit-reserve", "1M",
         "--state-dir", "/s", "--log-level", "WARNING"]
    )  # fmt: skip
    s = _settings(args)
    assert s.check == CheckSettings("127.0.0.1:9100", "http", s.check.threads, 2, "lean")
    assert _settings(_parser().parse_args(["run", "--profiles", "/p"])).check.grpc_server == (
        "threads"
    )
    args = _parser().parse_args(["run", "--profiles", "/p", "--grpc-server", "aio"])
    assert _settings(args).check.grpc_server == "aio"
    assert (s.identity.agent, s.identity.namespace, s.kubernetes.mode) == ("a", "ns", "off")
    assert s.context_api == (ContextListener("127.0.0.1:9701"), ContextListener("unix:/s", "b"))
    assert [c.spelling for c in s.context_api] == ["127.0.0.1:9701", "b=unix:/s"]
    assert s.audit == AuditSettings(Path("/a"), "none", "fail-closed", "interval", 1 << 20)
    assert (s.state.directory, s.log_level) == (Path("/s"), "WARNING")


def test_a_worker_run_by_hand_builds_the_same_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_SETTINGS_ENV, raising=False)
    args = _parser().parse_args(
        ["worker", "--profiles", "/p", "--listen", "unix:/run/check.sock", "--table", "/t",
         "--context-table-fd", "5", "--chain-id", "c", "--rate-share", "0.5"]
    )  # fmt: skip
    w = _worker_settings(args)
    assert w.run.check.listen == "unix:/run/check.sock"
    assert (w.revocations, w.agent_state) == (TableSource(path=Path("/t")), TableSource(fd=5))
    assert (w.chain_id, w.rate_share, w.serve_admin, w.index) == ("c", 0.5, False, 0)


def test_a_worker_of_run_takes_its_settings_whole_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = dataclasses.replace(EVERYTHING, serve_admin=False)
    monkeypatch.setenv(WORKER_SETTINGS_ENV, mine.to_json())
    # As the supervisor starts it: the command line names only the endpoint.
    args = _parser().parse_args(["worker", "--listen", "[::1]:9101"])
    assert _worker_settings(args) == mine
    args = _parser().parse_args(["worker", "--listen", "127.0.0.1:1"])
    with pytest.raises(ConfigError, match=re.escape("--listen '127.0.0.1:1'")):
        _worker_settings(args)


def test_the_supervisor_hands_each_worker_the_settings_whole(tmp_path: Path) -> None:
    settings = EVERYTHING.run
    sup: Any = Supervisor.__new__(Supervisor)
    sup.settings, sup._workdir = settings, tmp_path
    sup.table, sup.agent_state_table = SimpleNamespace(fd=7), SimpleNamespace(fd=8)
    w = _Worker(1, "[::1]:9102", tmp_path / "worker-1.json")
    got = WorkerSettings.from_json(sup._worker_settings(w).to_json())
    # Only the endpoint and the port file are the worker's own; the rest is the run's.
    assert got.run == dataclasses.replace(
        settings,
        check=dataclasses.replace(settings.check, listen="[::1]:9102"),
        port_file=tmp_path / "worker-1.json",
    )
    assert got.index == 1 and got.chain_id == "billing-7d9f-w1"
    assert (got.revocations.fd, got.agent_state.fd) == (7, 8)
    assert got.version_file == tmp_path / "worker-1.version"
    assert got.rate_share == 1 / 4 and not got.serve_admin
