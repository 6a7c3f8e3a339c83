"""CF-Diff (Hou, Park and Shin, SIGIR 2024): a cross-attention denoiser conditioned on multi-hop neighbourhoods.

The second worked example of the base-model interface: like DiffRec the state is the user's
interaction row and the chain starts from the visible row, but the denoiser is conditioned on
the user's higher-order neighbourhood, summarised as two item-space rows (``encode`` returns
them as the ``hops`` conditioning tensor, ``(B, 2 * n_items)`` = ``[2-hop | 3-hop]``):

* **2-hop** (the users reached through the user's items): for each visible item ``i``, its
  popularity ``deg(i) / n_users`` over the training matrix ``X``, 0 elsewhere -- the official
  preprocessing (``data_preprocessing_item_2nd_hop.py``: item popularity zeroed where the user's
  row is 0);
* **3-hop** (the items those users interacted with): ``c = Xᵀ w`` with ``w_v`` the number of
  visible items user ``v`` shares with the user (``w = X x_u``; **the user's own row is
  excluded**, ``w_u = 0``), scaled to ``[0, 1]`` by its row maximum. The official code loads this
  block precomputed (``multi_hop_inters_ML_1M.pt``, not public); this weighting and scaling are
  our reading, documented in ``docs/models.md``.

Both rows are computed from the **visible** history with sparse products over ``X`` (batched,
never a dense users x items x hops tensor). Held-out items cannot leak: the 2-hop row is zero
off the visible items, and the 3-hop row never reads the user's own training row.

Denoiser (``CAM_AE_multihops``, ``models/CAM_AE_multihops.py`` of the official code): a shared
``Linear(n_items -> 512)`` encodes ``x_t`` and each hop row; each of the ``512 + 10`` hidden
units (with the time embedding) becomes a ``d_model = 16`` token (``Linear(1 -> 16)``, one per
input); ``num_layers = 2`` cross-attention layers (query = the hop tokens, key / value = the
``x_t`` tokens, 4 heads, attention dropout 0.5) add ``0.15 * normalize(attention)`` (2-hop) or
``0.5 * normalize(attention)`` (3-hop) to the tokens, each followed by dropout and a shared
``Linear(16 -> 16)`` (tanh between layers); the two streams are mixed ``0.9 h + 0.1 h2`` and
decoded ``Linear(16 -> 1)``, tanh, ``Linear(522 -> n_items)``. As in the official code,
``normalize`` is ``F.normalize`` over the token axis and the same attention and feed-forward
layers serve both streams; its unused layers are left out.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from refit_gym.data.history import HistoryBatch
from refit_gym.data.interactions import TrainingInteractions
from refit_gym.diffusion.gaussian import GaussianDiffusion
from refit_gym.errors import ConfigError
from refit_gym.models.base import BaseModel, ChainInputs, ConditionSpec, ModelConfig
from refit_gym.models.time_embedding import timestep_embedding


@dataclass
class CFDiffConfig(ModelConfig):
    name: str = "cfdiff"
    n_hops: int = 3
    """Neighbourhood depth: 3 (2-hop and 3-hop streams, CF-Diff's ML-1M setting) or 2 (2-hop only)."""
    hidden: int = 512
    """Width of the shared item encoder (the number of tokens, before the time embedding)."""
    d_model: int = 16
    """Token width of the cross-attention."""
    num_heads: int = 4
    """Attention heads."""
    num_layers: int = 2
    """Cross-attention layers per stream."""
    time_emb_dim: int = 10
    """Size of the timestep embedding."""
    dropout: float = 0.5
    """Dropout on the encoded input and after each attention residual (training mode only)."""
    attention_dropout: float = 0.5
    """Dropout on the attention weights and outputs (training mode only)."""
    residual_2hop: float = 0.15
    """Scale of the 2-hop attention residual."""
    residual_3hop: float = 0.5
    """Scale of the 3-hop attention residual."""
    mix: float = 0.9
    """Weight of the 2-hop stream in the final mix (the 3-hop stream gets ``1 - mix``)."""
    norm: bool = False
    """L2-normalise the encoded input."""


class CAMDenoiser(nn.Module):
    """CF-Diff's cross-attention denoiser ``f(x_t, hops, t)`` (see the module docstring)."""

    def __init__(self, n_items: int, config: CFDiffConfig) -> None:
        super().__init__()
        if config.n_hops not in (2, 3):
            raise ConfigError(f"model.n_hops must be 2 or 3, got {config.n_hops}")
        if config.d_model % config.num_heads:
            raise ConfigError(f"model.d_model ({config.d_model}) must be divisible by model.num_heads ({config.num_heads})")
        self.n_items, self.config = n_items, config
        tokens = config.hidden + config.time_emb_dim
        self.emb_layer = nn.Linear(config.time_emb_dim, config.time_emb_dim)
        self.encoder = nn.Linear(n_items, config.hidden)
        self.first_hop_embedding = nn.Linear(1, config.d_model)
        self.second_hop_embedding = nn.Linear(1, config.d_model)
        self.third_hop_embedding = nn.Linear(1, config.d_model) if config.n_hops == 3 else None
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(config.d_model, config.num_heads, dropout=config.attention_dropout, batch_first=True)
            for _ in range(config.num_layers)
        )
        self.forward_layers = nn.ModuleList(nn.Linear(config.d_model, config.d_model) for _ in range(config.num_layers))
        self.first_hop_decoding = nn.Linear(config.d_model, 1)
        self.decoder = nn.Linear(tokens, n_items)
        self.drop = nn.Dropout(config.dropout)
        self.attention_drop = nn.Dropout(config.attention_dropout)
        self.residual_drop = nn.Dropout(config.dropout)

    def _tokens(self, hidden: torch.Tensor, time: torch.Tensor, lift: nn.Linear) -> torch.Tensor:
        """``(B, hidden + emb, d_model)``: each unit of ``[hidden, time]`` lifted to a token."""
        return lift(torch.cat([hidden, time], dim=-1).unsqueeze(-1))

    def _stream(self, h: torch.Tensor, query: torch.Tensor, scale: float) -> torch.Tensor:
        for i, (attention, feed_forward) in enumerate(zip(self.attentions, self.forward_layers)):
            update, _ = attention(query, h, h, need_weights=False)
            update = self.attention_drop(F.normalize(update, dim=1))
            h = feed_forward(self.residual_drop(h + scale * update))
            if i != len(self.attentions) - 1:
                h = torch.tanh(h)
        return h

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, hops: torch.Tensor) -> torch.Tensor:
        config = self.config
        time = self.emb_layer(timestep_embedding(t, config.time_emb_dim))
        x = self.encoder(x_t)
        if config.norm:
            x = F.normalize(x, dim=-1)
        h = self._tokens(self.drop(x), time, self.first_hop_embedding)
        second = self._tokens(self.encoder(hops[:, : self.n_items]), time, self.second_hop_embedding)
        out = self._stream(h, second, config.residual_2hop)
        if self.third_hop_embedding is not None:
            third = self._tokens(self.encoder(hops[:, self.n_items :]), time, self.third_hop_embedding)
            out = config.mix * out + (1.0 - config.mix) * self._stream(h, third, config.residual_3hop)
        return self.decoder(torch.tanh(self.first_hop_decoding(out).squeeze(-1)))


