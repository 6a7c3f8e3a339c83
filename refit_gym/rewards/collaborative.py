"""The collaborative term: how likely the final state makes what the user's nearest neighbours have.

Our reading of ReFiT's "collaborative signal-aware" reward (the paper's equations are not
available; see ``docs/rewards.md``). From the **training** matrix only:

1. at bind time, every user's top-``k`` most similar users (cosine or Pearson on training rows,
   computed in blocks of users and cached, :mod:`refit_gym.rewards.neighbours`); with
   ``neighbours_from="visible_items"``, at call time instead, each episode row's top-``k`` users
   by the similarity of its **visible** items to their training rows (below);
2. at call time, a collaborative target per user of the batch (per distinct user and visible
   items with ``"visible_items"``): the neighbours' training items
   weighted by similarity (neighbours with similarity ``<= 0`` ignored), **minus the user's own
   training items** -- the high-order user -> item -> user -> item signal the user's own history
   does not hold -- normalised to sum 1 (:func:`collaborative_targets`).

The targets are built for the users of each call, never for all users at once: a target row
holds the union of ``k`` neighbours' items, so the users x items target matrix is a dense matrix
in all but name at scale (measured on synthetic data at 10x ML-1M, 59,490 x 28,100, k = 20:
0.45 G entries, 27 % of all, 61 s to build, a peak of 12.7 GB and 9 GB held with its device
copy), while the rows of a call cost ``O(B k L)`` for its ``B`` distinct users of ``L``
training items (0.1 s for 128 users at that size). The bound term keeps the neighbour lists
(``n_users x k``) and shares the training matrix.

At call time the reward is the expected log-likelihood ``sum_i q_u(i) log p(i)`` of the
target ``q_u`` under ``p = softmax(scores / tau)`` with the input items masked (``objective=
"loglik"``, i.e. minus the cross-entropy), or the expected probability ``sum_i q_u(i) p(i)``
(``objective="mass"``). A user whose target is empty gets 0.

Which items choose the neighbours (``neighbours_from``; the paper is silent): ``"training_rows"``
(the default, and what every documented result used) compares users' whole training rows,
including the items the episode hides from the input and scores with the recovery terms, so the
hidden items take part in choosing the neighbours (never the validation or test items).
``"visible_items"`` compares only the items the episode shows the model with the other users'
training rows, so the neighbours carry no information about the hidden items; it costs one
sparse x dense product against every user per call (``O(nnz(train) x B)`` for ``B`` distinct
rows) and no search at bind. Either way the target leaves out all of the user's own training
items.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.sparse_rows import SparseRows
from refit_gym.errors import EpisodeStateError
from refit_gym.rewards._checks import check_batch, check_choice, check_int_in_range, check_temperature
from refit_gym.rewards.base import EpisodeBatch, RewardTerm, TrainingInteractions
from refit_gym.rewards.cache import PathLike, matrix_fingerprint
from refit_gym.rewards.functional import masked_logits, sparse_target_value
from refit_gym.rewards.likelihood import DEFAULT_TEMPERATURE
from refit_gym.rewards.neighbours import (
    SIMILARITIES,
    UserNeighbours,
    find_neighbours,
    neighbour_weight_rows,
    neighbours_of_rows,
    similarity_factors,
)

OBJECTIVES = ("loglik", "mass")
NEIGHBOURS_FROM = ("training_rows", "visible_items")


def collaborative_targets(
    train: sp.spmatrix, neighbours: UserNeighbours, users: Optional[np.ndarray] = None,
    weights: Optional[sp.csr_matrix] = None,
) -> sp.csr_matrix:
    """Per user, the neighbours' items weighted by similarity, own training items removed, rows summing to 1.

    Args:
        train: the ``(n_users, n_items)`` training matrix the neighbours were computed on.
        neighbours: each user's top-k similar users.
        users: the users whose rows are built, in this order (``None``: every user). A row does
            not depend on which other rows are built (the same floats either way).
        weights: ``neighbours.weight_matrix()``, if the caller keeps it.

    Returns:
        float32 CSR ``(len(users), n_items)``, ``q[u, i] = sum_{v in N(u)} max(s_uv, 0) x_vi``
        over items ``i`` not in ``u``'s training row, divided by its row sum. Rows with nothing
        left are empty (all 0). For every user it holds up to ``k`` times the user's number of
        items per row: do not build it for all users of a large dataset.
    """
    train = sp.csr_matrix(train, dtype=np.float32)
    weights = neighbours.weight_matrix() if weights is None else weights
    own = train
    if users is not None:
        users = np.asarray(users, dtype=np.int64)
        weights, own = weights[users], train[users]
    return target_rows_from_weights(train, weights, own)


def target_rows_from_weights(train: sp.csr_matrix, weights: sp.csr_matrix, own: sp.csr_matrix) -> sp.csr_matrix:
    """Target rows from neighbour weights: ``weights @ train`` with the ``own`` items removed, rows summing to 1.

    Args:
        train: float32 CSR ``(n_users, n_items)``.
        weights: CSR ``(B, n_users)``, row ``b`` holding its neighbours' weights ``max(s, 0)``.
        own: CSR ``(B, n_items)``, the items each row's user has (left out of its target).
    """
    scores = (weights @ train).tocsr()
    own = own.copy()
    own.data[:] = 1.0
    scores = (scores - scores.multiply(own)).tocsr()  # exact zeros at the user's own items
    scores.eliminate_zeros()
    row_sums = np.asarray(scores.sum(axis=1), dtype=np.float64).ravel()
    inverse = np.divide(1.0, row_sums, out=np.zeros_like(row_sums), where=row_sums > 0)
    targets = sp.diags(inverse).dot(scores).tocsr().astype(np.float32)
    targets.sort_indices()
    return targets


class CollaborativeReward(RewardTerm):
    """Expected log-likelihood (or mass) of the user's collaborative target under the final scores.

    See the module docstring for the target. Binding computes (or loads from the cache) the
    neighbour lists (with ``neighbours_from="visible_items"`` only the similarity factors: a call
    then searches the neighbours of its distinct (user, visible items) rows); a call builds the
    target rows of its distinct users (or rows) on the host (sparse, ``O(B k L)``), moves their
    entries to the scores' device and costs one masked log-softmax plus a gather over the
    targets' entries.

    Args:
        k: neighbours per user, ``1 <= k <= n_users - 1`` (the upper bound is checked at bind).
        similarity: ``"cosine"`` or ``"pearson"`` (full-row mean centring; see
            :mod:`refit_gym.rewards.neighbours`).
        temperature: softmax temperature ``tau > 0``.
        objective: ``"loglik"`` (``sum_i q(i) log p(i)``, ``<= 0``) or ``"mass"``
            (``sum_i q(i) p(i)``, in ``[0, 1]``).
        differentiable: report the term as differentiable in ``scores``. The computation is
            differentiable either way; with ``False`` (the default, so that agents optimise it
            by policy gradient) the value is computed without autograd and returned detached.
        block_size: users per similarity block (``None``: automatic, see
            :func:`~refit_gym.rewards.neighbours.default_block_size`). Time and memory only.
        cache_dir: ``None`` (cache neighbour lists in memory only), ``"auto"`` (also on disk in
            the per-user cache folder) or a folder outside the repository.
        progress: show a progress bar while computing neighbours.
        neighbours_from: ``"training_rows"`` (each user's neighbours by whole training rows,
            hidden items included, searched once at bind) or ``"visible_items"`` (each episode
            row's neighbours by the items visible in its input, at call time); see the module
            docstring.

    Raises:
        ConfigError: a parameter out of range or an unknown choice.
    """

    name = "collaborative"

    def __init__(
        self,
        k: int = 20,
        similarity: str = "cosine",
        temperature: float = DEFAULT_TEMPERATURE,
        objective: str = "loglik",
        differentiable: bool = False,
        block_size: Optional[int] = None,
        cache_dir: Optional[PathLike] = None,
        progress: bool = False,
        neighbours_from: str = "training_rows",
    ) -> None:
        self.k = check_int_in_range(k, "the number of neighbours k", 1)
        self.similarity = check_choice(similarity, SIMILARITIES, "similarity")
        self.temperature = check_temperature(temperature)
        self.objective = check_choice(objective, OBJECTIVES, "collaborative objective")
        self.differentiable = bool(differentiable)
        self.block_size = None if block_size is None else check_int_in_range(block_size, "block_size", 1)
        self.cache_dir = cache_dir
        self.progress = bool(progress)
        self.neighbours_from = check_choice(neighbours_from, NEIGHBOURS_FROM, "neighbours_from")
        self.neighbours: Optional[UserNeighbours] = None
        self._factors: Optional[tuple[sp.csr_matrix, Optional[np.ndarray]]] = None
        self._similarity_rows: Optional[sp.csr_matrix] = None
        self._train: Optional[sp.csr_matrix] = None
        self._weights: Optional[sp.csr_matrix] = None

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu") -> "CollaborativeReward":
        """Compute (or fetch from the cache) the neighbours; returns self.

        With ``neighbours_from="visible_items"`` only the similarity factors are kept (the
        neighbours depend on each episode's visible items).

        Raises:
            ConfigError: ``k > n_users - 1``.
        """
        check_int_in_range(self.k, "the number of neighbours k", 1, interactions.n_users - 1)
        train = interactions.train
        if self.neighbours_from == "visible_items":
            self.neighbours, self._weights = None, None
            self._train = sp.csr_matrix(train, dtype=np.float32)
            # the similarities from the matrix as given (its dtype), as the search at bind uses it
            self._similarity_rows = sp.csr_matrix(train)
            self._factors = similarity_factors(self._similarity_rows, self.similarity)
            return self
        self.neighbours = find_neighbours(
            train,
            self.k,
            self.similarity,
            block_size=self.block_size,
            cache_dir=self.cache_dir,
            fingerprint=matrix_fingerprint(train),
            progress=self.progress,
        )
        self._train = sp.csr_matrix(train, dtype=np.float32)
        self._weights = self.neighbours.weight_matrix()
        return self

    @property
    def targets(self) -> sp.csr_matrix:
        """Every user's target, ``(n_users, n_items)`` (built on each access; for inspection on
        small data: it holds up to ``k`` times the training matrix's entries). Only for
        ``neighbours_from="training_rows"``, where a user has one target."""
        return self.target_rows(np.arange(self._bound().shape[0]))

    def target_rows(self, users: np.ndarray) -> sp.csr_matrix:
        """The targets of ``users`` (host ids, in order), float32 CSR ``(len(users), n_items)``.
        Only for ``neighbours_from="training_rows"`` (else :meth:`episode_neighbours`)."""
        if self.neighbours_from != "training_rows":
            raise EpisodeStateError(f"with neighbours_from={self.neighbours_from!r} a target depends on the "
                                    "episode's visible items, not only on the user; use the episode's rows")
        return collaborative_targets(self._bound(), self.neighbours, users, weights=self._weights)

    def episode_neighbours(self, users: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each episode row's neighbours: ``ids`` int64 ``(B, k)`` and ``similarity`` float32 ``(B, k)``.

        Args:
            users: ``(B,)`` host user ids.
            visible: ``(B, n_items)`` bool, the items visible in each row's input (used by
                ``neighbours_from="visible_items"`` only).
        """
        self._bound()
        users = np.asarray(users, dtype=np.int64)
        if self.neighbours_from == "training_rows":
            return self.neighbours.ids[users], self.neighbours.similarity[users]
        first, inverse = _distinct_rows(users, visible)  # one search per distinct row: rollouts repeat them
        ids, sims = self._visible_item_neighbours(users[first], visible[first])
        return ids[inverse], sims[inverse]

    def _visible_item_neighbours(self, users: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``neighbours_of_rows`` of the users' training rows restricted to their visible items (bound)."""
        queries = self._similarity_rows[users].multiply(sp.csr_matrix(visible, dtype=bool)).tocsr()
        return neighbours_of_rows(self._factors, queries, users, self.k, self.block_size)

    def _bound(self) -> sp.csr_matrix:
        if self._train is None:
            raise EpisodeStateError("CollaborativeReward is not bound; call .bind(interactions, device) first")
        return self._train

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` expected log-likelihood (or mass) of each episode's collaborative target."""
        check_batch(scores, episode, self._bound().shape[1])
        users = episode.users.detach().cpu().numpy().astype(np.int64)
        if self.neighbours_from == "training_rows":
            # one target row per distinct user (rollouts repeat users), gathered per episode on the device
            distinct, episode_row = np.unique(users, return_inverse=True)
            target_rows = self.target_rows(distinct)
        else:
            visible = episode.visible.detach().cpu().numpy() > 0
            first, episode_row = _distinct_rows(users, visible)
            target_rows = self._visible_item_targets(users[first], visible[first])
        rows = SparseRows(target_rows, scores.device)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            batch_row, item, weight = rows.coordinates(torch.from_numpy(episode_row.reshape(-1)).to(scores.device))
            logits = masked_logits(scores, episode.visible, self.temperature)
            value = sparse_target_value(logits, batch_row, item, weight, self.objective)
        return value if self.differentiable else value.detach()

    def _visible_item_targets(self, users: np.ndarray, visible: np.ndarray) -> sp.csr_matrix:
        """The targets of rows whose neighbours come from their visible items, ``(B, n_items)``."""
        train = self._bound()
        ids, sims = self._visible_item_neighbours(users, visible)
        return target_rows_from_weights(train, neighbour_weight_rows(ids, sims, train.shape[0]), train[users])

    def config(self) -> dict:
        return {
            "term": type(self).__name__,
            "k": self.k,
            "similarity": self.similarity,
            "temperature": self.temperature,
            "objective": self.objective,
            "differentiable": self.differentiable,
            "neighbours_from": self.neighbours_from,
        }


def _distinct_rows(users: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: the first episode row of each distinct (user, visible items) pair, and
    each row's pair, so that ``x[first][inverse]`` repeats per row what was computed per pair."""
    keys = np.concatenate([users.astype(np.int64)[:, None].view(np.uint8), np.packbits(visible, axis=1)], axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)
