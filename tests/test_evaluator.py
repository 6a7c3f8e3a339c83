"""The evaluator: one score call per batch for both splits, exact metrics, batch independence."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.errors import ConfigError, DataError
from refit_gym.evaluation import EvaluationProtocol, EvaluationResult, check_recommender, evaluate, ranking_metrics


def tiny_data(n_users=23, n_items=40, seed=0) -> InteractionData:
    """Random disjoint train / valid / test; some users have an empty valid or test row."""
    rng = np.random.default_rng(seed)
    pairs = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        items = rng.permutation(n_items)[: int(rng.integers(3, 25))]
        n_valid = 0 if u % 5 == 0 else max(1, len(items) // 4)
        n_test = 0 if u % 6 == 1 else max(1, len(items) // 5)
        split = {
            "valid": items[:n_valid],
            "test": items[n_valid : n_valid + n_test],
            "train": items[n_valid + n_test :],
        }
        for name, chosen in split.items():
            pairs[name] += [(u, i) for i in chosen]
    mats = {}
    for name, p in pairs.items():
        arr = np.array(p, dtype=np.int64)
        mats[name] = pairs_to_csr(arr[:, 0], arr[:, 1], n_users, n_items)
    train = np.array(pairs["train"], dtype=np.int64)
    return InteractionData(
        name="tiny",
        train=mats["train"],
        valid=mats["valid"],
        test=mats["test"],
        train_sequences=UserSequences.from_pairs(train[:, 0], train[:, 1], n_users),
    )


class FixedScores:
    """Distinct random scores per (user, item); records every call's users and histories (a spy)."""

    def __init__(self, n_users, n_items, seed=0):
        gen = torch.Generator().manual_seed(seed)
        table = torch.randperm(n_users * n_items, generator=gen).float()
        self.table = table.reshape(n_users, n_items)
        self.n_items = n_items
        self.calls: list[list[int]] = []
        self.histories = []

    def score(self, history) -> torch.Tensor:
        self.calls.append(history.users.tolist())
        self.histories.append(history)
        return self.table[history.users]


def reference_means(table, data: InteractionData, split: str, k: int) -> dict[str, float]:
    """Plain Python: rank, mask, DiffRec metrics, average over all users."""
    excluded = data.seen_before(split).toarray() > 0
    truth = data.split(split).toarray() > 0
    sums = {"recall": 0.0, "ndcg": 0.0, "precision": 0.0, "mrr": 0.0}
    for u in range(data.n_users):
        row = table[u].tolist()
        rankable = [i for i in range(data.n_items) if not excluded[u, i]]
        ranked = sorted(rankable, key=lambda i: -row[i])[:k]
        gt = {i for i in range(data.n_items) if truth[u, i]}
        if not gt:
            continue
        hits = [j for j, i in enumerate(ranked) if i in gt]
        sums["precision"] += len(hits) / k
        sums["recall"] += len(hits) / len(gt)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(len(gt), k)))
        sums["ndcg"] += sum(1 / math.log2(j + 2) for j in hits) / idcg
        sums["mrr"] += 1 / (hits[0] + 1) if hits else 0.0
    return {f"{name}@{k}": total / data.n_users for name, total in sums.items()}


def test_metrics_match_plain_python_reference():
    data = tiny_data()
    rec = FixedScores(data.n_users, data.n_items)
    result = evaluate(rec, data, ks=(3, 10))
    assert check_recommender(rec) == data.n_items
    assert list(result.metrics) == ["valid", "test"]
    for split in ("valid", "test"):
        for k in (3, 10):
            for key, value in reference_means(rec.table, data, split, k).items():
                assert result.metrics[split][key] == pytest.approx(value, abs=1e-12), (split, key)


def test_score_called_once_per_batch_for_both_splits():
    data = tiny_data(n_users=23)
    rec = FixedScores(data.n_users, data.n_items)
    evaluate(rec, data, splits=("test", "valid"), ks=(5,), batch_size=10)
    assert rec.calls == [list(range(0, 10)), list(range(10, 20)), list(range(20, 23))]


def test_batch_size_independence():
    data = tiny_data(seed=1)
    rec = FixedScores(data.n_users, data.n_items, seed=1)
    small = evaluate(rec, data, ks=(5, 10), batch_size=7, export_topk=10)
    large = evaluate(rec, data, ks=(5, 10), batch_size=1000, export_topk=10)
    for split in ("valid", "test"):
        assert small.metrics[split] == pytest.approx(large.metrics[split], abs=1e-14)
        np.testing.assert_array_equal(small.top_items[split], large.top_items[split])


def test_export_topk_excludes_masked_items_and_matches_metrics():
    data = tiny_data(seed=2)
    rec = FixedScores(data.n_users, data.n_items, seed=2)
    result = evaluate(rec, data, ks=(5, 10), export_topk=10, batch_size=8)
    for split in ("valid", "test"):
        top = result.top_items[split]
        assert top.shape == (data.n_users, 10) and top.dtype == np.int64
        seen = data.seen_before(split).toarray() > 0
        for u in range(data.n_users):
            assert not seen[u, top[u][top[u] >= 0]].any()
        recomputed = ranking_metrics(torch.from_numpy(top), data.split(split), ks=(5, 10))
        for key, values in recomputed.items():
            mean = float(values.sum()) / data.n_users
            assert result.metrics[split][key] == pytest.approx(mean, abs=1e-12)
    valid_seen = data.train.toarray() > 0
    assert (valid_seen[np.arange(data.n_users)[:, None], result.top_items["valid"]] == 0).all()


