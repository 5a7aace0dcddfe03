"""GetUsage over a range longer than Redis keeps: the days Redis keeps from its rollups, the
days before them from the spend ledger (LEDGER_DATABASE_URL), in one answer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psycopg
import pytest

from devstack import processes as p
from keys.v1 import keys_pb2
from tests.conftest import Server, start_server
from tests.helpers import Clients, bearer
from tests.ledger_support import migrated

pytestmark = pytest.mark.integration
RETENTION = 30


@pytest.fixture
def ledgered(
    ledger_redis: p.RedisServer, ledger_db: str, tmp_path: Path
) -> Iterator[tuple[Clients, str]]:
    """A server that keeps RETENTION days in Redis and has a (migrated) ledger (its Redis
    its own: with a ledger, every charge is appended to a stream there)."""
    asyncio.run(migrated(ledger_db))
    server = start_server(
        ledger_redis.url,
        tmp_path,
        extra={
            "EXTAUTHZ_USAGE_RETENTION_DAYS": str(RETENTION),
            "LEDGER_DATABASE_URL": ledger_db,
        },
    )
    channel = grpc.insecure_channel(server.address)
    yield Clients(channel, server.admin_token, server.usage_token), ledger_db
    channel.close()
    server.process.stop()


def written_long_ago(url: str, key_id: str, days_ago: int, cost: str) -> str:
    """A charge the sink wrote `days_ago` days ago (Redis's rollup of it is long gone)."""
    at = datetime.now(UTC) - timedelta(days=days_ago)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO virtual_keys (id, key_hash, created_at) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (key_id, "0" * 64, at),
        )
        conn.execute(
            "INSERT INTO key_usage (key_id, timestamp, tokens, cost, model, provider, request_id,"
            " prompt_tokens, completion_tokens) VALUES (%s, %s, 30, %s, 'gpt-4', 'lb', %s, 10, 20)",
            (key_id, at, cost, f"old-{days_ago}"),
        )
    return at.date().isoformat()


def usage(clients: Clients, key_id: str, days: int) -> keys_pb2.GetUsageResponse:
    return clients.usage.GetUsage(
        keys_pb2.GetUsageRequest(key_id=key_id, days=days),
        metadata=bearer(clients.admin_token),
        timeout=10,
    )


def test_days_before_redis_retention_come_from_the_ledger(
    ledgered: tuple[Clients, str],
) -> None:
    clients, url = ledgered
    _, data = clients.create_key(max_budget=10)
    old_day = written_long_ago(url, data.id, 200, "1.25")
    clients.report(data.id, "today-1", model="gpt-4", prompt_tokens=5, cost=0.5)
    reply = usage(clients, data.id, 365)
    rows = [(r.date, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in reply.rows]
    today = datetime.now(UTC).date().isoformat()
    assert rows == [(old_day, "gpt-4", 1, 10, 20), (today, "gpt-4", 1, 5, 0)]
    assert reply.totals.cost == pytest.approx(1.75)
    expected_start = datetime.now(UTC).date() - timedelta(days=364)
    assert (reply.start_date, reply.end_date) == (expected_start.isoformat(), today)


def test_a_range_redis_keeps_does_not_read_the_ledger(ledgered: tuple[Clients, str]) -> None:
    clients, url = ledgered
    _, data = clients.create_key(max_budget=10)
    written_long_ago(url, data.id, 200, "1.25")
    assert list(usage(clients, data.id, RETENTION).rows) == []


def test_without_a_ledger_a_range_past_retention_is_refused(
    server: Server, clients: Clients
) -> None:
    _, data = clients.create_key(max_budget=10)
    with pytest.raises(grpc.RpcError) as raised:
        usage(clients, data.id, 3000)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "EXTAUTHZ_USAGE_RETENTION_DAYS" in str(raised.value.details())


def test_an_unreachable_ledger_is_unavailable_not_a_wrong_answer(
    ledger_redis: p.RedisServer, tmp_path: Path
) -> None:
    server = start_server(
        ledger_redis.url,
        tmp_path,
        extra={"LEDGER_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"},
    )
    channel = grpc.insecure_channel(server.address)
    try:
        clients = Clients(channel, server.admin_token, server.usage_token)
        _, data = clients.create_key(max_budget=10)
        with pytest.raises(grpc.RpcError) as raised:
            usage(clients, data.id, 400)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "ledger" in str(raised.value.details())
        assert len(usage(clients, data.id, 30).rows) == 0  # what Redis keeps still answers
    finally:
        channel.close()
        server.process.stop()
