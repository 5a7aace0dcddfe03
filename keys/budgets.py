"""Budgets above keys: one per user or team, kept in Redis beside the key records.

A request passes only when its key and every budget above it pass; the check and report
scripts enforce that. This module is the admin side: what a budget is, the checks on what
an admin sends, and `BudgetStore`, which creates, changes, reads and removes the records
(keys/keyspace.py names them; keys/lua/set_budget.lua lists the fields).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keys import keyspace, validation
from keys.budget import NO_PERIOD, BudgetPeriod, current_reset_ms, first_reset_ms, parse_duration
from keys.connection import REDIS_ERRORS, Arg, RedisBridge, translated, unavailable
from keys.errors import InvalidArgument, NotFound
from keys.scripts import SET_BUDGET
from keys.store import Clock, wall_clock_ms

_READ_BATCH = 256  # budgets read per pipeline by list()


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """What SetBudget stores, checked. 0 means no budget / no limit."""

    scope: str  # "user" or "team"
    id: str  # the user_id or team_id keys carry
    max_budget_nanos: int
    budget: BudgetPeriod
    rpm_limit: int
    tpm_limit: int
    max_parallel: int


@dataclass(frozen=True, slots=True)
class LevelBudget:
    """A budget as of one instant: its configuration and what is charged against it."""

    scope: str
    id: str
    max_budget_nanos: int
    budget: BudgetPeriod
    rpm_limit: int
    tpm_limit: int
    max_parallel: int
    spent_nanos: int  # in the current period: 0 once a period has ended
    reserved_nanos: int  # held by open, unexpired reservations
    in_flight: int  # open, unexpired reservations
    budget_reset_at_ms: int  # 0: never resets
    created_at_ms: int

    @property
    def budget_remaining_nanos(self) -> int | None:
        """None without a budget; what is reserved counts as spent until it settles."""
        if self.max_budget_nanos == 0:
            return None
        return max(self.max_budget_nanos - self.spent_nanos - self.reserved_nanos, 0)


# --- checks on what an admin sends -----------------------------------------------------


def checked_scope(value: str) -> str:
    if value not in keyspace.SCOPES:
        allowed = " or ".join(f'"{s}"' for s in keyspace.SCOPES)
        raise InvalidArgument(f"scope must be {allowed}, not {value[:32]!r}")
    return value


def checked_id(value: str) -> str:
    """The rules a key's user_id and team_id follow, so every id a key can carry can have
    a budget."""
    return validation.text("id", value, required=True, max_chars=validation.MAX_ID_CHARS)


def budget_spec(
    scope: str,
    scope_id: str,
    *,
    max_budget: float,
    budget_duration: str,
    rpm_limit: int,
    tpm_limit: int,
    max_parallel_requests: int,
) -> BudgetSpec:
    """SetBudget's fields, checked; errors name the wire field."""
    return BudgetSpec(
        scope=checked_scope(scope),
        id=checked_id(scope_id),
        max_budget_nanos=validation.budget("max_budget", max_budget),
        budget=parse_duration(budget_duration),
        rpm_limit=validation.limit("rpm_limit", rpm_limit),
        tpm_limit=validation.limit("tpm_limit", tpm_limit),
        max_parallel=validation.limit("max_parallel_requests", max_parallel_requests),
    )


# --- the record ------------------------------------------------------------------------


def _int(fields: Mapping[str, str], name: str) -> int:
    return int(fields.get(name) or 0)


def to_level_budget(
    scope: str,
    scope_id: str,
    fields: Mapping[str, str],
    in_flight: int,
    expired: Iterable[str],
    now_ms: int,
) -> LevelBudget:
    """The record as of `now_ms`. A period that has ended reads as reset, as the next script
    call will make it; `expired` (reservations past their expiry that no script has reaped
    yet) no longer count as reserved."""
    reset_at = _int(fields, "budget_reset_at")
    period_ms = _int(fields, "budget_period_ms")
    duration = fields.get("budget_duration", "")
    return LevelBudget(
        scope=scope,
        id=scope_id,
        max_budget_nanos=_int(fields, "max_budget"),
        budget=BudgetPeriod(duration, period_ms) if duration else NO_PERIOD,
        rpm_limit=_int(fields, "rpm_limit"),
        tpm_limit=_int(fields, "tpm_limit"),
        max_parallel=_int(fields, "max_parallel"),
        spent_nanos=0 if reset_at and now_ms >= reset_at else _int(fields, "spent"),
        reserved_nanos=keyspace.live_reserved(fields.get("reserved"), list(expired)),
        in_flight=in_flight,
        budget_reset_at_ms=current_reset_ms(reset_at, period_ms, now_ms),
        created_at_ms=_int(fields, "created_at"),
    )


