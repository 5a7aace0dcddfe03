"""What a request carries that the decision needs: the key, the model, whether it is public.

Pure functions over lower-cased headers and body bytes, shared by the Envoy Check and
the nginx /auth endpoint. Anything two parsers could read two ways is UNREADABLE.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import urlsplit

import orjson

from keys.keygen import ParsedKey, parse_key
from keys.model import NO_BODY, UNREADABLE, BodyModel, RequestedModel

KEY_HEADERS = ("authorization", "x-api-key", "api-key")
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
# The integration guide's load balancer picks the model from this header too.
PREFERRED_MODEL_HEADER = "x-preferred-model"
MAX_MODEL_CHARS = 256


def key_candidate(headers: Mapping[str, str]) -> str | None:
    """The presented key text: `Authorization: Bearer`, else `x-api-key`, else `api-key`."""
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    for name in KEY_HEADERS[1:]:
        found = headers.get(name)
        if found is not None:
            return found.strip()
    return None


def presented_key(headers: Mapping[str, str]) -> ParsedKey | None:
    """The well-formed key on the request, or None (missing or malformed: both 401)."""
    candidate = key_candidate(headers)
    return None if candidate is None else parse_key(candidate)


OUTPUT_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
MAX_CHOICES = 128  # OpenAI's limit on `n`


def requested_model(body: bytes, headers: Mapping[str, str], body_bytes: int = 0) -> RequestedModel:
    """The model the upstream will read: the body's (last `"model"` wins, as in Python's
    json), checked against `x-preferred-model` when the client sends one; with what
    bounds the request's cost (keys/reservation.py). `body_bytes`: the body's full size
    where Envoy sent only part of it."""
    size = max(len(body), body_bytes, _declared_length(headers))
    return _with_preferred(_body_model(body, headers, size), headers)


def header_count(value: str) -> int | None:
    """A header's whole number (ASCII digits, at most 15), else None."""
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else None


def _declared_length(headers: Mapping[str, str]) -> int:
    for name in ("content-length", ORIGINAL_LENGTH_HEADER):
        length = header_count(headers.get(name, ""))
        if length is not None:
            return length
    return 0


CHOICE_FIELDS = ("n", "best_of")
MAX_PROMPTS = 100_000


def _count(value: object) -> int | None:
    """A whole number as the most lenient upstream reads one (pydantic's lax mode: an
    integral float `8.0` or a numeric string `"8"` is 8); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 1e15 else None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.isascii() and text.isdigit() and len(text) <= 15 else None
    return None


_COST_FIELDS = frozenset((*OUTPUT_CAP_FIELDS, "n", "best_of", "prompt"))


def _cost_bounds(document: dict[str, object]) -> tuple[int | None, int]:
    """(the output tokens one completion may have, None where the body does not bound
    them; how many completions the request asks for). Read as leniently as any upstream
    would, and where a value cannot be read, assumed at its worst: an unreadable output
    cap bounds nothing (the model's own cap applies), an unreadable `n` is MAX_CHOICES.
    Completions: the larger of `n` and `best_of`, times the prompts of a /v1/completions
    prompt list."""
    if any(k not in _COST_FIELDS and k.casefold() in _COST_FIELDS for k in document):
        # Go's encoding/json reads `MAX_TOKENS` as max_tokens (and `N` as n): read two ways,
        # the body bounds nothing
        return None, MAX_CHOICES
    caps: list[int] = []
    for name in OUTPUT_CAP_FIELDS:
        if name in document:
            cap = _count(document[name])
            if cap is None or cap < 0:
                return None, _completions(document)
            caps.append(cap)
    return (max(caps) if caps else None), _completions(document)


def _completions(document: dict[str, object]) -> int:
    choices = 1
    for name in CHOICE_FIELDS:
        if name in document:
            count = _count(document[name])
            choices = max(choices, MAX_CHOICES if count is None else count)
    prompt = document.get("prompt")
    prompts = 1
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        prompts = len(prompt)  # a batch: strings, or token lists, each completed
    return min(choices, MAX_CHOICES) * min(prompts, MAX_PROMPTS)


def _body_model(body: bytes, headers: Mapping[str, str], size: int) -> RequestedModel:
    """A body we cannot read completely, or one another parser could read differently,
    never names a model: a truncated body could hide a second `"model"` after the cut.
    Nor does it bound its output: an `n` after the cut counts as its maximum."""
    if headers.get(PARTIAL_BODY_HEADER, "").lower() == "true":
        return _unreadable(size)
    if not body:
        # A request that has a body Envoy did not forward must not pass as body-less.
        declared = headers.get("content-length", "0").strip()
        if declared not in ("", "0") or "transfer-encoding" in headers:
            return _unreadable(size)
        return NO_BODY
    if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        # compressed: its size bounds nothing, and what it says is unknown until inflated
        return _unreadable(size, encoded=True)
    if not _json_content_type(headers.get("content-type")):
        return _unreadable(size)  # a form parser would read `model=...` from the same bytes
    try:
        document = _parse_json(body)
    except (ValueError, RecursionError):
        return _unreadable(size)
    if not isinstance(document, dict):
        return _unreadable(size)
    if any(k != "model" and k.casefold() == "model" for k in document):
        return _unreadable(size)  # Go's encoding/json matches "Model" to a `model` field
    cap, choices = _cost_bounds(document)
    model = document.get("model")
    name = _model_name(model) if isinstance(model, str) else None
    streams = _streams_without_usage(document)
    if name is None:
        return RequestedModel(
            BodyModel.UNREADABLE, "", cap, choices, size, stream_without_usage=streams
        )
    return RequestedModel(BodyModel.NAMED, name, cap, choices, size, stream_without_usage=streams)


# What a lenient upstream (pydantic's lax mode) reads as true.
_TRUE_STRINGS = frozenset({"true", "t", "yes", "y", "on", "1"})


def _lax_true(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE_STRINGS


def _streams_without_usage(document: dict[str, object]) -> bool:
    """`"stream": true` and no `stream_options.include_usage: true`: the stream will end
    without the chunk that says what it cost, unless the usage tap asks for it."""
    if not _lax_true(document.get("stream")):
        return False
    options = document.get("stream_options")
    return not (isinstance(options, dict) and _lax_true(options.get("include_usage")))


def _unreadable(size: int, *, encoded: bool = False) -> RequestedModel:
    """A body that names no model we can trust, nor bounds its cost: an `n` may hide where
    it cannot be read, so it counts as its maximum."""
    return RequestedModel(BodyModel.UNREADABLE, "", None, MAX_CHOICES, size, encoded)


def _parse_json(body: bytes) -> object:
    """Python's json, as the upstream reads the body, at orjson's speed (~7x on
    number-heavy bodies). orjson refuses a few things Python's json takes (a BOM or
    UTF-16, NaN, integers past 64 bits, a lone surrogate); those fall back to json.
    Both keep the last of repeated keys."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _json_content_type(value: str | None) -> bool:
    """No content type: JSON if it parses (what OpenAI clients imply). Otherwise only
    `application/json` or `application/*+json`, parameters allowed."""
    if value is None:
        return True
    media = value.partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _with_preferred(model: RequestedModel, headers: Mapping[str, str]) -> RequestedModel:
    """`x-preferred-model` is a second model claim, checked like the body's: alone it is
    the model; naming another model than the body makes the request UNREADABLE (only
    keys allowed every model pass)."""
    preferred = headers.get(PREFERRED_MODEL_HEADER)
    if preferred is None:
        return model
    claimed = _named(preferred.strip())
    if model.kind is BodyModel.NO_BODY:
        return claimed
    if model == claimed:
        return model
    return replace(model, kind=BodyModel.UNREADABLE, name="")


