"""`make run` for real (`python -m devstack`) on the integration guide's REDIS_HOST/REDIS_PORT:
its banner, a request through its Envoy, and SIGTERM stopping it all."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import psycopg
import pytest
import redis

from devstack import processes as p
from keys.keyspace import record_key
from tests.helpers import Clients, chat_body, eventually, fetch

pytestmark = pytest.mark.integration

# Envoy's listener and admin, extauthz gRPC, the upstream; the HTTP port is moved (stack_env)
FIXED = {name: port for name, port in p.ENVOY_PORTS.items() if name != "extauthz_http"}
ADMIN = "adm-make-run-test"


@dataclass
class Run:
    """`python -m devstack` with its output collected line by line."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)


@contextlib.contextmanager
def make_run(env: dict[str, str]) -> Iterator[Run]:
    busy = [f"{name}={port}" for name, port in FIXED.items() if p.port_open(port)]
    if busy:
        pytest.skip(f"make run needs its fixed ports, and these are taken: {', '.join(busy)}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack"],
        cwd=p.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    run = Run(proc)
    reader = threading.Thread(target=run.collect, daemon=True)
    reader.start()
    try:
        started = eventually(
            lambda: "logs in .run/" in run.text or proc.poll() is not None, timeout=60
        )
        if proc.poll() is not None and "ports already in use" in run.text:
            pytest.skip(f"another run took make run's ports meanwhile: {run.text}")
        assert started and proc.poll() is None, run.text
        yield run
    finally:
        p.stop(proc)
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def stack_env(redis_host: str, redis_port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "EXTAUTHZ_", "VIRTUAL_KEY_"))
    }
    env.update(
        REDIS_HOST=redis_host,
        REDIS_PORT=str(redis_port),
        EXTAUTHZ_HTTP_PORT=str(p.free_port()),  # the one port make run lets us move
        EXTAUTHZ_ADMIN_TOKEN=ADMIN,
    )
    return env


@pytest.fixture
def on_test_redis(redis_url: str) -> Iterator[tuple[Run, str, int]]:
    parts = urlsplit(redis_url)
    if parts.scheme != "redis" or parts.password or (parts.path or "/0") != "/0":
        pytest.skip("needs a plain redis:// test Redis on database 0")
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    with make_run(stack_env(host, port)) as run:
        yield run, host, port


def test_make_run_names_the_redis_of_redis_host_and_port_in_its_banner(
    on_test_redis: tuple[Run, str, int],
) -> None:
    run, host, port = on_test_redis
    assert "\nready: Envoy on http://127.0.0.1:10000" in run.text
    assert f"Redis: redis://{host}:{port}/0 (named by REDIS_HOST, REDIS_PORT)" in run.text
    assert "cannot be reached" not in run.text


def test_make_run_serves_through_envoy_with_keys_in_the_named_redis(
    on_test_redis: tuple[Run, str, int], redis_url: str
) -> None:
    assert "ready:" in on_test_redis[0].text
    with grpc.insecure_channel(f"127.0.0.1:{FIXED['extauthz']}") as channel:
        key, data = Clients(channel, ADMIN, "").create_key(rpm_limit=5)
    assert redis.Redis.from_url(redis_url).exists(record_key(data.id)) == 1
    reply = fetch(
        FIXED["listener"],
        "POST",
        "/v1/chat/completions",
        {"authorization": f"Bearer {key}", "content-type": "application/json"},
        chat_body(),
    )
    assert reply.status == 200, reply.body


def test_make_run_serves_the_console_through_envoy_from_the_servers_http_port(
    on_test_redis: tuple[Run, str, int],
) -> None:
    """EXTAUTHZ_HTTP_PORT moved: Envoy's /ui route follows it."""
    assert "console: http://127.0.0.1:10000/ui/ (sign in with the admin token)" in (
        on_test_redis[0].text
    )
    page = fetch(FIXED["listener"], "GET", "/ui/")
    assert page.status == 200 and b"extauthz console" in page.body
    assert fetch(FIXED["listener"], "GET", "/ui/health").json()["status"] == "ready"


def test_sigterm_stops_make_run_and_everything_it_started(
    on_test_redis: tuple[Run, str, int],
) -> None:
    run, _, _ = on_test_redis
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=30) == 0
    assert eventually(lambda: "stopped" in run.text)
    assert not [port for port in FIXED.values() if p.port_open(port)]


def test_make_run_says_redis_cannot_be_reached_instead_of_ready_then_when_it_answers(
    tmp_path: Path,
) -> None:
    port = p.free_port()
    with make_run(stack_env("127.0.0.1", port)) as run:
        assert "ready:" not in run.text
        assert run.text.count("cannot be reached") == 1
        assert f"Redis at redis://127.0.0.1:{port}/0 (named by REDIS_HOST, REDIS_PORT)" in run.text
        late = p.RedisServer(tmp_path / "redis", port=port).start()
        try:
            assert eventually(lambda: "answers now: ready" in run.text, timeout=20), run.text
        finally:
            late.stop()


def test_make_run_with_a_ledger_starts_its_sink_and_a_request_lands_in_postgres(
    ledger_redis: p.RedisServer, ledger_db: str
) -> None:
    """No ReportUsage anywhere: the tap charges the mock's answer, the script appends it,
    the sink make run started copies it."""
    env = stack_env("127.0.0.1", ledger_redis.port)
    env.update(LEDGER_DATABASE_URL=ledger_db, LEDGER_METRICS_PORT=str(p.free_port()))
    with make_run(env) as run:
        assert "ledger: writing to" in run.text and "password" not in run.text
        with grpc.insecure_channel(f"127.0.0.1:{FIXED['extauthz']}") as channel:
            key, data = Clients(channel, ADMIN, "").create_key(max_budget=1)
        reply = fetch(
            FIXED["listener"],
            "POST",
            "/v1/chat/completions",
            {"authorization": f"Bearer {key}", "content-type": "application/json"},
            chat_body(),
        )
        assert reply.status == 200, reply.body

        def written() -> int:
            with psycopg.connect(ledger_db) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM key_usage WHERE key_id = %s", (data.id,)
                ).fetchone()
            return int(row[0]) if row else 0

        assert eventually(lambda: written() == 1, timeout=20)


def test_make_run_with_a_ledger_refuses_to_start_when_the_sinks_port_is_taken(
    ledger_redis: p.RedisServer, ledger_db: str
) -> None:
    env = stack_env("127.0.0.1", ledger_redis.port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.update(LEDGER_DATABASE_URL=ledger_db, LEDGER_METRICS_PORT=str(taken.getsockname()[1]))
        done = subprocess.run(
            [sys.executable, "-m", "devstack"],
            cwd=p.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "ports already in use" in done.stderr and "ledger-metrics=" in done.stderr
