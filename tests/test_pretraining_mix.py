"""The pretraining mix (``finetune.pretrain_loss_weight``): the model's own training loss on a fresh
batch, added to ``refit`` / ``supervised`` updates; an update with only that term is a pretraining step."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from agents.config import finetune_config
from agents.trainer import build_learner, finetune
from conftest import TINY_EXPERIMENT, assert_same_run, build_tiny_learner, crash_at_update
from refit_gym.config import config_from_dict
from refit_gym.diffusion import TimestepSampler
from refit_gym.errors import ConfigError
from test_sequential_models import sequence_data, small

pytestmark = pytest.mark.usefixtures("single_torch_thread")
ONLY_THE_MIX = {"likelihood_weight": 0.0, "pg_weight": 0.0, "anchor_weight": 0.0, "pretrain_loss_weight": 1.0}


def _sequential_learner(agent: str, **overrides):
    data = sequence_data()
    settings = finetune_config({"agent": agent, "users_per_batch": 4, "rollouts_per_user": 2, "holdout_count": 1,
                                "likelihood_temperature": 1.0, "reward": {"loglik": {"weight": 1.0}}, **overrides})
    torch.manual_seed(0)
    return build_learner(settings, small("diffurec", dropout=0.5), data, pretraining_reweight=False)


def _reference_loss(model, mix, generator: torch.Generator) -> torch.Tensor:
    """What the module's docstring says the term is, written out: a seed from the update's generator,
    the first batch of the model's own shuffle, its training loss with uniform timesteps, in train mode."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    draws = torch.Generator().manual_seed(seed)
    batch = next(iter(model.training_batches(mix.table, mix.batch_size, draws)))
    model.train()
    try:
        return model.training_loss(batch, TimestepSampler(model.diffusion.steps, method="uniform"), mix.reweight, draws)
    finally:
        model.eval()


@pytest.mark.parametrize("scenario", ["diffrec", "diffurec"])
def test_the_mix_is_the_models_own_training_loss_on_a_fresh_batch(tiny_data, tiny_pretrained, scenario):
    if scenario == "diffrec":
        agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit", pretrain_loss_weight=1.0,
                                      pretrain_batch_size=50)
    else:
        agent = _sequential_learner("refit", pretrain_loss_weight=1.0, pretrain_batch_size=3)
    model = agent.policy.model
    assert not model.training and agent.pretraining.batch_size == (50 if scenario == "diffrec" else 3)
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(1)  # dropout
    loss = agent.pretraining_loss(copy.deepcopy(generator))
    torch.manual_seed(1)
    torch.testing.assert_close(loss, _reference_loss(model, agent.pretraining, generator), rtol=0, atol=0)
    assert loss.requires_grad and float(loss.detach()) > 0
    assert not model.training  # the policy's eval mode is restored
    torch.manual_seed(1)
    other = agent.pretraining_loss(torch.Generator().manual_seed(8))
    assert float(other) != float(loss)  # another update draws another batch


def test_the_batch_defaults_to_the_users_per_update(tiny_data, tiny_pretrained):
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, "supervised", pretrain_loss_weight=0.5)
    assert agent.pretraining.batch_size == 32
    off, _ = build_tiny_learner(tiny_data, tiny_pretrained, "refit")
    assert off.pretraining is None and float(off.pretraining_loss()) == 0.0


@pytest.mark.parametrize("agent_name", ["refit", "supervised"])
def test_an_update_with_only_the_mix_is_a_pretraining_step(tiny_data, tiny_pretrained, agent_name):
    """With every other term off and no clipping, one update is one Adam step on the training loss
    of the batch the update draws: what ``refit-gym pretrain`` does with that batch."""
    agent, _ = build_tiny_learner(tiny_data, tiny_pretrained, agent_name, lr=1e-2, max_grad_norm=0.0, **ONLY_THE_MIX)
    reference = copy.deepcopy(agent.policy.model)
    users, rng, generator = np.arange(32), np.random.default_rng(0), torch.Generator().manual_seed(0)
    rng_copy, generator_copy = copy.deepcopy(rng), copy.deepcopy(generator)
    torch.manual_seed(3)
    stats = agent.update(users, rng, generator)

    agent.collect(users, rng_copy, generator_copy)  # the update's draws before its loss
    torch.manual_seed(3)
    reference_loss = _reference_loss(reference, agent.pretraining, generator_copy)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    reference_loss.backward()
    optimizer.step()
    assert stats["loss_pretrain"] == pytest.approx(float(reference_loss), rel=1e-6)
    for (name, mine), theirs in zip(agent.policy.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), agent.reference.parameters()))


def test_refit_logs_the_mix_beside_its_other_terms_and_sees_c():
    from agents import agent_class

    agent = _sequential_learner("refit", pretrain_loss_weight=0.5, likelihood_weight=0.0)
    assert agent_class("refit").information(agent.config) == "c"  # an exact gradient of a supervised loss
    assert agent_class("refit").information(finetune_config({"likelihood_weight": 0.0})) == "a"
    stats = agent.update(np.arange(4), np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert stats["loss_pretrain"] > 0 and np.isfinite(stats["loss"])
    assert agent.term_weights()["loss_pretrain"] == 0.5


@pytest.mark.parametrize("agent_name", ["reinforce", "ppo", "slate-rloo"])
def test_agents_that_do_not_mix_refuse_the_weight_by_name(tiny_data, tiny_pretrained, agent_name):
    with pytest.raises(ConfigError, match=f"pretrain_loss_weight.*{agent_name}"):
        build_tiny_learner(tiny_data, tiny_pretrained, agent_name, pretrain_loss_weight=1.0)


@pytest.mark.parametrize("values", [{"pretrain_loss_weight": -1.0}, {"pretrain_batch_size": -2}])
def test_negative_mix_settings_are_refused_by_name(values):
    with pytest.raises(ConfigError, match=next(iter(values))):
        finetune_config(values)


def test_a_crashed_run_with_the_mix_resumes_to_the_same_result(tiny_data, tiny_pretrained, tmp_path, monkeypatch):
    config = config_from_dict({**TINY_EXPERIMENT, "finetune": {
        "users_per_batch": 32, "rollouts_per_user": 2, "exposed_steps": 2, "eval_every": 3, "max_updates": 9,
        "patience": 100, "time_budget_s": None, "lr": 1e-3, "pretrain_loss_weight": 1.0}})
    quiet = {"progress": False, "log": lambda _: None}
    full = finetune(config, tiny_data, tiny_pretrained, tmp_path / "full", **quiet)
    crash_at_update(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, tiny_data, tiny_pretrained, tmp_path / "cut", **quiet)
    monkeypatch.undo()
    resumed = finetune(config, tiny_data, tiny_pretrained, tmp_path / "cut", resume=True, **quiet)
    assert resumed.updates == full.updates == 9
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    log = (tmp_path / "full" / "log.csv").read_text().splitlines()
    assert "loss_pretrain" in log[0].split(",")
    results = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["config"]["finetune"]["pretrain_loss_weight"] == 1.0 and results["sees"] == "c"
