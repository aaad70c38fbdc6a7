"""Results out: markdown tables for people, JSON files for programs."""

from __future__ import annotations

import json
import os
from pathlib import Path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats get 4 significant decimals unless already strings."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def write_json(path: str, payload: dict) -> None:
    """Write atomically (a half-written result file is worse than none)."""
    p = Path(path)
    if p.parent != Path(""):
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, p)
