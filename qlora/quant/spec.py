"""QuantSpec: the three settings that define a 4-bit format, with QLoRA's defaults written once.

NF4 with 64-weight blocks and Double Quantization is the paper's choice (section 3); quant_type
"bf16" means "left unquantized" (plain LoRA), and then the other two settings do not apply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .blockwise import BLOCKSIZES
from .codebooks import QUANT_TYPES

UNQUANTIZED = "bf16"


@dataclass(frozen=True, order=True)
class QuantSpec:
    quant_type: str = "nf4"
    """One of quant.QUANT_TYPES, or "bf16" (unquantized)."""
    blocksize: int = 64
    """Weights per absmax block (one of BLOCKSIZES)."""
    double_quant: bool = True
    """Quantize the block scales to 8 bits too."""

    @property
    def quantized(self) -> bool:
        return self.quant_type != UNQUANTIZED

    @property
    def name(self) -> str:
        """'nf4+dq@64', 'fp4@128', 'bf16'."""
        if not self.quantized:
            return UNQUANTIZED
        return f"{self.quant_type}{'+dq' if self.double_quant else ''}@{self.blocksize}"

    def as_dict(self) -> dict:
        """What results and adapter headers record: the three settings, or only the type when unquantized."""
        return dataclasses.asdict(self) if self.quantized else {"quant_type": self.quant_type}

    def replace(self, **changes) -> QuantSpec:
        """A copy with the settings that are not None in `changes` replaced (None: keep this one's)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, d) -> QuantSpec:
        """The spec a recorded dict describes; missing or unknown keys keep the defaults."""
        if not isinstance(d, dict):
            return cls()
        return cls().replace(**{k: d.get(k) for k in ("quant_type", "blocksize", "double_quant")})

    def check(self) -> None:
        """ValueError naming the bad setting."""
        if self.quant_type != UNQUANTIZED and self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)} or {UNQUANTIZED}, "
                             f"got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be a power of two in {BLOCKSIZES[0]}..{BLOCKSIZES[-1]}, "
                             f"got {self.blocksize}")


DEFAULT = QuantSpec()
