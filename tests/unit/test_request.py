from __future__ import annotations

import json

import pytest

from extauthz.request import key_candidate, presented_key, requested_model
from keys.model import NO_BODY, UNREADABLE, RequestedModel

pytestmark = pytest.mark.unit

KEY = "sk-mp-a1b2c3d4e5f67890-xYz123AbC456DeF789GhI012JkL345MnO678PqR"


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer  {KEY} "},
        {"x-api-key": KEY},
        {"api-key": KEY},
    ],
)
def test_key_is_read_from_each_supported_header(headers: dict[str, str]) -> None:
    parsed = presented_key(headers)
    assert parsed is not None and parsed.key_id == "a1b2c3d4e5f67890"


def test_authorization_bearer_wins_over_x_api_key() -> None:
    assert key_candidate({"authorization": "Bearer one", "x-api-key": "two"}) == "one"


def test_non_bearer_authorization_falls_back_to_x_api_key() -> None:
    assert key_candidate({"authorization": "Basic abc", "x-api-key": KEY}) == KEY


def test_no_key_header_means_no_key() -> None:
    assert presented_key({"content-type": "application/json"}) is None


def test_two_authorization_headers_joined_by_envoy_are_malformed() -> None:
    assert presented_key({"authorization": f"Bearer {KEY},Bearer {KEY}"}) is None


def test_model_is_read_from_json_body() -> None:
    body = json.dumps({"model": "gpt-4", "messages": []}).encode()
    assert requested_model(body, {}) == RequestedModel.named("gpt-4")


def test_last_model_wins_as_the_upstream_reads_it() -> None:
    body = b'{"model": "gpt-4", "messages": [], "model": "gpt-4-32k"}'
    assert requested_model(body, {}) == RequestedModel.named("gpt-4-32k")


def test_model_inside_a_string_is_not_the_model() -> None:
    body = b'{"messages": [{"content": "\\"model\\": \\"gpt-4\\""}]}'
    assert requested_model(body, {}) == UNREADABLE


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"model": "gpt-4", "messages": [',
        b'{"model": 4}',
        b'["gpt-4"]',
        b'{"model": ""}',
        b'{"model": "a\\nb"}',
        b"\xff\xfe\x00",
        b"[" * 100_000,
    ],
)
def test_unreadable_bodies_name_no_model(body: bytes) -> None:
    assert requested_model(body, {}) == UNREADABLE


def test_partial_body_is_unreadable_even_if_it_parses() -> None:
    body = b'{"model": "gpt-4"}'
    assert requested_model(body, {"x-envoy-auth-partial-body": "true"}) == UNREADABLE


def test_request_without_body_names_no_model() -> None:
    assert requested_model(b"", {}) == NO_BODY


def test_declared_body_that_was_not_forwarded_is_unreadable() -> None:
    assert requested_model(b"", {"content-length": "120"}) == UNREADABLE
    assert requested_model(b"", {"transfer-encoding": "chunked"}) == UNREADABLE
