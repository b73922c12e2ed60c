"""Which agents a namespace's profiles name, for the webhook's check that a pod's agent has
one (issue 19, finding 5: such a pod started, Ready, and denied every call).

The profiles reach the sidecar as the ConfigMap ``profilesConfigMap`` of the pod's
namespace (deploy/agents); the webhook reads the same ConfigMap from the API server (a
``get`` on that one name, deploy/base/webhook-rbac.yaml) with a short timeout, and parses
only the agents' names (``kind: AgentProfile``, ``metadata.name``): whether the profiles are
valid is mandate's to say, on the pod (not Ready, an Event). When the API server cannot
answer, the answer says why and the webhook injects with a warning: this check must never
be what keeps agent pods from starting.

One namespace's ConfigMap must not stall the webhook for every other (its failurePolicy is
Fail, its timeout 5 s: a stalled webhook stops pod creation cluster-wide), and the tenant of
an agent namespace may write that ConfigMap. So the profiles are read off the event loop
(a thread, at most `PARSE_CONCURRENCY` at once), under a size cap (`MAX_PROFILE_BYTES`),
a nesting cap (`MAX_DEPTH`) and a time budget (``parse_budget``); over any of them the answer
is "unknown" with the reason (injected, with a warning), as for YAML that does not parse.
Only the agents' names are taken, from libyaml's events (`yaml.CSafeLoader` where PyYAML has
it): no document is built (building one is slow, and libyaml's composer recurses in C: a
deeply nested document crashes the process), and the walk stops at the nesting cap and the
deadline. A parse that outlives its review goes on (to its own deadline) and its answer is
kept for that resourceVersion.

Must not contain injection logic (`sidecar.injection.pod`) or decide anything about a pod.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

from sidecar.core.model import API_VERSION, KIND
from sidecar.errors import ConfigError

__all__ = ["Agents", "ApiProfiles", "agents_in"]

log = logging.getLogger("mandate.webhook")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

MAX_PROFILE_BYTES = 512 * 1024  # of a ConfigMap's *.yaml/*.yml data (the API allows 1 MiB)
MAX_DEPTH = 64  # nesting of collections (libyaml slows with each flow level: quadratic)
PARSE_BUDGET = 1.0  # seconds a review waits for a parse (and a parse may take)
PARSE_CONCURRENCY = 2

_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVER: Any = yaml.resolver.Resolver()
_STR, _MERGE = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"
_OTHER = object()  # a value that is not a string (a number, a collection ...)
_COLLECTION = object()  # an anchor's collection (an alias of it cannot be followed here)
_CHECK_EVERY = 512  # events between two looks at the clock


@dataclass(frozen=True)
class Agents:
    """The answer for one namespace: ``names`` (None when unknown, ``problem`` says why),
    and ``source``, what was read, for messages."""

    source: str
    names: frozenset[str] | None = None
    problem: str = ""
    missing: bool = False  # the ConfigMap does not exist: the sidecar could not start


def agents_in(
    data: Mapping[str, Any],
    *,
    deadline: float | None = None,
    max_bytes: int = MAX_PROFILE_BYTES,
) -> frozenset[str]:
    """The agents named by the profiles of a ConfigMap's ``data`` (its *.yaml/*.yml keys,
    as mandate reads the mounted directory): ``metadata.name`` of each document of
    ``kind: AgentProfile`` and mandate's ``apiVersion``, as `yaml.safe_load_all` would
    read them. ValueError if one is not YAML, if they hold more than ``max_bytes`` or nest
    deeper than `MAX_DEPTH`, or if reading them is not done by ``deadline``
    (`time.monotonic`)."""
    texts = [
        (str(key), text)
        for key, text in data.items()
        if str(key).endswith((".yaml", ".yml")) and isinstance(text, str)
    ]
    size = sum(len(text.encode("utf-8", "surrogatepass")) for _, text in texts)
    if size > max_bytes:
        raise ValueError(
            f"its profiles are {size} bytes, over the {max_bytes} the webhook reads: not read"
        )
    names: set[str] = set()
    for key, text in texts:
        try:
            names |= _names(text, deadline)
        except yaml.YAMLError as exc:
            raise ValueError(f"{key}: not YAML ({exc})") from None
        except RecursionError:
            raise ValueError(f"{key}: nested too deeply") from None
        except _Cut as exc:
            raise ValueError(f"{key}: {exc}") from None
    return frozenset(names)


class _Cut(Exception):
    """The walk stopped: too deep, or out of time."""


class _Frame:
    """A collection being read: a mapping's next node is a key or a value."""

    __slots__ = ("key", "mapping", "role", "want_key")

    def __init__(self, mapping: bool, role: str) -> None:
        self.mapping = mapping
        self.role = role  # "root": a document's mapping; "meta": its metadata; "" other
        self.want_key = True
        self.key: object = None


