"""The batched torch core of the denoising MDP: transitions, holdout, reward, seeding, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from refit_gym.data import UserSequences, make_synthetic
from refit_gym.data.history import SequenceTable
from refit_gym.data.interactions import pairs_to_csr
from refit_gym.envs.core import DenoisingMDP, held_out_counts_tensor, padded_width
from refit_gym.envs.factory import build_env_parts
from refit_gym.envs.policies import denoiser_action
from refit_gym.errors import ActionError, ConfigError, EpisodeStateError, RefitGymError
from refit_gym.rewards import build_reward, build_shaping
from refit_gym.rewards.base import TrainingInteractions

N_USERS, N_ITEMS = 60, 40


pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ------------------------------------------------------------------ straightforward references
def held_out_counts(lengths: np.ndarray, fraction: float) -> np.ndarray:
    """How many training items each user hides: ``round(fraction * L)``, at least 1, at most ``L - 1``.

    ``L`` is the user's number of training items. A user with one item hides nothing (the input
    would be empty), and ``fraction = 0`` hides nothing.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if fraction <= 0.0:
        return np.zeros_like(lengths)
    counts = np.floor(fraction * lengths + 0.5).astype(np.int64)
    return np.clip(counts, 1, np.maximum(lengths - 1, 0))


def recent_held_out_matrix(sequences: UserSequences, n_items: int, fraction: float) -> sp.csr_matrix:
    """Binary ``(n_users, n_items)`` CSR of each user's most recent ``fraction`` of training items.

    "Most recent" follows ``train_sequences`` (each user's training items oldest first); the
    count per user is :func:`held_out_counts` of the sequence length. Vectorised (no per-user loop).
    """
    n_users = len(sequences)
    lengths = sequences.lengths
    counts = held_out_counts(lengths, fraction)
    owner = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    position = np.arange(len(sequences.items), dtype=np.int64) - np.repeat(sequences.indptr[:-1], lengths)
    hidden = position >= (lengths - counts)[owner]
    return pairs_to_csr(owner[hidden], sequences.items[hidden], n_users, n_items)


def test_the_tensor_counts_equal_the_reference():
    lengths = np.array([0, 1, 2, 4, 10, 11, 57])
    for fraction in (0.0, 0.25, 0.99):
        assert held_out_counts_tensor(torch.from_numpy(lengths), fraction).tolist() == \
            held_out_counts(lengths, fraction).tolist()


@pytest.fixture(scope="module")
def data():
    return make_synthetic(N_USERS, N_ITEMS, seed=0)


def make_core(data, batch_size=4, **kwargs) -> DenoisingMDP:
    return build_env_parts("ReFiT-Synthetic-v0", batch_size=batch_size, data=data, pretrained=False, **kwargs).core


def base_rollout(core: DenoisingMDP, seed: int, steps: int | None = None) -> tuple[list, list]:
    """Run the base denoiser as the policy; return the states and rewards."""
    rng = np.random.default_rng(seed)
    obs = core.reset(rng)
    states, rewards = [obs["x_t"]], []
    for _ in range(core.exposed_steps if steps is None else steps):
        action = denoiser_action(core.model.denoise, core.model.diffusion, obs["x_t"], obs["t"], core.action_mode)
        result = core.step(action)
        obs = result.observation
        states.append(obs["x_t"])
        rewards.append(result.reward)
    return states, rewards


# ------------------------------------------------------------------ the row-0 trick
@pytest.mark.parametrize("n_items", [16, 40, 299, 2810])
def test_padded_normal_rows_do_not_depend_on_batch_size(n_items):
    width = padded_width(n_items)
    one = torch.randn(1, width, generator=torch.Generator().manual_seed(7))[:, :n_items]
    many = torch.randn(33, width, generator=torch.Generator().manual_seed(7))[:, :n_items]
    assert torch.equal(one[0], many[0])


def test_uniform_rows_do_not_depend_on_batch_size():
    one = torch.rand(1, 48, generator=torch.Generator().manual_seed(3))
    many = torch.rand(9, 48, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one[0], many[0])


# ------------------------------------------------------------------ holdout
def test_held_out_counts_round_and_keep_one_item_visible():
    lengths = np.array([0, 1, 2, 4, 10, 11])
    assert held_out_counts(lengths, 0.25).tolist() == [0, 0, 1, 1, 3, 3]
    assert held_out_counts(lengths, 0.0).tolist() == [0] * 6
    assert held_out_counts(lengths, 0.99).tolist() == [0, 0, 1, 3, 9, 10]


