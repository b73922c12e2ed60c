"""Issue 17: a status forged by someone who may patch the status subresource (the agent could,
with the pod's token, before the injection kept the token out of its containers) is
overwritten by the sidecars that know better within the watch's next event; a legitimate
status written by another pod is never flapped; a writer that keeps forging is corrected a
bounded number of times. Forged with the real kubectl (as the agent would) and through the
emulation; the watchers run against the Kubernetes API emulation over real HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.timefmt import utc_seconds
from sidecar.kube.reporter import MAX_CORRECTIONS
from tests.clocks import from_now
from tests.kubeapi.fixtures import Kubectl, KubectlError
from tests.kubeapi.server import KubeAPIServer

from .conftest import FakeSink, create_unchecked, make_store, wait_for

NS = "agents"


def arev(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentRevocation",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"agent": "billing-agent", "reason": f"reason {name}", **spec},
    }


def aelev(name: str, **spec: Any) -> dict[str, Any]:
    body = {"agent": "billing-agent", "elevation": "refund", "approver": "alice", **spec}
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentElevation",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


def status(api: KubeAPIServer, kind: str, name: str) -> dict[str, Any]:
    return dict(api.get(kind, NS, name).get("status") or {})


def said(status: dict[str, Any]) -> dict[str, Any]:
    """What a status says: its conditions' lastTransitionTime is when they last changed
    (a forged state, undone, is a change), not what they say."""
    conditions = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"}
        for c in status.get("conditions") or []
    ]
    return {**status, "conditions": conditions}


def writes(api: KubeAPIServer, plural: str, name: str) -> int:
    """MODIFIED events of one object: its status writes (its spec is not changed here)."""
    return sum(
        1 for _, ev, o in api.history(plural) if ev == "MODIFIED" and o["metadata"]["name"] == name
    )


def forge_with_kubectl(kubectl: Kubectl, kind: str, name: str, forged: dict[str, Any]) -> None:
    """As an agent holding the pod's token would: a merge patch of the status subresource."""
    kubectl("patch", kind, name, "--subresource=status", "--type=merge", "-p", json.dumps(forged))


def forge(api: KubeAPIServer, kind: str, name: str, forged: dict[str, Any]) -> None:
    api.patch(kind, NS, name, forged, subresource="status")


def condition(type_: str, reason: str, generation: int = 1) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True",
        "reason": reason,
        "message": "forged",
        "lastTransitionTime": utc_seconds(time.time()),
        "observedGeneration": generation,
    }


async def settle(api: KubeAPIServer, plural: str, name: str, quiet: float = 0.5) -> int:
    """Wait until the object has had no write for ``quiet`` seconds (bounded); its writes."""
    deadline = time.monotonic() + 10
    count = writes(api, plural, name)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = writes(api, plural, name)
        if now == count:
            return now
        count = now
    raise AssertionError(f"{plural}/{name} kept being written")


# -- AgentRevocation -----------------------------------------------------------------------------


async def test_a_forged_expired_on_an_enforced_revocation_is_overwritten(
    kube_api: KubeAPIServer, kubectl: Kubectl, tmp_path: Path, start_watcher: Any
) -> None:
    stores = {pod: make_store(tmp_path / pod) for pod in ("pod-a", "pod-b", "pod-c")}
    watchers = [await start_watcher(s, pod_name=pod) for pod, s in stores.items()]
    await kube_api.until_watches(3)
    kube_api.create(arev("a"))
    await wait_for(lambda: status(kube_api, "arev", "a").get("state") == "Enforced")
    legit = status(kube_api, "arev", "a")
    before = await settle(kube_api, "agentrevocations", "a")
    assert before == 1  # one status write for the object, not one per pod

    # The agent says it ended: it did not, and every pod enforces it.
    forged = {"status": {"state": "Expired", "conditions": [condition("Expired", "Ended")]}}
    await asyncio.to_thread(forge_with_kubectl, kubectl, "arev", "a", forged)
    await wait_for(
        lambda: status(kube_api, "arev", "a").get("state") == "Enforced", timeout=3, what="fixed"
    )
    fixed = status(kube_api, "arev", "a")
    assert [c["type"] for c in fixed["conditions"]] == ["Enforced"]
    assert (fixed["firstEnforcedAt"], fixed["firstEnforcedBy"]) == (
        legit["firstEnforcedAt"],
        legit["firstEnforcedBy"],
    )
    # The forgery and one correction: the pods do not take turns.
    assert await settle(kube_api, "agentrevocations", "a") == before + 2
    assert sum(w.reporter.corrections for w in watchers) == 1
    for s in stores.values():  # enforcement never depended on the status
        assert s.table().find(NS, "billing-agent", time.time()) is not None

    # A status with no state and no conditions left is corrected the same way.
    await asyncio.to_thread(
        forge_with_kubectl, kubectl, "arev", "a", {"status": {"state": None, "conditions": None}}
    )
    await wait_for(
        lambda: status(kube_api, "arev", "a").get("state") == "Enforced", what="corrected again"
    )
    assert status(kube_api, "arev", "a")["conditions"][0]["type"] == "Enforced"


