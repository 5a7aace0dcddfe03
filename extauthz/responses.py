"""How an `Outcome` (extauthz/decision.py) reaches Envoy and nginx.

One builder for what an allow carries (`allowed`: headers upstream, headers to the
client) and one for what a denial carries (`denial_parts`: status, headers, JSON body,
from the one status table `DENIALS`); then two renderers, `envoy` (a CheckResponse) and
`nginx` (the /auth subrequest's answer). A denial is always a normal CheckResponse
carrying an OpenAI-shaped JSON body, never an RPC error (Envoy would turn that into a
bare status with no body).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from extauthz import tap_directives, wire
from extauthz.decision import Outcome, Verdict
from extauthz.tap_directives import readable_encodings
from keys.model import Decision, Level, LimitHit, Reason, RequestedModel, WindowCount
from keys.money import NANOS_PER_USD
from keys.reservation import FREE, Estimate

UNLIMITED = "unlimited"
VIRTUAL_KEY_HEADER_PREFIX = "x-virtual-key-"
UNVERIFIED_HEADER = "x-virtual-key-unverified"
# Shadow mode: the error.code the request would have been denied with.
WOULD_DENY_HEADER = "x-virtual-key-would-deny"
# Names the allowed request for ReportUsage: fresh per request, never client-chosen.
REQUEST_ID_HEADER = "x-virtual-key-request-id"
# A clamped request (the usage tap lowers its max_tokens): the output tokens it may have.
MAX_TOKENS_HEADER = "x-virtual-key-max-tokens"
# The usage tap adds stream_options.include_usage to this streaming request.
STREAM_USAGE_HEADER = ("x-virtual-key-stream-usage", "added")
ACCEPT = "accept-encoding"


@dataclass(frozen=True, slots=True)
class Denial:
    http_status: int
    rpc_code: int
    error_type: str
    message: str


# The one table from a decision to what the client sees.
DENIALS: Final[Mapping[Reason, Denial]] = {
    Reason.INVALID_API_KEY: Denial(
        401, code_pb2.UNAUTHENTICATED, "invalid_request_error", "Invalid API key provided."
    ),
    Reason.KEY_REVOKED: Denial(
        401, code_pb2.UNAUTHENTICATED, "authentication_error", "This API key has been revoked."
    ),
    Reason.KEY_EXPIRED: Denial(
        401, code_pb2.UNAUTHENTICATED, "authentication_error", "This API key has expired."
    ),
    Reason.MODEL_NOT_ALLOWED: Denial(
        403, code_pb2.PERMISSION_DENIED, "permission_error", "This API key may not use {model}."
    ),
    Reason.MODEL_NOT_PRICED: Denial(
        403,
        code_pb2.PERMISSION_DENIED,
        "permission_error",
        "{model} has no price, and {where} has a budget: it would run uncharged. Ask an "
        "admin to add it to the price table.",
    ),
    Reason.BUDGET_EXCEEDED: Denial(
        402,
        code_pb2.PERMISSION_DENIED,
        "insufficient_quota",
        "The budget of {where} cannot cover this request: ${free} of it is free, and this "
        "request may cost up to ${cost}. {covers} Raise the budget or use another key; "
        "retrying will not help.",
    ),
    Reason.RATE_LIMIT_EXCEEDED: Denial(
        429,
        code_pb2.RESOURCE_EXHAUSTED,
        "{limit_kind}",
        "Rate limit reached for {where}: {limit} {limit_kind} per minute. Retry after "
        "{retry_after}s.",
    ),
    Reason.CONCURRENCY_LIMIT_EXCEEDED: Denial(
        429,
        code_pb2.RESOURCE_EXHAUSTED,
        "requests",
        "Too many requests in flight for {where}: {limit} at once. Retry after 1s.",
    ),
    Reason.AUTH_UNAVAILABLE: Denial(
        503,
        code_pb2.UNAVAILABLE,
        "server_error",
        "Authorization is temporarily unavailable. Retry shortly.",
    ),
}


def error_body(code: str, message: str, error_type: str) -> bytes:
    """The OpenAI-shaped error every refusal carries."""
    return json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    ).encode()


def bad_request_parts(message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """A request too ambiguous to decide on (400): OpenAI-shaped like every denial."""
    body = error_body("ambiguous_request", message, "invalid_request_error")
    return 400, [("content-type", "application/json")], body


def _where(decision: Decision, model: RequestedModel | None) -> str:
    """The level a limit sits at, in words (ids are not secrets; the key is named by id)."""
    if decision.level is Level.USER:
        return f"user {json.dumps(decision.user_id)}"
    if decision.level is Level.TEAM:
        return f"team {json.dumps(decision.team_id)}"
    if decision.level is Level.MODEL and model is not None:
        return f"model {json.dumps(model.name)} on this API key"
    return "this API key"


def _usd(nanos: int) -> str:
    return f"{Decimal(nanos) / NANOS_PER_USD:.6f}".rstrip("0").rstrip(".") or "0"


def _covers(decision: Decision, estimate: Estimate) -> str:
    tokens = estimate.max_tokens_within(decision.free_nanos)
    if tokens <= 0:
        return "No max_tokens fits in what is free."
    return f"The largest max_tokens it covers for this request is {tokens}."


def denial_parts(
    decision: Decision, model: RequestedModel | None = None, estimate: Estimate = FREE
) -> tuple[int, list[tuple[str, str]], bytes]:
    """(HTTP status, client headers, JSON body) of a denial; shared with nginx's /auth."""
    denial = DENIALS[decision.reason]
    headers = [("content-type", "application/json")]
    fields: dict[str, object] = {"where": _where(decision, model)}
    if decision.reason is Reason.RATE_LIMIT_EXCEEDED:
        fields |= {
            "limit": decision.denying_window.limit,
            "limit_kind": "requests" if decision.limit_hit is LimitHit.RPM else "tokens",
            "retry_after": decision.retry_after_s,
        }
        headers.append(("retry-after", str(decision.retry_after_s)))
        headers.extend(rate_limit_headers(decision))
    elif decision.reason is Reason.CONCURRENCY_LIMIT_EXCEEDED:
        fields["limit"] = decision.parallel_limit
        headers.append(("retry-after", "1"))
        headers.extend(rate_limit_headers(decision))
    elif decision.reason is Reason.BUDGET_EXCEEDED:
        fields |= {
            "free": _usd(decision.free_nanos),
            "cost": _usd(estimate.amount_nanos),
            "covers": _covers(decision, estimate),
        }
    elif decision.reason is Reason.MODEL_NOT_PRICED:
        fields["model"] = (
            json.dumps(model.name)
            if model is not None and model.name
            else "This request's model (its body is not JSON sent as application/json "
            "naming one, or is compressed, or larger than the proxy forwards)"
        )
    elif decision.reason is Reason.MODEL_NOT_ALLOWED:
        fields |= {
            "model": json.dumps(model.name)
            if model is not None and model.name
            else "a model it cannot read from this request body (only keys allowed every "
            "model accept unreadable or oversized bodies)"
        }
    elif decision.reason is Reason.AUTH_UNAVAILABLE:
        headers.append(("retry-after", "1"))
    message = denial.message.format(**fields)
    error_type = denial.error_type.format(**fields)
    return denial.http_status, headers, error_body(decision.reason.value, message, error_type)


