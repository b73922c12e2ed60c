"""The emulation over plain HTTP: the API server behaviour that watchers depend on."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.clocks import from_now
from tests.kubeapi.server import KubeAPIServer

BASE = "/apis/mandate.dev/v1alpha1"
COLL = f"{BASE}/namespaces/agents/agentrevocations"


def request(
    api: KubeAPIServer,
    method: str,
    path: str,
    body: Any = None,
    ctype: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(api.host, api.port, timeout=5)
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": ctype, **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw else None, resp


def arev(name: str, agent: str = "billing-agent", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mandate.dev/v1alpha1",
        "kind": "AgentRevocation",
        "metadata": {"name": name},
        "spec": {"agent": agent, "reason": f"reason {name}", **spec},
    }


class Stream:
    """A watch response read line by line."""

    def __init__(self, api: KubeAPIServer, query: str, timeout: float = 5) -> None:
        self.conn = http.client.HTTPConnection(api.host, api.port, timeout=timeout)
        self.conn.request("GET", f"{COLL}?{query}")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def next(self) -> dict[str, Any] | None:
        line = self.resp.readline()
        return json.loads(line) if line else None

    def events(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            ev = self.next()
            assert ev is not None, f"stream ended after {out}"
            out.append(ev)
        return out

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def stream(kube_api: KubeAPIServer) -> Iterator[Any]:
    opened: list[Stream] = []

    def open_(query: str, timeout: float = 5) -> Stream:
        s = Stream(kube_api, query, timeout)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.mark.parametrize(
    "path",
    [
        "/api",
        "/api/",
        "/api/v1",
        "/api/v1/",
        "/apis",
        "/apis/",
        "/apis/mandate.dev",
        "/apis/mandate.dev/",
        f"{BASE}",
        f"{BASE}/",
    ],
)
def test_discovery_with_and_without_trailing_slash(kube_api: KubeAPIServer, path: str) -> None:
    status, body, _ = request(kube_api, "GET", path)
    assert status == 200
    kind = {
        "/api": "APIVersions",
        "/api/v1": "APIResourceList",
        "/apis": "APIGroupList",
        "/apis/mandate.dev": "APIGroup",
        BASE: "APIResourceList",
    }[path.rstrip("/")]
    assert body["kind"] == kind
    if path.rstrip("/") == BASE:
        names = {r["name"]: r for r in body["resources"]}
        assert names["agentrevocations"]["shortNames"] == ["arev"]
        assert names["agentrevocations"]["namespaced"] is True
        assert names["agentrevocations"]["kind"] == "AgentRevocation"
        assert "agentrevocations/status" in names
    if path.rstrip("/") == "/api/v1":
        assert {"events", "namespaces"} <= {r["name"] for r in body["resources"]}


def test_openapi_v3_publishes_the_crd_schema_and_field_validation(kube_api: KubeAPIServer) -> None:
    _, index, _ = request(kube_api, "GET", "/openapi/v3")
    url = index["paths"]["apis/mandate.dev/v1alpha1"]["serverRelativeURL"]
    _, doc, _ = request(kube_api, "GET", url)
    patch = doc["paths"][f"{BASE}/namespaces/{{namespace}}/agentrevocations/{{name}}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"]["kind"] == "AgentRevocation"
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    schema = doc["components"]["schemas"]["dev.mandate.v1alpha1.AgentRevocation"]
    assert schema["properties"]["spec"]["required"] == ["agent", "reason"]


def test_list_has_kind_and_resource_versions(kube_api: KubeAPIServer) -> None:
    s1, a, _ = request(kube_api, "POST", COLL, arev("a"))
    s2, b, _ = request(kube_api, "POST", COLL, arev("b"))
    assert (s1, s2) == (201, 201)
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    assert a["metadata"]["creationTimestamp"].endswith("Z")
    status, body, _ = request(kube_api, "GET", COLL)
    assert status == 200
    assert (body["kind"], body["apiVersion"]) == ("AgentRevocationList", "mandate.dev/v1alpha1")
    assert body["metadata"]["resourceVersion"] == b["metadata"]["resourceVersion"]
    assert [i["metadata"]["name"] for i in body["items"]] == ["a", "b"]
    # Any write anywhere in the cluster moves the cluster-wide revision.
    request(
        kube_api,
        "POST",
        "/api/v1/namespaces/default/events",
        {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"}},
    )
    _, body2, _ = request(kube_api, "GET", COLL)
    assert int(body2["metadata"]["resourceVersion"]) > int(body["metadata"]["resourceVersion"])


def test_errors_are_status_objects(kube_api: KubeAPIServer) -> None:
    status, body, _ = request(kube_api, "GET", f"{COLL}/missing")
    assert (status, body["kind"], body["reason"]) == (404, "Status", "NotFound")
    assert body["message"] == 'agentrevocations.mandate.dev "missing" not found'
    request(kube_api, "POST", COLL, arev("a"))
    status, body, _ = request(kube_api, "POST", COLL, arev("a"))
    assert (status, body["reason"]) == (409, "AlreadyExists")
    status, body, _ = request(kube_api, "POST", COLL, arev("bad", expiresAt="2026-13-01T00:00:00Z"))
    assert (status, body["reason"]) == (422, "Invalid")
    assert body["details"]["causes"][0]["field"] == "spec.expiresAt"


def test_date_time_is_kube_openapis_rule(kube_api: KubeAPIServer) -> None:
    """The API server's date-time check is looser than RFC 3339: clients see such values."""
    for i, value in enumerate(
        [
            "2026-12-01T00:00:00Z",
            "2026-12-01t00:00:00.5+02:00",
            "2026-02-30T00:00:00Z",
            "2026-12-01T00:00:00+25:00",
        ]
    ):
        status, _, _ = request(kube_api, "POST", COLL, arev(f"ok{i}", expiresAt=value))
        assert status == 201, value
    for value in [
        "2026-12-01",
        "2026-12-01T00:00:00",
        "2026-12-01 00:00:00Z",
        "2026-12-01T24:00:00Z",
    ]:
        status, _, _ = request(kube_api, "POST", COLL, arev("bad", expiresAt=value))
        assert status == 422, value


