"""Fine-tuning results table on ML-1M: the default ReFiT agent, the supervised reference, the
controls of the fine-tuning issue and the pure policy-gradient agents, over seeds, next to the
pretrained model and a tuned EASE; with paired tests over users.

Runs (all from the same converged pretrained checkpoint; ``--updates`` updates each, or the run's
own ``max_updates``, always capped by ``--budget`` seconds):

* ``refit``: the default config (likelihood + collaborative PG term + L2 anchor); ``refit_400``:
  the same with 400 updates;
* ``supervised``: (d) the likelihood term alone, by gradient, no rollouts;
  ``supervised_400``: the same with 400 updates (``reinforce_categorical``'s update count);
* ``continued``: (a) continued DiffRec training with its own loss (lr ``--continued-lr``);
* ``ranking``: (b) the naive ranking reward (NDCG@20 of the held-out items) instead of the
  collaborative one in the PG term;
* ``no_collab``: (c) the collaborative PG term switched off (``pg_weight`` 0);
* ``random_holdout``: (e) random instead of chronological hold-out;
* ``reinforce``: pure policy gradient over Gaussian steps (reward: held-out log-likelihood);
* ``ppo``: pure policy gradient with clipped ratios (DDPO-IS), same reward;
* ``reinforce_categorical``: pure policy gradient through a categorical last step with the
  importance-weighted hit reward (expected gradient = the log-likelihood's): 1,024 sampled
  items per user, one rollout per user, 400 updates (an update costs about a third of
  ``refit``'s, which collects 4 rollouts per user); ``reinforce_categorical_m64``: 64 samples,
  4 rollouts per user, ``--updates``;
* ``torchrl_ppo``: TorchRL's ``ClipPPOLoss``, same reward;
* ``sb3_ppo``: Stable-Baselines3 PPO, same reward.

Every run writes its own folder under ``--output`` (skipped when its ``summary.json`` exists, so
the script resumes; a summary written under a different spec of the same name is refused).
``table.md`` and ``table.json`` collect everything, ``diagnostics.md`` the training diagnostics of
each run's first seed. Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/finetune_table.py --pretrained runs/ml1m_pretrained \\
        --output runs/table --seeds 0 1 2 --budget 900 [--runs refit,supervised,continued]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from agents.trainer import finetune
from refit_gym.baselines import tune_ease
from refit_gym.checkpoint import load_checkpoint
from refit_gym.config import load_config
from refit_gym.data import load_dataset
from refit_gym.evaluation.evaluator import evaluate
from refit_gym.evaluation.metrics import ranking_metrics
from refit_gym.runtime import tune_cpu_runtime
from refit_gym.training.pretrain import pretrain

PG_REWARD = {"loglik": {"weight": 1.0, "temperature": 0.1}}
RUNS: dict[str, dict[str, Any]] = {
    "refit": {},
    "refit_400": {"max_updates": 400},
    "supervised": {"agent": "supervised"},
    "continued": {"continued": True},
    "ranking": {"reward": {"ndcg": {"weight": 1.0, "k": 20}}},
    "no_collab": {"pg_weight": 0.0},
    "random_holdout": {"holdout": "random"},
    "reinforce": {"agent": "reinforce", "reward": PG_REWARD},
    "ppo": {"agent": "ppo", "reward": PG_REWARD, "clip_range": 1e-3},
    "reinforce_categorical": {"agent": "reinforce", "reward": PG_REWARD, "pg_weight": 0.0, "categorical_samples": 1024,
                              "rollouts_per_user": 1, "max_updates": 400},
    "reinforce_categorical_m64": {"agent": "reinforce", "reward": PG_REWARD, "pg_weight": 0.0, "categorical_samples": 64},
    "supervised_400": {"agent": "supervised", "max_updates": 400},
    "torchrl_ppo": {"agent": "torchrl-ppo", "reward": PG_REWARD, "clip_range": 1e-3},
    "sb3_ppo": {"agent": "sb3-ppo", "reward": PG_REWARD, "clip_range": 1e-3},
}
SHOWN = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def per_user_test_metrics(model, data) -> dict[str, np.ndarray]:
    """Per-user test Recall@20 / NDCG@20 (for paired tests)."""
    result = evaluate(model, data, splits=("test",), ks=(20,), export_topk=20)
    top = torch.from_numpy(result.top_items["test"])
    values = ranking_metrics(top, data.test, ks=(20,))
    return {k: values[k].cpu().numpy() for k in ("recall@20", "ndcg@20")}


def run_one(name: str, seed: int, args, config_path: str, data, output: Path) -> dict:
    folder = output / f"{name}-s{seed}"
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        if name in RUNS and "spec" in summary and summary["spec"] != json.loads(json.dumps(RUNS[name])):
            raise SystemExit(f"{folder} was run with spec {summary['spec']}, but {name!r} is now {RUNS[name]}: "
                             "move the folder away or use another --output")
        return summary
    spec = dict(RUNS[name])
    config = load_config(config_path, {"device": "cpu", "seed": seed})
    if spec.pop("continued", False):
        config.pretrain.lr = args.continued_lr
        config.pretrain.time_budget_s = args.budget
        config.pretrain.max_lr_decays = 0
        config.pretrain.plateau_patience = 10**6
        config.pretrain.min_epochs = 0
        config.pretrain.max_epochs = args.continued_epochs
        result = pretrain(config, data, output_dir=folder, progress=False, init_from=args.pretrained)
        metrics, seconds = result.best_metrics, result.seconds
    else:
        config.finetune = {**config.finetune, "time_budget_s": args.budget, "eval_every": args.eval_every,
                           "max_updates": args.updates, **spec}
        result = finetune(config, data, args.pretrained, folder, progress=False)
        metrics, seconds = result.best_metrics, result.seconds
    model, _ = load_checkpoint(folder, data)
    users = per_user_test_metrics(model, data)
    np.savez(folder / "per_user_test.npz", **users)
    summary = {"name": name, "seed": seed, "spec": RUNS[name], "metrics": metrics, "seconds": seconds}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of per-user values (a vs b); p = 1 for identical models."""
    if np.array_equal(a, b):
        return {"mean_diff": 0.0, "t_p": 1.0, "wilcoxon_p": 1.0}
    t = stats.ttest_rel(a, b)
    w = stats.wilcoxon(a, b, zero_method="zsplit")
    return {"mean_diff": float(np.mean(a - b)), "t_p": float(t.pvalue), "wilcoxon_p": float(w.pvalue)}


