"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors with keys
base_model.model.<module>.lora_A.weight / lora_B.weight (DoRA: and .lora_magnitude_vector,
"use_dora": true), so PEFT loads ours and we load PEFT's.

The 4-bit format of the base the adapter was trained on travels in the safetensors header
("qlora_quant", with "lora_init" when LoftQ / PiSSA derived the base), which keeps
adapter_config.json pure PEFT; `recorded_quant` and `recorded_lora_init` read it back so that
inference quantizes the base as training did.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import QloraError
from .nn import LoRALinear, lora_init
from .nn.surgery import ATTENTION_NAMES, lora_layers, lora_settings, quant_of
from .quant.spec import QuantSpec

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def adapter_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key names: base_model.model.<module>.lora_A.weight / lora_B.weight (DoRA: and
    .lora_magnitude_vector, the key PEFT saves it under)."""
    sd = {}
    for name, layer in lora_layers(net).items():
        sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
        if layer.dora:
            sd[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude.detach().contiguous()
    return sd


def adapter_config(net: nn.Module, base_model: str | None = None, dropout: float | None = None) -> dict:
    """PEFT's adapter_config.json for the model's LoRA layers. `dropout`: the one the adapter was
    trained with, where the live layers do not carry it (loaded for inference, dropout 0)."""
    lora = lora_settings(net)
    targets = sorted({n.rsplit(".", 1)[-1] for n in lora_layers(net)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"] if dropout is None else dropout,
        "use_rslora": lora["rslora"], "target_modules": targets, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_dora": lora["dora"], "modules_to_save": None,
    }


def save_adapter(net: nn.Module, out_dir: str, base_model: str | None = None, dropout: float | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's layout), A and B in the dtype
    they train in (bf16 with lora_dtype=bfloat16: the file is half the size, and PEFT and
    load_adapter widen it on load). Written straight from the weights, no copy (peak memory is
    the training step's). Not atomic by itself: callers write into a fresh directory and rename
    (see checkpoint.py)."""
    from .safetensors_writer import write_streaming

    os.makedirs(out_dir, exist_ok=True)
    quant = quant_of(net).as_dict()
    init = lora_init.of(net)
    if init:  # LoftQ / PiSSA: load_model re-derives the base it trained on from the original weights
        quant["lora_init"] = init
    meta = {"format": "pt", "qlora_quant": json.dumps(quant)}
    sd = adapter_state_dict(net)
    write_streaming(os.path.join(out_dir, WEIGHTS_FILE), [(k, t.dtype, tuple(t.shape)) for k, t in sd.items()],
                    sd.items(), metadata=meta)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(adapter_config(net, base_model, dropout), f, indent=2)


