"""The parts of budget alert delivery that need no server: the retry schedule, the
signature, what the logs may say about the webhook."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from extauthz.alerts import RETRY_CAP_S, backoff_s, signature, webhook_host
from keys.alert_stream import rfc3339_ms, threshold_number, thresholds_arg

pytestmark = pytest.mark.unit


def test_backoff_doubles_per_failure_within_its_jitter_and_stops_at_the_cap() -> None:
    for attempts in range(1, 40):
        raw = min(2.0 ** (attempts - 1), RETRY_CAP_S)
        for entry in ("1700000000000-0", "1700000000000-1", "1800000000000-7"):
            wait = backoff_s(entry, attempts, 1.0)
            assert 0.5 * raw <= wait < raw
    assert backoff_s("1-0", 40, 1.0) < RETRY_CAP_S


def test_backoff_is_the_same_on_every_server_and_spreads_events_out() -> None:
    assert backoff_s("1-0", 3, 0.05) == backoff_s("1-0", 3, 0.05)
    spread = {backoff_s(f"1700000000000-{n}", 3, 1.0) for n in range(50)}
    assert len(spread) == 50


def test_the_signature_is_the_hex_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"event":"budget_threshold"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature("s3cret", body) == f"sha256={expected}"


def test_the_logs_name_only_the_webhooks_scheme_and_host() -> None:
    url = "https://user:pw@hooks.example:8443/services/T0/B0/tok3n?key=abc"
    assert webhook_host(url) == "https://hooks.example:8443"
    assert webhook_host("http://127.0.0.1/x") == "http://127.0.0.1"


def test_thresholds_reach_the_scripts_in_basis_points_and_the_payload_as_fractions() -> None:
    assert thresholds_arg((10000, 5000, 8000, 5000)) == "5000,8000,10000"
    assert thresholds_arg(()) == ""
    assert [threshold_number(bp) for bp in (5000, 8000, 10000, 1, 100000)] == [
        0.5,
        0.8,
        1.0,
        0.0001,
        10.0,
    ]


def test_times_are_rfc3339_utc_with_milliseconds_only_when_there_are_some() -> None:
    assert rfc3339_ms(1_798_761_600_000) == "2027-01-01T00:00:00Z"
    assert rfc3339_ms(1_798_761_600_042) == "2027-01-01T00:00:00.042Z"
