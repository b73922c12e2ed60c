"""Two network namespaces joined by a veth pair, for the egress-capture test: "pod" (mandate,
Envoy, the agent, and the capture rules) and "remote" (a test server). Everything the test
starts runs inside them, so the fixed ports of the sidecar (15001, 15000, 9001, 9901) and the
remote host's 10.203.0.2 collide with nothing on the machine. Namespace names carry the
test's pid; `destroy` kills every process in them and deletes them, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import site
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NETTOOL = Path(__file__).with_name("nettool.py")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PREFIX = "mandate-cap"
POD_ADDR, REMOTE_ADDR = "10.203.0.1", "10.203.0.2"
WAIT = 10.0  # seconds: every wait of the test is bounded by this


def which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")


def _run(argv: Sequence[str], timeout: float = WAIT, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )


def _reachable(path: Path) -> bool:
    """Whether any UID may reach ``path`` (every directory above it searchable by others)."""
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in path.parents)


def sidecar_python(workdir: Path) -> str | None:
    """A Python that the sidecar's and the agent's UIDs can run, with this venv's packages:
    the venv's own interpreter when they can reach it, else (e.g. pyenv under a 0700 /root) a
    venv of the system's interpreter of the same X.Y made in ``workdir`` whose .pth file adds
    this venv's site-packages. None if there is no such interpreter."""
    if _reachable(Path(os.path.realpath(sys.executable))) and _reachable(Path(sys.base_prefix)):
        return sys.executable
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for d in SYSTEM_PATH.split(":"):
        base = Path(d) / name
        if base.exists() and _reachable(Path(os.path.realpath(base))):
            break
    else:
        return None
    shim = workdir / "python"
    (shim / "bin").mkdir(parents=True)
    (shim / "bin" / name).symlink_to(base)
    (shim / "pyvenv.cfg").write_text(f"home = {d}\ninclude-system-site-packages = false\n")
    packages = shim / "lib" / name / "site-packages"
    packages.mkdir(parents=True)
    dirs = "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages())
    (packages / "mandate-venv.pth").write_text(f"import site; {dirs}\n")
    return str(shim / "bin" / name)


def missing() -> str | None:
    """What this machine lacks to run the test (None: nothing)."""
    if os.geteuid() != 0:
        return "not running as root: network namespaces and iptables need root (CAP_NET_ADMIN)"
    for tool in ("ip", "iptables", "ip6tables", "setpriv"):
        if which(tool) is None:
            return (
                f"`{tool}` is not installed (`make test` installs iptables and iproute2 with "
                "apt-get when it runs as root)"
            )
    return None


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def argv(self, argv: Sequence[str], uid: int | None = None) -> list[str]:
        """``argv`` inside this namespace, as ``uid`` (root when None), no supplementary
        groups."""
        prefix = [which("ip") or "ip", "netns", "exec", self.name]
        if uid is not None:
            prefix += [
                which("setpriv") or "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--",
            ]
        return prefix + list(argv)

    def run(
        self,
        argv: Sequence[str],
        uid: int | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = WAIT,
    ) -> subprocess.CompletedProcess[str]:
        return _run(self.argv(argv, uid), timeout, env=env, cwd=ROOT)

    def pids(self) -> list[int]:
        out = _run([which("ip") or "ip", "netns", "pids", self.name]).stdout
        return [int(p) for p in out.split()]


def _kill_all(ns: Netns) -> None:
    """SIGKILL every process still in ``ns`` (all of them started by this test)."""
    for _ in range(3):
        pids = ns.pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete(ns: Netns) -> None:
    _kill_all(ns)
    _run([which("ip") or "ip", "netns", "del", ns.name])


def remove_stale() -> None:
    """Delete namespaces an earlier run of this test left behind (its pid is gone)."""
    out = _run([which("ip") or "ip", "netns", "list"]).stdout
    for line in out.splitlines():
        m = re.match(rf"^({PREFIX}-(?:pod|remote)-(\d+))\b", line)
        if m and not _alive(int(m.group(2))):
            _delete(Netns(m.group(1)))


