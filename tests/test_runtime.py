"""Process-wide CPU settings (refit_gym.runtime)."""

import platform

import pytest
import torch

from refit_gym.runtime import tune_cpu_runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_flush_denormal_is_on_and_the_allocator_switch_is_honoured():
    applied = tune_cpu_runtime(heap_allocator=False)
    assert applied["heap_allocator"] is False
    if applied["flush_denormal"]:  # False only on a CPU without flush-to-zero support
        assert torch.tensor([1e-40], dtype=torch.float32).item() == 0.0


@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("1", GLIBC), ("", GLIBC)])
def test_the_environment_variable_switches_the_heap_allocator(monkeypatch, value, expected):
    monkeypatch.setenv("REFIT_GYM_HEAP_ALLOCATOR", value)
    assert tune_cpu_runtime()["heap_allocator"] is expected


@pytest.mark.skipif(not GLIBC, reason="the heap policy is a glibc mallopt setting")
def test_large_tensors_still_allocate_and_free_under_the_heap_policy():
    assert tune_cpu_runtime(heap_allocator=True)["heap_allocator"] is True
    for _ in range(3):  # 64 MB blocks: above glibc's largest mmap threshold (32 MB)
        block = torch.ones(16 * 2**20)
        assert float(block.sum()) == 16 * 2**20
        del block
