"""Run the Kubernetes API emulation by itself (for a demo or by hand):

    python -m tests.kubeapi --kubeconfig /tmp/kubeapi.kubeconfig [--port 0]

It serves until interrupted and writes a kubeconfig for kubectl and `mandate run`."""

from __future__ import annotations

import argparse
import contextlib
import threading
from pathlib import Path

from .server import KubeAPIServer


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kubeapi")
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--namespace", default="agents")
    args = parser.parse_args()
    server = KubeAPIServer()
    server.port = args.port
    with server:
        server.write_kubeconfig(args.kubeconfig, namespace=args.namespace)
        print(
            f"Kubernetes API emulation on {server.url}; kubeconfig: {args.kubeconfig}", flush=True
        )
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
