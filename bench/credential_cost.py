"""What minting a Transaction Token costs, per signature algorithm and JOSE library (issue 17).

In-process, one core, `timeit` (GC off while timing; the variants of one algorithm
interleaved round by round so that a noisy moment hits them alike; median and best of
--rounds runs), per token, in µs, and tokens/s at the median:

- **cryptography sign() (floor)**: the signature alone, over a signing input of the
  benchmark token's size: what no JOSE library can go below.
- **mandate TxnTokenMinter.mint**: what the sidecar runs per call: the signing key of
  `SigningKeys` (the reload check included), the header pre-encoded per key, one JSON
  encoding of the claims, PyJWT's algorithm object over cryptography for the signature.
- **PyJWT jwt.encode**, **joserfc jwt.encode**, **authlib jwt.encode** (authlib.jose,
  deprecated by its authors for joserfc): the libraries' own one-call paths, the key object
  loaded once. A library that is not installed is left out.

The claims are those the credential broker sends (iss, sub, aud, iat, exp, txn, scope, a
five-field tctx, req_wl); each library's output is checked to verify with PyJWT.

Also, per key directory (`sidecar.credentials.keys`): `signer()` between checks (per call),
the periodic check of an unchanged directory (once per interval, 1 s by default), and a
reload (once per change of the Secret); and what importing each library adds to a fresh
interpreter and to a Check worker (`import sidecar.run.worker` first): wall time and RSS,
median of --import-runs fresh processes.

Writes bench/results/credential_cost.{json,md}. Runs in about 30 s.
Run: python -m bench credential_cost [--rounds 7] [--import-runs 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import timeit
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from bench.lib import RESULTS, ROOT, BenchError
from bench.lib.report import machine_base, package_version, write_results
from sidecar.credentials.keys import PrivateKey, SigningKeys, generate_key, load_key_set
from sidecar.credentials.txntoken import TxnTokenMinter

ALGS = ("ES256", "EdDSA", "RS256", "ES384")
ISSUER = "https://mandate.agents.svc"
T0 = 1_900_000_000.0
CLAIMS: dict[str, Any] = {
    "sub": "agent:agents/billing-agent",
    "aud": "billing.internal",
    "scope": "reconcile",
    "tctx": {
        "decision": "0190a1b2c3d4e5f60718293a4b5c6d7e",
        "method": "GET",
        "path": "/v1/invoices/42",
        "task": "INV-42",
        "grant": "g-7f3a",
    },
    "txn": "0190a1b2c3d4e5f60718293a4b5c6d7e",
    "req_wl": "pod:agents/billing-agent-7c9f8d6b5-x2x9q",
}
TTL = 30
FLOOR = "cryptography sign() (floor)"
MANDATE = "mandate TxnTokenMinter.mint"
# Import cases: label -> statement, timed in a fresh interpreter.
IMPORTS = {
    "cryptography (ec, ed25519, rsa, serialization)": (
        "from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa; "
        "from cryptography.hazmat.primitives import serialization"
    ),
    "pyjwt (what mandate adds: jwt + keys + txntoken)": (
        "import sidecar.credentials.keys, sidecar.credentials.txntoken"
    ),
    "pyjwt": "import jwt, jwt.algorithms",
    "joserfc": "from joserfc import jwt, jws; from joserfc.jwk import ECKey",
    "authlib.jose": (
        "import warnings; warnings.simplefilter('ignore'); from authlib.jose import jwt, JsonWebKey"
    ),
}
IMPORT_DISTS = {"pyjwt": "PyJWT", "joserfc": "joserfc", "authlib.jose": "Authlib"}
_PROBE = """
import re, sys, time
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
{base}
before, t = rss(), time.perf_counter()
{stmt}
dt = time.perf_counter() - t
print(dt * 1e3, (rss() - before) / 1024, rss() / 1024)
"""


# ---------------------------------------------------------------- timing


def per_call_us(fn: Callable[[], object], number: int) -> float:
    return timeit.timeit(fn, number=number) / number * 1e6


def interleaved(
    fns: dict[str, Callable[[], object]], number: int, rounds: int
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for k in order:
            out[k].append(per_call_us(fns[k], number))
    return out


def stats(samples: list[float]) -> dict[str, Any]:
    median = statistics.median(samples)
    return {
        "median_us": median,
        "best_us": min(samples),
        "tokens_per_s": 1e6 / median,
        "samples_us": samples,
    }


# ---------------------------------------------------------------- the variants


def floor_sign(key: PrivateKey, alg: str) -> Callable[[bytes], bytes]:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        h: hashes.HashAlgorithm = hashes.SHA256() if alg == "ES256" else hashes.SHA384()
        return lambda m: key.sign(m, ec.ECDSA(h))
    if alg == "RS256":
        return lambda m: key.sign(m, padding.PKCS1v15(), hashes.SHA256())
    return lambda m: key.sign(m)


def library_variants(
    key: PrivateKey, alg: str, kid: str, claims: dict[str, Any]
) -> dict[str, Callable[[], str]]:
    """Each installed library's one-call path, the key object loaded once."""
    header = {"kid": kid, "typ": "txntoken+jwt"}
    out: dict[str, Callable[[], str]] = {
        "PyJWT jwt.encode": lambda: jwt.encode(claims, key, algorithm=alg, headers=header),
    }
    try:
        from joserfc import jwt as jose_jwt
        from joserfc.jwk import ECKey, OKPKey, RSAKey

        cls = {"ES256": ECKey, "ES384": ECKey, "EdDSA": OKPKey, "RS256": RSAKey}[alg]
        jkey = cls.import_key(key)
        jheader = {**header, "alg": alg}
        out["joserfc jwt.encode"] = lambda: jose_jwt.encode(jheader, claims, jkey, algorithms=[alg])
    except ImportError:
        pass
    try:
        from authlib.jose import jwt as authlib_jwt

        aheader = {**header, "alg": alg}
        out["authlib jwt.encode"] = lambda: authlib_jwt.encode(aheader, claims, key).decode()
    except ImportError:
        pass
    return out


