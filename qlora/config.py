"""Typed training configuration: defaults defined once, unknown keys rejected, docs become --help.

Each field's docstring (the string literal under it) is its help text; `field_docs()` reads them
from this file's source so there is exactly one copy.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from .errors import QloraError
from .precision import spelled
from .quant.spec import DEFAULT as QUANT_DEFAULT, QuantSpec

QuantType = Literal["nf4", "fp4", "fp4_e3m0", "int4", "bof4", "bof4s", "bf16"]
ChatFormat = Literal["auto", "tokenizer", "guanaco", "alpaca", "chatml"]
OptimizerName = Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"]
DataFormat = Literal["auto", "alpaca", "guanaco", "chat", "completion", "text", "dolly", "input_output", "chip2",
                     "hh_rlhf", "unnatural", "flan"]


class ConfigError(QloraError, ValueError):
    """A bad configuration value; the message names the key."""


@dataclass
class TrainConfig:
    # ---- model ----
    model: Optional[str] = None
    """Local HF directory, GGUF file, or hub name. Default: the embedded SmolLM2-135M-Instruct."""
    quant_type: QuantType = QUANT_DEFAULT.quant_type
    """4-bit data type of the frozen base (bf16 = no quantization, plain LoRA); bof4/bof4s: MSE-optimal codebooks,
    not loadable by bitsandbytes."""
    double_quant: bool = QUANT_DEFAULT.double_quant
    """Quantize the block scales to 8 bits (Double Quantization, ~0.37 bit/param saved)."""
    blocksize: int = QUANT_DEFAULT.blocksize
    """Elements per absmax block of the 4-bit weights (32..4096)."""
    compute_dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Dtype of the matmuls (frozen weights are dequantized to it): auto = bfloat16 where the hardware multiplies bf16
    natively (AVX512_BF16/AMX, ARM BF16, CUDA), else float32."""
    quantize_head: bool = False
    """Also quantize the output head (the paper keeps it in 16 bits)."""
    # ---- LoRA ----
    lora_r: int = 64
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_targets: Literal["all", "attention"] = "all"
    """Which linear layers get adapters: every linear layer (paper) or attention projections only."""
    rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r)."""
    lora_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the LoRA weights and their gradients; bfloat16 halves both (the paper's code), the optimizer state stays
    fp32."""
    lora_init: Literal["gaussian", "loftq", "pissa"] = "gaussian"
    """LoRA start: gaussian (A random, B = 0, the paper), loftq (base and A, B fitted so Q + s·BA ≈ W), pissa
    (top-r SVD of W in A, B, the residual quantized); loftq/pissa run as the model loads."""
    loftq_iters: int = 5
    """LoftQ alternations between quantizing W - s·BA and the rank-r SVD of W - Q."""
    dora: bool = False
    """DoRA: a trainable magnitude per output row times the direction of W + s·BA (PEFT's use_dora); merge and
    export fold it in."""
    # ---- data ----
    data: Optional[Union[str, list[str]]] = None
    """Training file (json/jsonl/csv/parquet), load_from_disk dir or hub name (org/name[:split]); several make a
    mixture, each optionally :WEIGHT (0.7) or :COUNT (2000). Default: the built-in demo task."""
    data_format: DataFormat = "auto"
    """Row shape (auto-detected): alpaca, dolly, input_output, completion, flan, unnatural, chat (messages),
    guanaco, chip2, hh_rlhf, text."""
    prompt_field: Optional[str] = None
    """Column holding the prompt, for any other schema (with response_field; rendered as chat)."""
    response_field: Optional[str] = None
    """Column holding the answer to learn (with prompt_field)."""
    system_field: Optional[str] = None
    """Column holding a system prompt (optional, with prompt_field and response_field)."""
    columns: Optional[str] = None
    """The three mappings as one option: prompt=COL,response=COL[,system=COL]."""
    chat_format: ChatFormat = "auto"
    """How chat rows are rendered: the tokenizer's template, or guanaco/alpaca/chatml for a base without one (auto:
    tokenizer's if any, else guanaco)."""
    packing: bool = False
    """Pack several examples per row (attention and positions restart at each example; fewer pad tokens)."""
    max_seq_len: int = 512
    """Maximum tokens per example (source + target)."""
    max_source_len: int = 384
    """Maximum prompt tokens; longer prompts are truncated from the left and counted."""
    max_target_len: int = 256
    """Maximum response tokens; longer responses are truncated from the right and counted."""
    train_on_source: bool = False
    """Also compute loss on prompt tokens (default: targets only)."""
    group_by_length: bool = True
    """Batch examples of similar token count together (less padding)."""
    val_fraction: float = 0.05
    """Fraction of rows held out for validation loss (0 disables)."""
    # ---- objective (preference tuning) ----
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    """sft: next-token loss on the answers; dpo / orpo: preference tuning on prompt/chosen/rejected pairs
    (DPO's reference is the base with LoRA off, or reference_adapter)."""
    beta: float = 0.1
    """DPO: beta, the strength of the pull towards the reference; ORPO: lambda, the weight of the odds-ratio term."""
    reference_adapter: Optional[str] = None
    """DPO only: an adapter dir (e.g. the SFT run's) that the policy starts from and whose frozen copy is the
    reference; its r, alpha, rslora, DoRA and targets replace the lora_* settings. The saved adapter is the whole
    policy."""
    # ---- optimisation ----
    max_steps: int = 200
    """Optimizer steps to run."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (loss is token-weighted across them)."""
    lr: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warmup (paper: constant)."""
    warmup_ratio: float = 0.03
    """Fraction of max_steps spent in linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 0.3
    """Gradient clipping norm (paper: 0.3)."""
    optimizer: OptimizerName = "paged_adamw"
    """adamw (fp32 states), adamw_8bit, paged_adamw (paper default), paged_adamw_8bit."""
    optimizer_memory_budget: Optional[str] = None
    """RAM budget for resident optimizer state, e.g. 512MB; paged optimizers page the rest out."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    saved_activations: Literal["auto", "compute", "bfloat16"] = "auto"
    """Dtype of the largest activations kept for backward (the fused RMSNorm inputs, the MLP's gate and up): compute =
    the compute dtype, exact; bfloat16 with float32 compute keeps them rounded to bf16 for backward only (forward stays
    fp32): ~30% less activation memory, gradients as from bf16 copies of those tensors; auto = bfloat16 when
    compute_dtype auto picked float32 (a CPU without fast bf16), else compute."""
    seed: int = 42
    """Seed for initialisation, shuffling and dropout."""
    # ---- output, logging, checkpoints ----
    output_dir: str = "runs/qlora"
    """Where the adapter, metrics.jsonl, loss plot and checkpoints go."""
    logging_steps: int = 5
    """Log every N steps."""
    eval_steps: int = 50
    """Validation loss every N steps (0 disables)."""
    save_steps: int = 100
    """Write a full resumable checkpoint every N steps (0: only at the end)."""
    save_total_limit: int = 2
    """Keep the newest K checkpoints."""
    resume: Optional[str] = None
    """Resume from a checkpoint dir, or 'latest' (the newest good one in output_dir)."""
    nan_policy: Literal["stop", "skip"] = "stop"
    """On a non-finite loss/gradient: stop the run, or skip that step."""
    force: bool = False
    """Start even if the memory preflight predicts the run will not fit."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    nproc: int = 1
    """Data-parallel processes on this machine, each holding the 4-bit model (torchrun; 1 = single process)."""
    shard_base: bool = False
    """With several processes: shard each decoder layer's frozen 4-bit weights and norms over the ranks
    (FSDP2), gathered per layer for its forward and backward; LoRA stays data-parallel."""

    @property
    def quant(self) -> QuantSpec:
        """quant_type, blocksize and double_quant as one QuantSpec."""
        return QuantSpec(self.quant_type, self.blocksize, self.double_quant)


@functools.cache
def field_docs(cls=TrainConfig) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) from the class source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = " ".join(node.value.value.split())  # wrapped in the source, one line here
    return docs


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, key: str = "size") -> int:
    """'512MB' / '1.5GiB' / '1000' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"{key}: cannot read {text!r} as a size (examples: 512MB, 2GB, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _coerce(key: str, value, tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        if isinstance(value, (list, tuple)) and list[str] in args:  # data: several sources
            items = [_coerce(f"{key}[{i}]", v, str) for i, v in enumerate(value)]
            if not items:
                raise ConfigError(f"{key}: an empty list")
            return items[0] if len(items) == 1 else items
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:
        if isinstance(value, str):  # bf16 -> bfloat16 for dtypes; quant_type keeps its bf16
            value = spelled(value, args)
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def _types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig, include_extras=False)


def build_config(overrides: dict, source: str = "config") -> TrainConfig:
    """Validate keys and values and return a TrainConfig; errors name the key and suggest fixes."""
    types = _types()
    values = {}
    for key, value in overrides.items():
        k = key.replace("-", "_")
        if k not in types:
            hint = difflib.get_close_matches(k, list(types), n=1)
            raise ConfigError(f"{source}: unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        values[k] = _coerce(f"{source}: {k}", value, types[k])
    cfg = TrainConfig(**values)
    validate(cfg, source)
    return cfg


def validate(cfg: TrainConfig, source: str = "config") -> None:
    positive = ["lora_r", "max_steps", "batch_size", "grad_accum", "max_seq_len", "max_source_len",
                "max_target_len", "logging_steps", "save_total_limit", "nproc"]
    for k in positive:
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{source}: {k} must be > 0, got {getattr(cfg, k)}")
    for k in ("eval_steps", "save_steps", "threads", "weight_decay", "max_grad_norm"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{source}: {k} must be >= 0, got {getattr(cfg, k)}")
    if not cfg.lr > 0:
        raise ConfigError(f"{source}: lr must be > 0, got {cfg.lr}")
    if cfg.beta <= 0:
        raise ConfigError(f"{source}: beta must be > 0, got {cfg.beta}")
    if cfg.objective != "sft" and (cfg.data_format != "auto" or cfg.train_on_source or cfg.packing):
        raise ConfigError(f"{source}: objective {cfg.objective} reads preference rows (prompt/chosen/rejected); "
                          "data_format, train_on_source and packing apply to sft only")
    if cfg.reference_adapter is not None and (cfg.objective != "dpo" or cfg.lora_init != "gaussian"):
        raise ConfigError(f"{source}: reference_adapter applies to objective dpo with lora_init gaussian only "
                          f"(got objective {cfg.objective}, lora_init {cfg.lora_init}); ORPO and SFT use no reference")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"{source}: lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ConfigError(f"{source}: warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"{source}: val_fraction must be in [0, 1), got {cfg.val_fraction}")
    try:
        cfg.quant.check()
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    if cfg.optimizer_memory_budget is not None:
        parse_size(cfg.optimizer_memory_budget, f"{source}: optimizer_memory_budget")


def load_yaml(path: str) -> dict:
    """Read a YAML mapping; errors name the file (and line for syntax errors)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
