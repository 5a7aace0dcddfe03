from __future__ import annotations

import json

import pytest

from extauthz import responses
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
