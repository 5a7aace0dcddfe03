"""The money path at the key: reservations, settlement, expiry, concurrency slots,
per-model limits, pricing at the door and shadow mode, on a real redis-server (both
store transports), time moved by hand."""

from __future__ import annotations

import pytest

from keys import keygen, keyspace
from keys.model import Level, LimitHit, ModelLimit, Reason, RequestedModel, UsageReport
from keys.store import KeyStore
from tests.conftest import ManualClock
from tests.helpers import stored_key

pytestmark = pytest.mark.integration
GPT4 = RequestedModel.named("gpt-4")
TTL_S = 900


new_key = stored_key


def report(key: keygen.ParsedKey, request_id: str, cost_nanos: int) -> UsageReport:
    return UsageReport(key.key_id, request_id, "gpt-4", "openai", 10, 5, 15, cost_nanos)


async def test_an_allowed_check_reserves_and_names_its_reservation(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    decision = await store.check(key, GPT4, reserve_nanos=4_000)
    assert decision.allowed
    assert keyspace.reservation_amount(decision.request_id) == 4_000
    record = await store.get(key.key_id)
    assert (record.reserved_nanos, record.in_flight, record.spent_nanos) == (4_000, 1, 0)
    assert record.budget_remaining_nanos == 6_000


async def test_a_reservation_the_budget_cannot_hold_is_denied_with_what_is_free(
    store: KeyStore,
) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    assert (await store.check(key, GPT4, reserve_nanos=7_000)).allowed
    denied = await store.check(key, GPT4, reserve_nanos=7_000)
    assert denied.reason is Reason.BUDGET_EXCEEDED
    assert (denied.level, denied.free_nanos) == (Level.KEY, 3_000)
    assert (await store.get(key.key_id)).in_flight == 1


async def test_a_report_settles_its_reservation_charging_the_actual_cost(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    decision = await store.check(key, GPT4, reserve_nanos=7_000)
    result = await store.report_usage(report(key, decision.request_id, 2_500))
    assert result.settled and not result.duplicate
    record = await store.get(key.key_id)
    assert (record.spent_nanos, record.reserved_nanos, record.in_flight) == (2_500, 0, 0)
    assert (await store.check(key, GPT4, reserve_nanos=7_000)).allowed


async def test_a_duplicate_report_charges_nothing_and_settles_nothing(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    decision = await store.check(key, GPT4, reserve_nanos=5_000)
    await store.report_usage(report(key, decision.request_id, 1_000))
    again = await store.report_usage(report(key, decision.request_id, 1_000))
    assert again.duplicate and not again.settled
    record = await store.get(key.key_id)
    assert (record.spent_nanos, record.reserved_nanos) == (1_000, 0)


async def test_a_report_larger_than_its_reservation_is_charged_in_full(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    decision = await store.check(key, GPT4, reserve_nanos=1_000)
    result = await store.report_usage(report(key, decision.request_id, 4_000))
    assert result.settled and result.cost_nanos == 4_000
    record = await store.get(key.key_id)
    assert (record.spent_nanos, record.reserved_nanos) == (4_000, 0)


async def test_a_report_no_reservation_names_is_charged_unsettled(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    held = await store.check(key, GPT4, reserve_nanos=3_000)
    result = await store.report_usage(report(key, "measured-elsewhere", 2_000))
    assert not result.settled and not result.duplicate
    record = await store.get(key.key_id)
    assert (record.spent_nanos, record.reserved_nanos, record.in_flight) == (2_000, 3_000, 1)
    assert held.allowed


async def test_an_unreported_reservation_expires_after_the_ttl(
    store: KeyStore, clock: ManualClock
) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    await store.check(key, GPT4, reserve_nanos=9_000)
    assert not (await store.check(key, GPT4, reserve_nanos=9_000)).allowed
    clock.advance(TTL_S)
    record = await store.get(key.key_id)
    assert (record.reserved_nanos, record.in_flight) == (0, 0)
    decision = await store.check(key, GPT4, reserve_nanos=9_000)
    assert decision.allowed and decision.expired == 1


async def test_a_report_after_its_reservation_expired_still_charges(
    store: KeyStore, clock: ManualClock
) -> None:
    key = await new_key(store, max_budget_nanos=10_000)
    decision = await store.check(key, GPT4, reserve_nanos=9_000)
    clock.advance(TTL_S + 1)
    result = await store.report_usage(report(key, decision.request_id, 3_000))
    assert not result.settled and result.expired
    record = await store.get(key.key_id)
    assert (record.spent_nanos, record.reserved_nanos, record.in_flight) == (3_000, 0, 0)


async def test_a_spent_budget_refuses_even_a_request_that_reserves_nothing(
    store: KeyStore,
) -> None:
    key = await new_key(store, max_budget_nanos=1_000)
    await store.report_usage(report(key, "r1", 1_000))
    assert (await store.check(key, GPT4)).reason is Reason.BUDGET_EXCEEDED


async def test_concurrency_slots_are_the_open_reservations(store: KeyStore) -> None:
    key = await new_key(store, max_parallel=3)
    running = [await store.check(key, GPT4) for _ in range(3)]
    assert all(d.allowed for d in running)
    denied = await store.check(key, GPT4)
    assert denied.reason is Reason.CONCURRENCY_LIMIT_EXCEEDED
    assert denied.parallel_limit == 3
    await store.report_usage(report(key, running[0].request_id, 1))
    assert (await store.check(key, GPT4)).allowed


async def test_a_slot_whose_report_never_comes_is_back_after_the_ttl(
    store: KeyStore, clock: ManualClock
) -> None:
    key = await new_key(store, max_parallel=1)
    assert (await store.check(key, GPT4)).allowed
    clock.advance(TTL_S - 1)
    assert (await store.check(key, GPT4)).reason is Reason.CONCURRENCY_LIMIT_EXCEEDED
    clock.advance(1)
    assert (await store.check(key, GPT4)).allowed


async def test_a_denied_request_holds_no_slot_and_no_money(store: KeyStore) -> None:
    key = await new_key(store, max_parallel=1, max_budget_nanos=5_000)
    assert not (await store.check(key, RequestedModel.named("other"), priced=False)).allowed
    record = await store.get(key.key_id)
    assert (record.in_flight, record.reserved_nanos, record.window_requests) == (0, 0, 0)


async def test_an_unpriced_model_is_refused_on_a_budgeted_key(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=5_000)
    decision = await store.check(key, RequestedModel.named("mystery"), priced=False)
    assert decision.reason is Reason.MODEL_NOT_PRICED


async def test_an_unpriced_model_is_allowed_on_a_key_without_a_budget(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=0)
    assert (await store.check(key, RequestedModel.named("mystery"), priced=False)).allowed


async def test_per_model_rpm_is_checked_with_the_keys_own(store: KeyStore) -> None:
    key = await new_key(store, rpm_limit=100, model_limits={"gpt-4": ModelLimit(rpm_limit=2)})
    assert (await store.check(key, GPT4)).allowed
    assert (await store.check(key, GPT4)).allowed
    denied = await store.check(key, GPT4)
    assert denied.reason is Reason.RATE_LIMIT_EXCEEDED
    assert (denied.level, denied.limit_hit) == (Level.MODEL, LimitHit.RPM)
    assert denied.denying_window.limit == 2
    assert (await store.check(key, RequestedModel.named("gpt-4o"))).allowed


async def test_per_model_tpm_counts_the_models_reported_tokens(
    store: KeyStore, clock: ManualClock
) -> None:
    key = await new_key(store, model_limits={"gpt-4": ModelLimit(tpm_limit=15)})
    first = await store.check(key, GPT4)
    await store.report_usage(report(key, first.request_id, 1))  # 15 tokens of gpt-4
    denied = await store.check(key, GPT4)
    assert (denied.reason, denied.limit_hit) == (Reason.RATE_LIMIT_EXCEEDED, LimitHit.TPM)
    clock.advance(60)
    assert (await store.check(key, GPT4)).allowed


async def test_model_limits_are_replaced_whole_by_an_update(store: KeyStore) -> None:
    from keys.model import KeyUpdate

    key = await new_key(store, model_limits={"gpt-4": ModelLimit(rpm_limit=1)})
    updated = await store.update(
        key.key_id, KeyUpdate(model_limits={"gpt-4o": ModelLimit(tpm_limit=9)})
    )
    assert updated.model_limits == {"gpt-4o": ModelLimit(0, 9)}
    assert (await store.check(key, GPT4)).allowed
    assert (await store.check(key, GPT4)).allowed


async def test_shadow_mode_denies_nothing_and_says_what_it_would_have(store: KeyStore) -> None:
    key = await new_key(store, enforce=False, max_parallel=1, max_budget_nanos=5_000)
    first = await store.check(key, GPT4, reserve_nanos=4_000)
    assert first.allowed and first.would_deny is None
    second = await store.check(key, GPT4, reserve_nanos=4_000)
    assert second.allowed and second.would_deny is Reason.BUDGET_EXCEEDED
    record = await store.get(key.key_id)
    assert (record.in_flight, record.reserved_nanos) == (2, 8_000)


async def test_shadow_mode_still_refuses_a_revoked_key(store: KeyStore) -> None:
    key = await new_key(store, enforce=False)
    await store.revoke(key.key_id)
    assert (await store.check(key, GPT4)).reason is Reason.KEY_REVOKED


async def test_after_mode_reserves_nothing_and_checks_spend_only(
    store: KeyStore, clock: ManualClock
) -> None:
    after = KeyStore(store.redis, clock=clock, budget_mode="after")
    key = await new_key(after, max_budget_nanos=1_000, max_parallel=2)
    decision = await after.check(key, GPT4, reserve_nanos=50_000)
    assert decision.allowed and keyspace.reservation_amount(decision.request_id) == 0
    record = await after.get(key.key_id)
    assert (record.reserved_nanos, record.in_flight) == (0, 1)


async def test_deleting_a_key_removes_its_in_flight_records(store: KeyStore) -> None:
    key = await new_key(store)
    await store.check(key, GPT4, reserve_nanos=10)
    await store.delete(key.key_id)
    assert not await store.redis.client.exists(keyspace.inflight_key(key.key_id))


async def test_a_check_its_caller_abandons_leaves_no_reservation(store: KeyStore) -> None:
    """Envoy's timeout cancels a Check whose script may already have run: the store
    releases what it may have reserved instead of holding it for the TTL."""
    import asyncio

    store.abandoned_grace_s = 0.001
    key = await new_key(store, max_parallel=1, max_budget_nanos=10_000)
    cancelled = released = 0
    for attempt in range(120):
        task = asyncio.ensure_future(store.check(key, GPT4, reserve_nanos=5_000))
        for _ in range(attempt % 40):
            await asyncio.sleep(0)  # cancel at every stage: before, during, after the call
        task.cancel()
        try:
            finished = await task
        except asyncio.CancelledError:
            cancelled += 1
        else:  # it finished before the cancel: settle it like a report would
            await store.report_usage(report(key, finished.request_id, 1))
        released += sum(await asyncio.gather(*list(store._orphans)))
    record = await store.get(key.key_id)
    assert cancelled and released, "no Check was cancelled after its script ran"
    assert (record.in_flight, record.reserved_nanos) == (0, 0)


async def test_a_request_without_a_body_takes_no_slot_and_holds_nothing(
    store: KeyStore,
) -> None:
    """GET /v1/models generates nothing and nothing reports it: it is counted against RPM
    but opens no in-flight record, so it cannot hold a slot for the TTL."""
    from keys.model import NO_BODY

    key = await new_key(store, max_parallel=1, rpm_limit=10)
    for _ in range(3):
        assert (await store.check(key, NO_BODY)).allowed
    record = await store.get(key.key_id)
    assert (record.in_flight, record.window_requests) == (0, 3)
    assert (await store.check(key, GPT4)).allowed
    assert (await store.check(key, NO_BODY)).allowed  # a full slot does not refuse it


async def test_a_per_model_limit_also_limits_the_models_snapshots(store: KeyStore) -> None:
    """`gpt-4o` limits `gpt-4o-2024-08-06` (the price table's entry for it) too."""
    key = await new_key(store, model_limits={"gpt-4o": ModelLimit(rpm_limit=1)})
    snapshot = RequestedModel.named("gpt-4o-2024-08-06")
    assert (await store.check(key, RequestedModel.named("gpt-4o"), family="gpt-4o")).allowed
    denied = await store.check(key, snapshot, family="gpt-4o")
    assert (denied.reason, denied.level) == (Reason.RATE_LIMIT_EXCEEDED, Level.MODEL)


async def test_many_expired_reservations_are_reaped_exactly_a_batch_at_a_time(
    store: KeyStore, clock: ManualClock
) -> None:
    """Up to 64 per call: a backlog is reaped over the next calls, and `reserved` is
    exact throughout (amounts summed as integers, past 2^53 nano-USD too)."""
    big = 3 * 10**15  # $3M each: sums of these lose precision as doubles
    key = await new_key(store, max_budget_nanos=10**18)
    for _ in range(100):
        assert (await store.check(key, GPT4, reserve_nanos=big)).allowed
    clock.advance(TTL_S)
    first = await store.check(key, GPT4, reserve_nanos=7)
    second = await store.check(key, GPT4, reserve_nanos=7)
    assert (first.expired, second.expired) == (64, 36)
    raw = await store.redis.client.hget(keyspace.record_key(key.key_id), "reserved")
    assert int(str(raw)) == 14
