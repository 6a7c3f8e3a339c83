"""Timestep samplers for diffusion training: uniform, and DiffRec's loss-aware importance sampling.

Importance sampling (DiffRec, after improved DDPM): keep the last ``history`` weighted losses of
every timestep; until each timestep has a full history, sample uniformly; afterwards sample
``p_t ∝ sqrt(mean(L_t^2))`` mixed with a uniform floor, and divide each sample's loss by
``p_t * T`` so the estimate stays unbiased. Unlike DiffRec, the history lives in buffers, so it is
saved with the trainer state and survives a resume.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from refit_gym.errors import ConfigError


class TimestepSampler(nn.Module):
    """Draws training timesteps and the importance weights that correct for the draw.

    Args:
        steps: number of diffusion steps T.
        method: ``uniform`` or ``importance``.
        history: losses remembered per timestep (DiffRec: 10).
        uniform_prob: weight of the uniform floor mixed into the importance distribution (0.001).
    """

    def __init__(self, steps: int, method: str = "importance", history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__()
        if method not in ("uniform", "importance"):
            raise ConfigError(f"unknown timestep sampling method {method!r}; expected 'uniform' or 'importance'")
        self.steps, self.method, self.history, self.uniform_prob = steps, method, history, uniform_prob
        self.register_buffer("loss_history", torch.zeros(steps, history, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros(steps, dtype=torch.long))

    @property
    def warmed_up(self) -> bool:
        return bool((self.loss_count == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """The current sampling distribution over timesteps (uniform until warmed up)."""
        if self.method == "uniform" or not self.warmed_up:
            return torch.full((self.steps,), 1.0 / self.steps, dtype=torch.float64)
        root_mean_square = self.loss_history.pow(2).mean(-1).sqrt()
        probs = root_mean_square / root_mean_square.sum()
        return probs * (1.0 - self.uniform_prob) + self.uniform_prob / self.steps

    def sample(
        self, batch_size: int, device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``t`` (long) and the divisor ``p_t * T`` for each sample (float32)."""
        if self.method == "uniform" or not self.warmed_up:
            t = torch.randint(0, self.steps, (batch_size,), generator=generator)
            return t.to(device), torch.ones(batch_size, device=device)
        probs = self.probabilities()
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        return t.to(device), (probs[t] * self.steps).float().to(device)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample weighted losses (before importance division), in batch order."""
        if self.method == "uniform":
            return
        t, losses = t.detach().cpu(), losses.detach().cpu().double()
        for step in torch.unique(t).tolist():
            new = losses[t == step][-self.history :]
            merged = torch.cat([self.loss_history[step, : self.loss_count[step]], new])[-self.history :]
            self.loss_history[step, : len(merged)] = merged
            self.loss_count[step] = len(merged)
