"""Wiring: build the stores and servicers, serve gRPC and HTTP, stop cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
from pathlib import Path

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extauthz.admin import KeyService
from extauthz.alerts import AlertDeliverer
from extauthz.budgets import BudgetService
from extauthz.check import AuthorizationServicer
from extauthz.decision import Decider
from extauthz.errors import add_servicer
from extauthz.health import HealthServicer, RedisWatch
from extauthz.http import HttpEndpoint
from extauthz.ledger_history import LedgerHistory
from extauthz.logs import configure
from extauthz.metrics import Metrics
from extauthz.replay import replay_forever
from extauthz.settings import Settings, SettingsError, help_table
from extauthz.tap import UsageTap
from extauthz.usage import UsageService
from extauthz.workers import run_workers
from keys.budgets import BudgetStore
from keys.connection import RedisBridge, redacted
from keys.journal import JournalUnusable, UsageJournal
from keys.pricing import PriceTable
from keys.store import KeyStore
from keys.v1 import keys_pb2

log = logging.getLogger("extauthz")
SHUTDOWN_GRACE_S = 5.0


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not (settings.tls_cert and settings.tls_key):
        return None
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def serve(settings: Settings) -> None:
    if not settings.reuse_port:  # said first, before gRPC or the log say anything else
        for name, port in (("gRPC", settings.grpc_port), ("HTTP", settings.http_port)):
            if _taken(settings.bind, port):
                raise PortInUse(
                    f"{name} port {settings.bind}:{port} is in use (EXTAUTHZ_{name.upper()}_PORT)"
                )
    # first: an unusable journal directory stops the start before anything else is built
    journal = (
        UsageJournal(Path(settings.journal_dir), settings.journal_max_bytes)
        if settings.journal_dir
        else None
    )
    prices = PriceTable.load(settings.prices_path) if settings.prices_path else PriceTable.builtin()
    # GetUsage past Redis's retention reads the ledger (connects on first use only)
    history = LedgerHistory(settings.ledger_database_url) if settings.ledger_database_url else None
    redis = RedisBridge.from_url(settings.redis_url, timeout_s=settings.redis_timeout_s)
    store = KeyStore(
        redis,
        dedup_ttl_s=settings.usage_dedup_ttl_s,
        usage_retention_days=settings.usage_retention_days,
        budget_mode=settings.budget_mode,
        reservation_ttl_s=settings.reservation_ttl_s,
        ledger=bool(settings.ledger_database_url),  # a sink copies the streams out
        # budget alerts are recorded only where something delivers them
        alert_thresholds=settings.alert_thresholds if settings.alert_webhook_url else (),
    )
    metrics = Metrics(per_key=settings.metrics_per_key)
    decider = Decider(
        store,
        metrics,
        prices,
        public_paths=settings.public_paths,
        fail_open=settings.fail_open,
        reserve_output_tokens=settings.reserve_output_tokens,
        min_clamped_tokens=settings.min_clamped_tokens if settings.clamp_max_tokens else 0,
    )

    # gRPC sets SO_REUSEPORT by default, which lets a stray second server on the same
    # port take half the traffic; only --workers (EXTAUTHZ_REUSE_PORT) shares a port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if settings.reuse_port else 0)])
    AuthorizationServicer(decider).add_to_server(server)
    tap = UsageTap(store, prices, metrics, journal)  # Envoy calls it only where configured
    tap.register(server)
    add_servicer(
        server, keys_pb2.DESCRIPTOR.services_by_name["KeyService"], KeyService(store, settings)
    )
    add_servicer(
        server,
        keys_pb2.DESCRIPTOR.services_by_name["UsageService"],
        UsageService(store, settings, prices, metrics, journal, history),
    )
    add_servicer(
        server,
        keys_pb2.DESCRIPTOR.services_by_name["BudgetService"],
        BudgetService(BudgetStore(redis), settings),
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
            keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
            keys_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
            keys_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
            "grpc.health.v1.Health",
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.bind}:{settings.grpc_port}"
    credentials = _credentials(settings)
    try:
        if credentials is None:
            grpc_port = server.add_insecure_port(address)
        else:
            grpc_port = server.add_secure_port(address, credentials)
    except RuntimeError:
        raise PortInUse(f"gRPC port {address} is in use (EXTAUTHZ_GRPC_PORT)") from None

    watch = RedisWatch(store, health_servicer, metrics, address=redacted(settings.redis_url))
    await watch.start()
    replayer = (
        asyncio.create_task(replay_forever(journal, store, watch, metrics), name="replay")
        if journal is not None
        else None
    )
    alerts = (
        AlertDeliverer(
            redis.client,
            cluster=redis.cluster,
            url=settings.alert_webhook_url,
            secret=settings.alert_secret,
            metrics=metrics,
            retry_base_s=settings.alert_retry_base_s,
            timeout_s=settings.alert_timeout_s,
        )
        if settings.alert_webhook_url
        else None
    )
    if alerts is not None:
        store.on_alert = alerts.notify  # a charge that appended events: read them now
        alerts.start()
    try:
        http = await HttpEndpoint(
            metrics, lambda: watch.ready, decider, uri_header=settings.auth_uri_header
        ).start(settings.bind, settings.http_port, reuse_port=settings.reuse_port)
    except OSError as exc:
        await server.stop(0)
        raise PortInUse(
            f"HTTP port {settings.bind}:{settings.http_port} is in use (EXTAUTHZ_HTTP_PORT)"
            if exc.errno == errno.EADDRINUSE
            else f"HTTP port {settings.bind}:{settings.http_port}: {exc.strerror}"
        ) from None
    await server.start()
    if not settings.admin_token:
        log.warning("EXTAUTHZ_ADMIN_TOKEN is not set: admin calls will be refused")
    log.info(
        "serving",
        extra={
            "grpc_port": grpc_port,
            "http_port": http.sockets[0].getsockname()[1],
            "tls": credentials is not None,
            "redis": watch.redis_ok,
            "fail_open": settings.fail_open,
            "ledger": store.ledger,
            "alerts": alerts is not None,
        },
    )

    received: list[signal.Signals] = []
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()

    # Health goes NOT_SERVING first; on SIGTERM the server keeps answering for the drain
    # period, so Envoy (also draining, in a sidecar pod) and load balancers move away
    # before the port closes. Then in-flight calls get SHUTDOWN_GRACE_S to finish.
    await watch.stop()
    drain = settings.drain_seconds if received[0] is signal.SIGTERM else 0
    log.info("draining", extra={"signal": received[0].name, "drain_seconds": drain})
    await asyncio.sleep(drain)
    await server.stop(SHUTDOWN_GRACE_S)
    await tap.drain()
    if alerts is not None:  # what it has not delivered stays in Redis, for the next server
        await alerts.stop()
    if replayer is not None:
        replayer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await replayer
    if journal is not None:
        journal.close()
    http.close()
    await http.wait_closed()
    await redis.aclose()
    if history is not None:
        await history.close()
    log.info("stopped")


def _taken(host: str, port: int) -> bool:
    """Whether something listens on (host, port) now (port 0 is never taken)."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


class PortInUse(RuntimeError):
    """A port is taken (by a stray second server, say): a one-line error, exit 2."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ledger"]:  # its own process and arguments; psycopg only there
        from ledger.cli import main as ledger_main

        return ledger_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="extauthz",
        description="Envoy ext_authz / nginx auth_request server for virtual LLM API keys.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser(
        "serve",
        help="run the gRPC and HTTP servers (settings from the environment)",
        description="Settings come from these environment variables:\n\n" + help_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_cmd.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes sharing the ports (default: EXTAUTHZ_WORKERS, else 1)",
    )
    sub.add_parser(
        "ledger",
        help="the spend ledger: run | migrate | reconcile (`extauthz ledger --help`)",
        add_help=False,
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    workers = settings.workers if args.workers is None else args.workers
    if workers < 1:
        print("extauthz: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1:
        return run_workers(workers)
    configure(settings.log_level)
    try:
        uvloop.run(serve(settings))  # libuv's loop: measurably cheaper per call than asyncio's
    except (JournalUnusable, PortInUse) as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