def test_recent_holdout_hides_the_end_of_each_sequence():
    sequences = UserSequences.from_lists([[5, 1, 3, 0], [2, 4], [7]])
    hidden = recent_held_out_matrix(sequences, 8, 0.5).toarray()
    assert np.flatnonzero(hidden[0]).tolist() == [0, 3]  # the last two: 3, 0
    assert np.flatnonzero(hidden[1]).tolist() == [4]
    assert hidden[2].sum() == 0  # a single item is never hidden


@pytest.mark.parametrize("holdout", ["recent", "random", "none"])
def test_visible_and_held_out_partition_the_training_row(data, holdout):
    core = make_core(data, batch_size=8, holdout=holdout)
    core.reset(np.random.default_rng(0))
    history = torch.from_numpy(data.train[core.users.numpy()].toarray())
    episode = core.episode()
    assert torch.equal(episode.visible + episode.held_out.float(), history)
    assert episode.held_out.dtype == torch.bool
    lengths = (history > 0).sum(1).numpy()
    expected = held_out_counts(lengths, 0.25) if holdout != "none" else np.zeros_like(lengths)
    assert episode.held_out.sum(1).numpy().tolist() == expected.tolist()
    if holdout == "recent":
        hidden = recent_held_out_matrix(data.train_sequences, data.n_items, 0.25)[core.users.numpy()].toarray()
        assert np.array_equal(episode.held_out.numpy(), hidden > 0)


@pytest.mark.parametrize("holdout", ["recent", "random"])
def test_a_holdout_count_hides_exactly_that_many_items(data, holdout):
    core = make_core(data, batch_size=8, holdout=holdout, holdout_count=2)
    core.reset(np.random.default_rng(0))
    episode = core.episode()
    lengths = (data.train[core.users.numpy()] > 0).sum(1).A1
    assert episode.held_out.sum(1).numpy().tolist() == np.minimum(2, lengths - 1).tolist()
    if holdout == "recent":  # the last two positions of each chronological history
        for row, user in enumerate(core.users.tolist()):
            assert set(np.flatnonzero(episode.held_out[row].numpy())) == set(data.train_sequences[user][-2:].tolist())
    with pytest.raises(ConfigError, match="holdout_count"):
        make_core(data, holdout_count=-1)


def test_random_holdout_is_drawn_per_episode_and_seeded(data):
    core = make_core(data, batch_size=8, holdout="random")
    rng = np.random.default_rng(5)
    users = np.arange(8)
    core.reset(rng, users=users)
    first = core.held_out.clone()
    core.reset(rng, users=users)
    assert not torch.equal(first, core.held_out)
    core.reset(np.random.default_rng(5), users=users)
    assert torch.equal(first, core.held_out)


# ------------------------------------------------------------------ transitions
def test_x0_mode_applies_the_posterior_step(data):
    core = make_core(data, transition_std=0.0)
    obs = core.reset(np.random.default_rng(0))
    diffusion = core.model.diffusion
    action = torch.rand(4, core.n_items)
    result = core.step(action)
    t = core.steps - 1
    expected = diffusion.q_posterior_mean_variance(action, obs["x_t"], t)[0]
    assert torch.allclose(result.observation["x_t"], expected, atol=1e-6)
    assert result.observation["t"].squeeze(1).tolist() == [core.steps - 1] * 4


def test_x0_mode_noise_has_the_schedule_std_and_the_last_step_returns_the_action(data):
    core = make_core(data, batch_size=64)
    obs = core.reset(np.random.default_rng(0))
    action = torch.rand(64, core.n_items)
    diffusion = core.model.diffusion
    mean = diffusion.q_posterior_mean_variance(action, obs["x_t"], core.steps - 1)[0]
    noise = core.step(action).observation["x_t"] - mean
    expected_std = math.exp(0.5 * float(diffusion.posterior_log_variance_clipped[core.steps - 1]))
    assert noise.std().item() == pytest.approx(expected_std, rel=0.05)
    for _ in range(core.steps - 2):
        core.step(action)
    final = core.step(action)
    assert final.terminated.all()
    assert torch.allclose(final.observation["x_t"], action, atol=1e-6)  # step 0: x_0 = predicted x0


