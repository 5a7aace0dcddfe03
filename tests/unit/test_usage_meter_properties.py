"""Properties of the usage meter (extauthz/usage_meter.py) over generated responses: how the
proxy cuts the body never changes what is read, junk never hides a usage nor makes the meter
raise, and no number an upstream sends becomes a negative or absurd charge.

The example tests, one shape at a time, are in test_usage_meter.py.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import astuple
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.usage_meter import MAX_TOKENS, MeteredUsage
from tests.unit.test_usage_meter import meter

pytestmark = pytest.mark.unit

SSE = "text/event-stream"
JSON = "application/json"
SOME = settings(max_examples=150, deadline=None)
UTF8 = st.characters(codec="utf-8")
texts = st.text(UTF8, max_size=12)
line_texts = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
line_ends = st.sampled_from([b"\n", b"\r\n", b"\r"])
counts = st.integers(0, 10**6)


def cuts_of(body: bytes) -> st.SearchStrategy[list[int]]:
    """Anywhere, and often inside a line end (a `\r\n` cut in two is the hard case)."""
    ends = [i + 1 for i, byte in enumerate(body) if byte in b"\r\n"]
    anywhere = st.integers(0, len(body))
    return st.lists(st.sampled_from(ends) | anywhere if ends else anywhere, max_size=10)


def event(*lines: bytes, end: bytes = b"\n") -> bytes:
    """One SSE event: its lines, then the blank line that ends it, every line ending in `end`."""
    return b"".join(line + end for line in lines) + end


def data(document: object) -> bytes:
    return b"data: " + json.dumps(document).encode()


def data_lines(document: object) -> list[bytes]:
    """The document over several `data:` lines (a reader joins them with a line feed): a line
    end cut in two must not end the event early."""
    return [b"data: " + line.encode() for line in json.dumps(document, indent=1).split("\n")]


def sse_event(draw: st.DrawFn, document: object) -> bytes:
    lines = draw(st.sampled_from([[data(document)], data_lines(document)]))
    return event(*lines, end=draw(line_ends))


def generated(kind: str, text: str) -> dict[str, object]:
    """A stream chunk that generated `text`, in one of the shapes upstreams send."""
    delta: dict[str, object]
    if kind == "responses":
        return {"type": "response.output_text.delta", "delta": text}
    if kind == "completions":
        return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}
    if kind == "tool":
        delta = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
    else:
        delta = {kind: text}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


KINDS = ["content", "refusal", "reasoning_content", "reasoning", "tool", "responses", "completions"]
content_chunks = st.tuples(st.sampled_from(KINDS), texts)


@st.composite
def usages(draw: st.DrawFn) -> MeteredUsage:
    prompt, completion = draw(counts), draw(counts)
    return MeteredUsage(
        prompt,
        completion,
        prompt + completion + draw(st.integers(0, 10)),
        cached_tokens=draw(st.integers(0, prompt)),
        reasoning_tokens=draw(st.integers(0, completion)),
    )


def usage_object(usage: MeteredUsage, responses_api: bool) -> dict[str, object]:
    """`usage` as chat and completions spell it, or as the Responses API does."""
    prompt, completion = ("input", "output") if responses_api else ("prompt", "completion")
    return {
        f"{prompt}_tokens": usage.prompt_tokens,
        f"{completion}_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        f"{prompt}_tokens_details": {"cached_tokens": usage.cached_tokens},
        f"{completion}_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def usage_chunk(usage: MeteredUsage, responses_api: bool) -> dict[str, object]:
    """The chunk that reports `usage`: chat's include_usage chunk, or response.completed."""
    counts = usage_object(usage, responses_api)
    if responses_api:
        return {"type": "response.completed", "response": {"usage": counts}}
    return {"object": "chat.completion.chunk", "choices": [], "usage": counts}


