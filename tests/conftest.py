"""Real servers, started once per session: redis-server, the extauthz server, the mock
upstream and Envoy. Tests that break a server start their own."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import psycopg
import pytest

from devstack import processes as p
from devstack.mock_upstream import MockUpstream
from keys.connection import Client, RedisBridge, connect
from keys.store import KeyStore
from tests.helpers import Clients, fetch
from tests.ledger_support import migrated

# Known defaults, so tests can assert what CreateKey fills in.
SERVER_DEFAULTS = {
    "VIRTUAL_KEY_DEFAULT_BUDGET": "25.5",
    "VIRTUAL_KEY_DEFAULT_TPM": "5000",
    "VIRTUAL_KEY_DEFAULT_RPM": "40",
    "VIRTUAL_KEY_MAX_EXPIRES_DAYS": "90",
    "EXTAUTHZ_LOG_LEVEL": "DEBUG",
    "EXTAUTHZ_DRAIN_SECONDS": "0",
}


class ManualClock:
    """Milliseconds that the test moves by hand; passed to KeyStore as its clock."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = p.RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


MACHINE_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _accepts(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL the tests may create databases in: the machine's (127.0.0.1:5432, trust,
    user postgres) where it runs one, else one of our own for the session."""
    if p.port_open(5432) and _accepts(MACHINE_POSTGRES):
        yield MACHINE_POSTGRES
        return
    server = p.PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    yield server.url
    server.remove()


def create_database(admin_url: str) -> tuple[str, str]:
    """A new, empty database with a random name: (name, its postgresql:// URL; the server
    and the sink take LEDGER_DATABASE_URL only in that form, not as key=value conninfo)."""
    name = f"ledger_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    return name, urlsplit(admin_url)._replace(path=f"/{name}").geturl()


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


@pytest.fixture
def ledger_db(postgres_admin_url: str) -> Iterator[str]:
    """The URL of an empty database of this test's own, dropped after it."""
    name, url = create_database(postgres_admin_url)
    yield url
    drop_database(postgres_admin_url, name)


@pytest.fixture
def ledger_redis(tmp_path: Path) -> Iterator[p.RedisServer]:
    """A redis-server of this test's own: the ledger's streams and its key scan see every
    key, so no other test's may be there."""
    server = p.RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
async def redis(ledger_redis: p.RedisServer) -> AsyncIterator[Client]:
    """A client of this test's own Redis (the ledger tests')."""
    client = connect(ledger_redis.url, timeout_s=5)
    yield client
    await client.aclose()


@pytest.fixture
async def db(ledger_db: str) -> str:
    """This test's own ledger database, migrated."""
    await migrated(ledger_db)
    return ledger_db


Server = p.Extauthz


def start_server(
    redis_url: str,
    log_dir: Path,
    extra: dict[str, str] | None = None,
    admin_token: str | None = None,
    usage_token: str | None = None,
) -> Server:
    """A server of the tests' own on free ports, with SERVER_DEFAULTS and its own journal."""
    grpc_port = p.free_port()
    return p.start_extauthz(
        redis_url=redis_url,
        log_path=log_dir / f"extauthz-{grpc_port}.log",
        grpc_port=grpc_port,
        admin_token=admin_token,
        usage_token=usage_token,
        extra={
            **SERVER_DEFAULTS,
            "EXTAUTHZ_JOURNAL_DIR": str(log_dir / f"journal-{grpc_port}"),
            **(extra or {}),
        },
    )


@pytest.fixture(scope="session")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(redis_url, tmp_path_factory.mktemp("logs"))
    yield srv
    srv.process.stop()


@pytest.fixture(scope="session")
def clients(server: Server) -> Iterator[Clients]:
    channel = grpc.insecure_channel(server.address)
    yield Clients(channel, server.admin_token, server.usage_token)
    channel.close()


@pytest.fixture(scope="session")
def upstream(server: Server) -> Iterator[MockUpstream]:
    mock = MockUpstream(p.free_port(), server.address, server.usage_token).start()
    yield mock
    mock.stop()


@dataclass
class Envoy:
    port: int
    process: p.Process
    admin_port: int = 0

    def stat(self, name: str) -> int:
        """One counter from Envoy's admin /stats (0 until it first counts)."""
        text = fetch(self.admin_port, "GET", f"/stats?filter=^{name}$").body.decode()
        for line in text.splitlines():
            stat, _, value = line.partition(": ")
            if stat == name:
                return int(value)
        return 0


def start_envoy(
    grpc_port: int,
    upstream_port: int,
    work_dir: Path,
    *,
    tap: bool = True,
    http_port: int | None = None,
) -> Envoy:
    """envoy.yaml on free ports in front of this server and upstream; `http_port` is the
    server's HTTP port, where /ui (the console) goes (none: a port nothing listens on)."""
    ports = {
        "listener": p.free_port(),
        "extauthz": grpc_port,
        "extauthz_http": http_port if http_port is not None else p.free_port(),
        "upstream": upstream_port,
        "admin": p.free_port(),
    }
    config = work_dir / f"envoy-{ports['listener']}.yaml"
    config.write_text(p.render_envoy_config(ports, tap=tap))
    process = p.start_envoy(config, ports["listener"], work_dir / f"envoy-{ports['listener']}.log")
    return Envoy(ports["listener"], process, ports["admin"])


@pytest.fixture(scope="session")
def envoy(
    server: Server, upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Envoy]:
    proxy = start_envoy(
        server.grpc_port,
        upstream.port,
        tmp_path_factory.mktemp("envoy"),
        http_port=server.http_port,
    )
    yield proxy
    proxy.process.stop()


@dataclass
class Nginx:
    port: int
    process: p.Process


def start_nginx(work_dir: Path, extauthz_http_port: int, upstream_port: int) -> Nginx:
    """nginx with deploy/nginx/nginx.conf as shipped, rendered with these ports."""
    ports = {
        "listener": p.free_port(),
        "extauthz_http": extauthz_http_port,
        "upstream": upstream_port,
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "nginx.conf"
    config.write_text(p.render_nginx_config(ports))
    return Nginx(ports["listener"], p.start_nginx(config, ports["listener"], work_dir))


@pytest.fixture(scope="session")
def nginx(
    server: Server, upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    proxy = start_nginx(tmp_path_factory.mktemp("nginx"), server.http_port, upstream.port)
    yield proxy
    proxy.process.stop()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1_800_000_000_000)


@pytest.fixture(params=["redis-py", "pipelined"])
async def store(
    redis_url: str, clock: ManualClock, request: pytest.FixtureRequest
) -> AsyncIterator[KeyStore]:
    """The store over both of its Redis paths: redis-py for everything, or the pipelined
    connection for the Check and ReportUsage scripts (what the server uses)."""
    redis = RedisBridge.from_url(redis_url, timeout_s=2, transport=request.param)
    yield KeyStore(redis, clock=clock)
    await redis.aclose()
