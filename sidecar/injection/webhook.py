"""The mutating admission webhook: AdmissionReview v1 in, the sidecar as a JSON patch out.

`POST /mutate` serves the MutatingWebhookConfiguration entry for pods labelled
``mandate.dev/inject: "true"``, `POST /mutate-namespace` the one for pods of namespaces so
labelled; `GET /healthz` the kubelet. HTTPS only, with the certificate and key re-read when
their files change (a renewed Secret). `GET /metrics` on a plain HTTP port of its own
(``mandate_webhook_*``: reviews by result, answer latency, agent checks).

What it answers (the MutatingWebhookConfiguration says ``failurePolicy: Fail``):
- a selected pod: allowed, with the patch from :func:`sidecar.injection.pod.patch_for` and warnings
  (the patch also turns the pod's token automount off and takes the token the API server
  mounted out of the pod's containers: only mandate's container gets one; the warnings say
  what the injection overrode, e.g. the pod's HTTP_PROXY);
- a pod that carries mandate's sidecar, or looks as if it did (the containers' names, the
  mandate.dev/injected annotation): injected again from what is left without them, so the
  sidecar is always the injector's (a look-alike is replaced); one injected with the same
  injector config gets no patch;
- a pod labelled mandate.dev/inject: "false" on `/mutate-namespace` (a namespace labelled for
  injection): refused, unless the injector's ``allowPodOptOut``;
- a pod not selected, or anything that is not a Pod CREATE: allowed, unchanged (the latter
  with a warning: the configuration routes nothing else here);
- a selected pod that cannot be injected, or a Pod CREATE without an object: refused, with
  a message naming the field. A pod meant to be governed never starts without its sidecar;
- with ``--profiles-api``, a selected pod whose agent no profile of its namespace names
  (the ConfigMap the sidecar mounts, read from the API server: `sidecar.injection.profiles`)
  is refused (``unknownAgent: refuse``) or injected with a warning (``warn``); when the
  ConfigMap cannot be read, injected with a warning (the sidecar then says it, not Ready);
- a body that is not an AdmissionReview v1 (not JSON, no request or uid, too large): HTTP
  400 or 413 with a JSON error. There is no uid to answer, so the API server applies the
  failure policy: the pod is refused and the error shown, as for any webhook failure.
The handler never raises: an unexpected error is logged and answered 500 the same way.

Must not contain injection logic (that is `sidecar.injection.pod`, pure); reads nothing from
the API server but the profiles ConfigMap, and only through `sidecar.injection.profiles`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import REGISTRY, Counter, Histogram, generate_latest

from sidecar.errors import ConfigError, InjectError
from sidecar.injection.pod import (
    ANNOTATION_INJECTED,
    ANNOTATION_SERVICE_ACCOUNT_TOKEN,
    InjectConfig,
    agent_name,
    inject,
    looks_injected,
    opt_out_problem,
    patch_for,
    selected,
    unknown_agent_problem,
    warnings_for,
)
from sidecar.injection.profiles import Agents, ApiProfiles

__all__ = [
    "MAX_BODY",
    "REVIEWS",
    "REVIEW_SECONDS",
    "WebhookServer",
    "make_app",
    "metrics_app",
    "outcome",
    "review",
    "ssl_context",
]

log = logging.getLogger("mandate.webhook")

MAX_BODY = 4 * 1024 * 1024  # a pod is at most ~1.5 MiB in etcd; a review carries one
_API_VERSION = "admission.k8s.io/v1"

RESULTS = ("injected", "skipped", "refused", "error")
REVIEWS = Counter(
    "mandate_webhook_reviews",
    "AdmissionReviews answered, by result: injected (a patch), skipped (allowed unchanged: "
    "not selected, already injected, not a Pod CREATE), refused (the pod is denied), error "
    "(HTTP 4xx/5xx: the API server applies failurePolicy Fail)",
    ["result"],
)
REVIEW_SECONDS = Histogram(
    "mandate_webhook_review_duration_seconds",
    "Time to answer one AdmissionReview (the API server's timeout is timeoutSeconds, 5 s)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PROFILE_CHECKS = Counter(
    "mandate_webhook_profile_checks",
    "Checks that a pod's agent has a profile in its namespace's profiles ConfigMap, by "
    "result: known, unknown (refused or warned, unknownAgent), unavailable (the ConfigMap "
    "could not be read: injected with a warning)",
    ["result"],
)
for _result in RESULTS:
    REVIEWS.labels(_result)
for _result in ("known", "unknown", "unavailable"):
    PROFILE_CHECKS.labels(_result)


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


def _parse(body: bytes) -> tuple[dict[str, Any], None] | tuple[None, tuple[int, dict[str, Any]]]:
    """The AdmissionReview's request, or the error answer for a body that is not one."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, _error(400, "not_json", f"the body is not JSON ({exc})")
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        return None, _error(400, "not_a_review", "expected an AdmissionReview object")
    if doc.get("apiVersion") != _API_VERSION:
        got = doc.get("apiVersion")
        return None, _error(
            400, "unsupported_version", f"expected apiVersion {_API_VERSION}, got {got!r}"
        )
    request = doc.get("request")
    if not isinstance(request, dict):
        return None, _error(400, "no_request", "the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return None, _error(400, "no_uid", "request.uid: missing (a response must echo it)")
    return request, None


def _is_pod(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    return (
        isinstance(kind, dict)
        and kind.get("group", "") == ""
        and kind.get("kind") == "Pod"
        and not request.get("subResource")
    )


def _to_inject(
    request: Mapping[str, Any], config: InjectConfig, namespace_selected: bool
) -> dict[str, Any] | None:
    """The pod of a Pod CREATE that the injection will change, else None (also when it will
    be refused for what it is: its agent's profile does not matter then)."""
    pod = request.get("object")
    if not _is_pod(request) or request.get("operation") != "CREATE" or not isinstance(pod, dict):
        return None
    if not selected(pod, namespace_selected=namespace_selected):
        return None
    try:
        unchanged = inject(pod, config, namespace_selected=namespace_selected) == pod
    except InjectError:
        return None
    return None if unchanged else pod


def _agent_check(
    pod: Mapping[str, Any], config: InjectConfig, agents: Agents | None
) -> tuple[str, list[str]]:
    """(refusal, warnings) from the pod's namespace's profiles: a refusal ("" for none) when
    the agent surely has no profile and the injector says refuse; warnings otherwise."""
    if agents is None:
        return "", []
    agent = agent_name(pod)
    if agents.names is None:
        PROFILE_CHECKS.labels("unavailable").inc()
        return "", [
            f"mandate: could not check that agent {agent!r} has a profile ({agents.problem}); "
            "if it has none, its sidecar will not be Ready and says so (Event UnknownAgent)"
        ]
    if agents.missing:
        PROFILE_CHECKS.labels("unknown").inc()
        problem = (
            f"{agents.problem} (the injector's profilesConfigMap): the sidecar of pod "
            f"{_pod_name(pod)} mounts it and could not start; create it (deploy/agents)"
        )
    else:
        problem = unknown_agent_problem(pod, agents.names, agents.source)
        PROFILE_CHECKS.labels("unknown" if problem else "known").inc()
    if not problem:
        return "", []
    if config.unknown_agent == "refuse":
        return f"mandate: {problem}", []
    return "", [f"mandate: {problem}"]


def review(
    body: bytes,
    config: InjectConfig,
    *,
    namespace_selected: bool = False,
    agents: Agents | None = None,
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body answering one AdmissionReview request body; ``agents``,
    the agents of the pod's namespace's profiles (None: not checked)."""
    request, failed = _parse(body)
    if request is None:
        assert failed is not None
        return failed
    return _decide(request, config, namespace_selected=namespace_selected, agents=agents)


def _decide(
    request: dict[str, Any],
    config: InjectConfig,
    *,
    namespace_selected: bool,
    agents: Agents | None,
) -> tuple[int, dict[str, Any]]:
    uid = str(request["uid"])
    kind = request.get("kind")
    operation = request.get("operation")
    if not _is_pod(request) or operation != "CREATE":
        what = f"{kind.get('kind') if isinstance(kind, dict) else kind!r} {operation!r}"
        return _answer(
            uid, warnings=[f"mandate webhook: only Pod CREATE is handled, got {what}: unchanged"]
        )
    pod = request.get("object")
    if not isinstance(pod, dict) or pod.get("kind", "Pod") != "Pod":
        return _answer(uid, allowed=False, message="mandate: request.object: missing or not a Pod")
    where = f"{request.get('namespace') or '-'}/{_pod_name(pod)}"
    if not selected(pod, namespace_selected=namespace_selected):
        problem = opt_out_problem(pod, config, namespace_selected=namespace_selected)
        if problem:
            log.warning("pod %s: refused: %s", where, problem)
            return _answer(uid, allowed=False, message=f"mandate: {problem}")
        return _answer(uid)
    try:
        patch = patch_for(pod, config, namespace_selected=namespace_selected)
        if not patch:  # injected before, with this injector config: nothing to change
            log.info("pod %s: already injected", where)
            return _answer(uid)
        injected = inject(pod, config, namespace_selected=namespace_selected)
        refusal, agent_warnings = _agent_check(pod, config, agents)
    except InjectError as exc:
        log.warning("pod %s: refused: %s", where, exc)
        return _answer(uid, allowed=False, message=f"mandate: {exc}")
    if refusal:
        log.warning("pod %s: refused: %s", where, refusal)
        return _answer(uid, allowed=False, message=refusal)
    annotations = injected["metadata"]["annotations"]
    log.info(
        "pod %s: %s (%s); service-account token: %s",
        where,
        "injected again" if looks_injected(pod) else "injected",
        annotations.get(ANNOTATION_INJECTED),
        annotations.get(ANNOTATION_SERVICE_ACCOUNT_TOKEN),
    )
    warnings = agent_warnings + warnings_for(injected, config, original=pod)
    return _answer(uid, patch=patch, warnings=warnings)


def outcome(status: int, doc: Mapping[str, Any]) -> str:
    """The metric label of an answer: injected, skipped, refused or error."""
    response = doc.get("response") if status == 200 else None
    if not isinstance(response, Mapping):
        return "error"
    if not response.get("allowed"):
        return "refused"
    return "injected" if response.get("patch") else "skipped"


def _pod_name(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata")
    if isinstance(meta, Mapping):
        return str(meta.get("name") or f"{meta.get('generateName') or ''}*")
    return "*"


def make_app(
    config: InjectConfig, *, max_body: int = MAX_BODY, profiles: ApiProfiles | None = None
) -> web.Application:
    """The webhook's routes; with ``profiles``, a pod's agent is checked against the
    profiles of its namespace before it is injected."""
    app = web.Application(client_max_size=max_body)

    async def answer(body: bytes, namespace_selected: bool) -> tuple[int, dict[str, Any]]:
        request, failed = _parse(body)
        if request is None:
            assert failed is not None
            return failed
        agents = None
        namespace = request.get("namespace")
        wanted = profiles is not None and isinstance(namespace, str) and namespace
        if wanted and _to_inject(request, config, namespace_selected) is not None:
            assert profiles is not None and isinstance(namespace, str)
            agents = await profiles.agents(namespace)
        return _decide(request, config, namespace_selected=namespace_selected, agents=agents)

    def handler(namespace_selected: bool) -> Any:
        async def mutate(request: web.Request) -> web.Response:
            started = time.perf_counter()
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                status, doc = _error(413, "too_large", f"the body exceeds {max_body} bytes")
            else:
                try:
                    status, doc = await answer(body, namespace_selected)
                except Exception:  # never let a review crash the handler: answer, log, go on
                    log.exception("unexpected error reviewing an AdmissionReview")
                    status, doc = _error(500, "internal", "unexpected error; see the webhook's log")
            REVIEWS.labels(outcome(status, doc)).inc()
            REVIEW_SECONDS.observe(time.perf_counter() - started)
            return web.json_response(doc, status=status)

        return mutate

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app.router.add_post("/mutate", handler(False))
    app.router.add_post("/mutate-namespace", handler(True))
    app.router.add_get("/healthz", healthz)
    return app


def metrics_app() -> web.Application:
    """``GET /metrics`` (Prometheus text format), served apart from the webhook's TLS port."""
    app = web.Application()

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", metrics)
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
        profiles: ApiProfiles | None = None,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        self.config = config
        self.cert, self.key = Path(cert), Path(key)
        self.host, self.port = host, port
        self.ssl = ssl_context(self.cert, self.key)
        self._stamp = _stamp(self.cert, self.key)
        self._reload_seconds = reload_seconds
        self.profiles = profiles
        app = make_app(config, max_body=max_body, profiles=profiles)
        self._runner = web.AppRunner(app, access_log=None)
        # Plain HTTP for Prometheus (HOST, PORT; port 0 picks one): counters, no pod data.
        self.metrics_host, self.metrics_port = metrics or ("", 0)
        self._metrics: web.AppRunner | None = None
        if metrics is not None:
            self._metrics = web.AppRunner(metrics_app(), access_log=None)
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
        if self._metrics is not None:
            await self._metrics.setup()
            msite = web.TCPSite(self._metrics, self.metrics_host, self.metrics_port)
            try:
                await msite.start()
            except OSError as exc:
                await self._metrics.cleanup()
                await self._runner.cleanup()
                where = f"{self.metrics_host}:{self.metrics_port}"
                raise ConfigError(f"--metrics-listen {where}: cannot bind ({exc})") from None
            self.metrics_port = msite._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            log.info("metrics on http://%s:%d/metrics", self.metrics_host, self.metrics_port)
        self._task = asyncio.create_task(self._watch(), name="mandate-webhook-tls-reload")
        log.info("mandate webhook serving on https://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._runner.cleanup()
        if self._metrics is not None:
            await self._metrics.cleanup()
        if self.profiles is not None:
            await self.profiles.close()
