"""The AgentRevocation watcher against the Kubernetes API emulation over real HTTP: list,
watch, stream ends, 410 Gone, the API server down and back, enforcement reports."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from sidecar.core.revocation import make_key
from sidecar.core.timefmt import parse_rfc3339
from sidecar.kube import EVENT_REASON, EXPIRED_EVENT_REASON, watch_revocations
from sidecar.state.revocations import RevocationStore
from tests.clocks import DAY, YEAR, from_now, rfc3339
from tests.kubeapi.faults import ListWatchErrors
from tests.kubeapi.fixtures import Kubectl
from tests.kubeapi.server import KubeAPIServer

from .conftest import FAST, make_store, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "revocation.yaml"


def arev(name: str, agent: str = "billing-agent", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentRevocation",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {"agent": agent, "reason": f"reason {name}", **spec},
    }


def names(store: RevocationStore) -> list[str]:
    return [r.name for r in store.entries("kubernetes")]


def key(name: str) -> str:
    return make_key("kubernetes", "agents", name)


def watch_requests(api: KubeAPIServer) -> list[dict[str, str]]:
    return [dict(r.params) for r in api.requests if r.method == "GET" and r.params.get("watch")]


async def test_initial_list_enforces_existing_objects_and_marks_complete(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    a_expires = from_now(50 * YEAR)
    a = kube_api.create(arev("a", expiresAt=a_expires))
    kube_api.create(arev("b", agent="*"))
    listed_at = str(kube_api.resource_version)
    store.load_persisted()
    assert not store.complete
    watcher = await start_watcher(store)
    await wait_for(lambda: store.complete and len(store.entries()) == 2, what="first sync")
    rev = store.entries()[0]
    assert (rev.key, rev.agent, rev.namespace, rev.reason, rev.source, rev.name) == (
        key("a"),
        "billing-agent",
        "agents",
        "reason a",
        "kubernetes",
        "a",
    )
    assert rev.uid == a["metadata"]["uid"]
    assert rev.expires_at == parse_rfc3339(a_expires)
    assert rev.created_at == parse_rfc3339(a["metadata"]["creationTimestamp"])
    assert watcher.connected and watcher.last_error is None and watcher.last_sync_at
    assert (watcher.lists, watcher.relists) == (1, 0)
    # The watch starts from the list's resourceVersion, with bookmarks.
    await kube_api.until_watches(1)
    (params,) = watch_requests(kube_api)
    assert params["resourceVersion"] == listed_at
    assert params["allowWatchBookmarks"] in ("true", "True")
    assert int(watcher.resource_version or 0) >= int(params["resourceVersion"])


async def test_create_modify_delete_followed(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    await start_watcher(store)
    await wait_for(lambda: store.complete)
    await kube_api.until_watches(1)
    kube_api.create(arev("a"))
    await wait_for(lambda: names(store) == ["a"], what="a enforced")
    now = 0.0
    assert store.table().find("agents", "billing-agent", now) is not None
    kube_api.patch("arev", "agents", "a", {"spec": {"reason": "new reason"}})
    await wait_for(lambda: store.entries()[0].reason == "new reason", what="modification")
    kube_api.delete("arev", "agents", "a")
    await wait_for(lambda: names(store) == [], what="a removed")
    assert store.table().find("agents", "billing-agent", now) is None


async def test_expiry_and_all_agents(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    await start_watcher(store)
    await wait_for(lambda: store.complete)
    end = round(time.time() + YEAR) + 0.25  # an offset and a fraction, a year from now
    kube_api.create(arev("all", agent="*", expiresAt=rfc3339(end, offset_minutes=120, millis=True)))
    rev = await wait_for(lambda: store.entries() and store.entries()[0], what="all")
    assert rev.agent == "*"
    assert rev.expires_at == end
    table = store.table()
    assert table.find("agents", "any-agent", rev.expires_at - 1) == rev
    assert table.find("other-namespace", "any-agent", rev.expires_at - 1) is None
    assert table.find("agents", "any-agent", rev.expires_at + 1) is None  # expired by itself


async def test_an_expiry_the_server_accepts_but_that_is_no_time_fails_closed(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    # kube-openapi's date-time check lets February 30th through.
    kube_api.create(arev("feb30", expiresAt="2026-02-30T00:00:00Z"))
    await start_watcher(store)
    rev = await wait_for(lambda: store.entries() and store.entries()[0], what="feb30")
    assert rev.expires_at is None  # enforced until deleted, never silently dropped
    assert store.table().find("agents", "billing-agent", 4e9) is not None


async def test_stream_end_resumes_from_last_resource_version(
    kube_api: KubeAPIServer, store: RevocationStore, changes: list[Any], start_watcher: Any
) -> None:
    kube_api.create(arev("a"))
    watcher = await start_watcher(store, report=False)  # only the changes below move the RV
    await wait_for(lambda: names(store) == ["a"])
    await kube_api.until_watches(1)
    kube_api.create(arev("b"))
    await wait_for(lambda: names(store) == ["a", "b"])
    last_rv = watcher.resource_version
    for _ in range(3):
        assert kube_api.end_watches() == 1
        # Changes made while the watcher reconnects are not missed.
        kube_api.create(arev(f"c{_}"))
        await kube_api.until_watches(1)
    kube_api.delete("arev", "agents", "a")
    await wait_for(lambda: names(store) == ["b", "c0", "c1", "c2"], what="all changes")
    assert (watcher.lists, watcher.relists) == (1, 0)  # resumed, never relisted
    resumed = [p["resourceVersion"] for p in watch_requests(kube_api)]
    assert resumed[1] == last_rv and len(resumed) == 4
    assert [int(rv) for rv in resumed] == sorted(int(rv) for rv in resumed)
    # Each object was added once and never removed and re-added.
    added = [k for a, _ in changes for k in a]
    assert sorted(added) == sorted(key(n) for n in ["a", "b", "c0", "c1", "c2"])
    assert [r for _, rs in changes for r in rs] == [key("a")]


async def test_410_gone_relists_without_missing_or_reapplying(
    kube_api: KubeAPIServer, store: RevocationStore, changes: list[Any], start_watcher: Any
) -> None:
    for n in ("a", "b", "c"):
        kube_api.create(arev(n))
    watcher = await start_watcher(store)
    await wait_for(lambda: names(store) == ["a", "b", "c"])
    await kube_api.until_watches(1)
    before = list(changes)
    kube_api.down()
    await wait_for(lambda: not watcher.connected, what="disconnected")
    # While the API server is away: changes, then a compaction past the watcher's position.
    kube_api.delete("arev", "agents", "a")
    kube_api.patch("arev", "agents", "b", {"spec": {"reason": "changed while away"}})
    kube_api.create(arev("d"))
    kube_api.compact()
    kube_api.up()
    await wait_for(lambda: watcher.relists == 1 and watcher.connected, what="relist after 410")
    assert names(store) == ["b", "c", "d"]
    assert store.entries()[0].reason == "changed while away"
    # The relist wrote exactly the difference, in one change: c was not touched.
    after = changes[len(before) :]
    assert after == [([key("b"), key("d")], [key("a"), key("b")])]
    assert store.complete
    await kube_api.until_watches(1)
    kube_api.create(arev("e"))
    await wait_for(lambda: names(store) == ["b", "c", "d", "e"], what="watching again")


async def test_410_on_an_open_stream_relists(
    kube_api: KubeAPIServer, store: RevocationStore, changes: list[Any], start_watcher: Any
) -> None:
    kube_api.create(arev("a"))
    watcher = await start_watcher(store)
    await wait_for(lambda: names(store) == ["a"])
    await kube_api.until_watches(1)
    generation = store.generation
    kube_api.compact(expire_watches=True)  # ERROR event with a 410 Status on the stream
    await wait_for(lambda: watcher.relists == 1, what="relist")
    assert names(store) == ["a"] and store.generation == generation  # nothing re-applied
    await kube_api.until_watches(1)
    kube_api.delete("arev", "agents", "a")
    await wait_for(lambda: names(store) == [], what="delete after relist")


async def test_api_down_keeps_enforcing_then_catches_up(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    kube_api.create(arev("a"))
    watcher = await start_watcher(store)
    await wait_for(lambda: names(store) == ["a"])
    await kube_api.until_watches(1)
    kube_api.down()
    await wait_for(lambda: not watcher.connected and watcher.last_error, what="disconnected")
    await asyncio.sleep(0.5)  # several failed attempts
    assert names(store) == ["a"] and store.complete  # the last known state stays in force
    assert watcher.status()["connected"] is False and "Connect" in (watcher.last_error or "")
    kube_api.delete("arev", "agents", "a")
    kube_api.create(arev("b"))
    kube_api.up()
    await wait_for(lambda: names(store) == ["b"], what="changes made while down")
    assert watcher.connected and watcher.last_error is None
    assert watcher.relists == 0  # the history still had them: resumed, no relist


async def test_api_unreachable_at_start(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    kube_api.create(arev("a"))
    kube_api.down()
    store.load_persisted()
    watcher = await start_watcher(store)
    await wait_for(lambda: watcher.last_error, what="an error")
    assert not store.complete  # never claims to be synced
    kube_api.up()
    await wait_for(lambda: store.complete and names(store) == ["a"], what="first sync")


async def test_bookmarks_move_the_resource_version(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    watcher = await start_watcher(store)
    await wait_for(lambda: store.complete)
    await kube_api.until_watches(1)
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "elsewhere"}})
    assert kube_api.bookmark() == 1
    await wait_for(
        lambda: watcher.resource_version == str(kube_api.resource_version), what="bookmark"
    )


async def test_one_event_and_one_status_write_across_pods_from_the_pod_that_wrote_it(
    kube_api: KubeAPIServer, tmp_path: Path, start_watcher: Any
) -> None:
    """Every pod enforces; one writes the status and that one posts the Event (issue 19, 9:
    not one Event per pod). With no delay (FAST) the pods race: 409s, no extra write."""
    stores = {pod: make_store(tmp_path / pod) for pod in ("pod-a", "pod-b")}
    watchers = {pod: await start_watcher(s, pod_name=pod) for pod, s in stores.items()}
    for s in stores.values():
        await wait_for(lambda s=s: s.complete)
    await kube_api.until_watches(2)
    obj = kube_api.create(arev("a"))
    for s in stores.values():
        await wait_for(lambda s=s: names(s) == ["a"])
    status = await wait_for(
        lambda: kube_api.get("arev", "agents", "a").get("status"), what="status"
    )
    assert status["firstEnforcedBy"] in ("pod-a", "pod-b")
    assert parse_rfc3339(status["firstEnforcedAt"])
    [event] = await wait_for(lambda: kube_api.events("agents"), what="the event")
    await asyncio.sleep(0.3)
    assert len(kube_api.events("agents")) == 1
    assert event["reportingInstance"] == status["firstEnforcedBy"]
    assert event["reason"] == EVENT_REASON and event["type"] == "Normal"
    assert event["involvedObject"] == {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentRevocation",
        "name": "a",
        "namespace": "agents",
        "uid": obj["metadata"]["uid"],
    }
    assert f"enforced by pod {event['reportingInstance']} from 20" in event["message"]
    assert "s after the object was created" in event["message"]
    modified = [
        ev for _, ev, o in kube_api.history() if ev == "MODIFIED" and o["metadata"]["name"] == "a"
    ]
    assert len(modified) == 1  # one status write for the object, not one per pod
    assert all(w.reports_failed == 0 for w in watchers.values())
    # A change of the object is no new enforcement: no new event.
    kube_api.patch("arev", "agents", "a", {"spec": {"reason": "changed"}})
    for s in stores.values():
        await wait_for(lambda s=s: s.entries()[0].reason == "changed")
    await asyncio.sleep(0.2)
    assert len(kube_api.events("agents")) == 1


async def test_report_failures_never_affect_enforcement(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    kube_api.react("post /api/v1/namespaces/agents/events", 500)
    watcher = await start_watcher(store)
    await wait_for(lambda: store.complete)
    await kube_api.until_watches(1)
    kube_api.create(arev("a"))
    await wait_for(lambda: names(store) == ["a"])
    await wait_for(lambda: watcher.reports_failed == 1, what="a failed report")
    assert kube_api.events() == []
    # The status is still written: the event and the status are independent.
    await wait_for(lambda: kube_api.get("arev", "agents", "a").get("status"), what="status")
    assert names(store) == ["a"] and watcher.connected


async def test_expired_or_known_revocations_are_not_reported(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    old = kube_api.create(arev("old", expiresAt=from_now(-DAY)))
    obj = kube_api.create(arev("done"))
    kube_api.patch(
        "arev",
        "agents",
        "done",
        {"status": {"firstEnforcedAt": from_now(-3600), "firstEnforcedBy": "pod-z"}},
        subresource="status",
    )
    await start_watcher(store)
    await wait_for(lambda: names(store) == ["done", "old"])
    await wait_for(lambda: len(kube_api.events()) == 1, what="one event")
    await asyncio.sleep(0.3)
    # "done" is enforced here too, but another pod reported it first: no Event from this
    # one (a restarted fleet does not post one Event per pod per revocation in force).
    [event] = kube_api.events()
    assert obj["metadata"]["uid"] != event["involvedObject"]["uid"]
    # The expired one is not enforced; it is reported as expired instead (below).
    assert event["involvedObject"]["uid"] == old["metadata"]["uid"]
    assert event["reason"] == EXPIRED_EVENT_REASON
    assert kube_api.get("arev", "agents", "done")["status"]["firstEnforcedBy"] == "pod-z"
    assert "firstEnforcedAt" not in kube_api.get("arev", "agents", "old")["status"]


async def test_bounded_run_with_iterations(
    kube_api: KubeAPIServer, store: RevocationStore, api_client: ApiClient
) -> None:
    kube_api.create(arev("a"))
    watcher = await asyncio.wait_for(
        watch_revocations(
            store,
            "agents",
            api_client=api_client,
            pod_name="pod-a",
            _iterations=1,
            **{**FAST, "watch_timeout": (1.0, 1.0)},
        ),
        timeout=10,
    )
    assert names(store) == ["a"] and store.complete
    assert watcher.lists == 1 and watcher.resource_version
    assert len(kube_api.events()) == 1  # reports are flushed before returning


async def test_kubectl_apply_is_seen_by_the_watcher(
    kube_api: KubeAPIServer, kubectl: Kubectl, store: RevocationStore, start_watcher: Any
) -> None:
    await start_watcher(store)
    await wait_for(lambda: store.complete)
    await kube_api.until_watches(1)
    await asyncio.to_thread(kubectl, "apply", "-f", str(EXAMPLE))
    rev = await wait_for(lambda: store.entries() and store.entries()[0], what="applied revocation")
    assert (rev.name, rev.agent, rev.reason) == (
        "billing-agent-inc-4412",
        "billing-agent",
        "Anomalous refund volume (INC-4412)",
    )
    # The example has no end: it revokes whenever it is applied, today or in fifty years.
    assert rev.expires_at is None
    assert store.table().find("agents", "billing-agent", time.time() + 50 * YEAR) == rev
    await wait_for(lambda: kube_api.events(), what="event")
    out = (await asyncio.to_thread(kubectl, "get", "events")).stdout
    assert EVENT_REASON in out and "enforced by pod pod-a" in out
    await asyncio.to_thread(kubectl, "delete", "-f", str(EXAMPLE))
    await wait_for(lambda: names(store) == [], what="deleted")


# -- expiry reported -----------------------------------------------------------------------------


def revocation_yaml(name: str, expires_at: str) -> str:
    return (
        "apiVersion: mandate.dev/v1alpha1\nkind: AgentRevocation\n"
        f"metadata: {{name: {name}, namespace: agents}}\n"
        f"spec: {{agent: billing-agent, reason: 'reason {name}', expiresAt: '{expires_at}'}}\n"
    )


async def test_a_revocation_already_expired_when_applied_shows_as_expired_with_a_warning(
    kube_api: KubeAPIServer,
    kubectl: Kubectl,
    store: RevocationStore,
    start_watcher: Any,
    tmp_path: Path,
) -> None:
    watcher = await start_watcher(store)
    await wait_for(lambda: store.complete)
    await kube_api.until_watches(1)
    path = tmp_path / "stale.yaml"
    path.write_text(revocation_yaml("stale", from_now(-DAY)))
    await asyncio.to_thread(kubectl, "apply", "-f", str(path))
    await wait_for(lambda: names(store) == ["stale"], what="seen")
    # It revokes nothing ...
    assert store.table().find("agents", "billing-agent", time.time()) is None
    # ... and the operator is told, in `kubectl get` and in the events.
    status = await wait_for(
        lambda: kube_api.get("arev", "agents", "stale").get("status"), what="status"
    )
    assert status["state"] == "Expired" and "firstEnforcedAt" not in status
    [condition] = status["conditions"]
    assert condition["type"] == "Expired" and condition["status"] == "True"
    assert condition["reason"] == "ExpiredOnArrival" and condition["observedGeneration"] == 1
    assert "revokes nothing" in condition["message"]
    table = (await asyncio.to_thread(kubectl, "get", "arev")).stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "AGENT", "REASON", "STATE"]
    assert "Expired" in table[1].split()
    event = await wait_for(lambda: kube_api.events() and kube_api.events()[0], what="event")
    assert (event["type"], event["reason"]) == ("Warning", EXPIRED_EVENT_REASON)
    assert "pod pod-a" in event["message"] and "revokes nothing" in event["message"]
    out = (await asyncio.to_thread(kubectl, "get", "events")).stdout
    assert "Warning" in out and EXPIRED_EVENT_REASON in out
    # Seen again (a relist; another pod, or this one restarted): no second status write,
    # no second warning.
    await asyncio.sleep(0.3)
    version = kube_api.get("arev", "agents", "stale")["metadata"]["resourceVersion"]
    kube_api.compact(expire_watches=True)
    await wait_for(lambda: watcher.relists == 1, what="relisted")
    other = make_store(tmp_path / "pod-b")
    await start_watcher(other, pod_name="pod-b")
    await wait_for(lambda: names(other) == ["stale"], what="seen by pod-b")
    await asyncio.sleep(0.3)
    assert len(kube_api.events()) == 1
    assert kube_api.get("arev", "agents", "stale")["metadata"]["resourceVersion"] == version


async def test_of_many_pods_one_marks_an_expired_revocation_and_warns(
    kube_api: KubeAPIServer, start_watcher: Any, tmp_path: Path
) -> None:
    kube_api.create(arev("stale", expiresAt=from_now(-60)))
    stores = [make_store(tmp_path / f"pod-{i}") for i in range(4)]
    for i, s in enumerate(stores):
        await start_watcher(s, pod_name=f"pod-{i}")
    for s in stores:
        await wait_for(lambda s=s: names(s) == ["stale"], what="seen by every pod")
    await wait_for(lambda: kube_api.get("arev", "agents", "stale").get("status"), what="status")
    await asyncio.sleep(0.5)
    assert [e["reason"] for e in kube_api.events()] == [EXPIRED_EVENT_REASON]
    assert kube_api.get("arev", "agents", "stale")["status"]["state"] == "Expired"


async def test_a_revocation_that_ends_while_enforced_turns_expired_without_a_warning(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    await start_watcher(store)
    await wait_for(lambda: store.complete)
    kube_api.create(arev("brief", expiresAt=rfc3339(time.time() + 1.5, millis=True)))
    status = await wait_for(
        lambda: kube_api.get("arev", "agents", "brief").get("status"), what="enforced"
    )
    assert status["state"] == "Enforced" and status["firstEnforcedBy"] == "pod-a"
    assert [c["type"] for c in status["conditions"]] == ["Enforced"]
    assert store.table().find("agents", "billing-agent", time.time()) is not None
    status = await wait_for(
        lambda: (
            kube_api.get("arev", "agents", "brief")["status"].get("state") == "Expired"
            and kube_api.get("arev", "agents", "brief")["status"]
        ),
        what="expired",
    )
    assert status["firstEnforcedBy"] == "pod-a"  # kept
    # No longer enforced (issue 19, 7: Enforced stayed True, so `kubectl wait
    # --for=condition=Enforced` believed an ended revocation).
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Enforced": ("False", "Expired"),
        "Expired": ("True", "Ended"),
    }
    assert [e["reason"] for e in kube_api.events()] == [EVENT_REASON]  # no warning


async def test_an_expired_revocation_given_a_later_end_is_enforced_again_and_says_so(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    kube_api.create(arev("again", expiresAt=from_now(-60)))
    await start_watcher(store)
    await wait_for(
        lambda: kube_api.get("arev", "agents", "again").get("status", {}).get("state") == "Expired",
        what="expired on arrival",
    )
    # The operator moves the end ahead: the agent is revoked again, and kubectl says so.
    kube_api.patch("arev", "agents", "again", {"spec": {"expiresAt": from_now(2.0)}})
    status = await wait_for(
        lambda: (
            kube_api.get("arev", "agents", "again")["status"].get("state") == "Enforced"
            and kube_api.get("arev", "agents", "again")["status"]
        ),
        what="in force again",
    )
    assert [c["type"] for c in status["conditions"]] == ["Enforced"]
    assert status["conditions"][0]["reason"] == "InForceAgain"
    assert status["conditions"][0]["observedGeneration"] == 2
    assert store.table().find("agents", "billing-agent", time.time()) is not None
    # And when that end comes, it is Expired again (Ended), without a second warning.
    status = await wait_for(
        lambda: (
            kube_api.get("arev", "agents", "again")["status"].get("state") == "Expired"
            and kube_api.get("arev", "agents", "again")["status"]
        ),
        what="expired again",
    )
    assert {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]} == {
        "Enforced": ("False", "Expired"),
        "Expired": ("True", "Ended"),
    }
    assert [e["reason"] for e in kube_api.events()] == [EXPIRED_EVENT_REASON]


# -- RBAC refusals and consumer failures ---------------------------------------------------------


async def test_rbac_forbidden_at_start_never_claims_a_sync(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    """A 403 on the list is not an empty list: the table is never marked complete, the
    persisted revocations stay in force, and the watcher says why it is not synced."""
    kube_api.create(arev("a"))
    forbidden = ListWatchErrors(kube_api, status=403)
    forbidden.on()
    watcher = await start_watcher(store)
    await wait_for(lambda: forbidden.failed >= 3, what="three refused lists")
    assert not store.complete and names(store) == []
    status = watcher.status()
    assert status["connected"] is False and status["lists"] == 0
    assert (status["last_error"] or "").startswith("HTTP 403")
    # Issue 19: a refusal is a configuration error, said to every reader of the table: the
    # permission that is missing, and no fallback to "complete" (the supervisor's timeout)
    assert "needs get, list and watch on agentrevocations.mandate.dev" in store.refused
    store.mark_complete(fallback=True)
    table = store.table()
    assert not store.complete and not table.complete and table.refused == store.refused
    forbidden.off()
    await wait_for(lambda: store.complete and names(store) == ["a"], what="synced once allowed")
    assert store.refused == "" and store.table().complete


async def test_rbac_forbidden_keeps_every_revocation(
    kube_api: KubeAPIServer, store: RevocationStore, changes: list[Any], start_watcher: Any
) -> None:
    """RBAC taken away while the watcher is away, with the watch position compacted (so the
    next request is a list): every revocation stays in force, nothing is removed, and the
    table is refused (issue 19: every Check denied, saying which permission is missing)
    until the watcher may list again."""
    for n in ("a", "b"):
        kube_api.create(arev(n))
    watcher = await start_watcher(store)
    await wait_for(lambda: names(store) == ["a", "b"] and watcher.connected)
    await kube_api.until_watches(1)
    before = len(changes)
    kube_api.down()
    await wait_for(lambda: not watcher.connected, what="disconnected")
    kube_api.delete("arev", "agents", "a")
    kube_api.compact()  # the resumed watch gets 410 Gone; the relist is then refused
    forbidden = ListWatchErrors(kube_api, status=403, requests="list")
    forbidden.on()
    kube_api.up()
    await wait_for(lambda: forbidden.failed >= 3, what="three refused lists")
    assert names(store) == ["a", "b"] and not store.complete
    assert all(not added and not removed for added, removed, *_ in changes[before:])
    assert store.table().find("agents", "billing-agent", time.time()) is not None
    assert "HTTP 403" in store.refused and store.table().refused == store.refused
    status = watcher.status()
    assert status["connected"] is False and "HTTP 403" in (status["last_error"] or "")
    assert status["refused"] is not None
    forbidden.off()
    await wait_for(lambda: names(store) == ["b"] and watcher.connected, what="relisted")
    assert watcher.relists == 1 and store.complete and store.refused == ""


async def test_a_missing_crd_refuses_the_table(
    kube_api: KubeAPIServer, store: RevocationStore, start_watcher: Any
) -> None:
    """No AgentRevocation resource (404 on the list: the CRD is not installed) is not "no
    revocations": refused, naming the CRD to install (issue 19)."""
    missing = ListWatchErrors(kube_api, status=404)
    missing.on()
    await start_watcher(store)
    await wait_for(lambda: missing.failed >= 2, what="two lists answered 404")
    assert not store.complete
    assert "install the CRD (deploy/crds/agentrevocation.yaml)" in store.refused
    missing.off()
    await wait_for(lambda: store.complete, what="synced once served")


async def test_a_store_failure_is_retried_not_skipped(
    kube_api: KubeAPIServer,
    store: RevocationStore,
    start_watcher: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write that fails is thrown back into the reflector: it backs off and brings the
    same event again, so the revocation is enforced once the store takes it."""
    watcher = await start_watcher(store)
    await wait_for(lambda: store.complete)
    await kube_api.until_watches(1)
    upsert = store.upsert
    failures: list[str] = []

    def failing_once(rev: Any, **kwargs: Any) -> bool:
        if not failures:
            failures.append(rev.key)
            raise RuntimeError("the table is full")
        return upsert(rev, **kwargs)

    monkeypatch.setattr(store, "upsert", failing_once)
    kube_api.create(arev("a"))
    await wait_for(lambda: names(store) == ["a"], what="enforced after the failure")
    assert failures == [key("a")]
    assert watcher.lists == 1 and watcher.relists == 0  # resumed from before the event
    await wait_for(lambda: watcher.connected and watcher.last_error is None, what="healthy")
