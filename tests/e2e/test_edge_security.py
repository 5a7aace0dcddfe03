"""Attacks on the HTTP edge, replayed through real Envoy and real nginx (as shipped in
envoy.yaml and deploy/nginx/nginx.conf): each test asserts what the client and the
upstream saw."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from devstack.mock_upstream import MockUpstream
from devstack.processes import wait_port
from keys.v1 import keys_pb2
from tests.conftest import Envoy, Nginx, Server, start_server
from tests.helpers import Clients, HttpReply, chat_body, fetch

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
# 96 random bits, then the nano-USD the request reserved (keys/keyspace.reservation_id)
REQUEST_ID = re.compile(r"[0-9a-f]{24}-[0-9]+")


def error_code(reply: HttpReply) -> str:
    assert reply.headers["content-type"].startswith("application/json")
    return str(reply.json()["error"]["code"])


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def admin(clients: Clients) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {clients.admin_token}"),)


# --- 1. the id usage is charged under ---------------------------------------------------


def test_envoy_replaces_a_client_chosen_x_request_id(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()
    seen = []
    for _ in range(2):
        headers = {**JSON, **bearer(key), "x-request-id": "chosen-by-client"}
        assert fetch(envoy.port, "POST", CHAT, headers, chat_body()).status == 200
        seen.append(upstream.seen[-1].headers["x-request-id"])
    assert "chosen-by-client" not in seen
    assert seen[0] != seen[1]


def test_upstream_gets_a_fresh_request_id_replacing_the_clients(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()
    seen = []
    for _ in range(2):
        headers = {**JSON, **bearer(key), "x-virtual-key-request-id": "chosen-by-client"}
        assert fetch(envoy.port, "POST", CHAT, headers, chat_body()).status == 200
        seen.append(upstream.seen[-1].headers["x-virtual-key-request-id"])
    assert all(REQUEST_ID.fullmatch(rid) for rid in seen)
    assert seen[0] != seen[1]


def test_usage_is_reported_under_the_checks_request_id_so_none_is_a_duplicate(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, data = clients.create_key()
    for _ in range(2):
        headers = {**JSON, **bearer(key), "x-request-id": "same-every-time"}
        assert fetch(envoy.port, "POST", CHAT, headers, chat_body()).status == 200
        assert upstream.reported[-1] == upstream.seen[-1].headers["x-virtual-key-request-id"]
    usage = clients.usage.GetUsage(
        keys_pb2.GetUsageRequest(key_id=data.id), metadata=admin(clients), timeout=5
    )
    assert usage.totals.requests == 2


def test_nginx_passes_the_checks_request_id_upstream(
    nginx: Nginx, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()
    headers = {**JSON, **bearer(key), "x-model": "gpt-4", "x-virtual-key-request-id": "mine"}
    assert fetch(nginx.port, "POST", CHAT, headers, chat_body()).status == 200
    assert REQUEST_ID.fullmatch(upstream.seen[-1].headers["x-virtual-key-request-id"])
    assert upstream.reported[-1] == upstream.seen[-1].headers["x-virtual-key-request-id"]


# --- 5. /auth reads the original URI from one header ------------------------------------


def test_auth_denies_disagreeing_original_uri_headers(server: Server) -> None:
    """As behind ingress-nginx, which sets only X-Original-URL: the client's
    X-Original-URI must not make a keyless chat request public."""
    reply = fetch(
        server.http_port,
        "GET",
        "/auth",
        {
            "x-original-url": f"https://llm.example{CHAT}",
            "x-original-method": "POST",
            "x-original-uri": "/healthz",
        },
    )
    assert reply.status == 400 and error_code(reply) == "ambiguous_request"


@pytest.fixture(scope="module")
def url_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        redis_url,
        tmp_path_factory.mktemp("url-server"),
        extra={"EXTAUTHZ_AUTH_URI_HEADER": "X-Original-URL"},
    )
    wait_port(srv.http_port, srv.process.proc)  # start_server waits for gRPC only
    yield srv
    srv.process.stop()


def test_auth_reads_the_operators_uri_header_as_a_full_url(url_server: Server) -> None:
    def auth(url: str) -> int:
        headers = {"x-original-url": url, "x-original-method": "GET"}
        return fetch(url_server.http_port, "GET", "/auth", headers).status

    assert auth("https://llm.example/healthz?probe=1") == 200
    assert auth(f"https://llm.example{CHAT}") == 401


# --- 6. underscored identity headers ----------------------------------------------------


def test_envoy_drops_underscored_identity_headers(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()  # no team: nothing may say one upstream
    headers = {**JSON, **bearer(key), "x_virtual_key_team_id": "team_forged"}
    assert fetch(envoy.port, "POST", CHAT, headers, chat_body()).status == 200
    saw = upstream.seen[-1].headers
    assert "team_forged" not in json.dumps(saw)


def test_nginx_drops_underscored_identity_headers(
    nginx: Nginx, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()
    headers = {**JSON, **bearer(key), "x-model": "gpt-4", "x_virtual_key_team_id": "team_forged"}
    assert fetch(nginx.port, "POST", CHAT, headers, chat_body()).status == 200
    assert "team_forged" not in json.dumps(upstream.seen[-1].headers)


# --- 8. nginx gaps ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_nginx_body_on_any_method_is_unreadable_for_a_restricted_key(
    nginx: Nginx, clients: Clients, upstream: MockUpstream, method: str
) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    before = len(upstream.seen)
    reply = fetch(nginx.port, method, CHAT, {**JSON, **bearer(key)}, chat_body("gpt-5"))
    assert reply.status == 403 and error_code(reply) == "model_not_allowed"
    assert len(upstream.seen) == before


def test_nginx_public_path_forwards_the_normalised_uri(
    nginx: Nginx, upstream: MockUpstream
) -> None:
    reply = fetch(nginx.port, "GET", f"{CHAT}/../../../healthz")
    assert reply.status == 200
    assert upstream.seen[-1].path == "/healthz"


def test_envoy_normalises_dot_segments_before_routing(envoy: Envoy, upstream: MockUpstream) -> None:
    reply = fetch(envoy.port, "GET", f"{CHAT}/../../../healthz")
    assert reply.status == 200
    assert upstream.seen[-1].path == "/healthz"


# --- 9. bodies two parsers read two ways ------------------------------------------------


def test_envoy_case_variant_model_key_is_unreadable_for_a_restricted_key(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    before = len(upstream.seen)
    body = b'{"model": "gpt-4", "Model": "gpt-5", "messages": []}'
    reply = fetch(envoy.port, "POST", CHAT, {**JSON, **bearer(key)}, body)
    assert reply.status == 403 and error_code(reply) == "model_not_allowed"
    assert len(upstream.seen) == before


def test_envoy_json_sent_as_a_form_is_unreadable_for_a_restricted_key(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    before = len(upstream.seen)
    headers = {"content-type": "application/x-www-form-urlencoded", **bearer(key)}
    reply = fetch(envoy.port, "POST", CHAT, headers, chat_body("gpt-4"))
    assert reply.status == 403 and error_code(reply) == "model_not_allowed"
    assert len(upstream.seen) == before


def test_envoy_json_with_charset_still_names_its_model(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    headers = {"content-type": "application/json; charset=utf-8", **bearer(key)}
    assert fetch(envoy.port, "POST", CHAT, headers, chat_body("gpt-4")).status == 200


# --- 10. public routes are read-only ----------------------------------------------------


def test_envoy_post_to_a_public_path_needs_a_key(envoy: Envoy, upstream: MockUpstream) -> None:
    before = len(upstream.seen)
    reply = fetch(envoy.port, "POST", "/healthz", JSON, chat_body())
    assert reply.status == 401 and error_code(reply) == "invalid_api_key"
    assert len(upstream.seen) == before


def test_envoy_get_on_a_public_path_needs_no_key(envoy: Envoy) -> None:
    assert fetch(envoy.port, "GET", "/healthz").status == 200


def test_server_post_to_a_public_path_is_not_public(clients: Clients) -> None:
    """For requests that reach Check anyway (a front end without the method match)."""
    reply = clients.check({"content-type": "application/json"}, chat_body(), path="/healthz")
    assert reply.denied_response.status.code == 401


def test_nginx_post_to_a_public_path_is_refused(nginx: Nginx, upstream: MockUpstream) -> None:
    before = len(upstream.seen)
    reply = fetch(nginx.port, "POST", "/healthz", JSON, chat_body())
    assert reply.status == 405
    assert len(upstream.seen) == before


# --- 11. X-Preferred-Model is a second model claim --------------------------------------


def test_envoy_preferred_model_header_is_checked_like_the_body(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-3.5-turbo"])
    before = len(upstream.seen)
    headers = {**JSON, **bearer(key), "x-preferred-model": "gpt-4"}
    reply = fetch(envoy.port, "POST", CHAT, headers, chat_body("gpt-3.5-turbo"))
    assert reply.status == 403 and error_code(reply) == "model_not_allowed"
    assert len(upstream.seen) == before


def test_nginx_preferred_model_header_is_checked_like_x_model(
    nginx: Nginx, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-3.5-turbo"])
    before = len(upstream.seen)
    headers = {**JSON, **bearer(key), "x-model": "gpt-3.5-turbo", "x-preferred-model": "gpt-4"}
    reply = fetch(nginx.port, "POST", CHAT, headers, chat_body("gpt-3.5-turbo"))
    assert reply.status == 403 and error_code(reply) == "model_not_allowed"
    assert len(upstream.seen) == before


FORGED_ON_PUBLIC = {
    "authorization": "Bearer sk-mp-0123456789abcdef-" + "S" * 40,
    "x-api-key": "sk-mp-0123456789abcdef-" + "S" * 40,
    "x-virtual-key-request-id": "forged-rid",
    "x-virtual-key-note": "forged",
}


def test_envoy_public_path_forwards_no_key_and_no_identity_look_alike(
    envoy: Envoy, upstream: MockUpstream
) -> None:
    reply = fetch(envoy.port, "GET", "/healthz", FORGED_ON_PUBLIC)
    assert reply.status == 200
    seen = upstream.seen[-1].headers
    assert not {"authorization", "x-api-key"} & seen.keys()
    assert not [h for h in seen if h.startswith("x-virtual-key-")]


def test_nginx_public_path_forwards_no_key(nginx: Nginx, upstream: MockUpstream) -> None:
    """nginx blanks our header names; it cannot drop other x-virtual-key-* by prefix
    (docs/reliability.md lists that limit)."""
    reply = fetch(nginx.port, "GET", "/healthz", FORGED_ON_PUBLIC)
    assert reply.status == 200
    seen = upstream.seen[-1].headers
    assert not {"authorization", "x-api-key"} & seen.keys()
    assert not seen.get("x-virtual-key-request-id")