def test_x_prev_mode_takes_the_clipped_action_as_the_next_state(data):
    core = make_core(data, action_mode="x_prev", action_bound=2.0)
    core.reset(np.random.default_rng(0))
    action = torch.linspace(-5, 5, 4 * core.n_items).reshape(4, core.n_items)
    assert torch.equal(core.step(action).observation["x_t"], action.clamp(-2.0, 2.0))


def test_base_policy_in_x_prev_mode_reproduces_diffrec_scoring(data):
    """The deterministic mean path through the env equals the model's own evaluation scores."""
    core = make_core(data, action_mode="x_prev", holdout="none")
    states, _ = base_rollout(core, seed=0)
    histories = SequenceTable(data.train_sequences, data.n_items).batch(core.users)
    assert torch.allclose(states[-1], core.model.score(histories), atol=1e-5)


def test_hidden_prefix_is_run_by_the_base_model(data):
    full = make_core(data, action_mode="x_prev", holdout="none")
    short = make_core(data, action_mode="x_prev", holdout="none", exposed_steps=3)
    states, _ = base_rollout(full, seed=1, steps=full.steps - 3)
    obs = short.reset(np.random.default_rng(1))
    assert obs["t"].squeeze(1).tolist() == [3] * 4
    assert torch.equal(short.users, full.users)
    assert torch.allclose(obs["x_t"], states[-1], atol=1e-6)


def test_noise_steps_forward_noise_the_start(data):
    core = make_core(data, noise_steps=3, holdout="none")
    obs = core.reset(np.random.default_rng(0))
    assert not torch.equal(obs["x_t"], core.visible)
    alpha = float(core.model.diffusion.sqrt_alphas_cumprod[2])
    assert torch.allclose(obs["x_t"].mean(), alpha * core.visible.mean(), atol=0.05)


# ------------------------------------------------------------------ reward
def test_terminal_reward_is_the_bound_reward_of_the_final_scores(data):
    core = make_core(data, reward={"loglik": 1.0, "recall": {"weight": 0.5, "k": 5}})
    states, rewards = base_rollout(core, seed=2)
    for reward in rewards[:-1]:
        assert torch.count_nonzero(reward) == 0
    reference = build_reward({"loglik": 1.0, "recall": {"weight": 0.5, "k": 5}}, TrainingInteractions.from_data(data))
    scores = core.model.item_scores(states[-1])
    expected = reference(scores, core.episode())
    assert torch.allclose(rewards[-1], expected)


def test_step_reports_unweighted_terms_on_terminal_rows(data):
    core = make_core(data, reward={"loglik": 2.0, "likelihood": 0.0})
    core.reset(np.random.default_rng(0))
    for _ in range(core.steps - 1):
        result = core.step(torch.zeros(4, core.n_items))
        assert result.components == {}
    result = core.step(torch.zeros(4, core.n_items))
    assert set(result.components) == {"loglik", "likelihood"}
    assert torch.allclose(result.reward, 2.0 * result.components["loglik"])


def test_shaping_telescopes_over_an_episode(data):
    interactions = TrainingInteractions.from_data(data)
    core = make_core(data, shaping={"type": "held_out", "temperature": 0.5})
    potential = build_shaping({"type": "held_out", "temperature": 0.5}, interactions)
    obs = core.reset(np.random.default_rng(3))
    start, t0 = obs["x_t"], obs["t"]
    total_shaping = torch.zeros(4)
    for _ in range(core.steps):
        result = core.step(torch.rand(4, core.n_items))
        total_shaping += result.components["shaping"]
    end = result.observation["x_t"]
    episode = core.episode()
    expected = potential.potential(end, torch.zeros_like(t0), episode) - potential.potential(start, t0, episode)
    assert torch.allclose(total_shaping, expected, atol=1e-4)
    assert torch.allclose(result.reward, result.components["loglik"] + result.components["shaping"])


# ------------------------------------------------------------------ seeding
def test_same_seed_same_trajectory_different_seed_differs(data):
    first, rewards_1 = base_rollout(make_core(data), seed=11)
    second, rewards_2 = base_rollout(make_core(data), seed=11)
    third, _ = base_rollout(make_core(data), seed=12)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(rewards_1[-1], rewards_2[-1])
    assert not torch.equal(first[1], third[1])


