"""The SASRec baseline: causality, the loss against a per-position reference, learning a sequential
pattern that popularity cannot, determinism, validation-only tuning, bad inputs and the CLI."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from refit_gym.baselines import (
    PopularityRecommender,
    SASRecRecommender,
    build_baseline,
    fit_baseline,
    tune_sasrec,
)
from refit_gym.baselines.sasrec import full_softmax_cross_entropy, grid_settings, training_windows
from refit_gym.cli import main
from refit_gym.data.history import SequenceTable
from refit_gym.data.interactions import InteractionData, UserSequences, pairs_to_csr
from refit_gym.errors import ConfigError, DataError, NotFittedError
from refit_gym.evaluation import evaluate

TINY = {"hidden": 16, "n_blocks": 1, "n_heads": 2, "max_len": 8, "batch_size": 32, "threads": 1}


def cycle_lists(n_users: int = 160, n_items: int = 24, seed: int = 0) -> list[list[int]]:
    """Each user's items follow one fixed cycle over all items from a random start (8 to 14 items):
    the next item is determined by the last one, while every item is about equally popular."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    lists = []
    for _ in range(n_users):
        start, length = rng.integers(n_items), rng.integers(8, 15)
        lists.append(cycle[(start + np.arange(length)) % n_items].tolist())
    return lists


def sequential_data(lists: list[list[int]], n_items: int, name: str = "cycle") -> InteractionData:
    """Leave-one-out data: the last item of each list is test, the one before it valid, the rest train."""
    n_users = len(lists)
    pairs = {key: ([], []) for key in ("train", "valid", "test")}
    for user, items in enumerate(lists):
        for key, part in (("train", items[:-2]), ("valid", items[-2:-1]), ("test", items[-1:])):
            pairs[key][0].extend([user] * len(part))
            pairs[key][1].extend(part)
    matrices = {key: pairs_to_csr(np.array(u), np.array(i), n_users, n_items) for key, (u, i) in pairs.items()}
    return InteractionData(name=name, **matrices,
                           train_sequences=UserSequences.from_lists([items[:-2] for items in lists]))


@pytest.fixture(scope="module")
def cycle_data() -> InteractionData:
    return sequential_data(cycle_lists(), 24)


@pytest.fixture(scope="module")
def trained(cycle_data) -> SASRecRecommender:
    return SASRecRecommender(**TINY, lr=1e-2, max_epochs=12, eval_every=3, seed=0).fit(cycle_data)


def test_training_windows_recent_and_random():
    sequences = UserSequences.from_lists([[1, 2, 3, 4, 5, 6], [7, 8], [9]])
    pad = 10
    recent = training_windows(sequences, np.array([0, 1, 2]), 4, pad)
    assert recent.tolist() == [[3, 4, 5, 6], [pad, pad, 7, 8], [pad, pad, pad, 9]]
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(50):
        window = training_windows(sequences, np.array([0, 1]), 4, pad, rng)
        first = window[0, 0]
        assert window[0].tolist() == list(range(first, first + 4))  # contiguous, in order
        assert window[1].tolist() == [pad, pad, 7, 8]  # short sequences: the whole sequence
        starts.add(int(first))
    assert starts == {1, 2, 3}  # every start of a 4-item window of 6 items


def test_scores_are_causal(trained, cycle_data):
    encoder = trained.encoder
    windows = torch.tensor([[24, 24, 3, 5, 7, 11, 13, 17], [1, 2, 3, 4, 5, 6, 7, 8]])
    changed = windows.clone()
    changed[:, 5] = torch.tensor([0, 23])
    with torch.no_grad():
        before, after = trained.logits(encoder(windows)), trained.logits(encoder(changed))
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)
    assert (before[:, 5:] - after[:, 5:]).abs().amax(-1).min() > 1e-3  # the change is seen from position 5 on
    # score() is the last position of the left-padded recent window
    history = SequenceTable(UserSequences.from_lists([[3, 5, 7, 11, 13, 17]]), 24).batch([0])
    torch.testing.assert_close(trained.score(history), before[:1, -1], rtol=0, atol=1e-5)


def test_loss_equals_a_per_position_reference(trained):
    pad = trained.n_items
    windows = torch.tensor([
        [pad, pad, pad, pad, pad, 4, 9, 2, 7],  # 4 items: 3 targets
        [1, 2, 3, 4, 5, 6, 7, 8, 9],  # full: 8 targets
        [pad, pad, pad, pad, pad, pad, pad, pad, 5],  # 1 item: no target
        [pad, pad, pad, pad, pad, pad, pad, 20, 21],  # 2 items: 1 target
    ])
    trained.encoder.eval()  # no dropout: the reference and the loss see the same network
    with torch.no_grad():
        loss = trained.loss(windows)
        weights = trained.encoder.item_embedding.weight[:pad]
        terms = []
        for row in range(windows.shape[0]):
            encodings = trained.encoder(windows[row : row + 1, :-1])[0]  # one pass per window, every prefix
            for position in range(windows.shape[1] - 1):
                item, following = int(windows[row, position]), int(windows[row, position + 1])
                if item == pad:
                    continue
                log_probabilities = torch.log_softmax(encodings[position] @ weights.T, dim=0)
                terms.append(-log_probabilities[following])
    assert len(terms) == 12
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="no \\(item, next item\\) pair"):
        trained.loss(windows[2:3])


