"""Fine-tuning agents on a tiny synthetic env: each improves its own objective; resume; checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents import AGENTS, agent_class
from agents.config import finetune_config
from agents.rollout import collect_rollouts, group_advantages, shuffle_rewards_within_groups
from agents.trainer import finetune
from conftest import assert_same_run, crash_at_update
from refit_gym.checkpoint import load_checkpoint
from refit_gym.config import config_from_dict
from refit_gym.errors import ConfigError
from refit_gym.evaluation.evaluator import evaluate
from refit_gym.rewards import build_shaping

from conftest import TINY_EXPERIMENT as EXPERIMENT
from conftest import build_tiny_learner as _setup
from conftest import train_tiny
NATIVE_AGENTS = ("refit", "supervised", "reinforce", "ppo")
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize("agent_name", NATIVE_AGENTS)
def test_each_agent_improves_its_own_objective(tiny_data, tiny_pretrained, agent_name):
    reward = {"loglik": {"weight": 1.0, "temperature": 0.5}}
    agent, _ = _setup(tiny_data, tiny_pretrained, agent_name, lr=3e-3, reward=reward, anchor="none",
                      log_prob_reduction="mean" if agent_name == "ppo" else "sum", inner_epochs=2)
    before, after, diagnostics = train_tiny(agent)
    assert np.isfinite(diagnostics["loss"])
    assert after > before, (agent_name, before, after)


def test_group_advantages_are_normalised_within_each_user():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    advantages = group_advantages(returns, 3)
    torch.testing.assert_close(advantages[:3], torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(advantages[3:], torch.zeros(3))  # equal rewards: no signal
    assert group_advantages(torch.tensor([0.0, 100.0]), 1, clip=0.5).abs().max() == 0.5


def test_rollout_log_probs_match_the_policy(tiny_data, tiny_pretrained):
    agent, _ = _setup(tiny_data, tiny_pretrained, "reinforce")
    rows = np.repeat(np.arange(32), 4)
    rollout = collect_rollouts(agent.core, agent.policy, rows, np.random.default_rng(0), torch.Generator().manual_seed(0), 4)
    with torch.no_grad():
        recomputed = agent.step_log_probs(rollout, list(range(rollout.n_steps)))
    torch.testing.assert_close(recomputed, rollout.log_probs)
    assert rollout.states.shape == (2, 128, tiny_data.n_items)


def test_recording_the_last_steps_keeps_their_tensors_and_the_whole_return(tiny_data, tiny_pretrained):
    agent, _ = _setup(tiny_data, tiny_pretrained, "reinforce", exposed_steps=0)
    agent.core.shaping = build_shaping({"type": "held_out", "temperature": 0.5}, tiny_data)  # rewards on every step
    rows = np.repeat(np.arange(32), 4)

    def collect(recorded_steps):
        return collect_rollouts(agent.core, agent.policy, rows, np.random.default_rng(0), torch.Generator().manual_seed(0),
                                4, explored_steps=2, recorded_steps=recorded_steps)

    full, last = collect(0), collect(2)
    assert full.n_steps == agent.core.exposed_steps > 2 and last.n_steps == 2
    for name in ("states", "remaining", "actions", "log_probs", "rewards"):
        torch.testing.assert_close(getattr(last, name), getattr(full, name)[-2:], rtol=0, atol=0)
    torch.testing.assert_close(last.returns_to_go(), full.returns_to_go()[-2:])
    torch.testing.assert_close(last.episode_return(), full.episode_return())
    assert full.rewards[:-2].abs().sum() > 0  # the unrecorded steps did carry reward


def test_kl_to_the_pretrained_ranking_starts_at_zero_and_matches_torch_distributions(tiny_data, tiny_pretrained):
    agent, _ = _setup(tiny_data, tiny_pretrained, "supervised", lr=1e-2)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    users = np.arange(32)
    assert float(agent.ranking_kl_to_reference(agent.collect(users, rng, generator)).abs().max()) < 1e-6
    assert agent.update(users, rng, generator)["kl_to_pretrained"] > 0  # diagnostics are taken after the step
    rollout = agent.collect(users, rng, generator)
    kl = agent.ranking_kl_to_reference(rollout)
    with torch.no_grad():  # the reference: two Categoricals over the items not in the input
        keep = rollout.episode.visible <= 0
        x0 = agent.policy.predict_x0(rollout.states[-1], rollout.remaining[-1])
        agent.policy.model, trained = agent.reference, agent.policy.model
        x0_pretrained = agent.policy.predict_x0(rollout.states[-1], rollout.remaining[-1])
        agent.policy.model = trained
    tau = agent.config.likelihood_temperature
    for row in range(len(users)):
        p = torch.distributions.Categorical(logits=x0[row, keep[row]] / tau)
        q = torch.distributions.Categorical(logits=x0_pretrained[row, keep[row]] / tau)
        assert float(kl[row]) == pytest.approx(float(torch.distributions.kl_divergence(p, q)), rel=1e-4, abs=1e-6)
    assert float(kl.mean()) > 0


def test_unknown_agents_and_options_are_named():
    with pytest.raises(ConfigError, match="bogus"):
        finetune_config({"agent": "refit", "bogus": 1})
    with pytest.raises(ConfigError, match="anchor"):
        finetune_config({"anchor": "l3"})
    with pytest.raises(ConfigError, match="lr"):
        finetune_config({"lr": 0})
    with pytest.raises(ConfigError, match="finetune.reward: reward term 'colaborative': unknown type"):
        finetune_config({"reward": {"colaborative": {"k": 20}}})  # misspelt: refused before anything runs
    from agents import agent_class

    with pytest.raises(ConfigError, match="available"):
        agent_class("a2c")
    assert set(NATIVE_AGENTS) <= set(AGENTS)


@pytest.mark.parametrize("agent, zeroed", [("reinforce", {"pg_weight": 0.0}),
                                            ("refit", {"pg_weight": 0.0, "likelihood_weight": 0.0}),
                                            ("supervised", {"likelihood_weight": 0.0})])
def test_an_agent_whose_every_learning_term_weighs_zero_is_refused_by_name(tiny_data, tiny_pretrained, agent, zeroed):
    with pytest.raises(ConfigError, match=f"the {agent} agent would train on nothing but its anchor.*weigh 0.*finetune\\."):
        _setup(tiny_data, tiny_pretrained, agent, **zeroed)
    _setup(tiny_data, tiny_pretrained, "refit", pg_weight=0.0)  # the likelihood term alone still trains
    _setup(tiny_data, tiny_pretrained, "reinforce", pg_weight=0.0, categorical_samples=16)  # its categorical term


def _experiment(**finetune):
    return config_from_dict({**EXPERIMENT, "finetune": {"users_per_batch": 32, "rollouts_per_user": 2, "exposed_steps": 2,
                                                        "eval_every": 3, "max_updates": 9, "patience": 100,
                                                        "time_budget_s": None, "lr": 1e-3, **finetune}})


def test_finetuned_checkpoint_loads_and_evaluates_like_the_run(tiny_data, tiny_pretrained, tmp_path):
    result = finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "ft", progress=False, log=lambda _: None)
    model, _ = load_checkpoint(tmp_path / "ft", tiny_data)
    metrics = evaluate(model, tiny_data, splits=("valid", "test"), ks=(10, 20)).metrics
    assert metrics["valid"]["recall@20"] == pytest.approx(result.best_metrics["valid"]["recall@20"], abs=1e-7)
    assert "test" not in result.best_metrics  # sealed: never computed during the run
    log_columns = (tmp_path / "ft" / "log.csv").read_text().splitlines()[0].split(",")
    assert not any(column.startswith("test") for column in log_columns)
    reported = finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "ft2", progress=False,
                        log=lambda _: None, report_test=True)
    assert reported.best_metrics["test"]["recall@20"] == pytest.approx(metrics["test"]["recall@20"], abs=1e-7)
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["seed"] == 0 and results["agent"] == "refit" and "torch" in results["versions"]
    assert (tmp_path / "ft" / "log.csv").is_file() and (tmp_path / "ft" / "curves.png").is_file()


def test_a_crashed_run_resumes_to_the_same_result(tiny_data, tiny_pretrained, tmp_path, monkeypatch):
    quiet = {"progress": False, "log": lambda _: None}
    full = finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "full", **quiet)
    crash_at_update(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "cut", **quiet)
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "running"
    monkeypatch.undo()
    resumed = finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "cut", resume=True, **quiet)
    assert resumed.updates == full.updates == 9
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_importance_weighted_categorical_gradient_is_the_exact_log_likelihood_gradient():
    from agents.reinforce import categorical_pg_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 12, requires_grad=True)
    scored = torch.zeros(2, 12, dtype=torch.bool)
    scored[0, [1, 4, 7]] = True
    scored[1, [0, 11]] = True
    log_p = torch.log_softmax(logits, dim=1)
    exact = torch.autograd.grad(-(torch.where(scored, log_p, 0.0).sum(1) / scored.sum(1)).mean(), logits)[0]
    samples = torch.multinomial(log_p.detach().exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    log_p = torch.log_softmax(logits, dim=1)  # a fresh graph
    estimate = torch.autograd.grad(categorical_pg_loss(log_p, scored, samples, "importance"), logits)[0]
    torch.testing.assert_close(estimate, exact, atol=0.01, rtol=0.05)


def test_reinforce_with_a_categorical_last_step_improves_the_likelihood(tiny_data, tiny_pretrained):
    agent, _ = _setup(tiny_data, tiny_pretrained, "reinforce", lr=3e-3, pg_weight=0.0, anchor="none", categorical_samples=32)
    users = np.arange(32)
    before = -float(_likelihood_loss(agent, users))
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for _ in range(25):
        agent.update(users, rng, generator)
    assert -float(_likelihood_loss(agent, users)) > before


def _likelihood_loss(agent, users):
    rows = np.repeat(users, agent.group_size)
    rollout = collect_rollouts(agent.core, agent.policy, rows, np.random.default_rng(123),
                               torch.Generator().manual_seed(0), agent.group_size, stochastic=False)
    with torch.no_grad():
        return agent.likelihood_loss(rollout)


def test_likelihood_mask_visible_reaches_the_likelihood_term(tiny_data, tiny_pretrained):
    """``finetune.likelihood_mask_visible: false``: the input items compete in the likelihood term's
    softmax, so the same rollout's loss is higher (they take probability from the held-out items)."""
    users = np.arange(32)
    losses = {}
    for mask in (True, False):
        agent, _ = _setup(tiny_data, tiny_pretrained, "refit", likelihood_mask_visible=mask)
        assert agent.likelihood.mask_visible is mask
        losses[mask] = float(_likelihood_loss(agent, users))
    assert losses[False] > losses[True]
    with pytest.raises(ConfigError, match="finetune.likelihood_mask_visible"):
        finetune_config({"likelihood_mask_visible": "no"})


