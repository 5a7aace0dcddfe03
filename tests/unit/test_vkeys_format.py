"""vkeys' text output: money, limits, tables and the per-day usage chart. No server."""

from __future__ import annotations

import re

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from keys.v1 import keys_pb2
from vkeys import format as fmt

pytestmark = pytest.mark.unit

DAY_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}( |$)")


def usage(*rows: keys_pb2.UsageRow, start: str, end: str) -> keys_pb2.GetUsageResponse:
    return keys_pb2.GetUsageResponse(start_date=start, end_date=end, rows=rows, key_ids=["k1"])


def row(date: str, model: str = "gpt-4", cost: float = 0.0, tokens: int = 0) -> keys_pb2.UsageRow:
    return keys_pb2.UsageRow(
        date=date, model=model, requests=1, prompt_tokens=tokens, completion_tokens=0, cost=cost
    )


def day_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if DAY_LINE.match(line)]


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "$0.00"), (2.5, "$2.50"), (12, "$12.00"), (0.000123, "$0.000123"), (1.10101, "$1.10101")],
)
def test_usd_shows_cents_and_keeps_sub_cent_digits(value: float, text: str) -> None:
    assert fmt.usd(value) == text


def test_zero_limit_and_zero_budget_read_unlimited() -> None:
    assert (fmt.limit(0), fmt.budget(0)) == ("unlimited", "unlimited")
    assert (fmt.limit(12000), fmt.budget(3)) == ("12,000", "$3.00")


def test_unset_timestamp_reads_never_and_a_set_one_is_utc() -> None:
    assert fmt.when(Timestamp()) == "never"
    assert fmt.when(Timestamp(seconds=86_400)) == "1970-01-02 00:00:00 UTC"


def test_empty_or_star_model_list_reads_all() -> None:
    assert fmt.models([]) == fmt.models(["*"]) == "* (all)"
    assert fmt.models(["a", "b"]) == "a, b"


def test_table_pads_columns_and_right_aligns_the_ones_asked() -> None:
    text = fmt.table(["name", "n"], [["a", "1"], ["bbb", "22"]], right=(1,))
    assert text.splitlines() == ["name   n", "----  --", "a      1", "bbb   22"]


def test_days_of_fills_the_whole_range_and_sums_rows_per_day() -> None:
    reply = usage(
        row("2025-01-02", cost=0.5, tokens=10),
        row("2025-01-02", model="o1", cost=0.25, tokens=5),
        start="2025-01-01",
        end="2025-01-03",
    )
    days = fmt.days_of(reply)
    assert list(days) == ["2025-01-01", "2025-01-02", "2025-01-03"]
    assert days["2025-01-02"] == fmt.Day(cost=0.75, tokens=15, requests=2)
    assert days["2025-01-01"] == fmt.Day()


def test_chart_shows_only_days_with_usage_by_default() -> None:
    reply = usage(row("2025-01-30", cost=0.25), start="2025-01-01", end="2025-01-30")
    lines = day_lines(fmt.chart(fmt.days_of(reply)))
    assert len(lines) == 1
    assert lines[0].startswith("2025-01-30") and "$0.25" in lines[0]


def test_chart_with_all_days_shows_every_day_of_the_range() -> None:
    reply = usage(row("2025-01-30", cost=0.25), start="2025-01-01", end="2025-01-30")
    lines = day_lines(fmt.chart(fmt.days_of(reply), all_days=True))
    assert len(lines) == 30
    assert [line for line in lines if fmt.BAR in line] == [lines[-1]]


def test_chart_without_any_usage_says_so() -> None:
    reply = usage(start="2025-01-01", end="2025-01-30")
    assert fmt.chart(fmt.days_of(reply)) == "per day: no usage"


def test_chart_bars_by_tokens_when_nothing_cost_money() -> None:
    reply = usage(
        row("2025-01-01", tokens=100), row("2025-01-02", tokens=50), start="", end="2025-01-02"
    )
    text = fmt.chart(fmt.days_of(reply))
    assert text.splitlines()[0] == "per day (bar: tokens)"
    first, second = day_lines(text)
    assert first.count(fmt.BAR) == fmt.BAR_WIDTH and second.count(fmt.BAR) == fmt.BAR_WIDTH // 2


def test_a_tiny_value_still_gets_one_bar() -> None:
    assert fmt.bar(0.0001, 100) == fmt.BAR
    assert fmt.bar(0, 100) == ""


def test_model_table_puts_the_costliest_model_first() -> None:
    text = fmt.model_table([row("d", "cheap", cost=0.1), row("d", "dear", cost=2.0)])
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["dear", "cheap"]


def test_usage_report_passes_all_days_to_the_chart() -> None:
    reply = usage(row("2025-01-03", cost=1.0), start="2025-01-01", end="2025-01-03")
    assert len(day_lines(fmt.usage_report("key k1", reply))) == 1
    assert len(day_lines(fmt.usage_report("key k1", reply, all_days=True))) == 3


def test_key_details_names_every_key_field() -> None:
    data = keys_pb2.KeyData(id="abc", name="n", user_id="u", allowed_models=["gpt-4"])
    labels = {line.split()[0] for line in fmt.key_details(data).splitlines()}
    assert set(keys_pb2.KeyData.DESCRIPTOR.fields_by_name) <= labels


def test_budget_details_names_every_budget_field() -> None:
    data = keys_pb2.Budget(scope="team", id="t1", max_budget=5, budget_remaining=5)
    labels = {line.split()[0] for line in fmt.budget_details(data).splitlines()}
    assert set(keys_pb2.Budget.DESCRIPTOR.fields_by_name) <= labels


def test_budget_without_max_budget_reads_unlimited() -> None:
    text = fmt.budget_details(keys_pb2.Budget(scope="user", id="u1"))
    assert "max_budget             unlimited" in text
    assert "budget_remaining       unlimited" in text
