"""The admission webhook over real TLS on 127.0.0.1: AdmissionReview in, a JSON patch out that,
applied to real pod specs, gives pods that validate (kubernetes-validate, strict); idempotent;
malformed reviews get a clear error response and the server stays up. The certificate comes
from deploy/webhook-cert.sh, the script operators run."""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate.utils as kv
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.injection.pod import InjectConfig
from sidecar.injection.profiles import ApiProfiles, agents_in
from sidecar.injection.webhook import WebhookServer, make_app, review

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "mandate-webhook.mandate-system.svc"
K8S = "1.37.0"
CONFIG = InjectConfig.from_mapping(yaml.safe_load((ROOT / "deploy/base/injector.yaml").read_text()))
MAX_BODY = 256 * 1024


def _certs(out: Path) -> Path:
    if not (shutil.which("bash") and shutil.which("openssl")):
        pytest.skip("bash and openssl are needed to run deploy/webhook-cert.sh")
    subprocess.run(
        ["bash", str(ROOT / "deploy/webhook-cert.sh"), "--out", str(out), "--days", "2"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def server(certs: Path, tmp_path: Path) -> AsyncIterator[WebhookServer]:
    # A private copy: the reload test rewrites the files.
    for name in ("tls.crt", "tls.key"):
        shutil.copy(certs / name, tmp_path / name)
    srv = WebhookServer(
        CONFIG, tmp_path / "tls.crt", tmp_path / "tls.key", "127.0.0.1", 0, max_body=MAX_BODY
    )
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(certs: Path) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def _tls(certs: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs / "ca.crt"))


async def _post(
    session: aiohttp.ClientSession,
    srv: WebhookServer,
    certs: Path,
    body: bytes,
    path: str = "/mutate",
) -> tuple[int, Any]:
    # As the API server calls it: by the Service's DNS name, verifying against the caBundle.
    async with session.post(
        f"https://127.0.0.1:{srv.port}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
        ssl=_tls(certs),
        server_hostname=SERVICE,
    ) as resp:
        return resp.status, await resp.json()


def admission_review(pod: Any, uid: str = "7f0d-uid", **request: Any) -> bytes:
    req: dict[str, Any] = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "namespace": "agents",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod,
        "oldObject": None,
        "dryRun": False,
    }
    req.update(request)
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}
    ).encode()


def _template_pod(path: str, name: str) -> dict[str, Any]:
    """The pod a controller would create from the first pod template in a manifest."""
    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        if doc and doc.get("kind") == "Deployment":
            template = copy.deepcopy(doc["spec"]["template"])
            template["metadata"]["name"] = name
            template["metadata"]["namespace"] = doc["metadata"]["namespace"]
            return {"apiVersion": "v1", "kind": "Pod", **template}
    raise AssertionError(f"no Deployment in {path}")


def _pods() -> dict[str, dict[str, Any]]:
    agent = _template_pod("deploy/examples/agent.yaml", "billing-agent-7d9f-x1")
    proxy = copy.deepcopy(agent)
    proxy["metadata"]["annotations"]["mandate.dev/mode"] = "proxy"
    by_sa = copy.deepcopy(agent)
    del by_sa["metadata"]["annotations"]
    by_sa["spec"]["initContainers"] = [{"name": "fetch", "image": "busybox:1.37", "args": ["true"]}]
    by_sa["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    ledger = _template_pod("deploy/examples/ledger.yaml", "ledger-1")
    ledger["metadata"]["labels"]["mandate.dev/inject"] = "true"
    return {
        "example-agent": agent,
        "proxy-mode": proxy,
        "by-service-account": by_sa,
        "ledger": ledger,
    }


PODS = _pods()


def _apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, ops)
    return patched


# -- reviews over TLS ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PODS))
async def test_patch_applied_to_real_pods_validates_and_a_second_pass_changes_nothing(
    name: str, client: aiohttp.ClientSession, certs: Path, tmp_path: Path
) -> None:
    # A pod may ask for proxy mode only where the operator's mode is proxy (or it allows
    # that: allowPodModeOverride).
    config = dataclasses.replace(CONFIG, mode="proxy") if name == "proxy-mode" else CONFIG
    server = await _server_with(certs, tmp_path, config, None)
    try:
        await _review_twice(name, server, client, certs)
    finally:
        await server.stop()