def test_shuffling_rewards_within_users_matches_a_loop(tiny_data, tiny_pretrained):
    agent, _ = _setup(tiny_data, tiny_pretrained, "reinforce", exposed_steps=0)
    agent.core.shaping = build_shaping({"type": "held_out", "temperature": 0.5}, tiny_data)  # rewards on every step
    rollout = collect_rollouts(agent.core, agent.policy, np.repeat(np.arange(32), 4), np.random.default_rng(0),
                               torch.Generator().manual_seed(0), 4, explored_steps=2, recorded_steps=2)
    order = torch.rand(32, 4, generator=torch.Generator().manual_seed(1)).argsort(-1)
    shuffled = shuffle_rewards_within_groups(rollout, order)
    for user in range(32):
        for k in range(4):
            row, source = 4 * user + k, 4 * user + int(order[user, k])
            assert torch.equal(shuffled.rewards[:, row], rollout.rewards[:, source])
            assert torch.equal(shuffled.unrecorded_return[row], rollout.unrecorded_return[source])
            for name, values in rollout.components.items():
                assert torch.equal(shuffled.components[name][row], values[source]), name
    assert shuffled.states is rollout.states and shuffled.log_probs is rollout.log_probs
    assert not torch.equal(shuffled.rewards, rollout.rewards)
    per_user = [r.episode_return().reshape(32, 4).sum(1) for r in (shuffled, rollout)]
    torch.testing.assert_close(*per_user)
    with pytest.raises(ValueError, match=r"order must be \(users, group_size\) = \(32, 4\), got \(4, 32\)"):
        shuffle_rewards_within_groups(rollout, order.T)


