"""Process-wide CPU settings for long training and evaluation runs (the CLI and benchmarks apply them).

Two settings, both measured on this project's workloads (see ``docs/finetuning.md``, "Scaling"):

* **Flush denormals.** Scores decaying towards 0 along a chain pass through denormal floats
  (|x| < 1e-38), which are very slow on x86 CPUs; flushing them to 0 changes no reported digit.
* **Keep large tensors on the heap (glibc only).** glibc serves every allocation above 32 MB with
  a fresh ``mmap`` and returns it with ``munmap`` when freed, so every large temporary is
  page-faulted in again, page by page, each time it is created. A (512 rows x 28k items) float
  tensor is 57 MB: at 10x ML-1M's item count a fine-tuning update took 11.4 s with glibc's
  default policy and 9.4 s with this one (``benchmarks/bench_scaling.py``). ``mallopt`` is told to serve large blocks from the heap and to keep freed
  memory for reuse (the same policy as PyTorch's CUDA caching allocator); the cost is that the
  process keeps its peak resident memory until it exits.

Set ``REFIT_GYM_HEAP_ALLOCATOR=0`` to keep glibc's default allocator policy (``bench_scaling.py``
takes ``--no-heap-allocator`` to measure the difference). The setting is process-wide and is not
undone; it does nothing under another allocator (jemalloc or tcmalloc through ``LD_PRELOAD``),
and glibc still maps blocks larger than a thread arena's 64 MB heap when they are allocated
outside the main thread.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_FREED_BYTES = 2**31 - 1  # mallopt takes a C int: give freed heap memory back only above 2 GiB


def use_heap_for_large_tensors() -> bool:
    """Ask glibc's allocator to serve large blocks from the heap and to keep freed memory.

    Returns whether the setting took effect (False on a non-glibc platform, where it is a no-op).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the trim threshold first: if it fails, large blocks stay mmap-ed, i.e. nothing changed
    return mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES) == 1 and mallopt(_M_MMAP_MAX, 0) == 1


def tune_cpu_runtime(heap_allocator: bool | None = None) -> dict[str, bool]:
    """Apply the settings above; ``heap_allocator=None`` reads ``REFIT_GYM_HEAP_ALLOCATOR`` (default on).

    Returns what took effect, for logs and benchmark reports (``heap_allocator=False`` does not
    undo an earlier call).
    """
    flushing = bool(torch.set_flush_denormal(True))  # False on a CPU without flush-to-zero support
    if heap_allocator is None:
        heap_allocator = os.environ.get("REFIT_GYM_HEAP_ALLOCATOR", "1").strip().lower() not in {"0", "false", "no", "off"}
    return {"flush_denormal": flushing, "heap_allocator": use_heap_for_large_tensors() if heap_allocator else False}


PRECISIONS = ("fp32", "bf16")
"""Compute precisions of the chain and the agents: ``fp32`` (default), or ``bf16`` autocast
(matrix products in bfloat16; states, rewards and metrics stay float32)."""


def autocast(precision: str, device: torch.device | str):
    """A context computing under ``precision`` on ``device``'s type (``fp32``: nothing changes)."""
    import contextlib

    if precision not in PRECISIONS:
        from refit_gym.errors import ConfigError

        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
