"""``refit`` (default): the ReFiT objective as this project reads the paper's abstract.

"Policy gradient optimization ... maximizes exact log-likelihood of observed interactions":

    loss = likelihood_weight * (-log p_theta(held-out items))            exact gradient
         + pg_weight * (-E[A * sum_s log pi_theta(a_s | s_s)])           policy gradient
         + anchor_weight * anchor(theta, theta_pretrained)
         + pretrain_loss_weight * pretraining loss (off by default)      exact gradient

* The **likelihood term** is the exact log-likelihood of the user's held-out (most recent)
  training items under the categorical last step ``softmax(x0 / tau)``; it is differentiated
  directly, because a score-function estimate of the same quantity only adds variance.
* The **policy-gradient term** carries the rewards that cannot be differentiated (the
  collaborative and ranking terms of ``finetune.reward``): REINFORCE over the exposed Gaussian
  denoising steps with exact per-step log-probs, K rollouts per user and a per-user (group)
  baseline with normalised, clipped advantages.
* The **anchor** keeps the policy near the converged pretrained model (L2 on the weights or KL
  between the Gaussian steps).
* The **pretraining mix** (InstructGPT's "PPO-ptx"; ``agents/pretraining_mix.py``) adds the base
  model's own training loss on a fresh batch of training data, so the policy keeps fitting all of
  it while the held-out items and the rewards move it.

Each term is a switch (its weight); see ``docs/finetuning.md`` for the measured effect of each.
"""

from __future__ import annotations

from typing import Optional

import torch

from agents.base import Agent
from agents.rollout import Rollout, group_advantages


class RefitAgent(Agent):
    """Sees (c) when its likelihood term is on (the exact gradient of the held-out
    log-likelihood), else (a): the policy-gradient term sees only the reward of its rollouts."""

    name = "refit"
    sees = "c"
    mixes_pretraining = True

    @classmethod
    def information(cls, config) -> str:
        return "c" if config.likelihood_weight > 0 or config.pretrain_loss_weight > 0 else "a"

    def term_weights(self) -> dict[str, float]:
        config = self.config
        return {"loss_likelihood": config.likelihood_weight, "loss_policy_gradient": config.pg_weight,
                "loss_anchor": config.anchor_weight, "loss_pretrain": config.pretrain_loss_weight}

    def loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        config = self.config
        zero = torch.zeros((), device=rollout.states.device)
        likelihood = self.likelihood_loss(rollout) if config.likelihood_weight > 0 else zero
        policy_gradient = zero
        if config.pg_weight > 0:
            steps = self.trained_step_indices(rollout)
            advantages = group_advantages(rollout.returns_to_go()[steps], rollout.group_size, config.advantage_clip)
            log_probs = self.step_log_probs(rollout, steps)
            policy_gradient = -(advantages.detach() * log_probs).sum(0).mean()
        anchor = self.anchor_loss(rollout) if config.anchor_weight > 0 else zero
        pretrain = self.pretraining_loss(generator)
        total = (config.likelihood_weight * likelihood + config.pg_weight * policy_gradient
                 + config.anchor_weight * anchor + config.pretrain_loss_weight * pretrain)
        return {"loss": total, "loss_likelihood": likelihood, "loss_policy_gradient": policy_gradient,
                "loss_anchor": anchor, "loss_pretrain": pretrain}
