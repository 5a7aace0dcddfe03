"""The hot path: a Check and its reservation, a usage report and its settlement, at the
key and at every budget above it (docs/design.md section 6).

`MoneyPath` holds what the servers call per request; `KeyStore` (keys/store.py) adds the
admin operations on top. On one Redis each call is one script (the budgets above the key
passed inline); on Redis Cluster the budgets run in scripts of their own slots, and a
refusal is compensated.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import lru_cache
from typing import Any

from keys import alert_stream, keyspace, ledger_stream, scripts
from keys.budget import next_month_start_ms
from keys.connection import REDIS_ERRORS, Arg, RedisBridge, unavailable
from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.keygen import ParsedKey
from keys.model import (
    WINDOW_MS,
    BodyModel,
    Decision,
    Level,
    LimitHit,
    Reason,
    ReportResult,
    RequestedModel,
    UsageReport,
    WindowCount,
)
from keys.scripts import CheckCode, CheckReply, ReportCode, Script, Settled, Shortfall

log = logging.getLogger("keys.money_path")
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
    CheckCode.MODEL_NOT_PRICED: Reason.MODEL_NOT_PRICED,
    CheckCode.CONCURRENCY: Reason.CONCURRENCY_LIMIT_EXCEEDED,
}
_LIMIT_HIT = {CheckCode.OVER_RPM: LimitHit.RPM, CheckCode.OVER_TPM: LimitHit.TPM}
_IDENTITY = (CheckCode.UNKNOWN_KEY, CheckCode.REVOKED, CheckCode.EXPIRED)
_LEVELS_CACHED = 200_000
BUDGET_MODES = ("reserve", "after")


@lru_cache(maxsize=16)
def _levels(names: tuple[str, ...]) -> tuple[Level, ...]:
    """("key", "team") -> (Level.KEY, Level.TEAM); the few combinations, looked up once."""
    return tuple(Level(name) for name in names)


def _release_targets(
    key_id: str, request_id: str, scopes: Sequence[tuple[str, str]]
) -> list[tuple[list[str], str]]:
    """(keys, member) of a request's in-flight record at the key and at `scopes`, as
    level_release.lua takes them: above the key, members name their key."""
    member = keyspace.level_member(key_id, request_id)
    return [
        ([keyspace.record_key(key_id), keyspace.inflight_key(key_id)], request_id),
        *((keyspace.level_keys(scope, scope_id), member) for scope, scope_id in scopes),
    ]


def _shortfall_fields(short: Shortfall) -> dict[str, Any]:
    """Decision fields for a failed step: where it sits and what its limit says."""
    fields: dict[str, Any] = {"level": Level(short.level)}
    if short.code in _LIMIT_HIT:
        fields["limit_hit"] = _LIMIT_HIT[short.code]
        fields["window"] = WindowCount(int(short.d1), short.d2, short.d3)
    elif short.code is CheckCode.BUDGET_SPENT:
        fields["free_nanos"] = int(short.d1 or 0)
    elif short.code is CheckCode.CONCURRENCY:
        fields["parallel_limit"] = int(short.d1 or 0)
    return fields


class MoneyPath:
    def __init__(
        self,
        redis: RedisBridge,
        *,
        clock: Clock = wall_clock_ms,
        dedup_ttl_s: int = 172_800,
        usage_retention_days: int = 90,
        budget_mode: str = "reserve",
        reservation_ttl_s: int = 900,
        abandoned_grace_s: float = 0.2,
        ledger: bool = False,
        alert_thresholds: Sequence[int] = (),
    ) -> None:
        """`ledger`: append every charge and key event to the ledger stream of the key's
        slot (a ledger sink is deployed: LEDGER_DATABASE_URL); else nothing grows.
        `alert_thresholds`: basis points of max_budget at which a charge appends a budget
        alert event (docs/design.md section 13); none: the scripts read and write nothing
        for alerts."""
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"budget mode {budget_mode!r}: use reserve or after")
        self.redis = redis
        self.clock = clock
        self.dedup_ttl_s = dedup_ttl_s
        self.usage_ttl_s = (usage_retention_days + 1) * 86_400
        self.budget_mode = budget_mode
        self.reservation_ttl_ms = reservation_ttl_s * 1000
        # how long an abandoned Check's script gets to land before its release
        self.abandoned_grace_s = abandoned_grace_s
        # key id -> (user_id, team_id): fixed for a key's life (UpdateKey cannot change
        # them, ids are never reused), so a Check can name the budgets above a key in
        # its one script call. A miss costs one extra call (the script says whose).
        self._owners: dict[str, tuple[str, str]] = {}
        self._orphans: set[asyncio.Future[int]] = set()  # releases in flight
        self.ledger = ledger
        self.alert_thresholds = alert_stream.thresholds_arg(alert_thresholds)
        # told the stream a charge appended alert events to (the deliverer, which then
        # reads it at once rather than at its next sweep)
        self.on_alert: Callable[[str], None] | None = None

    def _ledger_keys(self, key_id: str) -> list[Arg]:
        """The ledger stream of the key's slot, as the scripts take it (their last KEYS
        entry), or nothing: no ledger."""
        if not self.ledger:
            return []
        return [ledger_stream.stream_key(key_id, cluster=self.redis.cluster)]

    async def _run(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        try:
            return await self.redis.scripts.run(script, keys, args)
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc

    # --- the hot path ------------------------------------------------------------------

    async def check(
        self,
        key: ParsedKey,
        model: RequestedModel,
        *,
        reserve_nanos: int = 0,
        priced: bool = True,
        family: str = "",
    ) -> Decision:
        """Decides one request and, when it passes, counts it, reserves `reserve_nanos`
        (reserve mode) and opens its in-flight record, at the key and every budget above
        it. One round trip on a single Redis once the key's owners are known."""
        now = self.clock()
        amount = reserve_nanos if self.budget_mode == "reserve" else 0
        request_id = keyspace.reservation_id(secrets.token_hex(12), amount)
        try:
            owners = self._owners.get(key.key_id)
            reply = await self._check_script(
                key, model, now, request_id, amount, priced, owners, family
            )
            if reply.code is CheckCode.NEED_LEVELS:
                owners = self._remember(key.key_id, reply.user_id, reply.team_id)
                reply = await self._check_script(
                    key, model, now, request_id, amount, priced, owners, family
                )
                if reply.code is CheckCode.NEED_LEVELS:  # pragma: no cover (owners are fixed)
                    raise StoreUnavailable("the key's user or team changed during a Check")
            if reply.code in _IDENTITY:
                return Decision(_REASONS[reply.code], key.key_id)
            if self.redis.cluster and reply.code is CheckCode.ALLOWED:
                opens = model.kind is not BodyModel.NO_BODY
                reply = await self._admit_levels(key.key_id, reply, now, amount, priced, opens)
        except asyncio.CancelledError:
            # The caller gave up (Envoy's timeout): the script may have run, and nobody
            # will ever hear its request id. Release it now rather than after the TTL.
            orphan = asyncio.ensure_future(
                self.release(key.key_id, request_id, now, after_s=self.abandoned_grace_s)
            )
            self._orphans.add(orphan)
            orphan.add_done_callback(self._orphans.discard)
            raise
        return self._decision(key.key_id, reply)

    async def release(
        self, key_id: str, request_id: str, admitted_ms: int, *, after_s: float = 0
    ) -> int:
        """Closes a reservation no report will settle, at the key and the budgets above it
        (uncharged, its request uncounted); returns at how many levels one was open. A
        no-op where it is not open. `after_s` lets a script already on its way (on another
        connection) land first; should the release still overtake it, the reservation
        expires with the TTL like any unreported one."""
        await asyncio.sleep(after_s)
        scopes = keyspace.scopes_of(*self._owners.get(key_id, ("", "")))
        released = 0
        try:
            for keys, name in _release_targets(key_id, request_id, scopes):
                released += scripts.decode_done(
                    await self._run(scripts.LEVEL_RELEASE, keys, [name, admitted_ms, WINDOW_MS])
                )
        except StoreUnavailable:
            log.warning("could not release an abandoned reservation", extra={"key_id": key_id})
        return released

    async def _check_script(
        self,
        key: ParsedKey,
        model: RequestedModel,
        now: int,
        request_id: str,
        amount: int,
        priced: bool,
        owners: tuple[str, str] | None,
        family: str,
    ) -> CheckReply:
        keys: list[Arg] = [
            keyspace.record_key(key.key_id),
            keyspace.inflight_key(key.key_id),
            keyspace.model_windows_key(key.key_id),
        ]
        level_keys, level_args = self._levels_inline(owners)
        keys += level_keys
        args: list[Arg] = [
            key.digest,
            now,
            model.kind.value,
            model.name,
            WINDOW_MS,
            next_month_start_ms(now),
            request_id,
            amount,
            1 if priced else 0,
            self.reservation_ttl_ms,
            *level_args,
            self.budget_mode,
            0 if model.kind is BodyModel.NO_BODY else 1,
            family,
        ]
        return scripts.decode_check(await self._run(scripts.CHECK, keys, args))

    def _levels_inline(self, owners: tuple[str, str] | None) -> tuple[list[Arg], list[Arg]]:
        """The budgets above a key as check.lua and report_usage.lua take them: their keys
        (one Redis, owners known), and the arguments (mode, user id, team id). Owners not
        yet known: a user id no key has ("\n"), so the script answers whose it is."""
        if self.redis.cluster:
            return [], ["apart", "", ""]
        if owners is None:
            return [], ["inline", "\n", ""]
        keys: list[Arg] = []
        for scope, scope_id in keyspace.scopes_of(*owners):
            keys += keyspace.level_keys(scope, scope_id)
        return keys, ["inline", *owners]

    def _remember(self, key_id: str, user_id: str, team_id: str) -> tuple[str, str]:
        if len(self._owners) >= _LEVELS_CACHED:
            self._owners.clear()
        self._owners[key_id] = (user_id, team_id)
        return user_id, team_id

    async def _admit_levels(
        self, key_id: str, reply: CheckReply, now: int, amount: int, priced: bool, opens: bool
    ) -> CheckReply:
        """Redis Cluster: the user's and team's budgets, each atomic in its own slot,
        after the key admitted the request. A level that refuses is compensated: every
        level that admitted (the key included) releases the request again, so no level
        keeps a reservation or a counted request for a request that did not run. A crash
        before the release leaves a reservation the TTL frees (docs/design.md)."""
        scopes = keyspace.scopes_of(reply.user_id, reply.team_id)
        if not scopes:
            return reply
        args: list[Arg] = [
            now,
            WINDOW_MS,
            next_month_start_ms(now),
            keyspace.level_member(key_id, reply.request_id),
            amount,
            self.reservation_ttl_ms,
            1 if priced else 0,
            self.budget_mode,
            1 if opens else 0,
        ]
        replies = await asyncio.gather(
            *(self._admit_level(s, i, args) for s, i in scopes), return_exceptions=True
        )
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        levels = [
            scripts.LevelReply(False, None)
            if isinstance(r, BaseException)
            else scripts.decode_level_admit(r, scope)
            for r, (scope, _) in zip(replies, scopes, strict=True)
        ]
        refused = next((lv.short for lv in levels if lv.short), None)
        if refused is None and failed is None:
            admitted_at = [s for (s, _), lv in zip(scopes, levels, strict=True) if lv.admitted]
            return replace(reply, levels=(*reply.levels, *admitted_at))
        # refused, or a level's Redis could not answer: undo what the others admitted
        admitted = [scope for scope, lv in zip(scopes, levels, strict=True) if lv.admitted]
        await asyncio.gather(
            *(
                self._run(scripts.LEVEL_RELEASE, keys, [name, now, WINDOW_MS])
                for keys, name in _release_targets(key_id, reply.request_id, admitted)
            ),
            return_exceptions=True,  # what cannot be released now expires with the TTL
        )
        if failed is not None:
            raise failed
        assert refused is not None
        return replace(reply, code=refused.code, request_id="", short=refused)

    async def _admit_level(self, scope: str, scope_id: str, args: list[Arg]) -> Any:
        """level_admit.lua, tried twice: a failover's moved slots or reset connections
        fail one call now and then, and the script is idempotent for its request, so a
        second try cannot count it twice."""
        keys = keyspace.level_keys(scope, scope_id)
        try:
            return await self._run(scripts.LEVEL_ADMIT, keys, args)
        except StoreUnavailable:
            return await self._run(scripts.LEVEL_ADMIT, keys, args)

    def _decision(self, key_id: str, reply: CheckReply) -> Decision:
        short = reply.short
        allowed = reply.code is CheckCode.ALLOWED
        fields = _shortfall_fields(short) if short is not None else {}
        return Decision(
            _REASONS[reply.code],
            key_id=key_id,
            user_id=reply.user_id,
            team_id=reply.team_id,
            rpm=WindowCount(reply.rpm_limit, reply.requests, reply.reset_ms),
            tpm=WindowCount(reply.tpm_limit, reply.tokens, reply.reset_ms),
            request_id=reply.request_id if allowed else "",
            would_deny=_REASONS[short.code] if allowed and short is not None else None,
            expired=reply.expired,
            levels=_levels(reply.levels) if allowed else (),
            **fields,
        )

    async def authenticate(self, key: ParsedKey) -> Reason:
        """The key's own steps of a Check (secret, status, expiry), counting nothing: what
        a request must pass before its body is worth parsing."""
        reply = await self._run(
            scripts.AUTHENTICATE, [keyspace.record_key(key.key_id)], [key.digest, self.clock()]
        )
        return _REASONS[scripts.decode_authenticate(reply)]

    async def report_usage(self, report: UsageReport) -> ReportResult:
        """Charges a completed request once, at the key and every budget above it, and
        closes the reservation its request id names (settles it)."""
        now = self.clock()
        owners = self._owners.get(report.key_id)
        reply = await self._report_script(report, now, owners)
        if reply.code is ReportCode.NEED_LEVELS:
            owners = self._remember(report.key_id, reply.user_id, reply.team_id)
            reply = await self._report_script(report, now, owners)
        if reply.code is ReportCode.UNKNOWN_KEY:
            raise NotFound(f"key {report.key_id} not found")
        if reply.code is ReportCode.OVERFLOW:
            raise InvalidArgument(
                "this charge would overflow the key's spend or token counters (about $9 "
                "billion / 9e18 tokens)"
            )
        if reply.alerts:
            self._alerted(alert_stream.key_stream(report.key_id, cluster=self.redis.cluster))
        if self.redis.cluster:
            # a duplicate too: a crash after the key's charge must not leave a level
            # uncharged, and each level remembers what it charged
            await self._settle_levels(report, now, reply.user_id, reply.team_id)
        duplicate = reply.code is ReportCode.DUPLICATE
        return ReportResult(
            duplicate=duplicate,
            cost_nanos=0 if duplicate else report.cost_nanos,
            spent_nanos=reply.spent_nanos,
            max_budget_nanos=reply.max_budget_nanos,
            total_tokens=report.total_tokens,
            settled=reply.settled is Settled.CLOSED,
            expired=reply.settled is Settled.EXPIRED,
            reserved_nanos=reply.reserved_nanos,
        )

    async def _report_script(
        self, report: UsageReport, now: int, owners: tuple[str, str] | None
    ) -> scripts.ReportReply:
        keys: list[Arg] = [
            keyspace.record_key(report.key_id),
            keyspace.request_marker_key(report.key_id, report.request_id),
            keyspace.usage_day_key(report.key_id, keyspace.utc_day(now)),
            keyspace.inflight_key(report.key_id),
            keyspace.model_windows_key(report.key_id),
        ]
        level_keys, level_args = self._levels_inline(owners)
        keys += level_keys
        keys += self._ledger_keys(report.key_id)
        if self.alert_thresholds:
            keys.append(alert_stream.key_stream(report.key_id, cluster=self.redis.cluster))
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
            report.request_id,
            *level_args,
            report.family,
            report.provider,
            1 if self.ledger else 0,
            self.alert_thresholds,
        ]
        return scripts.decode_report(await self._run(scripts.REPORT_USAGE, keys, args))

    def _alerted(self, stream: str) -> None:
        if self.on_alert is not None:
            self.on_alert(stream)

    async def _settle_levels(
        self, report: UsageReport, now: int, user_id: str, team_id: str
    ) -> None:
        await asyncio.gather(
            *(
                self._settle_level(report, now, scope, scope_id)
                for scope, scope_id in keyspace.scopes_of(user_id, team_id)
            )
        )

    async def _settle_level(self, report: UsageReport, now: int, scope: str, scope_id: str) -> None:
        """level_settle.lua at one budget, in its slot, with the alert stream of that slot."""
        keys: list[Arg] = [
            *keyspace.level_keys(scope, scope_id),
            keyspace.level_marker_key(scope, scope_id, report.key_id, report.request_id),
        ]
        args: list[Arg] = [
            now,
            keyspace.level_member(report.key_id, report.request_id),
            report.cost_nanos,
            report.total_tokens,
            WINDOW_MS,
            next_month_start_ms(now),
            self.dedup_ttl_s,
        ]
        stream = ""
        if self.alert_thresholds:
            stream = alert_stream.level_stream(scope, scope_id, cluster=True)
            keys.append(stream)
            args += [self.alert_thresholds, scope, scope_id]
        reply = await self._run(scripts.LEVEL_SETTLE, keys, args)
        if scripts.decode_level_settle(reply):
            self._alerted(stream)
