"""docs/*.md hold README sections (scripts/sync_docs.py writes them): they must not drift from it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sync_docs", ROOT / "scripts" / "sync_docs.py")
sync_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_docs)


@pytest.mark.parametrize("name", sorted(sync_docs.DOCS))
def test_doc_is_its_readme_section(name):
    text = (ROOT / "docs" / name).read_text(encoding="utf-8")
    assert text == sync_docs.expected()[name], f"docs/{name} drifted from README.md: run python scripts/sync_docs.py"


def test_links_are_rebased_onto_docs():
    assert sync_docs.rebase("[a](BENCHMARKS.md#x) ![p](docs/d.png) [b](#local) [c](https://x.y/z)") == \
        "[a](../BENCHMARKS.md#x) ![p](d.png) [b](#local) [c](https://x.y/z)"