async def test_a_forged_enforced_on_an_ended_revocation_is_overwritten(
    kube_api: KubeAPIServer, tmp_path: Path, start_watcher: Any
) -> None:
    stores = [make_store(tmp_path / pod) for pod in ("pod-a", "pod-b")]
    for i, s in enumerate(stores):
        await start_watcher(s, pod_name=f"pod-{'ab'[i]}")
    await kube_api.until_watches(2)
    kube_api.create(arev("brief", expiresAt=from_now(1.0)))
    await wait_for(
        lambda: status(kube_api, "arev", "brief").get("state") == "Expired",
        timeout=10,
        what="ended",
    )
    before = await settle(kube_api, "agentrevocations", "brief")
    # Someone says it still stops the agent: it does not.
    forge(
        kube_api,
        "arev",
        "brief",
        {"status": {"state": "Enforced", "conditions": [condition("Enforced", "InForce")]}},
    )
    await wait_for(
        lambda: status(kube_api, "arev", "brief").get("state") == "Expired", what="corrected"
    )
    types = {c["type"] for c in status(kube_api, "arev", "brief")["conditions"]}
    assert types == {"Enforced", "Expired"}
    assert await settle(kube_api, "agentrevocations", "brief") == before + 2


async def test_a_persistent_forger_is_corrected_a_bounded_number_of_times(
    kube_api: KubeAPIServer,
    store: Any,
    start_watcher: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    watcher = await start_watcher(store)
    await kube_api.until_watches(1)
    kube_api.create(arev("a"))
    await wait_for(lambda: status(kube_api, "arev", "a").get("state") == "Enforced")
    forged = {"status": {"state": "Expired", "conditions": [condition("Expired", "Ended")]}}
    caplog.set_level(logging.WARNING, logger="sidecar.kube.reporter")
    for n in range(MAX_CORRECTIONS):
        forge(kube_api, "arev", "a", forged)
        await wait_for(
            lambda: status(kube_api, "arev", "a").get("state") == "Enforced",
            what=f"correction {n + 1}",
        )
    forge(kube_api, "arev", "a", forged)
    await settle(kube_api, "agentrevocations", "a")
    assert status(kube_api, "arev", "a")["state"] == "Expired"  # the writer that insists wins
    assert watcher.reporter.corrections == MAX_CORRECTIONS
    messages = [r.getMessage() for r in caplog.records]
    assert sum("replaced a status that contradicted" in m for m in messages) == MAX_CORRECTIONS
    assert any("set again against what pod pod-a knows" in m for m in messages)


# -- AgentElevation ------------------------------------------------------------------------------


def granting(pod: str, seconds: float = 600.0) -> FakeSink:
    """A sink that grants every approval with a grant id of its own (as every pod does for
    an approval without a request)."""
    sink = FakeSink()
    sink.answer = lambda a: (
        "Granted",
        f"grant g-{pod} until ...",
        f"g-{pod}",
        a.approved_at + seconds,
    )
    return sink


def refusing(message: str = "no elevation request 'elev-1'") -> FakeSink:
    sink = FakeSink()
    sink.answer = lambda a: ("Invalid", message, "", None)
    return sink


async def test_the_holder_overwrites_a_forged_elevation_status(
    kube_api: KubeAPIServer, kubectl: Kubectl, start_elevation_watcher: Any
) -> None:
    holder = await start_elevation_watcher(FakeSink(), pod_name="pod-a")  # grants g-a
    others = [await start_elevation_watcher(refusing(), pod_name=f"pod-{p}") for p in "bc"]
    await kube_api.until_watches(3)
    kube_api.create(aelev("a", requestId="elev-1"))
    await wait_for(lambda: status(kube_api, "aelev", "a").get("grantId") == "g-a")
    legit = status(kube_api, "aelev", "a")
    count = await settle(kube_api, "agentelevations", "a")
    assert count <= 2  # perhaps an Invalid first, then the holder's Granted

    far = utc_seconds(time.time() + 30 * 86400)
    forgeries = [
        # a grant nobody holds, longer
        {"state": "Granted", "grantId": "grant-forged", "expiresAt": far, "message": "ok"},
        # the live grant hidden
        {"state": "Expired", "message": "the grant ended", "grantId": None, "expiresAt": None},
        {"state": "Invalid", "message": "denied by security", "grantId": None, "expiresAt": None},
        {"state": "Pending", "message": "waiting", "grantId": None, "expiresAt": None},
        {"observedGeneration": 9},
    ]
    for forged in forgeries:
        await asyncio.to_thread(forge_with_kubectl, kubectl, "aelev", "a", {"status": forged})
        await wait_for(
            lambda: said(status(kube_api, "aelev", "a")) == said(legit),
            timeout=3,
            what=f"undo {forged}",
        )
        count = await settle(kube_api, "agentelevations", "a")
    # Undone by the pod that holds the grant, never by the others: the forged grant and the
    # forged Expired contradict it; Invalid and Pending rank below its answer (the usual
    # sequence), and a status of another generation is rewritten by anyone.
    assert holder.reporter.corrections == 2
    assert all(o.reporter.corrections == 0 for o in others)
    # A state no sidecar writes is refused by the API server itself.
    with pytest.raises(KubectlError) as err:
        forge_with_kubectl(kubectl, "aelev", "a", {"status": {"state": "Denied"}})
    assert "status.state" in str(err.value) and "Unsupported value" in str(err.value)


async def test_pods_that_each_grant_do_not_take_turns(
    kube_api: KubeAPIServer, start_elevation_watcher: Any
) -> None:
    """An approval without a request: every pod with the profile grants it, each with a
    grant id of its own; one status stands. A pod whose profile allowed a longer grant (a
    ConfigMap update not yet everywhere) wins: the latest end stands."""
    for pod in ("pod-a", "pod-b", "pod-c"):
        await start_elevation_watcher(granting(pod), pod_name=pod)
    await kube_api.until_watches(3)
    kube_api.create(aelev("same"))
    await wait_for(lambda: status(kube_api, "aelev", "same").get("state") == "Granted")
    assert await settle(kube_api, "agentelevations", "same") == 1
    kube_api.create(aelev("longer"))
    await wait_for(lambda: status(kube_api, "aelev", "longer").get("state") == "Granted")
    await start_elevation_watcher(granting("pod-d", seconds=1200.0), pod_name="pod-d")
    await wait_for(
        lambda: status(kube_api, "aelev", "longer").get("grantId") == "g-pod-d", what="longest"
    )
    assert await settle(kube_api, "agentelevations", "longer") == 2
    # A forged earlier end is undone by a pod that knows a later one.
    forge(kube_api, "aelev", "longer", {"status": {"expiresAt": utc_seconds(time.time() + 5)}})
    await wait_for(
        lambda: (
            status(kube_api, "aelev", "longer").get("grantId") == "g-pod-d"
            and status(kube_api, "aelev", "longer")["expiresAt"] != utc_seconds(time.time() + 5)
        ),
        what="latest end again",
    )
    await settle(kube_api, "agentelevations", "longer")


async def test_no_pod_refutes_a_grant_it_cannot_know_of(
    kube_api: KubeAPIServer, start_elevation_watcher: Any
) -> None:
    """An approval naming a request that no running pod holds: every pod can only say "no
    such request here", which never overwrites a better-informed answer, so a forged Granted
    stays (deploy/README.md says so). Without a request, the profiles' Invalid is every
    pod's answer: each pod corrects a forged Granted once per generation (a pod whose
    profiles lag behind might grant it for a moment: pods must not take turns)."""
    pods = [await start_elevation_watcher(refusing(), pod_name=p) for p in ("pod-a", "pod-b")]
    await kube_api.until_watches(2)
    kube_api.create(aelev("unheld", requestId="elev-1"))
    await wait_for(lambda: status(kube_api, "aelev", "unheld").get("state") == "Invalid")
    forged = {
        "state": "Granted",
        "grantId": "grant-forged",
        "expiresAt": utc_seconds(time.time() + 3600),
        "message": "ok",
    }
    forge(kube_api, "aelev", "unheld", {"status": forged})
    await settle(kube_api, "agentelevations", "unheld")
    assert status(kube_api, "aelev", "unheld")["grantId"] == "grant-forged"

    kube_api.create(aelev("nosuch", elevation="refnd"))
    await wait_for(lambda: status(kube_api, "aelev", "nosuch").get("state") == "Invalid")
    for n in range(len(pods)):  # each pod corrects once (its profiles might lag)
        forge(kube_api, "aelev", "nosuch", {"status": forged})
        await wait_for(
            lambda: status(kube_api, "aelev", "nosuch").get("state") == "Invalid",
            what=f"correction {n + 1}",
        )
    forge(kube_api, "aelev", "nosuch", {"status": forged})
    await settle(kube_api, "agentelevations", "nosuch")
    assert status(kube_api, "aelev", "nosuch")["state"] == "Granted"
    assert [p.reporter.corrections for p in pods] == [1, 1]


async def test_an_invalid_object_shows_invalid_whatever_is_forged(
    kube_api: KubeAPIServer, start_elevation_watcher: Any
) -> None:
    for pod in ("pod-a", "pod-b"):
        await start_elevation_watcher(FakeSink(), pod_name=pod)
    await kube_api.until_watches(2)
    create_unchecked(kube_api, aelev("zero", duration="0s"))
    await wait_for(lambda: status(kube_api, "aelev", "zero").get("state") == "Invalid")
    legit = status(kube_api, "aelev", "zero")
    forge(
        kube_api,
        "aelev",
        "zero",
        {"status": {"state": "Granted", "grantId": "g", "message": "fine"}},
    )
    await wait_for(lambda: status(kube_api, "aelev", "zero") == legit, what="corrected")
    assert await settle(kube_api, "agentelevations", "zero") == 3  # written, forged, fixed