def test_shuffle_rewards_within_user_reaches_the_rollouts_and_is_refused_elsewhere(tiny_data, tiny_pretrained):
    users = np.arange(32)
    rollouts = {}
    for placebo in (False, True):
        agent, _ = _setup(tiny_data, tiny_pretrained, "refit", shuffle_rewards_within_user=placebo)
        rollouts[placebo] = agent.collect(users, np.random.default_rng(0), torch.Generator().manual_seed(0))
    real, placebo = rollouts[False].rewards[-1].reshape(32, 4), rollouts[True].rewards[-1].reshape(32, 4)
    assert torch.equal(rollouts[True].states, rollouts[False].states)  # the same episodes ...
    assert torch.equal(placebo.sort(-1).values, real.sort(-1).values)  # ... each user's rewards among its own rollouts
    assert not torch.equal(placebo, real)
    for agent_name, overrides in (("supervised", {}), ("refit", {"rollouts_per_user": 1}), ("slate-rloo", {})):
        with pytest.raises(ConfigError, match="finetune.shuffle_rewards_within_user permutes the rewards"):
            _setup(tiny_data, tiny_pretrained, agent_name, shuffle_rewards_within_user=True, **overrides)
    for agent_name, overrides, problem in (("refit", {"pg_weight": 0.0}, "weighs 0 here"),
                                           ("reinforce", {"categorical_samples": 16}, "would keep its real reward")):
        with pytest.raises(ConfigError, match=f"finetune.shuffle_rewards_within_user.*{problem}"):
            _setup(tiny_data, tiny_pretrained, agent_name, shuffle_rewards_within_user=True, **overrides)
    with pytest.raises(ConfigError, match="finetune.shuffle_rewards_within_user"):
        finetune_config({"shuffle_rewards_within_user": "yes"})


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_log_prob_of_the_mean_is_the_density_at_the_mean(tiny_data, tiny_pretrained, reduction):
    agent, _ = _setup(tiny_data, tiny_pretrained, "reinforce", log_prob_reduction=reduction)
    loc = torch.randn(3, tiny_data.n_items)
    torch.testing.assert_close(agent.policy.log_prob(loc, loc), agent.policy.log_prob_of_mean(tiny_data.n_items).expand(3))


