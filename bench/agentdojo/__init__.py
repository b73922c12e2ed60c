"""`python -m bench agentdojo`: AgentDojo's ground-truth tool calls (suites workspace and
travel; banking and slack are held out) replayed as MCP `tools/call` through real Envoy and
mandate, against profiles written from the user tasks only; utility and security per
configuration. bench/README.md#agentdojo says more.

- `extract`: the ground truth as JSON (imports agentdojo; runs in another venv if need be);
- `policy`: the sessions, profiles and task declarations (pure);
- `score`: the figures (pure);
- `replay`: the stack and the replay (I/O);
- `run`: the command line and the result files.

Importing this package imports nothing heavy: `main` loads `run` when called.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from bench.agentdojo.run import main as run_main

    return run_main(argv)
