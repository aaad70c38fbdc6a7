"""Decode speed, batch 1, greedy: qlora (NF4 base + live adapter) vs transformers + bitsandbytes NF4
(+ PEFT for the adapter) on the same model, in the same run.

    python benchmarks/bench_decode.py [--adapter DIR] [--model DIR] [--new-tokens 128] [--repeats 3]
                                      [--dtype auto] [--threads N] [--forward-row] [--llama-cpp-threads 2]

Both decode exactly --new-tokens tokens (end-of-sequence is not a stop here) after the same chat
prompt, one token per step against a KV cache. Each token is timed as it comes out; decode
tokens/s is (n - 1) / (time of the last token - time of the first), so the prompt's prefill is
apart, and so is the CPU time per token. qlora decodes llama-family models with its own compiled
step (qlora/decoder.py); --forward-row adds a row for the same qlora model through transformers'
forward, its path before. The rows take turns `--repeats` times; the median is reported, with the
process CPU time per decoded token (what a shared, busy machine distorts least). Both quantize the
base to NF4, blocksize 64, double quantization, compute dtype --dtype. Where llama-cpp-python is
installed and the model is a GGUF file, llama.cpp decodes the file as stored (the embedded model is
Q4_1) without the adapter, as the CPU-performance issue measured it, and with --adapter also with
that adapter live (`qlora export --format gguf-lora`, llama.cpp's --lora): the same work as ours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from qlora import hf
from qlora.generate import GenerationSettings, encode_prompt, load_model, sample

PROMPT = [{"role": "system", "content": "Extract the person's name, age, city and year as JSON."},
          {"role": "user", "content": "In 2018, 79-year-old Victor Sharma relocated to Sydney."}]


def time_tokens(run) -> tuple[list[int], list[float], float]:
    """Token ids, the wall time each came out at (from the call), and the process CPU seconds from
    the first token to the last (decoding only, as the rate)."""
    stamps, cpu, t0 = [], [], time.perf_counter()

    def mark():
        stamps.append(time.perf_counter() - t0)
        cpu.append(time.process_time())

    tokens = list(run(mark))
    return tokens, stamps, cpu[-1] - cpu[0]


def qlora_runner(model, ids, n, path: str = ""):
    """path "": qlora's own decode step where it applies (qlora/decoder.py); "model": the model's forward."""
    def run(mark):
        before = os.environ.get("QLORA_DECODE")
        os.environ["QLORA_DECODE"] = path
        try:
            for tok in sample(model, ids, GenerationSettings(max_new_tokens=n), n):
                mark()
                yield tok
        finally:
            if before is None:
                del os.environ["QLORA_DECODE"]
            else:
                os.environ["QLORA_DECODE"] = before
    return run


def peer_runner(model, ids, n):
    from transformers.generation.streamers import BaseStreamer

    class Marks(BaseStreamer):
        def __init__(self, mark):
            self.mark, self.first, self.out = mark, True, []

        def put(self, value):
            if self.first:  # generate() hands the prompt over first
                self.first = False
                return
            self.mark()
            self.out.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    def run(mark):
        s = Marks(mark)
        with torch.inference_mode():
            model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=s,
                           pad_token_id=model.config.eos_token_id)
        return s.out
    return run


def llama_cpp_runner(gguf: str, ids, n, threads: int, lora: str | None = None):
    """llama.cpp (llama-cpp-python) on the GGUF file as it is (the embedded model is Q4_1), greedy;
    lora: a GGUF LoRA file applied live."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=len(ids) + n + 8, n_threads=threads, n_threads_batch=threads, verbose=False,
                lora_path=lora)

    def run(mark):
        llm.reset()
        out = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            mark()
            out.append(int(tok))
            if len(out) == n:
                break
        return out
    return run


def load_peer(model: str | None, adapter: str | None, dtype: torch.dtype, tmp: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir, gguf_file = hf.resolve(model)
    if gguf_file:  # bitsandbytes quantizes on load from safetensors: write the GGUF's weights as such once
        from transformers import GgufConfig

        AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=dtype,
                                             quantization_config=GgufConfig(dequantize=True)).save_pretrained(tmp)
        model_dir = tmp
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    net = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=dtype, device_map="cpu")
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    return net.eval()


