"""TLS origination (issue 17, point 3), through real Envoy and real mandate, both transports.

For an HTTPS upstream the agent calls `http://host:443/...`: plain HTTP to its sidecar, so
mandate sees the call (and can set headers on it), and Envoy sends it on over TLS with SNI =
host, the server's certificate checked against host (a SAN) and against the trusted CAs.
Port 443 is the rule (envoy/*.yaml); a CONNECT tunnel stays opaque.

A test CA made here (`cryptography`) signs the certificates of a local HTTPS server, which
records the SNI and TLS version of every request. Two ways through Envoy:
- envoy/local*.yaml (one listener per agent; every host to one local upstream): the cluster
  `upstream_tls` to the HTTPS server, the test CA given as UPSTREAM_CA. The server picks its
  certificate by SNI, so one server has a good host, one whose certificate names another
  host, and one whose certificate a CA Envoy does not trust signed.
- envoy/sidecar*.yaml as the pod runs them: the dynamic forward proxy resolves `localhost`,
  the test CA sits where the system bundle is named (the injector's mount), and the HTTPS
  servers' ports stand in for 443 (nothing else of the route changes).
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devstack.local import (
    ENVOY_DIR,
    SYSTEM_CA_BUNDLE,
    EnvoyProcess,
    MandateProcess,
    render_envoy_config,
    start_envoy,
    system_ca_bundle,
)

from .conftest import (
    TEMPLATES,
    Response,
    Stack,
    Upstream,
    start_mandate_for,
    start_stack,
    stop_stack,
)

AGENT = "tls-agent"
GOOD, OTHER = "api.example.com", "other.example.com"  # certificates that name them
WRONG_SAN = "wrong-san.example.com"  # its certificate names only OTHER
UNTRUSTED = "untrusted.example.com"  # named by a certificate of a CA Envoy does not trust
PLAIN = "plain.example.com"  # plain HTTP (port 80): the demo upstream
PORT_443 = {"safe_regex": {"regex": ".+:0*443"}}  # envoy/*.yaml: the TLS route's `:authority`
PROFILE = f"""\
apiVersion: mandate.dev/v1alpha1
kind: AgentProfile
metadata:
  name: {AGENT}
spec:
  owner: platform
  identities:
    - serviceAccount: agents/{AGENT}
  defaultPurpose: fetch
  purposes:
    fetch:
      allow:
        - hosts: [{GOOD}, {OTHER}, {WRONG_SAN}, {UNTRUSTED}, {PLAIN}, localhost]
          methods: [GET]
          paths: ["/tls/**"]
      deny:
        - paths: ["/tls/secret/**"]
