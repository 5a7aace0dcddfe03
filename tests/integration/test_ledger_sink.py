"""The sink in-process on a real Redis and a real PostgreSQL: every charge and key event
written once, replays (a batch delivered twice, a sink killed between commit and ack, a
dead consumer's entries claimed) writing nothing twice."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from devstack.processes import RedisServer
from keys.connection import Client
from keys.keyspace import record_key
from ledger.entries import Entry
from ledger.streams import GROUP, Streams
from ledger.writer import write_batch
from tests.ledger_support import (
    NOW_MS,
    SINGLE_STREAM,
    RedisHalf,
    query,
    running_sink,
    usd,
)

pytestmark = pytest.mark.integration


async def read_once(streams: Streams) -> list[Entry]:
    """What a sink would read next, delivered to it and left unacknowledged."""
    return await streams.read(asyncio.Event())


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def usage_of(db: str, key_id: str) -> list[tuple[str, Decimal]]:
    rows = await query(
        db, "SELECT request_id, cost FROM key_usage WHERE key_id = %s ORDER BY id", (key_id,)
    )
    return [(str(r), Decimal(c)) for r, c in rows]


async def key_of(db: str, key_id: str) -> dict[str, object]:
    rows = await query(
        db,
        "SELECT status, name, spent, total_requests, last_used, version, deleted_at, is_active, "
        "key_hash, max_budget, allowed_models FROM virtual_keys WHERE id = %s",
        (key_id,),
    )
    names: tuple[str, ...] = ("status", "name", "spent", "total_requests", "last_used", "version")
    names += ("deleted_at", "is_active", "key_hash", "max_budget", "allowed_models")
    return dict(zip(names, rows[0], strict=True)) if rows else {}


async def test_charges_are_written_once_and_sum_into_the_key(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(name="team-a", max_budget_nanos=5_000_000_000)
    await half.charge(key, 1_000_000_001, "r1", ts_ms=NOW_MS + 1000)
    await half.charge(key, 2, "r2", ts_ms=NOW_MS + 3000)
    await half.charge(key, 300_000_000, "r3", ts_ms=NOW_MS + 2000, prompt=7, completion=9)
    async with running_sink(ledger_redis.url, db) as parts:
        assert await parts.sink.catch_up() == 4
        assert parts.metrics.rows.labels("key_usage")._value.get() == 3
    assert await usage_of(db, key) == [
        ("r1", Decimal("1.000000001")),
        ("r2", Decimal("0.000000002")),
        ("r3", Decimal("0.300000000")),
    ]
    row = await key_of(db, key)
    assert row["spent"] == Decimal("1.300000003")
    assert row["total_requests"] == 3
    assert row["last_used"] == at(NOW_MS + 3000)
    assert row["max_budget"] == Decimal("5.000000000")
    tokens = await query(
        db,
        "SELECT tokens, prompt_tokens, completion_tokens, model, provider FROM key_usage "
        "WHERE request_id = 'r3'",
    )
    assert tokens == [(16, 7, 9, "gpt-4o", "openai")]
    # written entries leave the stream and the group's pending list
    assert await redis.xlen(SINGLE_STREAM) == 0
    assert (await redis.xpending(SINGLE_STREAM, GROUP))["pending"] == 0


async def test_key_events_record_every_version_and_the_row_shows_the_newest(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(name="first")
    await half.key_event(key, "updated", changes={"name": "second", "models": "\ngpt-4o\n"})
    await half.key_event(key, "rotated", changes={"hash": "cd" * 32})
    await half.key_event(key, "revoked", changes={"status": "revoked"})
    async with running_sink(ledger_redis.url, db) as parts:
        await parts.sink.catch_up()
    row = await key_of(db, key)
    assert row["name"] == "second"
    assert row["allowed_models"] == ["gpt-4o"]
    assert row["key_hash"] == "cd" * 32
    assert (row["status"], row["is_active"], row["version"]) == ("revoked", False, 4)
    events = await query(
        db,
        "SELECT version, type, record->>'name' FROM key_events WHERE key_id = %s ORDER BY 1",
        (key,),
    )
    assert events == [
        (1, "created", "first"),
        (2, "updated", "second"),
        (3, "rotated", "second"),
        (4, "revoked", "second"),
    ]


async def test_a_deleted_key_keeps_its_row_and_usage_marked_deleted(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(name="short-lived")
    await half.charge(key, 42, "r1")
    await half.key_event(key, "deleted", ts_ms=NOW_MS + 5000)
    async with running_sink(ledger_redis.url, db) as parts:
        await parts.sink.catch_up()
    row = await key_of(db, key)
    assert (row["status"], row["is_active"], row["name"]) == ("deleted", False, "short-lived")
    assert row["deleted_at"] == at(NOW_MS + 5000)
    assert await usage_of(db, key) == [("r1", Decimal("0.000000042"))]


async def test_an_older_version_arriving_late_does_not_roll_the_key_back(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(name="v1")
    await half.key_event(key, "updated", changes={"name": "v3"}, version=3)
    await half.key_event(key, "updated", changes={"name": "v2"}, version=2)
    async with running_sink(ledger_redis.url, db) as parts:
        await parts.sink.catch_up()
    row = await key_of(db, key)
    assert (row["name"], row["version"]) == ("v3", 3)
    count = await query(db, "SELECT count(*) FROM key_events WHERE key_id = %s", (key,))
    assert count == [(3,)]


async def test_a_batch_written_twice_inserts_and_adds_nothing_the_second_time(
    redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    await half.charge(key, 500, "r1")
    await half.charge(key, 700, "r2")
    streams = Streams(redis, "reader")
    await streams.discover()
    entries = await read_once(streams)
    async with await psycopg.AsyncConnection.connect(db) as conn:
        first = await write_batch(conn, entries, streams.record)
        second = await write_batch(conn, entries, streams.record)
    assert (first.charges, first.events) == (2, 1)
    assert (second.charges, second.charges_duplicate, second.events) == (0, 2, 0)
    row = await key_of(db, key)
    assert (row["spent"], row["total_requests"]) == (usd(1200), 2)
    assert len(await usage_of(db, key)) == 2


async def test_a_sink_killed_between_commit_and_ack_writes_nothing_twice_when_restarted(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    for n in range(5):
        await half.charge(key, 1_000 + n, f"r{n}")
    # the first life: read and committed, then killed before XDEL/XACK
    streams = Streams(redis, "sink-1")
    await streams.discover()
    entries = await read_once(streams)
    async with await psycopg.AsyncConnection.connect(db) as conn:
        await write_batch(conn, entries, streams.record)
    await half.charge(key, 9_000, "r-after")
    # the second life, under the same consumer name: its pending entries first
    async with running_sink(ledger_redis.url, db, consumer="sink-1") as parts:
        assert await parts.sink.catch_up() == 7
        assert parts.metrics.duplicates.labels("key_usage")._value.get() == 5
        assert parts.metrics.rows.labels("key_usage")._value.get() == 1
    row = await key_of(db, key)
    assert (row["spent"], row["total_requests"]) == (usd(5 * 1_000 + 10 + 9_000), 6)
    assert await redis.xlen(SINGLE_STREAM) == 0


async def test_a_dead_consumers_entries_are_claimed_once_idle_and_not_before(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    await half.charge(key, 11, "r1")
    dead = Streams(redis, "dead-sink")
    await dead.discover()
    assert len(await read_once(dead)) == 2  # delivered, never written
    async with running_sink(ledger_redis.url, db, consumer="live", claim_idle_ms=60_000) as parts:
        await parts.sink.catch_up()
        assert await parts.streams.lag() == 2  # held by a consumer that may still be alive
    assert await usage_of(db, key) == []
    async with running_sink(ledger_redis.url, db, consumer="live", claim_idle_ms=0) as parts:
        assert await parts.sink.catch_up() == 2
        assert await parts.streams.lag() == 0
    assert await usage_of(db, key) == [("r1", Decimal("0.000000011"))]


async def test_a_charge_for_a_key_older_than_the_ledger_copies_its_record_from_redis(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(event=False, name="legacy", user_id="u-old")
    await redis.hset(record_key(key), "ver", "7")
    await half.charge(key, 5, "r1")
    async with running_sink(ledger_redis.url, db) as parts:
        await parts.sink.catch_up()
        assert parts.metrics.rows.labels("virtual_keys")._value.get() == 1
    row = await key_of(db, key)
    assert (row["name"], row["status"], row["version"], row["spent"]) == (
        "legacy",
        "active",
        7,
        usd(5),
    )
    assert row["key_hash"] == await redis.hget(record_key(key), "hash")


async def test_a_charge_for_a_key_already_deleted_gets_a_stub_its_deleted_event_fills(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(event=False, name="gone")
    await half.charge(key, 5, "r1")
    await half.key_event(key, "deleted", ts_ms=NOW_MS + 10)
    async with running_sink(ledger_redis.url, db, batch=1) as parts:
        await parts.streams.discover()
        assert await parts.sink.step(parts.stop) == 1  # the charge alone: no record left
        stub = await key_of(db, key)
        assert (stub["status"], stub["key_hash"], stub["spent"]) == ("deleted", None, usd(5))
        await parts.sink.catch_up()
    row = await key_of(db, key)
    assert (row["status"], row["name"], row["deleted_at"]) == ("deleted", "gone", at(NOW_MS + 10))
    assert row["spent"] == usd(5)


async def test_an_unreadable_entry_is_kept_in_ledger_rejects_and_the_others_written(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    fields = {"ts": str(NOW_MS), "request_id": "r0", "model": "m", "provider": "p"}
    fields |= {"prompt_tokens": "1", "completion_tokens": "1", "total_tokens": "2"}
    bad = await half.append(key, type="charge", cost="1.5", **fields)  # USD, not nano-USD
    await half.charge(key, 3, "r1")
    async with running_sink(ledger_redis.url, db) as parts:
        await parts.sink.catch_up()
        assert parts.metrics.errors.labels("malformed")._value.get() == 1
    rejects = await query(db, "SELECT entry_id, reason, fields->>'request_id' FROM ledger_rejects")
    assert rejects == [(bad, "cost is not a whole number", "r0")]
    assert await usage_of(db, key) == [("r1", Decimal("0.000000003"))]
    assert await redis.xlen(SINGLE_STREAM) == 0


async def test_a_pending_entry_whose_content_was_deleted_is_acknowledged(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    streams = Streams(redis, "sink-1")
    await streams.discover()
    entries = await read_once(streams)
    # killed after XDEL, before XACK
    await redis.xdel(SINGLE_STREAM, *(e.ref.entry_id for e in entries))
    async with running_sink(ledger_redis.url, db, consumer="sink-1") as parts:
        await parts.sink.catch_up()
        assert await parts.streams.lag() == 0
    assert await key_of(db, key) == {}


async def test_lag_counts_entries_read_or_not_until_they_are_written(
    ledger_redis: RedisServer, redis: Client, db: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key()
    for n in range(3):
        await half.charge(key, 1, f"r{n}")
    streams = Streams(redis, "other")
    assert await streams.lag() == 4  # no group yet: every entry
    await streams.discover()
    await streams.client.xreadgroup(GROUP, "other", {SINGLE_STREAM: ">"}, count=1)
    assert await streams.lag() == 4  # one pending, three undelivered
    async with running_sink(ledger_redis.url, db, consumer="other") as parts:
        await parts.sink.catch_up()
        await parts.sink.step(parts.stop)  # the next pass refreshes the gauge
        assert parts.metrics.lag._value.get() == 0
    assert await streams.lag() == 0