def _scalar(event: Any) -> object:
    """A scalar event's value as `yaml.safe_load` types it: the text if a string, else
    `_OTHER` (the merge key ``<<`` is `_MERGE`)."""
    tag = event.tag
    if tag is None or tag == "!":
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag == _MERGE:
        return _MERGE
    return event.value if tag == _STR else _OTHER


def _names(text: str, deadline: float | None) -> set[str]:
    """The agents one file names (`agents_in`), from its events. Where a document takes
    its ``metadata`` from an alias of a collection, or has a merge key (``<<``) where the
    names are read, the file is read whole instead (once the walk has checked its depth
    and time: the composer is then safe)."""
    names: set[str] = set()
    stack: list[_Frame] = []
    anchors: dict[str, object] = {}
    doc: dict[str, object] = {}
    whole = False  # read the file whole: the walk cannot follow it
    for count, event in enumerate(yaml.parse(text, Loader=_LOADER)):
        if deadline is not None and count % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise _Cut("reading its profiles takes too long: not read")
        if isinstance(event, yaml.ScalarEvent):
            value = _scalar(event)
            if event.anchor:
                anchors[event.anchor] = value
            whole |= _place(stack, doc, value)
        elif isinstance(event, yaml.AliasEvent):
            value = anchors.get(event.anchor or "", _COLLECTION)
            whole |= _place(stack, doc, value)
        elif isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise _Cut(f"its profiles nest deeper than {MAX_DEPTH}: not read")
            if event.anchor:
                anchors[event.anchor] = _COLLECTION
            mapping = isinstance(event, yaml.MappingStartEvent)
            role = _role(stack, mapping)
            _place(stack, doc, _OTHER)  # followed here: no need to read the file whole
            stack.append(_Frame(mapping, role))
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            stack.pop()
        elif isinstance(event, yaml.DocumentStartEvent):
            stack, anchors, doc = [], {}, {}
        elif isinstance(event, yaml.DocumentEndEvent):
            name = doc.get("name")
            if (doc.get("kind"), doc.get("apiVersion")) == (KIND, API_VERSION) and isinstance(
                name, str
            ):
                names.add(name)
    return _names_whole(text) if whole else names


def _role(stack: list[_Frame], mapping: bool) -> str:
    """What a collection that starts now is: a document's mapping, its metadata, or other."""
    if not mapping:
        return ""
    if not stack:
        return "root"
    top = stack[-1]
    if top.mapping and not top.want_key and top.role == "root" and top.key == "metadata":
        return "meta"
    return ""


def _place(stack: list[_Frame], doc: dict[str, object], value: object) -> bool:
    """Put a node where it goes (a key, or the value of the key before it); ``value``: a
    scalar's (`_scalar`), `_OTHER` for a collection read here, `_COLLECTION` for an alias
    of one. True if the walk cannot follow it (a merge key, or metadata from an alias)."""
    if not stack or not stack[-1].mapping:
        return False
    top = stack[-1]
    if top.want_key:
        top.key, top.want_key = value, False
        return bool(top.role) and value is _MERGE
    top.want_key = True
    aliased = value is _COLLECTION
    if aliased or value is _MERGE:
        value = _OTHER
    if top.role == "root" and top.key in ("kind", "apiVersion"):
        doc[str(top.key)] = value
    elif top.role == "root" and top.key == "metadata":
        doc.pop("name", None)  # a later metadata replaces an earlier one
        return aliased  # its name may be in there
    elif top.role == "meta" and top.key == "name":
        doc["name"] = value
    return False


def _names_whole(text: str) -> set[str]:
    names: set[str] = set()
    for doc in yaml.load_all(text, Loader=_LOADER):
        if isinstance(doc, dict) and (doc.get("kind"), doc.get("apiVersion")) == (
            KIND,
            API_VERSION,
        ):
            meta = doc.get("metadata")
            name = meta.get("name") if isinstance(meta, dict) else None
            if isinstance(name, str):
                names.add(name)
    return names


