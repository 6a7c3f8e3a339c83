"""Base diffusion recommenders behind one interface (:class:`DiffusionRecommender`)."""

from __future__ import annotations

from typing import Callable

import torch

from refit_gym.config import DiffusionConfig, ModelConfig
from refit_gym.data.interactions import InteractionData
from refit_gym.data.sparse_rows import SparseRows
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.errors import ConfigError
from refit_gym.models.base import DiffusionRecommender
from refit_gym.models.diffrec import DiffRecMLP


def build_diffusion(config: DiffusionConfig) -> GaussianDiffusion:
    return GaussianDiffusion(
        steps=config.steps,
        noise_schedule=config.noise_schedule,
        noise_scale=config.noise_scale,
        noise_min=config.noise_min,
        noise_max=config.noise_max,
        mean_type=config.mean_type,
        beta_fixed=config.beta_fixed,
    )


def build_diffrec(model: ModelConfig, diffusion: DiffusionConfig, data: InteractionData) -> DiffusionRecommender:
    """DiffRec (Wang et al. 2023): the MLP denoiser over the user's interaction row."""
    denoiser = DiffRecMLP(
        n_items=data.n_items, dims=model.dims, time_emb_dim=model.time_emb_dim, dropout=model.dropout, norm=model.norm
    )
    recommender = DiffusionRecommender(
        denoiser,
        build_diffusion(diffusion),
        SparseRows(data.train),
        noise_steps=diffusion.noise_steps,
        config={"n_users": data.n_users, "n_items": data.n_items},
    )
    recommender.model_name = "diffrec"
    return recommender


MODELS: dict[str, Callable[[ModelConfig, DiffusionConfig, InteractionData], DiffusionRecommender]] = {
    "diffrec": build_diffrec,
}


def build_model(
    model: ModelConfig, diffusion: DiffusionConfig, data: InteractionData, device: torch.device | str = "cpu"
) -> DiffusionRecommender:
    """Build the named base model for ``data`` on ``device`` (weights freshly initialised)."""
    if model.name not in MODELS:
        raise ConfigError(f"unknown base model {model.name!r}; available: {sorted(MODELS)}")
    return MODELS[model.name](model, diffusion, data).to(device)


__all__ = ["DiffusionRecommender", "DiffRecMLP", "MODELS", "build_model", "build_diffusion"]
