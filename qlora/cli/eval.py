"""`qlora eval <perplexity|choice|mmlu|datatypes|generate|judge|elo|compare>`: the paper's instruments.

Every subcommand prints a markdown table and, with --output, writes the numbers as JSON together
with the settings that produced them (generate writes its answers as JSONL, one row per prompt).
Library calls live in qlora.evaluate; this file parses.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import QloraError
from .options import ADAPTER_HELP, add_chat_format_arg, add_model_args, add_sampling_args, load_from, settings_from


def add_quant_args(p: argparse.ArgumentParser, adapters: bool = True, quant: bool = True) -> None:
    """The model flags (options.add_model_args: --model --adapter, the base's 4-bit format, --dtype), and --device."""
    add_model_args(p, adapter_help=ADAPTER_HELP if adapters else None, quant=quant)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")


def add_common(p: argparse.ArgumentParser, limit_help: str, batch_size: int | None = 8,
               output: tuple[str, str] = ("FILE.json", "also write the results as JSON")) -> None:
    """--limit, --output (metavar, help), --no-progress, and --batch-size unless None (a verb that
    does not batch its forward passes should not offer it)."""
    p.add_argument("--limit", type=int, default=None, help=limit_help)
    p.add_argument("--output", metavar=output[0], help=output[1])
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"sequences per forward pass (default: {batch_size})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate: perplexity, zero-shot/MMLU accuracy, data types, judged tournaments",
                       description="Evaluation instruments of the QLoRA paper; see `qlora eval VERB --help`.")
    verbs = p.add_subparsers(dest="eval_verb", metavar="VERB")
    for add in (_register_perplexity, _register_choice, _register_mmlu, _register_datatypes, _register_generate):
        add(verbs)
    # judge/elo and score live in their own files (this one is full); registered in the original verb order
    from . import eval_judging, eval_score

    eval_judging.register(verbs)
    _register_compare(verbs)
    eval_score.register(verbs)
    p.set_defaults(func=lambda args: _help(p))


def _help(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def load(args, adapters: list[str] | None = None):
    """(model, tokenizer) from the model flags (options.load_from); quantization read from the (first)
    adapter unless given."""
    if getattr(args, "batch_size", 1) < 1:
        raise QloraError(f"--batch-size must be >= 1, got {args.batch_size}")
    return load_from(args, adapters)


def settings(model, args, adapters: list[str] | None = None) -> dict:
    """What produced a result, for the JSON file: the 4-bit format is read from the model's layers."""
    from ..nn.surgery import quant_of

    adapters = list(args.adapters if adapters is None else adapters)
    return dict(model=model.qlora_source, adapters=adapters, quant=quant_of(model).as_dict(), dtype=args.dtype)


def finish(args, payload: dict, table: str) -> int:
    from ..evaluate.report import write_json

    print(table)
    if args.output:
        write_json(args.output, payload)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# ---- perplexity ----

def _register_perplexity(verbs) -> None:
    p = verbs.add_parser("perplexity", help="perplexity on a text file or dataset column",
                         description="Token-weighted perplexity: the text is tokenized once and cut into windows "
                         "(non-overlapping by default; --stride < --window for a sliding window).")
    p.add_argument("--data", metavar="FILE",
                   help="text file, or dataset file with --column (default: the shared WikiText-2 test text)")
    p.add_argument("--column", help="string column of a dataset file, rows joined by blank lines (default: text)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (default: 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: --window, no overlap)")
    p.add_argument("--max-tokens", type=int, default=32768, help="use the first N tokens, 0 = all (default: 32768)")
    add_quant_args(p)
    add_common(p, "evaluate at most N windows", batch_size=1)
    p.set_defaults(func=_run_perplexity)


def _run_perplexity(args) -> int:
    from ..evaluate.choice import data_dir
    from ..evaluate.perplexity import perplexity, read_text, tokenize
    from ..evaluate.report import markdown_table

    path = args.data or str(data_dir() / "ppl" / "wikitext2_raw_test.txt")
    text = read_text(path, args.column)
    model, tokenizer = load(args)
    ids = tokenize(tokenizer, text, args.max_tokens or None)
    stride = args.stride or args.window
    if args.limit:
        ids = ids[: (args.limit - 1) * stride + args.window]
    r = perplexity(model, ids, args.window, stride, args.batch_size, args.progress)
    table = markdown_table(["data", "tokens predicted", "windows", "window/stride", "perplexity"],
                           [[path, r.tokens, r.windows, f"{r.window}/{r.stride}", f"{r.perplexity:.4f}"]])
    return finish(args, dict(settings(model, args), data=path, **r.to_dict()), table)


# ---- zero-shot multiple choice ----

def _register_choice(verbs) -> None:
    from ..evaluate.choice import DEFAULT_TASKS

    p = verbs.add_parser("choice", help="zero-shot multiple choice accuracy (ARC, PIQA, HellaSwag, WinoGrande, JSONL)",
                         description="acc and acc_norm (lm-evaluation-harness definitions) per task.")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help="comma-separated task names or JSONL files with query/choices/gold "
                   f"(default: {','.join(DEFAULT_TASKS)})")
    add_quant_args(p)
    add_common(p, "first N questions of each task")
    p.set_defaults(func=_run_choice)


