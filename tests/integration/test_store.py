"""The store and its Lua scripts against a real redis-server, time controlled by hand."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from keys import keygen
from keys.connection import RedisBridge
from keys.errors import NotFound, StoreUnavailable
from keys.keyspace import record_key
from keys.model import NO_BODY, UNREADABLE, KeySpec, Reason, RequestedModel, UsageReport
from keys.store import KeyStore
from tests.conftest import ManualClock
from tests.helpers import key_spec

pytestmark = pytest.mark.integration
DAY_MS = 86_400_000


def spec(**overrides: Any) -> KeySpec:
    return key_spec(**{"team_id": "t1", **overrides})


def usage(key_id: str, request_id: str, cost_nanos: int = 1000, tokens: int = 10) -> UsageReport:
    return UsageReport(key_id, request_id, "gpt-4", "openai", tokens, 0, tokens, cost_nanos)


async def new_key(store: KeyStore, **overrides: object) -> keygen.ParsedKey:
    full, _ = await store.create(spec(**overrides), "sk-mp")
    parsed = keygen.parse_key(full)
    assert parsed is not None
    return parsed


GPT4 = RequestedModel.named("gpt-4")


async def test_created_key_is_stored_as_a_digest_only(store: KeyStore) -> None:
    full, key = await store.create(spec(), "sk-mp")
    fields: dict[str, str] = await store.redis.client.hgetall(record_key(key.id))  # type: ignore[assignment]
    assert full not in fields.values()
    assert full.rsplit("-", 1)[1] not in "".join(fields.values())
    assert fields["hash"] == keygen.digest(full)


async def test_active_key_is_allowed_and_counted(store: KeyStore) -> None:
    key = await new_key(store, rpm_limit=5)
    decision = await store.check(key, GPT4)
    assert decision.reason is Reason.OK
    assert (decision.user_id, decision.team_id) == ("u1", "t1")
    assert decision.rpm.used == 1 and decision.rpm.remaining == 4
    record = await store.get(key.key_id)
    assert record.total_requests == 1 and record.last_used_ms == store.clock()


async def test_unknown_key_is_invalid(store: KeyStore) -> None:
    key = keygen.parse_key("sk-mp-0000000000000000-" + "a" * 43)
    assert key is not None
    assert (await store.check(key, GPT4)).reason is Reason.INVALID_API_KEY


async def test_wrong_secret_for_a_known_id_is_invalid(store: KeyStore) -> None:
    key = await new_key(store)
    tampered = keygen.parse_key(f"sk-mp-{key.key_id}-" + "Z" * 43)
    assert tampered is not None
    assert (await store.check(tampered, GPT4)).reason is Reason.INVALID_API_KEY


async def test_revoked_key_is_denied(store: KeyStore) -> None:
    key = await new_key(store)
    await store.revoke(key.key_id)
    assert (await store.check(key, GPT4)).reason is Reason.KEY_REVOKED


async def test_key_expires_at_its_expiry(store: KeyStore, clock: ManualClock) -> None:
    key = await new_key(store, expires_at_ms=clock.now_ms + DAY_MS)
    assert (await store.check(key, GPT4)).reason is Reason.OK
    clock.advance(86_400)
    assert (await store.check(key, GPT4)).reason is Reason.KEY_EXPIRED


async def test_model_outside_the_allow_list_is_denied(store: KeyStore) -> None:
    key = await new_key(store, allowed_models=("gpt-4", "claude-3-opus"))
    assert (await store.check(key, RequestedModel.named("claude-3-opus"))).allowed
    assert (await store.check(key, RequestedModel.named("gpt-4o"))).reason is (
        Reason.MODEL_NOT_ALLOWED
    )


async def test_allow_list_matches_whole_names_only(store: KeyStore) -> None:
    key = await new_key(store, allowed_models=("gpt-4-32k",))
    assert (await store.check(key, RequestedModel.named("gpt-4"))).reason is (
        Reason.MODEL_NOT_ALLOWED
    )


async def test_unreadable_body_passes_only_all_model_keys(store: KeyStore) -> None:
    restricted = await new_key(store, allowed_models=("gpt-4",))
    open_key = await new_key(store)
    assert (await store.check(restricted, UNREADABLE)).reason is Reason.MODEL_NOT_ALLOWED
    assert (await store.check(open_key, UNREADABLE)).allowed


async def test_request_without_body_passes_the_model_step(store: KeyStore) -> None:
    key = await new_key(store, allowed_models=("gpt-4",))
    assert (await store.check(key, NO_BODY)).allowed


async def test_rpm_allows_exactly_the_limit_per_window(store: KeyStore, clock: ManualClock) -> None:
    key = await new_key(store, rpm_limit=3)
    reasons = [(await store.check(key, GPT4)).reason for _ in range(5)]
    assert reasons == [Reason.OK] * 3 + [Reason.RATE_LIMIT_EXCEEDED] * 2
    clock.advance(59.9)
    denied = await store.check(key, GPT4)
    assert denied.limit_hit == "rpm" and denied.retry_after_s == 1
    clock.advance(0.1)
    assert (await store.check(key, GPT4)).allowed


async def test_retry_after_counts_whole_seconds_to_window_end(
    store: KeyStore, clock: ManualClock
) -> None:
    key = await new_key(store, rpm_limit=1)
    await store.check(key, GPT4)
    clock.advance(20.5)
    assert (await store.check(key, GPT4)).retry_after_s == 40


async def test_tpm_denies_once_reported_tokens_reach_the_limit(
    store: KeyStore, clock: ManualClock
) -> None:
    key = await new_key(store, tpm_limit=100)
    assert (await store.check(key, GPT4)).allowed
    await store.report_usage(usage(key.key_id, "r1", tokens=60))
    assert (await store.check(key, GPT4)).allowed
    await store.report_usage(usage(key.key_id, "r2", tokens=40))
    denied = await store.check(key, GPT4)
    assert denied.reason is Reason.RATE_LIMIT_EXCEEDED and denied.limit_hit == "tpm"
    assert denied.tpm.used == 100 and denied.tpm.remaining == 0
    clock.advance(60)
    assert (await store.check(key, GPT4)).allowed


async def test_budget_denies_once_spent_reaches_it(store: KeyStore) -> None:
    key = await new_key(store, max_budget_nanos=3000)
    await store.report_usage(usage(key.key_id, "r1", cost_nanos=2999))
    assert (await store.check(key, GPT4)).allowed
    await store.report_usage(usage(key.key_id, "r2", cost_nanos=1))
    assert (await store.check(key, GPT4)).reason is Reason.BUDGET_EXCEEDED


async def test_budget_compare_is_exact_beyond_float_precision(store: KeyStore) -> None:
    budget = 2**53 + 1  # not representable as a double
    key = await new_key(store, max_budget_nanos=budget)
    await store.report_usage(usage(key.key_id, "r1", cost_nanos=2**53))
    assert (await store.check(key, GPT4)).allowed
    await store.report_usage(usage(key.key_id, "r2", cost_nanos=1))
    assert (await store.check(key, GPT4)).reason is Reason.BUDGET_EXCEEDED


async def test_denied_checks_count_nothing(store: KeyStore) -> None:
    key = await new_key(store, rpm_limit=1, allowed_models=("gpt-4",))
    await store.check(key, RequestedModel.named("other"))
    assert (await store.check(key, GPT4)).allowed
    assert (await store.get(key.key_id)).total_requests == 1


async def test_repeated_request_id_charges_once(store: KeyStore) -> None:
    key = await new_key(store)
    first = await store.report_usage(usage(key.key_id, "same", cost_nanos=500))
    again = await store.report_usage(usage(key.key_id, "same", cost_nanos=500))
    assert not first.duplicate and again.duplicate
    assert again.spent_nanos == 500 and again.cost_nanos == 0


async def test_report_for_unknown_key_is_not_found(store: KeyStore) -> None:
    with pytest.raises(NotFound):
        await store.report_usage(usage("0000000000000001", "r"))


async def test_concurrent_reports_sum_exactly(store: KeyStore) -> None:
    key = await new_key(store)
    await asyncio.gather(
        *(store.report_usage(usage(key.key_id, f"r{i}", cost_nanos=123_457)) for i in range(200))
    )
    assert (await store.get(key.key_id)).spent_nanos == 200 * 123_457


async def test_usage_rollup_is_written_per_day_and_model(store: KeyStore) -> None:
    key = await new_key(store)
    await store.report_usage(UsageReport(key.key_id, "a", "gpt-4", "p", 10, 5, 15, 700))
    await store.report_usage(UsageReport(key.key_id, "b", "gpt-4", "p", 1, 2, 3, 300))
    rollups = [k async for k in store.redis.client.scan_iter(f"vk:{{{key.key_id}}}:usage:*")]
    assert len(rollups) == 1
    day = await store.redis.client.hgetall(rollups[0])
    assert day == {
        "requests:gpt-4": "2",
        "prompt_tokens:gpt-4": "11",
        "completion_tokens:gpt-4": "7",
        "cost:gpt-4": "1000",
    }


async def test_unreachable_redis_raises_store_unavailable() -> None:
    redis = RedisBridge.from_url("redis://127.0.0.1:1/0", timeout_s=0.2)
    store = KeyStore(redis)
    key = keygen.parse_key("sk-mp-0000000000000000-" + "a" * 43)
    assert key is not None
    with pytest.raises(StoreUnavailable):
        await store.check(key, GPT4)
    assert await store.ping() is False
    await redis.aclose()