def test_full_softmax_cross_entropy_matches_autograd():
    generator = torch.Generator().manual_seed(0)
    encodings = torch.randn(7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    items = torch.randn(11, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 5, 1, 2])
    loss = full_softmax_cross_entropy(encodings, items, targets)
    reference = F.cross_entropy(encodings @ items.T, targets)
    torch.testing.assert_close(loss, reference)
    grads = torch.autograd.grad(3.0 * loss, (encodings, items))
    expected = torch.autograd.grad(3.0 * reference, (encodings, items))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda e, i: full_softmax_cross_entropy(e, i, targets), (encodings, items))


def test_training_lowers_the_loss_and_beats_popularity(trained, cycle_data):
    assert trained.log[-1]["loss"] < 0.5 * trained.log[0]["loss"]
    assert trained.best_epoch is not None and trained.log[trained.best_epoch - 1]["ndcg@10"] == trained.best_score
    sasrec = evaluate(trained, cycle_data, ks=(1, 10)).metrics  # SASRec's own protocol: sequential
    popularity = evaluate(fit_baseline(PopularityRecommender(), cycle_data), cycle_data, ks=(1, 10),
                          protocol="sequential").metrics
    for split in ("valid", "test"):
        assert sasrec[split]["hr@1"] > 0.9, sasrec
        assert sasrec[split]["hr@10"] > popularity[split]["hr@10"] + 0.4, (sasrec, popularity)


def test_fit_is_deterministic_given_the_seed():
    lists = cycle_lists(n_users=60, n_items=24, seed=1)
    data = sequential_data([items + items for items in lists], 24)  # long histories: random windows differ
    settings = {**TINY, "max_len": 6, "window": "random", "max_epochs": 2, "eval_every": 1}
    history = SequenceTable(data.train_sequences, data.n_items).batch(np.arange(10))
    first = SASRecRecommender(**settings, seed=3).fit(data).score(history)
    second = SASRecRecommender(**settings, seed=3).fit(data).score(history)
    other = SASRecRecommender(**settings, seed=4).fit(data).score(history)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)
    scores = SASRecRecommender(**settings, seed=3).fit(data).score(history)
    scores[0, 0] = 1e9  # a fresh tensor each call
    assert torch.equal(SASRecRecommender(**settings, seed=3).fit(data).score(history), first)


def test_tune_sasrec_selects_on_validation_only(cycle_data):
    fixed = {**TINY, "max_epochs": 4, "eval_every": 2}
    del fixed["hidden"], fixed["n_heads"]
    grid = [{"hidden": 4, "n_heads": 1, "lr": 1e-5}, {"hidden": 16, "n_heads": 2, "lr": 1e-2}]
    tuning = tune_sasrec(cycle_data, grid, **fixed)
    assert tuning.best_params == grid[1]
    assert tuning.best_score == max(score for _, score in tuning.scores) == tuning.model.best_score
    assert [run["params"] for run in tuning.runs] == grid
    # the test split plays no part: another test split gives the same choice and scores
    shuffled = replace(cycle_data, test=cycle_data.valid[np.roll(np.arange(cycle_data.n_users), 1)])
    again = tune_sasrec(shuffled, grid, **fixed)
    assert again.scores == tuning.scores
    with pytest.raises(ConfigError, match="validation split only"):
        tune_sasrec(cycle_data, grid, split="test")
    with pytest.raises(ConfigError, match="both in the grid and fixed"):
        tune_sasrec(cycle_data, {"hidden": [16]}, hidden=8)
    with pytest.raises(ConfigError, match="dropout"):  # every setting is checked before the first fit
        tune_sasrec(cycle_data, {"dropout": [0.2, 1.5]}, **fixed)
    with pytest.raises(ConfigError, match="empty"):
        tune_sasrec(cycle_data, [])
    assert grid_settings({"dropout": [0.2], "hidden": [8, 16]}) == [
        {"dropout": 0.2, "hidden": 8, "embedding_dropout": 0.2}, {"dropout": 0.2, "hidden": 16, "embedding_dropout": 0.2}]
    assert grid_settings({"dropout": [0.2]}, fixed=("embedding_dropout",)) == [{"dropout": 0.2}]


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden": 0}, "hidden must be a positive int"),
    ({"hidden": 10, "n_heads": 3}, "divisible by n_heads"),
    ({"n_blocks": -1}, "n_blocks"),
    ({"dropout": 1.0}, "dropout must be a number in \\[0, 1\\)"),
    ({"embedding_dropout": "0.1"}, "embedding_dropout"),
    ({"lr": 0}, "lr must be"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"window": "latest"}, "window must be one of"),
    ({"metric": "recall@10"}, "'recall@10' is not a metric of the 'sequential' protocol"),
    ({"protocol": "loo"}, "protocol must be one of"),
    ({"time_budget_s": 0}, "time_budget_s"),
    ({"threads": 0}, "threads"),
    ({"device": "gpu0"}, "device"),
    ({"hiden": 64}, "unknown SASRec parameter\\(s\\) \\['hiden'\\]"),
])
def test_bad_parameters_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SASRecRecommender(**kwargs)


