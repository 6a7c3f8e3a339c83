"""Noise schedules: the betas of a Gaussian diffusion, computed in float64.

``linear-var`` is DiffRec's schedule: the linspace ``noise_scale * [noise_min .. noise_max]``
is taken as the *variance* ``1 - alpha_bar_t`` and converted to betas. DiffRec then overwrites
``beta_0`` with ``1e-5`` (``beta_fixed``), which this module reproduces by default.

``trunc-lin`` is DiffuRec's default (``get_named_beta_schedule`` of WHUIR/DiffuRec): Ho et al.'s
linear betas rescaled to ``T`` steps (``s = 1000 / T``: ``s 1e-4 .. s 0.02``) and shifted up by
0.01 (when the end would exceed 1, ``s 1e-3 + 0.01``); it ignores ``noise_scale`` / ``noise_min`` /
``noise_max``. ``exp`` is DreamRec's default (``exp_beta_schedule`` of YangZhengyi98/DreamRec, the
discretised variance-preserving SDE with ``beta_min = 0.1``, ``beta_max = 10``:
``1 - exp(-beta_min / T - x (beta_max - beta_min) / (2 T^2))``, ``x = linspace(1, 2T + 1, T)``); it
ignores them too.
"""

from __future__ import annotations

import math

import numpy as np

from refit_gym.errors import ConfigError

SCHEDULES = ("linear", "linear-var", "cosine", "binomial", "trunc-lin", "exp")
FIXED_FIRST_BETA = 1e-5  # DiffRec's beta_0 (Sohl-Dickstein et al. 2015, sec. 2.4.1)
MAX_BETA = 0.999


def betas_from_linear_variance(variance: np.ndarray, max_beta: float = MAX_BETA) -> np.ndarray:
    """Betas whose cumulative noise variance ``1 - alpha_bar_t`` equals ``variance``."""
    alpha_bar = 1.0 - variance
    betas = np.empty_like(variance)
    betas[0] = 1.0 - alpha_bar[0]
    betas[1:] = np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)
    return betas


def betas_for_alpha_bar(steps: int, alpha_bar, max_beta: float = MAX_BETA) -> np.ndarray:
    """Betas that discretise a continuous ``alpha_bar(s)``, ``s`` in [0, 1] (improved DDPM)."""
    s = np.arange(steps + 1, dtype=np.float64) / steps
    values = np.array([alpha_bar(x) for x in s])
    return np.minimum(1.0 - values[1:] / values[:-1], max_beta)


def make_betas(
    schedule: str,
    steps: int,
    noise_scale: float,
    noise_min: float,
    noise_max: float,
    beta_fixed: bool = True,
) -> np.ndarray:
    """The float64 betas of length ``steps`` for a named schedule.

    Args:
        schedule: one of ``linear``, ``linear-var`` (DiffRec's default), ``cosine``, ``binomial``,
            ``trunc-lin`` (DiffuRec's default), ``exp`` (DreamRec's default).
        steps: number of diffusion steps T.
        noise_scale, noise_min, noise_max: the linear schedules run from
            ``noise_scale * noise_min`` to ``noise_scale * noise_max``.
        beta_fixed: overwrite ``beta_0`` with ``1e-5`` as DiffRec does.
    """
    if steps < 1:
        raise ConfigError(f"diffusion steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")
    if schedule in ("linear", "linear-var"):
        start, end = noise_scale * noise_min, noise_scale * noise_max
        if not 0.0 < start <= end < 1.0:
            raise ConfigError(
                "linear schedules need 0 < noise_scale*noise_min <= noise_scale*noise_max < 1, "
                f"got {start} .. {end}"
            )
        line = np.linspace(start, end, steps, dtype=np.float64)
        betas = line if schedule == "linear" else betas_from_linear_variance(line)
    elif schedule == "trunc-lin":
        scale = 1000.0 / steps
        start, end = scale * 1e-4 + 0.01, scale * 0.02 + 0.01
        if end > 1.0:
            end = scale * 1e-3 + 0.01
        betas = np.linspace(start, end, steps, dtype=np.float64)
    elif schedule == "exp":
        x = np.linspace(1, 2 * steps + 1, steps, dtype=np.float64)
        betas = 1.0 - np.exp(-0.1 / steps - x * 0.5 * (10.0 - 0.1) / (steps * steps))
    elif schedule == "cosine":
        betas = betas_for_alpha_bar(
            steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    else:  # binomial
        betas = np.array([1.0 / (steps - t + 1) for t in range(steps)], dtype=np.float64)
    betas = np.asarray(betas, dtype=np.float64).copy()
    if beta_fixed:
        betas[0] = FIXED_FIRST_BETA
    if not np.all((betas > 0) & (betas <= 1)):
        raise ConfigError(f"schedule {schedule!r} produced betas outside (0, 1]: {betas}")
    return betas