def test_patch_types(kube_api: KubeAPIServer) -> None:
    _, obj, _ = request(kube_api, "POST", COLL, arev("a"))
    status, body, _ = request(
        kube_api, "PATCH", f"{COLL}/a", {"spec": {"reason": "new"}}, "application/merge-patch+json"
    )
    assert (status, body["spec"]["reason"]) == (200, "new")
    status, body, _ = request(
        kube_api,
        "PATCH",
        f"{COLL}/a",
        [{"op": "replace", "path": "/spec/reason", "value": "jp"}],
        "application/json-patch+json",
    )
    assert (status, body["spec"]["reason"]) == (200, "jp")
    status, _, _ = request(
        kube_api, "PATCH", f"{COLL}/a", {"spec": {"reason": "x"}}, "application/json-patch+json"
    )
    assert status == 400  # a JSON patch must be a list
    status, body, _ = request(
        kube_api,
        "PATCH",
        f"{COLL}/a",
        {"spec": {"reason": "x"}},
        "application/strategic-merge-patch+json",
    )
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")  # not for custom resources
    # The resourceVersion in a patch is a precondition.
    stale = obj["metadata"]["resourceVersion"]
    status, body, _ = request(
        kube_api,
        "PATCH",
        f"{COLL}/a",
        {"metadata": {"resourceVersion": stale}, "spec": {"reason": "y"}},
        "application/merge-patch+json",
    )
    assert (status, body["reason"]) == (409, "Conflict")
    # A patch that changes nothing writes nothing.
    _, before, _ = request(kube_api, "GET", f"{COLL}/a")
    _, after, _ = request(
        kube_api, "PATCH", f"{COLL}/a", {"spec": {"reason": "jp"}}, "application/merge-patch+json"
    )
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_status_subresource(kube_api: KubeAPIServer) -> None:
    request(
        kube_api, "POST", COLL, {**arev("a"), "status": {"firstEnforcedBy": "ignored on create"}}
    )
    _, obj, _ = request(kube_api, "GET", f"{COLL}/a")
    assert "status" not in obj
    status, body, _ = request(
        kube_api,
        "PATCH",
        f"{COLL}/a/status",
        {
            "spec": {"reason": "ignored"},
            "status": {"firstEnforcedAt": from_now(-60), "firstEnforcedBy": "pod-a"},
        },
        "application/merge-patch+json",
    )
    assert status == 200
    assert body["status"]["firstEnforcedBy"] == "pod-a"
    assert body["spec"]["reason"] == "reason a"
    assert body["metadata"]["generation"] == 1  # status writes do not bump the generation
    status, body, _ = request(
        kube_api,
        "PATCH",
        f"{COLL}/a/status",
        {"status": {"firstEnforcedAt": "later"}},
        "application/merge-patch+json",
    )
    assert (status, body["details"]["causes"][0]["field"]) == (422, "status.firstEnforcedAt")


def test_events_are_validated(kube_api: KubeAPIServer) -> None:
    ev = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "e1"},
        "involvedObject": {"kind": "AgentRevocation", "name": "a", "namespace": "other"},
        "reason": "R",
        "type": "Normal",
    }
    status, body, _ = request(kube_api, "POST", "/api/v1/namespaces/agents/events", ev)
    assert (status, body["details"]["causes"][0]["field"]) == (422, "involvedObject.namespace")
    ev["involvedObject"]["namespace"] = "agents"
    status, _, _ = request(kube_api, "POST", "/api/v1/namespaces/agents/events", ev)
    assert status == 201
    assert [e["reason"] for e in kube_api.events("agents")] == ["R"]


