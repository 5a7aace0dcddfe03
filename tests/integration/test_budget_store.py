"""BudgetStore against a real redis-server, time controlled by hand: what SetBudget keeps
and resets, and how a budget reads while its counters move (the counters are written the
way the check and report scripts write them)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from keys import keyspace
from keys.budget import NO_PERIOD, next_month_start_ms, parse_duration
from keys.budgets import BudgetSpec, BudgetStore
from keys.connection import RedisBridge
from keys.errors import NotFound
from tests.conftest import ManualClock

pytestmark = pytest.mark.integration
DAY_MS = 86_400_000
USD = 1_000_000_000


@pytest.fixture(params=["redis-py", "pipelined"])
async def budgets(
    redis_url: str, clock: ManualClock, request: pytest.FixtureRequest
) -> AsyncIterator[BudgetStore]:
    """Over both script paths, as the `store` fixture runs KeyStore."""
    redis = RedisBridge.from_url(redis_url, timeout_s=2, transport=request.param)
    yield BudgetStore(redis, clock=clock)
    await redis.aclose()


def team_spec(**changes: object) -> BudgetSpec:
    spec = BudgetSpec(
        scope="team",
        id=f"team-{uuid.uuid4().hex[:12]}",
        max_budget_nanos=5 * USD,
        budget=parse_duration("30d"),
        rpm_limit=100,
        tpm_limit=0,
        max_parallel=3,
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


async def hset(budgets: BudgetStore, spec: BudgetSpec, **fields: int) -> None:
    for name, value in fields.items():
        await budgets.redis.client.hset(keyspace.level_key(spec.scope, spec.id), name, value)


async def test_new_budget_starts_with_zero_counters_and_its_first_period(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    spec = team_spec()
    got = await budgets.set(spec)
    assert (got.max_budget_nanos, got.rpm_limit, got.tpm_limit, got.max_parallel) == (
        5 * USD,
        100,
        0,
        3,
    )
    assert (got.spent_nanos, got.reserved_nanos, got.in_flight) == (0, 0, 0)
    assert got.budget == spec.budget and got.budget_remaining_nanos == 5 * USD
    assert got.created_at_ms == clock.now_ms
    assert got.budget_reset_at_ms == clock.now_ms + 30 * DAY_MS


async def test_new_record_has_every_field_the_check_script_reads(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    spec = team_spec()
    await budgets.set(spec)
    record = await budgets.redis.client.hgetall(keyspace.level_key("team", spec.id))
    assert record == {
        "max_budget": str(5 * USD),
        "spent": "0",
        "reserved": "0",
        "budget_duration": "30d",
        "budget_period_ms": str(30 * DAY_MS),
        "budget_reset_at": str(clock.now_ms + 30 * DAY_MS),
        "rpm_limit": "100",
        "tpm_limit": "0",
        "max_parallel": "3",
        "win_start": "0",
        "win_requests": "0",
        "win_tokens": "0",
        "created_at": str(clock.now_ms),
    }


async def test_setting_again_changes_the_limits_and_keeps_the_counters(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    spec = team_spec()
    created = await budgets.set(spec)
    await hset(budgets, spec, spent=2 * USD, reserved=USD, win_start=clock.now_ms, win_requests=7)
    clock.advance(60)
    changed = await budgets.set(replace(spec, max_budget_nanos=9 * USD, rpm_limit=5))
    assert (changed.max_budget_nanos, changed.rpm_limit) == (9 * USD, 5)
    assert (changed.spent_nanos, changed.reserved_nanos) == (2 * USD, USD)
    assert changed.created_at_ms == created.created_at_ms
    record = await budgets.redis.client.hgetall(keyspace.level_key("team", spec.id))
    assert (record["win_start"], record["win_requests"]) == (str(created.created_at_ms), "7")


async def test_same_duration_keeps_the_current_period(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    spec = team_spec()
    first = await budgets.set(spec)
    clock.advance(3600)
    again = await budgets.set(replace(spec, rpm_limit=1))
    assert again.budget_reset_at_ms == first.budget_reset_at_ms


async def test_new_duration_starts_its_first_period_now(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    spec = team_spec()
    await budgets.set(spec)
    clock.advance(3600)
    changed = await budgets.set(replace(spec, budget=parse_duration("1d")))
    assert changed.budget.duration == "1d"
    assert changed.budget_reset_at_ms == clock.now_ms + DAY_MS


async def test_monthly_duration_resets_at_the_next_calendar_month(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    got = await budgets.set(team_spec(budget=parse_duration("1mo")))
    assert got.budget_reset_at_ms == next_month_start_ms(clock.now_ms)


async def test_dropping_the_duration_stops_resets(budgets: BudgetStore) -> None:
    spec = team_spec()
    await budgets.set(spec)
    got = await budgets.set(replace(spec, budget=NO_PERIOD))
    assert (got.budget.duration, got.budget_reset_at_ms) == ("", 0)


async def test_an_ended_period_reads_as_nothing_spent(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    spec = team_spec(budget=parse_duration("1d"))
    await budgets.set(spec)
    await hset(budgets, spec, spent=4 * USD)
    clock.advance(86_400 + 1)
    got = await budgets.get("team", spec.id)
    assert got.spent_nanos == 0
    assert got.budget_reset_at_ms > clock.now_ms


async def test_expired_reservations_no_longer_count_as_reserved_or_in_flight(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    spec = team_spec()
    await budgets.set(spec)
    now = clock.now_ms
    open_ = keyspace.reservation_id("aa", USD)
    expired = keyspace.reservation_id("bb", 2 * USD)
    await hset(budgets, spec, reserved=3 * USD)
    await budgets.redis.client.zadd(
        keyspace.level_inflight_key("team", spec.id), {open_: now + 60_000, expired: now}
    )
    got = await budgets.get("team", spec.id)
    assert (got.reserved_nanos, got.in_flight) == (USD, 1)
    assert got.budget_remaining_nanos == 4 * USD


async def test_reserved_never_reads_below_zero(budgets: BudgetStore, clock: ManualClock) -> None:
    spec = team_spec()
    await budgets.set(spec)
    stale = keyspace.reservation_id("cc", 2 * USD)
    await budgets.redis.client.zadd(
        keyspace.level_inflight_key("team", spec.id), {stale: clock.now_ms - 1}
    )
    assert (await budgets.get("team", spec.id)).reserved_nanos == 0


async def test_no_max_budget_has_no_remaining(budgets: BudgetStore) -> None:
    got = await budgets.set(team_spec(max_budget_nanos=0))
    assert got.budget_remaining_nanos is None


async def test_list_is_oldest_first_and_only_the_scope_asked(
    budgets: BudgetStore, clock: ManualClock
) -> None:
    made = []
    for _ in range(3):
        made.append((await budgets.set(team_spec())).id)
        clock.advance(1)
    user = await budgets.set(team_spec(scope="user"))
    listed = [b.id for b in await budgets.list("team")]
    assert [i for i in listed if i in made] == made
    assert user.id not in listed


async def test_delete_removes_record_reservations_and_index_entry(budgets: BudgetStore) -> None:
    spec = team_spec()
    await budgets.set(spec)
    inflight = keyspace.level_inflight_key("team", spec.id)
    await budgets.redis.client.zadd(inflight, {keyspace.reservation_id("dd", 1): 2**50})
    await budgets.delete("team", spec.id)
    client = budgets.redis.client
    assert await client.exists(keyspace.level_key("team", spec.id), inflight) == 0
    assert await client.zscore(keyspace.budgets_index_key("team"), spec.id) is None
    with pytest.raises(NotFound):
        await budgets.get("team", spec.id)


async def test_delete_of_a_missing_budget_is_not_found(budgets: BudgetStore) -> None:
    with pytest.raises(NotFound):
        await budgets.delete("user", f"nobody-{uuid.uuid4().hex}")


async def test_a_record_deleted_behind_the_index_is_not_listed(budgets: BudgetStore) -> None:
    spec = team_spec()
    await budgets.set(spec)
    await budgets.redis.client.delete(keyspace.level_key("team", spec.id))
    assert spec.id not in [b.id for b in await budgets.list("team")]


async def test_set_puts_back_a_lost_index_entry(budgets: BudgetStore) -> None:
    spec = team_spec()
    await budgets.set(spec)
    await budgets.redis.client.zrem(keyspace.budgets_index_key("team"), spec.id)
    await budgets.set(spec)
    assert spec.id in [b.id for b in await budgets.list("team")]
