"""The fine-tuning trainer every agent uses: batches of users, updates, validation, checkpoints, resume.

Loop: draw ``users_per_batch`` distinct users (epochs over a seeded permutation), ``agent.update``
(collect + loss + step), and every ``eval_every`` updates evaluate the fine-tuned model on
validation with its evaluation protocol (the deterministic chain from the full training history).
Test is sealed: it is never computed during training; with ``report_test`` it is computed once,
for the selected checkpoint, at the end (otherwise ``refit-gym evaluate`` computes it). The best-validation model is written as
a standard checkpoint into the output folder (so ``refit-gym evaluate --checkpoint`` works on it
unchanged); the trainer's own state (policy, optimiser, RNG states, counters) goes to
``output/trainer_state/`` at every evaluation, so ``resume=True`` continues an interrupted run
to the same result as an uninterrupted one (same seed, CPU).

Outputs: ``log.csv`` (one row per update; validation columns on evaluation rows; with
``gradient_signal_every`` the ``gradient_signal/*`` columns every that many updates), ``curves.png``
(reward, held-out mass, KL to the pretrained ranking, gradient norm, the validation metric),
``results.json`` (seed, versions, configs, the pretrained and best validation metrics, and the
best checkpoint's test metrics when they were asked for).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from agents import agent_class, build_agent
from agents.config import FinetuneConfig, finetune_config
from agents.gradient_signal import KEYS as SIGNAL_KEYS
from agents.gradient_signal import gradient_signal
from agents.policy import DenoisingPolicy
from refit_gym.checkpoint import load_checkpoint, package_versions, save_checkpoint, write_json_atomic
from refit_gym.config import ExperimentConfig, resolve_device
from refit_gym.data.interactions import InteractionData
from refit_gym.envs.core import DenoisingMDP
from refit_gym.evaluation.evaluator import evaluate, protocol_from_config
from refit_gym.models.base import BaseModel
from refit_gym.rewards import build_reward
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.errors import TrainingError
from refit_gym.progress import interactive
from refit_gym.progress import progress as progress_bar
from refit_gym.runtime import autocast
from refit_gym.training.distributed import Distributed, init_distributed, local_device
from refit_gym.training.run_folder import RunFolder
from refit_gym.training.run_log import CsvLogger, plot_curves
from refit_gym.training.state import load_snapshot, restore_rng, rng_tensors, save_snapshot

STATE_DIR = "trainer_state"


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    model: BaseModel
    pretrained_metrics: dict[str, dict[str, float]]
    best_metrics: dict[str, dict[str, float]]
    best_update: int
    updates: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class UserSampler:
    """Batches of distinct users: consecutive slices of seeded permutations (epochs over users)."""

    def __init__(self, n_users: int, batch: int) -> None:
        self.n_users, self.batch = n_users, min(batch, n_users)
        self.order = np.zeros(0, dtype=np.int64)

    def next(self, rng: np.random.Generator) -> np.ndarray:
        if len(self.order) < self.batch:
            self.order = np.concatenate([self.order, rng.permutation(self.n_users)])
        users, self.order = self.order[: self.batch], self.order[self.batch :]
        return users


def build_learner(settings: FinetuneConfig, base: BaseModel, data: InteractionData,
                  device: torch.device | str = "cpu", distributed: Distributed = Distributed(),
                  pretraining_reweight: bool = True):
    """The agent ``settings.agent`` over a fresh env core and a trainable copy of ``base``
    (``pretraining_reweight``: the experiment's ``diffusion.reweight``, for the pretraining mix).

    The core's batch is ``users_per_batch * rollouts_per_user`` (one row per rollout; agents that
    do not collect rollouts get one row per user); the reward is bound to the training
    interactions only. Data-parallel (``distributed``), the core holds this process's shard of
    that batch and draws its randomness as the whole batch would, so the result does not
    depend on the number of processes.
    """
    interactions = TrainingInteractions.from_data(data)
    group_size = agent_class(settings.agent).chains_per_user(settings)
    users = min(settings.users_per_batch, data.n_users)
    shard = distributed.even_shard(users, "finetune.users_per_batch")
    core = DenoisingMDP(
        base, build_reward(settings.reward, interactions, device), interactions,
        batch_size=len(shard) * group_size, row_window=(shard.start * group_size, users * group_size),
        action_mode=settings.action_mode,
        exposed_steps=min(settings.exposed_steps or base.diffusion.steps, base.diffusion.steps),
        holdout=settings.holdout, holdout_fraction=settings.holdout_fraction,
        holdout_count=settings.holdout_count, device=device,
    )
    policy = DenoisingPolicy(base, settings.action_mode, settings.log_std_init, settings.std_mode,
                             settings.log_prob_reduction).to(device)
    agent = build_agent(settings.agent, policy, core, base, settings, pretraining_reweight=pretraining_reweight)
    agent.distribute(distributed)
    return agent


def finetune(
    config: ExperimentConfig,
    data: InteractionData,
    pretrained: str | Path,
    output_dir: str | Path,
    agent: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    report_test: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> FinetuneResult:
    """Fine-tune the checkpoint ``pretrained`` with ``config.finetune`` (``agent`` / ``overrides`` win).

    Args:
        config: the experiment; its ``finetune`` section is a :class:`FinetuneConfig` mapping.
        data: the interactions the checkpoint was trained on.
        pretrained: a checkpoint directory (``refit-gym pretrain``'s output).
        output_dir: where the best fine-tuned checkpoint, logs and trainer state go.
        agent: overrides ``finetune.agent``.
        resume: continue the run in ``output_dir`` from its last evaluation (same config and
            agent, or a ``ConfigError`` naming the difference; a run killed at any moment resumes
            to exactly the result of an uninterrupted one on the same machine and thread count).
        report_test: evaluate the selected checkpoint on test once, at the end
            (``best_metrics["test"]``); otherwise test is never computed.
        overwrite: replace a run already in ``output_dir`` (without it, or ``resume``, such a
            folder is refused before any work).

    Raises:
        ConfigError: a bad ``finetune`` section, or the folder rules above.
        TrainingError: the loss became NaN or infinite (the last good checkpoint is kept).
    """
    settings = finetune_config(config.finetune, **({"agent": agent} if agent else {}), **overrides)
    config = copy.deepcopy(config)  # the caller's config is left as it was
    config.finetune = settings.to_dict()
    output = Path(output_dir)
    device = resolve_device(config.device)
    distributed = init_distributed(device)
    device = local_device(device)
    run = RunFolder.claim(output, "finetune", {**config.to_dict(), "pretrained": str(pretrained)}, resume,
                          overwrite, distributed, inputs=(pretrained,))
    if run.finished:
        return _finished_result(output, data, config, device, report_test, log)
    writes = distributed.main  # rank 0 writes checkpoints, logs and snapshots
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)

    base, _ = load_checkpoint(pretrained, data, device=device)
    learner = build_learner(settings, base, data, device, distributed, pretraining_reweight=config.diffusion.reweight)
    policy, core = learner.policy, learner.core
    finetuned = policy.model  # the trainable copy of the base model, evaluated and checkpointed as is
    sampler = UserSampler(data.n_users, settings.users_per_batch)
    protocol = protocol_from_config(config.evaluation, finetuned)

    def validate(model=finetuned, split: str = "valid") -> dict[str, dict[str, float]]:
        return distributed.evaluate(model, data, splits=(split,), ks=config.evaluation.ks, protocol=protocol,
                                    batch_size=config.evaluation.batch_size, device=device,
                                    precision=config.evaluation.precision)

    def save_best(metrics, update: int) -> None:
        if writes:
            save_checkpoint(output, finetuned, config, data, metrics=_record(metrics, update, config),
                            extra={"finetune": settings.to_dict(), "pretrained_from": str(pretrained)})

    def snapshot_now() -> None:
        if writes:
            _snapshot(output / STATE_DIR, learner, rng, generator, sampler, state, pretrained_metrics)

    state = {"update": 0, "best": -math.inf, "best_update": 0, "stale": 0, "elapsed": 0.0}
    snapshot = load_snapshot(output / STATE_DIR) if run.resumed else None
    logger = CsvLogger(output / "log.csv", resume=snapshot is not None) if writes else _NoLog()
    if snapshot is not None:
        state, pretrained_metrics = _restore(snapshot, learner, rng, generator, sampler)
        logger.rows = [r for r in logger.rows if int(r["update"]) <= state["update"]]  # drop rows after the state
        log(f"resumed at update {state['update']} (best {state['best']:.4f} at update {state['best_update']})")
    else:
        pretrained_metrics = validate()
        state["best"] = pretrained_metrics["valid"][settings.select_metric]
        save_best(pretrained_metrics, 0)
        logger.log({"update": 0, **_flat(pretrained_metrics), "seconds": 0.0})
        snapshot_now()
    log(f"pretrained: valid {settings.select_metric} {pretrained_metrics['valid'][settings.select_metric]:.4f}")

    start = time.perf_counter() - state["elapsed"]
    bar = progress_bar(total=settings.max_updates, initial=state["update"], desc=f"finetune[{settings.agent}]",
                       enabled=progress and writes)
    quiet_bar = progress and writes and not interactive()  # no bar: one line per evaluation
    stop_reason = "max_updates"
    while state["update"] < settings.max_updates:
        if settings.std_mode == "scheduled":
            fraction = state["update"] / max(1, settings.max_updates - 1)
            policy.set_log_std(settings.log_std_init + fraction * (settings.log_std_final - settings.log_std_init))
        users = sampler.next(rng)
        try:
            with autocast(settings.precision, device):
                signal = _gradient_signal(learner, users, settings, config.seed, state["update"] + 1)
                row = {"update": state["update"] + 1, **learner.update(users, rng, generator), **signal}
        except TrainingError as error:
            raise _stopped(error, state, output) from None
        bad = sorted(k for k, v in row.items() if k.startswith("loss") and not math.isfinite(v))
        if bad:
            raise _stopped(f"{', '.join(bad)} became {row[bad[0]]}", state, output)
        state["update"] += 1
        elapsed = time.perf_counter() - start
        out_of_time = settings.time_budget_s is not None and elapsed > settings.time_budget_s
        out_of_time = distributed.broadcast_object(out_of_time)  # every rank stops at the same update
        evaluated = state["update"] % settings.eval_every == 0 or out_of_time or state["update"] == settings.max_updates
        if evaluated:
            metrics = validate()
            row.update(_flat(metrics))
            score = metrics["valid"][settings.select_metric]
            if score > state["best"]:
                state.update(best=score, best_update=state["update"], stale=0)
                save_best(metrics, state["update"])
            else:
                state["stale"] += 1
            bar.set_postfix(valid=f"{score:.4f}", best=f"{state['best']:.4f}@{state['best_update']}")
            if quiet_bar:
                log(f"update {state['update']}/{settings.max_updates}: valid {settings.select_metric} {score:.4f} "
                    f"(best {state['best']:.4f} at update {state['best_update']}), "
                    f"{time.perf_counter() - start:.0f} s")
            if state["stale"] >= settings.patience:
                stop_reason = "patience"
        row["seconds"] = time.perf_counter() - start
        logger.log(row)
        if evaluated:  # after the row is logged: a run killed after the snapshot has every row up to it
            state["elapsed"] = time.perf_counter() - start
            snapshot_now()
        bar.update(1)
        if out_of_time:
            stop_reason = "time budget"
        if stop_reason != "max_updates":
            break
    bar.close()
    seconds = time.perf_counter() - start
    distributed.barrier()  # rank 0 has written the best checkpoint
    best_model, _ = load_checkpoint(output, data, device=device)
    best_metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    log(f"fine-tuning stopped ({stop_reason}) after {state['update']} updates, {seconds:.0f} s; best valid "
        f"{settings.select_metric} {state['best']:.4f} at update {state['best_update']}")
    if report_test:
        best_metrics = {**best_metrics, **validate(best_model, "test")}
    if writes:
        if report_test:
            write_json_atomic(output / "metrics.json", _record(best_metrics, state["best_update"], config))
        plot_curves(logger.rows, "update", ["reward/total", "held_out_mass", "kl_to_pretrained", "grad_norm",
                                            "grad_norm/likelihood", "grad_norm/policy_gradient",
                                            "grad_cosine/likelihood~policy_gradient", "gradient_signal/pair_cosine",
                                            "gradient_signal/exact_cosine", f"valid_{settings.select_metric}"],
                    output / "curves.png", title=f"fine-tuning ({settings.agent})")
        write_json_atomic(output / "results.json", {
            "agent": settings.agent, "sees": agent_class(settings.agent).information(settings), "seed": config.seed,
            "versions": package_versions(), "config": config.to_dict(), "processes": distributed.world,
            "env": core.config(), "pretrained_from": str(pretrained), "pretrained_metrics": pretrained_metrics,
            "best_metrics": best_metrics, "best_update": state["best_update"], "updates": state["update"],
            "seconds": seconds, "stop_reason": stop_reason,
        })
        run.finish(best_update=state["best_update"], updates=state["update"], stop_reason=stop_reason)
        shutil.rmtree(output / STATE_DIR, ignore_errors=True)  # after finish: a finished run resumes nothing
    distributed.barrier()
    return FinetuneResult(best_model, pretrained_metrics, best_metrics, state["best_update"], state["update"],
                          seconds, logger.rows)


class _NoLog:
    """The log of a process that does not write (data-parallel ranks other than 0)."""

    def __init__(self) -> None:
        self.rows: list = []

    def log(self, row: dict) -> None:
        pass


def _gradient_signal(learner, users: np.ndarray, settings: FinetuneConfig, seed: int, update: int) -> dict[str, float]:
    """``gradient_signal/*`` of update ``update`` on its users, before it steps (every
    ``gradient_signal_every`` updates; else nothing). Its draws are seeded by ``(seed, update)``,
    never the trainer's, so the training is the same with it on or off, and on resume."""
    if not settings.gradient_signal_every or update % settings.gradient_signal_every:
        return {}
    measured = gradient_signal(learner, users, (seed, update))
    return {f"gradient_signal/{key}": measured[key] for key in SIGNAL_KEYS}


def _stopped(problem, state: dict, output: Path) -> TrainingError:
    return TrainingError(f"fine-tuning stopped at update {state['update'] + 1}: {problem}. The last good checkpoint "
                         f"(update {state['best_update']}) is intact in {output}. Lower finetune.lr or "
                         "finetune.max_grad_norm")


def _flat(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}_{k}": v for split, values in metrics.items() for k, v in values.items() if k.endswith(("@10", "@20"))}


def _record(metrics: dict, update: int, config: ExperimentConfig) -> dict[str, Any]:
    return {"stage": "finetune", "best_update": update, "seed": config.seed, "metrics": metrics,
            "versions": package_versions()}


def _snapshot(directory: Path, learner, rng, generator, sampler: UserSampler, state: dict, pretrained_metrics) -> None:
    """Everything needed to continue exactly: weights, optimiser, RNG states, counters (atomic; no pickle of code)."""
    tensors = {f"policy.{k}": v for k, v in learner.policy.state_dict().items()}
    tensors.update({"torch_generator": generator.get_state(), "sampler_order": torch.from_numpy(sampler.order.copy()),
                    **rng_tensors()})
    save_snapshot(directory, state["update"], tensors, {**state, "numpy_rng": rng.bit_generator.state,
                                                         "pretrained_metrics": pretrained_metrics,
                                                         "agent_counters": learner.counters()},
                  learner.optimizer.state_dict())


def _restore(snapshot, learner, rng, generator, sampler: UserSampler):
    tensors, saved, optimizer_state = snapshot
    learner.policy.load_state_dict({k[len("policy."):]: v for k, v in tensors.items() if k.startswith("policy.")})
    generator.set_state(tensors["torch_generator"])
    sampler.order = tensors["sampler_order"].numpy().copy()
    restore_rng(tensors)
    learner.optimizer.load_state_dict(optimizer_state)
    rng.bit_generator.state = saved.pop("numpy_rng")
    learner.restore_counters(saved.pop("agent_counters"))
    pretrained_metrics = saved.pop("pretrained_metrics")
    return saved, pretrained_metrics


def _finished_result(output: Path, data: InteractionData, config: ExperimentConfig, device: torch.device,
                     report_test: bool,
                     log) -> FinetuneResult:
    """The result of a run that had already finished (``resume``): nothing is trained again."""
    results = json.loads((output / "results.json").read_text())
    model, _ = load_checkpoint(output, data, device=device)
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    if report_test and "test" not in metrics:
        protocol = protocol_from_config(config.evaluation, model)
        metrics = {**metrics, **evaluate(model, data, splits=("test",), ks=config.evaluation.ks, protocol=protocol,
                                         batch_size=config.evaluation.batch_size).metrics}
    log(f"{output} had already finished (best update {results['best_update']}); nothing to resume")
    return FinetuneResult(model, results["pretrained_metrics"], metrics, results["best_update"], results["updates"],
                          results["seconds"])
