"""The Stable-Baselines3 adapter: SB3's checker on the single env, PPO on the batched adapter."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest

import refit_gym

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.env_checker import check_env  # noqa: E402
from stable_baselines3.common.logger import Logger  # noqa: E402

SMALL = {"pretrained": False, "dataset": "synthetic:n_users=60,n_items=40,seed=0"}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_sb3_check_env_passes_on_the_single_env():
    env = gym.make("ReFiT-Synthetic-v0", **SMALL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    messages = [str(w.message) for w in caught if "stable_baselines3" in w.filename]
    # the one SB3 advice: a [-1, 1] action Box (ours is in item-score units on purpose)
    assert all("normalized Box action space" in m for m in messages)


def test_ppo_learns_a_few_hundred_steps_on_the_adapter():
    venv = refit_gym.make_sb3_vec_env("ReFiT-Synthetic-v0", num_envs=4, exposed_steps=5, **SMALL)
    model = PPO("MultiInputPolicy", venv, n_steps=20, batch_size=40, n_epochs=2, gamma=1.0, gae_lambda=1.0,
                seed=0, device="cpu")
    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default logger leaves a folder in /tmp per run
    model.learn(total_timesteps=240)
    assert model.num_timesteps == 240


def test_adapter_follows_sb3_semantics():
    venv = refit_gym.make_sb3_vec_env("refit_gym:ReFiT-Synthetic-v0", num_envs=3, exposed_steps=2, **SMALL)
    venv.seed(5)
    obs = venv.reset()
    assert obs["x_t"].shape == (3, 40) and obs["t"].ravel().tolist() == [2, 2, 2]
    venv.step_async(np.zeros((3, 40), np.float32))
    _, rewards, dones, infos = venv.step_wait()
    assert not dones.any() and infos == [{}, {}, {}]
    obs, rewards, dones, infos = venv.step(np.zeros((3, 40), np.float32))
    assert dones.all() and obs["t"].ravel().tolist() == [2, 2, 2]  # already reset
    assert all(int(info["terminal_observation"]["t"][0]) == 0 for info in infos)
    assert all(info["TimeLimit.truncated"] is False for info in infos)
    assert [info["reward_terms"]["loglik"] for info in infos] == pytest.approx(rewards.tolist())
    assert venv.get_attr("render_mode") == [None] * 3 and venv.env_is_wrapped(gym.Wrapper) == [False] * 3
    venv.seed(5)
    assert np.array_equal(venv.reset()["user"], refit_gym.make_sb3_vec_env(
        "ReFiT-Synthetic-v0", num_envs=3, exposed_steps=2, **SMALL).venv.reset(seed=5)[0]["user"])


def test_missing_sb3_names_the_extra(monkeypatch, without_stable_baselines3):
    import refit_gym.envs.sb3_vec_env as adapter_module

    monkeypatch.setattr(adapter_module, "_ADAPTER", None)
    with pytest.raises(ImportError, match=r"refit-gym\[sb3\]"):
        refit_gym.make_sb3_vec_env("ReFiT-Synthetic-v0", num_envs=2, **SMALL)