def rate_limit_headers(decision: Decision) -> list[tuple[str, str]]:
    """The guide's X-RateLimit-* names and OpenAI's x-ratelimit-* names: the key's windows,
    or, for a request a limit above the key (or the key's limit for the model) denied,
    that limit's window in place of the key's of the same kind."""
    rpm, tpm = decision.rpm, decision.tpm
    if decision.window is not None:
        if decision.limit_hit is LimitHit.RPM:
            rpm = decision.window
        else:
            tpm = decision.window
    rpm_limit, rpm_left, rpm_reset = _window(rpm)
    tpm_limit, tpm_left, tpm_reset = _window(tpm)
    return [
        ("x-ratelimit-limit-tpm", tpm_limit),
        ("x-ratelimit-remaining-tpm", tpm_left),
        ("x-ratelimit-limit-rpm", rpm_limit),
        ("x-ratelimit-remaining-rpm", rpm_left),
        ("x-ratelimit-limit-requests", rpm_limit),
        ("x-ratelimit-remaining-requests", rpm_left),
        ("x-ratelimit-reset-requests", rpm_reset),
        ("x-ratelimit-limit-tokens", tpm_limit),
        ("x-ratelimit-remaining-tokens", tpm_left),
        ("x-ratelimit-reset-tokens", tpm_reset),
    ]


_UNLIMITED_WINDOW = (UNLIMITED, UNLIMITED, "0s")


def _window(window: WindowCount) -> tuple[str, str, str]:
    """(limit, remaining, reset) as header values; reset in whole seconds rounded up, like
    Retry-After, in OpenAI's duration style."""
    if window.remaining is None:
        return _UNLIMITED_WINDOW
    return str(window.limit), str(window.remaining), f"{window.reset_s}s"


def request_id_header(decision: Decision) -> tuple[str, str]:
    """The id the request's usage is reported under: the reservation's id (the store
    drew it); 128 random bits where no reservation was opened (fail-open)."""
    return REQUEST_ID_HEADER, decision.request_id or secrets.token_hex(16)


def upstream_identity(decision: Decision) -> list[tuple[str, str]]:
    headers = [
        ("x-virtual-key-id", decision.key_id),
        ("x-virtual-key-user-id", decision.user_id),
    ]
    if decision.team_id:
        headers.append(("x-virtual-key-team-id", decision.team_id))
    return headers


