"""Which credentials an allowed call carries (`Decision.credentials`), decided by the pure
core: the credential's hosts and ports, never a denied call, never a CONNECT tunnel."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.core import Code, RequestView, decide, load_profiles

PROFILE = """\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata: {name: pay}
spec:
  owner: o
  defaultPurpose: p
  purposes:
    p:
      allow:
        - hosts: [api.stripe.com, ledger.svc, "*.internal"]
          methods: [GET, CONNECT]
      deny:
        - hosts: [ledger.svc]
          paths: ["/v1/payouts/**"]
  credentials:
    stripe:
      hosts: [api.stripe.com]              # no port: 443 only (TLS)
      secret: {file: /s}
    ledger:
      hosts: ["ledger.svc:80"]             # plain HTTP named on purpose
      secret: {file: /l, header: x-api-key, format: "{}"}
    internal:
      hosts: ["*.internal"]
      transactionToken: {}
      connect: allow
"""


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d: Path = tmp_path_factory.mktemp("profiles")
    (d / "p.yaml").write_text(PROFILE)
    return load_profiles(d)


def _decide(snapshot, method: str, authority: str, path: str = "/v1/x", scheme: str = "http"):  # type: ignore[no-untyped-def]
    view = RequestView(
        decision_id="d", method=method, authority=authority, path=path, scheme=scheme,
        configured_agent="pay", namespace="ns",
    )  # fmt: skip
    return decide(snapshot, view, 1e9)


@pytest.mark.parametrize(
    ("authority", "scheme", "expected"),
    [
        ("api.stripe.com:443", "http", ("stripe",)),  # the agent's http://host:443: TLS out
        ("api.stripe.com", "https", ("stripe",)),  # https:// in absolute form: 443
        ("api.stripe.com", "http", ()),  # port 80: in clear, so never the key
        ("api.stripe.com:8443", "http", ()),
        ("ledger.svc", "http", ("ledger",)),
        ("ledger.svc:443", "http", ()),  # the ledger credential names :80 only
        ("a.internal:443", "http", ("internal",)),
        ("a.b.internal:443", "http", ()),  # `*.` is one label
        ("evil.example", "http", ()),
    ],
)
def test_the_credentials_of_a_call_follow_host_and_port(
    snapshot,
    authority: str,
    scheme: str,
    expected: tuple[str, ...],  # type: ignore[no-untyped-def]
) -> None:
    d = _decide(snapshot, "GET", authority, scheme=scheme)
    if authority.startswith(("evil.", "a.b.")):
        assert not d.allowed and d.credentials == ()
        return
    assert d.allowed, d.reason
    assert d.credentials == expected


def test_a_denied_call_names_no_credential(snapshot) -> None:  # type: ignore[no-untyped-def]
    d = _decide(snapshot, "GET", "ledger.svc", "/v1/payouts/1")
    assert (d.allowed, d.code, d.credentials) == (False, Code.DENIED_BY_RULE, ())


def test_a_tunnel_to_a_credential_host_is_refused_unless_the_credential_allows_it(
    snapshot,  # type: ignore[no-untyped-def]
) -> None:
    d = _decide(snapshot, "CONNECT", "api.stripe.com:443", "")
    assert (d.allowed, d.code) == (False, Code.CREDENTIAL_TUNNEL)
    assert "call http://api.stripe.com:443/ instead" in d.reason
    # port 80 is not the credential's: the tunnel carries nothing mandate would add
    assert _decide(snapshot, "CONNECT", "api.stripe.com:80", "").allowed
    # `connect: allow`: the tunnel passes, without the credential
    t = _decide(snapshot, "CONNECT", "a.internal:443", "")
    assert t.allowed and t.credentials == ()
