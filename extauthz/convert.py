"""Domain values -> keys.v1 protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from keys.model import VirtualKey, WindowCount
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
    )


def window_usage(window: WindowCount) -> keys_pb2.WindowUsage:
    return keys_pb2.WindowUsage(
        limit=window.limit,
        current=window.used,
        remaining=window.remaining,
        reset_ms=window.reset_ms,
    )
