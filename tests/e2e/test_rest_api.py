"""The integration guide's REST calls (/api/...), through Envoy's grpc_json_transcoder to the
KeyService and UsageService, with the admin bearer token, as a client would send them."""

from __future__ import annotations

import http.client
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devstack import processes as p
from devstack.mock_upstream import MockUpstream
from tests.conftest import SERVER_DEFAULTS, Envoy, Server
from tests.helpers import Clients, HttpReply, chat_body, fetch

pytestmark = pytest.mark.e2e

# The guide's "Creating a Virtual Key" body, verbatim.
GUIDE_BODY: dict[str, Any] = {
    "name": "My Production Key",
    "user_id": "user_123",
    "expires_days": 365,
    "allowed_models": ["gpt-4", "claude-3-opus"],
    "max_budget": 100.0,
    "tpm_limit": 10000,
    "rpm_limit": 60,
}
# The session server caps expires_days lower than the production default of 365.
MAX_DAYS = int(SERVER_DEFAULTS["VIRTUAL_KEY_MAX_EXPIRES_DAYS"])


def api(
    envoy: Envoy,
    method: str,
    path: str,
    token: str | None,
    body: dict[str, Any] | None = None,
    user: str | None = "user_123",
) -> HttpReply:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    if user is not None:
        headers["x-user-id"] = user
    data = json.dumps(body).encode() if body is not None else None
    return fetch(envoy.port, method, path, headers, data)


def create(envoy: Envoy, server: Server, **changes: Any) -> dict[str, Any]:
    reply = api(
        envoy,
        "POST",
        "/api/keys",
        server.admin_token,
        {**GUIDE_BODY, "expires_days": MAX_DAYS, **changes},
    )
    assert reply.status == 200, reply.body
    created: dict[str, Any] = reply.json()
    return created


def complete(envoy: Envoy, key: str) -> HttpReply:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return fetch(envoy.port, "POST", "/v1/chat/completions", headers, chat_body())


def test_guide_body_creates_a_key_with_proto_field_names(envoy: Envoy, server: Server) -> None:
    reply = api(
        envoy,
        "POST",
        "/api/keys",
        server.admin_token,
        {**GUIDE_BODY, "expires_days": MAX_DAYS},
    )
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["key"].startswith("sk-mp-")
    data = body["key_data"]
    assert data["user_id"] == "user_123"  # proto names, not userId
    assert data["max_budget"] == 100
    assert data["allowed_models"] == ["gpt-4", "claude-3-opus"]
    assert data["tpm_limit"] == 10000 and data["rpm_limit"] == 60
    # Primitive fields are printed even when zero or empty.
    assert data["spent"] == 0 and data["team_id"] == ""
    assert body["key"].startswith(f"sk-mp-{data['id']}-")


def test_created_key_works_for_chat_completions(
    envoy: Envoy, server: Server, upstream: MockUpstream
) -> None:
    created = create(envoy, server)
    reply = complete(envoy, created["key"])
    assert reply.status == 200
    assert reply.json()["object"] == "chat.completion"
    # The LLM route is not transcoded: the upstream gets the client's JSON body as sent.
    saw = upstream.seen[-1]
    assert saw.path == "/v1/chat/completions"
    assert saw.body == chat_body()
    assert saw.headers["content-type"] == "application/json"
    assert saw.headers["x-virtual-key-id"] == created["key_data"]["id"]


def test_usage_after_one_completion(envoy: Envoy, server: Server) -> None:
    created = create(envoy, server)
    key_id = created["key_data"]["id"]
    before = datetime.now(UTC).date().isoformat()
    assert complete(envoy, created["key"]).status == 200
    reply = api(envoy, "GET", f"/api/keys/{key_id}/usage?days=30", server.admin_token)
    after = datetime.now(UTC).date().isoformat()
    assert reply.status == 200
    usage = reply.json()
    # int64 fields are JSON strings (proto3 JSON mapping); doubles are numbers.
    assert usage["totals"]["requests"] == "1"
    assert int(usage["totals"]["total_tokens"]) > 0
    assert usage["totals"]["cost"] > 0
    [row] = usage["rows"]
    assert row["date"] in {before, after}
    assert row["date"] == usage["end_date"]
    assert row["model"] == "gpt-4" and row["requests"] == "1"
    assert usage["key_ids"] == [key_id]


