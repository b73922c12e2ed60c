"""The keys mandate signs Transaction Tokens with, and the JWKS upstreams verify them with.

A key directory is a Kubernetes Secret mounted only into mandate's container (or any plain
directory). It holds:

- ``<kid>.pem``: one unencrypted PEM private key per file (PKCS#8 ``PRIVATE KEY``, or
  ``EC PRIVATE KEY`` / ``RSA PRIVATE KEY``). The file name is the key id (``kid``): an
  operator names keys, and ``signing-kid`` can name one without computing a thumbprint.
  Supported: EC P-256 (ES256), EC P-384 (ES384), Ed25519 (EdDSA), RSA of 2048 bits or more
  (RS256). A kid is never reused for another key: upstreams cache the JWKS by kid.
- ``signing-kid``: the kid of the key that signs. Optional with one key; required with
  several, so that which key signs is always explicit.

Every key in the directory is published in the JWKS; only the signing key signs. Rotation
with overlap: add the new key (published, not signing), wait until upstreams refreshed
their JWKS cache, switch ``signing-kid``, wait for the old tokens to expire (<= 60 s), then
remove the old key.

The directory is re-checked at most every ``check_interval`` seconds, on the caller's
thread: a ``readlink`` of the kubelet's ``..data`` symlink and one ``scandir`` (the kubelet
swaps ``..data`` atomically to a new timestamped directory; in a plain directory a changed
file changes its mtime, size or inode). A directory that no longer loads keeps the last
good key set, and the problem is logged once, naming the file.

Must not: log, raise or repr key material (errors name the file and the problem only);
import a transport, the state stores or Kubernetes; publish a private member in the JWKS.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.errors import ConfigError, CredentialUnavailable

__all__ = [
    "KEY_SUFFIX",
    "SIGNING_KID_FILE",
    "SUPPORTED_ALGS",
    "KeySet",
    "PrivateKey",
    "SigningKey",
    "SigningKeys",
    "generate_key",
    "load_key_file",
    "load_key_set",
]

log = logging.getLogger(__name__)

KEY_SUFFIX: Final = ".pem"
SIGNING_KID_FILE: Final = "signing-kid"
SUPPORTED_ALGS: Final = ("ES256", "ES384", "EdDSA", "RS256")
MIN_RSA_BITS: Final = 2048
# A kid is a file name (a Secret's data key allows [-._a-zA-Z0-9]) and travels in every
# token header: short, no separators that need escaping anywhere.
_KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KUBELET_DATA = "..data"
_MAX_FILE = 64 * 1024  # a 4096-bit RSA key is ~3.3 kB of PEM
# The members a public JWK may carry; anything else (d, p, q, dp, dq, qi, key_ops) is dropped.
_PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "n", "e")

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True, eq=False)
class SigningKey:
    """One loaded private key: its ``kid``, ``alg``, the file it came from and its public
    JWK. ``sign`` returns the JWS signature of a signing input (raw ``r||s`` for ECDSA)."""

    kid: str
    alg: str
    file: str
    public_jwk: Mapping[str, str]
    _private: PrivateKey = field(repr=False)
    _sign: Callable[[bytes, Any], bytes] = field(repr=False)

    def sign(self, signing_input: bytes) -> bytes:
        return self._sign(signing_input, self._private)


@dataclass(frozen=True, slots=True, eq=False)
class KeySet:
    """What one load of a key directory gave: every key (published) and the one that signs."""

    source: str  # the directory the files were read from (the ``..data`` target, if any)
    keys: Mapping[str, SigningKey]
    signing: SigningKey
    jwks_json: bytes = field(repr=False)  # the public JWKS document, compact, sorted keys


# ---------------------------------------------------------------- loading (pure of state)


def _classify(key: object, file: str) -> tuple[PrivateKey, str]:
    """The key with its JWS ``alg``, or ConfigError naming the file."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        curve = key.curve.name
        if curve == "secp256r1":
            return key, "ES256"
        if curve == "secp384r1":
            return key, "ES384"
        raise ConfigError(
            f"{file}: unsupported EC curve {curve}: use P-256 (ES256) or P-384 (ES384)"
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                f"{file}: RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} are needed"
            )
        return key, "RS256"
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"
    raise ConfigError(
        f"{file}: unsupported key type {kind}: use EC P-256, EC P-384, Ed25519 or RSA"
    )


def _public_jwk(key: PrivateKey, kid: str, alg: str, file: str) -> dict[str, str]:
    algorithm = jwt.get_algorithm_by_name(alg)
    # Always from the public key: PyJWT's to_jwk of a private key includes "d".
    full = algorithm.to_jwk(key.public_key(), as_dict=True)
    jwk = {k: str(full[k]) for k in _PUBLIC_MEMBERS if k in full}
    if "kty" not in jwk:  # pragma: no cover - PyJWT always sets kty
        raise ConfigError(f"{file}: cannot express the public key as a JWK")
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk


def _read(path: Path, shown: str) -> bytes:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{shown}: not a regular file")
        if st.st_size > _MAX_FILE:
            raise ConfigError(f"{shown}: {st.st_size} bytes is too large for a key file")
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror or type(exc).__name__}") from None


