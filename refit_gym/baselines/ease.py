"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

Closed form: with ``X`` the binary users x items training matrix and
``P = (XᵀX + λI)⁻¹``, the item-item weights are ``B = I - P · diag(1 / diag(P))`` (so
``diag(B) = 0``), and user ``u``'s scores are ``X_u B``. ``B`` is computed in float64 and
stored in float32. It is a dense ``n_items x n_items`` matrix: the fit needs about
``3 · 8 · n_items²`` bytes at its peak (~10 GB for 20,000 items), hence ``max_items``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Optional, Union

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch

from refit_gym.data.history import HistoryBatch
from refit_gym.data.interactions import InteractionData
from refit_gym.errors import NotFittedError
from refit_gym.errors import ConfigError, DataError
from refit_gym.evaluation.metrics import is_positive_int, metric_names

DEFAULT_MAX_ITEMS = 20_000
DEFAULT_L2_GRID = (50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0)


def _check_l2(l2: float) -> float:
    if isinstance(l2, bool) or not isinstance(l2, (int, float, np.number)) or not (
        math.isfinite(l2) and l2 > 0
    ):
        raise ConfigError(f"EASE l2 must be a finite number > 0, got {l2!r}")
    return float(l2)


def _check_train(train: sp.spmatrix, max_items: int) -> sp.csr_matrix:
    if not sp.issparse(train) or train.ndim != 2:
        raise DataError(f"train must be a 2-D scipy sparse matrix, got {type(train).__name__}")
    n_items = train.shape[1]
    if n_items > max_items:
        gigabytes = 3 * 8 * n_items**2 / 1e9
        raise ConfigError(
            f"EASE needs dense {n_items} x {n_items} item-item matrices (~{gigabytes:.1f} GB at "
            f"its peak); the limit is max_items={max_items}. Pass a larger max_items if the "
            f"machine has the memory."
        )
    binary = sp.csr_matrix(train, dtype=np.float64, copy=True)
    binary.eliminate_zeros()
    binary.data[:] = 1.0
    return binary


def gram_matrix(train: sp.csr_matrix) -> np.ndarray:
    """``XᵀX`` of the binarised training matrix, dense float64 ``(n_items, n_items)``."""
    return np.asarray((train.T @ train).toarray(), dtype=np.float64)


def ease_weights(gram: np.ndarray, l2: float) -> np.ndarray:
    """``B = I - P diag(1/diag(P))``, ``P = (gram + l2 I)⁻¹``, ``diag(B) = 0``; float32."""
    l2 = _check_l2(l2)
    regularised = gram.copy()
    regularised[np.diag_indices_from(regularised)] += l2
    # gram + l2 I is symmetric positive definite: invert through its Cholesky factor.
    factor = scipy.linalg.cho_factor(regularised, overwrite_a=True, check_finite=False)
    precision = scipy.linalg.cho_solve(
        factor, np.eye(gram.shape[0]), overwrite_b=True, check_finite=False
    )
    del factor, regularised
    weights = precision / (-np.diag(precision))  # column j divided by -P_jj
    np.fill_diagonal(weights, 0.0)
    return weights.astype(np.float32)


