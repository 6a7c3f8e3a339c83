"""``supervised``: the reference that maximises the differentiable reward directly by gradient (not RL).

Loss = ``likelihood_weight * (-log-likelihood of the held-out items)`` on the policy's clean
estimate at the last step, from states reached by the deterministic path (no exploration, no
rollouts), plus the anchor. Every RL result is reported beside it: an RL term earns its place
only if it beats this on validation.
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

    def term_weights(self) -> dict[str, float]:
        return {"loss_likelihood": self.config.likelihood_weight, "loss_anchor": self.config.anchor_weight}

    def loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        likelihood = self.likelihood_loss(rollout)
        anchor = self.anchor_loss(rollout)
        return {
            "loss": self.config.likelihood_weight * likelihood + self.config.anchor_weight * anchor,
            "loss_likelihood": likelihood,
            "loss_anchor": anchor,
        }
