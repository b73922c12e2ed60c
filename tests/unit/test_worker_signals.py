"""A worker stops on SIGTERM however many arrive at once. Its handler used to call
`Event.set` on the Event the main thread waited on: a second SIGTERM during the first one's
`set` (PDEATHSIG and a stop, together) re-entered it while its lock was held, and the
worker hung for good, orphaned, still answering Checks. The handler now only sets a flag."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, threading, time
    from sidecar.run.worker import STOP_POLL, _on_stop_signals

    stop = threading.Event()
    signalled = _on_stop_signals()

    def burst():
        time.sleep(0.1)
        for _ in range(500):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=burst, daemon=True).start()
    # Another thread sets the Event meanwhile too (the supervisor follower does).
    threading.Timer(0.15, stop.set).start()
    while not stop.wait(STOP_POLL) and not signalled():
        pass
    print("stopped", signalled())
    """
)


def test_a_burst_of_sigterms_stops_the_main_loop() -> None:
    for _ in range(5):
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=20
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("stopped"), out.stdout