"""


# --- a test PKI -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class TestCA:
    """A CA (EC P-256) that issues server certificates, written as PEM files into ``tmp``.
    Validity is computed from now (no test depends on today's date)."""

    __test__ = False  # not a pytest class

    def __init__(self, tmp: Path, name: str) -> None:
        self.tmp, self.name = tmp, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mandate test CA {name}")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.file = tmp / f"ca-{name}.pem"
        self.file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str) -> Issued:
        """A server certificate whose SANs are exactly ``names`` (DNS names)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        stem = f"{self.name}-{'-'.join(names)}"
        issued = Issued(self.tmp / f"{stem}.crt", self.tmp / f"{stem}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


# --- a local HTTPS upstream -----------------------------------------------------------------


class TlsServer:
    """An HTTPS server (http.server, HTTP/1.1 keep-alive) on 127.0.0.1, port picked at start,
    in a background thread. It picks its certificate by the SNI the client sends (``certs``:
    server name -> certificate; None: no SNI or another name) and records every request
    with the connection's SNI and TLS version, and every failed handshake with its SNI."""

    def __init__(self, certs: dict[str | None, Issued]) -> None:
        self.received: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        contexts = {}
        for name, issued in certs.items():
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(issued.cert, issued.key)
            contexts[name] = context
        self.context = contexts[None]
        by_name = {name: c for name, c in contexts.items() if name is not None}
        handshake = threading.local()  # the SNI of this thread's connection

        def choose(conn: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            handshake.sni = name
            if name is not None and name in by_name:
                conn.context = by_name[name]

        self.context.sni_callback = choose
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                assert isinstance(self.connection, ssl.SSLSocket)
                seen = {
                    "sni": getattr(handshake, "sni", None),
                    "tls": self.connection.version(),
                    "method": self.command,
                    "path": self.path,
                    "host": self.headers.get("Host"),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
                owner.received.append(seen)
                body = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request: Any, client_address: Any) -> None:
                # The handshake runs here, in the connection's own thread.
                handshake.sni = None
                try:
                    conn = owner.context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    owner.failed.append({"sni": handshake.sni, "error": str(exc)})
                    return
                try:
                    Handler(conn, client_address, self)
                finally:
                    conn.close()

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a connection Envoy closed: nothing to report

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.received if r["path"] == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


def _wait_for(cond: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    return cond()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("pki")
    ca, rogue = TestCA(tmp, "trusted"), TestCA(tmp, "rogue")
    return {
        "ca": ca,
        GOOD: ca.issue(GOOD),
        OTHER: ca.issue(OTHER),
        UNTRUSTED: rogue.issue(UNTRUSTED),
        "localhost": ca.issue("localhost"),
        "rogue-localhost": rogue.issue("localhost"),
        "other-net": ca.issue("other.example.net"),
    }


@pytest.fixture(scope="module")
def tls_server(pki: dict[str, Any]) -> Iterator[TlsServer]:
    server = TlsServer(
        {
            None: pki[GOOD],
            GOOD: pki[GOOD],
            OTHER: pki[OTHER],
            WRONG_SAN: pki[OTHER],  # names OTHER, not WRONG_SAN
            UNTRUSTED: pki[UNTRUSTED],
        }
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_stack(
    tmp_path_factory: pytest.TempPathFactory, transport: str, pki: dict[str, Any],
    tls_server: TlsServer,
) -> Iterator[Stack]:  # fmt: skip
    """envoy/local*.yaml with the HTTPS server behind `upstream_tls`, trusting the test CA."""
    tmp = tmp_path_factory.mktemp(f"tls-{transport}")
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "tls.yaml").write_text(PROFILE)
    stack = start_stack(
        tmp,
        profiles,
        transport=transport,
        agents=[AGENT],
        envoy_values={"TLS_UPSTREAM_PORT": tls_server.port, "UPSTREAM_CA": pki["ca"].file},
    )
    yield stack
    stop_stack(stack)


def _access(envoy: EnvoyProcess, path: str) -> dict[str, Any]:
    records = _wait_for(lambda: [r for r in envoy.access_records() if r["path"] == path])
    assert len(records) == 1, records
    return records[0]  # type: ignore[no-any-return]


def _path(stack: Stack, name: str) -> str:
    return f"/tls/{name}-{stack.transport}"


# --- through envoy/local*.yaml --------------------------------------------------------------


def test_a_call_to_port_443_goes_out_over_tls_with_sni_and_mandates_headers(
    tls_stack: Stack, tls_server: TlsServer
) -> None:
    """mandate decides on the plain call and sets its headers; Envoy sends it over TLS."""
    path = _path(tls_stack, "ok")
    resp = tls_stack.call(AGENT, "GET", f"http://{GOOD}:443{path}", {"x-mandate-agent": "forged"})
    assert resp.status == 200, resp.body
    (seen,) = tls_server.paths(path)
    assert resp.json() == seen  # the answer came back through Envoy
    assert seen["sni"] == GOOD  # the host, without the port
    assert seen["tls"] in ("TLSv1.2", "TLSv1.3")
    assert seen["host"] == f"{GOOD}:443"  # as the agent sent it and mandate saw it
    assert seen["headers"]["x-mandate-agent"] == AGENT
    assert seen["headers"]["x-mandate-purpose"] == "fetch"
    assert len(seen["headers"]["x-mandate-decision"]) == 32
    assert not [r for r in tls_stack.upstream.received if r["path"] == path]  # not in plain text
    assert _access(tls_stack.envoy, path)["status"] == 200


def test_an_https_request_line_goes_out_over_tls_too(
    tls_stack: Stack, tls_server: TlsServer
) -> None:
    """`GET https://host/...` (absolute form) is never sent in plain text: over TLS, to
    port 443 unless the URL names another (mandate, too, fills in 443 from the scheme)."""
    path = _path(tls_stack, "https-line")
    resp = tls_stack.call(AGENT, "GET", f"https://{GOOD}{path}")
    assert resp.status == 200, resp.body
    (seen,) = tls_server.paths(path)
    assert seen["sni"] == GOOD
    assert seen["host"] == GOOD
    assert not [r for r in tls_stack.upstream.received if r["path"] == path]
    # A header does not choose TLS: only the request line and the port do.
    path = _path(tls_stack, "xfp")
    resp = tls_stack.call(AGENT, "GET", f"http://{GOOD}{path}", {"x-forwarded-proto": "https"})
    assert resp.status == 200, resp.body
    assert resp.json()["path"] == path  # the plain demo upstream
    assert not tls_server.paths(path)


def test_port_443_spelled_with_leading_zeros_goes_out_over_tls(
    tls_stack: Stack, tls_server: TlsServer
) -> None:
    """mandate reads `host:0443` as port 443, and so does Envoy's forward proxy: it must
    not leave in plain text to port 443 (with a credential mandate set for host:443)."""
    for i, port in enumerate(("0443", "00443")):
        path = _path(tls_stack, f"zeros-{i}")
        resp = tls_stack.call(AGENT, "GET", f"http://{GOOD}:{port}{path}")
        assert resp.status == 200, resp.body
        (seen,) = tls_server.paths(path)
        assert seen["sni"] == GOOD
        assert not [r for r in tls_stack.upstream.received if r["path"] == path]


def test_each_host_gets_its_own_connection_and_sni(tls_stack: Stack, tls_server: TlsServer) -> None:
    """One endpoint, two hosts, a keep-alive server: a call to OTHER never rides a
    connection made (and verified) for GOOD."""
    for i in range(3):
        for host in (GOOD, OTHER):
            path = _path(tls_stack, f"pool-{host}-{i}")
            resp = tls_stack.call(AGENT, "GET", f"http://{host}:443{path}")
            assert resp.status == 200, resp.body
            (seen,) = tls_server.paths(path)
            assert seen["sni"] == host, seen


@pytest.mark.parametrize(
    ("host", "why"),
    [
        (WRONG_SAN, f"expected_SANs:_[{WRONG_SAN}],_certificate_SANs:_[{OTHER}]"),
        (UNTRUSTED, "unable_to_get_local_issuer_certificate"),
    ],
    ids=["san-mismatch", "untrusted-ca"],
)
def test_a_certificate_envoy_cannot_verify_fails_the_call(
    tls_stack: Stack, tls_server: TlsServer, host: str, why: str
) -> None:
    """A certificate that does not name the host, or that a CA Envoy does not trust signed:
    the handshake fails, nothing is sent, the agent gets 503 (and mandate allowed it)."""
    path = _path(tls_stack, f"unverified-{host}")
    before = len(tls_server.failed)
    resp = tls_stack.call(AGENT, "GET", f"http://{host}:443{path}")
    assert resp.status == 503, resp.body
    assert not tls_server.paths(path)
    failed = _wait_for(lambda: tls_server.failed[before:])
    assert {f["sni"] for f in failed} == {host}, failed  # Envoy did try, with this SNI
    record = _access(tls_stack.envoy, path)
    assert record["status"] == 503
    assert "UF" in record["flags"]  # upstream connection failure
    assert "CERTIFICATE_VERIFY_FAILED" in record["details"], record
    assert why in record["details"], record
    assert record["mandate_decision"] == "allow", record


def test_a_denied_call_never_reaches_the_https_upstream(
    tls_stack: Stack, tls_server: TlsServer
) -> None:
    path = _path(tls_stack, "secret/x")
    resp = tls_stack.call(AGENT, "GET", f"http://{GOOD}:443{path}")
    assert resp.status == 403, resp.body
    body = resp.json()
    assert body["error"] == "denied_by_rule", body
    assert body["decision"] == resp.headers["x-mandate-decision"]
    assert not tls_server.paths(path)


def test_other_ports_stay_plain_http(tls_stack: Stack, tls_server: TlsServer) -> None:
    """Port 80 (no port) and any port but 443 go out as plain HTTP (the demo upstream)."""
    for i, url in enumerate((f"http://{PLAIN}", f"http://{GOOD}:8443", f"http://{GOOD}:4430")):
        path = _path(tls_stack, f"plain-{i}")
        resp = tls_stack.call(AGENT, "GET", url + path)
        assert resp.status == 200, resp.body
        assert resp.json()["path"] == path  # the demo upstream's echo
        assert not tls_server.paths(path)


# --- through envoy/sidecar*.yaml, as the pod runs them --------------------------------------


def _as_in_the_pod(name: str, mandate: MandateProcess, ca: Path, ports: list[int]) -> str:
    """The shipped config with what a pod has put on this machine's ports: Envoy's admin
    and the egress listener on free ports, mandate's workers, its access log service and
    the trace collector on 127.0.0.1, the test CA where the system bundle is named, and the
    HTTPS servers' ``ports`` next to 443. The clusters themselves do not change."""
    config: dict[str, Any] = yaml.safe_load((ENVOY_DIR / name).read_text())
    config["admin"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
    resources = config["static_resources"]
    (listener,) = resources["listeners"]
    listener["address"]["socket_address"]["port_value"] = 0
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ][0]["routes"]
    (tls_route,) = [
        r for r in routes
        if r["route"]["cluster"] == "dynamic_forward_proxy_tls"
        and r["match"]["headers"][0]["name"] == ":authority"
    ]  # fmt: skip
    alternatives = "|".join(["443", *(str(p) for p in ports)])
    assert tls_route["match"]["headers"][0]["string_match"] == PORT_443
    tls_route["match"]["headers"] = [
        {"name": ":authority", "string_match": {"safe_regex": {"regex": f".+:0*({alternatives})"}}}
    ]
    clusters = []
    for cluster in resources["clusters"]:
        if cluster["name"] == "dynamic_forward_proxy_tls":
            validation = cluster["transport_socket"]["typed_config"]["common_tls_context"][
                "validation_context"
            ]
            assert validation["trusted_ca"] == {"filename": str(SYSTEM_CA_BUNDLE)}
            validation["trusted_ca"] = {"filename": str(ca)}
        if "load_assignment" in cluster:
            lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            if cluster["name"] == "mandate":
                cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": port}}}}
                    for port in mandate.grpc_ports
                ]  # fmt: skip
            elif cluster["name"] == "mandate_als":
                if not mandate.access_log_port:
                    continue
                lb[0]["endpoint"]["address"] = {
                    "socket_address": {
                        "address": "127.0.0.1",
                        "port_value": mandate.access_log_port,
                    }
                }
            elif cluster["name"] == "otel_collector":
                cluster["type"] = "STATIC"
                lb[0]["endpoint"]["address"]["socket_address"]["address"] = "127.0.0.1"
        clusters.append(cluster)
    resources["clusters"] = clusters
    if not mandate.access_log_port:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = [
            logger for logger in hcm["access_log"] if "common_config" not in logger["typed_config"]
        ]
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class Pod:
    envoy: EnvoyProcess
    mandate: MandateProcess
    servers: dict[str, TlsServer]
    plain: Upstream

    def call(self, url: str) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.envoy.port, timeout=10)
        try:
            conn.request("GET", url, headers={"Host": url.split("/")[2]})
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def pod(
    tmp_path_factory: pytest.TempPathFactory, transport: str, pki: dict[str, Any]
) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp(f"tls-pod-{transport}")
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "tls.yaml").write_text(PROFILE)
    servers = {
        "good": TlsServer({None: pki["localhost"]}),
        "wrong-san": TlsServer({None: pki["other-net"]}),
        "untrusted": TlsServer({None: pki["rogue-localhost"]}),
    }
    plain = Upstream()
    mandate = None
    try:
        mandate = start_mandate_for(tmp, profiles, extra=["--agent", AGENT], transport=transport)
        config = _as_in_the_pod(
            f"sidecar{'-http' if transport == 'http' else ''}.yaml",
            mandate,
            pki["ca"].file,
            [s.port for s in servers.values()],
        )
        envoy = start_envoy(config, tmp / "envoy")
    except BaseException:
        if mandate is not None:
            mandate.stop()
        for server in servers.values():
            server.stop()
        plain.stop()
        raise
    yield Pod(envoy, mandate, servers, plain)
    envoy.stop()
    mandate.stop()
    for server in servers.values():
        server.stop()
    plain.stop()


