"""The sink's loop: read a batch from the streams, write it in one transaction, commit,
and only then delete and acknowledge it. Either side down: retry the same batch with
backoff; nothing is acknowledged that is not committed (docs/design.md section 12)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from redis.exceptions import ResponseError

from keys.connection import REDIS_ERRORS
from ledger.entries import Entry, Gone
from ledger.metrics import LedgerMetrics
from ledger.streams import Streams
from ledger.writer import Written, write_batch

log = logging.getLogger("extauthz.ledger")

POSTGRES_ERRORS = (psycopg.Error, PoolTimeout, OSError)
FORGET_EVERY_S = 600.0


@dataclass
class Backoff:
    """0.25 s doubling to 5 s, jittered: long enough not to hammer a server that is down,
    short enough that a restart is caught within seconds."""

    first_s: float = 0.25
    max_s: float = 5.0
    _next: float = field(default=0.25, init=False)

    def reset(self) -> None:
        self._next = self.first_s

    async def wait(self, stop: asyncio.Event) -> None:
        delay = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self.max_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


class Sink:
    def __init__(
        self,
        streams: Streams,
        pool: AsyncConnectionPool,
        metrics: LedgerMetrics,
        *,
        rescan_s: float = 5.0,
        lag_every_s: float = 1.0,
    ) -> None:
        self.streams = streams
        self.pool = pool
        self.metrics = metrics
        self.rescan_s = rescan_s
        self.lag_every_s = lag_every_s
        self.backoff = Backoff()
        self._next_scan = 0.0
        self._next_lag = 0.0
        self._next_forget = 0.0
        self._recovering = True

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; a batch read before it is finished first."""
        while not stop.is_set():
            await self.step(stop)

    async def step(self, stop: asyncio.Event) -> int:
        """One batch: read, write, acknowledge. Returns how many entries it settled."""
        try:
            entries = await self._next_batch(stop)
        except REDIS_ERRORS as exc:
            if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                self.streams.known = []  # a stream was deleted or replaced: find them again
                self._next_scan = 0.0
            self._failed("redis", exc)
            await self.backoff.wait(stop)
            return 0
        if not entries:
            return 0
        if await self._settle(entries, stop):
            self.backoff.reset()
            return len(entries)
        return 0

    async def catch_up(self, stop: asyncio.Event | None = None) -> int:
        """Steps until a read finds nothing new and nothing of this consumer is pending
        (tests; a one-shot run). Returns the entries settled."""
        stop = stop or asyncio.Event()
        self._next_scan = 0.0
        total = 0
        while True:
            settled = await self.step(stop)
            total += settled
            if settled == 0 and not self._recovering:
                return total

    async def _next_batch(self, stop: asyncio.Event) -> list[Entry]:
        now = time.monotonic()
        if now >= self._next_scan:
            await self.streams.discover()
            await self.streams.take_over()
            if now >= self._next_forget:
                await self.streams.forget_idle_consumers()
                self._next_forget = now + FORGET_EVERY_S
            self._recovering = True
            self._next_scan = now + self.rescan_s
        await self._refresh_lag()
        if self._recovering:  # what this consumer holds unacknowledged, before new entries
            entries = await self.streams.own()
            if entries:
                return entries
            self._recovering = False
        return await self.streams.read(stop)

    async def _settle(self, entries: Sequence[Entry], stop: asyncio.Event) -> bool:
        """Write, then acknowledge. False if `stop` came while a side was down: the batch
        stays pending (it is read again, and written once)."""
        to_write = [e for e in entries if not isinstance(e, Gone)]
        while True:
            try:
                written = await self._write(to_write) if to_write else Written()
                break
            except REDIS_ERRORS as exc:  # reading a key's record for its first charge
                self._failed("redis", exc)
            except POSTGRES_ERRORS as exc:
                self._failed("postgres", exc)
            if stop.is_set():
                return False
            # the batch waits; what arrives behind it must still show in the gauge
            with contextlib.suppress(*REDIS_ERRORS):
                await self._refresh_lag()
            await self.backoff.wait(stop)
        self.metrics.count(written)
        if written.rejects:
            log.error(
                "unreadable stream entries kept in ledger_rejects", extra={"count": written.rejects}
            )
        while True:
            try:
                await self.streams.done(e.ref for e in entries)
                break
            except REDIS_ERRORS as exc:
                self._failed("redis", exc)
            if stop.is_set():
                return False
            await self.backoff.wait(stop)
        log.debug(
            "batch written",
            extra={
                "entries": len(entries),
                "charges": written.charges,
                "charges_duplicate": written.charges_duplicate,
                "events": written.events,
            },
        )
        return True

    async def _refresh_lag(self) -> None:
        """The lag gauge, at most every `lag_every_s`: between batches, and on each retry
        of a batch PostgreSQL refuses, so that an outage (when the gauge matters, and the
        sink spends all its time retrying one batch) does not freeze it at the value it had
        before."""
        now = time.monotonic()
        if now >= self._next_lag:
            self.metrics.lag.set(await self.streams.lag(self.streams.known))
            self._next_lag = now + self.lag_every_s

    async def _write(self, entries: Sequence[Entry]) -> Written:
        async with self.pool.connection() as conn:
            return await write_batch(conn, entries, self.streams.record)

    def _failed(self, kind: str, exc: BaseException) -> None:
        self.metrics.errors.labels(kind).inc()
        message = str(exc).strip().splitlines()
        log.warning(
            f"{kind} unavailable, retrying",
            extra={"error": type(exc).__name__, "detail": message[0][:300] if message else ""},
        )
