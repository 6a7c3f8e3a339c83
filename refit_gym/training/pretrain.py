"""Pretraining a base diffusion recommender with its own loss, until it has converged.

Schedule (our choice where DiffRec's own rule stops too early; see ``docs/pretraining.md``):
AdamW at ``lr``; validate every ``eval_every`` epochs on the standard deterministic protocol; the
best validation ``select_metric`` is checkpointed. After ``plateau_patience`` evaluations without
a new best, the weights go back to the best checkpoint and the learning rate is multiplied by
``lr_decay``; after ``max_lr_decays`` decays the next plateau stops training. Validation
Recall@20 on ML-1M is noisy (about +-0.001), so a plateau is judged against the best score seen,
never against the last one; ``min_epochs`` keeps an early lucky evaluation from ending the run.

The test split is sealed: training evaluates validation only (logs, curves, selection); test is
computed once, for the selected checkpoint, by ``refit-gym evaluate`` or at the end of the run
when ``report_test`` is asked for explicitly.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from refit_gym.checkpoint import METRICS_FILE, package_versions, save_checkpoint, write_json_atomic
from refit_gym.config import ExperimentConfig, resolve_device
from refit_gym.data.interactions import InteractionData
from refit_gym.diffusion import TimestepSampler
from refit_gym.data.history import SequenceTable
from refit_gym.evaluation.evaluator import evaluate, protocol_from_config
from refit_gym.models import BaseModel, build_model
from refit_gym.training.run_log import CsvLogger, plot_curves


@dataclass
class PretrainResult:
    """What a pretraining run produced."""

    model: BaseModel
    best_epoch: int
    best_valid: float
    best_metrics: dict[str, dict[str, float]]
    epochs_run: int
    seconds: float
    seconds_to_best: float
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global RNG (dropout) and return a generator for data order and noise."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pretrain(
    config: ExperimentConfig,
    data: InteractionData,
    output_dir: Optional[str | Path] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    init_from: Optional[str | Path] = None,
    report_test: bool = False,
) -> PretrainResult:
    """Train ``config.model`` on ``data``'s training interactions; keep the best-validation weights.

    Args:
        config: the experiment (model, diffusion, pretrain and evaluation sections are used).
        data: interactions; only ``train`` feeds the model.
        output_dir: where the best checkpoint, ``log.csv``, ``curves.png`` and ``metrics.json`` go
            (nothing is written when None).
        progress: show a progress bar over epochs.
        log: where one-line messages go.
        init_from: start from this checkpoint's weights instead of a fresh init (continued
            training: fine-tuning's control (a)).
        report_test: evaluate the selected checkpoint on test once, at the end (the result's
            ``best_metrics["test"]``); otherwise test is never computed.
    """
    settings = config.pretrain
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    model = build_model(config.model, config.diffusion, data, device=device)
    if init_from is not None:
        from refit_gym.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(init_from, data, device=device)[0].state_dict())
    sampler = TimestepSampler(config.diffusion.steps, method=config.diffusion.timestep_sampling)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    table = SequenceTable(data.train_sequences, data.n_items, device)
    protocol = protocol_from_config(config.evaluation, model)

    def validate(split: str = "valid") -> dict[str, dict[str, float]]:
        return evaluate(model, data, splits=(split,), ks=config.evaluation.ks,
                        batch_size=config.evaluation.batch_size, device=device, protocol=protocol).metrics

    output = Path(output_dir) if output_dir is not None else None
    logger = None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        logger = CsvLogger(output / "log.csv")

    best_valid, best_epoch, best_metrics = -math.inf, 0, {}
    if init_from is not None:  # the starting point competes too: continued training never selects worse
        model.eval()
        best_metrics = validate()
        best_valid = best_metrics["valid"][settings.select_metric]
        if output is not None:
            save_checkpoint(output, model, config, data, metrics=_record(best_metrics, 0, config))
    best_state = copy.deepcopy(model.state_dict())
    stale, decays, history = 0, 0, []
    start = time.perf_counter()
    seconds_to_best = 0.0
    epochs = tqdm(range(1, settings.max_epochs + 1), desc="pretrain", disable=not progress, dynamic_ncols=True)
    epoch = 0
    for epoch in epochs:
        model.train()
        total, batches = 0.0, 0
        for batch in model.training_batches(table, settings.batch_size, generator):
            loss = model.training_loss(batch, sampler, reweight=config.diffusion.reweight, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        row: dict[str, Any] = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": total / batches,
        }
        out_of_time = settings.time_budget_s is not None and time.perf_counter() - start > settings.time_budget_s
        if epoch % settings.eval_every == 0 or epoch == settings.max_epochs or out_of_time:
            model.eval()
            metrics = validate()
            valid = metrics["valid"][settings.select_metric]
            row.update({f"valid_{k}": v for k, v in metrics["valid"].items() if k.endswith(("@10", "@20"))})
            if valid > best_valid + settings.min_delta:
                best_valid, best_epoch, best_metrics = valid, epoch, metrics
                best_state = copy.deepcopy(model.state_dict())
                seconds_to_best = time.perf_counter() - start
                stale = 0
                if output is not None:
                    save_checkpoint(output, model, config, data, metrics=_record(best_metrics, best_epoch, config))
            else:
                stale += 1
            epochs.set_postfix(loss=f"{row['train_loss']:.4f}", valid=f"{valid:.4f}", best=f"{best_valid:.4f}@{best_epoch}")
            if stale >= settings.plateau_patience and epoch >= settings.min_epochs:
                if decays >= settings.max_lr_decays:
                    row["event"] = "stop: plateau"
                else:
                    decays, stale = decays + 1, 0
                    if settings.restore_best_on_decay:
                        model.load_state_dict(best_state)
                    for group in optimizer.param_groups:
                        group["lr"] *= settings.lr_decay
                    row["event"] = f"lr decay -> {optimizer.param_groups[0]['lr']:.1e}" + (
                        f" from best epoch {best_epoch}" if settings.restore_best_on_decay else "")
                    log(f"epoch {epoch}: {row['event']}")
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        if logger is not None:
            logger.log(row)
        if row.get("event", "").startswith("stop") or out_of_time:
            break
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    log(f"pretraining done: best valid {settings.select_metric} {best_valid:.4f} at epoch {best_epoch} "
        f"({epoch} epochs, {seconds:.0f} s; best reached after {seconds_to_best:.0f} s)")
    if report_test:
        best_metrics = {**best_metrics, **validate("test")}
    if output is not None:
        plot_curves(history, "epoch", ["train_loss", f"valid_{settings.select_metric}"],
                    output / "curves.png", title=f"pretraining {config.name}")
        record = _record(best_metrics, best_epoch, config)
        record.update({"epochs_run": epoch, "seconds": seconds, "seconds_to_best": seconds_to_best})
        write_json_atomic(output / METRICS_FILE, record)
    return PretrainResult(model, best_epoch, best_valid, best_metrics, epoch, seconds, seconds_to_best, history)


def _record(metrics: dict, best_epoch: int, config: ExperimentConfig) -> dict[str, Any]:
    return {"stage": "pretrain", "best_epoch": best_epoch, "seed": config.seed, "metrics": metrics,
            "versions": package_versions()}
