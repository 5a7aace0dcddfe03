"""Properties of what a request carries (extauthz/request.py, keys/keygen.py) over hostile
input: no input makes them raise, and they read a key and a model exactly as the SPEC says.

The same properties run end to end, through the real server, in
tests/integration/test_hostile_input.py; here they get many more examples cheaply.
"""

from __future__ import annotations

import hashlib
import json
import string
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from extauthz.request import (
    MAX_MODEL_CHARS,
    PARTIAL_BODY_HEADER,
    key_candidate,
    model_from_headers,
    presented_key,
    requested_model,
)
from keys.keygen import MAX_KEY_CHARS, format_key, parse_key
from keys.model import NO_BODY, UNREADABLE, BodyModel, RequestedModel

pytestmark = pytest.mark.unit

MANY = settings(max_examples=200, deadline=None)
UTF8 = st.characters(codec="utf-8")
ALNUM = string.ascii_letters + string.digits
KEY_RE_CHARS = set(ALNUM + "-_")

header_names = st.one_of(
    st.sampled_from(["authorization", "x-api-key", "api-key", PARTIAL_BODY_HEADER, "x-model"]),
    st.sampled_from(["content-length", "transfer-encoding", "x-original-method"]),
    st.text(UTF8, max_size=10),
)
headers = st.dictionaries(header_names, st.text(UTF8, max_size=80), max_size=5)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(UTF8, max_size=10)
    | st.sampled_from(["gpt-4", "", "a\nb", "m" * 257]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["model", "x"]) | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def json_object_bodies(draw: st.DrawFn) -> bytes:
    """Objects that may repeat "model" (the last one wins in Python's json)."""
    names = st.sampled_from(["gpt-4", "gpt-4o", "claude-3"])
    model = st.tuples(st.just("model"), st.one_of(names, names, json_values))
    other = st.tuples(st.sampled_from(["messages", "Model", "x"]), json_values)
    members = draw(st.lists(model | other, max_size=5))
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in members) + "}"
    return text.encode()


bodies = st.one_of(
    st.binary(max_size=200), json_object_bodies(), json_values.map(json.dumps).map(str.encode)
)


def oracle(body: bytes) -> RequestedModel:
    """SPEC: the model is what Python's json reads as the body's last "model", when it is
    a usable name (the stored allow-list is newline-framed, names are bounded) and no
    other top-level key is "model" to a case-insensitive parser."""
    if not body:
        return NO_BODY
    try:
        document: Any = json.loads(body)
    except (ValueError, RecursionError):
        return UNREADABLE
    if isinstance(document, dict) and any(
        k != "model" and k.casefold() == "model" for k in document
    ):
        return UNREADABLE
    model = document.get("model") if isinstance(document, dict) else None
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS or "\n" in model:
        return UNREADABLE
    return RequestedModel.named(model)


@MANY
@given(body=bodies)
def test_requested_model_is_what_python_json_reads(body: bytes) -> None:
    assert requested_model(body, {}) == oracle(body)


@MANY
@given(body=bodies, extra=headers)
def test_requested_model_never_raises_and_a_partial_body_never_names_a_model(
    body: bytes, extra: dict[str, str]
) -> None:
    model = requested_model(body, extra)
    if extra.get(PARTIAL_BODY_HEADER, "").lower() == "true":
        assert model == UNREADABLE
    if model.kind is BodyModel.NAMED:
        assert body and model == oracle(body)


@MANY
@given(extra=headers)
def test_model_from_headers_never_raises(extra: dict[str, str]) -> None:
    model = model_from_headers(extra)
    if model.kind is BodyModel.NAMED:
        assert "\n" not in model.name and 0 < len(model.name) <= MAX_MODEL_CHARS


@pytest.mark.parametrize("body", [b'{"model": "\\ud800"}', b'{"model": "\xed\xa0\x80"}'])
def test_a_named_model_can_always_be_sent_to_redis(body: bytes) -> None:
    model = requested_model(body, {})
    if model.kind is BodyModel.NAMED:
        model.name.encode()


@MANY
@given(extra=headers)
def test_presented_key_never_raises_and_only_takes_well_formed_keys(
    extra: dict[str, str],
) -> None:
    parsed = presented_key(extra)
    if parsed is None:
        return
    candidate = key_candidate(extra)
    assert candidate is not None and len(candidate) <= MAX_KEY_CHARS
    assert set(candidate) <= KEY_RE_CHARS
    assert parsed.key_id in candidate
    assert parsed.digest == hashlib.sha256(candidate.encode()).hexdigest()


prefixes = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", fullmatch=True)
key_ids = st.from_regex(r"[0-9a-f]{16}", fullmatch=True)
secrets_ = st.text(ALNUM, min_size=32, max_size=64)


@MANY
@given(prefix=prefixes, key_id=key_ids, secret=secrets_)
def test_every_well_formed_key_parses_to_its_id_and_digest(
    prefix: str, key_id: str, secret: str
) -> None:
    full = format_key(prefix, key_id, secret)
    parsed = parse_key(full)
    assert parsed is not None
    assert (parsed.key_id, parsed.digest) == (key_id, hashlib.sha256(full.encode()).hexdigest())
    assert presented_key({"authorization": f"Bearer {full}"}) == parsed
    assert presented_key({"x-api-key": f"  {full} "}) == parsed


@MANY
@given(
    prefix=prefixes,
    key_id=key_ids,
    secret=secrets_,
    at=st.integers(0, 200),
    char=UTF8,
)
def test_a_key_with_one_character_changed_never_reads_as_the_key(
    prefix: str, key_id: str, secret: str, at: int, char: str
) -> None:
    full = format_key(prefix, key_id, secret)
    at %= len(full)
    assume(full[at] != char)
    changed = parse_key(full[:at] + char + full[at + 1 :])
    original = parse_key(full)
    assert changed is None or changed != original
