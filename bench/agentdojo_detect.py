"""`python -m bench agentdojo_detect`: behaviour analysis measured on AgentDojo's ground-truth
tool calls (workspace, travel) through real Envoy and mandate: benign and attack sessions,
per-session and per-call detection at the shipped thresholds, calls until revocation.
The benchmark is bench/agentdojo/detect*.py; bench/README.md#agentdojo_detect says more.
Importing this module imports nothing heavy: `main` loads the runner when called."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from bench.agentdojo.detect_run import main as run_main

    return run_main(argv)