def test_reset_draws_one_number_from_the_callers_generator(data):
    core = make_core(data)
    rng = np.random.default_rng(0)
    core.reset(rng)
    for _ in range(3):
        core.step(torch.zeros(4, core.n_items))
    reference = np.random.default_rng(0)
    reference.integers(0, 2**63 - 1)
    assert rng.bit_generator.state == reference.bit_generator.state


def test_partial_reset_only_touches_masked_rows(data):
    core = make_core(data, batch_size=6)
    rng = np.random.default_rng(0)
    core.reset(rng)
    core.step(torch.rand(6, core.n_items))
    before_x, before_users, before_t = core.x_t.clone(), core.users.clone(), core.t
    mask = np.array([True, False, False, True, False, False])
    obs = core.reset(rng, mask=mask)
    keep = torch.from_numpy(~mask)
    assert torch.equal(obs["x_t"][keep], before_x[keep])
    assert torch.equal(core.users[keep], before_users[keep])
    assert core.t.tolist() == [core.steps if m else before_t[i] for i, m in enumerate(mask)]


def test_active_mask_steps_only_some_rows(data):
    core = make_core(data, batch_size=4)
    core.reset(np.random.default_rng(0))
    before = core.x_t.clone()
    active = np.array([True, False, True, False])
    result = core.step(torch.rand(4, core.n_items), active=active)
    assert torch.equal(result.observation["x_t"][1], before[1])
    assert not torch.equal(result.observation["x_t"][0], before[0])
    assert core.t.tolist() == [core.steps - 1, core.steps, core.steps - 1, core.steps]
    assert result.stepped.tolist() == active.tolist()


def test_handed_out_observations_are_never_modified(data):
    core = make_core(data, batch_size=4)
    first = core.reset(np.random.default_rng(0))
    snapshot = {k: v.clone() for k, v in first.items()}
    core.step(torch.rand(4, core.n_items))
    core.reset(np.random.default_rng(1), mask=np.array([True, False, True, False]))
    assert all(torch.equal(first[k], snapshot[k]) for k in first)


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs",
    [
        {"action_mode": "eps"},
        {"exposed_steps": 0},
        {"exposed_steps": 11},
        {"exposed_steps": 2.5},
        {"exposed_steps": True},
        {"holdout": "oldest"},
        {"holdout_fraction": 1.0},
        {"holdout_fraction": -0.1},
        {"holdout_fraction": float("nan")},
        {"noise_steps": 11},
        {"action_bound": 0.0},
        {"action_bound": float("inf")},
        {"transition_std": -1.0},
        {"stochastic_prefix": "yes"},
        {"batch_size": 0},
        {"device": "tpu:9"},
        {"no_such_option": 1},
        {"reward": {"loglik": -1.0}},
        {"reward": {"recall": {"k": 10_000}}},
    ],
)
def test_bad_configuration_raises_config_error_naming_the_value(data, kwargs):
    with pytest.raises(ConfigError) as error:
        make_core(data, **kwargs)
    assert isinstance(error.value, ValueError)
    name = next(iter(kwargs))
    assert name in str(error.value) or str(list(kwargs.values())[0]) in str(error.value) or name == "reward"


@pytest.mark.parametrize(
    "bad_action",
    [
        np.zeros((4, N_ITEMS - 1), dtype=np.float32),
        np.zeros((N_ITEMS,), dtype=np.float32),
        np.zeros((4, N_ITEMS), dtype=np.int64),
        np.zeros((4, N_ITEMS), dtype=bool),
        np.full((4, N_ITEMS), "a"),
        np.where(np.eye(4, N_ITEMS) > 0, np.nan, 0.0).astype(np.float32),
        np.where(np.eye(4, N_ITEMS) > 0, np.inf, 0.0),
        torch.zeros(4, N_ITEMS, dtype=torch.int32),
        [[None] * N_ITEMS] * 4,
    ],
    ids=["short", "unbatched", "int", "bool", "str", "nan", "inf64", "torch-int", "objects"],
)
def test_bad_actions_raise_action_error_and_change_nothing(data, bad_action):
    first = torch.rand(4, data.n_items, generator=torch.Generator().manual_seed(1))
    core, reference = make_core(data), make_core(data)
    for env in (core, reference):
        env.reset(np.random.default_rng(0))
        env.step(first)
    x, t, users, held_out = core.x_t.clone(), core.t, core.users.clone(), core.held_out.clone()
    with pytest.raises(ActionError) as error:
        core.step(bad_action)
    assert isinstance(error.value, ValueError) and isinstance(error.value, RefitGymError)
    assert torch.equal(core.x_t, x) and np.array_equal(core.t, t)
    assert torch.equal(core.users, users) and torch.equal(core.held_out, held_out)
    # the episode goes on exactly as if the bad action had never been sent
    good = torch.rand(4, data.n_items, generator=torch.Generator().manual_seed(2))
    assert torch.equal(core.step(good).observation["x_t"], reference.step(good).observation["x_t"])


