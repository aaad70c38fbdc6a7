"""qlora/memory/arch.py: model configs by size name, from a directory, a config.json or GGUF metadata."""

from __future__ import annotations

import pytest

from qlora.errors import QloraError
from qlora.memory import config_for_size, estimate, load_model_config
from tiny import save_tiny


def test_llama_configs():
    cfg = config_for_size("65B")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["vocab_size"]) == (8192, 80, 22016, 64, 32000)
    assert abs(estimate(config_for_size("7B")).n_params - 6.74e9) < 0.01e9  # LLaMA-7B: 6.74B
    assert config_for_size("70b")["num_key_value_heads"] == 8
    with pytest.raises(QloraError, match="7B, 13B"):
        config_for_size("8B")



def test_load_model_config_sources(tmp_path):
    d = save_tiny(str(tmp_path / "tiny"), "qwen2")
    from_dir, from_file = load_model_config(d), load_model_config(str(tmp_path / "tiny" / "config.json"))
    assert from_dir["hidden_size"] == from_file["hidden_size"] == 64
    assert load_model_config("33B")["hidden_size"] == 6656
    g = load_model_config(None)  # GGUF metadata of the embedded default
    assert (g["hidden_size"], g["num_hidden_layers"], g["num_attention_heads"], g["num_key_value_heads"],
            g["intermediate_size"], g["vocab_size"], g["tie_word_embeddings"]) == (576, 30, 9, 3, 1536, 49152, True)
    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad in (str(tmp_path / "missing"), str(tmp_path / "bad.json")):
        with pytest.raises(QloraError, match="bad.json|missing"):
            load_model_config(bad)
    with pytest.raises(QloraError, match="lacks 'hidden_size'"):
        estimate({"model_type": "llama", "num_hidden_layers": 2})
