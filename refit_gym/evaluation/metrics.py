"""Full-ranking top-K metrics, vectorised in torch (no Python loop over users).

The definitions are DiffRec's (``evaluate_utils.computeTopNAccuracy``), for a user with ground
truth ``GT`` and a ranked list ``r_0, r_1, ...`` (excluded items already removed):

* ``precision@K = hits@K / K``
* ``recall@K = hits@K / |GT|``
* ``ndcg@K = DCG@K / IDCG@K`` with ``DCG@K = sum_{j<K, r_j in GT} 1 / log2(j + 2)`` and ``IDCG@K``
  the same sum over the first ``min(|GT|, K)`` positions;
* ``mrr@K = 1 / (j + 1)`` for the first hit ``j < K``, 0 without a hit.

The sequential leave-one-out protocol (``protocol="sequential"``) reports ``hr@K`` (1 if the
held-out item is in the top K) and ``ndcg@K`` -- the same formulas with ``|GT| = 1``.

A user with an empty ground truth scores 0 on every metric. Whether such a user counts in the
average is the accumulator's ``average_over`` option: ``"all"`` (DiffRec's convention: divide by
the number of all users) or ``"nonempty"`` (divide by the users with a non-empty ground truth).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.errors import ConfigError, DataError

PROTOCOLS = ("cf", "sequential")
AVERAGE_OVER = ("all", "nonempty")
_METRICS = {"cf": ("recall", "ndcg", "precision", "mrr"), "sequential": ("hr", "ndcg")}


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """``ks`` as a sorted tuple of distinct positive ints, or a :class:`ConfigError`."""
    try:
        values = tuple(ks)
    except TypeError:
        raise ConfigError(f"ks must be a sequence of positive ints, got {ks!r}") from None
    if not values or not all(is_positive_int(k) for k in values):
        raise ConfigError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return tuple(sorted({int(k) for k in values}))


def is_positive_int(value) -> bool:
    """``value`` is an int (not a bool) > 0."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def _check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        expected = ", ".join(map(repr, choices))
        raise ConfigError(f"unknown {what} {value!r}; expected one of {expected}")
    return value


def metric_names(ks: Iterable[int] = (10, 20, 50, 100), protocol: str = "cf") -> list[str]:
    """The keys :func:`ranking_metrics` returns, e.g. ``["recall@10", ..., "mrr@100"]``."""
    ks = check_ks(ks)
    _check_choice(protocol, PROTOCOLS, "metric protocol")
    return [f"{name}@{k}" for name in _METRICS[protocol] for k in ks]


def _binary_csr(matrix: sp.spmatrix, what: str) -> sp.csr_matrix:
    """``matrix`` as CSR with sorted indices and no explicit zeros (copied only when needed)."""
    if not sp.issparse(matrix):
        raise DataError(f"{what} must be a scipy sparse matrix, got {type(matrix).__name__}")
    csr = matrix if matrix.format == "csr" else sp.csr_matrix(matrix)
    if csr.nnz and not np.all(csr.data != 0):
        csr = csr.copy()
        csr.eliminate_zeros()
    if not csr.has_sorted_indices:
        csr = csr.sorted_indices()
    return csr


def _row_index(csr: sp.csr_matrix) -> np.ndarray:
    """The row of every stored entry of ``csr``, int64."""
    return np.repeat(np.arange(csr.shape[0], dtype=np.int64), np.diff(csr.indptr))


def check_scores(
    scores: torch.Tensor, n_users: Optional[int] = None, n_items: Optional[int] = None
) -> None:
    """Raise :class:`DataError` unless ``scores`` is a floating ``(n_users, n_items)`` tensor
    without NaN."""
    if not isinstance(scores, torch.Tensor):
        raise DataError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    expected = (
        "(" + ("B" if n_users is None else str(n_users)) + ", "
        + ("n_items" if n_items is None else str(n_items)) + ")"
    )
    if (
        scores.dim() != 2
        or (n_users is not None and scores.shape[0] != n_users)
        or (n_items is not None and scores.shape[1] != n_items)
    ):
        raise DataError(f"scores have shape {tuple(scores.shape)}; expected {expected}")
    if not scores.is_floating_point():
        raise DataError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if torch.isnan(scores).any():
        raise DataError("scores contain NaN; the ranking would be undefined")


