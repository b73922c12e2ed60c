"""`make run` (python -m devstack.demo) end to end: its "Credentials" part (issue 17, point 7)
shows, with real Envoy and `mandate run`, an agent calling without a key while the upstream
receives one, a denied call that never got it, an internal upstream verifying a Txn-Token
against mandate's JWKS, and no credential after a revocation. The demo checks each of these
itself and exits 1 if one differs; here its output is read as a user would, and the key it
wrote for mandate must appear nowhere in it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_shows_credentials_the_agent_never_holds() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devstack.demo", "--keep"],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    kept = re.search(r"logs kept in (\S+)", result.stdout)
    try:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert kept is not None
        key = (Path(kept.group(1)) / "credentials" / "stripe" / "key").read_text().strip()
    finally:
        if kept is not None:
            shutil.rmtree(kept.group(1), ignore_errors=True)
    out = result.stdout
    assert key.startswith("sk_demo_") and key not in out + result.stderr
    part = out[out.index("══ Credentials: the agent holds none") :]
    assert re.search(r"ALLOW 200  payments-agent .* api\.stripe\.com/v1/payment_intents", part)
    assert "the agent sent:        no Authorization header" in part
    received = r"the upstream received: authorization: 39 characters, sha256 [0-9a-f]{12}"
    assert re.search(received, part)
    assert re.search(r"DENY  403  payments-agent .* api\.stripe\.com/v1/payouts", part)
    assert "the upstream received nothing for this call" in part
    assert "header  typ txntoken+jwt, alg ES256, kid demo" in part
    assert "sub     spiffe://cluster.local/ns/agents/sa/payments-agent" in part
    assert "scope   collect" in part
    txn = re.search(r"txn     ([0-9a-f]{32})", part)
    assert txn is not None and f'"decision": "{txn.group(1)}"' in part
    assert '"task": "INV-42"' in part
    assert "401 Signature verification failed" in part
    assert part.count("revoked: Key exfiltration attempt (INC-4420)") == 2
    assert "the upstreams received nothing after the revocation" in part
    # the rest of the demo still follows, in its order
    assert part.index("── mandate stops: Envoy fails closed") > 0
