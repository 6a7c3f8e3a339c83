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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from refit_gym.checkpoint import METRICS_FILE, package_versions, save_checkpoint, write_json_atomic
from refit_gym.config import ExperimentConfig, resolve_device
from refit_gym.data.interactions import InteractionData
from refit_gym.diffusion import TimestepSampler
from refit_gym.data.history import SequenceTable
from refit_gym.evaluation.evaluator import evaluate, protocol_from_config
from refit_gym.models import BaseModel, build_model
from refit_gym.errors import TrainingError
from refit_gym.progress import interactive
from refit_gym.progress import progress as progress_bar
from refit_gym.training.distributed import Distributed, init_distributed, local_device
from refit_gym.training.run_folder import RunFolder
from refit_gym.training.run_log import CsvLogger, plot_curves
from refit_gym.training.state import load_snapshot, restore_rng, rng_tensors, save_snapshot

STATE_DIR = "training_state"


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
    resume: bool = False,
    overwrite: bool = False,
    record_config: Optional[dict[str, Any]] = None,
) -> PretrainResult:
    """Train ``config.model`` on ``data``'s training interactions; keep the best-validation weights.

    Args:
        config: the experiment (model, diffusion, pretrain and evaluation sections are used).
        data: interactions; only ``train`` feeds the model.
        output_dir: where the best checkpoint, ``log.csv``, ``curves.png``, ``metrics.json``, the
            run record (``run.json``) and the training state go (nothing is written when None).
        progress: show a progress bar over epochs.
        log: where one-line messages go.
        init_from: start from this checkpoint's weights instead of a fresh init (continued
            training: fine-tuning's control (a)).
        report_test: evaluate the selected checkpoint on test once, at the end (the result's
            ``best_metrics["test"]``); otherwise test is never computed.
        resume: continue the run in ``output_dir`` from its last evaluation (the training state
            is snapshotted at every evaluation; a run killed at any moment resumes to exactly the
            result of an uninterrupted one on the same machine and thread count).
        overwrite: replace a run already in ``output_dir``.
        record_config: what ``run.json`` records as the run's config (``resume`` compares it);
            default: the whole ``config``. The pretrained-model cache records exactly what its key
            hashes, so a resumed cache entry does not depend on unrelated sections.

    Raises:
        ConfigError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite`` is given,
            or ``resume`` with another config (see :mod:`refit_gym.training.run_folder`).
        TrainingError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    settings = config.pretrain
    device = resolve_device(config.device)
    distributed = init_distributed(device)
    device = local_device(device)
    output = Path(output_dir) if output_dir is not None else None
    run = None
    if output is not None:
        identity = record_config if record_config is not None else {**config.to_dict(), "init_from": str(init_from)}
        run = RunFolder.claim(output, "pretrain", {**identity, "processes": distributed.world}, resume=resume,
                              overwrite=overwrite, distributed=distributed, inputs=(init_from,))
        if run.finished:
            return _finished_result(output, data, device, report_test, log)
    writes = output is not None and distributed.main  # rank 0 writes checkpoints, logs and snapshots
    generator = seed_everything(config.seed)  # the data order: the same on every rank
    noise = generator  # timesteps and noise: one stream per rank when data-parallel
    if distributed.active:
        torch.manual_seed(config.seed + 7919 * distributed.rank)  # dropout
        noise = torch.Generator().manual_seed(config.seed + 7919 * distributed.rank)
    model = build_model(config.model, config.diffusion, data, device=device)
    if init_from is not None:
        from refit_gym.checkpoint import load_checkpoint

        model.load_state_dict(load_checkpoint(init_from, data, device=device)[0].state_dict())
    sampler = TimestepSampler(config.diffusion.steps, method=config.diffusion.timestep_sampling)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    table = SequenceTable(data.train_sequences, data.n_items, device)
    protocol = protocol_from_config(config.evaluation, model)
    training_loss = distributed.wrap(_TrainingLoss(model))
    shared_sampler = GatheredTimestepSampler(sampler, distributed)

    def validate(split: str = "valid") -> dict[str, dict[str, float]]:
        return distributed.evaluate(model, data, splits=(split,), ks=config.evaluation.ks,
                                    batch_size=config.evaluation.batch_size, device=device, protocol=protocol,
                                    precision=config.evaluation.precision)

    state = {"epoch": 0, "best_valid": -math.inf, "best_epoch": 0, "best_metrics": {}, "stale": 0, "decays": 0,
             "elapsed": 0.0, "seconds_to_best": 0.0}
    history: list[dict[str, Any]] = []
    best_state = None
    snapshot = load_snapshot(output / STATE_DIR) if (run is not None and run.resumed) else None
    if snapshot is not None:
        tensors, state, optimizer_state = snapshot
        model.load_state_dict(_prefixed(tensors, "model."))
        best_state = _prefixed(tensors, "best.")
        sampler.load_state_dict(_prefixed(tensors, "sampler."))
        optimizer.load_state_dict(optimizer_state)
        generator.set_state(tensors["generator"])
        rank = f"rank{distributed.rank}."
        restore_rng(_prefixed(tensors, rank) or tensors)
        if noise is not generator:
            noise.set_state(tensors[f"{rank}noise"])
        history = state.pop("history")
        log(f"resumed {output} after epoch {state['epoch']} (best valid {state['best_valid']:.4f} at epoch "
            f"{state['best_epoch']})")
    elif run is not None and run.resumed:
        log(f"{output}: the run had not finished an epoch; starting it again from the beginning")
    logger = CsvLogger(output / "log.csv", resume=snapshot is not None) if writes else None
    if logger is not None and snapshot is not None:
        logger.rows = [r for r in logger.rows if int(r["epoch"]) <= state["epoch"]]  # drop rows after the snapshot
    if snapshot is None and init_from is not None:  # the start competes too: continued training never selects worse
        model.eval()
        state["best_metrics"] = validate()
        state["best_valid"] = state["best_metrics"]["valid"][settings.select_metric]
        if writes:
            save_checkpoint(output, model, config, data, metrics=_record(state["best_metrics"], 0, config))
    if best_state is None:
        best_state = copy.deepcopy(model.state_dict())
    start = time.perf_counter() - state["elapsed"]
    epochs = progress_bar(range(state["epoch"] + 1, settings.max_epochs + 1), desc="pretrain",
                          enabled=progress and distributed.main, initial=state["epoch"], total=settings.max_epochs)
    quiet_bar = progress and distributed.main and not interactive()  # no bar: one line per evaluation
    epoch = first_epoch = state["epoch"]
    for epoch in epochs:
        model.train()
        total, batches = 0.0, 0
        for batch in model.training_batches(table, settings.batch_size, generator):
            scale = 1.0
            if distributed.active:  # each rank's share of the batch mean, so DDP's average is the batch mean
                if batch.batch_size < distributed.world:
                    continue  # a last batch smaller than the number of processes is dropped
                rows = distributed.shard(batch.batch_size)
                scale = len(rows) * distributed.world / batch.batch_size
                batch = batch.select(rows)
            loss = training_loss(batch, shared_sampler, config.diffusion.reweight, noise) * scale
            if distributed.any(not bool(torch.isfinite(loss))):
                where = f"; the last good checkpoint (epoch {state['best_epoch']}) is intact in {output}" if output else ""
                raise TrainingError(f"pretraining {config.model.name}: the loss became {float(loss.detach())} in epoch {epoch} "
                                    f"(batch {batches + 1}){where}. Lower pretrain.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item() / scale, batches + 1
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                               "train_loss": distributed.mean({"loss": total / batches})["loss"]}
        if epoch == first_epoch + 1 and snapshot is None:  # once, after this run's first epoch
            per_epoch = time.perf_counter() - start
            log(f"epoch 1 took {per_epoch:.0f} s: at most {settings.max_epochs} epochs (~{per_epoch * settings.max_epochs / 60:.0f} "
                "min plus evaluations); a validation plateau usually stops it much earlier")
        out_of_time = settings.time_budget_s is not None and time.perf_counter() - start > settings.time_budget_s
        out_of_time = distributed.broadcast_object(out_of_time)  # every rank stops after the same epoch
        if epoch % settings.eval_every == 0 or epoch == settings.max_epochs or out_of_time:
            model.eval()
            metrics = validate()
            valid = metrics["valid"][settings.select_metric]
            row.update({f"valid_{k}": v for k, v in metrics["valid"].items() if k.endswith(("@10", "@20"))})
            if valid > state["best_valid"] + settings.min_delta:
                state.update(best_valid=valid, best_epoch=epoch, best_metrics=metrics, stale=0,
                             seconds_to_best=time.perf_counter() - start)
                best_state = copy.deepcopy(model.state_dict())
                if writes:
                    save_checkpoint(output, model, config, data, metrics=_record(metrics, epoch, config))
            else:
                state["stale"] += 1
            epochs.set_postfix(loss=f"{row['train_loss']:.4f}", valid=f"{valid:.4f}",
                               best=f"{state['best_valid']:.4f}@{state['best_epoch']}")
            if quiet_bar:
                log(f"epoch {epoch}/{settings.max_epochs}: loss {row['train_loss']:.4f}, valid "
                    f"{settings.select_metric} {valid:.4f} (best {state['best_valid']:.4f} at epoch "
                    f"{state['best_epoch']}), {time.perf_counter() - start:.0f} s")
            if state["stale"] >= settings.plateau_patience and epoch >= settings.min_epochs:
                if state["decays"] >= settings.max_lr_decays:
                    row["event"] = "stop: plateau"
                else:
                    state["decays"], state["stale"] = state["decays"] + 1, 0
                    if settings.restore_best_on_decay:
                        model.load_state_dict(best_state)
                    for group in optimizer.param_groups:
                        group["lr"] *= settings.lr_decay
                    row["event"] = f"lr decay -> {optimizer.param_groups[0]['lr']:.1e}" + (
                        f" from best epoch {state['best_epoch']}" if settings.restore_best_on_decay else "")
                    log(f"epoch {epoch}: {row['event']}")
        row["seconds"] = time.perf_counter() - start
        history.append(row)
        state["epoch"], state["elapsed"] = epoch, time.perf_counter() - start
        if logger is not None:
            logger.log(row)
        evaluated = any(key.startswith("valid_") for key in row)
        if output is not None and (evaluated or row.get("event")):  # a killed run resumes from its last evaluation
            ranks = distributed.all_gather_objects({**rng_tensors(), "noise": noise.get_state()})
            if writes:
                save_snapshot(output / STATE_DIR, epoch, {
                    **{f"model.{k}": v for k, v in model.state_dict().items()},
                    **{f"best.{k}": v for k, v in best_state.items()},
                    **{f"sampler.{k}": v for k, v in sampler.state_dict().items()},
                    "generator": generator.get_state(), **rng_tensors(),
                    **{f"rank{r}.{k}": v for r, states in enumerate(ranks) for k, v in states.items()},
                }, {**state, "history": history}, optimizer.state_dict())
        if row.get("event", "").startswith("stop") or out_of_time:
            break
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()
    best_valid, best_epoch, best_metrics = state["best_valid"], state["best_epoch"], state["best_metrics"]
    log(f"pretraining done: best valid {settings.select_metric} {best_valid:.4f} at epoch {best_epoch} "
        f"({epoch} epochs, {seconds:.0f} s; best reached after {state['seconds_to_best']:.0f} s)")
    if report_test:
        best_metrics = {**best_metrics, **validate("test")}
    if writes:
        plot_curves(history, "epoch", ["train_loss", f"valid_{settings.select_metric}"],
                    output / "curves.png", title=f"pretraining {config.name}")
        record = _record(best_metrics, best_epoch, config)
        record.update({"epochs_run": epoch, "seconds": seconds, "seconds_to_best": state["seconds_to_best"]})
        write_json_atomic(output / METRICS_FILE, record)
        run.finish(best_epoch=best_epoch, epochs_run=epoch, seconds=seconds, processes=distributed.world)
        shutil.rmtree(output / STATE_DIR, ignore_errors=True)  # after finish: a finished run resumes nothing
    distributed.barrier()
    return PretrainResult(model, best_epoch, best_valid, best_metrics, epoch, seconds, state["seconds_to_best"],
                          history)


def _finished_result(output: Path, data: InteractionData, device: torch.device, report_test: bool,
                     log) -> PretrainResult:
    """The result of a run that had already finished (``resume``): nothing is trained again (test, when asked
    for and not yet computed, is computed on ``device``)."""
    import json

    from refit_gym.checkpoint import load_checkpoint

    model, config = load_checkpoint(output, data, device=device)
    record = json.loads((output / METRICS_FILE).read_text())
    metrics = record["metrics"]
    if report_test and "test" not in metrics:
        protocol = protocol_from_config(config.evaluation, model)
        metrics = {**metrics, **evaluate(model, data, splits=("test",), ks=config.evaluation.ks,
                                         batch_size=config.evaluation.batch_size, protocol=protocol).metrics}
    log(f"{output} had already finished (best epoch {record['best_epoch']}); nothing to resume")
    return PretrainResult(model, record["best_epoch"], metrics["valid"][config.pretrain.select_metric], metrics,
                          record.get("epochs_run", 0), record.get("seconds", 0.0), record.get("seconds_to_best", 0.0))


class _TrainingLoss(torch.nn.Module):
    """The model's training loss as a module forward (what ``DistributedDataParallel`` wraps)."""

    def __init__(self, model: BaseModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, sampler, reweight: bool, generator: torch.Generator) -> torch.Tensor:
        return self.model.training_loss(batch, sampler, reweight=reweight, generator=generator)


class GatheredTimestepSampler:
    """A :class:`TimestepSampler` whose loss history is updated with every rank's losses (in rank
    order), so the importance distribution is the same on every rank (data-parallel pretraining)."""

    def __init__(self, sampler: TimestepSampler, distributed: Distributed) -> None:
        self.sampler, self.distributed = sampler, distributed

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.sample(batch_size, device, generator)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        if not self.distributed.active:
            return self.sampler.update(t, losses)
        gathered = self.distributed.all_gather_objects((t.detach().cpu(), losses.detach().cpu()))
        self.sampler.update(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]))


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _record(metrics: dict, best_epoch: int, config: ExperimentConfig) -> dict[str, Any]:
    return {"stage": "pretrain", "best_epoch": best_epoch, "seed": config.seed, "metrics": metrics,
            "versions": package_versions()}
