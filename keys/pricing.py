"""Price table: USD per 1M input / output tokens per model, and cost from token counts.

A price may also name what a prompt token served from the provider's prompt cache costs
(`cached_input`) and what a reasoning token costs (`reasoning_output`); without them, those
tokens cost the input and the output price.

A model is priced by its exact entry, an alias that entry lists, or a dated snapshot of
either (`gpt-4o-2024-08-06`, `gpt-4-0613`); else by a `default` entry. Nothing else: a
prefix is not a snapshot (`o1-pro` is not `o1`). With no entry, pricing fails: usage is
never silently priced at $0, nor at a cheaper model's price.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path

import yaml

from keys.errors import InvalidArgument

DEFAULT_ENTRY = "default"
_NANOS_PER_USD_PER_MTOK = Decimal(1000)  # USD per 1M tokens -> nano-USD per token
# A snapshot suffix: `-YYYY-MM-DD` (OpenAI since 2024) or `-MMDD` (`gpt-4-0613`).
_MONTH = r"(?:0[1-9]|1[0-2])"
_DAY = r"(?:0[1-9]|[12]\d|3[01])"
_SNAPSHOT = re.compile(rf"(?P<base>.+)-(?:20\d\d-{_MONTH}-{_DAY}|{_MONTH}{_DAY})")
_SHOWN_MODEL_CHARS = 64


@dataclass(frozen=True, slots=True)
class Price:
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    # The most output tokens the model returns for one request (its context's output
    # cap): what a Check reserves for a request that names no max_tokens. None: unknown.
    max_output_tokens: int | None = None
    # USD per 1M prompt tokens served from the provider's prompt cache. None: the input price.
    cached_input_per_mtok: Decimal | None = None
    # USD per 1M reasoning tokens. None: the output price (OpenAI bills them as output).
    reasoning_output_per_mtok: Decimal | None = None

    @property
    def max_input_per_mtok(self) -> Decimal:
        """The most one prompt token may cost, cached or not: what a reservation uses."""
        cached = self.cached_input_per_mtok
        return self.input_per_mtok if cached is None else max(self.input_per_mtok, cached)

    @property
    def max_output_per_mtok(self) -> Decimal:
        """The most one completion token may cost, reasoning or not."""
        reasoning = self.reasoning_output_per_mtok
        return self.output_per_mtok if reasoning is None else max(self.output_per_mtok, reasoning)


# Public list prices, USD per 1M tokens (input, output). Override with EXTAUTHZ_PRICES.
BUILTIN_PRICES: Mapping[str, tuple[str, str]] = {
    "gpt-4": ("30", "60"),
    "gpt-4-32k": ("60", "120"),
    "gpt-4-turbo": ("10", "30"),
    "gpt-4o": ("2.5", "10"),
    "gpt-4o-2024-05-13": ("5", "15"),  # the first gpt-4o snapshot kept its launch price
    "gpt-4o-mini": ("0.15", "0.6"),
    "gpt-4.1": ("2", "8"),
    "gpt-4.1-mini": ("0.4", "1.6"),
    "gpt-4.1-nano": ("0.1", "0.4"),
    "gpt-3.5-turbo": ("0.5", "1.5"),
    "gpt-3.5-turbo-1106": ("1", "2"),
    "o1": ("15", "60"),
    "o1-pro": ("150", "600"),
    "o1-mini": ("1.1", "4.4"),
    "o3": ("2", "8"),
    "o3-pro": ("20", "80"),
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

# Output caps (tokens), the providers' documented maximum per response.
BUILTIN_OUTPUT_CAPS: Mapping[str, int] = {
    "gpt-4": 8192,
    "gpt-4-32k": 8192,
    "gpt-4-turbo": 4096,
    "gpt-4o": 16384,
    "gpt-4o-2024-05-13": 4096,
    "gpt-4o-mini": 16384,
    "gpt-4.1": 32768,
    "gpt-4.1-mini": 32768,
    "gpt-4.1-nano": 32768,
    "gpt-3.5-turbo": 4096,
    "gpt-3.5-turbo-1106": 4096,
    "o1": 100_000,
    "o1-pro": 100_000,
    "o1-mini": 65_536,
    "o3": 100_000,
    "o3-pro": 100_000,
    "o3-mini": 100_000,
    "o4-mini": 100_000,
    "text-embedding-3-small": 0,
    "text-embedding-3-large": 0,
    "claude-3-opus": 4096,
    "claude-3-5-sonnet": 8192,
    "claude-3-7-sonnet": 64_000,
    "claude-sonnet-4": 64_000,
    "claude-opus-4": 32_000,
    "claude-3-haiku": 4096,
    "claude-3-5-haiku": 8192,
}

# Cached prompt tokens (USD per 1M), the providers' public list prices: OpenAI's "cached
# input" column (models without one bill cached tokens at the input price), Anthropic's
# "cache hits" (a tenth of the input price; $0.03 for Claude 3 Haiku). Anthropic's cache
# writes cost more than input; an OpenAI-compatible usage object does not report them apart.
BUILTIN_CACHED_INPUT: Mapping[str, str] = {
    "gpt-4o": "1.25",
    "gpt-4o-mini": "0.075",
    "gpt-4.1": "0.5",
    "gpt-4.1-mini": "0.1",
    "gpt-4.1-nano": "0.025",
    "o1": "7.5",
    "o1-mini": "0.55",
    "o3": "0.5",
    "o3-mini": "0.55",
    "o4-mini": "0.275",
    "claude-3-opus": "1.5",
    "claude-3-5-sonnet": "0.3",
    "claude-3-7-sonnet": "0.3",
    "claude-sonnet-4": "0.3",
    "claude-opus-4": "1.5",
    "claude-3-haiku": "0.03",
    "claude-3-5-haiku": "0.08",
}

# Other names the providers serve the same model (at the same price) under.
BUILTIN_ALIASES: Mapping[str, Sequence[str]] = {
    "gpt-4-turbo": ("gpt-4-turbo-preview", "gpt-4-1106-preview", "gpt-4-0125-preview"),
    "o1": ("o1-preview",),
    "claude-3-opus": ("claude-3-opus-20240229", "claude-3-opus-latest"),
    "claude-3-5-sonnet": (
        "claude-3-5-sonnet-20240620",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-sonnet-latest",
    ),
    "claude-3-7-sonnet": ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet-latest"),
    "claude-sonnet-4": ("claude-sonnet-4-20250514", "claude-sonnet-4-0"),
    "claude-opus-4": ("claude-opus-4-20250514", "claude-opus-4-0"),
    "claude-3-haiku": ("claude-3-haiku-20240307",),
    "claude-3-5-haiku": ("claude-3-5-haiku-20241022", "claude-3-5-haiku-latest"),
}


class PriceTable:
    def __init__(
        self, prices: Mapping[str, Price], aliases: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self._prices = dict(prices)
        # every name that prices a model -> its entry (an entry names itself)
        self._names = {name: name for name in self._prices}
        for entry, names in (aliases or {}).items():
            if entry not in self._prices:
                raise ValueError(f"aliases for {_shown(entry)}, which has no price")
            for alias in names:
                if self._names.setdefault(alias, entry) != entry:
                    raise ValueError(f"{_shown(alias)} names two price entries")

    @classmethod
    def builtin(cls) -> PriceTable:
        prices = {
            m: Price(
                Decimal(i),
                Decimal(o),
                BUILTIN_OUTPUT_CAPS.get(m),
                cached_input_per_mtok=_optional(BUILTIN_CACHED_INPUT.get(m)),
            )
            for m, (i, o) in BUILTIN_PRICES.items()
        }
        return cls(prices, BUILTIN_ALIASES)

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """A YAML or JSON mapping: `model: {input: <USD/1M>, output: <USD/1M>,
        cached_input: <USD/1M>, reasoning_output: <USD/1M>, max_output_tokens: N,
        aliases: [names]}` (all but input and output optional).
        """
        text = Path(path).read_text()
        raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"price table {path}: expected a non-empty mapping of models")
        prices: dict[str, Price] = {}
        aliases: dict[str, list[str]] = {}
        for model, entry in raw.items():
            if not isinstance(entry, dict) or {"input", "output"} - entry.keys():
                raise ValueError(f"price table {path}: {model!r} needs input and output")
            cap = entry.get("max_output_tokens")
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
                raise ValueError(
                    f"price table {path}: {model!r} max_output_tokens must be a whole number"
                )
            try:
                price = Price(
                    _price(entry["input"], "input"),
                    _price(entry["output"], "output"),
                    cap,
                    cached_input_per_mtok=_optional_price(entry, "cached_input"),
                    reasoning_output_per_mtok=_optional_price(entry, "reasoning_output"),
                )
            except ValueError as exc:
                raise ValueError(f"price table {path}: {model!r} {exc}") from None
            prices[str(model)] = price
            names = entry.get("aliases", [])
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"price table {path}: {model!r} aliases must be a list of names")
            aliases[str(model)] = names
        try:
            return cls(prices, aliases)
        except ValueError as exc:
            raise ValueError(f"price table {path}: {exc}") from None

    def lookup(self, model: str) -> Price | None:
        entry = self.entry(model)
        return None if entry is None else self._prices[entry]

    def entry(self, model: str) -> str | None:
        """The table entry that prices `model`: its own, an alias's, a dated snapshot's of
        either, or `default`."""
        entry = self._names.get(model)
        if entry is None and (snapshot := _SNAPSHOT.fullmatch(model)):
            entry = self._names.get(snapshot["base"])
        if entry is not None and entry != DEFAULT_ENTRY:
            return entry
        return DEFAULT_ENTRY if DEFAULT_ENTRY in self._prices else None

    def ceiling(self) -> Price:
        """The highest input and the highest output price of the table, cached and
        reasoning prices included: what a request whose model cannot be read may cost at
        most."""
        prices = list(self._prices.values())
        return Price(
            max(p.max_input_per_mtok for p in prices), max(p.max_output_per_mtok for p in prices)
        )

    def family(self, model: str) -> str:
        """The entry a per-model limit on a key may name for `model`: a dated snapshot's
        base model's (`gpt-4o-2024-05-13` -> `gpt-4o`, even where the snapshot has a
        price of its own), else its own entry or an alias's; "" for one that only
        `default` prices, or nothing."""
        snapshot = _SNAPSHOT.fullmatch(model)
        base = self._names.get(snapshot["base"]) if snapshot else None
        entry = base or self.entry(model)
        return "" if entry is None or entry == DEFAULT_ENTRY else entry

    def label(self, model: str) -> str:
        """A metric label for `model`: the table entry that prices it, so clients choosing
        model strings cannot create label values (`gpt-4-0613` counts as `gpt-4`); `other`
        for what only the `default` entry or nothing prices."""
        entry = self.entry(model)
        return "other" if entry is None or entry == DEFAULT_ENTRY else entry

    def cost_nanos(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> int:
        """Nano-USD, rounded half-even. `cached_tokens` are of the prompt tokens and
        `reasoning_tokens` of the completion tokens: each is clamped to 0..its total, so an
        inconsistent count still prices every token once."""
        price = self.lookup(model)
        if price is None:
            raise InvalidArgument(
                f"no price for model {_shown(model)}: send cost, or add it (or a 'default' "
                "entry) to the price table"
            )
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        reasoning = min(max(reasoning_tokens, 0), max(completion_tokens, 0))
        cached_price = price.cached_input_per_mtok
        reasoning_price = price.reasoning_output_per_mtok
        usd_mtok = (prompt_tokens - cached) * price.input_per_mtok + (
            completion_tokens - reasoning
        ) * price.output_per_mtok
        if cached:
            usd_mtok += cached * (price.input_per_mtok if cached_price is None else cached_price)
        if reasoning:
            usd_mtok += reasoning * (
                price.output_per_mtok if reasoning_price is None else reasoning_price
            )
        nanos = usd_mtok * _NANOS_PER_USD_PER_MTOK
        return int(nanos.to_integral_value(rounding=ROUND_HALF_EVEN))


def _shown(model: str) -> str:
    """A client-chosen name, bounded and escaped for an error message."""
    if len(model) <= _SHOWN_MODEL_CHARS:
        return repr(model)
    return repr(model[:_SHOWN_MODEL_CHARS]) + "..."


def _optional(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _price(value: object, field: str) -> Decimal:
    try:
        number = _decimal(value)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
    if number < 0:
        raise ValueError(f"{field}: price {value!r} is negative")
    return number


def _optional_price(entry: Mapping[object, object], field: str) -> Decimal | None:
    """An optional price field: absent or null is None (the plain price applies)."""
    value = entry.get(field)
    return None if value is None else _price(value, field)


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
