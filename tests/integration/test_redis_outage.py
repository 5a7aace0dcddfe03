"""Redis stopped and restarted under a running server: 503 (or fail-open), health, recovery."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.processes import RedisServer
from tests.conftest import Server, start_server
from tests.helpers import Clients, chat_body, eventually

pytestmark = pytest.mark.integration


def health_status(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status)


def readyz(server: Server) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return err.code


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield redis
    redis.stop()


@pytest.fixture
def own_server(own_redis: RedisServer, tmp_path: Path) -> Iterator[tuple[Server, Clients]]:
    server = start_server(own_redis.url, tmp_path)
    channel = grpc.insecure_channel(server.address)
    yield server, Clients(channel, server.admin_token, server.usage_token)
    channel.close()
    server.process.stop()


def test_redis_down_denies_with_503_json_then_recovers(
    own_redis: RedisServer, own_server: tuple[Server, Clients]
) -> None:
    server, clients = own_server
    key, _ = clients.create_key()
    headers = {"authorization": f"Bearer {key}"}
    assert clients.check(headers, chat_body()).status.code == 0

    own_redis.stop()
    denied = clients.check(headers, chat_body()).denied_response
    assert denied.status.code == 503
    assert '"code": "auth_unavailable"' in denied.body
    assert eventually(
        lambda: health_status(clients.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    )
    assert readyz(server) == 503

    own_redis.start()
    assert eventually(lambda: clients.check(headers, chat_body()).status.code == 0, timeout=5)
    assert eventually(
        lambda: health_status(clients.channel) == health_pb2.HealthCheckResponse.SERVING
    )
    assert readyz(server) == 200


def test_admin_call_while_redis_is_down_is_unavailable(
    own_redis: RedisServer, own_server: tuple[Server, Clients]
) -> None:
    _, clients = own_server
    own_redis.stop()
    with pytest.raises(grpc.RpcError) as err:
        clients.create_key()
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "redis" in (err.value.details() or "")


def test_fail_open_allows_and_marks_the_request(own_redis: RedisServer, tmp_path: Path) -> None:
    server = start_server(own_redis.url, tmp_path, extra={"EXTAUTHZ_FAIL_OPEN": "true"})
    channel = grpc.insecure_channel(server.address)
    try:
        clients = Clients(channel, server.admin_token, server.usage_token)
        key, data = clients.create_key()
        own_redis.stop()
        reply = clients.check({"authorization": f"Bearer {key}"}, chat_body())
        assert reply.status.code == 0
        upstream = {h.header.key: h.header.value for h in reply.ok_response.headers}
        assert len(upstream.pop("x-virtual-key-request-id")) == 32  # usage still reportable
        assert upstream == {"x-virtual-key-id": data.id, "x-virtual-key-unverified": "true"}
        assert "authorization" in reply.ok_response.headers_to_remove
        # fail-open is for the store only: a missing key is still refused
        assert clients.check({}, chat_body()).denied_response.status.code == 401
    finally:
        channel.close()
        server.process.stop()
