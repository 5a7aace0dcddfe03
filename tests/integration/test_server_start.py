"""Starting `extauthz serve`: what an operator sees when a port is taken or Redis is away."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import processes as p
from tests.conftest import Server, start_server
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def _serve(env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [p.executable("extauthz"), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _env_like(server: Server, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return p.extauthz_env(
        redis_url=redis_url,
        grpc_port=server.grpc_port,
        http_port=server.http_port,
        admin_token="a",
        usage_token="u",
        extra={"EXTAUTHZ_JOURNAL_DIR": str(tmp_path / "journal"), **extra},
    )


@pytest.mark.parametrize("taken", ["gRPC", "HTTP"])
def test_a_second_server_on_a_taken_port_fails_saying_port_in_use(
    server: Server, redis_url: str, tmp_path: Path, taken: str
) -> None:
    """Only --workers (EXTAUTHZ_REUSE_PORT) shares a port; a stray second server must not
    quietly take half the traffic."""
    free = "EXTAUTHZ_HTTP_PORT" if taken == "gRPC" else "EXTAUTHZ_GRPC_PORT"
    done = _serve(_env_like(server, redis_url, tmp_path, **{free: str(p.free_port())}))
    port = server.grpc_port if taken == "gRPC" else server.http_port
    assert done.returncode == 2
    assert f"{taken} port 127.0.0.1:{port} is in use" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # one line, nothing from gRPC before it


def test_unreachable_redis_at_start_is_logged_once_with_its_address(tmp_path: Path) -> None:
    dead = f"redis://:hunter2@127.0.0.1:{p.free_port()}/0"
    srv = start_server(dead, tmp_path, extra={"EXTAUTHZ_LOG_LEVEL": "INFO"})
    try:
        assert eventually(lambda: "serving" in srv.process.log_text())
        assert eventually(lambda: srv.process.log_text().count("redis unreachable") >= 1)
        lines = [json.loads(line) for line in srv.process.log_text().splitlines() if "{" in line]
        unreachable = [line for line in lines if "redis unreachable" in line["msg"]]
        assert len(unreachable) == 1  # said once, not once per retry
        assert unreachable[0]["redis"].endswith(dead.rsplit("@", 1)[1])
        assert "hunter2" not in srv.process.log_text()
    finally:
        srv.process.stop()


def test_serve_help_lists_every_setting() -> None:
    from extauthz.settings import VARIABLES

    done = subprocess.run(
        [sys.executable, "-m", "extauthz.server", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    for variable in VARIABLES:
        assert variable.env in done.stdout
    assert "REDIS_HOST" in done.stdout
