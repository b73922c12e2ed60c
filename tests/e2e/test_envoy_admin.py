"""Envoy's admin interface in the shipped sidecar configs, run by real Envoy (issue 15).

The agent shares the pod's network namespace: whatever Envoy listens on over TCP, the agent
can reach. On TCP, Envoy's admin let it stop Envoy (`/quitquitquit`), read mandate's ports
and the HTTP prefix (`/config_dump`) and turn on debug logging. envoy/sidecar*.yaml put the
admin on a unix socket (mode 0600) in a volume only Envoy's container mounts
(sidecar/injection/pod.py); the injected startup probe asks `/ready` there. Here each config runs
as the pod runs it, with only file paths and the egress port moved into the test's
directory, and Envoy must listen on no TCP port but the egress listener.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.local import ENVOY_DIR, envoy_binary, stop_subprocess
from sidecar.injection.pod import ENVOY_ADMIN_SOCKET, envoy_ready_probe

CONFIGS = ["sidecar.yaml", "sidecar-http.yaml"]


def _as_in_the_pod(name: str, tmp: Path) -> tuple[str, Path]:
    """The shipped config, with the admin and access-log sockets in ``tmp`` (the pod's
    volumes), the egress listener on a free port and the trace collector on 127.0.0.1 (its
    cluster DNS name does not resolve here). Nothing about the admin's address changes but
    its directory."""
    config: dict[str, Any] = yaml.safe_load((ENVOY_DIR / name).read_text())
    admin = config["admin"]["address"]
    assert set(admin) == {"pipe"}, f"{name}: Envoy's admin must be a unix socket, not {admin}"
    assert admin["pipe"]["path"] == ENVOY_ADMIN_SOCKET
    socket_path = tmp / "envoy-admin" / Path(ENVOY_ADMIN_SOCKET).name
    socket_path.parent.mkdir(mode=0o700)
    admin["pipe"]["path"] = str(socket_path)
    resources = config["static_resources"]
    resources["listeners"][0]["address"]["socket_address"]["port_value"] = 0
    for cluster in resources["clusters"]:
        if "load_assignment" not in cluster:  # the dynamic forward proxy
            continue
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address = endpoint["address"]
        if "pipe" in address:
            address["pipe"]["path"] = str(tmp / Path(address["pipe"]["path"]).name)
        if cluster["name"] == "otel_collector":
            cluster["type"] = "STATIC"
            address["socket_address"]["address"] = "127.0.0.1"
    return yaml.safe_dump(config, sort_keys=False), socket_path


def _probe(socket_path: Path) -> int:
    """The injected startup probe's exit status, against ``socket_path``."""
    return subprocess.run(
        [sys.executable, "-c", envoy_ready_probe(str(socket_path))],
        capture_output=True,
        timeout=10,
    ).returncode


