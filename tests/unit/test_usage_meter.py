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


@pytest.mark.parametrize("count", [-5, "7", 7.0, 1e3, True, [7]])
def test_a_negative_or_non_integer_count_makes_the_usage_absurd(count: object) -> None:
    """docs/design.md: not believed. Read as zero, an upstream that writes its counts as
    floats (`1000.0`) or strings would have every answer charged $0."""
    document = {"choices": [{"message": {"content": "Hi"}}]}
    body = json.dumps({**document, "usage": {"prompt_tokens": 3, "completion_tokens": count}})
    got = meter(body.encode(), "application/json")
    assert got.usage is None and got.unmetered == "absurd" and got.produced


def test_an_absent_or_null_count_reads_as_zero() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": None, "prompt_tokens_details": None}
    body = json.dumps({"usage": usage}).encode()
    assert meter(body, "application/json").usage == MeteredUsage(3, 0, 3)


def tool_call(arguments: str, name: str = "") -> dict[str, object]:
    function = {"name": name, "arguments": arguments} if name else {"arguments": arguments}
    return {
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": function}]}}]
    }


def test_streamed_tool_call_arguments_and_name_are_content() -> None:
    got = meter(sse(tool_call("", name="get_time"), tool_call('{"tz":'), tool_call('"UTC"}')))
    assert got.content_chars == len("get_time") + len('{"tz":"UTC"}') and got.produced


@pytest.mark.parametrize(
    "message",
    [
        {"tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"function_call": {"name": "f", "arguments": "{}"}},
        {"refusal": "No."},
        {"reasoning_content": "Hmm"},
        {"reasoning": "Hmm"},
        {"content": [{"type": "text", "text": "Hi!"}]},
    ],
    ids=["tool_calls", "function_call", "refusal", "reasoning_content", "reasoning", "parts"],
)
def test_every_kind_of_generated_message_content_is_counted(message: dict[str, object]) -> None:
    body = json.dumps({"choices": [{"message": {"content": None, **message}}]}).encode()
    got = meter(body, "application/json")
    assert got.content_chars == 3 and got.content_events == 1 and got.produced


@pytest.mark.parametrize("field", ["refusal", "reasoning_content", "reasoning"])
def test_streamed_refusals_and_reasoning_are_content(field: str) -> None:
    delta = {"choices": [{"delta": {field: "abcd"}}]}
    assert meter(sse(delta, delta)).content_chars == 8


def test_a_responses_api_body_counts_its_output_items() -> None:
    output = [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "ab"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "cde"}]},
        {"type": "function_call", "name": "f", "arguments": "{}"},
    ]
    body = json.dumps({"object": "response", "output": output}).encode()
    assert meter(body, "application/json").content_chars == 2 + 3 + 3


def test_a_responses_api_stream_counts_deltas_not_the_final_output_again() -> None:
    done = {
        "type": "response.completed",
        "response": {"output": [{"type": "message", "content": [{"text": "Hi"}]}]},
    }
    got = meter(sse({"type": "response.output_text.delta", "delta": "Hi"}, done))
    assert got.content_chars == 2 and got.content_events == 1


def test_embeddings_are_produced_items_without_text() -> None:
    body = json.dumps(
        {"object": "list", "data": [{"embedding": [0.1]}, {"embedding": "AAAA"}]}
    ).encode()
    got = meter(body, "application/json")
    assert (got.items, got.content_chars, got.content_events, got.produced) == (2, 0, 1, True)


def test_content_events_count_the_events_that_carried_content() -> None:
    got = meter(
        sse(chunk("a"), chunk(""), {"choices": [{"delta": {"role": "assistant"}}]}, chunk("b"))
    )
    assert got.content_events == 2


def test_a_response_that_generated_nothing_has_not_produced() -> None:
    got = meter(sse(chunk(""), {"choices": [{"delta": {}, "finish_reason": "stop"}]}))
    assert got.content_events == 0 and not got.produced


@pytest.mark.parametrize(
    "counts",
    [
        {"prompt_tokens": 10**9 + 1, "completion_tokens": 1},
        {"prompt_tokens": 1, "completion_tokens": 10**40},
        {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 1e30},
        {"input_tokens": 1, "output_tokens": float("inf")},
        {"prompt_tokens": 6 * 10**8, "completion_tokens": 6 * 10**8},
        {
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 10**12},
        },
    ],
    ids=["prompt", "huge_int", "float_total", "infinity", "sum", "cached"],
)
def test_a_count_over_max_tokens_makes_the_usage_absurd(counts: dict[str, object]) -> None:
    body = json.dumps({"choices": [{"message": {"content": "Hi"}}], "usage": counts}).encode()
    got = meter(body, "application/json")
    assert got.usage is None and got.unmetered == "absurd" and got.content_chars == 2


def test_an_absurd_usage_chunk_does_not_hide_a_good_one() -> None:
    absurd = {"choices": [], "usage": {"prompt_tokens": 10**20, "completion_tokens": 1}}
    good = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    assert meter(sse(good, absurd)).usage == MeteredUsage(3, 1, 4)
    assert meter(sse(absurd, good)).usage == MeteredUsage(3, 1, 4)


def test_counts_of_max_tokens_are_still_charged() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 10**9, "completion_tokens": 0}}).encode()
    assert meter(body, "application/json").usage == MeteredUsage(10**9, 0, 10**9)


@pytest.mark.parametrize("content_type", [SSE, "application/json"])
def test_deeply_nested_json_is_unreadable_not_a_crash(content_type: str) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    body = b"data: " + deep + b"\n\n" if content_type == SSE else deep
    assert meter(body, content_type).usage is None


def test_an_integer_too_long_to_parse_is_unreadable_not_a_crash() -> None:
    body = b'{"usage": {"prompt_tokens": ' + b"9" * 10_000 + b"}}"
    assert meter(body, "application/json").unmetered == "unreadable"


def test_broken_utf8_in_one_event_does_not_hide_the_usage() -> None:
    body = b'data: {"choices": [\xff\xfe]}\n\n' + CHAT_STREAM
    assert meter(body).usage == CHAT_USAGE


def test_a_large_event_fed_in_small_chunks_is_read() -> None:
    body = sse(chunk("x" * 200_000), {"choices": [], "usage": {"prompt_tokens": 1}})
    m = ResponseMeter(SSE)
    for i in range(0, len(body), 64):
        m.feed(body[i : i + 64])
    got = m.finish()
    assert got.usage == MeteredUsage(1, 0, 1) and got.content_chars == 200_000


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b'data: {"choices": [{"text": "a"}]}', SSE), (b'{"choices": [{"text": "a"}]}', "")],
)
def test_finishing_twice_counts_nothing_twice(body: bytes, content_type: str) -> None:
    m = ResponseMeter(content_type)
    m.feed(body)
    assert m.finish() == m.finish()
