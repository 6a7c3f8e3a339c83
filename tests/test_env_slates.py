"""The env option ``slate_size``: the terminal slate of every front, its log-probability, its reward, seeding."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import refit_gym
from refit_gym.data import make_synthetic
from refit_gym.envs.factory import build_env_parts
from refit_gym.envs.gym_env import DenoisingEnv
from refit_gym.envs.scenarios import env_config
from refit_gym.envs.vector_env import DenoisingVectorEnv
from refit_gym.errors import ConfigError
from refit_gym.rewards import SlateReward
from refit_gym.rewards.base import EpisodeBatch
from refit_gym.slates import sample_slates, slate_log_prob, slate_reward

N_USERS, N_ITEMS = 60, 40
SMALL = {"pretrained": False, "dataset": f"synthetic:n_users={N_USERS},n_items={N_ITEMS},seed=0"}
SLATE_REWARD = {"loglik": 1.0, "slate_hits": {"type": "slate", "metric": "hits"},
                "slate_ndcg": {"type": "slate", "metric": "ndcg", "weight": 0.5}}

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(N_USERS, N_ITEMS, seed=0)


def make_core(data, batch_size=6, **kwargs):
    return build_env_parts("ReFiT-Synthetic-v0", batch_size=batch_size, data=data, pretrained=False, **kwargs).core


def actions_for(step: int, rows: int) -> np.ndarray:
    return np.random.default_rng(100 + step).random((rows, N_ITEMS), dtype=np.float32) * 1.5 - 0.25


def run_core(core, seed: int, users=None):
    """One episode with fixed actions; the terminal StepResult."""
    core.reset(np.random.default_rng(seed), users=users)
    for step in range(core.exposed_steps):
        result = core.step(actions_for(step, core.batch_size))
    assert result.terminated.all()
    return result


def final_scores(core, x0) -> torch.Tensor:
    with torch.no_grad():
        return core.model.item_scores(torch.as_tensor(x0)).float()


# ------------------------------------------------------------------ what the slate is


def test_slates_are_distinct_non_input_items_with_the_reported_log_prob_and_reward(data):
    # a high temperature makes the draw nearly uniform: a slate that ignored the input would hold input items
    core = make_core(data, slate_size=10, slate_temperature=5.0, exposed_steps=3, reward=SLATE_REWARD)
    result = run_core(core, seed=0)
    slates = result.slates
    assert slates.shape == (6, 10) and slates.dtype == torch.int64
    assert all(len(set(row)) == 10 for row in slates.tolist())
    assert not core.visible.gather(1, slates).bool().any()
    assert result.slate_log_prob.dtype == torch.float32 and result.slate_log_prob.shape == (6,)
    scores = final_scores(core, result.observation["x_t"])
    expected = slate_log_prob(scores, core.visible, slates, 5.0)
    torch.testing.assert_close(result.slate_log_prob, expected)
    assert (result.slate_log_prob < 0).all()
    episode = core.episode()
    torch.testing.assert_close(result.components["slate_hits"], slate_reward(slates, episode, "hits"))
    torch.testing.assert_close(result.components["slate_ndcg"], slate_reward(slates, episode, "ndcg"))
    assert result.components["slate_hits"].sum() > 0  # some slate finds a held-out item (the check is not vacuous)
    total = result.components["loglik"] + 0.5 * result.components["slate_ndcg"] + result.components["slate_hits"]
    torch.testing.assert_close(result.reward, total)


def test_a_low_temperature_slate_is_the_top_k_of_the_non_input_items(data):
    core = make_core(data, slate_size=5, slate_temperature=1e-6, exposed_steps=2)
    result = run_core(core, seed=1)
    scores = final_scores(core, result.observation["x_t"]).masked_fill(core.visible > 0, float("-inf"))
    assert torch.equal(result.slates, scores.topk(5, dim=1).indices)


def test_gym_front_reports_the_slate_and_the_slate_term():
    env = gym.make("ReFiT-Synthetic-v0", slate_size=4, slate_temperature=1.0, exposed_steps=2,
                   reward={"loglik": 1.0, "slate": {"metric": "recall"}}, **SMALL)
    obs, _ = env.reset(seed=3)
    obs, _, terminated, _, info = env.step(actions_for(0, 1)[0])
    assert not terminated and "slate" not in info and "slate_log_prob" not in info
    obs, _, terminated, _, info = env.step(actions_for(1, 1)[0])
    assert terminated
    slate = info["slate"]
    assert isinstance(slate, np.ndarray) and slate.dtype == np.int64 and slate.shape == (4,)
    assert isinstance(info["slate_log_prob"], float)
    core = env.unwrapped.core
    scores = final_scores(core, obs["x_t"][None])
    slate_t = torch.from_numpy(slate)[None]
    assert info["slate_log_prob"] == pytest.approx(float(slate_log_prob(scores, core.visible, slate_t, 1.0)[0]),
                                                   rel=1e-5)
    assert info["reward_terms"]["slate"] == pytest.approx(float(slate_reward(slate_t, core.episode(), "recall")[0]))


def test_vector_and_sb3_fronts_report_slates_of_the_ended_rows():
    venv = DenoisingVectorEnv(num_envs=3, slate_size=4, exposed_steps=2, **SMALL)
    venv.reset(seed=0)
    _, _, _, _, info = venv.step(actions_for(0, 3))
    assert "slate" not in info
    _, _, terminated, _, info = venv.step(actions_for(1, 3))
    assert terminated.all()
    assert info["slate"].shape == (3, 4) and info["slate"].dtype == np.int64 and info["_slate"].all()
    assert info["slate_log_prob"].shape == (3,) and info["slate_log_prob"].dtype == np.float32
    assert info["_slate_log_prob"].all()

    pytest.importorskip("stable_baselines3")
    sb3 = refit_gym.make_sb3_vec_env("ReFiT-Synthetic-v0", num_envs=3, slate_size=4, exposed_steps=2, **SMALL)
    sb3.seed(0)
    sb3.reset()
    _, _, dones, infos = sb3.step(actions_for(0, 3))
    assert not dones.any() and infos == [{}, {}, {}]
    _, _, dones, infos = sb3.step(actions_for(1, 3))
    assert dones.all()
    for row, row_info in enumerate(infos):  # the same episodes as the vector env with seed 0
        assert np.array_equal(row_info["slate"], info["slate"][row])
        assert row_info["slate_log_prob"] == pytest.approx(float(info["slate_log_prob"][row]))


def test_torchrl_front_carries_the_slate_keys():
    # rollout() acts with random actions from torch's global generator: seeded, and a temperature at which no
    # slate is certain (random actions span [-10, 10], so at 0.02 a slate's log-prob can round to 0)
    env = refit_gym.make_torchrl_env("ReFiT-Synthetic-v0", num_envs=3, slate_size=4, slate_temperature=1.0,
                                     exposed_steps=2, **SMALL)
    env.set_seed(0)
    torch.manual_seed(0)
    rollout = env.rollout(2, break_when_any_done=False)
    slates, log_prob = rollout["next", "slate"], rollout["next", "slate_log_prob"]
    assert slates.shape == (3, 2, 4) and slates.dtype == torch.int64 and log_prob.shape == (3, 2, 1)
    assert (rollout["slate"][:, 0] == -1).all() and (rollout["slate_log_prob"][:, 0] == 0).all()  # after reset
    assert (slates[:, 0] == -1).all() and (log_prob[:, 0] == 0).all()  # before the terminal step
    assert (slates[:, 1] >= 0).all() and (log_prob[:, 1] < 0).all()


# ------------------------------------------------------------------ seeding


def test_same_seed_same_slates_and_a_different_seed_differs(data):
    users = [3, 3, 7, 11]
    slates = {}
    for key, seed in (("a", 5), ("b", 5), ("c", 6)):
        core = make_core(data, batch_size=4, slate_size=6, slate_temperature=5.0, exposed_steps=2)
        slates[key] = run_core(core, seed, users=users).slates
    assert torch.equal(slates["a"], slates["b"])
    assert not torch.equal(slates["a"], slates["c"])
    assert not torch.equal(slates["a"][0], slates["a"][1])  # the same user in two rows: two draws


def test_row_zero_of_the_vector_env_draws_the_single_env_slate():
    kwargs = {"slate_size": 6, "slate_temperature": 2.0, **SMALL}
    single, vector = DenoisingEnv(**kwargs), DenoisingVectorEnv(num_envs=5, **kwargs)
    single.reset(seed=42)
    vector.reset(seed=42)
    for step in range(single.core.exposed_steps):
        actions = actions_for(step, 5)
        _, _, done, _, single_info = single.step(actions[0])
        _, _, _, _, vector_info = vector.step(actions)
    assert done
    assert np.array_equal(single_info["slate"], vector_info["slate"][0])
    assert single_info["slate_log_prob"] == pytest.approx(float(vector_info["slate_log_prob"][0]), rel=1e-6)
    assert not np.array_equal(vector_info["slate"][0], vector_info["slate"][1])


def test_a_row_draws_the_same_slate_whichever_rows_step(data):
    full = make_core(data, batch_size=3, slate_size=5, slate_temperature=5.0, exposed_steps=2)
    part = make_core(data, batch_size=3, slate_size=5, slate_temperature=5.0, exposed_steps=2)
    expected = run_core(full, seed=9).slates
    part.reset(np.random.default_rng(9))
    part.step(actions_for(0, 3))
    result = part.step(actions_for(1, 3), active=np.array([True, False, True]))
    assert result.terminated.tolist() == [True, False, True]
    assert torch.equal(result.slates[[0, 2]], expected[[0, 2]])
    assert (result.slates[1] == -1).all() and result.slate_log_prob[1] == 0
    late = part.step(actions_for(1, 3), active=np.array([False, True, False]))  # row 1 ends one call later
    assert (late.slates[[0, 2]] == -1).all() and late.slates[1].ge(0).all()


# ------------------------------------------------------------------ the external judges


def test_external_checkers_pass_with_slates():
    from gymnasium.utils.env_checker import check_env
    from torchrl.envs.utils import check_env_specs

    kwargs = {"slate_size": 5, "exposed_steps": 3, "reward": "loglik+slate", **SMALL}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one advice: a [-1, 1] action Box (tests/test_env_gym.py)
        check_env(gym.make("ReFiT-Synthetic-v0", **kwargs).unwrapped)
    check_env_specs(refit_gym.make_torchrl_env("ReFiT-Synthetic-v0", num_envs=3, **kwargs), seed=0)
    sb3_checker = pytest.importorskip("stable_baselines3.common.env_checker")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sb3_checker.check_env(gym.make("ReFiT-Synthetic-v0", **kwargs).unwrapped)


# ------------------------------------------------------------------ off: nothing changes


def test_with_the_option_off_nothing_changes(data):
    off, on = make_core(data, exposed_steps=3), make_core(data, exposed_steps=3, slate_size=5)
    assert off.slate_size is None and make_core(data, slate_size=0).slate_size is None
    result_off, result_on = run_core(off, seed=2), run_core(on, seed=2)
    assert result_off.slates is None and result_off.slate_log_prob is None
    assert torch.equal(result_off.reward, result_on.reward)  # the slate's draws leave the other streams alone
    assert torch.equal(result_off.observation["x_t"], result_on.observation["x_t"])
    env = gym.make("ReFiT-Synthetic-v0", exposed_steps=1, **SMALL)
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(actions_for(0, 1)[0])
    assert terminated and set(info) == {"reward_terms"}
    tenv = refit_gym.make_torchrl_env("ReFiT-Synthetic-v0", num_envs=2, exposed_steps=1, **SMALL)
    assert "slate" not in tenv.observation_spec.keys() and "slate_log_prob" not in tenv.observation_spec.keys()
    assert "slate" not in tenv.rollout(1)["next"].keys()


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("value", [-1, 1.5, True, "3", N_ITEMS + 1])
def test_bad_slate_size_names_the_option(data, value):
    with pytest.raises(ConfigError, match="slate_size"):
        make_core(data, slate_size=value)


@pytest.mark.parametrize("value", [0.0, -0.1, float("nan"), float("inf"), "hot"])
def test_bad_slate_temperature_names_the_option(data, value):
    with pytest.raises(ConfigError, match="slate_temperature"):
        make_core(data, slate_size=3, slate_temperature=value)


def test_a_slate_larger_than_a_row_may_recommend_raises_at_reset(data):
    core = make_core(data, batch_size=2, slate_size=N_ITEMS - 2)  # every user shows at least 5 items
    with pytest.raises(ConfigError, match=r"slate_size 38 exceeds the \d+ items user \d+ may recommend"):
        core.reset(np.random.default_rng(0))
    assert not core.ready  # nothing was committed


def test_the_slate_reward_without_slate_size_is_refused_when_the_env_is_built(data):
    with pytest.raises(ConfigError, match="slate_size"):
        make_core(data, reward="loglik+slate")
    with pytest.raises(ConfigError, match="slate_size"):
        gym.make("ReFiT-Synthetic-v0", reward={"slate": {"metric": "hits"}}, **SMALL)
    # called directly on an episode without slates, the term says what it needs
    episode = EpisodeBatch(users=torch.zeros(1, dtype=torch.int64), visible=torch.zeros(1, N_ITEMS),
                           held_out=torch.zeros(1, N_ITEMS, dtype=torch.bool))
    with pytest.raises(ConfigError, match="needs the env option slate_size"):
        SlateReward()(torch.zeros(1, N_ITEMS), episode)
    with pytest.raises(ConfigError, match="slate reward metric"):
        SlateReward(metric="collaborative")


def test_sample_slates_uses_the_given_uniforms():
    scores = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    visible = torch.zeros(3, 12)
    visible[:, :4] = 1.0
    uniform = torch.rand(3, 12, generator=torch.Generator().manual_seed(1))
    gumbel = -torch.log(-torch.log(uniform))
    expected = (scores / 0.5 + gumbel).masked_fill(visible > 0, float("-inf")).topk(3, dim=1).indices
    assert torch.equal(sample_slates(scores, visible, 3, 0.5, uniform=uniform), expected)
    with pytest.raises(ConfigError, match="uniform must have the scores' shape"):
        sample_slates(scores, visible, 3, 0.5, uniform=uniform[:, :5])


def test_the_yaml_env_section_passes_the_slate_options():
    kwargs = env_config({"slate_size": 7, "slate_temperature": 0.5}).chain_kwargs()
    assert kwargs == {"slate_size": 7, "slate_temperature": 0.5}
