"""Several server processes on one Redis enforce one limit between them."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from keys.v1 import keys_pb2
from tests.conftest import Server, start_server
from tests.helpers import Clients, bearer, chat_body

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_server(
    redis_url: str, server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Clients]:
    other = start_server(
        redis_url,
        tmp_path_factory.mktemp("replica"),
        admin_token=server.admin_token,
        usage_token=server.usage_token,
    )
    channel = grpc.insecure_channel(other.address)
    yield Clients(channel, other.admin_token, other.usage_token)
    channel.close()
    other.process.stop()


def test_two_servers_allow_exactly_rpm_limit_requests(
    clients: Clients, second_server: Clients
) -> None:
    key, _ = clients.create_key(rpm_limit=25, tpm_limit=0, max_budget=0)
    headers = {"authorization": f"Bearer {key}"}
    replicas = [clients, second_server]

    def one(i: int) -> int:
        return int(replicas[i % 2].check(headers, chat_body()).denied_response.status.code)

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(one, range(80)))
    assert statuses.count(0) == 25  # allowed: no denied_response
    assert statuses.count(429) == 55


def test_revocation_on_one_server_is_seen_by_the_other_on_its_next_check(
    clients: Clients, second_server: Clients
) -> None:
    key, data = clients.create_key()
    headers = {"authorization": f"Bearer {key}"}
    assert second_server.check(headers, chat_body()).status.code == 0
    clients.revoke(data.id)
    assert second_server.check(headers, chat_body()).denied_response.status.code == 401


def test_spend_reported_to_one_server_is_enforced_by_the_other(
    clients: Clients, second_server: Clients
) -> None:
    key, data = clients.create_key(max_budget=0.5)
    headers = {"authorization": f"Bearer {key}"}
    clients.report(data.id, "r1", cost=0.5)
    assert second_server.check(headers, chat_body()).denied_response.status.code == 402


def test_rotation_on_one_server_is_seen_by_the_other_on_its_next_check(
    clients: Clients, second_server: Clients
) -> None:
    old, data = clients.create_key()
    assert second_server.check({"authorization": f"Bearer {old}"}, chat_body()).status.code == 0
    clients.keys.RotateKey(
        keys_pb2.RotateKeyRequest(id=data.id), metadata=bearer(clients.admin_token)
    )
    denied = second_server.check({"authorization": f"Bearer {old}"}, chat_body())
    assert denied.denied_response.status.code == 401


def test_deletion_and_downgrade_are_seen_by_the_other_server(
    clients: Clients, second_server: Clients
) -> None:
    key, data = clients.create_key(allowed_models=["gpt-4", "gpt-4o"])
    auth = {"authorization": f"Bearer {key}"}
    assert second_server.check(auth, chat_body("gpt-4o")).status.code == 0
    clients.keys.UpdateKey(
        keys_pb2.UpdateKeyRequest(id=data.id, allowed_models=keys_pb2.ModelList(models=["gpt-4"])),
        metadata=bearer(clients.admin_token),
    )
    assert second_server.check(auth, chat_body("gpt-4o")).denied_response.status.code == 403
    clients.keys.DeleteKey(
        keys_pb2.DeleteKeyRequest(id=data.id), metadata=bearer(clients.admin_token)
    )
    assert second_server.check(auth, chat_body("gpt-4")).denied_response.status.code == 401
