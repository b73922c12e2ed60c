"""The AgentElevation watcher against the Kubernetes API emulation over real HTTP: list,
watch, 410 Gone, invalid objects, the status it writes from the sink's answer (and how
several sidecars agree on one), Events, and the RBAC its requests need."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from kubernetes_asyncio.client import ApiClient

from sidecar.core.agentstate import Approval
from sidecar.core.revocation import make_key
from sidecar.core.timefmt import parse_rfc3339
from sidecar.kube import (
    ELEVATION_EVENT_REASON,
    ELEVATION_EXPIRED_EVENT_REASON,
    watch_elevations,
)
from tests.kubeapi.faults import ListWatchErrors
from tests.kubeapi.fixtures import Kubectl
from tests.kubeapi.server import KubeAPIServer, merge_patch

from .conftest import FAST, FakeSink, create_unchecked, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "elevation.yaml"


def aelev(name: str, agent: str = "billing-agent", **spec: Any) -> dict[str, Any]:
    body = {"agent": agent, "elevation": "refund", "approver": "alice", **spec}
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentElevation",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {k: v for k, v in body.items() if v is not None},
    }


def key(name: str) -> str:
    return make_key("kubernetes", "agents", name)


def status(api: KubeAPIServer, name: str) -> dict[str, Any]:
    return dict(api.get("aelev", "agents", name).get("status") or {})


def status_writes(api: KubeAPIServer, name: str) -> int:
    return sum(
        1
        for _, ev, o in api.history("agentelevations")
        if ev == "MODIFIED" and o["metadata"]["name"] == name
    )


def force_patch(api: KubeAPIServer, name: str, patch: dict[str, Any]) -> None:
    """Change an object's spec as a cluster whose CRD lacks the immutability rule would let
    a client (the watcher must still follow such a change)."""
    api.cluster.update(api.rtype("aelev"), "agents", name, lambda old: merge_patch(old, patch))


def watch_requests(api: KubeAPIServer) -> list[dict[str, str]]:
    return [
        dict(r.params)
        for r in api.requests
        if r.method == "GET" and r.params.get("watch") and "agentelevations" in str(r.url)
    ]


async def test_list_then_watch_upserts_and_writes_the_status(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    obj = kube_api.create(aelev("a", duration="5m", reason="INC-1", requestId="elev-1"))
    listed_at = str(kube_api.resource_version)
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: status(kube_api, "a").get("state"), what="status")
    # The list replaced the sink's set, then asked for the new object's answer.
    assert sink.calls[:2] == [("replace", [key("a")]), ("upsert", key("a"))]
    created = parse_rfc3339(obj["metadata"]["creationTimestamp"])
    assert created is not None
    assert sink.approvals[key("a")] == Approval(
        key=key("a"),
        agent="billing-agent",
        namespace="agents",
        elevation="refund",
        approver="alice",
        approved_at=created,
        request_id="elev-1",
        duration=300.0,
        reason="INC-1",
        source="kubernetes",
        name="a",
        uid=obj["metadata"]["uid"],
    )
    written = status(kube_api, "a")
    assert {k: v for k, v in written.items() if k != "conditions"} == {
        "state": "Granted",
        "message": "grant g-a granted",
        "grantId": "g-a",
        "expiresAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created + 300)),
        "observedGeneration": 1,
    }
    # What `kubectl wait --for=condition=Ready` reads.
    [ready] = written["conditions"]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", "Granted")
    assert ready["observedGeneration"] == 1 and ready["message"] == "grant g-a granted"
    await kube_api.until_watches(1)
    (params,) = watch_requests(kube_api)
    assert params["resourceVersion"] == listed_at
    # Its own status write comes back as MODIFIED: no second question to the sink, no
    # second write.
    await asyncio.sleep(0.3)
    assert sink.count("upsert") == 1 and status_writes(kube_api, "a") == 1
    assert watcher.status() == {
        "namespace": "agents",
        "connected": True,
        "last_error": None,
        "lists": 1,
        "relists": 0,
        "last_sync_at": watcher.last_sync_at,
        "resource_version": watcher.resource_version,
        "reports_failed": 0,
        "refused": None,
        "approvals": 1,
        "invalid": 0,
        "status_writes": 1,
    }


async def test_create_modify_delete_followed(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    await start_elevation_watcher(sink)
    await wait_for(lambda: sink.calls == [("replace", [])], what="first sync")
    await kube_api.until_watches(1)
    kube_api.create(aelev("a"))
    await wait_for(lambda: status(kube_api, "a").get("state") == "Granted", what="granted")
    assert sink.approvals[key("a")].duration is None
    # A change that is no change of the approval (labels, the status): the sink is not
    # asked again.
    kube_api.patch("aelev", "agents", "a", {"metadata": {"labels": {"ticket": "inc-1"}}})
    await wait_for(lambda: kube_api.get("aelev", "agents", "a")["metadata"].get("labels"))
    await asyncio.sleep(0.2)
    assert sink.count("upsert", key("a")) == 1
    kube_api.delete("aelev", "agents", "a")
    await wait_for(lambda: key("a") not in sink.approvals, what="removed")
    assert sink.calls[-1] == ("remove", key("a"))


async def test_a_changed_spec_is_a_new_approval(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    """The CRD makes spec immutable; a cluster with an older CRD lets it change, and then
    the sink is asked about the changed approval and the status follows the generation."""
    kube_api.create(aelev("a"))
    await start_elevation_watcher(sink)
    await wait_for(lambda: status(kube_api, "a").get("state") == "Granted", what="granted")
    await kube_api.until_watches(1)
    force_patch(kube_api, "a", {"spec": {"duration": "2m"}})
    await wait_for(
        lambda: status(kube_api, "a").get("observedGeneration") == 2, what="generation 2"
    )
    assert sink.approvals[key("a")].duration == 120.0
    assert sink.count("upsert", key("a")) == 2


async def test_invalid_object_gets_status_invalid_and_is_no_approval(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    """'0s' is no duration (the CRD refuses it now; an object stored before it did stays):
    Invalid, naming the field."""
    create_unchecked(kube_api, aelev("zero", duration="0s"))
    kube_api.create(aelev("fine"))
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: status(kube_api, "zero").get("state"), what="status")
    shown = {k: v for k, v in status(kube_api, "zero").items() if k != "conditions"}
    assert shown == {
        "state": "Invalid",
        "message": "spec.duration: duration '0s' must be greater than zero",
        "observedGeneration": 1,
    }
    assert sink.calls[0] == ("replace", [key("fine")])
    assert sink.count("upsert", key("zero")) == 0 and key("zero") not in sink.approvals
    assert watcher.status()["invalid"] == 1
    # Replaced by a good one (the spec is immutable: delete, create).
    await kube_api.until_watches(1)
    kube_api.delete("aelev", "agents", "zero")
    kube_api.create(aelev("zero", duration="1m"))
    await wait_for(lambda: status(kube_api, "zero").get("state") == "Granted", what="fixed")
    assert key("zero") in sink.approvals and watcher.status()["invalid"] == 0
    # Broken by a change (where the CRD lets spec change): the grant is withdrawn.
    force_patch(kube_api, "zero", {"spec": {"duration": "0m"}})
    await wait_for(lambda: status(kube_api, "zero").get("state") == "Invalid", what="invalid")
    assert sink.calls[-1] == ("remove", key("zero")) and key("zero") not in sink.approvals
    assert "grantId" not in status(kube_api, "zero")  # fields of the old answer removed
    assert status(kube_api, "zero")["observedGeneration"] == 2


async def test_410_gone_relists_and_replaces(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    for n in ("a", "b", "c"):
        kube_api.create(aelev(n))
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: all(status(kube_api, n).get("state") for n in "abc"), what="sync")
    await kube_api.until_watches(1)
    before = len(sink.calls)
    kube_api.down()
    await wait_for(lambda: not watcher.connected, what="disconnected")
    kube_api.delete("aelev", "agents", "a")
    kube_api.delete("aelev", "agents", "b")
    kube_api.create(aelev("b", duration="3m"))  # another object of the same name
    kube_api.create(aelev("d"))
    kube_api.compact()
    kube_api.up()
    await wait_for(lambda: watcher.relists == 1 and watcher.connected, what="relist after 410")
    # One replace with the whole set (a withdrawn by it); then answers only for what is new
    # or changed (b, d), not for c.
    after = sink.calls[before:]
    assert after[0] == ("replace", [key("b"), key("c"), key("d")])
    assert sorted(after[1:3]) == [("upsert", key("b")), ("upsert", key("d"))]
    assert ("remove", key("a")) not in after  # replace withdrew it
    assert sink.approvals[key("b")].duration == 180.0
    await wait_for(lambda: status(kube_api, "d").get("state") == "Granted", what="d status")
    await kube_api.until_watches(1)
    kube_api.create(aelev("e"))
    await wait_for(lambda: key("e") in sink.approvals, what="watching again")


async def test_410_on_an_open_stream_relists(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    kube_api.create(aelev("a"))
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: status(kube_api, "a").get("state"))
    await kube_api.until_watches(1)
    kube_api.compact(expire_watches=True)
    await wait_for(lambda: watcher.relists == 1, what="relist")
    assert sink.calls[-1] == ("replace", [key("a")])  # unchanged: not asked again
    assert sink.count("upsert") == 1
    await kube_api.until_watches(1)
    kube_api.delete("aelev", "agents", "a")
    await wait_for(lambda: key("a") not in sink.approvals, what="delete after relist")


async def test_api_down_keeps_the_approvals(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    kube_api.create(aelev("a"))
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: key("a") in sink.approvals)
    await kube_api.until_watches(1)
    kube_api.down()
    await wait_for(lambda: not watcher.connected and watcher.last_error, what="disconnected")
    await asyncio.sleep(0.4)
    assert key("a") in sink.approvals and sink.count("remove") == 0
    kube_api.delete("aelev", "agents", "a")
    kube_api.up()
    await wait_for(lambda: key("a") not in sink.approvals, what="deleted while down")
    assert watcher.relists == 0 and watcher.connected


async def test_rbac_forbidden_keeps_the_approvals(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    """A relist refused with 403 is not an empty list: no approval is withdrawn."""
    kube_api.create(aelev("a"))
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: key("a") in sink.approvals and watcher.connected)
    await kube_api.until_watches(1)
    kube_api.down()
    await wait_for(lambda: not watcher.connected, what="disconnected")
    kube_api.delete("aelev", "agents", "a")
    kube_api.compact()  # the resumed watch gets 410 Gone; the relist is then refused
    forbidden = ListWatchErrors(kube_api, status=403, plural="agentelevations", requests="list")
    forbidden.on()
    calls = len(sink.calls)
    kube_api.up()
    await wait_for(lambda: forbidden.failed >= 3, what="three refused lists")
    assert key("a") in sink.approvals and len(sink.calls) == calls
    status = watcher.status()
    assert status["connected"] is False and "HTTP 403" in (status["last_error"] or "")
    forbidden.off()
    await wait_for(lambda: key("a") not in sink.approvals, what="withdrawn once listed")
    assert sink.calls[calls:] == [("replace", [])] and watcher.relists == 1


async def test_several_sidecars_agree_on_the_best_answer(
    kube_api: KubeAPIServer, start_elevation_watcher: Any
) -> None:
    """Only the pod holding the request can grant it; the others answer Invalid ("no
    such request") and one has no opinion at all. The status ends Granted, whatever the
    order, after a bounded number of writes."""
    holder, others, silent = FakeSink(), FakeSink(), FakeSink()
    others.answer = lambda a: ("Invalid", f"no elevation request {a.request_id!r}", "", None)
    silent.answer = lambda a: ("", "", "", None)
    for name, s in (("pod-b", others), ("pod-c", silent)):
        await start_elevation_watcher(s, pod_name=name)
    await kube_api.until_watches(2)
    kube_api.create(aelev("a", requestId="elev-1"))
    await wait_for(lambda: status(kube_api, "a").get("state") == "Invalid", what="invalid")
    assert status(kube_api, "a")["message"] == "no elevation request 'elev-1'"
    await start_elevation_watcher(holder, pod_name="pod-a")
    await wait_for(lambda: status(kube_api, "a").get("state") == "Granted", what="granted")
    await asyncio.sleep(0.5)
    assert status(kube_api, "a")["grantId"] == "g-a"
    assert status_writes(kube_api, "a") == 2  # Invalid, then Granted: no back and forth
    # The one that holds the grant says so in an Event; the others do not.
    events = kube_api.events("agents")
    assert [e["reportingInstance"] for e in events] == ["pod-a"]
    assert events[0]["reason"] == ELEVATION_EVENT_REASON
    assert events[0]["involvedObject"]["kind"] == "AgentElevation"
    assert "refund granted to billing-agent by pod pod-a (grant g-a until" in events[0]["message"]


async def test_the_status_says_expired_when_the_grant_ends(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    sink.answer = lambda a: ("Granted", "grant g-a", "g-a", time.time() + 1.0)
    kube_api.create(aelev("a"))
    await start_elevation_watcher(sink)
    await wait_for(lambda: status(kube_api, "a").get("state") == "Granted", what="granted")
    expires = status(kube_api, "a")["expiresAt"]
    await wait_for(
        lambda: status(kube_api, "a").get("state") == "Expired", timeout=5, what="expired"
    )
    written = status(kube_api, "a")
    assert {k: v for k, v in written.items() if k != "conditions"} == {
        "state": "Expired",
        "message": f"the grant ended at {expires}",
        "grantId": "g-a",
        "expiresAt": expires,
        "observedGeneration": 1,
    }
    assert {c["type"]: (c["status"], c["reason"]) for c in written["conditions"]} == {
        "Ready": ("False", "Expired"),
        "Expired": ("True", "Expired"),
    }
    assert sink.count("upsert") == 1


async def test_an_approval_after_the_request_lapsed_is_expired_with_one_warning(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    late = "request elev-1 expired at 2026-01-01T00:00:00Z, before this approval: nothing"
    sink.answer = lambda a: ("Expired", late, "", None)
    other = FakeSink()  # a pod that never held the request
    other.answer = lambda a: ("Invalid", "no elevation request 'elev-1'", "", None)
    kube_api.create(aelev("a", requestId="elev-1"))
    await start_elevation_watcher(other, pod_name="pod-b")
    await start_elevation_watcher(sink)
    await wait_for(lambda: status(kube_api, "a").get("state") == "Expired", what="expired")
    await asyncio.sleep(0.3)
    written = status(kube_api, "a")
    assert (written["state"], written["message"], written["observedGeneration"]) == (
        "Expired",
        late,
        1,
    )
    assert not written.get("grantId") and not written.get("expiresAt")
    events = kube_api.events("agents")
    assert [(e["type"], e["reason"], e["reportingInstance"]) for e in events] == [
        ("Warning", ELEVATION_EXPIRED_EVENT_REASON, "pod-a")
    ]
    assert events[0]["message"] == late


async def test_report_false_writes_nothing(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    kube_api.create(aelev("a"))
    create_unchecked(kube_api, aelev("bad", duration="0s"))
    watcher = await start_elevation_watcher(sink, report=False)
    await wait_for(lambda: key("a") in sink.approvals)
    await kube_api.until_watches(1)
    await asyncio.sleep(0.3)
    assert status(kube_api, "a") == {} and status(kube_api, "bad") == {}
    assert kube_api.events() == [] and watcher.status_writes == 0


async def test_a_failing_sink_does_not_stop_the_watch(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    sink.fail = True
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: sink.calls == [("replace", [])])
    await kube_api.until_watches(1)
    kube_api.create(aelev("a"))
    await wait_for(lambda: sink.count("upsert", key("a")) == 1, what="upsert tried")
    sink.fail = False
    kube_api.create(aelev("b"))
    await wait_for(lambda: status(kube_api, "b").get("state") == "Granted", what="b")
    assert status(kube_api, "a") == {}  # no answer, no status
    assert watcher.connected and watcher.relists == 0 and len(watch_requests(kube_api)) == 1


async def test_a_malformed_answer_is_ignored(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    good = sink.answer
    sink.answer = lambda a: ("Granted", "no grant id, no end")  # type: ignore[assignment,return-value]
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: sink.calls == [("replace", [])])
    await kube_api.until_watches(1)
    kube_api.create(aelev("a"))
    await wait_for(lambda: sink.count("upsert", key("a")) == 1, what="upsert")
    sink.answer = good
    kube_api.create(aelev("b"))
    await wait_for(lambda: status(kube_api, "b").get("state") == "Granted", what="b")
    assert status(kube_api, "a") == {} and len(watch_requests(kube_api)) == 1
    assert watcher.connected and watcher.last_error is None


async def test_status_write_failures_are_counted_not_fatal(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    kube_api.react("patch", 500)
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: sink.calls == [("replace", [])])
    await kube_api.until_watches(1)
    kube_api.create(aelev("a"))
    await wait_for(lambda: watcher.reports_failed >= 1, what="a failed write")
    assert key("a") in sink.approvals and watcher.connected


async def test_bounded_run_with_iterations(
    kube_api: KubeAPIServer, sink: FakeSink, api_client: ApiClient
) -> None:
    kube_api.create(aelev("a"))
    options = {**FAST, "watch_timeout": (1.0, 1.0), "pod_name": "pod-a"}
    run = watch_elevations(sink, "agents", api_client=api_client, _iterations=1, **options)
    watcher = await asyncio.wait_for(run, timeout=10)
    assert key("a") in sink.approvals and watcher.lists == 1 and watcher.resource_version
    # Reports are flushed before returning.
    assert status(kube_api, "a")["state"] == "Granted" and len(kube_api.events()) == 1


async def test_kubectl_apply_approves_and_delete_withdraws(
    kube_api: KubeAPIServer, kubectl: Kubectl, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    await start_elevation_watcher(sink)
    await wait_for(lambda: sink.calls == [("replace", [])])
    await kube_api.until_watches(1)
    await asyncio.to_thread(kubectl, "apply", "-f", str(EXAMPLE))
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    approval = await wait_for(lambda: sink.approvals.get(key(name)), what="approval")
    assert (approval.agent, approval.elevation, approval.request_id, approval.duration) == (
        "billing-agent",
        "refund",
        "elev-3f9a1c2b7d10",
        600.0,
    )
    assert approval.approver == "alice@finance.example.com"
    await wait_for(lambda: status(kube_api, name).get("state") == "Granted", what="status")
    table = (await asyncio.to_thread(kubectl, "get", "aelev")).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == [
        "NAME",
        "AGENT",
        "ELEVATION",
        "REQUEST",
        "STATE",
        "EXPIRES",
        "AGE",
    ]
    assert row.split()[:5] == [name, "billing-agent", "refund", "elev-3f9a1c2b7d10", "Granted"]
    await wait_for(lambda: kube_api.events(), what="event")
    out = (await asyncio.to_thread(kubectl, "describe", "aelev", name)).stdout
    assert ELEVATION_EVENT_REASON in out
    await asyncio.to_thread(kubectl, "delete", "-f", str(EXAMPLE))
    await wait_for(lambda: key(name) not in sink.approvals, what="withdrawn")


# -- RBAC: the requests it makes are what deploy/ grants -----------------------------------------


def _granted_to_the_sidecar() -> set[tuple[str, str, str]]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "base" / "rbac.yaml").read_text())
    role = next(d for d in docs if d and d["metadata"]["name"] == "mandate-sidecar")
    return {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def _rbac(method: str, path: str, watch: bool) -> tuple[str, str, str]:
    """(group, resource, verb) that an API request needs, as the authorizer sees it."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[:1] == ["namespaces"]:
        rest = rest[2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    verb = {
        "GET": "watch" if watch else ("get" if named else "list"),
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if named else "deletecollection",
    }[method]
    return group, resource, verb


async def test_every_request_is_allowed_by_the_sidecars_role(
    kube_api: KubeAPIServer, sink: FakeSink, start_elevation_watcher: Any
) -> None:
    kube_api.create(aelev("a"))
    create_unchecked(kube_api, aelev("bad", duration="0s"))
    watcher = await start_elevation_watcher(sink)
    await wait_for(lambda: status(kube_api, "a") and status(kube_api, "bad"), what="statuses")
    await wait_for(lambda: kube_api.events(), what="event")
    kube_api.compact(expire_watches=True)
    await wait_for(lambda: watcher.relists == 1, what="relist")
    needed = {
        _rbac(r.method, urlsplit(str(r.url)).path, bool(r.params.get("watch")))
        for r in kube_api.requests
    }
    assert needed == {
        ("mandate.dev", "agentelevations", "list"),
        ("mandate.dev", "agentelevations", "watch"),
        ("mandate.dev", "agentelevations/status", "patch"),
        ("", "events", "create"),
    }
    assert needed <= _granted_to_the_sidecar()
