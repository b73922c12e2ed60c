"""`make run`: the local demo.

Starts a demo upstream (aiohttp), `mandate run` with the demo profiles, and real Envoy
with one egress listener per agent (as if each agent were its own pod), then plays a
scripted agent session through Envoy and prints every call's decision and reason. Finally
an operator revokes one agent and restores it (`mandate revoke` / `mandate restore`); the
billing agent, with the context API client (sidecar/agentapi/client.py), reports a task and asks for
a temporary elevation that an operator approves (`mandate approve`). In the "Credentials" part,
payments-agent (devstack/demo/payments-agent.yaml) holds no key: mandate adds a Stripe key the
demo wrote to a file only mandate reads, never to a denied call, and mints a Transaction Token
that an internal service (devstack/demo/verifier.py) verifies against mandate's JWKS; after
`mandate revoke payments-agent` no call carries either. Then mandate stops to show that Envoy then refuses every call (fail closed), and everything
stops (Ctrl-C too). The demo checks what it shows and exits 1 if something differs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from devstack.demo.upstream import RECEIVED
from devstack.demo.verifier import TXN_TOKEN_TYP, TxnTokenVerifier, start_verifying_upstream
from devstack.local import (
    ENVOY_DIR,
    EnvoyProcess,
    MandateProcess,
    render_envoy_config,
    start_envoy,
    start_mandate,
)
from sidecar.agentapi.client import AgentContext, context_headers
from sidecar.credentials.keys import generate_key

PROFILES = Path(__file__).parent / "profiles"
# The "Credentials" part's agent: loaded only by the demo, next to PROFILES (a copy of both
# in the demo's temporary directory, the secret file's path filled in).
PAYMENTS_PROFILE = Path(__file__).parent / "payments-agent.yaml"
PAYMENTS = "payments-agent"
ISSUER = "https://mandate.agents.svc"  # --txn-token-issuer: the iss upstreams expect
AUDIT_HOST = "audit.finance.svc.cluster.local"  # the internal service verifying Txn-Tokens

LEDGER = "http://ledger.finance.svc.cluster.local"
STRIPE = "http://api.stripe.com"
REPORTS = "http://reports.finance.svc.cluster.local"
ARXIV = "http://export.arxiv.org"
MCP = "http://mcp.tools.svc.cluster.local/mcp"
AUDIT = f"http://{AUDIT_HOST}"


@dataclass(frozen=True)
class Call:
    agent: str
    method: str
    url: str
    note: str
    headers: dict[str, str] = field(default_factory=dict)
    mcp: dict[str, Any] | None = None


def _rpc(method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


SCENES: list[tuple[str, list[Call]]] = [
    ("billing-agent reconciles invoices (its default purpose 'reconcile')", [
        Call("billing-agent", "GET", f"{LEDGER}/v1/invoices/42", "read an invoice"),
        Call("billing-agent", "GET", f"{STRIPE}/v1/charges/ch_3Nq", "*.stripe.com wildcard"),
        Call("billing-agent", "GET", f"{LEDGER}/v1/ledger/2026/11?page=2", "'**' subtree, query ignored"),
        Call("billing-agent", "GET", f"{LEDGER}/v1/ledger/admin/users", "deny rule wins over allow"),
        Call("billing-agent", "GET", f"{LEDGER}/v1/ledger/2026/../admin/users", "'..' cannot dodge the deny rule"),
        Call("billing-agent", "DELETE", f"{LEDGER}/v1/invoices/42", "method not in the rule"),
    ]),
    ("billing-agent switches purpose to publish its report", [
        Call("billing-agent", "POST", f"{REPORTS}/v1/reports/2026-11", "reports are not 'reconcile'"),
        Call("billing-agent", "POST", f"{REPORTS}/v1/reports/2026-11", "declared purpose 'report'",
             {"x-mandate-purpose": "report", "x-mandate-task": "close-nov-2026"}),
        Call("billing-agent", "GET", f"{LEDGER}/v1/invoices/42", "'report' does not cover the ledger",
             {"x-mandate-purpose": "report"}),
        Call("billing-agent", "GET", f"{LEDGER}/v1/invoices/42", "purposes come from the profile",
             {"x-mandate-purpose": "payroll"}),
        Call("billing-agent", "POST", f"{STRIPE}/v1/refunds", "refunds need an elevation"),
    ]),
    ("a compromised billing-agent tries to pass as research-agent", [
        Call("billing-agent", "GET", f"{ARXIV}/api/query?search_query=all:agents",
             "x-mandate-agent header is ignored", {"x-mandate-agent": "research-agent"}),
    ]),
    ("research-agent searches literature, then uses MCP tools (purpose 'tool-use')", [
        Call("research-agent", "GET", f"{ARXIV}/api/query?search_query=all:agents", "default purpose"),
        Call("research-agent", "POST", MCP, "listed tool", {"x-mandate-purpose": "tool-use"},
             _rpc("tools/call", name="search_papers", arguments={"q": "agent identity"})),
        Call("research-agent", "POST", MCP, "tool not in mcpTools", {"x-mandate-purpose": "tool-use"},
             _rpc("tools/call", name="delete_corpus", arguments={})),
        Call("research-agent", "POST", MCP, "session method", {"x-mandate-purpose": "tool-use"},
             _rpc("tools/list")),
        Call("research-agent", "POST", MCP, "resources/* not listed", {"x-mandate-purpose": "tool-use"},
             _rpc("resources/read", uri="file:///etc/passwd")),
    ]),
]  # fmt: skip


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


async def _send(
    session: aiohttp.ClientSession, proxy: str, call: Call
) -> tuple[int, dict[str, Any]]:
    kwargs: dict[str, Any] = {"proxy": proxy, "headers": call.headers}
    if call.mcp is not None:
        kwargs["json"] = call.mcp
    async with session.request(call.method, call.url, **kwargs) as resp:
        text = await resp.text()
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {"raw": text}
        if not isinstance(data, dict):
            data = {"raw": data}
        if resp.status != 200 and "x-mandate-decision" not in resp.headers:
            data.setdefault("reason", f"refused by Envoy itself ({resp.reason})")
        return resp.status, data


def _row(n: int, call: Call, status: int, data: dict[str, Any]) -> str:
    purpose = call.headers.get("x-mandate-purpose", "(default)")
    target = call.url.split("://", 1)[1]
    if call.mcp is not None:
        name = call.mcp["params"].get("name")
        target += f" {call.mcp['method']}" + (f"({name})" if name else "")
    verdict = "ALLOW" if status == 200 else "DENY "
    if status == 200:
        seen = data.get("seen", data).get("mandate", {})
        why = "upstream saw " + " ".join(
            f"{k[10:]}={v}" for k, v in sorted(seen.items()) if k != "x-mandate-decision"
        )
    else:
        why = data.get("reason", "")
    line = f"{n:>2}  {verdict} {status}  {call.agent:<14} {purpose:<10} {call.method:<6} {_short(target, 58)}"
    return line + "\n" + textwrap.indent(textwrap.fill(f"{call.note} — {why}", 110), " " * 16)


def _admin_cli(mandate: MandateProcess, argv: list[str]) -> None:
    """Run `mandate revoke/restore` as an operator would, against this sidecar."""
    token = mandate.log_path.parent / "state" / "admin.token"
    cmd = [sys.executable, "-m", "sidecar", *argv, "--admin", f"127.0.0.1:{mandate.admin_port}"]
    result = subprocess.run(
        [*cmd, "--token-file", str(token)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise RuntimeError(f"mandate {argv[0]} failed: {result.stderr.strip()}")


async def _elevation_scene(
    session: aiohttp.ClientSession, proxy: str, mandate: MandateProcess, context: str, n: int
) -> int:
    """billing-agent, as an agent author would write it with sidecar/agentapi/client.py."""
    print("\n── billing-agent reports a task, then asks for the `refund` elevation (context API)")
    async with AgentContext(context) as ctx:
        task = await ctx.report_task("close-november", "report", ttl=600)
        print(f"   ReportTask close-november -> purpose {task.purpose!r}")
        report = Call(
            "billing-agent", "PUT", f"{REPORTS}/v1/reports/november",
            "only the task id is sent; its purpose comes from ReportTask",
            headers=context_headers(task="close-november"),
        )  # fmt: skip
        n += 1
        status, data = await _send(session, proxy, report)
        print(_row(n, report, status, data))
        refund = Call("billing-agent", "POST", f"{STRIPE}/v1/refunds", "refund, no grant yet")
        explained = await ctx.explain(refund.method, refund.url)
        print(f"   Explain POST /v1/refunds -> {explained.decision}: {explained.reason}")
        req = await ctx.request_elevation("refund", "INV-42 was charged twice", duration=300)
        print(f"   RequestElevation refund -> {req.state} ({req.id}): needs an operator")
        n += 1
        status, data = await _send(session, proxy, refund)
        print(_row(n, refund, status, data))
        print(f"   $ mandate approve {req.id} --approver alice   (the operator; the agent cannot)")
        _admin_cli(mandate, ["approve", req.id, "--approver", "alice", "--reason", "FIN-881"])
        granted = await ctx.wait_for_grant(req.id, timeout=10)
        print(
            f"   granted {granted.grant_id} until {time.strftime('%H:%M:%S', time.localtime(granted.expires_at or 0))}"
        )
        refund = Call("billing-agent", "POST", f"{STRIPE}/v1/refunds", "refund under the grant")
        n += 1
        status, data = await _send(session, proxy, refund)
        print(_row(n, refund, status, data))
    return n


@dataclass(frozen=True)
class Credentials:
    """What the demo set up for payments-agent: the secret only mandate reads, and where
    the upstreams are (to show what they received, and what the audit service verified)."""

    secret_file: Path
    secret: str
    jwks_url: str
    upstream: web.Application
    upstream_port: int

    @property
    def received(self) -> list[dict[str, Any]]:
        return self.upstream[RECEIVED]


def _expect(ok: bool, what: str) -> None:
    """The demo checks what it shows: a difference is an error, not a misleading line."""
    if not ok:
        raise RuntimeError(f"demo: expected {what}")


def _sha12(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


async def _credentials_part(
    session: aiohttp.ClientSession,
    proxy: str,
    mandate: MandateProcess,
    creds: Credentials,
    n: int,
) -> int:
    """payments-agent holds no key: what it sends, what the upstreams receive and verify."""
    print(f"\n══ Credentials: the agent holds none ({PAYMENTS}, {PAYMENTS_PROFILE.name})")
    print(f"   mandate alone reads the Stripe key: the demo wrote sk_demo_… to {creds.secret_file}")
    print("   (in a cluster, a Secret mounted only into mandate's container); it mints Txn-Tokens")
    print(f"   for {AUDIT_HOST} with --txn-token-keys, served as {creds.jwks_url}")

    print(f"\n── {PAYMENTS} calls Stripe without any key; mandate adds it to the allowed call")
    call = Call(PAYMENTS, "POST", f"{STRIPE}/v1/payment_intents", "create a payment intent")
    before = len(creds.received)
    n += 1
    status, data = await _send(session, proxy, call)
    print(_row(n, call, status, data))
    _expect(status == 200, f"#{n} allowed, got {status}")
    arrived = creds.received[before:]
    _expect(
        [r["credentials"] for r in arrived] == [{"authorization": f"Bearer {creds.secret}"}],
        "the upstream to receive Bearer <the key in the secret file>",
    )
    shown = data.get("credentials", {}).get("authorization", "")
    _expect(_sha12(f"Bearer {creds.secret}") in shown and creds.secret not in json.dumps(data),
            "the upstream's answer to show only the key's fingerprint")  # fmt: skip
    print("   the agent sent:        no Authorization header, no key (headers of its own: none)")
    print(f"   the upstream received: authorization: {shown}")
    print("                          = 'Bearer ' + the key in mandate's secret file: mandate added")
    print("                          it; the agent never saw the value (the answer it read holds")
    print("                          only this fingerprint)")

    call = Call(PAYMENTS, "POST", f"{STRIPE}/v1/payouts", "payouts are not 'collect'")
    before = len(creds.received)
    n += 1
    status, data = await _send(session, proxy, call)
    print(_row(n, call, status, data))
    _expect(status == 403 and len(creds.received) == before, f"#{n} denied and never sent")
    print("   the upstream received nothing for this call: no request, so no key")

    print(f"\n── {PAYMENTS} records the payment in an internal service that verifies a Txn-Token")
    call = Call(
        PAYMENTS, "POST", f"{AUDIT}/v1/entries", "a Txn-Token the agent sends is replaced",
        headers={"x-mandate-task": "INV-42", "Txn-Token": "forged.by.the-agent"},
    )  # fmt: skip
    n += 1
    status, data = await _send(session, proxy, call)
    print(_row(n, call, status, data))
    _expect(status == 200 and "verified" in data, f"#{n} allowed and verified, got {status} {data}")
    v = data["verified"]
    decision = data["mandate"]["x-mandate-decision"]
    _expect(v["txn"] == decision and v["scope"] == "collect", "txn = decision id, scope = purpose")
    print(f"   {AUDIT_HOST} verified it with PyJWT against the JWKS it fetched from mandate:")
    print(f"     header  typ {v['typ']}, alg {v['alg']}, kid {v['kid']} (signature checked)")
    print(f"     iss     {v['iss']}   aud {v['aud']} (its own name)")
    print(f"     exp     iat + {v['exp'] - v['iat']} s")
    print(f"     sub     {v['sub']}")
    print(f"     scope   {v['scope']}   (the purpose)")
    print(f"     txn     {v['txn']}   (the decision id, as x-mandate-decision)")
    print(f"     tctx    {json.dumps(v['tctx'])}")
    forged = jwt.encode(
        {"iss": ISSUER, "aud": AUDIT_HOST, "sub": v["sub"], "scope": "collect", "txn": "forged",
         "iat": int(time.time()), "exp": int(time.time()) + 30},
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
        headers={"kid": v["kid"], "typ": TXN_TOKEN_TYP},
    )  # fmt: skip
    async with session.post(
        f"http://127.0.0.1:{creds.upstream_port}/v1/entries",
        headers={"Host": AUDIT_HOST, "Txn-Token": forged},
    ) as resp:
        refused = await resp.json()
    _expect(resp.status == 401, f"a forged Txn-Token refused, got {resp.status}")
    print(f"   a token forged with another key (kid {v['kid']}), sent to the service directly:")
    print(f"     {resp.status} {refused['reason']}")

    print(f"\n── an operator revokes {PAYMENTS}: its calls get no credential from the next one on")
    print(f"   $ mandate revoke {PAYMENTS} --reason ...")
    _admin_cli(mandate, ["revoke", PAYMENTS, "--reason", "Key exfiltration attempt (INC-4420)"])
    before = len(creds.received)
    for call in (
        Call(PAYMENTS, "POST", f"{STRIPE}/v1/payment_intents", "same call as the first: no key"),
        Call(PAYMENTS, "POST", f"{AUDIT}/v1/entries", "no Txn-Token is minted",
             headers={"x-mandate-task": "INV-42"}),
    ):  # fmt: skip
        n += 1
        status, data = await _send(session, proxy, call)
        print(_row(n, call, status, data))
        _expect(status == 403 and data.get("error") == "revoked", f"#{n} denied: revoked")
    _expect(len(creds.received) == before, "nothing sent after the revocation")
    print("   the upstreams received nothing after the revocation: no key, no Txn-Token")
    return n


async def _play(
    envoy: EnvoyProcess, mandate: MandateProcess, context: str, creds: Credentials
) -> int:
    proxies = {agent: f"http://127.0.0.1:{port}" for agent, port in (
        (name.removeprefix("egress-"), port) for name, port in envoy.listeners.items()
    )}  # fmt: skip
    n = 0
    print("\n #  DECISION   AGENT          PURPOSE    METHOD CALL")
    print("                why — what mandate answered, or what the upstream received")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for title, calls in SCENES:
            print(f"\n── {title}")
            for call in calls:
                n += 1
                status, data = await _send(session, proxies[call.agent], call)
                print(_row(n, call, status, data))
        print("\n── an operator revokes billing-agent (INC-4412), then restores it")
        revoke = ["revoke", "billing-agent", "--reason", "Anomalous refund volume (INC-4412)"]
        for label, argv in (("revoke", revoke), ("restore", ["restore", "billing-agent"])):
            print(
                f"   $ mandate {' '.join(argv[:2])}{' --reason ...' if label == 'revoke' else ''}"
            )
            _admin_cli(mandate, argv)
            for call in (
                Call("billing-agent", "GET", f"{LEDGER}/v1/invoices/42", f"after {label}"),
                Call("research-agent", "GET", f"{ARXIV}/api/query?q=x", "other agents unaffected"),
            ):
                n += 1
                status, data = await _send(session, proxies[call.agent], call)
                print(_row(n, call, status, data))
        n = await _elevation_scene(session, proxies["billing-agent"], mandate, context, n)
        n = await _credentials_part(session, proxies[PAYMENTS], mandate, creds, n)
        print("\n── mandate stops: Envoy fails closed (failure_mode_allow: false)")
        mandate.stop()
        call = Call("billing-agent", "GET", f"{LEDGER}/v1/invoices/42", "same call as #1")
        status, data = await _send(session, proxies[call.agent], call)
        print(_row(n + 1, call, status, data))
    return 0


def _profiles(workdir: Path) -> tuple[Path, Path, str]:
    """The demo's profile directory (PROFILES' files and payments-agent's), the secret file
    only mandate reads, and the key in it."""
    secret = f"sk_demo_{secrets.token_hex(12)}"
    secret_file = workdir / "credentials" / "stripe" / "key"
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    profiles = workdir / "profiles"
    profiles.mkdir()
    for f in PROFILES.glob("*.yaml"):
        shutil.copy(f, profiles / f.name)
    payments = Template(PAYMENTS_PROFILE.read_text()).substitute(STRIPE_KEY_FILE=secret_file)
    (profiles / PAYMENTS_PROFILE.name).write_text(payments)
    return profiles, secret_file, secret


async def _main(keep: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mandate-demo-"))
    runner: web.AppRunner | None = None
    mandate: MandateProcess | None = None
    envoy: EnvoyProcess | None = None
    try:
        context = f"unix:{workdir / 'billing-agent.sock'}"
        profiles, secret_file, secret = _profiles(workdir)
        keys = workdir / "txn-token-keys"
        keys.mkdir()
        generate_key(keys / "demo.pem")
        mandate = start_mandate(
            profiles,
            workdir / "mandate",
            extra=[
                "--state-dir", str(workdir / "mandate" / "state"), "--namespace", "agents",
                "--context-api", f"billing-agent={context}",
                "--txn-token-keys", str(keys), "--txn-token-issuer", ISSUER,
            ],
        )  # fmt: skip
        jwks_url = f"http://127.0.0.1:{mandate.admin_port}/.well-known/jwks.json"
        runner, upstream_port = await start_verifying_upstream(
            TxnTokenVerifier(jwks_url, ISSUER), [AUDIT_HOST]
        )
        creds = Credentials(secret_file, secret, jwks_url, runner.app, upstream_port)
        config = render_envoy_config(
            ENVOY_DIR / "local.yaml",
            {
                "ADMIN_PORT": 0, "LISTEN_PORT": 0,
                "UPSTREAM_PORT": upstream_port, "MAX_BODY": 65536,
                "ACCESS_LOG": workdir / "envoy" / "access.log",
            },
            agents=["billing-agent", "research-agent", PAYMENTS],
            mandate_ports=mandate.grpc_ports,
        )  # fmt: skip
        envoy = start_envoy(config, workdir / "envoy", access_log=workdir / "envoy" / "access.log")
        print("mandate demo: every call below goes agent → Envoy → mandate (ext_authz) → upstream")
        print(f"  profiles: {PROFILES}")
        print(f"            + {PAYMENTS_PROFILE} (the Credentials part)")
        listeners = ", ".join(f"{name} on :{port}" for name, port in envoy.listeners.items())
        print(f"  Envoy listeners (one per agent 'pod'): {listeners}")
        print(
            f"  mandate: gRPC :{mandate.grpc_port}, admin http://127.0.0.1:{mandate.admin_port}/metrics"
        )
        code = await _play(envoy, mandate, context, creds)
        await asyncio.sleep(0.3)  # Envoy flushes its access log every 0.1 s
        print("\nEach decision also went to Envoy's access log with its decision id:")
        for rec in envoy.access_records()[-3:]:
            print(
                "  "
                + json.dumps(
                    {
                        k: rec.get(k)
                        for k in ("method", "authority", "path", "status", "mandate_decision_id")
                    }
                )
            )
        print(
            "\nTry one decision offline:  .venv/bin/mandate explain --profiles devstack/demo/profiles \\"
        )
        print(
            "    --agent billing-agent GET http://ledger.finance.svc.cluster.local/v1/ledger/admin/users"
        )
        return code
    finally:
        if envoy is not None:
            envoy.stop()
        if mandate is not None:
            mandate.stop()
        if runner is not None:
            await runner.cleanup()
        if keep:
            print(f"\nlogs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the logs and configs")
    args = parser.parse_args()
    try:
        return asyncio.run(_main(args.keep))
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
