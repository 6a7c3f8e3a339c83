"""Benchmark: full evaluation speed (and pretraining time-to-best) of DiffRec on ML-1M.

Evaluation, measured side by side in one run, repetitions interleaved, medians reported:

* ``ours``: :func:`refit_gym.evaluation.evaluate` on valid + test — one 40-step chain per batch
  serves both splits, vectorised metrics;
* ``official-style``: the way DiffRec's own script evaluates, re-implemented here as the
  reference: one chain per split (the chain is run twice) and per-user Python loops for the
  metrics (``computeTopNAccuracy``-style). The official code itself, run once on these machines
  when the project started (it is not part of this repository), took ~85 s a round;
* ``matmul bound``: the chain's matrix products alone (same shapes, ``torch.mm``), the floor a
  fp32 CPU implementation cannot beat. The goal is ``ours / bound <= 1.15``.

Pretraining (``--pretrain``): runs ``refit-gym pretrain`` with ``configs/ml1m_diffrec.yaml`` and
reports the wall time until the best-validation epoch; the official code needed 7 min 49 s for
its 30 epochs (best at epoch 10) on these machines, so the goal is <= 234 s. That number is not
side by side (the official code is not ours to run), so the benchmark prints it with the caveat.

Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/bench_pretrain_eval.py [--checkpoint DIR] [--repeats 3] [--pretrain]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch

from refit_gym.config import load_config
from refit_gym.runtime import tune_cpu_runtime
from refit_gym.data import load_dataset
from refit_gym.evaluation.evaluator import evaluate
from refit_gym.models import build_model
from refit_gym.data.history import SequenceTable


def official_style_metrics(predicted: list[list[int]], truth: list[set[int]], ks=(10, 20, 50, 100)) -> dict:
    """Per-user Python loops, as DiffRec's evaluation script computes them (our re-implementation)."""
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("precision", "recall", "ndcg", "mrr")}
    for items, gt in zip(predicted, truth):
        if not gt:
            continue
        for k in ks:
            hits, dcg, idcg, first = 0, 0.0, 0.0, 0.0
            for j in range(k):
                if items[j] in gt:
                    hits += 1
                    dcg += 1.0 / math.log2(j + 2)
                    first = first or 1.0 / (j + 1)
            for j in range(min(len(gt), k)):
                idcg += 1.0 / math.log2(j + 2)
            sums[f"precision@{k}"] += hits / k
            sums[f"recall@{k}"] += hits / len(gt)
            sums[f"ndcg@{k}"] += dcg / idcg
            sums[f"mrr@{k}"] += first
    return {key: value / len(predicted) for key, value in sums.items()}


def official_style_round(model, data, batch_size: int) -> dict:
    """One evaluation round the official way: a separate chain per split, Python-loop metrics."""
    out = {}
    for split in ("valid", "test"):
        seen, truth_matrix = data.seen_before(split), data.split(split)
        predicted = []
        histories = SequenceTable(data.train_sequences, data.n_items)
        for users in torch.arange(data.n_users).split(batch_size):
            scores = model.score(histories.batch(users))
            block = seen[users.numpy()]
            rows = np.repeat(np.arange(len(users)), np.diff(block.indptr))
            scores[torch.from_numpy(rows), torch.from_numpy(block.indices.astype(np.int64))] = -np.inf
            predicted += torch.topk(scores, 100).indices.tolist()
        truth = [set(truth_matrix.indices[truth_matrix.indptr[u]:truth_matrix.indptr[u + 1]].tolist())
                 for u in range(data.n_users)]
        out[split] = official_style_metrics(predicted, truth)
    return out


def matmul_bound(model, n_users: int, batch_size: int) -> float:
    """Seconds for the chain's matrix products alone (first layer's item part + the other layers)."""
    net, steps = model.denoiser, model.diffusion.steps
    weights = [net.in_layers[0].weight[:, : net.n_items].detach()]
    weights += [layer.weight.detach() for layer in list(net.in_layers[1:]) + list(net.out_layers)]
    start = time.perf_counter()
    for users in torch.arange(n_users).split(batch_size):
        h = torch.rand(len(users), net.n_items, device=weights[0].device)
        for _ in range(steps):
            x = h
            for w in weights:
                x = torch.mm(x, w.t())
    if weights[0].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml1m_diffrec.yaml")
    parser.add_argument("--data", default=None, help="dataset (default: the config's)")
    parser.add_argument("--checkpoint", default=None, help="a pretrained checkpoint (default: fresh weights; speed is the same)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-official", action="store_true", help="skip the slow official-style reference")
    parser.add_argument("--pretrain", action="store_true", help="also time pretraining to the best epoch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    args = parser.parse_args()
    tune_cpu_runtime()

    config = load_config(args.config, {"device": args.device})
    data = load_dataset(args.data or config.data.dataset)
    if args.checkpoint:
        from refit_gym.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint, data, device=args.device)
    else:
        model = build_model(config.model, config.diffusion, data, device=args.device).eval()
    batch = config.evaluation.batch_size
    flops = 2 * data.n_users * model.diffusion.steps * sum(
        p.numel() for name, p in model.denoiser.named_parameters() if name.endswith("weight") and "emb" not in name)
    times: dict[str, list[float]] = {"ours": [], "official-style": [], "matmul bound": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = evaluate(model, data, splits=("valid", "test"), ks=config.evaluation.ks, batch_size=batch,
                        device=args.device).metrics
        times["ours"].append(time.perf_counter() - start)
        times["matmul bound"].append(matmul_bound(model, data.n_users, batch))
        if not args.skip_official:
            start = time.perf_counter()
            reference = official_style_round(model, data, batch)
            times["official-style"].append(time.perf_counter() - start)
            for split in ("valid", "test"):
                for key in ("recall@20", "ndcg@20"):
                    assert abs(reference[split][key] - ours[split][key]) < 1e-9, (split, key)
    median = {name: statistics.median(values) for name, values in times.items() if values}
    report = {
        "users": data.n_users, "items": data.n_items, "steps": model.diffusion.steps, "batch_size": batch,
        "threads": torch.get_num_threads(), "chain_tflop": round(flops / 1e12, 3),
        "seconds_median": {k: round(v, 2) for k, v in median.items()},
        "seconds_all": {k: [round(x, 2) for x in v] for k, v in times.items() if v},
        "ours_over_matmul_bound": round(median["ours"] / median["matmul bound"], 3),
        "matmul_gflops": round(flops / median["matmul bound"] / 1e9, 1),
    }
    if "official-style" in median:
        report["official_style_over_ours"] = round(median["official-style"] / median["ours"], 2)
    if args.pretrain:
        from refit_gym.training.pretrain import pretrain

        result = pretrain(config, data, output_dir=None, progress=False, report_test=True)
        report["pretrain"] = {
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "seconds_to_best": round(result.seconds_to_best, 1), "seconds_total": round(result.seconds, 1),
            "valid_recall@20": round(result.best_metrics["valid"]["recall@20"], 4),
            "test_recall@20 (selected on valid, computed once)": round(result.best_metrics["test"]["recall@20"], 4),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
