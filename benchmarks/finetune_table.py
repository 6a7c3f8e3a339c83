"""The results tables: honest baselines, base models over pretraining seeds, fine-tuned models over seeds.

Every row of a table uses the same split and protocol, the one of its base models' configs:

* ``cf`` (``diffrec_ml-1m_clean``, full ranking, train items masked for valid, train + valid for
  test; Recall / NDCG): baselines (deterministic) popularity; EASE (l2 tuned on validation);
  **recency-weighted EASE** (l2 and ``w_min`` tuned on validation) -- the baseline that uses time
  order, as the fine-tuned models do (their ``recent`` hold-out and T-DiffRec's weights read the
  training rows' order); the reference baseline of the tests;
* ``sequential`` (a DiffuRec leave-one-out pickle, full ranking, history not masked; HR /
  NDCG): baselines popularity and **SASRec trained with cross-entropy over all items**
  (hyper-parameters chosen on validation, then one model per ``--pretrain-seeds`` seed) -- the
  reference baseline of the tests, a sequence model that reads the same histories
  (``--without-sasrec``: popularity alone, the reference of the tests then, to compare fine-tuning
  arms where no SASRec run is at hand; the table says that the strongest baseline is not in it);

Rows:

* **base models**: for each ``--bases`` name (``configs/<name>.yaml``, or ``configs/ml1m_<name>.yaml``:
  ``diffrec``, ``tdiffrec``, ``cfdiff``, ``beauty_seq``, ``beauty_dreamrec``, ...) and each
  ``--pretrain-seeds`` seed, pretrained until it has converged (selected on validation), or taken
  from a checkpoint pretrained elsewhere (``--base-checkpoint BASE:SEED=PATH``: its model, diffusion,
  dataset and seed are checked against the base's config; a control's continued pretraining from
  such a base, e.g. ``<output>/finetune/<base>-pS-continued-f0``, is a longer-trained base of seed S);
* **fine-tuned models**: each ``--runs`` recipe (see :data:`RUNS`) from each pretrained
  checkpoint, for each ``--finetune-seeds`` seed (``--updates`` updates, or a recipe's own
  ``--run-updates``, capped by ``--budget`` seconds), selected on validation.

Test is sealed until the end: every unit selects on validation only, and test is computed once
per selected model when the table is compiled. The unit of replication is the seed: a row's
mean ± std is over its runs (pretraining seeds x fine-tuning seeds). Tests, each named in the
table: a fine-tuned row against its pretrained base is a **paired t-test over pretraining
seeds** (each seed's fine-tuned mean against the same seed's base); any row against a
deterministic baseline (recency-weighted EASE) is a **one-sample t-test** of the seed values
against the baseline's value, against a seeded one (SASRec) **Welch's t-test**; ``--compare
A:B`` rows give the mean difference over the pretraining seeds both arms ran from with its
**paired t-test** (the arms share those bases), and Welch's t-test on the run values beside it. The
``sees`` column says what each agent may see: (a) only the reward of its actions, (b) the
reward plus its own probabilities, (c) the exact objective's gradient.

Every unit writes its own folder under ``--output`` and is skipped when its ``summary.json``
exists (the script resumes; a unit whose spec changed in a key its kind of run uses is refused,
naming the keys). Units of one stage run in ``--workers`` processes (``--threads`` torch threads
each, by default ``cores / workers``). Usage::

    REFIT_GYM_DATA=../shared/data python benchmarks/finetune_table.py --output runs/table \\
        --bases diffrec,tdiffrec --pretrain-seeds 0 1 2 --runs refit,supervised --updates 400 \\
        --workers 2 [--compare refit:supervised] [--set finetune.lr=3e-4] [--base-set cfdiff:model.attention_dropout=0]

It writes ``table.md`` (with the command), ``table.json`` (every seed's metrics, the tests) and
``diagnostics.md`` (training diagnostics of each recipe's first run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

from scipy import stats

PG_REWARD = {"loglik": {"weight": 1.0, "temperature": 0.1}}
RUNS: dict[str, dict[str, Any]] = {
    "refit": {},
    "supervised": {"agent": "supervised"},
    "supervised_holdout50": {"agent": "supervised", "holdout_fraction": 0.5},
    "continued": {"continued": True},
    "refit_mix": {"pretrain_loss_weight": 1.0, "pg_weight": 1.0},  # refit + the model's own training loss (agents/pretraining_mix.py)
    "mix_no_collab": {"pretrain_loss_weight": 1.0, "pg_weight": 0.0},  # refit_mix without its policy-gradient term
    "refit_mix_holdout5": {"pretrain_loss_weight": 1.0, "holdout_count": 5, "pg_weight": 1.0},  # refit_mix hiding each user's last 5 items
    "mix_holdout5_no_collab": {"pretrain_loss_weight": 1.0, "holdout_count": 5, "pg_weight": 0.0},  # its ablation
    "ranking": {"reward": {"ndcg": {"weight": 1.0, "k": 20}}, "pg_weight": 1.0},
    "no_collab": {"pg_weight": 0.0},
    # without early stopping: the run ends at --updates or --budget, still selected on validation
    "refit_full_budget": {"patience": 10**6, "pg_weight": 1.0},
    "no_collab_full_budget": {"pg_weight": 0.0, "patience": 10**6},
    # the same at the step the policy-gradient term leaves the likelihood term in a refit update on
    # Amazon Beauty DreamRec (the update's cosine with the likelihood gradient, 0.36, x lr 1e-4, rounded down)
    "no_collab_full_budget_lr3e-5": {"pg_weight": 0.0, "patience": 10**6, "lr": 3e-5},
    # the geometric middle of 3e-5 and the config's 1e-4, rounded (docs/sequential.md, "at lr 5e-5")
    "no_collab_full_budget_lr5e-5": {"pg_weight": 0.0, "patience": 10**6, "lr": 5e-5},
    # the likelihood term alone with the input items left in its softmax, as the sequential protocol's
    # default evaluation ranks them (docs/sequential.md, "What the reward sees")
    "no_collab_full_budget_unmasked": {"pg_weight": 0.0, "patience": 10**6, "likelihood_mask_visible": False},
    # refit on 4x the users per update: the collaborative policy-gradient estimate is partly coherent
    # only at larger batches (benchmarks/gradient_signal.py, Amazon Beauty DreamRec)
    "refit_users512": {"users_per_batch": 512},
    # refit with its rewards permuted among each user's rollouts: a placebo of the policy-gradient term
    # (finetune.shuffle_rewards_within_user; docs/finetuning.md, "A placebo for the policy-gradient term")
    "refit_placebo": {"shuffle_rewards_within_user": True},
    # the same placebo of refit_full_budget, for configs whose recipe is the likelihood term alone (ML-1M DreamRec)
    "refit_full_budget_placebo": {"patience": 10**6, "pg_weight": 1.0, "shuffle_rewards_within_user": True},
    # refit with the neighbours of its next-item collaborative term chosen by the visible items only, so the
    # hidden item takes no part in them (refit_gym/rewards/collaborative.py, "Which items choose the neighbours");
    # it keeps the config's pg_weight, so on a config with pg_weight 0 (ML-1M DreamRec) the term is only logged
    "refit_visible_neighbours": {"reward_term_options": {"next_collaborative": {"neighbours_from": "visible_items"}}},
    # the same for refit_full_budget, on configs whose recipe is the likelihood term alone (ML-1M DreamRec)
    "refit_full_budget_visible_neighbours": {"patience": 10**6, "pg_weight": 1.0, "reward_term_options": {
        "next_collaborative": {"neighbours_from": "visible_items"}}},
    "random_holdout": {"holdout": "random", "pg_weight": 1.0},
    "reinforce": {"agent": "reinforce", "reward": PG_REWARD, "pg_weight": 1.0},
    "ppo": {"agent": "ppo", "reward": PG_REWARD, "clip_range": 1e-3},
    "reinforce_categorical": {"agent": "reinforce", "reward": PG_REWARD, "pg_weight": 0.0, "categorical_samples": 1024,
                              "rollouts_per_user": 1},
    "torchrl_ppo": {"agent": "torchrl-ppo", "reward": PG_REWARD, "clip_range": 1e-3},
    "sb3_ppo": {"agent": "sb3-ppo", "reward": PG_REWARD, "clip_range": 1e-3},
    # reward-only slates (docs/finetuning.md, "Slate agents"): tau and lr chosen on validation, seed 0
    "slate_rloo": {"agent": "slate-rloo", "rollouts_per_user": 8, "slate_temperature": 0.02, "anchor": "none"},
    "slate_grpo": {"agent": "slate-grpo", "rollouts_per_user": 8, "slate_temperature": 0.02, "anchor": "none"},
    "slate_plrank": {"agent": "slate-plrank", "rollouts_per_user": 8, "slate_temperature": 0.02, "anchor": "none",
                     "lr": 3e-5},
}
"""Fine-tuning recipes: overrides of the config's ``finetune`` section (``continued``: control
(a), continued pretraining with the model's own loss from the checkpoint, at ``--continued-lr``).
``refit`` is the config's own recipe (for ``configs/ml1m_dreamrec.yaml`` the likelihood term alone,
without early stopping); a recipe built on the policy-gradient term sets ``pg_weight`` itself."""

METRICS = {  # protocol -> (shown, tested: the first two shown at K = 20, also the valid columns)
    "cf": (("recall@10", "ndcg@10", "recall@20", "ndcg@20"), ("recall@20", "ndcg@20")),
    "sequential": (("hr@10", "ndcg@10", "hr@20", "ndcg@20"), ("hr@20", "ndcg@20")),
}
REFERENCE = {"cf": "recency-weighted EASE", "sequential": "SASRec"}
"""The reference baseline of each protocol's tests."""


