"""What the estimator needs to know about a model: its shape, read from an HF config.json dict,
a GGUF file's metadata, a model directory, or one of the LLaMA-1 sizes of the paper.

No weights are read and transformers is not imported: a config dict is plain JSON.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import QloraError

# LLaMA-1 (Touvron et al. 2023, table 2), the models of the QLoRA paper; 70B is Llama-2-70B (GQA).
_LLAMA_SIZES = {
    "7B": (4096, 32, 11008, 32, 32),
    "13B": (5120, 40, 13824, 40, 40),
    "33B": (6656, 60, 17920, 52, 52),
    "65B": (8192, 80, 22016, 64, 64),
    "70B": (8192, 80, 28672, 64, 8),
}
SIZES = tuple(_LLAMA_SIZES)
# model types whose tied-embedding default is True when config.json omits the key
_TIED_BY_DEFAULT = ("gemma", "gemma2", "gemma3", "gemma3_text", "gpt2")


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of a decoder block: y = x W^T (+ b), W of shape (out, in)."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    attention: bool  # an attention projection (lora_targets="attention" keeps only these)
    group: str  # linears that read the same input tensor share a group (q/k/v; gate/up)


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer, normalised from any of the supported config styles."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gpt2_style: bool = False  # fused qkv, LayerNorm, learned positions, GELU MLP, dropout
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False  # per-head RMSNorm on q and k (gemma3, qwen3)
    gemma_norm: bool = False  # RMSNorm scales by (1 + w) in fp32, a fresh tensor per call
    positions: int = 0  # rows of a learned position table (gpt2)
    dropout: float = 0.0  # gpt2's attention/residual dropout in training
    softcap: bool = False  # final_logit_softcapping: the loss keeps tanh's output per chunk

    def linears(self) -> tuple[LinearSpec, ...]:
        """The linear layers of one block, as the model builds them."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.gpt2_style:
            return (
                LinearSpec("c_attn", h, 3 * h, True, True, "attn_in"),
                LinearSpec("attn.c_proj", h, h, True, True, "attn_out"),
                LinearSpec("c_fc", h, i, True, False, "mlp_in"),
                LinearSpec("mlp.c_proj", i, h, True, False, "mlp_out"),
            )
        return (
            LinearSpec("q_proj", h, q, self.qkv_bias, True, "attn_in"),
            LinearSpec("k_proj", h, kv, self.qkv_bias, True, "attn_in"),
            LinearSpec("v_proj", h, kv, self.qkv_bias, True, "attn_in"),
            LinearSpec("o_proj", q, h, self.o_bias, True, "attn_out"),
            LinearSpec("gate_proj", h, i, self.mlp_bias, False, "mlp_in"),
            LinearSpec("up_proj", h, i, self.mlp_bias, False, "mlp_in"),
            LinearSpec("down_proj", i, h, self.mlp_bias, False, "mlp_out"),
        )

    def linear_params(self) -> int:
        return self.layers * sum(s.in_features * s.out_features for s in self.linears())

    def other_params(self) -> int:
        """Embeddings, head (if untied), norms, biases, position table: never quantized."""
        norms = self.layers * self.norms_per_layer * self.hidden + self.hidden
        if self.qk_norm:
            norms += self.layers * 2 * self.head_dim
        if self.gpt2_style:
            norms *= 2  # LayerNorm: weight and bias
        biases = self.layers * sum(s.out_features for s in self.linears() if s.bias)
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + norms + biases + self.positions * self.hidden

    def n_params(self) -> int:
        return self.linear_params() + self.other_params()


