"""The policy being fine-tuned: a trainable copy of the pretrained base model with a Gaussian head.

The copy is the whole :class:`~refit_gym.models.BaseModel` (denoiser, and for an
item-embedding model its embeddings and history encoder), so ``item_scores`` is the trainable
model's own and a checkpoint of ``policy.model`` is a normal base-model checkpoint.

``loc`` is the denoiser's action in the env's action mode (its x0 estimate, or the posterior
mean it implies, see :func:`refit_gym.envs.policies.denoiser_action`); the exploration std is a
parameter of the policy, not a constant of the schedule (DiffRec's own posterior std on ML-1M is
about 8e-4, far too small to explore with). The std is ``fixed``, ``learned`` or ``scheduled``.

The model runs in eval mode (no dropout) both in rollouts and in updates, so the log-prob of
an action under the updated policy is computed by the same function that sampled it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from refit_gym.diffusion.gaussian import gaussian_log_prob
from refit_gym.envs.policies import STATE_KEYS, DenoiserPolicy
from refit_gym.models.base import BaseModel

__all__ = ["DenoisingPolicy", "STATE_KEYS"]


class DenoisingPolicy(DenoiserPolicy):
    """The agents' policy: :class:`~refit_gym.envs.policies.DenoiserPolicy` (a trainable copy of
    the base model with a Gaussian head) with a scalar exploration std that is fixed, learned or
    scheduled, and a chosen reduction of the per-step log-probability.

    Args:
        base: the pretrained model (copied whole; the original is never touched).
        action_mode: the env's action mode (``x_prev`` or ``x0``).
        log_std_init: initial exploration log-std.
        std_mode: ``fixed`` (a buffer), ``learned`` (a parameter) or ``scheduled`` (a buffer the
            trainer moves with :meth:`set_log_std`).
        log_prob_reduction: ``sum`` (exact) or ``mean`` (DDPO's) over the state's dimensions.
    """

    def __init__(
        self,
        base: BaseModel,
        action_mode: str = "x_prev",
        log_std_init: float = -4.0,
        std_mode: str = "fixed",
        log_prob_reduction: str = "sum",
    ) -> None:
        super().__init__(base, action_mode, log_std_init, per_dim_std=False, learn_std=std_mode == "learned")
        self.std_mode, self.log_prob_reduction = std_mode, log_prob_reduction

    def sample(self, loc: torch.Tensor, generator: Optional[torch.Generator] = None,
               row_window: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """``loc + std * z``; with ``row_window = (offset, global_batch)`` the noise is drawn for the
        global batch and these rows take theirs (the same draws whatever the number of processes)."""
        offset, total = (0, len(loc)) if row_window is None else row_window
        noise = torch.randn((total, *loc.shape[1:]), generator=generator, device=loc.device, dtype=loc.dtype)
        return loc + torch.exp(self.log_std) * noise[offset : offset + len(loc)]

    def log_prob(self, action: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(action, loc, self.log_std, self.log_prob_reduction)

    def log_prob_of_mean(self, width: int) -> torch.Tensor:
        """``log_prob(loc, loc)``: the density at the mean, ``-(log_std + log(2 pi) / 2)`` per dim."""
        per_dim = -(self.log_std.detach() + 0.5 * math.log(2 * math.pi))
        return per_dim * width if self.log_prob_reduction == "sum" else per_dim

    def set_log_std(self, value: float) -> None:
        with torch.no_grad():
            self.log_std.fill_(float(value))