def test_float64_and_out_of_bound_actions_are_cast_and_clipped(data):
    core_32, core_64 = make_core(data, action_mode="x_prev"), make_core(data, action_mode="x_prev")
    for core in (core_32, core_64):
        core.reset(np.random.default_rng(0))
    action = np.random.default_rng(0).normal(0, 20, (4, data.n_items))
    x_32 = core_32.step(action.astype(np.float32)).observation["x_t"]
    x_64 = core_64.step(action).observation["x_t"]
    assert x_64.dtype == torch.float32
    assert torch.equal(x_32, x_64)
    assert float(x_64.abs().max()) == pytest.approx(core_32.action_bound)


def test_stepping_a_finished_row_or_before_reset_raises(data):
    core = make_core(data)
    with pytest.raises(EpisodeStateError):
        core.step(torch.zeros(4, data.n_items))
    core.reset(np.random.default_rng(0))
    for _ in range(core.steps):
        core.step(torch.zeros(4, data.n_items))
    with pytest.raises(EpisodeStateError, match="reset"):
        core.step(torch.zeros(4, data.n_items))
    core.reset(np.random.default_rng(0), mask=np.array([True, True, False, False]))
    with pytest.raises(EpisodeStateError, match="2 row"):
        core.step(torch.zeros(4, data.n_items))
    core.step(torch.zeros(4, data.n_items), active=np.array([True, True, False, False]))


@pytest.mark.parametrize(
    "options",
    [{"users": [0, 1, 2]}, {"users": [0, 1, 2, N_USERS]}, {"users": [0.5] * 4}, {"mask": [1, 0, 1, 0]}],
)
def test_bad_reset_arguments_raise_config_error(data, options):
    core = make_core(data)
    with pytest.raises(ConfigError):
        core.reset(np.random.default_rng(0), **options)


def test_env_keeps_its_own_frozen_model(data):
    from refit_gym.config import load_config
    from refit_gym.training.cache import fresh_model

    model = fresh_model(load_config("synthetic"), data)
    model.train()
    core = DenoisingMDP(model, build_reward("loglik", data), TrainingInteractions.from_data(data))
    assert core.model is not model
    assert not core.model.training and not any(p.requires_grad for p in core.model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_a_non_finite_reward_is_refused_naming_the_term_and_the_user(data):
    from refit_gym.errors import RewardError
    from refit_gym.rewards.base import RewardTerm

    class Broken(RewardTerm):
        name = "broken"

        def __call__(self, scores, episode):
            value = torch.zeros(episode.batch_size)
            value[1] = float("nan")
            return value

    core = make_core(data, reward=Broken(), exposed_steps=1, batch_size=3)
    obs = core.reset(np.random.default_rng(0), users=[4, 9, 2])
    before = core.x_t.clone()
    with pytest.raises(RewardError, match=r"reward term 'broken' is nan for user 9; the state was not changed"):
        core.step(obs["x_t"])
    assert torch.equal(core.x_t, before) and core.t.tolist() == [1, 1, 1]


def test_top_items_rank_ties_by_item_id_and_skip_the_input(data, monkeypatch):
    core = make_core(data)
    core.reset(np.random.default_rng(0))
    monkeypatch.setattr(core.model, "item_scores", lambda x0: torch.zeros(x0.shape[0], core.n_items))
    top = core.top_items(3)
    visible = core.visible > 0
    for row in range(core.batch_size):
        expected = [i for i in range(core.n_items) if not visible[row, i]][:3]
        assert top.indices[row].tolist() == expected
    assert torch.equal(top.values, torch.zeros(core.batch_size, 3))
    values, items = core.top_items(2, rows=np.array([1]), exclude_input=False)
    assert items.tolist() == [[0, 1]] and values.shape == (1, 2)
