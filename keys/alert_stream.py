"""Budget alerts' Redis side (docs/design.md section 13): which stream an alert event goes
to, the thresholds as the scripts take them, and an event as read back from its stream.

A script may only touch keys of one Redis Cluster slot, so a level's events go to the
stream of the level's own slot: `alerts:{<tag>}`, `<tag>` the first decimal string that
hashes there (keys/ledger_stream.py's table). The key's record is `vk:{<id>}` and a user's
or team's budget `vb:{<scope>:<id>}`, so one report on a cluster can append to three
streams, each in its level's script. A single Redis has no slots: `alerts:{all}`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from keys.keyspace import level_key, record_key
from keys.ledger_stream import hash_slot, slot_tags
from keys.money import nanos_to_usd

SINGLE_STREAM: Final = "alerts:{all}"
STREAM_MATCH: Final = "alerts:{*}"
GROUP: Final = "alerts"
BASIS_POINTS: Final = 10_000  # a threshold of 1.0 (all of max_budget)
MAX_THRESHOLD_BP: Final = 100_000  # 10x max_budget; keys/lua/_lib.lua's m_share is exact to it


def stream_of(record: str, *, cluster: bool) -> str:
    """The alert stream in the slot of `record` (a key's or a budget's record)."""
    if not cluster:
        return SINGLE_STREAM
    return f"alerts:{{{slot_tags()[hash_slot(record)]}}}"


def key_stream(key_id: str, *, cluster: bool) -> str:
    return stream_of(record_key(key_id), cluster=cluster)


def level_stream(scope: str, scope_id: str, *, cluster: bool) -> str:
    return stream_of(level_key(scope, scope_id), cluster=cluster)


def thresholds_arg(thresholds_bp: Sequence[int]) -> str:
    """What the scripts take: basis points, ascending, comma-joined ('' = no alerts)."""
    return ",".join(str(bp) for bp in sorted(set(thresholds_bp)))


def threshold_number(bp: int) -> float:
    """5000 -> 0.5, 10000 -> 1.0: the JSON number a payload carries."""
    return float(Decimal(bp) / BASIS_POINTS)


def rfc3339_ms(ms: int) -> str:
    """UTC, `Z`, milliseconds only when there are some (as protobuf's JSON writes times)."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    if ms % 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One entry of an alert stream: a level's spend reached a threshold in a period."""

    scope: str  # key, user or team
    id: str  # the key id, user id or team id
    threshold_bp: int
    spent_nanos: int  # the level's spend in the period, after the charge that crossed
    max_budget_nanos: int
    period_start_ms: int
    ts_ms: int  # when the crossing charge was made (the charging server's clock)

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> AlertEvent:
        """Raises KeyError or ValueError for an entry that is not an alert event."""
        return cls(
            scope=fields["scope"],
            id=fields["id"],
            threshold_bp=int(fields["threshold"]),
            spent_nanos=int(fields["spent"]),
            max_budget_nanos=int(fields["max_budget"]),
            period_start_ms=int(fields["period_start"]),
            ts_ms=int(fields.get("ts") or 0),
        )

    @property
    def event_id(self) -> str:
        """Hex SHA-256 of what makes a crossing unique: the level, the period, its
        max_budget and the threshold. Every retry, on every server, sends the same one."""
        text = (
            f"{self.scope}:{self.id}:{self.period_start_ms}:{self.max_budget_nanos}:"
            f"{self.threshold_bp}"
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON object (docs/interface.md), amounts in USD."""
        return {
            "event": "budget_threshold",
            "scope": self.scope,
            "id": self.id,
            "threshold": threshold_number(self.threshold_bp),
            "spent": nanos_to_usd(self.spent_nanos),
            "max_budget": nanos_to_usd(self.max_budget_nanos),
            "period_start": rfc3339_ms(self.period_start_ms),
            "event_id": self.event_id,
        }
