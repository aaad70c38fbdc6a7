import pytest

from qlora.quant import fast


@pytest.fixture(scope="module", params=["simd", "portable"])
def k(request) -> fast.CpuKernels:
    """Both builds of the compiled CPU kernels (AVX-512 and portable scalar)."""
    built = fast.kernels(portable=request.param == "portable")
    if built is None:
        pytest.skip("the CPU kernels could not be built here (no C++ compiler?)")
    if request.param == "simd" and not built.simd:
        pytest.skip("no AVX-512 on this CPU/compiler: only the portable kernels exist")
    return built
