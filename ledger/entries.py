"""Stream entries as values: a charge, a key event, or a reject (an entry the sink cannot
read, kept rather than dropped). docs/design.md section 12 pins the fields; the Lua scripts
write them, so nothing here trusts them further than it checks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from keys import keygen
from keys.keyspace import decode_models
from keys.money import NANOS_PER_USD

KEY_EVENTS: Final = frozenset({"created", "updated", "revoked", "rotated", "deleted"})
CHARGE: Final = "charge"
# A charge's cost fits NUMERIC(20,9) (11 digits of dollars); token counts BIGINT.
_MAX_NANOS: Final = 10**19
_MAX_COUNT: Final = 2**63 - 1
# The last millisecond of year 9999: Python's datetime (and so a TIMESTAMPTZ here) ends there.
_MAX_MS: Final = 253_402_300_799_999
# Column widths (migrations/0001_initial.sql). The server accepts no longer values; an
# entry that has one is kept in ledger_rejects, never left to fail its batch for good.
_WIDTHS: Final = {
    "request_id": 256,
    "model": 256,
    "provider": 128,
    "name": 256,
    "user_id": 128,
    "team_id": 128,
    "hash": 64,
}


@dataclass(frozen=True, slots=True)
class EntryRef:
    """Where an entry sits in Redis: what XACK and XDEL take."""

    stream: str
    entry_id: str


@dataclass(frozen=True, slots=True)
class Charge:
    ref: EntryRef
    key_id: str
    ts_ms: int
    request_id: str
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_nanos: int


@dataclass(frozen=True, slots=True)
class KeyEvent:
    ref: EntryRef
    key_id: str
    ts_ms: int
    type: str
    version: int
    record: dict[str, str]


@dataclass(frozen=True, slots=True)
class Reject:
    ref: EntryRef
    fields: dict[str, str]
    reason: str


@dataclass(frozen=True, slots=True)
class Gone:
    """A pending entry whose content was already deleted (XDEL ran, XACK did not)."""

    ref: EntryRef


Entry = Charge | KeyEvent | Reject | Gone


class Malformed(ValueError):
    pass


def parse(ref: EntryRef, fields: Mapping[str, str] | None) -> Entry:
    if not fields:
        return Gone(ref)
    try:
        return _parse(ref, fields)
    except (ValueError, ArithmeticError) as exc:  # Malformed, or a value no column takes
        return Reject(ref, {text(k): text(v) for k, v in fields.items()}, text(str(exc)))


def _parse(ref: EntryRef, f: Mapping[str, str]) -> Charge | KeyEvent:
    kind = f.get("type", "")
    key_id = f.get("key_id", "")
    if not keygen.is_key_id(key_id):
        raise Malformed("key_id is not a key id")
    ts_ms = count(f, "ts", high=_MAX_MS)
    if kind == CHARGE:
        return Charge(
            ref,
            key_id,
            ts_ms,
            request_id=_text(f, "request_id", required=True),
            model=_text(f, "model"),
            provider=_text(f, "provider"),
            prompt_tokens=count(f, "prompt_tokens"),
            completion_tokens=count(f, "completion_tokens"),
            total_tokens=count(f, "total_tokens"),
            cost_nanos=count(f, "cost", high=_MAX_NANOS),
        )
    if kind in KEY_EVENTS:
        try:
            record = json.loads(f.get("record", ""))
        except ValueError:
            raise Malformed("record is not JSON") from None
        if not isinstance(record, dict):
            raise Malformed("record is not a JSON object")
        event = KeyEvent(
            ref,
            key_id,
            ts_ms,
            kind,
            count(f, "version"),
            {text(k): text(str(v)) for k, v in record.items()},
        )
        key_row(event.key_id, event.record, event.version, event.ts_ms, deleted=False)  # checks
        return event
    raise Malformed(f"unknown type {kind[:32]!r}")


def _text(f: Mapping[str, str], name: str, *, required: bool = False) -> str:
    value = text(f.get(name, ""))
    if required and not value:
        raise Malformed(f"{name} is missing")
    if len(value) > _WIDTHS[name]:
        raise Malformed(f"{name} is longer than {_WIDTHS[name]} characters")
    return value


def text(value: str) -> str:
    """`value` as PostgreSQL can store it: text and JSONB take every character but NUL
    (U+0000), which a model name read from a request body or a metadata value may hold;
    it becomes U+FFFD (the same for every copy of an entry, so replays still match)."""
    return value.replace("\x00", "\ufffd")


def _clean_json(value: Any) -> Any:
    """A decoded JSON value with text() applied to every string, keys included."""
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {text(str(k)): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def count(f: Mapping[str, Any], name: str, *, high: int = _MAX_COUNT, default: str = "") -> int:
    """A non-negative integer field; a Lua script may have written it as a JSON number
    (`1.8e+12`), which is fine while it is whole."""
    raw = str(f.get(name, default)).strip()
    if raw.isascii() and raw.isdigit():
        if len(raw.lstrip("0")) > len(str(high)):
            raise Malformed(f"{name} is out of range")
        value = int(raw)
    else:
        try:
            number = Decimal(raw)
        except ArithmeticError:
            raise Malformed(f"{name} is not a whole number") from None
        if not number.is_finite() or number != number.to_integral_value():
            raise Malformed(f"{name} is not a whole number")
        # before int(): `1e999999999` is a whole number whose digits would take hours
        if number.adjusted() > len(str(high)):
            raise Malformed(f"{name} is out of range")
        value = int(number)
    if not 0 <= value <= high:
        raise Malformed(f"{name} is out of range")
    return value


def instant(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def usd(nanos: int) -> Decimal:
    """Exact: NUMERIC(20,9) holds every nano-dollar."""
    return Decimal(nanos).scaleb(-9)


def nanos(usd_amount: Decimal) -> int:
    value = usd_amount * NANOS_PER_USD
    if value != value.to_integral_value():
        raise ValueError(f"{usd_amount} is not a whole number of nano-USD")
    return int(value)


def key_row(
    key_id: str, record: Mapping[str, str], version: int, ts_ms: int, *, deleted: bool
) -> dict[str, Any]:
    """virtual_keys' columns from a key record (as keys/keyspace.py names its fields).
    `spent` and `total_requests` are not here: the ledger sums its own charges."""
    try:
        metadata = json.loads(record.get("metadata") or "{}")
    except ValueError:
        raise Malformed("record.metadata is not JSON") from None
    if not isinstance(metadata, dict):
        raise Malformed("record.metadata is not a JSON object")
    for name in ("name", "user_id", "team_id", "hash"):
        if len(record.get(name) or "") > _WIDTHS[name]:
            raise Malformed(f"record.{name} is longer than {_WIDTHS[name]} characters")
    created = count(record, "created_at", high=_MAX_MS, default="0") or ts_ms
    expires = count(record, "expires_at", high=_MAX_MS, default="0")
    last_used = count(record, "last_used", high=_MAX_MS, default="0")
    status = (
        "deleted" if deleted else ("revoked" if record.get("status") == "revoked" else "active")
    )
    return {
        "id": key_id,
        "key_hash": text(record.get("hash") or "") or None,
        "name": text(record.get("name", "")),
        "user_id": text(record.get("user_id", "")),
        "team_id": text(record.get("team_id") or "") or None,
        "created_at": instant(created),
        "expires_at": instant(expires) if expires else None,
        "is_active": status == "active",
        "allowed_models": json.dumps([text(m) for m in decode_models(record.get("models", "*"))]),
        "max_budget": usd(count(record, "max_budget", high=_MAX_NANOS, default="0")),
        "tpm_limit": count(record, "tpm_limit", high=2**31 - 1, default="0"),
        "rpm_limit": count(record, "rpm_limit", high=2**31 - 1, default="0"),
        "metadata": json.dumps(_clean_json(metadata)),
        "last_used": instant(last_used) if last_used else None,
        "status": status,
        "deleted_at": instant(ts_ms) if deleted else None,
        "version": version,
    }
