"""Charges the usage journal (keys/journal.py) once Redis answers again, with the journals
of stopped processes that shared its directory."""

from __future__ import annotations

import asyncio
import logging

from extauthz.health import RedisWatch
from extauthz.metrics import Metrics
from keys.errors import StoreUnavailable
from keys.journal import UsageJournal
from keys.store import KeyStore

log = logging.getLogger("extauthz.replay")


async def replay_forever(
    journal: UsageJournal,
    store: KeyStore,
    watch: RedisWatch,
    metrics: Metrics,
    interval_s: float = 1.0,
) -> None:
    while True:
        if watch.redis_ok:
            try:  # journals of processes that died, on this host or a shared volume
                await journal.adopt_async()
            except Exception:
                log.exception("adopting stopped processes' journals failed")
        if journal.pending and watch.redis_ok:
            try:
                replayed = await journal.replay(store.report_usage)
            except StoreUnavailable:
                log.warning("journal replay interrupted: redis unreachable again")
            except Exception:  # keep replaying later: the journal keeps what was not charged
                log.exception("journal replay failed")
            else:
                log.info("journal replayed", extra={"reports": replayed})
        metrics.journal_depth.set(journal.pending)
        await asyncio.sleep(interval_s)
