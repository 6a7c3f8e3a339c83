"""benchmarks/score_temperature.py: the validation NLL of softmax(scores / tau) equals the cross-entropy
reference, tends to log(n_items) for a large tau, and bad inputs are refused by name."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from refit_gym.checkpoint import save_checkpoint
from refit_gym.config import config_from_dict
from refit_gym.data import load_dataset
from refit_gym.errors import ConfigError, DataError
from refit_gym.models import build_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "score_temperature.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("score_temperature", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_nll_is_the_cross_entropy_of_the_scaled_scores(bench):
    scores = torch.randn(7, 11, generator=torch.Generator().manual_seed(0)) * 30
    targets = torch.tensor([0, 3, 10, 5, 5, 1, 9])
    temperatures = [1.0, 8.0, 80.0]
    reference = [float(torch.nn.functional.cross_entropy(scores / tau, targets, reduction="sum"))
                 for tau in temperatures]
    assert bench.temperature_nll(scores, targets, temperatures) == pytest.approx(reference, rel=1e-5)
    assert bench.temperature_nll(scores, targets, [1e9])[0] / 7 == pytest.approx(math.log(11), abs=1e-6)
    with pytest.raises(ConfigError, match="temperatures must be positive"):
        bench.temperature_nll(scores, targets, [80.0, 0.0])


def write_pickle(folder: Path, no_valid_item: bool = False) -> Path:
    """A DiffuRec-style ``dataset.pkl``: 40 users walk one cycle over 15 items (item ids from 1)."""
    rng = np.random.default_rng(0)
    train, val, test = {}, {}, {}
    for user in range(40):
        start, length = int(rng.integers(15)), int(rng.integers(5, 9))
        items = [(start + k) % 15 + 1 for k in range(length + 2)]
        train[user], val[user], test[user] = items[:-2], [items[-2]], [items[-1]]
    if no_valid_item:
        val[0] = []
    folder.mkdir(parents=True)
    (folder / "dataset.pkl").write_bytes(pickle.dumps({"train": train, "val": val, "test": test}))
    return folder


def checkpoint(tmp_path: Path, data_folder: Path) -> Path:
    config = config_from_dict({
        "device": "cpu", "data": {"dataset": str(data_folder)},
        "model": {"name": "dreamrec", "hidden": 8, "max_len": 4},
        "diffusion": {"steps": 5, "noise_schedule": "exp", "mean_type": "x0", "beta_fixed": False},
        "evaluation": {"protocol": "sequential"},
    })
    data = load_dataset(str(data_folder))
    torch.manual_seed(0)
    model = build_model(config.model, config.diffusion, data)
    return save_checkpoint(tmp_path / "ckpt", model, config, data)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize("mask", [True, False])
def test_a_checkpoint_end_to_end_and_its_uniform_limit(tmp_path, mask):
    """A huge tau is the uniform model over the items the softmax ranks: all 15, or those not in the history."""
    data_folder = write_pickle(tmp_path / "seq")
    folder = checkpoint(tmp_path, data_folder)
    done = run("--pretrained", str(folder), "--temperatures", "1", "1e9", "--users", "30", "--batch-size", "7",
               *([] if mask else ["--no-mask"]))
    assert done.returncode == 0, done.stderr
    assert "30 validation users" in done.stdout and "15 items" in done.stdout
    rows = [line.split("|")[1:3] for line in done.stdout.splitlines() if line.startswith("| 1")]
    assert [tau.strip() for tau, _ in rows] == ["1", "1e+09"]
    data = load_dataset(str(data_folder))
    users = np.random.default_rng(0).choice(40, 30, replace=False)  # the script's draw (--seed 0)
    ranked = [15 - len(set(data.train_sequences[u].tolist())) if mask else 15 for u in users]
    assert float(rows[1][1].split()[0]) == pytest.approx(np.mean(np.log(ranked)), abs=1e-3)


def test_users_without_exactly_one_validation_item_are_refused(bench, tmp_path):
    with pytest.raises(DataError, match=r"'val'\[0\] holds 0 item"):  # the loader refuses such a pickle
        load_dataset(str(write_pickle(tmp_path / "bad", no_valid_item=True)))
    data = load_dataset(str(write_pickle(tmp_path / "seq")))
    valid = data.valid.tolil()
    valid[0, :] = 0  # data built some other way: the script's own check
    with pytest.raises(DataError, match="exactly one validation item.*1 users do not"):
        bench.validation_targets(dataclasses.replace(data, valid=valid.tocsr()))


class LastItemScores:
    """A deterministic recommender: item ``i`` scores ``10 * cos(i - the newest history item)``."""

    def score(self, history):
        newest = (history.visible.long() * torch.arange(history.items.shape[1])).argmax(1, keepdim=True)
        last = history.items.gather(1, newest).float()
        return 10 * torch.cos(torch.arange(15).float()[None, :] - last)


@pytest.mark.parametrize("mask_history", [True, False])
def test_each_user_is_scored_against_its_own_validation_item(bench, tmp_path, mask_history):
    """Against a reference that scores one user at a time, with the user's training items masked or not."""
    data = load_dataset(str(write_pickle(tmp_path / "seq")))
    users = np.array([3, 7, 8, 20, 31, 39])
    nll, _ = bench.validation_nll(LastItemScores(), data, users, [1.0, 5.0], batch_size=4, mask_history=mask_history)
    reference = []
    for tau in (1.0, 5.0):
        total = 0.0
        for user in users:
            train, valid = data.train_sequences[user], int(data.split("valid")[user].indices[0])
            scores = 10 * torch.cos(torch.arange(15).float() - float(train[-1]))
            if mask_history:
                scores[torch.as_tensor(np.asarray(train))] = float("-inf")
            total -= float(torch.log_softmax(scores / tau, 0)[valid])
        reference.append(total / len(users))
    assert nll == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ConfigError, match="no users"):
        bench.validation_nll(LastItemScores(), data, np.array([], dtype=np.int64), [1.0])
