"""Peak memory of one QLoRA training step, by part, from the model's shape alone.

Every count follows what the code stores: 4-bit weights as qlora.quant lays them out, optimizer
pages as qlora.optim lays them out, and activations as what autograd saves in a transformers
decoder wrapped by qlora.nn (checked tensor by tensor in tests/memory/test_estimate.py). The parts add up
to the peak, which comes at the start of backward: every saved activation and the loss's vocab-wide
tensors are alive together, gradients arrive as they go. Taking all of them at once over-counts by
at most the LoRA gradients.

Saving adds no part: a checkpoint writes the optimizer state one parameter's page at a time, and
the adapter straight from the weights (qlora.safetensors_writer), after the step's gradients and
activations are freed. (Measured: at 128 MiB of state, checkpoint.save adds 16 MiB, two pages;
it added 136 MiB when the state was gathered for safetensors' save_file. Resuming likewise.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import QloraError
from ..precision import canonical, resolve, resolve_saved
from ..nn.fused import FUSED_MODEL_TYPES
from ..nn.loss import CHUNK_TOKENS as LOSS_CHUNK_TOKENS
from ..quant.codebooks import QUANT_TYPES
from ..quant.spec import DEFAULT as QUANT_DEFAULT
from ..quant.state import NESTED_BLOCKSIZE
from .arch import Arch, LinearSpec, arch_from_config

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}  # keys: qlora.precision.NAMES
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
ATTENTION = ("sdpa", "eager")
# Resident memory of the runtime itself. cpu: measured here (Python 3.11, torch 2.13 CPU,
# transformers 5.23): importing torch + transformers + the modeling code peaks at 399 MiB, and
# `qlora train` on a tiny model (tokenizer, data, checkpoint, matplotlib's loss plot) at 466 MiB.
# cuda: the CUDA context and cuBLAS workspace on the device, typically 300-600 MiB on
# Ampere/Hopper (not measurable on this CPU-only machine).
FRAMEWORK_OVERHEAD = {"cpu": 460 * 2**20, "cuda": 512 * 2**20}
# A frozen 4-bit linear dequantizes its weight in forward and again in backward (qlora.nn.Linear4bit):
# one compute-dtype copy of the largest linear in flight, two where a backward overlaps the next.
DEQUANT_COPIES = 2
# Loading: transformers dequantizes a whole GGUF file to fp32 arrays and builds the 16-bit model
# from them before qlora quantizes it (qlora.hf._load_whole); safetensors checkpoints stream in one
# tensor at a time (qlora.hf._load_streaming), the largest one as file pages and a 16-bit copy.
LOAD_BYTES_PER_PARAM_GGUF = 4  # + the compute dtype
# The loss through a frozen head (qlora.nn.loss) works on LOSS_CHUNK_TOKENS target positions at a
# time: their logits in the compute dtype and in fp32 (softmax in place; on CPU in bf16 the compiled
# per-row pass needs no fp32 copy, and fp32 logits are their own fp32 copy unless softcapped),
# plus tanh's output for a softcapped head; it keeps dL/dh for
# every target (compute dtype). A quantized head takes the
# plain path: fp32 logits (4 bytes/vocab entry), cross-entropy's fp32 log-softmax (4), and in
# backward the incoming gradient and the result at once (4 + 4 + 4).
LOSS_BYTES_PER_VOCAB = 12
# Under --shard-base (FSDP2 per decoder layer) a rank holds this many layers' 4-bit weights whole
# besides its shards: the one computing and the one being gathered or freed around it.
SHARD_GATHERED_LAYERS = 2


@dataclass(frozen=True)
class Settings:
    quant_type: str = QUANT_DEFAULT.quant_type
    double_quant: bool = QUANT_DEFAULT.double_quant
    blocksize: int = QUANT_DEFAULT.blocksize
    quantize_head: bool = False
    lora_r: int = 64
    lora_targets: str = "all"
    lora_dropout: float = 0.05
    lora_dtype: str = "float32"
    batch_size: int = 1
    seq_len: int = 512
    target_tokens: int | None = None  # per sequence; None = every position is a target
    gradient_checkpointing: bool = False
    saved_activations: str = "auto"  # compute, bfloat16 (nn.fused.keep_saved_in: norm inputs, gate and up) or auto
    optimizer: str = "paged_adamw"
    optimizer_memory_budget: int | None = None
    compute_dtype: str = "bfloat16"  # or "auto": what training picks on this machine
    attention: str = "sdpa"
    device: str = "cpu"
    shards: int = 1  # ranks the decoder layers' 4-bit weights are split over (--shard-base); the estimate is one rank's
    objective: str = "sft"  # dpo/orpo: batch_size counts sequences (2 per pair); the loss keeps whole log-softmax rows
    reference_copy: bool = False  # DPO from a given adapter: a frozen copy of A and B is the reference (nn.lora)

    def check(self) -> "Settings":
        # 'auto' becomes what training would pick on this machine (and device); aliases as everywhere
        compute = resolve(self.compute_dtype, self.device, announce=False)
        s = replace(self, compute_dtype=compute, lora_dtype=canonical(self.lora_dtype),
                    saved_activations=resolve_saved(self.saved_activations, self.compute_dtype, compute))
        choices = {"quant_type": (*QUANT_TYPES, "bf16"), "lora_targets": ("all", "attention"), "optimizer": OPTIMIZERS,
                   "compute_dtype": tuple(BYTES), "lora_dtype": tuple(BYTES), "attention": ATTENTION,
                   "saved_activations": ("compute", "bfloat16"),
                   "device": ("cpu", "cuda")}
        for key, allowed in choices.items():
            if getattr(s, key) not in allowed:
                raise QloraError(f"{key}: {getattr(s, key)!r} is not one of {', '.join(allowed)}")
        for key in ("blocksize", "lora_r", "batch_size", "seq_len", "shards"):
            if not getattr(s, key) > 0:
                raise QloraError(f"{key} must be > 0, got {getattr(s, key)}")
        if not 0 <= s.lora_dropout < 1:
            raise QloraError(f"lora_dropout must be in [0, 1), got {s.lora_dropout}")
        if s.optimizer_memory_budget is not None and not s.optimizer.startswith("paged_"):
            raise QloraError(f"optimizer_memory_budget applies to paged optimizers only; "
                             f"use paged_{s.optimizer} or drop it")
        return s

    @property
    def c(self) -> int:  # bytes per element of the compute dtype
        return BYTES[self.compute_dtype]

    @property
    def kept(self) -> int:  # bytes per element of what the fused norms and MLP keep for backward
        return min(self.c, BYTES[self.saved_activations]) if self.saved_activations != "compute" else self.c

    @property
    def targets_per_seq(self) -> int:
        return self.seq_len if self.target_tokens is None else min(self.target_tokens, self.seq_len)


@dataclass
class Breakdown:
    """Bytes per part of the peak; `total` is their sum (paged-out optimizer state excluded)."""

    weights_4bit: int  # codes + block scales (+ nested scales) of every quantized linear
    weights_16bit: int  # embeddings, head, norms, biases (+ the linears when quant_type="bf16")
    lora_weights: int
    lora_grads: int
    optimizer_states: int  # resident part
    activations: int  # saved for backward, with the checkpointing setting chosen
    logits: int  # the loss's vocab-wide fp32 tensors
    dequant_workspace: int
    framework_overhead: int
    optimizer_paged_out: int = 0  # not resident: backing file (CPU) or pinned host memory (CUDA)
    optimizer_largest_page: int = 0  # one parameter's state: the least a paged optimizer keeps resident
    load_peak: int = 0  # while loading the weights, before training; not part of `total`
    activations_without_checkpointing: int = 0
    activations_with_checkpointing: int = 0
    weights_4bit_codes: int = 0
    weights_4bit_scales: int = 0
    n_params: int = 0
    n_quantized_params: int = 0
    n_lora_params: int = 0
    model: str = ""
    source_format: str = ""  # "gguf" for GGUF files (loaded whole), "" for configs / safetensors
    settings: dict = field(default_factory=dict)

    COUNTED = ("weights_4bit", "weights_16bit", "lora_weights", "lora_grads", "optimizer_states",
               "activations", "logits", "dequant_workspace", "framework_overhead")

    @property
    def total(self) -> int:
        """Peak of a training step."""
        return sum(getattr(self, k) for k in self.COUNTED)

    @property
    def peak(self) -> int:
        """Peak of the whole run: loading or training, whichever is higher."""
        return max(self.total, self.load_peak)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "peak": self.peak}

    def table(self) -> str:
        from .report import breakdown_table

        return breakdown_table(self)


def quantized_bytes(numel: int, blocksize: int, double_quant: bool) -> tuple[int, int]:
    """(codes, scales) bytes of one tensor as qlora.quant stores it (QuantizedTensor.nbytes):
    two codes per byte; an fp32 absmax per block, or with Double Quantization a uint8 absmax per
    block + an fp32 scale per 256 blocks + one fp32 offset."""
    codes = (numel + 1) // 2
    blocks = -(-numel // blocksize)
    if not double_quant:
        return codes, 4 * blocks
    return codes, blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4


def _lora_specs(arch: Arch, s: Settings) -> list[LinearSpec]:
    from ..nn.surgery import ATTENTION_NAMES  # the trainer's own rule for lora_targets="attention"

    specs = arch.linears()
    if s.lora_targets == "attention":
        specs = tuple(x for x in specs if x.name.rsplit(".", 1)[-1] in ATTENTION_NAMES)
    return list(specs)


def _weights(arch: Arch, s: Settings) -> tuple[int, int, int, int]:
    """(4-bit codes, 4-bit scales, 16-bit bytes, quantized params)."""
    sizes = [x.in_features * x.out_features for x in arch.linears()] * arch.layers
    head = 0 if arch.tied else arch.vocab * arch.hidden
    other = arch.other_params()
    if s.quantize_head and head:
        sizes.append(head)
        other -= head
    if s.quant_type == "bf16":
        return 0, 0, s.c * (other + sum(sizes)), 0
    codes = scales = 0
    for n in sizes:
        cb, sb = quantized_bytes(n, s.blocksize, s.double_quant)
        codes, scales = codes + cb, scales + sb
    return codes, scales, s.c * other, sum(sizes)


def _rank_share(arch: Arch, s: Settings, codes: int, scales: int) -> tuple[int, int]:
    """One rank's 4-bit (codes, scales) under --shard-base: its 1/shards of the decoder layers' plus
    SHARD_GATHERED_LAYERS whole layers (the head, if quantized, stays whole)."""
    if s.shards == 1 or s.quant_type == "bf16":
        return codes, scales
    layer = [quantized_bytes(x.in_features * x.out_features, s.blocksize, s.double_quant) for x in arch.linears()]

    def share(total: int, per_layer: int) -> int:
        sharded = -(-per_layer * arch.layers // s.shards)
        return total - per_layer * arch.layers + sharded + SHARD_GATHERED_LAYERS * per_layer

    return share(codes, sum(c for c, _ in layer)), share(scales, sum(b for _, b in layer))


def _optimizer_pages(shapes: list[tuple[int, int]], kind: str) -> list[int]:
    """Bytes of each parameter's state page, laid out by the optimizer itself (one source of truth)."""
    from ..optim.state import StateLayout

    eight_bit = kind.endswith("8bit")
    sizes = {shape: StateLayout.build("p", shape, eight_bit).nbytes for shape in set(shapes)}
    return [sizes[shape] for shape in shapes]


