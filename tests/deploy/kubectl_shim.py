"""A stand-in `kubectl` for testing deploy/webhook-cert.sh without a cluster.

Put a `kubectl` on PATH that runs ``python kubectl_shim.py "$@"`` with ``KUBECTL_SHIM_STATE``
(a directory) and ``KUBECTL_SHIM_REAL`` (the real kubectl) in the environment. Objects live
in the state directory as JSON, one file each (seed them with :func:`store`); every call is
appended to ``calls.jsonl`` there. What the real kubectl can do offline it does here too:
``create ... --dry-run=client`` runs it unchanged, and ``get -o jsonpath=...`` and
``patch --type json`` run it with ``--local`` on the stored object, so that jsonpath and
JSON-patch semantics are kubectl's own. The rest (``apply -f -`` storing what it reads,
NotFound, ``--ignore-not-found``) is emulated; anything else fails loudly. A call whose
arguments contain ``KUBECTL_SHIM_FORBID`` (if set) is refused as the API server refuses a
request RBAC does not allow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["calls", "load", "main", "store"]

_KINDS = {  # resource name as typed -> (kind, namespaced)
    "secret": ("Secret", True),
    "secrets": ("Secret", True),
    "mutatingwebhookconfiguration": ("MutatingWebhookConfiguration", False),
    "mutatingwebhookconfigurations": ("MutatingWebhookConfiguration", False),
}


def _path(state: Path, kind: str, namespace: str | None, name: str) -> Path:
    return state / "objects" / f"{kind}.{namespace or '-'}.{name}.json"


def store(state: Path, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    path = _path(state, obj["kind"], meta.get("namespace"), meta["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def load(state: Path, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    path = _path(state, kind, namespace, name)
    return json.loads(path.read_text()) if path.exists() else None


def calls(state: Path) -> list[list[str]]:
    log = state / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _real(
    state: Path, args: list[str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(state), "KUBECONFIG": str(state / "no-kubeconfig")}
    return subprocess.run(
        [os.environ["KUBECTL_SHIM_REAL"], *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def _pass(result: subprocess.CompletedProcess[str]) -> int:
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


def _option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _without(args: list[str], *names: str) -> list[str]:
    """args without the options ``names`` (and their values)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(n + "=") for n in names):
            out.append(arg)
    return out


def _target(positional: list[str], namespace: str) -> tuple[str, str | None, str]:
    """(kind, namespace, name) from `TYPE NAME` or `TYPE/NAME`."""
    if "/" in positional[0]:
        typed, name = positional[0].split("/", 1)
    else:
        typed, name = positional[0], positional[1]
    kind, namespaced = _KINDS[typed.lower()]
    return kind, namespace if namespaced else None, name


def main(argv: list[str]) -> int:
    state = Path(os.environ["KUBECTL_SHIM_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    with (state / "calls.jsonl").open("a") as log:
        log.write(json.dumps(argv) + "\n")
    forbid = os.environ.get("KUBECTL_SHIM_FORBID")
    if forbid and forbid in " ".join(argv):
        print(f"Error from server (Forbidden): {' '.join(argv)} is forbidden", file=sys.stderr)
        return 1
    namespace = _option(argv, "-n", "--namespace") or "default"
    args = _without(argv, "-n", "--namespace")
    verb, rest = args[0], args[1:]
    if verb == "create" and "--dry-run=client" in rest:
        return _pass(_real(state, argv))
    if verb == "apply" and rest == ["-f", "-"]:
        for doc in yaml.safe_load_all(sys.stdin.read()):
            if doc:
                doc["metadata"].setdefault("namespace", namespace)
                store(state, doc)
                print(f"{doc['kind'].lower()}/{doc['metadata']['name']} configured")
        return 0
    positional = [a for a in _without(rest, "-o", "--type", "-p") if not a.startswith("-")]
    if verb in ("get", "patch") and positional:
        kind, ns, name = _target(positional, namespace)
        obj = load(state, kind, ns, name)
        if obj is None:
            if verb == "get" and "--ignore-not-found" in rest:
                return 0
            print(
                f'Error from server (NotFound): {kind.lower()} "{name}" not found', file=sys.stderr
            )
            return 1
        current = state / "current.json"
        current.write_text(json.dumps(obj))
        if verb == "get":
            output = _option(rest, "-o") or ""
            assert output.startswith("jsonpath="), f"kubectl shim: get -o {output}"
            return _pass(
                _real(state, ["patch", "--local", "-f", str(current), "--type", "merge",
                              "-p", "{}", "-o", output])
            )  # fmt: skip
        patch_type, patch = _option(rest, "--type"), _option(rest, "-p")
        assert patch_type == "json" and patch is not None, f"kubectl shim: patch {rest}"
        result = _real(
            state,
            ["patch", "--local", "-f", str(current), "--type", "json", "-p", patch, "-o", "json"],
        )
        if result.returncode != 0:
            return _pass(result)
        store(state, json.loads(result.stdout))
        print(f"{kind.lower()}/{name} patched")
        return 0
    print(f"kubectl shim: unsupported: {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