def test_a_usage_report_over_rest_prices_its_cached_tokens(envoy: Envoy, server: Server) -> None:
    key_id = create(envoy, server)["key_data"]["id"]
    report = {
        "key_id": key_id,
        "request_id": "rest-cached-1",
        "model": "gpt-4o",
        "prompt_tokens": 1000,
        "cached_tokens": 800,
        "completion_tokens": 100,
        "reasoning_tokens": 60,
    }
    reply = api(envoy, "POST", "/api/usage", server.admin_token, report)
    assert reply.status == 200, reply.body
    # gpt-4o: 200 x $2.5 + 800 x $1.25 (cached) + 100 x $10 per 1M tokens = $0.0025
    assert reply.json()["cost"] == pytest.approx(0.0025, abs=1e-12)


def test_another_users_key_is_404(envoy: Envoy, server: Server) -> None:
    key_id = create(envoy, server)["key_data"]["id"]
    assert api(envoy, "GET", f"/api/keys/{key_id}", server.admin_token).status == 200
    reply = api(envoy, "GET", f"/api/keys/{key_id}", server.admin_token, user="user_456")
    assert reply.status == 404
    assert reply.json()["code"] == 5  # NOT_FOUND


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_admin_token_is_401_with_json_and_never_reaches_upstream(
    envoy: Envoy, upstream: MockUpstream, token: str | None
) -> None:
    before = len(upstream.seen)
    reply = api(envoy, "POST", "/api/keys", token, GUIDE_BODY)
    assert reply.status == 401
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert error["code"] == 16  # UNAUTHENTICATED
    says = "admin token missing" if token is None else "admin token is wrong"
    assert error["message"].startswith(says)
    assert "wrong-token" not in error["message"]
    assert len(upstream.seen) == before


@pytest.mark.parametrize(
    "change",
    [{"max_budget": -1}, {"expires_days": MAX_DAYS + 1}, {"rpm_limit": -5}],
    ids=["negative-budget", "expires-too-late", "negative-rpm"],
)
def test_invalid_body_is_400(envoy: Envoy, server: Server, change: dict[str, Any]) -> None:
    reply = api(envoy, "POST", "/api/keys", server.admin_token, {**GUIDE_BODY, **change})
    assert reply.status == 400
    assert reply.json()["code"] == 3  # INVALID_ARGUMENT


def keys_of(envoy: Envoy, server: Server, user: str) -> list[dict[str, Any]]:
    reply = api(envoy, "GET", f"/api/keys?user_id={user}", server.admin_token, user=user)
    assert reply.status == 200, reply.body
    keys: list[dict[str, Any]] = reply.json().get("keys", [])
    return keys


def test_post_with_an_unknown_field_is_400_naming_it_and_creates_no_key(
    envoy: Envoy, server: Server
) -> None:
    body = {"name": "k", "user_id": "typo_user", "rpm_limitt": 1}
    reply = api(envoy, "POST", "/api/keys", server.admin_token, body, user="typo_user")
    assert reply.status == 400
    error = reply.json()
    assert error["code"] == 3 and '"rpm_limitt"' in error["message"]
    assert keys_of(envoy, server, "typo_user") == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rpm_limit": "60"}, "rpm_limit must be a number"),
        ({"team_id": None}, "team_id must be a string"),
    ],
    ids=["rpm-as-string", "null-team"],
)
def test_post_value_of_the_wrong_json_type_is_400_and_creates_no_key(
    envoy: Envoy, server: Server, change: dict[str, Any], message: str
) -> None:
    body = {**GUIDE_BODY, "user_id": "type_user", "expires_days": MAX_DAYS, **change}
    reply = api(envoy, "POST", "/api/keys", server.admin_token, body, user="type_user")
    assert reply.status == 400
    assert reply.json()["code"] == 3 and message in reply.json()["message"]
    assert keys_of(envoy, server, "type_user") == []