# ---------------------------------------------------------------------------------- units
def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def config_path(base: str) -> Path:
    """``configs/<base>.yaml``, else ``configs/ml1m_<base>.yaml``."""
    own = Path("configs") / f"{base}.yaml"
    return own if own.is_file() else Path("configs") / f"ml1m_{base}.yaml"


def _config(base: str, seed: int, sets: list[str]):
    from refit_gym.cli import parse_overrides
    from refit_gym.config import load_config

    return load_config(config_path(base), {"device": "cpu", "seed": seed, **parse_overrides(sets)})


def protocol_of(base: str) -> tuple[str, str]:
    """``(protocol, dataset)`` of a base's config (the protocol its model is scored with)."""
    from refit_gym.config import load_config
    from refit_gym.models import model_class

    config = load_config(config_path(base))
    return config.evaluation.protocol or model_class(config.model.name).protocol, config.data.dataset


CONTINUED_ONLY = ("continued_lr", "continued_epochs", "continued_eval_every")
"""Spec keys only the control (continued pretraining) uses."""
FINETUNE_ONLY = ("updates", "eval_every")
"""Spec keys only a fine-tuning recipe uses."""


def used_spec(spec: dict) -> dict:
    """The part of a unit's spec its run reads: the spec less the keys its kind of run ignores (a
    fine-tuning arm finished under other ``--continued-*`` options is the same arm, a control
    under another ``--updates`` / ``--eval-every`` the same control). Pretraining units and
    recipes not in :data:`RUNS` keep every key."""
    if "run" not in spec or spec["run"] not in RUNS:
        return spec
    unused = FINETUNE_ONLY if RUNS[spec["run"]].get("continued") else CONTINUED_ONLY
    return {key: value for key, value in spec.items() if key not in unused}


