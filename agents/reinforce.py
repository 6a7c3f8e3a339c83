"""``reinforce``: pure policy gradient — K rollouts per user, group baseline, exact per-step log-probs.

Two score-function terms, each a switch; no reward is ever differentiated:

* **Gaussian denoising steps** (the env's reward, ``finetune.reward``):
  ``-E[A * sum_s log pi_theta(a_s | s_s)]`` with ``A`` the per-user normalised return (clipped),
  over the last ``trained_steps`` steps, weighted by ``pg_weight`` (0 turns it off).
* **a categorical last step** (``categorical_samples = M > 0``): M items are sampled from the
  policy's ``softmax(x0 / tau)`` (input items masked) and rewarded; the term is
  ``-E[(r(a) - b) * log p_theta(a)]`` with the exact categorical log-probability. With
  ``categorical_reward="importance"`` the reward of a sampled item is
  ``r(a) = 1[a held out] / (p(a) |H|)``, whose expected score-function gradient
  ``sum_a p(a) r(a) grad log p(a) = mean_{i in H} grad log p(i)`` *is* the gradient of the exact
  log-likelihood of the held-out items: an unbiased policy-gradient estimate of the likelihood
  objective, and ``E[r] = 1`` is the exact baseline. ``"hit"`` (``r = 1[a held out]``, group-mean
  baseline) is the naive version whose expected gradient is that of the held-out probability
  *mass*, which sharpens onto items already ranked high.

    loss = pg_weight * gaussian term + categorical term + anchor_weight * anchor
"""

from __future__ import annotations

from typing import Optional

import torch

from agents.base import Agent
from agents.rollout import Rollout, group_advantages
from refit_gym.rewards.functional import masked_log_softmax, scored_items


class ReinforceAgent(Agent):
    """Sees (a) with the Gaussian steps alone or with the categorical ``hit`` reward (the reward
    of its actions), (b) with the categorical ``importance`` reward: ``1[a held out] / (p(a) |H|)``
    divides by the policy's own probability, and its expected score-function gradient *is* the
    supervised log-likelihood gradient -- a sampled supervised gradient, not RL on a reward."""

    name = "reinforce"
    sees = "a"

    @classmethod
    def information(cls, config) -> str:
        return "b" if config.categorical_samples > 0 and config.categorical_reward == "importance" else "a"

    def term_weights(self) -> dict[str, float]:
        config = self.config
        return {"loss_gaussian_steps": config.pg_weight, "loss_categorical": 1.0 if config.categorical_samples else 0.0,
                "loss_anchor": config.anchor_weight}

    def loss(self, rollout: Rollout, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        config, zero = self.config, torch.zeros((), device=rollout.states.device)
        gaussian = zero
        if config.pg_weight > 0:  # the Gaussian steps carry the env's reward
            steps = self.trained_step_indices(rollout)
            advantages = group_advantages(rollout.returns_to_go()[steps], rollout.group_size, config.advantage_clip)
            gaussian = -(advantages.detach() * self.step_log_probs(rollout, steps)).sum(0).mean()
        categorical = self.categorical_loss(rollout, generator) if config.categorical_samples > 0 else zero
        anchor = self.anchor_loss(rollout) if config.anchor_weight > 0 else zero
        return {"loss": config.pg_weight * gaussian + categorical + config.anchor_weight * anchor, "loss_gaussian_steps": gaussian,
                "loss_categorical": categorical, "loss_anchor": anchor}

    def categorical_loss(self, rollout: Rollout, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Score-function loss of M items sampled from the policy's last-step softmax."""
        episode = rollout.episode
        log_p = masked_log_softmax(self.policy.item_scores(self.final_x0(rollout)), episode.visible,
                                   self.config.likelihood_temperature)
        samples = torch.multinomial(log_p.detach().exp(), self.config.categorical_samples, replacement=True,
                                    generator=generator)
        scored = scored_items(episode.held_out, episode.visible)
        return categorical_pg_loss(log_p, scored, samples, self.config.categorical_reward)


def categorical_pg_loss(log_p: torch.Tensor, scored: torch.Tensor, samples: torch.Tensor, reward: str = "importance") -> torch.Tensor:
    """``-mean((r(a) - b) * log p(a))`` over the sampled items ``samples`` ``(B, M)``.

    ``importance``: ``r = 1[a in H] / (p(a) |H|)``, baseline ``b = 1`` (= E[r] when H is not
    empty); the expected gradient equals ``-grad mean_{i in H} log p(i)``. ``hit``: ``r = 1[a in H]``
    with the mean over the M samples as baseline.
    """
    log_p_sampled = log_p.gather(1, samples)
    hits = scored.gather(1, samples).to(log_p.dtype)
    if reward == "importance":
        n_held = scored.sum(1, keepdim=True).to(log_p.dtype)
        rewards = hits / (log_p_sampled.detach().exp() * n_held.clamp(min=1))
        advantage = rewards - (n_held > 0).to(log_p.dtype)
    else:
        advantage = hits - hits.mean(1, keepdim=True)
    return -(advantage.detach() * log_p_sampled).mean()
