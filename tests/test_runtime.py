"""Process-wide CPU settings (refit_gym.runtime): what is applied, and what is reported.

The heap policy is a glibc ``mallopt`` setting that cannot be undone, so the tests that apply it
for real leave it on in the test process (the CLI applies it too). Flushing denormals is
switched back off after each test.
"""

import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch

from refit_gym import runtime
from refit_gym.runtime import tune_cpu_runtime, use_heap_for_large_tensors

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
HAS_MALLINFO2 = GLIBC and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
FLUSH_TO_ZERO_CPU = platform.machine().lower() in {"x86_64", "amd64", "aarch64", "arm64"}
BLOCK_BYTES = 64 * 2**20
"""A large tensor: above glibc's largest dynamic mmap threshold (32 MB on 64-bit)."""


_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: byte counts of the allocator's state."""

    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


def _mallinfo() -> _MallInfo2:
    """The allocator's counts: ``arena`` heap bytes, ``hblkhd`` mmap-ed bytes, ``uordblks`` /
    ``fordblks`` heap bytes in use / free."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo2
    return mallinfo2()


class _FakeMallopt:
    """Stands in for libc's ``mallopt``: records the calls and returns scripted results."""

    def __init__(self, results: list[int]) -> None:
        self.calls: list[tuple[int, int]] = []
        self._results = iter(results)

    def __call__(self, option: int, value: int) -> int:
        self.calls.append((option, value))
        return next(self._results)


class _FakeLibc:
    """Stands in for ``ctypes.CDLL("libc.so.6")``."""

    def __init__(self, results: list[int]) -> None:
        self.mallopt = _FakeMallopt(results)