def load_key_file(path: Path, kid: str, shown: str | None = None) -> SigningKey:
    """The signing key in ``path`` (one PEM private key) under ``kid``. ConfigError naming
    the file (``shown``, default ``path``) if it is unreadable, not a PEM private key,
    encrypted, or of an unsupported type, curve or size."""
    shown = shown or str(path)
    data = _read(path, shown)
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{shown}: not a PEM file (no -----BEGIN line)")
    head = data[data.index(b"-----BEGIN ") :].split(b"\n", 1)[0]
    if b"PUBLIC KEY" in head or b"CERTIFICATE" in head:
        what = "a certificate" if b"CERTIFICATE" in head else "a public key"
        raise ConfigError(f"{shown}: holds {what}, not a private key")
    if b"ENCRYPTED" in head or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ConfigError(
            f"{shown}: the private key is encrypted: mandate needs it unencrypted "
            "(the Secret, mounted only into mandate's container, protects it)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # a password was needed
        raise ConfigError(f"{shown}: the private key is encrypted") from None
    except UnsupportedAlgorithm:
        raise ConfigError(f"{shown}: unsupported key type") from None
    except ValueError:
        # cryptography's own text is not repeated: it is about the bytes, not for an operator.
        raise ConfigError(f"{shown}: not a valid PEM private key") from None
    private, alg = _classify(key, shown)
    jwk = MappingProxyType(_public_jwk(private, kid, alg, shown))
    return SigningKey(kid, alg, shown, jwk, private, jwt.get_algorithm_by_name(alg).sign)


def _source_of(directory: Path) -> tuple[Path, str | None]:
    """Where the files are read from: the kubelet's ``..data`` target if there is one (so
    that one load reads one version of the Secret), else the directory itself."""
    try:
        target = os.readlink(directory / _KUBELET_DATA)
    except OSError:
        return directory, None
    return directory / target, target


def load_key_set(directory: Path | str) -> KeySet:
    """Load a key directory (see the module's docstring). ConfigError naming the directory
    or file: missing or empty directory, unexpected file, bad key, bad or dangling
    ``signing-kid``, several keys without ``signing-kid``."""
    directory = Path(directory)
    source, _ = _source_of(directory)
    try:
        names = sorted(e.name for e in os.scandir(source) if not e.name.startswith("."))
    except FileNotFoundError:
        raise ConfigError(f"{directory}: no such key directory") from None
    except NotADirectoryError:
        raise ConfigError(f"{directory}: not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{directory}: cannot list: {exc.strerror}") from None
    keys: dict[str, SigningKey] = {}
    signing_kid: str | None = None
    for name in names:
        shown = str(directory / name)
        if name == SIGNING_KID_FILE:
            text = _read(source / name, shown).decode("utf-8", "replace").strip()
            if not _KID.fullmatch(text):
                # The content is not echoed: a private key pasted here by mistake stays out.
                raise ConfigError(
                    f"{shown}: does not hold a key id (1-64 letters, digits, '.', '_' or '-')"
                )
            signing_kid = text
        elif name.endswith(KEY_SUFFIX):
            kid = name[: -len(KEY_SUFFIX)]
            if not _KID.fullmatch(kid):
                raise ConfigError(
                    f"{shown}: the key id (file name without {KEY_SUFFIX}) must be 1-64 "
                    "letters, digits, '.', '_' or '-', starting with a letter or digit"
                )
            keys[kid] = load_key_file(source / name, kid, shown)
        else:
            raise ConfigError(
                f"{shown}: unexpected file: a key directory holds <kid>{KEY_SUFFIX} files and "
                f"{SIGNING_KID_FILE}"
            )
    if not keys:
        raise ConfigError(f"{directory}: no signing key (no *{KEY_SUFFIX} file)")
    if signing_kid is None:
        if len(keys) > 1:
            raise ConfigError(
                f"{directory / SIGNING_KID_FILE}: missing: with several keys "
                f"({', '.join(keys)}) this file must name the one that signs"
            )
        signing_kid = next(iter(keys))
    if signing_kid not in keys:
        raise ConfigError(
            f"{directory / SIGNING_KID_FILE}: names {signing_kid!r}, but there is no "
            f"{signing_kid}{KEY_SUFFIX} (keys: {', '.join(keys)})"
        )
    jwks = {"keys": [dict(k.public_jwk) for k in keys.values()]}
    return KeySet(
        source=str(source),
        keys=MappingProxyType(keys),
        signing=keys[signing_kid],
        jwks_json=json.dumps(jwks, separators=(",", ":"), sort_keys=True).encode(),
    )


# ---------------------------------------------------------------- the live, reloading set


_EMPTY_JWKS_JSON: Final = b'{"keys":[]}'


class SigningKeys:
    """The key directory as it is now: loaded at construction, re-checked at most every
    ``check_interval`` seconds when a key or the JWKS is asked for.

    ``strict`` (the default): a directory that does not load at construction raises
    ConfigError. Otherwise the set starts empty, ``signer()`` raises CredentialUnavailable
    naming the problem, and the directory is re-checked until it loads. Either way a later
    broken reload keeps the last good set (``problem`` says what is wrong)."""

    def __init__(
        self,
        directory: Path | str,
        *,
        check_interval: float = 1.0,
        strict: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self._interval = check_interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._set: KeySet | None = None
        self._problem: str | None = None
        self._fingerprint: object = None
        self._next_check = 0.0
        try:
            fingerprint = self._stat()
        except OSError:
            fingerprint = None  # load_key_set names the problem
        try:
            self._reload(fingerprint)
        except ConfigError as exc:
            self._fingerprint = fingerprint
            if strict:
                raise
            self._note_problem(str(exc))
        self._next_check = monotonic() + check_interval

    # -- what callers use

    def signer(self) -> SigningKey:
        """The key that signs now; CredentialUnavailable if none loaded."""
        if self._monotonic() >= self._next_check:
            self.refresh()
        current = self._set
        if current is None:
            raise CredentialUnavailable(
                f"no Transaction Token signing key: {self._problem or 'not loaded'}"
            )
        return current.signing

    def current(self) -> KeySet | None:
        """The key set in force (None if none ever loaded), re-checked if due."""
        if self._monotonic() >= self._next_check:
            self.refresh()
        return self._set

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document (a fresh copy): every key of the directory (``keys`` of
        kty, crv and x/y or n/e, kid, alg, use "sig"); ``{"keys": []}`` if none loaded."""
        result: dict[str, Any] = json.loads(self.jwks_json())
        return result

    def jwks_json(self) -> bytes:
        """The JWKS document as compact JSON (sorted keys): what the JWKS endpoint serves."""
        current = self.current()
        return current.jwks_json if current is not None else _EMPTY_JWKS_JSON

    @property
    def problem(self) -> str | None:
        """Why the directory as it is now does not load (naming the file), or None."""
        return self._problem

    def refresh(self) -> bool:
        """Check the directory now; reload if it changed. True if a new set was loaded. A
        thread that finds another one checking returns at once (the current set stays)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._next_check = self._monotonic() + self._interval
            problem = ""
            fingerprint: object = None
            # Twice at most: a kubelet swap between listing and reading (the old timestamped
            # directory removed under us) is looked at again before it counts as broken.
            for _ in range(2):
                try:
                    fingerprint = self._stat()
                except OSError as exc:
                    problem = f"{self.directory}: cannot list: {exc.strerror}"
                    continue
                if fingerprint == self._fingerprint:
                    return False
                try:
                    self._reload(fingerprint)
                except ConfigError as exc:
                    problem = str(exc)
                    continue
                return True
            # Remember the fingerprint: the same broken state is not re-parsed or re-logged
            # every interval; any further change is looked at again.
            self._fingerprint = fingerprint
            self._note_problem(problem)
            return False
        finally:
            self._lock.release()

    # -- internals

    def _stat(self) -> object:
        """What changes when the directory's content does: the ``..data`` target, and the
        name, inode, size and mtime of each file read."""
        source, target = _source_of(self.directory)
        entries = []
        with os.scandir(source) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    st = e.stat()  # follows symlinks: a file symlink's target counts
                except OSError:
                    entries.append((e.name, 0, 0, 0))
                    continue
                entries.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
        entries.sort()
        return (target, tuple(entries))

    def _reload(self, fingerprint: object) -> None:
        new = load_key_set(self.directory)
        self._set, self._fingerprint, self._problem = new, fingerprint, None
        log.info(
            "Transaction Token keys from %s: %s; signing with %s",
            self.directory,
            ", ".join(f"{k.kid} ({k.alg})" for k in new.keys.values()),
            new.signing.kid,
        )

    def _note_problem(self, problem: str) -> None:
        if problem != self._problem:
            keeping = (
                f"keeping the last good keys ({', '.join(self._set.keys)})"
                if self._set is not None
                else "no key can sign"
            )
            log.error("Transaction Token keys: %s; %s", problem, keeping)
        self._problem = problem


# ---------------------------------------------------------------- generating (tests, demo)


def generate_key(path: Path | str, alg: str = "ES256") -> Path:
    """Write a new private key for ``alg`` (one of SUPPORTED_ALGS) to ``path`` as an
    unencrypted PKCS#8 PEM, mode 0600. Refuses to overwrite (FileExistsError): a kid is
    never reused for another key. For tests and the demo; production keys come from the
    operator's own tooling (e.g. ``openssl genpkey -algorithm EC -pkeyopt
    ec_paramgen_curve:P-256``)."""
    path = Path(path)
    key: PrivateKey
    if alg == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif alg == "ES384":
        key = ec.generate_private_key(ec.SECP384R1())
    elif alg == "EdDSA":
        key = ed25519.Ed25519PrivateKey.generate()
    elif alg == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS)
    else:
        raise ValueError(f"unsupported alg {alg!r}: one of {', '.join(SUPPORTED_ALGS)}")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path
