"""The data-type study's plot (qlora.evaluate.datatypes.plot)."""

from qlora.evaluate.datatypes import plot


def _row(name, quant_type, bits, ppl, acc):
    return dict(datatype=name, quant_type=quant_type, bits_per_param=bits, perplexity=ppl, zero_shot_mean=acc)


def test_plot_gives_coinciding_points_one_label(tmp_path):
    # on a 10-question subset two formats often tie exactly: one "a = b" label, not two printed over each other
    rows = [_row("bf16", "bf16", 16.0, 29.2, 0.50), _row("nf4@64", "nf4", 4.5, 37.1, 0.52),
            _row("fp4@64", "fp4", 4.5, 41.3, 0.52), _row("int4@64", "int4", 4.5, 42.4, 0.44)]
    fig = plot(rows, str(tmp_path / "dt.png"))
    ppl_ax, acc_ax = fig.axes
    assert sorted(t.get_text() for t in ppl_ax.texts) == ["fp4@64", "int4@64", "nf4@64"]
    assert sorted(t.get_text() for t in acc_ax.texts) == ["int4@64", "nf4@64 = fp4@64"]
    assert (tmp_path / "dt.png").stat().st_size > 1000


def test_lora_init_rows_measure_q_plus_ba_at_step_0(tiny_llama):
    import pytest
    import torch

    from qlora import hf
    from qlora.errors import QloraError
    from qlora.evaluate.datatypes import DataType, parse_datatype, quantized_copy
    from qlora.nn.surgery import lora_layers
    from qlora.quant.spec import QuantSpec

    dt = parse_datatype("bof4+dq/pissa4")
    assert dt == DataType(QuantSpec("bof4", 64, True), "pissa", 4) and dt.name == "bof4+dq@64/pissa4"
    for bad in ("bf16/loftq4", "nf4/loftq0", "nf4/svd4"):
        with pytest.raises(QloraError, match=r"TYPE\[\+dq\]\[@BLOCKSIZE\]\[/loftqR\|/pissaR\]"):
            parse_datatype(bad)
    base, _ = hf.load(tiny_llama, quant_type="bf16", compute_dtype=torch.float32)
    plain = quantized_copy(base, parse_datatype("nf4+dq"), torch.float32)
    for spec in ("nf4+dq/loftq4", "nf4+dq/pissa4"):
        net = quantized_copy(base, parse_datatype(spec), torch.float32)
        layers = lora_layers(net)
        assert len(layers) == 14 and all(layer.r == 4 and layer.dropout == 0.0 for layer in layers.values())
        for name, layer in layers.items():
            w = base.get_submodule(name).weight
            plain_error = (w - plain.get_submodule(name).dequantized_weight(torch.float32)).norm()
            assert (w - layer.merge(torch.float32).weight).norm() < plain_error


def test_bf16_row_rounds_weights_to_bf16_whatever_the_compute_dtype():
    # under --compute-dtype auto an AVX2 CPU computes in fp32: the "bf16" row must still be bf16 weights
    import torch

    from qlora.evaluate.datatypes import parse_datatype, quantized_copy

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8))
    net = quantized_copy(base, parse_datatype("bf16"), torch.float32)
    w = base[0].weight.detach()
    assert net[0].weight.dtype == torch.float32
    assert torch.equal(net[0].weight, w.bfloat16().float()) and not torch.equal(net[0].weight, w)


def test_bf16_row_reports_16_bits_under_an_fp32_compute_dtype(tiny_llama):
    import torch

    from qlora import hf
    from qlora.evaluate.datatypes import linear_bits, parse_datatype, quantized_copy, study

    base, _ = hf.load(tiny_llama, quant_type="bf16", compute_dtype=torch.float32)
    ids = torch.arange(1, 33) % 50
    rows = study(base, None, [parse_datatype("bf16"), parse_datatype("nf4+dq")], ids, {}, window=16,
                 compute_dtype=torch.float32, progress=False, log=lambda *_: None)
    assert rows[0]["bits_per_param"] == 16.0
    assert rows[1]["bits_per_param"] == linear_bits(quantized_copy(base, parse_datatype("nf4+dq"), torch.float32))[0]
    assert 4.12 < rows[1]["bits_per_param"] < 4.2  # codes + 8-bit scales + DQ constants, not the fp32 compute copy
