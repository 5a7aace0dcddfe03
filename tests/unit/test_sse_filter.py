"""The usage chunk taken out of a stream (extauthz/sse_filter.py): what the client receives is
the upstream's stream minus exactly that event, byte for byte, however the stream is cut."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.sse_filter import UsageChunkFilter, is_usage_chunk
from extauthz.usage_meter import MAX_EVENT_BYTES

pytestmark = pytest.mark.unit

ENDS = [b"\n", b"\r\n", b"\r"]


def event(document: object, end: bytes = b"\n", lines: Sequence[bytes] = ()) -> bytes:
    """An SSE event carrying `document` (after any other `lines`), its lines ending in `end`."""
    data = document if isinstance(document, bytes) else json.dumps(document).encode()
    return b"".join(line + end for line in [*lines, b"data: " + data]) + end


def chunk(text: str) -> dict[str, object]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}],
    }


USAGE = {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3}}


def stream(end: bytes = b"\n") -> tuple[bytes, bytes]:
    """A chat stream with the include_usage chunk, and the same stream without it."""
    before = event(chunk("Hel"), end) + event(chunk("lo"), end)
    after = event(b"[DONE]", end)
    return before + event(USAGE, end) + after, before + after


def filtered(body: bytes, cuts: Sequence[int] = ()) -> bytes:
    f = UsageChunkFilter()
    out, start = [], 0
    for cut in sorted(cuts):
        out.append(f.feed(body[start:cut]))
        start = cut
    out.append(f.feed(body[start:]))
    return b"".join(out) + f.finish()


@pytest.mark.parametrize("end", ENDS, ids=["lf", "crlf", "cr"])
def test_the_usage_chunk_is_removed_however_the_stream_is_cut_in_two(end: bytes) -> None:
    body, expected = stream(end)
    for cut in range(len(body) + 1):
        assert filtered(body, [cut]) == expected, cut


def test_a_stream_without_a_usage_chunk_passes_byte_identical() -> None:
    body = stream()[1]
    for cut in range(len(body) + 1):
        assert filtered(body, [cut]) == body


def test_done_is_kept() -> None:
    assert filtered(stream()[0]).endswith(b"data: [DONE]\n\n")


def test_events_may_mix_line_endings() -> None:
    body = (
        event(chunk("a"), b"\r\n")
        + event(USAGE, b"\r")
        + event(chunk("b"), b"\n")
        + event(USAGE, b"\n")
        + event(b"[DONE]", b"\r")
    )
    expected = event(chunk("a"), b"\r\n") + event(chunk("b"), b"\n") + event(b"[DONE]", b"\r")
    for cut in range(len(body) + 1):
        assert filtered(body, [cut]) == expected, cut


def test_a_usage_chunk_ended_by_cr_keeps_the_next_event_whole() -> None:
    f = UsageChunkFilter()
    assert f.feed(event(USAGE, b"\r")) == b""
    assert f.feed(b"data: [DONE]\r\r") + f.finish() == b"data: [DONE]\r\r"


def test_the_lf_of_a_usage_chunks_final_crlf_goes_with_it() -> None:
    f = UsageChunkFilter()
    assert f.feed(event(USAGE, b"\r\n")[:-1]) == b""
    assert f.feed(b"\n") + f.finish() == b""


def test_an_incomplete_event_is_held_until_it_ends() -> None:
    f = UsageChunkFilter()
    assert f.feed(b'data: {"choices": []') == b""
    assert f.feed(b"}\n\n") == b'data: {"choices": []}\n\n'


def test_finish_releases_a_partial_event_that_is_not_the_usage_chunk() -> None:
    f = UsageChunkFilter()
    partial = event(chunk("a"))[:-1]
    assert f.feed(partial) == b""
    assert f.finish() == partial


def test_finish_drops_a_usage_chunk_the_stream_ended_in() -> None:
    f = UsageChunkFilter()
    assert f.feed(event(USAGE)[:-2]) + f.finish() == b""


@pytest.mark.parametrize(
    "kept",
    [
        event({"choices": [{"delta": {}}], "usage": {"prompt_tokens": 3}}),
        event({"choices": [], "usage": None}),
        event({"usage": {"prompt_tokens": 3}}),
        event({"choices": {}, "usage": {}}),
        event(b'{"choices": [], "usage": {"prompt_tokens": 3'),
        event(b"\xff usage \xfe"),
        b": keep-alive\n\n",
        b"event: ping\n\n",
        b"\n",
        b"\r\n\r\n",
    ],
    ids=[
        "usage_with_choices",
        "usage_null",
        "no_choices",
        "choices_not_a_list",
        "unparseable",
        "not_utf8",
        "comment",
        "no_data",
        "blank_line",
        "blank_lines",
    ],
)
def test_any_other_event_passes_untouched(kept: bytes) -> None:
    body = event(chunk("a")) + kept + event(USAGE) + event(b"[DONE]")
    expected = event(chunk("a")) + kept + event(b"[DONE]")
    for cut in range(len(body) + 1):
        assert filtered(body, [cut]) == expected, cut


def test_a_usage_chunk_over_several_data_lines_with_other_fields_is_removed() -> None:
    lines = [b": note", b"event: message", b"id: 7"]
    multi = b"\ndata: ".join(json.dumps(USAGE, indent=1).encode().split(b"\n"))
    assert filtered(event(multi, b"\r\n", lines) + event(b"[DONE]")) == event(b"[DONE]")


def test_a_usage_key_spelled_with_escapes_is_recognised() -> None:
    assert is_usage_chunk(b'data: {"choices": [], "\\u0075sage": {}}\n\n')


def test_past_the_bound_everything_passes() -> None:
    f = UsageChunkFilter()
    held = b"data: " + b"x" * MAX_EVENT_BYTES  # an event not ended, over the bound
    rest = b"\n\n" + event(USAGE) + event(b"[DONE]")
    assert f.feed(event(USAGE)) == b""
    assert f.feed(held) + f.feed(rest) + f.finish() == held + rest


def test_an_event_ended_within_the_bound_is_still_judged() -> None:
    f = UsageChunkFilter()
    big = event(chunk("x" * (MAX_EVENT_BYTES - 100)))
    assert f.feed(big[:-1]) == b""
    assert f.feed(big[-1:] + event(USAGE)) + f.finish() == big


# -- any cutting, any mix of events

USAGE_EVENTS = [
    USAGE,
    {"id": "x", "choices": [], "usage": {"completion_tokens": 9}, "model": "m"},
]
KEPT_EVENTS = [
    chunk("hé\u2028llo"),
    {"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}},
    b"[DONE]",
    b"{not json",
]


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Events of every kind, each ending its lines in its own way, some with a comment or an
    event field, some with their JSON over several data lines; and the stream without its
    usage chunks."""
    body, expected = b"", b""
    for _ in range(draw(st.integers(0, 8))):
        drop = draw(st.booleans())
        document = draw(st.sampled_from(USAGE_EVENTS if drop else KEPT_EVENTS))
        data = document if isinstance(document, bytes) else json.dumps(document).encode()
        if not isinstance(document, bytes) and draw(st.booleans()):
            data = b"\ndata: ".join(json.dumps(document, indent=1).encode().split(b"\n"))
        lines = draw(st.lists(st.sampled_from([b": c", b"event: e", b"id: 1"]), max_size=2))
        one = event(data, draw(st.sampled_from(ENDS)), lines)
        body += one
        expected += b"" if drop else one
    return body, expected


@settings(max_examples=300, deadline=None)
@given(st.data(), streams())
def test_any_cutting_removes_exactly_the_usage_chunks(
    draw: st.DataObject, stream: tuple[bytes, bytes]
) -> None:
    body, expected = stream
    ends = [i + 1 for i, byte in enumerate(body) if byte in b"\r\n"]
    anywhere = st.integers(0, len(body))
    cuts = draw.draw(st.lists(st.sampled_from(ends) | anywhere if ends else anywhere, max_size=12))
    assert filtered(body, cuts) == expected
