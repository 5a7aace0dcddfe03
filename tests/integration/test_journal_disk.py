"""The usage journal against a disk that refuses it: full while Redis is down, or not
writable at start. Real filesystems: a small tmpfs (needs root; skipped where mounting is
not permitted)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from devstack import processes as p
from devstack.processes import RedisServer
from tests.conftest import start_server
from tests.helpers import Clients, eventually

pytestmark = pytest.mark.integration


def mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 KiB filesystem: room for a few dozen journaled reports."""
    mount = tmp_path / "small"
    mount_tmpfs(mount, "size=8k")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield redis
    redis.stop()


def test_full_disk_refuses_reports_as_unavailable_and_charges_exactly_those_acknowledged(
    aof_redis: RedisServer, small_disk: Path, tmp_path: Path
) -> None:
    server = start_server(
        aof_redis.url, tmp_path, extra={"EXTAUTHZ_JOURNAL_DIR": str(small_disk / "journal")}
    )
    channel = grpc.insecure_channel(server.address)
    clients = Clients(channel, server.admin_token, server.usage_token)
    try:
        _, data = clients.create_key(max_budget=0)
        aof_redis.stop()
        acknowledged, refusals = 0, set()
        for i in range(80):
            try:
                assert clients.report(data.id, f"d-{i}", cost=0.125).queued
                acknowledged += 1
            except grpc.RpcError as err:
                refusals.add(err.code())
        assert refusals == {grpc.StatusCode.UNAVAILABLE} and 0 < acknowledged < 80
        # room again: later writes must not complete any refused one
        subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
        for i in range(80, 90):
            assert clients.report(data.id, f"d-{i}", cost=0.125).queued
            acknowledged += 1
        aof_redis.start()
        assert eventually(lambda: clients.get_key(data.id).spent == acknowledged * 0.125)
        assert "Traceback" not in server.process.log_text()
    finally:
        channel.close()
        server.process.stop()


@pytest.mark.parametrize("place", ["read-only filesystem", "path through a file"])
def test_an_unusable_journal_directory_is_a_one_line_error_and_exit_2(
    redis_url: str, tmp_path: Path, place: str
) -> None:
    if place == "read-only filesystem":
        mount_tmpfs(tmp_path / "ro", "size=64k,ro")
        journal = tmp_path / "ro" / "journal"
    else:
        (tmp_path / "file").write_text("")
        journal = tmp_path / "file" / "journal"
    env = p.extauthz_env(
        redis_url=redis_url,
        grpc_port=p.free_port(),
        http_port=p.free_port(),
        admin_token="adm-x",
        usage_token="use-x",
        extra={"EXTAUTHZ_LOG_LEVEL": "INFO", "EXTAUTHZ_JOURNAL_DIR": str(journal)},
    )
    try:
        done = subprocess.run(
            [p.executable("extauthz"), "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if place == "read-only filesystem":
            subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"extauthz: journal directory {journal} is not usable")
    assert done.stderr.count("\n") == 1  # that one line, no traceback
