"""SPEC's decision table, row by row, as HTTP through a real Envoy to the mock upstream.

Each test asserts what the client saw and what the upstream saw (or that it saw nothing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from devstack.mock_upstream import MockUpstream
from devstack.processes import RedisServer, free_port
from keys.store import KeyStore
from keys.v1 import keys_pb2
from tests.conftest import Envoy, ManualClock, start_envoy, start_server
from tests.helpers import Clients, HttpReply, chat_body, eventually, fetch, key_spec

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-tpm",
    "x-ratelimit-remaining-tpm",
    "x-ratelimit-limit-rpm",
    "x-ratelimit-remaining-rpm",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


def post(envoy: Envoy, headers: dict[str, str], body: bytes = b"", path: str = CHAT) -> HttpReply:
    return fetch(envoy.port, "POST", path, {"content-type": "application/json", **headers}, body)


def assert_denied(reply: HttpReply, status: int, code: str) -> dict[str, object]:
    assert reply.status == status
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] is None and error["message"]
    return dict(error)


def upstream_calls(upstream: MockUpstream, since: int) -> int:
    return len(upstream.seen) - since


# --- allowed --------------------------------------------------------------------------


def test_allowed_request_reaches_upstream_with_identity_and_without_the_key(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, data = clients.create_key(team_id="team_9", rpm_limit=5, tpm_limit=1000)
    reply = post(
        envoy,
        {
            "authorization": f"Bearer {key}",
            "x-virtual-key-id": "forged",
            "x-virtual-key-user-id": "forged",
            "x-virtual-key-admin": "yes",
        },
        chat_body(),
    )
    assert reply.status == 200
    assert reply.json()["object"] == "chat.completion"
    saw = upstream.seen[-1]
    assert saw.headers["x-virtual-key-id"] == data.id
    assert saw.headers["x-virtual-key-user-id"] == "user_123"
    assert saw.headers["x-virtual-key-team-id"] == "team_9"
    assert "x-virtual-key-admin" not in saw.headers
    assert "authorization" not in saw.headers
    assert key not in json.dumps(saw.headers)


def test_allowed_response_carries_rate_limit_headers(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(rpm_limit=5, tpm_limit=1000)
    reply = post(envoy, {"x-api-key": key}, chat_body())
    assert reply.status == 200
    assert all(name in reply.headers for name in RATE_LIMIT_HEADERS)
    assert reply.headers["x-ratelimit-limit-rpm"] == "5"
    assert reply.headers["x-ratelimit-remaining-rpm"] == "4"
    assert reply.headers["x-ratelimit-limit-tpm"] == "1000"
    assert reply.headers["x-ratelimit-remaining-tpm"] == "1000"
    assert reply.headers["x-ratelimit-limit-requests"] == "5"


def test_unlimited_key_says_unlimited(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(rpm_limit=0, tpm_limit=0)
    reply = post(envoy, {"api-key": key}, chat_body())
    assert reply.status == 200
    assert reply.headers["x-ratelimit-limit-rpm"] == "unlimited"
    assert reply.headers["x-ratelimit-remaining-tokens"] == "unlimited"


def test_x_api_key_is_removed_upstream(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()
    assert post(envoy, {"x-api-key": key}, chat_body()).status == 200
    assert "x-api-key" not in upstream.seen[-1].headers


def test_request_without_body_passes_a_model_restricted_key(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    reply = fetch(envoy.port, "GET", "/v1/models", {"authorization": f"Bearer {key}"})
    assert reply.status == 200 and reply.json()["object"] == "list"


def test_public_path_needs_no_key_and_forged_identity_is_stripped(
    envoy: Envoy, upstream: MockUpstream
) -> None:
    reply = fetch(envoy.port, "GET", "/healthz", {"x-virtual-key-id": "forged"})
    assert reply.status == 200
    assert upstream.seen[-1].path == "/healthz"
    assert "x-virtual-key-id" not in upstream.seen[-1].headers


def test_usage_reported_by_the_upstream_is_charged(envoy: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=10)
    reply = post(envoy, {"authorization": f"Bearer {key}"}, chat_body(max_tokens=100))
    usage = reply.json()["usage"]
    after = clients.get_key(data.id)
    expected = usage["prompt_tokens"] * 30e-6 + usage["completion_tokens"] * 60e-6  # gpt-4
    assert after.spent == pytest.approx(expected, rel=1e-12)
    assert after.total_requests == 1 and after.HasField("last_used")


# --- denied ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer sk-mp-not-a-key"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Bearer sk-mp-0123456789abcdef-" + "A" * 43},  # unknown id
    ],
    ids=["missing", "malformed", "not-bearer", "unknown"],
)
def test_missing_malformed_or_unknown_key_is_401(
    envoy: Envoy, upstream: MockUpstream, headers: dict[str, str]
) -> None:
    before = len(upstream.seen)
    reply = post(envoy, headers, chat_body())
    error = assert_denied(reply, 401, "invalid_api_key")
    assert error["message"] == "Invalid API key provided."
    assert upstream_calls(upstream, before) == 0


def test_tampered_secret_is_401_and_reveals_nothing(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()
    before = len(upstream.seen)
    tampered = key[:-1] + ("a" if key[-1] != "a" else "b")
    error = assert_denied(
        post(envoy, {"authorization": f"Bearer {tampered}"}, chat_body()), 401, "invalid_api_key"
    )
    assert error["message"] == "Invalid API key provided."
    assert upstream_calls(upstream, before) == 0


def test_revoked_key_is_401_key_revoked(envoy: Envoy, clients: Clients) -> None:
    key, data = clients.create_key()
    clients.revoke(data.id)
    assert_denied(post(envoy, {"authorization": f"Bearer {key}"}, chat_body()), 401, "key_revoked")


async def test_expired_key_is_401_key_expired(
    envoy: Envoy, store: KeyStore, clock: ManualClock
) -> None:
    key, _ = await store.create(key_spec(name="old", expires_at_ms=1), "sk-mp")
    assert_denied(post(envoy, {"authorization": f"Bearer {key}"}, chat_body()), 401, "key_expired")


def test_model_outside_allowed_models_is_403(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    before = len(upstream.seen)
    error = assert_denied(
        post(envoy, {"authorization": f"Bearer {key}"}, chat_body("gpt-4-32k")),
        403,
        "model_not_allowed",
    )
    assert '"gpt-4-32k"' in str(error["message"])
    assert upstream_calls(upstream, before) == 0


def test_second_model_field_cannot_smuggle_a_model(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    body = b'{"model": "gpt-4", "messages": [], "model": "gpt-4-32k"}'
    assert_denied(post(envoy, {"authorization": f"Bearer {key}"}, body), 403, "model_not_allowed")


def test_non_json_body_is_403_for_a_model_restricted_key(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    assert_denied(
        post(envoy, {"authorization": f"Bearer {key}"}, b'{"model": "gpt-4", '),
        403,
        "model_not_allowed",
    )


OVERSIZED_BODY = json.dumps(
    {"model": "gpt-4", "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}
).encode()


def test_body_over_the_envoy_limit_is_403_for_restricted_and_200_for_open_keys(
    envoy: Envoy, clients: Clients
) -> None:
    restricted, _ = clients.create_key(allowed_models=["gpt-4"])
    open_key, _ = clients.create_key(max_budget=0)
    assert_denied(
        post(envoy, {"authorization": f"Bearer {restricted}"}, OVERSIZED_BODY),
        403,
        "model_not_allowed",
    )
    assert post(envoy, {"authorization": f"Bearer {open_key}"}, OVERSIZED_BODY).status == 200


def test_body_over_the_envoy_limit_is_model_not_priced_on_a_budgeted_key(
    envoy: Envoy, clients: Clients
) -> None:
    """Its model cannot be read, so it cannot be priced: a budget would not hold."""
    key, _ = clients.create_key(max_budget=50)
    reply = post(envoy, {"authorization": f"Bearer {key}"}, OVERSIZED_BODY)
    assert_denied(reply, 403, "model_not_priced")


def test_spent_budget_is_402_and_not_retryable(envoy: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=0.001)
    clients.report(data.id, "earlier", cost=0.001)
    reply = post(envoy, {"authorization": f"Bearer {key}"}, chat_body(max_tokens=1))
    error = assert_denied(reply, 402, "budget_exceeded")
    assert error["type"] == "insufficient_quota"
    assert "retry-after" not in reply.headers
    assert clients.get_key(data.id).budget_remaining == 0


def test_a_reservation_the_budget_cannot_hold_is_402_before_anything_is_spent(
    envoy: Envoy, clients: Clients
) -> None:
    """gpt-4: $60/M output, $30/M input; 100 max_tokens and a 92-byte body reserve
    $0.00876. The first is charged $0.00606 (2 + 100 tokens), which leaves $0.00344 of
    $0.0095: not the second's reservation, and after its prompt bound not even the 16
    tokens a clamp would leave it (test_usage_tap.py clamps)."""
    key, _ = clients.create_key(max_budget=0.0095)
    auth = {"authorization": f"Bearer {key}"}
    assert post(envoy, auth, chat_body(max_tokens=100)).status == 200
    error = assert_denied(post(envoy, auth, chat_body(max_tokens=100)), 402, "budget_exceeded")
    assert "this API key" in str(error["message"])
    assert "largest max_tokens" in str(error["message"])


def test_sixth_request_in_a_minute_is_429_with_retry_after(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(rpm_limit=5)
    auth = {"authorization": f"Bearer {key}"}
    statuses = [post(envoy, auth, chat_body()).status for _ in range(5)]
    assert statuses == [200] * 5
    reply = post(envoy, auth, chat_body())
    error = assert_denied(reply, 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and "5 requests per minute" in str(error["message"])
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    assert reply.headers["x-ratelimit-remaining-rpm"] == "0"
    assert reply.headers["x-ratelimit-limit-rpm"] == "5"


def test_reported_tokens_over_tpm_give_429(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(tpm_limit=100, rpm_limit=0)
    auth = {"authorization": f"Bearer {key}"}
    assert post(envoy, auth, chat_body(max_tokens=150)).status == 200
    reply = post(envoy, auth, chat_body())
    error = assert_denied(reply, 429, "rate_limit_exceeded")
    assert error["type"] == "tokens"
    assert reply.headers["x-ratelimit-remaining-tpm"] == "0"
    assert int(reply.headers["retry-after"]) >= 1


# --- Redis or extauthz unreachable ----------------------------------------------------


@pytest.fixture
def fragile_stack(tmp_path: Path) -> Iterator[tuple[RedisServer, Clients, Envoy]]:
    """A stack whose Redis a test may stop."""
    redis = RedisServer(tmp_path / "redis").start()
    server = start_server(redis.url, tmp_path)
    upstream = MockUpstream(free_port(), server.address, server.usage_token).start()
    envoy = start_envoy(server.grpc_port, upstream.port, tmp_path)
    channel = grpc.insecure_channel(server.address)
    yield redis, Clients(channel, server.admin_token, server.usage_token), envoy
    channel.close()
    envoy.process.stop()
    upstream.stop()
    server.process.stop()
    redis.stop()


def test_redis_down_is_503_auth_unavailable(
    fragile_stack: tuple[RedisServer, Clients, Envoy],
) -> None:
    redis, clients, envoy = fragile_stack
    key, _ = clients.create_key()
    redis.stop()
    reply = post(envoy, {"authorization": f"Bearer {key}"}, chat_body())
    assert_denied(reply, 503, "auth_unavailable")
    assert reply.headers["retry-after"] == "1"


def test_unreachable_extauthz_is_503_never_a_pass(upstream: MockUpstream, tmp_path: Path) -> None:
    envoy = start_envoy(free_port(), upstream.port, tmp_path)  # nothing listens there
    try:
        before = len(upstream.seen)
        assert post(envoy, {}, chat_body()).status == 503
        assert upstream_calls(upstream, before) == 0
    finally:
        envoy.process.stop()


def test_public_path_still_passes_when_extauthz_is_unreachable(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    envoy = start_envoy(free_port(), upstream.port, tmp_path)
    try:
        assert fetch(envoy.port, "GET", "/healthz").status == 200
    finally:
        envoy.process.stop()


def test_a_per_model_429_carries_the_models_window_in_its_headers(
    envoy: Envoy, clients: Clients
) -> None:
    key, _ = clients.create_key(
        rpm_limit=100, model_limits={"gpt-4": keys_pb2.ModelLimit(rpm_limit=1)}
    )
    auth = {"authorization": f"Bearer {key}"}
    assert post(envoy, auth, chat_body()).status == 200
    reply = post(envoy, auth, chat_body())
    error = assert_denied(reply, 429, "rate_limit_exceeded")
    assert 'model "gpt-4"' in str(error["message"])
    assert reply.headers["x-ratelimit-limit-requests"] == "1"
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    # a dated snapshot is the same model to the limit, as to the price table
    assert_denied(post(envoy, auth, chat_body("gpt-4-0613")), 429, "rate_limit_exceeded")


def test_a_request_held_in_flight_takes_the_keys_one_slot_until_it_is_reported(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    """The README's demo: the mock upstream holds a request when asked to."""
    key, data = clients.create_key(max_parallel_requests=1)
    auth = {"authorization": f"Bearer {key}", "x-mock-delay-seconds": "2"}
    seen = len(upstream.seen)
    with ThreadPoolExecutor(max_workers=1) as pool:
        slow = pool.submit(post, envoy, auth, chat_body())
        assert eventually(lambda: len(upstream.seen) > seen)
        reply = post(envoy, {"authorization": f"Bearer {key}"}, chat_body())
        assert_denied(reply, 429, "concurrency_limit_exceeded")
        assert reply.headers["retry-after"] == "1"
        assert slow.result().status == 200
    assert clients.get_key(data.id).in_flight == 0  # the mock's report closed it
    assert post(envoy, {"authorization": f"Bearer {key}"}, chat_body()).status == 200


def test_a_compressed_body_is_model_not_priced_on_a_budgeted_key(
    envoy: Envoy, clients: Clients
) -> None:
    """Its size bounds nothing (a few hundred bytes can inflate to megabytes of prompt)."""
    import gzip

    key, _ = clients.create_key(max_budget=50)
    headers = {"authorization": f"Bearer {key}", "content-encoding": "gzip"}
    reply = post(envoy, headers, gzip.compress(chat_body(max_tokens=5)))
    assert_denied(reply, 403, "model_not_priced")


def test_a_request_the_upstream_refuses_gives_its_reservation_back(
    envoy: Envoy, clients: Clients
) -> None:
    """The mock, like any load balancer should, reports a failed request as zero usage."""
    key, data = clients.create_key(max_budget=1, max_parallel_requests=1)
    body = json.dumps({"model": "gpt-4", "messages": [], "max_tokens": -5}).encode()
    assert post(envoy, {"authorization": f"Bearer {key}"}, body).status == 400
    after = clients.get_key(data.id)
    assert (after.in_flight, after.reserved, after.spent) == (0, 0, 0)
