"""common/device.py: native bf16 read from the CPU's flags, and the CPU thread rules."""
from __future__ import annotations

import torch

from common.device import cpu_native_bf16, model_threads, torch_threads


def test_native_bf16_comes_from_the_cpu_flags():
    assert cpu_native_bf16("processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n") == "avx512_bf16"
    assert cpu_native_bf16("flags : fpu amx_tile amx_bf16 avx512f\n") == "amx_bf16"
    assert cpu_native_bf16("flags : fpu sse avx avx2 fma\n") is None       # AVX2 only: bf16 is emulated
    assert cpu_native_bf16("no flags line at all\n") is None


def test_the_model_gets_the_cores_the_other_stages_leave():
    assert model_threads(2) == 1 and model_threads(16) == 15
    assert model_threads(16, beside=8) == 8 and model_threads(1) == 1 and model_threads(2, beside=4) == 1


def test_torch_threads_are_put_back():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
