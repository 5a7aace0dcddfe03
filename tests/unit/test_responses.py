from __future__ import annotations

import json
import re

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from extauthz import responses
from extauthz.decision import PUBLIC, Outcome, Verdict
from keys.model import Decision, LimitHit, Reason, RequestedModel, WindowCount

pytestmark = pytest.mark.unit


def headers(decision: Decision) -> dict[str, str]:
    return dict(responses.rate_limit_headers(decision))


def test_rate_limit_headers_count_down_and_round_reset_up_to_whole_seconds() -> None:
    got = headers(Decision(Reason.OK, rpm=WindowCount(60, 3, 40_001), tpm=WindowCount(100, 130, 1)))
    assert (got["x-ratelimit-limit-rpm"], got["x-ratelimit-remaining-rpm"]) == ("60", "57")
    assert got["x-ratelimit-reset-requests"] == "41s"
    assert (got["x-ratelimit-remaining-tpm"], got["x-ratelimit-reset-tokens"]) == ("0", "1s")
    assert got["x-ratelimit-limit-requests"] == got["x-ratelimit-limit-rpm"]


def test_unset_limits_say_unlimited() -> None:
    got = headers(Decision(Reason.OK))
    assert got["x-ratelimit-limit-tpm"] == got["x-ratelimit-remaining-requests"] == "unlimited"
    assert got["x-ratelimit-reset-tokens"] == "0s"


def test_rate_limit_denial_says_which_limit_and_when_to_retry() -> None:
    decision = Decision(
        Reason.RATE_LIMIT_EXCEEDED,
        rpm=WindowCount(5, 5, 0),
        tpm=WindowCount(100, 100, 12_300),
        limit_hit=LimitHit.TPM,
    )
    status, hdrs, body = responses.denial_parts(decision)
    error = json.loads(body)["error"]
    assert status == 429 and dict(hdrs)["retry-after"] == "13"
    assert error["type"] == "tokens" and "100 tokens per minute" in error["message"]


def test_model_denial_names_the_model_json_escaped() -> None:
    _, _, body = responses.denial_parts(
        Decision(Reason.MODEL_NOT_ALLOWED), RequestedModel.named('gpt-"4"')
    )
    assert '"gpt-\\"4\\""' in json.loads(body)["error"]["message"]


ALLOWED = Outcome(Verdict.ALLOW, Decision(Reason.OK, "0123456789abcdef", "u1", "t1"))


def _envoy(outcome: Outcome, client_headers: list[str]) -> external_auth_pb2.CheckResponse:
    reply = responses.envoy(outcome, dict.fromkeys(client_headers, ""))
    if isinstance(reply, bytes):
        return external_auth_pb2.CheckResponse.FromString(reply)
    return reply


def _allow(client_headers: list[str]) -> external_auth_pb2.CheckResponse:
    return _envoy(ALLOWED, client_headers)


def test_allow_sends_a_fresh_128_bit_request_id_upstream() -> None:
    ids = [
        {o.header.key: o.header.value for o in _allow([]).ok_response.headers}[
            responses.REQUEST_ID_HEADER
        ]
        for _ in range(2)
    ]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]


def test_allow_overwrites_a_client_sent_request_id() -> None:
    reply = _allow([responses.REQUEST_ID_HEADER])
    set_ids = [o for o in reply.ok_response.headers if o.header.key == responses.REQUEST_ID_HEADER]
    assert set_ids[0].append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@pytest.mark.parametrize("name", ["x_virtual_key_team_id", "X_Virtual-Key_Admin"])
def test_allow_removes_underscored_identity_look_alikes(name: str) -> None:
    assert name in _allow([name, "x_other"]).ok_response.headers_to_remove
    assert "x_other" not in _allow([name, "x_other"]).ok_response.headers_to_remove


def test_public_allow_removes_underscored_identity_look_alikes() -> None:
    removed = _envoy(PUBLIC, ["x_virtual_key_id", "authorization"]).ok_response.headers_to_remove
    assert list(removed) == ["x_virtual_key_id"]  # a public path keeps the client's own auth


# --- the two renderers say the same thing ----------------------------------------------


DENIED = [
    Outcome(Verdict.DENY, Decision(Reason.INVALID_API_KEY)),
    Outcome(Verdict.DENY, Decision(Reason.MODEL_NOT_ALLOWED, "k"), RequestedModel.named("x")),
    Outcome(
        Verdict.DENY,
        Decision(
            Reason.RATE_LIMIT_EXCEEDED, "k", rpm=WindowCount(1, 1, 5000), limit_hit=LimitHit.RPM
        ),
    ),
    Outcome(Verdict.DENY, Decision(Reason.AUTH_UNAVAILABLE, "k")),
]


@pytest.mark.parametrize("outcome", DENIED, ids=lambda o: o.decision.reason.value)
def test_a_denial_reads_the_same_through_envoy_and_nginx(outcome: Outcome) -> None:
    denied = _envoy(outcome, []).denied_response
    status, nginx_headers, body = responses.nginx(outcome)
    assert denied.status.code == status
    assert denied.body.encode() == body == dict(nginx_headers)["x-extauthz-body"].encode()
    envoy_headers = {o.header.key: o.header.value for o in denied.headers}
    assert envoy_headers == {k: v for k, v in nginx_headers if k != "x-extauthz-body"}


def test_an_allow_carries_the_same_headers_through_envoy_and_nginx() -> None:
    ok = _allow([]).ok_response
    status, nginx_headers, body = responses.nginx(ALLOWED)
    upstream = {o.header.key: o.header.value for o in ok.headers}
    client = {o.header.key: o.header.value for o in ok.response_headers_to_add}
    assert (status, body) == (200, b"")
    nginx = dict(nginx_headers)
    assert upstream.keys() | client.keys() == nginx.keys()
    assert {k: v for k, v in upstream.items() if k != responses.REQUEST_ID_HEADER} == {
        k: nginx[k] for k in upstream if k != responses.REQUEST_ID_HEADER
    }
    assert upstream["x-virtual-key-team-id"] == "t1"


def test_fail_open_marks_the_request_unverified_in_both() -> None:
    outcome = Outcome(Verdict.UNVERIFIED, Decision(Reason.OK, "0123456789abcdef"))
    upstream = {o.header.key: o.header.value for o in _envoy(outcome, []).ok_response.headers}
    _, nginx_headers, _ = responses.nginx(outcome)
    for headers in (upstream, dict(nginx_headers)):
        assert headers[responses.UNVERIFIED_HEADER] == "true"
        assert headers["x-virtual-key-id"] == "0123456789abcdef"
