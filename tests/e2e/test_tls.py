"""TLS and mTLS on the gRPC port: Envoy (envoy.tls.yaml) with its client certificate gets
through, gRPC clients without the right certificate (or without TLS) are refused, TLS
without a client CA needs no client certificate, and half a TLS setup does not start.

Every refusal is checked with a call the server answers to anyone over plaintext (health,
or CreateKey with the admin token), so only the transport can be what refuses it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack import processes as p
from devstack.mock_upstream import MockUpstream
from tests.conftest import Server, start_server
from tests.helpers import Clients, chat_body, fetch
from tests.tlsutil import Pki, make_pki

pytestmark = pytest.mark.e2e

TEMPLATE = p.ROOT / "envoy.tls.yaml"
# The placeholders envoy.tls.yaml names, for an operator (and these tests) to replace.
CLIENT_CERT = "/etc/extauthz/tls/client.pem"
CLIENT_KEY = "/etc/extauthz/tls/client-key.pem"
TRUSTED_CA = "/etc/extauthz/tls/ca.pem"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki: Pki, client_ca: bool = True) -> dict[str, str]:
    env = {"EXTAUTHZ_TLS_CERT": str(pki.server.cert), "EXTAUTHZ_TLS_KEY": str(pki.server.key)}
    if client_ca:
        env["EXTAUTHZ_TLS_CLIENT_CA"] = str(pki.ca.cert)
    return env


@pytest.fixture(scope="module")
def mtls_server(
    redis_url: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = start_server(redis_url, tmp_path_factory.mktemp("mtls"), extra=tls_env(pki))
    yield srv
    srv.process.stop()


def channel(
    server: Server, ca: Path | None = None, cert_key: tuple[Path, Path] | None = None
) -> grpc.Channel:
    """A TLS channel trusting `ca`, presenting `cert_key` when given; plaintext without `ca`."""
    if ca is None:
        return grpc.insecure_channel(server.address)
    cert, key = cert_key or (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(server.address, credentials)


def health(chan: grpc.Channel) -> health_pb2.HealthCheckResponse:
    stub = health_pb2_grpc.HealthStub(chan)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5)


def refused(chan: grpc.Channel) -> grpc.RpcError:
    with chan, pytest.raises(grpc.RpcError) as caught:
        health(chan)
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    return caught.value


def render(ports: dict[str, int], client: tuple[Path, Path], ca: Path) -> str:
    text = p.render_envoy_config(ports, template=TEMPLATE)
    for placeholder, path in ((CLIENT_CERT, client[0]), (CLIENT_KEY, client[1]), (TRUSTED_CA, ca)):
        assert placeholder in text
        text = text.replace(placeholder, str(path))
    return text


def start_tls_envoy(
    server: Server, upstream: MockUpstream, work_dir: Path, client: tuple[Path, Path], ca: Path
) -> tuple[int, p.Process]:
    ports = {
        "listener": p.free_port(),
        "extauthz": server.grpc_port,
        "extauthz_http": server.http_port,
        "upstream": upstream.port,
        "admin": p.free_port(),
    }
    config = work_dir / f"envoy-tls-{ports['listener']}.yaml"
    config.write_text(render(ports, client, ca))
    log = work_dir / f"envoy-tls-{ports['listener']}.log"
    return ports["listener"], p.start_envoy(config, ports["listener"], log)


@pytest.fixture
def upstream() -> Iterator[MockUpstream]:
    # Its usage reports go over plaintext gRPC, which the TLS server would refuse; point them
    # at a closed port so they fail at once. These tests look only at what reached it.
    mock = MockUpstream(p.free_port(), f"127.0.0.1:{p.free_port()}", "unused").start()
    yield mock
    mock.stop()


# --- Envoy over mTLS ----------------------------------------------------------------------


def test_envoy_with_the_client_certificate_gets_decisions_over_mtls(
    mtls_server: Server, pki: Pki, upstream: MockUpstream, tmp_path: Path
) -> None:
    with channel(mtls_server, pki.ca.cert, (pki.client.cert, pki.client.key)) as chan:
        key, data = Clients(chan, mtls_server.admin_token, mtls_server.usage_token).create_key()
    port, envoy = start_tls_envoy(
        mtls_server, upstream, tmp_path, (pki.client.cert, pki.client.key), pki.ca.cert
    )
    try:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        reply = fetch(port, "POST", "/v1/chat/completions", headers, chat_body())
        assert reply.status == 200, reply.body
        assert upstream.seen[-1].headers["x-virtual-key-id"] == data.id
        # and a bad key is denied by the server (the JSON body is extauthz's, not Envoy's)
        bad = fetch(port, "POST", "/v1/chat/completions", {"x-api-key": "nope"}, chat_body())
        assert bad.status == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    finally:
        envoy.stop()


def test_envoy_refuses_a_server_certificate_its_ca_did_not_sign(
    mtls_server: Server, pki: Pki, upstream: MockUpstream, tmp_path: Path
) -> None:
    # Envoy trusts the other CA only: it cannot verify extauthz, so ext_authz fails closed.
    port, envoy = start_tls_envoy(
        mtls_server, upstream, tmp_path, (pki.client.cert, pki.client.key), pki.other_ca.cert
    )
    try:
        reply = fetch(port, "POST", "/v1/chat/completions", {"x-api-key": "any"}, chat_body())
        assert reply.status == 503
        assert upstream.seen == []
    finally:
        envoy.stop()


# --- gRPC clients against mTLS -------------------------------------------------------------


def test_a_client_with_the_ca_signed_certificate_is_served(mtls_server: Server, pki: Pki) -> None:
    with channel(mtls_server, pki.ca.cert, (pki.client.cert, pki.client.key)) as chan:
        assert health(chan).status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_without_a_certificate_is_refused(mtls_server: Server, pki: Pki) -> None:
    refused(channel(mtls_server, pki.ca.cert))


def test_a_client_with_a_certificate_from_another_ca_is_refused(
    mtls_server: Server, pki: Pki
) -> None:
    refused(channel(mtls_server, pki.ca.cert, (pki.other_client.cert, pki.other_client.key)))


def test_a_plaintext_client_is_refused(mtls_server: Server) -> None:
    refused(channel(mtls_server))


# --- TLS without a client CA ---------------------------------------------------------------


def test_tls_without_a_client_ca_serves_clients_without_a_certificate(
    redis_url: str, pki: Pki, tmp_path: Path
) -> None:
    srv = start_server(redis_url, tmp_path, extra=tls_env(pki, client_ca=False))
    try:
        with channel(srv, pki.ca.cert) as chan:
            _, data = Clients(chan, srv.admin_token, srv.usage_token).create_key()
        assert len(data.id) == 16
        refused(channel(srv))  # still TLS: plaintext is refused
    finally:
        srv.process.stop()


# --- half a TLS setup ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"EXTAUTHZ_TLS_CERT"}, "EXTAUTHZ_TLS_KEY"),
        ({"EXTAUTHZ_TLS_KEY"}, "EXTAUTHZ_TLS_CERT"),
        ({"EXTAUTHZ_TLS_CLIENT_CA"}, "EXTAUTHZ_TLS_CERT"),
    ],
)
def test_half_a_tls_setup_exits_naming_the_missing_variable(
    redis_url: str, pki: Pki, given: set[str], missing: str
) -> None:
    extra = {name: path for name, path in tls_env(pki).items() if name in given}
    env = p.extauthz_env(
        redis_url=redis_url,
        grpc_port=p.free_port(),
        http_port=p.free_port(),
        admin_token="adm",
        usage_token="use",
        extra=extra,
    )
    result = subprocess.run(
        [p.executable("extauthz"), "serve"], env=env, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extauthz: ")
    assert missing in lines[0]
