"""Every registered scenario passes the same checker suite, and every agent runs on it unchanged.

The scenarios' own base models (DiffRec, T-DiffRec, CF-Diff with their published settings) run
here on small synthetic data (``dataset=...``), so the suite is fast and offline; the real-data
checks are marked ``real_data``.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import refit_gym
from refit_gym.envs.gym_env import DenoisingEnv
from refit_gym.envs.registration import list_envs
from refit_gym.envs.scenarios import scenario_for
from refit_gym.envs.vector_env import DenoisingVectorEnv

DATASET = "synthetic:n_users=40,n_items=30,seed=0"
SMALL = {"pretrained": False, "dataset": DATASET}
ENV_IDS = [env_id for env_id, _ in list_envs()]
AGENTS = ["refit", "supervised", "reinforce", "ppo", "torchrl-ppo", "sb3-ppo"]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _short(env_id: str) -> dict:
    """A short chain for the slow scenarios (DiffRec's T = 40): the agent takes the last 4 steps."""
    steps = scenario_for(env_id).experiment().diffusion.steps
    return {"exposed_steps": min(steps, 4)}


def test_every_shipped_scenario_is_listed():
    assert {"ReFiT-Synthetic-v0", "ReFiT-ML1M-v0", "ReFiT-ML1M-TDiffRec-v0", "ReFiT-ML1M-CFDiff-v0", "ReFiT-Beauty-Seq-v0",
            "ReFiT-ML1M-Seq-v0", "ReFiT-Beauty-DreamRec-v0", "ReFiT-Beauty-DreamRec-v1",
            "ReFiT-ML1M-DreamRec-v0"} <= set(ENV_IDS)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_gymnasium_check_env(env_id):
    env = gym.make(env_id, **SMALL, **_short(env_id))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")  # item-score units, on purpose
        check_env(env.unwrapped)
    model = env.unwrapped.base_model
    assert env.observation_space["x_t"].shape == (model.state_dim,)
    assert set(env.observation_space.spaces) == {"x_t", "t", "user", *model.condition_spec()}


def _episode(env, seed: int, batched: bool):
    actions = np.random.default_rng(7).random((env.core.exposed_steps, 3, env.core.state_dim), dtype=np.float32)
    obs, _ = env.reset(seed=seed)
    trace = [obs]
    for step in range(env.core.exposed_steps):
        obs, reward, *_ = env.step(actions[step] if batched else actions[step][0])
        trace.append((obs, reward))
    return trace


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_row_zero_of_the_batched_env_equals_the_single_env(env_id):
    chain = {"exposed_steps": scenario_for(env_id).experiment().diffusion.steps}  # no hidden prefix: exact
    vector = gym.make_vec(env_id, num_envs=3, **SMALL, **chain)
    single = gym.make(env_id, **SMALL, **chain).unwrapped
    batched, alone = _episode(vector, 11, True), _episode(single, 11, False)
    for name, value in batched[0].items():
        np.testing.assert_array_equal(value[0], alone[0][name], err_msg=name)
    for (obs_b, reward_b), (obs_s, reward_s) in zip(batched[1:], alone[1:]):
        np.testing.assert_array_equal(obs_b["x_t"][0], obs_s["x_t"])
        np.testing.assert_allclose(reward_b[0], reward_s, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_torchrl_check_env_specs(env_id):
    from torchrl.envs.utils import check_env_specs

    env = refit_gym.make_torchrl_env(env_id, num_envs=3, **SMALL, **_short(env_id))
    check_env_specs(env, seed=0)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sb3_check_env(env_id):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id, **SMALL, **_short(env_id))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*normalized Box action space.*")
        sb3_check_env(env.unwrapped)


@pytest.mark.parametrize("agent_name", AGENTS)
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_every_agent_runs_an_update_on_every_scenario(env_id, agent_name):
    if agent_name == "sb3-ppo":
        pytest.importorskip("stable_baselines3")
    from agents.config import finetune_config
    from agents.trainer import build_learner
    from refit_gym.data import load_dataset
    from refit_gym.training.cache import fresh_model

    config = scenario_for(env_id).experiment({"data.dataset": DATASET})
    data = load_dataset(DATASET)
    base = fresh_model(config, data)
    pg = {} if agent_name == "refit" else {"pg_weight": 1.0}  # a config's refit recipe may be the likelihood alone
    settings = finetune_config({**config.finetune, **pg, "agent": agent_name, "users_per_batch": 8,
                                "rollouts_per_user": 2, "exposed_steps": 3, "inner_epochs": 1})
    agent = build_learner(settings, base, data)
    before = [p.detach().clone() for p in agent.policy.model.parameters()]
    out = agent.update(np.arange(8), np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert all(np.isfinite(v) for v in out.values()), out
    assert any(not torch.equal(p, b) for p, b in zip(agent.policy.model.parameters(), before))
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), fresh_model(config, data).parameters()))


REAL_SIZES = {"diffrec_ml-1m_clean": (5949, 2810), "diffurec_ml-1m": (6040, 3706),
              "diffurec_amazon_beauty": (22363, 12101)}
"""(users, items) of the shared datasets (``../shared/data/README.md``)."""


@pytest.mark.real_data
@pytest.mark.parametrize("env_id", [env_id for env_id in ENV_IDS if "Synthetic" not in env_id])
def test_real_data_scenarios_pass_check_env(real_data_dir, env_id):
    env = DenoisingEnv(env_id, data_dir=real_data_dir, pretrained=False, exposed_steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*symmetric and normalized space.*")
        check_env(env)
    dataset = scenario_for(env_id).experiment().data.dataset
    assert (env.core.n_users, env.core.n_items) == REAL_SIZES[dataset]
    vector = DenoisingVectorEnv(env_id, num_envs=4, data_dir=real_data_dir, pretrained=False, exposed_steps=2)
    obs, _ = vector.reset(seed=0)
    assert obs["x_t"].shape == (4, env.core.state_dim)