class _SparseMatrix(nn.Module):
    """A CSR matrix kept as three non-persistent buffers (moved by ``.to()``, copied by
    ``deepcopy``, never saved), multiplied with dense matrices as a torch sparse CSR tensor."""

    def __init__(self, matrix: sp.csr_matrix) -> None:
        super().__init__()
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        matrix.sort_indices()
        self.shape = matrix.shape
        self.register_buffer("indptr", torch.from_numpy(matrix.indptr.astype(np.int64)), persistent=False)
        self.register_buffer("indices", torch.from_numpy(matrix.indices.astype(np.int64)), persistent=False)
        self.register_buffer("values", torch.from_numpy(matrix.data), persistent=False)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """``matrix @ dense``."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            matrix = torch.sparse_csr_tensor(self.indptr, self.indices, self.values, size=self.shape,
                                             check_invariants=False)
        return torch.sparse.mm(matrix, dense)


class CFDiff(BaseModel):
    """CF-Diff: DiffRec's chain over the visible row, denoised by :class:`CAMDenoiser` with multi-hop conditioning."""

    name = "cfdiff"
    Config = CFDiffConfig
    protocol = "cf"

    def __init__(
        self, config: CFDiffConfig, diffusion: GaussianDiffusion, train: TrainingInteractions, noise_steps: int = 0
    ) -> None:
        super().__init__(config, diffusion, train, noise_steps)
        self.denoiser = CAMDenoiser(self.n_items, config)
        binary = sp.csr_matrix(train.train, dtype=np.float32, copy=True)
        binary.data[:] = 1.0
        popularity = np.asarray(binary.sum(axis=0), dtype=np.float32).reshape(-1) / max(1, self.n_users)
        # statistics of the training data: rebuilt from it, never saved in a checkpoint
        self.register_buffer("popularity", torch.from_numpy(popularity), persistent=False)
        self.interactions = _SparseMatrix(binary)  # X, users x items
        self.interactions_t = _SparseMatrix(binary.T.tocsr())  # X^T, items x users

    @property
    def state_dim(self) -> int:
        return self.n_items

    def hop_rows(self, rows: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """``(B, 2 n_items)`` ``[2-hop | 3-hop]`` rows of the visible rows ``rows`` (see the module docstring)."""
        second = rows * self.popularity
        if self.config.n_hops == 2:
            return torch.cat([second, torch.zeros_like(second)], dim=1)
        shared = self.interactions(rows.t().contiguous())  # (n_users, B): w_v of each row
        shared[users.to(shared.device), torch.arange(len(users), device=shared.device)] = 0.0  # not the user itself
        third = self.interactions_t(shared).t()
        third = third / third.amax(dim=1, keepdim=True).clamp_min(1e-12)
        return torch.cat([second, third], dim=1)

    def encode(self, history: HistoryBatch) -> ChainInputs:
        rows = history.rows()
        return ChainInputs(start=rows, condition={"hops": self.hop_rows(rows, history.users)})

    def condition_spec(self) -> dict[str, ConditionSpec]:
        return {"hops": ConditionSpec((2 * self.n_items,), torch.float32, 0.0, 1.0)}

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, hops: torch.Tensor) -> torch.Tensor:
        return self.denoiser(x_t, t, hops)

    def item_scores(self, x0: torch.Tensor) -> torch.Tensor:
        return x0
