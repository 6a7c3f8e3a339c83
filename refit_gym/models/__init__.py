"""Base diffusion recommenders behind one interface (:class:`BaseModel`).

=============  ==============================================================  ================
name           model                                                           file
=============  ==============================================================  ================
``diffrec``    DiffRec: MLP denoiser over the interaction row                  ``diffrec.py``
``tdiffrec``   T-DiffRec: DiffRec over recency-weighted rows                   ``tdiffrec.py``
``cfdiff``     CF-Diff: cross-attention denoiser conditioned on 2- and 3-hop   ``cfdiff.py``
               neighbourhood rows
``diffurec``   DiffuRec: Transformer approximator over the history, the next  ``diffurec.py``
               item's embedding diffused (sequential)
``dreamrec``   DreamRec: MLP denoiser conditioned on the history encoding,    ``dreamrec.py``
               classifier-free guidance (sequential)
=============  ==============================================================  ================

The sequential models share ``sequential.py`` (embedding state, windows, per-user evaluation
noise) and ``sequence_encoder.py`` (SASRec's self-attention encoder).

Your own model: subclass :class:`BaseModel` in any module and name it in a config as
``model: {name: "package.module:Class", ...}`` (or :func:`register_model` it); see
``docs/models.md``.
"""

from __future__ import annotations

from typing import Union

import torch

from refit_gym.config import DiffusionConfig
from refit_gym.data.interactions import InteractionData, TrainingInteractions
from refit_gym.diffusion import GaussianDiffusion
from refit_gym.models.base import (
    MODELS,
    BaseModel,
    ChainInputs,
    ConditionSpec,
    ModelConfig,
    model_class,
    model_config,
    register_model,
)


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


def build_model(
    model: ModelConfig,
    diffusion: DiffusionConfig,
    data: Union[InteractionData, TrainingInteractions],
    device: torch.device | str = "cpu",
) -> BaseModel:
    """Build ``model.name`` for ``data``'s training interactions on ``device`` (weights freshly initialised)."""
    train = data if isinstance(data, TrainingInteractions) else TrainingInteractions.from_data(data)
    config = model_config(model)
    cls = model_class(config.name)
    return cls(config, build_diffusion(diffusion), train, noise_steps=diffusion.noise_steps).to(device)


__all__ = [
    "BaseModel",
    "ChainInputs",
    "ConditionSpec",
    "MODELS",
    "ModelConfig",
    "build_diffusion",
    "build_model",
    "model_class",
    "model_config",
    "register_model",
]
