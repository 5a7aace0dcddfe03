"""SetBudget requests -> BudgetSpec, and LevelBudget -> keys.v1.Budget: the strict REST body,
the checks on scope and id, and what the wire shows."""

from __future__ import annotations

from typing import Any

import pytest

from extauthz.budgets import budget_message, config_from_json, spec_from
from keys.budget import NO_PERIOD, parse_duration
from keys.budgets import LevelBudget, checked_scope
from keys.errors import InvalidArgument
from keys.v1 import keys_pb2

pytestmark = pytest.mark.unit

USD = 1_000_000_000


def level(**changes: Any) -> LevelBudget:
    fields: dict[str, Any] = {
        "scope": "team",
        "id": "t1",
        "max_budget_nanos": 5 * USD,
        "budget": parse_duration("1d"),
        "rpm_limit": 100,
        "tpm_limit": 0,
        "max_parallel": 3,
        "spent_nanos": 2 * USD,
        "reserved_nanos": USD // 2,
        "in_flight": 1,
        "budget_reset_at_ms": 1_800_086_400_000,
        "created_at_ms": 1_800_000_000_000,
        **changes,
    }
    return LevelBudget(**fields)


def test_remaining_is_the_budget_less_spent_and_reserved() -> None:
    assert level().budget_remaining_nanos == 5 * USD - 2 * USD - USD // 2


def test_remaining_never_reads_below_zero() -> None:
    assert level(spent_nanos=6 * USD).budget_remaining_nanos == 0


def test_message_shows_usd_and_timestamps() -> None:
    message = budget_message(level())
    assert (message.max_budget, message.spent, message.reserved) == (5, 2, 0.5)
    assert message.budget_remaining == 2.5 and message.in_flight == 1
    assert message.budget_reset_at.ToMilliseconds() == 1_800_086_400_000
    assert message.created_at.ToMilliseconds() == 1_800_000_000_000


def test_message_without_a_budget_leaves_remaining_and_reset_unset() -> None:
    message = budget_message(level(max_budget_nanos=0, budget=NO_PERIOD, budget_reset_at_ms=0))
    assert not message.HasField("budget_remaining")
    assert not message.HasField("budget_reset_at")


def test_scope_error_names_the_allowed_scopes() -> None:
    with pytest.raises(InvalidArgument, match='scope must be "user" or "team"'):
        checked_scope("org")


def test_scope_error_echoes_at_most_32_characters() -> None:
    with pytest.raises(InvalidArgument) as err:
        checked_scope("x" * 1000)
    assert "x" * 33 not in str(err.value)


def test_typed_fields_become_the_spec() -> None:
    spec = spec_from(
        keys_pb2.SetBudgetRequest(
            scope="user", id=" u1 ", max_budget=1.5, budget_duration="1mo", rpm_limit=9
        )
    )
    assert (spec.scope, spec.id, spec.max_budget_nanos) == ("user", "u1", 1_500_000_000)
    assert (spec.budget.duration, spec.rpm_limit, spec.tpm_limit) == ("1mo", 9, 0)


def test_json_fields_left_out_are_zero() -> None:
    assert config_from_json({"rpm_limit": 5}) == {
        "max_budget": 0.0,
        "budget_duration": "",
        "rpm_limit": 5,
        "tpm_limit": 0,
        "max_parallel_requests": 0,
    }


def test_json_unknown_fields_are_named_and_bounded() -> None:
    body = {f"f{n:02}": 1 for n in range(12)}
    with pytest.raises(InvalidArgument) as err:
        config_from_json(body)
    assert '"f00"' in str(err.value) and "and 2 more" in str(err.value)
    assert '"f11"' not in str(err.value)


def test_json_field_sent_under_both_names_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="rpm_limit is sent twice"):
        config_from_json({"rpm_limit": 1, "rpmLimit": 2})


def test_json_scope_in_the_body_cannot_be_set() -> None:
    with pytest.raises(InvalidArgument, match="cannot be set: scope"):
        config_from_json({"scope": "team"})


def test_json_fractional_limit_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="tpm_limit must be a whole number"):
        config_from_json({"tpm_limit": 1.5})


def test_json_boolean_is_not_a_number() -> None:
    with pytest.raises(InvalidArgument, match="max_budget must be a number"):
        config_from_json({"max_budget": True})


def test_json_null_duration_is_not_a_string() -> None:
    with pytest.raises(InvalidArgument, match="budget_duration must be a string"):
        config_from_json({"budget_duration": None})
