"""Metrics against a plain-Python reference (DiffRec's computeTopNAccuracy, per user)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refit_gym.errors import ConfigError, DataError, RefitGymError
from refit_gym.evaluation.metrics import (
    MetricAccumulator,
    mask_and_rank,
    metric_names,
    ranking_metrics,
    sequential_metrics,
    top_k_lowest_id_first,
)


def reference_user_metrics(ranked: list[int], truth: set[int], k: int) -> dict[str, float]:
    """DiffRec's per-user loop, written out."""
    if not truth:
        return {"precision": 0.0, "recall": 0.0, "ndcg": 0.0, "mrr": 0.0, "hr": 0.0}
    hits, dcg, idcg, mrr = 0, 0.0, 0.0, 0.0
    for j in range(k):
        if ranked[j] in truth:
            dcg += 1.0 / math.log2(j + 2)
            if mrr == 0.0:
                mrr = 1.0 / (j + 1)
            hits += 1
        if j < len(truth):
            idcg += 1.0 / math.log2(j + 2)
    return {
        "precision": hits / k,
        "recall": hits / len(truth),
        "ndcg": dcg / idcg,
        "mrr": mrr,
        "hr": 1.0 if hits else 0.0,
    }


def reference_rank(scores: list[float], excluded: set[int], k: int) -> list[int]:
    order = sorted((i for i in range(len(scores)) if i not in excluded), key=lambda i: -scores[i])
    return (order + [-1] * k)[:k]


def random_truth(rng, n_users, n_items, max_size) -> sp.csr_matrix:
    rows = []
    for u in range(n_users):
        size = 0 if u % 7 == 0 else int(rng.integers(1, max_size + 1))
        rows.append(rng.choice(n_items, size=size, replace=False))
    data = [(u, i) for u, items in enumerate(rows) for i in items]
    u, i = (np.array(x, dtype=np.int64) for x in zip(*data))
    return sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(n_users, n_items))


