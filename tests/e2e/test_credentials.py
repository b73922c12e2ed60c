"""Credentials the agent never holds (issue 17), through real Envoy and `mandate run`, on both
transports: mandate adds them to allowed calls to the hosts each credential names, and
nowhere else.

The agent `cred-agent` has a static secret for the ledger (a file standing in for a
Kubernetes Secret mounted only into mandate's container). The canary value must reach the
ledger on an allowed call and nothing else: no denied call, no other host, no call after a
revocation, and none of mandate's outputs (logs, audit trail, state, status, deny bodies).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Stack, start_stack, stop_stack

LEDGER = "ledger.finance.svc.cluster.local"
OTHER = "reports.finance.svc.cluster.local"
AGENT = "cred-agent"

PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: cred-agent
spec:
  owner: finance-platform
  defaultPurpose: reconcile
  purposes:
    reconcile:
      allow:
        - hosts: [{ledger}, {other}]
          methods: [GET]
          paths: ["/v1/**"]
        - hosts: ["vault.finance.svc.cluster.local:443"]
          methods: [CONNECT]
      deny:
        - hosts: [{ledger}]
          paths: ["/v1/ledger/admin/**"]
  credentials:
    ledger-key:
      hosts: [{ledger}]
      secret:
        file: {secret}
    vault-key:
      hosts: [vault.finance.svc.cluster.local]
      secret:
        file: {secret}
        header: x-api-key
        format: "{{}}"
"""


@pytest.fixture(scope="module")
def canary() -> str:
    return f"sk_live_CANARY_{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def cred_stack(
    tmp_path_factory: pytest.TempPathFactory, transport: str, canary: str
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"credentials-{transport}")
    secret = tmp / "secrets" / "ledger-key"
    secret.parent.mkdir()
    secret.write_text(canary + "\n")
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "cred.yaml").write_text(PROFILE.format(ledger=LEDGER, other=OTHER, secret=secret))
    stack = start_stack(
        tmp,
        profiles,
        transport=transport,
        agents=[AGENT],
        extra=["--audit-dir", str(tmp / "audit")],
    )
    yield stack
    stop_stack(stack)


def _arrived(stack: Stack, path: str) -> list[dict[str, Any]]:
    return [r for r in stack.upstream.received if r["path"] == path]


def test_an_allowed_call_carries_the_credential_the_agent_does_not_hold(
    cred_stack: Stack, canary: str
) -> None:
    resp = cred_stack.call(AGENT, "GET", f"http://{LEDGER}/v1/invoices/1")
    assert resp.status == 200, resp.body
    (seen,) = _arrived(cred_stack, "/v1/invoices/1")
    assert seen["credentials"] == {"authorization": f"Bearer {canary}"}
    # the upstream's answer (which the agent reads) shows only that one arrived
    assert canary not in resp.body.decode()


def test_the_agents_own_credential_headers_to_that_host_are_replaced_or_removed(
    cred_stack: Stack, canary: str
) -> None:
    resp = cred_stack.call(
        AGENT,
        "GET",
        f"http://{LEDGER}/v1/invoices/2",
        headers={
            "Authorization": "Bearer stolen-by-the-agent",
            "X-Api-Key": "agent-key",
            "Txn-Token": "forged.token.value",
        },
    )
    assert resp.status == 200, resp.body
    (seen,) = _arrived(cred_stack, "/v1/invoices/2")
    assert seen["credentials"] == {"authorization": f"Bearer {canary}"}


def test_another_host_gets_no_credential(cred_stack: Stack, canary: str) -> None:
    resp = cred_stack.call(
        AGENT, "GET", f"http://{OTHER}/v1/reports/3", headers={"Authorization": "Bearer own"}
    )
    assert resp.status == 200, resp.body
    (seen,) = _arrived(cred_stack, "/v1/reports/3")
    # not a credential host: mandate adds nothing and leaves what the agent sent
    assert seen["credentials"] == {"authorization": "Bearer own"}


def test_a_denied_call_never_gets_it(cred_stack: Stack, canary: str) -> None:
    resp = cred_stack.call(AGENT, "GET", f"http://{LEDGER}/v1/ledger/admin/keys")
    assert resp.status == 403
    assert resp.json()["error"] == "denied_by_rule"
    assert not _arrived(cred_stack, "/v1/ledger/admin/keys")
    assert canary not in resp.body.decode()


def test_a_connect_tunnel_to_a_credential_host_is_refused(cred_stack: Stack) -> None:
    # The profile allows CONNECT to the vault, but a tunnel is opaque: mandate could not
    # add the credential, and the agent must not need to hold it.
    status, body = _direct(cred_stack, "CONNECT", "vault.finance.svc.cluster.local:443", "")
    assert status == 403
    assert body["error"] == "credential_tunnel"
    assert "call http://" in body["reason"]