def _summary(folder: Path, spec: dict) -> Optional[dict]:
    path = folder / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    done, asked = used_spec(summary.get("spec") or {}), used_spec(json.loads(json.dumps(spec)))
    if done != asked:
        absent = "<absent>"
        differ = [f"{key}: {done.get(key, absent)!r} then, {asked.get(key, absent)!r} now"
                  for key in sorted(set(done) | set(asked)) if done.get(key, absent) != asked.get(key, absent)]
        raise SystemExit(f"{folder} was run with another spec ({'; '.join(differ)}): move it away or use another "
                         "--output")
    return summary


def pretrain_unit(spec: dict) -> dict:
    """Pretrain one base model with one seed (validation only), or take it from ``spec["checkpoint"]``."""
    from refit_gym.data import load_dataset
    from refit_gym.training.pretrain import pretrain

    folder = Path(spec["folder"])
    done = _summary(folder, spec)
    if done:
        return done
    if spec.get("checkpoint"):
        return import_unit(spec)
    config = _config(spec["base"], spec["seed"], spec["sets"])
    data = load_dataset(config.data.dataset)
    result = pretrain(config, data, output_dir=folder, progress=False, log=lambda _: None)
    summary = {"spec": spec, "valid": result.best_metrics["valid"], "seconds": result.seconds,
               "seconds_to_best": result.seconds_to_best, "best_epoch": result.best_epoch, "epochs": result.epochs_run}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _identity(experiment: dict) -> dict:
    """What makes two pretrained bases the same model: the seed, the dataset, every model and diffusion field."""
    return {"seed": experiment.get("seed"), "data.dataset": experiment.get("data", {}).get("dataset"),
            **{f"{section}.{key}": value for section in ("model", "diffusion")
               for key, value in experiment.get(section, {}).items()}}


def _stages(source: Path) -> list[Path]:
    """The checkpoints ``source`` was trained through, the first (the freshly initialised one) first:
    continued pretraining records in its ``run.json`` the checkpoint it started from (``init_from``)."""
    stages = [source]
    while True:
        record = stages[0] / "run.json"
        parent = json.loads(record.read_text()).get("config", {}).get("init_from") if record.is_file() else None
        if parent in (None, "None", ""):
            return stages
        if not Path(parent).is_dir():
            raise SystemExit(f"--base-checkpoint {source} was continued from {parent}, which is not a directory "
                             "(the first stage's seed names the base; run from the folder the path is relative to)")
        if Path(parent).resolve() in [stage.resolve() for stage in stages]:
            raise SystemExit(f"--base-checkpoint {source}: its init_from records form a loop at {parent}")
        stages.insert(0, Path(parent))