def check_token(token: str, key: PrivateKey, alg: str, who: str) -> None:
    try:
        got = jwt.decode(
            token,
            key.public_key(),
            algorithms=[alg],
            audience=CLAIMS["aud"],
            options={"verify_exp": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise BenchError(f"{who} {alg}: the token does not verify: {exc}") from None
    if got["txn"] != CLAIMS["txn"] or got["tctx"] != CLAIMS["tctx"]:
        raise BenchError(f"{who} {alg}: unexpected claims {sorted(got)}")
    if jwt.get_unverified_header(token).get("typ") != "txntoken+jwt":
        raise BenchError(f"{who} {alg}: typ is not txntoken+jwt")


def signing_rows(work: Path, rounds: int, number: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for alg in ALGS:
        d = work / alg
        d.mkdir()
        generate_key(d / "k1.pem", alg)
        keys = SigningKeys(d, check_interval=1.0)
        minter = TxnTokenMinter(keys, ISSUER, clock=lambda: T0)
        key: Any = serialization.load_pem_private_key((d / "k1.pem").read_bytes(), None)
        claims = {"iss": ISSUER, **CLAIMS, "iat": int(T0), "exp": int(T0) + TTL}
        token = minter.mint(**CLAIMS, ttl=TTL)
        check_token(token, key, alg, MANDATE)
        signing_input = token.rsplit(".", 1)[0].encode()
        sign = floor_sign(key, alg)
        fns: dict[str, Callable[[], object]] = {
            FLOOR: lambda sign=sign, m=signing_input: sign(m),
            MANDATE: lambda minter=minter: minter.mint(**CLAIMS, ttl=TTL),
        }
        for who, fn in library_variants(key, alg, "k1", claims).items():
            check_token(fn(), key, alg, who)
            fns[who] = fn
        n = max(20, number // 10) if alg in ("RS256", "ES384") else number
        gc.collect()
        gc.disable()
        try:
            times = interleaved(fns, n, rounds)
        finally:
            gc.enable()
        floor = statistics.median(times[FLOOR])
        for who, samples in times.items():
            row = {"alg": alg, "impl": who, "number": n, **stats(samples)}
            row["over_floor_us"] = row["median_us"] - floor
            rows.append(row)
        print(f"{alg}: " + ", ".join(f"{w} {statistics.median(s):.1f}" for w, s in times.items()),
              file=sys.stderr)  # fmt: skip
    return rows


def key_rows(work: Path, rounds: int, number: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    d = work / "dir"
    d.mkdir()
    for kid in ("k1", "k2"):
        generate_key(d / f"{kid}.pem", "ES256")
    (d / "signing-kid").write_text("k2\n")
    keys = SigningKeys(d, check_interval=3600.0)
    samples = [per_call_us(keys.signer, number * 10) for _ in range(rounds)]
    rows.append({"what": "SigningKeys.signer(), between checks", "per": "call", **stats(samples)})
    probe = SigningKeys(d, check_interval=0.0)
    samples = [per_call_us(probe.refresh, number) for _ in range(rounds)]
    rows.append(
        {
            "what": "SigningKeys.refresh(), unchanged directory (readlink + scandir + stat)",
            "per": "check (1/s by default)",
            **stats(samples),
        }
    )
    for alg in ("ES256", "EdDSA", "RS256"):
        a = work / f"reload-{alg}"
        a.mkdir()
        generate_key(a / "k1.pem", alg)
        samples = [per_call_us(lambda a=a: load_key_set(a), 20) for _ in range(rounds)]
        rows.append(
            {
                "what": f"load_key_set, one {alg} key",
                "per": "change of the Secret",
                **stats(samples),
            }
        )
    return rows


def import_rows(runs: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for context, base in (("fresh interpreter", ""), ("Check worker", "import sidecar.run.worker")):
        for label, stmt in IMPORTS.items():
            dist = IMPORT_DISTS.get(label)
            if dist is not None and package_version(dist) is None:
                continue
            ms, mib, total = [], [], []
            for _ in range(runs):
                proc = subprocess.run(
                    [sys.executable, "-c", _PROBE.format(base=base, stmt=stmt)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    check=False,
                )
                if proc.returncode != 0:
                    raise BenchError(f"import {label}: {proc.stderr.strip().splitlines()[-1:]}")
                a, b, c = map(float, proc.stdout.split())
                ms.append(a)
                mib.append(b)
                total.append(c)
            rows.append(
                {
                    "context": context,
                    "import": label,
                    "ms": statistics.median(ms),
                    "rss_added_mib": statistics.median(mib),
                    "rss_total_mib": statistics.median(total),
                }
            )
    return rows


# ---------------------------------------------------------------- report


def markdown(info: dict[str, Any], signing: list[dict[str, Any]], keys: list[dict[str, Any]],
             imports: list[dict[str, Any]]) -> str:  # fmt: skip
    impls = list(dict.fromkeys(r["impl"] for r in signing))
    lines = [
        "# What minting a Transaction Token costs",
        "",
        "Written by `bench/credential_cost.py`; see its docstring. µs per token, median of "
        f"{info['rounds']} interleaved rounds (tokens/s at the median; + µs over the floor).",
        "",
        "| alg | " + " | ".join(impls) + " |",
        "|---|" + "---|" * len(impls),
    ]
    for alg in ALGS:
        cells = []
        for impl in impls:
            r = next((r for r in signing if r["alg"] == alg and r["impl"] == impl), None)
            if r is None:
                cells.append("n/a")
            elif impl == FLOOR:
                cells.append(f"{r['median_us']:.1f} ({r['tokens_per_s']:,.0f}/s)")
            else:
                cells.append(
                    f"{r['median_us']:.1f} ({r['tokens_per_s']:,.0f}/s, +{r['over_floor_us']:.1f})"
                )
        lines.append(f"| {alg} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| key directory | per | µs median | µs best |",
        "|---|---|---|---|",
    ]
    for r in keys:
        lines.append(f"| {r['what']} | {r['per']} | {r['median_us']:.2f} | {r['best_us']:.2f} |")
    lines += [
        "",
        "| import | in | wall ms | RSS added MiB | RSS total MiB |",
        "|---|---|---|---|---|",
    ]
    for r in imports:
        lines.append(
            f"| {r['import']} | {r['context']} | {r['ms']:.1f} | {r['rss_added_mib']:.1f} "
            f"| {r['rss_total_mib']:.1f} |"
        )
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    lines += [
        "",
        f"Machine: {info['nproc']} CPUs, {info['cpu_model']}, Linux {info['kernel']}; Python "
        f"{info['python']}; {versions}; load average before: {info['loadavg_before']}; "
        f"git {info['git_commit']}; {info['date']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench credential_cost",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--rounds", type=int, default=7, help="timed runs per variant")
    p.add_argument("--number", type=int, default=1000, help="tokens per run (RSA, P-384: /10)")
    p.add_argument("--import-runs", type=int, default=5, help="fresh processes per import")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    if args.rounds < 3 or args.number < 100 or args.import_runs < 1:
        p.error("--rounds >= 3, --number >= 100, --import-runs >= 1")
    info = {
        **machine_base(),
        "rounds": args.rounds,
        "number": args.number,
        "versions": {
            d: package_version(d) for d in ("cryptography", "PyJWT", "joserfc", "Authlib")
        },
    }
    with tempfile.TemporaryDirectory(prefix="mandate-bench-") as tmp:
        work = Path(tmp)
        with warnings.catch_warnings():
            # authlib.jose's deprecation (for joserfc) and joserfc's "EdDSA is deprecated via
            # RFC 9864" (for "Ed25519", which PyJWT and most verifiers do not know yet).
            warnings.simplefilter("ignore")
            signing = signing_rows(work, args.rounds, args.number)
        keys = key_rows(work, args.rounds, args.number)
    imports = import_rows(args.import_runs)
    doc = {**info, "signing": signing, "key_directory": keys, "imports": imports}
    write_results(args.out / "credential_cost", doc, markdown(info, signing, keys, imports))
    return 0
