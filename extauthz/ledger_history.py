"""Usage older than Redis keeps, read from the spend ledger (GetUsage over a range longer
than EXTAUTHZ_USAGE_RETENTION_DAYS, when LEDGER_DATABASE_URL is set).

Redis answers the days it keeps (exact up to the last charge); the ledger answers the
days before them, which the sink wrote long ago. The pool opens on the first such call:
a server whose clients never ask that far back never connects to PostgreSQL, and the hot
path never does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Final

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from keys.errors import StoreUnavailable
from keys.model import UsageRow

log = logging.getLogger("extauthz.ledger_history")
MAX_DAYS: Final = 3650  # what GetUsage may ask for with a ledger (ten years)
_NANOS: Final = Decimal(10**9)

_ROWS: Final = """
SELECT to_char((timestamp AT TIME ZONE 'UTC')::date, 'YYYY-MM-DD') AS day, model,
       count(*), sum(prompt_tokens), sum(completion_tokens), sum(cost)
  FROM key_usage
 WHERE key_id = ANY(%s) AND timestamp >= %s AND timestamp < %s
 GROUP BY 1, 2
 ORDER BY 1, 2
"""


class LedgerHistory:
    def __init__(self, url: str) -> None:
        self._pool = AsyncConnectionPool(url, min_size=0, max_size=4, open=False, timeout=5)
        self._opened = False

    async def rows(self, key_ids: Sequence[str], first: date, last: date) -> list[UsageRow]:
        """Per UTC day and model, `first` to `last` included, summed over `key_ids`."""
        start = datetime.combine(first, time(), UTC)
        end = datetime.combine(last + timedelta(days=1), time(), UTC)
        try:
            if not self._opened:
                await self._pool.open(wait=False)
                self._opened = True
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_ROWS, (list(key_ids), start, end))
                found = await cursor.fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("ledger unreachable", extra={"error": type(exc).__name__})
            raise StoreUnavailable(
                "the spend ledger (LEDGER_DATABASE_URL) is unreachable"
            ) from None
        return [
            UsageRow(
                date=day,
                model=model,
                requests=int(requests),
                prompt_tokens=int(prompt or 0),
                completion_tokens=int(completion or 0),
                cost_nanos=int(Decimal(cost or 0) * _NANOS),
            )
            for day, model, requests, prompt, completion, cost in found
        ]

    async def close(self) -> None:
        if self._opened:
            await self._pool.close()