def _run_choice(args) -> int:
    from ..evaluate.choice import evaluate_choice, load_task
    from ..evaluate.report import markdown_table

    tasks = [load_task(t, args.limit) for t in _csv(args.tasks)]  # read all first: fail before loading the model
    model, tokenizer = load(args)
    results = [evaluate_choice(model, tokenizer, qs, name, args.batch_size, args.progress) for name, qs in tasks]
    rows = [[r.task, r.n, f"{r.acc:.4f} ± {r.acc_stderr:.4f}", f"{r.acc_norm:.4f}"] for r in results]
    mean = sum(r.acc for r in results) / len(results)
    mean_norm = sum(r.acc_norm for r in results) / len(results)
    rows.append(["mean", sum(r.n for r in results), f"{mean:.4f}", f"{mean_norm:.4f}"])
    payload = dict(settings(model, args), tasks=[r.to_dict() for r in results], mean_acc=mean, mean_acc_norm=mean_norm)
    return finish(args, payload, markdown_table(["task", "n", "acc", "acc_norm"], rows))


# ---- MMLU ----

def _register_mmlu(verbs) -> None:
    p = verbs.add_parser("mmlu", help="MMLU 5-shot accuracy (the paper's prompt format)",
                         description="5-shot MMLU from the shared dev/test files; the prediction is the most likely "
                         "of the A/B/C/D answer tokens. Reports accuracy over questions and per subject.")
    p.add_argument("--subjects", help="comma-separated subjects (default: all 57)")
    p.add_argument("--shots", type=int, default=5, help="dev examples in each prompt (default: 5)")
    add_quant_args(p)
    add_common(p, "first N test questions of each subject")
    p.set_defaults(func=_run_mmlu)


def _run_mmlu(args) -> int:
    from ..evaluate.mmlu import evaluate_mmlu, load_mmlu
    from ..evaluate.report import markdown_table

    if not 0 <= args.shots <= 5:
        raise QloraError(f"--shots must be between 0 and 5 (the dev set has 5 per subject), got {args.shots}")
    dev, test = load_mmlu(args.limit, _csv(args.subjects) if args.subjects else None)
    model, tokenizer = load(args)
    r = evaluate_mmlu(model, tokenizer, dev, test, args.shots, args.batch_size, args.progress)
    rows = [[s, d["n"], f"{d['accuracy']:.4f}"] for s, d in r.subjects.items()]
    rows += [["**all questions**", r.n, f"{r.accuracy:.4f}"],
             ["**mean of subjects**", len(r.subjects), f"{r.subject_mean:.4f}"]]
    payload = dict(settings(model, args), shots=args.shots, **r.to_dict())
    return finish(args, payload, markdown_table(["subject", "n", "accuracy"], rows))


# ---- the data-type study ----

