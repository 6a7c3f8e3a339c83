"""The pretrained denoiser as a policy of the denoising MDP (plain torch; usable from any front).

:func:`denoiser_action` is the action the base model itself takes in each action mode, so that
running it in the env reproduces the base model's own stochastic reverse chain.
:class:`DenoiserPolicy` wraps a (trainable copy of a) base model into a Gaussian policy head
returning ``(loc, scale)``, the form TorchRL's ``ProbabilisticActor`` and most PG code expect.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.envs.core import ACTION_MODES
from refit_gym.errors import ConfigError
from refit_gym.models.base import BaseModel


def diffusion_step(t_remaining: torch.Tensor) -> torch.Tensor:
    """The diffusion step index ``t - 1`` of an observation's remaining steps (``(B, 1)`` or ``(B,)``), clamped at 0."""
    return (t_remaining.reshape(-1).to(torch.int64) - 1).clamp_min(0)


def denoiser_action(
    denoiser: Callable[..., torch.Tensor],
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
    ``denoiser`` is a base model's :meth:`~refit_gym.models.BaseModel.denoise` (or any
    ``f(x_t, t, **context)``). Any leading batch dims are accepted (``x_t``: ``(..., state_dim)``,
    ``t``: ``(..., 1)``), as TorchRL losses pass ``(batch, time)`` tensordicts. Differentiable in
    the denoiser's parameters.
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


STATE_KEYS = ("x_t", "t", "user")
"""The observation keys every env has; the others are the base model's conditioning."""


class DenoiserPolicy(nn.Module):
    """A Gaussian policy head over a base model: ``loc`` = :func:`denoiser_action`, ``scale`` = ``exp(log_std)``.

    The policy holds a trainable **copy** of ``model`` (the env's frozen base model is never
    touched), so the pretrained denoiser is the policy's initialisation. The model stays in eval
    mode (no dropout) whatever the module's mode, so sampling and scoring use one function.
    ``log_std`` is state-independent: a learnable parameter (one scalar, or one per state
    dimension with ``per_dim_std=True``), or a fixed buffer with ``learn_std=False``.

    Args:
        model: the base model (e.g. ``env.unwrapped.base_model``); copied.
        action_mode: the env's action mode.
        log_std_init: initial exploration log-std (DiffRec's own posterior std on ML-1M is ~8e-4,
            ``log`` ~ -7; exploration usually needs more).
        per_dim_std: one log-std per state dimension instead of one scalar.
        learn_std: whether ``log_std`` is a parameter (True) or a buffer.
    """

    def __init__(
        self,
        model: BaseModel,
        action_mode: str = "x0",
        log_std_init: float = -3.0,
        per_dim_std: bool = False,
        learn_std: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, BaseModel):
            raise ConfigError(f"model must be a refit_gym.models.BaseModel, got {type(model).__name__}")
        if action_mode not in ACTION_MODES:
            raise ConfigError(f"action_mode must be one of {list(ACTION_MODES)}, got {action_mode!r}")
        self.model = copy.deepcopy(model).requires_grad_(True).eval()
        self.diffusion, self.action_mode = self.model.diffusion, action_mode
        log_std = torch.full((model.state_dim,), float(log_std_init)) if per_dim_std else torch.tensor(float(log_std_init))
        if learn_std:
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("log_std", log_std)

    def train(self, mode: bool = True) -> "DenoiserPolicy":
        """The model stays in eval mode (dropout off), so sampling and scoring use one function."""
        super().train(mode)
        self.model.eval()
        return self

    @staticmethod
    def context(observation: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base model's conditioning tensors of an observation (everything but ``x_t``, ``t``, ``user``)."""
        return {k: v for k, v in observation.items() if k not in STATE_KEYS}

    def loc(self, x_t: torch.Tensor, t: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
        """The mean action at states ``(x_t, t)`` (``t`` = remaining steps); differentiable."""
        return denoiser_action(self.model.denoise, self.diffusion, x_t, t, self.action_mode, **context)

    def loc_function(self, **context: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t, t) -> loc(x_t, t, **context)`` for several steps of the same rows (a rollout, or its
        steps in an update), the condition encoded once (:meth:`BaseModel.step_denoiser`): equal to
        :meth:`loc` to the last bit, differentiable, ``x_t`` of shape ``(rows, state_dim)``. The
        encoding is of the parameters and rows at this call: build a new function after a parameter
        update or a reset of any row (the built-in agents build one per rollout and one per update
        or minibatch; the TorchRL and SB3 agents call :meth:`loc` at every step)."""
        denoise = self.model.step_denoiser(**context)
        return lambda x_t, t: denoiser_action(denoise, self.diffusion, x_t, t, self.action_mode)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, **context: torch.Tensor) -> torch.Tensor:
        """The denoiser's clean-state estimate at ``(x_t, t)`` (differentiable)."""
        step = diffusion_step(t).to(x_t.device)
        return self.diffusion.predict_x0(self.model.denoise(x_t, step, **context), x_t, step)

    def item_scores(self, x0: torch.Tensor) -> torch.Tensor:
        """The trainable model's item scores of clean states (an item-embedding model's are fine-tuned too)."""
        return self.model.item_scores(x0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, **context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.loc(x_t, t, **context)
        return loc, torch.exp(self.log_std).expand_as(loc)
