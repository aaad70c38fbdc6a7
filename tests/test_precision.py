"""What `--compute-dtype auto` picks, for simulated CPUs (so the test does not depend on this one)."""

from __future__ import annotations

import pytest

from qlora import precision

X86 = {"avx2", "fma", "f16c"}
AVX512 = X86 | {"avx512f", "avx512bw"}


@pytest.fixture
def cpu(monkeypatch):
    """Set the machine, its flags and the oneDNN cap that auto_choice sees."""
    def make(machine: str, flags: set[str], cap: str | None = None):
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)
        monkeypatch.setattr(precision, "_cpu_flags", lambda: set(flags))
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        precision.auto_choice.cache_clear()
    yield make
    precision.auto_choice.cache_clear()


@pytest.mark.parametrize("flags, cap, expected", [
    (X86, None, "float32"),
    (AVX512, None, "float32"),
    (AVX512 | {"avx512_bf16"}, None, "bfloat16"),
    (X86 | {"amx_bf16"}, None, "bfloat16"),
    (AVX512 | {"avx512_bf16"}, "avx2", "float32"),  # the AVX2 emulation on an AVX-512 machine
    (AVX512 | {"avx512_bf16"}, "AVX512_CORE_VNNI", "float32"),
    (AVX512 | {"avx512_bf16"}, "AVX512_CORE_BF16", "bfloat16"),
    (AVX512 | {"avx512_bf16"}, "ALL", "bfloat16"),
])
def test_x86_auto_follows_native_bf16_and_the_onednn_cap(cpu, flags, cap, expected):
    cpu("x86_64", flags, cap)
    choice, why = precision.auto_choice("cpu")
    assert choice == expected
    if cap and expected == "float32":
        assert f"ONEDNN_MAX_CPU_ISA={cap.upper()}" in why


def test_arm_without_bf16_instructions_is_fp32(cpu):
    cpu("aarch64", {"fp", "asimd"})
    assert precision.auto_choice("cpu")[0] == "float32"


@pytest.mark.parametrize("faster, expected", [(True, "bfloat16"), (False, "float32")])
def test_arm_with_bf16_follows_the_timed_probe(cpu, monkeypatch, faster, expected):
    cpu("aarch64", {"fp", "asimd", "bf16"})
    monkeypatch.setattr(precision, "_bf16_matmul_is_faster", lambda: faster)
    assert precision.auto_choice("cpu")[0] == expected


def test_resolve_announces_once_and_names_pass_through(cpu, monkeypatch, capsys):
    cpu("x86_64", X86)
    monkeypatch.setattr(precision, "_announced", set())
    assert precision.resolve("bf16") == "bfloat16"
    assert precision.resolve("auto", "cpu") == precision.resolve("auto", "cpu") == "float32"
    assert capsys.readouterr().err.count("compute dtype: float32 (auto: this AVX2 CPU") == 1


@pytest.mark.parametrize("saved, compute, resolved, expected", [
    ("auto", "auto", "float32", "bfloat16"),  # auto chose fp32: keep what a bf16 machine keeps
    ("auto", "auto", "bfloat16", "compute"),
    ("auto", "float32", "float32", "compute"),  # fp32 asked for: exact
    ("auto", "fp32", "float32", "compute"),
    ("compute", "auto", "float32", "compute"),
    ("bfloat16", "bfloat16", "bfloat16", "bfloat16"),
])
def test_saved_activations_auto_narrows_only_under_an_auto_fp32_choice(saved, compute, resolved, expected):
    assert precision.resolve_saved(saved, compute, resolved) == expected
