"""SASRec's self-attention encoder of item sequences, shared by the sequential models and the SASRec baseline.

Kang and McAuley (ICDM 2018): item embeddings plus learned position embeddings, ``n_blocks``
Transformer blocks with causal self-attention, so position ``j``'s output summarises the items
at positions ``<= j``. One forward pass therefore encodes every prefix of a window at once --
the basis of training on all next-item targets of a sequence in one pass (SASRec's own
training, and the CPU settings of DreamRec in ``refit_gym/models/dreamrec.py``).

Conventions: sequences are **left-padded** to ``max_len`` with the padding id ``n_items`` (the
item ids are ``0..n_items - 1``; :meth:`refit_gym.data.history.HistoryBatch.recent` gives this
layout), newest item last. The blocks are pre-LayerNorm (``norm_first``) with a ``4 x hidden``
GELU feed-forward and a final LayerNorm (the layout of modern SASRec re-implementations; the
original uses a ``hidden``-wide ReLU feed-forward). A padding position attends only to itself
(no row of the attention is empty) and its output is zeroed.

Options for the sequential diffusion models: ``causal=False`` lets every position attend to the
whole window (DiffuRec's and DreamRec's own encoders, which only read the last position);
``positions=False`` drops the position embeddings (DiffuRec has none); ``embedding_scale`` multiplies the
item embeddings (SASRec's ``sqrt(hidden)`` by default); ``input_norm`` LayerNorms the embedded input
(DiffuRec). :meth:`CausalSequenceEncoder.encode_embedded` runs the blocks on an input the caller
has embedded and modified (DiffuRec adds the noised target to it).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from refit_gym.errors import ConfigError


class CausalSequenceEncoder(nn.Module):
    """``(B, L)`` left-padded item ids -> ``(B, L, hidden)`` causal encodings (see the module docstring).

    Args:
        n_items: item ids are ``0..n_items - 1``; ``n_items`` is the padding id.
        hidden: embedding and model width.
        n_blocks: Transformer blocks.
        n_heads: attention heads (must divide ``hidden``).
        max_len: the longest window (the number of position embeddings).
        dropout: dropout inside the blocks.
        embedding_dropout: dropout on the summed item and position embeddings.
        item_embedding: an ``(n_items + 1, hidden)`` embedding to share (e.g. with a scoring
            head); it stays registered with the caller only (one copy in a checkpoint); default:
            a fresh one of this encoder's, ``N(0, 1/hidden)`` initialised, padding row zero.
        causal: position ``j`` attends to positions ``<= j`` only (else to the whole window).
        positions: add learned position embeddings (right-aligned: the newest item is always
            position ``max_len - 1``).
        embedding_scale: multiplier of the item embeddings (default ``sqrt(hidden)``).
        input_norm: LayerNorm the embedded input before the blocks.
    """

    def __init__(
        self,
        n_items: int,
        hidden: int,
        n_blocks: int,
        n_heads: int,
        max_len: int,
        dropout: float = 0.1,
        embedding_dropout: float = 0.1,
        item_embedding: Optional[nn.Embedding] = None,
        causal: bool = True,
        positions: bool = True,
        embedding_scale: Optional[float] = None,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("hidden", hidden), ("n_heads", n_heads), ("max_len", max_len)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(n_blocks, int) or n_blocks < 0:
            raise ConfigError(f"n_blocks must be a non-negative integer, got {n_blocks!r}")
        if hidden % n_heads:
            raise ConfigError(f"hidden ({hidden}) must be divisible by n_heads ({n_heads})")
        for name, value in (("dropout", dropout), ("embedding_dropout", embedding_dropout)):
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        self.n_items, self.hidden, self.n_heads, self.max_len = int(n_items), hidden, n_heads, max_len
        own_embedding = item_embedding is None
        if own_embedding:
            item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=n_items)
            nn.init.normal_(item_embedding.weight, std=hidden**-0.5)
            with torch.no_grad():
                item_embedding.weight[n_items].zero_()
        elif tuple(item_embedding.weight.shape) != (n_items + 1, hidden):
            raise ConfigError(
                f"item_embedding must be ({n_items + 1}, {hidden}), got {tuple(item_embedding.weight.shape)}"
            )
        if own_embedding:
            self.own_embedding = item_embedding
        else:  # the caller's module, registered (and saved) there once, not here a second time
            self._shared_embedding = (item_embedding,)
        self.causal = bool(causal)
        self.embedding_scale = hidden**0.5 if embedding_scale is None else float(embedding_scale)
        self.position_embedding = nn.Embedding(max_len, hidden) if positions else None
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=hidden**-0.5)
        self.input_norm = nn.LayerNorm(hidden) if input_norm else None
        self.embedding_dropout = nn.Dropout(embedding_dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, n_heads, 4 * hidden, dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(n_blocks)
        )
        self.final_norm = nn.LayerNorm(hidden)

    @property
    def item_embedding(self) -> nn.Embedding:
        """The item embedding (this encoder's own, or the caller's shared one)."""
        shared = self.__dict__.get("_shared_embedding")
        return shared[0] if shared is not None else self.own_embedding

    def attention_mask(self, items: torch.Tensor) -> torch.Tensor:
        """``(B * n_heads, L, L)`` bool, True = may **not** attend: padding keys and, when causal,
        later positions (a padding query attends to itself only)."""
        length = items.shape[1]
        padding = items == self.n_items  # (B, L)
        blocked = padding.unsqueeze(1).expand(-1, length, -1)
        if self.causal:
            blocked = blocked | torch.ones(length, length, dtype=torch.bool, device=items.device).triu(1)
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=items.device).unsqueeze(0)
        return blocked.repeat_interleave(self.n_heads, dim=0)

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        """``(B, L, hidden)``: scaled item embeddings plus position embeddings (before dropout)."""
        if items.dim() != 2:
            raise ConfigError(f"items must be (batch, length), got shape {tuple(items.shape)}")
        length = items.shape[1]
        if length > self.max_len:
            raise ConfigError(f"a window of {length} items is longer than max_len = {self.max_len}")
        h = self.item_embedding(items) * self.embedding_scale
        if self.position_embedding is not None:
            h = h + self.position_embedding(torch.arange(self.max_len - length, self.max_len, device=items.device))
        return h

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.encode_embedded(self.embed(items), items)

    def encode_embedded(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The blocks over an embedded input ``h`` ``(B, L, hidden)`` of the window ``items``."""
        h = self.embedding_dropout(h)
        if self.input_norm is not None:
            h = self.input_norm(h)
        mask = self.attention_mask(items)
        for block in self.blocks:
            h = block(h, src_mask=mask)
        h = self.final_norm(h)
        return h.masked_fill((items == self.n_items).unsqueeze(-1), 0.0)

    def last(self, items: torch.Tensor) -> torch.Tensor:
        """``(B, hidden)``: the encoding of the newest (last) position of each window."""
        return self.forward(items)[:, -1]


def trim_padding(items: torch.Tensor, pad: int) -> torch.Tensor:
    """``items`` without its leading columns that are padding in every row (left-padded windows
    lose nothing: padding keys are masked and positions are right-aligned)."""
    real = (items != pad).any(0)
    if bool(real[0]) or not bool(real.any()):
        return items
    return items[:, int(real.to(torch.int64).argmax()):]


def next_item_windows(items: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item targets of left-padded windows ``(B, L + 1)``: ``(items[:, :-1], items[:, 1:])``,
    the targets of padding inputs set to ``pad`` (ignored by the losses)."""
    inputs, targets = items[:, :-1], items[:, 1:]
    return inputs, targets.masked_fill(inputs == pad, pad)