def test_average_over_nonempty_rescales():
    data = tiny_data()
    rec = FixedScores(data.n_users, data.n_items)
    all_users = evaluate(rec, data, splits="valid", ks=(10,))
    nonempty = evaluate(rec, data, splits="valid", ks=(10,), average_over="nonempty")
    n_nonempty = int((np.diff(data.valid.indptr) > 0).sum())
    assert n_nonempty < data.n_users
    ratio = data.n_users / n_nonempty
    for key, value in all_users.metrics["valid"].items():
        assert nonempty.metrics["valid"][key] == pytest.approx(value * ratio, abs=1e-12)


def test_recommender_storage_is_not_modified():
    data = tiny_data()

    class SliceScores(FixedScores):
        def score(self, history):
            users = history.users
            return self.table[int(users[0]) : int(users[-1]) + 1]  # a view of the table

    rec = SliceScores(data.n_users, data.n_items)
    before = rec.table.clone()
    evaluate(rec, data, ks=(5,), batch_size=6)
    assert torch.equal(rec.table, before)


def test_result_json_and_format():
    data = tiny_data()
    result = evaluate(FixedScores(data.n_users, data.n_items), data, ks=(10, 20), progress=True)
    assert isinstance(result, EvaluationResult)
    loaded = json.loads(result.to_json())
    assert loaded["metrics"]["test"]["recall@20"] == result.metrics["test"]["recall@20"]
    assert loaded["ks"] == [10, 20] and loaded["n_users"] == data.n_users
    assert "valid: recall@10=" in result.format()


def test_sequential_protocol_keys():
    data = tiny_data()
    # Keep one held-out item (the lowest id) per user: a leave-one-out split.
    def first(m: sp.csr_matrix) -> sp.csr_matrix:
        users = np.flatnonzero(np.diff(m.indptr) > 0)
        items = m.indices[m.indptr[users]]
        return sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=m.shape)

    loo = InteractionData(
        name="loo", train=data.train, valid=first(data.valid), test=first(data.test),
        train_sequences=data.train_sequences,
    )
    rec = FixedScores(loo.n_users, loo.n_items)
    result = evaluate(rec, loo, ks=(10, 20), protocol="sequential", batch_size=100)
    assert list(result.metrics["test"]) == ["hr@10", "hr@20", "ndcg@10", "ndcg@20"]
    # valid is predicted from the training sequence, test from it followed by the valid item
    valid_history, test_history = rec.histories
    for u in range(loo.n_users):
        train = list(loo.train_sequences[u])
        shown_valid = valid_history.items[u][valid_history.visible[u]].tolist()
        shown_test = test_history.items[u][test_history.visible[u]].tolist()
        assert shown_valid == train and shown_test == train + loo.valid[u].indices.tolist()
    # nothing is excluded by default (DiffuRec); mask_history excludes the history items
    unmasked = evaluate(rec, loo, ks=(10,), splits="test", protocol="sequential", export_topk=10)
    masked = evaluate(rec, loo, ks=(10,), splits="test", protocol=EvaluationProtocol("sequential", mask_history=True),
                      export_topk=10)
    seen = loo.seen_before("test").toarray() > 0
    rows = np.arange(loo.n_users)[:, None]
    assert seen[rows, unmasked.top_items["test"]].any()
    assert not seen[rows, masked.top_items["test"]].any()


def test_cf_histories_are_the_training_sequences_only():
    data = tiny_data()
    rec = FixedScores(data.n_users, data.n_items)
    evaluate(rec, data, ks=(5,), batch_size=100)
    (history,) = rec.histories
    rows = history.rows().numpy()
    np.testing.assert_array_equal(rows, data.train.toarray())  # never a valid or test item


def test_bad_inputs_raise_library_errors():
    data = tiny_data()
    rec = FixedScores(data.n_users, data.n_items)
    with pytest.raises(ConfigError, match="unknown evaluation split 'train'"):
        evaluate(rec, data, splits=("train",))
    with pytest.raises(ConfigError, match="only 40 items"):
        evaluate(rec, data, ks=(10, 50))
    with pytest.raises(ConfigError, match="only 40 items"):
        evaluate(rec, data, ks=(10,), export_topk=41)
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate(rec, data, batch_size=0)
    with pytest.raises(ConfigError, match="protocol"):
        evaluate(rec, data, ks=(10,), protocol="loo")

    class WrongShape(FixedScores):
        def score(self, history):
            return super().score(history)[:, :-1]

    with pytest.raises(DataError, match=r"scores have shape \(23, 39\); expected \(23, 40\)"):
        evaluate(WrongShape(data.n_users, data.n_items), data, ks=(10,), batch_size=100)

    other = FixedScores(data.n_users, data.n_items + 1)
    with pytest.raises(DataError, match="scores 41 items but tiny has 40"):
        evaluate(other, data, ks=(10,))


@pytest.mark.parametrize("average_over", ["all", "nonempty"])
def test_user_shards_combine_to_the_whole_evaluation(average_over):
    from refit_gym.evaluation.evaluator import combine_shards

    data = tiny_data(seed=4)
    rec = FixedScores(data.n_users, data.n_items, seed=4)
    whole = evaluate(rec, data, ks=(5, 10), average_over=average_over).metrics
    shards = [evaluate(rec, data, ks=(5, 10), average_over=average_over, users=users, batch_size=4)
              for users in (range(0, 9), range(9, 17), range(17, data.n_users))]
    combined = combine_shards(shards)
    for split in whole:
        assert combined[split] == pytest.approx(whole[split], abs=1e-12)
    assert sum(r.n_users for r in shards) == data.n_users
    with pytest.raises(ConfigError, match="contiguous range"):
        evaluate(rec, data, ks=(10,), users=range(0, 100))
