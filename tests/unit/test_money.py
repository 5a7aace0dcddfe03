from __future__ import annotations

from decimal import Decimal

import pytest

from keys.money import nanos_to_usd, usd_to_nanos

pytestmark = pytest.mark.unit


def test_float_amounts_are_read_through_their_shortest_repr() -> None:
    assert usd_to_nanos(0.1) == 100_000_000
    assert usd_to_nanos(1.0) == 1_000_000_000


def test_many_small_charges_sum_exactly() -> None:
    total = sum(usd_to_nanos(0.000123) for _ in range(10_000))
    assert total == usd_to_nanos(Decimal("1.23"))
    assert nanos_to_usd(total) == 1.23


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "NaN"])
def test_non_finite_amounts_are_refused(bad: float | str) -> None:
    with pytest.raises(ValueError):
        usd_to_nanos(bad)
