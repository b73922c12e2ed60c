"""What a credential adds to a Check, end to end (issue 17): real Envoy + `mandate run`, one
stack per case, all up at once, their runs interleaved in rounds on the same machine.

Each case is the same allowed request (`GET /v1/invoices/42`, `Host:
ledger.finance.svc.cluster.local`, the demo profile's rule reconcile.allow[0], agent
billing-agent) with a profile that differs only in the credential of that host:

  none       no credential (the reference)
  secret     `secret: {file: ...}`: a static key, `Authorization: Bearer <key>`
  oauth      `oauth2ClientCredentials` against a local token endpoint (http on 127.0.0.1,
             in this script): fetched once when the profiles load, then served from the cache
  txn-ALG    `transactionToken` minted per call (`Txn-Token`), mandate started with
             `--txn-token-keys DIR --txn-token-issuer https://mandate.bench`, DIR holding one
             key made by `sidecar.credentials.keys.generate_key` (ALG: es256, eddsa, rs256;
             es384 on request)

Every mandate gets the same command line (`--txn-token-keys` too, an ES256 directory for the
cases without a Transaction Token), the demo profiles minus rate limits, 1 worker unless
--workers. Envoy runs bench/envoy-mandate(-http).yaml with two additions, written to the
work directory: a route that sends a request carrying `x-bench-probe` to the demo upstream
(devstack/demo/upstream.py, in a thread of this script), every other request getting the
usual `direct_response` 200 (the upstream's CPU is not measured: the credential is set on the
request by ext_authz before the router either way); and, over HTTP, the credential headers in
`allowed_upstream_headers` (as envoy/local-http.yaml has them).

Before measuring, for each stack: the allowed request gets 200 and the denied one mandate's
403 (`bench.lib.stack.verify`); a probe reaches the upstream with exactly the expected
credential (none; `Bearer <the key>`; `Bearer <the token the endpoint issued>`; a Txn-Token
verified with PyJWT against the JWKS mandate serves on its admin port: alg, kid, typ
txntoken+jwt, iss, aud = the host, scope = the purpose, txn = tctx.decision = the decision id
the upstream got, tctx.path, exp - iat = the ttl; two probes, two different tokens) and a
denied probe never arrives. Before every measured run one probe again checks the credential;
after the last round the OAuth endpoint must have issued no new token (the cache served every
call). Any check failing, a non-2xx or a denied Check under load aborts the run.

Each round runs every case in turn (the order rotating from round to round), each case
twice: --rate-duration s at a fixed --rate req/s (bench/openloop.py: every case under the same
load, so that their per-Check CPU compares; issue 17's goal is read there), then --duration s
closed loop (`wrk -t1 -c16`: throughput; the machine saturated, a case with a costlier Check
batches fewer Checks per wake-up, which raises its per-Check CPU beyond the credential's own
cost). Per run (`bench.lib.load.measure` plus): mandate CPU µs per Check (supervisor +
workers, over mandate's decisions), split into workers and supervisor, and Envoy CPU µs per
request, from the scheduler's nanoseconds (/proc/PID/task/*/schedstat) read right around the
load (/proc/PID/stat's 10 ms ticks are kept in the raw runs); req/s, p50/p99; the CPU used
meanwhile by processes other than this case's (the other, idle stacks reported apart). Per
case: the medians over rounds, and the paired per-round difference to `none` (round r of the
case minus round r of none): median, min and max.

Two in-process references, measured in this script before the stacks start: the gRPC
servicer's Check per case (the worker's CheckPipeline with its CredentialBroker, the
CheckResponse serialized; one thread, no Envoy, no gRPC server): what the credential costs in
Python itself; and `TxnTokenMinter.mint` per algorithm, on one thread and on two at once
(cryptography releases the GIL while it signs).

Issue 17's goal: ≤ +10 µs of CPU per Check for a static or cached credential. For minting, the
cost, and per-call minting against caching. Writes bench/results/credential_check[-http].
{json,md}. About 3 minutes by default. Needs `wrk`.
Run: python -m bench credential_check [--rate 1000] [--rate-duration 4] [--duration 4]
[--rounds 3] [--transport grpc|http] [--cases none,secret,...]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import yaml

from bench.lib import BENCH, PROFILES, RESULTS, BenchError
from bench.lib.load import WRK_SCRIPT, measure, run_openloop, run_wrk
from bench.lib.proc import cpu_seconds, process_tree, sigterm_as_interrupt, tree_cpu_seconds
from bench.lib.report import envoy_version, first_line, machine_base, package_version
from bench.lib.stack import (
    AGENT,
    ALLOWED_PATH,
    DENIED_PATH,
    HOST,
    RULE,
    TEMPLATES,
    MandateOptions,
    Stack,
    http_get,
    running_stack,
    verify,
)
from sidecar.headers import CREDENTIAL_HEADERS, DECISION_HEADER, TXN_TOKEN_HEADER

ISSUER = "https://mandate.bench"
CREDENTIAL = "ledger-cred"  # the credential's name in the profile
PURPOSE = "reconcile"  # the purpose of the benchmark request (the profile's defaultPurpose)
TXN_TTL_S = 30
OAUTH_EXPIRES_IN_S = 3600  # cached ~57 min, refreshed at ~48 min: never within a run
OAUTH_SCOPE = "ledger.read"
CLIENT_ID = "bench-client"
PROBE_HEADER = "x-bench-probe"
UPSTREAM_CLUSTER = "bench_upstream"
GOAL_ADDED_US = 10.0  # issue 17: static or cached credentials
NOISY_CPUS = 0.25  # others' CPUs above this: the figure is flagged


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str  # none | secret | oauth | txn
    alg: str = ""  # txn: the signing key's alg


CASES = {
    c.key: c
    for c in (
        Case("none", "no credential", "none"),
        Case("secret", "static secret (`secret`)", "secret"),
        Case("oauth", "cached OAuth token (`oauth2ClientCredentials`)", "oauth"),
        Case("txn-es256", "Txn-Token minted per call, ES256", "txn", "ES256"),
        Case("txn-eddsa", "Txn-Token minted per call, EdDSA", "txn", "EdDSA"),
        Case("txn-rs256", "Txn-Token minted per call, RS256", "txn", "RS256"),
        Case("txn-es384", "Txn-Token minted per call, ES384", "txn", "ES384"),
    )
}
DEFAULT_CASES = ("none", "secret", "oauth", "txn-es256", "txn-eddsa", "txn-rs256")


# ---------------------------------------------------------------- helpers in this process


class Helpers:
    """The demo upstream (every request it receives in ``received``, credential values
    included) and a local OAuth token endpoint (client credentials, HTTP Basic), one
    aiohttp event loop in a thread of this script. Both only answer probes and one token
    fetch per worker: they are idle while a case is measured."""

    def __init__(self, client_secret: str) -> None:
        self.client_secret = client_secret
        self.issued: list[str] = []
        self.refused: list[str] = []
        self.upstream_port = self.token_port = 0
        self.received: list[dict[str, Any]] = []
        self._runners: list[Any] = []
        self._thread: Any = None

    def start(self) -> None:
        from aiohttp import web

        from devstack.demo.upstream import RECEIVED, make_app
        from sidecar.loopthread import LoopThread

        upstream = make_app()
        self.received = upstream[RECEIVED]
        token = web.Application()
        token.router.add_post("/token", self._token)

        async def setup() -> None:
            ports = []
            for app in (upstream, token):
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                self._runners.append(runner)
                server: Any = site._server  # aiohttp has no public accessor for the port
                ports.append(int(server.sockets[0].getsockname()[1]))
            self.upstream_port, self.token_port = ports

        self._thread = LoopThread("bench-helpers")
        self._thread.start(setup)

    def stop(self) -> None:
        if self._thread is None:
            return

        async def cleanup() -> None:
            for runner in self._runners:
                await runner.cleanup()

        self._thread.stop(cleanup)

    async def _token(self, request: Any) -> Any:
        from aiohttp import web

        form = await request.post()
        basic = base64.b64encode(f"{CLIENT_ID}:{self.client_secret}".encode()).decode()
        if (
            request.headers.get("Authorization") != f"Basic {basic}"
            or form.get("grant_type") != "client_credentials"
            or form.get("scope") != OAUTH_SCOPE
        ):
            self.refused.append(str(sorted(form)))
            return web.json_response({"error": "invalid_client"}, status=401)
        token = f"bench-at-{secrets.token_urlsafe(24)}"
        self.issued.append(token)
        body = {"access_token": token, "token_type": "Bearer", "expires_in": OAUTH_EXPIRES_IN_S}
        return web.json_response(body)


# ---------------------------------------------------------------- configuration


def envoy_template(transport: str, upstream_port: int, work: Path) -> Path:
    """bench/envoy-mandate(-http).yaml plus the probe route to the demo upstream and, over
    HTTP, the credential headers passed from mandate's answer upstream; a template still
    (its ${...} placeholders kept), written to ``work``."""
    text = (BENCH / TEMPLATES[transport]).read_text()
    doc = yaml.safe_load(re.sub(r"\$\{(\w+)\}", r"__PH_\1__", text))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm = hcm["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    probe = {"name": PROBE_HEADER, "present_match": True}
    routes.insert(
        0,
        {"match": {"prefix": "/", "headers": [probe]}, "route": {"cluster": UPSTREAM_CLUSTER}},
    )
    doc["static_resources"]["clusters"].append(
        {
            "name": UPSTREAM_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "load_assignment": {
                "cluster_name": UPSTREAM_CLUSTER,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": upstream_port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    if transport == "http":
        authz = next(
            f["typed_config"]
            for f in hcm["http_filters"]
            if f["name"] == "envoy.filters.http.ext_authz"
        )
        patterns = authz["http_service"]["authorization_response"]["allowed_upstream_headers"][
            "patterns"
        ]
        have = {p.get("exact") for p in patterns}
        patterns += [{"exact": h} for h in CREDENTIAL_HEADERS if h not in have]
    out = re.sub(r"__PH_(\w+)__", r"${\1}", yaml.safe_dump(doc, sort_keys=False))
    path = work / f"envoy-credential-{transport}.yaml"
    path.write_text(
        f"# Written by bench/credential_check.py from bench/{TEMPLATES[transport]}: plus a "
        f"route for requests with {PROBE_HEADER} to the demo upstream"
        + (" and the credential headers upstream" if transport == "http" else "")
        + ".\n"
        + out
    )
    return path


def credential_spec(case: Case, files: dict[str, Path], token_port: int) -> dict[str, Any] | None:
    if case.kind == "none":
        return None
    spec: dict[str, Any] = {"hosts": [f"{HOST}:80"]}  # plain HTTP to the bench upstream
    if case.kind == "secret":
        spec["secret"] = {"file": str(files["secret"])}
    elif case.kind == "oauth":
        spec["oauth2ClientCredentials"] = {
            "tokenUrl": f"http://127.0.0.1:{token_port}/token",
            "clientIdFile": str(files["client_id"]),
            "clientSecretFile": str(files["client_secret"]),
            "scopes": [OAUTH_SCOPE],
        }
    else:
        spec["transactionToken"] = {"ttl": f"{TXN_TTL_S}s"}
    return spec


def write_profiles(target: Path, credential: dict[str, Any] | None) -> Path:
    """The demo profiles without rate limits, AGENT's with ``credential`` (if any) as its
    only credential, into ``target``."""
    target.mkdir(parents=True)
    found = False
    for f in sorted(PROFILES.glob("*.y*ml")):
        docs = list(yaml.safe_load_all(f.read_text()))
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec") or {}
            for purpose in (spec.get("purposes") or {}).values():
                purpose.pop("rateLimit", None)
            if doc.get("metadata", {}).get("name") == AGENT:
                found = True
                spec.pop("credentials", None)
                if credential is not None:
                    spec["credentials"] = {CREDENTIAL: credential}
        (target / f.name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    if not found:
        raise BenchError(f"no profile for {AGENT} in {PROFILES}")
    return target


# ---------------------------------------------------------------- probes


def probe(port: int, path: str) -> tuple[int, str]:
    """One GET through Envoy with the benchmark's Host and the probe header (routed to the
    demo upstream if mandate allows it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3.0)
    try:
        conn.request("GET", path, headers={"Host": HOST, PROBE_HEADER: "1"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def _arrived(helpers: Helpers, name: str, path: str, before: int) -> dict[str, Any]:
    got = [r for r in helpers.received[before:] if r["path"] == path]
    if len(got) != 1:
        raise BenchError(f"{name}: the upstream received {len(got)} probes of {path}, not 1")
    return got[0]


def verify_txn(
    name: str, token: str, alg: str, decision: str, jwks: dict[str, Any]
) -> dict[str, Any]:
    """The Txn-Token verified against mandate's JWKS (PyJWT); its claims."""
    try:
        header = jwt.get_unverified_header(token)
        jwk = next(k for k in jwks["keys"] if k.get("kid") == header.get("kid"))
        key = jwt.PyJWK(jwk)
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=[alg], audience=HOST, issuer=ISSUER
        )
    except (jwt.PyJWTError, StopIteration, KeyError) as exc:
        raise BenchError(
            f"{name}: the Txn-Token does not verify against the JWKS: {exc!r}"
        ) from None
    tctx = claims.get("tctx") or {}
    problems = [
        what
        for what, ok in (
            (f"typ {header.get('typ')!r}", header.get("typ") == "txntoken+jwt"),
            (f"alg {header.get('alg')!r}", header.get("alg") == alg),
            (f"scope {claims.get('scope')!r}", claims.get("scope") == PURPOSE),
            (f"txn {claims.get('txn')!r} vs decision {decision!r}", claims.get("txn") == decision),
            (f"tctx.decision {tctx.get('decision')!r}", tctx.get("decision") == decision),
            (f"tctx.path {tctx.get('path')!r}", tctx.get("path") == ALLOWED_PATH),
            (f"tctx.method {tctx.get('method')!r}", tctx.get("method") == "GET"),
            (
                f"exp - iat = {claims.get('exp', 0) - claims.get('iat', 0)}",
                claims.get("exp", 0) - claims.get("iat", 0) == TXN_TTL_S,
            ),
        )
        if not ok
    ]
    if problems:
        raise BenchError(f"{name}: unexpected Txn-Token: {', '.join(problems)}")
    return claims


def check_credential(
    case: Case, stack: Stack, helpers: Helpers, secret: str, *, full: bool
) -> dict[str, Any]:
    """Abort unless a probe of the allowed request reaches the upstream with exactly this
    case's credential (and, ``full``: a Txn-Token verified against the JWKS, minted per call;
    a denied probe never arrives). What was seen, without credential values."""
    port = stack.envoy.port
    tries = 2 if full and case.kind == "txn" else 1
    seen: list[dict[str, Any]] = []
    for _ in range(tries):
        before = len(helpers.received)
        status, body = probe(port, ALLOWED_PATH)
        if status != 200:
            raise BenchError(f"{case.key}: probe of {ALLOWED_PATH} gave {status}: {body[:300]}")
        seen.append(_arrived(helpers, case.key, ALLOWED_PATH, before))
        shown = json.loads(body).get("credentials", {})
        if set(shown) != set(seen[-1]["credentials"]):
            raise BenchError(f"{case.key}: the upstream's answer shows {sorted(shown)}")
    creds = seen[-1]["credentials"]
    decision = seen[-1]["mandate"].get(DECISION_HEADER, "")
    out: dict[str, Any] = {"headers": sorted(creds), "decision_header": bool(decision)}
    if case.kind == "none":
        if creds:
            raise BenchError(f"{case.key}: the upstream received credentials {sorted(creds)}")
    elif case.kind in ("secret", "oauth"):
        if case.kind == "secret":
            wanted = {f"Bearer {secret}"}
        else:  # one of the tokens the endpoint issued (one per process that fetched)
            wanted = {f"Bearer {t}" for t in helpers.issued}
        if set(creds) != {"authorization"} or creds["authorization"] not in wanted:
            got = {k: f"{len(v)} characters" for k, v in creds.items()}
            raise BenchError(
                f"{case.key}: the upstream received {got}, not the expected Authorization "
                f"({len(wanted)} candidate values)"
            )
        out["value_bytes"] = len(creds["authorization"])
    else:
        if set(creds) != {TXN_TOKEN_HEADER}:
            raise BenchError(f"{case.key}: the upstream received {sorted(creds)}, no Txn-Token")
        out["value_bytes"] = len(creds[TXN_TOKEN_HEADER])
        if full:
            assert stack.mandate is not None
            jwks = json.loads(
                http_get(f"http://127.0.0.1:{stack.mandate.admin_port}/.well-known/jwks.json")
            )
            claims = [
                verify_txn(case.key, s["credentials"][TXN_TOKEN_HEADER], case.alg,
                           s["mandate"].get(DECISION_HEADER, ""), jwks)
                for s in seen
            ]  # fmt: skip
            if len({s["credentials"][TXN_TOKEN_HEADER] for s in seen}) != len(seen) or len(
                {c["txn"] for c in claims}
            ) != len(seen):
                raise BenchError(f"{case.key}: two calls got the same Txn-Token (not per call)")
            out["claims"] = sorted(claims[-1])
            out["tctx"] = sorted(claims[-1]["tctx"])
            out["verified"] = f"PyJWT {jwt.__version__} against the served JWKS"
    if full:
        before = len(helpers.received)
        status, body = probe(port, DENIED_PATH)
        if status != 403 or any(r["path"] == DENIED_PATH for r in helpers.received[before:]):
            raise BenchError(f"{case.key}: a denied probe was not stopped ({status})")
    return out


# ---------------------------------------------------------------- measuring


def _runtime_s(pid: int) -> float:
    """CPU time of every thread of ``pid``, in seconds, from /proc/PID/task/*/schedstat (the
    scheduler's nanoseconds, not /proc/PID/stat's 10 ms ticks); 0 if it is gone. A thread
    that exits meanwhile takes its time with it (Envoy's and mandate's live as long as they)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e9


def _runtimes(stack: Stack) -> tuple[float, float, float]:
    """(Envoy, mandate's supervisor, mandate's workers) CPU seconds, schedstat."""
    assert stack.mandate is not None
    pid = stack.mandate.proc.pid
    workers = sum(_runtime_s(p) for p in process_tree(pid) if p != pid)
    return _runtime_s(stack.envoy.proc.pid), _runtime_s(pid), workers


def stack_cpu(stack: Stack) -> float:
    cpu = cpu_seconds(stack.envoy.proc.pid)
    if stack.mandate is not None:
        cpu += tree_cpu_seconds(stack.mandate.proc.pid)
    return cpu


def measure_run(
    case: Case, stack: Stack, idle: list[Stack], load: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """One load against ``stack`` (`measure`: requests, Checks, /proc CPU), plus the CPU of
    Envoy and mandate in the scheduler's nanoseconds right around the load (``sched_*``,
    what the tables show), the CPU the other (idle) stacks used meanwhile, and others' CPUs
    without them."""
    sched: dict[str, float] = {}

    def timed() -> dict[str, Any]:
        e0, s0, w0 = _runtimes(stack)
        out = load()
        e1, s1, w1 = _runtimes(stack)
        sched.update(envoy=e1 - e0, supervisor=s1 - s0, workers=w1 - w0)
        return out

    idle0 = sum(stack_cpu(s) for s in idle)
    wall0 = time.monotonic()
    result = measure(stack.envoy, stack.mandate, timed)
    wall = time.monotonic() - wall0
    idle_cpu = sum(stack_cpu(s) for s in idle) - idle0
    result["idle_stacks_cpu_s"] = idle_cpu
    result["idle_stacks_cpus"] = idle_cpu / wall if wall > 0 else None
    if result.get("other_cpus") is not None and wall > 0:
        result["other_cpus_without_idle_stacks"] = result["other_cpus"] - idle_cpu / wall
    checks, served = result.get("checks") or 0, result.get("envoy_requests") or 0
    man = sched["supervisor"] + sched["workers"]
    result["sched_mandate_cpu_s"] = man
    result["sched_mandate_us_per_check"] = man / checks * 1e6 if checks else None
    result["sched_workers_us_per_check"] = sched["workers"] / checks * 1e6 if checks else None
    result["sched_supervisor_us_per_check"] = sched["supervisor"] / checks * 1e6 if checks else None
    result["sched_envoy_us_per_request"] = sched["envoy"] / served * 1e6 if served else None
    errors = result["non_2xx"] + result.get("incomplete", 0)
    if errors or result.get("checks_denied"):
        raise BenchError(
            f"{case.key}: {errors} non-2xx or unanswered, {result.get('checks_denied')} "
            "denied Checks under load: not the allowed path being measured"
        )
    return result


def mint_reference(keydirs: dict[str, Path], repeats: int = 5) -> dict[str, Any]:
    """In-process `TxnTokenMinter.mint` per algorithm, the claims a Check's token has: µs of
    CPU per token (this process's user + system time), median of ``repeats``; on 1 thread,
    and on 2 threads at once (a Check worker's default: cryptography releases the GIL while
    it signs, and the threads then hand the GIL back and forth)."""
    from sidecar.credentials.keys import SigningKeys
    from sidecar.credentials.txntoken import TxnTokenMinter

    out: dict[str, Any] = {}
    for alg, directory in keydirs.items():
        minter = TxnTokenMinter(SigningKeys(directory), ISSUER)
        number = 100 if alg == "RS256" else 1000
        tctx = {"decision": "0" * 32, "method": "GET", "path": ALLOWED_PATH}

        def mint_many(minter: Any = minter, number: int = number, tctx: Any = tctx) -> None:
            for _ in range(number):
                minter.mint(
                    sub="spiffe://cluster.local/ns/agents/sa/billing-agent", aud=HOST,
                    scope=PURPOSE, tctx=tctx, txn="0" * 32, ttl=TXN_TTL_S,
                )  # fmt: skip

        row: dict[str, Any] = {}
        for threads in (1, 2):
            samples = []
            for _ in range(repeats):
                pool = [threading.Thread(target=mint_many) for _ in range(threads)]
                t0 = time.process_time()
                for t in pool:
                    t.start()
                for t in pool:
                    t.join()
                samples.append((time.process_time() - t0) / (number * threads) * 1e6)
            row[f"threads_{threads}"] = {"median_us": statistics.median(samples),
                                         "samples_us": samples}  # fmt: skip
        row["median_us"] = row["threads_1"]["median_us"]
        out[alg] = row
    return out


def check_request() -> Any:
    """The benchmark request as Envoy's ext_authz gRPC client sends it (wrk's headers)."""
    from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

    ctx = attribute_context_pb2.AttributeContext
    headers = {
        ":authority": HOST,
        ":path": ALLOWED_PATH,
        ":method": "GET",
        ":scheme": "http",
        "x-forwarded-proto": "http",
        "x-request-id": "6a4a1f9e-6c1b-4e0e-9c47-2a6f1d1f7b11",
    }
    http = ctx.HttpRequest(
        id="1", method="GET", headers=headers, path=ALLOWED_PATH, host=HOST, scheme="http",
        protocol="HTTP/1.1",
    )  # fmt: skip
    return external_auth_pb2.CheckRequest(
        attributes=ctx(request=ctx.Request(http=http), context_extensions={"agent": AGENT})
    )


def pipeline_reference(
    cases: list[Case], profiles: dict[str, Path], keydirs: dict[str, Path], repeats: int = 5
) -> dict[str, Any]:
    """In-process, no Envoy, no gRPC server: the gRPC servicer's Check (the worker's
    pipeline with its credential broker: decide, the credential, the CheckResponse,
    serialized) on one thread, per case: CPU µs per Check, median of ``repeats``, the cases
    interleaved. What the credential costs in Python, apart from what it costs around it."""
    from sidecar.check.grpc_transport import AuthorizationServicer
    from sidecar.check.pipeline import CheckPipeline
    from sidecar.check.request import Identity
    from sidecar.core.loader import load_profiles
    from sidecar.credentials.broker import CredentialBroker

    req = check_request()
    servicers: dict[str, Any] = {}
    brokers = []
    for case in cases:
        snap = load_profiles(profiles[case.key])
        broker = CredentialBroker(
            namespace="agents", txn_keys=keydirs[case.alg or "ES256"], issuer=ISSUER, wait=2.0
        )
        broker.prepare(snap)
        brokers.append(broker)
        pipeline = CheckPipeline(lambda snap=snap: snap, Identity(agent=AGENT), broker=broker)
        servicers[case.key] = AuthorizationServicer(pipeline)
    samples: dict[str, list[float]] = {c.key: [] for c in cases}
    try:
        for case in cases:  # every answer an allow with the case's credential header
            resp = servicers[case.key].Check(req, None)
            names = {h.header.key for h in resp.ok_response.headers}
            want = {"none": set(), "txn": {TXN_TOKEN_HEADER}}.get(case.kind, {"authorization"})
            if resp.status.code != 0 or names & set(CREDENTIAL_HEADERS) != want:
                raise BenchError(f"{case.key}: in-process Check gave {resp.status} {names}")
        for r in range(repeats):
            for case in cases if r % 2 == 0 else cases[::-1]:
                check = servicers[case.key].Check
                number = 300 if case.alg == "RS256" else 2000
                t0 = time.process_time()
                for _ in range(number):
                    check(req, None).SerializeToString()
                samples[case.key].append((time.process_time() - t0) / number * 1e6)
    finally:
        for broker in brokers:
            broker.close()
    out: dict[str, Any] = {}
    for case in cases:
        med = statistics.median(samples[case.key])
        out[case.key] = {"median_us": med, "samples_us": samples[case.key]}
        if "none" in samples and case.key != "none":
            out[case.key]["added_us"] = med - statistics.median(samples["none"])
    return out


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


# What each mode's summary keeps per round (name -> the run's field).
FIELDS = {
    "rps": "rps",
    "mandate_us": "sched_mandate_us_per_check",
    "workers_us": "sched_workers_us_per_check",
    "supervisor_us": "sched_supervisor_us_per_check",
    "envoy_us": "sched_envoy_us_per_request",
    "mandate_us_ticks": "mandate_cpu_us_per_check",
    "p50_us": "p50_us",
    "p99_us": "p99_us",
    "other_cpus": "other_cpus_without_idle_stacks",
    "idle_stacks_cpus": "idle_stacks_cpus",
    "machine_busy_pct": "machine_busy_pct",
}
ADDED = ("mandate_us", "workers_us", "supervisor_us", "envoy_us", "p50_us", "p99_us")


def summarize(
    cases: list[Case], runs: dict[str, list[dict[str, Any]]], probes: dict[str, Any]
) -> dict[str, Any]:
    """Per case, the runs of one mode: medians over the rounds and, against `none`, the
    paired per-round differences (median, min, max)."""
    base = runs.get("none")
    out: dict[str, Any] = {}
    for case in cases:
        rs = runs[case.key]
        s: dict[str, Any] = {
            "label": case.label,
            "kind": case.kind,
            "alg": case.alg or None,
            "rounds": len(rs),
            "checks": sum(r.get("checks") or 0 for r in rs),
            "per_round": {k: [r.get(v) for r in rs] for k, v in FIELDS.items()},
            "credential_bytes": probes.get(case.key, {}).get("value_bytes"),
        }
        for k in FIELDS:
            s[k] = _median(s["per_round"][k])
        cpu = sum(r["sched_mandate_cpu_s"] for r in rs)
        s["mandate_us_pooled"] = cpu / s["checks"] * 1e6 if s["checks"] else None
        if base is not None and case.key != "none":
            for k in ADDED:
                f = FIELDS[k]
                added = [
                    b[f] - a[f]
                    for a, b in zip(base, rs, strict=True)
                    if a.get(f) is not None and b.get(f) is not None
                ]
                s[f"added_{k}"] = (
                    {"median": statistics.median(added), "min": min(added), "max": max(added),
                     "per_round": added}
                    if added
                    else None
                )  # fmt: skip
            ratios = [b["rps"] / a["rps"] for a, b in zip(base, rs, strict=True) if a["rps"]]
            s["rps_vs_none"] = statistics.median(ratios) if ratios else None
            if case.kind in ("secret", "oauth") and s["added_mandate_us"]:
                s["goal_met"] = s["added_mandate_us"]["median"] <= GOAL_ADDED_US
        out[case.key] = s
    return out


# ---------------------------------------------------------------- report


def _f(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _added(a: dict[str, Any] | None, fmt: str = "{:+.1f}") -> str:
    if not a:
        return "-"
    return f"{fmt.format(a['median'])} ({a['min']:+.0f} … {a['max']:+.0f})"


def _goal(s: dict[str, Any]) -> str:
    if "goal_met" not in s:
        return "-"
    return f"≤ +{GOAL_ADDED_US:g} µs: " + ("met" if s["goal_met"] else "**missed**")


def _worst(s: dict[str, Any]) -> float | None:
    got = [v for v in s["per_round"]["other_cpus"] if v is not None]
    return max(got) if got else None


def _noise(s: dict[str, Any]) -> str:
    """Others' CPUs: the median over rounds and the worst round, flagged above NOISY_CPUS."""
    worst = _worst(s)
    flag = " ⚠" if worst is not None and worst > NOISY_CPUS else ""
    return f"{_f(s.get('other_cpus'), '{:.2f}')} ({_f(worst, '{:.2f}')}){flag}"


