"""Request parsing against inputs two parsers, or two headers, could read two ways."""

from __future__ import annotations

import pytest

from extauthz.request import (
    model_from_headers,
    requested_model,
)
from keys.model import NO_BODY, UNREADABLE, RequestedModel

pytestmark = pytest.mark.unit
GPT4 = RequestedModel.named("gpt-4")
BODY = b'{"model": "gpt-4", "messages": []}'


@pytest.mark.parametrize("key", ["Model", "MODEL", "mOdel"])
def test_a_case_variant_of_model_makes_the_body_unreadable(key: str) -> None:
    body = f'{{"model": "gpt-4", "{key}": "gpt-5"}}'.encode()
    assert requested_model(body, {"content-type": "application/json"}) == UNREADABLE


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", ""],
)
def test_a_non_json_content_type_makes_the_body_unreadable(content_type: str) -> None:
    assert requested_model(BODY, {"content-type": content_type}) == UNREADABLE


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"],
)
def test_json_content_types_name_the_model(content_type: str) -> None:
    assert requested_model(BODY, {"content-type": content_type}) == GPT4


def test_a_body_without_content_type_is_json_if_it_parses() -> None:
    assert requested_model(BODY, {}) == GPT4
    assert requested_model(b"model=gpt-4", {}) == UNREADABLE


def test_preferred_model_header_alone_is_the_model() -> None:
    assert requested_model(b"", {"x-preferred-model": "gpt-4"}) == GPT4


def test_preferred_model_agreeing_with_the_body_is_the_model() -> None:
    assert requested_model(BODY, {"x-preferred-model": " gpt-4 "}) == GPT4


def test_preferred_model_disagreeing_with_the_body_is_unreadable() -> None:
    assert requested_model(BODY, {"x-preferred-model": "gpt-5"}) == UNREADABLE


def test_empty_preferred_model_is_unreadable() -> None:
    assert requested_model(b"", {"x-preferred-model": ""}) == UNREADABLE


@pytest.mark.parametrize(
    "headers",
    [
        {"x-original-method": "GET", "x-original-content-length": "42"},
        {"x-original-method": "DELETE", "x-original-transfer-encoding": "chunked"},
        {"x-original-method": "POST"},
    ],
)
def test_nginx_request_with_a_body_and_no_x_model_is_unreadable(headers: dict[str, str]) -> None:
    assert model_from_headers(headers) == UNREADABLE


def test_nginx_get_without_a_body_names_no_model() -> None:
    headers = {"x-original-method": "GET", "x-original-content-length": "0"}
    assert model_from_headers(headers) == NO_BODY


def test_nginx_preferred_model_disagreeing_with_x_model_is_unreadable() -> None:
    headers = {"x-model": "gpt-4", "x-preferred-model": "gpt-5"}
    assert model_from_headers(headers) == UNREADABLE
