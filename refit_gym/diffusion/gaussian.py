"""Gaussian diffusion over interaction vectors (DiffRec's process, improved-diffusion's names).

The process is an ``nn.Module`` holding only its schedule (float64 buffers, so ``.to(device)``
moves them); the denoiser is passed in to every call, as in improved-diffusion and DiffRec:
``diffusion.training_losses(denoiser, x0)``, ``diffusion.sample(denoiser, x_start)``.
Conditioning of other base models (CF-Diff's multi-hop rows, DreamRec's history encoding)
travels as keyword arguments ``**context`` that are handed to the denoiser untouched.

Conventions: ``t`` runs ``0..T-1``; ``x_t`` is the state *after* ``t + 1`` noising steps, so
the reverse chain visits ``t = T-1, ..., 0`` and its last posterior step returns the clean
estimate. All per-step coefficients are gathered from float64 buffers and cast to the dtype of
the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from refit_gym.diffusion.schedules import make_betas
from refit_gym.errors import ConfigError

Denoiser = Callable[..., torch.Tensor]
FusedPosteriorMean = Callable[..., torch.Tensor]
"""``posterior_mean(x_t, t, coef1, coef2, **context)``: one fused deterministic reverse step."""
MEAN_TYPES = ("x0", "eps")
LOG_PROB_REDUCTIONS = ("sum", "mean")


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """Log-density of ``x`` under ``N(mean, exp(log_std)^2 I)``, reduced over the last dim.

    ``reduction="sum"`` is the exact log-likelihood of the vector; ``"mean"`` divides it by the
    dimension (DDPO's convention, which keeps importance ratios near 1 in thousands of dims).
    ``log_std`` broadcasts against ``x`` (a scalar, a per-row ``(B, 1)`` or a per-dim tensor).
    """
    if reduction not in LOG_PROB_REDUCTIONS:
        raise ConfigError(f"unknown log-prob reduction {reduction!r}; expected {LOG_PROB_REDUCTIONS}")
    log_std = torch.as_tensor(log_std, dtype=x.dtype, device=x.device)
    per_dim = -((x - mean) ** 2) * torch.exp(-2.0 * log_std) / 2.0 - log_std - 0.5 * math.log(2 * math.pi)
    return per_dim.sum(-1) if reduction == "sum" else per_dim.mean(-1)


@dataclass
class Trajectory:
    """A reverse chain: ``states[k]`` is the state before step ``k`` (``timesteps[k]``).

    ``states`` has ``len(timesteps) + 1`` entries; the last one is the chain's output.
    ``log_probs[k]`` is the log-probability of ``states[k + 1]`` given ``states[k]`` under the
    step's Gaussian (``None`` for a deterministic chain).
    """

    states: list[torch.Tensor]
    timesteps: list[int]
    log_probs: Optional[list[torch.Tensor]] = None

    @property
    def final(self) -> torch.Tensor:
        return self.states[-1]


class GaussianDiffusion(nn.Module):
    """DiffRec's Gaussian diffusion: schedule, forward noising, posterior, loss and reverse chain.

    Args:
        steps: number of diffusion steps T.
        noise_schedule: ``linear-var`` (DiffRec), ``linear``, ``cosine`` or ``binomial``.
        noise_scale, noise_min, noise_max: range of the linear schedules.
        mean_type: what the denoiser predicts: ``x0`` (the clean vector) or ``eps`` (the noise).
        beta_fixed: overwrite ``beta_0`` with 1e-5 (DiffRec).
    """

    def __init__(
        self,
        steps: int = 40,
        noise_schedule: str = "linear-var",
        noise_scale: float = 0.005,
        noise_min: float = 0.005,
        noise_max: float = 0.01,
        mean_type: str = "x0",
        beta_fixed: bool = True,
    ) -> None:
        super().__init__()
        if mean_type not in MEAN_TYPES:
            raise ConfigError(f"unknown mean_type {mean_type!r}; expected one of {MEAN_TYPES}")
        self.steps = int(steps)
        self.mean_type = mean_type
        self.noise_scale = float(noise_scale)
        betas = torch.from_numpy(
            make_betas(noise_schedule, steps, noise_scale, noise_min, noise_max, beta_fixed)
        )
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # log of the posterior variance, clipped at t=0 where the variance is 0 (improved DDPM)
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            if steps > 1
            else posterior_variance.clamp_min(1e-20)
        )
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            # schedule values are a function of the config: not saved in checkpoints
            self.register_buffer(name, value, persistent=False)

    # ------------------------------------------------------------------ helpers
    def _coef(self, name: str, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """Buffer ``name`` at timesteps ``t``, shaped to broadcast against the batch ``like``."""
        buffer = getattr(self, name)
        if isinstance(t, int):
            return buffer[t].to(like.dtype)
        values = buffer.to(like.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)`` (float64)."""
        alpha_bar = self.alphas_cumprod[t]
        return alpha_bar / (1.0 - alpha_bar)

    # ------------------------------------------------------------------ forward process
    def q_sample(
        self,
        x_start: torch.Tensor,
        t: torch.Tensor | int,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Sample ``x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``."""
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        return (
            self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
        mean = (
            self._coef("posterior_mean_coef1", t, x_t) * x_start
            + self._coef("posterior_mean_coef2", t, x_t) * x_t
        )
        return (
            mean,
            self._coef("posterior_variance", t, x_t),
            self._coef("posterior_log_variance_clipped", t, x_t),
        )

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The clean-vector estimate implied by a denoiser output of this process's mean type."""
        if self.mean_type == "x0":
            return model_output
        return self.predict_x0_from_eps(x_t, t, model_output)

    def timestep_tensor(self, t: int, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), t, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self, denoiser: Denoiser, x_t: torch.Tensor, t: int, **context
    ) -> dict[str, torch.Tensor]:
        """One reverse step's Gaussian ``p(x_{t-1} | x_t)``: mean, variance, log-variance, x0-estimate."""
        model_output = denoiser(x_t, self.timestep_tensor(t, x_t.shape[0], x_t.device), **context)
        pred_x0 = self.predict_x0(model_output, x_t, t)
        mean, variance, log_variance = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}

    def initial_state(
        self,
        x_start: torch.Tensor,
        noise_steps: int = 0,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """DiffRec's inference start: ``x_start`` itself (``noise_steps=0``) or ``q_sample``d to step ``noise_steps - 1``."""
        if not 0 <= noise_steps <= self.steps:
            raise ConfigError(f"noise_steps must be in [0, {self.steps}], got {noise_steps}")
        if noise_steps == 0:
            return x_start
        return self.q_sample(x_start, noise_steps - 1, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x_start: torch.Tensor,
        noise_steps: int = 0,
        posterior_mean: Optional[FusedPosteriorMean] = None,
        **context,
    ) -> torch.Tensor:
        """DiffRec's evaluation path: the deterministic posterior-mean chain over all T steps.

        Args:
            denoiser: ``f(x_t, t, **context)``.
            x_start: where the chain starts: the clean vector, ``q_sample``d to ``noise_steps``
                first (DiffRec), or the noise ``x_T`` itself with ``noise_steps = 0``.
            noise_steps: see :meth:`initial_state`.
            posterior_mean: the fused-step protocol: an optional
                ``posterior_mean(x_t, t, coef1, coef2) = coef1 * f(x_t, t) + coef2 * x_t`` that
                computes a step of an x0-predicting denoiser in one pass (DiffRec's fuses its
                output layer, :meth:`~refit_gym.models.diffrec.DiffRecMLP.posterior_mean`); it
                receives the context too. ``None``: the unfused step.
        """
        x_t = self.initial_state(x_start, noise_steps)
        if self.noise_scale == 0.0:  # DiffRec: no noise -> plain iterative denoiser
            for t in reversed(range(self.steps)):
                x_t = denoiser(x_t, self.timestep_tensor(t, x_t.shape[0], x_t.device), **context)
            return x_t
        coef1, coef2 = self.posterior_mean_coef1.tolist(), self.posterior_mean_coef2.tolist()
        fused = posterior_mean if self.mean_type == "x0" else None
        for t in reversed(range(self.steps)):
            step = self.timestep_tensor(t, x_t.shape[0], x_t.device)
            if fused is not None:  # c1 * x0 + c2 * x_t computed by the model itself
                x_t = fused(x_t, step, coef1[t], coef2[t], **context)
                continue
            pred_x0 = self.predict_x0(denoiser(x_t, step, **context), x_t, t)
            # the posterior mean c1 * x0 + c2 * x_t in two passes over the batch, no temporaries
            # (a fresh x0 from the denoiser is scaled in place); same values as p_mean_variance
            if pred_x0 is x_t:
                pred_x0 = pred_x0.clone()
            x_t = torch.add(pred_x0.mul_(coef1[t]), x_t, alpha=coef2[t])
        return x_t

    def sample_trajectory(
        self,
        denoiser: Denoiser,
        x_t: torch.Tensor,
        timesteps: Optional[list[int]] = None,
        stochastic: bool = True,
        log_std: Optional[float | torch.Tensor] = None,
        log_prob_reduction: str = "sum",
        generator: Optional[torch.Generator] = None,
        **context,
    ) -> Trajectory:
        """Run reverse steps from ``x_t`` and record every state (and each step's log-prob).

        Args:
            timesteps: the steps to run, in order (default ``T-1, ..., 0``).
            stochastic: sample ``x_{t-1} = mean + std * z`` (the policy) instead of taking the mean.
            log_std: exploration log-std; ``None`` uses the schedule's posterior std
                ``exp(0.5 * log_variance)`` (tiny for DiffRec's ML-1M schedule, ~8e-4).
            log_prob_reduction: ``sum`` (exact) or ``mean`` over item dimensions.
        Gradients flow through the means (and ``log_std``) so the log-probs can be trained.
        """
        timesteps = list(reversed(range(self.steps))) if timesteps is None else list(timesteps)
        states, log_probs = [x_t], ([] if stochastic else None)
        for t in timesteps:
            out = self.p_mean_variance(denoiser, x_t, t, **context)
            if not stochastic:
                x_t = out["mean"]
            else:
                step_log_std = 0.5 * out["log_variance"] if log_std is None else log_std
                step_log_std = torch.as_tensor(step_log_std, dtype=x_t.dtype, device=x_t.device)
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
                x_next = (out["mean"] + torch.exp(step_log_std) * noise).detach()
                log_probs.append(gaussian_log_prob(x_next, out["mean"], step_log_std, log_prob_reduction))
                x_t = x_next
            states.append(x_t)
        return Trajectory(states=states, timesteps=timesteps, log_probs=log_probs)

    # ------------------------------------------------------------------ training
    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """DiffRec's reweighting: ``SNR(t-1) - SNR(t)`` for x0-prediction, 1 at ``t = 0``."""
        if self.mean_type == "x0":
            weight = self.snr((t - 1).clamp_min(0)) - self.snr(t)
        else:
            weight = (1.0 - self.alphas_cumprod[t]) / (
                (1.0 - self.alphas_cumprod_prev[t]) ** 2 * (1.0 - self.betas[t])
            )
        return torch.where(t == 0, torch.ones_like(weight), weight)

    def training_losses(
        self,
        denoiser: Denoiser,
        x_start: torch.Tensor,
        t: torch.Tensor,
        reweight: bool = True,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        **context,
    ) -> torch.Tensor:
        """Per-sample training loss at timesteps ``t`` (shape ``(B,)``; not yet importance-corrected).

        MSE is averaged over items (DiffRec's ``mean_flat``). With ``reweight``, x0-prediction uses
        SNR-difference weights; eps-prediction uses the ELBO weight and, at ``t = 0``, the
        x0-reconstruction term — both as in DiffRec.
        """
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise=noise) if self.noise_scale != 0.0 else x_start
        model_output = denoiser(x_t, t, **context)
        target = x_start if self.mean_type == "x0" else noise
        mse = F.mse_loss(model_output, target, reduction="none").mean(-1)
        if not reweight:
            return mse
        weight = self.loss_weights(t).to(mse.dtype)
        if self.mean_type == "x0":
            return weight * mse
        reconstruction = ((x_start - self.predict_x0_from_eps(x_t, t, model_output)) ** 2 / 2.0).mean(-1)
        return weight * torch.where(t == 0, reconstruction, mse)