def _get(cfg: dict, source: str, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is None:
        raise QloraError(f"{source}: model config lacks '{keys[0]}'; is this a decoder-only LM config.json?")
    return default


def arch_from_config(cfg: dict, source: str = "model config") -> Arch:
    """Normalise an HF config.json dict (llama/mistral/qwen2/qwen3/gemma3/gpt2 keys)."""
    if not isinstance(cfg, dict):
        raise QloraError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers (gemma3, llava)
        cfg = {"model_type": cfg.get("model_type"), **cfg["text_config"]}
    mtype = str(cfg.get("model_type") or "llama")
    g = functools.partial(_get, cfg, source)
    if mtype == "gpt2" or "n_embd" in cfg:
        h, heads = int(g("n_embd", "hidden_size")), int(g("n_head", "num_attention_heads"))
        return Arch(
            "gpt2", h, int(g("n_layer", "num_hidden_layers")), int(g("n_inner", default=4 * h)), heads, heads,
            h // heads, int(g("vocab_size")), bool(cfg.get("tie_word_embeddings", True)), gpt2_style=True,
            qkv_bias=True, o_bias=True, mlp_bias=True, positions=int(g("n_positions", default=1024)),
            dropout=float(cfg.get("attn_pdrop", 0.0) or 0.0),
        )
    h, heads = int(g("hidden_size")), int(g("num_attention_heads"))
    gemma = mtype.startswith("gemma")
    return Arch(
        mtype, h, int(g("num_hidden_layers")), int(g("intermediate_size")), heads,
        int(g("num_key_value_heads", default=heads)), int(g("head_dim", default=h // heads)), int(g("vocab_size")),
        bool(cfg.get("tie_word_embeddings", mtype in _TIED_BY_DEFAULT)),
        qkv_bias=bool(cfg.get("attention_bias", mtype == "qwen2")), o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), norms_per_layer=4 if gemma else 2,
        qk_norm=mtype in ("gemma3", "gemma3_text", "qwen3"), gemma_norm=gemma,
        softcap=bool(cfg.get("final_logit_softcapping")),
    )


def config_for_size(size: str) -> dict:
    """The config.json of LLaMA-1 7B/13B/33B/65B (the paper's models), or Llama-2-70B."""
    key = str(size).strip().upper()
    if key not in _LLAMA_SIZES:
        raise QloraError(f"model size {size!r} is not one of {', '.join(SIZES)}")
    hidden, layers, inter, heads, kv = _LLAMA_SIZES[key]
    return {
        "model_type": "llama", "_name": f"LLaMA-{key}", "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": 32000,
        "max_position_embeddings": 4096 if key == "70B" else 2048, "rms_norm_eps": 1e-5 if key == "70B" else 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False,
    }


def load_model_config(model: str | None) -> dict:
    """A config dict for `model`: None (the embedded SmolLM2), a size (7B..70B), a model directory,
    a config.json, a GGUF file, or a hub name ("org/name")."""
    if model is None:
        from ..hf import default_model_path

        return read_gguf_config(default_model_path())
    if re.fullmatch(r"\d+(\.\d+)?[bB]", model.strip()):
        return config_for_size(model)
    p = Path(model).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return _read_json(p / "config.json")
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return read_gguf_config(str(ggufs[0]))
        raise QloraError(f"{model}: no config.json (or single .gguf file) in this directory")
    if p.is_file():
        return read_gguf_config(str(p)) if p.suffix == ".gguf" else _read_json(p)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _hub_config(model)
    raise QloraError(f"{model}: not a model directory, config.json, GGUF file or size ({', '.join(SIZES)})")


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QloraError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise QloraError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return {"_name": path.parent.name if path.name == "config.json" else path.stem, **cfg}


def _hub_config(name: str) -> dict:
    """config.json of a hub model: from the local cache, else downloaded (a few KB; the trainer
    would download the whole model next anyway)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    if not isinstance(found, str):
        try:
            found = hf_hub_download(name, "config.json")
        except Exception as e:  # offline, gated, no such repo: one line
            raise QloraError(f"{name}: config.json is neither in the local Hugging Face cache nor downloadable "
                             f"({type(e).__name__}); pass the model directory or its config.json") from None
    return {**_read_json(Path(found)), "_name": name}


# GGUF metadata key (after "<arch>.") -> HF config key
_GGUF_KEYS = {
    "embedding_length": "hidden_size", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "attention.key_length": "head_dim",
    "context_length": "max_position_embeddings", "vocab_size": "vocab_size",
}
_GGUF_TYPES = {"gemma3": "gemma3_text"}


def read_gguf_config(path: str) -> dict:
    """An HF-style config dict from a GGUF file's metadata (weights are not read)."""
    st = os.stat(path)
    return dict(_read_gguf_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _read_gguf_cached(path: str, mtime_ns: int, size: int) -> dict:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as e:
        raise QloraError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields = reader.fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if not arch:
        raise QloraError(f"{path}: GGUF metadata lacks general.architecture")
    cfg = {"model_type": _GGUF_TYPES.get(arch, arch), "_name": Path(path).name, "_format": "gguf"}
    for key, hf_key in _GGUF_KEYS.items():
        if f"{arch}.{key}" in fields:
            cfg[hf_key] = int(fields[f"{arch}.{key}"].contents())
    if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in fields:
        cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)  # one entry per token
    cfg["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    if arch == "gpt2":  # HF's GPT-2 names
        cfg.update(n_embd=cfg.pop("hidden_size"), n_layer=cfg.pop("num_hidden_layers"),
                   n_inner=cfg.pop("intermediate_size"), n_head=cfg.pop("num_attention_heads"),
                   n_positions=cfg.pop("max_position_embeddings", 1024))
        cfg.pop("num_key_value_heads", None)
    return cfg
