"""The base-model interface: a diffusion recommender = denoiser + diffusion + how users become states.

Everything above this layer (pretraining, evaluation, the denoising MDP, the agents) talks to a
:class:`DiffusionRecommender` and never to a concrete model, so a new base model (CF-Diff's
multi-hop conditioning, a DreamRec-style sequential model in item-embedding space) is one
subclass that says:

* ``start_vector(history)``: the clean vector the chain starts from (DiffRec: the history row);
* ``context(users)``: extra conditioning handed to the denoiser as keyword arguments;
* ``item_scores(x0)``: how the chain's output ranks items (DiffRec: it *is* the scores).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from refit_gym.data.interactions import InteractionData
from refit_gym.data.sparse_rows import SparseRows
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.diffusion.timestep_sampler import TimestepSampler
from refit_gym.errors import ConfigError


class DiffusionRecommender(nn.Module):
    """A diffusion recommender bound to a dataset's training interactions.

    Args:
        denoiser: the network ``f(x_t, t, **context)``.
        diffusion: the Gaussian process (schedule) the denoiser was trained with.
        history: the users' training rows (only training data ever reaches a model input).
        noise_steps: inference starts from the history row noised to this step (0 = un-noised,
            DiffRec's ``sampling_steps``).
        config: the JSON-able description used to rebuild the model from a checkpoint.
    """

    model_name = "base"

    def __init__(
        self,
        denoiser: nn.Module,
        diffusion: GaussianDiffusion,
        history: SparseRows,
        noise_steps: int = 0,
        config: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if not 0 <= noise_steps <= diffusion.steps:
            raise ConfigError(f"noise_steps must be in [0, {diffusion.steps}], got {noise_steps}")
        self.denoiser, self.diffusion, self.history = denoiser, diffusion, history
        self.noise_steps = noise_steps
        self.config = dict(config or {})

    # --- what a base model defines ---------------------------------------------------------
    @property
    def n_items(self) -> int:
        return self.history.n_cols

    @property
    def n_users(self) -> int:
        return self.history.n_rows

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def history_rows(self, users: torch.Tensor) -> torch.Tensor:
        """Dense ``(B, n_items)`` training rows of ``users`` on the model's device."""
        return self.history.dense(users).to(self.device)

    def start_vector(self, history: torch.Tensor) -> torch.Tensor:
        """The clean vector the reverse chain starts from, given (possibly masked) history rows."""
        return history

    def context(self, users: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditioning passed to the denoiser as keyword arguments (none for DiffRec)."""
        return {}

    def item_scores(self, x0: torch.Tensor) -> torch.Tensor:
        """Item scores ``(B, n_items)`` from the chain's output (higher ranks first)."""
        return x0

    # --- shared behaviour --------------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .cpu() move the sparse history too
        super()._apply(fn, recurse)
        self.history = self.history.to(self.device)
        return self

    @torch.no_grad()
    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Evaluation scores: the deterministic posterior-mean chain from the users' training rows."""
        users = users.to(self.device)
        x_start = self.start_vector(self.history_rows(users))
        x0 = self.diffusion.sample(self.denoiser, x_start, self.noise_steps, **self.context(users))
        return self.item_scores(x0)

    def training_loss(
        self,
        users: torch.Tensor,
        timestep_sampler: TimestepSampler,
        reweight: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """The mean importance-corrected diffusion loss of a batch of users (updates the sampler)."""
        users = users.to(self.device)
        x_start = self.start_vector(self.history_rows(users))
        t, divisor = timestep_sampler.sample(len(users), self.device, generator=generator)
        noise = torch.randn(x_start.shape, generator=generator).to(self.device)
        losses = self.diffusion.training_losses(
            self.denoiser, x_start, t, reweight=reweight, noise=noise, **self.context(users)
        )
        timestep_sampler.update(t, losses)
        return (losses / divisor).mean()


def check_data_matches(model_config: dict[str, Any], data: InteractionData) -> None:
    """Raise if a checkpoint's recorded data shape differs from the data it is being used with."""
    expected = (model_config.get("n_users"), model_config.get("n_items"))
    if expected != (data.n_users, data.n_items):
        raise ConfigError(
            f"the model was built for {expected[0]} users x {expected[1]} items but the data "
            f"{data.name!r} has {data.n_users} x {data.n_items}"
        )
