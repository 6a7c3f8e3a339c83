"""The main job: pretrain a base model, fine-tune it, evaluate every stage next to simple baselines.

``refit-gym run --config configs/synthetic_diffrec.yaml --output runs/quickstart`` calls
:func:`run_main_job`; the README's first command is exactly that. It lives in the agents package
because it runs the agents' trainer: the library (``refit_gym``) never imports ``agents``. Each stage writes into its own
sub-folder of the output directory; ``results.json`` and ``results.md`` hold the final table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from refit_gym.checkpoint import load_checkpoint, package_versions, write_json_atomic
from refit_gym.config import ExperimentConfig, resolve_device
from refit_gym.data import load_dataset
from refit_gym.evaluation.evaluator import evaluate, protocol_from_config

TABLE_CUTOFFS = ("@10", "@20")


def results_table(rows: dict[str, dict[str, dict[str, float]]], splits: tuple[str, ...] = ("valid", "test")) -> str:
    """A markdown table: one row per model, a column per split and metric at the cut-offs :data:`TABLE_CUTOFFS`
    (recall / ndcg for the ``cf`` protocol, hr / ndcg for ``sequential``)."""
    first = next(iter(rows.values()))[splits[0]]
    shown = sorted((m for m in first if m.endswith(TABLE_CUTOFFS) and not m.startswith(("precision", "mrr"))),
                   key=lambda m: (int(m.split("@")[1]), m))
    header = ["model"] + [f"{split} {metric}" for split in splits for metric in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        cells = [f"{metrics[split][metric]:.4f}" for split in splits for metric in shown]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def run_main_job(
    config: ExperimentConfig,
    output_dir: str | Path,
    pretrained: Optional[str | Path] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report_test: bool = False,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Pretrain (unless ``pretrained`` is given) -> fine-tune -> evaluate, next to the baselines
    that use the same information (popularity, EASE, recency-weighted EASE).

    Every model is selected on validation; with ``report_test`` each final model is evaluated on
    test once, at the end (the table gains test columns). ``output_dir`` follows the run-folder
    rules (:mod:`refit_gym.training.run_folder`): a folder holding a run is refused unless
    ``resume`` (each stage continues where it stopped) or ``overwrite``. Returns the results
    mapping also written to ``output_dir/results.json``.
    """
    from agents.config import finetune_config
    from refit_gym.training.run_folder import RunFolder, read_run

    from refit_gym.baselines import PopularityRecommender, tune_ease
    from refit_gym.baselines.ease import DEFAULT_W_MIN_GRID
    from refit_gym.training.pretrain import pretrain

    finetune_config(config.finetune)  # a bad finetune section fails now, not after pretraining
    output = Path(output_dir)
    run = RunFolder.claim(output, "run", {**config.to_dict(), "pretrained": str(pretrained)}, resume, overwrite)
    start = time.perf_counter()
    device = resolve_device(config.device)
    data = load_dataset(config.data.dataset, data_dir=config.data.data_dir)
    log(f"data: {data.name}: {data.n_users} users x {data.n_items} items")

    if pretrained is None:
        pretrained = output / "pretrained"
        pretrain(config, data, output_dir=pretrained, progress=progress, log=log,
                 resume=resume and read_run(pretrained) is not None)
    model, _ = load_checkpoint(pretrained, data, device=device)

    protocol = protocol_from_config(config.evaluation, model)

    splits = ("valid", "test") if report_test else ("valid",)

    def evaluate_final(recommender) -> dict[str, dict[str, float]]:
        return evaluate(recommender, data, splits=splits, ks=config.evaluation.ks, protocol=protocol,
                        precision=config.evaluation.precision,
                        batch_size=config.evaluation.batch_size, device=device).metrics

    rows: dict[str, dict[str, dict[str, float]]] = {}
    rows["popularity"] = evaluate_final(PopularityRecommender().fit(data.train))
    if protocol.name == "cf":
        ease = tune_ease(data)
        rows[f"EASE (l2={ease.best_l2:g}, tuned on valid)"] = evaluate_final(ease.model)
        recency = tune_ease(data, w_min_grid=DEFAULT_W_MIN_GRID)
        rows[f"recency-weighted EASE (l2={recency.best_l2:g}, w_min={recency.best_w_min:g}, tuned on valid)"] = (
            evaluate_final(recency.model))
    rows[f"{config.model.name} pretrained"] = evaluate_final(model)

    from agents.trainer import finetune

    finetuned_dir = output / "finetuned"
    result = finetune(config, data, pretrained, finetuned_dir, progress=progress, log=log,
                      resume=resume and read_run(finetuned_dir) is not None)
    rows[f"{config.model.name} + {config.finetune['agent']} fine-tuned"] = evaluate_final(result.model)

    table = results_table(rows, splits)
    results = {
        "config": config.to_dict(),
        "data": data.summary(),
        "seed": config.seed,
        "versions": package_versions(),
        "seconds": time.perf_counter() - start,
        "pretrained_checkpoint": str(pretrained),
        "finetuned_checkpoint": str(finetuned_dir),
        "models": rows,
    }
    write_json_atomic(output / "results.json", results)
    (output / "results.md").write_text(table + "\n")
    run.finish(seconds=results["seconds"])
    return results
