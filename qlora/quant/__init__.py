"""The numerical core: 4-bit formats, blockwise quantization, Double Quantization. Imports torch only."""

from .codebooks import QUANT_TYPES, code4, derive_nf4, dynamic_map
from .spec import QuantSpec
from .state import QuantizedTensor, bits_per_parameter, dequantize, from_state_dict, quantize, to_state_dict

__all__ = [
    "QUANT_TYPES", "QuantSpec", "QuantizedTensor", "bits_per_parameter", "code4", "dequantize", "derive_nf4",
    "dynamic_map", "from_state_dict", "quantize", "to_state_dict",
]
