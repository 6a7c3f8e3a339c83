"""Benchmark: the collaborative reward's cache build and its cost for all users (ML-1M).

Goals (set when the collaborative reward was designed): on ``diffrec_ml-1m_clean`` (5,949 users x 2,810 items) the cache -- every
user's top-k neighbours, computed in blocks, plus the sparse collaborative-target matrix --
builds in under 10 s, and the reward for all 5,949 users (given their scores) costs under 1 s.

Measured per similarity (cosine, Pearson), ``--repeats`` times (medians reported; the machine
is shared, so single timings are noisy):

* ``bind_s``: ``CollaborativeReward(k).bind(train)`` from a cold in-memory cache (fingerprint,
  neighbours, targets, tensors), split into ``neighbours_s`` and ``targets_s``;
* ``disk_bind_s``: the same bind when the neighbour lists come from the on-disk cache;
* ``reward_all_users_s``: one call on all users' scores at once; ``reward_batched_s``: the same
  users in batches of ``--batch-size`` (what a rollout pays), and the held-out log-likelihood
  term for comparison;
* memory: peak RSS of the process (``resource.getrusage``) and the peak of Python / numpy
  allocations during one cold bind (``tracemalloc``; torch's allocator is not traced);
* a signal check: validation Recall@20 when items are ranked by the collaborative target alone
  (train items masked) -- how much of the future the target points at. It reads validation
  data on purpose, as an evaluation; the reward itself never does.

Usage::

    python benchmarks/bench_rewards.py --data /work/shared/data/diffrec_ml-1m_clean [--k 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from refit_gym.data.diffrec import load_diffrec_split
from refit_gym.data.interactions import InteractionData
from refit_gym.rewards import (
    CollaborativeReward,
    EpisodeBatch,
    HeldOutLogLikelihood,
    TrainingInteractions,
    clear_memory_cache,
    collaborative_targets,
    top_k_similar_users,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a DiffRec split folder (train_list.npy, ...)")
    parser.add_argument("--k", type=int, default=20, help="neighbours per user")
    parser.add_argument("--similarity", nargs="+", default=["cosine", "pearson"], help="similarities to measure")
    parser.add_argument("--block-size", type=int, default=None, help="users per similarity block (default: auto)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--batch-size", type=int, default=256, help="users per batch for the batched timing")
    parser.add_argument("--hold-out", type=float, default=0.25, help="most recent fraction of training items hidden")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cpu", help="where the rewards are computed (cpu, cuda, ...)")
    return parser.parse_args()


def load(folder: str) -> InteractionData:
    """The split through ``refit_gym.data.load_dataset`` when it exists, else the DiffRec loader."""
    try:
        from refit_gym.data import load_dataset  # type: ignore[attr-defined]
    except ImportError:
        return load_diffrec_split(folder)
    return load_dataset(folder)


def recent_hold_out_episode(data: InteractionData, fraction: float) -> EpisodeBatch:
    """All users; each user's most recent ``fraction`` of training items held out, the rest visible."""
    sequences = data.train_sequences
    lengths = sequences.lengths
    n_hidden = np.where(lengths > 1, np.maximum(1, np.round(fraction * lengths)), 0).astype(np.int64)
    user_of = np.repeat(np.arange(data.n_users), lengths)
    position = np.arange(len(sequences.items)) - np.repeat(sequences.indptr[:-1], lengths)
    hidden = position >= np.repeat(lengths - n_hidden, lengths)
    visible = torch.zeros(data.n_users, data.n_items)
    held_out = torch.zeros(data.n_users, data.n_items, dtype=torch.bool)
    items = torch.from_numpy(sequences.items)
    users = torch.from_numpy(user_of)
    mask = torch.from_numpy(hidden)
    visible[users[~mask], items[~mask]] = 1.0
    held_out[users[mask], items[mask]] = True
    return EpisodeBatch(users=torch.arange(data.n_users), visible=visible, held_out=held_out)


def synchronised(value: torch.Tensor) -> torch.Tensor:
    """``value`` once the device has computed it (CUDA runs asynchronously)."""
    if value.device.type == "cuda":
        torch.cuda.synchronize()
    return value


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def batch_of(episode: EpisodeBatch, rows: slice) -> EpisodeBatch:
    return EpisodeBatch(users=episode.users[rows], visible=episode.visible[rows], held_out=episode.held_out[rows])


