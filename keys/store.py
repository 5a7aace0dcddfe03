"""The Redis store. The data model lives here and in keys/lua/ (docs/design.md).

Every key's state sits under one hash tag, `vk:{<id>}`, so each operation touches one
Redis Cluster slot and runs as one Lua script: one round trip per Check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from keys import keygen, resp
from keys.budget import current_reset_ms, first_reset_ms, next_month_start_ms
from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.keygen import ParsedKey
from keys.model import (
    ALL_MODELS,
    WINDOW_MS,
    Decision,
    KeySpec,
    KeyUpdate,
    Reason,
    ReportResult,
    RequestedModel,
    Status,
    UsageReport,
    UsageRow,
    UsageSummary,
    VirtualKey,
    WindowCount,
)
from keys.resp import PipelinedRedis, RedisReplyError

Clock = Callable[[], int]
"""Milliseconds since the epoch; injected so tests control time without sleeping."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


_CHECK_REASONS: Final = {
    0: Reason.OK,
    1: Reason.INVALID_API_KEY,
    2: Reason.KEY_REVOKED,
    3: Reason.KEY_EXPIRED,
    4: Reason.MODEL_NOT_ALLOWED,
    5: Reason.BUDGET_EXCEEDED,
    6: Reason.RATE_LIMIT_EXCEEDED,
    7: Reason.RATE_LIMIT_EXCEEDED,
}
_ID_ATTEMPTS = 5


def record_key(key_id: str) -> str:
    return f"vk:{{{key_id}}}"


def request_marker_key(key_id: str, request_id: str) -> str:
    return f"vk:{{{key_id}}}:req:{request_id}"


def usage_day_key(key_id: str, now_ms: int) -> str:
    day = datetime.fromtimestamp(now_ms / 1000, tz=UTC).strftime("%Y%m%d")
    return f"vk:{{{key_id}}}:usage:{day}"


# Indexes live under one hash tag of their own: admin paths only, never the hot path.
# Live indexes list existing keys (ListKeys); history indexes keep every key a user or
# team ever had, so their usage totals survive DeleteKey.
INDEX_ALL = "{vkidx}:all"


def index_key(kind: str, value: str) -> str:
    """kind: user, team (live keys) or user-hist, team-hist (every key ever)."""
    return f"{{vkidx}}:{kind}:{value}"


def encode_models(models: tuple[str, ...]) -> str:
    """`*`, or the names framed by newlines so the check script can match exactly."""
    if not models or ALL_MODELS in models:
        return ALL_MODELS
    return "\n" + "\n".join(models) + "\n"


def decode_models(stored: str) -> tuple[str, ...]:
    if stored == ALL_MODELS:
        return (ALL_MODELS,)
    return tuple(m for m in stored.split("\n") if m)


Client = aioredis.Redis | RedisCluster
"""What connect() returns: one Redis, or a Redis Cluster (REDIS_URL `redis+cluster://`)."""

CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


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


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """The one place redis-py's exceptions become domain errors."""
    try:
        yield
    except (RedisError, RedisClusterException) as exc:
        # RedisClusterException (no reachable seed, slots not covered, ...) is not a
        # RedisError; ClusterDownError, MovedError and the like are.
        raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
    except (OSError, RedisReplyError) as exc:  # the pipelined connection's errors
        raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc


def _lua(name: str) -> str:
    return resources.files("keys").joinpath("lua", f"{name}.lua").read_text()


def _script(redis: Client, name: str, *, with_lib: bool = False) -> Any:
    """redis-py Script objects use EVALSHA and reload on NOSCRIPT (e.g. after a restart)."""
    return redis.register_script((_lua("_budget") if with_lib else "") + _lua(name))


@dataclass(frozen=True, slots=True)
class Page:
    keys: tuple[VirtualKey, ...]
    next_token: str


def _encode_cursor(score: int, key_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score}:{key_id}".encode()).decode().rstrip("=")


