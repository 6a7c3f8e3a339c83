"""DiffuRec (Li, Sun and Li, TOIS 2023; code WHUIR/DiffuRec): a Transformer approximator over the history.

The diffused state is the next item's embedding (``refit_gym/models/sequential.py``). The
approximator predicts ``x0`` (as DiffuRec's ``Diffu_xstart``):

1. ``x_t`` gets a time embedding (``sinusoid(t * 1000 / T, hidden)`` through ``Linear(hidden,
   4 hidden) - SiLU - Linear(4 hidden, hidden)``, the rescaled timesteps of the official code);
2. it is added to **every** position of the history's item representations (item embedding,
   embedding dropout, LayerNorm; no position embeddings), scaled by ``lambda``, drawn per element
   from ``N(lambda_uncertainty, lambda_uncertainty)`` during training and equal to its mean in
   evaluation mode (the official code draws it at inference too; a deterministic chain needs a
   fixed value);
3. ``n_blocks`` pre-LayerNorm Transformer blocks (``n_heads`` heads, GELU ``4 x hidden``
   feed-forward), a final LayerNorm; the last position's output is ``x0``.

Loss: cross-entropy of the target item under ``softmax(x0 E^T)`` over all items (the official
``loss_diffu_ce``), timesteps uniform. Item scores: ``x0 E^T``.

Settings (``training``, see ``sequential.py``):

* ``every_prefix`` (**faithful**): one example per prefix, bidirectional attention over the
  window, the same ``x_t`` at every position -- the published model;
* ``causal_pass`` (**CPU**): all positions of a user's window in one pass with **causal**
  attention; position ``j`` carries ``lambda x_t^(j)``, the noised embedding of *its own* target
  (item ``j + 1``, a fresh ``t`` per position). The difference from the published model: a
  position attends to its prefix only, and during training the earlier positions carry the
  noised embeddings of their own next items (items already in the prefix the last position
  reads) instead of the last target's; at inference every position carries the same ``x_t``,
  as in the published model. With the published ``lambda_uncertainty = 0.001`` the injected
  vector is about a thousandth of an item representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.errors import ConfigError
from refit_gym.models.sequence_encoder import CausalSequenceEncoder, trim_padding
from refit_gym.models.sequential import SequentialConfig, SequentialDiffusion
from refit_gym.models.time_embedding import timestep_embedding


@dataclass
class DiffuRecConfig(SequentialConfig):
    name: str = "diffurec"
    hidden: int = 128
    """Item embedding width (DiffuRec: 128)."""
    n_blocks: int = 4
    """Transformer blocks (DiffuRec: 4)."""
    n_heads: int = 4
    """Attention heads (DiffuRec: 4)."""
    max_len: int = 50
    """History window (DiffuRec: 50)."""
    dropout: float = 0.1
    """Dropout in the blocks and on their output (DiffuRec: 0.1)."""
    embedding_dropout: float = 0.3
    """Dropout on the item embeddings of the history (DiffuRec: 0.3)."""
    lambda_uncertainty: float = 0.001
    """Mean and std of the per-element weight of ``x_t`` added to the history (DiffuRec: 0.001)."""


class DiffuRecApproximator(nn.Module):
    """DiffuRec's ``x0`` approximator ``f(x_t, t, items)`` (see the module docstring)."""

    def __init__(self, item_embedding: nn.Embedding, n_items: int, steps: int, config: DiffuRecConfig) -> None:
        super().__init__()
        if config.lambda_uncertainty < 0:
            raise ConfigError(f"model.lambda_uncertainty must be >= 0, got {config.lambda_uncertainty}")
        self.hidden, self.steps, self.lam = config.hidden, steps, float(config.lambda_uncertainty)
        self.time_embed = nn.Sequential(nn.Linear(config.hidden, 4 * config.hidden), nn.SiLU(),
                                        nn.Linear(4 * config.hidden, config.hidden))
        self.encoder = CausalSequenceEncoder(
            n_items, config.hidden, config.n_blocks, config.n_heads, config.max_len, config.dropout,
            config.embedding_dropout, item_embedding=item_embedding, causal=config.training == "causal_pass",
            positions=False, embedding_scale=1.0, input_norm=True,
        )
        self.output_dropout = nn.Dropout(config.dropout)

    def injected(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``lambda (x_t + time embedding)``, the vector added to the history, same shape as ``x_t``."""
        time = self.time_embed(timestep_embedding(t.reshape(-1) * (1000.0 / self.steps), self.hidden))
        x = x_t + time.view_as(x_t)
        if self.training:
            lam = torch.normal(torch.full_like(x, self.lam), torch.full_like(x, self.lam))
        else:
            lam = self.lam
        return lam * x

    def forward_all(self, items: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``(B, L, hidden)`` ``x0`` predictions of every position, ``x_t`` / ``t`` per position ``(B, L, hidden)`` / ``(B, L)``."""
        embedded = self.encoder.item_embedding(items)
        h = self.encoder.embedding_dropout(embedded)
        h = self.encoder.input_norm(h) + self.injected(x_t, t)
        mask = self.encoder.attention_mask(items)
        for block in self.encoder.blocks:
            h = block(h, src_mask=mask)
        return self.encoder.final_norm(self.output_dropout(h))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``(B, hidden)``: ``x0`` from the last position, ``x_t`` added to every position."""
        items = trim_padding(items, self.encoder.n_items)
        length = items.shape[1]
        x_all = x_t.unsqueeze(1).expand(-1, length, -1)
        t_all = t.reshape(-1, 1).expand(-1, length)
        return self.forward_all(items, x_all, t_all)[:, -1]


class DiffuRec(SequentialDiffusion):
    """DiffuRec on the base-model interface (see the module docstring)."""

    name = "diffurec"
    Config = DiffuRecConfig

    def __init__(
        self, config: DiffuRecConfig, diffusion: GaussianDiffusion, train: TrainingInteractions, noise_steps: int = 0
    ) -> None:
        super().__init__(config, diffusion, train, noise_steps)
        self.approximator = DiffuRecApproximator(self.item_embedding, self.n_items, diffusion.steps, config)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.approximator(x_t, t, items)

    def next_item_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        if self.config.training == "every_prefix":  # the last position's target, x_t shared by all positions
            t = self.sample_timesteps((len(inputs),), generator)
            _, x_t = self.noised_targets(targets[:, -1:], t.unsqueeze(1), generator)
            x0 = self.approximator(x_t[:, 0], t, inputs)
            logits = self.item_scores(x0)
            losses = torch.zeros(targets.shape, device=self.device)
            losses[:, -1] = F.cross_entropy(logits, targets[:, -1].clamp_max(self.n_items - 1), reduction="none")
            return losses
        t = self.sample_timesteps(tuple(targets.shape), generator)
        _, x_t = self.noised_targets(targets, t, generator)
        x0 = self.approximator.forward_all(inputs, x_t, t)
        real = targets != self.pad  # the item logits of real targets only: (targets, n_items) floats
        losses = torch.zeros(targets.shape, device=self.device)
        losses[real] = F.cross_entropy(self.item_scores(x0[real]), targets[real], reduction="none")
        return losses

