"""Egress capture for real: the init container's iptables rules (sidecar.injection.pod's
CAPTURE_SCRIPT, with the environment it gets in the pod) applied in a network namespace, and
an agent that ignores every proxy setting. Its direct connection to a remote host is captured
by Envoy and decided by mandate; Envoy's own upstream connection is not captured again; a
revoked agent reaches the host on no port, over TCP or UDP.

Needs root (network namespaces, iptables); skips, saying what is missing, elsewhere."""

from __future__ import annotations

import json
import time

from sidecar.injection.pod import CAPTURE_SCRIPT, InjectConfig, capture_env

from .conftest import AGENT, ENVOY_UID, HTTP_PORT, MANDATE_UID, OTHER_PORT, Pod
from .lab import REMOTE_ADDR, WAIT

BASE = f"http://{REMOTE_ADDR}:{HTTP_PORT}"
OTHER = f"http://{REMOTE_ADDR}:{OTHER_PORT}"


def _paths(pod: Pod, path: str) -> list[dict[str, object]]:
    return [r for r in pod.seen() if r.get("path") == path]


def _mandate_headers(resp: dict[str, object]) -> dict[str, str]:
    seen = json.loads(str(resp["body"]))
    return {k: v for k, v in seen["headers"].items() if k.startswith("x-mandate-")}


def _denied(resp: dict[str, object], code: str) -> dict[str, str]:
    assert resp.get("status") == 403, resp
    assert resp["headers"]["content-type"] == "application/json", resp  # type: ignore[index]
    body: dict[str, str] = json.loads(str(resp["body"]))
    assert body["error"] == code, body
    return body


def test_agent_egress_is_captured_decided_and_cut_off_on_revocation(pod: Pod) -> None:
    config = InjectConfig()
    assert (config.envoy_uid, config.mandate_uid) == (ENVOY_UID, MANDATE_UID)

    # Without the rules, the agent's direct call bypasses the sidecar (so what follows shows
    # the rules at work, not a broken network).
    resp = pod.get(f"{BASE}/v1/invoices/before")
    assert resp.get("status") == 200, resp
    assert _mandate_headers(resp) == {}
    assert pod.udp(OTHER_PORT, "before")["sent"]
    deadline = time.monotonic() + WAIT
    while not any(r.get("data") == "before" for r in pod.seen()):
        assert time.monotonic() < deadline, "UDP did not reach the remote host without capture"
        time.sleep(0.05)

    # ... and the agent can open a connection to mandate's Check port (gRPC here: it hangs up
    # on HTTP/1.1, but the connection is made).
    before_check = pod.get("http://127.0.0.1:9001/mandate/v1/invoices/1")
    assert not any(
        e in before_check.get("error", "") for e in ("ConnectionReset", "ConnectionRefused")
    ), before_check

    # Apply exactly what the mandate-init container runs.
    result = pod.lab.pod.run(
        ["sh", "-c", CAPTURE_SCRIPT], env={**pod.lab.env(pod.lab.workdir), **capture_env(config)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"--to-ports {config.proxy_port}" in result.stdout, result.stdout
    stats0 = pod.envoy_stats()

    # Allowed by the profile: captured by Envoy, decided by mandate, reaches the server once.
    resp = pod.get(f"{BASE}/v1/invoices/42")
    assert resp.get("status") == 200, resp
    headers = _mandate_headers(resp)
    assert headers["x-mandate-agent"] == AGENT
    assert headers["x-mandate-purpose"] == "reconcile"
    assert len(headers["x-mandate-decision"]) == 32, headers

    # Not allowed (path; the same path on another port): 403 from mandate, never forwarded.
    _denied(pod.get(f"{BASE}/v1/ledger/admin/close"), "outside_purpose")
    _denied(pod.get(f"{OTHER}/v1/invoices/43"), "outside_purpose")

    # Envoy's own upstream connection went out once, from Envoy, and was not captured again.
    (arrived,) = _paths(pod, "/v1/invoices/42")
    assert arrived["port"] == HTTP_PORT
    assert not _paths(pod, "/v1/ledger/admin/close")
    assert not _paths(pod, "/v1/invoices/43")
    stats = pod.envoy_stats()

    def delta(name: str) -> int:
        return stats.get(name, 0) - stats0.get(name, 0)

    assert delta("http.egress.downstream_rq_total") == 3, "a request looped back into Envoy"
    assert delta("listener.127.0.0.1_15001.downstream_cx_total") == 3
    assert delta("cluster.dynamic_forward_proxy.upstream_rq_total") == 1
    assert delta("cluster.dynamic_forward_proxy.upstream_cx_total") == 1

    # mandate's Check port answers Envoy only: an allowed Check carries the call's
    # credentials (issue 17 review, finding 1: the agent read them by asking directly).
    check = pod.get("http://127.0.0.1:9001/mandate/v1/invoices/1")
    assert "ConnectionResetError" in check.get("error", "") or "ConnectionRefused" in check.get(
        "error", ""
    ), check
    assert "MANDATE_CHECK" in result.stdout and "--dport 9001" in result.stdout, result.stdout

    # Revoked: the agent reaches the remote host on no port.
    result = pod.mandate_cli("revoke", AGENT, "--reason", "x")
    assert result.returncode == 0, result.stdout + result.stderr
    before = len(pod.seen())
    deadline = time.monotonic() + WAIT
    while (resp := pod.get(f"{BASE}/v1/invoices/44")).get("status") != 403:
        assert time.monotonic() < deadline, f"still allowed after revocation: {resp}"
        time.sleep(0.1)
    assert _denied(resp, "revoked")["reason"] == "revoked: x"
    # Every TCP port is captured (nothing listens on 22: Envoy answers, mandate refuses).
    for url in (f"{BASE}/v1/invoices/45", f"{OTHER}/v1/invoices/45", f"http://{REMOTE_ADDR}:22/"):
        _denied(pod.get(url), "revoked")
    udp = pod.udp(OTHER_PORT, "after")
    assert not udp["sent"], udp
    time.sleep(0.3)  # a datagram that did get out would have arrived by now
    assert len(pod.seen()) == before, pod.seen()[before:]
