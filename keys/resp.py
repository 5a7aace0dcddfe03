"""A pipelined Redis connection for the hot path (Check and ReportUsage scripts).

redis-py's asyncio client checks a connection out of a pool for every command; under
concurrency that bookkeeping costs several times the Redis round trip itself. Here one
connection carries every in-flight call: commands are written as they come, replies
(parsed by hiredis) resolve futures in FIFO order — Redis answers a connection's commands
in the order it received them. A call that times out drops the connection (its state is
unknown), failing every call still waiting on it; the next call reconnects. A timeout means
Redis did not answer: the clock starts when the command is written, and a deadline noticed
late (the event loop was blocked) is checked again after the loop has read the socket.

Single-node Redis only (plain, AUTH, SELECT, TLS); a Redis Cluster uses redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

from keys.scripts import Script

Arg = str | int | bytes
# After a deadline passes, how long the loop gets to read what is already in the socket.
_RECHECK_S = 0.001


class RedisReplyError(Exception):
    """Redis answered with an error (other than NOSCRIPT, which is handled here)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a single-node redis URL: scheme {parts.scheme!r}")
        path = parts.path.lstrip("/")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=parts.scheme == "rediss",
        )


def encode(args: Sequence[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Call:
    """A command in flight: its reply's future, and when Redis has to have answered."""

    __slots__ = ("deadline", "future", "rechecked")

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future
        self.deadline = math.inf  # set once the command is written
        self.rechecked = False


class _Protocol(asyncio.Protocol):
    """One connection: commands written in batches, replies resolved in order.

    Commands issued in one event-loop turn go out in one write. One timer watches the
    oldest call; when it is late, the connection is dropped (every pending call fails and
    the next call reconnects), as redis-py does, rather than kept with unknown state.
    """

    def __init__(self, timeout_s: float) -> None:
        self.reader = hiredis.Reader(notEnoughData=Ellipsis, encoding="utf-8", errors="replace")
        self.timeout_s = timeout_s
        self.pending: deque[_Call] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not Ellipsis:
            future = self.pending.popleft().future
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError("redis connection lost"))

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.pending:
            future = self.pending.popleft().future
            if not future.done():
                future.set_exception(error)

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise ConnectionError("redis connection closed")
        future: asyncio.Future[Any] = self.loop.create_future()
        self.pending.append(_Call(future))
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(payload)
        return future

    def _flush(self) -> None:
        if self.transport is None or self.closed:
            self._out.clear()
            return
        self.transport.write(b"".join(self._out))
        # the batch is the newest calls; Redis's time starts now, not when they were queued
        deadline = self.loop.time() + self.timeout_s
        for index in range(len(self.pending) - len(self._out), len(self.pending)):
            self.pending[index].deadline = deadline
        self._out.clear()
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._watch)

    def _watch(self) -> None:
        self._timer = None
        if not self.pending:
            return
        oldest, now = self.pending[0], self.loop.time()
        if oldest.deadline == math.inf:
            return  # not written yet: _flush arms the timer
        if oldest.deadline > now:
            self._timer = self.loop.call_at(oldest.deadline, self._watch)
            return
        if not oldest.rechecked:
            # The reply may be in the socket, unread: after a blocked loop, a timer can run
            # before the loop reads its sockets (libuv runs timers first). Look again once
            # the loop has polled them; fail only if the reply is still missing then.
            oldest.rechecked = True
            self._timer = self.loop.call_at(now + _RECHECK_S, self._watch)
            return
        self._fail(TimeoutError("redis did not answer in time"))
        if self.transport is not None:
            self.transport.abort()


class PipelinedRedis:
    """Script calls over one pipelined connection, reconnected on demand."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.endpoint = Endpoint.from_url(url)
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None

    async def _connection(self) -> _Protocol:
        """The open connection, or the one connect attempt in progress (bounded by the
        timeout), which every waiting call joins instead of queueing its own."""
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(
                asyncio.wait_for(self._connect(), self.timeout_s)
            )
        self._protocol = await asyncio.shield(self._connecting)
        return self._protocol

    async def _connect(self) -> _Protocol:
        e = self.endpoint
        context = ssl.create_default_context() if e.tls else None
        _, protocol = await asyncio.get_running_loop().create_connection(
            lambda: _Protocol(self.timeout_s), e.host, e.port, ssl=context
        )
        hello: list[Sequence[Arg]] = []
        if e.password is not None:
            hello.append(["AUTH", e.username, e.password] if e.username else ["AUTH", e.password])
        if e.db:
            hello.append(["SELECT", e.db])
        for command in hello:
            reply = await protocol.send(encode(command))
            if isinstance(reply, hiredis.ReplyError):
                if protocol.transport is not None:
                    protocol.transport.close()
                raise ConnectionError(f"redis refused {command[0]!s}: {str(reply)[:60]}")
        return protocol

    async def call(self, *args: Arg) -> Any:
        protocol = await self._connection()
        reply = await protocol.send(encode(args))
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    async def run_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """EVALSHA, falling back to EVAL (which caches the script) after a restart."""
        try:
            return await self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call("EVAL", script.text, len(keys), *keys, *args)

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)
        self._protocol = None
