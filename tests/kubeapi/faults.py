"""Switchable HTTP faults for the Kubernetes API emulation (issue 8's flapping tests).

:class:`KubeAPIServer` already has `down()`/`up()` (the server goes away and comes back),
`end_watches()` (clean stream ends), `cluster.abort_watches()` (streams cut mid-way) and
`compact()` (410 Gone). :class:`ListWatchErrors` adds what a sick API server does while it is
still reachable: its list and/or watch requests of one resource are answered with an error
status (500 from a failing etcd, 503 while overloaded) while the fault is on, and served
normally once it is off; with ``hang=True`` they are not answered at all while the fault is
on (a partition that drops packets, an API server stuck on etcd). Other requests (kubectl's get by name, create, patch, delete, the
watcher's Events and status writes) are not affected, so an operator can still change
objects while the watcher cannot see them.

Built on the emulation's kmock reaction hook with a criterion that is only true while the
fault is on; nothing in server.py changes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from .server import KubeAPIServer

__all__ = ["ListWatchErrors"]


def _is_watch(params: Any) -> bool:
    value = str(params.get("watch", "")).lower()
    return value not in ("", "0", "false")


class ListWatchErrors:
    """``faults = ListWatchErrors(api, status=500)``; ``faults.on()`` / ``faults.off()``.

    ``requests``: which requests fail, "list", "watch" or "both". ``failed`` counts the
    requests answered with the error, or held (a test waits for it to grow instead of
    sleeping). ``hang``: hold each request unanswered until the fault is off (or the client
    gives up), then answer with ``status``."""

    def __init__(
        self,
        api: KubeAPIServer,
        *,
        status: int = 500,
        plural: str = "agentrevocations",
        requests: str = "both",
        hang: bool = False,
    ) -> None:
        if requests not in ("list", "watch", "both"):
            raise ValueError(f"requests={requests!r}: expected list, watch or both")
        self.status = status
        self.plural = plural
        self.requests = requests
        self._on = threading.Event()
        self._failed: set[int] = set()
        self._lock = threading.Lock()
        if hang:
            api.react(self._matches, status, self._silence)
        else:
            api.react(self._matches, status)

    async def _silence(self) -> bytes:
        while self._on.is_set():
            await asyncio.sleep(0.02)
        return json.dumps(
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": self.status}
        ).encode()

    def _matches(self, request: Any) -> bool:
        if not self._on.is_set() or request.method != "GET":
            return False
        path = request.url.path.rstrip("/")
        if not path.endswith("/" + self.plural):  # a collection: list or watch, not a get
            return False
        kind = "watch" if _is_watch(request.params) else "list"
        if self.requests not in ("both", kind):
            return False
        with self._lock:
            self._failed.add(request.id)
        return True

    @property
    def failed(self) -> int:
        with self._lock:
            return len(self._failed)

    @property
    def active(self) -> bool:
        return self._on.is_set()

    def on(self) -> None:
        self._on.set()

    def off(self) -> None:
        self._on.clear()
