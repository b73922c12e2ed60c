"""Transaction Tokens and their signing keys (issue 17): tokens mandate mints (PyJWT over
cryptography) verify with an independent JOSE library (joserfc) against the published
JWKS; a wrong audience or an expired token fails; rotation with overlap; the kubelet's
``..data`` swap; a broken reload keeps the last good keys; every bad key directory is
refused naming the file, and no error or log line carries key material.

No test depends on today's date: the minter's clock and the verifier's clock are fixed."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa
from joserfc import jwt as jose_jwt
from joserfc.errors import BadSignatureError, ExpiredTokenError, InvalidClaimError, JoseError
from joserfc.jwk import KeySet as JoseKeySet

from sidecar.credentials.keys import (
    SIGNING_KID_FILE,
    SigningKeys,
    generate_key,
    load_key_set,
)
from sidecar.credentials.txntoken import MAX_TTL_SECONDS, TXN_TOKEN_TYP, TxnTokenMinter
from sidecar.errors import ConfigError, CredentialUnavailable

T0 = 1_900_000_000  # 2030-03-17: a fixed instant, never "now"
ISSUER = "https://mandate.agents.svc"
AUD = "billing.internal"
SUB = "agent:agents/billing-agent"
TCTX = {
    "task": "INV-42",
    "decision": "0f" * 16,
    "method": "GET",
    "path": "/v1/invoices/42",
    "grant": "g-1",
}
ALGS = ["ES256", "ES384", "EdDSA", "RS256"]


@pytest.fixture(autouse=True)
def _quiet_joserfc() -> Iterator[None]:
    # joserfc flags "EdDSA" as deprecated by RFC 9864 (in favour of "Ed25519"); PyJWT, and
    # most verifiers upstreams run, know only "EdDSA".
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*EdDSA.*")
        yield


# ---------------------------------------------------------------- helpers


def verify(
    token: str, jwks: dict[str, Any], *, aud: str = AUD, now: int = T0 + 1
) -> jose_jwt.Token:
    """What an upstream does: verify with joserfc against the JWKS, check typ, iss, aud, exp."""
    tok = jose_jwt.decode(token, JoseKeySet.import_key_set(jwks), algorithms=ALGS)
    if tok.header.get("typ") != TXN_TOKEN_TYP:
        raise InvalidClaimError("typ")
    jose_jwt.JWTClaimsRegistry(
        now=now,
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": aud},
        exp={"essential": True},
        txn={"essential": True},
        scope={"essential": True},
    ).validate(tok.claims)
    return tok


def unverified_header(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    return result


def mint(minter: TxnTokenMinter, **over: Any) -> str:
    args: dict[str, Any] = {
        "sub": SUB,
        "aud": AUD,
        "scope": "reconcile",
        "tctx": TCTX,
        "txn": TCTX["decision"],
        "ttl": 30,
        "req_wl": "pod:agents/billing-agent-7c9f",
    }
    args.update(over)
    return minter.mint(**args)


def key_dir(tmp_path: Path, *kids: str, alg: str = "ES256", signing: str | None = None) -> Path:
    d = tmp_path / "keys"
    d.mkdir(exist_ok=True)
    for kid in kids:
        generate_key(d / f"{kid}.pem", alg)
    if signing is not None:
        (d / SIGNING_KID_FILE).write_text(signing + "\n")
    return d


def pem_bodies(directory: Path) -> list[str]:
    """Every line of base64 key material in the directory's PEM files (and its targets)."""
    out: list[str] = []
    for p in directory.rglob("*.pem"):
        if p.is_file():
            out += [
                line
                for line in p.read_text(errors="replace").splitlines()
                if line and not line.startswith("-----")
            ]
    return out


def assert_no_key_material(text: str, *directories: Path) -> None:
    assert "PRIVATE KEY" not in text
    for d in directories:
        for line in pem_bodies(d):
            assert line[:24] not in text


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---------------------------------------------------------------- minting and verifying