def _attention_bytes(arch: Arch, s: Settings) -> int:
    """Per token per layer. SDPA (flash / memory-efficient kernels) saves q, k, v, the output and
    an fp32 logsumexp per head; with grouped-query attention k and v are repeated to all heads (a
    free view for a single kv head) and the padding mask row is saved whenever a batch has padding
    (counted always). Eager saves q, k, v and the fp32 softmax plus its compute-dtype copy (T scores
    per head; one tensor when the compute dtype is fp32). GPT-2 keeps its softmax in the compute dtype and drops
    out attention probabilities in training (noise and result saved); on CPU, SDPA with dropout
    falls back to the math path, which saves all of that in fp32."""
    c, q, T = s.c, arch.heads * arch.head_dim, s.seq_len
    if arch.gpt2_style:
        scores = 3 if arch.dropout > 0 else 1  # softmax output (+ dropout noise and result)
        if s.attention == "eager":
            return 3 * c * q + scores * c * arch.heads * T
        if arch.dropout > 0 and s.device == "cpu":
            return 3 * 4 * q + scores * 4 * arch.heads * T
    elif s.attention == "eager":  # in fp32 the softmax's cast to the compute dtype is the softmax itself
        return 3 * c * q + (4 + (c if c != 4 else 0)) * arch.heads * T
    kv = (arch.heads if arch.kv_heads > 1 else 1) * arch.head_dim
    return 2 * c * q + 2 * c * kv + 4 * arch.heads + c * T


