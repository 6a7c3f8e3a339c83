"""The single-user Gymnasium front: checkers, types, rendering, bad input."""

from __future__ import annotations

import dataclasses
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import refit_gym  # noqa: F401  (registers the ids)
from refit_gym.data import make_synthetic
from refit_gym.envs.gym_env import DenoisingEnv
from refit_gym.envs.policies import denoiser_action
from refit_gym.errors import ActionError, ConfigError, EpisodeStateError

SMALL = {"pretrained": False, "dataset": "synthetic:n_users=60,n_items=40,seed=0"}
NORMALISED_BOX_ADVICE = "we recommend using a symmetric and normalized space"


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _ours(caught) -> list[str]:
    """Warnings raised by gymnasium or refit_gym (not third-party deprecations)."""
    return [
        str(w.message)
        for w in caught
        if "gymnasium" in w.filename or "refit_gym" in w.filename or "gymnasium" in str(w.message).lower()
    ]


@pytest.mark.parametrize("action_mode", ["x0", "x_prev"])
def test_check_env_passes_with_no_avoidable_warning(action_mode):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make("ReFiT-Synthetic-v0", action_mode=action_mode, **SMALL)
        check_env(env.unwrapped)
    # the only one: the action Box is in item-score units ([-10, 10]), not [-1, 1], on purpose
    assert any(NORMALISED_BOX_ADVICE in m for m in _ours(caught))  # (the capture works)
    assert [m for m in _ours(caught) if NORMALISED_BOX_ADVICE not in m] == []


def test_check_env_is_silent_with_a_unit_action_box():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make("ReFiT-Synthetic-v0", action_bound=1.0, exposed_steps=3, **SMALL)
        check_env(env.unwrapped)
    assert _ours(caught) == []


def test_episode_through_make_types_and_passive_checker():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make("ReFiT-Synthetic-v0", **SMALL)
        obs, info = env.reset(seed=0)
        assert obs in env.observation_space and info == {}
        base = env.unwrapped.base_model
        steps = 0
        while True:
            action = denoiser_action(base.denoiser, base.diffusion, torch.from_numpy(obs["x_t"])[None],
                                     torch.from_numpy(obs["t"])[None]).numpy()[0]
            obs, reward, terminated, truncated, info = env.step(action)
            steps += 1
            assert type(reward) is float and type(terminated) is bool and truncated is False
            assert obs in env.observation_space
            if terminated:
                break
            assert reward == 0.0 and info == {}
    assert steps == env.unwrapped.core.steps
    assert obs["t"].tolist() == [0]
    assert set(info["reward_terms"]) == {"loglik"} and info["reward_terms"]["loglik"] == pytest.approx(reward)
    assert reward < 0.0
    assert env.spec.max_episode_steps is None
    assert _ours(caught) == []


def test_stepping_after_the_end_raises_episode_state_error():
    env = gym.make("ReFiT-Synthetic-v0", exposed_steps=2, **SMALL)
    env.reset(seed=1)
    zeros = np.zeros(env.action_space.shape, dtype=np.float32)
    env.step(zeros)
    env.step(zeros)
    with pytest.raises(EpisodeStateError):
        env.unwrapped.step(zeros)


@pytest.mark.parametrize(
    "action",
    [np.zeros(39, np.float32), np.zeros((1, 40), np.float32), np.zeros(40, np.int32), np.full(40, np.nan, np.float32)],
    ids=["short", "batched", "int", "nan"],
)
def test_bad_actions_raise_value_errors(action):
    env = DenoisingEnv(**SMALL)
    obs, _ = env.reset(seed=0)
    with pytest.raises(ActionError) as error:
        env.step(action)
    assert isinstance(error.value, ValueError)
    next_obs, *_ = env.step(np.zeros(40, np.float64))  # float64 is cast; the state was untouched
    assert next_obs["t"].tolist() == [obs["t"][0] - 1]


def test_unknown_kwargs_and_options_raise_config_error():
    with pytest.raises(ConfigError, match="no_such_kwarg"):
        gym.make("ReFiT-Synthetic-v0", no_such_kwarg=1, **SMALL)
    with pytest.raises(ConfigError, match="render_mode"):
        DenoisingEnv(render_mode="human", **SMALL)
    env = DenoisingEnv(**SMALL)
    with pytest.raises(ConfigError, match="reset_mask"):
        env.reset(options={"reset_mask": [True]})


def test_reset_option_users_picks_the_user():
    env = DenoisingEnv(**SMALL)
    obs, _ = env.reset(seed=0, options={"users": 17})
    assert obs["user"].tolist() == [17]
    obs, _ = env.reset(options={"users": [3]})
    assert obs["user"].tolist() == [3]


def test_render_ansi_shows_top_items_with_titles():
    data = make_synthetic(60, 40, seed=0)
    titled = dataclasses.replace(data, item_titles=tuple(f"Movie {i} (1999)" for i in range(data.n_items)))
    env = gym.make("ReFiT-Synthetic-v0", data=titled, pretrained=False, render_mode="ansi", render_top_k=5)
    obs, _ = env.reset(seed=0)
    text = env.render()
    assert isinstance(text, str) and f"user {obs['user'][0]}" in text
    assert text.count("Movie ") == 5 and "t = 10 of 10" in text
    for _ in range(10):
        obs, *_ = env.step(np.random.default_rng(0).random(data.n_items).astype(np.float32))
    text = env.render()
    visible = env.unwrapped.core.visible[0].numpy() > 0
    shown = [int(line.split("item")[1].split()[0]) for line in text.splitlines()[2:]]
    assert len(shown) == 5 and not visible[shown].any()  # input items are not recommended
    plain = DenoisingEnv(render_mode="ansi", **SMALL)
    plain.reset(seed=0)
    assert "Movie" not in plain.render()
