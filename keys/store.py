"""The store's operations: one method per thing the servers ask of Redis.

Where things live: key names and field layout in keys/keyspace.py, the Lua scripts and
their reply types in keys/scripts.py, connections and the transport seam in
keys/connection.py. Each operation on one key is one script, so one round trip and one
Redis Cluster slot (docs/design.md).
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from keys import keygen, keyspace, scripts
from keys.budget import next_month_start_ms
from keys.connection import REDIS_ERRORS, Arg, RedisBridge, translated, unavailable
from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.keygen import ParsedKey
from keys.model import (
    WINDOW_MS,
    Decision,
    KeySpec,
    KeyUpdate,
    LimitHit,
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
from keys.scripts import CheckCode, ReportCode, Script

Clock = Callable[[], int]
"""Milliseconds since the epoch; injected so tests control time without sleeping."""


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


_REASONS = {
    CheckCode.ALLOWED: Reason.OK,
    CheckCode.UNKNOWN_KEY: Reason.INVALID_API_KEY,
    CheckCode.REVOKED: Reason.KEY_REVOKED,
    CheckCode.EXPIRED: Reason.KEY_EXPIRED,
    CheckCode.MODEL_NOT_ALLOWED: Reason.MODEL_NOT_ALLOWED,
    CheckCode.BUDGET_SPENT: Reason.BUDGET_EXCEEDED,
    CheckCode.OVER_RPM: Reason.RATE_LIMIT_EXCEEDED,
    CheckCode.OVER_TPM: Reason.RATE_LIMIT_EXCEEDED,
}
_LIMIT_HIT = {CheckCode.OVER_RPM: LimitHit.RPM, CheckCode.OVER_TPM: LimitHit.TPM}
_ID_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Page:
    keys: tuple[VirtualKey, ...]
    next_token: str


class KeyStore:
    def __init__(
        self,
        redis: RedisBridge,
        *,
        clock: Clock = wall_clock_ms,
        dedup_ttl_s: int = 172_800,
        usage_retention_days: int = 90,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.dedup_ttl_s = dedup_ttl_s
        self.usage_ttl_s = (usage_retention_days + 1) * 86_400

    async def _run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await self.redis.scripts.run(script, keys, args)
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc

    async def load_scripts(self) -> None:
        """Loads every script now (after a Redis restart, before going ready)."""
        await self.redis.load_scripts(scripts.ALL)

    async def ping(self) -> bool:
        return await self.redis.ping()

    # --- the hot path ------------------------------------------------------------------

    async def check(self, key: ParsedKey, model: RequestedModel) -> Decision:
        """Decides one request in one round trip, counting it against RPM when allowed."""
        now = self.clock()
        args: list[Arg] = [
            key.digest,
            now,
            model.kind.value,
            model.name,
            WINDOW_MS,
            next_month_start_ms(now),
        ]
        reply = scripts.decode_check(
            await self._run(scripts.CHECK, [keyspace.record_key(key.key_id)], args)
        )
        reason = _REASONS[reply.code]
        if reply.code in (CheckCode.ALLOWED, CheckCode.OVER_RPM, CheckCode.OVER_TPM):
            return Decision(
                reason,
                key_id=key.key_id,
                user_id=reply.user_id,
                team_id=reply.team_id,
                rpm=WindowCount(reply.rpm_limit, reply.requests, reply.reset_ms),
                tpm=WindowCount(reply.tpm_limit, reply.tokens, reply.reset_ms),
                limit_hit=_LIMIT_HIT.get(reply.code),
            )
        return Decision(reason, key.key_id)

    async def authenticate(self, key: ParsedKey) -> Reason:
        """The key's own steps of a Check (secret, status, expiry), counting nothing: what
        a request must pass before its body is worth parsing."""
        reply = await self._run(
            scripts.AUTHENTICATE, [keyspace.record_key(key.key_id)], [key.digest, self.clock()]
        )
        return _REASONS[scripts.decode_authenticate(reply)]

    async def report_usage(self, report: UsageReport) -> ReportResult:
        now = self.clock()
        keys = [
            keyspace.record_key(report.key_id),
            keyspace.request_marker_key(report.key_id, report.request_id),
            keyspace.usage_day_key(report.key_id, keyspace.utc_day(now)),
        ]
        args: list[Arg] = [
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
        reply = scripts.decode_report(await self._run(scripts.REPORT_USAGE, keys, args))
        if reply.code is ReportCode.UNKNOWN_KEY:
            raise NotFound(f"key {report.key_id} not found")
        if reply.code is ReportCode.OVERFLOW:
            raise InvalidArgument(
                "this charge would overflow the key's spend or token counters (about $9 "
                "billion / 9e18 tokens)"
            )
        duplicate = reply.code is ReportCode.DUPLICATE
        return ReportResult(
            duplicate=duplicate,
            cost_nanos=0 if duplicate else report.cost_nanos,
            spent_nanos=reply.spent_nanos,
            max_budget_nanos=reply.max_budget_nanos,
            total_tokens=report.total_tokens,
        )

    # --- key lifecycle -----------------------------------------------------------------

    async def create(self, spec: KeySpec, prefix: str) -> tuple[str, VirtualKey]:
        """Stores a new key; returns the full key (shown once) and its record."""
        now = self.clock()
        for _ in range(_ID_ATTEMPTS):
            key_id = keygen.new_key_id()
            full_key = keygen.format_key(prefix, key_id, keygen.new_secret())
            record = keyspace.new_record(spec, keygen.digest(full_key), now)
            created = scripts.decode_done(
                await self._run(
                    scripts.CREATE, [keyspace.record_key(key_id)], keyspace.flatten(record)
                )
            )
            if created:
                await self._index(key_id, now, spec.user_id, spec.team_id)
                return full_key, await self.get(key_id)
        raise StoreUnavailable("could not draw an unused key id")  # pragma: no cover

    async def _index(self, key_id: str, created_ms: int, user_id: str, team_id: str) -> None:
        """After the record exists: a crash in between leaves a key that works but is not
        listed, never a listed key that does not exist."""
        indexes = keyspace.live_indexes(user_id, team_id)
        indexes += keyspace.history_indexes(user_id, team_id)
        async with translated(), self.redis.client.pipeline(transaction=True) as pipe:
            for index in indexes:
                pipe.zadd(index, {key_id: created_ms})
            await pipe.execute()

    async def get(self, key_id: str) -> VirtualKey:
        return keyspace.to_virtual_key(key_id, await self._fetch(key_id), self.clock())

    async def _fetch(self, key_id: str) -> dict[str, str]:
        async with translated():
            fields: dict[str, str] = await self.redis.client.hgetall(keyspace.record_key(key_id))  # type: ignore[assignment]
        if not fields:
            raise NotFound(f"key {key_id} not found")
        return fields

    async def revoke(self, key_id: str) -> VirtualKey:
        await self._set_fields(key_id, keyspace.REVOKED_FIELDS)
        return await self.get(key_id)

    async def update(self, key_id: str, change: KeyUpdate) -> VirtualKey:
        fields = keyspace.changed_fields(change, self.clock())
        if fields:
            await self._set_fields(key_id, fields)
        return await self.get(key_id)

    async def _set_fields(self, key_id: str, fields: Mapping[str, str | int]) -> None:
        updated = scripts.decode_done(
            await self._run(scripts.UPDATE, [keyspace.record_key(key_id)], keyspace.flatten(fields))
        )
        if not updated:
            raise NotFound(f"key {key_id} not found")

    async def rotate(self, key_id: str, prefix: str, grace_ms: int) -> tuple[str, VirtualKey]:
        """A new secret under the same id; the old one works for `grace_ms` more."""
        full_key = keygen.format_key(prefix, key_id, keygen.new_secret())
        until = self.clock() + grace_ms if grace_ms > 0 else 0
        rotated = scripts.decode_done(
            await self._run(
                scripts.ROTATE, [keyspace.record_key(key_id)], [keygen.digest(full_key), until]
            )
        )
        if not rotated:
            raise NotFound(f"key {key_id} not found")
        return full_key, await self.get(key_id)

    async def delete(self, key_id: str) -> None:
        """Removes the record and its live index entries; usage history stays."""
        key = await self.get(key_id)
        async with translated():
            async with self.redis.client.pipeline(transaction=True) as pipe:
                for index in keyspace.live_indexes(key.user_id, key.team_id):
                    pipe.zrem(index, key_id)
                await pipe.execute()
            await self.redis.client.delete(keyspace.record_key(key_id))

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
        record = keyspace.to_virtual_key(key.key_id, fields, now)
        status = record.status(now)
        if status is Status.REVOKED:
            return Reason.KEY_REVOKED, record
        if status is Status.EXPIRED:
            return Reason.KEY_EXPIRED, record
        if record.budget_remaining_nanos == 0:
            return Reason.BUDGET_EXCEEDED, record
        return Reason.OK, record

    # --- listing and usage -------------------------------------------------------------

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
            keyspace.index_key("user", user_id)
            if user_id
            else keyspace.index_key("team", team_id)
            if team_id
            else keyspace.INDEX_ALL
        )
        cursor = keyspace.decode_cursor(page_token) if page_token else None
        now = self.clock()
        found: list[VirtualKey] = []
        last: tuple[int, str] | None = None
        async with translated():
            while len(found) < page_size:
                batch = await self._index_after(index, cursor, page_size * 2)
                if not batch:
                    return Page(tuple(found), "")
                records = await self._fetch_many([key_id for key_id, _ in batch])
                for (key_id, score), fields in zip(batch, records, strict=True):
                    cursor = (score, key_id)
                    if not fields:
                        continue  # deleted between the index read and now
                    key = keyspace.to_virtual_key(key_id, fields, now)
                    if team_id and key.team_id != team_id:
                        continue
                    if status is not None and key.status(now) is not status:
                        continue
                    found.append(key)
                    last = cursor
                    if len(found) == page_size:
                        break
            more = bool(await self._index_after(index, last, 1)) if last else False
        return Page(tuple(found), keyspace.encode_cursor(*last) if last and more else "")

    async def _index_after(
        self, index: str, cursor: tuple[int, str] | None, count: int
    ) -> list[tuple[str, int]]:
        """Up to `count` (id, created_ms) entries after the cursor, in (score, id) order."""
        client = self.redis.client
        rows: list[tuple[str, float]]
        if cursor is None:
            rows = await client.zrange(index, 0, count - 1, withscores=True)  # type: ignore[assignment]
            return [(m, int(sc)) for m, sc in rows]
        score, key_id = cursor
        ties: list[str] = await client.zrangebyscore(index, score, score)  # type: ignore[assignment]
        after = [(m, score) for m in sorted(ties) if m > key_id][:count]
        if len(after) < count:
            rows = await client.zrangebyscore(  # type: ignore[assignment]
                index, f"({score}", "+inf", start=0, num=count - len(after), withscores=True
            )
            after.extend((m, int(sc)) for m, sc in rows)
        return after

    async def _fetch_many(self, key_ids: Iterable[str]) -> list[dict[str, str]]:
        async with self.redis.client.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                pipe.hgetall(keyspace.record_key(key_id))
            results: list[dict[str, str]] = await pipe.execute()
        return results

    async def key_ids_of(self, *, user_id: str = "", team_id: str = "") -> list[str]:
        """Every key the user or team ever had (deleted ones too), for usage totals."""
        index = (
            keyspace.index_key("user-hist", user_id)
            if user_id
            else keyspace.index_key("team-hist", team_id)
        )
        async with translated():
            members: list[str] = await self.redis.client.zrange(index, 0, -1)  # type: ignore[assignment]
        return members

    async def usage(self, key_ids: Iterable[str], days: int) -> UsageSummary:
        """Daily rollups for the last `days` UTC days (today included), summed over keys."""
        ids = list(key_ids)
        today = keyspace.utc_day(self.clock())
        dates = [today - timedelta(days=offset) for offset in range(days - 1, -1, -1)]
        async with translated(), self.redis.client.pipeline(transaction=False) as pipe:
            for key_id in ids:
                for day in dates:
                    pipe.hgetall(keyspace.usage_day_key(key_id, day))
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