class Stream(NamedTuple):
    events: list[bytes]  # each a whole event, its blank line included
    usage: MeteredUsage | None
    chars: int
    content_events: int

    @property
    def body(self) -> bytes:
        return b"".join(self.events)


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    """A well-formed stream: content chunks, maybe a usage chunk, maybe [DONE]; each event
    ends its lines in its own way."""
    chunks = draw(st.lists(content_chunks, max_size=6))
    events = [sse_event(draw, generated(*c)) for c in chunks]
    usage = draw(st.none() | usages())
    if usage is not None:
        events.append(sse_event(draw, usage_chunk(usage, draw(st.booleans()))))
    if draw(st.booleans()):
        events.append(event(b"data: [DONE]", end=draw(line_ends)))
    generated_texts = [text for _, text in chunks]
    return Stream(
        events,
        usage,
        sum(map(len, generated_texts)),
        sum(1 for text in generated_texts if text),
    )


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """A non-streamed response: chat, embeddings or the Responses API, with or without usage."""
    kind = draw(st.sampled_from(["chat", "embeddings", "responses"]))
    document: dict[str, object]
    if kind == "chat":
        message = {"content": draw(texts), "reasoning_content": draw(texts)}
        document = {"choices": [{"message": message}]}
    elif kind == "embeddings":
        vectors = draw(st.lists(st.lists(st.floats(-1, 1), max_size=3), max_size=3))
        document = {"object": "list", "data": [{"embedding": v} for v in vectors]}
    else:
        part = {"type": "output_text", "text": draw(texts)}
        document = {"object": "response", "output": [{"type": "message", "content": [part]}]}
    usage = draw(st.none() | usages())
    if usage is not None:
        document["usage"] = usage_object(usage, kind == "responses")
    document["model"] = draw(st.sampled_from(["gpt-4o", "text-embedding-3-small"]))
    return json.dumps(document).encode()


# -- the way the proxy cuts the body changes nothing


@SOME
@given(st.data(), streams())
def test_a_stream_cut_anywhere_reads_as_the_whole(draw: st.DataObject, stream: Stream) -> None:
    body = stream.body
    assert meter(body, cuts=draw.draw(cuts_of(body))) == meter(body)


@SOME
@given(streams())
def test_a_stream_reads_the_usage_and_content_it_carries(stream: Stream) -> None:
    got = meter(stream.body)
    assert (got.usage, got.content_chars, got.content_events) == (
        stream.usage,
        stream.chars,
        stream.content_events,
    )


@SOME
@given(st.data(), json_bodies())
def test_a_json_body_cut_anywhere_reads_as_the_whole(draw: st.DataObject, body: bytes) -> None:
    assert meter(body, JSON, cuts=draw.draw(cuts_of(body))) == meter(body, JSON)


responses = streams().map(lambda s: (s.body, SSE)) | json_bodies().map(lambda b: (b, JSON))


@SOME
@given(st.data(), responses, st.sampled_from(["gzip", "x-gzip", "deflate"]))
def test_a_compressed_body_cut_anywhere_reads_as_the_plain_one(
    draw: st.DataObject, response: tuple[bytes, str], encoding: str
) -> None:
    body, content_type = response
    packed = zlib.compress(body) if encoding == "deflate" else gzip.compress(body)
    cuts = draw.draw(cuts_of(packed))
    assert meter(packed, content_type, encoding, cuts) == meter(body, content_type)


# -- junk hides nothing and breaks nothing

junk_lines = st.one_of(
    line_texts.map(lambda t: b":" + t.encode()),  # a comment
    st.tuples(st.sampled_from(["event", "id", "retry", "x"]), line_texts).map(
        lambda p: f"{p[0]}: {p[1]}".encode()
    ),
    # a bare field name (an empty line would be the blank line that ends the event)
    line_texts.filter(lambda t: t != "" and not t.startswith("data")).map(str.encode),
)
junk_data = st.one_of(
    # never JSON, often not UTF-8
    st.binary(max_size=20).map(lambda b: b"data: ~" + b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"data: null", b"data: 7", b'data: "usage"', b"data: [", b"data:"]),
    st.sampled_from([b'data: {"usage": 5}', b'data: {"usage": [1], "response": 2}']),
    usages().map(
        lambda u: data({"choices": [], "usage": {"prompt_tokens": MAX_TOKENS + 1 + u.total_tokens}})
    ),  # an absurd usage chunk
    content_chunks.map(lambda c: data(generated(*c))),
)
junk_events = st.tuples(st.lists(junk_lines | junk_data, max_size=3), line_ends).map(
    lambda p: event(*p[0], end=p[1])
)


