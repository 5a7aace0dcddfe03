"""Budget periods: when a key's spend starts again from 0, computed on read, no cron job.

`<N>h` and `<N>d` are periods of that length counted from when the duration was set;
`1mo` is the calendar month in UTC. The check and usage scripts roll a period over in
Redis (keys/lua/_lib.lua); this module computes the same boundaries in Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from keys.errors import InvalidArgument

_HOUR_MS = 3_600_000
_DURATION_RE = re.compile(r"(?P<n>[1-9][0-9]{0,3})(?P<unit>h|d|mo)")
_MAX = {"h": 24 * 366, "d": 3660, "mo": 1}


@dataclass(frozen=True, slots=True)
class BudgetPeriod:
    duration: str  # as the admin wrote it; "" for none
    period_ms: int  # fixed length; 0 for calendar months

    @property
    def monthly(self) -> bool:
        return self.duration == "1mo"


NO_PERIOD = BudgetPeriod("", 0)


def parse_duration(text: str) -> BudgetPeriod:
    text = text.strip()
    if not text:
        return NO_PERIOD
    match = _DURATION_RE.fullmatch(text)
    if match is None or int(match["n"]) > _MAX[match["unit"]]:
        raise InvalidArgument(
            f"budget_duration {text[:20]!r}: use '<N>h' (up to 8784), '<N>d' (up to 3660) or '1mo'"
        )
    n, unit = int(match["n"]), match["unit"]
    if unit == "mo":
        return BudgetPeriod(text, 0)
    return BudgetPeriod(text, n * _HOUR_MS * (24 if unit == "d" else 1))


_month_cache: tuple[int, int, int] = (0, 0, 0)  # (month start, next month start, result)


def next_month_start_ms(now_ms: int) -> int:
    """The first instant of the calendar month (UTC) after the one `now_ms` falls in.
    Every Check passes it to the script, so the current month's answer is cached."""
    global _month_cache
    start, end, result = _month_cache
    if start <= now_ms < end:
        return result
    result = _next_month_start(now_ms)
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    start = int(datetime(now.year, now.month, 1, tzinfo=UTC).timestamp() * 1000)
    _month_cache = (start, result, result)
    return result


def _next_month_start(now_ms: int) -> int:
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp() * 1000)


def first_reset_ms(period: BudgetPeriod, now_ms: int) -> int:
    """When a period set at `now_ms` first resets; 0 for no period."""
    if period is NO_PERIOD or not period.duration:
        return 0
    if period.monthly:
        return next_month_start_ms(now_ms)
    return now_ms + period.period_ms


def current_reset_ms(reset_at_ms: int, period_ms: int, now_ms: int) -> int:
    """The stored reset time moved past `now_ms` (what the scripts store when they roll)."""
    if reset_at_ms == 0 or now_ms < reset_at_ms:
        return reset_at_ms
    if period_ms > 0:
        return reset_at_ms + ((now_ms - reset_at_ms) // period_ms + 1) * period_ms
    return next_month_start_ms(now_ms)