def import_unit(spec: dict) -> dict:
    """A base pretrained elsewhere (``--base-checkpoint``, e.g. by ``refit-gym pretrain``, or a control's
    continued pretraining from such a base), checked against the base's config (model, diffusion, dataset,
    and the seed of its first stage: continued pretraining keeps the base's identity), copied into the
    unit's folder and summarised from its own ``metrics.json`` (selected on validation when it was trained;
    seconds summed over its stages)."""
    import shutil

    from refit_gym.checkpoint import read_checkpoint_config

    source, folder = Path(spec["checkpoint"]), Path(spec["folder"])
    stages = _stages(source)
    saved = read_checkpoint_config(source)["experiment"]
    first_seed = read_checkpoint_config(stages[0])["experiment"].get("seed")
    config = _config(spec["base"], spec["seed"], spec["sets"]).to_dict()
    expected, found = _identity(config), _identity({**saved, "seed": first_seed})
    differs = [key for key in sorted(set(expected) | set(found)) if expected.get(key) != found.get(key)]
    if differs:
        detail = "; ".join(f"{key}: the checkpoint has {found.get(key)}, the base {expected.get(key)}" for key in differs)
        raise SystemExit(f"--base-checkpoint {source} is not {spec['base']} with seed {spec['seed']} ({detail})")
    runs = []
    for stage in stages:
        metrics = stage / "metrics.json"
        if not metrics.is_file():
            raise SystemExit(f"--base-checkpoint {source}: {metrics} is missing (an unfinished pretraining run?)")
        runs.append(json.loads(metrics.read_text()))
        if runs[-1].get("stage") != "pretrain":
            raise SystemExit(f"--base-checkpoint {source}: {stage} is a {runs[-1].get('stage')} checkpoint, "
                             "not a pretrained base")
    selected = len(runs) - 1  # the stage whose epoch was selected: a stage that kept its start kept its parent's
    while selected > 0 and runs[selected]["best_epoch"] == 0:
        selected -= 1
    run = runs[-1]
    shutil.copytree(source, folder, dirs_exist_ok=True)
    summary = {"spec": spec, "valid": run["metrics"]["valid"], "seconds": sum(r["seconds"] for r in runs),
               "seconds_to_best": sum(r["seconds"] for r in runs[:selected]) + runs[selected]["seconds_to_best"],
               "best_epoch": run["best_epoch"], "epochs": run["epochs_run"], "stages": [str(stage) for stage in stages]}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def finetune_unit(spec: dict) -> dict:
    """Fine-tune one pretrained checkpoint with one recipe and one seed (validation only)."""
    from agents import agent_class
    from agents.config import finetune_config
    from agents.trainer import finetune
    from refit_gym.data import load_dataset
    from refit_gym.training.pretrain import pretrain

    folder = Path(spec["folder"])
    done = _summary(folder, spec)
    if done:
        return done
    recipe = dict(RUNS[spec["run"]])
    config = _config(spec["base"], spec["seed"], spec["sets"])
    data = load_dataset(config.data.dataset)
    if recipe.pop("continued", False):
        settings = config.pretrain
        settings.lr, settings.time_budget_s, settings.max_lr_decays = spec["continued_lr"], spec["budget"], 0
        settings.plateau_patience, settings.min_epochs, settings.max_epochs = 10**6, 0, spec["continued_epochs"]
        settings.eval_every = spec.get("continued_eval_every") or settings.eval_every
        result = pretrain(config, data, output_dir=folder, progress=False, log=lambda _: None,
                          init_from=spec["pretrained"])
        valid, seconds, sees, steps = result.best_metrics["valid"], result.seconds, "c", {}
    else:
        config.finetune = {**with_recipe(config.finetune, recipe), "time_budget_s": spec["budget"],
                           "eval_every": spec["eval_every"], "max_updates": spec["updates"]}
        result = finetune(config, data, spec["pretrained"], folder, progress=False, log=lambda _: None)
        valid, seconds = result.best_metrics["valid"], result.seconds
        settings = finetune_config(config.finetune)
        sees = agent_class(settings.agent).information(settings)
        steps = {"updates": result.updates, "best_update": result.best_update}
    summary = {"spec": spec, "valid": valid, "seconds": seconds, "sees": sees, **steps}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def with_recipe(section: dict, recipe: dict) -> dict:
    """A config's ``finetune`` section with a fine-tuning recipe of :data:`RUNS` applied.

    The recipe's keys replace the section's, except ``reward_term_options`` (``{term: {key: value}}``),
    which is merged into the named terms of the section's ``reward``.

    Raises:
        ValueError: ``reward_term_options`` names a term the section's reward does not have.
    """
    recipe = dict(recipe)
    term_options = recipe.pop("reward_term_options", {})
    section = {**section, **recipe}
    if term_options:
        reward = dict(section.get("reward") or {})
        missing = sorted(set(term_options) - {name for name, term in reward.items() if isinstance(term, dict)})
        if missing:
            raise ValueError(f"the recipe sets options of the reward terms {missing}, which the fine-tuning reward "
                             f"{sorted(reward)} does not have as mappings")
        section["reward"] = {name: {**term, **term_options.get(name, {})} if name in term_options else term
                             for name, term in reward.items()}
    return section


def test_unit(spec: dict) -> dict:
    """Test metrics of one selected checkpoint, computed once (cached in ``test.json``)."""
    from refit_gym.checkpoint import load_checkpoint
    from refit_gym.config import resolve_device
    from refit_gym.data import load_dataset
    from refit_gym.evaluation.evaluator import evaluate, protocol_from_config

    folder = Path(spec["folder"])
    path = folder / "test.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = _config(spec["base"], 0, spec["sets"])
    data = load_dataset(config.data.dataset)
    model, saved = load_checkpoint(folder, data, device=resolve_device(config.device))  # the table's device
    result = evaluate(model, data, splits=("test",), ks=saved.evaluation.ks, batch_size=saved.evaluation.batch_size,
                      protocol=protocol_from_config(saved.evaluation, model))
    path.write_text(json.dumps(result.metrics["test"], indent=2))
    return result.metrics["test"]


