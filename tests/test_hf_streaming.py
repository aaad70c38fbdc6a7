"""Streaming 4-bit load: peak memory is the 4-bit model plus one tensor; already-quantized
checkpoints reload without re-quantizing; the safetensors reader refuses damaged files."""

import json
import math
import subprocess
import sys

import pytest
import torch

from qlora import hf, safetensors_reader
from qlora.errors import QloraError
from qlora.export.bnb import save_quantized
from qlora.nn import Linear4bit
from qlora.nn.surgery import quant_of
from tiny import ARCHS

# In a fresh process: peak RSS before and after hf.load, and what the loaded model holds. VmHWM, not
# ru_maxrss: a child's ru_maxrss starts at its parent's RSS (kept across fork + exec), here pytest's.
_MEASURE = r"""
import json, sys
import torch
from transformers import LlamaForCausalLM  # noqa: F401  (imported before the baseline)
from qlora import hf
from qlora.nn import Linear4bit

def hwm():
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))

hf.load_tokenizer(sys.argv[1])
before = hwm()
model, _ = hf.load(sys.argv[1])
after = hwm()
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # 4-bit codes too
assert all(p.dtype == torch.uint8 for m in model.modules() if isinstance(m, Linear4bit)
           for p in (m.weight_data, m.weight_absmax))
print(json.dumps({"growth": after - before, "held": held}))
"""