class Lab:
    """The two namespaces, the processes started in them and a world-traversable work
    directory (the sidecar's UIDs must reach their files; pytest's tmp_path is 0700)."""

    def __init__(self, workdir: Path) -> None:
        pid = os.getpid()
        self.pod = Netns(f"{PREFIX}-pod-{pid}")
        self.remote = Netns(f"{PREFIX}-remote-{pid}")
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.python = sys.executable  # for the non-root UIDs; set by create

    def create(self) -> str | None:
        """Create and wire the namespaces; a message if the machine does not allow it."""
        remove_stale()
        ip = which("ip") or "ip"
        for ns in (self.pod, self.remote):
            _delete(ns)  # a leftover of this very pid (pids are reused)
            r = _run([ip, "netns", "add", ns.name])
            if r.returncode != 0:
                return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
        steps = [
            [ip, "-n", self.pod.name, "link", "add", "eth0", "type", "veth",
             "peer", "name", "eth0", "netns", self.remote.name],
            [ip, "-n", self.pod.name, "addr", "add", f"{POD_ADDR}/30", "dev", "eth0"],
            [ip, "-n", self.remote.name, "addr", "add", f"{REMOTE_ADDR}/30", "dev", "eth0"],
        ]  # fmt: skip
        for ns in (self.pod, self.remote):
            steps += [[ip, "-n", ns.name, "link", "set", dev, "up"] for dev in ("lo", "eth0")]
        for step in steps:
            r = _run(step)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(step)}: {r.stderr.strip()}")
        r = self.pod.run(["iptables", "-w", "5", "-t", "nat", "-S"])
        if r.returncode != 0:
            return f"iptables does not work in a network namespace here: {r.stderr.strip()}"
        python = sidecar_python(self.workdir)
        if python is None:
            return (
                f"no Python {sys.version_info[0]}.{sys.version_info[1]} that non-root UIDs can run"
            )
        self.python = python
        return None

    def env(self, home: Path) -> dict[str, str]:
        """A clean environment: no HTTP(S)_PROXY, nothing of the test runner's."""
        return {
            "PATH": f"{Path(sys.executable).parent}:{SYSTEM_PATH}",
            "HOME": str(home),
            "TMPDIR": str(home),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def own_dir(self, name: str, uid: int) -> Path:
        d = self.workdir / name
        d.mkdir(mode=0o755)
        os.chown(d, uid, uid)
        return d

    def start(
        self, ns: Netns, argv: Sequence[str], uid: int | None, log: Path, home: Path
    ) -> subprocess.Popen[bytes]:
        """A long-running process in ``ns`` (`ip netns exec` and `setpriv` exec, so the pid
        is the process's own), output to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                ns.argv(argv, uid),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(home),
                cwd=ROOT,
            )
        self.procs.append(proc)
        return proc

    def tool(self, ns: Netns, args: Sequence[str], uid: int | None = None) -> Any:
        """Run nettool.py in ``ns`` as ``uid``; its JSON output."""
        r = ns.run([sys.executable, str(NETTOOL), *args], uid=uid, env=self.env(self.workdir))
        if r.returncode != 0:
            raise RuntimeError(f"nettool {args[0]} in {ns.name}: {r.stdout}{r.stderr}")
        return json.loads(r.stdout)

    def wait_http(
        self, ns: Netns, url: str, contains: str, proc: subprocess.Popen[bytes], log: Path
    ) -> None:
        """Until ``url`` in ``ns`` answers 200 with ``contains``; fails early (with ``log``)
        if ``proc`` exits."""
        waiter = subprocess.Popen(
            ns.argv([sys.executable, str(NETTOOL), "wait", url, "--contains", contains,
                     "--timeout", str(WAIT)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env(self.workdir), cwd=ROOT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + WAIT + 2
            while waiter.poll() is None and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if waiter.poll() == 0:
                return
            state = "running" if proc.poll() is None else f"exited {proc.returncode}"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{url} in {ns.name} not ready ({state}):\n{tail}")
        finally:
            if waiter.poll() is None:
                waiter.kill()
            waiter.wait(5)
            assert waiter.stdout is not None
            waiter.stdout.close()

    def destroy(self) -> None:
        """Stop what was started, then kill whatever is left in the namespaces and delete
        them. Never raises."""
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if proc.poll() is None:
                    proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(3)
        for ns in (self.pod, self.remote):
            with contextlib.suppress(Exception):
                _delete(ns)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(3)
