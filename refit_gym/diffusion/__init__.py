"""Gaussian diffusion: schedules, forward / reverse process, losses, timestep sampling."""

from refit_gym.diffusion.gaussian import GaussianDiffusion, Trajectory, gaussian_log_prob
from refit_gym.diffusion.schedules import SCHEDULES, make_betas
from refit_gym.diffusion.timestep_sampler import TimestepSampler

__all__ = ["GaussianDiffusion", "Trajectory", "gaussian_log_prob", "SCHEDULES", "make_betas", "TimestepSampler"]
