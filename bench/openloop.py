"""Open-loop HTTP/1.1 load at a fixed rate, free of coordinated omission.

Request i is *scheduled* at t0 + i / RATE, whatever happened before it; it goes out on the
first idle one of CONNECTIONS keep-alive connections (one request in flight per connection,
no pipelining). When every connection is busy (the server is slower than the rate), scheduled
requests wait in a FIFO queue here: their latency, measured from the scheduled time to the
last byte of the response, includes that wait, as a client with its own schedule would see
it. Each request's latency is recorded; the percentiles are nearest-rank over all of them.

Why not asyncio: one hand-written loop on `select.select`, whose timeout has microsecond
resolution (epoll's, asyncio's default selector on Linux, is rounded up to whole
milliseconds, which would make every send up to 1 ms late). How late the loop noticed each
request was due (`lag`: the generator's own lateness, e.g. when it waits for a CPU; the wait
for a free connection is not in it) is reported, as is the service time (response minus send
time, what a closed-loop client such as wrk would record).

Bounded in time: after DURATION seconds no request is scheduled any more; the requests still
queued or in flight get DRAIN seconds more. Those unanswered then count as `incomplete`,
with the time waited so far as their latency (a lower bound: percentiles that land on them
are lower bounds, and say so). A request whose connection fails or closes counts a socket
error (not a latency); the connection is reopened.

Standard library only, one process (the benchmarks run it as a child process, so that its
CPU time is its own and it can be pinned). Prints one JSON object on stdout:

    python bench/openloop.py --port 10000 --host example --path / --rate 1000 --duration 10
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import select
import socket
import sys
import time
from collections import deque
from typing import Any

_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)


class Conn:
    __slots__ = ("buf", "port", "sched", "sent", "sock")

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = self._connect()
        self.buf = bytearray()
        self.sched = 0.0
        self.sent = 0.0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def reopen(self) -> None:
        self.sock.close()
        self.buf.clear()
        self.sock = self._connect()

    def response(self) -> tuple[int, bool] | None:
        """(status, must close) once a whole response is buffered (then consumed), else None."""
        end = self.buf.find(_HEADER_END)
        if end < 0:
            return None
        head = bytes(self.buf[: end + 2])
        status = int(head[9:12])
        m = _CONTENT_LENGTH.search(head)
        if m is not None:
            total = end + 4 + int(m.group(1))
        elif _CHUNKED.search(head):
            last = self.buf.find(b"\r\n0\r\n\r\n", end)
            if last < 0:
                return None
            total = last + 7
        else:
            total = end + 4  # no body (1xx/204/304) or close-delimited: treat as headers only
        if len(self.buf) < total:
            return None
        del self.buf[:total]
        return status, bool(_CLOSE.search(head)) or (m is None and not _CHUNKED.search(head))


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest rank."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def run(
    port: int,
    host: str,
    path: str,
    rate: float,
    duration: float,
    connections: int,
    drain: float,
) -> dict[str, Any]:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: openloop\r\n\r\n".encode()
    conns = [Conn(port) for _ in range(connections)]
    idle: deque[Conn] = deque(conns)
    busy: dict[int, Conn] = {}
    queued: deque[float] = deque()  # scheduled times waiting for an idle connection
    interval = 1.0 / rate
    total = max(1, round(rate * duration))
    latency: list[float] = []  # scheduled -> response, seconds
    service: list[float] = []  # sent -> response
    lag: list[float] = []  # scheduled -> noticed due by this loop
    statuses: dict[int, int] = {}
    socket_errors = 0
    now = time.perf_counter
    t0 = now() + 0.05
    end_of_schedule = t0 + (total - 1) * interval
    deadline = end_of_schedule + drain
    nxt = 0  # index of the next request to schedule

    def fail(c: Conn) -> None:
        """The request on ``c`` failed (counted as a socket error, not as a latency): reopen."""
        nonlocal socket_errors
        socket_errors += 1
        busy.pop(c.sock.fileno(), None)
        try:
            c.reopen()
        except OSError:
            return  # the connection is lost; the others go on
        idle.append(c)

    while True:
        t = now()
        while nxt < total and t0 + nxt * interval <= t:
            sched = t0 + nxt * interval
            queued.append(sched)
            lag.append(t - sched)  # how late this loop noticed it was due
            nxt += 1
        while queued and idle:
            c = idle.popleft()
            c.sched = queued.popleft()
            c.sent = now()
            try:
                c.sock.send(request)
            except OSError:
                fail(c)
                continue
            busy[c.sock.fileno()] = c
        if nxt >= total and not queued and not busy:
            break
        t = now()
        if t >= deadline:
            break
        # Sleep until the next request is due, or (all due ones queued) a response comes.
        due = t0 + nxt * interval if nxt < total and not queued else deadline
        ready, _, _ = select.select(list(busy), [], [], max(0.0, min(due, deadline) - t))
        for fd in ready:
            c = busy[fd]
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                fail(c)
                continue
            c.buf += data
            got = c.response()
            if got is None:
                continue
            t = now()
            latency.append(t - c.sched)
            service.append(t - c.sent)
            statuses[got[0]] = statuses.get(got[0], 0) + 1
            del busy[fd]
            if got[1]:
                try:
                    c.reopen()
                except OSError:
                    socket_errors += 1
                    continue
            idle.append(c)
    stop = now()
    # Unanswered at the deadline: in flight, queued, or (if the loop ended early) unscheduled.
    incomplete = [stop - c.sched for c in busy.values()] + [stop - s for s in queued]
    unscheduled = total - nxt
    incomplete += [max(0.0, stop - (t0 + i * interval)) for i in range(nxt, total)]
    for c in conns:
        c.sock.close()
    answered = len(service)
    all_latency = sorted(latency + incomplete)
    last = max(stop, end_of_schedule)
    out: dict[str, Any] = {
        "offered_rps": rate,
        "scheduled": total,
        "requests": answered,
        "duration_s": duration,
        "rps": answered / (last - t0) if last > t0 else None,
        "connections": connections,
        "status": {str(k): v for k, v in sorted(statuses.items())},
        "non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300),
        "socket_errors": socket_errors,
        "incomplete": len(incomplete),
        "unscheduled": unscheduled,
        "drain_s": drain,
        "mean_us": 1e6 * sum(all_latency) / len(all_latency) if all_latency else None,
        "max_us": 1e6 * all_latency[-1] if all_latency else None,
    }
    # A percentile is a lower bound if it lands at or above the smallest incomplete latency.
    floor = min(incomplete) if incomplete else math.inf
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        v = percentile(all_latency, q)
        out[f"{name}_us"] = None if v is None else round(v * 1e6)
        out[f"{name}_lower_bound"] = v is not None and v >= floor
    service.sort()
    lag.sort()
    for name, q in (("p50", 50), ("p99", 99), ("p999", 99.9)):
        v = percentile(service, q)
        out[f"service_{name}_us"] = None if v is None else round(v * 1e6)
        v = percentile(lag, q)
        out[f"lag_{name}_us"] = None if v is None else round(v * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench openloop", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    p.add_argument("--port", type=int, required=True, help="127.0.0.1 port to load")
    p.add_argument("--host", required=True, help="Host header")
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, required=True, help="seconds of schedule")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    p.add_argument("--drain", type=float, default=2.0, help="seconds to wait for the last ones")
    args = p.parse_args(argv)
    if not 0 < args.rate <= 200_000 or not 0 < args.duration <= 600:
        p.error("--rate: 0..200000; --duration: 0..600 s")
    if not 1 <= args.connections <= 500 or not 0 <= args.drain <= 60:
        # select(2) takes file descriptors below 1024.
        p.error("--connections: 1..500; --drain: 0..60 s")
    gc.disable()  # no cycles here; a collection would only delay sends
    out = run(
        args.port, args.host, args.path, args.rate, args.duration, args.connections, args.drain
    )
    sys.stdout.write("OPENLOOP_JSON " + json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
