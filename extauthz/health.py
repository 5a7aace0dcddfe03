"""Readiness follows Redis: a watcher pings it and flips gRPC health and /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer as HealthServicer  # = health.aio

from extauthz.metrics import Metrics
from keys.errors import StoreUnavailable
from keys.store import KeyStore

log = logging.getLogger("extauthz.health")
SERVICES = (
    "",
    "envoy.service.auth.v3.Authorization",
    "keys.v1.KeyService",
    "keys.v1.UsageService",
    "keys.v1.BudgetService",
)


class RedisWatch:
    def __init__(
        self,
        store: KeyStore,
        servicer: HealthServicer,
        metrics: Metrics,
        interval_s: float = 1.0,
        address: str = "",
    ) -> None:
        self.store = store
        self.servicer = servicer
        self.metrics = metrics
        self.interval_s = interval_s
        self.address = address  # for the log line; no password (connection.redacted)
        self.redis_ok = False
        self._probed = False
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.redis_ok and not self.stopping

    async def start(self) -> None:
        await self._probe()
        self._task = asyncio.create_task(self._run(), name="redis-watch")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._probe()

    async def _probe(self) -> None:
        ok = await self.store.ping()
        if ok and not self.redis_ok:
            try:  # scripts are gone after a Redis restart: load them before going ready
                await self.store.load_scripts()
            except StoreUnavailable:
                ok = False
        self.metrics.redis_up.set(1 if ok else 0)
        if ok != self.redis_ok or not self._probed:
            # once per change, and once at start whichever it is
            log.log(
                logging.INFO if ok else logging.WARNING,
                "redis reachable" if ok else "redis unreachable; retrying every second",
                extra={"redis": self.address},
            )
        self._probed = True
        self.redis_ok = ok
        await self._publish()

    async def _publish(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICES:
            await self.servicer.set(name, status)

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
