"""The one error boundary of the Kubernetes wing (sidecar/kube/errors.py): each library error
→ which mandate error, the one description, and that no other module of the wing catches a
library error. Pure: no server."""

from __future__ import annotations

import ast
import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from sidecar.errors import ConfigError, MandateError
from sidecar.kube.errors import (
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeGone,
    KubeInvalid,
    KubeNotFound,
    KubeTimeout,
    KubeUnavailable,
    describe,
    error_from_response,
    loading_config,
    translated,
)

KUBE = Path(__file__).resolve().parents[2] / "sidecar" / "kube"


def translate(exc: BaseException) -> BaseException:
    """What leaves `translated()` when ``exc`` is raised inside it."""
    try:
        with translated():
            raise exc
    except BaseException as out:
        return out
    raise AssertionError("nothing raised")


def api_exception(status: int, reason: str = "", message: str = "") -> ApiException:
    exc = ApiException(status=status, reason=reason)
    if message:
        exc.body = json.dumps({"kind": "Status", "message": message, "code": status}).encode()
    return exc


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, KubeInvalid),
        (401, KubeForbidden),
        (403, KubeForbidden),
        (404, KubeNotFound),
        (405, KubeInvalid),
        (408, KubeUnavailable),
        (409, KubeConflict),
        (410, KubeGone),
        (422, KubeInvalid),
        (429, KubeUnavailable),
        (500, KubeUnavailable),
        (503, KubeUnavailable),
        (504, KubeUnavailable),
        (0, KubeInvalid),  # the client could not build the request
    ],
)
def test_an_http_status_becomes_its_kube_error(status: int, kind: type[KubeError]) -> None:
    original = api_exception(status, "Reason")
    out = translate(original)
    assert type(out) is kind
    assert isinstance(out, KubeError) and isinstance(out, MandateError)
    assert out.status == status and out.__cause__ is original
    assert str(out) == f"HTTP {status} Reason"


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (TimeoutError(), KubeTimeout, "TimeoutError"),
        (TimeoutError("read"), KubeTimeout, "TimeoutError: read"),
        (
            aiohttp.ServerTimeoutError("Timeout on reading data from socket"),
            KubeTimeout,
            "ServerTimeoutError: Timeout on reading data from socket",
        ),
        (aiohttp.ServerDisconnectedError(), KubeUnavailable, "ServerDisconnectedError: "),
        (aiohttp.ClientConnectionError("reset"), KubeUnavailable, "ClientConnectionError: reset"),
        (aiohttp.ClientPayloadError("cut"), KubeUnavailable, "ClientPayloadError: cut"),
        (ConnectionRefusedError(111, "refused"), KubeUnavailable, "ConnectionRefusedError: "),
        (OSError(101, "Network is unreachable"), KubeUnavailable, "OSError: "),
        (ValueError("Expecting value"), KubeInvalid, "ValueError: Expecting value"),
        (
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            KubeInvalid,
            "UnicodeDecodeError: ",
        ),
    ],
)
def test_a_library_error_becomes_its_kube_error(
    exc: BaseException, kind: type[KubeError], text: str
) -> None:
    out = translate(exc)
    assert type(out) is kind
    assert out.__cause__ is exc
    assert isinstance(out, KubeError) and out.status is None
    assert str(out).startswith(text) and describe(out) == str(out)


def test_timeouts_are_unavailable_too() -> None:
    assert isinstance(translate(TimeoutError()), KubeUnavailable)


@pytest.mark.parametrize(
    "exc",
    [KubeGone("HTTP 410 Gone", status=410), RuntimeError("a bug"), KeyError("metadata")],
)
def test_kube_errors_and_other_exceptions_pass_unchanged(exc: Exception) -> None:
    assert translate(exc) is exc


def test_cancellation_passes_unchanged() -> None:
    cancelled = asyncio.CancelledError()
    assert translate(cancelled) is cancelled


def test_describe_says_it_as_kubectl_would() -> None:
    forbidden = api_exception(
        403,
        "Forbidden",
        'agentrevocations.mandate.dev is forbidden: User "system:serviceaccount:agents:'
        'default" cannot list resource "agentrevocations"',
    )
    assert describe(forbidden) == (
        "HTTP 403 Forbidden: agentrevocations.mandate.dev is forbidden: User "
        '"system:serviceaccount:agents:default" cannot list resource "agentrevocations"'
    )
    assert str(translate(forbidden)) == describe(forbidden)
    assert describe(api_exception(500)) == "HTTP 500"
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(RuntimeError("store full")) == "RuntimeError: store full"
    assert describe(KubeConflict("HTTP 409 Conflict", status=409)) == "HTTP 409 Conflict"
    not_json = ApiException(status=502, reason="Bad Gateway")
    not_json.body = b"<html>nginx</html>"
    assert describe(not_json) == "HTTP 502 Bad Gateway"


class FakeResponse:
    """The part of aiohttp.ClientResponse that error_from_response reads."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        self.status, self.reason, self._body = status, reason, body
        self.released = False

    async def text(self) -> str:
        return self._body

    def release(self) -> None:
        self.released = True


async def test_a_watch_answered_with_an_error_status() -> None:
    body = json.dumps({"kind": "Status", "code": 403, "message": "cannot watch"})
    resp: Any = FakeResponse(403, "Forbidden", body)
    err = await error_from_response(resp)
    assert type(err) is KubeForbidden and err.status == 403
    assert str(err) == "HTTP 403 Forbidden: cannot watch" and resp.released
    gone: Any = FakeResponse(410, "Gone", "")
    assert type(await error_from_response(gone)) is KubeGone


@pytest.mark.parametrize(
    "exc",
    [ConfigException("no context"), OSError("no such file"), ValueError("bad"), KeyError("x")],
)
def test_a_kubeconfig_that_does_not_load_is_a_config_error(exc: Exception) -> None:
    with (
        pytest.raises(ConfigError, match=r"^kubeconfig /k: cannot be loaded \("),
        loading_config("kubeconfig /k"),
    ):
        raise exc


# -- one boundary: no other module of the wing catches a library error ---------------------------

_LIBRARY_ERRORS = {
    "ApiException",
    "ClientError",
    "ClientConnectionError",
    "ServerTimeoutError",
    "ConfigException",
    "OSError",
    "TimeoutError",
    "ConnectionError",
}


def _caught(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            for n in ast.walk(node.type):
                if isinstance(n, ast.Name):
                    names.add(n.id)
                elif isinstance(n, ast.Attribute):
                    names.add(n.attr)
    return names


def test_library_errors_are_caught_in_errors_py_only() -> None:
    modules = sorted(KUBE.glob("*.py"))
    assert KUBE / "errors.py" in modules and len(modules) > 5
    for path in modules:
        if path.name == "errors.py":
            continue
        tree = ast.parse(path.read_text())
        if path.name == "lazyimport.py":  # reads the library's own files, calls no API
            assert not _caught(tree) & (_LIBRARY_ERRORS - {"OSError"}), path.name
            continue
        assert not _caught(tree) & _LIBRARY_ERRORS, f"{path.name} catches a library error"
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert "exceptions" not in node.module, f"{path.name} imports {node.module}"
                assert "config_exception" not in node.module, path.name