def llama_shapes(vocab: int, hidden: int, inter: int, layers: int) -> dict[str, tuple]:
    """LLaMA's checkpoint keys and shapes (untied head, no biases)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    return shapes


def _write_llama(path, hidden=1024, inter=2816, layers=8, vocab=8000):
    """A 117M-parameter LLaMA checkpoint in bf16 (234 MB). The values repeat one random block
    (randn of the whole model would be most of the test's time)."""
    from safetensors.torch import save_file

    from tiny import tiny_tokenizer

    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    sd = {k: block.repeat(-(-math.prod(s) // block.numel()))[: math.prod(s)].view(s) if len(s) > 1
          else torch.ones(s, dtype=torch.bfloat16) for k, s in llama_shapes(vocab, hidden, inter, layers).items()}
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16, tie_word_embeddings=False)
    (path / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(str(path))
    return sum(t.numel() * 2 for t in sd.values()), max(t.numel() * 2 for t in sd.values())


def test_streaming_load_peak_is_4bit_model_plus_one_tensor(tmp_path):
    try:
        open("/proc/self/status").close()
    except OSError:
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    size16, largest = _write_llama(tmp_path)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    # 64 MiB: code pages of modules first imported by the load (kernels, modeling files) and Python objects
    assert m["growth"] <= m["held"] + largest + 64 * 2**20, (m, largest)
    assert m["held"] < 0.4 * size16  # the bound above is a real one: far below the 16-bit checkpoint
    assert m["growth"] < 0.6 * size16


@pytest.mark.parametrize("arch", ARCHS)
def test_save_quantized_reloads_same_codes_without_requantizing(tiny_dirs, tmp_path, monkeypatch, arch):
    model, tok = hf.load(tiny_dirs[arch])
    out = save_quantized(model, str(tmp_path / "q4"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"

    def no_quantize(*a, **k):
        raise AssertionError("a pre-quantized checkpoint must not be quantized again")

    monkeypatch.setattr(Linear4bit, "from_linear", no_quantize)
    again, _ = hf.load(str(out))
    assert quant_of(again).as_dict() == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    ours = {n: m.weight for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    theirs = {n: m.weight for n, m in again.named_modules() if isinstance(m, Linear4bit)}
    assert ours.keys() == theirs.keys() and ours
    for n, q in ours.items():
        assert torch.equal(q.data, theirs[n].data) and torch.equal(q.absmax, theirs[n].absmax)
    ids = torch.tensor([tok("The quick brown fox")["input_ids"]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds `t`, if any."""
    try:
        maps = open("/proc/self/maps").read().splitlines()
    except OSError:
        pytest.skip("no /proc/self/maps on this system")
    ptr = t.data_ptr()
    owner = [ln for ln in maps if int(ln.split()[0].split("-")[0], 16) <= ptr < int(ln.split()[0].split("-")[1], 16)]
    path = owner[0].split()[-1] if owner and len(owner[0].split()) > 5 else ""
    return path if path.startswith("/") else None  # not [heap], [anon:...]


def test_prequantized_codes_are_memory_mapped(tiny_llama, tmp_path):
    model, _ = hf.load(tiny_llama)
    out = save_quantized(model, str(tmp_path / "q4"))
    again, _ = hf.load(str(out))
    codes = next(m for m in again.modules() if isinstance(m, Linear4bit)).weight.data
    assert _mapped_file(codes).endswith("model.safetensors")


def test_16bit_load_maps_kept_tensors_and_copies_nothing_it_quantizes(tmp_path):
    from safetensors.torch import save_file

    sd = {"model.embed_tokens.weight": torch.randn(300, 64).bfloat16(), "model.norm.weight": torch.ones(64).bfloat16()}
    save_file(sd, str(tmp_path / "x.safetensors"))
    # embeddings (a step reads a few rows) and norms stay file-backed views when the dtype matches
    seen = {k: m for k, _, m in safetensors_reader.iter_tensors([tmp_path / "x.safetensors"], lambda k, d: True)}
    assert seen == {k: True for k in sd}
    model, _ = hf.load(str(_tiny_bf16(tmp_path)))
    assert _mapped_file(model.get_input_embeddings().weight).endswith(".safetensors")
    assert not any(_mapped_file(m.weight.data) for m in model.modules() if isinstance(m, Linear4bit))


def _tiny_bf16(tmp_path):
    from tiny import save_tiny, tiny_model

    d = tmp_path / "tiny_bf16"
    save_tiny(str(d))
    tiny_model().to(torch.bfloat16).save_pretrained(str(d))  # same dtype as the compute dtype: mapped
    return d


def test_save_quantized_refuses_unquantized_model(tiny_llama, tmp_path):
    model, _ = hf.load(tiny_llama, quant_type="bf16")
    with pytest.raises(QloraError, match="no 4-bit layers"):
        save_quantized(model, str(tmp_path / "q4"))


def test_reader_matches_safetensors_and_refuses_truncated_files(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(2, 2)}
    save_file(sd, str(tmp_path / "x.safetensors"))
    ref = load_file(str(tmp_path / "x.safetensors"))
    for map_if in (None, lambda name, dtype: name != "b"):
        got = {k: (v.clone(), mapped) for k, v,
               mapped in safetensors_reader.iter_tensors([tmp_path / "x.safetensors"], map_if)}
        assert got.keys() == ref.keys() and all(torch.equal(got[k][0], ref[k]) for k in ref)
        assert [got[k][1] for k in "abc"] == ([False] * 3 if map_if is None else [True, False, True])
    raw = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(QloraError, match="cut.safetensors: tensor"):
        safetensors_reader.read_header(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(QloraError, match="not a safetensors file"):
        safetensors_reader.read_header(tmp_path / "junk.safetensors")


def test_on_layer_sees_each_decoder_layer_once_complete(tiny_dirs):
    """hf.load calls on_layer as each decoder layer's last weight arrives (distributed.layer_sharder
    shards it there): every layer once, with nothing left on the meta device."""
    seen = []

    def on_layer(layer):
        assert not any(p.is_meta for p in layer.parameters())
        assert any(isinstance(m, Linear4bit) for m in layer.modules())
        seen.append(layer)

    model, _ = hf.load(tiny_dirs["llama"], on_layer=on_layer)
    _, layers = hf.decoder_layers(model)
    assert len(seen) == len(layers) == model.config.num_hidden_layers
    assert all(a is b for a, b in zip(seen, layers))
