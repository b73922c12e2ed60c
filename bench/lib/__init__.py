"""What the benchmarks share. Nothing here measures by itself:

- `proc`: what /proc says about processes and the machine (CPU time, RSS, PSS, process
  trees, the machine's busy time), CPU pinning, waiting for and stopping processes;
- `stack`: the stacks under test: the benchmark request, the demo profiles minus rate
  limits, Envoy with bench/envoy-*.yaml and `mandate run` behind it (start, verify, query),
  the demo upstream, mandate's start-up time;
- `load`: the load generators (wrk, closed loop; openloop.py, fixed rate; a raw keep-alive
  client) and the figures measured around one load;
- `report`: what every result file records about the machine and checkout, and writing
  RESULTS/STEM.{json,md}.
"""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"  # the default --out of every benchmark
PROFILES = ROOT / "devstack" / "demo" / "profiles"


class BenchError(RuntimeError):
    """The benchmark cannot produce meaningful figures; the message says why. The runner
    (`python -m bench NAME`) prints it as one line on stderr and exits 1."""
