"""The hot path's pipelined connection (keys/resp.py) against a real redis-server:
replies line up under concurrency, timeouts and restarts, and scripts survive a flush."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from devstack.processes import RedisServer
from keys import keygen
from keys.connection import RedisBridge
from keys.errors import StoreUnavailable
from keys.model import KeySpec, RequestedModel
from keys.resp import Arg, PipelinedRedis
from keys.scripts import Script
from keys.store import KeyStore

pytestmark = pytest.mark.integration
ECHO = Script("echo", "return ARGV[1]")
# Answers ARGV[2] after ARGV[1] microseconds of work.
SLOW = Script(
    "slow",
    "local function now() local t = redis.call('TIME') return t[1] * 1e6 + t[2] end "
    "local start = now() while now() - start < tonumber(ARGV[1]) do end return ARGV[2]",
)
# The server runs on uvloop, whose timers run before it reads sockets; test both loops.
LOOPS = pytest.mark.parametrize(
    "new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)


def run_on(
    new_loop: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, Any]
) -> Any:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main)


@contextlib.contextmanager
def loop_blocker(seconds: float) -> Iterator[Callable[[], None]]:
    """A function that makes the running loop block for `seconds` in a socket callback,
    as a slow callback would, once the loop next polls its sockets."""
    loop = asyncio.get_running_loop()
    wake, ring = socket.socketpair()

    def on_readable() -> None:
        wake.recv(1)
        time.sleep(seconds)

    loop.add_reader(wake.fileno(), on_readable)
    try:
        yield lambda: ring.sendall(b"!")
    finally:
        loop.remove_reader(wake.fileno())
        wake.close()
        ring.close()


async def written(pipe: PipelinedRedis, script: Script, *args: Arg) -> asyncio.Future[Any]:
    """Starts a script call and returns once its command is queued, then written."""
    call = asyncio.ensure_future(pipe.run_script(script, [], args))
    for _ in range(3):
        await asyncio.sleep(0)
    return call


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


@LOOPS
def test_a_blocked_event_loop_does_not_fail_a_call_redis_answered(
    redis_url: str, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    async def main() -> str:
        pipe = PipelinedRedis(redis_url, timeout_s=0.2)
        try:
            await pipe.call("PING")
            with loop_blocker(0.5) as block:
                call = await written(pipe, SLOW, 50_000, "answered")
                block()  # Redis answers while the loop is blocked past the deadline
                return str(await call)
        finally:
            await pipe.aclose()

    assert run_on(new_loop, main()) == "answered"


@LOOPS
def test_a_call_redis_never_answers_still_times_out_after_a_blocked_loop(
    own_redis: RedisServer, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    assert own_redis.process is not None
    pid = own_redis.process.proc.pid

    async def main() -> None:
        pipe = PipelinedRedis(own_redis.url, timeout_s=0.2)
        try:
            await pipe.call("PING")
            os.kill(pid, signal.SIGSTOP)
            with loop_blocker(0.5) as block:
                call = await written(pipe, ECHO, "unanswered")
                block()
                with pytest.raises(TimeoutError):
                    await call
        finally:
            os.kill(pid, signal.SIGCONT)
            await pipe.aclose()

    run_on(new_loop, main())
