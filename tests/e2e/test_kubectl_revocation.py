"""The operator's path end to end: `kubectl apply -f` an AgentRevocation → the sidecar's
watcher → the shared table → real Envoy answers 403 with the revocation's reason;
`kubectl delete` (or expiresAt) restores. The API server is the emulation in
tests/kubeapi driven by the real kubectl."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.kubeapi.fixtures import Kubectl, kube_api, kubeconfig, kubectl  # noqa: F401
from tests.kubeapi.server import KubeAPIServer

from .conftest import Stack, start_stack, stop_stack

INVOICE = "http://ledger.finance.svc.cluster.local/v1/invoices/3"
ARXIV = "http://export.arxiv.org/api/query"


def _revocation(name: str, agent: str, reason: str, expires: str | None = None) -> str:
    spec = {"agent": agent, "reason": reason}
    if expires:
        spec["expiresAt"] = expires
    return json.dumps(
        {
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentRevocation",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": spec,
        }
    )


@pytest.fixture
def kube_stack(tmp_path: Path, kubeconfig: Path) -> Iterator[Stack]:  # noqa: F811
    stack = start_stack(
        tmp_path,
        workers=2,
        extra=["--kubernetes", "on", "--kubeconfig", str(kubeconfig), "--pod-name", "agent-pod-7"],
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not stack.mandate.ready().get("ready"):
        time.sleep(0.05)
    yield stack
    stop_stack(stack)


def _wait_status(stack: Stack, agent: str, url: str, status: int, timeout: float = 5) -> float:
    """Seconds until a call gets ``status`` (bounded)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if stack.call(agent, "GET", url).status == status:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{agent} {url}: no {status} within {timeout}s")