@pytest.fixture(autouse=True)
def _flush_denormal_off_afterwards():
    """Flushing denormals is process-wide: leave it off (torch's default) for the next tests."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def fake_glibc(monkeypatch):
    """Pretend to be on glibc with a libc whose mallopt results the test scripts."""

    def install(results: list[int]) -> _FakeMallopt:
        libc = _FakeLibc(results)
        monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
        monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
        monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: libc)
        return libc.mallopt

    return install


@pytest.fixture
def heap_policy_spy(monkeypatch):
    """Replace use_heap_for_large_tensors by a spy reporting a sentinel outcome."""
    calls = []

    def spy() -> bool:
        calls.append(True)
        return True

    monkeypatch.setattr(runtime, "use_heap_for_large_tensors", spy)
    return calls


# --- mallopt: what is asked, and what is reported ---


def test_the_heap_policy_sets_the_trim_threshold_then_disables_mmap(fake_glibc):
    mallopt = fake_glibc([1, 1])
    assert use_heap_for_large_tensors() is True
    assert mallopt.calls == [(-1, 2**31 - 1), (-4, 0)]  # M_TRIM_THRESHOLD, then M_MMAP_MAX


@pytest.mark.parametrize(
    "results, expected_calls",
    [([0], 1), ([1, 0], 2)],
    ids=["trim threshold refused", "mmap max refused"],
)
def test_a_refused_mallopt_is_reported_as_not_applied(fake_glibc, results, expected_calls):
    mallopt = fake_glibc(results)
    assert use_heap_for_large_tensors() is False
    assert len(mallopt.calls) == expected_calls  # nothing more is asked once a setting is refused


def test_no_mallopt_outside_glibc(monkeypatch):
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: pytest.fail("libc must not be loaded"))
    assert use_heap_for_large_tensors() is False


# --- tune_cpu_runtime: the switch, and the report ---


@pytest.mark.parametrize(
    "value, requested",
    [("0", False), ("off", False), (" False ", False), ("no", False), ("", False), (None, False), ("1", True),
     (" on ", True), ("yes", True)],
)
def test_the_environment_variable_switches_the_heap_policy(monkeypatch, heap_policy_spy, value, requested):
    if value is None:
        monkeypatch.delenv("REFIT_GYM_HEAP_ALLOCATOR", raising=False)
    else:
        monkeypatch.setenv("REFIT_GYM_HEAP_ALLOCATOR", value)
    applied = tune_cpu_runtime()
    assert heap_policy_spy == ([True] if requested else [])
    assert applied["heap_allocator"] is requested


def test_the_argument_overrides_the_environment_variable(monkeypatch, heap_policy_spy):
    monkeypatch.setenv("REFIT_GYM_HEAP_ALLOCATOR", "1")
    assert tune_cpu_runtime(heap_allocator=False)["heap_allocator"] is False and heap_policy_spy == []
    monkeypatch.setenv("REFIT_GYM_HEAP_ALLOCATOR", "0")
    assert tune_cpu_runtime(heap_allocator=True)["heap_allocator"] is True and heap_policy_spy == [True]


def test_the_report_is_what_mallopt_achieved(fake_glibc):
    fake_glibc([0])
    assert tune_cpu_runtime(heap_allocator=True)["heap_allocator"] is False


@pytest.mark.parametrize("supported", [True, False])
def test_the_flush_denormal_report_is_what_torch_achieved(monkeypatch, supported):
    requests = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: requests.append(mode) or supported)
    assert tune_cpu_runtime(heap_allocator=False)["flush_denormal"] is supported
    assert requests == [True]


@pytest.mark.skipif(not FLUSH_TO_ZERO_CPU, reason="flush-to-zero needs x86 (SSE3) or AArch64")
def test_denormals_are_flushed_to_zero():
    tiny = torch.tensor([1e-30], dtype=torch.float32)
    torch.set_flush_denormal(False)  # an earlier test (e.g. of the CLI) may have switched it on
    assert (tiny * 1e-10).item() != 0.0  # 1e-40 is a float32 denormal: kept when not flushing
    assert tune_cpu_runtime(heap_allocator=False)["flush_denormal"] is True
    assert (tiny * 1e-10).item() == 0.0


# --- the real allocator: where a 64 MB tensor lives ---


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2)")
def test_without_the_policy_glibc_maps_a_64_mb_block():
    """The control of the next test, in a fresh process: glibc's default mmap-s such a block."""
    script = (
        "import ctypes\n"
        "class MallInfo2(ctypes.Structure):\n"
        f"    _fields_ = [(name, ctypes.c_size_t) for name in {_MALLINFO2_FIELDS!r}]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.mallinfo2.restype = MallInfo2\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "before = libc.mallinfo2().hblkhd\n"
        f"block = libc.malloc({BLOCK_BYTES})\n"
        "print(libc.mallinfo2().hblkhd - before)\n"
    )
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert int(output) >= BLOCK_BYTES


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2)")
def test_under_the_policy_a_64_mb_tensor_comes_from_the_heap_and_its_memory_is_kept():
    assert tune_cpu_runtime(heap_allocator=True)["heap_allocator"] is True
    before = _mallinfo()
    block = torch.empty(BLOCK_BYTES // 4, dtype=torch.float32)
    during = _mallinfo()
    assert during.hblkhd - before.hblkhd < BLOCK_BYTES  # not mmap-ed ...
    assert during.uordblks - before.uordblks >= BLOCK_BYTES  # ... but served from the heap
    del block
    after = _mallinfo()
    assert after.arena >= during.arena  # the heap was not trimmed back to the system
    assert after.fordblks >= BLOCK_BYTES  # the freed block is kept as free heap memory


@pytest.mark.skipif(not HAS_MALLINFO2, reason="needs glibc >= 2.33 (mallinfo2)")
def test_by_default_freed_large_tensors_do_not_pile_up():
    """In a fresh process with the default settings, a loop that allocates and frees large tensors,
    keeping a small allocation each time (as any training loop does), does not grow the process.
    Under the heap policy it did, by a block per iteration without bound: torch asks for 64-byte
    aligned blocks, and a freed block on the heap is a few bytes too small for the next identical
    aligned request, so each request takes fresh memory while small allocations split the holes."""
    script = (
        "import ctypes, torch\n"
        "from refit_gym.runtime import tune_cpu_runtime\n"
        "class MallInfo2(ctypes.Structure):\n"
        f"    _fields_ = [(name, ctypes.c_size_t) for name in {_MALLINFO2_FIELDS!r}]\n"
        "libc = ctypes.CDLL('libc.so.6')\n"
        "libc.mallinfo2.restype = MallInfo2\n"
        "def footprint():\n"
        "    info = libc.mallinfo2()\n"
        "    return info.arena + info.hblkhd  # heap plus mmap-ed blocks\n"
        "print(tune_cpu_runtime()['heap_allocator'])\n"
        "kept = []\n"
        "for i in range(12):\n"
        f"    a, b = torch.ones({BLOCK_BYTES // 4}), torch.ones({BLOCK_BYTES // 4})\n"
        "    kept.append(torch.empty(1000))\n"
        "    c = a + b\n"
        "    del a, b, c\n"
        "    if i == 1:\n"
        "        start = footprint()\n"
        "print(footprint() - start)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "REFIT_GYM_HEAP_ALLOCATOR"}
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env=environment).stdout.split()
    assert output[0] == "False"  # the default leaves glibc's policy alone
    assert int(output[1]) < BLOCK_BYTES  # 10 more iterations: under the heap policy, ~10 blocks more
