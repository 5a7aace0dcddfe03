"""What a Check reserves: an upper bound of a request's cost, from its body alone.

    reserve = prompt_bound * input price + output_bound * output price

where the input price is the higher of the model's input and cached-input prices and the
output price the higher of its output and reasoning prices (Price.max_input_per_mtok,
Price.max_output_per_mtok): the body does not say which tokens will be cached or reasoned.

- output_bound = `max_completion_tokens` / `max_tokens` / `max_output_tokens` (the
  largest the body names), else the price table's output cap for the model, else
  EXTAUTHZ_RESERVE_OUTPUT_TOKENS; times `n` (choices).
- prompt_bound = the body's size in bytes. Every text token a tokenizer produces covers
  at least one byte of the text, and the JSON around the text (quotes, keys, message
  framing) is more bytes than the few tokens of per-message overhead, so for text and
  tool definitions this bounds the prompt from above. It can be low where the body
  names content instead of carrying it: image URLs and file ids (an image is 85 to a few
  thousand tokens), audio, and cached or server-side context (a Responses API
  `previous_response_id`). docs/design.md says what that means for the overshoot bound.

A compressed body (`Content-Encoding`) cannot be bounded by its size: it is unpriceable,
so refused (`model_not_priced`) wherever a budget applies. A body whose model cannot be
read is priced at the table's highest prices and 128 completions (an `n` may hide where
it cannot be read), and only when the table has a `default`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache

from keys.model import BodyModel, RequestedModel
from keys.pricing import DEFAULT_ENTRY, Price, PriceTable

MAX_RESERVATION_NANOS = 10**18  # $1e9: no budget is larger
_PICO_PER_NANO = 1000


@dataclass(frozen=True, slots=True)
class Estimate:
    """A request's cost bound, and enough of it to say what a budget still covers."""

    amount_nanos: int
    priced: bool  # False: the model has no price (model_not_priced where a budget applies)
    prompt_nanos: int = 0
    output_pico_per_token: int = 0  # pico-USD per output token, times the completions
    choices: int = 1
    output_tokens: int = 0  # the output bound of one completion it was made with

    def max_tokens_within(self, free_nanos: int) -> int:
        """The largest max_tokens whose reservation fits in `free_nanos` (0: none)."""
        room = free_nanos - self.prompt_nanos
        if room <= 0 or self.output_pico_per_token == 0:
            return 0
        return room * _PICO_PER_NANO // self.output_pico_per_token


FREE = Estimate(0, priced=True)


@lru_cache(maxsize=1024)
def _pico_per_token(price: Price) -> tuple[int, int]:
    """(input, output) bounds in pico-USD per token, rounded up: integer arithmetic on the
    hot path, and never below the price (USD per 1M tokens x 1e6 = pico-USD per token)."""
    scale = Decimal(1_000_000)
    return (
        int((price.max_input_per_mtok * scale).to_integral_value(rounding=ROUND_CEILING)),
        int((price.max_output_per_mtok * scale).to_integral_value(rounding=ROUND_CEILING)),
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def estimate(prices: PriceTable, model: RequestedModel, default_output_tokens: int) -> Estimate:
    if model.kind is BodyModel.NO_BODY:
        return FREE
    if model.encoded:
        return Estimate(0, priced=False)  # a compressed body's size bounds nothing
    price = prices.lookup(model.name) if model.kind is BodyModel.NAMED else _unreadable(prices)
    if price is None:
        return Estimate(0, priced=False)
    output = model.output_cap
    if output is None:
        output = price.max_output_tokens
    if output is None:
        output = default_output_tokens
    choices = max(model.choices, 1)
    input_pico, output_pico = _pico_per_token(price)
    per_output = output_pico * choices
    prompt_pico = model.body_bytes * input_pico
    amount = _ceil_div(prompt_pico + per_output * output, _PICO_PER_NANO)
    return Estimate(
        min(amount, MAX_RESERVATION_NANOS),
        priced=True,
        prompt_nanos=_ceil_div(prompt_pico, _PICO_PER_NANO),
        output_pico_per_token=per_output,
        choices=choices,
        output_tokens=output,
    )


def _unreadable(prices: PriceTable) -> Price | None:
    """A body whose model cannot be read is priced only where the table has a `default`
    entry, and then at the table's highest prices: it may name any model."""
    return prices.ceiling() if prices.lookup(DEFAULT_ENTRY) is not None else None
