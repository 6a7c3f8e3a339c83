"""Ranking rewards of the held-out items: Recall@K and NDCG@K (the "naive" comparison).

The final scores rank every item not given in the input (items with ``visible > 0`` are
masked); the held-out items ``H`` are the ground truth. The definitions are those of
:mod:`refit_gym.evaluation.metrics` (DiffRec's):

* ``recall@K = hits@K / |H|``;
* ``ndcg@K = DCG@K / IDCG@K``, ``DCG@K = sum_{j < K, r_j in H} 1 / log2(j + 2)`` and ``IDCG@K``
  the same sum over the first ``min(|H|, K)`` positions.

A user with no held-out item gets 0. Equal scores rank the lower item id first, as in the
evaluation (:func:`~refit_gym.evaluation.metrics.top_k_lowest_id_first`). The
episode batch holds ``H`` as a dense ``(B, n_items)`` mask on the scores' device, so the hits
are read off it with a gather instead of converting it to the CSR ground truth
:func:`~refit_gym.evaluation.metrics.ranking_metrics` takes (which would round-trip through
numpy); the tests check both agree. Not differentiable: values are returned detached.
"""

from __future__ import annotations

import torch

from refit_gym.evaluation.metrics import top_k_lowest_id_first
from refit_gym.rewards._checks import check_batch, check_int_in_range
from refit_gym.rewards.base import EpisodeBatch, RewardTerm, TrainingInteractions
from refit_gym.rewards.functional import scored_items, visible_mask


def held_out_hits(scores: torch.Tensor, visible: torch.Tensor, held_out: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``(B, k)``: whether the item at each of the top ``k`` ranks (input items masked) is held out.

    Args:
        scores: ``(B, n_items)`` item scores.
        visible: ``(B, n_items)`` input items (never ranked).
        held_out: ``(B, n_items)`` bool ground truth.
        k: list length, ``1 <= k <= n_items``.
    """
    masked = scores.detach().masked_fill(visible_mask(visible), float("-inf"))
    values, top = top_k_lowest_id_first(masked, k)
    return scored_items(held_out, visible).gather(1, top) & torch.isfinite(values)


def _discounts(k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(k, dtype=dtype, device=device) + 2.0)


class _HeldOutRanking(RewardTerm):
    """Shared parameter checks, binding and hit computation of the ranking rewards."""

    differentiable = False
    metric = ""

    def __init__(self, k: int = 20) -> None:
        self.k = check_int_in_range(k, f"{self.metric} cut-off k", 1)
        self.name = f"{self.metric}@{self.k}"
        self.n_items: int | None = None

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "_HeldOutRanking":
        """Check ``k <= n_items``; returns self.

        Raises:
            ConfigError: ``k > n_items``.
        """
        check_int_in_range(self.k, f"{self.metric} cut-off k", 1, interactions.n_items)
        self.n_items = interactions.n_items
        return self

    def _hits(self, scores: torch.Tensor, episode: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        check_batch(scores, episode, self.n_items)
        check_int_in_range(self.k, f"{self.metric} cut-off k", 1, scores.shape[1])
        hits = held_out_hits(scores, episode.visible, episode.held_out, self.k)
        n_held_out = scored_items(episode.held_out, episode.visible).sum(1)
        return hits, n_held_out

    def config(self) -> dict:
        return {"term": type(self).__name__, "k": self.k}


class HeldOutRecall(_HeldOutRanking):
    """Recall@K of the held-out items: ``hits@K / |H|`` (0 when ``H`` is empty).

    Args:
        k: cut-off, ``1 <= k <= n_items`` (the upper bound is checked at bind).

    Raises:
        ConfigError: ``k`` out of range.
    """

    metric = "recall"

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` Recall@K, detached, in the scores' floating dtype."""
        hits, n_held_out = self._hits(scores, episode)
        dtype = scores.dtype
        return hits.sum(1).to(dtype) / n_held_out.clamp(min=1).to(dtype)


class HeldOutNDCG(_HeldOutRanking):
    """NDCG@K of the held-out items (0 when ``H`` is empty).

    Args:
        k: cut-off, ``1 <= k <= n_items`` (the upper bound is checked at bind).

    Raises:
        ConfigError: ``k`` out of range.
    """

    metric = "ndcg"

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` NDCG@K, detached, in the scores' floating dtype."""
        hits, n_held_out = self._hits(scores, episode)
        discount = _discounts(self.k, scores.dtype, scores.device)
        dcg = (hits.to(scores.dtype) * discount).sum(1)
        ideal = torch.cat([torch.zeros(1, dtype=scores.dtype, device=scores.device), discount.cumsum(0)])
        idcg = ideal[n_held_out.clamp(max=self.k)]
        return torch.where(n_held_out > 0, dcg / idcg.clamp(min=1e-12), torch.zeros_like(dcg))
