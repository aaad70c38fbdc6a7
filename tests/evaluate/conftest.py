"""Fixtures for the evaluation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def byte_tokenizer():
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random llama directory whose context (2048) fits the judging prompt in bytes."""
    import json

    from tiny import save_tiny

    path = save_tiny(str(tmp_path_factory.mktemp("tiny") / "llama"), "llama")
    cfg_path = f"{path}/config.json"
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 2048  # rotary positions: any length works, the limit is a number
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path