def _lora_activation_bytes(arch: Arch, s: Settings) -> tuple[int, int]:
    """(per token, per layer fixed) saved by LoRALinear, y = base(x) + s·B(A(dropout(x))) in the
    activation dtype. Over a 4-bit base the whole layer is one autograd function (nn.lora._LoRA4bit)
    that saves its input x, re-deriving the dropout mask from a seed: linears reading the same
    tensor save it once (the attention output is SDPA's saved output; with nn.fused the MLP's down
    projection keeps gate and up, saved anyway, instead of their product, and the linears reading a
    norm's output keep the norm's saved input instead of it), whatever the dropout. Over a
    16-bit base, A saves each dropped input when dropout is on (the mask itself is never stored).
    Either way each linear saves A's r outputs; over a 16-bit base also A and B cast to the compute
    dtype (the 4-bit function keeps the parameters and casts them again in backward)."""
    specs, c, r = _lora_specs(arch, s), s.c, s.lora_r
    if s.lora_dropout > 0 and s.quant_type == "bf16":
        per_token = sum(c * x.in_features for x in specs)
    else:
        inputs = {x.group: x.in_features for x in specs}
        if s.attention == "sdpa" and not arch.gpt2_style:
            inputs.pop("attn_out", None)
        if _fused(arch) and s.quant_type != "bf16":  # nn.lora._GatedLoRA4bit keeps gate and up, not the product;
            for group in ("mlp_out", "attn_in", "mlp_in"):  # _LoRA4bit keeps a norm's output as the norm's input
                inputs.pop(group, None)
        per_token = c * sum(inputs.values())
    per_token += c * r * len(specs)
    cast = s.lora_dtype != s.compute_dtype and s.quant_type == "bf16"  # the 4-bit function casts again in backward
    casts = c * r * sum(x.in_features + x.out_features for x in specs) if cast else 0
    return per_token, casts


