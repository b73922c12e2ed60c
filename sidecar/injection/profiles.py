"""Which agents a namespace's profiles name, for the webhook's check that a pod's agent has
one (issue 19, finding 5: such a pod started, Ready, and denied every call).

The profiles reach the sidecar as the ConfigMap ``profilesConfigMap`` of the pod's
namespace (deploy/agents); the webhook reads the same ConfigMap from the API server (a
``get`` on that one name, deploy/base/webhook-rbac.yaml) with a short timeout, and parses
only the agents' names (``kind: AgentProfile``, ``metadata.name``): whether the profiles are
valid is mandate's to say, on the pod (not Ready, an Event). When the API server cannot
answer, the answer says why and the webhook injects with a warning: this check must never
be what keeps agent pods from starting.

Must not contain injection logic (`sidecar.injection.pod`) or decide anything about a pod.
"""

from __future__ import annotations

import logging
import os
import ssl
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


@dataclass(frozen=True)
class Agents:
    """The answer for one namespace: ``names`` (None when unknown, ``problem`` says why),
    and ``source``, what was read, for messages."""

    source: str
    names: frozenset[str] | None = None
    problem: str = ""
    missing: bool = False  # the ConfigMap does not exist: the sidecar could not start


def agents_in(data: Mapping[str, Any]) -> frozenset[str]:
    """The agents named by the profiles of a ConfigMap's ``data`` (its *.yaml/*.yml keys,
    as mandate reads the mounted directory). ValueError if one is not YAML."""
    names: set[str] = set()
    for key, text in data.items():
        if not str(key).endswith((".yaml", ".yml")) or not isinstance(text, str):
            continue
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise ValueError(f"{key}: not YAML ({exc})") from None
        for doc in docs:
            if isinstance(doc, dict) and (doc.get("kind"), doc.get("apiVersion")) == (
                KIND,
                API_VERSION,
            ):
                name = (doc.get("metadata") or {}).get("name")
                if isinstance(name, str):
                    names.add(name)
    return frozenset(names)


class ApiProfiles:
    """Reads ``config_map`` of a namespace from the API server at ``api`` (https://host:port,
    or http:// in tests), with the bearer token in ``token_file`` (re-read on every call: a
    projected token is renewed) and the cluster CA ``ca_file``. Parses a ConfigMap again only
    when its resourceVersion changed."""

    def __init__(
        self,
        api: str,
        config_map: str,
        *,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.api = api.rstrip("/")
        self.config_map = config_map
        self.token_file = token_file
        self.ca_file = ca_file
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._parsed: dict[str, tuple[str, frozenset[str]]] = {}
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
        cached = self._parsed.get(namespace)
        if cached is not None and version and cached[0] == version:
            return Agents(source, cached[1])
        try:
            names = agents_in(body.get("data") or {})
        except ValueError as exc:
            return Agents(source, problem=str(exc))
        self._parsed[namespace] = (version, names)
        return Agents(source, names)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
