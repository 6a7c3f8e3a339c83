"""The native vector front: equivalence with the single env, seeding, autoreset modes, partial resets."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym.envs.gym_env import DenoisingEnv
from refit_gym.envs.vector_env import DenoisingVectorEnv
from refit_gym.errors import ActionError, ConfigError, EpisodeStateError

SMALL = {"pretrained": False, "dataset": "synthetic:n_users=60,n_items=40,seed=0"}
N_ITEMS = 40


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def actions_for(step: int, num_envs: int, n_items: int) -> np.ndarray:
    return np.random.default_rng(100 + step).random((num_envs, n_items), dtype=np.float32) * 1.5 - 0.25


def run_episodes(env, seed: int, episodes: int = 2, batched: bool = True):
    """Observations and rewards of ``episodes`` episodes with fixed actions; a single env
    (``batched=False``) gets row 0 of the vector env's actions."""
    observations, rewards = [], []
    obs, _ = env.reset(seed=seed)
    for episode in range(episodes):
        if episode:
            obs, _ = env.reset()
        observations.append(obs)
        for step in range(env.core.exposed_steps):
            actions = actions_for(step, env.num_envs if batched else 1, env.core.state_dim)  # row 0 is the same
            obs, reward, terminated, truncated, _ = env.step(actions if batched else actions[0])
            observations.append(obs)
            rewards.append(reward)
        assert np.all(terminated) and not np.any(truncated)
    return observations, rewards


@pytest.mark.parametrize(
    "chain",
    [
        {},
        {"action_mode": "x_prev", "holdout": "random"},
        {"exposed_steps": 4, "stochastic_prefix": True, "noise_steps": 2, "reward": "loglik+0.5*collaborative"},
    ],
    ids=["x0", "x_prev-random-holdout", "prefix-noise-collab"],
)
def test_row_zero_of_the_vector_env_equals_the_single_env(chain):
    vector = DenoisingVectorEnv(num_envs=5, **SMALL, **chain)
    single = DenoisingEnv(**SMALL, **chain)
    vector_obs, vector_rewards = run_episodes(vector, seed=42)
    single_obs, single_rewards = run_episodes(single, seed=42, batched=False)
    exact = "exposed_steps" not in chain  # the hidden prefix runs the denoiser on B rows vs 1 (BLAS may differ)
    for v, s in zip(vector_obs, single_obs):
        assert v["user"][0].tolist() == s["user"].tolist() and v["t"][0].tolist() == s["t"].tolist()
        if exact:
            assert np.array_equal(v["x_t"][0], s["x_t"])
        else:
            np.testing.assert_allclose(v["x_t"][0], s["x_t"], atol=1e-5)
    np.testing.assert_allclose([r[0] for r in vector_rewards], single_rewards, rtol=1e-5, atol=1e-6)
    assert len(set(vector_obs[0]["user"].ravel().tolist())) > 1  # the other rows hold other users


def test_same_seed_same_trajectory_and_different_seed_differs():
    first = run_episodes(DenoisingVectorEnv(num_envs=3, **SMALL), seed=7)
    second = run_episodes(DenoisingVectorEnv(num_envs=3, **SMALL), seed=7)
    third = run_episodes(DenoisingVectorEnv(num_envs=3, **SMALL), seed=8)
    for a, b in zip(first[0], second[0]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(a, b) for a, b in zip(first[1], second[1]))
    assert not np.array_equal(first[0][1]["x_t"], third[0][1]["x_t"])
    assert not np.array_equal(first[1][-1], third[1][-1])


def test_reset_mask_resets_only_those_rows():
    env = DenoisingVectorEnv(num_envs=4, exposed_steps=3, **SMALL)
    env.reset(seed=0)
    for step in range(3):
        obs, reward, terminated, _, _ = env.step(actions_for(step, 4, N_ITEMS))
    assert terminated.all()
    mask = np.array([True, False, True, False])
    obs_after, info = env.reset(options={"reset_mask": mask})
    assert obs_after["t"].ravel().tolist() == [3, 0, 3, 0]
    assert np.array_equal(obs_after["x_t"][~mask], obs["x_t"][~mask])
    with pytest.raises(EpisodeStateError):  # rows 1 and 3 are still done
        env.step(actions_for(0, 4, N_ITEMS))
    obs_after, _ = env.reset(options={"reset_mask": ~mask})
    assert obs_after["t"].ravel().tolist() == [3, 3, 3, 3]
    env.step(actions_for(0, 4, N_ITEMS))


def test_disabled_mode_is_the_default_and_stepping_a_done_row_raises():
    env = gym.make_vec("ReFiT-Synthetic-v0", num_envs=2, exposed_steps=2, **SMALL)
    assert isinstance(env, DenoisingVectorEnv)
    assert env.autoreset_mode == AutoresetMode.DISABLED == env.metadata["autoreset_mode"]
    env.reset(seed=0)
    env.step(actions_for(0, 2, N_ITEMS))
    env.step(actions_for(1, 2, N_ITEMS))
    with pytest.raises(EpisodeStateError):
        env.step(actions_for(2, 2, N_ITEMS))


