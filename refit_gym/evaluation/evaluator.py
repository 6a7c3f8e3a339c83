"""Full-ranking evaluation of a recommender on the valid / test splits of an ``InteractionData``.

Two protocols (:class:`EvaluationProtocol`):

* ``cf`` (DiffRec / CF-Diff, ``docs/evaluation.md``): every split is predicted from the
  user's **training** history; items seen before the split are excluded from the ranking (train
  for ``valid``, train + valid for ``test``, :meth:`InteractionData.seen_before`); recall / ndcg /
  precision / mrr.
* ``sequential`` (DiffuRec / DreamRec leave-one-out): ``valid`` is predicted from the training
  sequence, ``test`` from the training sequence followed by the validation item; nothing is
  excluded by default (DiffuRec ranks history items too; ``mask_history=True`` excludes them);
  hr / ndcg.

Metrics are averaged over **all** users by default -- a user whose ground truth is empty counts
with 0 (DiffRec's convention; ``average_over="nonempty"`` divides by the users with a non-empty
ground truth instead).

A recommender gets a :class:`~refit_gym.data.history.HistoryBatch`, the histories the protocol
allows it to read, never a user id alone: it cannot look at the ground truth. ``score`` is
called once per batch of users and input history, and its scores serve every split that is
predicted from the same history (both ``cf`` splits), since scoring (a diffusion chain) costs
far more than ranking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.history import HistoryBatch, SequenceTable
from refit_gym.data.interactions import InteractionData, UserSequences
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


class Recommender:
    """What the evaluator needs (a structural type: any object with these two members).

    ``n_items``: the number of items it scores. ``score(history)`` gets a
    :class:`~refit_gym.data.history.HistoryBatch` (the users and the histories the protocol lets
    it read) and returns a floating tensor ``(B, n_items)``, higher = better. The evaluator
    overwrites the returned tensor in place (masking), so return a fresh tensor, not a stored
    one (a view is detected and copied). Baselines fitted on training data may also use
    ``history.users`` to look up what they fitted, never the ground truth.
    """

    n_items: int

    def score(self, history: HistoryBatch) -> torch.Tensor:  # pragma: no cover - a type, not an implementation
        raise NotImplementedError


def check_recommender(recommender: Any) -> int:
    """The number of items ``recommender`` scores; ``ConfigError`` if it is not a usable recommender
    (no ``score`` method, or ``n_items`` missing, e.g. an unfitted baseline)."""
    if not callable(getattr(type(recommender), "score", None)):
        raise ConfigError(f"{type(recommender).__name__} is not a recommender: it has no score(history) method")
    try:
        return int(recommender.n_items)
    except (AttributeError, TypeError, ValueError) as error:
        raise ConfigError(f"{type(recommender).__name__} cannot be evaluated: {error}") from None


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a split is predicted and ranked.

    Attributes:
        name: ``"cf"`` or ``"sequential"`` (also the metric family).
        mask_history: exclude the items seen before the split from the ranking (default: True
            for ``cf``, False for ``sequential``, as DiffuRec).
    """

    name: str = "cf"
    mask_history: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ConfigError(f"unknown evaluation protocol {self.name!r}; expected one of {PROTOCOLS}")
        if self.mask_history is None:
            object.__setattr__(self, "mask_history", self.name == "cf")

    def input_sequences(self, data: InteractionData, split: str) -> UserSequences:
        """The histories ``split`` is predicted from."""
        if self.name == "sequential" and split == "test":
            return data.train_sequences.extended(data.valid)
        return data.train_sequences

    def exclusions(self, data: InteractionData, split: str) -> Optional[sp.csr_matrix]:
        """Items excluded from the ranking of ``split`` (``None``: nothing)."""
        return data.seen_before(split).tocsr() if self.mask_history else None


