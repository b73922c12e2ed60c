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
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.credentials.keys import generate_key

from .conftest import Stack, start_stack, stop_stack
from .otlp import OtlpReceiver

LEDGER = "ledger.finance.svc.cluster.local"
OTHER = "reports.finance.svc.cluster.local"
AUDIT = "audit.finance.svc.cluster.local"
ISSUER = "https://mandate.agents.svc"
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
        - hosts: [{ledger}, {other}, audit.finance.svc.cluster.local]
          methods: [GET]
          paths: ["/v1/**"]
        - hosts: ["vault.finance.svc.cluster.local:443"]
          methods: [CONNECT]
      deny:
        - hosts: [{ledger}]
          paths: ["/v1/ledger/admin/**"]
  credentials:
    ledger-key:
      hosts: ["{ledger}:80"]   # in-cluster plain HTTP: the port named on purpose
      secret:
        file: {secret}
    vault-key:
      hosts: [vault.finance.svc.cluster.local]
      secret:
        file: {secret}
        header: x-api-key
        format: "{{}}"
    audit-txn:
      hosts: ["audit.finance.svc.cluster.local:80"]
      transactionToken:
        ttl: 20s
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
    keys = tmp / "txn-keys"
    keys.mkdir()
    generate_key(keys / "k1.pem")
    receiver = OtlpReceiver()  # decision spans (mandate's and Envoy's) for the canary scan
    stack = start_stack(
        tmp,
        profiles,
        transport=transport,
        agents=[AGENT],
        extra=[
            "--audit-dir", str(tmp / "audit"),
            "--txn-token-keys", str(keys), "--txn-token-issuer", ISSUER,
            "--otlp-endpoint", f"http://127.0.0.1:{receiver.port}",
        ],
        envoy_values={"OTLP_PORT": receiver.port},
    )  # fmt: skip
    stack.spans = receiver  # type: ignore[attr-defined]
    yield stack
    stop_stack(stack)
    receiver.stop()


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


def _jwks(stack: Stack) -> dict[str, Any]:
    url = f"http://127.0.0.1:{stack.mandate.admin_port}/.well-known/jwks.json"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Cache-Control"] == "public, max-age=60"
        return json.loads(resp.read())  # type: ignore[no-any-return]


def _verify(token: str, jwks: dict[str, Any], *, aud: str, now: float) -> Any:
    """What an upstream does, with a JOSE library other than mandate's (joserfc)."""
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import KeySet

    tok = jose_jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])
    assert tok.header["typ"] == "txntoken+jwt"
    jose_jwt.JWTClaimsRegistry(
        now=int(now),
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": aud},
        exp={"essential": True},
        txn={"essential": True},
        scope={"essential": True},
    ).validate(tok.claims)
    return tok


def test_a_transaction_token_is_minted_for_the_call_and_verifies_against_the_jwks(
    cred_stack: Stack,
) -> None:
    from joserfc.errors import ExpiredTokenError, InvalidClaimError

    trace = secrets.token_hex(16)
    resp = cred_stack.call(
        AGENT,
        "GET",
        f"http://{AUDIT}/v1/entries/9",
        headers={
            "Txn-Token": "forged.by.agent",
            "x-mandate-task": "INC-7",
            "traceparent": f"00-{trace}-{secrets.token_hex(8)}-01",
        },
    )
    assert resp.status == 200, resp.body
    (seen,) = _arrived(cred_stack, "/v1/entries/9")
    token = seen["credentials"]["txn-token"]
    assert token != "forged.by.agent" and set(seen["credentials"]) == {"txn-token"}
    jwks = _jwks(cred_stack)
    tok = _verify(token, jwks, aud=AUDIT, now=time.time())
    decision = seen["mandate"]["x-mandate-decision"]
    claims = tok.claims
    assert claims["txn"] == decision and claims["scope"] == "reconcile"
    assert claims["sub"] == f"agent:agents/{AGENT}"
    assert claims["tctx"] == {
        "decision": decision, "method": "GET", "path": "/v1/entries/9", "task": "INC-7",
    }  # fmt: skip
    assert 0 < claims["exp"] - claims["iat"] <= 20
    with pytest.raises(InvalidClaimError):  # meant for another upstream
        _verify(token, jwks, aud=LEDGER, now=time.time())
    with pytest.raises(ExpiredTokenError):  # replayed after its ttl
        _verify(token, jwks, aud=AUDIT, now=claims["exp"] + 1)
    record = cred_stack.audit_record(trace)
    assert record["credentials"] == ["audit-txn"] and record["txn"] == decision
    assert token not in json.dumps(record)