def _register_datatypes(verbs) -> None:
    from ..evaluate.choice import DEFAULT_TASKS
    from ..evaluate.datatypes import DEFAULT_DATATYPES

    p = verbs.add_parser("datatypes", help="the paper's data-type study: perplexity, zero-shot accuracy, bits/param",
                         description="Quantize one model to each data type and measure perplexity, mean zero-shot "
                         "accuracy and stored bits per parameter (paper Figure 3 / Table 2). TYPE[+dq][@BLOCKSIZE].")
    p.add_argument("--datatypes", default=",".join(DEFAULT_DATATYPES), help=f"default: {','.join(DEFAULT_DATATYPES)}")
    p.add_argument("--data", metavar="FILE", help="perplexity text (default: the shared WikiText-2 test text)")
    p.add_argument("--window", type=int, default=1024, help="perplexity window, no overlap (default: 1024)")
    p.add_argument("--max-tokens", type=int, default=8192, help="perplexity on the first N tokens (default: 8192)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="zero-shot tasks, '' for none (default: all five)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw perplexity and accuracy against bits/param")
    p.add_argument("--markdown", metavar="FILE.md", help="also write the table as markdown")
    add_quant_args(p, quant=False)
    add_common(p, "first N questions of each zero-shot task (default: 50)")
    p.set_defaults(func=_run_datatypes, limit=50)


def _run_datatypes(args) -> int:
    from .. import hf
    from ..evaluate import datatypes as D
    from ..evaluate.choice import data_dir, load_task
    from ..evaluate.perplexity import read_text, tokenize
    from ..precision import resolve, torch_dtype
    from ..quant.spec import UNQUANTIZED, QuantSpec

    dtypes = [D.parse_datatype(s) for s in _csv(args.datatypes)]
    tasks = dict(load_task(t, args.limit) for t in _csv(args.tasks))
    text = read_text(args.data or str(data_dir() / "ppl" / "wikitext2_raw_test.txt"))
    # quantized from weights in the compute dtype, as `hf.load` does: each row equals `qlora eval perplexity`
    args.dtype = resolve(args.dtype, args.device)
    base, tokenizer = hf.load(args.model, QuantSpec(UNQUANTIZED), compute_dtype=torch_dtype(args.dtype),
                              device=args.device)
    ids = tokenize(tokenizer, text, args.max_tokens or None)
    rows = D.study(base, tokenizer, dtypes, ids, tasks, args.window, args.adapters, torch_dtype(args.dtype),
                   args.batch_size, args.progress, log=lambda line: print(line, file=sys.stderr, flush=True))
    table = D.table(rows)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    if args.plot:
        D.plot(rows, args.plot, f"{base.qlora_source}: data types")
        print(f"wrote {args.plot}", file=sys.stderr)
    payload = dict(model=base.qlora_source, adapters=args.adapters, dtype=args.dtype, ppl_tokens=len(ids),
                   window=args.window, tasks=list(tasks), limit=args.limit, rows=rows)
    return finish(args, payload, table)


# ---- generation ----

def _register_generate(verbs) -> None:
    p = verbs.add_parser("generate",
                         help="answer a prompt set (Vicuna-bench JSONL or prompt/question/instruction rows)",
                         description="Answers go through the chat template; one JSONL row per prompt with the "
                         "answer and the settings used, ready for `qlora eval judge`.")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="prompt set (default: the shared vicuna_bench_80.jsonl)")
    p.add_argument("--name",
                   help="system name recorded in the answers (default: the adapter's directory name, or 'base')")
    add_quant_args(p)
    add_sampling_args(p)
    add_chat_format_arg(p)
    # one prompt at a time (qlora.generate decodes one conversation): no --batch-size
    add_common(p, "first N prompts", batch_size=None,
               output=("FILE.jsonl", "where to write the answers, one JSON object per line (required)"))
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from pathlib import Path

    from ..evaluate.choice import data_dir
    from ..evaluate.generation import answer_all, load_prompts
    from ..evaluate.report import markdown_table

    if not args.output:
        raise QloraError("give --output FILE.jsonl for the answers")
    prompts = load_prompts(args.prompts or str(data_dir() / "eval" / "vicuna_bench_80.jsonl"), args.limit)
    s = settings_from(args)
    name = args.name or (Path(args.adapters[-1]).resolve().name if args.adapters else "base")
    model, tokenizer = load(args)
    info = settings(model, args)
    rows = answer_all(model, tokenizer, prompts, s, name, args.output, info, args.progress)
    seconds = sum(r["seconds"] for r in rows)
    print(markdown_table(["system", "prompts", "mean answer chars", "seconds"],
                         [[name, len(rows), f"{sum(len(r['answer']) for r in rows) / len(rows):.0f}",
                           f"{seconds:.1f}"]]))
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ---- finetune vs finetune ----

def _register_compare(verbs) -> None:
    from ..evaluate.compare import METRICS

    p = verbs.add_parser("compare", help="two adapters on one held-out set, with a paired bootstrap 95%% interval",
                         description="Score adapters A and B (each on the base quantized as it was trained, unless "
                         "--quant-type says otherwise; 'base' = no adapter) on the same rows and report A - B.")
    p.add_argument("a", metavar="A", help="adapter directory, or 'base'")
    p.add_argument("b", metavar="B", help="adapter directory, or 'base'")
    p.add_argument("--data", required=True, metavar="FILE", help="held-out rows (alpaca / chat / completion / guanaco)")
    p.add_argument("--data-format", default="auto", help="row format (default: auto-detect)")
    p.add_argument("--metric", choices=METRICS, default="loss",
                   help="per-example answer loss or greedy exact match (default: loss)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer budget for exact match (default: 64)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="tokens per example for the loss (default: 1024)")
    p.add_argument("--rounds", type=int, default=10_000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    add_quant_args(p, adapters=False)
    add_common(p, "first N rows")
    p.set_defaults(func=_run_compare)


def _run_compare(args) -> int:
    from ..data import read_dataset
    from ..evaluate.compare import score, summarize
    from ..evaluate.report import markdown_table

    rows, fmt = read_dataset(args.data, args.data_format)
    rows = rows[: args.limit] if args.limit else rows
    scores, sides = [], []
    for side in (args.a, args.b):
        adapters = [] if side == "base" else [side]
        model, tokenizer = load(args, adapters)
        scores.append(score(model, tokenizer, rows, fmt, args.metric, args.max_seq_len, args.max_new_tokens,
                            args.batch_size, args.data, args.progress))
        sides.append(dict(settings(model, args, adapters), name=side, scores=scores[-1]))
        del model
    r = summarize(args.metric, scores[0], scores[1], args.rounds, args.seed)
    lo, hi = r["ci95"]
    table = markdown_table(["metric", "n", "A", "B", "A − B", "95% CI", "verdict"],
                           [[args.metric, r["n"], r["mean_a"], r["mean_b"], r["diff"], f"[{lo:.4f}, {hi:.4f}]",
                             r["verdict"]]])
    return finish(args, dict(a=sides[0], b=sides[1], data=args.data, format=fmt, **r), table)