def bench_similarity(
    training: TrainingInteractions, episode: EpisodeBatch, scores: torch.Tensor, similarity: str, args
) -> dict:
    """Timings of one similarity, medians over ``args.repeats``."""
    runs: dict[str, list[float]] = {key: [] for key in (
        "bind_s", "neighbours_s", "targets_s", "disk_bind_s", "reward_all_users_s", "reward_batched_s")}
    term = None
    with tempfile.TemporaryDirectory(prefix="refit_gym_bench_cache_") as cache_dir:
        for _ in range(args.repeats):
            clear_memory_cache()
            make = lambda **kw: CollaborativeReward(k=args.k, similarity=similarity, block_size=args.block_size, **kw)
            term, seconds = timed(lambda: make().bind(training, args.device))
            runs["bind_s"].append(seconds)
            neighbours, seconds = timed(lambda: top_k_similar_users(training.train, args.k, similarity, args.block_size))
            runs["neighbours_s"].append(seconds)
            _, seconds = timed(lambda: collaborative_targets(training.train, neighbours))
            runs["targets_s"].append(seconds)

            clear_memory_cache()
            make(cache_dir=cache_dir).bind(training, args.device)  # writes the disk cache (first repeat) or reads it
            clear_memory_cache()
            _, seconds = timed(lambda: make(cache_dir=cache_dir).bind(training, args.device))
            runs["disk_bind_s"].append(seconds)

            with torch.no_grad():
                term(scores[:8], batch_of(episode, slice(0, 8)))  # warm-up
                values, seconds = timed(lambda: synchronised(term(scores, episode)))
                runs["reward_all_users_s"].append(seconds)

                def batched():
                    for start in range(0, len(scores), args.batch_size):
                        rows = slice(start, start + args.batch_size)
                        synchronised(term(scores[rows], batch_of(episode, rows)))

                _, seconds = timed(batched)
                runs["reward_batched_s"].append(seconds)

    clear_memory_cache()
    tracemalloc.start()
    CollaborativeReward(k=args.k, similarity=similarity, block_size=args.block_size).bind(training)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    targets = term.targets
    result = {key: statistics.median(values) for key, values in runs.items()}
    result["runs"] = runs
    result["bind_traced_peak_mb"] = traced_peak / 2**20
    result["target_nnz"] = int(targets.nnz)
    result["target_nnz_per_user"] = targets.nnz / targets.shape[0]
    result["users_with_empty_target"] = int((np.diff(targets.indptr) == 0).sum())
    result["mean_reward"] = float(values.mean())
    return result


def target_signal(data: InteractionData, targets, k: int = 20) -> dict:
    """Validation Recall@k and NDCG@k of ranking items by the collaborative target alone (test
    stays sealed: this is a diagnosis, not a result)."""
    from refit_gym.evaluation.metrics import mask_and_rank, ranking_metrics

    out = {}
    dense = torch.from_numpy(targets.toarray())
    for split in ("valid",):
        top = mask_and_rank(dense.clone(), data.seen_before(split), k)
        metrics = ranking_metrics(top, data.split(split), ks=(k,))
        out[f"{split}_recall@{k}"] = float(metrics[f"recall@{k}"].mean())
        out[f"{split}_ndcg@{k}"] = float(metrics[f"ndcg@{k}"].mean())
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data, load_seconds = timed(lambda: load(args.data))
    training = TrainingInteractions.from_data(data)
    episode = recent_hold_out_episode(data, args.hold_out)
    episode = EpisodeBatch(users=episode.users.to(args.device), visible=episode.visible.to(args.device),
                           held_out=episode.held_out.to(args.device))
    scores = torch.randn(data.n_users, data.n_items, generator=torch.Generator().manual_seed(0)).to(args.device)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    report: dict = {
        "data": str(args.data),
        "n_users": data.n_users,
        "n_items": data.n_items,
        "n_train": int(data.train.nnz),
        "k": args.k,
        "block_size": args.block_size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "load_s": load_seconds,
        "similarities": {},
    }
    loglik = HeldOutLogLikelihood().bind(training, args.device)
    with torch.no_grad():
        loglik_runs = [timed(lambda: synchronised(loglik(scores, episode)))[1] for _ in range(args.repeats)]
    report["loglik_all_users_s"] = statistics.median(loglik_runs)

    for similarity in args.similarity:
        result = bench_similarity(training, episode, scores, similarity, args)
        clear_memory_cache()
        term = CollaborativeReward(k=args.k, similarity=similarity).bind(training)
        result["signal"] = target_signal(data, term.targets)
        report["similarities"][similarity] = result
        print(
            f"{similarity:8s} k={args.k}: cache build {result['bind_s']:.2f} s "
            f"(neighbours {result['neighbours_s']:.2f} s, targets {result['targets_s']:.2f} s; "
            f"from disk {result['disk_bind_s']:.2f} s) | reward, all {data.n_users} users: "
            f"{result['reward_all_users_s']:.3f} s at once, {result['reward_batched_s']:.3f} s in batches of "
            f"{args.batch_size} | targets {result['target_nnz_per_user']:.0f} items/user | "
            f"target-only valid R@20 {result['signal']['valid_recall@20']:.4f}"
        )
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["peak_rss_after_load_mb"] = rss_before_mb
    print(
        f"held-out loglik, all users: {report['loglik_all_users_s']:.3f} s | peak RSS {report['peak_rss_mb']:.0f} MB "
        f"(after loading data and building the all-users episode: {rss_before_mb:.0f} MB) | traced peak of one "
        + ", ".join(f"{s} bind {r['bind_traced_peak_mb']:.0f} MB" for s, r in report["similarities"].items())
    )
    goals = all(r["bind_s"] < 10 and r["reward_all_users_s"] < 1 for r in report["similarities"].values())
    print(f"goals (cache < 10 s, all-users reward < 1 s): {'met' if goals else 'NOT met'}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
