"""Benchmark: peak memory (RSS) and time of env + reward + agent at multiples of ML-1M's size.

What it measures. For each size -- a multiple of ML-1M's 5,949 users x 2,810 items (``10`` =
59,490 x 28,100; ``1:10`` = ML-1M's users x 10x its items) at ML-1M's density (3.4 %) -- a fresh
subprocess (so the sizes' peaks never mix; killed after ``--timeout`` s) runs four stages:

==============  ===========================================================================
stage           what runs
==============  ===========================================================================
``data``        ``refit_gym.data.make_synthetic(n_users, n_items, density, seed)``
``neighbours``  the collaborative reward's top-k similar users (``find_neighbours``; ``k`` and
                the measure of the default ``refit`` agent's reward, k = 20 cosine). Its time
                grows with users^2 (``refit_gym/rewards/neighbours.py``)
``learner``     a freshly initialised DiffRec base model (``--dims``, the ``ml1m_diffrec``
                schedule, T = 40) and ``agents.trainer.build_learner`` of the default ``refit``
                agent: the reward's bind (neighbours from the in-process cache), the env core,
                the trainable copy, the optimiser
``update``      ``--updates`` calls of ``agent.update`` on 128 users x 4 rollouts each
==============  ===========================================================================

For every stage it reports the wall time and the process's **peak resident set size** during
the stage (Linux: ``VmHWM``, reset at the stage's start through ``/proc/self/clear_refs``, so a
stage's peak is its own; where that is impossible, ``ru_maxrss``, which is cumulative), the RSS
at the stage's start and end, and after each update its RSS and time (``update_rss_mb``,
``update_seconds``: with many ``--updates`` this shows whether memory keeps growing).
RSS counts everything the process holds (numpy, scipy, torch, the allocator's kept free memory),
unlike ``tracemalloc``; on glibc, ``mallinfo2`` splits the malloc heap into memory in use and
free memory the allocator keeps (``end_malloc_mb``, ``update_malloc_mb``), which tells a leak
from retained free memory.

A size that cannot fit is not attempted (``--force`` tries anyway): the parent estimates its
interactions (``n_users x n_items x density x 0.9``, what the generator delivers) and skips it
when ``make_synthetic``'s measured peak of about 138 B per interaction exceeds
``--memory-limit-gb``; the message also gives what the finished data alone would hold (13.6 B per
interaction: three CSR splits and the chronological training sequences). A size that is
attempted runs under an address-space limit of ``--memory-limit-gb`` (``RLIMIT_AS``), so running
out of memory is a ``MemoryError`` in the stage where it happens, reported as such, not the
system's OOM killer. ``--last-stage data`` stops after a stage (e.g. to find the largest size the
generator can build).

``--compare-neighbours F1,F2`` also times, in the same subprocess at those sizes, the neighbour
search as it was before it became symmetric (``method="direct"``: every block of users against
all users, blocks of ``min(1024, 2**24 // n_users)`` users), checks that both return identical
ids and similarities (bit for bit), and reports the time ratio.
``--allocator env,off,on,thp`` runs each size once per allocator setting, the settings
alternating ``--repeats`` times (so that load on a shared machine drifts into every setting
alike): ``off`` / ``on`` set ``REFIT_GYM_HEAP_ALLOCATOR=0`` / ``1`` (glibc's default policy / large
blocks kept on the heap, see ``refit_gym/runtime.py``), ``thp`` is ``off`` plus
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35: transparent huge pages for mmap-ed
blocks), ``env`` inherits the environment.

Usage::

    python benchmarks/bench_memory.py [--sizes 1,10,50] [--updates 2] [--timeout 1800]
        [--memory-limit-gb 18] [--compare-neighbours 1,10] [--output runs/bench_memory.json]
    python benchmarks/bench_memory.py --sizes 15 --last-stage data  # does the generator fit?
    python benchmarks/bench_memory.py --sizes 1:10 --updates 30 --allocator off,on  # allocator growth
    python benchmarks/bench_memory.py --sizes 1:10 --dims 200,600 --updates 4 --allocator off,on,thp --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

ML1M_USERS, ML1M_ITEMS, ML1M_DENSITY = 5949, 2810, 0.034
DATA_BYTES_PER_INTERACTION = 8 + 0.7 * 8
"""The finished data: float32 value + int32 index in a CSR split, plus the int64 item of the
chronological training sequence (70 % of the interactions are training ones)."""
GENERATOR_BYTES_PER_INTERACTION = 138
"""Peak RSS of ``make_synthetic`` per interaction, measured at 10x and 15x (138 B both; the peak is
in the chronological split, over the generator's int64 / float64 per-interaction arrays)."""
GENERATED_DENSITY = 0.9
"""The generator delivers about this fraction of the requested density (measured 0.91-0.92 at
1x-15x: per-user counts are clipped and sampled as distinct items)."""
_RESULT, _INFO = "BENCH-RESULT ", "BENCH-INFO "
STAGES = ("data", "neighbours", "neighbours_direct", "learner", "update")


# ---------------------------------------------------------------------------- memory probes


def _status_mb(field: str) -> Optional[float]:
    """A ``VmRSS`` / ``VmHWM`` line of ``/proc/self/status`` in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb() -> Optional[float]:
    return _status_mb("VmRSS")


_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


def malloc_mb() -> Optional[dict[str, float]]:
    """glibc's own counts (``mallinfo2``, glibc >= 2.33), MiB: ``in_use`` (heap blocks in use plus
    mmap-ed blocks) and ``kept_free`` (free heap memory the allocator keeps); None elsewhere."""
    import ctypes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]

    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return {"in_use": (info.uordblks + info.hblkhd) / 2**20, "kept_free": info.fordblks / 2**20}


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_mb(resettable: bool) -> float:
    """Peak RSS since the last :func:`reset_peak` (or since the start, when it cannot be reset)."""
    if resettable:
        value = _status_mb("VmHWM")
        if value is not None:
            return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (2**20 if platform.system() == "Darwin" else 1024)


# ---------------------------------------------------------------------------- the worker (one size)


def emit(prefix: str, payload: dict) -> None:
    print(prefix + json.dumps(payload), flush=True)


@contextmanager
def stage(name: str) -> Iterator[dict]:
    """Time a stage and record its own peak RSS; emits the record when the stage ends."""
    gc.collect()
    record: dict[str, Any] = {"start_rss_mb": rss_mb()}
    resettable = reset_peak()
    emit(_INFO, {"stage_started": name})
    start = time.perf_counter()
    yield record
    record["seconds"] = time.perf_counter() - start
    record["peak_rss_mb"] = peak_mb(resettable)
    record["peak_is_cumulative"] = not resettable
    record["end_rss_mb"] = rss_mb()
    record["end_malloc_mb"] = malloc_mb()
    emit(_RESULT, {"stage": name, **record})


def run_size(args: argparse.Namespace) -> None:
    """The subprocess of one size: build and measure every stage, emitting one line per stage."""
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from agents.config import finetune_config
    from agents.trainer import build_learner
    from refit_gym.config import load_config
    from refit_gym.data import make_synthetic
    from refit_gym.rewards import find_neighbours, top_k_similar_users
    from refit_gym.rewards.neighbours import default_block_size
    from refit_gym.rewards.registry import normalize_reward_spec
    from refit_gym.runtime import tune_cpu_runtime
    from refit_gym.training.cache import fresh_model

    runtime = tune_cpu_runtime()  # as the CLI: REFIT_GYM_HEAP_ALLOCATOR decides the heap policy
    users_factor, items_factor = parse_size(args.worker)
    n_users, n_items = round(ML1M_USERS * users_factor), round(ML1M_ITEMS * items_factor)
    emit(_INFO, {"runtime": runtime, "threads": torch.get_num_threads(), "rss_mb_at_start": rss_mb()})

    with stage("data") as record:
        data = make_synthetic(n_users=n_users, n_items=n_items, density=args.density, seed=args.seed)
        record["summary"] = {k: v for k, v in data.summary().items() if k != "source"}
    if args.last_stage == "data":
        return

    settings = finetune_config({"agent": "refit"})  # the defaults: the collaborative reward, k = 20
    collaborative = [t for t in normalize_reward_spec(settings.reward).values() if t["type"] == "collaborative"]
    k, measure = collaborative[0].get("k", 20), collaborative[0].get("similarity", "cosine")
    with stage("neighbours") as record:
        neighbours = find_neighbours(data.train, k, measure)
        record.update(k=k, measure=measure, block_size=default_block_size(data.n_users, data.n_items))
    if args.compare_neighbours_here:
        with stage("neighbours_direct") as record:
            # the search as it was before the symmetric one: every block against all users,
            # blocks of min(1024, 2**24 // n_users) users
            old_block = max(1, min(1024, (1 << 24) // data.n_users))
            direct = top_k_similar_users(data.train, k, measure, block_size=old_block, method="direct")
            record["block_size"] = old_block
            record["identical"] = bool(np.array_equal(direct.ids, neighbours.ids)
                                       and np.array_equal(direct.similarity, neighbours.similarity))
        del direct
    if args.last_stage == "neighbours":
        return

    config = load_config("ml1m_diffrec", {"device": "cpu", "model.dims": args.dims})
    with stage("learner") as record:
        base = fresh_model(config, data)
        agent = build_learner(settings, base, data)
        record["parameters"] = sum(p.numel() for p in agent.policy.parameters())
    if args.last_stage == "learner":
        return

    rng, generator = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    with stage("update") as record:
        record["update_seconds"], record["update_rss_mb"], record["update_malloc_mb"] = [], [], []
        for _ in range(args.updates):
            users = rng.choice(data.n_users, size=min(settings.users_per_batch, data.n_users), replace=False)
            start = time.perf_counter()
            agent.update(users, rng, generator)
            record["update_seconds"].append(time.perf_counter() - start)
            record["update_rss_mb"].append(rss_mb())
            record["update_malloc_mb"].append(malloc_mb())


# ---------------------------------------------------------------------------- the parent


def parse_size(text: str) -> tuple[float, float]:
    """``"10"`` -> (10, 10) (users and items scaled alike); ``"1:10"`` -> (1, 10)."""
    users, _, items = text.partition(":")
    return float(users), float(items or users)


def estimated_interactions(size: str, density: float) -> float:
    users, items = parse_size(size)
    return ML1M_USERS * users * ML1M_ITEMS * items * density * GENERATED_DENSITY


def does_not_fit(size: str, args: argparse.Namespace) -> Optional[str]:
    """Why the size cannot fit in ``--memory-limit-gb``, from the measured bytes per interaction; None if it may."""
    interactions = estimated_interactions(size, args.density)
    data_gb = interactions * DATA_BYTES_PER_INTERACTION / 2**30
    generator_gb = interactions * GENERATOR_BYTES_PER_INTERACTION / 2**30
    if generator_gb <= args.memory_limit_gb:
        return None
    return (f"not attempted: about {interactions / 1e9:.2f} G interactions; make_synthetic peaks near "
            f"{generator_gb:.0f} GiB ({GENERATOR_BYTES_PER_INTERACTION} B each) and the finished data alone "
            f"holds {data_gb:.1f} GiB, over the {args.memory_limit_gb:g} GiB limit (--force tries anyway)")


ALLOCATORS = {
    "env": {},
    "off": {"REFIT_GYM_HEAP_ALLOCATOR": "0"},
    "on": {"REFIT_GYM_HEAP_ALLOCATOR": "1"},
    "thp": {"REFIT_GYM_HEAP_ALLOCATOR": "0", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
"""The environment each ``--allocator`` setting gives the subprocess."""


def run_subprocess(size: str, args: argparse.Namespace, allocator: str) -> dict:
    """Run one size in a subprocess (own session, killed at the timeout); collect its records."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", size, "--density", str(args.density),
               "--seed", str(args.seed), "--updates", str(args.updates), "--threads", str(args.threads),
               "--memory-limit-gb", str(args.memory_limit_gb), "--dims", ",".join(map(str, args.dims)),
               "--last-stage", args.last_stage]
    if size in args.compare_neighbours:
        command.append("--compare-neighbours-here")
    env = {**os.environ, **ALLOCATORS[allocator]}
    result: dict[str, Any] = {"size": size, "allocator": allocator, "stages": {}, "log": [],
                              "environment": {k: env.get(k) for k in ("REFIT_GYM_HEAP_ALLOCATOR", "GLIBC_TUNABLES")}}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)

    def read() -> None:
        for line in process.stdout:
            if line.startswith(_RESULT):
                record = json.loads(line[len(_RESULT):])
                result["stages"][record.pop("stage")] = record
            elif line.startswith(_INFO):
                info = json.loads(line[len(_INFO):])
                result["current_stage"] = info.get("stage_started", result.get("current_stage"))
                result.update({k: v for k, v in info.items() if k != "stage_started"})
            else:
                result["log"].append(line.rstrip())
            print(f"  [{size}] {line.rstrip()}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the subprocess's own session: only what we started
        returncode = process.wait()
        result["status"] = f"timed out after {args.timeout} s in stage {result.get('current_stage')}"
    reader.join(timeout=10)
    if "status" not in result:
        if returncode == 0:
            result["status"] = "ok"
        else:
            errors = [line for line in result["log"] if "Error" in line]
            result["status"] = (f"failed (exit {returncode}) in stage {result.get('current_stage')}: "
                                f"{errors[-1] if errors else 'see log'}")
    if result["status"] == "ok":
        result["log"] = result["log"][-5:]
    else:
        result["log"] = result["log"][-30:]
    return result


def print_table(results: list[dict]) -> None:
    header = f"{'size':>6} {'users x items':>17} {'alloc':>5} {'stage':>17} {'seconds':>9} {'peak RSS MB':>12} " \
             f"{'start MB':>9} {'end MB':>9}"
    print(header)
    print("-" * len(header))
    for result in results:
        users, items = parse_size(result["size"])
        shape = f"{round(ML1M_USERS * users)} x {round(ML1M_ITEMS * items)}"
        for name in STAGES:
            record = result["stages"].get(name)
            if record is None:
                continue
            print(f"{result['size']:>6} {shape:>17} {result['allocator']:>5} {name:>17} {record['seconds']:>9.2f} "
                  f"{record['peak_rss_mb']:>12.0f} {record['start_rss_mb']:>9.0f} {record['end_rss_mb']:>9.0f}")
        if "update" in result["stages"]:
            update = result["stages"]["update"]
            print(f"{'':>49}per update: s {[round(s, 2) for s in update['update_seconds']]}, "
                  f"RSS MB {[round(m) for m in update['update_rss_mb']]}")
            if update["update_malloc_mb"] and update["update_malloc_mb"][-1]:
                print(f"{'':>49}malloc in use MB {[round(m['in_use']) for m in update['update_malloc_mb']]}, "
                      f"kept free MB {[round(m['kept_free']) for m in update['update_malloc_mb']]}")
        if "neighbours_direct" in result["stages"]:
            fast, direct = result["stages"]["neighbours"], result["stages"]["neighbours_direct"]
            print(f"{'':>49}neighbours: before (direct, {direct['block_size']}-user blocks) / now = "
                  f"{direct['seconds'] / fast['seconds']:.2f} (identical results: {direct['identical']})")
        if result["status"] != "ok":
            prefix = f"{result['size']:>6} {shape:>17} {result['allocator']:>5} " if not result["stages"] else ""
            print(f"{prefix:<49}{result['status']}")


def print_allocator_summary(results: list[dict]) -> None:
    """Per size and allocator setting (over repeats): median seconds per update after the first,
    the update stage's peak RSS, RSS after the last update."""
    import statistics

    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        if "update" in result["stages"]:
            groups.setdefault((result["size"], result["allocator"]), []).append(result["stages"]["update"])
    if len({allocator for _, allocator in groups}) < 2:
        return
    print("\nallocator settings side by side (median s / update after the first, over all runs):")
    for (size, allocator), updates in groups.items():
        seconds = [s for update in updates for s in update["update_seconds"][1:]] or \
                  [s for update in updates for s in update["update_seconds"]]
        print(f"  {size:>6} {allocator:>5}: {statistics.median(seconds):6.2f} s / update ({len(seconds)} updates), "
              f"peak RSS {max(u['peak_rss_mb'] for u in updates):6.0f} MB, after the last update "
              f"{[round(u['update_rss_mb'][-1]) for u in updates]} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,50",
                        help="comma-separated multiples of ML-1M (USERS or USERS:ITEMS factors)")
    parser.add_argument("--density", type=float, default=ML1M_DENSITY)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--updates", type=int, default=2, help="agent.update calls (128 users x 4 rollouts)")
    parser.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128],
                        help="DiffRec hidden dims of the freshly initialised base model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per size before it is killed")
    parser.add_argument("--memory-limit-gb", type=float, default=18.0,
                        help="address-space limit of each size's subprocess (and the skip threshold)")
    parser.add_argument("--compare-neighbours", default="",
                        help="sizes at which the reference (direct) neighbour search is timed too")
    parser.add_argument("--allocator", default="env",
                        help="comma-separated allocator settings, each size run once per setting: "
                             "env (inherit), off, on (REFIT_GYM_HEAP_ALLOCATOR=0/1), thp (off + glibc hugetlb)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the allocator settings this many times")
    parser.add_argument("--force", action="store_true", help="attempt sizes estimated not to fit")
    parser.add_argument("--last-stage", choices=["data", "neighbours", "learner", "update"], default="update",
                        help="stop after this stage (e.g. data: does the generator fit at this size?)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compare-neighbours-here", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        run_size(args)
        return
    args.compare_neighbours = [s for s in args.compare_neighbours.split(",") if s]
    allocators = [a for a in args.allocator.split(",") if a]
    unknown = sorted(set(allocators) - set(ALLOCATORS))
    if unknown:
        parser.error(f"unknown --allocator setting(s) {unknown}; known: {sorted(ALLOCATORS)}")
    results = []
    for size in [s for s in args.sizes.split(",") if s]:
        reason = None if args.force else does_not_fit(size, args)
        for allocator in allocators * args.repeats:
            if reason is not None:
                results.append({"size": size, "allocator": allocator, "stages": {}, "status": reason})
                print(f"[{size}] {results[-1]['status']}", flush=True)
                continue
            print(f"[{size}] running (allocator: {allocator}) ...", flush=True)
            results.append(run_subprocess(size, args, allocator))
    print()
    print_table(results)
    print_allocator_summary(results)
    if args.output:
        report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                  "arguments": {k: v for k, v in vars(args).items() if k not in ("worker", "compare_neighbours_here")},
                  "results": results}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