@pytest.mark.parametrize("flag", ["true", "True", "1"])
def test_watch_from_resource_version(kube_api: KubeAPIServer, stream: Any, flag: str) -> None:
    request(kube_api, "POST", COLL, arev("before"))
    _, listed, _ = request(kube_api, "GET", COLL)
    rv = listed["metadata"]["resourceVersion"]
    request(kube_api, "POST", COLL, arev("a"))  # after the list, before the watch
    w = stream(f"watch={flag}&resourceVersion={rv}")
    request(
        kube_api,
        "PATCH",
        f"{COLL}/a",
        {"spec": {"reason": "changed"}},
        "application/merge-patch+json",
    )
    request(kube_api, "DELETE", f"{COLL}/a")
    events = w.events(3)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "a"),
    ]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and rvs[0] > int(rv)
    assert events[1]["object"]["spec"]["reason"] == "changed"


def test_watch_without_resource_version_starts_with_the_current_state(
    kube_api: KubeAPIServer, stream: Any
) -> None:
    request(kube_api, "POST", COLL, arev("a"))
    w = stream("watch=true")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in w.events(1)] == [("ADDED", "a")]


def test_watch_namespace_and_field_selector(kube_api: KubeAPIServer, stream: Any) -> None:
    w = stream(
        f"watch=true&resourceVersion={kube_api.resource_version}&fieldSelector=metadata.name%3Db"
    )
    request(kube_api, "POST", COLL, arev("a"))
    request(kube_api, "POST", COLL, arev("b"))
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})
    request(
        kube_api, "POST", "/apis/mandate.dev/v1alpha1/namespaces/other/agentrevocations", arev("b")
    )
    ev = w.next()
    assert ev is not None and ev["object"]["metadata"]["name"] == "b"
    assert ev["object"]["metadata"]["namespace"] == "agents"


def test_compaction_gives_410(kube_api: KubeAPIServer, stream: Any) -> None:
    _, obj, _ = request(kube_api, "POST", COLL, arev("a"))
    old = obj["metadata"]["resourceVersion"]
    request(kube_api, "POST", COLL, arev("b"))
    kube_api.compact()
    w = stream(f"watch=true&resourceVersion={old}")
    ev = w.next()
    assert ev is not None and ev["type"] == "ERROR"
    assert (ev["object"]["kind"], ev["object"]["code"], ev["object"]["reason"]) == (
        "Status",
        410,
        "Expired",
    )
    assert w.next() is None  # and the stream ends
    status, body, _ = request(
        kube_api, "GET", f"{COLL}?resourceVersion={old}&resourceVersionMatch=Exact"
    )
    assert (status, body["code"]) == (410, 410)
    # From the compaction revision on, watching works again.
    w2 = stream(f"watch=true&resourceVersion={kube_api.resource_version}")
    request(kube_api, "POST", COLL, arev("c"))
    ev = w2.next()
    assert ev is not None and ev["object"]["metadata"]["name"] == "c"


def test_compaction_can_expire_open_watches(kube_api: KubeAPIServer, stream: Any) -> None:
    w = stream(f"watch=true&resourceVersion={kube_api.resource_version}")
    kube_api.wait_watches(1)
    kube_api.compact(expire_watches=True)
    ev = w.next()
    assert ev is not None and (ev["type"], ev["object"]["code"]) == ("ERROR", 410)
    assert w.next() is None


def test_stream_end_hook_and_timeout_seconds(kube_api: KubeAPIServer, stream: Any) -> None:
    w = stream(f"watch=true&resourceVersion={kube_api.resource_version}")
    kube_api.wait_watches(1)
    assert kube_api.end_watches() == 1
    assert w.next() is None
    t0 = time.monotonic()
    w2 = stream(f"watch=true&resourceVersion={kube_api.resource_version}&timeoutSeconds=1")
    assert w2.next() is None
    assert 0.9 < time.monotonic() - t0 < 3


def test_bookmarks(kube_api: KubeAPIServer, stream: Any) -> None:
    w = stream(f"watch=true&resourceVersion={kube_api.resource_version}&allowWatchBookmarks=true")
    plain = stream(f"watch=true&resourceVersion={kube_api.resource_version}")
    kube_api.wait_watches(2)
    assert kube_api.bookmark() == 1
    ev = w.next()
    assert ev is not None and ev["type"] == "BOOKMARK"
    assert ev["object"]["metadata"]["resourceVersion"] == str(kube_api.resource_version)
    kube_api.end_watches()
    assert plain.next() is None


def test_down_and_up(kube_api: KubeAPIServer) -> None:
    request(kube_api, "POST", COLL, arev("a"))
    sock = socket.create_connection((kube_api.host, kube_api.port), timeout=5)
    sock.sendall(
        f"GET {COLL}?watch=1&resourceVersion={kube_api.resource_version} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    kube_api.wait_watches(1)
    kube_api.down()
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    sock.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert not received.endswith(b"0\r\n\r\n")  # cut, not a clean end of the chunked stream
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((kube_api.host, kube_api.port), timeout=2)
    kube_api.up()
    status, body, _ = request(kube_api, "GET", COLL)
    assert status == 200 and [i["metadata"]["name"] for i in body["items"]] == ["a"]


def test_injected_reaction_wins(kube_api: KubeAPIServer) -> None:
    kube_api.react("get /apis/mandate.dev/v1alpha1/namespaces/agents/agentrevocations", 503)
    status, _, _ = request(kube_api, "GET", COLL)
    assert status == 503