def test_the_pods_config_originates_tls_through_the_dynamic_forward_proxy(
    pod: Pod, transport: str
) -> None:
    good = pod.servers["good"]
    path = f"/tls/pod-{transport}"
    resp = pod.call(f"http://localhost:{good.port}{path}")
    assert resp.status == 200, resp.body
    (seen,) = good.paths(path)
    assert seen["sni"] == "localhost"
    assert seen["tls"] in ("TLSv1.2", "TLSv1.3")
    assert seen["headers"]["x-mandate-agent"] == AGENT
    # Plain HTTP on another port still goes out as it is.
    path = f"/tls/pod-plain-{transport}"
    resp = pod.call(f"http://localhost:{pod.plain.port}{path}")
    assert resp.status == 200, resp.body
    assert resp.json()["path"] == path
    # mandate still decides: a denied call never leaves.
    path = f"/tls/secret/pod-{transport}"
    resp = pod.call(f"http://localhost:{good.port}{path}")
    assert resp.status == 403, resp.body
    assert not good.paths(path)
    # An https:// request line without a port, and port 443 spelled 0443: the dynamic
    # forward proxy's TLS cluster resolves the host on port 443 (where nothing here answers
    # with a certificate for it); its plain cluster never connects there. (The two share
    # one DNS cache, so both list the host.)
    for url in ("https://localhost", "http://localhost:0443"):
        resp = pod.call(f"{url}/tls/pod-port-443-{transport}")
        assert resp.status == 503, resp.body
    connects = {"dynamic_forward_proxy": 0, "dynamic_forward_proxy_tls": 0}
    for line in _get(f"http://127.0.0.1:{pod.envoy.admin_port}/clusters").splitlines():
        cluster, _, rest = line.partition("::127.0.0.1:443::")  # one line per cache entry
        if cluster in connects and rest.startswith("cx_total::"):
            connects[cluster] += int(rest.removeprefix("cx_total::"))
    assert connects == {"dynamic_forward_proxy": 0, "dynamic_forward_proxy_tls": 2}


