"""Budget alerts (docs/design.md section 13), Redis side: the events the charge scripts
append and the marker that keeps each threshold to once per period
(test_alert_webhook.py delivers them)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from keys import alert_stream, keygen, keyspace, scripts
from keys.alert_stream import AlertEvent
from keys.budget import parse_duration
from keys.budgets import BudgetSpec, BudgetStore
from keys.connection import RedisBridge
from keys.model import KeyUpdate, UsageReport
from keys.store import KeyStore
from tests.alert_support import THRESHOLDS, events_of
from tests.conftest import ManualClock
from tests.helpers import stored_key

pytestmark = pytest.mark.integration
USD = 1_000_000_000


@pytest.fixture(params=["redis-py", "pipelined"])
async def alerting(
    redis_url: str, clock: ManualClock, request: pytest.FixtureRequest
) -> AsyncIterator[KeyStore]:
    """A store that records budget alerts (as the server does with a webhook URL)."""
    bridge = RedisBridge.from_url(redis_url, timeout_s=2, transport=request.param)
    yield KeyStore(bridge, clock=clock, alert_thresholds=THRESHOLDS)
    await bridge.aclose()


async def charge(store: KeyStore, key_id: str, request_id: str, cost_usd: float) -> int:
    """Charges `cost_usd`; returns how many alert events the script appended."""
    cost = round(cost_usd * USD)
    report = UsageReport(key_id, request_id, "gpt-4", "openai", 10, 5, 15, cost, family="gpt-4")
    reply = await store._report_script(report, store.clock(), None)
    if reply.code is scripts.ReportCode.NEED_LEVELS:
        owners = store._remember(key_id, reply.user_id, reply.team_id)
        reply = await store._report_script(report, store.clock(), owners)
    assert reply.code is scripts.ReportCode.CHARGED
    return reply.alerts


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


# --- the scripts ----------------------------------------------------------------------


async def test_each_threshold_crossed_appends_one_event_with_the_spend_that_crossed_it(
    alerting: KeyStore, clock: ManualClock
) -> None:
    key = await stored_key(alerting, max_budget_nanos=10 * USD, budget=parse_duration("30d"))
    assert await charge(alerting, key.key_id, "r1", 4.99) == 0
    assert await charge(alerting, key.key_id, "r2", 0.01) == 1  # exactly half: crossed
    assert await charge(alerting, key.key_id, "r3", 2.5) == 0
    assert await charge(alerting, key.key_id, "r4", 0.5) == 1  # 8.0
    assert await charge(alerting, key.key_id, "r5", 2.5) == 1  # 10.5: over, still once
    assert await charge(alerting, key.key_id, "r6", 1.0) == 0
    events = await events_of(alerting, "key", key.key_id)
    assert [(e.threshold_bp, e.spent_nanos) for e in events] == [
        (5000, 5 * USD),
        (8000, 8 * USD),
        (10000, 10_500_000_000),
    ]
    # a 30-day period set now: it started now
    assert {(e.max_budget_nanos, e.period_start_ms, e.ts_ms) for e in events} == {
        (10 * USD, clock.now_ms, clock.now_ms)
    }
    assert len({e.event_id for e in events}) == 3


async def test_a_charge_that_jumps_over_two_thresholds_appends_both(alerting: KeyStore) -> None:
    key = await stored_key(alerting, max_budget_nanos=2 * USD)
    assert await charge(alerting, key.key_id, "r1", 1.7) == 2
    assert [e.threshold_bp for e in await events_of(alerting, "key", key.key_id)] == [5000, 8000]
    assert await charge(alerting, key.key_id, "r2", 5) == 1
    assert [e.threshold_bp for e in await events_of(alerting, "key", key.key_id)] == [
        5000,
        8000,
        10000,
    ]


async def test_a_threshold_fires_once_per_period_and_again_after_the_period_rolls(
    alerting: KeyStore, clock: ManualClock
) -> None:
    key = await stored_key(alerting, max_budget_nanos=USD, budget=parse_duration("1d"))
    first_period = clock.now_ms
    await charge(alerting, key.key_id, "r1", 0.6)
    await charge(alerting, key.key_id, "r2", 0.1)  # 0.7: 0.5 already fired in this period
    clock.advance(86_400)
    await charge(alerting, key.key_id, "r3", 0.55)  # the new period: spent 0.55
    events = await events_of(alerting, "key", key.key_id)
    assert [(e.threshold_bp, e.period_start_ms) for e in events] == [
        (5000, first_period),
        (5000, first_period + 86_400_000),
    ]
    assert events[0].event_id != events[1].event_id


async def test_a_changed_max_budget_alerts_afresh_against_the_new_budget(
    alerting: KeyStore, clock: ManualClock
) -> None:
    """Without a period, the budget's period is counted from when it was set."""
    key = await stored_key(alerting, max_budget_nanos=10 * USD)
    await charge(alerting, key.key_id, "r1", 6)  # 0.5 of $10
    clock.advance(60)
    await alerting.update(key.key_id, KeyUpdate(max_budget_nanos=7 * USD))
    await alerting.update(key.key_id, KeyUpdate(max_budget_nanos=7 * USD))  # same: no reset
    await charge(alerting, key.key_id, "r2", 0)  # $6 of $7: 0.5 and 0.8 of the new budget
    events = await events_of(alerting, "key", key.key_id)
    created = clock.now_ms - 60_000
    assert [(e.threshold_bp, e.max_budget_nanos, e.period_start_ms) for e in events] == [
        (5000, 10 * USD, created),
        (5000, 7 * USD, clock.now_ms),
        (8000, 7 * USD, clock.now_ms),
    ]


