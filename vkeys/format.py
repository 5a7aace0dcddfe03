"""Text for people: tables, money, times and the usage bar chart. Pure functions, no I/O."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from keys.v1 import keys_pb2

BAR_WIDTH = 40
BAR = "█"


def usd(value: float) -> str:
    text = f"{value:.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def limit(value: float) -> str:
    return "unlimited" if value == 0 else f"{value:,}"


def budget(value: float) -> str:
    return "unlimited" if value == 0 else usd(value)


def when(stamp: Timestamp, unset: str = "never", fmt: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return unset
    return stamp.ToDatetime(tzinfo=dt.UTC).strftime(fmt)


def models(names: Iterable[str]) -> str:
    listed = list(names)
    return "* (all)" if listed in ([], ["*"]) else ", ".join(listed)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


# ---------------------------------------------------------------- keys


def key_details(data: keys_pb2.KeyData) -> str:
    remaining = usd(data.budget_remaining) if data.HasField("budget_remaining") else "unlimited"
    fields = [
        ("id", data.id),
        ("name", data.name),
        ("user_id", data.user_id),
        ("team_id", data.team_id or "-"),
        ("status", data.status),
        ("created_at", when(data.created_at)),
        ("expires_at", when(data.expires_at)),
        ("allowed_models", models(data.allowed_models)),
        ("max_budget", budget(data.max_budget)),
        ("spent", usd(data.spent)),
        ("budget_remaining", remaining),
        ("budget_duration", data.budget_duration or "-"),
        ("budget_reset_at", when(data.budget_reset_at, unset="-")),
        ("reserved", usd(data.reserved)),
        ("in_flight", f"{data.in_flight:,}"),
        ("tpm_limit", limit(data.tpm_limit)),
        ("rpm_limit", limit(data.rpm_limit)),
        ("max_parallel_requests", limit(data.max_parallel_requests)),
        ("model_limits", model_limits(data.model_limits)),
        ("enforce", "true" if data.enforce else "false (shadow mode: its own limits deny nothing)"),
        ("total_requests", f"{data.total_requests:,}"),
        ("last_used", when(data.last_used)),
        ("metadata", ", ".join(f"{k}={v}" for k, v in sorted(data.metadata.items())) or "-"),
    ]
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def model_limits(limits: Mapping[str, keys_pb2.ModelLimit]) -> str:
    return (
        ", ".join(
            f"{model} rpm {limit(m.rpm_limit)} tpm {limit(m.tpm_limit)}"
            for model, m in sorted(limits.items())
        )
        or "-"
    )


def key_table(keys: Sequence[keys_pb2.KeyData]) -> str:
    headers = ["id", "name", "user", "team", "status", "spent/budget", "rpm", "tpm", "expires"]
    rows = [
        [
            k.id,
            k.name,
            k.user_id,
            k.team_id or "-",
            k.status,
            f"{usd(k.spent)}/{budget(k.max_budget)}",
            limit(k.rpm_limit),
            limit(k.tpm_limit),
            when(k.expires_at, fmt="%Y-%m-%d"),
        ]
        for k in keys
    ]
    return table(headers, rows, right=(5, 6, 7))


def new_key(verb: str, reply: keys_pb2.CreateKeyResponse, note: str = "") -> str:
    return "\n".join(
        [
            f"{verb} key {reply.key_data.id} ({reply.key_data.name})",
            "",
            f"    {reply.key}",
            "",
            "Save this key now: it is shown only once and cannot be recovered." + note,
            "",
            key_details(reply.key_data),
        ]
    )


# ---------------------------------------------------------------- budgets


def budget_details(data: keys_pb2.Budget) -> str:
    remaining = usd(data.budget_remaining) if data.HasField("budget_remaining") else "unlimited"
    fields = [
        ("scope", data.scope),
        ("id", data.id),
        ("max_budget", budget(data.max_budget)),
        ("spent", usd(data.spent)),
        ("reserved", usd(data.reserved)),
        ("budget_remaining", remaining),
        ("budget_duration", data.budget_duration or "-"),
        ("budget_reset_at", when(data.budget_reset_at, unset="-")),
        ("rpm_limit", limit(data.rpm_limit)),
        ("tpm_limit", limit(data.tpm_limit)),
        ("max_parallel_requests", limit(data.max_parallel_requests)),
        ("in_flight", f"{data.in_flight:,}"),
        ("created_at", when(data.created_at)),
    ]
    width = max(len(name) for name, _ in fields)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in fields)


def budget_table(budgets: Sequence[keys_pb2.Budget]) -> str:
    headers = ["id", "spent/budget", "reserved", "in flight", "rpm", "tpm", "resets", "since"]
    rows = [
        [
            b.id,
            f"{usd(b.spent)}/{budget(b.max_budget)}",
            usd(b.reserved),
            f"{b.in_flight:,}/{limit(b.max_parallel_requests)}",
            limit(b.rpm_limit),
            limit(b.tpm_limit),
            b.budget_duration or "-",
            when(b.created_at, fmt="%Y-%m-%d"),
        ]
        for b in budgets
    ]
    return table(headers, rows, right=(1, 2, 3, 4, 5))


# ---------------------------------------------------------------- usage


@dataclass
class Day:
    cost: float = 0.0
    tokens: int = 0
    requests: int = 0

    @property
    def used(self) -> bool:
        return bool(self.requests or self.tokens or self.cost)


def days_of(reply: keys_pb2.GetUsageResponse) -> dict[str, Day]:
    """One entry per day from start_date to end_date, days without rows included."""
    dates = sorted({row.date for row in reply.rows})
    first = reply.start_date or (dates[0] if dates else "")
    last = reply.end_date or (dates[-1] if dates else "")
    days: dict[str, Day] = {}
    if first and last:
        day, end = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
        while day <= end:
            days[day.isoformat()] = Day()
            day += dt.timedelta(days=1)
    for row in reply.rows:
        entry = days.setdefault(row.date, Day())
        entry.cost += row.cost
        entry.tokens += row.prompt_tokens + row.completion_tokens
        entry.requests += row.requests
    return dict(sorted(days.items()))


def bar(value: float, largest: float) -> str:
    if value <= 0 or largest <= 0:
        return ""
    return BAR * max(1, round(value / largest * BAR_WIDTH))


def chart(days: dict[str, Day], all_days: bool = False) -> str:
    """One bar per day; days without usage only with `all_days` (a 30-day range is mostly
    empty, and the day that matters would scroll away)."""
    shown = days if all_days else {date: day for date, day in days.items() if day.used}
    if not shown:
        return "per day: no usage"
    by_cost = any(d.cost > 0 for d in shown.values())
    measure: Callable[[Day], float] = (lambda d: d.cost) if by_cost else (lambda d: d.tokens)
    largest = max((measure(d) for d in shown.values()), default=0)
    lines = [f"per day (bar: {'cost' if by_cost else 'tokens'})"]
    for date, day in shown.items():
        numbers = (
            f"{usd(day.cost)}  {day.requests:,} req  {day.tokens:,} tok" if day.requests else ""
        )
        lines.append(f"{date}  {bar(measure(day), largest).ljust(BAR_WIDTH)}  {numbers}".rstrip())
    return "\n".join(lines)


def model_table(rows: Iterable[keys_pb2.UsageRow]) -> str:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
    for row in rows:
        entry = totals[row.model]
        entry[0] += row.requests
        entry[1] += row.prompt_tokens
        entry[2] += row.completion_tokens
        entry[3] += row.cost
    ordered = sorted(totals.items(), key=lambda item: (-item[1][3], item[0]))
    body = [
        [model, f"{int(r):,}", f"{int(p):,}", f"{int(c):,}", usd(cost)]
        for model, (r, p, c, cost) in ordered
    ]
    headers = ["model", "requests", "prompt", "completion", "cost"]
    return table(headers, body, right=(1, 2, 3, 4)) if body else "no usage by model"


def usage_report(subject: str, reply: keys_pb2.GetUsageResponse, all_days: bool = False) -> str:
    t = reply.totals
    return "\n\n".join(
        [
            f"usage of {subject}, {reply.start_date} .. {reply.end_date}"
            f" ({len(reply.key_ids)} key{'' if len(reply.key_ids) == 1 else 's'})",
            f"requests {t.requests:,}   prompt tokens {t.prompt_tokens:,}   completion tokens"
            f" {t.completion_tokens:,}   total tokens {t.total_tokens:,}   cost {usd(t.cost)}",
            chart(days_of(reply), all_days),
            model_table(reply.rows),
        ]
    )


USAGE_CSV_COLUMNS = ("date", "model", "requests", "prompt_tokens", "completion_tokens", "cost")


def csv_cost(usd_value: float) -> str:
    """USD to 9 places (nano-dollars, the store's unit), trailing zeros dropped."""
    return f"{usd_value:.9f}".rstrip("0").rstrip(".") or "0"


def usage_csv_rows(rows: Iterable[keys_pb2.UsageRow]) -> list[list[str]]:
    return [
        [
            r.date,
            r.model,
            str(r.requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            csv_cost(r.cost),
        ]
        for r in rows
    ]
