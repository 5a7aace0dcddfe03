"""Budget alerts (docs/design.md section 13) delivered by real server processes to a
local webhook: through failed deliveries, a killed server, and on a real Redis Cluster."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from devstack import processes as p
from keys import alert_stream, keygen, keyspace
from keys.budget import parse_duration
from keys.budgets import BudgetSpec, BudgetStore
from keys.connection import RedisBridge
from keys.model import UsageReport
from keys.store import KeyStore
from tests.alert_support import THRESHOLDS, WebhookReceiver, events_of
from tests.conftest import ManualClock, Server, start_server
from tests.helpers import Clients, eventually, fetch, stored_key
from tests.redis_cluster import RedisCluster

pytestmark = pytest.mark.integration
USD = 1_000_000_000
SECRET = "whsec-test-3f9a"
# fast retries, so a test that fails deliveries takes seconds
FAST = {"EXTAUTHZ_ALERT_RETRY_BASE_MS": "50", "EXTAUTHZ_ALERT_TIMEOUT_MS": "500"}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[p.RedisServer]:
    """A redis-server of this test's own: no other test's servers read its alert streams."""
    server = p.RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def alerting_server(redis_url: str, log_dir: Path, receiver: WebhookReceiver) -> Server:
    return start_server(
        redis_url,
        log_dir,
        extra={
            "EXTAUTHZ_ALERT_WEBHOOK_URL": receiver.url,
            "EXTAUTHZ_ALERT_SECRET": SECRET,
            **FAST,
        },
    )


def metric(server: Server, name: str) -> float:
    text = fetch(server.http_port, "GET", "/metrics").body.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def stream_length(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return int(client.xlen(alert_stream.SINGLE_STREAM))


def test_each_threshold_reaches_the_webhook_once_signed_though_it_failed_twice(
    own_redis: p.RedisServer, tmp_path: Path
) -> None:
    receiver = WebhookReceiver(p.free_port(), fail_first=2).start()
    server = alerting_server(own_redis.url, tmp_path, receiver)
    try:
        with grpc.insecure_channel(server.address) as channel:
            clients = Clients(channel, server.admin_token, server.usage_token)
            _, key = clients.create_key(max_budget=1.0)
            for n, cost in enumerate((0.3, 0.25, 0.3, 0.1, 0.2)):  # 0.55, 0.85, 1.15
                clients.report(key.id, f"r{n}", cost=cost, prompt_tokens=1)
        assert eventually(lambda: len(receiver.acknowledged()) == 3, timeout=15)
        assert eventually(lambda: stream_length(own_redis.url) == 0)
        deliveries = receiver.received()
        assert [d.status for d in deliveries[:2]] == [500, 500]
        assert all(d.signed_by(SECRET) for d in deliveries)
        assert all(d.headers["content-type"] == "application/json" for d in deliveries)
        assert all(d.headers["x-extauthz-event-id"] == d.payload["event_id"] for d in deliveries)
        acknowledged = sorted(receiver.acknowledged().values(), key=lambda d: d.payload["spent"])
        payloads = [d.payload for d in acknowledged]
        assert [(x["threshold"], x["spent"]) for x in payloads] == [
            (0.5, 0.55),
            (0.8, 0.85),
            (1.0, 1.15),
        ]
        assert {(x["event"], x["scope"], x["id"], x["max_budget"]) for x in payloads} == {
            ("budget_threshold", "key", key.id, 1.0)
        }
        # without a period: counted from when the budget was set (the key's creation)
        created = key.created_at.ToMilliseconds()
        assert {x["period_start"] for x in payloads} == {alert_stream.rfc3339_ms(created)}
        # a retry sends the same event: the same id, the same bytes
        by_id: dict[str, set[bytes]] = {}
        for d in deliveries:
            by_id.setdefault(d.payload["event_id"], set()).add(d.body)
        assert all(len(bodies) == 1 for bodies in by_id.values())
        assert metric(server, "extauthz_alerts_sent_total") == 3
        assert metric(server, "extauthz_alerts_failed_total") == 2
        assert metric(server, "extauthz_alerts_retried_total") >= 2
        assert SECRET not in server.process.log_text()
        assert "/hooks/budget" not in server.process.log_text()  # the URL's path is not logged
    finally:
        server.process.stop()
        receiver.stop()


def test_a_server_killed_between_charge_and_delivery_loses_no_alert(
    own_redis: p.RedisServer, tmp_path: Path
) -> None:
    """Ten events, more than a server attempts at once, all failed once; the server is
    killed; the next one delivers each, once."""
    receiver = WebhookReceiver(p.free_port())  # not listening yet: every attempt fails
    first = alerting_server(own_redis.url, tmp_path, receiver)
    try:
        with grpc.insecure_channel(first.address) as channel:
            clients = Clients(channel, first.admin_token, first.usage_token)
            keys = [clients.create_key(max_budget=2.0)[1] for _ in range(5)]
            for key in keys:
                clients.report(key.id, "r1", cost=1.7, prompt_tokens=1)  # 0.5 and 0.8 at once
        assert eventually(lambda: metric(first, "extauthz_alerts_failed_total") >= 10)
    finally:
        first.process.stop(signal.SIGKILL)
    assert stream_length(own_redis.url) == 10
    receiver.start()
    second = alerting_server(own_redis.url, tmp_path, receiver)
    try:
        assert eventually(lambda: len(receiver.acknowledged()) == 10, timeout=15)
        assert eventually(lambda: stream_length(own_redis.url) == 0)
        payloads = [d.payload for d in receiver.acknowledged().values()]
        assert sorted((x["id"], x["threshold"]) for x in payloads) == sorted(
            (key.id, threshold) for key in keys for threshold in (0.5, 0.8)
        )
        assert len(receiver.received()) == 10  # nothing sent twice
        assert metric(second, "extauthz_alerts_sent_total") == 10
        assert metric(second, "extauthz_alerts_retried_total") == 10  # claimed from the dead
    finally:
        second.process.stop()
        receiver.stop()


def test_a_server_without_a_webhook_records_no_alerts(
    own_redis: p.RedisServer, tmp_path: Path
) -> None:
    server = start_server(own_redis.url, tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            clients = Clients(channel, server.admin_token, server.usage_token)
            _, key = clients.create_key(max_budget=1.0)
            clients.report(key.id, "r1", cost=2.0, prompt_tokens=1)
        with redis.Redis.from_url(own_redis.url, decode_responses=True) as client:
            assert list(client.scan_iter(match=alert_stream.STREAM_MATCH)) == []
            assert client.hget(keyspace.record_key(key.id), "alerted") is None
        assert metric(server, "extauthz_alerts_sent_total") == 0
    finally:
        server.process.stop()


# --- Redis Cluster ----------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    nodes = RedisCluster(tmp_path / "cluster", masters=3).start()
    yield nodes
    nodes.stop()


async def test_on_a_cluster_a_team_budget_alerts_from_its_own_slot_to_the_webhook(
    cluster: RedisCluster, tmp_path: Path, clock: ManualClock
) -> None:
    """level_settle.lua appends the team's events to the stream of the team budget's slot.
    A server finds events appended before it started (a server that died before reading
    them: here the test's own store) by SCAN on every primary, and those its own charges
    append at once; it delivers both, the key's from another slot too."""
    team = "team-" + keygen.new_key_id()
    bridge = RedisBridge.from_url(cluster.url, timeout_s=2)
    try:
        await BudgetStore(bridge, clock=clock).set(
            BudgetSpec("team", team, USD, parse_duration(""), 0, 0, 0)
        )
        before = KeyStore(bridge, clock=clock, alert_thresholds=THRESHOLDS)
        key = await stored_key(before, team_id=team, max_budget_nanos=4 * USD)
        await before.report_usage(
            UsageReport(key.key_id, "r1", "gpt-4", "", 1, 0, 1, 600_000_000, family="gpt-4")
        )
        assert [e.threshold_bp for e in await events_of(before, "team", team)] == [5000]
    finally:
        await bridge.aclose()
    receiver = WebhookReceiver(p.free_port(), fail_first=1).start()
    server = alerting_server(cluster.url, tmp_path, receiver)
    try:
        assert eventually(lambda: len(receiver.acknowledged()) == 1, timeout=15)
        with grpc.insecure_channel(server.address) as channel:
            clients = Clients(channel, server.admin_token, server.usage_token)
            clients.report(key.key_id, "r1", cost=0.6, prompt_tokens=1)  # a duplicate: nothing
            clients.report(key.key_id, "r2", cost=1.5, prompt_tokens=1)
        assert eventually(lambda: len(receiver.acknowledged()) == 4, timeout=15)
        payloads = [d.payload for d in receiver.acknowledged().values()]
        assert sorted((x["scope"], x["threshold"], x["spent"]) for x in payloads) == [
            ("key", 0.5, 2.1),
            ("team", 0.5, 0.6),
            ("team", 0.8, 2.1),
            ("team", 1.0, 2.1),
        ]
        assert {x["id"] for x in payloads} == {key.key_id, team}
        assert all(d.signed_by(SECRET) for d in receiver.received())
        team_stream = alert_stream.level_stream("team", team, cluster=True)
        assert cluster.keyslot(team_stream) == cluster.keyslot(keyspace.level_key("team", team))
        key_stream = alert_stream.key_stream(key.key_id, cluster=True)
        assert cluster.keyslot(key_stream) == cluster.keyslot(keyspace.record_key(key.key_id))
        with redis.RedisCluster(
            host="127.0.0.1", port=cluster.ports[0], decode_responses=True
        ) as client:
            assert eventually(lambda: client.xlen(team_stream) + client.xlen(key_stream) == 0)
    finally:
        server.process.stop()
        receiver.stop()
