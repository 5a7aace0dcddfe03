from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import pytest

from keys.errors import InvalidArgument
from keys.pricing import Price, PriceTable

pytestmark = pytest.mark.unit


def test_cost_uses_input_and_output_prices_per_million_tokens() -> None:
    # gpt-4: $30 / $60 per 1M tokens
    assert PriceTable.builtin().cost_nanos("gpt-4", 1000, 500) == 60_000_000


def test_dated_model_names_use_their_base_price() -> None:
    table = PriceTable.builtin()
    assert table.cost_nanos("gpt-4o-2024-08-06", 1_000_000, 0) == table.cost_nanos(
        "gpt-4o", 1_000_000, 0
    )
    assert table.cost_nanos("gpt-4o-mini-2024-07-18", 1_000_000, 0) == 150_000_000


def test_unknown_model_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match="no price for model 'llama-local'"):
        PriceTable.builtin().cost_nanos("llama-local", 10, 10)


def test_default_entry_prices_unknown_models(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("default: {input: 1, output: 2}\nmine: {input: 0.5, output: 0.25}\n")
    table = PriceTable.load(path)
    assert table.cost_nanos("anything", 1_000_000, 1_000_000) == 3_000_000_000
    assert table.cost_nanos("mine", 2_000_000, 0) == 1_000_000_000


def test_json_price_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"m": {"input": "0.1", "output": 0.2}}')
    assert PriceTable.load(path).cost_nanos("m", 10_000_000, 0) == 1_000_000_000


@pytest.mark.parametrize(
    "text", ["[]", "m: {input: 1}", "m: {input: -1, output: 1}", "m: {input: x, output: 1}"]
)
def test_bad_price_files_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(ValueError):
        PriceTable.load(path)


def test_metric_label_is_the_pricing_entry_never_the_client_string(tmp_path: Path) -> None:
    table = PriceTable.builtin()
    assert table.label("gpt-4") == "gpt-4"
    assert table.label("gpt-4-0613") == "gpt-4"
    assert table.label("gpt-4-attacker-chosen-123") == "other"
    assert table.label("llama-local") == "other"
    path = tmp_path / "prices.yaml"
    path.write_text("default: {input: 1, output: 1}\n")
    assert PriceTable.load(path).label("anything") == "other"


def test_a_longer_name_is_not_priced_as_its_prefix() -> None:
    table = PriceTable.builtin()
    assert table.cost_nanos("o1-pro", 1_000_000, 1_000_000) == 750_000_000_000
    with pytest.raises(InvalidArgument, match="no price for model 'gpt-4o-ultra'"):
        table.cost_nanos("gpt-4o-ultra", 10, 10)


@pytest.mark.parametrize(
    ("snapshot", "entry"),
    [
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("o1-pro-2025-03-19", "o1-pro"),
        ("o1-preview-2024-09-12", "o1"),  # a snapshot of an alias
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # an exact entry wins over the rule
    ],
)
def test_dated_snapshots_price_as_their_entry(snapshot: str, entry: str) -> None:
    assert PriceTable.builtin().entry(snapshot) == entry


@pytest.mark.parametrize(
    "model", ["gpt-4-1399", "gpt-4o-2024-13-01", "gpt-4o-20240806", "gpt-4-0613-x", "gpt-4-"]
)
def test_a_suffix_that_is_not_a_date_is_unpriced(model: str) -> None:
    assert PriceTable.builtin().entry(model) is None


def test_builtin_aliases_price_as_their_entry() -> None:
    table = PriceTable.builtin()
    assert table.entry("claude-3-5-sonnet-20241022") == "claude-3-5-sonnet"
    assert table.entry("gpt-4-turbo-preview") == "gpt-4-turbo"
    assert table.label("claude-sonnet-4-0") == "claude-sonnet-4"


