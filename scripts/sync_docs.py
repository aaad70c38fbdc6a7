"""docs/*.md are README sections, copied so that each can be read (and linked) alone; README.md is
the one copy that is edited. This writes them, with relative links rebased onto docs/;
tests/test_docs.py fails when one has drifted.

    python scripts/sync_docs.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# docs file -> the README heading (level 2) whose section it holds
DOCS = {"large_models.md": "## Large models", "inference.md": "## Use the finetune", "evaluation.md": "## Evaluation"}


def section(readme: str, heading: str) -> str:
    start = readme.index(f"\n{heading}") + 1
    end = readme.find("\n## ", start + len(heading))
    return readme[start:end + 1] if end >= 0 else readme[start:]


def rebase(text: str) -> str:
    """Relative links of README (repository root) as seen from docs/."""
    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z]+:|#", target):
            return m.group(0)
        target = target[len("docs/"):] if target.startswith("docs/") else "../" + target
        return f"{m.group(1)}({target})"
    return re.sub(r"(\]\s*)\(([^)\s]+)\)", fix, text)


def expected() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return {name: rebase(section(readme, heading)).rstrip("\n") + "\n" for name, heading in DOCS.items()}


if __name__ == "__main__":
    for name, text in expected().items():
        (ROOT / "docs" / name).write_text(text, encoding="utf-8")
        print(f"docs/{name}: {len(text.splitlines())} lines")
