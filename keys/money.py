"""USD kept exactly as integer nano-dollars (1e-9 USD), so sums never drift.

A double on the wire becomes an exact count here; one nano-dollar is far below any
per-token price, and int64 nano-dollars reach $9.2 billion.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal

NANOS_PER_USD = 1_000_000_000
MAX_USD = Decimal(1_000_000_000)  # largest budget or single charge we accept


def usd_to_nanos(usd: float | Decimal | str) -> int:
    """Exact for decimals; a float is read through its shortest repr (0.1 -> 100000000)."""
    if isinstance(usd, float):
        if not math.isfinite(usd):
            raise ValueError("amount must be a finite number")
        usd = repr(usd)
    value = Decimal(usd)
    if not value.is_finite():
        raise ValueError("amount must be a finite number")
    return int((value * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def nanos_to_usd(nanos: int) -> float:
    """For the wire only: the nearest double to the exact amount."""
    return float(Decimal(nanos) / NANOS_PER_USD)
