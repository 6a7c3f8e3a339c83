"""Gradient signal-to-noise diagnostics (``agents.gradient_signal``): each agent's estimate against a second
independent one and against the exact log-likelihood gradient, in the trainer and in the benchmark."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.config import finetune_config
from agents.gradient_signal import gradient_signal, likelihood_gradient
from agents.rollout import group_advantages
from agents.trainer import build_learner, finetune
from conftest import TINY_EXPERIMENT, build_tiny_learner
from refit_gym.checkpoint import load_checkpoint
from refit_gym.config import config_from_dict
from refit_gym.errors import ConfigError
from refit_gym.training.distributed import Distributed

REPO = Path(__file__).resolve().parents[1]
USERS = np.arange(32)
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize("holdout", ["recent", "random"])
def test_supervised_has_no_sampling_noise_and_is_the_exact_gradient(tiny_data, tiny_pretrained, holdout):
    # with a random hold-out the two estimates see the same hidden items only if they share the env's draws
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "supervised", holdout=holdout)
    signal = gradient_signal(agent, USERS, seed=0)
    assert signal["pair_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert signal["exact_cosine"] == pytest.approx(1.0, abs=1e-6)  # the anchor's gradient is 0 at the start
    assert signal["norm"] == pytest.approx(signal["exact_norm"], rel=1e-5) and signal["norm"] > 0


@pytest.mark.parametrize("agent_name, overrides", [
    ("refit", {}),
    ("reinforce", {"reward": {"loglik": {"weight": 1.0, "temperature": 0.5}}}),
    ("reinforce", {"pg_weight": 0.0, "categorical_samples": 4}),
    ("ppo", {"reward": {"loglik": {"weight": 1.0, "temperature": 0.5}}}),
])
def test_a_sampled_estimate_differs_between_draws_and_is_deterministic_given_the_seed(tiny_data, tiny_pretrained,
                                                                                      agent_name, overrides):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, agent_name, holdout="random", **overrides)
    signal = gradient_signal(agent, USERS, seed=0)
    assert -1.0 <= signal["pair_cosine"] < 0.999, signal
    assert -1.0 <= signal["exact_cosine"] <= 1.0 and signal["norm"] > 0 and signal["exact_norm"] > 0
    again = gradient_signal(agent, USERS, seed=0)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in signal.items() if k != "seconds"}
    assert gradient_signal(agent, USERS, seed=1)["pair_cosine"] != signal["pair_cosine"]


def test_the_categorical_estimate_approaches_the_exact_gradient_with_more_samples(tiny_data, tiny_pretrained):
    # its expected gradient is the exact log-likelihood gradient: more samples, closer to it
    cosines = {}
    for samples in (2, 256):
        agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "reinforce", pg_weight=0.0, anchor="none",
                                      categorical_samples=samples)
        cosines[samples] = gradient_signal(agent, USERS, seed=0)
    assert cosines[256]["exact_cosine"] > max(0.9, cosines[2]["exact_cosine"] + 0.1), cosines
    assert cosines[256]["pair_cosine"] > cosines[2]["pair_cosine"]


def test_the_exact_gradient_is_the_supervised_agents_likelihood_gradient(tiny_data, tiny_pretrained):
    refit, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit")
    supervised, _ = build_tiny_learner(tiny_data, tiny_pretrained, "supervised", likelihood_weight=2.0, anchor="none")
    exact = likelihood_gradient(refit, USERS, np.random.default_rng(5))  # K = 4 identical rows per user
    supervised_step = supervised.gradient_estimate(USERS, np.random.default_rng(5), torch.Generator().manual_seed(0))
    torch.testing.assert_close(2.0 * exact, supervised_step, rtol=1e-4, atol=1e-7)


def test_ppos_estimate_is_the_vanilla_policy_gradient_with_its_advantages(tiny_data, tiny_pretrained):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "ppo", anchor="none",
                                  reward={"loglik": {"weight": 1.0, "temperature": 0.5}})
    estimate = agent.gradient_estimate(USERS, np.random.default_rng(0), torch.Generator().manual_seed(0))
    rollout = agent.collect(USERS, np.random.default_rng(0), torch.Generator().manual_seed(0))
    steps = agent.trained_step_indices(rollout)
    advantages = group_advantages(rollout.returns_to_go()[steps], rollout.group_size, agent.config.advantage_clip)
    vanilla = -(advantages * agent.step_log_probs(rollout, steps)).mean()
    parameters = agent.trainable_parameters()
    grads = torch.autograd.grad(vanilla, parameters, allow_unused=True)
    expected = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters)])
    torch.testing.assert_close(estimate, expected, rtol=1e-4, atol=1e-8)
    assert float(estimate.norm()) > 0


def test_measuring_leaves_weights_gradients_and_optimiser_state_bitwise_unchanged(tiny_data, tiny_pretrained):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit", std_mode="learned")
    agent.update(USERS, np.random.default_rng(0), torch.Generator().manual_seed(0))  # Adam has state, .grad is set
    weights = copy.deepcopy(agent.policy.state_dict())
    with_grad = [p for p in agent.policy.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in with_grad]
    optimiser = copy.deepcopy(agent.optimizer.state_dict())
    gradient_signal(agent, USERS, seed=3)
    for name, value in agent.policy.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert len(grads) > 0 and all(torch.equal(p.grad, g) for p, g in zip(with_grad, grads))
    after = agent.optimizer.state_dict()
    assert after["param_groups"] == optimiser["param_groups"] and len(after["state"]) == len(optimiser["state"]) > 0
    for key, state in optimiser["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(after["state"][key][name]), torch.as_tensor(value)), (key, name)


def _experiment(**finetune):
    return config_from_dict({**TINY_EXPERIMENT, "finetune": {
        "users_per_batch": 32, "rollouts_per_user": 2, "exposed_steps": 2, "eval_every": 3, "max_updates": 6,
        "patience": 100, "time_budget_s": None, "lr": 1e-3, "categorical_samples": 4,
        "holdout": "random", **finetune}})  # random: the episode seeds drawn from the trainer's rng matter


@pytest.mark.parametrize("agent_name", ["reinforce", "ppo"])
def test_the_trainer_logs_the_signal_every_n_updates_and_trains_the_same(tiny_data, tiny_pretrained, tmp_path,
                                                                         agent_name):
    quiet = {"progress": False, "log": lambda _: None}
    off = finetune(_experiment(agent=agent_name), tiny_data, tiny_pretrained, tmp_path / "off", **quiet)
    on = finetune(_experiment(agent=agent_name, gradient_signal_every=2), tiny_data, tiny_pretrained, tmp_path / "on",
                  **quiet)
    assert (tmp_path / "off" / "model.safetensors").read_bytes() == (tmp_path / "on" / "model.safetensors").read_bytes()
    rows = {name: list(csv.DictReader((tmp_path / name / "log.csv").open())) for name in ("off", "on")}
    columns = ("gradient_signal/pair_cosine", "gradient_signal/exact_cosine", "gradient_signal/norm")
    assert not any(c in rows["off"][0] for c in columns)
    for a, b in zip(rows["off"], rows["on"], strict=True):
        measured = int(b["update"]) in (2, 4, 6)
        assert all((b[c] != "") == measured for c in columns), b
        if measured:
            assert -1 <= float(b["gradient_signal/pair_cosine"]) < 1 and float(b["gradient_signal/norm"]) > 0
        same = {k: v for k, v in b.items() if k != "seconds" and not k.startswith("gradient_signal/")}
        assert same == {k: v for k, v in a.items() if k != "seconds"}  # the training numbers, to the last digit
    assert on.best_metrics == off.best_metrics


def test_bad_settings_and_data_parallel_are_refused(tiny_data, tiny_pretrained):
    with pytest.raises(ConfigError, match="gradient_signal_every must be >= 0"):
        finetune_config({"gradient_signal_every": -1})
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit", gradient_signal_every=5)
    with pytest.raises(ConfigError, match="gradient_signal_every .* not available under torchrun"):
        agent.distribute(Distributed(rank=0, world=2))


@pytest.mark.parametrize("agent_name, library", [("torchrl-ppo", "torchrl"), ("sb3-ppo", "stable_baselines3")])
def test_agents_that_run_another_librarys_loop_have_no_estimate(tiny_data, tiny_pretrained, agent_name, library):
    pytest.importorskip(library)
    message = f"the {agent_name} agent has no gradient estimate of its own: its update is another library's loop"
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, agent_name)
    with pytest.raises(ConfigError, match=message):
        gradient_signal(agent, USERS, seed=0)
    with pytest.raises(ConfigError, match=message):
        agent.gradient_estimate(USERS, np.random.default_rng(0), torch.Generator().manual_seed(0))
    settings = finetune_config({"agent": agent_name, "users_per_batch": 32, "gradient_signal_every": 1})
    base, _ = load_checkpoint(tiny_pretrained, tiny_data)
    with pytest.raises(ConfigError, match=message):  # the trainer refuses it before any work
        build_learner(settings, base, tiny_data)


def test_an_agent_that_overrides_update_without_estimate_loss_is_refused(tiny_data, tiny_pretrained):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit")
    agent.__class__ = type("TwoStepRefit", (type(agent),), {"name": "two-step", "update": lambda self, *a: {}})
    with pytest.raises(ConfigError, match="two-step agent overrides update"):
        gradient_signal(agent, USERS, seed=0)


def test_the_benchmark_runs_end_to_end(tiny_pretrained, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gradient_signal_bench", REPO / "benchmarks" / "gradient_signal.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr("refit_gym.runtime.tune_cpu_runtime", lambda: {})  # keep this process's float settings
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({**TINY_EXPERIMENT, "data": {"dataset": "synthetic:n_users=300,n_items=120,seed=3"},
                                  "finetune": {"users_per_batch": 16, "rollouts_per_user": 2, "exposed_steps": 2}}))
    output = tmp_path / "signal.json"
    report = bench.main(["--pretrained", str(tiny_pretrained), "--config", str(config), "--repeats", "2",
                         "--agents", "supervised,reinforce@categorical,ppo,refit@big",
                         "--agent-set", "reinforce@categorical:categorical_samples=8", "--agent-set",
                         "refit@big:users_per_batch=24", "--threads", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(report))
    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == ["supervised", "reinforce@categorical", "ppo", "refit@big"]
    assert rows["supervised"]["summary"]["pair_cosine"][0] == pytest.approx(1.0, abs=1e-6)
    assert rows["reinforce@categorical"]["overrides"]["categorical_samples"] == 8
    assert (rows["reinforce@categorical"]["sees"], rows["ppo"]["sees"], rows["refit@big"]["sees"]) == ("b", "a", "c")
    assert rows["refit@big"]["users"] == 24 and rows["ppo"]["users"] == 16 and rows["ppo"]["chains_per_user"] == 2
    for row in rows.values():
        assert len(row["repeats"]) == 2 and all(r["seconds"] > 0 for r in row["repeats"])
        assert row["repeats"][0]["norm"] != row["repeats"][1]["norm"]  # different users in each repeat
    markdown = output.with_suffix(".md").read_text()
    assert "| reinforce@categorical | " in markdown and markdown.count("\n| ") == 5
    with pytest.raises(SystemExit, match="--agent-set"):
        bench.main(["--pretrained", str(tiny_pretrained), "--config", str(config), "--agents", "ppo",
                    "--agent-set", "refit:lr=1", "--output", str(output)])
