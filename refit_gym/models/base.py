"""The base-model interface: what every diffusion recommender tells the rest of the library.

Everything above the models layer (pretraining, evaluation, the denoising MDP and its fronts,
the rewards, the agents, checkpoints) talks to a :class:`BaseModel` and never names a concrete
model. A new base model is one file with one subclass and its typed config section, plus one
YAML for its scenario (``docs/models.md`` walks through DiffRec and CF-Diff as examples).

What a subclass defines:

=========================  ===================================================================
member                     meaning
=========================  ===================================================================
``name``, ``Config``       registry name (``model.name`` in a config) and its config dataclass
``protocol``               the evaluation protocol it is scored with (``"cf"`` or ``"sequential"``)
``state_dim``              width of the diffused state ``x_t`` (``n_items`` for interaction
                           rows, ``d`` for an item-embedding state)
``encode(history)``        :class:`ChainInputs` from the **visible** history only: the clean
                           vector the chain starts from (or ``None`` = start from noise) and the
                           conditioning tensors handed to the denoiser
``condition_spec()``       per-row shape, dtype and bounds of each conditioning tensor
``denoise(x_t, t, **c)``   the network's output (an ``x0`` or ``eps`` prediction)
``item_scores(x0)``        item scores ``(B, n_items)`` of a clean state (higher ranks first);
                           part of the trainable module, so fine-tuning may change it
``training_batches``,      pretraining examples and loss (defaults: batches of users' full
``training_loss``          histories, the diffusion loss on ``encode(history).start``)
=========================  ===================================================================

The trainable state is the module's ``state_dict()`` (the schedule and any statistics fitted
from training data are non-persistent buffers, rebuilt from the config and the data), so a
checkpoint saves and restores the whole model, item embeddings included.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
import torch.nn as nn

from refit_gym.data.history import HistoryBatch, SequenceTable
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.diffusion.timestep_sampler import TimestepSampler
from refit_gym.errors import ConfigError


@dataclass
class ModelConfig:
    """The ``model`` section of a config; each base model extends it with its own fields."""

    name: str = "diffrec"
    """Base model: a registered name (``diffrec``, ``tdiffrec``, ``cfdiff``, ``diffurec``, ``dreamrec``; see
    ``refit_gym.models.MODELS``) or the import path ``package.module:Class`` of your own."""


@dataclass(frozen=True)
class ConditionSpec:
    """Per-row shape, dtype and value range of one conditioning tensor (for observation spaces)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    low: float
    high: float


@dataclass
class ChainInputs:
    """What a model makes of a batch of visible histories.

    Attributes:
        start: ``(B, state_dim)`` the clean vector the reverse chain starts from (``q_sample``d
            to ``noise_steps`` first when that is > 0), or ``None``: the chain starts from
            ``x_T ~ N(0, I)``.
        condition: conditioning tensors ``(B, ...)`` handed to :meth:`BaseModel.denoise` as
            keyword arguments (none for DiffRec).
    """

    start: Optional[torch.Tensor]
    condition: dict[str, torch.Tensor]


