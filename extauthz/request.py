"""What a request carries that the decision needs: the key and the model.

Pure functions over lower-cased headers and body bytes, shared by the Envoy Check and
the nginx /auth endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from keys.keygen import ParsedKey, parse_key
from keys.model import NO_BODY, UNREADABLE, RequestedModel

KEY_HEADERS = ("authorization", "x-api-key", "api-key")
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
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


def requested_model(body: bytes, headers: Mapping[str, str]) -> RequestedModel:
    """The model the upstream will read from the body (last `"model"` wins, as in Python's
    json). A body we cannot read completely never names a model: a truncated body could
    hide a second `"model"` after the cut."""
    if headers.get(PARTIAL_BODY_HEADER, "").lower() == "true":
        return UNREADABLE
    if not body:
        # A request that has a body Envoy did not forward must not pass as body-less.
        declared = headers.get("content-length", "0").strip()
        if declared not in ("", "0") or "transfer-encoding" in headers:
            return UNREADABLE
        return NO_BODY
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return UNREADABLE
    if not isinstance(document, dict):
        return UNREADABLE
    model = document.get("model")
    if not isinstance(model, str):
        return UNREADABLE
    return _named(model)


def _named(model: str) -> RequestedModel:
    if not model or len(model) > MAX_MODEL_CHARS or "\n" in model:
        return UNREADABLE  # the stored allow-list is newline-framed
    try:
        model.encode()
    except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800") is no model name
        return UNREADABLE
    return RequestedModel.named(model)


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def model_from_headers(headers: Mapping[str, str]) -> RequestedModel:
    """nginx sends no body to an auth subrequest: the model comes from `x-model` (which
    the model check then trusts), and a body-carrying method without it counts as a body
    with no readable model."""
    model = headers.get("x-model")
    if model is not None:
        return _named(model.strip())
    method = headers.get("x-original-method", "GET").upper()
    return UNREADABLE if method in BODY_METHODS else NO_BODY
