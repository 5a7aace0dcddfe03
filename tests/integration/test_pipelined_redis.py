"""The hot path's pipelined connection (keys/resp.py) against a real redis-server:
replies line up under concurrency, timeouts and restarts, and scripts survive a flush."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devstack.processes import RedisServer
from keys import keygen
from keys.connection import RedisBridge
from keys.errors import StoreUnavailable
from keys.model import KeySpec, RequestedModel
from keys.resp import PipelinedRedis, Script
from keys.store import KeyStore

pytestmark = pytest.mark.integration
ECHO = Script("return ARGV[1]")


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    redis = RedisServer(tmp_path / "redis").start()
    yield redis
    redis.stop()


async def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    pipe = PipelinedRedis(redis_url, timeout_s=2)
    replies = await asyncio.gather(*(pipe.run_script(ECHO, [], [f"n{i}"]) for i in range(500)))
    assert replies == [f"n{i}" for i in range(500)]
    await pipe.aclose()


async def test_script_flushed_from_redis_is_sent_again(redis_url: str) -> None:
    pipe = PipelinedRedis(redis_url, timeout_s=2)
    assert await pipe.run_script(ECHO, [], ["a"]) == "a"
    await pipe.call("SCRIPT", "FLUSH")
    assert await pipe.run_script(ECHO, [], ["b"]) == "b"  # NOSCRIPT -> EVAL
    await pipe.aclose()


async def test_unreachable_redis_is_store_unavailable() -> None:
    redis = RedisBridge.from_url("redis://127.0.0.1:1/0", timeout_s=0.2)
    store = KeyStore(redis)
    key = keygen.parse_key("sk-mp-0000000000000000-" + "a" * 43)
    assert key is not None
    with pytest.raises(StoreUnavailable):
        await store.check(key, RequestedModel.named("gpt-4"))
    await redis.aclose()


async def test_reconnects_after_a_redis_restart(own_redis: RedisServer) -> None:
    pipe = PipelinedRedis(own_redis.url, timeout_s=0.5)
    assert await pipe.run_script(ECHO, [], ["before"]) == "before"
    own_redis.stop()
    with pytest.raises(ConnectionError):
        await pipe.run_script(ECHO, [], ["during"])
    own_redis.start()
    assert await pipe.run_script(ECHO, [], ["after"]) == "after"
    await pipe.aclose()


async def test_a_timed_out_call_drops_the_connection_and_later_calls_get_their_own_reply(
    own_redis: RedisServer,
) -> None:
    pipe = PipelinedRedis(own_redis.url, timeout_s=0.3)
    assert await pipe.run_script(ECHO, [], ["warm"]) == "warm"
    assert own_redis.process is not None
    pid = own_redis.process.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError):
            await pipe.run_script(ECHO, [], ["late"])
    finally:
        os.kill(pid, signal.SIGCONT)
    # a fresh connection: the late reply went with the old one
    assert await pipe.run_script(ECHO, [], ["next"]) == "next"
    await pipe.aclose()


async def test_database_number_from_the_url_is_selected(redis_url: str) -> None:
    base = redis_url.rsplit("/", 1)[0]
    redis = RedisBridge.from_url(f"{base}/5", timeout_s=2)
    store = KeyStore(redis)
    full, _ = await store.create(
        KeySpec("k", "u", "", 1_900_000_000_000_000, ("*",), 0, 0, 0), "sk-mp"
    )
    key = keygen.parse_key(full)
    assert key is not None
    assert (await store.check(key, RequestedModel.named("gpt-4"))).allowed
    await redis.aclose()