class ApiProfiles:
    """Reads ``config_map`` of a namespace from the API server at ``api`` (https://host:port,
    or http:// in tests), with the bearer token in ``token_file`` (re-read on every call: a
    projected token is renewed) and the cluster CA ``ca_file``. Parses a ConfigMap again only
    when its resourceVersion changed, in a thread, under ``max_bytes`` and within
    ``parse_budget`` seconds (module docstring)."""

    def __init__(
        self,
        api: str,
        config_map: str,
        *,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        timeout: float = 2.0,
        max_bytes: int = MAX_PROFILE_BYTES,
        parse_budget: float = PARSE_BUDGET,
    ) -> None:
        self.api = api.rstrip("/")
        self.config_map = config_map
        self.token_file = token_file
        self.ca_file = ca_file
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.parse_budget = parse_budget
        self._session: aiohttp.ClientSession | None = None
        # namespace: (resourceVersion, the agents, or why they are unknown)
        self._parsed: dict[str, tuple[str, frozenset[str] | str]] = {}
        self._parsing: dict[tuple[str, str], asyncio.Task[frozenset[str] | str]] = {}
        self._threads = asyncio.Semaphore(PARSE_CONCURRENCY)
        self._context: ssl.SSLContext | None = None

    @classmethod
    def in_cluster(cls, config_map: str, **kwargs: Any) -> ApiProfiles:
        """The API server of the cluster the webhook runs in (its Service environment and the
        service-account token mounted at the standard path)."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError(
                "--profiles-api in-cluster: KUBERNETES_SERVICE_HOST is not set (not in a pod?)"
            )
        if ":" in host:
            host = f"[{host}]"
        return cls(
            f"https://{host}:{port}",
            config_map,
            token_file=SA_DIR / "token",
            ca_file=SA_DIR / "ca.crt",
            **kwargs,
        )

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.api.startswith("https://"):
            return False
        if self._context is None:  # the cluster CA, loaded once
            cafile = str(self.ca_file) if self.ca_file else None
            self._context = ssl.create_default_context(cafile=cafile)
        return self._context

    async def agents(self, namespace: str) -> Agents:
        source = f"ConfigMap {namespace}/{self.config_map}"
        url = (
            f"{self.api}/api/v1/namespaces/{quote(namespace, safe='')}/configmaps/"
            f"{quote(self.config_map, safe='')}"
        )
        headers = {"Accept": "application/json"}
        try:
            if self.token_file is not None:
                headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout)
                )
            async with self._session.get(url, headers=headers, ssl=self._ssl()) as resp:
                if resp.status == 404:
                    return Agents(
                        source,
                        frozenset(),
                        f"namespace {namespace} has no ConfigMap {self.config_map}",
                        missing=True,
                    )
                if resp.status in (401, 403):
                    return Agents(
                        source,
                        problem=f"the webhook may not read {source} (HTTP {resp.status}): "
                        "grant it get on that ConfigMap (deploy/base/webhook-rbac.yaml)",
                    )
                if resp.status != 200:
                    return Agents(source, problem=f"the API server answered HTTP {resp.status}")
                body = await resp.json()
        except (TimeoutError, OSError, aiohttp.ClientError, ValueError) as exc:
            return Agents(source, problem=f"cannot read it from the API server ({exc!r})")
        meta = body.get("metadata") if isinstance(body, dict) else None
        version = str((meta or {}).get("resourceVersion", ""))
        data = body.get("data") if isinstance(body, dict) else None
        found = await self._agents(namespace, version, data if isinstance(data, dict) else {})
        if isinstance(found, str):
            return Agents(source, problem=found)
        return Agents(source, found)

    async def _agents(
        self, namespace: str, version: str, data: Mapping[str, Any]
    ) -> frozenset[str] | str:
        """The agents of ``data`` (or why they are unknown), from the cache when its
        resourceVersion is known, else parsed in a thread; waits at most ``parse_budget``
        (the parse goes on, to its own deadline, and its answer is kept)."""
        cached = self._parsed.get(namespace)
        if cached is not None and version and cached[0] == version:
            return cached[1]
        key = (namespace, version)
        task = self._parsing.get(key) if version else None
        if task is None:
            task = asyncio.ensure_future(self._parse(namespace, version, data))
            if version:
                self._parsing[key] = task
                task.add_done_callback(lambda _: self._parsing.pop(key, None))
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.parse_budget)
        except TimeoutError:
            return (
                f"reading its profiles took over {self.parse_budget:g}s (the webhook is busy "
                "with others, or they are too complex): not checked this time"
            )

    async def _parse(
        self, namespace: str, version: str, data: Mapping[str, Any]
    ) -> frozenset[str] | str:
        async with self._threads:
            deadline = time.monotonic() + self.parse_budget
            try:
                found: frozenset[str] | str = await asyncio.to_thread(
                    agents_in, data, deadline=deadline, max_bytes=self.max_bytes
                )
            except ValueError as exc:
                found = str(exc)
            except Exception as exc:  # a bug, or out of memory: unknown, never a 500
                log.exception("reading the profiles of namespace %s failed", namespace)
                found = f"reading its profiles failed ({exc!r})"
        if version:
            self._parsed[namespace] = (version, found)
        return found

    async def close(self) -> None:
        for task in list(self._parsing.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