def training_diagnostics(folder: Path, window: int = 10) -> dict[str, float] | None:
    """From a fine-tuning run's ``log.csv``: the reward and the held-out probability mass as means
    of the first and the last ``window`` updates (single updates are noisy), the lowest
    validation Recall@20, and the median PPO clip fraction and approximate KL when logged."""
    log = folder / "log.csv"
    if not log.is_file():
        return None
    with log.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    updates = [r for r in rows if r.get("reward/total")]
    if not updates:
        return None  # control (a) logs epochs, not updates

    def mean(part, key):
        return statistics.mean(float(r[key]) for r in part)

    out = {f"{key}_{end}": mean(part, key) for key in ("reward/total", "held_out_mass")
           for end, part in (("first", updates[:window]), ("last", updates[-window:]))}
    out["lowest_valid_recall@20"] = min(float(r["valid_recall@20"]) for r in rows if r.get("valid_recall@20"))
    for key in ("clip_fraction", "approx_kl", "kl_approx"):
        values = [float(r[key]) for r in updates if r.get(key)]
        if values:
            out[f"median_{'approx_kl' if key == 'kl_approx' else key}"] = statistics.median(values)
    return out


def signed_p(tests: list[dict[str, float]]) -> str:
    """The largest paired-t p over seeds, signed by the direction of the difference: ``+`` better
    or identical in every seed, ``-`` worse or identical, ``+-`` mixed, ``=`` identical in all."""
    diffs = [t["mean_diff"] for t in tests]
    sign = ("=" if all(d == 0 for d in diffs) else "+" if all(d >= 0 for d in diffs) else "-" if all(d <= 0 for d in diffs)
            else "+-")
    return f"{sign}{max(t['t_p'] for t in tests):.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml1m_diffrec.yaml")
    parser.add_argument("--pretrained", required=True, help="the converged pretrained checkpoint")
    parser.add_argument("--output", default="runs/finetune_table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=900.0, help="wall-clock cap per run (seconds)")
    parser.add_argument("--updates", type=int, default=2000, help="update budget per fine-tuning run (fair on a shared machine)")
    parser.add_argument("--continued-epochs", type=int, default=10**6, help="epoch budget of control (a)")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--continued-lr", type=float, default=1e-4)
    parser.add_argument("--runs", default="refit,supervised,continued", help=f"comma-separated, from {list(RUNS)}")
    parser.add_argument("--single-seed-runs", default="", help="runs done with the first seed only")
    parser.add_argument("--compile-only", action="store_true", help="train nothing: tabulate the finished runs in --output")
    args = parser.parse_args()
    tune_cpu_runtime()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config)
    data = load_dataset(config.data.dataset)

    reference_file = output / "reference.json"
    if reference_file.is_file():
        reference = json.loads(reference_file.read_text())
    else:
        pretrained_model, _ = load_checkpoint(args.pretrained, data)
        ease = tune_ease(data)
        reference = {
            "pretrained": evaluate(pretrained_model, data, ks=(10, 20)).metrics,
            "ease": evaluate(ease.model, data, ks=(10, 20)).metrics,
            "ease_l2": ease.best_l2,
        }
        np.savez(output / "pretrained_per_user.npz", **per_user_test_metrics(pretrained_model, data))
        np.savez(output / "ease_per_user.npz", **per_user_test_metrics(ease.model, data))
        reference_file.write_text(json.dumps(reference, indent=2))
    base_users = dict(np.load(output / "pretrained_per_user.npz"))
    ease_users = dict(np.load(output / "ease_per_user.npz"))

    plan = [(name, seed) for name in args.runs.split(",") if name for seed in args.seeds]
    plan += [(name, args.seeds[0]) for name in args.single_seed_runs.split(",") if name]
    summaries: dict[str, list[dict]] = {}
    if args.compile_only:
        plan = [(name, seed) for name, seed in plan if (output / f"{name}-s{seed}" / "summary.json").is_file()]
    for name, seed in plan:
        print(f"== {name} seed {seed}", flush=True)
        summaries.setdefault(name, []).append(run_one(name, seed, args, args.config, data, output))

    lines = ["| model | seeds | " + " | ".join(f"valid {m}" for m in SHOWN) + " | " + " | ".join(f"test {m}" for m in SHOWN)
             + " | test R@20 / N@20 vs pretrained: sign, paired t p (max over seeds) | vs EASE |", "|" + "---|" * (2 + 2 * len(SHOWN) + 2)]
    for label, metrics in (("pretrained DiffRec", reference["pretrained"]), (f"EASE (l2={reference['ease_l2']:g})", reference["ease"])):
        cells = [f"{metrics[s][m]:.4f}" for s in ("valid", "test") for m in SHOWN]
        lines.append(f"| {label} | - | " + " | ".join(cells) + " | | |")
    table: dict[str, Any] = {"reference": reference, "runs": {}}
    diagnostics = ["| model (first seed) | reward, mean of first → last 10 updates | held-out mass, same | "
                   "lowest valid R@20 | median clip fraction / approx KL |", "|---|---|---|---|---|"]
    for name, runs in summaries.items():
        cells = []
        for split in ("valid", "test"):
            for metric in SHOWN:
                values = [r["metrics"][split][metric] for r in runs]
                spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
                cells.append(f"{statistics.mean(values):.4f}{spread}")
        tests = []
        for r in runs:
            users = dict(np.load(output / f"{name}-s{r['seed']}" / "per_user_test.npz"))
            tests.append({"vs_pretrained": {m: paired(users[m], base_users[m]) for m in users},
                          "vs_ease": {m: paired(users[m], ease_users[m]) for m in users}})
        p_cells = [" / ".join(signed_p([t[against][m] for t in tests]) for m in ("recall@20", "ndcg@20"))
                   for against in ("vs_pretrained", "vs_ease")]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " | " + " | ".join(p_cells) + " |")
        training = training_diagnostics(output / f"{name}-s{runs[0]['seed']}")
        table["runs"][name] = {"runs": runs, "paired_tests": tests, "training_first_seed": training}
        if training:
            kl = f"{training['median_clip_fraction']:.2f} / {training['median_approx_kl']:.0e}" if "median_clip_fraction" in training else ""
            diagnostics.append(
                f"| {name} | {training['reward/total_first']:.2f} → {training['reward/total_last']:.2f} | "
                f"{training['held_out_mass_first']:.3f} → {training['held_out_mass_last']:.3f} | "
                f"{training['lowest_valid_recall@20']:.4f} | {kl} |")
    (output / "table.md").write_text("\n".join(lines) + "\n")
    (output / "diagnostics.md").write_text("\n".join(diagnostics) + "\n")
    (output / "table.json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