async def _review_twice(
    name: str, server: WebhookServer, client: aiohttp.ClientSession, certs: Path
) -> None:
    pod = PODS[name]
    kv.validate(pod, K8S, strict=True)  # the input is valid to begin with
    status, doc = await _post(client, server, certs, admission_review(pod, uid=f"uid-{name}"))
    assert status == 200
    assert doc["apiVersion"] == "admission.k8s.io/v1" and doc["kind"] == "AdmissionReview"
    response = doc["response"]
    assert response["uid"] == f"uid-{name}" and response["allowed"] is True
    injected = _apply(pod, response)
    kv.validate(injected, K8S, strict=True)
    sidecars = [c["name"] for c in injected["spec"]["initContainers"]]
    assert {"mandate", "mandate-envoy"} <= set(sidecars)
    assert ("mandate-init" in sidecars) == (name != "proxy-mode")

    status, again = await _post(client, server, certs, admission_review(injected, uid="again"))
    assert status == 200
    assert again["response"] == {"uid": "again", "allowed": True}


async def test_unlabelled_pod_is_untouched(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path
) -> None:
    pod = copy.deepcopy(PODS["example-agent"])
    del pod["metadata"]["labels"]["mandate.dev/inject"]
    status, doc = await _post(client, server, certs, admission_review(pod))
    assert status == 200 and doc["response"] == {"uid": "7f0d-uid", "allowed": True}


async def test_namespace_endpoint_injects_unlabelled_pods_and_refuses_an_opt_out(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path, tmp_path: Path
) -> None:
    pod = copy.deepcopy(PODS["example-agent"])
    del pod["metadata"]["labels"]["mandate.dev/inject"]
    status, doc = await _post(client, server, certs, admission_review(pod), "/mutate-namespace")
    assert status == 200
    kv.validate(_apply(pod, doc["response"]), K8S, strict=True)
    # Review 19: a pod labelled "false" in a namespace labelled for injection.
    pod["metadata"]["labels"]["mandate.dev/inject"] = "false"
    status, doc = await _post(client, server, certs, admission_review(pod), "/mutate-namespace")
    response = doc["response"]
    assert response["allowed"] is False and "patch" not in response
    message = response["status"]["message"]
    assert 'metadata.labels[mandate.dev/inject]: "false"' in message
    assert "allowPodOptOut: false" in message
    # The pods endpoint (labelled pods anywhere): "false" is not selected, nothing to say.
    status, doc = await _post(client, server, certs, admission_review(pod), "/mutate")
    assert doc["response"] == {"uid": "7f0d-uid", "allowed": True}
    allowing = await _server_with(
        certs, tmp_path, dataclasses.replace(CONFIG, allow_pod_opt_out=True), None
    )
    try:
        _, doc = await _post(client, allowing, certs, admission_review(pod), "/mutate-namespace")
        assert doc["response"] == {"uid": "7f0d-uid", "allowed": True}
    finally:
        await allowing.stop()


async def test_a_root_agent_is_refused_or_warned_about(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path, tmp_path: Path
) -> None:
    pod = copy.deepcopy(PODS["example-agent"])
    del pod["spec"]["securityContext"]
    _, doc = await _post(client, server, certs, admission_review(pod))
    assert doc["response"]["allowed"] is False
    assert "spec.containers[0] (agent): may run as root" in doc["response"]["status"]["message"]
    warn = await _server_with(
        certs, tmp_path, dataclasses.replace(CONFIG, root_agents="warn"), None
    )
    try:
        _, doc = await _post(client, warn, certs, admission_review(pod))
    finally:
        await warn.stop()
    assert doc["response"]["allowed"] is True
    assert any("runAsNonRoot" in w for w in doc["response"]["warnings"])


