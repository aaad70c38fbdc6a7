"""qlora: finetune 4-bit quantized LLMs with LoRA (Dettmers et al., 2023), CPU-first."""

__version__ = "0.1.0"

from .quiet import silence_known_noise  # noqa: E402

silence_known_noise()  # before transformers (and through it torchao) is imported

from .quant import (  # noqa: E402
    QuantizedTensor,
    bits_per_parameter,
    dequantize,
    from_state_dict,
    quantize,
    to_state_dict,
)

__all__ = ["QuantizedTensor", "bits_per_parameter", "dequantize", "from_state_dict", "quantize", "to_state_dict",
           "__version__"]
