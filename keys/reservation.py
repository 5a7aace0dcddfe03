"""What a Check reserves: an upper bound of a request's cost, from its body alone.

    reserve = prompt_bound * input price + output_bound * output price

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
read is priced at the table's highest prices, and only when the table has a `default`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

from keys.model import BodyModel, RequestedModel
from keys.pricing import DEFAULT_ENTRY, Price, PriceTable

_NANOS_PER_TOKEN_PER_USD_PER_MTOK = Decimal(1000)
MAX_RESERVATION_NANOS = 10**18  # $1e9: no budget is larger


@dataclass(frozen=True, slots=True)
class Estimate:
    """A request's cost bound, and enough of it to say what a budget still covers."""

    amount_nanos: int
    priced: bool  # False: the model has no price (model_not_priced where a budget applies)
    prompt_nanos: int = 0
    output_nanos_per_token: Decimal = Decimal(0)  # times the choices
    choices: int = 1

    def max_tokens_within(self, free_nanos: int) -> int:
        """The largest max_tokens whose reservation fits in `free_nanos` (0: none)."""
        room = free_nanos - self.prompt_nanos
        if room <= 0:
            return 0
        if self.output_nanos_per_token == 0:
            return 0
        return int(Decimal(room) / self.output_nanos_per_token)


FREE = Estimate(0, priced=True)


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
    per_output = price.output_per_mtok * _NANOS_PER_TOKEN_PER_USD_PER_MTOK * choices
    prompt = Decimal(model.body_bytes) * price.input_per_mtok * _NANOS_PER_TOKEN_PER_USD_PER_MTOK
    total = prompt + per_output * output
    amount = int(total.to_integral_value(rounding=ROUND_CEILING))
    return Estimate(
        min(amount, MAX_RESERVATION_NANOS),
        priced=True,
        prompt_nanos=int(prompt.to_integral_value(rounding=ROUND_CEILING)),
        output_nanos_per_token=per_output,
        choices=choices,
    )


def _unreadable(prices: PriceTable) -> Price | None:
    """A body whose model cannot be read is priced only where the table has a `default`
    entry, and then at the table's highest prices: it may name any model."""
    return prices.ceiling() if prices.lookup(DEFAULT_ENTRY) is not None else None
