"""Large bodies through real Envoy: the key is checked before the body is sent to us.

envoy.yaml's `key_first` filter asks Check about the key alone (no body) for requests
over 64 KB or of unknown length; the full Check with the body follows only for a key
Redis accepted. Which Checks ran is read from the server's own Check counter.
"""

from __future__ import annotations

import http.client
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from keys import keygen
from tests.conftest import Envoy, Server
from tests.helpers import Clients, HttpReply, chat_body, fetch

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
KEY_FIRST_DENIED = "http.llm.ext_authz.key_first.denied"
LARGE = json.dumps(
    {"model": "gpt-4", "messages": [{"role": "user", "content": "x" * 200_000}]}
).encode()


def checks(server: Server) -> dict[str, float]:
    """extauthz_check_duration_seconds_count by decision."""
    text = fetch(server.http_port, "GET", "/metrics").body.decode()
    return {
        sample.labels["decision"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "extauthz_check_duration_seconds_count"
    }


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def post(envoy: Envoy, key: str, body: bytes) -> HttpReply:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return fetch(envoy.port, "POST", CHAT, headers, body)


def test_made_up_key_with_a_large_body_is_refused_by_the_key_check_alone(
    envoy: Envoy, server: Server
) -> None:
    made_up = keygen.format_key("sk-mp", keygen.new_key_id(), keygen.new_secret())
    before, refused = checks(server), envoy.stat(KEY_FIRST_DENIED)
    reply = post(envoy, made_up, LARGE)
    assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert grew(before, checks(server)) == {"invalid_api_key": 1}  # no Check with the body
    assert envoy.stat(KEY_FIRST_DENIED) == refused + 1  # ...because the key check refused it


def test_revoked_key_with_a_large_body_is_refused_by_the_key_check_alone(
    envoy: Envoy, server: Server, clients: Clients
) -> None:
    key, data = clients.create_key()
    clients.revoke(data.id)
    before, refused = checks(server), envoy.stat(KEY_FIRST_DENIED)
    reply = post(envoy, key, LARGE)
    assert reply.status == 401 and reply.json()["error"]["code"] == "key_revoked"
    assert grew(before, checks(server)) == {"key_revoked": 1}
    assert envoy.stat(KEY_FIRST_DENIED) == refused + 1


def test_valid_key_with_a_large_body_is_checked_twice_and_counted_once(
    envoy: Envoy, server: Server, clients: Clients
) -> None:
    key, data = clients.create_key(allowed_models=["gpt-4"], rpm_limit=10)
    before = checks(server)
    reply = post(envoy, key, LARGE)
    assert reply.status == 200
    assert grew(before, checks(server)) == {"key_verified": 1, "allow": 1}
    assert clients.get_key(data.id).total_requests == 1
    assert reply.headers["x-ratelimit-remaining-rpm"] == "9"


def test_large_body_naming_a_model_the_key_may_not_use_is_403(
    envoy: Envoy, clients: Clients
) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-3.5-turbo"])
    reply = post(envoy, key, LARGE)
    assert reply.status == 403 and reply.json()["error"]["code"] == "model_not_allowed"


def test_small_body_is_checked_once(envoy: Envoy, server: Server, clients: Clients) -> None:
    key, _ = clients.create_key()
    before = checks(server)
    assert post(envoy, key, chat_body("gpt-4")).status == 200
    assert grew(before, checks(server)) == {"allow": 1}


def test_chunked_body_of_unknown_length_gets_the_key_check_first(
    envoy: Envoy, server: Server
) -> None:
    made_up = keygen.format_key("sk-mp", keygen.new_key_id(), keygen.new_secret())
    before, refused = checks(server), envoy.stat(KEY_FIRST_DENIED)
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        conn.putrequest("POST", CHAT)
        conn.putheader("authorization", f"Bearer {made_up}")
        conn.putheader("content-type", "application/json")
        conn.putheader("transfer-encoding", "chunked")
        conn.endheaders()
        body = chat_body("gpt-4")
        conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        assert conn.getresponse().status == 401
    finally:
        conn.close()
    assert grew(before, checks(server)) == {"invalid_api_key": 1}
    assert envoy.stat(KEY_FIRST_DENIED) == refused + 1
