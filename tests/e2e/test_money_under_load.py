"""The money path under load, through real Envoy and real servers on one Redis: 200
requests at once against a $1 key budget and a $1 team budget (5 keys, 2 replicas), and
concurrency slots that a dead reporter cannot keep past the TTL. (The same team test runs
on Redis Cluster in tests/integration/test_redis_cluster.py.) Envoy runs without the usage
tap here: these tests decide when (and whether) usage is reported."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from devstack import processes as p
from extauthz.request import requested_model
from keys import keygen
from keys.connection import RedisBridge
from keys.store import KeyStore
from tests.conftest import Envoy, ManualClock, Server, start_envoy, start_server
from tests.helpers import Clients, chat_body, eventually, fetch
from tests.money_load import (
    MAX_TOKENS,
    MODEL,
    PRICES,
    HoldingUpstream,
    budget_burst,
    reservation_nanos,
    team_budget_under_load,
)

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
REQUESTS = 200


@pytest.fixture(scope="module")
def holding() -> Iterator[HoldingUpstream]:
    upstream = HoldingUpstream(p.free_port()).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def proxy(
    server: Server, holding: HoldingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Envoy]:
    work = tmp_path_factory.mktemp("envoy-load")
    envoy = start_envoy(server.grpc_port, holding.port, work, tap=False)
    fetch(envoy.port, "GET", "/healthz")  # opens Envoy's connection to the server first
    yield envoy
    envoy.process.stop()


def test_200_concurrent_requests_never_spend_past_a_1_dollar_budget(
    proxy: Envoy, holding: HoldingUpstream, clients: Clients
) -> None:
    body = chat_body(MODEL, max_tokens=MAX_TOKENS)
    reserve = reservation_nanos(body)  # $0.01023: 97 fit in $1
    key, data = clients.create_key(max_budget=1.0, rpm_limit=0, tpm_limit=0)
    expected = 1_000_000_000 // reserve
    replies, held = budget_burst(holding, [proxy.port], [key], body, REQUESTS)

    allowed = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 402]
    # 503: Envoy gave up on a Check (a starved test machine). Its reservation, if the
    # server made one, is released once the server sees the cancel.
    abandoned = [r for r in replies if r.status == 503]
    assert len(allowed) + len(refused) + len(abandoned) == REQUESTS
    assert len(allowed) == len(held)
    assert expected - len(abandoned) <= len(allowed) <= expected
    assert all(r.json()["error"]["code"] == "budget_exceeded" for r in refused)

    # each allowed request reports its real usage, after a random delay
    rng = random.Random(7)
    costs = {a.request_id: rng.randint(1, MAX_TOKENS) for a in held}

    def report(request_id: str) -> None:
        time.sleep(rng.random() * 0.05)
        clients.report(
            data.id, request_id, model=MODEL, prompt_tokens=20, completion_tokens=costs[request_id]
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(report, costs))
    charged = sum(PRICES.cost_nanos(MODEL, 20, c) for c in costs.values())
    # reported reservations are closed; only one an abandoned Check made may remain (TTL)
    assert eventually(lambda: clients.get_key(data.id).in_flight <= len(abandoned), timeout=5)
    after = clients.get_key(data.id)
    assert round(after.reserved * 1e9) == after.in_flight * reserve
    assert round(after.spent * 1e9) == charged <= 1_000_000_000


async def test_three_slots_run_three_and_a_dead_reporter_holds_them_only_for_the_ttl(
    proxy: Envoy, holding: HoldingUpstream, clients: Clients, redis_url: str
) -> None:
    key, data = clients.create_key(max_parallel_requests=3, rpm_limit=0, tpm_limit=0)
    body = chat_body(MODEL, max_tokens=10)
    replies, held = budget_burst(holding, [proxy.port], [key], body, 20)
    running = len(held)  # the long requests have ended; nothing ever reports them
    limited = [r for r in replies if r.status == 429]
    assert running == 3 == len([r for r in replies if r.status == 200])
    assert len(limited) == 17
    assert {r.json()["error"]["code"] for r in limited} == {"concurrency_limit_exceeded"}
    assert {r.headers["retry-after"] for r in limited} == {"1"}
    assert clients.get_key(data.id).in_flight == 3
    # the slots stay taken while the records live...
    assert fetch(proxy.port, "POST", CHAT, {"authorization": f"Bearer {key}"}, body).status == 429
    # ...and a Check made once their TTL has passed (the clock moved, not slept) gets one
    parsed = keygen.parse_key(key)
    assert parsed is not None
    redis = RedisBridge.from_url(redis_url, timeout_s=2)
    later = KeyStore(redis, clock=ManualClock(int(time.time() * 1000) + 900_000 + 1))
    try:
        decision = await later.check(parsed, requested_model(body, {}))
        assert decision.allowed and decision.expired == 3
        assert (await later.get(data.id)).in_flight == 1
    finally:
        await redis.aclose()


@pytest.fixture(scope="module")
def replicas(
    server: Server,
    redis_url: str,
    holding: HoldingUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[Envoy]]:
    """A second server on the same Redis, each replica behind its own Envoy (sidecars)."""
    work = tmp_path_factory.mktemp("replicas")
    second = start_server(
        redis_url, work, admin_token=server.admin_token, usage_token=server.usage_token
    )
    envoys = [start_envoy(s.grpc_port, holding.port, work, tap=False) for s in (server, second)]
    for envoy in envoys:
        fetch(envoy.port, "GET", "/healthz")
    yield envoys
    for envoy in envoys:
        envoy.process.stop()
    second.process.stop()


def test_a_team_budget_shared_by_5_keys_on_2_replicas_is_never_overspent(
    replicas: list[Envoy], holding: HoldingUpstream, clients: Clients
) -> None:
    team_budget_under_load(holding, [e.port for e in replicas], clients, f"team-{time.time_ns()}")
