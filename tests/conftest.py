"""Shared fixtures: tiny random model directories (built offline from transformers configs)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def shared_data(rel: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"shared data not available: {p} (CI and development machines have ../shared beside the repo)")
    return p


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> directory of a saved tiny random model (+ byte tokenizer)."""
    from tiny import ARCHS, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(str(root / arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    return tiny_dirs["llama"]


# The kernel builds the tests run: this CPU's own (-march=native: AVX-512 where it has it), AVX2
# (-march=x86-64-v3, as QLORA_CPU_TARGET=x86-64-v3 builds it) and the portable scalar one.
KERNEL_BUILDS = {"native": "native", "avx2": "x86-64-v3", "portable": "portable"}


def kernel_build(name: str):
    """The compiled CPU kernels of build `name` (KERNEL_BUILDS), or skip the test with the reason."""
    from qlora.quant import fast

    if name == "avx2" and not (platform.machine().lower() in ("x86_64", "amd64") and fast.cpu_supports("avx2")):
        pytest.skip("the avx2 build needs an x86-64 CPU with AVX2, FMA and F16C")
    built = fast.kernels(target=KERNEL_BUILDS[name])
    if built is None:
        pytest.skip(f"the {name} CPU kernels could not be built here (no C++ compiler?)")
    return built


@pytest.fixture(scope="module", params=list(KERNEL_BUILDS))
def k(request):
    """Every build of the compiled CPU kernels this CPU can run: native, avx2 and portable."""
    return kernel_build(request.param)