def test_next_step_mode_resets_on_the_following_step():
    env = DenoisingVectorEnv(num_envs=2, exposed_steps=3, autoreset_mode=AutoresetMode.NEXT_STEP, **SMALL)
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, _ = env.reset(seed=0)
    trace, rewards, terms = [], [], []
    for step in range(6):
        obs, reward, terminated, _, _ = env.step(actions_for(step, 2, N_ITEMS))
        trace.append(int(obs["t"][0, 0]))
        rewards.append(reward[0])
        terms.append(bool(terminated[0]))
    assert trace == [2, 1, 0, 3, 2, 1]
    assert terms == [False, False, True, False, False, False]
    assert rewards[3] == 0.0 and rewards[2] != 0.0


def test_same_step_mode_returns_the_reset_obs_and_the_final_obs_in_info():
    env = DenoisingVectorEnv(num_envs=3, exposed_steps=2, autoreset_mode="SameStep", **SMALL)
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(actions_for(0, 3, N_ITEMS))
    assert "final_obs" not in info
    obs, reward, terminated, truncated, info = env.step(actions_for(1, 3, N_ITEMS))
    assert terminated.all() and not truncated.any()
    assert obs["t"].ravel().tolist() == [2, 2, 2]
    assert info["_final_obs"].all() and info["final_obs"].dtype == object
    assert [int(o["t"][0]) for o in info["final_obs"]] == [0, 0, 0]
    assert info["final_obs"][0] in env.single_observation_space
    assert info["_final_info"].all()
    np.testing.assert_allclose(info["final_info"]["reward_terms"]["loglik"], reward)
    env.step(actions_for(2, 3, N_ITEMS))  # the rows were already reset


def test_info_is_a_dict_of_arrays_with_masks():
    reward = {"loglik": 1.0, "ndcg": {"weight": 0.0, "k": 5}}
    env = DenoisingVectorEnv(num_envs=3, exposed_steps=2, reward=reward, **SMALL)
    env.reset(seed=0)
    _, _, _, _, info = env.step(actions_for(0, 3, N_ITEMS))
    assert info == {}
    _, reward, _, _, info = env.step(actions_for(1, 3, N_ITEMS))
    terms = info["reward_terms"]
    assert info["_reward_terms"].all() and terms["_loglik"].all() and terms["_ndcg"].all()
    np.testing.assert_allclose(terms["loglik"], reward, rtol=1e-6)
    assert ((terms["ndcg"] >= 0) & (terms["ndcg"] <= 1)).all()


def test_observations_are_fresh_copies():
    env = DenoisingVectorEnv(num_envs=2, action_mode="x_prev", **SMALL)
    obs_0, _ = env.reset(seed=0)
    obs_1, *_ = env.step(actions_for(0, 2, N_ITEMS))
    for key in obs_0:
        assert not np.shares_memory(obs_0[key], obs_1[key])
    obs_1["x_t"][:] = 99.0  # the user mutating what they got back does not touch the env
    obs_2, *_ = env.step(obs_0["x_t"])
    assert np.array_equal(obs_2["x_t"], obs_0["x_t"])


def test_spaces_and_bad_input():
    env = DenoisingVectorEnv(num_envs=3, max_episode_steps=10, **SMALL)
    assert env.observation_space["x_t"].shape == (3, N_ITEMS)
    assert env.observation_space["t"].shape == (3, 1) and env.observation_space["t"].dtype == np.int64
    assert env.single_observation_space["user"].high.tolist() == [env.core.n_users - 1]
    assert env.action_space.shape == (3, N_ITEMS)
    obs, _ = env.reset(seed=0)
    assert obs in env.observation_space
    with pytest.raises(ActionError):
        env.step(np.zeros((2, N_ITEMS), np.float32))
    with pytest.raises(ActionError):
        env.step(np.zeros((3, N_ITEMS), np.int64))
    with pytest.raises(ConfigError):
        env.reset(options={"reset_mask": [True, False]})
    with pytest.raises(ConfigError):
        env.reset(options={"mask": [True] * 3})
    with pytest.raises(ConfigError, match="max_episode_steps"):
        DenoisingVectorEnv(num_envs=3, max_episode_steps=5, **SMALL)
    with pytest.raises(ConfigError, match="autoreset_mode"):
        DenoisingVectorEnv(num_envs=3, autoreset_mode="sometimes", **SMALL)
    with pytest.raises(ConfigError, match="num_envs"):
        DenoisingVectorEnv(num_envs=0, **SMALL)


def test_sync_vectorization_of_the_single_env_also_works():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make_vec("ReFiT-Synthetic-v0", num_envs=2, vectorization_mode="sync", exposed_steps=2, **SMALL)
        obs, _ = env.reset(seed=0)
        obs, reward, terminated, _, _ = env.step(actions_for(0, 2, N_ITEMS))
    assert obs["x_t"].shape == (2, N_ITEMS)


def test_vector_render_gives_one_text_per_row():
    env = DenoisingVectorEnv(num_envs=2, render_mode="ansi", render_top_k=3, **SMALL)
    env.reset(seed=0)
    frames = env.render()
    assert isinstance(frames, tuple) and len(frames) == 2 and all("top-3" in f for f in frames)