def test_post_creates_the_key_with_every_field_as_sent(envoy: Envoy, server: Server) -> None:
    body = {
        **GUIDE_BODY,
        "expires_days": MAX_DAYS,
        "team_id": "team_9",
        "metadata": {"env": "prod"},
        "budget_duration": "30d",
    }
    reply = api(envoy, "POST", "/api/keys", server.admin_token, body)
    assert reply.status == 200, reply.body
    data = reply.json()["key_data"]
    sent_back = {k: data[k] for k in body if k != "expires_days"}
    assert sent_back == {k: v for k, v in body.items() if k != "expires_days"}
    lasts = datetime.fromisoformat(data["expires_at"]) - datetime.fromisoformat(data["created_at"])
    assert round(lasts.total_seconds() / 86_400) == MAX_DAYS


def test_post_for_another_user_than_x_user_id_is_403(envoy: Envoy, server: Server) -> None:
    reply = api(envoy, "POST", "/api/keys", server.admin_token, {**GUIDE_BODY, "user_id": "u9"})
    assert reply.status == 403
    assert keys_of(envoy, server, "u9") == []


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_malformed_json_is_400_in_the_apis_json_error_shape(
    envoy: Envoy, server: Server, method: str
) -> None:
    key_id = create(envoy, server)["key_data"]["id"]
    path = "/api/keys" if method == "POST" else f"/api/keys/{key_id}"
    headers = {"authorization": f"Bearer {server.admin_token}", "content-type": "application/json"}
    reply = fetch(envoy.port, method, path, headers, b'{"name": ')
    assert reply.status == 400
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert error["code"] == 3  # INVALID_ARGUMENT, as extauthz's own 400s say
    assert "Unexpected end of string" in error["message"]


def test_llm_route_denials_keep_their_openai_shape(envoy: Envoy) -> None:
    reply = fetch(envoy.port, "POST", "/v1/chat/completions", {"x-api-key": "nope"}, b'{"model": ')
    assert reply.status == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"


def patch(envoy: Envoy, server: Server, key_id: str, body: Any) -> HttpReply:
    return api(envoy, "PATCH", f"/api/keys/{key_id}", server.admin_token, body)


def test_patch_with_an_unknown_field_is_400_naming_it_and_changes_nothing(
    envoy: Envoy, server: Server
) -> None:
    data = create(envoy, server)["key_data"]
    reply = patch(envoy, server, data["id"], {"rpm_limitt": 7})
    assert reply.status == 400
    assert reply.json()["code"] == 3 and "rpm_limitt" in reply.json()["message"]
    assert api(envoy, "GET", f"/api/keys/{data['id']}", server.admin_token).json() == data


@pytest.mark.parametrize("field", ["team_id", "user_id", "spent", "created_at"])
def test_patch_of_a_field_that_cannot_change_is_400_naming_it(
    envoy: Envoy, server: Server, field: str
) -> None:
    data = create(envoy, server)["key_data"]
    reply = patch(envoy, server, data["id"], {field: data[field], "rpm_limit": 7})
    assert reply.status == 400
    assert f"cannot be changed: {field}" in reply.json()["message"]
    assert api(envoy, "GET", f"/api/keys/{data['id']}", server.admin_token).json() == data


def test_patch_may_carry_the_keys_own_id_but_not_another(envoy: Envoy, server: Server) -> None:
    data = create(envoy, server)["key_data"]
    same = patch(envoy, server, data["id"], {"id": data["id"], "rpm_limit": 8})
    assert same.status == 200 and same.json()["rpm_limit"] == 8
    other = patch(envoy, server, data["id"], {"id": "0" * 16, "rpm_limit": 9})
    assert other.status == 400 and "id" in other.json()["message"]


