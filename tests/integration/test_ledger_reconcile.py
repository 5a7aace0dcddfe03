"""`extauthz ledger reconcile` as an operator runs it: 0 when Redis and the ledger agree to
the nano-dollar, 1 with a line naming each key that differs, 2 while the sink is behind."""

from __future__ import annotations

import psycopg
import pytest

from devstack.processes import RedisServer
from keys.connection import Client
from keys.keyspace import record_key
from tests.ledger_support import RedisHalf, reconcile, running_sink

pytestmark = pytest.mark.integration


async def written(half: RedisHalf, redis_url: str, db: str) -> tuple[str, str]:
    """Two keys with charges, copied into the ledger: (first, second)."""
    first = await half.create_key()
    second = await half.create_key()
    await half.charge(first, 1_500_000_000)
    await half.charge(first, 7)
    await half.charge(second, 250_000_000)
    async with running_sink(redis_url, db) as parts:
        await parts.sink.catch_up()
    return first, second


async def test_reconcile_exits_0_when_every_key_agrees(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    await written(half, ledger_redis.url, db)
    gone = await half.create_key()
    await half.charge(gone, 3)
    await half.key_event(gone, "deleted")  # deleted in both: fine
    await half.create_key()  # never charged
    async with running_sink(ledger_redis.url, db) as parts:
        await parts.sink.catch_up()
    result = reconcile(ledger_redis.url, db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    assert "0 differences" in result.stderr


async def test_reconcile_names_the_key_whose_redis_spend_was_corrupted_and_exits_1(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    first, second = await written(half, ledger_redis.url, db)
    await redis.hincrby(record_key(second), "spent_total", 1)  # one nano-dollar
    result = reconcile(ledger_redis.url, db)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{second} spend redis=0.250000001 ledger=0.250000000 difference=+0.000000001"
    ]
    assert first not in result.stdout


async def test_reconcile_reports_a_ledger_key_missing_in_redis_but_not_a_deleted_one(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    first, _ = await written(half, ledger_redis.url, db)
    await redis.delete(record_key(first))  # lost without a DeleteKey
    result = reconcile(ledger_redis.url, db)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{first} missing_in_redis redis=- ledger=1.500000007 difference=-1.500000007"
    ]


async def test_reconcile_reports_a_ledger_whose_key_total_is_not_its_usage(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    first, _ = await written(half, ledger_redis.url, db)
    async with await psycopg.AsyncConnection.connect(db) as conn:
        await conn.execute("UPDATE virtual_keys SET spent = spent + 1 WHERE id = %s", (first,))
    result = reconcile(ledger_redis.url, db)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{first} spent_column virtual_keys.spent=2.500000007 key_usage=1.500000007 "
        "difference=+1.000000000"
    ]


async def test_reconcile_refuses_while_the_sink_is_behind_unless_told_to_ignore_it(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    first, _ = await written(half, ledger_redis.url, db)
    await half.charge(first, 5)  # not written yet
    behind = reconcile(ledger_redis.url, db)
    assert behind.returncode == 2
    assert "1 stream entries behind" in behind.stderr
    anyway = reconcile(ledger_redis.url, db, "--ignore-lag")
    assert anyway.returncode == 1
    assert anyway.stdout.startswith(f"{first} spend redis=1.500000012 ledger=1.500000007")
