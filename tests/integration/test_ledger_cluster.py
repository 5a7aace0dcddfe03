"""The sink and reconcile on a real Redis Cluster: one stream per slot, found on every
primary, read without a cross-slot command."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from keys import keygen
from keys.connection import Client, connect
from ledger.reconcile import compare
from tests.ledger_support import RedisHalf, migrated, query, running_sink, usd
from tests.redis_cluster import RedisCluster

pytestmark = pytest.mark.integration


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[RedisCluster, Client]]:
    nodes = RedisCluster(tmp_path / "cluster", masters=3).start()
    client = connect(nodes.url, timeout_s=5)
    assert isinstance(client, ClusterClient)
    await client.initialize()  # the slot map, for primary_of
    yield nodes, client
    await client.aclose()
    nodes.stop()


async def primary_of(client: Client, stream: str) -> str:
    assert isinstance(client, ClusterClient)
    node = client.get_node_from_key(stream)
    assert node is not None
    return str(node.name)


async def test_streams_on_every_primary_are_found_and_written(
    cluster: tuple[RedisCluster, Client], ledger_db: str
) -> None:
    nodes, client = cluster
    await migrated(ledger_db)
    half = RedisHalf(client, cluster=True)
    keys: dict[str, str] = {}  # primary -> a key whose stream it holds
    while len(keys) < 3:
        key_id = keygen.new_key_id()
        keys.setdefault(await primary_of(client, half.stream(key_id)), key_id)
    for n, key_id in enumerate(keys.values()):
        await half.create_key(key_id)
        await half.charge(key_id, 1_000 + n, "r1")
        await half.charge(key_id, 2_000 + n, "r2")
    async with running_sink(nodes.url, ledger_db) as parts:
        assert await parts.sink.catch_up() == 9
        assert len(parts.streams.known) == 3
        assert await parts.streams.lag() == 0
        async with await psycopg.AsyncConnection.connect(ledger_db) as conn:
            compared, differences = await compare(client, conn)
    assert (compared, differences) == (3, [])
    for n, key_id in enumerate(keys.values()):
        rows = await query(ledger_db, "SELECT spent FROM virtual_keys WHERE id = %s", (key_id,))
        assert rows == [(usd(3_000 + 2 * n),)]


async def test_a_batch_holds_at_most_batch_entries_however_many_streams_have_some(
    cluster: tuple[RedisCluster, Client], ledger_db: str
) -> None:
    """`--batch` entries per read, not per stream: after an outage nearly every slot's
    stream has a backlog (keys spread over the 16384 slots), and one read of `batch` from
    each of thousands of streams was one batch of millions of entries (memory, one huge
    transaction), read again whole after the OOM kill that followed."""
    nodes, client = cluster
    await migrated(ledger_db)
    half = RedisHalf(client, cluster=True)
    streams: dict[str, str] = {}
    while len(streams) < 30:
        key_id = keygen.new_key_id()
        streams.setdefault(half.stream(key_id), key_id)
    for key_id in streams.values():
        await half.create_key(key_id)
        for n in range(4):
            await half.charge(key_id, 1_000, f"r{n}")
    async with running_sink(nodes.url, ledger_db, batch=20) as parts:
        sizes: list[int] = []
        while sum(sizes) < 150:
            settled = await parts.sink.step(parts.stop)
            assert settled <= 20
            sizes.append(settled)
        assert await parts.sink.catch_up() == 0
        assert await parts.streams.lag() == 0
    assert await query(ledger_db, "SELECT count(*) FROM key_usage") == [(120,)]
