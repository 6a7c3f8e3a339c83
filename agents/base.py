"""The agent interface: one update = collect (if needed) -> named loss terms -> one optimiser step.

A new algorithm is one subclass that writes :meth:`Agent.loss` (and, when it needs several
passes over a batch like PPO, :meth:`Agent.update` and :meth:`Agent.estimate_loss`, the loss of
its first step, whose gradient :meth:`Agent.gradient_estimate` returns). What every ReFiT-style
objective shares is here, once: the exact log-likelihood term of the held-out items, the anchor
to the pretrained model, the per-step log-probs of a rollout under the current policy, gradient
clipping and the diagnostics (gradient norm, KL to the pretrained policy, probability mass on the
held-out items).
Losses are returned as a mapping of named terms plus diagnostics (TorchRL style); the trainer
logs whatever comes back.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from agents.config import FinetuneConfig
from agents.policy import DenoisingPolicy
from agents.pretraining_mix import PretrainingMix
from agents.rollout import Rollout, collect_rollouts, shuffle_rewards_within_groups
from refit_gym.envs.core import DenoisingMDP
from refit_gym.envs.policies import denoiser_action
from refit_gym.errors import ConfigError, TrainingError
from refit_gym.models.base import BaseModel
from refit_gym.training.distributed import Distributed
from refit_gym.rewards.functional import held_out_mass, masked_log_softmax, scored_items
from refit_gym.rewards.likelihood import HeldOutLogLikelihood


SEES = {
    "a": "only the reward of its actions (a black-box function of the final state)",
    "b": "the reward plus its own probabilities (the reward is importance-weighted by the policy's probability)",
    "c": "the exact gradient of the objective (the reward is differentiated, or its gradient is computed in closed form)",
}
"""What an agent may see, as the project labels it: (a) reward only, (b) reward + own probabilities,
(c) the exact objective's gradient. An agent that combines terms is labelled by the most it sees."""


TERM_SETTINGS = {"loss_likelihood": "likelihood_weight", "loss_policy_gradient": "pg_weight",
                 "loss_gaussian_steps": "pg_weight", "loss_categorical": "categorical_samples",
                 "loss_pretrain": "pretrain_loss_weight"}
"""The ``finetune`` setting that weighs each named loss term (:meth:`Agent.term_weights`)."""


