"""QuantSpec: QLoRA's defaults once, the spelling results use, the dict adapters record."""

import pytest
import torch

from qlora.nn.surgery import quant_formats, quant_of, quantize_model
from qlora.quant.spec import DEFAULT, QuantSpec


def test_defaults_names_and_records():
    assert (DEFAULT.quant_type, DEFAULT.blocksize, DEFAULT.double_quant) == ("nf4", 64, True)
    assert DEFAULT.name == "nf4+dq@64" and QuantSpec("fp4", 128, False).name == "fp4@128"
    assert QuantSpec("bf16").name == "bf16" and not QuantSpec("bf16").quantized
    assert DEFAULT.as_dict() == {"quant_type": "nf4", "blocksize": 64, "double_quant": True}
    assert QuantSpec("bf16").as_dict() == {"quant_type": "bf16"}
    assert QuantSpec.from_dict({"quant_type": "fp4", "blocksize": 256}) == QuantSpec("fp4", 256, True)
    assert QuantSpec.from_dict(None) == DEFAULT  # an adapter trained elsewhere: QLoRA's defaults
    assert DEFAULT.replace(blocksize=32, quant_type=None) == QuantSpec("nf4", 32, True)


@pytest.mark.parametrize("bad, match", [(QuantSpec("nf5"), "quant_type"), (QuantSpec(blocksize=48), "blocksize")])
def test_check_names_the_bad_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        bad.check()


def test_format_is_read_from_the_layers():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    assert quant_of(net) == QuantSpec("bf16") and quant_formats(net) == set()
    quantize_model(net, QuantSpec("fp4", 32, False), torch.float32)
    assert quant_of(net) == QuantSpec("fp4", 32, False)
