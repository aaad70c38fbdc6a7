"""`python -m qlora.quant --build`: compile the CPU quantization kernels now (in an image, in CI)
instead of on first use; prints where the library went, or the compiler's error."""

import sys

from .fast import main

sys.exit(main(sys.argv[1:]))