class Agent:
    """Base class of the fine-tuning algorithms.

    Args:
        policy: the trainable policy (a copy of the pretrained base model).
        core: the env core episodes are collected from (batch = users_per_batch * K).
        reference: the frozen pretrained base model (anchor, KL diagnostics).
        config: the fine-tuning config.
    """

    name = "base"
    sees = "a"
    """What the agent may see (:data:`SEES`); :meth:`information` refines it from the config."""
    collects_rollouts = True
    """Whether :meth:`update` collects stochastic rollouts (``supervised`` does not)."""
    mixes_pretraining = False
    """Whether :meth:`loss` adds :meth:`pretraining_loss` (``finetune.pretrain_loss_weight``)."""

    def __init__(
        self, policy: DenoisingPolicy, core: DenoisingMDP, reference: BaseModel, config: FinetuneConfig,
        pretraining_reweight: bool = True,
    ) -> None:
        self.policy, self.core, self.reference, self.config = policy, core, reference.eval(), config
        self.pretraining: Optional[PretrainingMix] = None
        """The pretraining mix (``finetune.pretrain_loss_weight`` > 0), else None; ``pretraining_reweight``
        is its loss's reweighting (the experiment's ``diffusion.reweight``)."""
        if config.pretrain_loss_weight > 0:
            if not self.mixes_pretraining:
                raise ConfigError(f"finetune.pretrain_loss_weight: the {self.name} agent does not mix the pretraining "
                                  "loss into its update; use refit or supervised, or set it to 0")
            self.pretraining = PretrainingMix(core.interactions, config.pretrain_batch_size or config.users_per_batch,
                                              policy.model.diffusion.steps, pretraining_reweight, core.device)
        self.group_size = type(self).chains_per_user(config)
        self.likelihood = HeldOutLogLikelihood(temperature=config.likelihood_temperature, normalize=True,
                                               mask_visible=config.likelihood_mask_visible)
        self.anchor_weights = [p.detach().clone() for p in policy.model.parameters()]
        self.optimizer = torch.optim.Adam(
            [p for p in policy.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.distributed = Distributed()
        self._data_parallel: Optional[nn.Module] = None
        if config.shuffle_rewards_within_user:
            self.check_reward_placebo()
        learning = {term: weight for term, weight in self.term_weights().items() if term != "loss_anchor"}
        if learning and not any(weight > 0 for weight in learning.values()):
            settings = sorted({TERM_SETTINGS[term] for term in learning if term in TERM_SETTINGS})
            raise ConfigError(f"the {self.name} agent would train on nothing but its anchor: its terms "
                              f"({', '.join(f'{term} {weight:g}' for term, weight in learning.items())}) all weigh 0 "
                              f"here; set one of {', '.join(f'finetune.{name}' for name in settings)} above 0")

    def check_reward_placebo(self) -> None:
        """Raise a ``ConfigError`` where ``finetune.shuffle_rewards_within_user`` would change nothing
        or leave a reward-carrying term untouched."""
        config = self.config
        uses_collect = self.collects_rollouts and self.has_gradient_estimate and type(self).collect is Agent.collect
        if not uses_collect or self.group_size < 2:
            raise ConfigError(f"finetune.shuffle_rewards_within_user permutes the rewards among each user's "
                              f"rollouts (refit, reinforce, ppo, with rollouts_per_user >= 2); the {self.name} "
                              f"agent with rollouts_per_user = {config.rollouts_per_user} has no such rollouts")
        weights = self.term_weights()
        if weights.get("loss_policy_gradient", weights.get("loss_gaussian_steps")) == 0:
            raise ConfigError(f"finetune.shuffle_rewards_within_user: the {self.name} agent's policy-gradient term "
                              "weighs 0 here (finetune.pg_weight), so there is nothing to shuffle")
        if config.categorical_samples > 0:
            raise ConfigError("finetune.shuffle_rewards_within_user shuffles the Gaussian steps' rewards only; the "
                              "categorical term (finetune.categorical_samples > 0) would keep its real reward")

    @classmethod
    def chains_per_user(cls, config: FinetuneConfig) -> int:
        """Env rows (denoising chains) per user in a batch: ``rollouts_per_user`` for an agent that
        collects rollouts, else 1."""
        return config.rollouts_per_user if cls.collects_rollouts else 1

    supports_data_parallel = True
    """Whether the agent runs under ``torchrun`` (its losses go through :meth:`compute`)."""
    data_parallel_refusal = "its update is another library's loop"
    """Why not, when it does not (the refusal's wording)."""
    has_gradient_estimate = True
    """Whether :meth:`gradient_estimate` exists (not where the update is another library's loop)."""

    def distribute(self, distributed: Distributed) -> None:
        """Train data-parallel: this process takes its shard of each batch of users and its
        losses' gradients are averaged over the processes (``DistributedDataParallel``).

        The env's and the exploration's random draws are made for the whole batch, so ``refit``,
        ``supervised`` and Gaussian-step ``reinforce`` reproduce a one-process run (to float
        summation order). ``ppo``'s minibatch permutation and ``reinforce``'s categorical samples
        are drawn per process: data-parallel, they run with the same statistics but not the same
        draws. Settings that would normalise over a process's shard instead of the batch are
        refused (``rollouts_per_user: 1``: advantages normalised over the batch), as is
        ``term_gradients`` (its per-term backward bypasses DDP's gradient averaging).
        """
        if distributed.active and not self.supports_data_parallel:
            raise ConfigError(f"the {self.name} agent does not run data-parallel ({self.data_parallel_refusal}); use "
                              "refit, supervised, reinforce or ppo under torchrun")
        if distributed.active and self.collects_rollouts and self.group_size == 1:
            raise ConfigError("finetune.rollouts_per_user = 1 normalises advantages over the whole batch, which a "
                              "data-parallel process does not hold: use at least 2 rollouts per user under torchrun")
        if distributed.active and self.config.gradient_signal_every > 0:
            raise ConfigError("finetune.gradient_signal_every measures one process's gradient estimate; it is not "
                              "available under torchrun (set it to 0)")
        if self.config.gradient_signal_every > 0:
            self.check_gradient_estimate()
        if self.config.term_gradients != "off":
            overrides_update = type(self).update is not Agent.update
            if distributed.active or overrides_update or not any(w > 0 for w in self.term_weights().values()):
                raise ConfigError(f"finetune.term_gradients={self.config.term_gradients!r} needs an agent whose loss is "
                                  f"a weighted sum of terms, in one process; {self.name} does not have one here")
        self.distributed = distributed
        self._data_parallel = distributed.wrap(_LossModule(self.policy)) if distributed.active else None

    def compute(self, loss_fn, *args):
        """``loss_fn(*args)`` -- through ``DistributedDataParallel`` when training data-parallel, so
        the backward of its ``"loss"`` averages the gradients over the processes."""
        return self._data_parallel(loss_fn, *args) if self._data_parallel is not None else loss_fn(*args)

    def local_users(self, users: np.ndarray) -> np.ndarray:
        """This process's shard of a batch of users (all of them in one process)."""
        return np.asarray(users)[self.distributed.shard(len(users))]

    @classmethod
    def information(cls, config: FinetuneConfig) -> str:
        """``"a"``, ``"b"`` or ``"c"`` (:data:`SEES`): what this agent sees with ``config``."""
        return cls.sees

    def counters(self) -> dict[str, int]:
        """Counters of the agent's own that a resumed run must restore (beside the policy,
        optimiser and RNG states the trainer saves); none by default."""
        return {}

    def restore_counters(self, counters: dict[str, int]) -> None:
        """Restore what :meth:`counters` returned."""

    # ------------------------------------------------------------------ the loop body
    def update(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> dict[str, float]:
        """One update on a batch of distinct ``users``; returns the loss terms and diagnostics."""
        rollout = self.collect(users, rng, generator)
        terms = self.compute(self.loss, rollout, generator)
        if self.config.term_gradients != "off":
            grad_norm, per_term = self.step_terms(terms)
        else:
            grad_norm, per_term = self.step(terms["loss"]), {}
        return self.distributed.mean({**self.scalars(terms), "grad_norm": grad_norm, **per_term,
                                      **self.diagnostics(rollout)})

    def collect(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> Rollout:
        """Rollouts of this process's shard of ``users`` (``group_size`` per user)."""
        rows = np.repeat(np.asarray(self.local_users(users), dtype=np.int64), self.group_size)
        rollout = collect_rollouts(self.core, self.policy, rows, rng, generator, self.group_size,
                                   stochastic=self.collects_rollouts, explored_steps=self.config.trained_steps,
                                   recorded_steps=0 if self.config.anchor == "kl" else self.config.trained_steps)
        if self.config.shuffle_rewards_within_user:  # drawn for the whole batch, as the exploration is
            draws = torch.rand(len(users), self.group_size, generator=generator, device=generator.device)
            rollout = shuffle_rewards_within_groups(rollout, draws.argsort(-1)[self.distributed.shard(len(users))])
        return rollout

    def loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Named loss terms; ``"loss"`` is the total that is minimised (``generator`` for any draw)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the gradient estimate
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The policy's parameters the optimiser steps (the gradient estimate's coordinates)."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def gradient_estimate(self, users: np.ndarray, rng: np.random.Generator,
                          generator: torch.Generator) -> torch.Tensor:
        """The agent's gradient estimate on a fresh batch for ``users`` at the current weights: the
        gradient of :meth:`estimate_loss` over :meth:`trainable_parameters`, flat and detached.

        Nothing is stepped: the weights, the optimiser's state and the parameters' ``.grad`` are
        left as they were (``torch.autograd.grad``). ``rng`` and ``generator`` are consumed as
        :meth:`update` would consume them (the env's draws, then the agent's own).

        Raises:
            ConfigError: the agent has no estimate of its own (:meth:`check_gradient_estimate`).
        """
        self.check_gradient_estimate()
        rollout = self.collect(users, rng, generator)
        return flat_gradient(self.estimate_loss(rollout, generator), self.trainable_parameters())

    def estimate_loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The loss whose gradient is the agent's estimate: :meth:`loss`'s ``"loss"``. An agent whose
        :meth:`update` takes several steps per batch overrides it with the loss of its first step."""
        return self.loss(rollout, generator)["loss"]

    def check_gradient_estimate(self) -> None:
        """Raise a ``ConfigError`` where :meth:`gradient_estimate` would not be this agent's estimate."""
        if not self.has_gradient_estimate:
            raise ConfigError(f"the {self.name} agent has no gradient estimate of its own: its update is another "
                              "library's loop; use refit, supervised, reinforce or ppo")
        if type(self).update is not Agent.update and type(self).estimate_loss is Agent.estimate_loss:
            raise ConfigError(f"the {self.name} agent overrides update() but not estimate_loss(): its loss() is not "
                              "what it steps on, so it has no gradient estimate")
        if self.distributed.active:
            raise ConfigError(f"{self.name}: a gradient estimate is one process's; it is not available under torchrun")

    def term_weights(self) -> dict[str, float]:
        """The weight of each named loss term in ``"loss"`` (what :meth:`step_terms` recombines);
        an agent whose loss is not such a weighted sum returns ``{}``."""
        return {}

    def step_terms(self, terms: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
        """The optimiser step from each term's own gradient (``finetune.term_gradients``).

        ``log``: the update is the weighted sum of the terms' gradients (the same as :meth:`step`'s),
        and each term's gradient norm and the pairwise cosines are reported. ``normalize``: each
        term's gradient is divided by its norm before weighting, so that the weights say what share
        of the step each term gets, whatever its scale. Returns the combined gradient's norm
        (before clipping) and the per-term diagnostics.
        """
        weights = {name: w for name, w in self.term_weights().items() if w > 0 and terms[name].requires_grad}
        if not torch.isfinite(terms["loss"]):
            raise TrainingError(f"{self.name}: the loss became {float(terms['loss'])}; no step was taken")
        parameters = self.trainable_parameters()
        gradients = {}
        for name in weights:
            gradients[name] = flat_gradient(terms[name], parameters, retain_graph=True)
        norms = {name: float(g.norm()) for name, g in gradients.items()}
        out = {f"grad_norm/{name.removeprefix('loss_')}": value for name, value in norms.items()}
        names = sorted(gradients)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                cosine = torch.nn.functional.cosine_similarity(gradients[a], gradients[b], dim=0)
                out[f"grad_cosine/{a.removeprefix('loss_')}~{b.removeprefix('loss_')}"] = float(cosine)
        normalize = self.config.term_gradients == "normalize"
        combined = sum(weights[n] * (gradients[n] / max(norms[n], 1e-12) if normalize else gradients[n]) for n in names)
        self.optimizer.zero_grad(set_to_none=True)
        offset = 0
        for p in parameters:
            p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        return float(norm), out

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, optimiser step; returns the gradient norm before clipping.

        Raises:
            TrainingError: the loss is NaN or infinite (nothing is stepped: the weights stay finite).
        """
        if self.distributed.any(not bool(torch.isfinite(loss))):  # every process stops, not only this one
            raise TrainingError(f"{self.name}: the loss became {float(loss.detach())} (on this or another process); no step "
                                "was taken")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [p for p in self.policy.parameters() if p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.optimizer.step()
        return float(norm)

    # ------------------------------------------------------------------ shared terms
    def final_x0(self, rollout: Rollout) -> torch.Tensor:
        """The policy's clean estimate at the last exposed step (differentiable): its item scores
        are what the categorical last step samples from and what evaluation ranks."""
        return self.policy.predict_x0(rollout.states[-1], rollout.remaining[-1], **rollout.context)

    def likelihood_loss(self, rollout: Rollout) -> torch.Tensor:
        """``-mean log p(held-out items)`` under ``softmax(x0 / tau)``, input items masked: the exact
        log-likelihood of the observed held-out interactions (its gradient lifts every one of them)."""
        scores = self.policy.item_scores(self.final_x0(rollout))
        return -self.likelihood(scores, rollout.episode).mean()

    def pretraining_loss(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The base model's own training loss on a fresh batch of training data (the pretraining mix,
        :mod:`agents.pretraining_mix`); zero when the mix is off."""
        if self.pretraining is None:
            return torch.zeros((), device=self.core.device)
        return self.pretraining.loss(self.policy.model, generator)

    def anchor_loss(self, rollout: Optional[Rollout] = None) -> torch.Tensor:
        """``l2``: squared distance of the weights to the pretrained ones; ``kl``: KL between the
        policy's and the pretrained policy's Gaussian steps (same std) on the rollout's states."""
        if self.config.anchor == "l2":
            return sum(((p - p0) ** 2).sum() for p, p0 in zip(self.policy.model.parameters(), self.anchor_weights))
        if self.config.anchor == "kl" and rollout is not None:
            return self.kl_to_reference(rollout, differentiable=True)
        return torch.zeros((), device=self.core.device)

    def kl_to_reference(self, rollout: Rollout, differentiable: bool = False) -> torch.Tensor:
        """Mean per-step ``KL(pi || pi_pretrained) = |loc - loc0|^2 / (2 sigma^2)`` (reduced like the log-probs)
        over the rollout's recorded steps (every exposed step when ``anchor`` is ``kl``)."""
        flat_states = rollout.states.reshape(-1, rollout.states.shape[-1])
        flat_t = rollout.remaining.reshape(-1, 1)
        context = {k: v.repeat(rollout.n_steps, *([1] * (v.dim() - 1))) for k, v in rollout.context.items()}
        with torch.set_grad_enabled(differentiable):
            loc = self.policy.loc(flat_states, flat_t, **context)
        with torch.no_grad():
            loc0 = self._reference_loc(flat_states, flat_t, context)
        per_dim = (loc - loc0) ** 2 / (2.0 * torch.exp(2.0 * self.policy.log_std.detach()))
        per_step = per_dim.sum(-1) if self.policy.log_prob_reduction == "sum" else per_dim.mean(-1)
        return per_step.mean()

    def _reference_loc(self, states: torch.Tensor, remaining: torch.Tensor, context: dict) -> torch.Tensor:
        return denoiser_action(self.reference.denoise, self.policy.diffusion, states, remaining, self.policy.action_mode,
                               **context)

    def trained_step_indices(self, rollout: Rollout) -> list[int]:
        """The recorded steps policy-gradient terms are computed on (the last ``trained_steps``)."""
        n = self.config.trained_steps or rollout.n_steps
        return list(range(max(0, rollout.n_steps - n), rollout.n_steps))

    def step_log_probs(self, rollout: Rollout, steps: list[int], rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(len(steps), N)`` log-probs of the rollout's actions under the current policy (with grad),
        of the rows ``rows`` only when given."""
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        loc_at = self.policy.loc_function(**{k: pick(v) for k, v in rollout.context.items()})  # encoded once
        return torch.stack([self.policy.log_prob(pick(rollout.actions[s]), loc_at(pick(rollout.states[s]),
                                                                                   pick(rollout.remaining[s])))
                            for s in steps])

    # ------------------------------------------------------------------ diagnostics
    @staticmethod
    def scalars(terms: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in terms.items()}

    @torch.no_grad()
    def diagnostics(self, rollout: Rollout) -> dict[str, float]:
        """Reward terms, probability mass on the held-out items, KL of the ranking distribution to
        the pretrained model's, exploration std."""
        out = {f"reward/{k}": float(v.mean()) for k, v in rollout.components.items()}
        out["reward/total"] = float(rollout.episode_return().mean())
        scores = self.policy.item_scores(rollout.final_state)
        log_p = masked_log_softmax(scores, rollout.episode.visible, self.config.likelihood_temperature)
        mass = held_out_mass(log_p, scored_items(rollout.episode.held_out, rollout.episode.visible))
        out["held_out_mass"] = float(mass.mean())
        if rollout.states is not None:  # SB3's episode summary carries no states
            out["kl_to_pretrained"] = float(self.ranking_kl_to_reference(rollout).mean())
        out["log_std"] = float(self.policy.log_std)
        return out

    @torch.no_grad()
    def ranking_kl_to_reference(self, rollout: Rollout) -> torch.Tensor:
        """``(N,)`` ``KL(p_theta || p_pretrained)`` of the categorical last step ``softmax(x0 / tau)``
        (input items masked), both models predicting from the rollout's last recorded state: how
        far the distribution the recommendations are ranked by has moved from the pretrained model."""
        state, remaining, tau = rollout.states[-1], rollout.remaining[-1], self.config.likelihood_temperature
        visible = rollout.episode.visible
        x0 = self.policy.predict_x0(state, remaining, **rollout.context)
        x0_pretrained = denoiser_action(self.reference.denoise, self.policy.diffusion, state, remaining, "x0",
                                        **rollout.context)
        log_p = masked_log_softmax(self.policy.item_scores(x0), visible, tau)
        log_q = masked_log_softmax(self.reference.item_scores(x0_pretrained), visible, tau)
        return torch.where(torch.isfinite(log_p), log_p.exp() * (log_p - log_q), 0.0).sum(1)


def flat_gradient(loss: torch.Tensor, parameters: list[nn.Parameter], retain_graph: bool = False) -> torch.Tensor:
    """``d loss / d parameters``, concatenated flat and detached (zeros for a parameter the loss
    does not use, all zeros for a constant loss); ``.grad`` is not touched."""
    if not loss.requires_grad:
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in parameters])
    grads = torch.autograd.grad(loss, parameters, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters)])


class _LossModule(nn.Module):
    """What ``DistributedDataParallel`` wraps: the policy's parameters and a forward that runs any
    of the agent's loss functions (DDP needs each loss to come out of its module's forward)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, loss_fn, *args):
        return loss_fn(*args)