def _model_name(model: str) -> str | None:
    """The model name, or None where it cannot name one."""
    if not model or len(model) > MAX_MODEL_CHARS or "\n" in model:
        return None  # the stored allow-list is newline-framed
    try:
        model.encode()
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800") is no model name
        return None
    return model


def _named(model: str) -> RequestedModel:
    name = _model_name(model)
    return UNREADABLE if name is None else RequestedModel.named(name)


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Set by deploy/nginx/nginx.conf from the client's request: the subrequest has no body.
ORIGINAL_LENGTH_HEADER = "x-original-content-length"
ORIGINAL_TRANSFER_ENCODING_HEADER = "x-original-transfer-encoding"


def model_from_headers(headers: Mapping[str, str]) -> RequestedModel:
    """nginx sends no body to an auth subrequest: the model comes from `x-model` (which
    the model check then trusts). Without it, a request that carries a body (any method:
    a GET's body is read by some upstreams) counts as a body with no readable model."""
    size = _declared_length(headers)
    model = headers.get("x-model")
    if model is not None:
        return replace(_with_preferred(_named(model.strip()), headers), body_bytes=size)
    method = headers.get("x-original-method", "GET").upper()
    length = headers.get(ORIGINAL_LENGTH_HEADER, "").strip()
    has_body = (
        method in BODY_METHODS
        or length not in ("", "0")
        or bool(headers.get(ORIGINAL_TRANSFER_ENCODING_HEADER, "").strip())
    )
    unread = RequestedModel(BodyModel.UNREADABLE, choices=MAX_CHOICES, body_bytes=size)
    return _with_preferred(unread if has_body else NO_BODY, headers)


class AmbiguousUri(ValueError):
    """Two original-URI headers name different paths: which one nginx routed is unknown."""


ORIGINAL_URI_HEADERS = ("x-original-uri", "x-original-url")


def original_uri(headers: Mapping[str, str], trusted: str) -> str:
    """The client's path and query as the front end saw them, from the ONE header the
    operator names (a client can send the other). Both present and disagreeing on the
    path: AmbiguousUri."""
    paths = {
        _path_of(headers[name]) for name in (trusted, *ORIGINAL_URI_HEADERS) if name in headers
    }
    if len(paths) > 1:
        raise AmbiguousUri("x-original-uri and x-original-url name different paths")
    return _target_of(headers.get(trusted, "/"))


def _target_of(value: str) -> str:
    """`/p?q` as is; an absolute URL (ingress-nginx's X-Original-URL) reduced to `/p?q`."""
    value = value.strip()
    if value.startswith("/"):
        return value
    parts = urlsplit(value)
    target = parts.path or "/"
    return f"{target}?{parts.query}" if parts.query else target


def _path_of(value: str) -> str:
    return _target_of(value).partition("?")[0]
