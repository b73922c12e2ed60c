"""The Kubernetes API client (kubernetes_asyncio) and the one place its errors are described
for logs and readiness."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from sidecar.errors import ConfigError

__all__ = ["make_api_client"]


async def make_api_client(
    kubeconfig: str | Path | None = None, *, context: str | None = None
) -> ApiClient:
    """An ApiClient from a kubeconfig file, or from the pod's service account when None."""
    cfg = Configuration()
    try:
        if kubeconfig is not None:
            await kube_config.load_kube_config(
                config_file=str(kubeconfig),
                context=context,
                client_configuration=cfg,
                persist_config=False,
            )
        else:
            load_incluster: Any = kube_config.load_incluster_config  # untyped in the library
            load_incluster(client_configuration=cfg)
    except (ConfigException, OSError, ValueError, KeyError) as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig is not None else "in-cluster config"
        raise ConfigError(f"{where}: cannot be loaded ({exc})") from None
    return ApiClient(configuration=cfg)


class _StreamError(Exception):
    """The watch stream carried something that is not a watch event."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        message = ""
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(exc.body or b"").get("message", "")
        return f"HTTP {exc.status} {exc.reason or ''}".strip() + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_Job = tuple[Callable[[], Awaitable[None]], str]  # a report to send, and what it reports
