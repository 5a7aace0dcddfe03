"""The usage tap's protocol-free parts: what Check tells it, how it rewrites a request
body, and the estimate it charges for a response that reported no usage."""

from __future__ import annotations

import json
import math

import pytest

from extauthz.decision import Outcome, Verdict
from extauthz.request import requested_model
from extauthz.tap import estimate_usage, rewrite_request
from extauthz.tap_directives import directives, readable_encodings, takes_stream_options
from extauthz.usage_meter import Metered
from keys.model import Decision, Reason

pytestmark = pytest.mark.unit
JSON = {"content-type": "application/json"}


def allowed(body: dict[str, object], clamped_to: int = 0) -> Outcome:
    model = requested_model(json.dumps(body).encode(), JSON)
    return Outcome(Verdict.ALLOW, Decision(Reason.OK, "k"), model, clamped_to=clamped_to)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "stream": True},
        {"model": "m", "stream": "true"},
        {"model": "m", "stream": 1},
        {"model": "m", "stream": True, "stream_options": {"include_usage": False}},
        {"model": "m", "stream": True, "stream_options": None},
    ],
)
def test_a_stream_without_its_usage_chunk_is_marked_for_the_tap(body: dict[str, object]) -> None:
    assert ("stream_usage", "add") in directives(allowed(body), "/v1/chat/completions")


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},
        {"model": "m", "stream": False},
        {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
    ],
)
def test_a_request_that_needs_no_usage_chunk_is_not_marked(body: dict[str, object]) -> None:
    assert ("stream_usage", "add") not in directives(allowed(body), "/v1/chat/completions")


def test_only_apis_with_stream_options_get_them() -> None:
    assert takes_stream_options("/v1/chat/completions?api-version=1")
    assert takes_stream_options("/openai/deployments/d/completions")
    assert not takes_stream_options("/v1/responses")
    assert not takes_stream_options("/v1/embeddings")
    outcome = allowed({"model": "m", "stream": True})
    assert ("stream_usage", "add") not in directives(outcome, "/v1/responses")


def test_the_model_and_a_clamp_are_passed_on() -> None:
    entries = directives(allowed({"model": "gpt-4o"}, clamped_to=40), "/v1/chat/completions")
    assert ("model", "gpt-4o") in entries and ("max_tokens", "40") in entries


def test_the_body_size_check_read_is_passed_on() -> None:
    """The estimate's prompt, for a request that declares no content-length (chunked)."""
    body: dict[str, object] = {"model": "gpt-4o", "messages": [{"content": "x" * 100}]}
    entries = directives(allowed(body), "/v1/chat/completions")
    assert ("request_bytes", str(len(json.dumps(body)))) in entries


def test_a_denial_carries_no_directives() -> None:
    denied = Outcome(Verdict.DENY, Decision(Reason.BUDGET_EXCEEDED, "k"))
    assert directives(denied, "/v1/chat/completions") == []


def rewritten(body: dict[str, object], path: str = "/v1/chat/completions", **kw: object) -> object:
    out = rewrite_request(json.dumps(body).encode(), path, **kw)  # type: ignore[arg-type]
    assert out is not None
    return json.loads(out)


def test_usage_is_asked_for_keeping_the_clients_other_stream_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"x": 1, "include_usage": False}}
    out = rewritten(body, add_usage=True, max_tokens=0)
    assert out == {**body, "stream_options": {"x": 1, "include_usage": True}}


def test_a_clamp_lowers_every_output_cap_the_body_names() -> None:
    body = {"model": "m", "max_tokens": 500, "max_completion_tokens": 30}
    out = rewritten(body, add_usage=False, max_tokens=40)
    assert out == {"model": "m", "max_tokens": 40, "max_completion_tokens": 30}


