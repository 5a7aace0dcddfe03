"""Stream entries read into charges, key events and rejects (docs/design.md section 12)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ledger.entries import Charge, EntryRef, Gone, KeyEvent, Reject, key_row, nanos, parse, usd

pytestmark = pytest.mark.unit

REF = EntryRef("ledger:{all}", "1-0")
KEY = "0123456789abcdef"
CHARGE = {
    "type": "charge",
    "key_id": KEY,
    "ts": "1800000000000",
    "request_id": "req-1",
    "model": "gpt-4o",
    "provider": "openai",
    "prompt_tokens": "10",
    "completion_tokens": "5",
    "total_tokens": "15",
    "cost": "1500000001",
}


def test_a_charge_reads_its_cost_as_nano_usd() -> None:
    entry = parse(REF, CHARGE)
    assert isinstance(entry, Charge)
    assert (entry.cost_nanos, entry.total_tokens, entry.request_id) == (1_500_000_001, 15, "req-1")
    assert usd(entry.cost_nanos) == Decimal("1.500000001")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"cost": "0.5"}, "cost is not a whole number"),
        ({"cost": "-1"}, "cost is out of range"),
        ({"request_id": ""}, "request_id is missing"),
        ({"key_id": "not-a-key"}, "key_id is not a key id"),
        ({"type": "refund"}, "unknown type 'refund'"),
        ({"prompt_tokens": "ten"}, "prompt_tokens is not a whole number"),
    ],
)
def test_an_entry_that_does_not_read_becomes_a_reject_that_says_why(
    change: dict[str, str], reason: str
) -> None:
    entry = parse(REF, {**CHARGE, **change})
    assert isinstance(entry, Reject)
    assert entry.reason == reason
    assert entry.fields["key_id"] == change.get("key_id", KEY)


def test_a_pending_entry_without_content_is_gone() -> None:
    assert parse(REF, {}) == Gone(REF)


def test_a_whole_json_number_from_lua_counts_as_an_integer() -> None:
    record = {"created_at": 1.8e12, "expires_at": "0", "max_budget": 100000000000, "hash": "ab"}
    fields = {"type": "created", "key_id": KEY, "ts": "1800000000000", "version": "1"}
    entry = parse(REF, {**fields, "record": json.dumps(record)})
    assert isinstance(entry, KeyEvent)
    row = key_row(KEY, entry.record, entry.version, entry.ts_ms, deleted=False)
    assert row["created_at"] == datetime.fromtimestamp(1_800_000_000, tz=UTC)
    assert row["expires_at"] is None
    assert row["max_budget"] == Decimal("100")


def test_a_record_becomes_the_guides_columns() -> None:
    record = {
        "hash": "ab" * 32,
        "name": "k",
        "user_id": "u1",
        "team_id": "",
        "created_at": "1800000000000",
        "expires_at": "1900000000000",
        "status": "revoked",
        "models": "\ngpt-4o\no1\n",
        "max_budget": "2500000000",
        "rpm_limit": "60",
        "tpm_limit": "1000",
        "metadata": '{"env":"prod"}',
        "last_used": "0",
    }
    row = key_row(KEY, record, 3, 1_800_000_001_000, deleted=False)
    assert row["team_id"] is None
    assert (row["status"], row["is_active"], row["version"]) == ("revoked", False, 3)
    assert json.loads(row["allowed_models"]) == ["gpt-4o", "o1"]
    assert json.loads(row["metadata"]) == {"env": "prod"}
    assert row["max_budget"] == Decimal("2.5")
    assert row["last_used"] is None
    deleted = key_row(KEY, record, 4, 1_800_000_001_000, deleted=True)
    assert (deleted["status"], deleted["deleted_at"]) == (
        "deleted",
        datetime.fromtimestamp(1_800_000_001, tz=UTC),
    )


def test_nano_usd_round_trips_through_numeric_exactly() -> None:
    for amount in (0, 1, 999_999_999, 10**19 - 1):
        assert nanos(usd(amount)) == amount
    with pytest.raises(ValueError, match="nano-USD"):
        nanos(Decimal("0.0000000001"))