def baselines(output: Path, protocol: str, dataset: str, seeds: list[int], sasrec_results: Optional[str],
              without_sasrec: bool = False) -> dict:
    """The protocol's baselines, tuned on validation, tested once (written to ``baselines.json``; the
    ``cf`` ones, computed here at some cost, are read back from it).

    ``cf``: popularity, EASE and recency-weighted EASE (deterministic), computed here.
    ``sequential``: popularity and SASRec from the ``results.json`` of a finished
    ``benchmarks/sasrec_baseline.py`` run on the same dataset and seeds (``--sasrec-results``; its
    settings were chosen on validation, one model per seed, test computed once per model): the
    entry's ``seeds`` hold every seed's metrics; with ``without_sasrec`` (``--without-sasrec``),
    popularity alone, computed here.
    """
    path = output / "baselines.json"
    if protocol == "cf" and path.is_file():  # the sequential ones are read (or counted) again: the arguments decide
        return json.loads(path.read_text())
    out: dict[str, dict] = {}
    if protocol == "cf":
        from refit_gym.baselines import PopularityRecommender, tune_ease
        from refit_gym.baselines.ease import DEFAULT_W_MIN_GRID
        from refit_gym.data import load_dataset
        from refit_gym.evaluation.evaluator import evaluate

        data = load_dataset(dataset)
        ease, recency = tune_ease(data), tune_ease(data, w_min_grid=DEFAULT_W_MIN_GRID)
        rows = {
            "popularity": (PopularityRecommender().fit(data.train), {}),
            "EASE": (ease.model, {"l2": ease.best_l2}),
            "recency-weighted EASE": (recency.model, {"l2": recency.best_l2, "w_min": recency.best_w_min}),
        }
        for name, (model, chosen) in rows.items():
            metrics = evaluate(model, data, splits=("valid", "test"), ks=(10, 20, 50, 100)).metrics
            out[name] = {"chosen_on_valid": chosen, **metrics}
    else:
        out = sequential_baselines(dataset, seeds, sasrec_results, without_sasrec)
    path.write_text(json.dumps(out, indent=2))
    return out


def sequential_baselines(dataset: str, seeds: list[int], sasrec_results: Optional[str],
                         without_sasrec: bool = False) -> dict[str, dict]:
    """Popularity and SASRec read from a ``benchmarks/sasrec_baseline.py`` result, or popularity alone
    (``without_sasrec``; see :func:`baselines`)."""
    command = (f"python benchmarks/sasrec_baseline.py --dataset {dataset} --seeds {' '.join(map(str, seeds))} "
               "--output runs/sasrec_<dataset>")
    if without_sasrec:
        from refit_gym.baselines import PopularityRecommender, fit_baseline
        from refit_gym.data import load_dataset
        from refit_gym.evaluation.evaluator import evaluate

        data = load_dataset(dataset)
        popularity = evaluate(fit_baseline(PopularityRecommender(), data), data, ks=(5, 10, 20), protocol="sequential")
        return {"popularity": {"chosen_on_valid": {}, **popularity.metrics}}
    if not sasrec_results:
        raise SystemExit(f"a sequential table needs the SASRec baseline: run `{command}` and pass its results.json "
                         "with --sasrec-results (or, to compare fine-tuning arms without it, --without-sasrec)")
    result = json.loads(Path(sasrec_results).read_text())
    run_seeds = [run["seed"] for run in result.get("runs", [])]
    if result.get("dataset") != dataset or sorted(run_seeds) != sorted(seeds) or "summary" not in result:
        raise SystemExit(f"{sasrec_results} holds SASRec on {result.get('dataset')!r} with seeds {run_seeds} "
                         f"(finished: {'summary' in result}); this table needs {dataset!r} with seeds {seeds}: "
                         f"run `{command}`")
    runs = [run["metrics"] for run in result["runs"]]
    mean = {split: {k: statistics.mean(r[split][k] for r in runs) for k in runs[0][split]} for split in ("valid", "test")}
    return {"popularity": {"chosen_on_valid": {}, **result["popularity"]},
            "SASRec": {"chosen_on_valid": result["chosen"], **mean, "seeds": runs, "source": sasrec_results,
                       "command": result["command"]}}


def base_checkpoints(items: list[str], bases: list[str], seeds: list[int]) -> dict[tuple[str, int], str]:
    """``{(base, seed): path}`` from ``--base-checkpoint BASE:SEED=PATH`` items."""
    out = {}
    for item in items:
        key, _, path = item.partition("=")
        base, _, seed = key.partition(":")
        if not path or base not in bases or not seed.isdigit() or int(seed) not in seeds:
            raise SystemExit(f"--base-checkpoint {item!r}: expected BASE:SEED=PATH with BASE one of --bases {bases} "
                             f"and SEED one of --pretrain-seeds {seeds}")
        if not Path(path).is_dir():
            raise SystemExit(f"--base-checkpoint {item!r}: {path} is not a directory")
        out[base, int(seed)] = path
    return out


def run_stage(function, specs: list[dict], workers: int, threads: int) -> list[dict]:
    if workers <= 1 or len(specs) <= 1:
        _threads(threads)
        return [function(spec) for spec in specs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_threads, initargs=(threads,)) as pool:
        return list(pool.map(function, specs))


# ---------------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def signed(p: float, difference: float) -> str:
    """``+p`` / ``-p``: the direction of the mean difference and the test's two-sided p."""
    if math.isnan(p):
        return "n/a"
    return f"{'+' if difference > 0 else '-' if difference < 0 else '='}{p:.1e}"