def test_no_output_of_mandate_holds_the_secret(cred_stack: Stack, canary: str) -> None:
    """The canary scan: after the calls above (allowed, denied, refused, audited), the value
    is nowhere but in what the ledger received."""
    for path in ("/v1/invoices/8", "/v1/ledger/admin/x"):
        cred_stack.call(AGENT, "GET", f"http://{LEDGER}{path}")
    trace = secrets.token_hex(16)
    headers = {"traceparent": f"00-{trace}-{secrets.token_hex(8)}-01"}
    assert cred_stack.call(AGENT, "GET", f"http://{AUDIT}/v1/entries/scan", headers).status == 200
    # written off the Check path: wait for the last call's record and span before scanning
    assert cred_stack.audit_record(trace)["credentials"] == ["audit-txn"]
    receiver: OtlpReceiver = cred_stack.spans  # type: ignore[attr-defined]
    assert receiver.wait_for(lambda sp: sp.trace_id == trace and sp.service == "mandate")
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
    metrics_url = f"http://127.0.0.1:{cred_stack.mandate.admin_port}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        outputs["/metrics"] = resp.read().decode()
    outputs["spans"] = repr(receiver.spans)
    assert any("audit" in name for name in outputs), sorted(outputs)
    minted = [r["credentials"]["txn-token"] for r in cred_stack.upstream.received
              if "txn-token" in r["credentials"]]  # fmt: skip
    assert minted
    leaked = [name for name, text in outputs.items() if canary in text]
    leaked += [name for name, text in outputs.items() for t in minted if t in text]
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


# -- OAuth: client credentials and RFC 8693 token exchange, against local endpoints ---------

OAUTH_PROFILE = """\
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
  credentials:
    ledger-oauth:
      hosts: ["{ledger}:80"]
      oauth2ClientCredentials:
        tokenUrl: http://127.0.0.1:{port}/token
        clientIdFile: {dir}/client-id
        clientSecretFile: {dir}/client-secret
        scopes: [ledger.read]
        audience: ledger
    reports-exchange:
      hosts: ["{other}:80"]
      tokenExchange:
        tokenUrl: http://127.0.0.1:{port}/sts
        subjectTokenFile: {dir}/sa-token
        audience: reports
"""


class TokenEndpoints:
    """A local OAuth token endpoint and STS that check what mandate sends, as a real
    authorization server would, and answer short-lived tokens."""

    def __init__(self, client_secret: str, subject_token: str) -> None:
        from aiohttp import web

        from sidecar.loopthread import LoopThread

        self.client_secret, self.subject_token = client_secret, subject_token
        self.issued: list[str] = []
        self.refused: list[str] = []
        self.port = 0
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/sts", self._sts)
        self._runner = web.AppRunner(app, access_log=None)
        self._thread = LoopThread("token-endpoints")

        async def start() -> None:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        self._thread.start(start)

    def _answer(self, prefix: str) -> Any:
        from aiohttp import web

        token = f"{prefix}-{secrets.token_hex(8)}"
        self.issued.append(token)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": 300}
        if prefix == "xchg":
            body["issued_token_type"] = "urn:ietf:params:oauth:token-type:access_token"
        return web.json_response(body)

    async def _token(self, request: Any) -> Any:
        import base64

        from aiohttp import web

        form = await request.post()
        basic = base64.b64encode(f"ledger-client:{self.client_secret}".encode()).decode()
        if (
            request.headers.get("Authorization") != f"Basic {basic}"
            or form.get("grant_type") != "client_credentials"
            or form.get("scope") != "ledger.read"
            or form.get("audience") != "ledger"
        ):
            self.refused.append("token")
            return web.json_response({"error": "invalid_client"}, status=401)
        return self._answer("cc")

    async def _sts(self, request: Any) -> Any:
        from aiohttp import web

        form = await request.post()
        if (
            form.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange"
            or form.get("subject_token") != self.subject_token
            or form.get("subject_token_type") != "urn:ietf:params:oauth:token-type:jwt"
            or form.get("audience") != "reports"
        ):
            self.refused.append("sts")
            return web.json_response({"error": "invalid_request"}, status=400)
        return self._answer("xchg")

    def stop(self) -> None:
        self._thread.stop(self._runner.cleanup, timeout=5)


