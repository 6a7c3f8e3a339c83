"""Benchmark: the SASRec baseline (full-softmax cross-entropy) on a DiffuRec sequential dataset.

1. Tunes on validation: every setting of ``--grid`` is trained with the first seed, early-stopped
   on validation ndcg@10 (sequential protocol), and the best setting is chosen by that number.
   Test is not read.
2. For each of ``--seeds`` trains the chosen setting (the first seed's model is the tuning run
   itself: a fit is deterministic given its seed) and evaluates it **once** on valid and test:
   hr@5/10/20 and ndcg@5/10/20, full ranking over all items, history not masked (DiffuRec's
   protocol).
3. Reports mean ± sample std (ddof = 1) over the seeds, seconds per run (training and the
   validations inside it) and per epoch, next to item popularity under the same protocol; writes
   ``results.json`` and ``results.md`` to ``--output`` (use an ignored folder such as ``runs/``:
   the numbers derive from the dataset and are not committed).

Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/sasrec_baseline.py --dataset diffurec_amazon_beauty \\
        --grid dropout=0.2,0.5 hidden=64,128 --seeds 0 1 2 --threads 1 --output runs/sasrec_beauty

``--param KEY=VALUE`` fixes any other hyper-parameter of ``SASRecConfig`` for all runs (e.g.
``--param window=random --param max_len=200`` on ML-1M). With ``--max-epochs 2`` and one setting it
measures seconds per epoch only (the metrics are then those of an unconverged model).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from refit_gym.baselines import PopularityRecommender, SASRecRecommender, fit_baseline, tune_sasrec
from refit_gym.baselines.sasrec import grid_settings, print_log
from refit_gym.data import load_dataset
from refit_gym.evaluation import evaluate
from refit_gym.cli import parse_key_values
from refit_gym.errors import ConfigError

KS = (5, 10, 20)
METRICS = [f"{name}@{k}" for name in ("hr", "ndcg") for k in KS]


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["dropout=0.2,0.5", "hidden=64,128"]`` -> ``{"dropout": [0.2, 0.5], "hidden": [64, 128]}`` (YAML values)."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid expects NAME=V1,V2,..., got {item!r}")
        grid[name.strip()] = [yaml.safe_load(value) for value in values.split(",")]
    return grid


def parse_params(items: list[str]) -> dict:
    """``--param NAME=VALUE`` items (values read as YAML)."""
    try:
        return parse_key_values(items, "--param", "hidden=128")
    except ConfigError as error:
        raise SystemExit(str(error)) from None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_record(model: SASRecRecommender, metrics: dict) -> dict:
    return {"seed": model.config.seed, "metrics": metrics, "best_epoch": model.best_epoch,
            "epochs": len(model.log), "fit_seconds": model.fit_seconds, "epoch_seconds": model.epoch_seconds,
            "log": model.log}


def markdown(result: dict) -> str:
    summary, runs = result["summary"], result["runs"]
    lines = [
        f"# SASRec (CE) on {result['dataset']}",
        "",
        f"Chosen on validation {result['tuning']['metric']}: `{result['chosen']}` "
        f"(fixed: `{result['fixed']}`); {len(runs)} seeds {[r['seed'] for r in runs]}; "
        f"{result['threads']} thread(s), {result['machine']}.",
        "",
        "| split | " + " | ".join(METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for split in ("valid", "test"):
        cells = [f"{100 * summary[split][m]['mean']:.2f} ± {100 * summary[split][m]['std']:.2f}" for m in METRICS]
        lines.append(f"| {split} (SASRec, %) | " + " | ".join(cells) + " |")
    for split in ("valid", "test"):
        cells = [f"{100 * result['popularity'][split][m]:.2f}" for m in METRICS]
        lines.append(f"| {split} (popularity, %) | " + " | ".join(cells) + " |")
    seconds = summary["fit_seconds"]
    lines += [
        "",
        f"Seconds per run (training + its validations): {seconds['mean']:.1f} ± {seconds['std']:.1f}; "
        f"seconds per training epoch: {summary['epoch_seconds']['mean']:.1f}; best epochs "
        f"{[r['best_epoch'] for r in runs]} of {[r['epochs'] for r in runs]} run.",
        "",
        "Tuning (validation only, seed " + str(result["tuning"]["seed"]) + "):",
        "",
        f"| setting | valid {result['tuning']['metric']} | best epoch | epochs | s/epoch | s/run |",
        "|---|---|---|---|---|---|",
    ]
    metric = result["tuning"]["metric"]
    for run in result["tuning"]["runs"]:
        lines.append(f"| `{run['params']}` | {run[metric]:.4f} | {run['best_epoch']} | {run['epochs']} | "
                     f"{run['epoch_seconds']:.1f} | {run['fit_seconds']:.1f} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="diffurec_amazon_beauty")
    parser.add_argument("--data-dir", help="default: $REFIT_GYM_DATA")
    parser.add_argument("--grid", nargs="+", default=["dropout=0.2,0.5"], metavar="NAME=V1,V2",
                        help="the settings tried on validation (their product)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a hyper-parameter fixed for every run; repeatable")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--output", default="runs/sasrec_baseline")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    fixed = {"threads": args.threads, "max_epochs": args.max_epochs, "eval_every": args.eval_every,
             "patience": args.patience, **parse_params(args.param)}
    grid = grid_settings(parse_grid(args.grid))

    data = load_dataset(args.dataset, data_dir=args.data_dir)
    print(f"{data.name}: {data.n_users} users x {data.n_items} items, {data.train.nnz} train interactions",
          file=sys.stderr)
    popularity = evaluate(fit_baseline(PopularityRecommender(), data), data, ks=KS, protocol="sequential").metrics

    result = {"dataset": data.name, "command": command, "threads": args.threads, "grid": grid, "fixed": fixed,
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "popularity": popularity}

    def save() -> None:
        (output / "results.json").write_text(json.dumps(result, indent=2))

    started = time.perf_counter()
    tuning = tune_sasrec(data, grid, seed=args.seeds[0], log=print_log, **fixed)
    result["tuning"] = {**tuning.to_dict(), "seed": args.seeds[0],
                        "seconds": time.perf_counter() - started}
    result["chosen"] = tuning.best_params
    save()
    print(f"chosen on validation: {tuning.best_params} ({tuning.metric} {tuning.best_score:.4f})", file=sys.stderr)

    runs = []
    for seed in args.seeds:
        if seed == args.seeds[0]:
            model = tuning.model  # the tuning run of this seed: fit is deterministic given the seed
        else:
            model = SASRecRecommender(**{**fixed, **tuning.best_params, "seed": seed}).fit(data, log=print_log)
        metrics = evaluate(model, data, splits=("valid", "test"), ks=KS).metrics  # test: once per final model
        runs.append(run_record(model, metrics))
        print(f"seed {seed}: valid ndcg@10 {metrics['valid']['ndcg@10']:.4f}, "
              f"test hr@10 {metrics['test']['hr@10']:.4f} ndcg@10 {metrics['test']['ndcg@10']:.4f}",
              file=sys.stderr)
        result["runs"] = runs
        save()

    summary: dict = {}
    for split in ("valid", "test"):
        summary[split] = {}
        for metric in METRICS:
            mean, std = mean_std([run["metrics"][split][metric] for run in runs])
            summary[split][metric] = {"mean": mean, "std": std}
    for key in ("fit_seconds", "epoch_seconds"):
        mean, std = mean_std([run[key] for run in runs])
        summary[key] = {"mean": mean, "std": std}
    result["summary"] = summary
    result["total_seconds"] = time.perf_counter() - started
    save()
    table = markdown(result)
    (output / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