async def test_a_look_alike_sidecar_gets_the_real_one(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path
) -> None:
    """Review 19: init containers named mandate and mandate-envoy (busybox) were taken for
    the sidecar, and the pod admitted unchanged: no Envoy, no capture, no mandate."""
    pod = copy.deepcopy(PODS["example-agent"])
    pod["metadata"]["annotations"]["mandate.dev/injected"] = "iptables"
    pod["spec"]["initContainers"] = [
        {"name": n, "image": "busybox:1.37", "command": ["sleep", "infinity"],
         "restartPolicy": "Always"}
        for n in ("mandate", "mandate-envoy")
    ]  # fmt: skip
    _, doc = await _post(client, server, certs, admission_review(pod))
    response = doc["response"]
    assert response["allowed"] is True
    injected = _apply(pod, response)
    kv.validate(injected, K8S, strict=True)
    _, real = await _post(client, server, certs, admission_review(PODS["example-agent"]))
    assert injected == _apply(PODS["example-agent"], real["response"])
    assert any("named like mandate's sidecar" in w for w in response["warnings"])
    _, again = await _post(client, server, certs, admission_review(injected, uid="again"))
    assert again["response"] == {"uid": "again", "allowed": True}


async def test_selected_pod_that_cannot_be_injected_is_refused_with_the_field(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path
) -> None:
    pod = copy.deepcopy(PODS["example-agent"])
    pod["spec"]["hostNetwork"] = True
    status, doc = await _post(client, server, certs, admission_review(pod))
    assert status == 200
    response = doc["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400
    assert "spec.hostNetwork" in response["status"]["message"]


# -- malformed reviews ------------------------------------------------------------------------


def _review_with(change: Any) -> bytes:
    doc = json.loads(admission_review(PODS["example-agent"]))
    change(doc)
    return json.dumps(doc).encode()


HTTP_ERRORS = [
    ("not-json", b"{not json", "not_json"),
    ("empty", b"", "not_json"),
    ("not-utf8", b"\xff\xfe{}", "not_json"),
    ("json-array", b"[1, 2]", "not_a_review"),
    ("other-kind", b'{"apiVersion": "v1", "kind": "Pod"}', "not_a_review"),
    (
        "v1beta1",
        _review_with(lambda d: d.update(apiVersion="admission.k8s.io/v1beta1")),
        "unsupported_version",
    ),
    ("no-request", _review_with(lambda d: d.pop("request")), "no_request"),
    ("request-not-object", _review_with(lambda d: d.update(request=[])), "no_request"),
    ("no-uid", _review_with(lambda d: d["request"].pop("uid")), "no_uid"),
]


@pytest.mark.parametrize(
    ("body", "code"), [e[1:] for e in HTTP_ERRORS], ids=[e[0] for e in HTTP_ERRORS]
)
async def test_unanswerable_reviews_get_400_with_a_json_error(
    body: bytes, code: str, server: WebhookServer, client: aiohttp.ClientSession, certs: Path
) -> None:
    status, doc = await _post(client, server, certs, body)
    assert status == 400
    assert doc["error"] == code and doc["message"].startswith("mandate webhook: ")


REVIEW_ERRORS = [
    ("no-object", lambda d: d["request"].pop("object"), False, "request.object"),
    ("object-not-pod", lambda d: d["request"]["object"].update(kind="Service"), False, "not a Pod"),
    ("object-null", lambda d: d["request"].update(object=None), False, "request.object"),
    (
        "wrong-kind",
        lambda d: d["request"].update(
            kind={"group": "apps", "version": "v1", "kind": "Deployment"}
        ),
        True,
        "only Pod CREATE",
    ),
    ("update", lambda d: d["request"].update(operation="UPDATE"), True, "only Pod CREATE"),
    ("subresource", lambda d: d["request"].update(subResource="status"), True, "only Pod CREATE"),
    ("spec-missing", lambda d: d["request"]["object"].pop("spec"), False, "spec: missing"),
    (
        "containers-null",
        lambda d: d["request"]["object"]["spec"].update(containers=None),
        False,
        "spec.containers",
    ),
    (
        "bad-mode",
        lambda d: d["request"]["object"]["metadata"]["annotations"].update({"mandate.dev/mode": 3}),
        False,
        "mandate.dev/mode",
    ),
]


@pytest.mark.parametrize(
    ("change", "allowed", "text"), [e[1:] for e in REVIEW_ERRORS], ids=[e[0] for e in REVIEW_ERRORS]
)
async def test_malformed_requests_get_a_clear_review_response(
    change: Any,
    allowed: bool,
    text: str,
    server: WebhookServer,
    client: aiohttp.ClientSession,
    certs: Path,
) -> None:
    status, doc = await _post(client, server, certs, _review_with(change))
    assert status == 200
    response = doc["response"]
    assert response["uid"] == "7f0d-uid" and response["allowed"] is allowed
    assert "patch" not in response
    where = response["warnings"][0] if allowed else response["status"]["message"]
    assert text in where


async def test_huge_body_gets_413_and_the_server_stays_up(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path
) -> None:
    pod = copy.deepcopy(PODS["example-agent"])
    pod["metadata"]["annotations"]["padding"] = "x" * (MAX_BODY + 1)
    status, doc = await _post(client, server, certs, admission_review(pod))
    assert status == 413 and doc["error"] == "too_large"
    async with client.get(
        f"https://127.0.0.1:{server.port}/healthz", ssl=_tls(certs), server_hostname=SERVICE
    ) as resp:
        assert resp.status == 200 and (await resp.json()) == {"status": "alive"}


def test_review_never_raises_on_odd_json() -> None:
    for body in [b"null", b"1", b'"x"', b"{}", b'{"kind": "AdmissionReview"}']:
        status, doc = review(body, CONFIG)
        assert status == 400 and "error" in doc
    odd = json.loads(admission_review({"metadata": "x", "spec": {}}))
    odd["request"]["object"]["metadata"] = {
        "labels": {"mandate.dev/inject": "true"},
        "annotations": [],
    }
    status, doc = review(json.dumps(odd).encode(), CONFIG)
    assert status == 200 and doc["response"]["allowed"] is False


# -- TLS --------------------------------------------------------------------------------------


async def test_the_certificate_is_for_the_service_name_only(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path
) -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with client.get(
            f"https://127.0.0.1:{server.port}/healthz",
            ssl=_tls(certs),
            server_hostname="evil.example.com",
        ):
            pass


async def test_a_renewed_certificate_is_picked_up(
    server: WebhookServer, client: aiohttp.ClientSession, certs: Path, tmp_path: Path
) -> None:
    assert server.reload_tls() is False  # nothing changed
    renewed = _certs(tmp_path / "renewed")  # a new CA, as after a cert-manager reissue
    server.key.write_text("not a key")  # half-written: the old pair stays in use
    assert server.reload_tls() is False
    shutil.copy(renewed / "tls.key", server.key)
    shutil.copy(renewed / "tls.crt", server.cert)
    assert server.reload_tls() is True
    async with aiohttp.ClientSession() as fresh:
        async with fresh.get(
            f"https://127.0.0.1:{server.port}/healthz", ssl=_tls(renewed), server_hostname=SERVICE
        ) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with fresh.get(
                f"https://127.0.0.1:{server.port}/healthz", ssl=_tls(certs), server_hostname=SERVICE
            ):
                pass


# -- `mandate webhook` as a process ------------------------------------------------------------

_MAIN = """
import sys
from sidecar.cli import _Parser
from sidecar.injection.cli import add_inject_parser, run_inject
parser = _Parser(prog="mandate")
add_inject_parser(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
sys.exit(run_inject(parser.parse_args(sys.argv[1:])))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_webhook_command_serves_until_sigterm(certs: Path) -> None:
    port = _free_port()
    args = ["webhook", "--cert", str(certs / "tls.crt"), "--key", str(certs / "tls.key")]
    args += ["--listen", f"127.0.0.1:{port}", "--config", str(ROOT / "deploy/base/injector.yaml")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MAIN, *args, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for _ in range(100):
                try:
                    async with session.get(
                        f"https://127.0.0.1:{port}/healthz",
                        ssl=_tls(certs),
                        server_hostname=SERVICE,
                    ) as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("mandate webhook did not start")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_webhook_command_names_a_missing_certificate(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _MAIN,
        "webhook",
        "--cert",
        str(tmp_path / "tls.crt"),
        "--key",
        str(tmp_path / "tls.key"),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert f"--cert {tmp_path / 'tls.crt'}: no such file" in err.decode()


# -- issue 19: the agent's profile checked at admission; metrics ----------------------------------


PROFILES_CM = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "mandate-profiles", "namespace": "agents", "resourceVersion": "7"},
    "data": {"agents.yaml": (ROOT / "deploy/agents/profiles/agents.yaml").read_text()},
}


class FakeApi:
    """The one API call the webhook makes (get a ConfigMap), on 127.0.0.1 port 0: answers
    ``status`` with the profiles ConfigMap of `agents`, records who asked."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.calls: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        async def get(request: web.Request) -> web.Response:
            self.calls.append((request.path, request.headers.get("Authorization", "")))
            await asyncio.sleep(self.delay)
            if self.status != 200:
                return web.json_response(
                    {"kind": "Status", "code": self.status}, status=self.status
                )
            ns, name = request.match_info["ns"], request.match_info["name"]
            if (ns, name) != ("agents", "mandate-profiles"):
                return web.json_response({"kind": "Status", "code": 404}, status=404)
            return web.json_response(PROFILES_CM)

        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", get)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    await fake.start()
    yield fake
    await fake.stop()


async def _server_with(
    certs: Path, tmp_path: Path, config: InjectConfig, profiles: ApiProfiles | None
) -> WebhookServer:
    srv = WebhookServer(
        config, certs / "tls.crt", certs / "tls.key", "127.0.0.1", 0,
        profiles=profiles, metrics=("127.0.0.1", 0),
    )  # fmt: skip
    await srv.start()
    return srv


def _with_agent(agent: str, namespace: str = "agents") -> bytes:
    pod = copy.deepcopy(PODS["example-agent"])
    pod["metadata"]["annotations"]["mandate.dev/agent"] = agent
    return admission_review(pod, namespace=namespace)


def test_the_example_profiles_name_their_agents() -> None:
    assert {"billing-agent", "research-agent"} <= agents_in(PROFILES_CM["data"])
    assert agents_in({"notes.txt": "kind: AgentProfile"}) == frozenset()
    with pytest.raises(ValueError, match=r"a\.yaml: not YAML"):
        agents_in({"a.yaml": "a: [b"})


@pytest.mark.parametrize("unknown", ["refuse", "warn"])
async def test_an_agent_without_a_profile_is_caught_at_admission(
    unknown: str, certs: Path, tmp_path: Path, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    """Issue 19 (5): such a pod started, Ready, and denied every call."""
    token = tmp_path / "token"
    token.write_text("webhook-token\n")
    config = dataclasses.replace(CONFIG, unknown_agent=unknown)
    profiles = ApiProfiles(api.url, config.profiles_config_map, token_file=token)
    srv = await _server_with(certs, tmp_path, config, profiles)
    try:
        status, doc = await _post(client, srv, certs, _with_agent("billing-agent"))
        assert status == 200 and doc["response"]["allowed"] and doc["response"]["patch"]
        assert not any("profile" in w for w in doc["response"].get("warnings", []))
        assert api.calls[-1] == (
            "/api/v1/namespaces/agents/configmaps/mandate-profiles",
            "Bearer webhook-token",
        )
        status, doc = await _post(client, srv, certs, _with_agent("billling-agent"))
        response = doc["response"]
        problem = "agent 'billling-agent' (from the annotation mandate.dev/agent) has no profile in ConfigMap agents/mandate-profiles"
        if unknown == "refuse":
            assert response["allowed"] is False and "patch" not in response
            assert problem in response["status"]["message"]
            assert "billing-agent" in response["status"]["message"]  # the agents it knows
        else:
            assert response["allowed"] is True and response["patch"]
            assert any(problem in w for w in response["warnings"])
        # Not selected, or already injected: no API call.
        calls = len(api.calls)
        pod = copy.deepcopy(PODS["example-agent"])
        pod["metadata"]["labels"]["mandate.dev/inject"] = "false"
        await _post(client, srv, certs, admission_review(pod))
        assert len(api.calls) == calls
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    ("status", "delay", "allowed", "says"),
    [
        (404, 0.0, False, "namespace agents has no ConfigMap mandate-profiles"),
        (403, 0.0, True, "the webhook may not read ConfigMap agents/mandate-profiles (HTTP 403)"),
        (500, 0.0, True, "the API server answered HTTP 500"),
        (200, 1.0, True, "cannot read it from the API server"),  # a slow API server
    ],
)
async def test_when_the_profiles_cannot_be_read(
    status: int, delay: float, allowed: bool, says: str,
    certs: Path, tmp_path: Path, api: FakeApi, client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """A missing ConfigMap is refused (the sidecar could not mount it); an API server that
    cannot answer never keeps agent pods from starting: injected, with a warning."""
    api.status, api.delay = status, delay
    profiles = ApiProfiles(api.url, CONFIG.profiles_config_map, timeout=0.3)
    srv = await _server_with(certs, tmp_path, CONFIG, profiles)
    try:
        code, doc = await _post(client, srv, certs, _with_agent("billing-agent"))
        assert code == 200
        response = doc["response"]
        assert response["allowed"] is allowed
        text = response["status"]["message"] if not allowed else " ".join(response["warnings"])
        assert says in text, text
    finally:
        await srv.stop()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_reviews_by_result_and_time_them(
    certs: Path, tmp_path: Path, api: FakeApi, client: aiohttp.ClientSession
) -> None:
    profiles = ApiProfiles(api.url, CONFIG.profiles_config_map)
    srv = await _server_with(certs, tmp_path, CONFIG, profiles)

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with client.get(f"http://127.0.0.1:{srv.metrics_port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return _samples(await resp.text())

    def reviews(samples: Any, result: str) -> float:
        return float(samples[("mandate_webhook_reviews_total", (("result", result),))])

    try:
        before = await scrape()
        unselected = copy.deepcopy(PODS["example-agent"])
        unselected["metadata"]["labels"]["mandate.dev/inject"] = "false"
        claimed = copy.deepcopy(PODS["proxy-mode"])  # a less strict mode than the operator's
        await _post(client, srv, certs, _with_agent("billing-agent"))  # injected
        await _post(client, srv, certs, _with_agent("billing-agent"))  # injected
        await _post(client, srv, certs, admission_review(unselected))  # skipped
        await _post(client, srv, certs, admission_review(claimed))  # refused
        await _post(client, srv, certs, _with_agent("nobody"))  # refused (no profile)
        await _post(client, srv, certs, b"{not json")  # error (400)
        after = await scrape()
        expected = {"injected": 2, "skipped": 1, "refused": 2, "error": 1}
        for result, n in expected.items():
            assert reviews(after, result) - reviews(before, result) == n, result
        count = ("mandate_webhook_review_duration_seconds_count", ())
        assert after[count] - before[count] == 6
        checks = {
            r: ("mandate_webhook_profile_checks_total", (("result", r),))
            for r in ("known", "unknown")
        }
        assert after[checks["known"]] - before[checks["known"]] == 2
        assert after[checks["unknown"]] - before[checks["unknown"]] == 1
    finally:
        await srv.stop()


async def test_webhook_command_serves_metrics_and_checks_profiles(
    certs: Path, api: FakeApi
) -> None:
    port, metrics = _free_port(), _free_port()
    args = ["webhook", "--cert", str(certs / "tls.crt"), "--key", str(certs / "tls.key")]
    args += ["--listen", f"127.0.0.1:{port}", "--config", str(ROOT / "deploy/base/injector.yaml")]
    args += ["--metrics-listen", f"127.0.0.1:{metrics}", "--profiles-api", api.url]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MAIN, *args, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{metrics}/metrics") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("mandate webhook did not start")
            async with session.post(
                f"https://127.0.0.1:{port}/mutate", data=_with_agent("nobody"),
                ssl=_tls(certs), server_hostname=SERVICE,
            ) as resp:  # fmt: skip
                doc = await resp.json()
            assert doc["response"]["allowed"] is False
            assert "agent 'nobody'" in doc["response"]["status"]["message"]
            async with session.get(f"http://127.0.0.1:{metrics}/metrics") as resp:
                samples = _samples(await resp.text())
            assert samples[("mandate_webhook_reviews_total", (("result", "refused"),))] == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_in_cluster_profiles_use_the_pods_service_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sidecar.errors import ConfigError

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST is not set"):
        ApiProfiles.in_cluster("mandate-profiles")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    profiles = ApiProfiles.in_cluster("mandate-profiles")
    assert profiles.api == "https://[fd00::1]:6443"
    assert str(profiles.token_file) == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert str(profiles.ca_file) == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


async def test_webhook_command_refuses_a_bad_profiles_api(certs: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _MAIN, "webhook", "--cert", str(certs / "tls.crt"),
        "--key", str(certs / "tls.key"), "--profiles-api", "kube:443",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert "--profiles-api 'kube:443': expected in-cluster, off or a URL" in err.decode()


# -- review of issue 19 (8): one namespace's profiles must not stall the webhook for all ---------


NEAR_CAP = "a: [" + ",".join(["{x: 1}"] * 70_000) + "]\n"  # 490 KB: pure-Python PyYAML ~5 s
DEEP = "a: " + "[" * 100_000 + "]" * 100_000 + "\n"  # libyaml's composer crashed on it


class ApiOf:
    """An API server that answers each namespace's profiles ConfigMap from ``data``."""

    def __init__(self, data: dict[str, dict[str, str]]) -> None:
        self.data = data
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> ApiOf:
        async def get(request: web.Request) -> web.Response:
            data = self.data.get(request.match_info["ns"])
            if data is None:
                return web.json_response(PROFILES_CM)
            meta = {"name": "mandate-profiles", "resourceVersion": str(len(data))}
            return web.json_response({"metadata": meta, "data": data})

        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/configmaps/{name}", get)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"x.yaml": NEAR_CAP}, ""),  # read, in a thread: it names no agent
        ({"x.yaml": NEAR_CAP + NEAR_CAP.replace("a:", "b:")}, "over the 524288 the webhook reads"),
        ({"x.yaml": DEEP}, "x.yaml: its profiles nest deeper than 64"),
        ({"x.yaml": "a: [b\nc: d"}, "x.yaml: not YAML"),
    ],
    ids=["near-the-cap", "over-the-cap", "deep", "invalid"],
)
async def test_a_costly_profiles_configmap_in_one_namespace_does_not_stall_the_others(
    data: dict[str, str], says: str
) -> None:
    """The webhook parsed a namespace's profiles ConfigMap with pure-Python PyYAML on its
    event loop: ~0.5 MiB took ~5 s, and every other namespace's review waited (the API
    server gives up at 5 s, failurePolicy Fail: no agent pod anywhere); a deep one crashed
    libyaml's composer or raised RecursionError (500). Now off the loop, capped, in time;
    over a cap: injected with a warning, as when the API server cannot answer."""
    import threading
    import time
    import urllib.request

    async with ApiOf({"tenant-a": data}) as api:
        profiles = ApiProfiles(api.url, CONFIG.profiles_config_map)
        hook = web.AppRunner(make_app(CONFIG, profiles=profiles))
        await hook.setup()
        site = web.TCPSite(hook, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/mutate"  # type: ignore[union-attr]
        victim: dict[str, Any] = {}

        def victims_pod() -> None:  # another namespace's pod, while tenant-a's is read
            time.sleep(0.2)
            started = time.perf_counter()
            body = _with_agent("billing-agent", namespace="agents")
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as r:
                victim["response"] = json.loads(r.read())["response"]
            victim["took"] = time.perf_counter() - started

        try:
            thread = threading.Thread(target=victims_pod)
            thread.start()
            async with aiohttp.ClientSession() as session:
                body = _with_agent("billing-agent", namespace="tenant-a")
                async with session.post(url, data=body) as resp:
                    assert resp.status == 200
                    attacker = (await resp.json())["response"]
            await asyncio.to_thread(thread.join, 30)
        finally:
            await hook.cleanup()
            await profiles.close()
    assert victim["took"] < 1.0, f"another namespace's pod waited {victim['took']:.1f}s"
    assert victim["response"]["allowed"] and not victim["response"].get("warnings")
    if says:  # unknown: injected, with the reason
        assert attacker["allowed"] is True and attacker["patch"]
        assert any(says in w for w in attacker["warnings"]), attacker["warnings"]
    else:  # read: its agent has no profile there (refused, as configured)
        assert attacker["allowed"] is False
        assert (
            "has no profile in ConfigMap tenant-a/mandate-profiles" in attacker["status"]["message"]
        )


async def test_a_parse_over_its_budget_is_unknown_and_its_answer_is_kept() -> None:
    """A review waits at most ``parse_budget`` for a parse; the parse stops at its own
    deadline and its answer is kept for that resourceVersion (not parsed again)."""
    async with ApiOf({"tenant-a": {"x.yaml": NEAR_CAP}}) as api:
        profiles = ApiProfiles(api.url, CONFIG.profiles_config_map, parse_budget=0.02)
        try:
            first = await profiles.agents("tenant-a")
            assert first.names is None and "took over 0.02s" in first.problem, first
            for _ in range(100):  # the thread's own deadline: soon
                await asyncio.sleep(0.05)
                if "tenant-a" in profiles._parsed:
                    break
            again = await profiles.agents("tenant-a")
            assert again.names is None and "takes too long" in again.problem, again
            known = (await profiles.agents("agents")).names
            assert known is not None and {"billing-agent", "research-agent"} <= known
        finally:
            await profiles.close()


def test_agent_names_are_read_as_safe_load_reads_them() -> None:
    """The names come from libyaml's events, not a built document: the same names."""
    profile = "kind: AgentProfile\napiVersion: mandate.dev/v1alpha1\n"
    cases = {
        profile + "metadata: {name: a}\n---\n" + profile + "metadata:\n  labels: {}\n  name: b\n": {"a", "b"},
        profile + "metadata: {name: 5}\n": set(),  # not a string
        profile + "metadata: {name: '5'}\n": {"5"},
        profile + "metadata: {name: x}\nmetadata: {labels: {}}\n": set(),  # the later wins
        profile + "spec: {metadata: {name: inner}}\nmetadata: {name: top}\n": {"top"},
        profile + "metadata: &m {name: m}\n---\n" + profile + "x: &n {name: n}\nmetadata: *n\n": {"m", "n"},
        "b: &b {kind: AgentProfile, apiVersion: mandate.dev/v1alpha1}\n<<: *b\nmetadata: {name: merged}\n": {"merged"},
        "k: &k kind\n*k : AgentProfile\napiVersion: mandate.dev/v1alpha1\nmetadata: {name: via}\n": {"via"},
        "kind: [AgentProfile]\napiVersion: mandate.dev/v1alpha1\nmetadata: {name: no}\n": set(),
        "- {kind: AgentProfile, apiVersion: mandate.dev/v1alpha1, metadata: {name: x}}\n": set(),
    }  # fmt: skip
    for text, names in cases.items():
        assert agents_in({"p.yaml": text}) == names, text
        assert {
            d["metadata"]["name"]
            for d in yaml.safe_load_all(text)
            if isinstance(d, dict)
            and d.get("kind") == "AgentProfile"
            and isinstance(d.get("metadata"), dict)
            and isinstance(d["metadata"].get("name"), str)
        } == names, text
