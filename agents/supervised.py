"""``supervised``: the reference that maximises the differentiable reward directly by gradient (not RL).

Loss = ``likelihood_weight * (-log-likelihood of the held-out items)`` on the policy's clean
estimate at the last step, from states reached by the deterministic path (no exploration, no
rollouts), plus the anchor (and the pretraining mix when ``pretrain_loss_weight`` > 0). Every RL
result is reported beside it: an RL term earns its place only if it beats this on validation.
"""

from __future__ import annotations

from typing import Optional

import torch

from agents.base import Agent
from agents.rollout import Rollout


class SupervisedAgent(Agent):
    """Sees (c): the exact gradient of the held-out log-likelihood. Not reinforcement learning."""

    name = "supervised"
    sees = "c"
    collects_rollouts = False
    mixes_pretraining = True

    def term_weights(self) -> dict[str, float]:
        config = self.config
        return {"loss_likelihood": config.likelihood_weight, "loss_anchor": config.anchor_weight,
                "loss_pretrain": config.pretrain_loss_weight}

    def loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        config = self.config
        likelihood = self.likelihood_loss(rollout)
        anchor = self.anchor_loss(rollout)
        pretrain = self.pretraining_loss(generator)
        return {
            "loss": config.likelihood_weight * likelihood + config.anchor_weight * anchor
            + config.pretrain_loss_weight * pretrain,
            "loss_likelihood": likelihood,
            "loss_anchor": anchor,
            "loss_pretrain": pretrain,
        }
