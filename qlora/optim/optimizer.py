"""The optimizer the trainer uses: AdamW over named parameters, state in pages.

    opt = build_optimizer(named_params, "paged_adamw", lr=2e-4, memory_budget=512 * 2**20)
    loss.backward(); opt.lr = schedule(step); opt.step(); opt.zero_grad()
    write_streaming(path, opt.state_specs(), opt.iter_state()); json.dump(opt.meta(), ...)  # checkpoint
    opt.load_state(TensorFile(path), json.load(...))                                      # exact resume

The four kinds are two choices: fp32 or 8-bit state (state.py), resident or paged storage
(paging.py). Checkpoints depend only on the first: a paged run resumes unpaged and vice versa.
Parameters may be bf16 (lora_dtype): the update runs on an fp32 copy, state as for fp32 ones,
and is written back with stochastic rounding (rounding.py).
"""

from __future__ import annotations

import os
import tempfile

import torch

from ..errors import QloraError
from .paging import PagedPages, ResidentPages, store_bytes
from .rounding import seed_for, stochastic_round_
from .state import Codebooks, StateLayout, fmt_bytes, update_state
from .store import FileStore, PinnedStore

KINDS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")
FORMAT = "qlora.optim/1"


class AdamW:
    """AdamW whose per-parameter state lives in `pages` laid out by `layouts` (build_optimizer)."""

    def __init__(self, named_params, kind: str, lr: float, betas, eps: float, weight_decay: float,
                 layouts: list[StateLayout], pages):
        self.kind = kind
        self.lr = lr
        """Learning rate of the next step(); the trainer sets it every step."""
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps
        self.weight_decay = weight_decay
        self._params = list(named_params)
        self._layouts = layouts
        self._pages = pages
        self._steps = [0] * len(self._params)  # per parameter, as torch: skipped when grad is None
        self._step = 0
        self._codebooks = Codebooks(self._params[0][1].device) if any(lay.eight_bit for lay in layouts) else None
        # resident pages never move: make their typed views once (a few us per tensor per step)
        self._views = [lay.views(pages.acquire(i)) for i, lay in enumerate(layouts)] if pages.persistent else None

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a .grad; the next page is prefetched meanwhile."""
        todo = [i for i, (_, p) in enumerate(self._params) if p.grad is not None]
        for j, i in enumerate(todo):
            page = self._pages.acquire(i)
            if j + 1 < len(todo):
                self._pages.prefetch(todo[j + 1])
            try:
                self._update(i, page)
            finally:
                self._pages.release(i)
        if todo:  # the next step starts with the same page: fetch it during forward/backward
            self._pages.prefetch(todo[0])
        self._step += 1

    def _update(self, i: int, page: torch.Tensor) -> None:
        name, p = self._params[i]
        if p.grad.is_sparse:
            raise ValueError(f"parameter {name!r} has a sparse gradient; AdamW needs dense gradients")
        self._steps[i] += 1
        layout = self._layouts[i]
        state = self._views[i] if self._views is not None else layout.views(page)
        param32 = p.float()  # the parameter itself when it is fp32 (in-place under no_grad)
        update_state(layout, state, param32, p.grad.float(), self._codebooks, step=self._steps[i],
                     lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)
        if p.dtype == torch.bfloat16:  # round the fp32 result once, stochastically (rounding.py)
            stochastic_round_(p, param32, seed_for(i, self._steps[i]))
        elif param32 is not p:  # fp16: to nearest
            p.copy_(param32)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat {f"{param}.{key}": tensor} of contiguous CPU tensors (safetensors-ready); keys are
        exp_avg/exp_avg_sq (fp32) or exp_avg.codes/.absmax and exp_avg_sq.codes/.absmax (8-bit).
        A copy of the whole state: checkpoints stream it with state_specs()/iter_state() instead."""
        return {key: t.clone() for key, t in self.iter_state()}  # own storage: safetensors refuses shared

    def state_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(key, dtype, shape) of every state tensor, in iter_state()'s order."""
        return [(f"{lay.name}.{f.key}", f.dtype, f.shape) for lay in self._layouts for f in lay.fields]

    def iter_state(self):
        """(key, CPU tensor) of every state tensor, one parameter's page in memory at a time: each
        tensor is valid until the next parameter's are yielded."""
        for i, layout in enumerate(self._layouts):
            for key, t in layout.views(self._pages.read(i)).items():
                yield f"{layout.name}.{key}", t

    def meta(self) -> dict:
        """JSON-serialisable: everything but the tensors, enough to check a resume."""
        return {
            "format": FORMAT, "kind": self.kind, "bits": self._bits(), "step": self._step, "lr": self.lr,
            "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
            "params": {lay.name: {"shape": list(lay.shape), "state": "8bit" if lay.eight_bit else "fp32",
                                "step": s} for lay, s in zip(self._layouts, self._steps)},
        }

    def load_state(self, tensors, meta: dict) -> None:
        """Restore state saved by state_tensors()/meta() (`tensors`: a mapping, which may read each
        tensor from disk when asked, as checkpoint.load's does); the continuation is bit-identical.
        Everything is checked before anything changes, and one page is held at a time (holding
        all of them would double the state in memory on resume), so `tensors` is read twice."""
        _check_meta(meta, self)
        for layout in self._layouts:
            self._page_from(tensors, layout)
        for i, layout in enumerate(self._layouts):
            self._pages.write(i, self._page_from(tensors, layout))
        self._steps = [int(meta["params"][lay.name]["step"]) for lay in self._layouts]
        self._step = int(meta["step"])
        self.lr = float(meta["lr"])

    def _page_from(self, tensors: dict, layout: StateLayout) -> torch.Tensor:
        raw = torch.zeros(layout.nbytes, dtype=torch.uint8)
        for key, view in layout.views(raw).items():
            full = f"{layout.name}.{key}"
            t = tensors.get(full)
            if t is None:
                raise QloraError(f"optimizer state: tensor {full!r} is missing; the checkpoint is incomplete")
            if t.dtype != view.dtype or tuple(t.shape) != tuple(view.shape):
                raise QloraError(
                    f"optimizer state: tensor {full!r} is {t.dtype} {tuple(t.shape)}, expected {view.dtype} "
                    f"{tuple(view.shape)}; the checkpoint was written for another model or optimizer"
                )
            view.copy_(t)
        return raw

    def _bits(self) -> int:
        return 8 if self.kind.endswith("8bit") else 32

    def stats(self) -> dict:
        """Counters since build: bytes_in/bytes_out paged, evictions, page_ins, prefetch_hits,
        stall_s (time step() waited for a page), resident_bytes, peak_resident_bytes (page memory
        held at peak, reusable buffers included; <= budget_bytes), plus kind, step, state_bytes."""
        return {"kind": self.kind, "step": self._step,
                "state_bytes": sum(lay.nbytes for lay in self._layouts), **self._pages.stats()}

    def close(self) -> None:
        """Free the state and the backing file; the optimizer is unusable afterwards."""
        self._pages.close()


