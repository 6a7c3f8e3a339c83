"""Turning split interaction rows into an :class:`InteractionData` with compact ids."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.data.splitting import SplitIndices


def interaction_data_from_split(
    name: str,
    users: np.ndarray,
    items: np.ndarray,
    split: SplitIndices,
    *,
    source: str,
    item_titles: Optional[Sequence[str]] = None,
    extras: Optional[dict] = None,
) -> InteractionData:
    """Renumber the users and items that survived a split to ``0..n-1`` and build the data.

    New ids follow the order of the input ids (the smallest kept input user id becomes user
    0, and so on). Only users and items present in train are kept; the split protocol
    guarantees every valid / test user and item is among them.

    Args:
        name: the dataset name stored in the result.
        users, items: non-negative int ids, one per interaction (the arrays that were split).
        split: the output of :func:`~refit_gym.data.splitting.chronological_split`.
        source: where the data came from, stored in the result.
        item_titles: optional titles indexed by *input* item id.
        extras: extra entries for ``InteractionData.extras``.

    Returns:
        The data, with ``extras["input_user_ids"]`` / ``extras["input_item_ids"]`` giving the
        input id of each new user / item id, and ``extras["split_drops"]`` the split's counts
        of dropped users, duplicates and unseen held-out items.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    kept_user_ids = np.flatnonzero(np.bincount(users[split.train], minlength=1))
    kept_item_ids = np.flatnonzero(np.bincount(items[split.train], minlength=1))
    new_user_id = _lookup_table(kept_user_ids, int(users.max(initial=0)) + 1)
    new_item_id = _lookup_table(kept_item_ids, int(items.max(initial=0)) + 1)

    def renumbered(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return new_user_id[users[rows]], new_item_id[items[rows]]

    n_users, n_items = len(kept_user_ids), len(kept_item_ids)
    train_users, train_items = renumbered(split.train)
    valid_users, valid_items = renumbered(split.valid)
    test_users, test_items = renumbered(split.test)
    titles = None
    if item_titles is not None:
        titles = tuple(str(item_titles[int(i)]) for i in kept_item_ids)
    all_extras = {
        "input_user_ids": kept_user_ids,
        "input_item_ids": kept_item_ids,
        "split_drops": {
            "users": split.n_dropped_users,
            "duplicates": split.n_dropped_duplicates,
            "unseen_heldout_items": split.n_dropped_unseen_items,
        },
    }
    all_extras.update(extras or {})
    return InteractionData(
        name=name,
        train=pairs_to_csr(train_users, train_items, n_users, n_items),
        valid=pairs_to_csr(valid_users, valid_items, n_users, n_items),
        test=pairs_to_csr(test_users, test_items, n_users, n_items),
        train_sequences=UserSequences.from_pairs(train_users, train_items, n_users),
        item_titles=titles,
        source=source,
        extras=all_extras,
    )


def _lookup_table(kept_ids: np.ndarray, id_space: int) -> np.ndarray:
    """An array mapping each kept input id to its rank among ``kept_ids`` (others to -1)."""
    table = np.full(id_space, -1, dtype=np.int64)
    table[kept_ids] = np.arange(len(kept_ids), dtype=np.int64)
    return table
