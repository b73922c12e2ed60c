"""Processes and the machine, from /proc: CPU time, RSS and PSS of a process or a process
tree, the machine's busy time; CPU pinning (--pin); waiting for a condition, stopping a
multiprocessing child, SIGTERM as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from bench.lib import BenchError

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (mandate: the supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid`` itself, of all its descendants): for mandate, the supervisor's
    and its Check workers'. A descendant that exited meanwhile no longer counts."""
    own = cpu_seconds(pid)
    return own, sum(cpu_seconds(p) for p in process_tree(pid) if p != pid)


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += rss_mb(p)
    return total


def pss_mb(pid: int) -> float:
    """Proportional set size (/proc/PID/smaps_rollup): shared pages divided among the
    processes that map them, so that a tree's sum counts them once; NaN if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tree_pss_mb(pid: int) -> float:
    return sum(pss_mb(p) for p in process_tree(pid))


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def machine_busy_seconds() -> tuple[float, str]:
    """CPU time used so far by every task, in seconds, and where it comes from: the root
    cgroup's accounting (scheduler run time, exact: cgroup v2 `cpu.stat` usage_usec or v1
    `cpuacct.usage`) if readable, else /proc/stat's busy ticks (sampled at each tick, which
    undercounts short bursts between idle periods: light, bursty loads look idler)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/sys/fs/cgroup/cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6, "cgroup cpu.stat"
    with contextlib.suppress(OSError, ValueError):
        usage = Path("/sys/fs/cgroup/cpuacct/cpuacct.usage").read_text()
        return int(usage) / 1e9, "cgroup cpuacct.usage"
    return machine_ticks()[0] / CLK_TCK, "/proc/stat ticks"


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each party runs on (--pin). Set with sched_setaffinity(2): the starting
    thread of this script takes a party's CPUs just while it spawns that party (children and
    their threads inherit them), and every thread of the party's process tree is set again
    once it runs (pin_tree). The load generators (wrk, openloop.py) are children of this
    script, which otherwise runs on the ``load`` CPUs."""

    envoy: tuple[int, ...]
    mandate: tuple[int, ...]
    load: tuple[int, ...]

    def describe(self) -> str:
        def cpus(c: tuple[int, ...]) -> str:
            return ("CPU " if len(c) == 1 else "CPUs ") + ",".join(map(str, c))

        return (
            f"Envoy (all threads) on {cpus(self.envoy)}; mandate (supervisor, workers, all "
            f"threads) on {cpus(self.mandate)}; load generator (wrk / openloop.py) and the "
            f"driver on {cpus(self.load)}; sched_setaffinity on every thread"
        )


@contextlib.contextmanager
def spawning_on(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """This thread on ``cpus`` while it starts a process (which inherits them), then back;
    nothing if None."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def plan_pinning() -> Pinning:
    """Envoy on the first CPU this script may use, mandate on the second, the load generator
    on the third if there is one, else with Envoy (on 2 CPUs mandate is the busiest party)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError(f"--pin needs at least 2 CPUs; this process may use {cpus}")
    load = cpus[2] if len(cpus) > 2 else cpus[0]
    return Pinning((cpus[0],), (cpus[1],), (load,))


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin_tree(pid: int, cpus: tuple[int, ...]) -> int:
    """Every thread of ``pid`` and its descendants on ``cpus``; the number of threads set.
    Two passes: a thread started during the first inherits from one already set, or is set
    by the second."""
    done: set[int] = set()
    for _ in range(2):
        for p in process_tree(pid):
            for tid in _threads(p):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)
                    done.add(tid)
    return len(done)


def tree_affinity(pid: int) -> dict[str, Any]:
    """The processes and threads of ``pid``'s tree and the CPUs any of them may run on."""
    procs = process_tree(pid)
    threads = [t for p in procs for t in _threads(p)]
    allowed: set[int] = set()
    for t in threads:
        with contextlib.suppress(OSError):
            allowed |= os.sched_getaffinity(t)
    return {"processes": len(procs), "threads": len(threads), "cpus": sorted(allowed)}


def wait_for(
    cond: Callable[[], Any],
    what: str,
    timeout: float,
    interval: float = 0.05,
    tolerate: tuple[type[BaseException], ...] = (),
) -> Any:
    """``cond()``'s first true value, polled every ``interval`` s; BenchError after
    ``timeout`` s. Exceptions of the ``tolerate`` types count as not yet (the last one is
    named in the error)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except tolerate as exc:
            last = exc
        time.sleep(interval)
    raise BenchError(f"{what}: not after {timeout:g} s" + (f" ({last})" if last else ""))


def stop_process(proc: BaseProcess, timeout: float = 5.0) -> None:
    """Stop a multiprocessing child: terminate, then kill."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