def _tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets' inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture(params=CONFIGS)
def envoy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, Path]]:
    text, socket_path = _as_in_the_pod(str(request.param), tmp_path)
    (tmp_path / "envoy.yaml").write_text(text)
    proc = subprocess.Popen(
        [envoy_binary(), "-c", str(tmp_path / "envoy.yaml"), "--concurrency", "1",
         "--disable-hot-restart", "--log-level", "warning",
         "--log-path", str(tmp_path / "envoy.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while _probe(socket_path) != 0:
            assert proc.poll() is None, (tmp_path / "envoy.log").read_text()
            assert time.monotonic() < deadline, "Envoy's admin socket never answered /ready"
            time.sleep(0.2)
        yield proc, socket_path
    finally:
        stop_subprocess(proc)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_envoys_admin_is_a_private_socket_and_no_tcp_port(envoy: tuple[Any, Path]) -> None:
    proc, socket_path = envoy
    # The injected startup probe works against the socket (it just did, in the fixture).
    assert _probe(socket_path) == 0
    # Only Envoy's UID may connect to it.
    assert socket_path.stat().st_mode & 0o777 == 0o600
    # The one TCP port Envoy listens on is the egress listener: no admin the agent can reach.
    (egress,) = _tcp_listening_ports(proc.pid)
    assert egress not in (0, 15000)
    stop_subprocess(proc)
    assert _probe(socket_path) != 0  # and the probe fails when Envoy is gone


def _admin_get(socket_path: Path, path: str) -> str:
    """GET ``path`` from Envoy's admin on its unix socket."""
    import http.client
    import socket

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(str(socket_path))

    conn = _Conn("localhost")
    conn.request("GET", path)
    return conn.getresponse().read().decode()


def _pids(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            out += _pids(int(child))
    return out


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("workers", [1, 2])
def test_mandate_answers_envoy_on_a_unix_socket_and_on_no_tcp_port_but_its_admin(
    envoy: tuple[Any, Path], tmp_path: Path, workers: int
) -> None:
    """Issue 19 (review): on TCP 127.0.0.1:9001 the agent, which shares the pod's network
    namespace, could ask mandate itself for an allowed call's answer and read the credentials
    in it (in proxy mode nothing kept it away). The injected pod serves Check on a unix
    socket in a volume only Envoy's and mandate's containers mount; the shipped Envoy
    configs ask there."""
    import json
    import urllib.error
    import urllib.request

    from sidecar.injection.pod import CHECK_SOCKET

    proc, admin_socket = envoy
    config = yaml.safe_load(Path(proc.args[2]).read_text())
    transport = "grpc"
    for listener in config["static_resources"]["listeners"]:
        if "http_service" in json.dumps(listener):
            transport = "http"
    check = tmp_path / Path(CHECK_SOCKET).name  # where _as_in_the_pod moved the pipe
    port_file = tmp_path / "mandate.json"
    profiles = ENVOY_DIR.parent / "devstack" / "demo" / "profiles"
    mandate = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--kubernetes", "off", "--agent", "billing-agent",
         "--namespace", "agents", "--profiles", str(profiles), "--transport", transport,
         "--listen", f"unix:{check}", "--workers", str(workers), "--admin", "127.0.0.1:0",
         "--port-file", str(port_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "mandate.log", "w"),  # noqa: SIM115
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert mandate.poll() is None, (tmp_path / "mandate.log").read_text()
            assert time.monotonic() < deadline, "mandate never started"
            time.sleep(0.1)
        info = json.loads(port_file.read_text())
        sockets = [check] + [Path(f"{check}.{i}") for i in range(1, workers)]
        assert info["check"] == [f"unix:{s}" for s in sockets]
        for s in sockets:  # Envoy runs as another user; the volume decides who may connect
            assert s.is_socket() and s.stat().st_mode & 0o777 == 0o666
        listeners = json.loads(_admin_get(admin_socket, "/listeners?format=json"))
        egress = listeners["listener_statuses"][0]["local_address"]["socket_address"]
        # A call the profile refuses: mandate's deny (403 with its JSON body), so Envoy
        # reached mandate on the socket (Envoy's own failure would be a 503).
        request = urllib.request.Request(
            "http://forbidden.example.com/x",
            headers={"Host": "forbidden.example.com"},
        )
        proxy = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{egress['port_value']}"})
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.build_opener(proxy).open(request, timeout=5)
                raise AssertionError("the call was allowed")
            except urllib.error.HTTPError as err:
                if err.code == 403:
                    body = json.loads(err.read())
                    break
                assert time.monotonic() < deadline, f"Envoy answered {err.code}"
            time.sleep(0.2)
        assert body["decision"] and body["error"]
        # No Check port the agent could reach: mandate listens on TCP for its admin alone.
        ports = set().union(*(_tcp_listening_ports(pid) for pid in _pids(mandate.pid)))
        assert ports == {info["admin"]}
    finally:
        stop_subprocess(mandate)
