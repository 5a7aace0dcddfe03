"""Entries the sink must write or keep in ledger_rejects, never retry forever or die on:
values PostgreSQL cannot store (NUL, too long, a time past year 9999) and numbers whose
digits alone would take the sink hours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devstack.processes import RedisServer
from keys import keygen, validation
from keys.budget import parse_duration
from keys.connection import Client, RedisBridge
from keys.errors import InvalidArgument
from keys.keyspace import record_key
from keys.model import UsageReport
from keys.store import KeyStore
from tests.conftest import ManualClock
from tests.helpers import key_spec
from tests.ledger_support import (
    NOW_MS,
    SINGLE_STREAM,
    RedisHalf,
    SinkParts,
    query,
    running_sink,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(ledger_redis: RedisServer) -> AsyncIterator[KeyStore]:
    """A store that appends to the ledger, as the server does with LEDGER_DATABASE_URL."""
    bridge = RedisBridge.from_url(ledger_redis.url, timeout_s=2)
    yield KeyStore(bridge, clock=ManualClock(NOW_MS), ledger=True)
    await bridge.aclose()


async def settle(parts: SinkParts, within_s: float = 10) -> None:
    """The sink catches up within `within_s`: a batch it cannot write would be retried for
    good (catch_up never returns), one it cannot read would raise."""
    await asyncio.wait_for(parts.sink.catch_up(), within_s)


def report(key_id: str, request_id: str, *, model: str = "gpt-4o", cost: int = 1000) -> UsageReport:
    return UsageReport(key_id, request_id, model, "tap", 10, 5, 15, cost, family="")


async def new_key(store: KeyStore, **spec: Any) -> str:
    full, _ = await store.create(key_spec(**spec), "sk-mp")
    parsed = keygen.parse_key(full)
    assert parsed is not None
    return parsed.key_id


async def test_a_model_name_with_nul_is_written_not_retried_forever(
    ledger_redis: RedisServer, store: KeyStore, db: str
) -> None:
    """The usage tap charges the model a request body named (extauthz/request.py accepts
    any name without a newline, `"gpt-4o\\u0000"` included, where a `default` price prices
    it); PostgreSQL text takes no NUL, so the batch failed on every retry and held every
    later entry of the stream (on one Redis: every key's) back."""
    key = await new_key(store)
    await store.report_usage(report(key, "r1", model="gpt-4o\x00x"))
    await store.report_usage(report(key, "r2"))
    async with running_sink(ledger_redis.url, db) as parts:
        await settle(parts)
    rows = await query(db, "SELECT request_id, model FROM key_usage ORDER BY request_id")
    assert rows == [("r1", "gpt-4o\ufffdx"), ("r2", "gpt-4o")]


async def test_a_metadata_value_with_nul_is_written_not_retried_forever(
    ledger_redis: RedisServer, store: KeyStore, db: str
) -> None:
    """CreateKey checks metadata keys for control characters, not values: `\\u0000` in a
    value reaches the record, and virtual_keys.metadata (JSONB) refuses it."""
    metadata = validation.metadata({"note": "a\x00b"})
    key = await new_key(store, metadata=metadata)
    await store.report_usage(report(key, "r1"))
    async with running_sink(ledger_redis.url, db) as parts:
        await settle(parts)
    assert await query(db, "SELECT metadata FROM virtual_keys") == [({"note": "a\ufffdb"},)]
    assert await query(db, "SELECT request_id FROM key_usage") == [("r1",)]
    assert len(await query(db, "SELECT 1 FROM key_events")) == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"model": "m" * 257}, "model is longer than 256 characters"),
        ({"provider": "p" * 129}, "provider is longer than 128 characters"),
        ({"request_id": "r" * 257}, "request_id is longer than 256 characters"),
        ({"ts": str(10**17)}, "ts is out of range"),
        ({"cost": "1e999999999"}, "cost is out of range"),
        ({"prompt_tokens": "9" * 5000}, "prompt_tokens is out of range"),
        ({"key_id": "bad\x00id"}, "key_id is not a key id"),
    ],
)
async def test_a_charge_no_column_takes_is_kept_as_a_reject_and_the_stream_goes_on(
    ledger_redis: RedisServer, redis: Client, db: str, fields: dict[str, str], reason: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(name="a")
    charge = {
        "type": "charge",
        "ts": str(NOW_MS),
        "request_id": "odd",
        "model": "gpt-4o",
        "provider": "openai",
        "prompt_tokens": "1",
        "completion_tokens": "1",
        "total_tokens": "2",
        "cost": "7",
        **fields,
    }
    entry: dict[Any, Any] = {"key_id": key, **charge}
    await redis.xadd(SINGLE_STREAM, entry)
    await half.charge(key, 5, "after")
    async with running_sink(ledger_redis.url, db) as parts:
        await settle(parts)
    assert await query(db, "SELECT request_id FROM key_usage") == [("after",)]
    assert await query(db, "SELECT reason FROM ledger_rejects") == [(reason,)]
    assert await redis.xlen(SINGLE_STREAM) == 0


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"created_at": str(10**15)}, "created_at is out of range"),
        ({"expires_at": "1e999999999"}, "expires_at is out of range"),
        ({"name": "n" * 257}, "record.name is longer than 256 characters"),
    ],
)
async def test_a_key_event_no_column_takes_is_kept_as_a_reject(
    ledger_redis: RedisServer, redis: Client, db: str, changes: dict[str, str], reason: str
) -> None:
    half = RedisHalf(redis)
    key = await half.create_key(name="a")
    await half.key_event(key, "updated", changes=changes)
    fixed = {"name": "b", "created_at": "0", "expires_at": "0"}
    await half.key_event(key, "updated", changes=fixed)
    async with running_sink(ledger_redis.url, db) as parts:
        await settle(parts)
    assert await query(db, "SELECT name, version FROM virtual_keys") == [("b", 3)]
    assert await query(db, "SELECT reason FROM ledger_rejects") == [(reason,)]


async def test_a_charge_past_the_lifetime_counter_is_refused_whole(
    store: KeyStore, redis: Client
) -> None:
    """report_usage.lua refused a charge that would overflow the period's `spent`, but
    not the lifetime `spent_total` a budget period never resets: HINCRBY failed after the
    request id's marker and `spent` were written, so the charge counted in the budget,
    never reached the stream or `spent_total`, and its retry was a duplicate."""
    key = await new_key(store, budget=parse_duration("1d"))
    await redis.hset(record_key(key), "spent_total", str(2**63 - 10**11))
    before = await redis.hgetall(record_key(key))
    with pytest.raises(InvalidArgument, match="overflow"):
        await store.report_usage(report(key, "r1", cost=10**12))
    after = await redis.hgetall(record_key(key))
    assert (after["spent"], after["spent_total"]) == (before["spent"], before["spent_total"])
    assert await redis.xlen(SINGLE_STREAM) == 1  # the key's `created` only
    # refused before the request id is used
    assert await redis.exists(f"{record_key(key)}:req:r1") == 0
