"""Process-wide CPU settings for long training and evaluation runs (the CLI and benchmarks apply them).

Two settings, both measured on this project's workloads (see ``docs/finetuning.md``, "Scaling"):

* **Flush denormals** (on). Scores decaying towards 0 along a chain pass through denormal floats
  (|x| < 1e-38), which are very slow on x86 CPUs; flushing them to 0 changes no reported digit.
* **Keep large tensors on the heap** (glibc only; **off** unless ``REFIT_GYM_HEAP_ALLOCATOR=1``).
  glibc serves every allocation above 32 MB with a fresh ``mmap`` and returns it with ``munmap``
  when freed, so every large temporary (a 512 rows x 28k items float tensor is 57 MB) is
  page-faulted in again each time it is created. With this setting ``mallopt`` serves large
  blocks from the heap and keeps freed memory for reuse. It is faster, but the heap ratchets up:
  torch asks for 64-byte aligned blocks, glibc serves such a request from a free chunk of at
  least the size plus 64 + 32 bytes, and the chunk a freed tensor leaves is a few bytes too
  small for the next request of the same size; so the request takes fresh memory, and the
  small allocations a training loop makes in between split the holes. A loop that allocates
  and frees two 64 MB tensors while keeping one small one grows by about a block per iteration
  without bound (``tests/test_runtime.py``); repeated ``agent.update`` on ML-1M's users x 10x its
  items (5,949 x 28,100, ``benchmarks/bench_memory.py``) grew from 2.6 to 3.3 GB in 5 updates
  and to 3.7 GB at update 19 of 30, holding 2.8 GB of free memory for 0.6 GB in use (glibc's
  default policy: 1.0-1.3 GB). Measured side by side (the same benchmark, DiffRec dims
  [200, 600], 3 x 2 runs alternating, one thread on a 2-core machine shared with another job):

  ===========================================================  ==========  ==========
  allocator                                                    s / update  peak RSS
  ===========================================================  ==========  ==========
  glibc's default (this module's default)                      31.5        2.7 GB
  heap (``REFIT_GYM_HEAP_ALLOCATOR=1``)                        23.5        4.4-4.5 GB
  glibc's default + ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``  27.3        2.5-2.6 GB
  ===========================================================  ==========  ==========

  So the heap policy is opt-in, for short runs on a machine with memory to spare. The last row
  keeps glibc's policy and backs its mmap-ed blocks with transparent huge pages (glibc >= 2.35,
  THP in ``madvise`` or ``always`` mode), which cuts the page faults without the growth; it has
  to be set in the environment before Python starts. Below 32 MB (e.g. ML-1M's 512 x 2,810
  tensors, 5.8 MB) glibc keeps freed blocks on the heap anyway: neither setting matters there.

The heap setting is process-wide and is not undone; it does nothing under another allocator
(jemalloc or tcmalloc through ``LD_PRELOAD``), and glibc still maps blocks larger than a thread
arena's 64 MB heap when they are allocated outside the main thread.
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
    """Apply the settings above; ``heap_allocator=None`` reads ``REFIT_GYM_HEAP_ALLOCATOR`` (default off).

    Returns what took effect, for logs and benchmark reports (``heap_allocator=False`` does not
    undo an earlier call).
    """
    flushing = bool(torch.set_flush_denormal(True))  # False on a CPU without flush-to-zero support
    if heap_allocator is None:
        heap_allocator = os.environ.get("REFIT_GYM_HEAP_ALLOCATOR", "0").strip().lower() not in {"", "0", "false", "no", "off"}
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