def test_patch_takes_allowed_models_as_create_key_does(envoy: Envoy, server: Server) -> None:
    data = create(envoy, server)["key_data"]
    reply = patch(envoy, server, data["id"], {"allowed_models": ["gpt-4"]})
    assert reply.status == 200, reply.body
    assert reply.json()["allowed_models"] == ["gpt-4"]


def test_patch_metadata_in_get_key_shape_adds_without_erasing(envoy: Envoy, server: Server) -> None:
    data = create(envoy, server, metadata={"team": "search"})["key_data"]
    reply = patch(envoy, server, data["id"], {"metadata": {"env": "prod"}})
    assert reply.status == 200, reply.body
    assert reply.json()["metadata"] == {"team": "search", "env": "prod"}
    removed = patch(envoy, server, data["id"], {"metadata": {"team": None}})
    assert removed.json()["metadata"] == {"env": "prod"}


def test_patch_changes_only_rpm_limit(envoy: Envoy, server: Server) -> None:
    data = create(envoy, server)["key_data"]
    reply = api(envoy, "PATCH", f"/api/keys/{data['id']}", server.admin_token, {"rpm_limit": 7})
    assert reply.status == 200
    updated = reply.json()
    assert updated["rpm_limit"] == 7
    assert {k: v for k, v in updated.items() if k != "rpm_limit"} == {
        k: v for k, v in data.items() if k != "rpm_limit"
    }
    assert api(envoy, "GET", f"/api/keys/{data['id']}", server.admin_token).json() == updated


def test_revoked_key_gets_401_key_revoked(envoy: Envoy, server: Server) -> None:
    created = create(envoy, server)
    assert complete(envoy, created["key"]).status == 200
    key_id = created["key_data"]["id"]
    reply = api(envoy, "POST", f"/api/keys/{key_id}/revoke", server.admin_token, {})
    assert reply.status == 200
    assert reply.json()["status"] == "revoked"
    denied = complete(envoy, created["key"])
    assert denied.status == 401
    assert denied.json()["error"]["code"] == "key_revoked"


def test_deleted_key_reads_as_404(envoy: Envoy, server: Server) -> None:
    key_id = create(envoy, server)["key_data"]["id"]
    reply = api(envoy, "DELETE", f"/api/keys/{key_id}", server.admin_token)
    assert reply.status == 200
    assert reply.json() == {"id": key_id}
    assert api(envoy, "GET", f"/api/keys/{key_id}", server.admin_token).status == 404


def test_validate_needs_no_admin_token(envoy: Envoy, server: Server) -> None:
    created = create(envoy, server)
    reply = api(envoy, "POST", "/api/keys/validate", None, {"key": created["key"]}, user=None)
    assert reply.status == 200
    body = reply.json()
    assert body["valid"] is True and body["error"] == ""
    assert body["key_id"] == created["key_data"]["id"]


def test_unknown_admin_api_path_is_404_and_never_reaches_upstream(
    envoy: Envoy, server: Server, upstream: MockUpstream
) -> None:
    before = len(upstream.seen)
    reply = api(envoy, "GET", "/api/keys/0123456789abcdef/nothing", server.admin_token)
    assert reply.status == 404
    assert reply.json()["code"] == 5
    assert len(upstream.seen) == before


@pytest.mark.parametrize(
    "path", ["/api/nothing", "/api/tags", "/api", "/api/budget", "/api/budgets/team/t1/extra"]
)
def test_other_api_paths_are_404_json_and_never_reach_the_upstream(
    envoy: Envoy, clients: Clients, upstream: MockUpstream, path: str
) -> None:
    key, _ = clients.create_key()
    before = len(upstream.seen)
    for headers in ({}, {"authorization": f"Bearer {key}"}):
        reply = fetch(envoy.port, "GET", path, headers)
        assert reply.status == 404
        assert reply.headers["content-type"] == "application/json"
        assert reply.json()["code"] == 5  # NOT_FOUND, the API's own error shape
    assert len(upstream.seen) == before


def test_a_path_that_only_starts_with_api_is_the_upstreams(
    envoy: Envoy, clients: Clients, upstream: MockUpstream
) -> None:
    key, _ = clients.create_key()
    reply = fetch(envoy.port, "GET", "/apis", {"authorization": f"Bearer {key}"})
    assert reply.status == 200 and upstream.seen[-1].path == "/apis"


