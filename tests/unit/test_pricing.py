from __future__ import annotations

from pathlib import Path

import pytest

from keys.errors import InvalidArgument
from keys.pricing import PriceTable

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
