"""The one chronological train / valid / test split protocol used for raw and synthetic data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from refit_gym.errors import ConfigError

DEFAULT_SPLIT_RATIOS: tuple[float, float, float] = (0.7, 0.2, 0.1)
_ROUNDING_EPSILON = 1e-9  # so that e.g. 5 * 0.9 = 4.4999999... still rounds half up to 5


@dataclass(frozen=True)
class SplitIndices:
    """Row indices into the arrays given to :func:`chronological_split`.

    Attributes:
        train, valid, test: int64 indices of the kept rows of each split, ordered by user,
            then timestamp, then file order; so ``train`` lists each user's training items
            oldest first.
        n_dropped_users: users removed because a split would be empty for them.
        n_dropped_duplicates: repeated ``(user, item)`` rows removed (the earliest is kept).
        n_dropped_unseen_items: valid / test rows removed because their item is not in train.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    n_dropped_users: int = 0
    n_dropped_duplicates: int = 0
    n_dropped_unseen_items: int = 0


def split_counts(
    n_interactions: np.ndarray, ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-user train / valid / test sizes, rounded at cumulative boundaries (half up).

    Args:
        n_interactions: int array, each user's number of interactions ``n``.
        ratios: ``(train, valid, test)`` fractions summing to 1.

    Returns:
        ``(n_train, n_valid, n_test)`` with ``n_train = round(n * r_train)``,
        ``n_train + n_valid = round(n * (r_train + r_valid))`` and the rest for test, where
        ``round`` rounds halves up. Example with 7:2:1: ``n = 10 -> 7/2/1``,
        ``n = 8 -> 6/1/1``, ``n = 6 -> 4/1/1``, ``n = 5 -> 4/1/0``.
    """
    ratio_train, ratio_valid, _ = _check_ratios(ratios)
    n_interactions = np.asarray(n_interactions, dtype=np.int64)
    train_end = np.floor(n_interactions * ratio_train + 0.5 + _ROUNDING_EPSILON).astype(np.int64)
    valid_end = np.floor(
        n_interactions * (ratio_train + ratio_valid) + 0.5 + _ROUNDING_EPSILON
    ).astype(np.int64)
    valid_end = np.minimum(valid_end, n_interactions)
    train_end = np.minimum(train_end, valid_end)
    return train_end, valid_end - train_end, n_interactions - valid_end


def chronological_split(
    users: np.ndarray,
    items: np.ndarray,
    times: Optional[np.ndarray] = None,
    ratios: Sequence[float] = DEFAULT_SPLIT_RATIOS,
) -> SplitIndices:
    """Split each user's interactions by time into train / valid / test, in that time order.

    This is *our* protocol for raw ratings (train oldest, then valid, then test: test is the
    future of validation). It is **not** the time order of DiffRec's released ML-1M split
    (``diffrec_ml-1m_clean``), which we measured to be train -> test -> valid: across a user's
    (valid, test) item pairs the valid item comes first 2.1 % of the time (``docs/data.md``).
    The ratios (7:2:1), per-user sizes and filtering follow DiffRec's description.

    The protocol, step by step:

    1. **Order.** Each user's interactions are sorted by ``times``; ties, and all rows when
       ``times`` is ``None``, keep the order of the input (file order).
    2. **Duplicates.** A repeated ``(user, item)`` pair keeps only its earliest occurrence, so
       an item can never be both a training input and a held-out target of the same user.
    3. **Per-user sizes.** A user with ``n`` interactions gets the oldest
       ``round(n * r_train)`` in train, the next ones up to ``round(n * (r_train + r_valid))``
       in valid and the most recent rest in test, ``round`` rounding halves up (see
       :func:`split_counts`; 7:2:1 gives 10 -> 7/2/1, 8 -> 6/1/1, 6 -> 4/1/1).
    4. **Too-short users are dropped.** A user for whom any split would be empty is removed
       entirely. With 7:2:1 this keeps exactly the users with at least 6 interactions.
    5. **Unseen items are dropped.** Valid / test rows whose item occurs in nobody's train
       split are removed, so every valid / test item also occurs in train (as in DiffRec's
       released split). A user left with an empty valid or test split by this is dropped as
       in step 4, which can in turn remove train items; steps 4-5 repeat until nothing
       changes (one or two passes in practice). Per-user sizes are not recomputed, so a
       user's ratio can move slightly away from 7:2:1.

    Args:
        users: non-negative int user ids, one per interaction.
        items: non-negative int item ids, one per interaction.
        times: timestamps (any numeric type), one per interaction, or ``None`` to use the
            input order as the chronological order.
        ratios: ``(train, valid, test)`` fractions, each > 0, summing to 1.

    Returns:
        :class:`SplitIndices` with row indices into the input arrays.

    Raises:
        ConfigError: bad ``ratios``, or arrays of different lengths / negative ids.
    """
    _check_ratios(ratios)
    users = np.asarray(users)
    items = np.asarray(items)
    n_rows = len(users)
    if len(items) != n_rows or (times is not None and len(times) != n_rows):
        raise ConfigError("chronological_split: users, items and times must have one length")
    if n_rows and (users.min() < 0 or items.min() < 0):
        raise ConfigError("chronological_split: user and item ids must be non-negative")
    # 1. order by user, then time; both sorts are stable, so ties keep the file order
    if times is None:
        order = np.argsort(users, kind="stable")
    elif _is_sorted_by_user_then_time(users, np.asarray(times)):
        order = np.arange(n_rows, dtype=np.int64)  # common for generated data; skips a sort
    else:
        order = np.lexsort((np.asarray(times), users))

    # 2. keep the earliest occurrence of each (user, item) pair, preserving the sorted order
    sorted_users = users[order].astype(np.int64)
    sorted_items = items[order].astype(np.int64)
    pair_keys = sorted_users * (int(items.max(initial=0)) + 1) + sorted_items
    by_pair = np.argsort(pair_keys, kind="stable")  # stable: a pair's first row is its earliest
    repeated = np.zeros(n_rows, dtype=bool)
    repeated[by_pair[1:]] = pair_keys[by_pair[1:]] == pair_keys[by_pair[:-1]]
    n_dropped_duplicates = int(repeated.sum())
    if n_dropped_duplicates:
        order = order[~repeated]
        sorted_users = sorted_users[~repeated]
        sorted_items = sorted_items[~repeated]

    # 3. per-user position and split sizes (rows are grouped by user, oldest first)
    is_group_start = np.ones(len(order), dtype=bool)
    is_group_start[1:] = sorted_users[1:] != sorted_users[:-1]
    group_starts = np.flatnonzero(is_group_start)
    group_sizes = np.diff(np.r_[group_starts, len(order)]).astype(np.int64)
    n_groups = len(group_starts)
    n_train, n_valid, n_test = split_counts(group_sizes, ratios)
    position = np.arange(len(order), dtype=np.int64) - np.repeat(group_starts, group_sizes)
    part = np.full(len(order), 2, dtype=np.int8)  # 0 train, 1 valid, 2 test
    part[position < np.repeat(n_train + n_valid, group_sizes)] = 1
    part[position < np.repeat(n_train, group_sizes)] = 0

    # 4-5. drop too-short users and unseen valid/test items until stable
    user_kept = (n_train > 0) & (n_valid > 0) & (n_test > 0)
    user_slot = np.repeat(np.arange(n_groups), group_sizes)
    row_kept = np.ones(len(order), dtype=bool)
    n_items_space = int(items.max(initial=0)) + 1
    n_dropped_unseen = 0
    while True:
        row_kept &= user_kept[user_slot]
        in_train = row_kept & (part == 0)
        train_item_seen = np.zeros(n_items_space, dtype=bool)
        train_item_seen[sorted_items[in_train]] = True
        unseen_heldout = row_kept & (part != 0) & ~train_item_seen[sorted_items]
        n_dropped_unseen += int(unseen_heldout.sum())
        row_kept &= ~unseen_heldout
        valid_left = np.bincount(user_slot[row_kept & (part == 1)], minlength=n_groups)
        test_left = np.bincount(user_slot[row_kept & (part == 2)], minlength=n_groups)
        still_kept = user_kept & (valid_left > 0) & (test_left > 0)
        if np.array_equal(still_kept, user_kept):
            break
        user_kept = still_kept

    return SplitIndices(
        train=order[row_kept & (part == 0)].astype(np.int64),
        valid=order[row_kept & (part == 1)].astype(np.int64),
        test=order[row_kept & (part == 2)].astype(np.int64),
        n_dropped_users=int(n_groups - user_kept.sum()),
        n_dropped_duplicates=n_dropped_duplicates,
        n_dropped_unseen_items=n_dropped_unseen,
    )


def _is_sorted_by_user_then_time(users: np.ndarray, times: np.ndarray) -> bool:
    """Whether rows are already grouped by ascending user with ascending times within a user."""
    if len(users) < 2:
        return True
    user_step = np.diff(users)
    if (user_step < 0).any():
        return False
    same_user = user_step == 0
    return not (same_user & (times[1:] < times[:-1])).any()


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Validate ``(train, valid, test)`` ratios: three positive numbers summing to 1."""
    try:
        ratio_train, ratio_valid, ratio_test = (float(r) for r in ratios)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"split ratios must be three numbers (train, valid, test), got {ratios!r}"
        ) from error
    if min(ratio_train, ratio_valid, ratio_test) <= 0 or abs(
        ratio_train + ratio_valid + ratio_test - 1.0
    ) > 1e-6:
        raise ConfigError(
            f"split ratios must be positive and sum to 1, got {tuple(ratios)!r}"
        )
    return ratio_train, ratio_valid, ratio_test
