"""`--format gguf-lora`: the adapter alone as llama.cpp's GGUF LoRA file.

llama.cpp applies such a file live as W x + (alpha / r) · B (A x), with r read from lora_b and the
base tensor found by name. The check here is that identity against our own merged GGUF export
(tested to reload through transformers in test_export.py): for every layer, the merged f16 tensor
equals the base-only f16 tensor + (alpha / r) · B A from the LoRA file, names, orientation and
llama's q/k row permutation included. Tolerance 5e-4 absolute: three f16 roundings (merged, base,
factors) of weights ~0.1, each half an f16 spacing (2^-14 at 0.1); measured 7e-5. A wrong q/k
permutation or alpha is off by ~1e-2 and more.
"""

import numpy as np
import pytest

from qlora.cli import main
from qlora.errors import QloraError
from qlora.export import export
from tiny import save_tiny_adapter

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_adapter(tmp_path_factory.mktemp("gguf-lora"))


def tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, dtype=np.float64) for t in gguf.GGUFReader(str(path)).tensors}


def field(path, key):
    f = gguf.GGUFReader(str(path)).fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else float(value[0])


@pytest.mark.parametrize("variant", ["lora", "rslora"])
def test_lora_file_plus_base_equals_the_merged_export(tmp_path, variant):
    model, adapter = save_tiny_adapter(tmp_path, seed=1, rslora=variant == "rslora")
    out = tmp_path / "adapter.gguf"
    summary = export(model, [adapter], str(out), "gguf-lora")
    export(model, [], str(tmp_path / "base.gguf"), "gguf-f16")
    export(model, [adapter], str(tmp_path / "merged.gguf"), "gguf-f16")
    base, merged, lora = tensors(tmp_path / "base.gguf"), tensors(tmp_path / "merged.gguf"), tensors(out)
    scale = 8 / 4 if variant == "lora" else 8 / 2  # alpha / r, or alpha / sqrt(r)
    assert summary == {"output": str(out), "format": "gguf-lora", "layers": 14, "r": 4, "alpha": scale * 4}
    assert field(out, "general.type") == "adapter" and field(out, "adapter.type") == "lora"
    assert field(out, "general.architecture") == "llama" and field(out, "adapter.lora.alpha") == scale * 4
    targets = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert len(targets) == 14 and set(lora) == {f"{t}.lora_{s}" for t in targets for s in "ab"}
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"} <= targets
    changed = {name for name in merged if np.abs(merged[name] - base[name]).max() > 1e-2}
    assert changed == targets  # the adapter touches exactly the tensors it names
    alpha = field(out, "adapter.lora.alpha")
    for t in targets:
        a, b = lora[f"{t}.lora_a"], lora[f"{t}.lora_b"]  # (r, in), (out, r) as llama.cpp wants them
        alpha_over_r = alpha / b.shape[1]  # llama.cpp: r is lora_b's ne[0]
        np.testing.assert_allclose(base[t] + alpha_over_r * (b @ a), merged[t], rtol=0, atol=5e-4, err_msg=t)


def test_refusals_name_the_problem(tiny, tmp_path):
    model, adapter = tiny
    with pytest.raises(QloraError, match="exactly one --adapter"):
        export(model, [], str(tmp_path / "a.gguf"), "gguf-lora")
    with pytest.raises(QloraError, match="exactly one --adapter"):
        export(model, [adapter, adapter], str(tmp_path / "a.gguf"), "gguf-lora")
    with pytest.raises(QloraError, match="ending in .gguf"):
        export(model, [adapter], str(tmp_path / "a"), "gguf-lora")
    for kind, match, setting in (("dora", "DoRA", dict(dora=True)), ("huge", "f16's range", dict(b_scale=1e6))):
        (tmp_path / kind).mkdir()
        model, adapter = save_tiny_adapter(tmp_path / kind, **setting)
        with pytest.raises(QloraError, match=match):
            export(model, [adapter], str(tmp_path / f"{kind}.gguf"), "gguf-lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora", "huge"]  # nothing written


def test_export_command_writes_the_file(tiny, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    argv = ["export", "--format", "gguf-lora", "--model", tiny[0], "--adapter", tiny[1], "--output-dir", str(out)]
    assert main(argv) == 0 and out.is_file()
    assert '"format": "gguf-lora"' in capsys.readouterr().out
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # kept, not overwritten