async def test_a_calendar_month_budget_counts_from_the_first_of_the_month(
    alerting: KeyStore, clock: ManualClock
) -> None:
    assert clock.now_ms == ms("2027-01-15T08:00:00")
    key = await stored_key(alerting, max_budget_nanos=USD, budget=parse_duration("1mo"))
    await charge(alerting, key.key_id, "r1", 0.5)
    clock.now_ms = ms("2027-03-02T00:00:00")  # two month boundaries later
    await charge(alerting, key.key_id, "r2", 0.5)
    events = await events_of(alerting, "key", key.key_id)
    assert [e.period_start_ms for e in events] == [ms("2027-01-01"), ms("2027-03-01")]
    assert events[1].payload()["period_start"] == "2027-03-01T00:00:00Z"


async def test_the_scripts_month_arithmetic_matches_the_calendar(redis_url: str) -> None:
    """previous_month_start (keys/lua/_lib.lua) for every month from 1970 to 2200."""
    firsts = [ms(f"{year}-{month:02d}-01") for year in range(1970, 2201) for month in range(1, 13)]
    probe = scripts.Script(
        "probe",
        scripts._lua("_lib")
        + "local out = {} for i = 1, #ARGV do "
        + "out[i] = string.format('%d', previous_month_start(tonumber(ARGV[i]))) end return out",
    )
    bridge = RedisBridge.from_url(redis_url, timeout_s=5, transport="redis-py")
    try:
        got = await bridge.scripts.run(probe, [], firsts[1:])
    finally:
        await bridge.aclose()
    assert [int(v) for v in got] == firsts[:-1]


async def test_user_and_team_budgets_alert_under_their_own_scope(
    alerting: KeyStore, clock: ManualClock
) -> None:
    user, team = "user-" + keygen.new_key_id(), "team-" + keygen.new_key_id()
    budgets = BudgetStore(alerting.redis, clock=clock)
    await budgets.set(BudgetSpec("user", user, 4 * USD, parse_duration(""), 0, 0, 0))
    await budgets.set(BudgetSpec("team", team, 10 * USD, parse_duration("1mo"), 0, 0, 0))
    key = await stored_key(alerting, user_id=user, team_id=team, max_budget_nanos=100 * USD)
    assert await charge(alerting, key.key_id, "r1", 2.1) == 1  # the user's 0.5
    assert await charge(alerting, key.key_id, "r2", 3) == 3  # user 0.8, 1.0; team 0.5
    user_events = await events_of(alerting, "user", user)
    team_events = await events_of(alerting, "team", team)
    assert [(e.threshold_bp, e.spent_nanos) for e in user_events] == [
        (5000, 2_100_000_000),
        (8000, 5_100_000_000),
        (10000, 5_100_000_000),
    ]
    assert [(e.threshold_bp, e.period_start_ms) for e in team_events] == [(5000, ms("2027-01-01"))]
    assert user_events[0].period_start_ms == clock.now_ms  # no period: when it was set
    assert await events_of(alerting, "key", key.key_id) == []  # $5.1 of $100


async def test_without_alerts_nothing_is_appended_or_written(store: KeyStore) -> None:
    key = await stored_key(store, max_budget_nanos=USD)
    before: Any = await store.redis.client.xlen(alert_stream.SINGLE_STREAM)
    assert await charge(store, key.key_id, "r1", 2) == 0
    assert await store.redis.client.xlen(alert_stream.SINGLE_STREAM) == before
    assert await store.redis.client.hget(keyspace.record_key(key.key_id), "alerted") is None


# --- the payload ------------------------------------------------------------------------


def test_an_events_payload_and_id_are_what_the_interface_says() -> None:
    event = AlertEvent("team", "t-9", 8000, 8_000_000_001, 10 * USD, ms("2027-01-01"), 0)
    assert event.payload() == {
        "event": "budget_threshold",
        "scope": "team",
        "id": "t-9",
        "threshold": 0.8,
        "spent": 8.000000001,
        "max_budget": 10.0,
        "period_start": "2027-01-01T00:00:00Z",
        "event_id": event.event_id,
    }
    text = f"team:t-9:{ms('2027-01-01')}:{10 * USD}:8000"
    assert event.event_id == hashlib.sha256(text.encode()).hexdigest()