def read_adapter(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors by key), each problem a QloraError naming the file."""
    from safetensors.torch import load_file

    cfg_path, w_path = Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise QloraError(f"{p}: missing (an adapter dir holds {CONFIG_FILE} + {WEIGHTS_FILE})")
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


_SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "lora_magnitude"}


def _by_module(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {"lora_A" | "lora_B" | "lora_magnitude": tensor}} from PEFT keys (with or
    without the ".default" name)."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        k = k.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
        for suffix, part in _SUFFIXES.items():
            if k.endswith(suffix):
                by_module.setdefault(k[: -len(suffix)], {})[part] = t
                break
        else:
            raise QloraError(f"{path}: unexpected tensor '{key}' (only LoRA A/B weights and DoRA magnitudes "
                             "are supported)")
    return by_module


def load_adapter(net: nn.Module, path: str) -> list[str]:
    """Apply a PEFT LoRA adapter (ours or PEFT's) on top of the current model, live."""
    cfg, tensors = read_adapter(path)
    r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora", False))
    dora = bool(cfg.get("use_dora", False))
    wanted = {"lora_A", "lora_B", "lora_magnitude"} if dora else {"lora_A", "lora_B"}
    names = []
    for name, ab in sorted(_by_module(path, tensors).items()):
        try:
            base = net.get_submodule(name)
        except AttributeError:
            raise QloraError(f"{path}: adapter targets '{name}', which this model does not have "
                             "(adapter for another model?)") from None
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
                raise QloraError(f"{path}: '{name}.{part}.weight' has shape {tuple(t.shape)}, "
                                 f"model expects {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(t)
        layer.requires_grad_(False)
        net.set_submodule(name, layer)
        names.append(name)
    if not names:
        raise QloraError(f"{path}: adapter contains no LoRA weights")
    return names


def load_weights(net: nn.Module, path) -> None:
    """Copy a saved adapter's A and B into the model's LoRA layers (resume: same model, same keys)."""
    _, tensors = read_adapter(str(path))
    expected = adapter_state_dict(net)
    if set(tensors) != set(expected):
        raise QloraError(f"{path}: adapter keys do not match this model (checkpoint from another model?)")
    with torch.no_grad():
        for key, t in expected.items():
            if tensors[key].shape != t.shape:
                raise QloraError(f"{path}: '{key}' has shape {tuple(tensors[key].shape)}, "
                                 f"model expects {tuple(t.shape)}")
            t.copy_(tensors[key])


def _recorded(adapters) -> dict:
    """The "qlora_quant" record of the (first) adapter's safetensors header ({} when absent)."""
    from safetensors import safe_open

    for path in list(adapters)[:1]:
        try:
            with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as f:
                recorded = json.loads((f.metadata() or {}).get("qlora_quant") or "null")
        except Exception:  # missing or unreadable: load_adapter reports it properly
            return {}
        return recorded if isinstance(recorded, dict) else {}
    return {}


def recorded_quant(adapters) -> QuantSpec:
    """The 4-bit format qlora recorded in the (first) adapter's safetensors header when it was
    trained (QLoRA's defaults for adapters from elsewhere)."""
    return QuantSpec.from_dict(_recorded(adapters))


def recorded_lora_init(adapters) -> dict | None:
    """The LoftQ / PiSSA init (nn.lora_init.spec) the (first) adapter's base was derived with, or None."""
    init = _recorded(adapters).get("lora_init")
    return init if isinstance(init, dict) else None


def reference_settings(path: str, quant: QuantSpec, current: dict | None = None) -> dict:
    """The TrainConfig LoRA settings (lora_r, lora_alpha, rslora, dora, lora_targets) of the adapter at
    `path`, for a DPO run that starts from it (start_from); each that differs from `current` (the run's
    settings) is printed, as it replaces the user's. QloraError when it was trained on another
    4-bit format than `quant`, or on a LoftQ / PiSSA-derived base, which this run would not rebuild."""
    cfg, _ = read_adapter(path)
    if recorded_lora_init([path]):
        raise QloraError(f"{path}: adapter trained on a LoftQ / PiSSA-derived base; as a DPO reference it needs "
                         "the plain quantized base (merge it first: qlora export)")
    recorded = recorded_quant([path])
    if recorded != quant:
        raise QloraError(f"{path}: adapter trained on a {recorded.name} base, this run quantizes {quant.name}; "
                         "pass the adapter's quant_type / blocksize / double_quant")
    targets = cfg.get("target_modules")
    attention = isinstance(targets, list) and bool(targets) and set(targets) <= set(ATTENTION_NAMES)
    taken = dict(lora_r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]), rslora=bool(cfg.get("use_rslora", False)),
                 dora=bool(cfg.get("use_dora", False)), lora_targets="attention" if attention else "all")
    changed = [f"{k} {current[k]} -> {v}" for k, v in taken.items() if current and k in current and current[k] != v]
    if changed:
        print(f"{path}: LoRA settings from the adapter: {', '.join(changed)}", file=sys.stderr)
    return taken


def start_from(net: nn.Module, path: str, dropout: float, dtype: torch.dtype) -> None:
    """LoRA on `net` as the adapter at `path` left it, trainable: its layers, r, alpha and weights (A, B in
    `dtype`; DoRA's magnitude fp32), with `dropout`; everything else frozen, as add_lora leaves it."""
    for p in net.parameters():
        p.requires_grad_(False)
    load_adapter(net, path)
    for layer in lora_layers(net).values():
        layer.dropout = dropout
        layer.lora_A.to(dtype)
        layer.lora_B.to(dtype)
        for p in (layer.lora_A.weight, layer.lora_B.weight) + ((layer.lora_magnitude,) if layer.dora else ()):
            p.requires_grad_(True)
