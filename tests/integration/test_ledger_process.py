"""`extauthz ledger` as a real process: SIGKILLed and restarted, PostgreSQL or Redis
restarted under it, SIGTERM; nothing lost, nothing written twice, no password logged."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import PostgresServer, RedisServer, executable, free_port, spawn, wait_log
from keys.connection import Client, connect
from ledger.streams import Streams
from tests.conftest import create_database
from tests.helpers import eventually
from tests.ledger_support import (
    RedisHalf,
    key_totals,
    metric,
    migrated,
    start_sink,
    until_lag_zero,
    usage_count,
    usd,
)

pytestmark = pytest.mark.integration


async def charges(half: RedisHalf, key_id: str, first: int, count: int, cost: int = 1001) -> int:
    pipe = half.client.pipeline(transaction=False)
    for n in range(first, first + count):
        pipe.hincrby(f"vk:{{{key_id}}}", "spent_total", cost)
        pipe.xadd(
            half.stream(key_id),
            {
                "type": "charge",
                "key_id": key_id,
                "ts": "1800000000000",
                "request_id": f"r{n}",
                "model": "gpt-4o",
                "provider": "openai",
                "prompt_tokens": "1",
                "completion_tokens": "1",
                "total_tokens": "2",
                "cost": str(cost),
            },
        )
    await pipe.execute()
    return count * cost


async def test_a_sigkilled_sink_restarted_loses_nothing_and_writes_nothing_twice(
    ledger_redis: RedisServer, redis: Client, db: str, tmp_path: Path
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    total = await charges(half, key, 0, 4000)
    log = tmp_path / "sink.log"
    sink, _ = start_sink(ledger_redis.url, db, log, "--batch", "10")
    assert eventually(lambda: usage_count(db) >= 300, timeout=20, interval=0.005)
    sink.stop(signal.SIGKILL)
    written_before = usage_count(db)
    total += await charges(half, key, 4000, 500)
    # a new process under a new name (hostname-pid): it claims what the dead one held
    sink, _ = start_sink(
        ledger_redis.url, db, log, "--claim-idle-seconds", "0.5", "--rescan-seconds", "0.5"
    )
    try:
        assert eventually(lambda: usage_count(db) == 4500, timeout=30)
        assert await until_lag_zero(Streams(redis, "probe"))
    finally:
        assert sink.stop() == 0
    assert written_before < 4500
    assert key_totals(db, key) == (usd(total), 4500, usd(total))


async def test_sigterm_finishes_the_batch_and_exits_cleanly(
    ledger_redis: RedisServer, redis: Client, db: str, tmp_path: Path
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    await charges(half, key, 0, 50)
    sink, _ = start_sink(ledger_redis.url, db, tmp_path / "sink.log")
    assert eventually(lambda: usage_count(db) == 50)
    assert sink.stop(signal.SIGTERM) == 0
    assert '"msg": "stopped"' in (tmp_path / "sink.log").read_text()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path / "postgres").start()
    yield server
    server.remove()


async def test_postgres_restarted_mid_run_loses_nothing(
    ledger_redis: RedisServer, redis: Client, own_postgres: PostgresServer, tmp_path: Path
) -> None:
    _, url = create_database(own_postgres.url)
    await migrated(url)
    half = RedisHalf(redis)
    key = await half.create_key()
    total = await charges(half, key, 0, 200)
    sink, port = start_sink(ledger_redis.url, url, tmp_path / "sink.log")
    try:
        assert eventually(lambda: usage_count(url) == 200)
        own_postgres.stop(signal.SIGQUIT)  # immediate shutdown: a crash, recovered at start
        total += await charges(half, key, 200, 300)
        assert eventually(lambda: metric(port, 'extauthz_ledger_errors_total{kind="postgres"}') > 0)
        assert metric(port, "extauthz_ledger_lag") > 0
        own_postgres.start()
        assert eventually(lambda: usage_count(url) == 500, timeout=30)
        assert eventually(lambda: metric(port, "extauthz_ledger_lag") == 0)
    finally:
        assert sink.stop() == 0
    assert key_totals(url, key) == (usd(total), 500, usd(total))


async def test_the_lag_keeps_counting_what_arrives_while_postgres_is_down(
    ledger_redis: RedisServer, redis: Client, own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """The gauge the ExtauthzLedgerBehind alert reads: an outage is when it matters, and
    the sink spends it retrying one batch."""
    _, url = create_database(own_postgres.url)
    await migrated(url)
    half = RedisHalf(redis)
    key = await half.create_key()
    sink, port = start_sink(ledger_redis.url, url, tmp_path / "sink.log")
    try:
        await charges(half, key, 0, 10)
        assert eventually(lambda: usage_count(url) == 10)
        own_postgres.stop(signal.SIGQUIT)
        await charges(half, key, 10, 50)  # the batch the sink is stuck on
        assert eventually(lambda: metric(port, 'extauthz_ledger_errors_total{kind="postgres"}') > 0)
        await charges(half, key, 60, 300)  # behind it
        assert eventually(lambda: metric(port, "extauthz_ledger_lag") == 350, timeout=15)
        own_postgres.start()
        assert eventually(lambda: usage_count(url) == 360, timeout=30)
        assert eventually(lambda: metric(port, "extauthz_ledger_lag") == 0)
    finally:
        assert sink.stop() == 0


async def test_redis_restarted_mid_run_is_read_again_once_back(db: str, tmp_path: Path) -> None:
    own = RedisServer(tmp_path / "own-redis", appendonly=True).start()
    client = connect(own.url, timeout_s=5)
    try:
        half = RedisHalf(client)
        key = await half.create_key()
        total = await charges(half, key, 0, 100)
        sink, port = start_sink(own.url, db, tmp_path / "sink.log")
        assert eventually(lambda: usage_count(db) == 100)
        own.stop()
        assert eventually(lambda: metric(port, 'extauthz_ledger_errors_total{kind="redis"}') > 0)
        own.start()
        total += await charges(half, key, 100, 100)
        assert eventually(lambda: usage_count(db) == 200, timeout=30)
        assert sink.stop() == 0
        assert key_totals(db, key) == (usd(total), 200, usd(total))
    finally:
        await client.aclose()
        own.stop()


def test_the_database_password_is_never_logged(ledger_redis: RedisServer, tmp_path: Path) -> None:
    url = f"postgresql://ledger:s3cret-pw@127.0.0.1:{free_port()}/ledger"
    log = tmp_path / "sink.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "REDIS_"))}
    env |= {"REDIS_URL": ledger_redis.url, "LEDGER_DATABASE_URL": url}
    env["LEDGER_METRICS_PORT"] = str(free_port())
    sink = spawn([executable("extauthz"), "ledger"], log, env)
    wait_log(sink, "postgres unavailable, retrying")
    assert sink.stop(signal.SIGTERM) == 0
    migrate = subprocess.run(
        [executable("extauthz"), "ledger", "migrate"], env=env, capture_output=True, text=True
    )
    assert migrate.returncode == 2
    for text in (log.read_text(), migrate.stderr):
        assert "127.0.0.1" in text  # it does say where it failed to connect
        assert "s3cret-pw" not in text