class EASERecommender:
    """EASE item-item model; implements :class:`refit_gym.evaluation.Recommender`.

    Args:
        l2: the ridge penalty λ (> 0). Tune it on validation with :func:`tune_ease`.
        max_items: refuse (``ConfigError``) to fit more items than this (dense ``n_items²``
            matrices; see the module docstring).
        device: where the weights live and the scores are computed.
    """

    name = "ease"
    fit_on: ClassVar[str] = "train"
    """What ``fit`` takes: the training matrix (:func:`refit_gym.baselines.fit_baseline`)."""

    def __init__(
        self,
        l2: float = 500.0,
        max_items: int = DEFAULT_MAX_ITEMS,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        self.l2 = _check_l2(l2)
        if not is_positive_int(max_items):
            raise ConfigError(f"max_items must be a positive int, got {max_items!r}")
        self.max_items = int(max_items)
        self.device = torch.device(device)
        self.weights: Optional[torch.Tensor] = None  # float32 (n_items, n_items)

    def fit(self, train: sp.spmatrix) -> "EASERecommender":
        """Fit on ``train`` (users x items, binarised)."""
        binary = _check_train(train, self.max_items)
        self._set(binary, ease_weights(gram_matrix(binary), self.l2))
        return self

    def _set(self, binary: sp.csr_matrix, weights: np.ndarray) -> None:
        self.weights = torch.from_numpy(weights).to(self.device)

    @property
    def n_items(self) -> int:
        return int(self._fitted().shape[0])

    def _fitted(self) -> torch.Tensor:
        if self.weights is None:
            raise NotFittedError("EASERecommender is not fitted; call fit(train) first")
        return self.weights

    def input_rows(self, history: HistoryBatch) -> torch.Tensor:
        """``(B, n_items)`` input rows: 1 on each visible history item (EASE's ``X_u``)."""
        return history.rows()

    def score(self, history: HistoryBatch) -> torch.Tensor:
        """``X_u @ B`` of the visible histories: float32 ``(B, n_items)`` on the model's device."""
        weights = self._fitted()
        if history.n_items != weights.shape[0]:
            raise DataError(f"the histories have {history.n_items} items but EASE was fitted on {weights.shape[0]}")
        rows = self.input_rows(history.to_device(weights.device))
        if weights.device.type == "cpu":  # scipy's sparse @ dense: rows are ~97 % zeros
            return torch.from_numpy(np.asarray(sp.csr_matrix(rows.numpy()) @ weights.numpy()))
        return rows @ weights


class RecencyEASERecommender(EASERecommender):
    """EASE scored on a recency-weighted input row: the baseline that uses time order.

    The weights ``B`` are EASE's, fitted on the binary training matrix; a user's input row holds
    ``linspace(w_min, 1, n)`` over the user's ``n`` visible history items in time order (the
    oldest gets ``w_min``, the most recent 1; T-DiffRec's weighting) instead of 1s. Any model that
    reads the training rows' order (T-DiffRec, the ``recent`` hold-out of fine-tuning) must be
    compared with this, not only with order-blind EASE. ``w_min = 1`` is plain EASE.

    Args:
        l2: EASE's ridge penalty.
        w_min: weight of the oldest history item, in ``[0, 1]``.
    """

    name = "ease-recency"

    def __init__(self, l2: float = 500.0, w_min: float = 0.1, max_items: int = DEFAULT_MAX_ITEMS,
                 device: Union[str, torch.device] = "cpu") -> None:
        super().__init__(l2, max_items=max_items, device=device)
        self.w_min = _check_w_min(w_min)

    def input_rows(self, history: HistoryBatch) -> torch.Tensor:
        return history.rows(history.recency_weights(self.w_min, 1.0))


def _check_w_min(w_min: float) -> float:
    if isinstance(w_min, bool) or not isinstance(w_min, (int, float, np.number)) or not 0.0 <= w_min <= 1.0:
        raise ConfigError(f"w_min must be a number in [0, 1], got {w_min!r}")
    return float(w_min)


@dataclass
class EASETuning:
    """The result of :func:`tune_ease`: the (λ, w_min) with the best ``metric`` on ``split``."""

    best_l2: float
    best_score: float
    metric: str
    split: str
    scores: dict[tuple, float]  # (λ, w_min or None) -> score on ``split``, in grid order
    model: EASERecommender = field(repr=False)
    best_w_min: Optional[float] = None

    def to_dict(self) -> dict:
        return {
            "best_l2": self.best_l2,
            "best_w_min": self.best_w_min,
            "best_score": self.best_score,
            "metric": self.metric,
            "split": self.split,
            "scores": {f"l2={l2:g}" + ("" if w is None else f",w_min={w:g}"): score
                       for (l2, w), score in self.scores.items()},
        }


DEFAULT_W_MIN_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75)


def tune_ease(
    data: InteractionData,
    l2_grid: Iterable[float] = DEFAULT_L2_GRID,
    split: str = "valid",
    metric: str = "recall@20",
    *,
    w_min_grid: Optional[Iterable[float]] = None,
    batch_size: int = 1024,
    max_items: int = DEFAULT_MAX_ITEMS,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> EASETuning:
    """Fit EASE on ``data.train`` for every λ of ``l2_grid``; keep the best on validation.

    With ``w_min_grid`` the model is :class:`RecencyEASERecommender` and every ``(λ, w_min)`` pair
    is tried (``w_min`` only changes the input rows, so each λ is fitted once).
    Only the validation split may select (``split="test"`` raises :class:`ConfigError`).
    ``XᵀX`` is computed once; ties keep the earlier grid point. Returns the fitted best model.
    """
    from refit_gym.evaluation.evaluator import evaluate

    if split != "valid":
        raise ConfigError(
            f"tune_ease selects λ on the validation split only, got split={split!r}"
        )
    grid = [_check_l2(l2) for l2 in l2_grid]
    if not grid:
        raise ConfigError("l2_grid is empty")
    w_grid = [None] if w_min_grid is None else [_check_w_min(w) for w in w_min_grid]
    if not w_grid:
        raise ConfigError("w_min_grid is empty")
    name, _, cutoff = str(metric).partition("@")
    if not cutoff.isdigit() or int(cutoff) < 1 or metric not in metric_names((int(cutoff),)):
        raise ConfigError(
            f"unknown metric {metric!r}; expected recall@K, ndcg@K, precision@K or mrr@K"
        )
    ks = (int(cutoff),)

    binary = _check_train(data.train, max_items)
    gram = gram_matrix(binary)
    if w_min_grid is None:
        model: EASERecommender = EASERecommender(grid[0], max_items=max_items, device=device)
    else:
        model = RecencyEASERecommender(grid[0], w_grid[0], max_items=max_items, device=device)
    scores: dict[tuple, float] = {}
    best, best_score, best_weights = (None, None), -math.inf, None
    iterator = grid
    if progress:
        from refit_gym.progress import progress as bar

        iterator = bar(grid, desc="tune EASE l2", unit="l2")
    for l2 in iterator:
        model.l2 = l2
        model._set(binary, ease_weights(gram, l2))
        for w_min in w_grid:
            if w_min is not None:
                model.w_min = w_min
            score = evaluate(model, data, splits=(split,), ks=ks, batch_size=batch_size).metrics[split][metric]
            scores[(l2, w_min)] = score
            if score > best_score:
                best, best_score, best_weights = (l2, w_min), score, model.weights
    model.l2, model.weights = best[0], best_weights
    if best[1] is not None:
        model.w_min = best[1]
    return EASETuning(
        best_l2=best[0],
        best_score=best_score,
        metric=metric,
        split=split,
        scores=scores,
        model=model,
        best_w_min=best[1],
    )
