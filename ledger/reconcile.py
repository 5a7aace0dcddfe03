"""`extauthz ledger reconcile`: each key's lifetime spend in Redis (`spent_total`) against
the ledger's SUM(key_usage.cost), nano-exact. Only meaningful once the sink has caught up,
so it checks the lag first; docs/operations.md says what each difference means."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, TextIO

from psycopg import AsyncConnection

from keys.connection import Client
from ledger.entries import nanos, usd
from ledger.streams import Streams, key_ids, spent_totals

Connection = AsyncConnection[tuple[Any, ...]]

SPEND: Final = "spend"  # Redis and the ledger disagree on a live key
MISSING_IN_REDIS: Final = "missing_in_redis"  # the ledger's key is not deleted, Redis has none
DELETED_IN_LEDGER: Final = "deleted_in_ledger"  # live in Redis, marked deleted in the ledger
SPENT_COLUMN: Final = "spent_column"  # virtual_keys.spent is not the sum of its key_usage


@dataclass(frozen=True, slots=True)
class Difference:
    key_id: str
    kind: str
    redis_nanos: int | None
    ledger_nanos: int
    column_nanos: int = 0

    def line(self) -> str:
        if self.kind == SPENT_COLUMN:
            return (
                f"{self.key_id} {self.kind} virtual_keys.spent={usd(self.column_nanos):f} "
                f"key_usage={usd(self.ledger_nanos):f} "
                f"difference={usd(self.column_nanos - self.ledger_nanos):+f}"
            )
        redis = "-" if self.redis_nanos is None else f"{usd(self.redis_nanos):f}"
        diff = (self.redis_nanos or 0) - self.ledger_nanos
        return (
            f"{self.key_id} {self.kind} redis={redis} ledger={usd(self.ledger_nanos):f} "
            f"difference={usd(diff):+f}"
        )


@dataclass(frozen=True, slots=True)
class LedgerKey:
    status: str
    usage_nanos: int  # SUM(key_usage.cost)
    spent_nanos: int  # virtual_keys.spent


async def ledger_keys(
    conn: Connection, only: Collection[str] | None = None
) -> dict[str, LedgerKey]:
    query = (
        "SELECT v.id, v.status, v.spent, coalesce(u.total, 0) FROM virtual_keys v "
        "LEFT JOIN (SELECT key_id, sum(cost) AS total FROM key_usage GROUP BY key_id) u "
        "ON u.key_id = v.id"
    )
    async with conn.transaction():
        if only is None:
            cur = await conn.execute(query)
        else:
            cur = await conn.execute(query + " WHERE v.id = ANY(%s)", (list(only),))
        rows = await cur.fetchall()
    return {
        str(key_id): LedgerKey(str(status), nanos(Decimal(total)), nanos(Decimal(spent)))
        for key_id, status, spent, total in rows
    }


async def compare(
    client: Client, conn: Connection, only: Collection[str] | None = None
) -> tuple[int, list[Difference]]:
    """(keys compared, differences), for every key or only those named."""
    ids = await key_ids(client) if only is None else sorted(only)
    redis = await spent_totals(client, ids)
    ledger = await ledger_keys(conn, only)
    found: list[Difference] = []
    for key_id in sorted(set(redis) | set(ledger)):
        in_redis = redis.get(key_id)
        row = ledger.get(key_id)
        summed = row.usage_nanos if row else 0
        if row is not None and row.spent_nanos != row.usage_nanos:
            found.append(Difference(key_id, SPENT_COLUMN, in_redis, summed, row.spent_nanos))
        if in_redis is None:
            if row is not None and row.status != "deleted":
                found.append(Difference(key_id, MISSING_IN_REDIS, None, summed))
        elif row is not None and row.status == "deleted":
            found.append(Difference(key_id, DELETED_IN_LEDGER, in_redis, summed))
        elif in_redis != summed:
            found.append(Difference(key_id, SPEND, in_redis, summed))
    return len(set(redis) | set(ledger)), found


async def wait_caught_up(streams: Streams, wait_s: float) -> int:
    """The lag once it is 0, or what it still is after `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        lag = await streams.lag()
        if lag == 0 or time.monotonic() >= deadline:
            return lag
        await asyncio.sleep(0.2)


async def reconcile(
    client: Client,
    conn: Connection,
    *,
    ignore_lag: bool,
    lag_wait_s: float,
    out: TextIO,
    err: TextIO,
) -> int:
    """0: every key agrees; 1: differences (one line each on `out`); 2: the sink is behind."""
    streams = Streams(client, consumer="reconcile")
    if not ignore_lag:
        lag = await wait_caught_up(streams, lag_wait_s)
        if lag:
            print(
                f"the ledger sink is {lag} stream entries behind: run again once "
                "extauthz_ledger_lag is 0, or pass --ignore-lag",
                file=err,
            )
            return 2
    compared, found = await compare(client, conn)
    if found and not ignore_lag:
        # A charge can land between reading Redis and reading the ledger: look at those
        # keys again once the sink has written what came in meanwhile.
        await wait_caught_up(streams, lag_wait_s)
        _, found = await compare(client, conn, only={d.key_id for d in found})
    for difference in found:
        print(difference.line(), file=out)
    print(f"{compared} keys compared, {len(found)} differences", file=err)
    return 1 if found else 0