def test_the_audit_record_names_the_credential_and_never_its_value(
    cred_stack: Stack, canary: str
) -> None:
    trace = secrets.token_hex(16)
    resp = cred_stack.call(
        AGENT,
        "GET",
        f"http://{LEDGER}/v1/invoices/4",
        headers={"traceparent": f"00-{trace}-{secrets.token_hex(8)}-01"},
    )
    assert resp.status == 200
    record = cred_stack.audit_record(trace)
    assert record["credentials"] == ["ledger-key"]
    assert "txn" not in record
    assert canary not in json.dumps(record)


def test_a_missing_secret_refuses_the_call_and_never_sends_it_bare(
    tmp_path: Path, transport: str, canary: str
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    missing = tmp_path / "secrets" / "not-mounted"
    (profiles / "cred.yaml").write_text(PROFILE.format(ledger=LEDGER, other=OTHER, secret=missing))
    stack = start_stack(tmp_path, profiles, transport=transport, agents=[AGENT])
    try:
        resp = stack.call(
            AGENT, "GET", f"http://{LEDGER}/v1/invoices/5", headers={"Authorization": "x"}
        )
        assert not _arrived(stack, "/v1/invoices/5")
        if transport == "grpc":
            assert resp.status == 503
            body = resp.json()
            assert body["error"] == "credential_unavailable"
            assert "ledger-key" in body["reason"] and str(missing) in body["reason"]
        else:
            # Envoy's HTTP ext_authz client takes a 5xx from the authorization server for
            # an error of its own: status_on_error (503 in envoy/*-http.yaml), no body.
            assert resp.status == 503
        # the file appears (the kubelet mounted the Secret): the next call carries it
        missing.parent.mkdir()
        missing.write_text(canary)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            resp = stack.call(AGENT, "GET", f"http://{LEDGER}/v1/invoices/6")
            if resp.status == 200:
                break
            time.sleep(0.2)
        assert resp.status == 200, resp.body
        assert _arrived(stack, "/v1/invoices/6")[-1]["credentials"] == {
            "authorization": f"Bearer {canary}"
        }
    finally:
        stop_stack(stack)


def test_after_a_revocation_no_call_gets_it(tmp_path: Path, transport: str, canary: str) -> None:
    secret = tmp_path / "key"
    secret.write_text(canary)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "cred.yaml").write_text(PROFILE.format(ledger=LEDGER, other=OTHER, secret=secret))
    stack = start_stack(tmp_path, profiles, transport=transport, agents=[AGENT])
    try:
        assert stack.call(AGENT, "GET", f"http://{LEDGER}/v1/invoices/7").status == 200
        revoked = stack.mandate_cli("revoke", AGENT, "--reason", "prompt injection")
        assert revoked.returncode == 0, revoked.stderr
        before = len(stack.upstream.received)
        for i in range(20):
            resp = stack.call(AGENT, "GET", f"http://{LEDGER}/v1/invoices/r{i}")
            assert resp.status == 403 and resp.json()["error"] == "revoked"
        assert len(stack.upstream.received) == before
    finally:
        stop_stack(stack)


def test_no_output_of_mandate_holds_the_secret(cred_stack: Stack, canary: str) -> None:
    """The canary scan: after the calls above (allowed, denied, refused, audited), the value
    is nowhere but in what the ledger received."""
    for path in ("/v1/invoices/8", "/v1/ledger/admin/x"):
        cred_stack.call(AGENT, "GET", f"http://{LEDGER}{path}")
    outputs: dict[str, str] = {}
    for f in cred_stack.tmp.rglob("*"):
        if f.is_file() and "secrets" not in f.parts and f.name != "ledger-key":
            outputs[str(f)] = f.read_bytes().decode("utf-8", "replace")
    outputs["readyz"] = json.dumps(cred_stack.readyz())
    status = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", "--admin",
         f"127.0.0.1:{cred_stack.mandate.admin_port}", "--token-file", str(cred_stack.token_file)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    outputs["mandate status"] = status.stdout + status.stderr
    assert any("audit" in name for name in outputs), sorted(outputs)
    leaked = [name for name, text in outputs.items() if canary in text]
    assert leaked == []


def _direct(stack: Stack, method: str, host: str, path: str) -> tuple[int, dict[str, Any]]:
    """A CONNECT through the agent's listener: (status, deny body)."""
    import socket

    with socket.create_connection(("127.0.0.1", stack.port(AGENT)), timeout=10) as sock:
        sock.sendall(f"{method} {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, json.loads(rest) if rest else {}
