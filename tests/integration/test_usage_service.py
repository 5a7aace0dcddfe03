"""keys.v1.UsageService/ReportUsage through a real server process."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from keys.v1 import keys_pb2
from tests.helpers import Clients, bearer

pytestmark = pytest.mark.integration


def test_cost_is_computed_from_the_price_table(clients: Clients) -> None:
    _, data = clients.create_key(max_budget=10)
    # gpt-4: $30 / $60 per 1M tokens -> 1000 * 30e-6 + 500 * 60e-6 = $0.06
    reply = clients.report(data.id, "r1", prompt_tokens=1000, completion_tokens=500)
    assert reply.cost == pytest.approx(0.06, abs=1e-12)
    assert reply.spent == pytest.approx(0.06, abs=1e-12)
    assert reply.budget_remaining == pytest.approx(9.94, abs=1e-12)
    assert reply.total_tokens == 1500 and not reply.duplicate


def test_cached_prompt_tokens_are_charged_at_the_cached_price(clients: Clients) -> None:
    _, data = clients.create_key(max_budget=10)
    # gpt-4o: $2.5 input, $1.25 cached, $10 output per 1M tokens; reasoning bills as output
    reply = clients.report(
        data.id,
        "r1",
        model="gpt-4o",
        prompt_tokens=1000,
        completion_tokens=100,
        cached_tokens=800,
        reasoning_tokens=60,
    )
    # 200 * 2.5e-6 + 800 * 1.25e-6 + 100 * 10e-6 = $0.0025
    assert reply.cost == pytest.approx(0.0025, abs=1e-12)
    assert clients.get_key(data.id).spent == pytest.approx(0.0025, abs=1e-12)
    assert reply.total_tokens == 1100


def test_given_cost_is_charged_as_sent(clients: Clients) -> None:
    _, data = clients.create_key()
    reply = clients.report(data.id, "r1", model="my-local-llm", cost=0.25, prompt_tokens=3)
    assert (reply.cost, reply.spent) == (0.25, 0.25)


def test_repeated_request_id_charges_once_and_says_so(clients: Clients) -> None:
    _, data = clients.create_key()
    first = clients.report(data.id, "same-id", cost=0.5)
    again = clients.report(data.id, "same-id", cost=0.5)
    assert not first.duplicate and again.duplicate
    assert again.cost == 0 and again.spent == 0.5
    assert clients.get_key(data.id).spent == 0.5


def test_unpriced_model_without_cost_is_refused_by_name(clients: Clients) -> None:
    _, data = clients.create_key()
    with pytest.raises(grpc.RpcError) as err:
        clients.report(data.id, "r1", model="llama-local", prompt_tokens=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "llama-local" in (err.value.details() or "")
    assert clients.get_key(data.id).spent == 0


def test_unknown_key_is_not_found(clients: Clients) -> None:
    with pytest.raises(grpc.RpcError) as err:
        clients.report("0123456789abcdef", "r1", cost=1.0)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"request_id": ""}, "request_id is required"),
        ({"prompt_tokens": -1}, "prompt_tokens"),
        ({"prompt_tokens": 10, "cached_tokens": -1}, "cached_tokens"),
        ({"completion_tokens": 10, "reasoning_tokens": -1}, "reasoning_tokens"),
        ({"cost": -0.01}, "cost"),
        ({"cost": float("inf")}, "cost"),
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 3}, "total_tokens"),
    ],
)
def test_bad_reports_are_refused_and_charge_nothing(
    clients: Clients, fields: dict[str, object], message: str
) -> None:
    _, data = clients.create_key()
    request: dict[str, Any] = {"key_id": data.id, "request_id": "r1", "model": "gpt-4", **fields}
    with pytest.raises(grpc.RpcError) as err:
        clients.usage.ReportUsage(
            keys_pb2.ReportUsageRequest(**request), metadata=bearer(clients.usage_token)
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.value.details() or "")
    assert clients.get_key(data.id).spent == 0


def test_report_needs_the_usage_or_admin_token(clients: Clients) -> None:
    _, data = clients.create_key()
    request = keys_pb2.ReportUsageRequest(key_id=data.id, request_id="r", model="gpt-4", cost=1)
    with pytest.raises(grpc.RpcError) as err:
        clients.usage.ReportUsage(request, metadata=bearer("nope"))
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert not clients.usage.ReportUsage(request, metadata=bearer(clients.admin_token)).duplicate


def test_200_concurrent_reports_sum_exactly(clients: Clients) -> None:
    _, data = clients.create_key(max_budget=0)
    with ThreadPoolExecutor(max_workers=50) as pool:
        replies = list(
            pool.map(lambda i: clients.report(data.id, f"req-{i}", cost=0.001234), range(200))
        )
    assert not any(r.duplicate for r in replies)
    key = clients.get_key(data.id)
    assert key.spent == 0.2468  # 200 x 0.001234, exactly: no float drift


def test_concurrent_duplicates_charge_once(clients: Clients) -> None:
    _, data = clients.create_key()
    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(lambda _: clients.report(data.id, "dup", cost=0.1), range(20)))
    assert sum(not r.duplicate for r in replies) == 1
    assert clients.get_key(data.id).spent == 0.1