def test_unknown_query_parameter_is_400(envoy: Envoy, server: Server) -> None:
    key_id = create(envoy, server)["key_data"]["id"]
    reply = api(envoy, "GET", f"/api/keys/{key_id}/usage?dayz=30", server.admin_token)
    assert reply.status == 400
    assert reply.json()["code"] == 3 and "dayz" in reply.json()["message"]


def test_rendered_config_finds_the_descriptor_from_any_directory(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(p.render_envoy_config(p.ENVOY_PORTS))
    assert f"proto_descriptor: {json.dumps(str(p.ROOT / p.ENVOY_DESCRIPTOR))}" in (
        config.read_text()
    )
    result = subprocess.run(
        [p.executable("envoy"), "--mode", "validate", "-c", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_patch_with_an_empty_model_list_is_400_and_the_key_stays_restricted(
    envoy: Envoy, server: Server
) -> None:
    data = create(envoy, server, allowed_models=["gpt-4"])["key_data"]
    reply = patch(envoy, server, data["id"], {"allowed_models": []})
    assert reply.status == 400 and '["*"]' in reply.json()["message"]
    got = api(envoy, "GET", f"/api/keys/{data['id']}", server.admin_token)
    assert got.json()["allowed_models"] == ["gpt-4"]


def test_post_with_an_empty_model_list_is_400(envoy: Envoy, server: Server) -> None:
    reply = api(
        envoy, "POST", "/api/keys", server.admin_token, {**GUIDE_BODY, "allowed_models": []}
    )
    assert reply.status == 400


def test_two_x_user_id_headers_are_refused(envoy: Envoy, server: Server) -> None:
    data = create(envoy, server)["key_data"]
    headers = [("authorization", f"Bearer {server.admin_token}")]
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        conn.putrequest("GET", f"/api/keys/{data['id']}")
        for name, value in [*headers, ("x-user-id", data["user_id"]), ("x-user-id", "other")]:
            conn.putheader(name, value)
        conn.endheaders()
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    assert reply.status == 400 and b"x-user-id" in body


def test_a_page_token_that_is_not_utf8_is_400_not_500(envoy: Envoy, server: Server) -> None:
    reply = api(envoy, "GET", "/api/keys?page_token=%00%ff", server.admin_token)
    assert reply.status == 400 and "UTF-8" in reply.json()["message"]


def test_patch_sets_the_money_path_fields_in_the_shapes_getkey_returns(
    envoy: Envoy, server: Server
) -> None:
    data = create(envoy, server)["key_data"]
    change = {
        "max_parallel_requests": 2,
        "model_limits": {"gpt-4o": {"rpm_limit": 3, "tpm_limit": 0}},
        "enforce": False,
    }
    reply = patch(envoy, server, data["id"], change)
    assert reply.status == 200, reply.body
    got = reply.json()
    assert got["max_parallel_requests"] == 2 and got["enforce"] is False
    assert got["model_limits"] == {"gpt-4o": {"rpm_limit": 3, "tpm_limit": 0}}
    assert {"reserved", "in_flight"} <= got.keys()


@pytest.mark.parametrize(
    "change",
    [
        {"model_limits": {"gpt-4o": {"rpm": 3}}},
        {"model_limits": {"*": {"rpm_limit": 3}}},
        {"model_limits": ["gpt-4o"]},
        {"enforce": "no"},
        {"max_parallel_requests": -1},
    ],
)
def test_a_bad_money_path_field_is_400_and_changes_nothing(
    envoy: Envoy, server: Server, change: dict[str, Any]
) -> None:
    data = create(envoy, server)["key_data"]
    reply = patch(envoy, server, data["id"], change)
    assert reply.status == 400, reply.body
    after = api(envoy, "GET", f"/api/keys/{data['id']}", server.admin_token).json()
    assert after.get("model_limits", {}) == {} and after["enforce"] is True
