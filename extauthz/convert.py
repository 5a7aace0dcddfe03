"""Domain values -> keys.v1 protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from keys.model import UsageSummary, VirtualKey, WindowCount
from keys.money import nanos_to_usd
from keys.v1 import keys_pb2


def _timestamp(ms: int) -> Timestamp | None:
    if not ms:
        return None
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def key_data(key: VirtualKey, now_ms: int) -> keys_pb2.KeyData:
    remaining = key.budget_remaining_nanos
    return keys_pb2.KeyData(
        id=key.id,
        name=key.name,
        user_id=key.user_id,
        team_id=key.team_id,
        created_at=_timestamp(key.created_at_ms),
        expires_at=_timestamp(key.expires_at_ms),
        status=key.status(now_ms).value,
        allowed_models=list(key.allowed_models),
        max_budget=nanos_to_usd(key.max_budget_nanos),
        spent=nanos_to_usd(key.spent_nanos),
        budget_remaining=None if remaining is None else nanos_to_usd(remaining),
        tpm_limit=key.tpm_limit,
        rpm_limit=key.rpm_limit,
        metadata=dict(key.metadata),
        last_used=_timestamp(key.last_used_ms),
        total_requests=key.total_requests,
        budget_duration=key.budget_duration,
        budget_reset_at=_timestamp(key.budget_reset_at_ms),
    )


def window_usage(window: WindowCount) -> keys_pb2.WindowUsage:
    return keys_pb2.WindowUsage(
        limit=window.limit,
        current=window.used,
        remaining=window.remaining,
        reset_ms=window.reset_ms,
    )


def usage(summary: UsageSummary) -> keys_pb2.GetUsageResponse:
    rows = [
        keys_pb2.UsageRow(
            date=row.date,
            model=row.model,
            requests=row.requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost=nanos_to_usd(row.cost_nanos),
        )
        for row in summary.rows
    ]
    prompt = sum(r.prompt_tokens for r in summary.rows)
    completion = sum(r.completion_tokens for r in summary.rows)
    totals = keys_pb2.UsageTotals(
        requests=sum(r.requests for r in summary.rows),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost=nanos_to_usd(sum(r.cost_nanos for r in summary.rows)),
    )
    return keys_pb2.GetUsageResponse(
        rows=rows,
        totals=totals,
        start_date=summary.start_date,
        end_date=summary.end_date,
        key_ids=list(summary.key_ids),
    )
