"""Item popularity: every user gets the items ranked by their number of training interactions."""

from __future__ import annotations

from typing import ClassVar, Optional

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.history import HistoryBatch
from refit_gym.errors import DataError, NotFittedError


class PopularityRecommender:
    """Scores item ``i`` with its training count, the same for every user.

    Implements :class:`refit_gym.evaluation.Recommender`; call :meth:`fit` first.
    """

    name = "popularity"
    fit_on: ClassVar[str] = "train"
    """What ``fit`` takes: the training matrix (:func:`refit_gym.baselines.fit_baseline`)."""

    def __init__(self) -> None:
        self.item_counts: Optional[torch.Tensor] = None  # float32 (n_items,)

    def fit(self, train: sp.spmatrix) -> "PopularityRecommender":
        """Count each item's training interactions (``train``: users x items, binary)."""
        if not sp.issparse(train) or train.ndim != 2:
            raise DataError(f"train must be a 2-D scipy sparse matrix, got {type(train).__name__}")
        counts = np.asarray((train != 0).sum(axis=0), dtype=np.float32).reshape(-1)
        self.item_counts = torch.from_numpy(counts)
        return self

    @property
    def n_items(self) -> int:
        return int(self._fitted().shape[0])

    def _fitted(self) -> torch.Tensor:
        if self.item_counts is None:
            raise NotFittedError("PopularityRecommender is not fitted; call fit(train) first")
        return self.item_counts

    def score(self, history: HistoryBatch) -> torch.Tensor:
        """``(B, n_items)`` float32: the item counts repeated per user (a fresh tensor)."""
        counts = self._fitted()
        return counts.unsqueeze(0).repeat(history.batch_size, 1)
