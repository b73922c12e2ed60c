"""Per agent and credential, the headers an allowed call carries upstream.

The decision names the credentials of the call's host (`Decision.credentials`, from the
profile's `spec.credentials`); the Check pipeline asks :meth:`CredentialBroker.inject` for
their headers in the same step, before the answer is encoded, so that only an allowed call
ever gets one. What the broker returns (:class:`Injected`) also removes every credential
header the agent sent to that host (it holds none, so one it sends is not its own).

Sources are built on first use, one per (agent, credential), and rebuilt when a reload
changed the credential's spec. A source that cannot give its credential now raises
:class:`~sidecar.errors.CredentialUnavailable`; the pipeline refuses the call
(`credential_unavailable`), never sends it without. When an agent is revoked its cached
tokens are dropped at once (:meth:`forget`; the pipeline calls it on the agent's first
revoked Check and whenever the revocation table's generation changes).

Values never leave through anything but :class:`Injected`, whose repr withholds them.
Must not import a transport, the state stores or Kubernetes.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from sidecar.core.decide import Decision, RequestView
from sidecar.core.model import Credential
from sidecar.core.revocation import RevocationTable
from sidecar.core.snapshot import CompiledAgent, Snapshot
from sidecar.errors import CredentialUnavailable
from sidecar.headers import CREDENTIAL_HEADERS

__all__ = ["NOTHING", "CredentialBroker", "Injected"]

log = logging.getLogger(__name__)


class Injected:
    """What an allowed call carries upstream: headers to set (overwriting) and the agent's
    own credential headers to remove. Its repr names the headers, never their values."""

    __slots__ = ("remove", "set")

    def __init__(self, set_: tuple[tuple[str, str], ...], remove: tuple[str, ...]) -> None:
        self.set = set_
        self.remove = remove

    def __repr__(self) -> str:
        names = ", ".join(k for k, _ in self.set)
        return f"Injected(set=[{names}] (values withheld), remove={list(self.remove)})"


NOTHING = Injected((), ())


class _Source(Protocol):
    def value(self, decision: Decision, view: RequestView) -> str: ...

    def drop(self) -> None: ...

    def close(self) -> None: ...


class _Secret:
    def __init__(self, spec: Any) -> None:
        from sidecar.credentials.secrets import SecretFile

        self._file = SecretFile(Path(spec.file))
        self._basic = spec.basic_username
        self._format = spec.format or "Bearer {}"

    def value(self, decision: Decision, view: RequestView) -> str:
        secret = self._file.value()
        if self._basic is not None:
            raw = f"{self._basic}:{secret}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        return self._format.replace("{}", secret)

    def drop(self) -> None:  # a file is not a cache: nothing to forget
        pass

    def close(self) -> None:
        pass


class _Token:
    """An OAuth access token (client credentials or token exchange), from its cache."""

    def __init__(self, source: Any, format_: str, wait: float) -> None:
        self._source, self._format, self._wait = source, format_, wait

    def value(self, decision: Decision, view: RequestView) -> str:
        return str(self._format.replace("{}", self._source.token(self._wait)))

    def drop(self) -> None:
        self._source.drop()

    def close(self) -> None:
        self._source.close()


class _TxnToken:
    """A Transaction Token minted for this call: `scope` the purpose, `tctx` what was decided."""

    def __init__(self, spec: Any, minter: Any, subject: str, pod: str) -> None:
        from sidecar.core.model import parse_duration

        self._audience = spec.audience
        self._ttl = parse_duration(spec.ttl)
        self._minter, self._sub, self._pod = minter, subject, pod

    def value(self, decision: Decision, view: RequestView) -> str:
        tctx: dict[str, Any] = {"decision": decision.decision_id, "method": decision.method}
        if decision.mcp_tools:
            tctx["tools"] = list(decision.mcp_tools)
        else:
            tctx["path"] = decision.path
        if decision.task:
            tctx["task"] = decision.task
        if decision.grant is not None:
            tctx["grant"] = decision.grant.id
        return str(
            self._minter.mint(
                sub=self._sub,
                aud=self._audience or decision.host,
                scope=decision.purpose,
                tctx=tctx,
                txn=decision.decision_id,
                ttl=self._ttl,
                req_wl=self._pod or None,
            )
        )

    def drop(self) -> None:  # minted per call: nothing cached
        pass

    def close(self) -> None:
        pass


class CredentialBroker:
    """One Check worker's credentials. ``txn_keys`` is the directory of signing keys for
    Transaction Tokens (None: a `transactionToken` credential is unavailable), ``issuer``
    their `iss`; ``wait`` bounds how long a Check waits for a first token in flight."""

    def __init__(
        self,
        *,
        namespace: str,
        pod: str = "",
        txn_keys: Path | None = None,
        issuer: str = "",
        wait: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ns, self._pod = namespace, pod
        self._txn_keys, self._issuer = txn_keys, issuer
        self._wait, self._clock = wait, clock
        self._sources: dict[tuple[str, str], tuple[Credential, _Source]] = {}
        self._minter: Any = None
        self._lock = threading.Lock()
        self._generation = -1
        self._prepared: Snapshot | None = None

    # -- the Check path --------------------------------------------------------------------

    def prepare(self, snapshot: Snapshot | None) -> None:
        """Build the sources of every credential of ``snapshot`` (a new one: after a load
        or reload), so that OAuth tokens are fetched before the first call needs them, and
        close those of credentials that are gone. Cheap when the snapshot is the same."""
        if snapshot is None or snapshot is self._prepared:
            return
        self._prepared = snapshot
        wanted = set()
        for agent in snapshot.agents.values():
            for cred in agent.credentials:
                wanted.add((agent.name, cred.name))
                try:
                    self._source(agent, cred.name, cred.spec)
                except Exception:  # a bad source is reported on the call that needs it
                    log.warning("credential %s of %s not ready", cred.name, agent.name)
        with self._lock:
            gone = [k for k in self._sources if k not in wanted]
            closing = [self._sources.pop(k)[1] for k in gone]
        for source in closing:
            source.close()

    def inject(self, decision: Decision, view: RequestView, snapshot: Snapshot) -> Injected:
        """The headers of ``decision.credentials`` for this allowed call. Raises
        CredentialUnavailable naming the credential when one cannot be had now."""
        agent = snapshot.agents[decision.agent]
        to_set: list[tuple[str, str]] = []
        for cred in agent.credentials:
            name = cred.name
            if name not in decision.credentials:
                continue
            source = self._source(agent, name, cred.spec)
            try:
                value = source.value(decision, view)
            except CredentialUnavailable as exc:
                raise CredentialUnavailable(f"credential {name!r}: {exc}") from None
            if any(c in value for c in "\r\n\x00"):
                raise CredentialUnavailable(
                    f"credential {name!r}: its value holds a line break or NUL (not sent)"
                )
            to_set.append((cred.header, value))
        headers = view.headers
        remove = tuple(
            h for h in CREDENTIAL_HEADERS if h in headers and all(h != k for k, _ in to_set)
        )
        return Injected(tuple(to_set), remove)

    def observe(self, revocations: RevocationTable, now: float) -> None:
        """Drop the cached tokens of every agent the table revokes, once per generation."""
        if revocations.generation == self._generation or not self._sources:
            return
        self._generation = revocations.generation
        for agent in {a for a, _ in list(self._sources)}:
            if revocations.find(self._ns, agent, now) is not None:
                self.forget(agent)

    def forget(self, agent: str) -> None:
        """Forget every cached token of ``agent`` at once (it was revoked)."""
        with self._lock:
            sources = [s for (a, _), (_, s) in self._sources.items() if a == agent]
        for source in sources:
            source.drop()
        if sources:
            log.info("dropped the cached credentials of revoked agent %s", agent)

    def close(self) -> None:
        with self._lock:
            sources, self._sources = list(self._sources.values()), {}
        for _, source in sources:
            source.close()

    # -- sources ---------------------------------------------------------------------------

    def _source(self, agent: CompiledAgent, name: str, spec: Credential) -> _Source:
        key = (agent.name, name)
        found = self._sources.get(key)
        if found is not None and found[0] is spec:  # the same snapshot's spec: the hot path
            return found[1]
        with self._lock:
            found = self._sources.get(key)
            if found is not None and found[0] == spec:  # a reload that left it unchanged
                self._sources[key] = (spec, found[1])
                return found[1]
            source = self._build(agent, spec)
            if found is not None:
                found[1].close()
            self._sources[key] = (spec, source)
            return source

    def _build(self, agent: CompiledAgent, spec: Credential) -> _Source:
        if spec.secret is not None:
            return _Secret(spec.secret)
        if spec.transaction_token is not None:
            minter, subject = self._txn_minter(), self._subject(agent)
            return _TxnToken(spec.transaction_token, minter, subject, self._pod)
        from sidecar.credentials.oauth import ClientCredentials, TokenExchange, TokenSettings
        from sidecar.credentials.secrets import SecretFile

        def file(path: str | None) -> SecretFile | None:
            return None if path is None else SecretFile(Path(path))

        label = f"{agent.name}/{spec.kind}"
        if spec.oauth2_client_credentials is not None:
            cc = spec.oauth2_client_credentials
            source: Any = ClientCredentials(
                label,
                token_url=cc.token_url,
                client_id=SecretFile(Path(cc.client_id_file)),
                client_secret=SecretFile(Path(cc.client_secret_file)),
                scopes=tuple(cc.scopes),
                audience=cc.audience,
                resource=cc.resource,
                auth="client_secret_basic" if cc.client_auth == "basic" else "client_secret_post",
                settings=TokenSettings(ca_file=cc.ca_file),
            )
            source.prefetch()
            return _Token(source, cc.format, self._wait)
        te = spec.token_exchange
        assert te is not None
        source = TokenExchange(
            label,
            token_url=te.token_url,
            subject_token=SecretFile(Path(te.subject_token_file)),
            subject_token_type=te.subject_token_type,
            actor_token=file(te.actor_token_file),
            actor_token_type=te.actor_token_type,
            audience=te.audience,
            resource=te.resource,
            scopes=tuple(te.scopes),
            requested_token_type=te.requested_token_type,
            client_id=file(te.client_id_file),
            client_secret=file(te.client_secret_file),
            settings=TokenSettings(ca_file=te.ca_file),
        )
        source.prefetch()
        return _Token(source, te.format, self._wait)

    def _txn_minter(self) -> Any:
        if self._minter is None:
            if self._txn_keys is None:
                return _NoKeys()
            from sidecar.credentials.keys import SigningKeys
            from sidecar.credentials.txntoken import TxnTokenMinter

            keys = SigningKeys(self._txn_keys, strict=False)  # a bad Secret: 503, not 500
            self._minter = TxnTokenMinter(keys, self._issuer)
        return self._minter

    def _subject(self, agent: CompiledAgent) -> str:
        """The agent's identity as `sub`: its SPIFFE ID if the profile names one, else
        `agent:NAMESPACE/NAME`."""
        for identity in agent.profile.spec.identities:
            if identity.spiffe is not None:
                return identity.spiffe
        return f"agent:{self._ns}/{agent.name}"


class _NoKeys:
    def mint(self, **_: Mapping[str, Any]) -> str:
        raise CredentialUnavailable(
            "no Transaction Token signing keys are configured (--txn-token-keys)"
        )