def test_oauth_and_exchanged_tokens_are_added_and_dropped_on_revocation(
    tmp_path: Path, transport: str
) -> None:
    client_secret, subject = secrets.token_hex(16), f"eyJ.sa-token.{secrets.token_hex(8)}"
    files = tmp_path / "secrets"
    files.mkdir()
    (files / "client-id").write_text("ledger-client")
    (files / "client-secret").write_text(client_secret)
    (files / "sa-token").write_text(subject)
    endpoints = TokenEndpoints(client_secret, subject)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "cred.yaml").write_text(
        OAUTH_PROFILE.format(ledger=LEDGER, other=OTHER, port=endpoints.port, dir=files)
    )
    stack = start_stack(tmp_path, profiles, transport=transport, agents=[AGENT])
    try:
        deadline = time.monotonic() + 10  # fetched when the profiles load
        while len(endpoints.issued) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(3):
            assert stack.call(AGENT, "GET", f"http://{LEDGER}/v1/o{i}").status == 200
            assert stack.call(AGENT, "GET", f"http://{OTHER}/v1/x{i}").status == 200
        ledger = {r["credentials"]["authorization"] for r in stack.upstream.received
                  if r["path"].startswith("/v1/o")}  # fmt: skip
        reports = {r["credentials"]["authorization"] for r in stack.upstream.received
                   if r["path"].startswith("/v1/x")}  # fmt: skip
        assert len(ledger) == 1 and ledger.pop().removeprefix("Bearer ").startswith("cc-")
        assert len(reports) == 1 and reports.pop().removeprefix("Bearer ").startswith("xchg-")
        assert endpoints.refused == []
        assert len(endpoints.issued) == 2  # cached: one token each for six calls
        issued = list(endpoints.issued)
        revoked = stack.mandate_cli("revoke", AGENT, "--reason", "stolen")
        assert revoked.returncode == 0, revoked.stderr
        assert stack.call(AGENT, "GET", f"http://{LEDGER}/v1/after").status == 403
        restored = stack.mandate_cli("restore", AGENT)
        assert restored.returncode == 0, restored.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            resp = stack.call(AGENT, "GET", f"http://{LEDGER}/v1/again")
            if resp.status == 200:
                break
            time.sleep(0.1)
        assert resp.status == 200, resp.body
        (again,) = [r for r in stack.upstream.received if r["path"] == "/v1/again"]
        # the revoked agent's cached token was dropped: a new one was fetched for it
        assert again["credentials"]["authorization"].removeprefix("Bearer ") not in issued
        logs = (tmp_path / "mandate" / "mandate.log").read_text()
        assert all(t not in logs for t in [client_secret, subject, *endpoints.issued])
    finally:
        stop_stack(stack)
        endpoints.stop()


def test_a_token_endpoint_that_is_down_refuses_the_call(tmp_path: Path, transport: str) -> None:
    files = tmp_path / "secrets"
    files.mkdir()
    for name in ("client-id", "client-secret", "sa-token"):
        (files / name).write_text("x")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "cred.yaml").write_text(
        OAUTH_PROFILE.format(ledger=LEDGER, other=OTHER, port=closed, dir=files)
    )
    stack = start_stack(tmp_path, profiles, transport=transport, agents=[AGENT])
    try:
        for i in range(3):
            resp = stack.call(AGENT, "GET", f"http://{LEDGER}/v1/down{i}")
            assert resp.status == 503
            if transport == "grpc":
                body = resp.json()
                assert body["error"] == "credential_unavailable"
                assert "ledger-oauth" in body["reason"]
        assert not [r for r in stack.upstream.received if r["path"].startswith("/v1/down")]
    finally:
        stop_stack(stack)
