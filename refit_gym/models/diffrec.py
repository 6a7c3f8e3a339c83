"""DiffRec (Wang et al., SIGIR 2023): an MLP denoiser over the user's noisy interaction row.

The model (:class:`DiffRec`) is the worked example of the base-model interface: the state is the
interaction row (``state_dim = n_items``), the chain starts from the visible history row itself
(``encode``), there is no conditioning, and the clean row *is* the item scores.

Denoiser architecture (Wang et al., SIGIR 2023): input dropout on ``x_t`` (0.5), optional L2
normalisation, concatenation with ``Linear(sinusoidal(t))``, then ``n_items + emb -> dims[-1] ->
... -> dims[0] -> ... -> n_items`` with tanh after every layer but the last. With
``dims=[200, 600]`` on ML-1M that is ``2820 -> 600 -> 200 -> 600 -> 2810``. Parameter names
follow DiffRec's (``emb_layer``, ``in_layers``, ``out_layers``).

The first layer's product is split into the item part and the time part
(``W_x x + (W_e e(t) + b)``) instead of materialising the concatenation: the same maths, one
``(B, n_items)`` copy less per step of a 40-step chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from refit_gym.data.history import HistoryBatch
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.models.base import BaseModel, ChainInputs, ModelConfig
from refit_gym.models.time_embedding import timestep_embedding


class DiffRecMLP(nn.Module):
    """Predicts ``x0`` (or ``eps``) from ``(x_t, t)``.

    Args:
        n_items: size of the interaction vector.
        dims: hidden sizes of the decoder half, e.g. ``[200, 600]`` (the encoder mirrors them).
        time_emb_dim: size of the time embedding (DiffRec: 10).
        dropout: dropout on the input vector (DiffRec: 0.5; active in ``train()`` mode only).
        norm: L2-normalise the input vector first (DiffRec: off).
    """

    def __init__(
        self,
        n_items: int,
        dims: Sequence[int] = (200, 600),
        time_emb_dim: int = 10,
        dropout: float = 0.5,
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.n_items, self.time_emb_dim, self.norm = n_items, time_emb_dim, norm
        out_dims = list(dims) + [n_items]
        in_dims = out_dims[::-1]
        in_dims_with_time = [in_dims[0] + time_emb_dim] + in_dims[1:]
        self.emb_layer = nn.Linear(time_emb_dim, time_emb_dim)
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(in_dims_with_time[:-1], in_dims_with_time[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(out_dims[:-1], out_dims[1:]))
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiffRec's init: weights ``N(0, sqrt(2 / (fan_in + fan_out)))``, biases ``N(0, 0.001)``."""
        for layer in [self.emb_layer, *self.in_layers, *self.out_layers]:
            fan_out, fan_in = layer.weight.shape
            nn.init.normal_(layer.weight, 0.0, (2.0 / (fan_in + fan_out)) ** 0.5)
            nn.init.normal_(layer.bias, 0.0, 0.001)

    def time_bias(self, t: torch.Tensor) -> torch.Tensor:
        """The time part of the first layer, ``W_e emb(t) + b``: ``(n_hidden,)`` when every row has
        the same step (a reverse chain), else ``(B, n_hidden)``. Embeddings are computed once per
        distinct step, not once per row."""
        first = self.in_layers[0]
        steps, inverse = torch.unique(t, return_inverse=True)
        time = self.emb_layer(timestep_embedding(steps, self.time_emb_dim))
        bias = F.linear(time, first.weight[:, self.n_items :], first.bias)
        return bias[0] if len(steps) == 1 else bias[inverse]

    def hidden(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Every layer but the last (the representation the output layer reads)."""
        if self.norm:
            x_t = F.normalize(x_t, dim=-1)
        x_t = self.drop(x_t)
        weight = self.in_layers[0].weight[:, : self.n_items]
        h = torch.tanh_(torch.addmm(self.time_bias(t), x_t, weight.t()))
        for layer in self.in_layers[1:]:
            h = torch.tanh_(layer(h))
        for layer in self.out_layers[:-1]:
            h = torch.tanh_(layer(h))
        return h

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out_layers[-1](self.hidden(x_t, t))

    @torch.no_grad()
    def posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor, coef1: float, coef2: float) -> torch.Tensor:
        """``coef1 * f(x_t, t) + coef2 * x_t`` with the output layer fused into one matrix product.

        The reverse chain's deterministic step for x0-prediction (see
        :meth:`~refit_gym.diffusion.GaussianDiffusion.sample`): ``c1 (h W^T + b) + c2 x_t`` is
        computed as ``M = c2 x_t + c1 b`` followed by ``M += c1 h W^T`` in place, one pass over
        the ``(B, n_items)`` batch fewer than the unfused step and no bias broadcast copy.
        """
        out = self.out_layers[-1]
        start = torch.add(out.bias * coef1, x_t, alpha=coef2)
        hidden = self.hidden(x_t, t)
        if hidden.dtype != start.dtype:  # under bf16 autocast: an out-of-place product (autocast casts it)
            return torch.addmm(start, hidden, out.weight.t(), alpha=coef1).float()
        return start.addmm_(hidden, out.weight.t(), alpha=coef1)


@dataclass
class DiffRecConfig(ModelConfig):
    name: str = "diffrec"
    dims: list[int] = field(default_factory=lambda: [200, 600])
    """Hidden sizes of the denoiser's decoder half (DiffRec ML-1M: [200, 600])."""
    time_emb_dim: int = 10
    """Size of the timestep embedding."""
    dropout: float = 0.5
    """Dropout on the denoiser's input vector (training mode only)."""
    norm: bool = False
    """L2-normalise the input vector."""


class DiffRec(BaseModel):
    """DiffRec: the chain starts from the user's visible (binary) history row and denoises it.

    ``encode``: start = the visible row, no conditioning. ``item_scores``: the row itself.
    """

    name = "diffrec"
    Config = DiffRecConfig
    protocol = "cf"

    def __init__(
        self, config: DiffRecConfig, diffusion: GaussianDiffusion, train: TrainingInteractions, noise_steps: int = 0
    ) -> None:
        super().__init__(config, diffusion, train, noise_steps)
        self.denoiser = DiffRecMLP(
            n_items=self.n_items, dims=config.dims, time_emb_dim=config.time_emb_dim, dropout=config.dropout,
            norm=config.norm,
        )

    @property
    def state_dim(self) -> int:
        return self.n_items

    def input_row(self, history: HistoryBatch) -> torch.Tensor:
        """The ``(B, n_items)`` row the chain starts from: 1 on each visible item."""
        return history.rows()

    def encode(self, history: HistoryBatch) -> ChainInputs:
        return ChainInputs(start=self.input_row(history), condition={})

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, t)

    def item_scores(self, x0: torch.Tensor) -> torch.Tensor:
        return x0

    def fused_posterior_mean(self, x_t: torch.Tensor, t: torch.Tensor, coef1: float, coef2: float) -> torch.Tensor:
        return self.denoiser.posterior_mean(x_t, t, coef1, coef2)

