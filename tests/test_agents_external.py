"""The library-backed agents, ``torchrl-ppo`` (TorchRL ``ClipPPOLoss``) and ``sb3-ppo`` (SB3 ``PPO``), on a tiny env.

Each one builds through ``agents.build_agent``, trains the shared ``policy.denoiser`` in place,
improves its own reward and runs through the real trainer (resume included).

Measured on this module's env (300 users x 120 items, T = 5, 2 exposed steps, 32 users x K = 4,
log-std -2, reward ``loglik`` at temperature 0.5, 2 inner epochs, clip 0.2, 25 updates, one
thread). The numbers are the deterministic-path reward on the same users, before -> after:

| agent, log-prob | lr 3e-3 | lr 1e-3 | lr 3e-4 |
|---|---|---|---|
| torchrl-ppo, mean | -4.56 -> -3.87 | -4.56 -> -4.28 | -4.56 -> -4.28 |
| torchrl-ppo, sum | -4.56 -> **-4.63** (clip fraction 0.80-0.87, approx KL 6-42 nats) | -4.56 -> -4.37 | -4.56 -> -4.43 |
| sb3-ppo, mean (group-centred reward) | -4.56 -> -3.86 | -4.56 -> -4.11 | -4.56 -> -4.21 |
| sb3-ppo, mean, SB3's V(t) critic only (no centring) | -4.56 -> -4.55 | -4.56 -> **-4.68** | -4.56 -> -4.41 |
| sb3-ppo, sum (group-centred reward) | -4.56 -> **-4.85** (clip fraction 0.83-0.87, approx KL 15-87) | -4.56 -> -4.20 | -4.56 -> -4.38 |

With the summed log-prob (TorchRL's and SB3's own convention) the ratio of a 120-dim step
leaves the clip range after one Adam step at lr 3e-3 and the reward falls; the per-dimension
mean (``log_prob_reduction="mean"``, the project default) is what makes lr 3e-3 work. SB3's own
critic (on ``t``) leaves the between-user spread of the reward in the advantage; the per-user
centring wrapper of ``agents.sb3_ppo`` is what makes ``sb3-ppo`` improve.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents.trainer import finetune
from refit_gym.checkpoint import load_checkpoint
from refit_gym.config import config_from_dict
from refit_gym.errors import ConfigError
from refit_gym.evaluation.evaluator import evaluate

from conftest import TINY_EXPERIMENT as EXPERIMENT
from conftest import build_tiny_learner as _setup
from conftest import assert_same_run, crash_at_update, train_tiny
EXTERNAL_AGENTS = ("torchrl-ppo", "sb3-ppo")
REWARD = {"loglik": {"weight": 1.0, "temperature": 0.5}}


def _needs(agent: str) -> None:
    if agent == "sb3-ppo":
        pytest.importorskip("stable_baselines3")


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_the_torchrl_env_over_the_agents_core_passes_check_env_specs(tiny_data, tiny_pretrained):
    from torchrl.envs.utils import check_env_specs

    agent, _ = _setup(tiny_data, tiny_pretrained, "torchrl-ppo")
    assert agent.env.core is agent.core and agent.env.batch_size == torch.Size([128])
    check_env_specs(agent.env, seed=0)


@pytest.mark.parametrize("agent_name", EXTERNAL_AGENTS)
def test_agent_trains_the_shared_denoiser_in_place_and_improves_its_reward(tiny_data, tiny_pretrained, agent_name):
    _needs(agent_name)
    agent, _ = _setup(tiny_data, tiny_pretrained, agent_name, lr=3e-3, reward=REWARD, anchor="none",
                      log_prob_reduction="mean", inner_epochs=2)
    denoiser = agent.policy.model
    weights = [p.detach().clone() for p in denoiser.parameters()]
    before, after, diagnostics = train_tiny(agent)

    assert agent.policy.model is denoiser
    assert any(not torch.equal(p, w) for p, w in zip(denoiser.parameters(), weights))
    expected = ({"loss_objective", "clip_fraction", "kl_approx", "ESS", "grad_norm"} if agent_name == "torchrl-ppo"
                else {"approx_kl", "clip_fraction", "loss", "policy_gradient_loss", "value_loss", "grad_norm"})
    assert expected | {"reward/total", "held_out_mass", "log_std"} <= set(diagnostics)
    assert all(np.isfinite(v) for v in diagnostics.values()), diagnostics
    assert after > before + 0.2, (agent_name, before, after)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torchrl_log_probs_follow_the_configured_reduction(tiny_data, tiny_pretrained, reduction):
    agent, _ = _setup(tiny_data, tiny_pretrained, "torchrl-ppo", log_prob_reduction=reduction)
    td = agent.collect_tensordict(np.arange(32), np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert td.shape == (128, 2)
    with torch.no_grad():
        expected = agent.policy.log_prob(td["action"], agent.policy.loc(td["x_t"], td["t"]))
    torch.testing.assert_close(td[agent.log_prob_key], expected, rtol=1e-5, atol=1e-4)


def test_summed_log_probs_make_torchrl_ratios_leave_the_clip_range(tiny_data, tiny_pretrained):
    """The documented convention pitfall: same lr, the summed 120-dim log-prob clips far more."""
    fractions = {}
    for reduction in ("mean", "sum"):
        agent, _ = _setup(tiny_data, tiny_pretrained, "torchrl-ppo", lr=3e-3, anchor="none", log_prob_reduction=reduction,
                          inner_epochs=2)
        rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
        fractions[reduction] = np.mean([agent.update(np.arange(32), rng, generator)["clip_fraction"] for _ in range(3)])
    assert fractions["sum"] > 2 * fractions["mean"], fractions


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sb3_policy_keeps_the_pretrained_weights_and_the_log_prob_convention(tiny_data, tiny_pretrained, reduction):
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.utils import obs_as_tensor

    agent, base = _setup(tiny_data, tiny_pretrained, "sb3-ppo", log_prob_reduction=reduction)
    sb3_policy = agent.model.policy
    for p, p0 in zip(agent.policy.model.parameters(), base.denoiser.parameters()):
        assert torch.equal(p, p0)  # ortho_init=False: construction left the pretrained weights alone
    assert isinstance(sb3_policy.action_net, torch.nn.Identity)
    assert sb3_policy.log_std is agent.policy.log_std
    optimised = {id(p) for group in agent.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in agent.policy.model.parameters()} <= optimised
    assert sum(p.numel() for p in sb3_policy.parameters()) < sum(p.numel() for p in base.denoiser.parameters()) + 100

    observation, _, _ = agent._start_episodes(np.arange(32), np.random.default_rng(0))
    obs = obs_as_tensor(observation, "cpu")
    with torch.no_grad():
        actions, _, log_prob = sb3_policy(obs)
        expected = agent.policy.log_prob(actions, agent.policy.loc(obs["x_t"], obs["t"]))
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-4)


def test_sb3_ppo_without_stable_baselines3_names_the_extra(tiny_data, tiny_pretrained, monkeypatch,
                                                          without_stable_baselines3):
    import agents.sb3_ppo as sb3_ppo

    monkeypatch.setattr(sb3_ppo, "_CLASSES", None)
    with pytest.raises(ConfigError, match=r"refit-gym\[sb3\]") as error:
        _setup(tiny_data, tiny_pretrained, "sb3-ppo")
    assert isinstance(error.value, ImportError)


def _experiment(**finetune_section):
    return config_from_dict({**EXPERIMENT, "finetune": {"users_per_batch": 32, "rollouts_per_user": 2, "exposed_steps": 2,
                                                        "eval_every": 3, "max_updates": 9, "patience": 100,
                                                        "time_budget_s": None, "lr": 1e-3, **finetune_section}})


@pytest.mark.parametrize("agent_name", EXTERNAL_AGENTS)
def test_agent_runs_through_the_trainer_and_resumes_to_the_same_result(tiny_data, tiny_pretrained, tmp_path, agent_name,
                                                                       monkeypatch):
    _needs(agent_name)
    quiet = {"progress": False, "log": lambda _: None}
    full = finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "full", agent=agent_name, **quiet)
    assert full.updates == 9
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["agent"] == agent_name
    rows = [row for row in full.history if int(row["update"]) > 0]
    assert rows and all(np.isfinite(float(row["grad_norm"])) for row in rows)
    model, _ = load_checkpoint(tmp_path / "full", tiny_data)
    metrics = evaluate(model, tiny_data, splits=("valid",), ks=(20,)).metrics
    assert metrics["valid"]["recall@20"] == pytest.approx(full.best_metrics["valid"]["recall@20"], abs=1e-7)

    crash_at_update(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "cut", agent=agent_name, **quiet)
    monkeypatch.undo()
    resumed = finetune(_experiment(), tiny_data, tiny_pretrained, tmp_path / "cut", agent=agent_name, resume=True, **quiet)
    assert resumed.updates == 9
    assert_same_run(tmp_path / "full", tmp_path / "cut")
