"""The operator approves through Kubernetes: the agent asks for the `refund` elevation with
the context API client, the request stays pending (calls denied through real Envoy) until
`kubectl apply` of an AgentElevation naming the request; then the call is allowed and the
object's status says Granted; `kubectl delete` ends the grant at once. The API server is
the emulation in tests/kubeapi driven by the real kubectl."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.agentapi.client import AgentContext
from tests.kubeapi.fixtures import Kubectl, kube_api, kubeconfig, kubectl  # noqa: F401
from tests.kubeapi.server import KubeAPIServer

from .conftest import Stack, start_stack, stop_stack

REFUND = "http://api.stripe.com/v1/refunds"


def _elevation(name: str, request_id: str) -> str:
    return json.dumps(
        {
            "apiVersion": "mandate.dev/v1alpha1",
            "kind": "AgentElevation",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {
                "agent": "billing-agent",
                "elevation": "refund",
                "requestId": request_id,
                "duration": "5m",
                "approver": "alice@finance.example.com",
                "reason": "INC-4413",
            },
        }
    )


@pytest.fixture
def kube_stack(tmp_path: Path, kubeconfig: Path) -> Iterator[tuple[Stack, str]]:  # noqa: F811
    sock = tmp_path / "ctx.sock"
    stack = start_stack(
        tmp_path,
        workers=2,
        extra=[
            "--kubernetes", "on", "--kubeconfig", str(kubeconfig), "--pod-name", "agent-pod-7",
            "--context-api", f"billing-agent=unix:{sock}",
        ],
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not stack.mandate.ready().get("ready"):
        time.sleep(0.05)
    yield stack, f"unix:{sock}"
    stop_stack(stack)


def _until(predicate: Any, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout}s")


def test_kubectl_apply_approves_and_delete_ends_the_grant(
    kube_stack: tuple[Stack, str],
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    stack, target = kube_stack

    async def request() -> Any:
        async with AgentContext(target) as ctx:
            return await ctx.request_elevation("refund", "INV-42 was charged twice", 300)

    req = asyncio.run(request())
    assert req.state == "pending"
    time.sleep(0.3)
    assert stack.call("billing-agent", "POST", REFUND, body=b"{}").status == 403

    kubectl("apply", "-f", "-", input=_elevation("refund-inc-4413", req.id))
    _until(lambda: stack.call("billing-agent", "POST", REFUND, body=b"{}").status == 200)
    resp = stack.call("billing-agent", "POST", REFUND, body=b"{}")
    assert resp.status == 200
    status = _until(
        lambda: (
            (kube_api.get("aelev", "agents", "refund-inc-4413").get("status") or {}).get("state")
            == "Granted"
            and kube_api.get("aelev", "agents", "refund-inc-4413")["status"]
        )
    )
    assert status["grantId"].startswith("grant-")

    async def check() -> Any:
        async with AgentContext(target) as ctx:
            return await ctx.status()

    st = asyncio.run(check())
    (grant,) = st.grants
    assert "alice@finance.example.com" in grant.approver and "AgentElevation" in grant.approver

    kubectl("delete", "aelev", "refund-inc-4413")
    _until(lambda: stack.call("billing-agent", "POST", REFUND, body=b"{}").status == 403)


def test_an_approval_of_an_unknown_request_is_invalid_and_grants_nothing(
    kube_stack: tuple[Stack, str],
    kubectl: Kubectl,  # noqa: F811
    kube_api: KubeAPIServer,  # noqa: F811
) -> None:
    stack, _ = kube_stack
    kubectl("apply", "-f", "-", input=_elevation("forged", "elev-000000000000"))
    status = _until(lambda: kube_api.get("aelev", "agents", "forged").get("status") or {})
    assert status["state"] == "Invalid" and "no elevation request" in status["message"]
    assert stack.call("billing-agent", "POST", REFUND, body=b"{}").status == 403
