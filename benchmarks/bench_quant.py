"""Quantization throughput: qlora vs bitsandbytes vs torchao in the same run (elements/s).

    python benchmarks/bench_quant.py [--size 4096] [--min-time 1.0] [--threads N]

NF4, blocksize 64, on a size x size bf16 matrix, without and with Double Quantization (torchao's
NF4Tensor always double-quantizes its scales), dequantized to bf16, each call allocating its
output as users see it. Then the kernels alone: dequantizing nf4 + DQ into a preallocated bf16
tensor (qlora's kernels.dequantize_4bit_into; bitsandbytes' native CPU kernel called the way its
dequantize_4bit does), on the big matrix and on the layer shapes Linear4bit dequantizes every
forward and backward (SmolLM2-135M's 576x576 attention and 1536x576 MLP weights).
Implementations take turns call by call. Throughput and the first ratio (peer / qlora) use the
median CPU time of the process per call, which other jobs on a shared machine hardly change; the
second ratio uses the best wall time. Run with --threads 1 on a busy machine: with 2 threads a
call can wait a whole time slice for a descheduled OpenMP thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

import qlora
from qlora.quant import kernels


Timing = tuple[float, float, float]  # seconds per call: CPU median, wall best, wall median


def bench(fns: dict[str, Callable[[], object]], min_time: float) -> dict[str, Timing]:
    """Per implementation: the median CPU time of the process per call (all its threads, page
    faults included; what the call costs, whatever else runs on the machine), and the best and
    median wall time. The implementations take turns call by call, so a busy machine slows them
    alike; each runs at least 3 calls and `min_time` seconds (at most 200 calls) after a warm-up."""
    for fn in fns.values():
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    while pending := [n for n, t in wall.items() if len(t) < 3 or (sum(t) < min_time and len(t) < 200)]:
        for name in pending:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {n: (statistics.median(cpu[n]), min(wall[n]), statistics.median(wall[n])) for n in fns}


def reference(fn: Callable, *args):
    """fn(*args) with QLORA_REFERENCE_KERNELS=1: qlora's plain-PyTorch definition of the op."""
    old = os.environ.get("QLORA_REFERENCE_KERNELS")
    os.environ["QLORA_REFERENCE_KERNELS"] = "1"
    try:
        return fn(*args)
    finally:
        if old is None:
            del os.environ["QLORA_REFERENCE_KERNELS"]
        else:
            os.environ["QLORA_REFERENCE_KERNELS"] = old


def peers():
    """(bitsandbytes.functional or None, torchao's to_nf4 or None), with versions."""
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_f
        bnb = (bnb_f, bitsandbytes.__version__)
    except ImportError:
        bnb = (None, "not installed")
    try:
        import torchao
        try:
            from torchao.dtypes.nf4tensor import to_nf4
        except ImportError:  # torchao >= 0.16 moved it
            from torchao.quantization import to_nf4
        ao = (to_nf4, torchao.__version__)
    except ImportError:
        ao = (None, "not installed")
    return bnb, ao


Row = tuple[str, int, dict[str, Timing]]  # (operation, elements, {implementation: timing})


def matrix_rows(w: torch.Tensor, bnb_f, to_nf4, min_time: float) -> list[Row]:
    rows = []
    for dq in (False, True):
        fns = {"qlora": lambda: qlora.quantize(w, "nf4", 64, dq),
               "qlora reference": lambda: reference(qlora.quantize, w, "nf4", 64, dq)}
        if bnb_f:
            fns["bitsandbytes"] = lambda: bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        if to_nf4 and dq:
            fns["torchao"] = lambda: to_nf4(w, block_size=64, scaler_block_size=256)
        rows.append((f"quantize nf4{' + DQ' if dq else ''}", w.numel(), bench(fns, min_time)))
    for dq in (False, True):
        q = qlora.quantize(w, "nf4", 64, dq)
        fns = {"qlora": lambda: qlora.dequantize(q, torch.bfloat16),
               "qlora reference": lambda: reference(qlora.dequantize, q, torch.bfloat16)}
        if bnb_f:
            packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            fns["bitsandbytes"] = lambda: bnb_f.dequantize_4bit(packed, state)
        if to_nf4 and dq:
            t = to_nf4(w, block_size=64, scaler_block_size=256)
            fns["torchao"] = t.get_original_weight
        rows.append((f"dequantize nf4{' + DQ' if dq else ''} -> bf16", w.numel(), bench(fns, min_time)))
    return rows


