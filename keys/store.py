"""The Redis store. The data model lives here and in keys/lua/ (docs/design.md).

Every key's state sits under one hash tag, `vk:{<id>}`, so each operation touches one
Redis Cluster slot and runs as one Lua script: one round trip per Check.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from keys import keygen
from keys.errors import NotFound, StoreUnavailable
from keys.keygen import ParsedKey
from keys.model import (
    ALL_MODELS,
    WINDOW_MS,
    Decision,
    KeySpec,
    Reason,
    ReportResult,
    RequestedModel,
    Status,
    UsageReport,
    VirtualKey,
    WindowCount,
)

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


def encode_models(models: tuple[str, ...]) -> str:
    """`*`, or the names framed by newlines so the check script can match exactly."""
    if not models or ALL_MODELS in models:
        return ALL_MODELS
    return "\n" + "\n".join(models) + "\n"


def decode_models(stored: str) -> tuple[str, ...]:
    if stored == ALL_MODELS:
        return (ALL_MODELS,)
    return tuple(m for m in stored.split("\n") if m)


def connect(url: str, *, timeout_s: float, max_connections: int = 64) -> aioredis.Redis:
    """A client that fails fast: one quick retry (a pooled connection may have died with a
    Redis restart), then StoreUnavailable, well inside Envoy's ext_authz timeout. Callers
    beyond `max_connections` wait for a free connection (up to `timeout_s`) instead of
    failing."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    """The one place redis-py's exceptions become domain errors."""
    try:
        yield
    except RedisError as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
    except OSError as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc


def _script(redis: aioredis.Redis, name: str) -> Any:
    text = resources.files("keys").joinpath("lua", f"{name}.lua").read_text()
    return redis.register_script(text)


class KeyStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        clock: Clock = wall_clock_ms,
        dedup_ttl_s: int = 172_800,
        usage_retention_days: int = 90,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.dedup_ttl_s = dedup_ttl_s
        self.usage_ttl_s = (usage_retention_days + 1) * 86_400
        # redis-py Script objects use EVALSHA and reload on NOSCRIPT (e.g. after a restart)
        self._check = _script(redis, "check")
        self._report = _script(redis, "report_usage")
        self._create = _script(redis, "create")
        self._update = _script(redis, "update")

    async def ping(self) -> bool:
        try:
            async with _translated():
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
            }
            args = [item for pair in fields.items() for item in pair]
            async with _translated():
                created = await self._create(keys=[record_key(key_id)], args=args)
            if created:
                return full_key, await self.get(key_id)
        raise StoreUnavailable("could not draw an unused key id")  # pragma: no cover

    async def get(self, key_id: str) -> VirtualKey:
        return _to_virtual_key(key_id, await self._fetch(key_id))

    async def _fetch(self, key_id: str) -> dict[str, str]:
        async with _translated():
            fields: dict[str, str] = await self.redis.hgetall(record_key(key_id))  # type: ignore[assignment]
        if not fields:
            raise NotFound(f"key {key_id} not found")
        return fields

    async def revoke(self, key_id: str) -> VirtualKey:
        await self._set_fields(key_id, {"status": "revoked"})
        return await self.get(key_id)

    async def _set_fields(self, key_id: str, fields: Mapping[str, str | int]) -> None:
        args = [item for pair in fields.items() for item in pair]
        async with _translated():
            updated = await self._update(keys=[record_key(key_id)], args=args)
        if not updated:
            raise NotFound(f"key {key_id} not found")

    async def check(self, key: ParsedKey, model: RequestedModel) -> Decision:
        """Decides one request in one round trip, counting it against RPM when allowed."""
        args = [key.digest, self.clock(), model.kind.value, model.name, WINDOW_MS]
        async with _translated():
            reply = await self._check(keys=[record_key(key.key_id)], args=args)
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
        if not hmac.compare_digest(fields.get("hash", ""), key.digest):
            return Reason.INVALID_API_KEY, None
        record = _to_virtual_key(key.key_id, fields)
        status = record.status(self.clock())
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
        ]
        async with _translated():
            status, spent, budget = await self._report(keys=keys, args=args)
        if int(status) == 0:
            raise NotFound(f"key {report.key_id} not found")
        duplicate = int(status) == 2
        return ReportResult(
            duplicate=duplicate,
            cost_nanos=0 if duplicate else report.cost_nanos,
            spent_nanos=int(spent),
            max_budget_nanos=int(budget),
            total_tokens=report.total_tokens,
        )


def _to_virtual_key(key_id: str, f: Mapping[str, str]) -> VirtualKey:
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
        spent_nanos=int(f.get("spent", 0)),
        tpm_limit=int(f.get("tpm_limit", 0)),
        rpm_limit=int(f.get("rpm_limit", 0)),
        metadata=json.loads(f.get("metadata", "{}")),
        last_used_ms=int(f.get("last_used", 0)),
        total_requests=int(f.get("total_requests", 0)),
        window_start_ms=int(f.get("win_start", 0)),
        window_requests=int(f.get("win_requests", 0)),
        window_tokens=int(f.get("win_tokens", 0)),
    )
