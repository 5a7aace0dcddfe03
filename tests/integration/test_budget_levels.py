"""Budgets above the key: a request passes only when its key, its user and its team all
pass, and each reservation, slot, request and charge counts at every level. Each test
runs on one Redis (both store transports: the levels inline in one script) and on a
real 3-primary Redis Cluster (the levels in their own slots, compensated on refusal)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keys import keygen, keyspace
from keys.budget import NO_PERIOD
from keys.budgets import BudgetSpec, BudgetStore
from keys.connection import RedisBridge
from keys.model import Level, LimitHit, Reason, RequestedModel, UsageReport
from keys.store import KeyStore
from tests.conftest import ManualClock
from tests.helpers import stored_key
from tests.redis_cluster import RedisCluster

pytestmark = pytest.mark.integration
GPT4 = RequestedModel.named("gpt-4")
TTL_S = 900


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cluster = RedisCluster(Path(tmp_path_factory.mktemp("levels-cluster")), masters=3).start()
    yield cluster.url
    cluster.stop()


@dataclass
class Levels:
    store: KeyStore
    budgets: BudgetStore
    clock: ManualClock


@pytest.fixture(params=["redis-py", "pipelined", "cluster"])
async def levels(
    redis_url: str, request: pytest.FixtureRequest, clock: ManualClock
) -> AsyncIterator[Levels]:
    if request.param == "cluster":
        url = request.getfixturevalue("cluster_url")
        redis = RedisBridge.from_url(url, timeout_s=2)
    else:
        redis = RedisBridge.from_url(redis_url, timeout_s=2, transport=request.param)
    yield Levels(KeyStore(redis, clock=clock), BudgetStore(redis, clock=clock), clock)
    await redis.aclose()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def budget(levels: Levels, scope: str, scope_id: str, **limits: int) -> None:
    await levels.budgets.set(
        BudgetSpec(
            scope,
            scope_id,
            limits.get("max_budget_nanos", 0),
            NO_PERIOD,
            limits.get("rpm_limit", 0),
            limits.get("tpm_limit", 0),
            limits.get("max_parallel", 0),
        )
    )


async def new_key(levels: Levels, **fields: Any) -> keygen.ParsedKey:
    return await stored_key(levels.store, **fields)


def charge(key: keygen.ParsedKey, request_id: str, cost: int) -> UsageReport:
    return UsageReport(key.key_id, request_id, "gpt-4", "x", 5, 5, 10, cost)


async def test_a_team_budget_is_shared_by_its_keys(levels: Levels) -> None:
    team = unique("team")
    await budget(levels, "team", team, max_budget_nanos=10_000)
    first = await new_key(levels, team_id=team)
    second = await new_key(levels, team_id=team)
    assert (await levels.store.check(first, GPT4, reserve_nanos=6_000)).allowed
    denied = await levels.store.check(second, GPT4, reserve_nanos=6_000)
    assert denied.reason is Reason.BUDGET_EXCEEDED
    assert (denied.level, denied.free_nanos) == (Level.TEAM, 4_000)
    assert (await levels.store.check(second, GPT4, reserve_nanos=4_000)).allowed


async def test_a_user_budget_spans_the_users_keys_in_any_team(levels: Levels) -> None:
    user = unique("user")
    await budget(levels, "user", user, max_budget_nanos=5_000)
    one = await new_key(levels, user_id=user, team_id=unique("team"))
    other = await new_key(levels, user_id=user, team_id="")
    allowed = await levels.store.check(one, GPT4, reserve_nanos=3_000)
    await levels.store.report_usage(charge(one, allowed.request_id, 3_000))
    denied = await levels.store.check(other, GPT4, reserve_nanos=3_000)
    assert (denied.reason, denied.level) == (Reason.BUDGET_EXCEEDED, Level.USER)
    got = await levels.budgets.get("user", user)
    assert (got.spent_nanos, got.reserved_nanos, got.in_flight) == (3_000, 0, 0)


async def test_a_charge_and_its_settlement_apply_at_every_level(levels: Levels) -> None:
    user, team = unique("user"), unique("team")
    await budget(levels, "user", user, max_budget_nanos=50_000)
    await budget(levels, "team", team, max_budget_nanos=50_000)
    key = await new_key(levels, user_id=user, team_id=team, max_budget_nanos=50_000)
    allowed = await levels.store.check(key, GPT4, reserve_nanos=7_000)
    for scope, scope_id in (("user", user), ("team", team)):
        held = await levels.budgets.get(scope, scope_id)
        assert (held.reserved_nanos, held.in_flight) == (7_000, 1)
    result = await levels.store.report_usage(charge(key, allowed.request_id, 2_000))
    assert result.settled
    for scope, scope_id in (("user", user), ("team", team)):
        got = await levels.budgets.get(scope, scope_id)
        assert (got.spent_nanos, got.reserved_nanos, got.in_flight) == (2_000, 0, 0)
    record = await levels.store.get(key.key_id)
    assert (record.spent_nanos, record.reserved_nanos) == (2_000, 0)


async def test_a_repeated_report_charges_no_level_twice(levels: Levels) -> None:
    team = unique("team")
    await budget(levels, "team", team, max_budget_nanos=50_000)
    key = await new_key(levels, team_id=team)
    allowed = await levels.store.check(key, GPT4, reserve_nanos=1_000)
    for _ in range(3):
        await levels.store.report_usage(charge(key, allowed.request_id, 900))
    assert (await levels.budgets.get("team", team)).spent_nanos == 900


async def test_a_refusal_above_the_key_leaves_nothing_held_anywhere(levels: Levels) -> None:
    """On Cluster the key admits first and is compensated when its team refuses."""
    team = unique("team")
    await budget(levels, "team", team, max_budget_nanos=1_000)
    key = await new_key(levels, team_id=team, max_budget_nanos=50_000, rpm_limit=10)
    denied = await levels.store.check(key, GPT4, reserve_nanos=5_000)
    assert (denied.reason, denied.level) == (Reason.BUDGET_EXCEEDED, Level.TEAM)
    record = await levels.store.get(key.key_id)
    assert (record.in_flight, record.reserved_nanos, record.window_requests) == (0, 0, 0)
    team_now = await levels.budgets.get("team", team)
    assert (team_now.in_flight, team_now.reserved_nanos) == (0, 0)


async def test_team_concurrency_counts_every_keys_requests(levels: Levels) -> None:
    team = unique("team")
    await budget(levels, "team", team, max_parallel=2)
    keys = [await new_key(levels, team_id=team) for _ in range(3)]
    running = [await levels.store.check(k, GPT4) for k in keys[:2]]
    assert all(d.allowed for d in running)
    denied = await levels.store.check(keys[2], GPT4)
    assert (denied.reason, denied.level) == (Reason.CONCURRENCY_LIMIT_EXCEEDED, Level.TEAM)
    await levels.store.report_usage(charge(keys[0], running[0].request_id, 1))
    assert (await levels.store.check(keys[2], GPT4)).allowed


async def test_team_slots_come_back_after_the_ttl_when_nothing_reports(levels: Levels) -> None:
    team = unique("team")
    await budget(levels, "team", team, max_parallel=1)
    key = await new_key(levels, team_id=team)
    assert (await levels.store.check(key, GPT4)).allowed
    assert not (await levels.store.check(key, GPT4)).allowed
    levels.clock.advance(TTL_S)
    assert (await levels.store.check(key, GPT4)).allowed


async def test_team_rpm_counts_every_keys_requests(levels: Levels) -> None:
    team = unique("team")
    await budget(levels, "team", team, rpm_limit=2)
    keys = [await new_key(levels, team_id=team) for _ in range(3)]
    assert (await levels.store.check(keys[0], GPT4)).allowed
    assert (await levels.store.check(keys[1], GPT4)).allowed
    denied = await levels.store.check(keys[2], GPT4)
    assert (denied.reason, denied.level, denied.limit_hit) == (
        Reason.RATE_LIMIT_EXCEEDED,
        Level.TEAM,
        LimitHit.RPM,
    )
    assert denied.denying_window.limit == 2


async def test_an_unpriced_model_is_refused_where_only_the_team_has_a_budget(
    levels: Levels,
) -> None:
    team = unique("team")
    await budget(levels, "team", team, max_budget_nanos=10_000)
    key = await new_key(levels, team_id=team, max_budget_nanos=0)
    denied = await levels.store.check(key, RequestedModel.named("mystery"), priced=False)
    assert (denied.reason, denied.level) == (Reason.MODEL_NOT_PRICED, Level.TEAM)


async def test_shadow_mode_waives_the_keys_limits_but_never_its_teams(levels: Levels) -> None:
    """A team's budget binds every key under it: a key in shadow mode cannot spend it
    past its limit (else any key could opt its team out)."""
    team = unique("team")
    await budget(levels, "team", team, max_budget_nanos=6_000)
    key = await new_key(levels, team_id=team, enforce=False, max_budget_nanos=1_000)
    waived = await levels.store.check(key, GPT4, reserve_nanos=5_000)
    assert waived.allowed and waived.would_deny is Reason.BUDGET_EXCEEDED
    denied = await levels.store.check(key, GPT4, reserve_nanos=5_000)
    assert (denied.reason, denied.level) == (Reason.BUDGET_EXCEEDED, Level.TEAM)


async def test_a_report_under_another_key_cannot_close_a_teammates_reservation(
    levels: Levels,
) -> None:
    team = unique("team")
    await budget(levels, "team", team, max_parallel=1)
    owner = await new_key(levels, team_id=team)
    other = await new_key(levels, team_id=team)
    held = await levels.store.check(owner, GPT4, reserve_nanos=100)
    await levels.store.report_usage(charge(other, held.request_id, 0))
    assert (await levels.budgets.get("team", team)).in_flight == 1
    assert not (await levels.store.check(other, GPT4)).allowed


async def test_a_budget_counts_only_what_is_charged_after_it_was_set(levels: Levels) -> None:
    team = unique("team")
    key = await new_key(levels, team_id=team)
    before = await levels.store.check(key, GPT4, reserve_nanos=100)
    await levels.store.report_usage(charge(key, before.request_id, 100))
    await budget(levels, "team", team, max_budget_nanos=1_000)
    after = await levels.store.check(key, GPT4, reserve_nanos=100)
    await levels.store.report_usage(charge(key, after.request_id, 40))
    assert (await levels.budgets.get("team", team)).spent_nanos == 40


async def test_concurrent_checks_never_hold_more_than_the_team_budget(levels: Levels) -> None:
    team = unique("team")
    await budget(levels, "team", team, max_budget_nanos=10_000)
    keys = [await new_key(levels, team_id=team) for _ in range(5)]
    decisions = await asyncio.gather(
        *(levels.store.check(keys[i % 5], GPT4, reserve_nanos=700) for i in range(60))
    )
    assert sum(d.allowed for d in decisions) == 10_000 // 700
    got = await levels.budgets.get("team", team)
    assert got.reserved_nanos == (10_000 // 700) * 700 <= 10_000
    assert got.in_flight == 10_000 // 700


def test_level_keys_live_in_their_own_slots() -> None:
    """The premise of the Cluster design: key, user and team hash to different slots."""
    tags = {
        keyspace.record_key("0123456789abcdef").split("{")[1].split("}")[0],
        keyspace.level_key("user", "u").split("{")[1].split("}")[0],
        keyspace.level_key("team", "t").split("{")[1].split("}")[0],
    }
    assert len(tags) == 3


async def test_a_request_without_a_body_takes_no_team_slot(levels: Levels) -> None:
    from keys.model import NO_BODY

    team = unique("team")
    await budget(levels, "team", team, max_parallel=1)
    key = await new_key(levels, team_id=team)
    assert (await levels.store.check(key, NO_BODY)).allowed
    assert (await levels.budgets.get("team", team)).in_flight == 0
    assert (await levels.store.check(key, GPT4)).allowed


async def test_admitting_the_same_request_twice_at_a_level_counts_it_once(
    levels: Levels,
) -> None:
    """level_admit.lua is retried once after a failure (Cluster): the retry of a call
    whose answer was lost must not reserve or count again."""
    from keys import scripts

    team = unique("team")
    await budget(levels, "team", team, max_budget_nanos=10_000, rpm_limit=5)
    keys: list[str] = keyspace.level_keys("team", team)
    now = levels.clock()
    args: list[str | int] = [
        now,
        60_000,
        now + 10**9,
        "k:r-700",
        700,
        TTL_S * 1000,
        1,
        "reserve",
        1,
    ]
    for _ in range(2):
        reply = await levels.store.redis.scripts.run(scripts.LEVEL_ADMIT, keys, args)
        assert scripts.decode_level_admit(reply, "team").admitted
    got = await levels.budgets.get("team", team)
    assert (got.reserved_nanos, got.in_flight) == (700, 1)
    raw = await levels.store.redis.client.hget(keys[0], "win_requests")
    assert int(str(raw)) == 1
