"""``reinforce``: pure policy gradient — K rollouts per user, group baseline, exact per-step log-probs.

    loss = -E[A * sum_s log pi_theta(a_s | s_s)] + anchor_weight * anchor

with ``A`` the per-user normalised return (clipped), the return being the env's reward
(``finetune.reward``: any terms, including the held-out log-likelihood as a *reward*). The
Gaussian denoising steps carry the gradient; no likelihood term is differentiated directly.
"""

from __future__ import annotations

import torch

from agents.base import Agent
from agents.rollout import Rollout, group_advantages


class ReinforceAgent(Agent):
    name = "reinforce"

    def loss(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        steps = self.trained_step_indices(rollout)
        advantages = group_advantages(rollout.returns_to_go()[steps], rollout.group_size, self.config.advantage_clip)
        log_probs = self.step_log_probs(rollout, steps)
        objective = -(advantages.detach() * log_probs).sum(0).mean()
        anchor = self.anchor_loss(rollout) if self.config.anchor_weight > 0 else torch.zeros((), device=objective.device)
        return {"loss": objective + self.config.anchor_weight * anchor, "loss_objective": objective, "loss_anchor": anchor}
