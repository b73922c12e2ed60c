"""`kubectl wait --for=condition=...` on AgentRevocations and AgentElevations, with the real
kubectl against the API emulation and the sidecar's real watchers writing the statuses
(issue 19, 7): the conditions say what the sidecars do, for the object's current spec."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import yaml

from sidecar.state.revocations import RevocationStore
from tests.clocks import from_now
from tests.kubeapi.fixtures import Kubectl
from tests.kubeapi.server import KubeAPIServer

from .conftest import FakeSink, wait_for


def revocation(name: str, **spec: Any) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentRevocation",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {"agent": "billing-agent", "reason": "INC-1", **spec},
        }
    )


async def wait(kubectl: Kubectl, condition: str, target: str, seconds: int = 8) -> Any:
    """`kubectl wait` in a thread (the watchers run in this test's loop)."""
    return await asyncio.to_thread(
        kubectl,
        "wait",
        f"--for=condition={condition}",
        target,
        f"--timeout={seconds}s",
        check=False,
    )


async def test_wait_for_enforced_holds_for_every_spec_version(
    kube_api: KubeAPIServer, kubectl: Kubectl, store: RevocationStore, start_watcher: Any
) -> None:
    """kubectl wait believes a condition only for the object's generation: after the
    operator changed the reason, the sidecars say Enforced for the new spec too (the
    condition kept generation 1 before, and `kubectl wait` waited forever)."""
    await start_watcher(store)
    await kube_api.until_watches(1)
    await asyncio.to_thread(kubectl, "apply", "-f", "-", input=revocation("r1"))
    result = await wait(kubectl, "Enforced", "agentrevocation/r1")
    assert result.returncode == 0, result.stderr
    assert "condition met" in result.stdout
    first = kube_api.get("arev", "agents", "r1")["status"]

    changed = revocation("r1").replace("INC-1", "INC-1, escalated")
    await asyncio.to_thread(kubectl, "apply", "-f", "-", input=changed)
    assert kube_api.get("arev", "agents", "r1")["metadata"]["generation"] == 2
    result = await wait(kubectl, "Enforced", "arev/r1")
    assert result.returncode == 0, result.stderr
    status = kube_api.get("arev", "agents", "r1")["status"]
    assert status["observedGeneration"] == 2
    [enforced] = status["conditions"]
    assert enforced["observedGeneration"] == 2
    # The same words: not a new enforcement, nor a correction.
    assert enforced["lastTransitionTime"] == first["conditions"][0]["lastTransitionTime"]
    assert status["firstEnforcedAt"] == first["firstEnforcedAt"]
    assert [e["reason"] for e in kube_api.events()] == ["RevocationEnforced"]


async def test_an_ended_revocation_is_expired_and_no_longer_enforced(
    kube_api: KubeAPIServer, kubectl: Kubectl, store: RevocationStore, start_watcher: Any
) -> None:
    await start_watcher(store)
    await kube_api.until_watches(1)
    doc = revocation("brief", expiresAt=from_now(2.0))
    await asyncio.to_thread(kubectl, "apply", "-f", "-", input=doc)
    assert (await wait(kubectl, "Enforced", "arev/brief")).returncode == 0
    result = await wait(kubectl, "Expired", "arev/brief", seconds=10)
    assert result.returncode == 0, result.stderr
    # Enforced stayed True after the end before (kept "as history").
    result = await wait(kubectl, "Enforced=False", "arev/brief", seconds=2)
    assert result.returncode == 0, result.stderr
    assert store.table().find("agents", "billing-agent", time.time()) is None


async def test_wait_for_an_elevation_to_be_ready(
    kube_api: KubeAPIServer, kubectl: Kubectl, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    await start_elevation_watcher(sink)
    await kube_api.until_watches(1)
    doc = {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentElevation",
        "metadata": {"name": "e1", "namespace": "agents"},
        "spec": {"agent": "billing-agent", "elevation": "refund", "approver": "alice"},
    }
    await asyncio.to_thread(kubectl, "apply", "-f", "-", input=json.dumps(doc))
    result = await wait(kubectl, "Ready", "agentelevation/e1")
    assert result.returncode == 0, result.stderr
    conditions = await wait_for(
        lambda: kube_api.get("aelev", "agents", "e1")["status"].get("conditions")
    )
    assert [(c["type"], c["status"], c["observedGeneration"]) for c in conditions] == [
        ("Ready", "True", 1)
    ]
    assert (await wait(kubectl, "Invalid", "aelev/e1", seconds=1)).returncode != 0