def llama_cpp_rows(args, ids, n, tmp: str) -> dict:
    """llama.cpp on the GGUF base as stored, and with --adapter also with it live (exported to tmp)."""
    model_dir, gguf_file = hf.resolve(args.model)
    if not gguf_file:
        return {}
    threads, gguf = args.llama_cpp_threads, os.path.join(model_dir, gguf_file)
    try:
        rows = {f"llama.cpp, GGUF as stored, base only, {threads} threads": llama_cpp_runner(gguf, ids, n, threads)}
        if args.adapter:
            from qlora.export import export

            lora = export(args.model, [args.adapter], os.path.join(tmp, "adapter.gguf"), "gguf-lora")["output"]
            rows[f"llama.cpp, GGUF as stored + adapter live (gguf-lora f16), {threads} threads"] = llama_cpp_runner(
                gguf, ids, n, threads, lora)
        return rows
    except ImportError as e:
        print(f"(no llama.cpp row: {e})")
        return {}


def report(results: dict, n: int) -> None:
    """The table (medians over the repeats), then qlora's first row against every other row."""
    print("| implementation | decode tokens/s (median) | first token incl. prefill (ms) | decode CPU per token (ms) |")
    print("|---|---:|---:|---:|")
    rates = {}
    for name, runs in results.items():
        rates[name] = statistics.median((len(s) - 1) / (s[-1] - s[0]) for _, s, _ in runs)
        first = statistics.median(s[0] for _, s, _ in runs)
        cpu = statistics.median(c / (len(s) - 1) for _, s, c in runs)
        print(f"| {name} | {rates[name]:.1f} | {first * 1e3:.0f} | {cpu * 1e3:.1f} |")
    ours, *others = results
    print()
    for name in others:
        a, b = results[ours][0][0], results[name][0][0]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"qlora / {name}: {rates[ours] / rates[name]:.2f}x; greedy tokens identical for the first {same} of {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="base model: directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", help="PEFT-format adapter directory (default: none, the base alone)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                    help="compute dtype of the models (default: auto, as `qlora generate`)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--llama-cpp-threads", type=int, default=2,
                    help="threads for the llama.cpp row (llama-cpp-python, when installed; GGUF models only)")
    ap.add_argument("--forward-row", action="store_true",
                    help="also time qlora's model through transformers' forward "
                         "(its decode path before qlora/decoder.py)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from machine import header

    from qlora.precision import resolve

    print(header(args.dtype))
    args.dtype = resolve(args.dtype, "cpu", announce=False)
    dtype, n = getattr(torch, args.dtype), args.new_tokens
    adapters = [args.adapter] if args.adapter else []
    ours, tokenizer = load_model(args.model, adapters, "nf4", dtype)
    ours.eval()
    ids = encode_prompt(tokenizer, PROMPT)
    runners = {"qlora (NF4 + live adapter)": qlora_runner(ours, ids, n)}
    if args.forward_row:
        runners["qlora through transformers' forward (QLORA_DECODE=model)"] = qlora_runner(ours, ids, n, "model")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
            peer = load_peer(args.model, args.adapter, dtype, tmp)
        runners["transformers + bitsandbytes NF4" + (" + PEFT" if adapters else "")] = peer_runner(peer, ids, n)
    except ImportError as e:
        print(f"(no peer row: {e})")
    lora_dir = tempfile.TemporaryDirectory(prefix="bench-decode-lora-")  # lives as long as the runners
    runners.update(llama_cpp_rows(args, ids, n, lora_dir.name))
    print(f"{args.model or 'SmolLM2-135M-Instruct (embedded)'} + {args.adapter or 'no adapter'}, {args.dtype}, "
          f"prompt {len(ids)} tokens, {n} new tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}")
    results = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():  # taking turns: a busy machine slows both alike
            results[name].append(time_tokens(run))
    print(f"load avg after: {os.getloadavg()[0]:.1f}\n")
    report(results, n)
    first = next(iter(results.values()))
    print("answer (qlora):", repr(tokenizer.decode(first[0][0], skip_special_tokens=True)[:200]))


if __name__ == "__main__":
    main()
