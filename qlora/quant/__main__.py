"""`python -m qlora.quant --build [--portable]`: compile the CPU quantization kernels now (in an image,
in CI) instead of on first use; prints where the library went, or the compiler's error."""

import sys
import time

from .fast import kernels
from .fast.library import build, cpu_target


def main(argv: list[str]) -> int:
    if argv[:1] != ["--build"] or not set(argv[1:]) <= {"--portable"}:
        print("usage: python -m qlora.quant --build [--portable]   (target: $QLORA_CPU_TARGET, default native)",
              file=sys.stderr)
        return 2
    target = cpu_target(portable="--portable" in argv)
    t0 = time.perf_counter()
    try:
        path = build(target=target)
    except (OSError, RuntimeError) as e:
        print(f"qlora: building the CPU kernels failed; qlora will use the PyTorch reference.\n{e}",
              file=sys.stderr)
        return 1
    k = kernels(target=target)
    kind = "unavailable on this CPU" if k is None else k.isa
    print(f"qlora CPU kernels (target {target}, ISA {kind}): {path} ({time.perf_counter() - t0:.1f} s)")
    return 0 if k is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