class BudgetStore:
    """Admin operations on user and team budgets. Scopes and ids are checked by the caller
    (`checked_scope`, `checked_id`).

    A budget's record and its open reservations share one hash tag (one Cluster slot), so
    SetBudget is one script; the per-scope index sits under `{vkidx}` and is written after
    the record, as KeyStore does: a crash in between leaves a budget that is enforced but
    not listed, never a listed budget that does not exist."""

    def __init__(self, redis: RedisBridge, *, clock: Clock = wall_clock_ms) -> None:
        self.redis = redis
        self.clock = clock

    async def set(self, spec: BudgetSpec) -> LevelBudget:
        """Creates the budget, or rewrites its configuration and keeps what it has counted."""
        now = self.clock()
        args: list[Arg] = [
            now,
            spec.max_budget_nanos,
            spec.budget.duration,
            spec.budget.period_ms,
            first_reset_ms(spec.budget, now),
            spec.rpm_limit,
            spec.tpm_limit,
            spec.max_parallel,
        ]
        try:
            reply = await self.redis.scripts.run(
                SET_BUDGET, [keyspace.level_key(spec.scope, spec.id)], args
            )
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc
        created_at = int(reply[1])
        async with translated():
            # also on a change: puts back an entry a crash after the script left out
            await self.redis.client.zadd(
                keyspace.budgets_index_key(spec.scope), {spec.id: created_at}
            )
        return await self.get(spec.scope, spec.id)

    async def get(self, scope: str, scope_id: str) -> LevelBudget:
        [found] = await self._read(scope, [scope_id], self.clock(), transaction=True)
        if found is None:
            raise _missing(scope, scope_id)
        return found

    async def delete(self, scope: str, scope_id: str) -> None:
        """Removes the record, its open reservations and its index entry: requests still in
        flight hold nothing at this level any more."""
        record = keyspace.level_key(scope, scope_id)
        async with translated():
            if not await self.redis.client.exists(record):
                raise _missing(scope, scope_id)
            await self.redis.client.zrem(keyspace.budgets_index_key(scope), scope_id)
            await self.redis.client.delete(*keyspace.level_keys(scope, scope_id))

    async def list(self, scope: str) -> builtins.list[LevelBudget]:
        """Every budget of the scope, oldest first."""
        async with translated():
            ids: builtins.list[str] = await self.redis.client.zrange(  # type: ignore[assignment]
                keyspace.budgets_index_key(scope), 0, -1
            )
        now = self.clock()
        found: builtins.list[LevelBudget] = []
        for start in range(0, len(ids), _READ_BATCH):
            batch = await self._read(scope, ids[start : start + _READ_BATCH], now)
            found.extend(b for b in batch if b is not None)  # None: deleted meanwhile
        return found

    async def _read(
        self, scope: str, ids: Sequence[str], now: int, *, transaction: bool = False
    ) -> builtins.list[LevelBudget | None]:
        """Each budget's record, in-flight count and expired reservations; None for a
        budget that does not exist. One budget's three reads touch one slot, so they can
        be one transaction: a consistent snapshot of it."""
        async with translated(), self.redis.client.pipeline(transaction=transaction) as pipe:
            for scope_id in ids:
                inflight = keyspace.level_inflight_key(scope, scope_id)
                pipe.hgetall(keyspace.level_key(scope, scope_id))
                pipe.zcount(inflight, f"({now}", "+inf")
                pipe.zrangebyscore(inflight, "-inf", now)
            replies: builtins.list[Any] = await pipe.execute()
        per_budget = zip(replies[0::3], replies[1::3], replies[2::3], strict=True)
        return [
            to_level_budget(scope, scope_id, fields, int(in_flight), expired, now)
            if fields
            else None
            for scope_id, (fields, in_flight, expired) in zip(ids, per_budget, strict=True)
        ]


def _missing(scope: str, scope_id: str) -> NotFound:
    return NotFound(f"no budget for {scope} {scope_id!r}")
