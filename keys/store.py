"""The store's operations: one method per thing the servers ask of Redis.

Where things live: the per-request hot path (Check, reservations, usage reports) in
keys/money_path.py, which KeyStore extends with the admin operations; key names and field
layout in keys/keyspace.py; the Lua scripts and their reply types in keys/scripts.py;
connections and the transport seam in keys/connection.py. Each operation on one key is one
script, so one round trip and one Redis Cluster slot (docs/design.md).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from keys import keygen, keyspace, scripts
from keys.connection import translated
from keys.errors import NotFound, StoreUnavailable
from keys.keygen import ParsedKey
from keys.model import (
    KeySpec,
    KeyUpdate,
    Reason,
    Status,
    UsageRow,
    UsageSummary,
    VirtualKey,
)
from keys.money_path import Clock, MoneyPath, wall_clock_ms

__all__ = ["Clock", "KeyStore", "Page", "wall_clock_ms"]
_ID_ATTEMPTS = 5
_EXPIRED_SHOWN = 1000  # expired reservations read per key by GetKey (the scripts reap)


@dataclass(frozen=True, slots=True)
class Page:
    keys: tuple[VirtualKey, ...]
    next_token: str


class KeyStore(MoneyPath):
    """The hot path (MoneyPath) and every admin operation on keys."""

    async def load_scripts(self) -> None:
        """Loads every script now (after a Redis restart, before going ready)."""
        await self.redis.load_scripts(scripts.ALL)

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

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
                    scripts.CREATE,
                    [keyspace.record_key(key_id), *self._ledger_keys(key_id)],
                    [now, *keyspace.flatten(record)],
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
        now = self.clock()
        async with translated():
            (key,) = await self._read_keys([key_id], now)
        if key is None:
            raise NotFound(f"key {key_id} not found")
        return key

    async def _fetch(self, key_id: str) -> dict[str, str]:
        async with translated():
            fields: dict[str, str] = await self.redis.client.hgetall(keyspace.record_key(key_id))  # type: ignore[assignment]
        if not fields:
            raise NotFound(f"key {key_id} not found")
        return fields

    async def _read_keys(self, key_ids: Sequence[str], now: int) -> list[VirtualKey | None]:
        """Records as of `now`, with their open reservations (None: no such key)."""
        async with self.redis.client.pipeline(transaction=False) as pipe:
            for key_id in key_ids:
                inflight = keyspace.inflight_key(key_id)
                pipe.hgetall(keyspace.record_key(key_id))
                pipe.zcount(inflight, f"({now}", "+inf")
                pipe.zrangebyscore(inflight, "-inf", now, start=0, num=_EXPIRED_SHOWN)
            results: list[Any] = await pipe.execute()
        return [
            keyspace.to_virtual_key(
                key_id, fields, now, in_flight=int(in_flight), expired_ids=list(expired)
            )
            if fields
            else None
            for key_id, fields, in_flight, expired in zip(
                key_ids, results[0::3], results[1::3], results[2::3], strict=True
            )
        ]

    async def revoke(self, key_id: str) -> VirtualKey:
        await self._set_fields(key_id, keyspace.REVOKED_FIELDS, keyspace.REVOKED_EVENT)
        return await self.get(key_id)

    async def update(self, key_id: str, change: KeyUpdate) -> VirtualKey:
        fields = keyspace.changed_fields(change, self.clock())
        if fields:
            await self._set_fields(key_id, fields, keyspace.UPDATED_EVENT)
        return await self.get(key_id)

    async def _set_fields(self, key_id: str, fields: Mapping[str, str | int], event: str) -> None:
        """`event` names the change in the ledger: updated, or revoked."""
        updated = scripts.decode_done(
            await self._run(
                scripts.UPDATE,
                [keyspace.record_key(key_id), *self._ledger_keys(key_id)],
                [self.clock(), event, *keyspace.flatten(fields)],
            )
        )
        if not updated:
            raise NotFound(f"key {key_id} not found")

    async def rotate(self, key_id: str, prefix: str, grace_ms: int) -> tuple[str, VirtualKey]:
        """A new secret under the same id; the old one works for `grace_ms` more."""
        full_key = keygen.format_key(prefix, key_id, keygen.new_secret())
        now = self.clock()
        until = now + grace_ms if grace_ms > 0 else 0
        rotated = scripts.decode_done(
            await self._run(
                scripts.ROTATE,
                [keyspace.record_key(key_id), *self._ledger_keys(key_id)],
                [keygen.digest(full_key), until, now],
            )
        )
        if not rotated:
            raise NotFound(f"key {key_id} not found")
        return full_key, await self.get(key_id)

    async def delete(self, key_id: str) -> None:
        """Removes the live index entries, then the record, its reservations and windows
        (delete.lua, which tells the ledger); usage history stays. The script finding no
        record (a retry after its first run, or a concurrent delete) is not an error: the
        key is gone, as asked."""
        key = await self.get(key_id)
        async with translated(), self.redis.client.pipeline(transaction=True) as pipe:
            for index in keyspace.live_indexes(key.user_id, key.team_id):
                pipe.zrem(index, key_id)
            await pipe.execute()
        await self._run(
            scripts.DELETE,
            [
                keyspace.record_key(key_id),
                keyspace.inflight_key(key_id),
                keyspace.model_windows_key(key_id),
                *self._ledger_keys(key_id),
            ],
            [self.clock()],
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
                records = await self._read_keys([key_id for key_id, _ in batch], now)
                for (key_id, score), key in zip(batch, records, strict=True):
                    cursor = (score, key_id)
                    if key is None:
                        continue  # deleted between the index read and now
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
