"""The one table: a row per measure, ours next to its baseline, PASS/GAP on the targets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    row: str
    measure: str
    ours: str
    baseline: str
    ratio: str = ""
    target: str = ""
    result: str = ""  # PASS, GAP, or a plain check such as "exact"
    data: dict[str, Any] = field(default_factory=dict)


def ratio(ours: float, baseline: float) -> str:
    return f"{ours / baseline:.2f}x" if baseline else "n/a"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "GAP"


HEADER = ("#", "measure", "ours", "baseline", "ratio", "target", "result")


def render(rows: list[Row]) -> str:
    cells = [
        HEADER,
        *((r.row, r.measure, r.ours, r.baseline, r.ratio, r.target, r.result) for r in rows),
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |"
        for line in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