def bnb_dequantize_into(bnb_f, packed: torch.Tensor, state, out: torch.Tensor) -> None:
    """bitsandbytes' CPU dequantize_4bit minus the output allocation (its CPU op has no `out=`):
    decode the DQ scales as it does, then its native AVX-512 kernel."""
    import ctypes

    from bitsandbytes.cextension import lib

    absmax = state.absmax
    if state.nested:
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset
    kernel = getattr(lib, f"cdequantize_blockwise_cpu_{state.quant_type}_bf16")
    rows, cols = state.shape
    kernel(bnb_f.get_ptr(packed), bnb_f.get_ptr(absmax), bnb_f.get_ptr(out), ctypes.c_longlong(state.blocksize),
           ctypes.c_longlong(rows), ctypes.c_longlong(cols))


def into_rows(shapes, bnb_f, to_nf4, min_time: float) -> list[Row]:
    """Dequantizing nf4 + DQ into a preallocated bf16 tensor (kernel cost only), and for the layer
    shapes also the allocating calls."""
    rows = []
    for shape in shapes:
        w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        q = qlora.quantize(w, "nf4", 64, double_quant=True)
        nested = (q.nested_absmax, q.nested_code, q.offset, 256)
        out = torch.empty(shape, dtype=torch.bfloat16)
        into = {"qlora": lambda: kernels.dequantize_4bit_into(out, q.data, q.absmax, q.code, 64, nested)}
        fresh = {"qlora": lambda: qlora.dequantize(q, torch.bfloat16)}
        if bnb_f:
            packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            theirs = torch.empty(shape, dtype=torch.bfloat16)
            bnb_dequantize_into(bnb_f, packed, state, theirs)
            if torch.equal(theirs, into["qlora"]()):  # its native kernel is wrong for rows that split blocks
                into["bitsandbytes"] = lambda: bnb_dequantize_into(bnb_f, packed, state, theirs)
            fresh["bitsandbytes"] = lambda: bnb_f.dequantize_4bit(packed, state)
        if to_nf4:
            try:
                fresh["torchao"] = to_nf4(w, block_size=64, scaler_block_size=256).get_original_weight
            except (AssertionError, RuntimeError, ValueError) as e:  # its scaler blocks must tile the weight
                print(f"torchao cannot quantize {shape}: {str(e).splitlines()[0][:80]}")
        rows.append((f"dequantize {shape[0]}x{shape[1]} nf4 + DQ -> preallocated bf16", w.numel(),
                     bench(into, min_time)))
        if shape[0] * shape[1] <= 2**22:  # the big matrix's allocating calls are in matrix_rows
            rows.append((f"dequantize {shape[0]}x{shape[1]} nf4 + DQ -> bf16", w.numel(), bench(fresh, min_time)))
    return rows


def print_table(rows: list[Row]) -> None:
    """Throughput from the CPU time; ratios (peer / qlora) from the CPU time and the best wall time."""
    print("| operation | implementation | elements/s (CPU) | CPU ms | wall ms best / median "
          "| vs bitsandbytes (CPU / wall) | vs torchao (CPU / wall) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for op, n, times in rows:
        for impl, (cpu, best, median) in times.items():
            def ratio(peer: str) -> str:
                if peer not in times or not impl.startswith("qlora"):
                    return ""
                return f"{times[peer][0] / cpu:.1f}x / {times[peer][1] / best:.1f}x"

            print(f"| {op} | {impl} | {n / cpu / 1e9:.3f} G | {cpu * 1e3:.2f} | {best * 1e3:.2f} / {median * 1e3:.2f} "
                  f"| {ratio('bitsandbytes')} | {ratio('torchao')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the matrix is size x size (default 4096)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds to repeat each measurement (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    (bnb_f, bnb_version), (to_nf4, ao_version) = peers()
    from machine import header

    print(header())
    print(f"{args.size}x{args.size} bf16; torch {torch.__version__}, bitsandbytes {bnb_version}, torchao {ao_version}; "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16) * 0.02
    shapes = [(args.size, args.size), (576, 576), (1536, 576)]
    rows = matrix_rows(w, bnb_f, to_nf4, args.min_time) + into_rows(shapes, bnb_f, to_nf4, args.min_time)
    print_table(rows)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