def layer_activation_bytes(arch: Arch, s: Settings) -> tuple[int, int]:
    """(per token, per layer fixed): what autograd keeps for one decoder block (module docstring)."""
    c, h, i = s.c, arch.hidden, arch.intermediate
    if arch.gpt2_style:  # LayerNorm saves its input, mean and rstd; gelu_new saves 4 tensors
        norms = 2 * (c * h + 2 * c)
        mlp = 4 * c * i + (2 * c * h if arch.dropout > 0 else 0)  # + residual dropout noise
    elif _fused(arch):  # nn.fused: RMSNorm keeps its input + an fp32 rstd; SwiGLU keeps gate and up
        k = s.kept  # saved_activations
        norms = arch.norms_per_layer * (k * h + 4)
        if arch.qk_norm:
            norms += (arch.heads + arch.kv_heads) * (k * arch.head_dim + 4)
        mlp = 2 * k * i
    else:  # RMSNorm saves an fp32 copy of its input + fp32 rsqrt; gated MLP: gate, act(gate), up
        norms = arch.norms_per_layer * (4 * h + 4)
        if arch.qk_norm:
            norms += 4 * (arch.heads + arch.kv_heads) * (arch.head_dim + 1)
        mlp = 3 * c * i
    lora, fixed = _lora_activation_bytes(arch, s)
    if arch.gemma_norm:  # each norm saves its fp32 (1 + w)
        fixed += 4 * (arch.norms_per_layer * h + (2 * arch.head_dim if arch.qk_norm else 0))
    return norms + _attention_bytes(arch, s) + mlp + lora, fixed


def _scratch(arch: Arch, s: Settings, specs: list[LinearSpec]) -> int:
    """The 4-bit LoRA layers' kept scratch buffers (nn.linear4bit.scratch): the dropped input of the
    widest adapted layer, and (fused MLP with an adapted down projection) SwiGLU's product and, from
    backward, its gradient."""
    tokens = s.batch_size * s.seq_len
    dropped = max(x.in_features for x in specs) if specs and s.lora_dropout > 0 else 0
    gated = 2 * arch.intermediate if _fused(arch) and any(x.name.endswith("down_proj") for x in specs) else 0
    return (dropped + gated) * tokens * s.c


def _fused(arch: Arch) -> bool:
    return arch.model_type in FUSED_MODEL_TYPES and not arch.gpt2_style and not arch.gemma_norm


def _activations(arch: Arch, s: Settings) -> tuple[int, int]:
    """(without, with) gradient checkpointing. With it, each block keeps its input and, with SDPA,
    attention's output and logsumexp (nn.checkpointing.enable_gradient_checkpointing), and one block is
    recomputed at a time during backward."""
    tokens = s.batch_size * s.seq_len
    per_token, fixed = layer_activation_bytes(arch, s)
    layer = per_token * tokens + fixed
    final_norm = ((s.kept if _fused(arch) else 4) * arch.hidden + 4) * tokens
    without = arch.layers * layer + final_norm
    flash = s.attention == "sdpa" and not (arch.gpt2_style and arch.dropout > 0 and s.device == "cpu")
    kept = s.c * arch.hidden + ((s.c * arch.head_dim + 4) * arch.heads if flash else 0)
    with_ckpt = arch.layers * kept * tokens + layer + final_norm
    return without, with_ckpt


