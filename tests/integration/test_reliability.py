"""Faults for real: Redis stopped, killed and restarted with AOF; server processes killed.
Spend is money: an accepted usage report is never lost and never charged twice."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis

from devstack.processes import RedisServer
from keys.v1 import keys_pb2
from tests.conftest import Server, start_server
from tests.helpers import Clients, chat_body, check_request, eventually, fetch

pytestmark = pytest.mark.integration


class Node:
    """A server process and its clients."""

    def __init__(self, redis_url: str, work: Path, **extra: str) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.server: Server = start_server(redis_url, work, extra=dict(extra))
        self.channel = grpc.insecure_channel(self.server.address)
        self.clients = Clients(self.channel, self.server.admin_token, self.server.usage_token)

    def close(self, sig: int = signal.SIGTERM) -> None:
        self.channel.close()
        self.server.process.stop(sig)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield redis
    redis.stop()


def spent(node: Node, key_id: str) -> float:
    return node.clients.get_key(key_id).spent


def journal_depth(node: Node) -> float:
    text = fetch(node.server.http_port, "GET", "/metrics").body.decode()
    line = next(x for x in text.splitlines() if x.startswith("extauthz_usage_journal_depth "))
    return float(line.split()[1])


def wait_until_in_the_aof(server: RedisServer) -> None:
    """Until every write so far is in the append-only file, so a SIGKILL cannot lose it:
    writes reach the file in order, so once a marker written now is there, all are."""
    marker = f"aof-marker-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(server.url)
    try:
        client.set(marker, 1)
    finally:
        client.close()

    def on_disk() -> bool:
        files = server.directory.rglob("*.aof")
        return any(marker.encode() in path.read_bytes() for path in files)

    assert eventually(on_disk, interval=0.02), "the marker never reached the append-only file"


def test_reports_during_an_outage_are_queued_then_charged_once(
    aof_redis: RedisServer, tmp_path: Path
) -> None:
    node = Node(aof_redis.url, tmp_path / "a")
    try:
        _, data = node.clients.create_key(max_budget=0)
        aof_redis.stop()
        replies = [node.clients.report(data.id, f"out-{i}", cost=0.01) for i in range(50)]
        assert all(r.queued for r in replies)
        assert journal_depth(node) == 50
        aof_redis.start()
        assert eventually(lambda: journal_depth(node) == 0)
        assert spent(node, data.id) == 0.5
        # the client retrying the same reports after the outage changes nothing
        again = [node.clients.report(data.id, f"out-{i}", cost=0.01) for i in range(50)]
        assert all(r.duplicate for r in again)
        assert spent(node, data.id) == 0.5
    finally:
        node.close()


def test_server_killed_during_an_outage_replays_its_journal_on_restart(
    aof_redis: RedisServer, tmp_path: Path
) -> None:
    journal = str(tmp_path / "journal")
    first = Node(aof_redis.url, tmp_path / "a", EXTAUTHZ_JOURNAL_DIR=journal)
    _, data = first.clients.create_key(max_budget=0)
    first.clients.report(data.id, "before", cost=1.0)
    aof_redis.stop()
    for i in range(30):
        assert first.clients.report(data.id, f"q-{i}", cost=0.25).queued
    first.close(signal.SIGKILL)
    aof_redis.start()
    second = Node(aof_redis.url, tmp_path / "b", EXTAUTHZ_JOURNAL_DIR=journal)
    try:
        assert eventually(lambda: spent(second, data.id) == 1.0 + 30 * 0.25)
        assert eventually(lambda: journal_depth(second) == 0)
    finally:
        second.close()


def test_servers_sharing_a_journal_directory_start_and_replay_a_killed_ones_journal_once(
    aof_redis: RedisServer, tmp_path: Path
) -> None:
    journal = str(tmp_path / "journal")
    a = Node(aof_redis.url, tmp_path / "a", EXTAUTHZ_JOURNAL_DIR=journal)
    b = Node(aof_redis.url, tmp_path / "b", EXTAUTHZ_JOURNAL_DIR=journal)
    c = Node(aof_redis.url, tmp_path / "c", EXTAUTHZ_JOURNAL_DIR=journal)
    try:
        _, data = a.clients.create_key(max_budget=0)
        aof_redis.stop()
        costs = [0.125 * (i + 1) for i in range(20)]
        for i, cost in enumerate(costs):
            assert c.clients.report(data.id, f"c-{i}", cost=cost).queued
        c.close(signal.SIGKILL)
        aof_redis.start()
        assert eventually(lambda: spent(a, data.id) == sum(costs), timeout=15)
        assert eventually(lambda: journal_depth(a) == 0 and journal_depth(b) == 0)
        assert spent(b, data.id) == sum(costs)
        adopted = [
            n.server.process.log_text().count("adopted a journal left by a stopped process")
            for n in (a, b)
        ]
        assert sorted(adopted) == [0, 1]  # one of the live servers took it, once
    finally:
        a.close()
        b.close()


def test_full_journal_refuses_reports_and_loses_none_it_accepted(
    aof_redis: RedisServer, tmp_path: Path
) -> None:
    node = Node(aof_redis.url, tmp_path / "a", EXTAUTHZ_JOURNAL_MAX_BYTES="1500")
    try:
        _, data = node.clients.create_key(max_budget=0)
        aof_redis.stop()
        accepted = 0
        with pytest.raises(grpc.RpcError) as err:
            for i in range(100):
                node.clients.report(data.id, f"f-{i}", cost=0.5)
                accepted += 1
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert 0 < accepted < 100
        aof_redis.start()
        assert eventually(lambda: spent(node, data.id) == accepted * 0.5)
    finally:
        node.close()


def test_keys_spend_counters_and_usage_survive_a_redis_crash_with_aof(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    node = Node(redis.url, tmp_path / "a")
    try:
        key, data = node.clients.create_key(rpm_limit=3, max_budget=5)
        auth = {"authorization": f"Bearer {key}"}
        for _ in range(2):
            assert node.clients.check(auth, chat_body()).status.code == 0
        node.clients.report(data.id, "r1", cost=1.25, prompt_tokens=7)
        wait_until_in_the_aof(redis)
        redis.stop(signal.SIGKILL)
        redis.start()
        assert eventually(lambda: node.clients.check(auth, chat_body()).status.code == 0)
        after = node.clients.get_key(data.id)
        assert (after.spent, after.total_requests) == (1.25, 3)
        denied = node.clients.check(auth, chat_body())  # 4th request: RPM window survived
        assert denied.denied_response.status.code == 429
        usage = node.clients.usage.GetUsage(
            keys_pb2.GetUsageRequest(key_id=data.id),
            metadata=(("authorization", f"Bearer {node.server.admin_token}"),),
        )
        assert (usage.totals.requests, usage.totals.prompt_tokens) == (1, 7)
    finally:
        node.close()
        redis.stop()


def test_killed_replica_leaves_the_other_serving_and_counters_consistent(
    aof_redis: RedisServer, tmp_path: Path
) -> None:
    a = Node(aof_redis.url, tmp_path / "a")
    b = Node(aof_redis.url, tmp_path / "b")
    try:
        key, data = a.clients.create_key(rpm_limit=40, max_budget=0, tpm_limit=0)
        auth = {"authorization": f"Bearer {key}"}

        def check(i: int) -> int:
            node = a if i % 2 else b
            try:
                return int(node.clients.check(auth, chat_body()).denied_response.status.code)
            except grpc.RpcError:
                return -1  # the killed replica

        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(check, i) for i in range(60)]
            assert eventually(lambda: any(f.done() for f in futures), interval=0.002)
            a.server.process.proc.send_signal(signal.SIGKILL)
            statuses = [f.result() for f in futures]
        after = [
            int(b.clients.check(auth, chat_body()).denied_response.status.code) for _ in range(50)
        ]
        allowed = statuses.count(0) + after.count(0)
        counted = b.clients.get_key(data.id).total_requests
        # never more than the limit; anything counted but unanswered was the killed one's
        assert allowed <= 40 and counted == 40
        assert after.count(429) >= 10
    finally:
        a.close(signal.SIGKILL)
        b.close()


def test_limits_and_spend_stay_exact_across_a_redis_restart_under_load(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    a = Node(redis.url, tmp_path / "a")
    b = Node(redis.url, tmp_path / "b")
    try:
        key, data = a.clients.create_key(rpm_limit=30, max_budget=0, tpm_limit=0)
        auth = {"authorization": f"Bearer {key}"}
        nodes = [a, b]

        def check(i: int) -> int:
            return int(nodes[i % 2].clients.check(auth, chat_body()).denied_response.status.code)

        def report(i: int) -> keys_pb2.ReportUsageResponse:
            return nodes[i % 2].clients.report(data.id, f"l-{i}", cost=0.001)

        with ThreadPoolExecutor(max_workers=8) as pool:
            first = list(pool.map(check, range(15)))
            reports = [pool.submit(report, i) for i in range(100)]
            redis.stop()  # a clean shutdown: AOF flushed, like a rolling restart
            redis.start()
            for future in reports:  # queued (journaled) or charged: none may fail
                future.result()
            second = list(pool.map(check, range(15, 80)))
        statuses = first + second
        assert statuses.count(0) == 30
        assert set(statuses) <= {0, 429, 503}
        assert eventually(lambda: a.clients.get_key(data.id).spent == 0.1, timeout=15)
        assert a.clients.get_key(data.id).total_requests == 30
    finally:
        a.close()
        b.close()
        redis.stop()


def test_redis_killed_under_load_every_check_still_gets_an_answer(
    aof_redis: RedisServer, tmp_path: Path
) -> None:
    node = Node(aof_redis.url, tmp_path / "a")
    try:
        key, _ = node.clients.create_key(rpm_limit=0, tpm_limit=0, max_budget=0)
        request = check_request({"authorization": f"Bearer {key}"}, chat_body())

        def check(_: int) -> int:
            # a deadline of 2x Envoy's ext_authz timeout: an answer, not a hang
            reply = node.clients.authz.Check(request, timeout=1.0)
            return int(reply.denied_response.status.code)

        with ThreadPoolExecutor(max_workers=8) as pool:
            first = list(pool.map(check, range(40)))
            during = [pool.submit(check, i) for i in range(200)]
            aof_redis.stop(signal.SIGKILL)
            statuses = [f.result() for f in during]
            after = list(pool.map(check, range(40)))
        assert set(first) == {0}
        assert set(statuses) <= {0, 503} and set(after) == {503}
    finally:
        node.close()
