"""Revocations as the decision sees them (pure).

A :class:`Revocation` stops one agent (or every agent, `agent: "*"`) in one namespace,
with a reason, until it expires or is removed. Several sources write revocations (the
Kubernetes watcher, the admin API, behaviour analysis); each entry has a unique `key`
(`<source>:<namespace>/<name>`). A :class:`RevocationTable` is an immutable index of the
entries in force at one generation of the shared table; `decide` asks it whether the
attributed agent is revoked at `now`, so expiry needs no writer at all.
This module must not import any transport, Kubernetes or telemetry library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["ALL_AGENTS", "EMPTY_TABLE", "Revocation", "RevocationTable", "make_key"]

ALL_AGENTS = "*"


def make_key(source: str, namespace: str, name: str) -> str:
    return f"{source}:{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class Revocation:
    key: str
    agent: str  # a profile name, or "*" for every agent in the namespace
    namespace: str
    reason: str
    source: str  # "kubernetes" | "admin" | "behaviour"
    name: str = ""  # the AgentRevocation's name, or the admin entry's id
    expires_at: float | None = None  # seconds since the epoch; None: until removed
    created_at: float = 0.0
    uid: str = ""  # the Kubernetes object's uid, for Events

    def active(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Revocation:
        """Inverse of `as_dict`; raises KeyError/TypeError/ValueError on a bad entry."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a revocation must be an object, not {type(data).__name__}")
        expires = data.get("expires_at")
        return cls(
            key=str(data["key"]),
            agent=str(data["agent"]),
            namespace=str(data["namespace"]),
            reason=str(data["reason"]),
            source=str(data["source"]),
            name=str(data.get("name", "")),
            expires_at=None if expires is None else float(expires),
            created_at=float(data.get("created_at", 0.0)),
            uid=str(data.get("uid", "")),
        )


@dataclass(frozen=True, slots=True)
class RevocationTable:
    """The revocations of one table generation, indexed by (namespace, agent)."""

    generation: int = 0
    entries: tuple[Revocation, ...] = ()
    # False until the writer knows the table is whole (first sync done, nothing dropped):
    # until then no call can be allowed, since a revocation might be missing.
    complete: bool = True
    # Set (with complete False) when the writer was refused the revocations: the API server
    # answered 401/403 or has no AgentRevocation resource, a configuration error that no
    # wait repairs. Says what is missing; every call is denied until it is fixed.
    refused: str = ""
    _index: Mapping[tuple[str, str], tuple[Revocation, ...]] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    @classmethod
    def build(
        cls,
        generation: int,
        entries: Iterable[Revocation],
        complete: bool = True,
        refused: str = "",
    ) -> RevocationTable:
        items = tuple(sorted(entries, key=lambda r: r.key))
        index: dict[tuple[str, str], list[Revocation]] = {}
        for r in items:
            index.setdefault((r.namespace, r.agent), []).append(r)
        frozen = MappingProxyType({k: tuple(v) for k, v in index.items()})
        return cls(generation, items, complete and not refused, refused, frozen)

    def find(self, namespace: str, agent: str, now: float) -> Revocation | None:
        """The revocation in force for this agent now (its own first, then `*`), or None."""
        if not self._index:
            return None
        for key in ((namespace, agent), (namespace, ALL_AGENTS)):
            for r in self._index.get(key, ()):
                if r.active(now):
                    return r
        return None

    def __len__(self) -> int:
        return len(self.entries)


EMPTY_TABLE = RevocationTable()
