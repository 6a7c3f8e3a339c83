"""Benchmark: fine-tuning time per update against the number of users and of items (synthetic data).

The paper claims a cost linear in the number of users or items. For each size this builds
synthetic data, a DiffRec base with the ML-1M architecture and schedule (T = 40, dims [200, 600];
speed does not depend on the weights, so they are freshly initialised), the default ``refit``
agent (likelihood + collaborative policy-gradient term + anchor, 128 users x 4 rollouts per
update) and times updates. Sizes are measured round-robin (every size once per round, several
rounds, median per size) so that load on a shared machine drifts into every size alike. The
fitted log-log slope of seconds per update against size is reported for users (items fixed at
ML-1M's 2,810) and for items (users fixed at ML-1M's 5,949); the goal is <= 1.1 for both. The
collaborative reward's one-off neighbour cache (bind) is timed separately: it is not part of an
update. Usage::

    python benchmarks/bench_scaling.py [--rounds 3] [--updates 3] [--quick] [--axes items] [--no-heap-allocator]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch

from agents.config import finetune_config
from agents.trainer import build_learner
from refit_gym.config import load_config
from refit_gym.runtime import tune_cpu_runtime
from refit_gym.data import make_synthetic
from refit_gym.models import build_model

ML1M_USERS, ML1M_ITEMS = 5949, 2810


def build(n_users: int, n_items: int, config, device: torch.device) -> tuple:
    data = make_synthetic(n_users=n_users, n_items=n_items, density=0.03, seed=0)
    model = build_model(config.model, config.diffusion, data, device=device).eval()
    start = time.perf_counter()
    agent = build_learner(finetune_config(config.finetune), model, data, device=device)
    return data, agent, time.perf_counter() - start  # building = mostly the collaborative reward's bind


def time_updates(agent, n_users: int, updates: int, seed: int) -> list[float]:
    rng, generator = np.random.default_rng(seed), torch.Generator(device=agent.core.device).manual_seed(seed)
    times = []
    for _ in range(updates):
        users = rng.choice(n_users, size=agent.config.users_per_batch, replace=False)
        start = time.perf_counter()
        agent.update(users, rng, generator)
        if agent.core.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def slope(sizes: list[int], seconds: list[float]) -> float:
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml1m_diffrec.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=3, help="timed updates per size per round (after 1 warm-up)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run, not the benchmark)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--axes", default="users,items", help="which sizes to vary: users, items or both")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--no-heap-allocator", action="store_true",
                        help="keep glibc's default mmap policy for large tensors even with REFIT_GYM_HEAP_ALLOCATOR=1 "
                             "(the default since the heap policy is opt-in; see refit_gym/runtime.py)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = tune_cpu_runtime(heap_allocator=False if args.no_heap_allocator else None)
    config = load_config(args.config, {"device": args.device})
    device = torch.device(args.device)
    factors = [0.1, 0.25, 0.5, 1.0] if args.quick else [1.0, 2.5, 5.0, 10.0]
    axes = args.axes.split(",")
    cases = [("users", int(ML1M_USERS * f), ML1M_ITEMS) for f in factors] if "users" in axes else []
    cases += [("items", ML1M_USERS, int(ML1M_ITEMS * f)) for f in factors] if "items" in axes else []
    built, binds, times = {}, {}, {case: [] for case in cases}
    for case in cases:
        _, n_users, n_items = case
        if (n_users, n_items) not in built:
            data, agent, bind = build(n_users, n_items, config, device)
            built[(n_users, n_items)] = (data, agent)
            binds[(n_users, n_items)] = bind
            time_updates(agent, data.n_users, 1, seed=99)  # warm-up
            print(f"built {data.n_users} users x {data.n_items} items (reward bind {bind:.1f} s)", flush=True)
    for round_ in range(args.rounds):
        for case in cases:
            data, agent = built[case[1:]]
            times[case] += time_updates(agent, data.n_users, args.updates, seed=round_)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    report = {"device": str(device), "threads": torch.get_num_threads(), "users_per_update": 128 * 4, "steps": config.diffusion.steps,
              "runtime": runtime, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    for axis in axes:
        rows = [(case, statistics.median(times[case])) for case in cases if case[0] == axis]
        shapes = [built[case[1:]][0] for case, _ in rows]
        sizes = [data.n_users if axis == "users" else data.n_items for data in shapes]
        seconds = [s for _, s in rows]
        report[axis] = {
            "sizes": sizes,
            "seconds_per_update_median": [round(s, 3) for s in seconds],
            "reward_bind_seconds": [round(binds[case[1:]], 2) for case, _ in rows],
            "loglog_slope": round(slope(sizes, seconds), 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
