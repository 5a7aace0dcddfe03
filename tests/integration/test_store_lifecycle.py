"""Key lifecycle in the store, against a real redis-server, time controlled by hand."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from keys import keygen, scripts
from keys.budget import parse_duration
from keys.connection import Arg
from keys.errors import InvalidArgument, NotFound
from keys.keyspace import record_key
from keys.model import KeyUpdate, Reason, RequestedModel, Status, UsageReport
from keys.store import KeyStore, Page
from tests.conftest import ManualClock
from tests.helpers import key_spec

pytestmark = pytest.mark.integration
GPT4 = RequestedModel.named("gpt-4")
DAY = 86_400


async def create(store: KeyStore, **overrides: Any) -> tuple[str, keygen.ParsedKey]:
    full, _ = await store.create(key_spec(**overrides), "sk-mp")
    parsed = keygen.parse_key(full)
    assert parsed is not None
    return full, parsed


def unique_user() -> str:
    return "user-" + keygen.new_key_id()


def report(key_id: str, request_id: str, model: str = "gpt-4", cost: int = 1000) -> UsageReport:
    return UsageReport(key_id, request_id, model, "p", 10, 5, 15, cost)


# --- update / rotate / delete ---------------------------------------------------------


async def test_update_changes_only_the_fields_sent(store: KeyStore) -> None:
    _, key = await create(store, rpm_limit=5, name="before", metadata={"a": "1"})
    updated = await store.update(key.key_id, KeyUpdate(rpm_limit=9))
    assert (updated.rpm_limit, updated.name, dict(updated.metadata)) == (9, "before", {"a": "1"})


async def test_downgraded_limit_applies_to_the_next_check(store: KeyStore) -> None:
    _, key = await create(store, rpm_limit=10)
    assert (await store.check(key, GPT4)).allowed
    await store.update(key.key_id, KeyUpdate(rpm_limit=1))
    assert (await store.check(key, GPT4)).reason is Reason.RATE_LIMIT_EXCEEDED


async def test_narrowed_model_list_applies_to_the_next_check(store: KeyStore) -> None:
    _, key = await create(store)
    await store.update(key.key_id, KeyUpdate(allowed_models=("gpt-4o",)))
    assert (await store.check(key, GPT4)).reason is Reason.MODEL_NOT_ALLOWED


async def test_update_of_unknown_key_is_not_found(store: KeyStore) -> None:
    with pytest.raises(NotFound):
        await store.update("00000000000000ff", KeyUpdate(name="x"))


async def test_rotation_without_grace_stops_the_old_secret_at_once(store: KeyStore) -> None:
    _, old = await create(store)
    new_full, _ = await store.rotate(old.key_id, "sk-mp", grace_ms=0)
    new = keygen.parse_key(new_full)
    assert new is not None and new.key_id == old.key_id
    assert (await store.check(old, GPT4)).reason is Reason.INVALID_API_KEY
    assert (await store.check(new, GPT4)).allowed


async def test_rotation_with_grace_keeps_the_old_secret_until_it_ends(
    store: KeyStore, clock: ManualClock
) -> None:
    _, old = await create(store)
    new_full, _ = await store.rotate(old.key_id, "sk-mp", grace_ms=30_000)
    new = keygen.parse_key(new_full)
    assert new is not None
    clock.advance(29.9)
    assert (await store.check(old, GPT4)).allowed
    assert (await store.validate(old))[0] is Reason.OK
    clock.advance(0.1)
    assert (await store.check(old, GPT4)).reason is Reason.INVALID_API_KEY
    assert (await store.validate(old))[0] is Reason.INVALID_API_KEY
    assert (await store.check(new, GPT4)).allowed


async def test_second_rotation_ends_the_first_grace(store: KeyStore) -> None:
    _, first = await create(store)
    await store.rotate(first.key_id, "sk-mp", grace_ms=60_000)
    await store.rotate(first.key_id, "sk-mp", grace_ms=60_000)
    assert (await store.check(first, GPT4)).reason is Reason.INVALID_API_KEY


async def test_deleted_key_is_gone_for_check_get_and_list(store: KeyStore) -> None:
    user = unique_user()
    _, key = await create(store, user_id=user)
    await store.delete(key.key_id)
    assert (await store.check(key, GPT4)).reason is Reason.INVALID_API_KEY
    with pytest.raises(NotFound):
        await store.get(key.key_id)
    assert (await store.list_keys(user_id=user)).keys == ()


# --- listing ---------------------------------------------------------------------------


async def test_list_filters_by_user_team_and_status(store: KeyStore, clock: ManualClock) -> None:
    user = unique_user()
    _, a = await create(store, user_id=user, team_id="red")
    clock.advance(0.001)
    _, b = await create(store, user_id=user, team_id="blue")
    await store.revoke(b.key_id)
    clock.advance(0.001)
    _, c = await create(store, user_id=user, team_id="red", expires_at_ms=clock.now_ms + 1)
    clock.advance(1)

    def ids(page: Page) -> list[str]:
        return [k.id for k in page.keys]

    assert ids(await store.list_keys(user_id=user)) == [a.key_id, b.key_id, c.key_id]
    assert ids(await store.list_keys(user_id=user, team_id="red")) == [a.key_id, c.key_id]
    assert ids(await store.list_keys(user_id=user, status=Status.REVOKED)) == [b.key_id]
    assert ids(await store.list_keys(user_id=user, status=Status.EXPIRED)) == [c.key_id]
    assert ids(await store.list_keys(user_id=user, status=Status.ACTIVE)) == [a.key_id]


async def test_paging_is_stable_under_concurrent_creates(
    store: KeyStore, clock: ManualClock
) -> None:
    user = unique_user()
    created = []
    for _ in range(5):
        created.append((await create(store, user_id=user))[1].key_id)
        clock.advance(0.001)
    seen: list[str] = []
    token = ""
    while True:
        page = await store.list_keys(user_id=user, page_size=2, page_token=token)
        seen.extend(k.id for k in page.keys)
        # keys created while paging land after the cursor: seen once, at the end
        if len(seen) == 2:
            created.append((await create(store, user_id=user))[1].key_id)
        token = page.next_token
        if not token:
            break
    assert seen == created


async def test_keys_created_in_the_same_millisecond_all_page_once(store: KeyStore) -> None:
    user = unique_user()
    ids = set()
    for _ in range(7):
        ids.add((await create(store, user_id=user))[1].key_id)  # the clock does not move
    seen: list[str] = []
    token = ""
    while True:
        page = await store.list_keys(user_id=user, page_size=3, page_token=token)
        seen.extend(k.id for k in page.keys)
        if not (token := page.next_token):
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 7


async def test_malformed_page_token_is_invalid(store: KeyStore) -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        await store.list_keys(page_token="not-a-token")


# --- budget periods --------------------------------------------------------------------


async def test_daily_budget_resets_at_the_period_boundary(
    store: KeyStore, clock: ManualClock
) -> None:
    _, key = await create(store, max_budget_nanos=1000, budget=parse_duration("1d"))
    first_reset = (await store.get(key.key_id)).budget_reset_at_ms
    assert first_reset == clock.now_ms + DAY * 1000
    await store.report_usage(report(key.key_id, "r1", cost=1000))
    assert (await store.check(key, GPT4)).reason is Reason.BUDGET_EXCEEDED
    clock.advance(DAY - 1)
    assert (await store.check(key, GPT4)).reason is Reason.BUDGET_EXCEEDED
    clock.advance(1)
    record = await store.get(key.key_id)  # computed on read, before any script ran
    assert (record.spent_nanos, record.budget_reset_at_ms) == (0, first_reset + DAY * 1000)
    assert (await store.check(key, GPT4)).allowed


async def test_usage_after_the_boundary_counts_in_the_new_period(
    store: KeyStore, clock: ManualClock
) -> None:
    _, key = await create(store, max_budget_nanos=10_000, budget=parse_duration("7d"))
    await store.report_usage(report(key.key_id, "r1", cost=9000))
    clock.advance(7 * DAY)
    result = await store.report_usage(report(key.key_id, "r2", cost=500))
    assert result.spent_nanos == 500


async def test_monthly_budget_resets_on_the_first_of_the_month(store: KeyStore) -> None:
    clock = ManualClock(int(datetime(2026, 11, 20, tzinfo=UTC).timestamp() * 1000))
    monthly = KeyStore(store.redis, clock=clock)
    _, key = await create(monthly, max_budget_nanos=100, budget=parse_duration("1mo"))
    dec_1 = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000)
    assert (await monthly.get(key.key_id)).budget_reset_at_ms == dec_1
    await monthly.report_usage(report(key.key_id, "r1", cost=100))
    assert (await monthly.check(key, GPT4)).reason is Reason.BUDGET_EXCEEDED
    clock.now_ms = dec_1
    assert (await monthly.check(key, GPT4)).allowed
    jan_1 = int(datetime(2027, 1, 1, tzinfo=UTC).timestamp() * 1000)
    assert (await monthly.get(key.key_id)).budget_reset_at_ms == jan_1


async def test_clearing_the_duration_stops_resets(store: KeyStore, clock: ManualClock) -> None:
    _, key = await create(store, max_budget_nanos=100, budget=parse_duration("1d"))
    await store.update(key.key_id, KeyUpdate(budget=parse_duration("")))
    await store.report_usage(report(key.key_id, "r1", cost=100))
    clock.advance(2 * DAY)
    assert (await store.check(key, GPT4)).reason is Reason.BUDGET_EXCEEDED
    assert (await store.get(key.key_id)).budget_reset_at_ms == 0


# --- usage history ---------------------------------------------------------------------


async def test_usage_has_a_row_per_day_and_model(store: KeyStore, clock: ManualClock) -> None:
    _, key = await create(store)
    day0 = datetime.fromtimestamp(clock.now_ms / 1000, tz=UTC).date()
    await store.report_usage(report(key.key_id, "a", "gpt-4", cost=100))
    await store.report_usage(report(key.key_id, "b", "gpt-4o", cost=20))
    clock.advance(DAY)
    await store.report_usage(report(key.key_id, "c", "gpt-4", cost=300))
    await store.report_usage(report(key.key_id, "d", "gpt-4", cost=5))
    clock.advance(2 * DAY)
    summary = await store.usage([key.key_id], days=30)
    rows = [(r.date, r.model, r.requests, r.cost_nanos, r.prompt_tokens) for r in summary.rows]
    day1 = day0.fromordinal(day0.toordinal() + 1)
    assert rows == [
        (day0.isoformat(), "gpt-4", 1, 100, 10),
        (day0.isoformat(), "gpt-4o", 1, 20, 10),
        (day1.isoformat(), "gpt-4", 2, 305, 20),
    ]
    assert summary.end_date == day0.fromordinal(day0.toordinal() + 3).isoformat()


async def test_usage_window_leaves_out_older_days(store: KeyStore, clock: ManualClock) -> None:
    _, key = await create(store)
    await store.report_usage(report(key.key_id, "a"))
    clock.advance(5 * DAY)
    assert (await store.usage([key.key_id], days=5)).rows == ()
    assert len((await store.usage([key.key_id], days=6)).rows) == 1


async def test_team_usage_sums_its_keys_including_deleted_ones(store: KeyStore) -> None:
    team = "team-" + keygen.new_key_id()
    _, a = await create(store, team_id=team)
    _, b = await create(store, team_id=team)
    await asyncio.gather(
        store.report_usage(report(a.key_id, "1", cost=10)),
        store.report_usage(report(b.key_id, "2", cost=32)),
    )
    await store.delete(b.key_id)
    ids = await store.key_ids_of(team_id=team)
    assert sorted(ids) == sorted([a.key_id, b.key_id])
    assert sum(r.cost_nanos for r in (await store.usage(ids, days=1)).rows) == 42


# --- scripts re-run by a client retry -------------------------------------------------


async def test_create_script_rerun_recognises_its_own_key(
    store: KeyStore, clock: ManualClock
) -> None:
    full, key = await store.create(key_spec(), "sk-mp")
    fields: dict[str, str] = await store.redis.client.hgetall(record_key(key.id))  # type: ignore[assignment]
    args: list[Arg] = [clock.now_ms, *(item for pair in fields.items() for item in pair)]
    assert await store.redis.scripts.run(scripts.CREATE, [record_key(key.id)], args) == 1
    other = dict(fields, hash=keygen.digest(full + "x"))
    other_args: list[Arg] = [clock.now_ms, *(item for pair in other.items() for item in pair)]
    assert await store.redis.scripts.run(scripts.CREATE, [record_key(key.id)], other_args) == 0


async def test_rotate_script_rerun_keeps_the_old_secrets_grace(
    store: KeyStore, clock: ManualClock
) -> None:
    _, key = await create(store)
    new_digest = keygen.digest(f"sk-mp-{key.key_id}-" + "N" * 43)
    args: list[Arg] = [new_digest, clock.now_ms + 60_000, clock.now_ms]
    record = [record_key(key.key_id)]
    assert await store.redis.scripts.run(scripts.ROTATE, record, args) == 1
    assert await store.redis.scripts.run(scripts.ROTATE, record, args) == 1  # the retry
    assert (await store.check(key, GPT4)).allowed  # old secret, still in its grace
