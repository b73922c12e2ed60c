"""The one boundary where the Kubernetes client's errors become mandate's.

kubernetes_asyncio's ApiException, aiohttp's client errors, asyncio timeouts and OS errors
are translated here, and only here (as httpx's `map_httpcore_exceptions`), into a small tree
under :class:`KubeError` that says what the caller can do about it:

- :class:`KubeUnavailable`: the API server cannot be reached or cannot serve now (refused,
  reset, DNS, TLS, 5xx, 429): retry with backoff, keeping the last known state;
  :class:`KubeTimeout` is the same when nothing answered in time (a request, or a watch
  that went silent).
- :class:`KubeForbidden`: 401/403, missing credentials or RBAC. Never "there is nothing": a
  watcher that may not list keeps what it has and says so.
- :class:`KubeNotFound` (404), :class:`KubeConflict` (409), :class:`KubeGone` (410: the
  resourceVersion was compacted away, list again).
- :class:`KubeInvalid`: the request was refused as malformed (400, 422, other 4xx), or the
  answer is not what the API promises (a list without items, a stream line that is no
  watch event).

Every error carries the HTTP status if there was one, and as its message the one
description (`describe`) that logs, readiness (`last_error`) and metrics show. The other
modules of the wing catch only these types. Loading a kubeconfig is translated here too,
into the project's ConfigError. This module does not retry, log or decide anything.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from sidecar.errors import ConfigError, MandateError

__all__ = [
    "KubeConflict",
    "KubeError",
    "KubeForbidden",
    "KubeGone",
    "KubeInvalid",
    "KubeNotFound",
    "KubeTimeout",
    "KubeUnavailable",
    "describe",
    "error_for_status",
    "error_from_response",
    "loading_config",
    "translated",
]


class KubeError(MandateError):
    """A Kubernetes API request failed; the message is its description (`describe`)."""

    code = "kube_error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeUnavailable(KubeError):
    """The API server cannot be reached, or cannot serve now (5xx, 429)."""

    code = "kube_unavailable"


class KubeTimeout(KubeUnavailable):
    """Nothing answered in time: a request, or an open watch that went silent."""

    code = "kube_timeout"


class KubeForbidden(KubeError):
    """401/403: the credentials or the RBAC of this pod do not allow the request."""

    code = "kube_forbidden"


class KubeNotFound(KubeError):
    """404: the object (or the resource) is not there."""

    code = "kube_not_found"


class KubeConflict(KubeError):
    """409: the object changed since the resourceVersion the request was conditional on."""

    code = "kube_conflict"


class KubeGone(KubeError):
    """410: the resourceVersion to watch (or continue a list) from was compacted away."""

    code = "kube_gone"


class KubeInvalid(KubeError):
    """The request was refused as malformed (400, 422, other 4xx), or the answer is not
    what the API promises."""

    code = "kube_invalid"


def _status_text(status: int | None, reason: str | None, body: Any) -> str:
    """'HTTP 403 Forbidden: <the Status message>', as kubectl would say it."""
    message = ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        message = json.loads(body or b"").get("message", "")
    return f"HTTP {status} {reason or ''}".strip() + (f": {message}" if message else "")


def describe(exc: BaseException) -> str:
    """The one description of an error, for logs, `last_error` and report failures."""
    if isinstance(exc, KubeError):
        return str(exc)
    if isinstance(exc, ApiException):
        return _status_text(exc.status, exc.reason, exc.body)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _class_for_status(status: int | None) -> type[KubeError]:
    if status in (401, 403):
        return KubeForbidden
    if status == 404:
        return KubeNotFound
    if status == 409:
        return KubeConflict
    if status == 410:
        return KubeGone
    if status is None or status in (408, 429) or status >= 500:
        return KubeUnavailable
    return KubeInvalid  # 400, 422, other 4xx; 0: a request the client could not build


def error_for_status(status: int | None, reason: str | None = None, body: Any = None) -> KubeError:
    """The KubeError for an HTTP answer with this status (and Status body)."""
    return _class_for_status(status)(_status_text(status, reason, body), status=status)


async def error_from_response(resp: aiohttp.ClientResponse) -> KubeError:
    """The KubeError for a response that is not 200 (a watch request answered with an
    error instead of a stream); reads and releases the response."""
    with translated():
        body = await resp.text()
    resp.release()
    return error_for_status(resp.status, resp.reason, body)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Around a call into kubernetes_asyncio or aiohttp: their errors leave as KubeErrors
    (the original as ``__cause__``). Other exceptions, and KubeErrors, pass unchanged."""
    try:
        yield
    except KubeError:
        raise
    except ApiException as exc:
        raise error_for_status(exc.status, exc.reason, exc.body) from exc
    except TimeoutError as exc:  # asyncio's and aiohttp's (ServerTimeoutError) included
        raise KubeTimeout(describe(exc)) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise KubeUnavailable(describe(exc)) from exc
    except ValueError as exc:  # an answer that does not decode (JSON, UTF-8)
        raise KubeInvalid(describe(exc)) from exc


@contextlib.contextmanager
def loading_config(where: str) -> Iterator[None]:
    """Around loading a kubeconfig (or the in-cluster config): its errors leave as
    ConfigError naming ``where``."""
    try:
        yield
    except (ConfigException, OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{where}: cannot be loaded ({exc})") from None
