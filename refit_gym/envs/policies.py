"""The pretrained denoiser as a policy of the denoising MDP (plain torch; usable from any front).

:func:`denoiser_action` is the action the base model itself takes in each action mode, so that
running it in the env reproduces the base model's own stochastic reverse chain.
:class:`DenoiserPolicy` wraps a (trainable) denoiser into a Gaussian policy head returning
``(loc, scale)``, the form TorchRL's ``ProbabilisticActor`` and most PG code expect.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.envs.core import ACTION_MODES
from refit_gym.errors import ConfigError


def diffusion_step(t_remaining: torch.Tensor) -> torch.Tensor:
    """The diffusion step index ``t - 1`` of an observation's remaining steps (``(B, 1)`` or ``(B,)``), clamped at 0."""
    return (t_remaining.reshape(-1).to(torch.int64) - 1).clamp_min(0)


def denoiser_action(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t_remaining: torch.Tensor,
    action_mode: str = "x0",
    **context: torch.Tensor,
) -> torch.Tensor:
    """The base model's action: its ``x0`` estimate (``"x0"``) or its posterior mean (``"x_prev"``).

    In ``x0`` mode the env adds the schedule's posterior noise, so the env reproduces the base
    model's own stochastic chain; in ``x_prev`` mode the posterior mean is the deterministic
    (DiffRec evaluation) path; add ``exp(0.5 * log_variance) * z`` for the stochastic one.
    Any leading batch dims are accepted (``x_t``: ``(..., n_items)``, ``t``: ``(..., 1)``), as
    TorchRL losses pass ``(batch, time)`` tensordicts. Differentiable in the denoiser's parameters.
    """
    if action_mode not in ACTION_MODES:
        raise ConfigError(f"action_mode must be one of {list(ACTION_MODES)}, got {action_mode!r}")
    lead, n_items = x_t.shape[:-1], x_t.shape[-1]
    x_flat = x_t.reshape(-1, n_items)
    step = diffusion_step(t_remaining).to(x_t.device)
    flat_context = {name: value.reshape(x_flat.shape[0], *value.shape[len(lead):]) for name, value in context.items()}
    x0 = diffusion.predict_x0(denoiser(x_flat, step, **flat_context), x_flat, step)
    if action_mode == "x_prev":
        x0 = diffusion.q_posterior_mean_variance(x0, x_flat, step)[0]
    return x0.reshape(*lead, n_items)


class DenoiserPolicy(nn.Module):
    """A Gaussian policy head over a denoiser: ``loc`` = :func:`denoiser_action`, ``scale`` = ``exp(log_std)``.

    ``log_std`` is a learnable, state-independent parameter (one scalar, or one per item with
    ``per_item_std=True``). Pass a *copy* of the env's frozen denoiser with
    ``requires_grad_(True)`` to fine-tune it.

    Args:
        denoiser: the network ``f(x_t, t, **context)``.
        diffusion: its schedule.
        action_mode: the env's action mode.
        log_std_init: initial exploration log-std (DiffRec's own posterior std on ML-1M is ~8e-4,
            ``log`` ~ -7; exploration usually needs more).
        n_items: needed for ``per_item_std``.
        per_item_std: one log-std per item instead of one scalar.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        diffusion: GaussianDiffusion,
        action_mode: str = "x0",
        log_std_init: float = -3.0,
        n_items: Optional[int] = None,
        per_item_std: bool = False,
    ) -> None:
        super().__init__()
        if action_mode not in ACTION_MODES:
            raise ConfigError(f"action_mode must be one of {list(ACTION_MODES)}, got {action_mode!r}")
        if per_item_std and not n_items:
            raise ConfigError("per_item_std=True needs n_items")
        self.denoiser, self.diffusion, self.action_mode = denoiser, diffusion, action_mode
        self.log_std = nn.Parameter(torch.full((n_items if per_item_std else 1,), float(log_std_init)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = denoiser_action(self.denoiser, self.diffusion, x_t, t, self.action_mode)
        return loc, torch.exp(self.log_std).expand_as(loc)
