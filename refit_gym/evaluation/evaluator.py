"""Full-ranking evaluation of a recommender on the valid / test splits of an ``InteractionData``.

The protocol is DiffRec's (``DESIGN.md``, "Evaluation"): every user is scored over all items;
for ``valid`` the user's train items are excluded, for ``test`` its train + valid items
(:meth:`InteractionData.seen_before`); the metrics of :mod:`refit_gym.evaluation.metrics` are
averaged over **all** users by default -- a user whose ground truth is empty in a split counts in
the denominator with 0 (DiffRec's convention; ``average_over="nonempty"`` divides by the users
with a non-empty ground truth instead).

``recommender.score`` is called once per batch of users and its scores serve every requested
split, since scoring (a diffusion chain) costs far more than ranking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Union, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.interactions import InteractionData
from refit_gym.errors import ConfigError, DataError
from refit_gym.evaluation.metrics import (
    AVERAGE_OVER,
    PROTOCOLS,
    MetricAccumulator,
    check_ks,
    check_scores,
    is_positive_int,
    _mask_and_topk,
    ranking_metrics,
)

SPLITS = ("valid", "test")


@runtime_checkable
class Recommender(Protocol):
    """Anything that scores all items for a batch of users.

    ``score(users)`` gets a ``LongTensor (B,)`` of user ids and returns a floating tensor
    ``(B, n_items)``, higher = better. It may only use the users' *train* data: the evaluator
    passes user ids, never valid / test interactions. The evaluator overwrites the returned
    tensor in place (masking), so return a fresh tensor, not a stored one (a view is detected and
    copied).
    """

    @property
    def n_items(self) -> int: ...

    def score(self, users: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EvaluationResult:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: ``{split: {"recall@20": 0.2, ...}}``, unrounded averages.
        top_items: with ``export_topk``: ``{split: int64 array (n_users, export_topk)}``, row
            ``u`` = user ``u``'s best items, best first, excluded items never present (``-1`` pads
            a row only if the user has fewer rankable items than ``export_topk``).
        ks, protocol, average_over, n_users: how the metrics were computed.
    """

    metrics: dict[str, dict[str, float]]
    top_items: Optional[dict[str, np.ndarray]] = None
    ks: tuple[int, ...] = ()
    protocol: str = "cf"
    average_over: str = "all"
    n_users: int = 0
    dataset: str = ""
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict of the metrics and settings (``top_items`` is left out)."""
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "average_over": self.average_over,
            "ks": list(self.ks),
            "n_users": self.n_users,
            "metrics": self.metrics,
            **({"extras": self.extras} if self.extras else {}),
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format(self, digits: int = 4) -> str:
        """One line per split, values rounded to ``digits`` (for logs)."""
        return "\n".join(
            f"{split}: " + " ".join(f"{k}={v:.{digits}f}" for k, v in values.items())
            for split, values in self.metrics.items()
        )


def _check_splits(splits: Union[str, Iterable[str]]) -> tuple[str, ...]:
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if not splits:
        raise ConfigError("splits is empty; expected 'valid' and/or 'test'")
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"unknown evaluation split {split!r}; expected 'valid' or 'test'")
    if len(set(splits)) != len(splits):
        raise ConfigError(f"splits {splits!r} repeats a split")
    return splits


def _is_subset(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    """Every stored entry of ``a`` is stored in ``b``."""
    return (a - a.multiply(b)).count_nonzero() == 0


def _mask_plan(
    data: InteractionData, splits: tuple[str, ...]
) -> list[tuple[str, sp.csr_matrix, bool]]:
    """``(split, exclusion matrix, incremental)`` in processing order (valid before test).

    The masks are nested (train for valid, train + valid for test), so both splits share one
    score tensor masked in place: valid is ranked with train masked, then test with only the
    valid items masked *in addition* (``incremental=True``). A mask that is not a superset of
    the previous one is applied in full to a fresh copy of the scores instead.
    """
    plan = []
    previous: Optional[sp.csr_matrix] = None
    for split in sorted(splits, key=SPLITS.index):
        seen = data.seen_before(split).tocsr()
        if previous is not None and _is_subset(previous, seen):
            increment = (seen - seen.multiply(previous)).tocsr()
            increment.eliminate_zeros()
            plan.append((split, increment, True))
        else:
            plan.append((split, seen, False))
        previous = seen
    return plan


def evaluate(
    recommender: Recommender,
    data: InteractionData,
    splits: Union[str, Iterable[str]] = ("valid", "test"),
    ks: Iterable[int] = (10, 20, 50, 100),
    batch_size: int = 1024,
    device: Optional[Union[str, torch.device]] = None,
    export_topk: Optional[int] = None,
    progress: bool = False,
    *,
    protocol: str = "cf",
    average_over: str = "all",
) -> EvaluationResult:
    """Rank all items for every user and average the top-K metrics per split.

    Args:
        recommender: see :class:`Recommender`; ``score`` is called once per batch of users
            (users in id order) and its scores serve every split.
        data: the dataset; ground truth = ``data.valid`` / ``data.test``, exclusions =
            ``data.seen_before(split)``.
        splits: ``"valid"`` and/or ``"test"``.
        ks: cut-offs of the metrics.
        batch_size: users per ``score`` call.
        device: where masking and ranking run (and where the user ids are passed); ``None`` =
            wherever ``score`` returns its tensor.
        export_topk: also return each user's top ``export_topk`` items per split.
        progress: show a tqdm bar over the batches.
        protocol: ``"cf"`` (recall / ndcg / precision / mrr) or ``"sequential"`` (hr / ndcg).
        average_over: ``"all"`` (DiffRec: users with an empty ground truth count with 0) or
            ``"nonempty"``.
    """
    splits = _check_splits(splits)
    ks = check_ks(ks)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown metric protocol {protocol!r}; expected one of {PROTOCOLS}")
    if average_over not in AVERAGE_OVER:
        raise ConfigError(f"unknown average_over {average_over!r}; expected one of {AVERAGE_OVER}")
    if not is_positive_int(batch_size):
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    n_users, n_items = data.n_users, data.n_items
    if int(recommender.n_items) != n_items:
        raise DataError(
            f"the recommender scores {recommender.n_items} items but {data.name} has {n_items}"
        )
    if export_topk is not None and not is_positive_int(export_topk):
        raise ConfigError(f"export_topk must be a positive int or None, got {export_topk!r}")
    depth = max(ks[-1], export_topk or 0)
    if depth > n_items:
        raise ConfigError(
            f"cannot rank {depth} items (max(ks)={ks[-1]}, export_topk={export_topk}): "
            f"{data.name} has only {n_items} items"
        )
    device = torch.device(device) if device is not None else None

    plan = _mask_plan(data, splits)
    needs_copies = sum(not incremental for _, _, incremental in plan) > 1
    ground_truth = {split: data.split(split).tocsr() for split in splits}
    gt_sizes = {split: np.diff(ground_truth[split].indptr) for split in splits}
    accumulators = {split: MetricAccumulator(average_over) for split in splits}
    exported = (
        {split: np.empty((n_users, export_topk), dtype=np.int64) for split in splits}
        if export_topk
        else None
    )

    starts = range(0, n_users, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"evaluate {data.name}", unit="batch")
    with torch.no_grad():
        for start in starts:
            stop = min(start + batch_size, n_users)
            users = torch.arange(start, stop, dtype=torch.long, device=device)
            scores = recommender.score(users)
            check_scores(scores, stop - start, n_items)
            if device is not None and scores.device != device:
                scores = scores.to(device)
            if scores._is_view() or not scores.is_contiguous():
                scores = scores.clone()  # never write into the recommender's own storage
            working = scores
            for split, exclude, incremental in plan:
                if not incremental:
                    working = scores.clone() if needs_copies else scores
                top = _mask_and_topk(working, exclude[start:stop], depth)
                truth = ground_truth[split][start:stop]
                metrics = ranking_metrics(top, truth, ks, protocol=protocol)
                accumulators[split].add(metrics, gt_sizes[split][start:stop])
                if exported is not None:
                    exported[split][start:stop] = top[:, :export_topk].cpu().numpy()

    return EvaluationResult(
        metrics={split: accumulators[split].result() for split in splits},
        top_items=exported,
        ks=ks,
        protocol=protocol,
        average_over=average_over,
        n_users=n_users,
        dataset=data.name,
    )
