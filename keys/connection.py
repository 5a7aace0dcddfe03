"""Connections to Redis, and the one seam every store operation goes through.

`RedisBridge.from_url` chooses the transport once, from the URL:

- single-node Redis (`redis://`, `rediss://`): scripts run over the pipelined connection
  (keys/resp.py), which carries every concurrent call on one socket; plain commands
  (admin reads, index writes) use redis-py's pooled client.
- Redis Cluster (`redis+cluster://`, `rediss+cluster://`): redis-py's cluster client
  routes both, with the workarounds in `_FastCluster`.

The rest of the code sees `RedisBridge.scripts` (a `ScriptRunner`) and
`RedisBridge.client`, and never asks which one it got. The redis-py version is bounded
in pyproject.toml, since `_FastCluster` leans on its internals.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from keys.errors import StoreUnavailable
from keys.resp import Endpoint, PipelinedRedis, RedisReplyError
from keys.scripts import Script

Arg = str | int | bytes

Client = aioredis.Redis | RedisCluster
"""What connect() returns: one Redis, or a Redis Cluster (REDIS_URL `redis+cluster://`)."""

CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


SCHEMES: Final = ("redis", "rediss", *CLUSTER_SCHEMES)


def check_url(url: str) -> None:
    """Raises ValueError (never naming a password) unless the clients below can use `url`:
    a known scheme, and a port, database and options redis-py and keys/resp.py accept."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES or not rest.strip("/"):
        raise ValueError(f"expected {', '.join(s + '://host:port' for s in SCHEMES)}")
    plain = f"{CLUSTER_SCHEMES.get(scheme.lower(), scheme)}://{rest}"
    try:
        options = parse_url(plain)
        if not is_cluster_url(url):
            Endpoint.from_url(url)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{redacted(url)}: {exc}") from None
    unknown = sorted(set(options) - _url_options())
    if unknown:
        raise ValueError(f"unknown option {', '.join(unknown)}")


def _url_options() -> set[str]:
    """What redis-py's connections (and the cluster client) take as URL options."""
    names = {"connection_class"}
    for call in (
        AbstractConnection.__init__,
        Connection.__init__,
        SSLConnection.__init__,
        RedisCluster.__init__,
    ):
        names |= set(inspect.signature(call).parameters) - {"self", "kwargs"}
    return names


def connect(url: str, *, timeout_s: float, max_connections: int = 64) -> Client:
    """A client that fails fast: one quick retry (a pooled connection may have died with a
    Redis restart), then StoreUnavailable, well inside Envoy's ext_authz timeout. Callers
    beyond `max_connections` wait for a free connection (up to `timeout_s`) instead of
    failing.

    `redis+cluster://host:port[/0][?...]` (`rediss+cluster://` for TLS) is Redis Cluster,
    `host:port` its seed node: see _FastCluster."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in CLUSTER_SCHEMES:
        return _FastCluster.connect(
            f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}",
            timeout_s=timeout_s,
            max_connections=max_connections,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # One retry after a connection error (a pooled connection that died with a Redis
        # restart), never after a timeout. redis-py also retries when the connection drops
        # after the command went out, so only idempotent work goes through this client:
        # reads, HSET/ZADD/DEL, and create/rotate scripts that recognise their own re-run.
        # The Check and ReportUsage scripts use the pipelined connection (keys/resp.py).
        retry=Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)


class _FastCluster(RedisCluster):
    """redis-py's async RedisCluster, tuned like the single-node client above.

    - Every command gets `timeout_s` to connect and to answer, and one retry
      (`Retry(NoBackoff(), 1)`) after a connection error; before it the client reloads
      the slot map (CLUSTER SLOTS), so after a failover the retry goes to the promoted
      replica. MOVED/ASK redirects are followed inside one attempt (redis-py's own limit
      of 16 hops) and patch the slot map.
    - Not retried (redis-py would): a timeout, since the script may have run and a
      second run would count the request twice (or answer a report as its own
      duplicate); and CLUSTERDOWN (a failover in progress), on which redis-py already
      sleeps 0.25 s, so a retry would sleep again, past Envoy's 0.5 s. Either way the
      next command reloads the slot map.
    - redis-py's per-node pool does not wait for a free connection, it raises
      MaxConnectionsError at its cap. So at most `max_connections` commands run at once
      (the others wait up to `timeout_s`, as with the single-node pool), and each node's
      cap leaves room above that for pipelines and slot-map reloads.
    - redis-py calls aclose() itself, inside a command, to force a slot-map reload (on
      CLUSTERDOWN, every 5th MOVED, a failed pipeline). That closes the connections other
      commands are using at that moment, which then fail with AttributeError or
      RuntimeError (uvloop) instead of a ConnectionError. Inside a command, aclose()
      here only asks for the reload, which marks every connection for a lazy,
      race-free reconnect; called from outside (shutdown) it closes everything. redis-py
      also closes a node's idle connections after an error on that node without taking
      them out of the pool first, so a command can pick one up as it closes (seen
      during a failover, on the dead primary's connections): those errors become
      ConnectionError, so a 503, as they would have been.
    """

    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]
        redis_errors.ConnectionError,
        redis_errors.SlotNotCoveredError,
    )
    NODE_HEADROOM: Final = 16

    def __init__(self, *, in_flight: int, wait_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._in_flight = asyncio.Semaphore(in_flight)
        self._wait_s = wait_s

    @classmethod
    def connect(cls, url: str, *, timeout_s: float, max_connections: int) -> _FastCluster:
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 1),
            "max_connections": max_connections + cls.NODE_HEADROOM,
            "health_check_interval": 0,
        }
        options.update(parse_url(url))  # what RedisCluster.from_url does; the URL wins
        if options.pop("connection_class", None) is SSLConnection:
            options["ssl"] = True
        return cls(in_flight=max_connections, wait_s=timeout_s, **options)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._in_flight.locked():
            try:
                async with asyncio.timeout(self._wait_s):
                    await self._in_flight.acquire()
            except TimeoutError:
                raise redis_errors.ConnectionError("no free Redis Cluster connection") from None
        else:
            await self._in_flight.acquire()
        inside = _in_cluster_command.set(True)
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, RuntimeError) as exc:
            if not _closed_under_us(exc):
                raise
            raise redis_errors.ConnectionError("connection closed under the command") from exc
        finally:
            _in_cluster_command.reset(inside)
            self._in_flight.release()

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # which raises
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]

    async def aclose(self) -> None:
        if _in_cluster_command.get():
            self._initialize = True  # reload the slot map before the next command
            return
        await super().aclose()


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        inside = _in_cluster_command.set(True)
        try:
            return await super().execute(raise_on_error, allow_redirections)
        finally:
            _in_cluster_command.reset(inside)


_in_cluster_command: ContextVar[bool] = ContextVar("_in_cluster_command", default=False)


def _closed_under_us(exc: Exception) -> bool:
    """The command's connection was closed by another task while it was using it."""
    text = str(exc)
    if isinstance(exc, AttributeError):
        return "'NoneType' object has no attribute" in text  # the stream writer is gone
    return "closed" in text  # uvloop: "unable to perform operation on <TCPTransport ...>"


# RedisClusterException (no reachable seed, slots not covered, ...) is not a RedisError;
# ClusterDownError, MovedError and the like are. OSError and RedisReplyError are the
# pipelined connection's.
REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError, RedisReplyError)


def unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"redis: {type(exc).__name__}")


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """The one place Redis client exceptions become domain errors (the hot path's
    `KeyStore._run` catches REDIS_ERRORS itself: a context manager costs a few us)."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise unavailable(exc) from exc


class ScriptRunner(Protocol):
    """Runs a Lua script by its SHA, loading it when Redis does not know it."""

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any: ...

    async def aclose(self) -> None: ...


class PipelinedScripts:
    """Scripts over the pipelined connection: never retried (a re-run could count a
    request twice), so a timeout is StoreUnavailable and the caller decides."""

    def __init__(self, connection: PipelinedRedis) -> None:
        self.connection = connection

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        return await self.connection.run_script(script, keys, args)

    async def aclose(self) -> None:
        await self.connection.aclose()


class ClientScripts:
    """Scripts through a redis-py client (Redis Cluster: it routes by the keys)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.client.eval(script.text, len(keys), *keys, *args)

    async def aclose(self) -> None:
        """The client is the bridge's; it closes it."""


Transport = Literal["auto", "pipelined", "redis-py"]


@dataclass
class RedisBridge:
    """What the store talks to: a redis-py client for plain commands, and the script
    runner the URL calls for."""

    client: Client
    scripts: ScriptRunner
    # Redis Cluster: a script may touch one slot only, so the budgets above a key (other
    # slots) are checked in scripts of their own (docs/design.md). Fixed at construction.
    cluster: bool = field(init=False)

    def __post_init__(self) -> None:
        self.cluster = isinstance(self.client, RedisCluster)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float,
        max_connections: int = 64,
        transport: Transport = "auto",
    ) -> RedisBridge:
        """`transport` is for tests that run the store over both paths; `auto` picks the
        pipelined connection for single-node Redis and redis-py on a cluster."""
        client = connect(url, timeout_s=timeout_s, max_connections=max_connections)
        use_client = transport == "redis-py" or (transport == "auto" and is_cluster_url(url))
        scripts: ScriptRunner = (
            ClientScripts(client)
            if use_client
            else PipelinedScripts(PipelinedRedis(url, timeout_s=timeout_s))
        )
        return cls(client, scripts)

    async def load_scripts(self, scripts: Sequence[Script]) -> None:
        """SCRIPT LOAD each one now, so the first call after a Redis restart does not pay
        for the reload. On a cluster, redis-py sends SCRIPT LOAD to every primary."""
        async with translated():
            for script in scripts:
                await self.client.script_load(script.text)

    async def ping(self) -> bool:
        """On a cluster: every primary answers (every slot can be served)."""
        try:
            async with translated():
                if isinstance(self.client, RedisCluster):
                    return bool(await self.client.ping(target_nodes=RedisCluster.PRIMARIES))
                return bool(await self.client.ping())
        except StoreUnavailable:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.scripts.aclose()


def redacted(url: str) -> str:
    """The URL with every password masked (in the user part, and query parameters such as
    `password` and `ssl_password`, which redis-py reads too), for logs and banners."""
    parts = urlsplit(url)
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}" if user else f"***@{host}"
    query = "&".join(
        f"{name}=***" if "password" in name.lower() and sep else f"{name}{sep}{value}"
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
