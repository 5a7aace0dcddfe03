"""What a Check reserves (keys/reservation.py), from bodies read as the upstream reads them
(extauthz/request.py): every way a body can ask for more output than it seems to."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from extauthz.request import requested_model
from keys.pricing import Price, PriceTable
from keys.reservation import estimate

pytestmark = pytest.mark.unit
JSON = {"content-type": "application/json"}
# 1 nano-USD per input token (so per byte of body), 10 per output token
PRICES = PriceTable({"m": Price(Decimal("0.001"), Decimal("0.01"), 1000)})
WITH_DEFAULT = PriceTable(
    {
        "m": Price(Decimal("0.001"), Decimal("0.01")),
        "default": Price(Decimal("0.003"), Decimal("0.04")),
    }
)


def reserve(
    body: dict[str, object], headers: dict[str, str] = JSON, prices: PriceTable = PRICES
) -> int:
    raw = json.dumps(body).encode()
    return estimate(prices, requested_model(raw, headers), 4096).amount_nanos


def output_part(body: dict[str, object]) -> int:
    """The reservation less the body's bytes at the input price."""
    return reserve(body) - len(json.dumps(body).encode())


def test_the_prompt_is_bounded_by_the_body_size_and_the_output_by_max_tokens() -> None:
    assert output_part({"model": "m", "max_tokens": 7}) == 70


def test_without_max_tokens_the_models_cap_from_the_price_table_applies() -> None:
    assert output_part({"model": "m"}) == 10_000


def test_without_either_the_configured_default_applies() -> None:
    table = PriceTable({"m": Price(Decimal(0), Decimal("0.01"))})
    model = requested_model(json.dumps({"model": "m"}).encode(), JSON)
    assert estimate(table, model, 4096).amount_nanos == 40_960


@pytest.mark.parametrize("value", ["900", 900.0, " 900 "])
def test_a_lenient_upstream_reads_numeric_strings_and_integral_floats(value: object) -> None:
    assert output_part({"model": "m", "max_tokens": value}) == 9_000


def test_the_largest_of_the_output_caps_counts() -> None:
    body = {"model": "m", "max_tokens": 1, "max_completion_tokens": "800"}
    assert output_part(body) == 8_000


def test_an_unreadable_cap_next_to_a_small_one_falls_back_to_the_models_cap() -> None:
    assert output_part({"model": "m", "max_tokens": 1, "max_completion_tokens": "1e5"}) == 10_000


@pytest.mark.parametrize(("field", "value"), [("n", 8), ("n", "8"), ("n", 8.0), ("best_of", 8)])
def test_choices_multiply_the_output(field: str, value: object) -> None:
    assert output_part({"model": "m", "max_tokens": 10, field: value}) == 800


def test_an_unreadable_n_is_assumed_at_its_maximum() -> None:
    assert output_part({"model": "m", "max_tokens": 1, "n": "many"}) == 1280


def test_each_prompt_of_a_completions_batch_is_completed() -> None:
    body = {"model": "m", "max_tokens": 10, "prompt": ["a"] * 100}
    assert output_part(body) == 10_000
    assert output_part({"model": "m", "max_tokens": 10, "prompt": [1, 2, 3]}) == 100


def test_a_compressed_body_cannot_be_priced() -> None:
    headers = {**JSON, "content-encoding": "gzip"}
    model = requested_model(b"\x1f\x8b not json", headers)
    assert not estimate(WITH_DEFAULT, model, 4096).priced


def test_an_unreadable_body_is_unpriced_without_a_default_entry() -> None:
    model = requested_model(b"not json", JSON)
    assert not estimate(PRICES, model, 4096).priced


def test_an_unreadable_body_is_priced_at_the_tables_highest_prices_and_most_choices() -> None:
    """It could name any model, and hide an `n` where it cannot be read."""
    model = requested_model(b"x" * 100, JSON)
    got = estimate(WITH_DEFAULT, model, 4096)
    assert got.priced and got.amount_nanos == 100 * 3 + 4096 * 40 * 128


def test_a_unicode_digit_is_no_number() -> None:
    """'²'.isdigit() is true in Python, and int('²') raises."""
    assert output_part({"model": "m", "max_tokens": "²"}) == 10_000


@pytest.mark.parametrize("field", ["MAX_TOKENS", "N", "Best_Of", "Prompt"])
def test_a_cost_field_in_another_case_bounds_nothing(field: str) -> None:
    """A Go upstream reads `MAX_TOKENS` as max_tokens: read two ways, nothing is bounded."""
    assert output_part({"model": "m", "max_tokens": 10, field: 16000}) == 10_000 * 128


def test_the_reservation_bounds_a_reasoning_price_above_the_output_price() -> None:
    """The body cannot say how many output tokens will be reasoning: each may be."""
    table = PriceTable({"m": Price(Decimal("0.001"), Decimal("0.01"), None, None, Decimal("0.03"))})
    model = requested_model(json.dumps({"model": "m", "max_tokens": 10}).encode(), JSON)
    got = estimate(table, model, 4096)
    assert got.amount_nanos - got.prompt_nanos == 300
    assert got.max_tokens_within(got.prompt_nanos + 300) == 10


def test_the_reservation_bounds_a_cached_price_above_the_input_price() -> None:
    """A table may price cached tokens above input: every prompt token may be one."""
    table = PriceTable({"m": Price(Decimal("0.001"), Decimal("0.01"), None, Decimal("0.002"))})
    body = json.dumps({"model": "m", "max_tokens": 1}).encode()
    assert estimate(table, requested_model(body, JSON), 4096).prompt_nanos == 2 * len(body)


def test_cheaper_cached_and_reasoning_prices_leave_the_reservation_as_it_was() -> None:
    cheaper = PriceTable(
        {"m": Price(Decimal("0.001"), Decimal("0.01"), 1000, Decimal("0.0001"), Decimal("0.005"))}
    )
    body = {"model": "m", "max_tokens": 7}
    assert reserve(body, prices=cheaper) == reserve(body)


def test_an_unreadable_body_is_reserved_at_the_highest_reasoning_price() -> None:
    table = PriceTable(
        {
            "m": Price(Decimal("0.001"), Decimal("0.01"), None, None, Decimal("0.05")),
            "default": Price(Decimal("0.003"), Decimal("0.04")),
        }
    )
    got = estimate(table, requested_model(b"x" * 100, JSON), 4096)
    assert got.amount_nanos == 100 * 3 + 4096 * 50 * 128
