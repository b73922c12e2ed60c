"""A small stdlib-only tool the egress-capture test runs inside its network namespaces
(`ip netns exec NS [setpriv ...] python nettool.py ...`): the remote host's test server, the
agent's direct calls, and readiness probes. Results go to stdout as one JSON document.

    serve --host H --tcp P [--tcp P ...] --udp P --log FILE --ready FILE
    http  REQUESTS_JSON      [{"method", "url", "headers"?}, ...] -> [{"status", ...}, ...]
    udp   HOST PORT TEXT     -> {"sent": bool, "error"?: str}
    wait  URL [--contains TEXT] [--timeout S]   exit 0 once URL answers 200 (and TEXT)
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

TIMEOUT = 5.0


def serve(host: str, tcp_ports: list[int], udp_port: int, log: str, ready: str) -> None:
    lock = threading.Lock()

    def record(entry: dict[str, Any]) -> None:
        with lock, open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            seen = {
                "port": self.server.server_address[1],  # type: ignore[index]
                "method": self.command,
                "path": self.path,
                "peer": self.client_address[0],
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
            record(seen)
            body = json.dumps(seen).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    servers = [ThreadingHTTPServer((host, port), Echo) for port in tcp_ports]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, udp_port))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    with open(ready, "w") as f:
        f.write("ready\n")
    while True:
        data, peer = udp.recvfrom(65536)
        record({"udp": udp_port, "peer": peer[0], "data": data.decode("utf-8", "replace")})


def one_request(req: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(req["url"])
    conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=TIMEOUT)
    try:
        conn.request(req.get("method", "GET"), url.path or "/", headers=req.get("headers", {}))
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return {"status": resp.status, "headers": headers, "body": body}
    except (OSError, http.client.HTTPException) as exc:  # e.g. an HTTP/2 server's answer
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def send_udp(host: str, port: int, text: str) -> dict[str, Any]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        s.connect((host, port))
        s.send(text.encode())
        try:  # a REJECT's ICMP error surfaces on the next operation of a connected socket
            s.send(text.encode())
        except OSError as exc:
            return {"sent": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"sent": True}
    except OSError as exc:
        return {"sent": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        s.close()


def wait(url: str, contains: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = one_request({"url": url})
        if last.get("status") == 200 and contains in last.get("body", ""):
            return 0
        time.sleep(0.05)
    print(json.dumps({"url": url, "last": last}))
    return 1


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", required=True)
    s.add_argument("--tcp", type=int, action="append", required=True)
    s.add_argument("--udp", type=int, required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--ready", required=True)
    h = sub.add_parser("http")
    h.add_argument("requests")
    u = sub.add_parser("udp")
    u.add_argument("host")
    u.add_argument("port", type=int)
    u.add_argument("text")
    w = sub.add_parser("wait")
    w.add_argument("url")
    w.add_argument("--contains", default="")
    w.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.host, a.tcp, a.udp, a.log, a.ready)
    elif a.cmd == "http":
        print(json.dumps([one_request(r) for r in json.loads(a.requests)]))
    elif a.cmd == "udp":
        print(json.dumps(send_udp(a.host, a.port, a.text)))
    else:
        return wait(a.url, a.contains, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
