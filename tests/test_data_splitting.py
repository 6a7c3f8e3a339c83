"""The chronological 7:2:1 split protocol."""

from __future__ import annotations

import numpy as np
import pytest

from refit_gym.data import chronological_split
from refit_gym.data.splitting import split_counts
from refit_gym.errors import ConfigError


def test_split_counts_round_half_up_at_cumulative_boundaries():
    n_train, n_valid, n_test = split_counts(np.array([10, 20, 8, 6, 5, 3, 100]))
    assert n_train.tolist() == [7, 14, 6, 4, 4, 2, 70]
    assert n_valid.tolist() == [2, 4, 1, 1, 1, 1, 20]
    assert n_test.tolist() == [1, 2, 1, 1, 0, 0, 10]


def _random_log(seed: int = 0, n_users: int = 40, n_items: int = 60):
    rng = np.random.default_rng(seed)
    users, items, times = [], [], []
    for user in range(n_users):
        n = rng.integers(3, 40)
        users += [user] * n
        items += rng.choice(n_items, size=n, replace=False).tolist()
        times += rng.integers(0, 1000, size=n).tolist()
    order = rng.permutation(len(users))  # file order unrelated to time
    return np.array(users)[order], np.array(items)[order], np.array(times)[order]


def test_split_is_chronological_disjoint_and_in_ratio():
    users, items, times = _random_log()
    split = chronological_split(users, items, times)
    counts = np.bincount(users)
    kept = np.unique(users[split.train])
    for user in kept:
        rows = {name: getattr(split, name)[users[getattr(split, name)] == user] for name in ("train", "valid", "test")}
        sizes = [len(rows[name]) for name in ("train", "valid", "test")]
        expected = [int(x[user]) for x in split_counts(counts)]
        assert sizes[0] == expected[0]  # train is never trimmed
        assert sizes[1] <= expected[1] and sizes[2] <= expected[2]
        assert min(sizes) >= 1
        train_times, valid_times, test_times = (times[rows[name]] for name in ("train", "valid", "test"))
        assert np.all(np.diff(train_times) >= 0)  # train rows listed oldest first
        assert train_times.max() <= valid_times.min() and valid_times.max() <= test_times.min()
    all_rows = np.concatenate([split.train, split.valid, split.test])
    assert len(np.unique(all_rows)) == len(all_rows)  # disjoint
    train_items = set(items[split.train].tolist())
    assert set(items[split.valid].tolist()) <= train_items
    assert set(items[split.test].tolist()) <= train_items
    assert set(np.flatnonzero(counts < 6)).isdisjoint(kept)  # too-short users dropped
    assert split.n_dropped_users == len(set(users.tolist()) - set(kept.tolist()))


def _with_two_helper_users(users, items, times=None):
    """Append users 100 and 101 who, between them, have every item 0..9 in train."""
    helper_items = list(range(10)) + list(range(9, -1, -1))
    users = np.concatenate([users, [100] * 10 + [101] * 10])
    items = np.concatenate([items, helper_items])
    if times is not None:
        times = np.concatenate([times, np.zeros(20)])
    return users, items, times


def _rows_of(split, users, user):
    return {name: getattr(split, name)[users[getattr(split, name)] == user] for name in ("train", "valid", "test")}


def test_ties_and_missing_times_keep_file_order():
    for times in (None, np.zeros(10)):
        users, items, times = _with_two_helper_users(np.zeros(10, int), np.arange(10)[::-1].copy(), times)
        split = chronological_split(users, items, times)
        rows = _rows_of(split, users, 0)
        assert items[rows["train"]].tolist() == [9, 8, 7, 6, 5, 4, 3]
        assert items[rows["valid"]].tolist() == [2, 1]
        assert items[rows["test"]].tolist() == [0]


def test_held_out_items_unseen_in_train_are_dropped_and_users_left_empty_too():
    # user 0: 10 items, test item 99 occurs in nobody's train -> user 0 loses its only test item
    users = np.array([0] * 10 + [1] * 10 + [2] * 10)
    items = np.array(list(range(9)) + [99] + [7, 8, 9, 0, 1, 2, 3, 4, 5, 6] + list(range(10)))
    split = chronological_split(users, items)
    assert 99 not in items[split.test]
    assert set(users[split.train].tolist()) == {1, 2}
    assert split.n_dropped_users == 1 and split.n_dropped_unseen_items >= 1


def test_duplicates_keep_the_earliest():
    users, items, times = _with_two_helper_users(
        np.zeros(11, dtype=int), np.array([5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 5]), np.arange(11.0)
    )
    split = chronological_split(users, items, times)
    assert split.n_dropped_duplicates == 1
    rows = _rows_of(split, users, 0)
    assert items[rows["train"]].tolist() == [5, 0, 1, 2, 3, 4, 6]
    assert items[rows["test"]].tolist() == [9]


def test_bad_ratios_are_rejected():
    with pytest.raises(ConfigError):
        chronological_split(np.zeros(3, int), np.arange(3), ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError):
        chronological_split(np.zeros(3, int), np.arange(3), ratios=(1.0, 0.0, 0.0))