def _decode_cursor(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        score, key_id = raw.split(":", 1)
        if not keygen.is_key_id(key_id):
            raise ValueError(key_id)
        return int(score), key_id
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument("page_token is not one this server issued") from None


def connect_pipelined(url: str, *, timeout_s: float) -> PipelinedRedis | None:
    """The hot path's pipelined connection (keys/resp.py); None for Redis Cluster, where
    redis-py's cluster client routes every call."""
    scheme = url.partition("://")[0].lower()
    return None if scheme in CLUSTER_SCHEMES else PipelinedRedis(url, timeout_s=timeout_s)


class KeyStore:
    def __init__(
        self,
        redis: Client,
        *,
        clock: Clock = wall_clock_ms,
        dedup_ttl_s: int = 172_800,
        usage_retention_days: int = 90,
        pipelined: PipelinedRedis | None = None,
    ) -> None:
        """`pipelined`, when given, carries the Check and ReportUsage scripts; everything
        else goes through the redis-py client."""
        self.redis = redis
        self.pipelined = pipelined
        self.clock = clock
        self.dedup_ttl_s = dedup_ttl_s
        self.usage_ttl_s = (usage_retention_days + 1) * 86_400
        self._check = _script(redis, "check", with_lib=True)
        self._report = _script(redis, "report_usage", with_lib=True)
        self._create = _script(redis, "create")
        self._update = _script(redis, "update")
        self._rotate = _script(redis, "rotate")
        self._check_text = resp.Script(self._check.script)
        self._report_text = resp.Script(self._report.script)

    async def _run(self, script: Any, text: resp.Script, keys: list[str], args: list[Any]) -> Any:
        if self.pipelined is not None:
            return await self.pipelined.run_script(text, keys, args)
        return await script(keys=keys, args=args)

    async def load_scripts(self) -> None:
        """Loads every script now, so the first Check after a Redis restart does not pay
        for the reload (redis-py would reload on NOSCRIPT anyway). On a cluster, SCRIPT
        LOAD goes to every primary (redis-py's routing for it), so a promoted replica
        gets the scripts once the watcher sees the cluster whole again."""
        async with _translated():
            for script in (self._check, self._report, self._create, self._update, self._rotate):
                await self.redis.script_load(script.script)

    async def ping(self) -> bool:
        """On a cluster: every primary answers (every slot can be served)."""
        try:
            async with _translated():
                if isinstance(self.redis, RedisCluster):
                    return bool(await self.redis.ping(target_nodes=RedisCluster.PRIMARIES))
                return bool(await self.redis.ping())
        except StoreUnavailable:
            return False

    async def create(self, spec: KeySpec, prefix: str) -> tuple[str, VirtualKey]:
        """Stores a new key; returns the full key (shown once) and its record."""
        now = self.clock()
        for _ in range(_ID_ATTEMPTS):
            key_id = keygen.new_key_id()
            full_key = keygen.format_key(prefix, key_id, keygen.new_secret())
            fields = {
                "hash": keygen.digest(full_key),
                "name": spec.name,
                "user_id": spec.user_id,
                "team_id": spec.team_id,
                "created_at": now,
                "expires_at": spec.expires_at_ms,
                "status": "active",
                "models": encode_models(spec.allowed_models),
                "max_budget": spec.max_budget_nanos,
                "spent": 0,
                "rpm_limit": spec.rpm_limit,
                "tpm_limit": spec.tpm_limit,
                "metadata": json.dumps(dict(spec.metadata), separators=(",", ":")),
                "last_used": 0,
                "total_requests": 0,
                "win_start": 0,
                "win_requests": 0,
                "win_tokens": 0,
                "budget_duration": spec.budget.duration,
                "budget_period_ms": spec.budget.period_ms,
                "budget_reset_at": first_reset_ms(spec.budget, now),
                "prev_hash": "",
                "prev_hash_until": 0,
            }
            args = [item for pair in fields.items() for item in pair]
            async with _translated():
                created = await self._create(keys=[record_key(key_id)], args=args)
                if created:
                    await self._index(key_id, now, spec.user_id, spec.team_id)
            if created:
                return full_key, await self.get(key_id)
        raise StoreUnavailable("could not draw an unused key id")  # pragma: no cover

    async def _index(self, key_id: str, created_ms: int, user_id: str, team_id: str) -> None:
        """After the record exists: a crash in between leaves a key that works but is not
        listed, never a listed key that does not exist."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(INDEX_ALL, {key_id: created_ms})
            pipe.zadd(index_key("user", user_id), {key_id: created_ms})
            pipe.zadd(index_key("user-hist", user_id), {key_id: created_ms})
            if team_id:
                pipe.zadd(index_key("team", team_id), {key_id: created_ms})
                pipe.zadd(index_key("team-hist", team_id), {key_id: created_ms})
            await pipe.execute()

    async def get(self, key_id: str) -> VirtualKey:
        return _to_virtual_key(key_id, await self._fetch(key_id), self.clock())

    async def _fetch(self, key_id: str) -> dict[str, str]:
        async with _translated():
            fields: dict[str, str] = await self.redis.hgetall(record_key(key_id))  # type: ignore[assignment]
        if not fields:
            raise NotFound(f"key {key_id} not found")
        return fields

    async def revoke(self, key_id: str) -> VirtualKey:
        await self._set_fields(key_id, {"status": "revoked"})
        return await self.get(key_id)

    async def update(self, key_id: str, change: KeyUpdate) -> VirtualKey:
        fields: dict[str, str | int] = {}
        if change.name is not None:
            fields["name"] = change.name
        if change.allowed_models is not None:
            fields["models"] = encode_models(change.allowed_models)
        if change.max_budget_nanos is not None:
            fields["max_budget"] = change.max_budget_nanos
        if change.tpm_limit is not None:
            fields["tpm_limit"] = change.tpm_limit
        if change.rpm_limit is not None:
            fields["rpm_limit"] = change.rpm_limit
        if change.expires_at_ms is not None:
            fields["expires_at"] = change.expires_at_ms
        if change.metadata is not None:
            fields["metadata"] = json.dumps(dict(change.metadata), separators=(",", ":"))
        if change.budget is not None:
            fields["budget_duration"] = change.budget.duration
            fields["budget_period_ms"] = change.budget.period_ms
            fields["budget_reset_at"] = first_reset_ms(change.budget, self.clock())
        if fields:
            await self._set_fields(key_id, fields)
        return await self.get(key_id)

    async def rotate(self, key_id: str, prefix: str, grace_ms: int) -> tuple[str, VirtualKey]:
        """A new secret under the same id; the old one works for `grace_ms` more."""
        full_key = keygen.format_key(prefix, key_id, keygen.new_secret())
        until = self.clock() + grace_ms if grace_ms > 0 else 0
        async with _translated():
            rotated = await self._rotate(
                keys=[record_key(key_id)], args=[keygen.digest(full_key), until]
            )
        if not rotated:
            raise NotFound(f"key {key_id} not found")
        return full_key, await self.get(key_id)

    async def delete(self, key_id: str) -> None:
        """Removes the record and its live index entries; usage history stays."""
        key = await self.get(key_id)
        async with _translated(), self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(INDEX_ALL, key_id)
            pipe.zrem(index_key("user", key.user_id), key_id)
            if key.team_id:
                pipe.zrem(index_key("team", key.team_id), key_id)
            await pipe.execute()
            await self.redis.delete(record_key(key_id))

    async def list_keys(
        self,
        *,
        user_id: str = "",
        team_id: str = "",
        status: Status | None = None,
        page_size: int = 50,
        page_token: str = "",
    ) -> Page:
        """Oldest first. The token is a (created_at, id) cursor, so keys created while
        paging land after it: none is skipped or repeated."""
        index = (
            index_key("user", user_id)
            if user_id
            else index_key("team", team_id)
            if team_id
            else INDEX_ALL
        )
        cursor = _decode_cursor(page_token) if page_token else None
        now = self.clock()
        found: list[VirtualKey] = []
        last: tuple[int, str] | None = None
        async with _translated():
            while len(found) < page_size:
                batch = await self._index_after(index, cursor, page_size * 2)
                if not batch:
                    return Page(tuple(found), "")
                records = await self._fetch_many([key_id for key_id, _ in batch])
                for (key_id, score), fields in zip(batch, records, strict=True):
                    cursor = (score, key_id)
                    if not fields:
                        continue  # deleted between the index read and now
                    key = _to_virtual_key(key_id, fields, now)
                    if team_id and key.team_id != team_id:
                        continue
                    if status is not None and key.status(now) is not status:
                        continue
                    found.append(key)
                    last = cursor
                    if len(found) == page_size:
                        break
        async with _translated():
            more = bool(await self._index_after(index, last, 1)) if last else False
        return Page(tuple(found), _encode_cursor(*last) if last and more else "")

    async def _index_after(
        self, index: str, cursor: tuple[int, str] | None, count: int
    ) -> list[tuple[str, int]]:
        """Up to `count` (id, created_ms) entries after the cursor, in (score, id) order."""
        rows: list[tuple[str, float]]
        if cursor is None:
            rows = await self.redis.zrange(index, 0, count - 1, withscores=True)  # type: ignore[assignment]
            return [(m, int(sc)) for m, sc in rows]
        score, key_id = cursor
        ties: list[str] = await self.redis.zrangebyscore(index, score, score)  # type: ignore[assignment]
        after = [(m, score) for m in sorted(ties) if m > key_id][:count]
        if len(after) < count:
            rows = await self.redis.zrangebyscore(  # type: ignore[assignment]
                index, f"({score}", "+inf", start=0, num=count - len(after), withscores=True
            )
            after.extend((m, int(sc)) for m, sc in rows)
        return after

    async def _fetch_many(self, key_ids: Iterable[str]) -> list[dict[str, str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(record_key(key_id))
            results: list[dict[str, str]] = await pipe.execute()
        return results

    async def key_ids_of(self, *, user_id: str = "", team_id: str = "") -> list[str]:
        """Every key the user or team ever had (deleted ones too), for usage totals."""
        index = index_key("user-hist", user_id) if user_id else index_key("team-hist", team_id)
        async with _translated():
            members: list[str] = await self.redis.zrange(index, 0, -1)  # type: ignore[assignment]
        return members

    async def usage(self, key_ids: Iterable[str], days: int) -> UsageSummary:
        """Daily rollups for the last `days` UTC days (today included), summed over keys."""
        ids = list(key_ids)
        today = datetime.fromtimestamp(self.clock() / 1000, tz=UTC).date()
        dates = [today - timedelta(days=offset) for offset in range(days - 1, -1, -1)]
        async with _translated(), self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                for day in dates:
                    pipe.hgetall(f"vk:{{{key_id}}}:usage:{day.strftime('%Y%m%d')}")
            results: list[dict[str, str]] = await pipe.execute()
        totals: dict[tuple[str, str], dict[str, int]] = {}
        for index, fields in enumerate(results):
            date = dates[index % len(dates)].isoformat()
            for name, value in fields.items():
                metric, _, model = name.partition(":")
                row = totals.setdefault((date, model), {})
                row[metric] = row.get(metric, 0) + int(value)
        rows = tuple(
            UsageRow(
                date=date,
                model=model,
                requests=row.get("requests", 0),
                prompt_tokens=row.get("prompt_tokens", 0),
                completion_tokens=row.get("completion_tokens", 0),
                cost_nanos=row.get("cost", 0),
            )
            for (date, model), row in sorted(totals.items())
        )
        return UsageSummary(rows, tuple(ids), dates[0].isoformat(), dates[-1].isoformat())

    async def _set_fields(self, key_id: str, fields: Mapping[str, str | int]) -> None:
        args = [item for pair in fields.items() for item in pair]
        async with _translated():
            updated = await self._update(keys=[record_key(key_id)], args=args)
        if not updated:
            raise NotFound(f"key {key_id} not found")

    async def check(self, key: ParsedKey, model: RequestedModel) -> Decision:
        """Decides one request in one round trip, counting it against RPM when allowed."""
        now = self.clock()
        args = [
            key.digest,
            now,
            model.kind.value,
            model.name,
            WINDOW_MS,
            next_month_start_ms(now),
        ]
        async with _translated():
            reply = await self._run(self._check, self._check_text, [record_key(key.key_id)], args)
        code = int(reply[0])
        reason = _CHECK_REASONS[code]
        if len(reply) == 1:
            return Decision(reason, key.key_id)
        reset_ms = int(reply[7])
        return Decision(
            reason,
            key_id=key.key_id,
            user_id=reply[1],
            team_id=reply[2],
            rpm=WindowCount(int(reply[3]), int(reply[4]), reset_ms),
            tpm=WindowCount(int(reply[5]), int(reply[6]), reset_ms),
            limit_hit={6: "rpm", 7: "tpm"}.get(code, ""),
        )

    async def validate(self, key: ParsedKey) -> tuple[Reason, VirtualKey | None]:
        """Read-only: what a Check would say about the key itself (not its model or limits)."""
        try:
            fields = await self._fetch(key.key_id)
        except NotFound:
            return Reason.INVALID_API_KEY, None
        now = self.clock()
        current = hmac.compare_digest(fields.get("hash", ""), key.digest)
        in_grace = now < int(fields.get("prev_hash_until") or 0) and hmac.compare_digest(
            fields.get("prev_hash", ""), key.digest
        )
        if not (current or in_grace):
            return Reason.INVALID_API_KEY, None
        record = _to_virtual_key(key.key_id, fields, now)
        status = record.status(now)
        if status is Status.REVOKED:
            return Reason.KEY_REVOKED, record
        if status is Status.EXPIRED:
            return Reason.KEY_EXPIRED, record
        if record.budget_remaining_nanos == 0:
            return Reason.BUDGET_EXCEEDED, record
        return Reason.OK, record

    async def report_usage(self, report: UsageReport) -> ReportResult:
        now = self.clock()
        keys = [
            record_key(report.key_id),
            request_marker_key(report.key_id, report.request_id),
            usage_day_key(report.key_id, now),
        ]
        args = [
            now,
            report.cost_nanos,
            report.total_tokens,
            report.prompt_tokens,
            report.completion_tokens,
            report.model,
            self.dedup_ttl_s,
            WINDOW_MS,
            self.usage_ttl_s,
            next_month_start_ms(now),
        ]
        async with _translated():
            status, spent, budget = await self._run(self._report, self._report_text, keys, args)
        if int(status) == 0:
            raise NotFound(f"key {report.key_id} not found")
        if int(status) == 3:
            raise InvalidArgument(
                "this charge would overflow the key's spend or token counters (about $9 "
                "billion / 9e18 tokens)"
            )
        duplicate = int(status) == 2
        return ReportResult(
            duplicate=duplicate,
            cost_nanos=0 if duplicate else report.cost_nanos,
            spent_nanos=int(spent),
            max_budget_nanos=int(budget),
            total_tokens=report.total_tokens,
        )


def _to_virtual_key(key_id: str, f: Mapping[str, str], now_ms: int) -> VirtualKey:
    """The record as of `now_ms`: a budget period that has ended reads as reset, as the
    next script call will make it."""
    reset_at = int(f.get("budget_reset_at") or 0)
    rolled = reset_at != 0 and now_ms >= reset_at
    return VirtualKey(
        id=key_id,
        name=f.get("name", ""),
        user_id=f.get("user_id", ""),
        team_id=f.get("team_id", ""),
        created_at_ms=int(f.get("created_at", 0)),
        expires_at_ms=int(f.get("expires_at", 0)),
        revoked=f.get("status") == "revoked",
        allowed_models=decode_models(f.get("models", ALL_MODELS)),
        max_budget_nanos=int(f.get("max_budget", 0)),
        spent_nanos=0 if rolled else int(f.get("spent", 0)),
        tpm_limit=int(f.get("tpm_limit", 0)),
        rpm_limit=int(f.get("rpm_limit", 0)),
        metadata=json.loads(f.get("metadata", "{}")),
        last_used_ms=int(f.get("last_used", 0)),
        total_requests=int(f.get("total_requests", 0)),
        window_start_ms=int(f.get("win_start", 0)),
        window_requests=int(f.get("win_requests", 0)),
        window_tokens=int(f.get("win_tokens", 0)),
        budget_duration=f.get("budget_duration", ""),
        budget_reset_at_ms=current_reset_ms(reset_at, int(f.get("budget_period_ms") or 0), now_ms),
    )
