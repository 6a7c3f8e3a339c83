"""The slate agents (agents/slate.py): their estimators against exact gradients, and training."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from agents import agent_class
from agents.config import finetune_config
from agents.slate import leave_one_out_advantages, plackett_luce_metric_gradient, position_weights
from conftest import TINY_EXPERIMENT, assert_same_run, build_tiny_learner
from refit_gym.errors import ConfigError
from refit_gym.rewards.base import EpisodeBatch
from refit_gym.slates import sample_slates, slate_log_prob, slate_reward

pytestmark = pytest.mark.usefixtures("single_torch_thread")
SLATE_AGENTS = ("slate-rloo", "slate-grpo", "slate-plrank")


def tiny_episode(held_out: list[int], n_items: int, visible: list[int] = ()) -> EpisodeBatch:
    mask = torch.zeros(1, n_items, dtype=torch.bool)
    mask[0, list(held_out)] = True
    seen = torch.zeros(1, n_items)
    seen[0, list(visible)] = 1.0
    return EpisodeBatch(users=torch.zeros(1, dtype=torch.long), visible=seen, held_out=mask)


def exact_expected_reward_gradient(logits: torch.Tensor, episode: EpisodeBatch, k: int, kind: str) -> torch.Tensor:
    """``d E[reward(slate)] / d logits`` by enumerating every slate of ``k`` allowed items."""
    logits = logits.clone().requires_grad_(True)
    allowed = [i for i in range(logits.shape[1]) if episode.visible[0, i] == 0]
    slates = torch.tensor(list(itertools.permutations(allowed, k)))
    n = len(slates)
    log_p = slate_log_prob(logits.expand(n, -1), episode.visible.expand(n, -1), slates, 1.0)
    batch = EpisodeBatch(users=episode.users.expand(n), visible=episode.visible.expand(n, -1),
                         held_out=episode.held_out.expand(n, -1))
    expected = (log_p.exp() * slate_reward(slates, batch, kind)).sum()
    return torch.autograd.grad(expected, logits)[0]


@pytest.mark.parametrize("kind", ["ndcg", "recall", "hits"])
def test_plrank_gradient_is_an_unbiased_estimate_of_the_exact_one(kind):
    torch.manual_seed(0)
    logits = torch.randn(1, 6, dtype=torch.float64)
    episode = tiny_episode(held_out=[1, 4], n_items=6, visible=[2])
    exact = exact_expected_reward_gradient(logits, episode, 3, kind)
    n = 20_000
    batch = EpisodeBatch(users=torch.zeros(n, dtype=torch.long), visible=episode.visible.expand(n, -1),
                         held_out=episode.held_out.expand(n, -1))
    masked = logits.expand(n, -1).masked_fill(batch.visible > 0, float("-inf"))
    slates = sample_slates(logits.expand(n, -1), batch.visible, 3, 1.0, torch.Generator().manual_seed(1))
    relevance = (batch.held_out & (batch.visible == 0)).double()
    weights = position_weights(kind, batch, 3).double()
    for group_size in (1, 4):  # without and with the leave-one-out baseline
        estimate = plackett_luce_metric_gradient(masked, slates, relevance, weights, group_size)
        torch.testing.assert_close(estimate.mean(0, keepdim=True), exact, atol=0.01, rtol=0.05)
        assert float(estimate[:, 2].abs().max()) == 0.0  # an input item gets no gradient
    plain = plackett_luce_metric_gradient(masked, slates, relevance, weights, 1)
    assert float(estimate.var(0).sum()) < float(plain.var(0).sum())  # the baseline lowers the variance


def test_leave_one_out_policy_gradient_is_unbiased():
    torch.manual_seed(1)
    logits = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    episode = tiny_episode(held_out=[0, 3], n_items=5)
    exact = exact_expected_reward_gradient(logits.detach(), episode, 2, "ndcg")
    groups, g = 6_000, 4
    n = groups * g
    batch = EpisodeBatch(users=torch.zeros(n, dtype=torch.long), visible=episode.visible.expand(n, -1),
                         held_out=episode.held_out.expand(n, -1))
    slates = sample_slates(logits.detach().expand(n, -1), batch.visible, 2, 1.0, torch.Generator().manual_seed(2))
    advantages = leave_one_out_advantages(slate_reward(slates, batch, "ndcg"), g)
    surrogate = (advantages * slate_log_prob(logits.expand(n, -1), batch.visible, slates, 1.0)).mean()
    torch.testing.assert_close(torch.autograd.grad(surrogate, logits)[0], exact, atol=0.01, rtol=0.1)


def test_leave_one_out_advantages_match_their_definition():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    expected = [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0]
    assert leave_one_out_advantages(rewards, 3).tolist() == pytest.approx(expected)
    with pytest.raises(ConfigError, match="at least 2 slates per user"):
        leave_one_out_advantages(rewards, 1)


@pytest.mark.parametrize("kind", ["ndcg", "recall", "hits", "collaborative"])
def test_position_weights_times_relevance_is_the_slate_reward(kind):
    torch.manual_seed(2)
    n_items, k = 12, 4
    held = torch.rand(5, n_items) < 0.3
    held[0] = False  # a row with nothing hidden
    batch = EpisodeBatch(users=torch.arange(5), visible=(torch.rand(5, n_items) < 0.2).float() * ~held, held_out=held)
    slates = sample_slates(torch.randn(5, n_items), batch.visible, k, 1.0, torch.Generator().manual_seed(0))
    targets = torch.rand(5, n_items) * (batch.visible == 0)
    relevance = targets if kind == "collaborative" else (held & (batch.visible == 0)).float()
    by_weights = (position_weights(kind, batch, k) * relevance.gather(1, slates)).sum(1)
    torch.testing.assert_close(by_weights, slate_reward(slates, batch, kind, targets))


def expected_slate_reward(agent, users: np.ndarray, draws: int = 16) -> float:
    """Mean slate reward of ``draws`` slates per user on the deterministic chain (fixed seeds)."""
    rollout = agent.collect(users, np.random.default_rng(5), torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = agent.slate_logits(rollout).repeat_interleave(draws, 0)
        episode = agent.slate_episode(rollout.episode)
        episode = EpisodeBatch(*(x.repeat_interleave(draws, 0) for x in (episode.users, episode.visible,
                                                                            episode.held_out)))
        return float(agent.rewards(agent.draw(logits, torch.Generator().manual_seed(7)), episode).mean())


@pytest.mark.parametrize("agent_name", SLATE_AGENTS)
def test_each_slate_agent_raises_its_expected_slate_reward(tiny_data, tiny_pretrained, agent_name):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, agent_name, lr=3e-3, anchor="none", slate_size=5,
                                  slate_temperature=0.5, rollouts_per_user=8, inner_epochs=2)
    users = np.arange(32)
    before = expected_slate_reward(agent, users)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for _ in range(25):
        diagnostics = agent.update(users, rng, generator)
    assert np.isfinite(diagnostics["loss"]) and "slate_reward" in diagnostics
    assert agent.core.batch_size == 32  # one chain per user: the 8 slates share it
    assert expected_slate_reward(agent, users) > before, agent_name


def test_a_stochastic_chain_adds_its_gaussian_steps_to_the_trajectory_log_prob(tiny_data, tiny_pretrained):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "slate-rloo", slate_chain="stochastic", slate_size=3,
                                  trained_steps=2)
    assert agent.core.batch_size == 32 * 4  # one chain per slate
    rollout = agent.collect(np.arange(32), np.random.default_rng(0), torch.Generator().manual_seed(0))
    logits = agent.slate_logits(rollout)
    slates = agent.draw(logits, torch.Generator().manual_seed(1))
    with torch.no_grad():
        total = agent.trajectory_log_prob(rollout, logits, slates)
        slate_only = slate_log_prob(logits.masked_fill(~torch.isfinite(logits), 0), ~torch.isfinite(logits), slates, 1.0)
        steps = agent.step_log_probs(rollout, agent.trained_step_indices(rollout)).sum(0)
    torch.testing.assert_close(total, slate_only + steps)
    torch.testing.assert_close(steps, rollout.log_probs[-2:].sum(0))  # the log-probs the rollout sampled with
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    assert np.isfinite(agent.update(np.arange(32), rng, generator)["loss"])


def test_every_slate_agent_says_what_it_sees_and_bad_settings_are_refused(tiny_data, tiny_pretrained):
    labels = {name: agent_class(name).information(finetune_config({"agent": name})) for name in SLATE_AGENTS}
    assert labels == {"slate-rloo": "a", "slate-grpo": "a", "slate-plrank": "c"}
    with pytest.raises(ConfigError, match="slate_reward must be one of"):
        finetune_config({"slate_reward": "mrr"})
    with pytest.raises(ConfigError, match="slate_size must be > 0"):
        finetune_config({"slate_size": 0})
    with pytest.raises(ConfigError, match="rollouts_per_user must be >= 2"):
        build_tiny_learner(tiny_data, tiny_pretrained, "slate-rloo", rollouts_per_user=1)
    with pytest.raises(ConfigError, match="slate-plrank takes finetune.slate_chain='deterministic'"):
        build_tiny_learner(tiny_data, tiny_pretrained, "slate-plrank", slate_chain="stochastic")
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "slate-rloo", slate_size=200)
    with pytest.raises(ConfigError, match="slate size 200 exceeds"):
        agent.update(np.arange(32), np.random.default_rng(0), torch.Generator().manual_seed(0))


def test_the_collaborative_slate_reward_trains(tiny_data, tiny_pretrained):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "slate-plrank", slate_reward="collaborative",
                                  slate_size=5, slate_collaborative_k=10)
    out = agent.update(np.arange(32), np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert 0.0 < out["slate_reward"] <= 1.0 and np.isfinite(out["loss"])


def test_a_slate_run_through_the_trainer_is_reproducible(tiny_data, tiny_pretrained, tmp_path):
    from agents.trainer import finetune
    from refit_gym.config import config_from_dict

    settings = {"agent": "slate-grpo", "users_per_batch": 32, "rollouts_per_user": 4,
                "exposed_steps": 2, "slate_size": 5, "max_updates": 4, "eval_every": 2, "inner_epochs": 1,
                "time_budget_s": None}
    config = config_from_dict({**TINY_EXPERIMENT, "finetune": settings})
    for name in ("a", "b"):
        finetune(config, tiny_data, tiny_pretrained, tmp_path / name, progress=False, log=lambda _: None)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    header = (tmp_path / "a" / "log.csv").read_text().splitlines()[0]
    assert "slate_reward" in header and "clip_fraction" in header


@pytest.mark.parametrize("agent_name", SLATE_AGENTS)
def test_the_slate_agents_have_a_gradient_estimate_with_sampling_noise(tiny_data, tiny_pretrained, agent_name):
    from agents.gradient_signal import gradient_signal

    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, agent_name, slate_size=5, rollouts_per_user=4)
    signal = gradient_signal(agent, np.arange(32), seed=0)
    assert -1.0 < signal["pair_cosine"] < 0.999 and signal["norm"] > 0
    assert signal == {**gradient_signal(agent, np.arange(32), seed=0), "seconds": signal["seconds"]}


@pytest.mark.parametrize("chain", ["deterministic", "stochastic"])
def test_grpo_ratios_start_at_one_on_any_minibatch(tiny_data, tiny_pretrained, chain):
    """Before any step, a minibatch's recomputed slate (and chain) log-probs equal those at sampling."""
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "slate-grpo", slate_chain=chain, slate_size=4,
                                  trained_steps=2)
    rollout = agent.collect(np.arange(32), np.random.default_rng(0), torch.Generator().manual_seed(0))
    batch = agent.targets(rollout, torch.Generator().manual_seed(1))
    rows = torch.tensor([3, 0, 17])
    per_chain = agent.slates_per_user // agent.group_size
    slate_rows = (rows[:, None] * per_chain + torch.arange(per_chain)).reshape(-1)
    terms = agent.minibatch_loss(rollout, rows, batch["slates"][slate_rows], batch["advantages"][slate_rows],
                                 batch["old"][slate_rows])
    assert float(terms["approx_kl"]) < 1e-10 and float(terms["clip_fraction"]) == 0.0
