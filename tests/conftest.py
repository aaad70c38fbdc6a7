"""Shared fixtures: tiny random model directories (built offline from transformers configs)."""

from __future__ import annotations

import os
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
    from qlora.tiny import ARCHS, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(str(root / arch), arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(scope="module", params=["simd", "portable"])
def k(request):
    """Both builds of the compiled CPU kernels (AVX-512 and portable scalar)."""
    from qlora.quant import fast

    built = fast.kernels(portable=request.param == "portable")
    if built is None:
        pytest.skip("the CPU kernels could not be built here (no C++ compiler?)")
    if request.param == "simd" and not built.simd:
        pytest.skip("no AVX-512 on this CPU/compiler: only the portable kernels exist")
    return built