def noisy_runs(summaries: dict[str, Any]) -> list[str]:
    """'mode round N case (others' CPUs)' for every run above NOISY_CPUS."""
    out = []
    for mode, summary in summaries.items():
        for key, s in summary.items():
            for r, v in enumerate(s["per_round"]["other_cpus"]):
                if v is not None and v > NOISY_CPUS:
                    out.append(f"{mode} round {r + 1} {key} ({v:.2f})")
    return out


def rate_table(summary: dict[str, Any], pipeline: dict[str, Any]) -> list[str]:
    lines = [
        "| case | mandate CPU µs/Check | **added µs/Check** | workers µs (added) | supervisor "
        "µs | in-process µs/Check (added) | Envoy CPU µs/req (added) | p50 / p99 µs (added "
        "p50) | credential header bytes | others' CPUs (worst round) | goal |",
        "|" + "---|" * 11,
    ]
    for key, s in summary.items():
        base = key == "none"
        p50 = s.get("added_p50_us")
        ref = pipeline.get(key) or {}
        lines.append(
            f"| {s['label']} | {_f(s['mandate_us'], '{:.1f}')} "
            f"| {'-' if base else _added(s.get('added_mandate_us'))} "
            f"| {_f(s['workers_us'], '{:.1f}')} "
            f"({'-' if base else _added(s.get('added_workers_us'))}) "
            f"| {_f(s['supervisor_us'], '{:.1f}')} "
            f"| {_f(ref.get('median_us'), '{:.1f}')} ({_f(ref.get('added_us'), '{:+.1f}')}) "
            f"| {_f(s['envoy_us'], '{:.1f}')} "
            f"({'-' if base else _added(s.get('added_envoy_us'))}) "
            f"| {_f(s['p50_us'])} / {_f(s['p99_us'])} "
            f"({'-' if base or not p50 else _f(p50['median'], '{:+,.0f}')}) "
            f"| {_f(s.get('credential_bytes'), '{:d}')} | {_noise(s)} | {_goal(s)} |"
        )
    return lines