def csr_rows(matrix: sp.csr_matrix) -> list[set[int]]:
    ptr = matrix.indptr
    return [set(matrix.indices[ptr[u] : ptr[u + 1]].tolist()) for u in range(matrix.shape[0])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_metrics_match_reference(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, ks = 50, 80, (1, 5, 10, 20)
    truth = random_truth(rng, n_users, n_items, max_size=35)  # empty rows, |GT| > K, |GT| < K
    top = np.stack([rng.permutation(n_items)[:20] for _ in range(n_users)])
    got = ranking_metrics(torch.from_numpy(top), truth, ks)
    assert list(got) == metric_names(ks)
    truth_sets = csr_rows(truth)
    for k in ks:
        for name in ("recall", "ndcg", "precision", "mrr"):
            expected = [
                reference_user_metrics(top[u].tolist(), truth_sets[u], k)[name]
                for u in range(n_users)
            ]
            np.testing.assert_allclose(got[f"{name}@{k}"].numpy(), expected, rtol=0, atol=1e-12)


def test_sequential_metrics_match_reference():
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 30
    items = rng.integers(0, n_items, size=n_users)
    keep = np.arange(n_users) % 9 != 0  # a few users without a held-out item
    truth = sp.csr_matrix(
        (np.ones(keep.sum(), np.float32), (np.arange(n_users)[keep], items[keep])),
        shape=(n_users, n_items),
    )
    top = np.stack([rng.permutation(n_items)[:20] for _ in range(n_users)])
    got = sequential_metrics(torch.from_numpy(top), truth, ks=(10, 20))
    assert list(got) == ["hr@10", "hr@20", "ndcg@10", "ndcg@20"]
    truth_sets = csr_rows(truth)
    for k in (10, 20):
        for name in ("hr", "ndcg"):
            expected = [
                reference_user_metrics(top[u].tolist(), truth_sets[u], k)[name]
                for u in range(n_users)
            ]
            np.testing.assert_allclose(got[f"{name}@{k}"].numpy(), expected, atol=1e-12)
    # The same formulas as the CF protocol with |GT| = 1.
    cf = ranking_metrics(torch.from_numpy(top), truth, (10, 20))
    torch.testing.assert_close(got["hr@10"], cf["recall@10"])
    torch.testing.assert_close(got["ndcg@20"], cf["ndcg@20"])


def test_sequential_rejects_several_held_out_items():
    truth = sp.csr_matrix(np.array([[1, 1, 0, 0]], dtype=np.float32))
    with pytest.raises(DataError, match="at most one"):
        sequential_metrics(torch.tensor([[0, 1, 2]]), truth, ks=(2,))


def test_padding_slot_is_never_a_hit():
    # Row 1's last item is item 3: its key equals row 2's (-1) slot key if -1 were not masked.
    truth = sp.csr_matrix(np.array([[0, 0, 0, 1], [1, 0, 0, 0]], dtype=np.float32))
    got = ranking_metrics(torch.tensor([[0, 1], [2, -1]]), truth, ks=(2,))
    assert got["recall@2"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_and_rank_matches_reference_and_never_ranks_excluded(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 40, 50, 12
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randperm(n_users * n_items, generator=gen).float()
    scores = scores.reshape(n_users, n_items)  # distinct scores: no ties
    exclude = random_truth(rng, n_users, n_items, max_size=30)
    # One user has only 5 rankable items (fewer than k): the rest of its row is padding.
    dense = exclude.toarray()
    dense[1, :] = 1
    dense[1, :5] = 0
    exclude = sp.csr_matrix(dense)
    before = scores.clone()
    top = mask_and_rank(scores, exclude, k)
    torch.testing.assert_close(scores, before)  # not in place by default
    excluded_sets = csr_rows(exclude)
    for u in range(n_users):
        assert top[u].tolist() == reference_rank(scores[u].tolist(), excluded_sets[u], k)
        assert not set(top[u].tolist()) & excluded_sets[u]
    assert top[1, 5:].eq(-1).all() and set(top[1, :5].tolist()) == set(range(5))

    inplace = scores.clone()
    top2 = mask_and_rank(inplace, exclude, k, inplace=True)
    assert torch.equal(top, top2)
    assert torch.isinf(inplace[torch.from_numpy(dense > 0)]).all()


@pytest.mark.parametrize("n_items", [7, 60, 5000])
def test_ties_rank_the_lower_item_id_first(n_items):
    """Scores from a handful of values (most of them tied): the ranking is the stable sort's, whatever
    order ``torch.topk``'s kernel leaves equal values in (it differs with the row length)."""
    gen = torch.Generator().manual_seed(n_items)
    n_users = 30
    scores = torch.randint(0, 4, (n_users, n_items), generator=gen).float()
    scores[0] = 1.0  # a constant row
    scores[1, :] = float("-inf")  # only 3 rankable items, tied
    scores[1, [n_items - 1, 2, n_items // 2]] = 0.5
    for k in sorted({1, 2, 3, 5, n_items // 2 + 1, n_items}):
        values, top = top_k_lowest_id_first(scores.clone(), k)
        for u in range(n_users):
            expected = sorted(range(n_items), key=lambda i: -float(scores[u, i]))[:k]
            assert top[u].tolist() == expected, (u, k)
            assert values[u].tolist() == scores[u, expected].tolist()
    exclude = sp.csr_matrix(np.isinf(scores.numpy()).astype(np.float32))
    top = mask_and_rank(scores, exclude, 5)
    assert top[0].tolist() == [0, 1, 2, 3, 4]
    assert top[1].tolist() == sorted([n_items - 1, 2, n_items // 2]) + [-1, -1]


def test_constant_scores_rank_items_in_id_order():
    """A model without preferences gets the first K ids, the same on every row length and batch: its hit
    rate is the share of held-out items among them, never inflated toward the held-out item."""
    n_users, n_items, k = 50, 3000, 20
    rng = np.random.default_rng(0)
    held_out = rng.integers(0, n_items, n_users)
    held_out[:5] = np.arange(5)  # five users' held-out item is among the first K ids
    truth = sp.csr_matrix((np.ones(n_users, np.float32), (np.arange(n_users), held_out)), shape=(n_users, n_items))
    top = mask_and_rank(torch.zeros(n_users, n_items), sp.csr_matrix((n_users, n_items)), k)
    assert torch.equal(top, torch.arange(k).expand(n_users, k))
    hr = ranking_metrics(top, truth, ks=(k,), protocol="sequential")[f"hr@{k}"]
    assert float(hr.mean()) == np.mean(held_out < k)


def test_accumulator_average_over_all_and_nonempty():
    values = {"recall@1": torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)}
    for mode, expected in (("all", 1.5 / 5), ("nonempty", 1.5 / 3)):
        acc = MetricAccumulator(average_over=mode)
        acc.add(values, np.array([2, 0, 1]))
        acc.add({"recall@1": torch.tensor([0.0, 0.0], dtype=torch.float64)}, np.array([0, 3]))
        assert acc.result() == {"recall@1": pytest.approx(expected, abs=1e-15)}
    with pytest.raises(ConfigError, match="average_over"):
        MetricAccumulator(average_over="some")
    empty = MetricAccumulator("nonempty")
    empty.add({"recall@1": torch.zeros(2, dtype=torch.float64)}, [0, 0])
    assert math.isnan(empty.result()["recall@1"])


def test_bad_inputs_raise_library_errors():
    scores = torch.rand(3, 5)
    exclude = sp.csr_matrix((3, 5), dtype=np.float32)
    with pytest.raises(ConfigError, match="k must be an int in \\[1, n_items=5\\]"):
        mask_and_rank(scores, exclude, 6)
    with pytest.raises(ConfigError):
        mask_and_rank(scores, exclude, 0)
    with pytest.raises(ConfigError, match="k must be an int in \\[0, n_items=5\\]"):
        top_k_lowest_id_first(scores, 6)
    with pytest.raises(DataError, match="exclusion matrix has shape"):
        mask_and_rank(scores, sp.csr_matrix((3, 4), dtype=np.float32), 2)
    with pytest.raises(DataError, match="shape"):
        mask_and_rank(torch.rand(5), exclude, 2)
    with pytest.raises(DataError, match="NaN"):
        mask_and_rank(torch.full((3, 5), float("nan")), exclude, 2)
    with pytest.raises(DataError, match="floating"):
        mask_and_rank(torch.ones(3, 5, dtype=torch.long), exclude, 2)
    top = torch.tensor([[0, 1], [1, 2], [2, 3]])
    with pytest.raises(ConfigError, match="max\\(ks\\)=3 exceeds"):
        ranking_metrics(top, exclude, ks=(3,))
    with pytest.raises(DataError, match="rows"):
        ranking_metrics(top, sp.csr_matrix((2, 5), dtype=np.float32), ks=(2,))
    with pytest.raises(ConfigError, match="protocol"):
        ranking_metrics(top, exclude, ks=(2,), protocol="loo")
    with pytest.raises(ConfigError, match="ks"):
        ranking_metrics(top, exclude, ks=(0,))
    with pytest.raises(ConfigError):
        metric_names(ks=())
    assert issubclass(ConfigError, RefitGymError) and issubclass(DataError, RefitGymError)
