"""`qlora eval ...` end to end on a tiny random model, in process."""

import json
import math

import pytest
import torch

from qlora.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("evaldata")
    (root / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8, encoding="utf-8")
    (root / "mc.jsonl").write_text(
        '{"query": "Sky is", "choices": ["blue", "green apples"], "gold": 0}\n'
        '{"query": "Two plus two is", "choices": ["four", "five", "six"], "gold": 0}\n'
        '{"query": "Ice is", "choices": ["cold", "hot"], "gold": 0}\n', encoding="utf-8")
    (root / "prompts.jsonl").write_text(
        '{"question_id": 1, "category": "generic", "turns": ["Hi?"]}\n'
        '{"question_id": 2, "category": "math", "turns": ["1+1?"]}\n', encoding="utf-8")
    (root / "heldout.jsonl").write_text(
        '{"instruction": "Say yes", "input": "", "output": "yes"}\n'
        '{"instruction": "Add", "input": "1+1", "output": "2"}\n'
        '{"instruction": "Color of sky", "input": "", "output": "blue"}\n', encoding="utf-8")
    eval_dir = root / "eval"
    eval_dir.mkdir()
    def row(q, i):
        return {"subject": "algebra", "question": q, "choices": ["1", "2", "3", "4"], "answer": i % 4}

    dev = [row(f"d{i}?", i) for i in range(5)]
    test = [row(f"t{i}?", i) for i in range(3)]
    (eval_dir / "mmlu_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    (eval_dir / "mmlu_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_dir):
    """A freshly initialised adapter (B = 0: the base model exactly) and a trained-looking one."""
    from qlora import hf
    from qlora.adapters import save_adapter
    from qlora.nn.surgery import lora_layers

    root = tmp_path_factory.mktemp("adapters")
    net, _ = hf.load(tiny_dir, lora=dict(r=4, alpha=8.0, dropout=0.0))
    save_adapter(net, str(root / "zero"), tiny_dir)
    torch.manual_seed(0)
    for layer in lora_layers(net).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    save_adapter(net, str(root / "tuned"), tiny_dir)
    return {"zero": str(root / "zero"), "tuned": str(root / "tuned")}


