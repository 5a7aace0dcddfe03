"""What the ledger tests share: stream entries written as docs/design.md section 12 has the
Lua scripts write them (record hash, `spent_total`, XADD to the key's stream), and a sink
wired to real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import binascii
import json
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import psycopg
from psycopg_pool import AsyncConnectionPool

from keys import keygen
from keys.connection import Client, connect
from keys.keyspace import new_record, record_key
from ledger.metrics import LedgerMetrics
from ledger.migrate import migrate
from ledger.sink import Sink
from ledger.streams import Streams
from tests.helpers import key_spec

NOW_MS = 1_800_000_000_000
SINGLE_STREAM = "ledger:{all}"


def cluster_stream(key_id: str) -> str:
    """The stream of the key's slot on a Redis Cluster: `ledger:{<tag>}`, the tag the first
    of 0, 1, 2, ... that hashes to the key's slot."""
    slot = binascii.crc_hqx(key_id.encode(), 0) % 16384
    n = 0
    while binascii.crc_hqx(str(n).encode(), 0) % 16384 != slot:
        n += 1
    return f"ledger:{{{n}}}"


@dataclass
class RedisHalf:
    """Appends entries as the scripts would, on one Redis (`ledger:{all}`) or a cluster."""

    client: Client
    cluster: bool = False

    def stream(self, key_id: str) -> str:
        return cluster_stream(key_id) if self.cluster else SINGLE_STREAM

    async def create_key(
        self, key_id: str | None = None, *, ts_ms: int = NOW_MS, event: bool = True, **spec: Any
    ) -> str:
        """The record (version 1) and, unless `event` is False (a key older than the
        ledger), its `created` entry."""
        key_id = key_id or keygen.new_key_id()
        digest = secrets.token_hex(32)
        record = {k: str(v) for k, v in new_record(key_spec(**spec), digest, ts_ms).items()}
        record["ver"] = "1"
        record["spent_total"] = "0"
        await self.client.hset(record_key(key_id), mapping=cast(Any, record))
        if event:
            await self.key_event(key_id, "created", ts_ms=ts_ms)
        return key_id

    async def key_event(
        self,
        key_id: str,
        kind: str,
        *,
        ts_ms: int = NOW_MS,
        changes: Mapping[str, str] | None = None,
        version: int | None = None,
    ) -> str:
        """Applies `changes` to the record, bumps its `ver` (or sets `version`) and appends
        the event; a `deleted` event carries the record as it was and removes it."""
        name = record_key(key_id)
        if changes:
            await self.client.hset(name, mapping=cast(Any, dict(changes)))
        if version is None:
            version = int(await self.client.hincrby(name, "ver", 0 if kind == "created" else 1))
        else:
            await self.client.hset(name, "ver", str(version))
        record = await self.client.hgetall(name)
        if kind == "deleted":
            await self.client.delete(name)
        return await self.append(
            key_id,
            type=kind,
            ts=str(ts_ms),
            version=str(version),
            record=json.dumps({k: v for k, v in record.items() if k != "spent_total"}),
        )

    async def charge(
        self,
        key_id: str,
        cost_nanos: int,
        request_id: str | None = None,
        *,
        ts_ms: int = NOW_MS,
        model: str = "gpt-4o",
        prompt: int = 10,
        completion: int = 5,
    ) -> str:
        """A charge: `spent_total` grows and the entry is appended, as one script would."""
        await self.client.hincrby(record_key(key_id), "spent_total", cost_nanos)
        return await self.append(
            key_id,
            type="charge",
            ts=str(ts_ms),
            request_id=request_id or secrets.token_hex(8),
            model=model,
            provider="openai",
            prompt_tokens=str(prompt),
            completion_tokens=str(completion),
            total_tokens=str(prompt + completion),
            cost=str(cost_nanos),
        )

    async def append(self, key_id: str, **fields: str) -> str:
        entry: dict[Any, Any] = {"key_id": key_id, **fields}
        return str(await self.client.xadd(self.stream(key_id), entry))


async def migrated(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await migrate(conn)


@dataclass
class SinkParts:
    sink: Sink
    streams: Streams
    client: Client
    pool: AsyncConnectionPool[Any]
    metrics: LedgerMetrics
    stop: asyncio.Event


@asynccontextmanager
async def running_sink(
    redis_url: str,
    database_url: str,
    *,
    consumer: str = "test-sink",
    batch: int = 100,
    claim_idle_ms: int = 30_000,
) -> AsyncIterator[SinkParts]:
    """A sink in this process (its loop driven by the test), short reads."""
    client = connect(redis_url, timeout_s=5)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url, min_size=1, max_size=2, open=False, timeout=5
    )
    await pool.open()
    streams = Streams(client, consumer, batch=batch, block_ms=50, claim_idle_ms=claim_idle_ms)
    metrics = LedgerMetrics()
    try:
        sink = Sink(streams, pool, metrics, rescan_s=0.2, lag_every_s=0)
        yield SinkParts(sink, streams, client, pool, metrics, asyncio.Event())
    finally:
        await pool.close()
        await client.aclose()


async def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(sql.encode(), params)
        return await cur.fetchall()


def usd(nanos: int) -> Decimal:
    return Decimal(nanos).scaleb(-9)


async def until_lag_zero(streams: Streams, within_s: float = 10) -> bool:
    """Whether every entry is written (and acknowledged) within `within_s` seconds."""
    deadline = asyncio.get_running_loop().time() + within_s
    while await streams.lag() != 0:
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