def _load_peak(arch: Arch, s: Settings, weights: int, overhead: int, source_format: str | None) -> int:
    if source_format == "gguf":
        return overhead + arch.n_params() * (LOAD_BYTES_PER_PARAM_GGUF + s.c)
    largest = max([x.in_features * x.out_features for x in arch.linears()] + [arch.vocab * arch.hidden])
    return overhead + weights + largest * (4 + s.c)


def _loss_bytes(arch: Arch, s: Settings) -> int:
    targets = s.batch_size * s.targets_per_seq
    if s.objective != "sft":  # objectives.sequence_logps: (targets, vocab) logits plus cross-entropy's fp32 log-softmax
        return targets * arch.vocab * (s.c + 4) + targets * arch.hidden * s.c
    if s.quantize_head:
        return LOSS_BYTES_PER_VOCAB * arch.vocab * targets
    compiled = s.device == "cpu" and s.compute_dtype == "bfloat16" and not arch.softcap  # nn.loss's per-row pass
    fp32_logits = s.compute_dtype == "float32" and not arch.softcap  # the matmul's own buffer is the fp32 one
    per_vocab = s.c + (0 if compiled or fp32_logits else 4 + 4 * arch.softcap)
    return min(targets, LOSS_CHUNK_TOKENS) * arch.vocab * per_vocab + targets * arch.hidden * s.c


def estimate(model_config: dict, **settings) -> Breakdown:
    """Peak training memory for `model_config` (an HF config.json dict). Keywords: the fields of
    `Settings` (quant_type "bf16" = plain 16-bit LoRA; optimizer_memory_budget in bytes caps the
    resident state of paged optimizers; target_tokens = targets per sequence for the loss)."""
    if "device" in settings:
        settings["device"] = str(settings["device"]).split(":")[0]
    try:
        s = Settings(**settings).check()
    except TypeError as e:
        raise QloraError(f"estimate: {e}") from None
    arch = arch_from_config(model_config, str(model_config.get("_name", "model config")))
    codes, scales, w16, n_quant = _weights(arch, s)
    codes, scales = _rank_share(arch, s, codes, scales)
    specs = _lora_specs(arch, s)
    shapes = [shape for x in specs for shape in ((s.lora_r, x.in_features), (x.out_features, s.lora_r))] * arch.layers
    n_lora = sum(a * b for a, b in shapes)
    pages = _optimizer_pages(shapes, s.optimizer)
    opt_total = sum(pages)
    resident = opt_total if s.optimizer_memory_budget is None else min(opt_total, s.optimizer_memory_budget)
    without, with_ckpt = _activations(arch, s)
    largest = max([x.in_features * x.out_features for x in arch.linears()]
                  + ([arch.vocab * arch.hidden] if s.quantize_head and not arch.tied else []))
    overhead = FRAMEWORK_OVERHEAD[s.device]
    return Breakdown(
        weights_4bit=codes + scales, weights_16bit=w16,
        lora_weights=n_lora * BYTES[s.lora_dtype] * (2 if s.reference_copy else 1),
        lora_grads=n_lora * BYTES[s.lora_dtype],
        optimizer_states=resident, optimizer_paged_out=opt_total - resident, optimizer_largest_page=max(pages),
        activations=with_ckpt if s.gradient_checkpointing else without,
        activations_without_checkpointing=without, activations_with_checkpointing=with_ckpt,
        logits=_loss_bytes(arch, s),
        dequant_workspace=0 if s.quant_type == "bf16" else DEQUANT_COPIES * s.c * largest + _scratch(arch, s, specs),
        framework_overhead=overhead,
        load_peak=_load_peak(arch, s, codes + scales + w16, overhead, model_config.get("_format")),
        weights_4bit_codes=codes, weights_4bit_scales=scales, n_params=arch.n_params(),
        n_quantized_params=n_quant, n_lora_params=n_lora,
        model=str(model_config.get("_name") or model_config.get("_name_or_path") or arch.model_type),
        source_format=str(model_config.get("_format") or ""), settings=asdict(s),
    )
