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

``--workers N`` trains the seeds after the tuning in N processes (``--threads`` threads each).
``results.json`` is saved after the tuning and after every seed; ``--resume`` with the same command
keeps what it holds (the tuning, the finished seeds) and trains only the missing seeds, so a long
grid can be finished across sessions. Test is still computed once per seed's final model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Optional

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
        f"{result['threads']} thread(s) per process, {result.get('workers', 1)} process(es) for the seeds after "
        f"the tuning, {result['machine']}.",
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
    lines += ["", f"Command: `{result['command']}`"]
    lines += [f"Resumed by: `{command}`" for command in result.get("resumed_by", [])]
    lines.append("")
    return "\n".join(lines)


def fit_and_evaluate(dataset: str, data_dir: Optional[str], params: dict, data: Optional[Any] = None) -> dict:
    """Train one seed's model (``params`` holds the seed) and evaluate it once on valid and test.

    Top-level so that ``--workers`` processes can run it; each loads the dataset itself (``data``:
    already loaded, in this process)."""
    torch.set_num_threads(params["threads"])
    data = data if data is not None else load_dataset(dataset, data_dir=data_dir)
    seed = params["seed"]
    model = SASRecRecommender(**params).fit(data, log=lambda line: print_log(f"seed {seed}: {line}"))
    return run_record(model, evaluate(model, data, splits=("valid", "test"), ks=KS).metrics)


def comparable(value: Any) -> Any:
    """``value`` as it reads back from ``results.json`` (tuples become lists)."""
    return json.loads(json.dumps(value))


def resumed(output: Path, dataset: str, grid: list, fixed: dict) -> dict:
    """What an earlier run of the same experiment saved in ``output/results.json`` ({} when none)."""
    path = output / "results.json"
    if not path.is_file():
        return {}
    result = json.loads(path.read_text())
    for key, value in (("grid", grid), ("fixed", fixed)):
        if result.get(key) != comparable(value):
            raise SystemExit(f"--resume: {path} was written with {key} {result.get(key)!r}, this command has "
                             f"{comparable(value)!r}; use another --output")
    if result.get("dataset") != dataset:
        raise SystemExit(f"--resume: {path} is for dataset {result.get('dataset')!r}, not {dataset!r}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="diffurec_amazon_beauty")
    parser.add_argument("--data-dir", help="default: $REFIT_GYM_DATA")
    parser.add_argument("--grid", nargs="+", default=["dropout=0.2,0.5"], metavar="NAME=V1,V2",
                        help="the settings tried on validation (their product)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a hyper-parameter fixed for every run; repeatable")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes training the seeds after the tuning (each with --threads threads)")
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--output", default="runs/sasrec_baseline")
    parser.add_argument("--resume", action="store_true",
                        help="keep the tuning and the seeds already in --output's results.json (same command) and "
                             "train only the missing seeds")
    args = parser.parse_args()
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds must be distinct, got {args.seeds}")

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
    previous = resumed(output, data.name, grid, fixed) if args.resume else {}
    if "tuning" in previous and previous["tuning"].get("seed") != args.seeds[0]:
        raise SystemExit(f"--resume: the tuning in {output / 'results.json'} used seed "
                         f"{previous['tuning'].get('seed')}, this command tunes with seed {args.seeds[0]}")
    popularity = evaluate(fit_baseline(PopularityRecommender(), data), data, ks=KS, protocol="sequential").metrics

    result = {"dataset": data.name, "command": previous.get("command", command), "threads": args.threads,
              "workers": args.workers, "grid": grid, "fixed": fixed,
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "popularity": popularity, "resumed_by": previous.get("resumed_by", []) + ([command] if previous else [])}

    started = time.perf_counter()

    def save() -> None:  # total_seconds: wall clock of every invocation, up to its last save
        result["total_seconds"] = previous.get("total_seconds", 0.0) + time.perf_counter() - started
        (output / "results.json").write_text(json.dumps(result, indent=2))

    tuned_model = None
    if "chosen" in previous:
        result["tuning"], result["chosen"] = previous["tuning"], previous["chosen"]
        print(f"resumed: chosen on validation {result['chosen']} (tuned before)", file=sys.stderr)
    else:
        tuning = tune_sasrec(data, grid, seed=args.seeds[0], log=print_log, **fixed)
        result["tuning"] = {**tuning.to_dict(), "seed": args.seeds[0],
                            "seconds": time.perf_counter() - started}
        result["chosen"], tuned_model = tuning.best_params, tuning.model
        save()
        print(f"chosen on validation: {tuning.best_params} ({tuning.metric} {tuning.best_score:.4f})", file=sys.stderr)

    done = {run["seed"]: run for run in previous.get("runs", []) if run["seed"] in args.seeds}

    def record(run: dict) -> None:
        done[run["seed"]] = run
        metrics = run["metrics"]
        print(f"seed {run['seed']}: valid ndcg@10 {metrics['valid']['ndcg@10']:.4f}, "
              f"test hr@10 {metrics['test']['hr@10']:.4f} ndcg@10 {metrics['test']['ndcg@10']:.4f}",
              file=sys.stderr)
        result["runs"] = [done[seed] for seed in args.seeds if seed in done]
        save()

    if tuned_model is not None:  # the first seed's model is the tuning run itself: a fit is deterministic given its seed
        record(run_record(tuned_model, evaluate(tuned_model, data, splits=("valid", "test"), ks=KS).metrics))
    missing = [seed for seed in args.seeds if seed not in done]
    settings = [{**fixed, **result["chosen"], "seed": seed} for seed in missing]
    if args.workers == 1 or len(missing) <= 1:
        for params in settings:
            record(fit_and_evaluate(args.dataset, args.data_dir, params, data))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(args.workers, len(missing)), mp_context=context) as pool:
            futures = [pool.submit(fit_and_evaluate, args.dataset, args.data_dir, params) for params in settings]
            for future in as_completed(futures):
                record(future.result())
    runs = result["runs"]

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
    save()
    table = markdown(result)
    (output / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