# --- Envoy ------------------------------------------------------------------------------

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _options(headers: Iterable[tuple[str, str]]) -> list[base_pb2.HeaderValueOption]:
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE
        )
        for k, v in headers
    ]


def _poses_as_identity(name: str) -> bool:
    """`x_virtual_key_team_id` is `X-Virtual-Key-Team-Id` to a WSGI/CGI server."""
    return name.lower().replace("_", "-").startswith(VIRTUAL_KEY_HEADER_PREFIX)


def _strip_client_identity(client_headers: Iterable[str], keep: Iterable[str] = ()) -> list[str]:
    """Client-sent x-virtual-key-* headers (or look-alikes) we do not overwrite, plus the
    client's key."""
    kept = set(keep)
    spoofed = [h for h in client_headers if _poses_as_identity(h) and h not in kept]
    return ["authorization", "x-api-key", "api-key", *spoofed]


@dataclass(frozen=True, slots=True)
class Allowed:
    """What an allowed request carries, whichever proxy asked."""

    upstream: list[tuple[str, str]]  # added to the upstream request, replacing the client's
    fresh: list[tuple[str, str]]  # upstream too, but new on every request (never cached)
    client: list[tuple[str, str]]  # rate-limit headers to the client
    public: bool = False  # no key: only identity look-alikes are stripped


def allowed(outcome: Outcome) -> Allowed:
    """The one builder for a request that passes (PUBLIC, ALLOW or fail-open)."""
    decision = outcome.decision
    if outcome.verdict is Verdict.PUBLIC:
        return Allowed([], [], [], public=True)
    if outcome.verdict is Verdict.UNVERIFIED:
        # Redis is down: the claimed key id passes, marked as unverified
        upstream = [("x-virtual-key-id", decision.key_id), (UNVERIFIED_HEADER, "true")]
        return Allowed(upstream, [request_id_header(decision)], [])
    upstream = upstream_identity(decision)
    if decision.would_deny is not None:
        upstream.append((WOULD_DENY_HEADER, decision.would_deny.value))
    if outcome.clamped_to:
        upstream.append((MAX_TOKENS_HEADER, str(outcome.clamped_to)))
    return Allowed(upstream, [request_id_header(decision)], rate_limit_headers(decision))


def envoy(
    outcome: Outcome, client_headers: Mapping[str, str], path: str = "/"
) -> bytes | external_auth_pb2.CheckResponse:
    """A CheckResponse: allows hand-encoded (extauthz/wire.py), denials as messages; an
    allow carries the usage tap's directives as dynamic metadata."""
    if outcome.verdict is Verdict.DENY:
        return envoy_deny(outcome.decision, outcome.model, outcome.estimate)
    if outcome.verdict is Verdict.KEY_VERIFIED:
        return wire.ok_check_response([], [], [])  # nothing changes until the full Check
    allow = allowed(outcome)
    directives = tap_directives.directives(outcome, path)
    upstream = allow.upstream
    if (tap_directives.STREAM_USAGE, tap_directives.ADD) in directives:
        # says which of envoy.yaml's tap filters runs (the one that may change bytes),
        # and tells the upstream that the gateway asked for the usage chunk
        upstream = [*upstream, STREAM_USAGE_HEADER]
    if not allow.public and (encoding := readable_encodings(client_headers.get(ACCEPT))):
        # an answer the usage tap cannot read would be charged by its size: ask the
        # upstream only for encodings it inflates
        upstream = [*upstream, (ACCEPT, encoding)]
    if allow.public:
        removed = [h for h in client_headers if _poses_as_identity(h)]
    else:
        ours = (name for name, _ in (*upstream, *allow.fresh))
        removed = _strip_client_identity(client_headers, ours)
    return wire.ok_check_response(
        upstream, removed, allow.client, fresh=allow.fresh, metadata=directives
    )


def nginx(outcome: Outcome) -> tuple[int, list[tuple[str, str]], bytes]:
    """The /auth subrequest's answer: 200 to pass, with the headers nginx copies upstream
    and to the client, else the same status, headers and JSON body as through Envoy. The
    body also travels in `x-extauthz-body`, since nginx keeps only a subrequest's headers."""
    if outcome.verdict is Verdict.DENY:
        status, headers, body = denial_parts(outcome.decision, outcome.model, outcome.estimate)
        return status, [*headers, ("x-extauthz-body", body.decode())], body
    allow = allowed(outcome)
    return 200, [*allow.upstream, *allow.fresh, *allow.client], b""


def envoy_deny(
    decision: Decision, model: RequestedModel | None = None, estimate: Estimate = FREE
) -> external_auth_pb2.CheckResponse:
    status, headers, body = denial_parts(decision, model, estimate)
    denied = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=_options(headers),
        body=body.decode(),
    )
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=DENIALS[decision.reason].rpc_code),
        denied_response=denied,
    )
