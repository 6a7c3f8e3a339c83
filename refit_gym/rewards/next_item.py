"""The sequential collaborative term: what similar users did **next** after the items the user just saw.

Our reading of ReFiT's collaborative reward for sequential recommendation (the paper is silent on
the details; see ``docs/rewards.md``). From the **training** sequences only, for an episode of
user ``u`` whose visible history ends with the items ``C_u`` (the last ``context`` visible items):

1. ``u``'s top-``k`` most similar users ``N(u)`` (cosine or Pearson on training rows, as the
   ``collaborative`` term: :mod:`refit_gym.rewards.neighbours`, cached; with
   ``neighbours_from="visible_items"`` by the episode's visible items only, see
   :mod:`refit_gym.rewards.collaborative`);
2. the target ``q_u(i) ∝ sum_{v in N(u)} max(s_uv, 0) * #{p : v_p in C_u, v_{p+1} = i}`` -- the
   transitions of the neighbours' chronological sequences out of the items ``u`` has just seen
   -- over items ``i`` not visible to ``u``, normalised to sum 1 (empty when no neighbour ever
   moved on from an item of ``C_u``: the term is then 0).

The reward is ``sum_i q_u(i) log p(i)`` (``objective="loglik"``) or ``sum_i q_u(i) p(i)``
(``"mass"``) under ``p = softmax(scores / tau)`` with the visible items masked, as for the
``collaborative`` term. The user's held-out items may be among the neighbours' next items. The
transitions start from the items at the user's last shown positions (``EpisodeBatch.recent_items``,
which the env fills for this term; without it, the last positions whose item is visible); with the default
``neighbours_from="training_rows"`` the held-out items do take part in choosing ``N(u)`` (the
similarity compares whole training rows), so neighbours who share them are favoured and the
target leans toward them; ``"visible_items"`` removes that (never validation or test items
either way).

The targets are built per episode row on the host from the neighbours' sequences
(``O(B k L)`` for ``B`` rows, ``k`` neighbours of ``L`` items).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
import torch

from refit_gym.data.interactions import UserSequences
from refit_gym.data.sparse_rows import SparseRows
from refit_gym.errors import ConfigError
from refit_gym.rewards._checks import check_batch, check_int_in_range
from refit_gym.rewards.base import EpisodeBatch, TrainingInteractions
from refit_gym.rewards.collaborative import CollaborativeReward
from refit_gym.rewards.functional import masked_logits, sparse_target_value
from refit_gym.rewards.likelihood import DEFAULT_TEMPERATURE
from refit_gym.rewards.neighbours import UserNeighbours


def next_item_targets(
    sequences: UserSequences,
    neighbours: Union[UserNeighbours, tuple[np.ndarray, np.ndarray]],
    users: np.ndarray,
    visible: np.ndarray,
    n_items: int,
    context: int = 1,
    recent_items: Optional[np.ndarray] = None,
) -> sp.csr_matrix:
    """The next-item collaborative targets of episode rows (see the module docstring).

    Args:
        sequences: every user's chronological training sequence.
        neighbours: each user's top-k similar users (a :class:`UserNeighbours`, rows by user id), or
            each episode row's own ``(ids, similarity)`` arrays of shape ``(B, k)``; weights
            ``max(s, 0)`` are used.
        users: ``(B,)`` the user of each row.
        visible: ``(B, n_items)`` bool, the items visible to each row.
        n_items: the item count.
        context: how many of the user's most recent visible items the transitions start from.
        recent_items: ``(B, C)`` the items at each row's last shown positions, oldest first, -1 as
            padding (``EpisodeBatch.recent_items``, ``C >= context``): the transitions start from
            the last ``context`` of them. ``None``: from the last ``context`` positions of the
            user's training sequence whose item is visible, which is the same unless a hidden
            position's item is also shown at an earlier position (a repeat).

    Returns:
        float32 CSR ``(B, n_items)``, rows summing to 1 or empty.
    """
    users = np.asarray(users, dtype=np.int64)
    visible = np.asarray(visible, dtype=bool)
    if isinstance(neighbours, UserNeighbours):
        neighbour_ids, neighbour_similarity = neighbours.ids[users], neighbours.similarity[users]
    else:
        neighbour_ids, neighbour_similarity = (np.asarray(array) for array in neighbours)
        if neighbour_ids.shape != neighbour_similarity.shape or neighbour_ids.shape[:1] != users.shape:
            raise ConfigError(f"expected per-row neighbour ids and similarities of shape ({len(users)}, k), "
                              f"got {neighbour_ids.shape} and {neighbour_similarity.shape}")
    if recent_items is not None:
        recent_items = np.asarray(recent_items, dtype=np.int64)
        if recent_items.ndim != 2 or recent_items.shape[0] != len(users) or recent_items.shape[1] < context:
            raise ConfigError(f"expected recent_items of shape ({len(users)}, C >= context={context}), "
                              f"got {recent_items.shape}")
    rows, items, weights = [], [], []
    for row, user in enumerate(users.tolist()):
        if recent_items is None:
            own = sequences[user]
            start_items = own[visible[row, own]][-context:]
        else:
            start_items = recent_items[row, recent_items.shape[1] - context:]
            start_items = start_items[start_items >= 0]
        if not len(start_items):
            continue
        for neighbour, similarity in zip(neighbour_ids[row].tolist(), neighbour_similarity[row].tolist()):
            if similarity <= 0 or neighbour < 0:
                continue
            sequence = sequences[neighbour]
            follows = np.isin(sequence[:-1], start_items)
            nxt = sequence[1:][follows]
            nxt = nxt[~visible[row, nxt]]
            rows.append(np.full(len(nxt), row, dtype=np.int64))
            items.append(nxt)
            weights.append(np.full(len(nxt), similarity, dtype=np.float64))
    if rows:
        rows_, items_, weights_ = np.concatenate(rows), np.concatenate(items), np.concatenate(weights)
    else:
        rows_, items_, weights_ = (np.zeros(0, dtype=np.int64),) * 2 + (np.zeros(0),)
    counts = sp.csr_matrix((weights_, (rows_, items_)), shape=(len(users), n_items))  # duplicates summed
    sums = np.asarray(counts.sum(axis=1)).ravel()
    inverse = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    targets = sp.diags(inverse).dot(counts).tocsr().astype(np.float32)
    targets.sort_indices()
    return targets


class NextItemCollaborativeReward(CollaborativeReward):
    """Expected log-likelihood (or mass) of the neighbours' next items under the final scores.

    Args:
        context: the user's most recent visible items whose neighbour transitions form the
            target (default 1: what similar users did right after the user's last visible item).
        k, similarity, temperature, objective, differentiable, block_size, cache_dir, progress, neighbours_from:
            as :class:`~refit_gym.rewards.collaborative.CollaborativeReward`.
    """

    name = "next_collaborative"

    def __init__(self, context: int = 1, k: int = 20, similarity: str = "cosine",
                 temperature: float = DEFAULT_TEMPERATURE, objective: str = "loglik", differentiable: bool = False,
                 block_size: Optional[int] = None, cache_dir=None, progress: bool = False,
                 neighbours_from: str = "training_rows") -> None:
        super().__init__(k=k, similarity=similarity, temperature=temperature, objective=objective,
                         differentiable=differentiable, block_size=block_size, cache_dir=cache_dir, progress=progress,
                         neighbours_from=neighbours_from)
        self.context = check_int_in_range(context, "context", 1)
        self.recent_items_needed = self.context  # the env then passes the last shown positions
        self._sequences: Optional[UserSequences] = None

    def bind(self, interactions: TrainingInteractions, device: torch.device | str = "cpu"):
        super().bind(interactions, device)
        self._sequences = interactions.train_sequences
        return self

    def episode_targets(self, episode: EpisodeBatch) -> sp.csr_matrix:
        """The targets of the episode's rows, float32 CSR ``(B, n_items)``."""
        train = self._bound()
        users = episode.users.detach().cpu().numpy().astype(np.int64)
        visible = episode.visible.detach().cpu().numpy() > 0
        recent = None if episode.recent_items is None else episode.recent_items.detach().cpu().numpy()
        return next_item_targets(self._sequences, self.episode_neighbours(users, visible), users, visible,
                                 train.shape[1], self.context, recent)

    def __call__(self, scores: torch.Tensor, episode: EpisodeBatch) -> torch.Tensor:
        """``(B,)`` expected log-likelihood (or mass) of each episode's next-item target."""
        check_batch(scores, episode, self._bound().shape[1])
        rows = SparseRows(self.episode_targets(episode), scores.device)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            batch_row, item, weight = rows.coordinates(torch.arange(len(scores), device=scores.device))
            logits = masked_logits(scores, episode.visible, self.temperature)
            value = sparse_target_value(logits, batch_row, item, weight, self.objective)
        return value if self.differentiable else value.detach()

    def config(self) -> dict:
        return {**super().config(), "context": self.context}
