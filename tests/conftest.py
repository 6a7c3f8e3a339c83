"""Shared fixtures: a small synthetic dataset and the real-data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from refit_gym.data import InteractionData, make_synthetic, resolve_data_dir

DEFAULT_REAL_DATASETS = ("diffrec_ml-1m_clean",)


@pytest.fixture
def synthetic_data() -> InteractionData:
    """The default synthetic dataset (500 users x 300 items, seed 0); fast and offline."""
    return make_synthetic(seed=0)


@pytest.fixture
def real_data_dir(request: pytest.FixtureRequest) -> Path:
    """The data directory holding the real datasets a test needs.

    The datasets are the ``real_data`` marker's arguments
    (``@pytest.mark.real_data("diffurec_ml-1m")``), by default ``diffrec_ml-1m_clean``.
    When one is missing the test fails if the environment variable ``CI`` is ``"true"``
    and is skipped otherwise.
    """
    marker = request.node.get_closest_marker("real_data")
    names = tuple(marker.args) if marker is not None and marker.args else DEFAULT_REAL_DATASETS
    data_dir = resolve_data_dir()
    missing = [name for name in names if not (data_dir / name).exists()]
    if missing:
        message = (
            f"real dataset(s) {', '.join(missing)} not found in {data_dir}; "
            f"set REFIT_GYM_DATA to the folder holding them (e.g. ../shared/data)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return data_dir


TINY_EXPERIMENT = {
    "seed": 0,
    "device": "cpu",
    "model": {"dims": [32, 64]},
    "diffusion": {"steps": 5},
    "pretrain": {"batch_size": 100, "max_epochs": 20, "eval_every": 5, "min_epochs": 20},
    "evaluation": {"ks": [10, 20]},
}
"""The experiment of the tiny pretrained base model the agent tests fine-tune."""


@pytest.fixture(scope="session")
def tiny_data() -> InteractionData:
    """Synthetic data small enough for agents to train on in seconds (300 users x 120 items)."""
    return make_synthetic(n_users=300, n_items=120, seed=3)


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_data, tmp_path_factory) -> Path:
    """A checkpoint of a tiny DiffRec pretrained on :func:`tiny_data` (built once per session)."""
    from refit_gym.config import config_from_dict
    from refit_gym.training.pretrain import pretrain

    output = tmp_path_factory.mktemp("tiny_base")
    pretrain(config_from_dict(TINY_EXPERIMENT), tiny_data, output_dir=output, progress=False, log=lambda _: None)
    return output


def build_tiny_learner(data, pretrained, agent: str, **overrides):
    """``(agent, base model)``: an agent over the tiny pretrained base, small batches (32 users x 4)."""
    from agents.config import finetune_config
    from agents.trainer import build_learner
    from refit_gym.checkpoint import load_checkpoint

    settings = finetune_config({"agent": agent, "users_per_batch": 32, "rollouts_per_user": 4,
                                "exposed_steps": 2, "log_std_init": -2.0, **overrides})
    base, _ = load_checkpoint(pretrained, data)
    return build_learner(settings, base, data), base


def tiny_objective(agent, users, rng_seed: int = 123) -> float:
    """The agent's own objective on fixed users, on the deterministic path: the held-out
    log-likelihood for ``refit`` / ``supervised``, the episode return for the others."""
    import numpy as np

    from agents.rollout import collect_rollouts

    rows = np.repeat(users, agent.group_size)
    rollout = collect_rollouts(agent.core, agent.policy, rows, np.random.default_rng(rng_seed),
                               torch.Generator().manual_seed(0), agent.group_size, stochastic=False)
    if agent.name in ("refit", "supervised"):
        with torch.no_grad():
            return -float(agent.likelihood_loss(rollout))
    return float(rollout.episode_return().mean())


def train_tiny(agent, updates: int = 25, n_users: int = 32) -> tuple[float, float, dict]:
    """``(objective before, objective after, last diagnostics)`` of ``updates`` updates on the
    first ``n_users`` users (seeded)."""
    import numpy as np

    users = np.arange(n_users)
    before = tiny_objective(agent, users)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for _ in range(updates):
        diagnostics = agent.update(users, rng, generator)
    return before, tiny_objective(agent, users), diagnostics


@pytest.fixture
def without_stable_baselines3(monkeypatch):
    """Make every ``import stable_baselines3...`` fail, as on a machine without the extra."""
    import builtins

    real_import = builtins.__import__

    def no_sb3(name, *args, **kwargs):
        if name.startswith("stable_baselines3"):
            raise ImportError("No module named 'stable_baselines3'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sb3)


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors: one intra-op thread is much faster than two contended ones on a 2-core CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def crash_at_update(monkeypatch, update: int) -> None:
    """Make the trainer's user sampler raise ``KeyboardInterrupt`` when it draws update ``update``."""
    from agents import trainer

    real, calls = trainer.UserSampler.next, {"n": 0}

    def next_or_crash(self, rng):
        calls["n"] += 1
        if calls["n"] == update:
            raise KeyboardInterrupt
        return real(self, rng)

    monkeypatch.setattr(trainer.UserSampler, "next", next_or_crash)


def assert_same_run(first, second) -> None:
    """The same best checkpoint (bytes of the weights), metrics and per-update log (timings aside)."""
    import csv
    import json

    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert json.loads((first / "metrics.json").read_text())["metrics"] == json.loads(
        (second / "metrics.json").read_text())["metrics"]
    rows = [list(csv.DictReader((folder / "log.csv").open())) for folder in (first, second)]
    assert len(rows[0]) == len(rows[1])
    for a, b in zip(*rows):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert json.loads((second / "run.json").read_text())["status"] == "finished"
    assert not (second / "trainer_state").exists()  # a finished run keeps no resumable state
