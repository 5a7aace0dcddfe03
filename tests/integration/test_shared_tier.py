"""The shared tier: one Envoy, several extauthz replicas, with the cluster that
deploy/envoy/shared-tier-extauthz-cluster.yaml ships (loopback endpoints in place of DNS).
A replica dies or Redis goes away under traffic; what does the client see?"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from devstack import processes as p
from devstack.mock_upstream import MockUpstream
from tests.conftest import Server, start_server
from tests.helpers import Clients, chat_body, eventually, fetch

pytestmark = pytest.mark.integration
CLUSTER = p.ROOT / "deploy" / "envoy" / "shared-tier-extauthz-cluster.yaml"


def shared_tier_config(servers: list[Server], upstream: int, listener: int) -> str:
    config: dict[str, Any] = yaml.safe_load(
        p.render_envoy_config(
            {
                "listener": listener,
                "extauthz": 1,
                "extauthz_http": servers[0].http_port,
                "upstream": upstream,
                "admin": p.free_port(),
            }
        )
    )
    (cluster,) = yaml.safe_load(CLUSTER.read_text())
    cluster["type"] = "STATIC"  # loopback replicas stand in for the headless Service
    cluster.pop("dns_lookup_family")
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {
            "endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": s.grpc_port}}
            }
        }
        for s in servers
    ]
    clusters = config["static_resources"]["clusters"]
    clusters[:] = [cluster if c["name"] == "extauthz" else c for c in clusters]
    return yaml.safe_dump(config)


@pytest.fixture
def tier(tmp_path: Path) -> Iterator[tuple[p.RedisServer, list[Server], int, Clients]]:
    redis = p.RedisServer(tmp_path / "redis").start()
    servers = [
        start_server(redis.url, tmp_path, admin_token="adm", usage_token="use") for _ in range(2)
    ]
    upstream = MockUpstream(p.free_port(), servers[1].address, "use").start()
    listener = p.free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(shared_tier_config(servers, upstream.port, listener))
    envoy = p.start_envoy(config, listener, tmp_path / "envoy.log")
    channel = grpc.insecure_channel(servers[1].address)
    try:
        yield redis, servers, listener, Clients(channel, "adm", "use")
    finally:
        channel.close()
        envoy.stop()
        upstream.stop()
        for server in servers:
            server.process.stop()
        redis.stop()


def statuses(listener: int, key: str, count: int) -> list[int]:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return [
        fetch(listener, "POST", "/v1/chat/completions", headers, chat_body("gpt-4")).status
        for _ in range(count)
    ]


def test_a_replica_killed_under_traffic_fails_no_request_and_counts_each_once(
    tier: tuple[p.RedisServer, list[Server], int, Clients],
) -> None:
    _, servers, listener, clients = tier
    key, data = clients.create_key(rpm_limit=0, tpm_limit=0, max_budget=0)
    assert eventually(lambda: statuses(listener, key, 1) == [200])  # health checks passed
    before = statuses(listener, key, 20)
    servers[0].process.stop(signal.SIGKILL)
    after = statuses(listener, key, 100)
    assert before == [200] * 20 and after == [200] * 100
    assert clients.get_key(data.id).total_requests == 121


def test_redis_down_behind_the_shared_tier_is_the_json_503(
    tier: tuple[p.RedisServer, list[Server], int, Clients],
) -> None:
    redis, _, listener, clients = tier
    key, _ = clients.create_key()
    assert eventually(lambda: statuses(listener, key, 1) == [200])
    redis.stop()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    def json_503() -> bool:
        reply = fetch(listener, "POST", "/v1/chat/completions", headers, chat_body("gpt-4"))
        return reply.status == 503 and reply.json()["error"]["code"] == "auth_unavailable"

    # first while health still says SERVING, then once every replica says NOT_SERVING
    assert json_503()
    assert eventually(
        lambda: all(fetch(s.http_port, "GET", "/readyz").status == 503 for s in tier[1])
    )
    assert all(json_503() for _ in range(10))


def test_a_replica_killed_with_many_checks_in_flight_fails_none_of_them(
    tier: tuple[p.RedisServer, list[Server], int, Clients],
) -> None:
    """Twelve clients at once when the replica dies: every Check in flight on it is retried
    on the other. (Envoy allows only 3 retries in flight unless circuit_breakers raise
    max_retries; this run rarely has more than 3 on the dying replica, so the overflow an
    adversarial run saw, 2 of 6,000, is not reproduced here every time.)"""
    _, servers, listener, clients = tier
    key, data = clients.create_key(rpm_limit=0, tpm_limit=0, max_budget=0)
    assert eventually(lambda: statuses(listener, key, 1) == [200])
    done: list[int] = []
    killed = threading.Event()

    def client() -> None:
        for _ in range(60):
            done.extend(statuses(listener, key, 1))
            if len(done) >= 120 and not killed.is_set():
                killed.set()
                servers[0].process.stop(signal.SIGKILL)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert killed.is_set() and len(done) == 720
    assert sorted(set(done)) == [200], {s: done.count(s) for s in set(done)}
    assert clients.get_key(data.id).total_requests >= 721  # a retried Check may count twice
