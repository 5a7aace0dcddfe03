"""`extauthz ledger [run | migrate | reconcile]`: the sink, the schema, the comparison.
`extauthz` hands every argument after `ledger` to `main` here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import uvloop
from prometheus_client import start_http_server
from psycopg_pool import AsyncConnectionPool

from extauthz.logs import configure
from extauthz.settings import SettingsError, help_table
from keys.connection import REDIS_ERRORS, Client, connect, redacted
from ledger import migrate as migrations
from ledger.metrics import LedgerMetrics
from ledger.reconcile import reconcile
from ledger.settings import VARIABLES, LedgerSettings, database_label
from ledger.sink import Backoff, Sink
from ledger.streams import Streams

log = logging.getLogger("extauthz.ledger")
COMMANDS = ("run", "migrate", "reconcile")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="extauthz ledger",
        description="The spend ledger: copies charges and key changes from Redis into "
        "PostgreSQL. Without a command: run. Settings come from these environment "
        "variables:\n\n" + help_table(VARIABLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="copy the streams into PostgreSQL until SIGTERM")
    run.add_argument("--batch", type=int, default=500, help="entries per read (default 500)")
    run.add_argument("--block-ms", type=int, default=1000, help="how long a read waits for entries")
    run.add_argument(
        "--claim-idle-seconds",
        type=float,
        default=30.0,
        help="take over entries another consumer has held this long (default 30)",
    )
    run.add_argument(
        "--rescan-seconds", type=float, default=5.0, help="how often to look for new streams"
    )
    sub.add_parser("migrate", help="create or upgrade the schema (idempotent)")
    rec = sub.add_parser(
        "reconcile",
        help="compare each key's spend in Redis with the ledger; exit 1 on a difference",
    )
    rec.add_argument(
        "--ignore-lag", action="store_true", help="compare even while the sink is behind"
    )
    rec.add_argument(
        "--lag-wait-seconds",
        type=float,
        default=10.0,
        help="how long to wait for the sink to catch up first (default 10)",
    )
    return top


def main(argv: list[str]) -> int:
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    args = parser().parse_args(argv)
    try:
        settings = LedgerSettings.from_env()
    except SettingsError as exc:
        print(f"extauthz ledger: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level)
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)
    command = {"run": _run, "migrate": _migrate, "reconcile": _reconcile}[args.command]
    try:
        return uvloop.run(command(settings, args))
    except (psycopg.OperationalError, *REDIS_ERRORS) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"extauthz ledger {args.command}: {first}", file=sys.stderr)
        return 2
    except migrations.MigrationError as exc:
        print(f"extauthz ledger {args.command}: {exc}", file=sys.stderr)
        return 2


def redis_client(settings: LedgerSettings, block_ms: int = 0) -> Client:
    # a blocked XREADGROUP must not count as a Redis that stopped answering
    return connect(settings.redis_url, timeout_s=block_ms / 1000 + 5, max_connections=8)


@asynccontextmanager
async def database(settings: LedgerSettings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await psycopg.AsyncConnection.connect(settings.database_url, connect_timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


async def _migrate(settings: LedgerSettings, args: argparse.Namespace) -> int:
    async with database(settings) as conn:
        applied = await migrations.migrate(conn)
        version = await migrations.schema_version(conn)
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    if not applied:
        print(f"the ledger schema is at version {version}: nothing to apply")
    return 0


async def _reconcile(settings: LedgerSettings, args: argparse.Namespace) -> int:
    client = redis_client(settings)
    try:
        async with database(settings) as conn:
            await migrations.require_current(conn)
            return await reconcile(
                client,
                conn,
                ignore_lag=args.ignore_lag,
                lag_wait_s=args.lag_wait_seconds,
                out=sys.stdout,
                err=sys.stderr,
            )
    finally:
        await client.aclose()


async def _schema_ready(settings: LedgerSettings, stop: asyncio.Event) -> bool:
    """Waits for PostgreSQL (a sink may start first); a schema behind the code is an
    error for the operator (MigrationError), not something to wait out."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            async with database(settings) as conn:
                await migrations.require_current(conn)
            return True
        except psycopg.OperationalError as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            log.warning("postgres unavailable, retrying", extra={"detail": first[:300]})
            await backoff.wait(stop)
    return False


async def _run(settings: LedgerSettings, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not await _schema_ready(settings, stop):
        return 0
    metrics = LedgerMetrics()
    try:
        http, _ = start_http_server(settings.metrics_port, registry=metrics.registry)
    except OSError as exc:
        print(
            f"extauthz ledger: metrics port {settings.metrics_port}: {exc.strerror} "
            "(LEDGER_METRICS_PORT)",
            file=sys.stderr,
        )
        return 2
    client = redis_client(settings, args.block_ms)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url,
        min_size=1,
        max_size=2,
        open=False,
        # A batch waits this long for a connection before it counts an error and backs off.
        timeout=2.0,
        # The pool's own reconnect backs off up to this, then gives the slot up; the next
        # batch asks again at once. So a PostgreSQL that is back is used within seconds.
        reconnect_timeout=5.0,
        check=AsyncConnectionPool.check_connection,
        kwargs={"connect_timeout": 5},
        name="ledger",
    )
    await pool.open(wait=False)
    streams = Streams(
        client,
        settings.consumer,
        batch=args.batch,
        block_ms=args.block_ms,
        claim_idle_ms=int(args.claim_idle_seconds * 1000),
    )
    sink = Sink(streams, pool, metrics, rescan_s=args.rescan_seconds)
    log.info(
        "ledger sink started",
        extra={
            "consumer": settings.consumer,
            "database": database_label(settings.database_url),
            "redis": redacted(settings.redis_url),
            "metrics_port": http.server_port,
        },
    )
    try:
        await sink.run(stop)
    finally:
        await pool.close()
        await client.aclose()
        http.shutdown()
        http.server_close()
    log.info("stopped")
    return 0
