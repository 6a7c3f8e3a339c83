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

TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def results_table(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per model, valid and test columns for :data:`TABLE_METRICS`."""
    header = ["model"] + [f"{split} {metric}" for split in ("valid", "test") for metric in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows.items():
        cells = [f"{metrics[split][metric]:.4f}" for split in ("valid", "test") for metric in TABLE_METRICS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def run_main_job(
    config: ExperimentConfig,
    output_dir: str | Path,
    pretrained: Optional[str | Path] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pretrain (unless ``pretrained`` is given) -> fine-tune (when configured) -> evaluate.

    Returns the results mapping also written to ``output_dir/results.json``.
    """
    from refit_gym.baselines import PopularityRecommender, tune_ease
    from refit_gym.training.pretrain import pretrain

    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    device = resolve_device(config.device)
    data = load_dataset(config.data.dataset, data_dir=config.data.data_dir)
    log(f"data: {data.name}: {data.n_users} users x {data.n_items} items")

    if pretrained is None:
        pretrained = output / "pretrained"
        pretrain(config, data, output_dir=pretrained, progress=progress, log=log)
    model, _ = load_checkpoint(pretrained, data, device=device)

    protocol = protocol_from_config(config.evaluation, model)

    def evaluate_both(recommender) -> dict[str, dict[str, float]]:
        return evaluate(recommender, data, splits=("valid", "test"), ks=config.evaluation.ks, protocol=protocol,
                        batch_size=config.evaluation.batch_size, device=device).metrics

    rows: dict[str, dict[str, dict[str, float]]] = {}
    rows["popularity"] = evaluate_both(PopularityRecommender().fit(data.train))
    ease = tune_ease(data)
    rows[f"EASE (l2={ease.best_l2:g}, tuned on valid)"] = evaluate_both(ease.model)
    rows[f"{config.model.name} pretrained"] = evaluate_both(model)

    from agents.trainer import finetune

    finetuned_dir = output / "finetuned"
    result = finetune(config, data, pretrained, finetuned_dir, progress=progress, log=log)
    rows[f"{config.model.name} + {config.finetune['agent']} fine-tuned"] = result.best_metrics

    table = results_table(rows)
    log("\n" + table)
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
    return results
