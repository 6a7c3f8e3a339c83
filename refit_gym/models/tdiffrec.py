"""T-DiffRec (Wang et al., SIGIR 2023, the time-aware DiffRec): the input row weighted by recency.

DiffRec's model with one change, in training and at inference: a user's interaction row holds
``linspace(w_min, w_max, n)`` over the user's ``n`` visible training items in time order (the
oldest gets ``w_min``, the most recent ``w_max``) instead of 1s. The official code weights the
training rows this way (``T-DiffRec/data_utils.py``, defaults ``w_min = 0.1``, ``w_max = 1.0``);
here the weights are computed from the *visible* history, so when the environment hides the most
recent items, the most recent visible one gets ``w_max``, as the last training item does at
evaluation. An item seen at several positions keeps its most recent weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refit_gym.data.history import HistoryBatch
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.errors import ConfigError
from refit_gym.models.diffrec import DiffRec, DiffRecConfig


@dataclass
class TDiffRecConfig(DiffRecConfig):
    name: str = "tdiffrec"
    w_min: float = 0.1
    """Weight of a user's oldest visible training item (T-DiffRec: 0.1)."""
    w_max: float = 1.0
    """Weight of the most recent one (T-DiffRec: 1.0)."""


class TDiffRec(DiffRec):
    """DiffRec over recency-weighted input rows (see the module docstring)."""

    name = "tdiffrec"
    Config = TDiffRecConfig

    def __init__(
        self, config: TDiffRecConfig, diffusion: GaussianDiffusion, train: TrainingInteractions, noise_steps: int = 0
    ) -> None:
        if not 0.0 <= config.w_min <= config.w_max:
            raise ConfigError(f"model.w_min and model.w_max must satisfy 0 <= w_min <= w_max, got "
                              f"{config.w_min} and {config.w_max}")
        super().__init__(config, diffusion, train, noise_steps)

    def input_row(self, history: HistoryBatch) -> torch.Tensor:
        return history.rows(history.recency_weights(self.config.w_min, self.config.w_max))