def test_a_clamp_lowers_a_cap_in_any_case() -> None:
    """Go's encoding/json matches `MAX_TOKENS` to max_tokens, the last written winning;
    Check then bounds nothing (it reserves the worst), but a clamp must still hold."""
    body = {"model": "m", "max_tokens": 50, "MAX_TOKENS": 100000, "Max_Output_Tokens": 9}
    out = rewritten(body, add_usage=False, max_tokens=40)
    assert out == {"model": "m", "max_tokens": 40, "MAX_TOKENS": 40, "Max_Output_Tokens": 9}
    only = rewritten({"model": "m", "MAX_TOKENS": 100000}, add_usage=False, max_tokens=40)
    assert only == {"model": "m", "MAX_TOKENS": 40, "max_tokens": 40}


def test_a_clamp_replaces_a_cap_it_cannot_read_as_a_number() -> None:
    for value in ("500", 500.0, -1, True, None):
        out = rewritten({"model": "m", "max_tokens": value}, add_usage=False, max_tokens=40)
        assert out == {"model": "m", "max_tokens": 40}


def test_a_clamp_adds_the_cap_a_body_does_not_name() -> None:
    assert rewritten({"model": "m"}, add_usage=False, max_tokens=40) == {
        "model": "m",
        "max_tokens": 40,
    }
    responses = rewritten({"model": "m"}, "/v1/responses", add_usage=False, max_tokens=40)
    assert responses == {"model": "m", "max_output_tokens": 40}


def test_repeated_keys_rewrite_to_the_one_check_read() -> None:
    body = b'{"model":"cheap","model":"gpt-4o","max_tokens":9000}'
    out = rewrite_request(body, "/v1/chat/completions", add_usage=False, max_tokens=40)
    assert out is not None and json.loads(out) == {"model": "gpt-4o", "max_tokens": 40}


def test_a_lone_surrogate_is_rewritten_as_its_escape() -> None:
    """JSON allows "\\ud800" and Check reads it; a rewrite that raised would let Envoy
    (failure_mode_allow) forward the request unclamped, its usage chunk never asked for."""
    body = b'{"model":"gpt-4o","messages":[{"content":"Hi \\ud800 \xc3\xa9"}],"stream":true}'
    out = rewrite_request(body, "/v1/chat/completions", add_usage=True, max_tokens=40)
    assert out is not None
    assert json.loads(out) == {
        **json.loads(body),
        "stream_options": {"include_usage": True},
        "max_tokens": 40,
    }


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_not_rewritten(body: bytes) -> None:
    assert rewrite_request(body, "/v1/chat/completions", add_usage=True, max_tokens=40) is None


def test_the_estimate_counts_the_prompt_by_bytes_and_the_answer_by_events_or_chars() -> None:
    metered = Metered(None, content_chars=40, unmetered="no_usage", content_events=3)
    usage = estimate_usage(metered, request_bytes=101, response_bytes=999)
    assert (usage.prompt_tokens, usage.completion_tokens) == (math.ceil(101 / 4), 10)
    many_events = Metered(None, content_chars=12, unmetered="cut", content_events=12)
    assert estimate_usage(many_events, 0, 0).completion_tokens == 12  # e.g. CJK: a token each


def test_an_unreadable_body_is_estimated_by_its_size_and_never_as_nothing() -> None:
    unreadable = Metered(None, content_chars=0, unmetered="encoding")
    assert estimate_usage(unreadable, 0, 400).completion_tokens == 100
    assert estimate_usage(unreadable, 0, 0).completion_tokens == 1


@pytest.mark.parametrize(
    ("accept", "sent"),
    [
        (None, None),
        ("gzip, deflate", None),
        ("identity", None),
        ("br", "identity"),
        ("gzip, br;q=1.0, zstd", "gzip"),
        ("*", "identity"),
    ],
)
def test_the_upstream_is_asked_only_for_encodings_the_meter_reads(
    accept: str | None, sent: str | None
) -> None:
    assert readable_encodings(accept) == sent


def test_a_length_in_digits_other_than_ascii_is_no_length() -> None:
    """`"²".isdigit()` is true and `int("²")` raises: the tap reads lengths as the
    request parser does, ASCII digits only."""
    from extauthz.tap import _length

    assert (_length(" 42 "), _length("²"), _length("4²"), _length("")) == (42, 0, 0, 0)