def loaded_table(info: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    c = info["connections"]
    lines = [
        f"| case | req/s (c={c}) | vs none | mandate CPU µs/Check | added µs/Check | workers "
        "µs (added) | Envoy CPU µs/req (added) | others' CPUs (worst round) | goal |",
        "|" + "---|" * 9,
    ]
    for key, s in summary.items():
        base = key == "none"
        lines.append(
            f"| {s['label']} | {_f(s['rps'])} | {_f(s.get('rps_vs_none'), '{:.0%}')} "
            f"| {_f(s['mandate_us'], '{:.1f}')} "
            f"| {'-' if base else _added(s.get('added_mandate_us'))} "
            f"| {_f(s['workers_us'], '{:.1f}')} "
            f"({'-' if base else _added(s.get('added_workers_us'))}) "
            f"| {_f(s['envoy_us'], '{:.1f}')} "
            f"({'-' if base else _added(s.get('added_envoy_us'))}) "
            f"| {_noise(s)} | {_goal(s)} |"
        )
    return lines


def _rounds(summary: dict[str, Any], name: str, fmt: str = "{:.0f}") -> str:
    return "; ".join(
        f"{k} " + " / ".join(_f(v, fmt) for v in s["per_round"][name]) for k, s in summary.items()
    )


def recommendation(rate: dict[str, Any], loaded: dict[str, Any], mint: dict[str, Any]) -> list[str]:
    """Per-call minting vs caching, from this run's numbers."""
    none = rate.get("none")
    txn = {k: s for k, s in rate.items() if s["kind"] == "txn" and s.get("added_mandate_us")}
    if none is None or not txn:
        return []
    cached = [rate[k]["added_mandate_us"]["median"] for k in ("oauth", "secret") if k in rate]
    ref = max(0.0, min(cached)) if cached else 0.0
    lines = ["", "**Per-call minting or caching** (fixed-rate figures unless said):"]
    for key, s in txn.items():
        added = s["added_mandate_us"]["median"]
        share = added / none["mandate_us"] if none.get("mandate_us") else None
        m = mint.get(s["alg"], {})
        ld = loaded.get(key, {})
        lines.append(
            f"- {s['alg']}: minting per call adds {added:+.0f} µs of mandate CPU per Check "
            f"({_f(share, '{:+.0%}')} of a Check without credential; closed loop "
            f"{_f((ld.get('added_mandate_us') or {}).get('median'), '{:+.0f}')} µs, throughput "
            f"{_f(ld.get('rps_vs_none'), '{:.0%}')} of `none`) and "
            f"{_f((s.get('added_envoy_us') or {}).get('median'), '{:+.0f}')} µs of Envoy CPU "
            f"(a {_f(s.get('credential_bytes'), '{:d}')}-byte header); `TxnTokenMinter.mint` "
            f"in-process: {_f(m.get('median_us'), '{:.0f}')} µs on one thread, "
            f"{_f((m.get('threads_2') or {}).get('median_us'), '{:.0f}')} µs CPU per token on "
            f"two threads at once. A cache (agent, purpose, task, audience; a few seconds) "
            f"would cost about what a cached token costs ({ref:+.0f} µs here): it would save "
            "about "
            f"{added - ref:.0f} µs per Check."
        )
    return lines


def markdown(info: dict[str, Any], summaries: dict[str, Any], extra: dict[str, Any]) -> str:
    t = info["transport"]
    rate, loaded = summaries["rate"], summaries["loaded"]
    lines = [
        f"# Credential cost per Check, end to end ({'gRPC' if t == 'grpc' else 'HTTP'} transport)",
        "",
        "Written by `python -m bench credential_check`; see its docstring and bench/README.md. "
        "Real Envoy + `mandate run` (1 worker), one stack per case, all up at once; "
        f"{info['rounds']} rounds, each running every case in turn (order rotating): "
        f"{info['rate_duration_s']:g} s at a fixed {info['rate']:g} req/s (openloop, "
        f"{info['rate_connections']} connections), then {info['duration_s']:g} s closed loop "
        f"(`wrk -t1 -c{info['connections']}`). CPU from the scheduler (ns, "
        "/proc/PID/task/*/schedstat) right around each load, over the Checks mandate counted "
        "(/metrics) or the requests Envoy served. Medians over rounds; **added** = the paired "
        "per-round difference to `none`: median (min … max).",
        "",
        f"At a fixed {info['rate']:g} req/s (every case under the same load; issue 17's goal "
        "is read here):",
        "",
        *rate_table(rate, extra.get("pipeline_reference") or {}),
        "",
        "*in-process*: the gRPC servicer's Check run by this script on one thread (the "
        "worker's pipeline with its credential broker, the CheckResponse serialized; no Envoy, "
        "no gRPC server), median of 5: what the credential costs in Python itself. The rest "
        "of a Check's CPU in the worker is gRPC, its wake-ups and threads.",
        "",
        f"Closed loop, wrk -c{info['connections']} (throughput; the machine is saturated, and "
        "a case with a costlier Check batches fewer Checks per wake-up, which raises its "
        "per-Check CPU beyond the credential's own cost):",
        "",
        *loaded_table(info, loaded),
        "",
        f"mandate CPU µs per Check, every round, fixed rate: {_rounds(rate, 'mandate_us')}. "
        f"Closed loop: {_rounds(loaded, 'mandate_us')}. req/s, closed loop: "
        f"{_rounds(loaded, 'rps', '{:,.0f}')}.",
    ]
    mint = extra.get("mint_reference") or {}
    if mint:
        lines.append(
            "In-process `TxnTokenMinter.mint` in this run, CPU µs per token (median of 5), "
            "1 thread / 2 threads at once: "
            + ", ".join(
                f"{alg} {m['threads_1']['median_us']:.1f} / {m['threads_2']['median_us']:.1f}"
                for alg, m in mint.items()
            )
            + "."
        )
    lines += recommendation(rate, loaded, mint)
    oauth = extra.get("oauth")
    checks = extra.get("verified", {})
    lines += [
        "",
        "**Verified before measuring** (every case; aborts otherwise): the allowed request 200 "
        f"({RULE}), the denied one mandate's 403; a probe routed to the demo upstream arrives "
        "with exactly the case's credential (`none`: no credential header; `secret`: "
        "`Authorization: Bearer <the key>`; `oauth`: `Bearer <the token the local endpoint "
        "issued>`; Txn-Tokens verified with PyJWT against the JWKS mandate serves: alg, kid, "
        f"typ txntoken+jwt, iss {ISSUER}, aud = the host, scope, txn = tctx.decision = the "
        f"decision id the upstream got, tctx.path and method, exp - iat = {TXN_TTL_S} s; two "
        "calls, two tokens); a denied probe never arrives. Re-checked by a probe before every "
        "measured run and after the last. No non-2xx answer and no denied Check under load. "
        + (
            f"OAuth token endpoint: {oauth['issued_before']} token(s) issued to mandate when "
            f"its profiles loaded ({oauth.get('issued_in_process', 0)} to the in-process "
            f"reference), {oauth['issued_during']} during the measurements (the cache served "
            "every call), "
            f"{oauth['refused']} refused requests. "
            if oauth
            else ""
        )
        + "Credential headers seen: "
        + ", ".join(f"{k} {v['headers'] or '[]'}" for k, v in checks.items())
        + ".",
        "",
        f"Load average before / after the run: {info['loadavg_before']} / "
        f"{info.get('loadavg_after', '?')}. *others' CPUs*: CPUs used during a case's runs "
        "by processes other than its Envoy, its mandate, the load generator and this script, "
        "and other than the idle stacks of the other cases (those used "
        + ", ".join(f"{k} {_f(s.get('idle_stacks_cpus'), '{:.2f}')}" for k, s in rate.items())
        + f" CPUs meanwhile, fixed rate); ⚠ above {NOISY_CPUS} CPU in a round: other work on "
        "the machine (e.g. test suites) during it"
        + (
            f"; such runs: {', '.join(noisy_runs(summaries))} (the medians over rounds and the "
            "paired differences' medians are what the tables give; min … max include them)."
            if noisy_runs(summaries)
            else "; none in this run."
        ),
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpus_available']} available), "
        f"{info['cpu_model']}, Linux {info['kernel']}; Python {info['python']}, grpcio "
        f"{info['grpcio']}, PyJWT {info['pyjwt']}, cryptography {info['cryptography']}, Envoy "
        f"{info['envoy']} (--concurrency 1), {info['wrk']}; pinning: {info['pinning']}; "
        f"mandate transport {t}, workers {info['mandate_workers']}, threads "
        f"{info['mandate_threads']}; warm-up {info['warmup_s']:g} s per case; {info['request']}; "
        f"git {info['git_commit']}; {info['date']}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **machine_base(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "grpcio": package_version("grpcio"),
        "protobuf": package_version("protobuf"),
        "pyjwt": package_version("PyJWT"),
        "cryptography": package_version("cryptography"),
        "envoy": envoy_version(),
        "wrk": first_line(["wrk", "--version"]).split(" Copyright")[0],
        "envoy_concurrency": 1,
        "transport": args.transport,
        "mandate_workers": args.workers if args.workers is not None else 1,
        "mandate_threads": args.threads if args.threads is not None else "default",
        "rate": args.rate,
        "rate_duration_s": args.rate_duration,
        "rate_connections": args.rate_connections,
        "duration_s": args.duration,
        "connections": args.connections,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "cases": args.cases,
        "txn_token_issuer": ISSUER,
        "txn_ttl_s": TXN_TTL_S,
        "oauth_expires_in_s": OAUTH_EXPIRES_IN_S,
        "cpu_source": "/proc/PID/task/*/schedstat (ns) around the load; /proc/PID/stat ticks "
        "in the raw runs (mandate_cpu_us_per_check)",
        "request": f"GET http://{HOST}{ALLOWED_PATH} (Host header, origin-form)",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench credential_check",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--rate", type=float, default=1000.0, help="fixed rate, req/s (default 1000)")
    p.add_argument(
        "--rate-duration", type=float, default=4.0, help="seconds per fixed-rate run (default 4)"
    )
    p.add_argument(
        "--rate-connections", type=int, default=8, help="openloop connections (default 8)"
    )
    p.add_argument(
        "--duration", type=float, default=4.0, help="seconds per closed-loop run (default 4)"
    )
    p.add_argument(
        "--connections", type=int, default=16, help="closed loop: wrk connections (default 16)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per case")
    p.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated, of {', '.join(CASES)} (default: {','.join(DEFAULT_CASES)})",
    )
    p.add_argument(
        "--transport", choices=("grpc", "http"), default="grpc", help="ext_authz transport"
    )
    p.add_argument("--workers", type=int, help="mandate's Check worker processes (default 1)")
    p.add_argument("--threads", type=int, help="mandate's Check threads (default: mandate's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        p.error(f"--cases: unknown {unknown}; known: {', '.join(CASES)}")
    args.cases = list(dict.fromkeys(names))
    for name in ("duration", "rate_duration"):
        if not 0 < getattr(args, name) <= 600:
            p.error(f"--{name.replace('_', '-')}: expected 0 < seconds <= 600")
    if not 0 < args.rate <= 20000 or not 1 <= args.rounds <= 50:
        p.error("--rate: 0..20000 req/s; --rounds: 1..50")
    if not 0 <= args.warmup <= 60 or not 1 <= args.connections <= 1000:
        p.error("--warmup: 0..60 s; --connections: 1..1000")
    if not 1 <= args.rate_connections <= 500:
        p.error("--rate-connections: 1..500")
    return args


@contextmanager
def helpers_running(client_secret: str) -> Iterator[Helpers]:
    helpers = Helpers(client_secret)
    helpers.start()
    try:
        yield helpers
    finally:
        helpers.stop()


MODES = ("rate", "loaded")  # fixed rate (openloop), closed loop (wrk)


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from sidecar.credentials.keys import generate_key

    cases = [CASES[k] for k in args.cases]
    secret = f"bench_sk_{secrets.token_urlsafe(24)}"
    client_secret = secrets.token_urlsafe(24)
    files = {
        "secret": work / "secrets" / "ledger-key",
        "client_id": work / "secrets" / "client-id",
        "client_secret": work / "secrets" / "client-secret",
    }
    files["secret"].parent.mkdir()
    files["secret"].write_text(secret + "\n")
    files["client_id"].write_text(CLIENT_ID)
    files["client_secret"].write_text(client_secret)
    # One key directory per algorithm the cases need (ES256 for the cases without a token).
    keydirs: dict[str, Path] = {}
    for alg in dict.fromkeys(["ES256", *(c.alg for c in cases if c.alg)]):
        d = keydirs[alg] = work / f"txn-keys-{alg.lower()}"
        d.mkdir()
        generate_key(d / "k1.pem", alg)
    mint = mint_reference({c.alg: keydirs[c.alg] for c in cases if c.alg})
    script = work / "report.lua"
    script.write_text(WRK_SCRIPT)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {c.key: [] for c in cases} for m in MODES
    }
    verified: dict[str, Any] = {}
    oauth: dict[str, Any] = {}
    with helpers_running(client_secret) as helpers, ExitStack() as es:
        template = envoy_template(args.transport, helpers.upstream_port, work)
        sources = {
            case.key: write_profiles(
                work / f"src-{case.key}", credential_spec(case, files, helpers.token_port)
            )
            for case in cases
        }
        pipeline = pipeline_reference(cases, sources, keydirs)
        in_process_tokens = len(helpers.issued)
        stacks: dict[str, Stack] = {}
        for case in cases:
            profiles = sources[case.key]
            keys = keydirs[case.alg or "ES256"]
            options = MandateOptions(
                transport=args.transport,
                workers=args.workers,
                threads=args.threads,
                extra=("--txn-token-keys", str(keys), "--txn-token-issuer", ISSUER),
                profiles=profiles,
            )
            stacks[case.key] = es.enter_context(
                running_stack(case.key, str(template), work, options)
            )
            print(f"== {case.key}: {case.label}: started", flush=True)
        for case in cases:
            stack = stacks[case.key]
            verify(case.key, stack.envoy, stack.mandate)
            verified[case.key] = check_credential(case, stack, helpers, secret, full=True)
            v = verified[case.key]
            print(
                f"   {case.key}: verified (200 / 403; upstream got "
                f"{v['headers'] or 'no credential'}"
                + (f", {v['value_bytes']} bytes" if "value_bytes" in v else "")
                + (", Txn-Token verified against the JWKS" if "verified" in v else "")
                + ")",
                flush=True,
            )
        if args.warmup > 0:
            for case in cases:
                run_wrk(stacks[case.key].envoy.port, script, args.connections, args.warmup)
        print(f"   warmed up ({args.warmup:g} s each)", flush=True)
        issued_before = len(helpers.issued)
        for r in range(args.rounds):
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for case in order:
                stack = stacks[case.key]
                idle = [s for k, s in stacks.items() if k != case.key]
                port = stack.envoy.port
                loads = {
                    "rate": lambda p=port: run_openloop(
                        p, args.rate, args.rate_duration,
                        connections=args.rate_connections, drain=0.5,
                    ),
                    "loaded": lambda p=port: run_wrk(p, script, args.connections, args.duration),
                }  # fmt: skip
                for mode in MODES:
                    check_credential(case, stack, helpers, secret, full=False)
                    runs[mode][case.key].append(measure_run(case, stack, idle, loads[mode]))
            for mode in MODES:
                print(
                    f"   round {r + 1}/{args.rounds} {mode}: "
                    + ", ".join(
                        f"{c.key} {runs[mode][c.key][-1]['rps']:,.0f} req/s "
                        f"{_f(runs[mode][c.key][-1]['sched_mandate_us_per_check'], '{:.0f}')} µs"
                        for c in cases
                    ),
                    flush=True,
                )
        for case in cases:  # still the expected credential after the last round
            check_credential(case, stacks[case.key], helpers, secret, full=False)
        if any(c.kind == "oauth" for c in cases):
            oauth = {
                "issued_in_process": in_process_tokens,
                "issued_before": issued_before - in_process_tokens,
                "issued_during": len(helpers.issued) - issued_before,
                "refused": len(helpers.refused),
            }
            if oauth["issued_during"] or oauth["refused"] or not oauth["issued_before"]:
                raise BenchError(f"oauth: the token was not served from the cache: {oauth}")
    summaries = {m: summarize(cases, runs[m], verified) for m in MODES}
    extra = {
        "mint_reference": mint,
        "pipeline_reference": pipeline,
        "oauth": oauth,
        "verified": verified,
    }
    return summaries, {"runs": runs, **extra}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("credential_check: `wrk` is not on PATH: apt-get install -y wrk", file=sys.stderr)
        return 2
    info = machine_info(args)
    try:
        with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="mandate-bench-") as tmp:
            summaries, extra = run(args, Path(tmp))
    except BenchError as exc:
        print(f"credential_check: aborted: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("credential_check: interrupted; processes stopped", file=sys.stderr)
        return 130
    info["loadavg_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    text = markdown(info, summaries, extra)
    print()
    print(text)
    stem = "credential_check" + ("" if args.transport == "grpc" else f"-{args.transport}")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "summary": summaries, **extra}
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(f"wrote {args.out / stem}.json and {args.out / stem}.md")
    noisy = noisy_runs(summaries)
    if noisy:
        print(
            f"credential_check: WARNING: other processes used over {NOISY_CPUS} CPU during "
            f"{', '.join(noisy)}; those runs are noisy (the medians less so)",
            file=sys.stderr,
        )
    return 0