@pytest.mark.parametrize("which", ["wrong-san", "untrusted"])
def test_the_pods_config_refuses_a_certificate_it_cannot_verify(
    pod: Pod, transport: str, which: str
) -> None:
    server = pod.servers[which]
    path = f"/tls/pod-{which}-{transport}"
    resp = pod.call(f"http://localhost:{server.port}{path}")
    assert resp.status == 503, resp.body
    assert not server.paths(path)
    assert _wait_for(lambda: server.failed), "Envoy made no TLS handshake"
    assert {f["sni"] for f in server.failed} == {"localhost"}


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sidecar.yaml", "sidecar-http.yaml", *TEMPLATES.values()])
def test_only_port_443_or_https_is_originated_and_a_tunnel_stays_opaque(name: str) -> None:
    """Two routes, just before the catch-all, go to the TLS cluster: `:authority` ending in
    `:443`, and `:scheme` https; that cluster sets SNI and checks the SAN from the host and
    speaks TLS 1.2 at least; CONNECT and every other call go to a cluster without TLS."""
    text = (ENVOY_DIR / name).read_text()
    values = {"ADMIN_PORT": 0, "LISTEN_PORT": 0, "MANDATE_PORT": 1, "UPSTREAM_PORT": 2,
              "ACCESS_LOG": "/dev/null"}  # fmt: skip
    config = yaml.safe_load(render_envoy_config(text, values) if "${" in text else text)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (vhost,) = hcm["typed_config"]["route_config"]["virtual_hosts"]
    routes = vhost["routes"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    tls = [r for r in routes if "transport_socket" in clusters[r["route"]["cluster"]]]
    assert [r["match"] for r in tls] == [
        {"prefix": "/", "headers": [{"name": ":authority", "string_match": PORT_443}]},
        {"prefix": "/", "headers": [{"name": ":scheme", "string_match": {"exact": "https"}}]},
    ]
    assert routes[-3:-1] == tls  # just before the catch-all
    assert routes[-1]["match"] == {"prefix": "/"}
    assert "transport_socket" not in clusters[routes[-1]["route"]["cluster"]]
    connect = [r for r in routes if "connect_matcher" in r["match"]]
    assert connect and all(
        "transport_socket" not in clusters[r["route"]["cluster"]] for r in connect
    )
    assert len({r["route"]["cluster"] for r in tls}) == 1
    for route in tls:  # the same per-route settings (attribution, Lua) as the catch-all
        assert route.get("typed_per_filter_config") == routes[-1].get("typed_per_filter_config")
        assert route["route"]["timeout"] == routes[-1]["route"]["timeout"]
    cluster = clusters[tls[0]["route"]["cluster"]]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["upstream_http_protocol_options"] == {
        "auto_sni": True,
        "auto_san_validation": True,
    }
    context = cluster["transport_socket"]["typed_config"]
    assert context["@type"].endswith("UpstreamTlsContext")
    assert context["common_tls_context"]["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    assert set(context) == {"@type", "common_tls_context"}  # no sni pinned, nothing insecure
    if name.startswith("sidecar"):
        assert cluster["cluster_type"] == clusters["dynamic_forward_proxy"]["cluster_type"]


def test_the_trusted_cas_default_to_the_system_bundle(tmp_path: Path) -> None:
    values = {"ADMIN_PORT": 0, "LISTEN_PORT": 0, "MANDATE_PORT": 1, "UPSTREAM_PORT": 2,
              "ACCESS_LOG": "/dev/null"}  # fmt: skip

    def trusted(**kwargs: Any) -> tuple[str, int]:
        config = yaml.safe_load(render_envoy_config(ENVOY_DIR / "local.yaml", values, **kwargs))
        (cluster,) = [
            c for c in config["static_resources"]["clusters"] if c["name"] == "upstream_tls"
        ]
        ctx = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        return ctx["validation_context"]["trusted_ca"]["filename"], endpoint["address"][
            "socket_address"
        ]["port_value"]

    assert system_ca_bundle().exists()
    assert trusted() == (str(system_ca_bundle()), 2)
    ca = tmp_path / "ca.pem"  # read by Envoy, not here
    assert trusted(upstream_ca=ca) == (str(ca), 2)
    values["TLS_UPSTREAM_PORT"] = 3
    values["UPSTREAM_CA"] = "/x/ca.pem"
    assert trusted() == ("/x/ca.pem", 3)