def _run(args, capsys):
    rc = main(["eval", *args, "--no-progress"] if args[0] != "elo" else ["eval", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_perplexity(tiny_dir, files, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    rc, stdout, _ = _run(["perplexity", "--model", tiny_dir, "--data", str(files / "text.txt"), "--window", "32",
                          "--stride", "16", "--max-tokens", "200", "--output", str(out)], capsys)
    assert rc == 0 and "perplexity" in stdout
    r = json.loads(out.read_text())
    assert r["tokens"] == 199 and r["quant"]["quant_type"] == "nf4" and r["stride"] == 16
    assert r["perplexity"] == pytest.approx(math.exp(r["nll"])) and 1 < r["perplexity"] < 1000


def test_choice_and_mmlu(tiny_dir, files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mc.json"
    rc, stdout, _ = _run(["choice", "--model", tiny_dir, "--tasks", str(files / "mc.jsonl"), "--limit", "2",
                          "--quant-type", "bf16", "--output", str(out)], capsys)
    r = json.loads(out.read_text())
    assert rc == 0 and r["tasks"][0]["n"] == 2 and r["quant"] == {"quant_type": "bf16"} and "| mean |" in stdout
    monkeypatch.setenv("QLORA_DATA", str(files))
    out = tmp_path / "mmlu.json"
    rc, stdout, _ = _run(["mmlu", "--model", tiny_dir, "--limit", "2", "--output", str(out)], capsys)
    r = json.loads(out.read_text())
    assert rc == 0 and r["n"] == 2 and set(r["subjects"]) == {"algebra"} and "all questions" in stdout


def _expected_bits(net, blocksize, dq):
    from qlora.nn.surgery import linear_names

    bits = params = 0
    for name in linear_names(net):
        n = net.get_submodule(name).weight.numel()
        blocks = -(-n // blocksize)
        bits += 4 * n + (8 * blocks + 32 + 32 * -(-blocks // 256) if dq else 32 * blocks)
        params += n
    return bits / params


def test_datatypes_table_plot_and_bits(tiny_dir, files, tmp_path, capsys):
    from qlora import hf

    out, png, md = tmp_path / "dt.json", tmp_path / "dt.png", tmp_path / "dt.md"
    rc, stdout, _ = _run(["datatypes", "--model", tiny_dir, "--datatypes", "bf16,nf4+dq,int4@128", "--data",
                          str(files / "text.txt"), "--max-tokens", "96", "--window", "32", "--tasks",
                          str(files / "mc.jsonl"), "--limit", "2", "--plot", str(png), "--markdown", str(md),
                          "--output", str(out), "--dtype", "bf16"], capsys)  # the 16-bit baseline row: 16 bits
    rows = {r["datatype"]: r for r in json.loads(out.read_text())["rows"]}
    assert rc == 0 and png.stat().st_size > 1000 and md.read_text().startswith("| data type |")
    base, _ = hf.load(tiny_dir, quant_type="bf16")
    assert rows["bf16"]["bits_per_param"] == 16.0
    assert rows["nf4+dq@64"]["bits_per_param"] == pytest.approx(_expected_bits(base, 64, True))
    assert rows["int4@128"]["bits_per_param"] == pytest.approx(4.25)  # 4 + 32/128: no DQ, blocks fill exactly
    assert rows["int4@128"]["zero_shot"].keys() == {"mc"} and "nf4+dq@64" in stdout


def test_generate_judge_elo(tiny_dir, files, adapters, tmp_path, capsys):
    answers = []
    for name, extra in (("base", []), ("tuned", ["--adapter", adapters["tuned"]])):
        path = tmp_path / f"{name}.jsonl"
        rc, _, _ = _run(["generate", "--model", tiny_dir, *extra, "--prompts", str(files / "prompts.jsonl"),
                         "--max-new-tokens", "3", "--name", name, "--output", str(path)], capsys)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rc == 0 and [r["question_id"] for r in rows] == [1, 2] and rows[0]["settings"]["max_new_tokens"] == 3
        assert rows[0]["name"] == name and rows[0]["prompt"] == "Hi?" and isinstance(rows[0]["answer"], str)
        answers.append(str(path))
    out = tmp_path / "judge.json"
    rc, stdout, _ = _run(["judge", *answers, "--judge", "local", "--model", tiny_dir, "--quant-type", "bf16",
                          "--rounds", "100", "--output", str(out)], capsys)
    r = json.loads(out.read_text())
    judgments = tmp_path / "judge.judgments.jsonl"
    assert rc == 0 and len(judgments.read_text().splitlines()) == 4  # 2 questions x 1 pair x 2 orders
    assert {x["model"] for x in r["ratings"]} <= {"base", "tuned"} and "Elo" in stdout
    rc, stdout, _ = _run(["elo", str(judgments), "--rounds", "100", "--output", str(tmp_path / "elo.json")], capsys)
    assert rc == 0 and json.loads((tmp_path / "elo.json").read_text())["ratings"] == r["ratings"]


def test_compare_adapters(tiny_dir, files, adapters, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    rc, _, _ = _run(["compare", adapters["zero"], "base", "--model", tiny_dir, "--data", str(files / "heldout.jsonl"),
                     "--rounds", "200", "--output", str(out)], capsys)
    r = json.loads(out.read_text())
    assert rc == 0 and r["a"]["scores"] == r["b"]["scores"] and r["diff"] == 0.0 and r["ci95"] == [0.0, 0.0]
    rc, stdout, _ = _run(["compare", adapters["tuned"], "base", "--model", tiny_dir, "--data",
                          str(files / "heldout.jsonl"), "--rounds", "200", "--output", str(out)], capsys)
    r = json.loads(out.read_text())
    assert rc == 0 and r["diff"] != 0.0 and r["n"] == 3 and "95% CI" in stdout
    rc, _, _ = _run(["compare", adapters["zero"], "base", "--model", tiny_dir, "--data", str(files / "heldout.jsonl"),
                     "--metric", "exact_match", "--max-new-tokens", "2", "--rounds", "50", "--output", str(out)],
                    capsys)
    r = json.loads(out.read_text())
    assert rc == 0 and r["metric"] == "exact_match" and r["a"]["scores"] == r["b"]["scores"]


def test_errors_are_one_line(tiny_dir, tmp_path, capsys):
    rc, _, err = _run(["perplexity", "--model", tiny_dir, "--data", str(tmp_path / "nope.txt")], capsys)
    assert rc == 2 and err.strip().startswith("qlora eval: error:") and "nope.txt" in err and err.count("\n") == 1
    rc, _, err = _run(["datatypes", "--model", tiny_dir, "--datatypes", "nf5"], capsys)
    assert rc == 2 and "data type 'nf5'" in err
    rc, _, err = _run(["judge", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], capsys)
    assert rc == 2 and "a.jsonl" in err


@pytest.mark.parametrize("verb", ["generate", "judge"])
def test_one_at_a_time_verbs_offer_no_batch_size(verb, capsys):
    """generate decodes one conversation at a time and a local judge one pair at a time: an option
    they would ignore is not offered; generate's --output is the JSONL file it writes."""
    with pytest.raises(SystemExit) as e:
        main(["eval", verb, "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--batch-size" not in text
    if verb == "generate":
        assert "--output FILE.jsonl" in text and "one JSON object per line" in text
    with pytest.raises(SystemExit) as e:
        main(["eval", verb, "x.jsonl", "--batch-size", "4"] if verb == "judge" else ["eval", verb, "--batch-size", "4"])
    assert e.value.code == 2 and "unrecognized arguments: --batch-size 4" in capsys.readouterr().err


def test_batching_verbs_keep_batch_size(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "choice", "--help"])
    assert "--batch-size" in capsys.readouterr().out
