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
    assert table.label("gpt-4-attacker-chosen-123") == "gpt-4"
    assert table.label("llama-local") == "other"
    path = tmp_path / "prices.yaml"
    path.write_text("default: {input: 1, output: 1}\n")
    assert PriceTable.load(path).label("anything") == "other"
