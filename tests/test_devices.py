"""Every tensor the core, the rewards, the agents and the evaluator create lives on the requested device.

Parametrised over the devices this machine has: the CPU always, CUDA wherever it exists (the
same test then runs on the GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refit_gym.data import make_synthetic
from refit_gym.data.history import SequenceTable
from refit_gym.envs.factory import build_env_parts
from refit_gym.envs.scenarios import scenario_for
from refit_gym.evaluation.evaluator import evaluate
from refit_gym.training.cache import fresh_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SCENARIOS = ["ReFiT-Synthetic-v0", "ReFiT-ML1M-CFDiff-v0", "ReFiT-ML1M-TDiffRec-v0"]


def on(device: str, value, where: str) -> None:
    """Assert that every tensor in ``value`` (nested mappings / sequences) is on ``device``."""
    if isinstance(value, torch.Tensor):
        assert value.device.type == torch.device(device).type, f"{where} is on {value.device}, not {device}"
    elif isinstance(value, dict):
        for key, item in value.items():
            on(device, item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            on(device, item, f"{where}[{index}]")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_users=60, n_items=40, seed=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("device", DEVICES)
def test_the_core_and_its_rewards_stay_on_the_device(device, scenario, data):
    config = scenario_for(scenario).experiment({"data.dataset": "synthetic"})
    model = fresh_model(config, data)
    core = build_env_parts(scenario, data=data, model=model, batch_size=4, device=device, exposed_steps=2,
                           reward={"loglik": 1.0, "collaborative": {"weight": 0.5, "k": 5}, "ndcg": 0.1},
                           shaping={"type": "held_out"}).core
    on(device, list(core.model.parameters()), "the env's model")
    observation = core.reset(np.random.default_rng(0))
    on(device, observation, "the observation")
    on(device, (core.visible, core.held_out, core.users), "the episode")
    result = core.step(observation["x_t"])
    on(device, (result.observation, result.reward, result.components), "a step")
    result = core.step(result.observation["x_t"])
    on(device, (result.reward, result.components), "the terminal step")
    assert result.terminated.all() and torch.isfinite(result.reward).all()


@pytest.mark.parametrize("agent_name", ["refit", "supervised", "reinforce", "ppo"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_agents_and_the_evaluator_stay_on_the_device(device, agent_name, data):
    from agents.config import finetune_config
    from agents.rollout import collect_rollouts
    from agents.trainer import build_learner

    config = scenario_for("ReFiT-Synthetic-v0").experiment({"data.dataset": "synthetic"})
    base = fresh_model(config, data).to(device)
    settings = finetune_config({"agent": agent_name, "users_per_batch": 8, "rollouts_per_user": 2, "exposed_steps": 3,
                                "categorical_samples": 16 if agent_name == "reinforce" else 0})
    agent = build_learner(settings, base, data, device=device)
    on(device, list(agent.policy.parameters()), "the policy")
    generator = torch.Generator(device=device).manual_seed(0)
    rollout = collect_rollouts(agent.core, agent.policy, np.repeat(np.arange(8), agent.group_size),
                               np.random.default_rng(0), generator, agent.group_size)
    on(device, (rollout.states, rollout.actions, rollout.log_probs, rollout.rewards, rollout.components),
       "the rollout")
    if agent_name != "ppo":  # PPO's loss is per minibatch, inside its update
        on(device, agent.loss(rollout, generator), "the loss terms")
    out = agent.update(np.arange(8), np.random.default_rng(1), generator)
    assert all(np.isfinite(v) for v in out.values())
    # Adam keeps its step counters on the CPU by design (unless capturable / fused); the moments follow the parameters
    on(device, [value for state in agent.optimizer.state.values() for key, value in state.items() if key != "step"],
       "Adam's state")

    histories = SequenceTable(data.train_sequences, data.n_items, device).batch(torch.arange(10, device=device))
    on(device, (histories.items, histories.visible), "the histories")
    on(device, agent.policy.model.score(histories), "the evaluation scores")
    metrics = evaluate(agent.policy.model, data, ks=(10,), device=device).metrics
    assert 0.0 <= metrics["valid"]["recall@10"] <= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_the_chain_and_an_update_close_to_fp32(device, data, tiny_pretrained, tiny_data):
    from agents.config import finetune_config
    from agents.trainer import build_learner
    from refit_gym.checkpoint import load_checkpoint
    from refit_gym.runtime import autocast

    model, _ = load_checkpoint(tiny_pretrained, tiny_data, device=device)
    full = evaluate(model, tiny_data, ks=(20,), device=device).metrics["valid"]["recall@20"]
    half = evaluate(model, tiny_data, ks=(20,), device=device, precision="bf16").metrics["valid"]["recall@20"]
    assert abs(full - half) < 0.02, (full, half)  # bfloat16 keeps 8 bits of mantissa: near-ties may swap
    core = build_env_parts("ReFiT-Synthetic-v0", data=tiny_data, model=model, batch_size=4, device=device,
                           exposed_steps=2, precision="bf16").core
    observation = core.reset(np.random.default_rng(0))
    assert observation["x_t"].dtype == torch.float32
    agent = build_learner(finetune_config({"users_per_batch": 8, "rollouts_per_user": 2, "exposed_steps": 2,
                                           "precision": "bf16"}), model, tiny_data, device=device)
    with autocast("bf16", device):
        out = agent.update(np.arange(8), np.random.default_rng(0), torch.Generator(device=device).manual_seed(0))
    assert np.isfinite(out["loss"]) and all(p.dtype == torch.float32 for p in agent.policy.parameters())