def test_bad_inputs_and_unfitted_use(cycle_data):
    model = build_baseline("sasrec", **TINY)
    with pytest.raises(NotFittedError, match="not fitted"):
        model.score(SequenceTable(cycle_data.train_sequences, cycle_data.n_items).batch([0]))
    with pytest.raises(NotFittedError):
        model.n_items
    with pytest.raises(DataError, match="fits on an InteractionData"):
        model.fit(cycle_data.train)
    with pytest.raises(ConfigError, match="unknown SASRec parameter"):
        build_baseline("sasrec", hiden=3)
    one_item = sequential_data([[1, 2, 3]] * 4, 5)
    with pytest.raises(DataError, match="no user has 2 training items"):
        SASRecRecommender(**TINY).fit(one_item)


def test_fit_baseline_follows_fit_on(cycle_data):
    popularity = fit_baseline(build_baseline("popularity"), cycle_data)  # fitted on the training matrix
    counts = np.asarray(cycle_data.train.sum(0)).ravel()
    assert popularity.item_counts.tolist() == counts.tolist()
    assert SASRecRecommender.fit_on == "data" and PopularityRecommender.fit_on == "train"


def test_cli_baseline_sasrec(tmp_path, capsys):
    lists = cycle_lists(n_users=80, n_items=24, seed=2)
    n_items = 24
    content = {  # DiffuRec's dataset.pkl layout: item ids 1..n_items
        "train": {u: [i + 1 for i in items[:-2]] for u, items in enumerate(lists)},
        "val": {u: [items[-2] + 1] for u, items in enumerate(lists)},
        "test": {u: [items[-1] + 1] for u, items in enumerate(lists)},
        "umap": {u: u for u in range(len(lists))},
        "smap": {i: i + 1 for i in range(n_items)},
    }
    folder = tmp_path / "cycle"
    folder.mkdir()
    (folder / "dataset.pkl").write_bytes(pickle.dumps(content, protocol=4))
    config = tmp_path / "sasrec.yaml"
    config.write_text(yaml.safe_dump({"name": "sasrec", "seed": 0, "device": "cpu",
                                      "data": {"dataset": str(folder)}, "evaluation": {"ks": [10, 20]}}))
    capsys.readouterr()
    base = ["baseline", "sasrec", "--config", str(config), "--no-progress", "--param", "hidden=16",
            "--param", "n_blocks=1", "--param", "max_len=8", "--param", "lr=0.01", "--param", "threads=1"]
    top = tmp_path / "top.npy"
    assert main([*base, "--split", "test", "--param", "max_epochs=6", "--param", "eval_every=2",
                 "--export-topk", str(top), "--k", "5"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    exported = np.load(top)  # row u = user u, item ids as the pickle numbers them (1..n_items)
    assert exported.shape == (len(lists), 5) and exported.min() >= 1 and exported.max() <= n_items
    hits = np.mean([content["test"][u][0] in exported[u] for u in range(len(lists))])
    assert hits > 0.5  # the cycle is learned, and the exported ids are the pickle's own
    assert set(metrics) == {"hr@10", "hr@20", "ndcg@10", "ndcg@20", "sasrec_best_epoch", "sasrec_epochs"}
    assert metrics["hr@10"] > 0.5 and metrics["sasrec_epochs"] <= 6
    assert main([*base, "--split", "valid", "--param", "hiden=3"]) == 2
    assert "unknown SASRec parameter(s) ['hiden']" in capsys.readouterr().err
    assert main(["baseline", "popularity", "--config", str(config), "--split", "valid", "--param", "x=1"]) == 2
    assert "--param and --tune are SASRec options" in capsys.readouterr().err
    assert main(["baseline", "popularity", "--config", str(config), "--split", "valid",
                 "--set", "evaluation.protocol=sequential"]) == 0  # the config's protocol is honoured
    assert set(json.loads(capsys.readouterr().out)) == {"hr@10", "hr@20", "ndcg@10", "ndcg@20"}