def mask_(scores: torch.Tensor, exclude: sp.spmatrix) -> torch.Tensor:
    """Set ``scores[u, i] = -inf`` in place for every stored entry ``(u, i)`` of ``exclude``."""
    if tuple(exclude.shape) != tuple(scores.shape):
        raise DataError(
            f"the exclusion matrix has shape {tuple(exclude.shape)} but the scores have "
            f"{tuple(scores.shape)}; pass the rows of the scored users only"
        )
    csr = _binary_csr(exclude, "exclude")
    if csr.nnz:
        rows = torch.from_numpy(_row_index(csr)).to(scores.device)
        cols = torch.from_numpy(csr.indices.astype(np.int64, copy=False)).to(scores.device)
        minus_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
        scores.index_put_((rows, cols), minus_inf)
    return scores


def mask_and_rank(
    scores: torch.Tensor, exclude: sp.spmatrix, k: int, *, inplace: bool = False
) -> torch.Tensor:
    """The ``k`` best items per user (best first; equal scores: the lower item id first,
    :func:`top_k_lowest_id_first`) after excluding ``exclude``'s items.

    Args:
        scores: ``(B, n_items)`` floating scores, higher = better.
        exclude: sparse ``(B, n_items)``; the stored entries of row ``b`` are the items user ``b``
            must never be recommended (e.g. its training items).
        k: list length, ``1 <= k <= n_items``.
        inplace: write the ``-inf`` mask into ``scores`` instead of a copy (the evaluator's fast
            path; the caller's tensor is left untouched otherwise).

    Returns:
        ``LongTensor (B, k)`` on ``scores.device``. A position whose score is ``-inf`` -- which
        happens only when a user has fewer than ``k`` rankable items -- holds ``-1`` instead of
        an item id, so an excluded item is never returned.
    """
    check_scores(scores)
    n_items = scores.shape[1]
    if not is_positive_int(k) or k > n_items:
        raise ConfigError(f"k must be an int in [1, n_items={n_items}], got {k!r}")
    return _mask_and_topk(scores if inplace else scores.clone(), exclude, int(k))


def _mask_and_topk(scores: torch.Tensor, exclude: Optional[sp.spmatrix], k: int) -> torch.Tensor:
    """:func:`mask_and_rank` in place, without validating ``scores`` and ``k`` (``exclude=None``: no mask)."""
    if exclude is not None:
        mask_(scores, exclude)
    values, top = top_k_lowest_id_first(scores, k)
    return top.masked_fill_(values == float("-inf"), -1)