def test_every_agent_says_what_it_sees():
    from agents.base import SEES
    from agents.config import finetune_config

    expected = {"refit": "c", "supervised": "c", "reinforce": "a", "ppo": "a", "torchrl-ppo": "a", "sb3-ppo": "a"}
    for name, label in expected.items():
        assert agent_class(name).information(finetune_config({"agent": name})) == label, name
    assert set(expected.values()) <= set(SEES)
    importance = finetune_config({"agent": "reinforce", "categorical_samples": 64, "pg_weight": 0.0})
    assert agent_class("reinforce").information(importance) == "b"  # a sampled supervised gradient
    hit = finetune_config({"agent": "reinforce", "categorical_samples": 64, "categorical_reward": "hit"})
    assert agent_class("reinforce").information(hit) == "a"
    assert agent_class("refit").information(finetune_config({"likelihood_weight": 0.0})) == "a"


def test_term_gradients_log_the_same_update_and_normalize_rescales(tiny_data, tiny_pretrained):
    from conftest import build_tiny_learner

    users, seeds = np.arange(32), (np.random.default_rng(0), torch.Generator().manual_seed(0))
    plain, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit", reward={"collaborative": {"weight": 1.0, "k": 5}})
    logged, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit", term_gradients="log",
                                   reward={"collaborative": {"weight": 1.0, "k": 5}})
    before = [p.detach().clone() for p in plain.policy.parameters()]
    plain.update(users, *seeds)
    out = logged.update(users, np.random.default_rng(0), torch.Generator().manual_seed(0))
    for a, b in zip(plain.policy.parameters(), logged.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # logging does not change the update
    assert any(not torch.equal(a, b) for a, b in zip(before, plain.policy.parameters()))
    assert {"grad_norm/likelihood", "grad_norm/policy_gradient", "grad_norm/anchor"} <= set(out)
    cosine = out["grad_cosine/likelihood~policy_gradient"]
    assert -1.0 <= cosine <= 1.0 and out["grad_norm/likelihood"] > 0



@pytest.mark.parametrize("mode", ["log", "normalize"])
def test_term_gradients_combine_each_terms_own_gradient(tiny_data, tiny_pretrained, mode):
    from conftest import build_tiny_learner

    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit", term_gradients=mode, max_grad_norm=0.0,
                                  anchor_weight=0.0, pg_weight=2.0, reward={"collaborative": {"weight": 1.0, "k": 5}})
    rollout = agent.collect(np.arange(32), np.random.default_rng(0), torch.Generator().manual_seed(0))
    terms = agent.loss(rollout, torch.Generator().manual_seed(1))
    parameters = [p for p in agent.policy.parameters() if p.requires_grad]
    flat = {}
    for name in ("loss_likelihood", "loss_policy_gradient"):
        grads = torch.autograd.grad(terms[name], parameters, retain_graph=True, allow_unused=True)
        flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters)])
    weights = {"loss_likelihood": 1.0, "loss_policy_gradient": 2.0}
    scale = {n: (g.norm() if mode == "normalize" else 1.0) for n, g in flat.items()}
    expected = sum(weights[n] * flat[n] / scale[n] for n in flat)
    agent.optimizer.step = lambda: None  # keep the gradients to look at them
    norm, stats = agent.step_terms(terms)
    combined = torch.cat([p.grad.reshape(-1) for p in parameters])
    torch.testing.assert_close(combined, expected, rtol=1e-4, atol=1e-7)
    assert norm == pytest.approx(float(expected.norm()), rel=1e-4)
    assert stats["grad_norm/likelihood"] == pytest.approx(float(flat["loss_likelihood"].norm()), rel=1e-4)
    assert scale["loss_likelihood"] != 1.0 or mode == "log"