@st.composite
def junk_streams(draw: st.DrawFn) -> tuple[bytes, MeteredUsage]:
    """A stream with a usage chunk, junk events between its events and junk lines (no data)
    inside the usage event."""
    usage = draw(usages())
    end = draw(line_ends)
    lines = data_lines(usage_chunk(usage, draw(st.booleans())))
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(0, len(lines))), draw(junk_lines))
    events = [*draw(streams()).events, event(*lines, end=end)]
    for _ in range(draw(st.integers(1, 6))):
        events.insert(draw(st.integers(0, len(events))), draw(junk_events))
    return b"".join(events), usage


@SOME
@given(st.data(), junk_streams())
def test_junk_never_hides_a_well_formed_usage_chunk(
    draw: st.DataObject, stream: tuple[bytes, MeteredUsage]
) -> None:
    body, usage = stream
    assert meter(body, cuts=draw.draw(cuts_of(body))).usage == usage


# -- numbers: nothing an upstream sends is charged negative or absurd

numbers = st.one_of(
    st.integers(-(10**40), 10**40),
    st.integers(MAX_TOKENS - 2, MAX_TOKENS + 2),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    texts,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["cached_tokens", "reasoning_tokens"]), st.integers()),
)
COUNTS = ["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens"]
DETAILS = [f"{side}_tokens_details" for side in ("prompt", "completion", "input", "output")]
wild_details = numbers | st.dictionaries(
    st.sampled_from(["cached_tokens", "reasoning_tokens"]), numbers
)
wild_usages = st.fixed_dictionaries(
    {}, optional={**dict.fromkeys(COUNTS, numbers), **dict.fromkeys(DETAILS, wild_details)}
)


def within_bounds(usage: MeteredUsage | None) -> bool:
    return usage is None or all(0 <= n <= MAX_TOKENS for n in astuple(usage))


@SOME
@given(wild_usages, st.booleans())
def test_no_usage_is_charged_negative_or_above_max_tokens(
    counts: dict[str, object], streamed: bool
) -> None:
    document = {"choices": [], "usage": counts}
    body = event(data(document)) if streamed else json.dumps(document).encode()
    assert within_bounds(meter(body, SSE if streamed else JSON).usage)


@SOME
@given(wild_usages, st.sampled_from(COUNTS[:3]), st.integers(MAX_TOKENS + 1, 10**60))
def test_a_count_over_max_tokens_is_never_charged(
    counts: dict[str, object], name: str, huge: int
) -> None:
    body = json.dumps({"usage": {**counts, name: huge}}).encode()
    got = meter(body, JSON)
    assert got.usage is None and got.unmetered == "absurd"


# -- no bytes make it raise


@SOME
@given(
    st.binary(max_size=300),
    st.sampled_from([SSE, JSON]),
    st.sampled_from(["", "gzip", "deflate"]),
    st.data(),
)
def test_random_bytes_never_raise(
    body: bytes, content_type: str, encoding: str, draw: st.DataObject
) -> None:
    got = meter(body, content_type, encoding, draw.draw(cuts_of(body)))
    assert within_bounds(got.usage)


@SOME
@given(streams(), st.data())
def test_a_stream_with_bytes_broken_anywhere_never_raises(
    stream: Stream, draw: st.DataObject
) -> None:
    body = bytearray(stream.body)
    for _ in range(draw.draw(st.integers(1, 4))):
        at = draw.draw(st.integers(0, len(body)))
        body[at:at] = draw.draw(
            st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x00", b"\xed\xa0\x80"])
        )
    got = meter(bytes(body), cuts=draw.draw(cuts_of(bytes(body))))
    assert within_bounds(got.usage)