def protocol_from_config(evaluation: Any, recommender: Any = None) -> EvaluationProtocol:
    """The protocol an ``evaluation`` config section asks for (``protocol`` unset: the
    recommender's own)."""
    name = evaluation.protocol or getattr(recommender, "protocol", "cf")
    return EvaluationProtocol(name, evaluation.mask_history)


def as_protocol(protocol: Union[str, EvaluationProtocol, None], recommender: Any = None) -> EvaluationProtocol:
    """``protocol`` as an :class:`EvaluationProtocol`; ``None`` = the recommender's own
    (``recommender.protocol``), else ``cf``."""
    if isinstance(protocol, EvaluationProtocol):
        return protocol
    if protocol is None:
        protocol = getattr(recommender, "protocol", "cf")
    return EvaluationProtocol(protocol)


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
    return tuple(sorted(splits, key=SPLITS.index))


def _is_subset(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    """Every stored entry of ``a`` is stored in ``b``."""
    return (a - a.multiply(b)).count_nonzero() == 0


@dataclass
class _SplitPlan:
    split: str
    exclude: Optional[sp.csr_matrix]
    incremental: bool  # exclude adds to the previous split's mask on the same scores


def _plans(protocol: EvaluationProtocol, data: InteractionData, splits: tuple[str, ...]) -> list[list[_SplitPlan]]:
    """Groups of splits predicted from the same history (one ``score`` call each), in order.

    Within a group the masks are nested (train for valid, train + valid for test), so the splits
    share one score tensor masked in place: valid is ranked with train masked, then test with
    only the valid items masked *in addition*. A mask that is not a superset of the previous
    one is applied in full to a fresh copy of the scores instead.
    """
    groups: list[list[_SplitPlan]] = []
    previous_input: Optional[UserSequences] = None
    previous_mask: Optional[sp.csr_matrix] = None
    for split in splits:
        history = protocol.input_sequences(data, split)
        if history is not previous_input:
            groups.append([])
            previous_mask = None
        seen = protocol.exclusions(data, split)
        if seen is not None and previous_mask is not None and _is_subset(previous_mask, seen):
            increment = (seen - seen.multiply(previous_mask)).tocsr()
            increment.eliminate_zeros()
            groups[-1].append(_SplitPlan(split, increment, True))
        else:
            groups[-1].append(_SplitPlan(split, seen, False))
        previous_input, previous_mask = history, seen
    return groups


def evaluate(
    recommender: Any,
    data: InteractionData,
    splits: Union[str, Iterable[str]] = ("valid", "test"),
    ks: Iterable[int] = (10, 20, 50, 100),
    batch_size: int = 1024,
    device: Optional[Union[str, torch.device]] = None,
    export_topk: Optional[int] = None,
    progress: bool = False,
    *,
    protocol: Union[str, EvaluationProtocol, None] = None,
    average_over: str = "all",
    users: Optional[range] = None,
    precision: str = "fp32",
) -> EvaluationResult:
    """Rank all items for every user and average the top-K metrics per split.

    Args:
        recommender: see :class:`Recommender`; ``score`` is called once per batch of users (in
            id order) and input history.
        data: the dataset; ground truth = ``data.valid`` / ``data.test``.
        splits: ``"valid"`` and/or ``"test"``.
        ks: cut-offs of the metrics.
        batch_size: users per ``score`` call.
        device: where the histories are built and masking and ranking run; ``None`` = the CPU
            for the histories and wherever ``score`` returns its tensor for the ranking.
        export_topk: also return each user's top ``export_topk`` items per split.
        progress: show a tqdm bar over the batches.
        protocol: ``"cf"``, ``"sequential"`` or an :class:`EvaluationProtocol`; ``None`` = the
            recommender's own ``protocol`` attribute, else ``"cf"``.
        average_over: ``"all"`` (DiffRec: users with an empty ground truth count with 0) or
            ``"nonempty"``.
        users: evaluate only this contiguous range of users (one process's shard of a
            distributed evaluation; ``extras["counts"]`` gives the denominators to combine the
            shards' means, see :func:`combine_shards`). Default: every user.
        precision: ``fp32``, or ``bf16`` to run ``score`` under bfloat16 autocast (the scores are
            ranked in float32).
    """
    from refit_gym.runtime import autocast

    splits = _check_splits(splits)
    ks = check_ks(ks)
    protocol = as_protocol(protocol, recommender)
    if average_over not in AVERAGE_OVER:
        raise ConfigError(f"unknown average_over {average_over!r}; expected one of {AVERAGE_OVER}")
    if not is_positive_int(batch_size):
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    n_users, n_items = data.n_users, data.n_items
    if check_recommender(recommender) != n_items:
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

    groups = _plans(protocol, data, splits)
    tables = [SequenceTable(protocol.input_sequences(data, group[0].split), n_items, device or "cpu")
              for group in groups]
    ground_truth = {split: data.split(split).tocsr() for split in splits}
    gt_sizes = {split: np.diff(ground_truth[split].indptr) for split in splits}
    accumulators = {split: MetricAccumulator(average_over) for split in splits}
    exported = (
        {split: np.empty((n_users, export_topk), dtype=np.int64) for split in splits}
        if export_topk
        else None
    )

    user_range = range(n_users) if users is None else users
    if user_range.step != 1 or user_range.start < 0 or user_range.stop > n_users:
        raise ConfigError(f"users must be a contiguous range within [0, {n_users}), got {users!r}")
    starts = range(user_range.start, user_range.stop, batch_size)
    if progress:
        from refit_gym.progress import progress as bar

        starts = bar(starts, desc=f"evaluate {data.name}", unit="batch")
    with torch.no_grad():
        for start in starts:
            stop = min(start + batch_size, user_range.stop)
            batch_users = torch.arange(start, stop, dtype=torch.long, device=device or "cpu")
            for group, table in zip(groups, tables):
                with autocast(precision, device or "cpu"):
                    scores = recommender.score(table.batch(batch_users))
                if scores.dtype in (torch.bfloat16, torch.float16):
                    scores = scores.float()
                check_scores(scores, stop - start, n_items)
                if device is not None and scores.device != device:
                    scores = scores.to(device)
                if scores._is_view() or not scores.is_contiguous():
                    scores = scores.clone()  # never write into the recommender's own storage
                needs_copies = sum(not plan.incremental for plan in group) > 1
                working = scores
                for plan in group:
                    if not plan.incremental:
                        working = scores.clone() if needs_copies else scores
                    exclude = plan.exclude[start:stop] if plan.exclude is not None else None
                    top = _mask_and_topk(working, exclude, depth)
                    truth = ground_truth[plan.split][start:stop]
                    metrics = ranking_metrics(top, truth, ks, protocol=protocol.name)
                    accumulators[plan.split].add(metrics, gt_sizes[plan.split][start:stop])
                    if exported is not None:
                        exported[plan.split][start:stop] = top[:, :export_topk].cpu().numpy()

    return EvaluationResult(
        metrics={split: accumulators[split].result() for split in splits},
        top_items=exported,
        ks=ks,
        protocol=protocol.name,
        average_over=average_over,
        n_users=len(user_range),
        dataset=data.name,
        extras={"counts": {split: {"all": accumulators[split].n_users, "nonempty": accumulators[split].n_nonempty}
                           for split in splits},
                **({"mask_history": protocol.mask_history} if protocol.name == "sequential" else {})},
    )


def combine_shards(results: list[EvaluationResult]) -> dict[str, dict[str, float]]:
    """The metrics of the union of disjoint user shards (each shard's mean weighted by its denominator)."""
    first = results[0]
    out: dict[str, dict[str, float]] = {}
    for split, metrics in first.metrics.items():
        weights = [r.extras["counts"][split][first.average_over] for r in results]
        total = sum(weights)
        out[split] = {key: (sum(r.metrics[split][key] * w for r, w in zip(results, weights) if w) / total
                            if total else float("nan")) for key in metrics}
    return out
