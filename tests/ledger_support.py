"""What the ledger tests share: stream entries written as docs/design.md section 12 has the
Lua scripts write them (record hash, `spent_total`, XADD to the key's stream), a sink
wired to real Redis and PostgreSQL in this process, and `extauthz ledger` as a process
(the sink, migrate, reconcile)."""

from __future__ import annotations

import asyncio
import binascii
import json
import os
import secrets
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import psycopg
from psycopg_pool import AsyncConnectionPool

from devstack.processes import Process, executable, free_port, spawn, wait_log
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


STARTED = '"msg": "ledger sink started"'


def ledger_env(redis_url: str, database_url: str) -> dict[str, str]:
    """Our environment without LEDGER_* and REDIS_* settings, then these two."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEDGER_", "REDIS_"))}
    return env | {"REDIS_URL": redis_url, "LEDGER_DATABASE_URL": database_url}


def ledger_command(
    redis_url: str, database_url: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """`extauthz ledger <args>` (migrate, reconcile) run to its end."""
    return subprocess.run(
        [executable("extauthz"), "ledger", *args],
        env=ledger_env(redis_url, database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def reconcile(
    redis_url: str, database_url: str, *args: str, lag_wait_s: float = 0.5
) -> subprocess.CompletedProcess[str]:
    """`extauthz ledger reconcile`, as an operator runs it."""
    return ledger_command(
        redis_url, database_url, "reconcile", "--lag-wait-seconds", str(lag_wait_s), *args
    )


def start_sink(
    redis_url: str,
    database_url: str,
    log_path: Path,
    *args: str,
    consumer: str | None = None,
    metrics_port: int | None = None,
) -> tuple[Process, int]:
    """`extauthz ledger run` as a process of its own (short blocking reads), returned once it
    logs that it started; (the process, its metrics port)."""
    port = metrics_port or free_port()
    env = ledger_env(redis_url, database_url)
    env |= {"LEDGER_METRICS_PORT": str(port), "EXTAUTHZ_LOG_LEVEL": "INFO"}
    if consumer:
        env["LEDGER_CONSUMER"] = consumer
    before = log_path.stat().st_size if log_path.exists() else 0
    process = spawn(
        [executable("extauthz"), "ledger", "run", "--block-ms", "100", *args], log_path, env
    )
    wait_log(process, STARTED, offset=before)
    return process, port


def usage_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM key_usage").fetchone()
    return int(row[0]) if row else 0


def key_totals(url: str, key_id: str) -> tuple[Decimal, int, Decimal]:
    """virtual_keys.spent, total_requests, and the sum of its key_usage."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT spent, total_requests, (SELECT sum(cost) FROM key_usage WHERE key_id = %s) "
            "FROM virtual_keys WHERE id = %s",
            (key_id, key_id),
        ).fetchone()
    assert row is not None
    return Decimal(row[0]), int(row[1]), Decimal(row[2])


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0