def test_aliases_in_a_price_file_price_as_their_entry(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("mine: {input: 1, output: 2, aliases: [mine-latest, also-mine]}\n")
    table = PriceTable.load(path)
    assert table.cost_nanos("also-mine", 1_000_000, 0) == 1_000_000_000
    assert table.entry("mine-latest-2025-01-31") == "mine"
    assert table.label("mine-latest") == "mine"


@pytest.mark.parametrize(
    "text",
    [
        "a: {input: 1, output: 1, aliases: x}",
        "a: {input: 1, output: 1, aliases: [1]}",
        "a: {input: 1, output: 1, aliases: [c]}\nb: {input: 2, output: 2, aliases: [c]}",
        "a: {input: 1, output: 1, aliases: [b]}\nb: {input: 2, output: 2}",
    ],
)
def test_bad_aliases_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(ValueError):
        PriceTable.load(path)


def test_unpriced_model_is_named_bounded_and_escaped() -> None:
    with pytest.raises(InvalidArgument) as err:
        PriceTable.builtin().cost_nanos("x\n" + "y" * 500, 1, 1)
    message = str(err.value)
    assert "'x\\nyyy" in message and "\n" not in message
    assert len(message) < 200


def test_a_snapshot_with_a_price_of_its_own_is_still_its_base_models_family() -> None:
    """A per-model limit on gpt-4o covers gpt-4o-2024-05-13, priced apart."""
    prices = PriceTable.builtin()
    assert prices.entry("gpt-4o-2024-05-13") == "gpt-4o-2024-05-13"
    assert prices.family("gpt-4o-2024-05-13") == "gpt-4o"
    assert prices.family("gpt-4-turbo-preview") == "gpt-4-turbo"
    assert prices.family("o1-pro") == "o1-pro"


# ---------------------------------------------------------------- cached and reasoning tokens

SPLIT = PriceTable(
    {
        # USD per 1M: input 2, cached 0.5, output 8, reasoning 20
        "split": Price(Decimal(2), Decimal(8), None, Decimal("0.5"), Decimal(20)),
        "plain": Price(Decimal(2), Decimal(8)),
    }
)


def test_cached_prompt_tokens_cost_the_cached_price() -> None:
    # 600k uncached at $2 + 400k cached at $0.5 = $1.4
    assert SPLIT.cost_nanos("split", 1_000_000, 0, cached_tokens=400_000) == 1_400_000_000


def test_reasoning_tokens_cost_the_reasoning_price() -> None:
    # 750k visible output at $8 + 250k reasoning at $20 = $11
    assert SPLIT.cost_nanos("split", 0, 1_000_000, reasoning_tokens=250_000) == 11_000_000_000


def test_cached_and_reasoning_tokens_price_together() -> None:
    cost = SPLIT.cost_nanos("split", 1000, 500, cached_tokens=200, reasoning_tokens=100)
    # 800 * 2 + 200 * 0.5 + 400 * 8 + 100 * 20 = 6900 USD per 1M tokens -> 6900 * 1000 nano-USD
    assert cost == 6_900_000


def test_without_cached_or_reasoning_prices_those_tokens_cost_input_and_output() -> None:
    plain = SPLIT.cost_nanos("plain", 1000, 500)
    assert SPLIT.cost_nanos("plain", 1000, 500, cached_tokens=900, reasoning_tokens=500) == plain


@pytest.mark.parametrize(
    ("cached", "reasoning", "same_as"),
    [
        (5000, 0, (1000, 0)),  # more cached than prompt tokens: all of the prompt is cached
        (0, 9000, (0, 500)),  # more reasoning than completion tokens: all of it is reasoning
        (-7, -7, (0, 0)),  # negative counts are none
    ],
)
def test_cached_and_reasoning_counts_are_clamped_to_their_totals(
    cached: int, reasoning: int, same_as: tuple[int, int]
) -> None:
    got = SPLIT.cost_nanos("split", 1000, 500, cached_tokens=cached, reasoning_tokens=reasoning)
    want = SPLIT.cost_nanos(
        "split", 1000, 500, cached_tokens=same_as[0], reasoning_tokens=same_as[1]
    )
    assert got == want


def test_cost_with_cached_tokens_rounds_half_even_to_the_nano() -> None:
    # 1 cached token at $0.0005/1M = 0.5 nano-USD -> 0; 3 of them = 1.5 -> 2
    table = PriceTable({"m": Price(Decimal(1), Decimal(1), None, Decimal("0.0005"))})
    assert table.cost_nanos("m", 1, 0, cached_tokens=1) == 0
    assert table.cost_nanos("m", 3, 0, cached_tokens=3) == 2


def test_builtin_table_prices_cached_prompt_tokens_at_list_price() -> None:
    table = PriceTable.builtin()
    # gpt-4o: $2.5 input, $1.25 cached; a dated snapshot prices as its entry
    assert table.cost_nanos("gpt-4o-2024-08-06", 1_000_000, 0, cached_tokens=1_000_000) == (
        1_250_000_000
    )
    # Anthropic cache hits: a tenth of the input price
    assert table.cost_nanos("claude-sonnet-4-0", 1_000_000, 0, cached_tokens=1_000_000) == (
        300_000_000
    )
    # no cached price (gpt-4): cached tokens cost the input price
    assert table.cost_nanos("gpt-4", 1000, 0, cached_tokens=1000) == table.cost_nanos(
        "gpt-4", 1000, 0
    )
    # OpenAI bills reasoning tokens as output
    assert table.cost_nanos("o3", 0, 1000, reasoning_tokens=1000) == table.cost_nanos("o3", 0, 1000)


def test_a_price_file_names_cached_and_reasoning_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "m: {input: 2, output: 8, cached_input: 0.5, reasoning_output: 20}\n"
        "n: {input: 2, output: 8, cached_input: null}\n"
    )
    table = PriceTable.load(path)
    assert table.lookup("m") == Price(Decimal(2), Decimal(8), None, Decimal("0.5"), Decimal(20))
    assert table.lookup("n") == Price(Decimal(2), Decimal(8))


