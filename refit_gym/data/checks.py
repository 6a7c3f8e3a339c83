"""Checks the loaders share: ids without training rows, pairs repeated within a split, pairs
shared between splits.

Each works on ``(n, 2)`` int64 arrays of ``[user, item]`` pairs and reports row numbers, so a
loader can name the file, the row and the pair in its :class:`~refit_gym.errors.DataError`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SHOWN_EXAMPLES = 5
"""How many ids or pairs an error message lists."""


class MissingIds(NamedTuple):
    """Ids in ``0..largest`` that never occur in a column."""

    count: int
    first: list[int]


def missing_ids(ids: np.ndarray) -> MissingIds:
    """The ids in ``0..ids.max()`` absent from ``ids`` (non-negative ints, not empty).

    Sorts the distinct ids instead of counting into an array of size ``ids.max() + 1``, so a
    single stray id of 4 billion costs nothing.
    """
    distinct = np.unique(ids)
    count = int(distinct[-1]) + 1 - len(distinct)
    first: list[int] = []
    gap_ends = np.flatnonzero(np.diff(np.r_[-1, distinct]) > 1)
    for gap_end in gap_ends[:SHOWN_EXAMPLES]:
        previous = int(distinct[gap_end - 1]) if gap_end > 0 else -1
        first.extend(range(previous + 1, min(int(distinct[gap_end]), previous + 1 + SHOWN_EXAMPLES)))
    return MissingIds(count, first[:SHOWN_EXAMPLES])


def repeated_rows(pairs: np.ndarray) -> np.ndarray:
    """A boolean mask of the rows whose ``[user, item]`` pair already occurred in an earlier row."""
    _, first_rows = np.unique(_pair_keys(pairs, _item_id_space(pairs)), return_index=True)
    repeated = np.ones(len(pairs), dtype=bool)
    repeated[first_rows] = False
    return repeated


def rows_shared_with(pairs: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Row indices of ``pairs`` whose ``[user, item]`` pair also occurs in ``other``."""
    if not len(pairs) or not len(other):
        return np.zeros(0, dtype=np.int64)
    item_id_space = max(_item_id_space(pairs), _item_id_space(other))
    keys = _pair_keys(pairs, item_id_space)
    other_keys = np.sort(_pair_keys(other, item_id_space))  # sorted lookup: faster than np.isin here
    positions = np.minimum(np.searchsorted(other_keys, keys), len(other_keys) - 1)
    return np.flatnonzero(other_keys[positions] == keys)


def _item_id_space(pairs: np.ndarray) -> int:
    """One more than the largest item id (0 for no pairs)."""
    return int(pairs[:, 1].max(initial=0)) + 1


def _pair_keys(pairs: np.ndarray, item_id_space: int) -> np.ndarray:
    """One int64 per pair, ``user * item_id_space + item`` (loaders check ids are compact first,
    so this cannot overflow)."""
    return pairs[:, 0].astype(np.int64) * item_id_space + pairs[:, 1].astype(np.int64)