def test_kubectl_apply_revokes_and_delete_restores(
    kube_stack: Stack,
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    stack = kube_stack
    status = json.loads(stack.mandate_cli("status").stdout)
    assert status["kubernetes"]["connected"] is True
    assert stack.call("billing-agent", "GET", INVOICE).status == 200
    doc = _revocation("billing-inc-4412", "billing-agent", "Anomalous refund volume (INC-4412)")
    kubectl("apply", "-f", "-", input=doc)
    _wait_status(stack, "billing-agent", INVOICE, 403)
    stack.upstream.received.clear()
    for _ in range(6):  # both workers
        resp = stack.call("billing-agent", "GET", INVOICE)
        assert resp.status == 403
        assert resp.json()["reason"] == "revoked: Anomalous refund volume (INC-4412)"
    assert stack.upstream.received == []
    assert stack.call("research-agent", "GET", ARXIV).status == 200
    # Operators see enforcement from kubectl: an Event from this pod and the status field.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        obj = kubectl.json("get", "agentrevocation", "billing-inc-4412", "-n", "agents")
        if obj.get("status", {}).get("firstEnforcedAt"):
            break
        time.sleep(0.05)
    assert obj["status"]["firstEnforcedBy"] == "agent-pod-7"
    # The pod whose status write won posts the Event, after that write (one per fleet).
    deadline = time.monotonic() + 5
    while True:
        events = [
            e
            for e in kube_api.events("agents")
            if e["involvedObject"]["name"] == "billing-inc-4412"
        ]
        if events or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert events and events[0]["reason"] == "RevocationEnforced"
    assert "agent-pod-7" in events[0]["message"]
    # The admin API cannot lift a revocation that an AgentRevocation holds.
    restore = stack.mandate_cli("restore", "billing-agent")
    assert restore.returncode == 1
    assert "billing-inc-4412" in restore.stdout
    kubectl("delete", "agentrevocation", "billing-inc-4412", "-n", "agents")
    _wait_status(stack, "billing-agent", INVOICE, 200)


def test_star_expiry_and_invalid_objects(kube_stack: Stack, kubectl: Kubectl) -> None:  # noqa: F811
    stack = kube_stack
    expires = (datetime.now(UTC) + timedelta(seconds=3)).isoformat(timespec="seconds")
    doc = _revocation("lockdown", "*", "namespace lockdown", expires.replace("+00:00", "Z"))
    kubectl("apply", "-f", "-", input=doc)
    _wait_status(stack, "billing-agent", INVOICE, 403)
    assert (
        stack.call("research-agent", "GET", ARXIV).json()["reason"] == "revoked: namespace lockdown"
    )
    _wait_status(stack, "billing-agent", INVOICE, 200, timeout=10)  # expiresAt passed
    assert stack.call("research-agent", "GET", ARXIV).status == 200
    # Invalid objects are refused by the API server's schema and change nothing.
    for bad, field in [
        (json.dumps({"apiVersion": "mandate.dev/v1alpha1", "kind": "AgentRevocation",
                     "metadata": {"name": "no-reason", "namespace": "agents"},
                     "spec": {"agent": "billing-agent"}}), "spec.reason"),
        (_revocation("bad-expiry", "billing-agent", "x", "tomorrow"), "spec.expiresAt"),
    ]:  # fmt: skip
        result = kubectl("apply", "-f", "-", input=bad, check=False)
        assert result.returncode != 0
        assert field in result.stderr
    assert stack.call("billing-agent", "GET", INVOICE).status == 200


def test_watch_faults_lose_no_revocation(
    kube_stack: Stack,
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    stack = kube_stack
    kube_api.end_watches()  # the stream ends: the watcher resumes from its resourceVersion
    kubectl("apply", "-f", "-", input=_revocation("after-end", "billing-agent", "after end"))
    _wait_status(stack, "billing-agent", INVOICE, 403)
    kubectl("delete", "agentrevocation", "after-end", "-n", "agents")
    _wait_status(stack, "billing-agent", INVOICE, 200)
    kube_api.compact(expire_watches=True)  # 410 Gone: the watcher relists
    kubectl("apply", "-f", "-", input=_revocation("after-410", "research-agent", "after 410"))
    _wait_status(stack, "research-agent", ARXIV, 403)
    kube_api.down()  # API server unreachable: the last known state stays enforced
    time.sleep(0.5)
    assert stack.call("research-agent", "GET", ARXIV).json()["reason"] == "revoked: after 410"
    assert stack.call("billing-agent", "GET", INVOICE).status == 200
    kube_api.up()
    kubectl("delete", "agentrevocation", "after-410", "-n", "agents")
    _wait_status(stack, "research-agent", ARXIV, 200, timeout=15)


def test_rbac_refusal_fails_closed_past_the_initial_sync_timeout(
    tmp_path: Path,
    kubeconfig: Path,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    """Issue 19, finding 1: an API server answering 403 (a RoleBinding for the wrong
    namespace) is a configuration error, not an outage. Past `--initial-sync-timeout` the pod
    stays unready, every Check is denied `revocations_refused` naming the permission, and a
    Warning Event on the pod says so; once RBAC allows the list, calls pass again."""
    from tests.kubeapi.faults import ListWatchErrors

    forbidden = ListWatchErrors(kube_api, status=403)
    forbidden.on()
    stack = start_stack(
        tmp_path,
        extra=["--kubernetes", "on", "--kubeconfig", str(kubeconfig),
               "--pod-name", "agent-pod-9", "--initial-sync-timeout", "1"],
    )  # fmt: skip
    try:
        started = time.monotonic()
        deadline = started + 15
        while time.monotonic() < deadline:
            state = json.loads(stack.mandate_cli("status").stdout)["kubernetes"]["state"]
            if state == "refused" and time.monotonic() > started + 2:  # past the timeout
                break
            time.sleep(0.1)
        status = json.loads(stack.mandate_cli("status").stdout)
        assert status["kubernetes"]["state"] == "refused", status["kubernetes"]
        assert (
            "needs get, list and watch on agentrevocations.mandate.dev"
            in (status["revocations"]["refused"])
        )
        code, ready = stack.readyz()
        assert code == 503 and ready["ready"] is False
        resp = stack.call("billing-agent", "GET", INVOICE)
        assert resp.status == 403, resp.body
        body = resp.json()
        assert body["error"] == "revocations_refused"
        assert "namespace 'agents'" in body["reason"] and "HTTP 403" in body["reason"]
        assert stack.upstream.received == []
        events = [e for e in kube_api.events("agents") if e.get("reason") == "RevocationsRefused"]
        assert events and events[0]["involvedObject"]["name"] == "agent-pod-9"
        assert events[0]["type"] == "Warning"
        forbidden.off()
        _wait_status(stack, "billing-agent", INVOICE, 200, timeout=10)
        assert json.loads(stack.mandate_cli("status").stdout)["revocations"]["refused"] is None
    finally:
        stop_stack(stack)
