"""Wiring: build the store and servicers, serve gRPC and HTTP, stop cleanly on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
import uvloop
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extauthz.admin import KeyService
from extauthz.check import AuthorizationServicer, Decider
from extauthz.health import HealthServicer, RedisWatch
from extauthz.http import HttpEndpoint
from extauthz.logs import configure
from extauthz.metrics import Metrics
from extauthz.replay import replay_forever
from extauthz.settings import Settings, SettingsError
from extauthz.usage import UsageService
from extauthz.workers import run_workers
from keys import store as key_store
from keys.journal import JournalBusy, UsageJournal
from keys.pricing import PriceTable
from keys.v1 import keys_pb2, keys_pb2_grpc

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
    # first: an unusable journal directory stops the start before anything else is built
    journal = (
        UsageJournal(Path(settings.journal_dir), settings.journal_max_bytes)
        if settings.journal_dir
        else None
    )
    prices = PriceTable.load(settings.prices_path) if settings.prices_path else PriceTable.builtin()
    redis = key_store.connect(settings.redis_url, timeout_s=settings.redis_timeout_s)
    pipelined = key_store.connect_pipelined(settings.redis_url, timeout_s=settings.redis_timeout_s)
    store = key_store.KeyStore(
        redis,
        dedup_ttl_s=settings.usage_dedup_ttl_s,
        usage_retention_days=settings.usage_retention_days,
        pipelined=pipelined,
    )
    metrics = Metrics(per_key=settings.metrics_per_key)
    decider = Decider(
        store, metrics, prices, public_paths=settings.public_paths, fail_open=settings.fail_open
    )

    server = grpc.aio.server()
    AuthorizationServicer(decider).add_to_server(server)
    keys_pb2_grpc.add_KeyServiceServicer_to_server(KeyService(store, settings), server)
    keys_pb2_grpc.add_UsageServiceServicer_to_server(
        UsageService(store, settings, prices, metrics, journal), server
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
            keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
            keys_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
            "grpc.health.v1.Health",
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.bind}:{settings.grpc_port}"
    credentials = _credentials(settings)
    if credentials is None:
        grpc_port = server.add_insecure_port(address)
    else:
        grpc_port = server.add_secure_port(address, credentials)

    watch = RedisWatch(store, health_servicer, metrics)
    await watch.start()
    replayer = (
        asyncio.create_task(replay_forever(journal, store, watch, metrics), name="replay")
        if journal is not None
        else None
    )
    http = await HttpEndpoint(metrics, lambda: watch.ready, decider).start(
        settings.bind, settings.http_port
    )
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
    if replayer is not None:
        replayer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await replayer
    if journal is not None:
        journal.close()
    http.close()
    await http.wait_closed()
    await redis.aclose()
    if pipelined is not None:
        await pipelined.aclose()
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extauthz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser(
        "serve", help="run the gRPC and HTTP servers (settings from the environment)"
    )
    serve_cmd.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("EXTAUTHZ_WORKERS", "1")),
        help="server processes sharing the ports (EXTAUTHZ_WORKERS, default 1)",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("extauthz: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1 and "EXTAUTHZ_WORKER_INDEX" not in os.environ:
        return run_workers(args.workers)
    configure(settings.log_level)
    try:
        uvloop.run(serve(settings))  # libuv's loop: measurably cheaper per call than asyncio's
    except JournalBusy as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
