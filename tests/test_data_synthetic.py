"""The synthetic dataset: deterministic, split like real data, and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from refit_gym.data import make_synthetic
from refit_gym.errors import ConfigError


def _valid_recall_at_20(scores: np.ndarray, data) -> float:
    """Mean valid Recall@20 over users, train items masked (the DiffRec protocol)."""
    scores = np.array(scores, dtype=np.float64)
    scores[data.train.toarray() > 0] = -np.inf
    top = np.argpartition(-scores, 20, axis=1)[:, :20]
    truth = data.valid.toarray() > 0
    hits = np.take_along_axis(truth, top, axis=1).sum(axis=1)
    return float(np.mean(hits / np.minimum(truth.sum(axis=1), 20)))


def _same(a, b) -> bool:
    return all((getattr(a, s) != getattr(b, s)).nnz == 0 for s in ("train", "valid", "test")) and np.array_equal(
        a.train_sequences.items, b.train_sequences.items
    )


def test_same_seed_same_data_different_seed_differs(synthetic_data):
    again = make_synthetic(seed=0)
    assert synthetic_data.train.shape == again.train.shape and _same(synthetic_data, again)
    other = make_synthetic(seed=1)
    assert other.train.shape != synthetic_data.train.shape or not _same(synthetic_data, other)


def test_sizes_and_split_shape(synthetic_data):
    data = synthetic_data
    assert 490 <= data.n_users <= 500 and 280 <= data.n_items <= 300
    summary = data.summary()
    total = summary["n_train"] + summary["n_valid"] + summary["n_test"]
    assert 0.03 < total / (data.n_users * data.n_items) < 0.08  # density ~ 0.05
    assert abs(summary["n_train"] / total - 0.7) < 0.03 and abs(summary["n_test"] / total - 0.1) < 0.03
    for user in range(data.n_users):  # every user in every split; splits disjoint
        train, valid, test = (set(data.split(s)[user].indices) for s in ("train", "valid", "test"))
        assert train and valid and test and not (train & valid) and not (valid & test) and not (train & test)
    assert set(data.valid.indices) | set(data.test.indices) <= set(data.train.indices)
    assert data.train_sequences.lengths.tolist() == np.diff(data.train.indptr).tolist()


def test_popularity_and_user_knn_beat_random(synthetic_data):
    data = synthetic_data
    train = data.train.toarray()
    random_recall = _valid_recall_at_20(np.random.default_rng(0).random(train.shape), data)
    popularity_recall = _valid_recall_at_20(np.broadcast_to(train.sum(axis=0), train.shape), data)
    normalised = train / np.linalg.norm(train, axis=1, keepdims=True)
    similarity = normalised @ normalised.T
    np.fill_diagonal(similarity, 0.0)
    similarity[similarity < -np.sort(-similarity, axis=1)[:, 49:50]] = 0.0  # 50 nearest users
    knn_recall = _valid_recall_at_20(similarity @ train, data)
    assert popularity_recall > 2.5 * random_recall
    assert knn_recall > 1.1 * popularity_recall


def test_recent_items_are_more_informative_than_old_ones(synthetic_data):
    data = synthetic_data
    train = data.train.toarray()
    columns = train / np.maximum(np.linalg.norm(train, axis=0, keepdims=True), 1e-12)
    item_similarity = columns.T @ columns
    np.fill_diagonal(item_similarity, 0.0)

    def profile(pick):
        rows = np.zeros_like(train)
        for user in range(data.n_users):
            rows[user, pick(data.train_sequences[user])] = 1.0
        return rows

    recent = _valid_recall_at_20(profile(lambda s: s[-5:]) @ item_similarity, data)
    oldest = _valid_recall_at_20(profile(lambda s: s[:5]) @ item_similarity, data)
    assert recent > 1.15 * oldest


def test_options_and_bad_arguments():
    small = make_synthetic(n_users=60, n_items=40, density=0.3, seed=5, drift=0.0, popularity_skew=0.0)
    assert small.n_users <= 60 and small.n_items <= 40 and "seed=5" in small.source
    assert small.extras["user_cluster"].shape == (small.n_users,)
    for bad in (dict(n_users=0), dict(density=0.0), dict(density=0.9), dict(drift=1.5), dict(min_interactions=2)):
        with pytest.raises(ConfigError):
            make_synthetic(**bad)
