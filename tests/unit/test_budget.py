from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keys.budget import (
    NO_PERIOD,
    current_reset_ms,
    first_reset_ms,
    next_month_start_ms,
    parse_duration,
)
from keys.errors import InvalidArgument

pytestmark = pytest.mark.unit
HOUR = 3_600_000


def ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("text", "period_ms"),
    [
        ("1d", 24 * HOUR),
        ("7d", 7 * 24 * HOUR),
        ("30d", 30 * 24 * HOUR),
        ("12h", 12 * HOUR),
        ("1mo", 0),
    ],
)
def test_durations_parse_to_period_lengths(text: str, period_ms: int) -> None:
    period = parse_duration(text)
    assert (period.duration, period.period_ms) == (text, period_ms)


def test_empty_duration_means_no_period() -> None:
    assert parse_duration("") is NO_PERIOD


@pytest.mark.parametrize("text", ["0d", "1w", "2mo", "-1d", "d", "99999d", "1.5d"])
def test_bad_durations_say_what_to_use(text: str) -> None:
    with pytest.raises(InvalidArgument, match="budget_duration"):
        parse_duration(text)


def test_next_month_start_rolls_over_the_year() -> None:
    assert next_month_start_ms(ms(2026, 12, 31, 23, 59)) == ms(2027, 1, 1)
    assert next_month_start_ms(ms(2026, 2, 1)) == ms(2026, 3, 1)


def test_fixed_period_first_resets_one_length_after_it_is_set() -> None:
    now = ms(2026, 11, 26, 10)
    assert first_reset_ms(parse_duration("7d"), now) == now + 7 * 24 * HOUR
    assert first_reset_ms(parse_duration("1mo"), now) == ms(2026, 12, 1)
    assert first_reset_ms(NO_PERIOD, now) == 0


def test_current_reset_skips_whole_missed_periods() -> None:
    reset = ms(2026, 11, 27)
    assert current_reset_ms(reset, 24 * HOUR, reset - 1) == reset
    assert current_reset_ms(reset, 24 * HOUR, reset) == reset + 24 * HOUR
    assert current_reset_ms(reset, 24 * HOUR, reset + 3 * 24 * HOUR + 5) == reset + 4 * 24 * HOUR
    assert current_reset_ms(ms(2026, 12, 1), 0, ms(2027, 2, 14)) == ms(2027, 3, 1)