def one_sample(values: list[float], reference: float) -> tuple[float, float]:
    """``(mean difference, p)`` of a one-sample t-test of ``values`` against a deterministic ``reference``."""
    if len(values) < 2:
        return statistics.mean(values) - reference, float("nan")
    return statistics.mean(values) - reference, float(stats.ttest_1samp(values, reference).pvalue)


def paired_by_seed(a: dict[int, list[float]], b: dict[int, list[float]]) -> tuple[float, float, int]:
    """Paired t over the pretraining seeds both arms ran from: each seed's mean value of ``a`` against
    that seed's mean value of ``b`` (a fine-tuned arm against its base, or two arms from the same bases).
    Returns ``(mean difference, p, seeds)``; p is nan below two common seeds."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"no pretraining seed in common: {sorted(a)} and {sorted(b)}")
    differences = [statistics.mean(a[s]) - statistics.mean(b[s]) for s in seeds]
    if len(seeds) < 2:
        return differences[0], float("nan"), 1
    return statistics.mean(differences), float(stats.ttest_1samp(differences, 0.0).pvalue), len(seeds)


def values_by_seed(summaries: list[dict], metric: str, split: str = "test") -> dict[int, list[float]]:
    """``pretraining seed -> [value of each run from it]`` (a fine-tuned run's spec names its ``run`` and
    ``pretrain_seed``, its ``seed`` being the fine-tuning seed; a base's seed is its own)."""
    out: dict[int, list[float]] = {}
    for s in summaries:
        seed = s["spec"]["pretrain_seed"] if "run" in s["spec"] else s["spec"]["seed"]
        out.setdefault(seed, []).append(s[split][metric])
    return out


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    if len(a) < 2 or len(b) < 2:
        return statistics.mean(a) - statistics.mean(b), float("nan")
    return statistics.mean(a) - statistics.mean(b), float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def training_diagnostics(folder: Path, metric: str = "recall@20", window: int = 10) -> Optional[dict[str, float]]:
    """Means of the first and last ``window`` updates of reward and held-out mass, the lowest
    validation ``metric``, and the median PPO clip fraction / approximate KL when logged."""
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
    out["lowest_valid"] = min(float(r[f"valid_{metric}"]) for r in rows if r.get(f"valid_{metric}"))
    for key in ("clip_fraction", "approx_kl", "kl_approx"):
        values = [float(r[key]) for r in updates if r.get(key)]
        if values:
            out[f"median_{'approx_kl' if key == 'kl_approx' else key}"] = statistics.median(values)
    return out


# ---------------------------------------------------------------------------------- the table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/table")
    parser.add_argument("--bases", default="diffrec,tdiffrec",
                        help="comma-separated: configs/<name>.yaml or configs/ml1m_<name>.yaml (one dataset and protocol)")
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", default="refit,supervised", help=f"comma-separated, from {list(RUNS)}")
    parser.add_argument("--updates", type=int, default=400, help="update budget per fine-tuning run")
    parser.add_argument("--run-updates", action="append", default=[], metavar="RUN=N",
                        help="another update budget for one recipe (e.g. supervised=1200: a cheaper update, "
                             "the same wall clock)")
    parser.add_argument("--budget", type=float, default=900.0, help="wall-clock cap per fine-tuning run (seconds)")
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--continued-epochs", type=int, default=120, help="epoch budget of control (a)")
    parser.add_argument("--continued-lr", type=float, default=1e-4)
    parser.add_argument("--continued-eval-every", type=int, default=None,
                        help="validation interval (epochs) of control (a); default: the config's pretrain.eval_every")
    parser.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                        help="override a config field of every base (e.g. finetune.lr=3e-4)")
    parser.add_argument("--base-set", action="append", default=[], metavar="BASE:KEY=VALUE",
                        help="override a config field of one base (e.g. cfdiff:model.attention_dropout=0)")
    parser.add_argument("--compare", action="append", default=[], metavar="RUN_A:RUN_B",
                        help="A - B per base: paired t over the pretraining seeds both ran from, and Welch's t")
    parser.add_argument("--workers", type=int, default=1, help="units run in parallel processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: the CPU count // --workers); e.g. 1 for two "
                             "tables run side by side on 2 cores, as one table's two workers would share them")
    parser.add_argument("--sasrec-results", help="a sequential table's SASRec baseline: the results.json of "
                        "benchmarks/sasrec_baseline.py on the same dataset and --pretrain-seeds")
    parser.add_argument("--without-sasrec", action="store_true",
                        help="a sequential table without SASRec: popularity is then its only baseline and the "
                             "reference of its tests (the table says so); for comparing fine-tuning arms")
    parser.add_argument("--base-checkpoint", action="append", default=[], metavar="BASE:SEED=PATH",
                        help="a base pretrained elsewhere (refit-gym pretrain, or another table's continued "
                             "pretraining from one) instead of pretraining it here; its model, diffusion, dataset "
                             "and first stage's seed must be the base's")
    parser.add_argument("--compile-only", action="store_true", help="train nothing; tabulate what is finished")
    args = parser.parse_args()
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads {args.threads}: must be at least 1")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    bases = [b for b in args.bases.split(",") if b]
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {list(RUNS)}")
    run_updates = {r: args.updates for r in runs}
    for item in args.run_updates:
        name, _, value = item.partition("=")
        if name not in run_updates or not value.isdigit() or int(value) <= 0:
            raise SystemExit(f"--run-updates {item!r}: expected RUN=N with RUN one of --runs {runs} and N > 0")
        run_updates[name] = int(value)
    base_sets = {b: list(args.sets) + [s.split(":", 1)[1] for s in args.base_set if s.split(":", 1)[0] == b]
                 for b in bases}

    setups = {base: protocol_of(base) for base in bases}
    if len(set(setups.values())) != 1:
        raise SystemExit(f"one table holds one dataset and protocol; the bases have {setups}")
    protocol, dataset = next(iter(setups.values()))
    shown, tested = METRICS[protocol]
    reference_name = REFERENCE[protocol]

    if args.without_sasrec and (protocol != "sequential" or args.sasrec_results):
        raise SystemExit("--without-sasrec is for a sequential table given no --sasrec-results")
    if protocol == "sequential" and not args.without_sasrec and not args.sasrec_results:
        sequential_baselines(dataset, args.pretrain_seeds, None)  # refuses, with the command to run, before training
    started = time.perf_counter()
    imported = base_checkpoints(args.base_checkpoint, bases, args.pretrain_seeds)
    pretrain_specs = [{"base": b, "seed": s, "sets": base_sets[b], "folder": str(output / "pretrain" / f"{b}-p{s}"),
                       **({"checkpoint": imported[b, s]} if (b, s) in imported else {})}
                      for b in bases for s in args.pretrain_seeds]
    finetune_specs = [{"base": b, "seed": f, "pretrain_seed": s, "run": r, "sets": base_sets[b],
                       "pretrained": str(output / "pretrain" / f"{b}-p{s}"), "updates": run_updates[r],
                       "budget": args.budget, "eval_every": args.eval_every, "continued_lr": args.continued_lr,
                       "continued_epochs": args.continued_epochs,
                       **({"continued_eval_every": args.continued_eval_every} if args.continued_eval_every else {}),
                       "folder": str(output / "finetune" / f"{b}-p{s}-{r}-f{f}")}
                      for b in bases for s in args.pretrain_seeds for r in runs for f in args.finetune_seeds]
    if args.compile_only:
        pretrain_specs = [s for s in pretrain_specs if (Path(s["folder"]) / "summary.json").is_file()]
        finetune_specs = [s for s in finetune_specs if (Path(s["folder"]) / "summary.json").is_file()]
    pretrained = run_stage(pretrain_unit, pretrain_specs, args.workers, threads)
    finetuned = run_stage(finetune_unit, finetune_specs, args.workers, threads)
    tests = run_stage(test_unit, pretrain_specs + finetune_specs, args.workers, threads)
    for summary, test in zip(pretrained + finetuned, tests):
        summary["test"] = test
    # read after training: a SASRec run may finish while the diffusion models train
    reference = baselines(output, protocol, dataset, args.pretrain_seeds, args.sasrec_results, args.without_sasrec)
    if args.without_sasrec:
        reference_name = "popularity"

    # ---- rows
    pair = " / ".join(tested)
    seeded_reference = "seeds" in reference[reference_name]
    header = ("| model | sees | runs | updates (best) / seconds | " + " | ".join(f"valid {m}" for m in tested) + " | "
              + " | ".join(f"test {m}" for m in shown)
              + f" | vs its pretrained base: paired t over pretraining seeds, {pair} "
              f"| vs {reference_name}: {'Welch' if seeded_reference else 'one-sample'} t, {pair} |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    reference_values = {m: ([run["test"][m] for run in reference[reference_name]["seeds"]] if seeded_reference
                            else reference[reference_name]["test"][m]) for m in tested}
    for name, metrics in reference.items():
        chosen = ", ".join(f"{k} {v:g}" for k, v in metrics["chosen_on_valid"].items())
        label = f"{name} ({chosen}, on valid)" if chosen else name
        seeds = metrics.get("seeds")
        runs = seeds if seeds else [metrics]
        cells = [mean_std([r["valid"][m] for r in runs]) for m in tested]
        cells += [mean_std([r["test"][m] for r in runs]) for m in shown]
        lines.append(f"| {label} | - | {len(runs) if seeds else '-'} | - | " + " | ".join(cells) + " | | |")
    table: dict[str, Any] = {"command": " ".join(shlex.quote(a) for a in sys.argv), "baselines": reference,
                             "rows": {}}

    def row(label: str, sees: str, summaries: list[dict], base_by_seed: Optional[dict] = None) -> None:
        cells = [mean_std([s["valid"][m] for s in summaries]) for m in tested]
        cells += [mean_std([s["test"][m] for s in summaries]) for m in shown]
        against_base, against_reference = [], []
        for metric in tested:
            values = [s["test"][metric] for s in summaries]
            if base_by_seed is not None:
                difference, p, _ = paired_by_seed(values_by_seed(summaries, metric),
                                                  {k: [v[metric]] for k, v in base_by_seed.items()})
                against_base.append(signed(p, difference))
            versus = welch if seeded_reference else one_sample
            against_reference.append(signed(*reversed(versus(values, reference_values[metric]))))
        if "updates" in summaries[0]:
            effort = (f"{statistics.mean(s['updates'] for s in summaries):.0f} "
                      f"({statistics.mean(s['best_update'] for s in summaries):.0f})")
        else:
            effort = "-"
        effort += f" / {statistics.mean(s['seconds'] for s in summaries):.0f}"
        lines.append(f"| {label} | {sees} | {len(summaries)} | {effort} | " + " | ".join(cells) + " | "
                     + (" / ".join(against_base) if against_base else "") + " | " + " / ".join(against_reference) + " |")
        table["rows"][label] = {"sees": sees, "runs": summaries}

    diagnostics = ["| recipe (first run) | reward, mean of first → last 10 updates | held-out mass, same | "
                   f"lowest valid {tested[0]} | median clip fraction / approx KL | seconds |", "|---|---|---|---|---|---|"]
    comparisons = ["| base | A | B | " + " | ".join(f"test {m}: A - B, paired t p (seeds), Welch's t p" for m in tested)
                   + " |", "|---|---|---|---|---|"]
    table["comparisons"] = []
    for base in bases:
        base_runs = [s for s in pretrained if s["spec"]["base"] == base]
        if not base_runs:
            continue
        row(f"{base} pretrained", "-", base_runs)
        base_by_seed = {s["spec"]["seed"]: s["test"] for s in base_runs}
        by_recipe: dict[str, list[dict]] = {}
        for summary in finetuned:
            if summary["spec"]["base"] == base:
                by_recipe.setdefault(summary["spec"]["run"], []).append(summary)
        for recipe, summaries in by_recipe.items():
            row(f"{base} + {recipe}", summaries[0]["sees"], summaries, base_by_seed)
            first = summaries[0]
            training = training_diagnostics(Path(first["spec"]["folder"]), tested[0])
            if training:
                kl = (f"{training['median_clip_fraction']:.2f} / {training['median_approx_kl']:.0e}"
                      if "median_clip_fraction" in training else "")
                diagnostics.append(
                    f"| {base} + {recipe} | {training['reward/total_first']:.2f} → {training['reward/total_last']:.2f} | "
                    f"{training['held_out_mass_first']:.3f} → {training['held_out_mass_last']:.3f} | "
                    f"{training['lowest_valid']:.4f} | {kl} | {first['seconds']:.0f} |")
        for pair in args.compare:
            a, _, b = pair.partition(":")
            runs_a, runs_b = by_recipe.get(a, []), by_recipe.get(b, [])
            if set(values_by_seed(runs_a, tested[0])) & set(values_by_seed(runs_b, tested[0])):
                # (--compile-only of a partly finished table may have no common seed yet)
                cells = []
                for metric in tested:
                    difference, paired_p, seeds = paired_by_seed(values_by_seed(runs_a, metric),
                                                                  values_by_seed(runs_b, metric))
                    _, welch_p = welch([s["test"][metric] for s in runs_a], [s["test"][metric] for s in runs_b])
                    cells.append(f"{difference:+.4f}, paired p {paired_p:.2g} ({seeds}), Welch p {welch_p:.2g}")
                    table["comparisons"].append({"base": base, "a": a, "b": b, "metric": metric, "split": "test",
                                                 "difference": difference, "paired_p": paired_p,
                                                 "paired_seeds": seeds, "welch_p": welch_p})
                comparisons.append(f"| {base} | {a} | {b} | " + " | ".join(cells) + " |")
    seconds = [(f"{s['spec']['base']}-p{s['spec']['seed']}"
                + (f" (trained elsewhere: {' -> '.join(s.get('stages', [s['spec']['checkpoint']]))})"
                   if s["spec"].get("checkpoint") else ""),
                s["seconds"], s["seconds_to_best"]) for s in pretrained]
    timing = ["| pretrained model | seconds | seconds to the best epoch |", "|---|---|---|"]
    timing += [f"| {name} | {total:.0f} | {best:.0f} |" for name, total, best in seconds]
    text = ["Command: `" + table["command"] + "`", "", *lines, "",
            "Mean ± std over runs (pretraining seeds x fine-tuning seeds); p-values signed by the direction "
            "of the mean difference. Updates: mean updates run (mean update of the selected checkpoint); "
            "seconds: mean wall clock of a run (pretrained rows: of pretraining).", ""]
    if args.without_sasrec:
        text += ["Run with --without-sasrec: this table has no SASRec row, and its tests are against popularity; "
                 "the strongest baseline is not in it.", ""]
    if len(comparisons) > 2:
        text += [*comparisons, ""]
    text += [*timing, ""]
    (output / "table.md").write_text("\n".join(text) + "\n")
    (output / "diagnostics.md").write_text("\n".join(diagnostics) + "\n")
    table["pretrained"], table["finetuned"] = pretrained, finetuned
    table["seconds"] = time.perf_counter() - started
    (output / "table.json").write_text(json.dumps(table, indent=2))
    print("\n".join(text))


if __name__ == "__main__":
    main()