@pytest.mark.parametrize("alg", ALGS)
def test_token_verifies_with_an_independent_library(tmp_path: Path, alg: str) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1", alg=alg))
    minter = TxnTokenMinter(keys, ISSUER, clock=Clock(T0 + 0.7))
    token = mint(minter)
    tok = verify(token, keys.jwks())
    assert tok.header == {"alg": alg, "kid": "k1", "typ": "txntoken+jwt"}
    assert tok.claims == {
        "iss": ISSUER,
        "sub": SUB,
        "aud": AUD,
        "iat": T0,
        "exp": T0 + 30,
        "txn": TCTX["decision"],
        "scope": "reconcile",
        "tctx": TCTX,
        "req_wl": "pod:agents/billing-agent-7c9f",
    }
    assert isinstance(tok.claims["aud"], str)  # one audience, not a list


def test_typ_header_and_compact_form(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"))
    token = mint(TxnTokenMinter(keys, ISSUER, clock=Clock(T0)))
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)
    assert unverified_header(token) == {"alg": "ES256", "kid": "k1", "typ": "txntoken+jwt"}


def test_req_wl_is_optional(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"))
    token = mint(TxnTokenMinter(keys, ISSUER, clock=Clock(T0)), req_wl=None)
    assert "req_wl" not in verify(token, keys.jwks()).claims


def test_wrong_audience_fails(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"))
    token = mint(TxnTokenMinter(keys, ISSUER, clock=Clock(T0)))
    with pytest.raises(InvalidClaimError):
        verify(token, keys.jwks(), aud="payments.internal")


def test_expired_token_fails(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"))
    token = mint(TxnTokenMinter(keys, ISSUER, clock=Clock(T0)), ttl=MAX_TTL_SECONDS)
    verify(token, keys.jwks(), now=T0 + MAX_TTL_SECONDS - 1)
    with pytest.raises(ExpiredTokenError):
        verify(token, keys.jwks(), now=T0 + MAX_TTL_SECONDS)


def test_tampered_token_fails(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"))
    token = mint(TxnTokenMinter(keys, ISSUER, clock=Clock(T0)))
    head, _, sig = token.split(".")
    other = mint(TxnTokenMinter(keys, ISSUER, clock=Clock(T0)), scope="refund").split(".")[1]
    with pytest.raises(BadSignatureError):
        verify(f"{head}.{other}.{sig}", keys.jwks())


@pytest.mark.parametrize("ttl", [61, 60.5, 3600, 0, 0.5, -1, float("nan"), True])
def test_ttl_out_of_bounds_is_refused(tmp_path: Path, ttl: float) -> None:
    minter = TxnTokenMinter(SigningKeys(key_dir(tmp_path, "k1")), ISSUER, clock=Clock(T0))
    with pytest.raises(ValueError, match="ttl"):
        mint(minter, ttl=ttl)


def test_ttl_bounds_accepted(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"))
    minter = TxnTokenMinter(keys, ISSUER, clock=Clock(T0 + 0.9))
    for ttl, exp in ((1, T0 + 1), (60, T0 + 60), (59.5, T0 + 60)):
        claims = verify(mint(minter, ttl=ttl), keys.jwks(), now=T0).claims
        assert (claims["iat"], claims["exp"]) == (T0, exp)
        assert claims["exp"] - (T0 + 0.9) <= ttl


@pytest.mark.parametrize("field", ["sub", "aud", "scope", "txn"])
def test_missing_claims_are_refused(tmp_path: Path, field: str) -> None:
    minter = TxnTokenMinter(SigningKeys(key_dir(tmp_path, "k1")), ISSUER, clock=Clock(T0))
    with pytest.raises(ValueError, match=field):
        mint(minter, **{field: ""})
    with pytest.raises(ValueError, match=field):
        mint(minter, **{field: ["a", "b"]})


@pytest.mark.parametrize("issuer", ["", "mandate", "ftp://mandate", "https://", None])
def test_bad_issuer_is_refused(tmp_path: Path, issuer: Any) -> None:
    with pytest.raises(ConfigError, match="issuer"):
        TxnTokenMinter(SigningKeys(key_dir(tmp_path, "k1")), issuer)


def test_no_key_can_sign_is_credential_unavailable(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.mkdir()
    mono = Clock(0.0)
    keys = SigningKeys(empty, strict=False, monotonic=mono)
    minter = TxnTokenMinter(keys, ISSUER, clock=Clock(T0))
    with pytest.raises(CredentialUnavailable, match=str(empty)) as caught:
        mint(minter)
    assert caught.value.code == "credential_unavailable"
    assert keys.jwks() == {"keys": []}
    generate_key(empty / "k1.pem")
    mono.t += 1.0
    assert unverified_header(mint(minter))["kid"] == "k1"


# ---------------------------------------------------------------- the JWKS


@pytest.mark.parametrize(
    ("alg", "members"),
    [("ES256", {"kty": "EC", "crv": "P-256"}), ("ES384", {"kty": "EC", "crv": "P-384"}),
     ("EdDSA", {"kty": "OKP", "crv": "Ed25519"}), ("RS256", {"kty": "RSA", "e": "AQAB"})],
)  # fmt: skip
def test_jwks_is_public_only(tmp_path: Path, alg: str, members: dict[str, str]) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1", alg=alg))
    (jwk,) = keys.jwks()["keys"]
    assert jwk.items() >= {**members, "kid": "k1", "alg": alg, "use": "sig"}.items()
    assert set(jwk) <= {"kty", "crv", "x", "y", "n", "e", "kid", "alg", "use"}
    assert not {"d", "p", "q", "dp", "dq", "qi", "key_ops"} & set(jwk)
    assert json.loads(keys.jwks_json()) == keys.jwks()
    # The published key is the private key's public half, as the other library reads it.
    private = serialization.load_pem_private_key((tmp_path / "keys/k1.pem").read_bytes(), None)
    published = JoseKeySet.import_key_set(keys.jwks()).keys[0].public_key
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert published.public_bytes(*spki) == private.public_key().public_bytes(*spki)


def test_jwks_copies_are_independent(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"))
    keys.jwks()["keys"].clear()
    assert len(keys.jwks()["keys"]) == 1


# ---------------------------------------------------------------- rotation and reloads


def test_rotation_with_overlap(tmp_path: Path) -> None:
    d = key_dir(tmp_path, "k1")
    mono = Clock(0.0)
    keys = SigningKeys(d, check_interval=1.0, monotonic=mono)
    minter = TxnTokenMinter(keys, ISSUER, clock=Clock(T0))
    old = mint(minter)
    assert unverified_header(old)["kid"] == "k1"

    # 1. publish k2, k1 still signs
    generate_key(d / "k2.pem")
    (d / SIGNING_KID_FILE).write_text("k1\n")
    mono.t += 1.0
    assert {k["kid"] for k in keys.jwks()["keys"]} == {"k1", "k2"}
    assert unverified_header(mint(minter))["kid"] == "k1"

    # 2. switch signing to k2: new tokens by k2, old ones still verify
    (d / SIGNING_KID_FILE).write_text("k2")
    mono.t += 1.0
    new = mint(minter)
    assert unverified_header(new)["kid"] == "k2"
    verify(new, keys.jwks())
    verify(old, keys.jwks())

    # 3. remove k1: old tokens no longer verify, new ones do
    (d / "k1.pem").unlink()
    mono.t += 1.0
    assert [k["kid"] for k in keys.jwks()["keys"]] == ["k2"]
    verify(new, keys.jwks())
    with pytest.raises(JoseError):
        verify(old, keys.jwks())


def test_changes_are_seen_only_after_the_interval(tmp_path: Path) -> None:
    d = key_dir(tmp_path, "k1")
    mono = Clock(100.0)
    keys = SigningKeys(d, check_interval=0.5, monotonic=mono)
    generate_key(d / "k2.pem")
    (d / SIGNING_KID_FILE).write_text("k2")
    mono.t += 0.4
    assert keys.signer().kid == "k1"
    mono.t += 0.1
    assert keys.signer().kid == "k2"


def test_unchanged_directory_is_not_reloaded(tmp_path: Path) -> None:
    keys = SigningKeys(key_dir(tmp_path, "k1"), check_interval=0.0)
    before = keys.current()
    assert keys.refresh() is False
    assert keys.current() is before


def test_broken_reload_keeps_the_last_good_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = key_dir(tmp_path, "k1")
    mono = Clock(0.0)
    keys = SigningKeys(d, monotonic=mono)
    minter = TxnTokenMinter(keys, ISSUER, clock=Clock(T0))
    good = keys.jwks()
    (d / "k2.pem").write_text("-----BEGIN PRIVATE KEY-----\nQ0FOQVJZ\n-----END PRIVATE KEY-----\n")
    (d / SIGNING_KID_FILE).write_text("k2")
    mono.t += 1.0
    with caplog.at_level(logging.ERROR, logger="sidecar.credentials.keys"):
        token = mint(minter)
        mono.t += 1.0
        mint(minter)  # the same broken state: not logged again
    assert unverified_header(token)["kid"] == "k1"
    assert keys.jwks() == good
    assert keys.problem is not None and str(d / "k2.pem") in keys.problem
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 1 and str(d / "k2.pem") in errors[0] and "keeping" in errors[0]
    assert "Q0FOQVJZ" not in errors[0]
    assert_no_key_material(errors[0], d)

    # fixed: picked up at the next check
    (d / "k2.pem").unlink()
    generate_key(d / "k2.pem")
    mono.t += 1.0
    assert unverified_header(mint(minter))["kid"] == "k2"
    assert keys.problem is None


def test_a_removed_directory_keeps_the_last_good_keys(tmp_path: Path) -> None:
    d = key_dir(tmp_path, "k1")
    keys = SigningKeys(d, check_interval=0.0)
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    assert keys.signer().kid == "k1"
    assert keys.problem is not None and str(d) in keys.problem


class Kubelet:
    """A Secret volume as the kubelet writes it: ``..<timestamp>/`` holding the files,
    ``..data`` -> it, and ``<name>`` -> ``..data/<name>``; an update writes a new timestamped
    directory, swaps ``..data`` atomically (rename of a new symlink) and removes the old."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.serial = 0

    def write(self, files: dict[str, bytes]) -> None:
        self.serial += 1
        stamp = f"..2026_12_05_01_00_{self.serial:02d}.{1000 + self.serial}"
        (self.root / stamp).mkdir()
        for name, data in files.items():
            (self.root / stamp / name).write_bytes(data)
            os.chmod(self.root / stamp / name, 0o644)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.symlink(stamp, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        for link in self.root.iterdir():
            if not link.name.startswith(".") and link.name not in files:
                link.unlink()
        if old is not None:
            for p in (self.root / old).iterdir():
                p.unlink()
            (self.root / old).rmdir()


def pem(alg: str, tmp_path: Path, name: str) -> bytes:
    return generate_key(tmp_path / f"{name}.src", alg).read_bytes()


def test_kubelet_data_swap_is_picked_up(tmp_path: Path) -> None:
    vol = Kubelet(tmp_path / "secret")
    k1, k2 = pem("ES256", tmp_path, "a"), pem("EdDSA", tmp_path, "b")
    vol.write({"k1.pem": k1})
    mono = Clock(0.0)
    keys = SigningKeys(vol.root, monotonic=mono)
    minter = TxnTokenMinter(keys, ISSUER, clock=Clock(T0))
    old = mint(minter)
    assert keys.signer().alg == "ES256"
    current = keys.current()
    assert current is not None and current.source.endswith(os.readlink(vol.root / "..data"))

    vol.write({"k1.pem": k1, "k2.pem": k2, SIGNING_KID_FILE: b"k2\n"})
    mono.t += 1.0
    new = mint(minter)
    assert unverified_header(new) == {"alg": "EdDSA", "kid": "k2", "typ": TXN_TOKEN_TYP}
    verify(old, keys.jwks())
    verify(new, keys.jwks())

    vol.write({"k2.pem": k2})  # k1 retired, k2 alone signs without signing-kid
    mono.t += 1.0
    assert [k["kid"] for k in keys.jwks()["keys"]] == ["k2"]
    assert keys.signer().kid == "k2"


def test_kubelet_swap_to_a_broken_secret_keeps_the_old_keys(tmp_path: Path) -> None:
    vol = Kubelet(tmp_path / "secret")
    vol.write({"k1.pem": pem("ES256", tmp_path, "a")})
    keys = SigningKeys(vol.root, check_interval=0.0)
    vol.write({"k1.pem": pem("ES256", tmp_path, "b"), SIGNING_KID_FILE: b"k9"})
    assert keys.signer().kid == "k1"
    assert keys.problem is not None and "signing-kid" in keys.problem and "k9" in keys.problem


# ---------------------------------------------------------------- bad inputs


def _write(d: Path, name: str, data: bytes) -> None:
    (d / name).write_bytes(data)


def _pkcs8(key: Any) -> bytes:
    out: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return out


def _bad_not_pem(d: Path) -> str:
    _write(d, "k1.pem", b"just some text\n")
    return "k1.pem"


def _bad_garbage_pem(d: Path) -> str:
    _write(d, "k1.pem", b"-----BEGIN PRIVATE KEY-----\nQ0FOQVJZ\n-----END PRIVATE KEY-----\n")
    return "k1.pem"


def _bad_public_key(d: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    _write(
        d,
        "k1.pem",
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return "k1.pem"


def _bad_encrypted(d: Path) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    _write(
        d,
        "k1.pem",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
    )
    return "k1.pem"


def _bad_curve(d: Path) -> str:
    _write(d, "k1.pem", _pkcs8(ec.generate_private_key(ec.SECP256K1())))
    return "k1.pem"


def _bad_ed448(d: Path) -> str:
    _write(d, "k1.pem", _pkcs8(ed448.Ed448PrivateKey.generate()))
    return "k1.pem"


def _bad_dsa(d: Path) -> str:
    _write(d, "k1.pem", _pkcs8(dsa.generate_private_key(2048)))
    return "k1.pem"


def _bad_small_rsa(d: Path) -> str:
    _write(d, "k1.pem", _pkcs8(rsa.generate_private_key(65537, 1024)))
    return "k1.pem"


def _bad_dangling(d: Path) -> str:
    os.symlink(d / "nowhere.pem", d / "k1.pem")
    return "k1.pem"


def _bad_a_directory(d: Path) -> str:
    (d / "k1.pem").mkdir()
    return "k1.pem"


def _bad_unreadable(d: Path) -> str:
    generate_key(d / "k1.pem")
    os.chmod(d / "k1.pem", 0)
    return "k1.pem"


def _bad_signing_kid_missing_key(d: Path) -> str:
    generate_key(d / "k1.pem")
    _write(d, SIGNING_KID_FILE, b"k2\n")
    return SIGNING_KID_FILE


def _bad_signing_kid_content(d: Path) -> str:
    generate_key(d / "k1.pem")
    _write(d, SIGNING_KID_FILE, (d / "k1.pem").read_bytes())  # a key pasted by mistake
    return SIGNING_KID_FILE


def _bad_several_no_signing_kid(d: Path) -> str:
    generate_key(d / "k1.pem")
    generate_key(d / "k2.pem")
    return SIGNING_KID_FILE


def _bad_unexpected_file(d: Path) -> str:
    generate_key(d / "k1.pem")
    _write(d, "k2.key", b"x")
    return "k2.key"


def _bad_kid(d: Path) -> str:
    generate_key(d / "-k1.pem")
    return "-k1.pem"


def _bad_empty(d: Path) -> str:
    return ""


def _bad_only_signing_kid(d: Path) -> str:
    _write(d, SIGNING_KID_FILE, b"k1")
    return ""


BAD = {
    "not a PEM": (_bad_not_pem, "not a PEM file"),
    "garbage PEM": (_bad_garbage_pem, "not a valid PEM private key"),
    "public key": (_bad_public_key, "holds a public key, not a private key"),
    "encrypted": (_bad_encrypted, "encrypted"),
    "secp256k1": (_bad_curve, "unsupported EC curve secp256k1"),
    "Ed448": (_bad_ed448, "unsupported key type Ed448"),
    "DSA": (_bad_dsa, "unsupported key type DSA"),
    "RSA 1024": (_bad_small_rsa, "RSA key of 1024 bits"),
    "dangling symlink": (_bad_dangling, "cannot read"),
    "a directory": (_bad_a_directory, "not a regular file"),
    "unreadable": (_bad_unreadable, "cannot read"),
    "signing-kid names a missing key": (
        _bad_signing_kid_missing_key,
        "names 'k2', but there is no k2.pem",
    ),
    "signing-kid holds no kid": (_bad_signing_kid_content, "does not hold a key id"),
    "several keys, no signing-kid": (_bad_several_no_signing_kid, "missing: with several keys"),
    "unexpected file": (_bad_unexpected_file, "unexpected file"),
    "bad kid": (_bad_kid, "the key id"),
    "empty directory": (_bad_empty, "no signing key"),
    "only signing-kid": (_bad_only_signing_kid, "no signing key"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_key_directory_is_refused_naming_the_file(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, message = BAD[case]
    d = tmp_path / "keys"
    d.mkdir()
    name = make(d)
    if case == "unreadable" and os.geteuid() == 0:  # root reads a file of mode 0: as if not
        read_bytes = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self.name == name:
                raise PermissionError(13, "Permission denied", str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError) as caught:
        SigningKeys(d)
    text = str(caught.value)
    assert message in text
    assert text.startswith(str(d / name) if name else str(d))
    assert_no_key_material(text, d)
    assert "Q0FOQVJZ" not in text
    # the same directory, lenient: no key can sign, and the reason names the file
    lenient = SigningKeys(d, strict=False)
    with pytest.raises(CredentialUnavailable) as unavailable:
        lenient.signer()
    assert text in str(unavailable.value)
    assert_no_key_material(str(unavailable.value), d)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'}: no such key directory"):
        SigningKeys(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not a directory"):
        load_key_set(generate_key(tmp_path / "k.pem"))


def test_no_key_material_in_reprs(tmp_path: Path) -> None:
    d = key_dir(tmp_path, "k1", "k2", alg="RS256", signing="k2")
    keys = SigningKeys(d)
    current = keys.current()
    assert current is not None
    for text in (repr(current), repr(current.signing), repr(keys.signer()), str(vars(keys))):
        assert_no_key_material(text, d)
    private = serialization.load_pem_private_key((d / "k2.pem").read_bytes(), None)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert str(private.private_numbers().d) not in repr(current)


# ---------------------------------------------------------------- generate_key


@pytest.mark.parametrize("alg", ALGS)
def test_generate_key(tmp_path: Path, alg: str) -> None:
    path = generate_key(tmp_path / "k.pem", alg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_key_set(tmp_path).signing.alg == alg
    with pytest.raises(FileExistsError):
        generate_key(path, alg)


def test_generate_key_refuses_unknown_alg(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HS256"):
        generate_key(tmp_path / "k.pem", "HS256")
    assert not (tmp_path / "k.pem").exists()