def _check_meta(meta: dict, opt: AdamW) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise QloraError(f"optimizer state: meta format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"expected {FORMAT!r}; not a qlora optimizer checkpoint")
    if meta.get("bits") != opt._bits():
        raise QloraError(
            f"optimizer state: checkpoint holds {meta.get('bits')}-bit state ({meta.get('kind')}) but the optimizer "
            f"is {opt.kind}; resume with the optimizer the run started with"
        )
    saved = set(meta.get("params", {}))
    ours = {lay.name for lay in opt._layouts}
    if saved != ours:
        diff = sorted(saved ^ ours)
        raise QloraError(f"optimizer state: parameters differ from the model's (e.g. {diff[0]!r}); "
                         "the checkpoint was written for another model or LoRA config")


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]],
    name: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    memory_budget: int | None = None,
    offload_dir: str | None = None,
) -> AdamW:
    """AdamW of kind `name` (adamw | adamw_8bit | paged_adamw | paged_adamw_8bit).

    memory_budget: bytes of optimizer state kept resident (paged kinds only; None = half the
    memory available now). Past it, state pages out to a file in `offload_dir` (CPU; default: the
    system temp dir) or to pinned host memory (CUDA). All bad input raises QloraError here."""
    if name not in KINDS:
        raise QloraError(f"optimizer {name!r} is unknown; choose one of {', '.join(KINDS)}")
    _check_hyper(lr, betas, eps, weight_decay)
    params = _check_params(named_params)
    paged = name.startswith("paged_")
    if memory_budget is not None and not paged:
        raise QloraError(f"optimizer memory budget applies to paged optimizers only; use paged_{name} or drop it")
    device = params[0][1].device
    layouts = [StateLayout.build(n, tuple(p.shape), name.endswith("8bit")) for n, p in params]
    sizes = [lay.nbytes for lay in layouts]
    if not paged:
        return AdamW(params, name, lr, betas, eps, weight_decay, layouts, ResidentPages(sizes, device))
    budget = memory_budget if memory_budget is not None else available_memory(device) // 2
    largest = max(layouts, key=lambda lay: lay.nbytes)
    if budget < largest.nbytes:
        raise QloraError(
            f"optimizer memory budget {fmt_bytes(budget)} is smaller than the state of parameter "
            f"{largest.name!r} ({fmt_bytes(largest.nbytes)}); raise the budget to at least that"
        )
    if sum(sizes) <= budget:  # fits: paging would only cost copies
        return AdamW(params, name, lr, betas, eps, weight_decay, layouts, ResidentPages(sizes, device))
    if device.type == "cuda":
        store = PinnedStore(store_bytes(sizes), device)
    else:
        store = FileStore(store_bytes(sizes), offload_dir or tempfile.gettempdir())
    return AdamW(params, name, lr, betas, eps, weight_decay, layouts, PagedPages(sizes, budget, store, device))


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    if not lr >= 0:
        raise QloraError(f"optimizer lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise QloraError(f"optimizer betas must be two numbers in [0, 1), got {tuple(betas)}")
    if not eps >= 0 or not weight_decay >= 0:
        raise QloraError(f"optimizer eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}")


def _check_params(named_params) -> list[tuple[str, torch.nn.Parameter]]:
    params = list(named_params)
    if not params:
        raise QloraError("optimizer: no trainable parameters (did the LoRA target modules match any layer?)")
    names = [n for n, _ in params]
    if len(set(names)) != len(names):
        raise ValueError("optimizer: parameter names must be unique")
    devices = {p.device for _, p in params}
    if len(devices) > 1:
        raise ValueError(f"optimizer: parameters on several devices {sorted(map(str, devices))}")
    for n, p in params:
        if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"optimizer: parameter {n!r} is {p.dtype}; AdamW needs float parameters")
    return params


def available_memory(device: torch.device) -> int:
    """Bytes free now: GPU memory for CUDA, MemAvailable (Linux) or free pages elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