def top_k_lowest_id_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, item ids)`` of the ``k`` highest scores per row, best first; among equal scores
    the lower item id ranks first.

    ``torch.topk`` alone leaves the order of equal scores to its kernel, which differs with the
    row length and the device; this rule makes a ranking with ties (a popularity count, a
    constant or saturated model) the same everywhere, and it cannot favour a held-out item, which
    the ranking never sees. It ranks ``k + 1`` items with ``torch.topk``, sorts the ``k`` kept, and
    scans a whole row only where the ``k``-th and the next value are equal.

    Args:
        scores: ``(B, n_items)`` scores, higher = better, without NaN (-inf ranks last).
        k: list length, ``0 <= k <= n_items``.
    """
    n_items = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n_items:
        raise ConfigError(f"k must be an int in [0, n_items={n_items}], got {k!r}")
    k = int(k)
    # One item beyond the cut tells which rows have a tie across it: the rest need no full scan.
    depth = min(k + 1, n_items)
    values, top = torch.topk(scores, depth, dim=1, largest=True, sorted=True)
    if k == 0 or scores.shape[0] == 0:
        return values[:, :k], top[:, :k]
    cut_tied = values[:, k] == values[:, k - 1] if depth > k else None
    values, top = values[:, :k], top[:, :k]
    if bool((values[:, 1:] == values[:, :-1]).any()):
        # Within the list: equal values in increasing item id (a stable sort by value of the id-sorted list).
        top, by_id = torch.sort(top, dim=1)
        values = values.gather(1, by_id)
        values, by_value = torch.sort(values, dim=1, descending=True, stable=True)
        top = top.gather(1, by_value)
    if cut_tied is None:
        return values, top
    # At the cut: the items tied with the k-th value that made the list must be the lowest ids among
    # all the items of the row with that value (topk may have taken others).
    rows = torch.nonzero(cut_tied).flatten()
    if rows.numel():
        kth = values[rows, -1:]
        need = (values[rows] == kth).sum(dim=1)
        tied = scores[rows] == kth
        order = torch.cumsum(tied, dim=1)
        chosen = tied & (order <= need.unsqueeze(1))
        which, item = torch.nonzero(chosen, as_tuple=True)
        slot = k - need[which] + order[which, item] - 1
        top[rows[which], slot] = item
    return values, top


def ranking_metrics(
    top_items: torch.Tensor,
    ground_truth: sp.spmatrix,
    ks: Iterable[int] = (10, 20, 50, 100),
    *,
    protocol: str = "cf",
) -> dict[str, torch.Tensor]:
    """Per-user top-K metrics of ranked lists against a sparse ground truth.

    Args:
        top_items: ``LongTensor (B, K)``, best first, ``K >= max(ks)``; ``-1`` marks an empty slot
            (never a hit).
        ground_truth: sparse ``(B, n_items)``; row ``b``'s stored entries are user ``b``'s
            relevant items.
        ks: cut-offs.
        protocol: ``"cf"`` -> ``recall@K``, ``ndcg@K``, ``precision@K``, ``mrr@K``;
            ``"sequential"`` (leave-one-out, at most one ground-truth item per user) ->
            ``hr@K``, ``ndcg@K``.

    Returns:
        ``{name@K: Tensor (B,)}`` on ``top_items.device`` (float64; float32 on MPS). Users with an
        empty ground truth get 0 everywhere. Average with :class:`MetricAccumulator`.
    """
    ks = check_ks(ks)
    _check_choice(protocol, PROTOCOLS, "metric protocol")
    if not isinstance(top_items, torch.Tensor) or top_items.dim() != 2:
        raise DataError("top_items must be a 2-D LongTensor (B, K)")
    if top_items.dtype not in (torch.int64, torch.int32):
        raise DataError(f"top_items must hold integer item ids, got dtype {top_items.dtype}")
    n_rows, width = top_items.shape
    if ks[-1] > width:
        raise ConfigError(f"max(ks)={ks[-1]} exceeds the {width} ranked items per user")
    gt = _binary_csr(ground_truth, "ground_truth")
    if gt.shape[0] != n_rows:
        raise DataError(f"ground_truth has {gt.shape[0]} rows but top_items has {n_rows}")
    n_items = gt.shape[1]
    n_gt_np = np.diff(gt.indptr)
    if protocol == "sequential" and n_gt_np.size and n_gt_np.max() > 1:
        raise DataError(
            f"the sequential protocol expects at most one held-out item per user; a user has "
            f"{int(n_gt_np.max())}"
        )
    device = top_items.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    top = top_items[:, : ks[-1]].long()
    if top.numel() and int(top.max()) >= n_items:
        raise DataError(f"top_items holds item id {int(top.max())} >= n_items={n_items}")

    # A hit is a (user, item) key of the top lists found in the sorted keys of the ground truth.
    if gt.nnz:
        keys = torch.from_numpy(_row_index(gt) * n_items + gt.indices.astype(np.int64)).to(device)
        query = torch.arange(n_rows, device=device).unsqueeze(1) * n_items + top
        pos = torch.searchsorted(keys, query).clamp_(max=keys.numel() - 1)
        hits = (keys[pos] == query) & (top >= 0)
    else:
        hits = torch.zeros_like(top, dtype=torch.bool)

    max_k = ks[-1]
    discount = 1.0 / torch.log2(torch.arange(max_k, device=device, dtype=dtype) + 2.0)
    hits_f = hits.to(dtype)
    cum_hits = hits_f.cumsum(1)
    cum_dcg = (hits_f * discount).cumsum(1)
    ideal = discount.cumsum(0)
    n_gt = torch.from_numpy(n_gt_np.astype(np.int64)).to(device)
    has_gt = n_gt > 0
    any_hit = hits.any(1)
    first_hit = torch.where(any_hit, hits.to(torch.uint8).argmax(1), torch.full_like(n_gt, max_k))
    zero = torch.zeros((), dtype=dtype, device=device)

    out: dict[str, torch.Tensor] = {}
    per_k = {}
    for k in ks:
        h = cum_hits[:, k - 1]
        idcg = torch.where(has_gt, ideal[n_gt.clamp(1, k) - 1], torch.ones_like(h))
        per_k[k] = {
            "recall": torch.where(has_gt, h / n_gt.clamp(min=1).to(dtype), zero),
            "ndcg": cum_dcg[:, k - 1] / idcg,
            "precision": h / k,
            "mrr": torch.where(first_hit < k, 1.0 / (first_hit.to(dtype) + 1.0), zero),
            "hr": (h > 0).to(dtype),
        }
    for name in _METRICS[protocol]:
        for k in ks:
            out[f"{name}@{k}"] = per_k[k][name]
    return out


def sequential_metrics(
    top_items: torch.Tensor, ground_truth: sp.spmatrix, ks: Iterable[int] = (10, 20)
) -> dict[str, torch.Tensor]:
    """Leave-one-out ``hr@K`` / ``ndcg@K``: :func:`ranking_metrics`, ``protocol="sequential"``."""
    return ranking_metrics(top_items, ground_truth, ks, protocol="sequential")


class MetricAccumulator:
    """Sums per-user metric values over batches; :meth:`result` returns the averages.

    Args:
        average_over: ``"all"`` divides by every user added (DiffRec's convention: users with an
            empty ground truth count, with 0); ``"nonempty"`` divides by the users with a
            non-empty ground truth only. An average over no users is ``nan``.

    Sums are kept in float64 (float32 on MPS) and never rounded; round when printing.
    """

    def __init__(self, average_over: str = "all") -> None:
        self.average_over = _check_choice(average_over, AVERAGE_OVER, "average_over")
        self._sums: dict[str, torch.Tensor] = {}
        self.n_users = 0
        self.n_nonempty = 0

    def add(
        self,
        values: Mapping[str, torch.Tensor],
        ground_truth_sizes: Union[torch.Tensor, np.ndarray, Sequence[int]],
    ) -> None:
        """Add one batch: ``values`` from :func:`ranking_metrics`, ``|GT|`` of each of its users."""
        if isinstance(ground_truth_sizes, torch.Tensor):
            ground_truth_sizes = ground_truth_sizes.cpu()
        sizes = np.asarray(ground_truth_sizes).reshape(-1)
        if self._sums and set(values) != set(self._sums):
            raise DataError(
                f"metric keys changed between batches: {sorted(self._sums)} vs {sorted(values)}"
            )
        for key, value in values.items():
            if value.shape != (len(sizes),):
                raise DataError(
                    f"{key} has shape {tuple(value.shape)} for a batch of {len(sizes)} users"
                )
            total = value.sum()
            self._sums[key] = self._sums[key] + total if key in self._sums else total
        self.n_users += len(sizes)
        self.n_nonempty += int((sizes > 0).sum())

    def result(self) -> dict[str, float]:
        """``{name@K: average}`` as Python floats."""
        denominator = self.n_users if self.average_over == "all" else self.n_nonempty
        if denominator == 0:
            return {key: float("nan") for key in self._sums}
        return {key: float(total.item()) / denominator for key, total in self._sums.items()}
