"""``ppo``: clipped importance ratios over denoising steps (DDPO-IS), several inner epochs per batch.

For each batch of rollouts, ``inner_epochs`` passes over random minibatches of (step, row)
pairs of the trained steps:

    ratio = exp(log pi_theta(a|s) - log pi_old(a|s))
    loss  = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) + anchor_weight * anchor

with per-user normalised advantages ``A``. With ``log_prob_reduction="sum"`` the ratio is the
exact likelihood ratio of the high-dimensional step (very sensitive); ``"mean"`` is DDPO's
per-dimension version. Diagnostics: approx KL ``0.5 * mean((log r)^2)`` and clip fraction.
Its gradient estimate (:meth:`PPOAgent.estimate_loss`) is the first inner step's, over the whole
batch: every ratio is 1 there, so it is the vanilla policy gradient with these advantages.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from agents.base import Agent
from agents.rollout import Rollout, group_advantages

MINIBATCHES = 4


class PPOAgent(Agent):
    """Sees (a): the env's reward of its rollouts (plus its own log-probs, as every PPO)."""

    name = "ppo"
    sees = "a"

    def update(self, users: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> dict[str, float]:
        rollout = self.collect(users, rng, generator)
        steps, advantages, log_probs_old = self.targets(rollout)
        history: list[dict[str, float]] = []
        for _ in range(self.config.inner_epochs):
            order = torch.randperm(rollout.n_rows, generator=generator, device=generator.device).to(rollout.states.device)
            for rows in order.chunk(MINIBATCHES):
                terms = self.compute(self.minibatch_loss, rollout, steps, rows, advantages[:, rows],
                                     log_probs_old[:, rows])
                grad_norm = self.step(terms["loss"])
                history.append({**self.scalars(terms), "grad_norm": grad_norm})
        mean = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        return self.distributed.mean({**mean, **self.diagnostics(rollout)})

    def targets(self, rollout: Rollout) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The trained steps, their per-user normalised advantages and the sampling log-probs."""
        steps = self.trained_step_indices(rollout)
        advantages = group_advantages(rollout.returns_to_go()[steps], rollout.group_size, self.config.advantage_clip)
        return steps, advantages, rollout.log_probs[steps]

    def estimate_loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The clipped objective over the whole batch at the first inner step, plus the anchor: every
        ratio is 1 there, so its gradient is the vanilla policy gradient with PPO's advantages."""
        steps, advantages, log_probs_old = self.targets(rollout)
        rows = torch.arange(rollout.n_rows, device=rollout.states.device)
        return self.minibatch_loss(rollout, steps, rows, advantages, log_probs_old)["loss"]

    def minibatch_loss(self, rollout: Rollout, steps: list[int], rows: torch.Tensor,
                       advantages: torch.Tensor, log_probs_old: torch.Tensor) -> dict[str, torch.Tensor]:
        eps = self.config.clip_range
        log_probs = self.step_log_probs(rollout, steps, rows)
        log_ratio = log_probs - log_probs_old
        ratio = torch.exp(log_ratio)
        objective = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps)).mean()
        anchor = self.anchor_loss() if self.config.anchor == "l2" and self.config.anchor_weight > 0 else torch.zeros((), device=objective.device)
        with torch.no_grad():
            approx_kl = 0.5 * (log_ratio ** 2).mean()
            clip_fraction = ((ratio - 1).abs() > eps).float().mean()
        return {"loss": objective + self.config.anchor_weight * anchor, "loss_objective": objective,
                "loss_anchor": anchor, "approx_kl": approx_kl, "clip_fraction": clip_fraction}
