"""The dev stack's mock upstream streams like an OpenAI-compatible server, through real
Envoy: what the usage tap (issue 12) will meter, read here by its parser."""

from __future__ import annotations

import gzip
import json

import pytest

from extauthz.usage_meter import MeteredUsage, ResponseMeter
from tests.conftest import Envoy
from tests.helpers import Clients, HttpReply, fetch

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"


def stream(
    envoy: Envoy, key: str, extra_headers: dict[str, str] | None = None, **body: object
) -> HttpReply:
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return fetch(
        envoy.port,
        "POST",
        CHAT,
        {**headers, **(extra_headers or {})},
        json.dumps({**request, **body}).encode(),
    )


def events(body: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]


def test_a_streamed_completion_arrives_as_sse_ending_in_done(
    envoy: Envoy, clients: Clients
) -> None:
    key, _ = clients.create_key(max_budget=10)
    reply = stream(envoy, key, max_tokens=5)
    assert reply.status == 200 and reply.headers["content-type"] == "text/event-stream"
    got = events(reply.body)
    assert got[-1] == "[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content", "")
        for c in map(json.loads, got[:-1])
        if c["choices"]
    )
    assert text == "Hello from the mock."
    assert not any("usage" in json.loads(e) for e in got[:-1])


def test_a_stream_that_asked_for_usage_carries_it_in_its_last_chunk(
    envoy: Envoy, clients: Clients
) -> None:
    key, _ = clients.create_key(max_budget=10)
    reply = stream(envoy, key, max_tokens=5, stream_options={"include_usage": True})
    meter = ResponseMeter(reply.headers["content-type"])
    meter.feed(reply.body)
    metered = meter.finish()
    assert metered.usage == MeteredUsage(1, 5, 6) and metered.content_chars == len(
        "Hello from the mock."
    )


def test_a_stream_is_gzip_encoded_when_the_client_accepts_it(
    envoy: Envoy, clients: Clients
) -> None:
    key, _ = clients.create_key(max_budget=10)
    reply = stream(
        envoy,
        key,
        {"accept-encoding": "gzip"},
        max_tokens=5,
        stream_options={"include_usage": True},
    )
    assert reply.headers["content-encoding"] == "gzip"
    assert events(gzip.decompress(reply.body))[-1] == "[DONE]"
    meter = ResponseMeter(reply.headers["content-type"], reply.headers["content-encoding"])
    for start in range(0, len(reply.body), 9):
        meter.feed(reply.body[start : start + 9])
    assert meter.finish().usage == MeteredUsage(1, 5, 6)
