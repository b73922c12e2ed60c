"""The mutating admission webhook: AdmissionReview v1 in, the sidecar as a JSON patch out.

`POST /mutate` serves the MutatingWebhookConfiguration entry for pods labelled
``mandate.dev/inject: "true"``, `POST /mutate-namespace` the one for pods of namespaces so
labelled; `GET /healthz` the kubelet. HTTPS only, with the certificate and key re-read when
their files change (a renewed Secret).

What it answers (the MutatingWebhookConfiguration says ``failurePolicy: Fail``):
- a selected pod: allowed, with the patch from :func:`sidecar.injection.pod.patch_for` and warnings
  (the patch also turns the pod's token automount off and takes the token the API server
  mounted out of the pod's containers: only mandate's container gets one);
- a pod not selected or already injected, or anything that is not a Pod CREATE: allowed,
  unchanged (the latter with a warning: the configuration routes nothing else here);
- a selected pod that cannot be injected, or a Pod CREATE without an object: refused, with
  a message naming the field. A pod meant to be governed never starts without its sidecar;
- a body that is not an AdmissionReview v1 (not JSON, no request or uid, too large): HTTP
  400 or 413 with a JSON error. There is no uid to answer, so the API server applies the
  failure policy: the pod is refused and the error shown, as for any webhook failure.
The handler never raises: an unexpected error is logged and answered 500 the same way.

Must not contain injection logic (that is `sidecar.injection.pod`, pure) nor talk to the API server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.errors import ConfigError, InjectError
from sidecar.injection.pod import (
    ANNOTATION_INJECTED,
    ANNOTATION_SERVICE_ACCOUNT_TOKEN,
    InjectConfig,
    inject,
    is_injected,
    patch_for,
    selected,
    warnings_for,
)

__all__ = ["MAX_BODY", "WebhookServer", "make_app", "review", "ssl_context"]

log = logging.getLogger("mandate.webhook")

MAX_BODY = 4 * 1024 * 1024  # a pod is at most ~1.5 MiB in etcd; a review carries one
_API_VERSION = "admission.k8s.io/v1"


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": code, "message": f"mandate webhook: {message}"}


def _answer(
    uid: str,
    *,
    allowed: bool = True,
    patch: list[dict[str, Any]] | None = None,
    warnings: list[str] | None = None,
    message: str | None = None,
) -> tuple[int, dict[str, Any]]:
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    if warnings:
        response["warnings"] = warnings
    if message is not None:
        response["status"] = {"code": 400, "reason": "BadRequest", "message": message}
    return 200, {"apiVersion": _API_VERSION, "kind": "AdmissionReview", "response": response}


def review(
    body: bytes, config: InjectConfig, *, namespace_selected: bool = False
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body answering one AdmissionReview request body."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(400, "not_json", f"the body is not JSON ({exc})")
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        return _error(400, "not_a_review", "expected an AdmissionReview object")
    if doc.get("apiVersion") != _API_VERSION:
        got = doc.get("apiVersion")
        return _error(
            400, "unsupported_version", f"expected apiVersion {_API_VERSION}, got {got!r}"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        return _error(400, "no_request", "the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return _error(400, "no_uid", "request.uid: missing (a response must echo it)")

    kind = request.get("kind")
    operation = request.get("operation")
    is_pod = (
        isinstance(kind, dict)
        and kind.get("group", "") == ""
        and kind.get("kind") == "Pod"
        and not request.get("subResource")
    )
    if not is_pod or operation != "CREATE":
        what = f"{kind.get('kind') if isinstance(kind, dict) else kind!r} {operation!r}"
        return _answer(
            uid, warnings=[f"mandate webhook: only Pod CREATE is handled, got {what}: unchanged"]
        )
    pod = request.get("object")
    if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod":
        return _answer(uid, allowed=False, message="mandate: request.object: missing or not a Pod")
    where = f"{request.get('namespace') or '-'}/{_pod_name(pod)}"
    if not selected(pod, namespace_selected=namespace_selected):
        return _answer(uid)
    if is_injected(pod):
        log.info("pod %s: already injected", where)
        return _answer(uid)
    try:
        patch = patch_for(pod, config, namespace_selected=namespace_selected)
        injected = inject(pod, config, namespace_selected=namespace_selected)
    except InjectError as exc:
        log.warning("pod %s: refused: %s", where, exc)
        return _answer(uid, allowed=False, message=f"mandate: {exc}")
    annotations = injected["metadata"]["annotations"]
    log.info(
        "pod %s: injected (%s); service-account token: %s",
        where,
        annotations.get(ANNOTATION_INJECTED),
        annotations.get(ANNOTATION_SERVICE_ACCOUNT_TOKEN),
    )
    return _answer(uid, patch=patch, warnings=warnings_for(injected, config))


def _pod_name(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata")
    if isinstance(meta, Mapping):
        return str(meta.get("name") or f"{meta.get('generateName') or ''}*")
    return "*"


def make_app(config: InjectConfig, *, max_body: int = MAX_BODY) -> web.Application:
    app = web.Application(client_max_size=max_body)

    def handler(namespace_selected: bool) -> Any:
        async def mutate(request: web.Request) -> web.Response:
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                status, doc = _error(413, "too_large", f"the body exceeds {max_body} bytes")
                return web.json_response(doc, status=status)
            try:
                status, doc = review(body, config, namespace_selected=namespace_selected)
            except Exception:  # never let a review crash the handler: answer, log, go on
                log.exception("unexpected error reviewing an AdmissionReview")
                status, doc = _error(500, "internal", "unexpected error; see the webhook's log")
            return web.json_response(doc, status=status)

        return mutate

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app.router.add_post("/mutate", handler(False))
    app.router.add_post("/mutate-namespace", handler(True))
    app.router.add_get("/healthz", healthz)
    return app


def ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2+) from PEM files; ConfigError names the file."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, cert, key)
    return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    for flag, path in (("--cert", cert), ("--key", key)):
        if not path.is_file():
            raise ConfigError(f"webhook TLS: {flag} {path}: no such file")
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"webhook TLS: --cert {cert} / --key {key}: {exc}") from None


def _stamp(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)  # follows the Secret volume's ..data symlink
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class WebhookServer:
    """The webhook on HOST:PORT over TLS; ``port`` is the bound port (0 picks one)."""

    def __init__(
        self,
        config: InjectConfig,
        cert: Path,
        key: Path,
        host: str = "0.0.0.0",
        port: int = 8443,
        *,
        reload_seconds: float = 30.0,
        max_body: int = MAX_BODY,
    ) -> None:
        self.config = config
        self.cert, self.key = Path(cert), Path(key)
        self.host, self.port = host, port
        self.ssl = ssl_context(self.cert, self.key)
        self._stamp = _stamp(self.cert, self.key)
        self._reload_seconds = reload_seconds
        self._runner = web.AppRunner(make_app(config, max_body=max_body), access_log=None)
        self._task: asyncio.Task[None] | None = None

    def reload_tls(self) -> bool:
        """Load the certificate and key again if their files changed; new connections use
        them. A half-written or broken pair keeps the old one (logged). True if reloaded."""
        stamp = _stamp(self.cert, self.key)
        if stamp == self._stamp:
            return False
        try:
            _load(self.ssl, self.cert, self.key)
        except ConfigError as exc:
            log.warning("keeping the current certificate: %s", exc)
            return False
        self._stamp = stamp
        log.info("reloaded the TLS certificate from %s", self.cert)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._reload_seconds)
            self.reload_tls()

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"--listen {self.host}:{self.port}: cannot bind ({exc})") from None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._task = asyncio.create_task(self._watch(), name="mandate-webhook-tls-reload")
        log.info("mandate webhook serving on https://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._runner.cleanup()
