"""Price table: USD per 1M input / output tokens per model, and cost from token counts.

A model is found by exact name, else by the longest table name that prefixes it at a
`-` boundary (`gpt-4o-2024-08-06` -> `gpt-4o`), else by a `default` entry. With none,
pricing fails: usage is never silently priced at $0.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path

import yaml

from keys.errors import InvalidArgument

DEFAULT_ENTRY = "default"
_NANOS_PER_USD_PER_MTOK = Decimal(1000)  # USD per 1M tokens -> nano-USD per token


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: Decimal
    output_per_mtok: Decimal


# Public list prices, USD per 1M tokens (input, output). Override with EXTAUTHZ_PRICES.
BUILTIN_PRICES: Mapping[str, tuple[str, str]] = {
    "gpt-4": ("30", "60"),
    "gpt-4-32k": ("60", "120"),
    "gpt-4-turbo": ("10", "30"),
    "gpt-4o": ("2.5", "10"),
    "gpt-4o-mini": ("0.15", "0.6"),
    "gpt-4.1": ("2", "8"),
    "gpt-4.1-mini": ("0.4", "1.6"),
    "gpt-4.1-nano": ("0.1", "0.4"),
    "gpt-3.5-turbo": ("0.5", "1.5"),
    "o1": ("15", "60"),
    "o1-mini": ("1.1", "4.4"),
    "o3": ("2", "8"),
    "o3-mini": ("1.1", "4.4"),
    "o4-mini": ("1.1", "4.4"),
    "text-embedding-3-small": ("0.02", "0"),
    "text-embedding-3-large": ("0.13", "0"),
    "claude-3-opus": ("15", "75"),
    "claude-3-5-sonnet": ("3", "15"),
    "claude-3-7-sonnet": ("3", "15"),
    "claude-sonnet-4": ("3", "15"),
    "claude-opus-4": ("15", "75"),
    "claude-3-haiku": ("0.25", "1.25"),
    "claude-3-5-haiku": ("0.8", "4"),
}


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self._prices = dict(prices)
        # longest first, so the most specific prefix wins
        self._by_length = sorted(self._prices, key=len, reverse=True)

    @classmethod
    def builtin(cls) -> PriceTable:
        return cls({m: Price(Decimal(i), Decimal(o)) for m, (i, o) in BUILTIN_PRICES.items()})

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """A YAML or JSON mapping: `model: {input: <USD/1M>, output: <USD/1M>}`."""
        text = Path(path).read_text()
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"price table {path}: expected a non-empty mapping of models")
        prices: dict[str, Price] = {}
        for model, entry in raw.items():
            if not isinstance(entry, dict) or {"input", "output"} - entry.keys():
                raise ValueError(f"price table {path}: {model!r} needs input and output")
            price = Price(_decimal(entry["input"]), _decimal(entry["output"]))
            if price.input_per_mtok < 0 or price.output_per_mtok < 0:
                raise ValueError(f"price table {path}: {model!r} has a negative price")
            prices[str(model)] = price
        return cls(prices)

    def lookup(self, model: str) -> Price | None:
        entry = self.entry(model)
        return None if entry is None else self._prices[entry]

    def entry(self, model: str) -> str | None:
        """The table entry that prices `model` (its own name, a prefix, or `default`)."""
        if model in self._prices:
            return model
        for name in self._by_length:
            if name != DEFAULT_ENTRY and model.startswith(name + "-"):
                return name
        return DEFAULT_ENTRY if DEFAULT_ENTRY in self._prices else None

    def label(self, model: str) -> str:
        """A metric label for `model`: the table entry that prices it, so clients choosing
        model strings cannot create label values (`gpt-4-x` counts as `gpt-4`); `other`
        for what only the `default` entry or nothing prices."""
        entry = self.entry(model)
        return "other" if entry is None or entry == DEFAULT_ENTRY else entry

    def cost_nanos(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        price = self.lookup(model)
        if price is None:
            raise InvalidArgument(
                f"no price for model {model!r}: send cost, or add it (or a 'default' entry) "
                "to the price table"
            )
        nanos = (
            prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok
        ) * _NANOS_PER_USD_PER_MTOK
        return int(nanos.to_integral_value(rounding=ROUND_HALF_EVEN))


def _decimal(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"price {value!r} is not a number")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"price {value!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"price {value!r} is not a finite number")
    return number
