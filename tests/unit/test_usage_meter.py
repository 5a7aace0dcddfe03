"""Usage read from responses as they stream past (extauthz/usage_meter.py): every shape an
OpenAI-compatible upstream answers in, cut into chunks at every byte."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.usage_meter import Metered, MeteredUsage, ResponseMeter

pytestmark = pytest.mark.unit
SSE = "text/event-stream"


def sse(*events: object, end: bytes = b"\n\n") -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + end for e in events)
    return out + b"data: [DONE]" + end


def chunk(text: str) -> dict[str, object]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


CHAT_STREAM = sse(
    chunk("Hel"),
    chunk("lo"),
    {
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 2,
            "total_tokens": 14,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    },
)
CHAT_USAGE = MeteredUsage(12, 2, 14, cached_tokens=8, reasoning_tokens=1)


def meter(
    body: bytes, content_type: str = SSE, encoding: str = "", cuts: Sequence[int] = ()
) -> Metered:
    m = ResponseMeter(content_type, encoding)
    start = 0
    for cut in sorted(cuts):
        m.feed(body[start:cut])
        start = cut
    m.feed(body[start:])
    return m.finish()


def test_a_streamed_chat_completion_is_metered_from_its_usage_chunk() -> None:
    got = meter(CHAT_STREAM)
    assert got.usage == CHAT_USAGE and got.content_chars == 5


@pytest.mark.parametrize("cut", range(1, len(CHAT_STREAM)))
def test_an_event_split_at_any_byte_is_read_the_same(cut: int) -> None:
    assert meter(CHAT_STREAM, cuts=[cut]).usage == CHAT_USAGE


@settings(max_examples=200)
@given(st.lists(st.integers(1, len(CHAT_STREAM) - 1), max_size=12))
def test_any_chunking_reads_the_same(cuts: list[int]) -> None:
    assert meter(CHAT_STREAM, cuts=cuts).usage == CHAT_USAGE


@pytest.mark.parametrize("end", [b"\r\n\r\n", b"\r\r", b"\n\n"])
def test_every_sse_line_ending_is_read(end: bytes) -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    body = sse(chunk("a"), usage, end=end)
    for cut in range(1, len(body)):
        assert meter(body, cuts=[cut]).usage == MeteredUsage(1, 1, 2)


def test_a_stream_without_usage_says_how_much_content_passed() -> None:
    got = meter(sse(chunk("Hello"), chunk(" world")))
    assert got.usage is None and got.unmetered == "no_usage" and got.content_chars == 11


def test_the_responses_api_completed_event_carries_the_usage() -> None:
    body = (
        b"event: response.output_text.delta\n"
        + b'data: {"type": "response.output_text.delta", "delta": "Hi"}\n\n'
        + b"event: response.completed\n"
        + b"data: "
        + json.dumps(
            {
                "type": "response.completed",
                "response": {
                    "usage": {
                        "input_tokens": 5,
                        "output_tokens": 7,
                        "total_tokens": 12,
                        "input_tokens_details": {"cached_tokens": 2},
                        "output_tokens_details": {"reasoning_tokens": 3},
                    }
                },
            }
        ).encode()
        + b"\n\n"
    )
    got = meter(body)
    assert got.usage == MeteredUsage(5, 7, 12, cached_tokens=2, reasoning_tokens=3)
    assert got.content_chars == 2


@pytest.mark.parametrize(
    ("document", "usage"),
    [
        (
            {
                "choices": [{"message": {"content": "Hi!"}}],
                "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
            },
            MeteredUsage(9, 3, 12),
        ),
        (
            {"choices": [{"text": "Hi"}], "usage": {"prompt_tokens": 4, "completion_tokens": 1}},
            MeteredUsage(4, 1, 5),
        ),
        (
            {"object": "list", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}},
            MeteredUsage(8, 0, 8),
        ),
        (
            {"object": "response", "usage": {"input_tokens": 3, "output_tokens": 4}},
            MeteredUsage(3, 4, 7),
        ),
    ],
    ids=["chat", "completions", "embeddings", "responses"],
)
def test_a_json_body_is_metered_from_its_usage(document: object, usage: MeteredUsage) -> None:
    body = json.dumps(document).encode()
    assert meter(body, "application/json", cuts=[len(body) // 2]).usage == usage


def test_a_gzip_body_is_inflated_as_it_passes() -> None:
    packed = gzip.compress(CHAT_STREAM)
    for cut in range(1, len(packed), 7):
        assert meter(packed, encoding="gzip", cuts=[cut]).usage == CHAT_USAGE


def test_a_body_it_cannot_read_is_unmetered_with_a_reason() -> None:
    assert meter(b"<html>oops</html>", "application/json").unmetered == "unreadable"
    assert meter(b"\x00garbage", encoding="gzip").unmetered == "unreadable"
    assert meter(CHAT_STREAM, encoding="br").unmetered == "encoding"


def test_a_negative_or_non_integer_count_reads_as_zero() -> None:
    body = json.dumps({"usage": {"prompt_tokens": -5, "completion_tokens": "7"}}).encode()
    assert meter(body, "application/json").usage == MeteredUsage(0, 0, 0)
