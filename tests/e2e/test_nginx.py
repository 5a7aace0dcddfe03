"""nginx auth_request in front of the mock upstream, with deploy/nginx/nginx.conf as
shipped: the client sees the same status, headers and JSON body as through Envoy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack import processes as p
from devstack.mock_upstream import MockUpstream
from tests.conftest import Envoy, Nginx, start_nginx
from tests.helpers import Clients, HttpReply, chat_body, fetch

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"


def post(port: int, headers: dict[str, str], body: bytes = b"") -> HttpReply:
    return fetch(port, "POST", CHAT, {"content-type": "application/json", **headers}, body)


def error_code(reply: HttpReply) -> str:
    assert reply.headers["content-type"].startswith("application/json")
    return str(reply.json()["error"]["code"])


def test_allowed_request_reaches_upstream_with_identity_and_without_the_key(
    nginx: Nginx, clients: Clients, upstream: MockUpstream
) -> None:
    key, data = clients.create_key(team_id="team_n", rpm_limit=5, tpm_limit=100)
    reply = post(
        nginx.port,
        {"authorization": f"Bearer {key}", "x-model": "gpt-4", "x-virtual-key-id": "forged"},
        chat_body(),
    )
    assert reply.status == 200
    saw = upstream.seen[-1]
    assert saw.headers["x-virtual-key-id"] == data.id
    assert saw.headers["x-virtual-key-user-id"] == "user_123"
    assert saw.headers["x-virtual-key-team-id"] == "team_n"
    assert "authorization" not in saw.headers
    assert reply.headers["x-ratelimit-remaining-rpm"] == "4"
    assert reply.headers["x-ratelimit-limit-tpm"] == "100"


def test_missing_key_is_401_with_the_json_body(nginx: Nginx, upstream: MockUpstream) -> None:
    before = len(upstream.seen)
    reply = post(nginx.port, {}, chat_body())
    assert reply.status == 401 and error_code(reply) == "invalid_api_key"
    assert len(upstream.seen) == before


def test_model_from_x_model_outside_the_allow_list_is_403(nginx: Nginx, clients: Clients) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    reply = post(nginx.port, {"x-api-key": key, "x-model": "gpt-4o"}, chat_body("gpt-4o"))
    assert reply.status == 403 and error_code(reply) == "model_not_allowed"


def test_post_without_x_model_passes_only_keys_allowed_every_model(
    nginx: Nginx, clients: Clients
) -> None:
    restricted, _ = clients.create_key(allowed_models=["gpt-4"])
    open_key, _ = clients.create_key(max_budget=0)
    assert post(nginx.port, {"x-api-key": restricted}, chat_body()).status == 403
    assert post(nginx.port, {"x-api-key": open_key}, chat_body()).status == 200


def test_post_without_x_model_is_model_not_priced_on_a_budgeted_key(
    nginx: Nginx, clients: Clients
) -> None:
    key, _ = clients.create_key(max_budget=50)
    reply = post(nginx.port, {"x-api-key": key}, chat_body())
    assert reply.status == 403
    assert json.loads(reply.body)["error"]["code"] == "model_not_priced"


def test_spent_budget_is_402_not_500(nginx: Nginx, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=0.01)
    clients.report(data.id, "n1", cost=0.01)
    reply = post(nginx.port, {"x-api-key": key, "x-model": "gpt-4"}, chat_body())
    assert reply.status == 402 and error_code(reply) == "budget_exceeded"
    assert "retry-after" not in reply.headers


def test_rate_limited_request_is_429_with_retry_after_and_headers(
    nginx: Nginx, clients: Clients
) -> None:
    key, _ = clients.create_key(rpm_limit=2)
    auth = {"authorization": f"Bearer {key}", "x-model": "gpt-4"}
    assert [post(nginx.port, auth, chat_body()).status for _ in range(2)] == [200, 200]
    reply = post(nginx.port, auth, chat_body())
    assert reply.status == 429 and error_code(reply) == "rate_limit_exceeded"
    assert 1 <= int(reply.headers["retry-after"]) <= 60
    assert reply.headers["x-ratelimit-remaining-rpm"] == "0"


def test_public_path_needs_no_key(nginx: Nginx, upstream: MockUpstream) -> None:
    reply = fetch(nginx.port, "GET", "/healthz", {"x-virtual-key-id": "forged"})
    assert reply.status == 200
    assert "x-virtual-key-id" not in upstream.seen[-1].headers


def test_denials_match_envoy_exactly(nginx: Nginx, envoy: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(allowed_models=["gpt-4"])
    clients.revoke(data.id)
    through_nginx = post(nginx.port, {"x-api-key": key, "x-model": "gpt-4"}, chat_body())
    through_envoy = post(envoy.port, {"x-api-key": key}, chat_body())
    assert (through_nginx.status, through_nginx.json()) == (
        through_envoy.status,
        through_envoy.json(),
    )
    assert through_nginx.json()["error"]["code"] == "key_revoked"


def test_unreachable_extauthz_is_503_auth_unavailable(
    upstream: MockUpstream, tmp_path: Path
) -> None:
    proxy = start_nginx(tmp_path, p.free_port(), upstream.port)  # nothing listens there
    try:
        before = len(upstream.seen)
        reply = post(proxy.port, {"x-api-key": "sk-mp-0123456789abcdef-" + "a" * 43})
        assert reply.status == 503 and error_code(reply) == "auth_unavailable"
        assert len(upstream.seen) == before
    finally:
        proxy.process.stop()


def test_unicode_user_id_passes_through_nginx(
    nginx: Nginx, clients: Clients, upstream: MockUpstream
) -> None:
    key, data = clients.create_key(user_id="李雷")
    reply = post(nginx.port, {"x-api-key": key, "x-model": "gpt-4"}, chat_body())
    assert reply.status == 200
    saw = upstream.seen[-1].headers
    assert saw["x-virtual-key-id"] == data.id
    # the mock's HTTP parser reads header bytes as Latin-1: the UTF-8 bytes arrived intact
    assert saw["x-virtual-key-user-id"].encode("latin-1").decode() == "李雷"
