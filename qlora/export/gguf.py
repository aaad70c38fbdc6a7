"""GGUF (llama.cpp's format) of the merged model, f16 or q8_0, written one tensor at a time.

Names and metadata follow llama.cpp's convert_hf_to_gguf.py: tensor names from gguf-py's map,
hyperparameters under `<arch>.*`, the vocabulary as tokenizer.ggml.* (byte-level BPE, "gpt2"), and
llama's q/k projections permuted from Hugging Face's rotate-half order to GGUF's interleaved one.
1-D tensors (norms) stay f32; in q8_0 a matrix whose rows are not a multiple of 32 falls back to f16.

The header needs every tensor's type and size first, so shapes come from the meta skeleton, then
the merged tensors are produced and written in the same order (peak memory: one tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import QloraError
from .files import staged_file
from .merged import checkpoint_entries, merged_tensors, skeleton

FORMATS = ("f16", "q8_0")
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> GGUF arch
_PERMUTE_QK = {"llama"}  # archs whose GGUF rope is interleaved (llama.cpp permutes q/k rows)
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER, _TOKEN_UNUSED = 1, 3, 4, 5


def gguf_arch(config) -> str:
    """The GGUF architecture name of a transformers config; QloraError where GGUF export has none."""
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise QloraError(f"GGUF export supports {', '.join(sorted(ARCHS))} models, not {config.model_type}; "
                         "export a merged transformers directory instead (qlora merge)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise QloraError(f"GGUF export does not write rope scaling ({rope.get('rope_type')}); "
                         "export with qlora merge instead")
    return arch


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _plan(skel: nn.Module, arch: str, fmt: str):
    """[(checkpoint entry, gguf name, ggml type, shape)] in writing order."""
    import gguf

    names = tensor_names(arch, skel.config)
    shapes = dict(skel.state_dict().items())
    plan = []
    for entry in checkpoint_entries(skel):
        key = entry[0]
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise QloraError(f"GGUF export: no GGUF name for tensor '{key}' of this {arch} model")
        shape = tuple(shapes[key].shape)
        if len(shape) == 1:
            kind = gguf.GGMLQuantizationType.F32
        elif fmt == "q8_0" and shape[-1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
        else:
            kind = gguf.GGMLQuantizationType.F16
        plan.append((entry, name, kind, shape))
    return plan


def _encode(t: torch.Tensor, kind) -> np.ndarray:
    import gguf

    a = t.detach().float().cpu().numpy()
    if kind == gguf.GGMLQuantizationType.F32:
        return a
    if kind == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, kind)


def gguf_rows(t: torch.Tensor, gname: str, arch: str, config) -> torch.Tensor:
    """A tensor's output rows in GGUF's order: llama's q/k rows go from Hugging Face's rotate-half
    order to GGUF's interleaved pairs, per head (llama.cpp's permute()); every other tensor as is."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": _kv_heads(config)}
    part = gname.split(".")[-2] if gname.startswith("blk.") else ""
    if arch not in _PERMUTE_QK or part not in heads:
        return t
    n = heads[part]
    return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def tensor_names(arch: str, config):
    """gguf-py's map from transformers tensor names to GGUF ones for this architecture."""
    import gguf

    return gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch),
                                    config.num_hidden_layers)


def write_gguf(net: nn.Module, tokenizer, out: str, fmt: str = "f16", overwrite: bool = False,
               source_gguf: str | None = None, name: str | None = None) -> Path:
    """Write the merged model (adapters folded in, fp32 merge) as one GGUF file."""
    import gguf
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise QloraError(f"GGUF format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    config = net.config
    arch = gguf_arch(config)
    skel = skeleton(config)
    plan = _plan(skel, arch, fmt)
    with staged_file(out, overwrite) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _write_hparams(writer, config, fmt, name or Path(out).stem)
        _write_vocab(writer, tokenizer, config, source_gguf)
        for _, gname, kind, shape in plan:
            nbytes = (int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, kind)))
                      if kind == gguf.GGMLQuantizationType.Q8_0
                      else int(np.prod(shape)) * (4 if kind == gguf.GGMLQuantizationType.F32 else 2))
            writer.add_tensor_info(gname, shape, np.float32, nbytes, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        entries = [p[0] for p in plan]
        for (key, t), (_, gname, kind, _) in tqdm(zip(merged_tensors(net, torch.float32, skel, entries), plan),
                                                  total=len(plan), desc=f"gguf {fmt}", unit="tensor", disable=None):
            writer.write_tensor_data(_encode(gguf_rows(t, gname, arch, config), kind))
        writer.close()
    return Path(out)


def _write_hparams(writer, config, fmt: str, name: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if fmt == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_vocab(writer, tokenizer, config, source_gguf: str | None) -> None:
    """tokenizer.ggml.*: tokens by id (padded to the embedding rows), their types, the merges."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = data.get("model") or {}, json.dumps(data.get("decoder"))
    if model.get("type") != "BPE" or "ByteLevel" not in decoder:
        raise QloraError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only; this one is "
                         f"{model.get('type')}; export with qlora merge instead")
    by_id = {i: t for t, i in model["vocab"].items()}
    types = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER
    n = max(config.vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(source_gguf, config))
    writer.add_token_list(tokens)
    writer.add_token_types([types.get(i, _TOKEN_NORMAL if i in by_id else _TOKEN_UNUSED) for i in range(n)])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    else:  # a pure byte vocabulary: transformers' reader derives (no) merges from scores
        writer.add_token_scores([0.0] * n)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(source_gguf: str | None, config) -> str:
    """llama.cpp's pre-tokenizer name: the source GGUF's, else a guess from the architecture."""
    if source_gguf:
        from gguf import GGUFReader

        field = GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return bytes(field.parts[field.data[0]]).decode("utf-8")
    return {"qwen2": "qwen2"}.get(config.model_type, "default")
