"""The worker's collector settings after start-up (`server.tune_gc`): what start-up made is
frozen out of the collector's scans, young collections are rarer, and cyclic garbage made
afterwards is still collected (rarer scans must not mean a leak)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_tune_gc_freezes_start_up_and_still_collects_cycles() -> None:
    # In a child interpreter: freezing is process-wide and would leak into other tests.
    code = textwrap.dedent(
        """
        import gc, weakref
        from sidecar.run.worker import GC_GEN0_THRESHOLD, tune_gc

        class Node:
            pass

        before = gc.get_threshold()
        tune_gc()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        a, b = Node(), Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
        # Allocations alone (net of frees) trigger the collector: no gc.collect() here.
        keep = [[] for _ in range(GC_GEN0_THRESHOLD * 2)]  # noqa: F841
        assert alive() is None, "a cycle made after tune_gc was never collected"
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