def test_a_json_price_file_names_cached_and_reasoning_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    entry = {"input": 2, "output": 8, "cached_input": "0.5", "reasoning_output": 20}
    path.write_text(json.dumps({"m": entry}))
    table = PriceTable.load(path)
    # 10 cached tokens at 500 nano-USD each, 10 reasoning tokens at 20,000
    assert table.cost_nanos("m", 10, 10, cached_tokens=10, reasoning_tokens=10) == 205_000


OLD_FORMAT = """\
default: {input: 1, output: 2}
gpt-4o: {input: 2.5, output: 10, max_output_tokens: 16384, aliases: [my-4o]}
"mini": {input: "0.15", output: 0.6}
"""


def test_an_old_format_price_file_loads_as_it_did(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(OLD_FORMAT)
    table = PriceTable.load(path)
    assert table.lookup("my-4o") == Price(Decimal("2.5"), Decimal(10), 16384, None, None)
    assert table.lookup("mini") == Price(Decimal("0.15"), Decimal("0.6"))
    assert table.lookup("anything") == Price(Decimal(1), Decimal(2))
    # no cached price in the file: cached tokens cost input, even where the built-in table
    # prices them lower
    assert table.cost_nanos("gpt-4o", 1000, 10, cached_tokens=1000) == 2_600_000
    assert table.cost_nanos("gpt-4o", 1000, 10) == 2_600_000


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{input: 1, output: 1, cached_input: -0.1}", "'bad' cached_input: price -0.1 is negative"),
        ("{input: 1, output: 1, reasoning_output: x}", "'bad' reasoning_output: price 'x' is not"),
        ("{input: 1, output: 1, cached_input: [1]}", "'bad' cached_input"),
        ("{input: 1, output: 1, reasoning_output: .nan}", "'bad' reasoning_output"),
        ("{input: 1, output: 1, cached_input: true}", "'bad' cached_input"),
        ("{input: abc, output: 1}", "'bad' input: price 'abc' is not a number"),
    ],
)
def test_a_bad_cached_or_reasoning_price_is_refused_naming_the_model(
    tmp_path: Path, entry: str, message: str
) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(f"good: {{input: 1, output: 1}}\nbad: {entry}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        PriceTable.load(path)


def test_the_ceiling_counts_cached_and_reasoning_prices() -> None:
    """A body whose model cannot be read may name a model whose reasoning costs most."""
    ceiling = SPLIT.ceiling()
    assert (ceiling.input_per_mtok, ceiling.output_per_mtok) == (Decimal(2), Decimal(20))
