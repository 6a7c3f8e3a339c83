"""What a model may read about a batch of users: their chronological histories, with a visibility mask.

Every base model, baseline and evaluation protocol reads a user's past through a
:class:`HistoryBatch`, never through a user id: the environment hides the held-out part of a
history by clearing its ``visible`` positions, and an evaluation protocol decides which history
a split is predicted from (the training sequence, or training + validation for a sequential
test). A model that builds its input or its conditioning from the visible positions only
cannot see a held-out item, whatever it does with them.

:class:`SequenceTable` keeps a :class:`~refit_gym.data.interactions.UserSequences` as torch
tensors on one device and gathers the padded batch of a set of users with a few vectorised ops,
so histories never round-trip through numpy on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from refit_gym.data.interactions import UserSequences


@dataclass(frozen=True)
class HistoryBatch:
    """The padded chronological histories of ``B`` users (tensors on one device).

    Attributes:
        users: ``(B,)`` int64 user ids (for logs and per-user statistics; never a model input).
        items: ``(B, L)`` int64 item ids, oldest first, right-padded with :attr:`pad` (= ``n_items``).
        visible: ``(B, L)`` bool, the positions a model may read (False on padding and on
            held-out positions).
        n_items: the size of the item space.
    """

    users: torch.Tensor
    items: torch.Tensor
    visible: torch.Tensor
    n_items: int

    @property
    def pad(self) -> int:
        """The padding id (one past the last item)."""
        return self.n_items

    @property
    def batch_size(self) -> int:
        return int(self.items.shape[0])

    @property
    def device(self) -> torch.device:
        return self.items.device

    def to_device(self, device: torch.device | str) -> "HistoryBatch":
        """The same batch on ``device`` (itself when it is there already)."""
        device = torch.device(device)
        if self.items.device == device:
            return self
        return replace(self, users=self.users.to(device), items=self.items.to(device), visible=self.visible.to(device))

    def lengths(self) -> torch.Tensor:
        """``(B,)`` int64: the number of visible positions of each row."""
        return self.visible.sum(1)

    def select(self, rows: range | torch.Tensor) -> "HistoryBatch":
        """The batch of the given rows (a range: this process's shard of a data-parallel batch)."""
        index = slice(rows.start, rows.stop) if isinstance(rows, range) else rows
        return replace(self, users=self.users[index], items=self.items[index], visible=self.visible[index])

    def hide(self, positions: torch.Tensor) -> "HistoryBatch":
        """A copy with the ``(B, L)`` bool ``positions`` no longer visible."""
        return replace(self, visible=self.visible & ~positions)

    def _flat_index(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row * n_items + item, (row, position))`` of the selected positions (padding never selected)."""
        row, position = (positions & (self.items != self.pad)).nonzero(as_tuple=True)
        return row * self.n_items + self.items[row, position], (row, position)

    def item_mask(self, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, n_items)`` bool: the items at ``positions`` (default: the visible positions)."""
        flat, _ = self._flat_index(self.visible if positions is None else positions)
        out = torch.zeros(self.batch_size * self.n_items, dtype=torch.bool, device=self.device)
        return out.index_fill_(0, flat, True).view(self.batch_size, self.n_items)

    def rows(self, values: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, n_items)`` interaction rows of the visible positions: 1 per visible item, or the
        ``(B, L)`` per-position ``values`` (an item seen at several visible positions keeps the
        largest value, i.e. with increasing weights its most recent one); 0 elsewhere. A fresh,
        contiguous tensor."""
        flat, where = self._flat_index(self.visible)
        out = torch.zeros(self.batch_size * self.n_items, dtype=dtype, device=self.device)
        if values is None:
            out.index_fill_(0, flat, 1.0)
        else:
            out.scatter_reduce_(0, flat, values[where].to(dtype), reduce="amax", include_self=False)
        return out.view(self.batch_size, self.n_items)

    def visible_rank(self) -> torch.Tensor:
        """``(B, L)`` int64: each visible position's index among the row's visible positions
        (0 = oldest); -1 on the other positions."""
        rank = torch.cumsum(self.visible.to(torch.int64), 1) - 1
        return torch.where(self.visible, rank, torch.full_like(rank, -1))

    def recency_weights(self, w_min: float, w_max: float = 1.0) -> torch.Tensor:
        """``(B, L)`` float32: ``linspace(w_min, w_max, n)`` over each row's ``n`` visible positions in
        time order (T-DiffRec's weights; a single visible item gets ``w_min``, as ``numpy.linspace``);
        0 elsewhere."""
        rank = self.visible_rank().to(torch.float32)
        span = (self.lengths() - 1).clamp_min(1).to(torch.float32).unsqueeze(1)
        weights = w_min + (w_max - w_min) * rank / span
        return torch.where(self.visible, weights, torch.zeros_like(weights))

    def recent(self, max_len: int) -> torch.Tensor:
        """``(B, max_len)`` int64: the last ``max_len`` visible items, newest last, left-padded with :attr:`pad`."""
        rank = self.visible_rank()
        slot = max_len - self.lengths().unsqueeze(1) + rank  # right-aligned slot of each visible position
        keep = self.visible & (slot >= 0)
        out = torch.full((self.batch_size, max_len + 1), self.pad, dtype=torch.int64, device=self.device)
        out.scatter_(1, torch.where(keep, slot, max_len), torch.where(keep, self.items, self.pad))
        return out[:, :max_len]


class SequenceTable:
    """:class:`UserSequences` held as torch tensors on ``device``; gathers :class:`HistoryBatch` es.

    Args:
        sequences: each user's items, oldest first.
        n_items: the size of the item space (the padding id).
        device: where the tensors live.
    """

    def __init__(self, sequences: UserSequences, n_items: int, device: torch.device | str = "cpu") -> None:
        self.n_items = int(n_items)
        self.device = torch.device(device)
        self.indptr = torch.from_numpy(np.asarray(sequences.indptr, dtype=np.int64)).to(self.device)
        self.items = torch.from_numpy(np.asarray(sequences.items, dtype=np.int64)).to(self.device)

    @property
    def n_users(self) -> int:
        return int(self.indptr.shape[0]) - 1

    def lengths(self, users: torch.Tensor) -> torch.Tensor:
        users = users.to(self.device)
        return self.indptr[users + 1] - self.indptr[users]

    def batch(self, users: torch.Tensor | np.ndarray, max_len: Optional[int] = None) -> HistoryBatch:
        """The histories of ``users`` (every position visible); with ``max_len`` only the last
        ``max_len`` items of each."""
        if not isinstance(users, torch.Tensor):
            users = torch.from_numpy(np.asarray(users, dtype=np.int64))
        users = users.to(device=self.device, dtype=torch.int64).reshape(-1)
        ends = self.indptr[users + 1]
        lengths = ends - self.indptr[users]
        if max_len is not None:
            lengths = lengths.clamp_max(max_len)
        width = int(lengths.max()) if len(users) else 0
        position = torch.arange(width, device=self.device)
        visible = position.unsqueeze(0) < lengths.unsqueeze(1)
        index = (ends - lengths).unsqueeze(1) + position
        if self.items.numel():
            items = self.items[index.clamp_max(self.items.numel() - 1)]
        else:
            items = torch.zeros_like(index)
        items = torch.where(visible, items, torch.full_like(items, self.n_items))
        return HistoryBatch(users=users, items=items, visible=visible, n_items=self.n_items)


__all__ = ["HistoryBatch", "SequenceTable"]