class BaseModel(nn.Module):
    """A diffusion recommender: a denoiser, its Gaussian process and how histories become states.

    Args:
        config: the model's config section (an instance of ``Config``).
        diffusion: the Gaussian process the denoiser is trained with.
        train: the training interactions (sizes, and statistics some models fit from them).
        noise_steps: inference starts from the clean vector noised to this step (0 = un-noised,
            DiffRec's ``sampling_steps``); unused by models that start from noise.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    protocol: ClassVar[str] = "cf"

    def __init__(
        self, config: ModelConfig, diffusion: GaussianDiffusion, train: TrainingInteractions, noise_steps: int = 0
    ) -> None:
        super().__init__()
        if not 0 <= noise_steps <= diffusion.steps:
            raise ConfigError(f"noise_steps must be in [0, {diffusion.steps}], got {noise_steps}")
        self.config, self.diffusion, self.noise_steps = config, diffusion, int(noise_steps)
        self.n_users, self.n_items = train.n_users, train.n_items

    # ------------------------------------------------------------------ what a model defines
    @property
    def state_dim(self) -> int:
        """Width of the diffused state ``x_t``."""
        raise NotImplementedError

    def encode(self, history: HistoryBatch) -> ChainInputs:
        """The chain's start and conditioning from the visible positions of ``history`` only."""
        raise NotImplementedError

    def condition_spec(self) -> dict[str, ConditionSpec]:
        """Per-row spec of each conditioning tensor :meth:`encode` returns (none by default)."""
        return {}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """The network's prediction (``x0`` or ``eps``, as ``diffusion.mean_type`` says) at ``(x_t, t)``."""
        raise NotImplementedError

    def item_scores(self, x0: torch.Tensor) -> torch.Tensor:
        """Item scores ``(B, n_items)`` of clean states ``(B, state_dim)``."""
        raise NotImplementedError

    fused_posterior_mean = None
    """Optional fused deterministic step ``(x_t, t, coef1, coef2, **condition) -> c1 f(x_t, t) + c2 x_t``
    (see :meth:`GaussianDiffusion.sample`); ``None`` uses the unfused step."""

    # ------------------------------------------------------------------ the chain (shared)
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def describe(self) -> dict[str, Any]:
        """The JSON-able shape a checkpoint records and checks against the data it is used with."""
        return {"n_users": self.n_users, "n_items": self.n_items, "state_dim": self.state_dim}

    def start_state(
        self, inputs: ChainInputs, noise: Optional[torch.Tensor] = None, noise_steps: Optional[int] = None
    ) -> torch.Tensor:
        """``x`` where the reverse chain starts: ``inputs.start`` (``q_sample``d to ``noise_steps``
        when > 0, with ``noise``) or, when the model starts from noise, ``noise`` itself."""
        noise_steps = self.noise_steps if noise_steps is None else noise_steps
        if inputs.start is None:
            if noise is None:
                raise ConfigError(f"{type(self).__name__} starts its chain from noise: pass noise")
            return noise
        if noise_steps == 0:
            return inputs.start
        return self.diffusion.q_sample(inputs.start, noise_steps - 1, noise=noise)

    def step_denoiser(self, **condition: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t, t) -> denoise(x_t, t, **condition)`` for several steps under one condition, with the
        same arithmetic as :meth:`denoise` (equal to the last bit) and differentiable.

        A model whose conditioning does not depend on ``x_t`` overrides this to encode the
        condition once (DreamRec's history encoder) instead of once per call: the policy's steps
        of one rollout, and their log-probs in an update, then share one encoding (and its
        backward). In train mode a dropout mask drawn here would be shared by every step; the
        fine-tuned policy keeps its model in eval mode.
        """
        return lambda x_t, t: self.denoise(x_t, t, **condition)

    def chain_denoiser(self, **condition: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``(x_t, t) -> denoise(x_t, t, **condition)`` for the many steps of one chain, as fast as the
        model allows: :meth:`step_denoiser` by default; a model may also reorder its arithmetic
        here (DreamRec folds its guided ``mlp1``), so the result may differ from :meth:`denoise` in
        the last bits. Meant for a model that is not training (sampling, the env's hidden prefix).
        """
        return self.step_denoiser(**condition)

    def reverse_mean(self, x_t: torch.Tensor, t: int, **condition: torch.Tensor) -> torch.Tensor:
        """The deterministic reverse step ``x_t -> mean of p(x_{t-1} | x_t)`` at diffusion step ``t``."""
        return self.diffusion.p_mean_variance(self.denoise, x_t, t, **condition)["mean"]

    @torch.no_grad()
    def sample(self, inputs: ChainInputs, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The clean estimate of the deterministic (posterior-mean) chain over all T steps."""
        x_start = self.start_state(inputs, noise)
        return self.diffusion.sample(self.denoise, x_start, 0, posterior_mean=self.fused_posterior_mean,
                                     **inputs.condition)

    @torch.no_grad()
    def score(self, history: HistoryBatch) -> torch.Tensor:
        """Evaluation scores ``(B, n_items)``: the deterministic chain from the visible history."""
        return self.item_scores(self.sample(self.encode(history.to_device(self.device))))

    # ------------------------------------------------------------------ pretraining (defaults)
    def training_batches(
        self, table: SequenceTable, batch_size: int, generator: torch.Generator
    ) -> Iterator[HistoryBatch]:
        """One epoch of pretraining examples: the full training histories of shuffled users."""
        order = torch.randperm(table.n_users, generator=generator)
        for users in order.split(batch_size):
            yield table.batch(users)

    def training_loss(
        self,
        batch: HistoryBatch,
        timestep_sampler: TimestepSampler,
        reweight: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """The mean importance-corrected diffusion loss of ``encode(batch).start`` (updates the sampler)."""
        inputs = self.encode(batch.to_device(self.device))
        if inputs.start is None:
            raise NotImplementedError(f"{type(self).__name__} starts from noise: it must define its own training_loss")
        x_start = inputs.start
        t, divisor = timestep_sampler.sample(len(x_start), self.device, generator=generator)
        noise = torch.randn(x_start.shape, generator=generator).to(self.device)
        losses = self.diffusion.training_losses(
            self.denoise, x_start, t, reweight=reweight, noise=noise, **inputs.condition
        )
        timestep_sampler.update(t, losses)
        return (losses / divisor).mean()


# ---------------------------------------------------------------------------------- registry
MODELS: dict[str, str] = {
    "diffrec": "refit_gym.models.diffrec:DiffRec",
    "tdiffrec": "refit_gym.models.tdiffrec:TDiffRec",
    "cfdiff": "refit_gym.models.cfdiff:CFDiff",
    "diffurec": "refit_gym.models.diffurec:DiffuRec",
    "dreamrec": "refit_gym.models.dreamrec:DreamRec",
}
"""Registered base models: name -> ``module:Class`` (imported on first use)."""


def register_model(cls: type[BaseModel]) -> type[BaseModel]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or not cls.name:
        raise ConfigError(f"register_model needs a BaseModel subclass with a name, got {cls!r}")
    MODELS[cls.name] = f"{cls.__module__}:{cls.__qualname__}"
    return cls


def model_class(name: str) -> type[BaseModel]:
    """The class of a registered model name or of an import path ``package.module:Class``."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model.name must be a non-empty string, got {name!r}")
    target = MODELS.get(name, name)
    module_name, sep, attribute = target.partition(":")
    if not sep:
        raise ConfigError(f"unknown base model {name!r}; registered: {sorted(MODELS)} "
                          "(or give your own as 'package.module:Class')")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot import the base model {target!r}: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise ConfigError(f"{target!r} is not a refit_gym.models.BaseModel subclass")
    return cls


def model_config(values: Any) -> ModelConfig:
    """The typed config of the ``model`` section (its ``name`` picks the model's ``Config``).

    Raises:
        ConfigError: an unknown model, or keys the model's config does not have (all valid keys
            are listed), or a value of the wrong type.
    """
    from refit_gym.config import build_section

    values = {} if values is None else values
    if isinstance(values, ModelConfig):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"config section 'model' must be a mapping, got {type(values).__name__}")
    cls = model_class(values.get("name", ModelConfig.name))
    return build_section(cls.Config, values, "model")


__all__ = [
    "BaseModel",
    "ChainInputs",
    "ConditionSpec",
    "MODELS",
    "ModelConfig",
    "model_class",
    "model_config",
    "register_model",
]
